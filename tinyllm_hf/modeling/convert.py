"""Conversion between Tinyllm and Llama checkpoints.

A dense Tinyllm model *is* a Llama model: same parameter names, same math. Converting is a config mapping plus a
copy of the weights, so tools that only know Llama (vLLM, llama.cpp, optimum, older transformers) load our models
without plugins. The one choice Llama cannot express, `qkv_bias` (biases on q/k/v but not o), is rejected.

Checkpoints are also written the way transformers 4.x reads them (top-level `rope_theta`/`rope_scaling`,
`torch_dtype`, `tokenizer_class: PreTrainedTokenizerFast`), because vLLM and optimum-onnx pin transformers < 5.
"""

import json
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tinyllm_hf.errors import ConversionError, MissingFileError, OutputExistsError
from tinyllm_hf.modeling.configuration_tinyllm import TinyllmConfig
from tinyllm_hf.modeling.modeling_tinyllm import TinyllmForCausalLM
from tinyllm_hf.runs import atomic_output

# Fields with the same name and meaning in both configs.
SHARED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "tie_word_embeddings", "attention_bias", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id",
    "use_cache",
)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
)


def tinyllm_config_to_llama(config: TinyllmConfig) -> LlamaConfig:
    if getattr(config, "num_experts", 0):
        raise ConversionError("a Mixture-of-Experts Tinyllm has no Llama equivalent; export it with `tinyllm export qwen2-moe`")
    if config.qkv_bias and not config.attention_bias:
        raise ConversionError(
            "qkv_bias=True (biases on q/k/v but not o) cannot be expressed as Llama; train with attention_bias or no bias"
        )
    fields = {name: getattr(config, name) for name in SHARED_FIELDS}
    return LlamaConfig(**fields, hidden_act="silu", mlp_bias=False, rope_parameters=dict(config.rope_parameters))


def llama_config_to_tinyllm(config: LlamaConfig) -> TinyllmConfig:
    if config.hidden_act != "silu":
        raise ConversionError(f"Llama hidden_act={config.hidden_act!r}; Tinyllm's MLP is SwiGLU (silu)")
    if getattr(config, "mlp_bias", False):
        raise ConversionError("Llama mlp_bias=True; Tinyllm's MLP has no biases")
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        raise ConversionError(f"Llama pretraining_tp={config.pretraining_tp}; only 1 is supported")
    fields = {name: getattr(config, name) for name in SHARED_FIELDS}
    return TinyllmConfig(**fields, rope_parameters=dict(config.rope_parameters))


@torch.no_grad()
def _copy_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    # Both sides use Llama's parameter names; strict loading proves nothing is left behind or invented.
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    if target.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = target.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and target.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ConversionError(f"weights do not map one to one: missing {missing}, unexpected {unexpected}")
    if target.config.tie_word_embeddings:
        target.tie_weights()


def tinyllm_to_llama_model(model: TinyllmForCausalLM) -> LlamaForCausalLM:
    llama = LlamaForCausalLM(tinyllm_config_to_llama(model.config)).to(model.dtype)
    _copy_weights(model, llama)
    llama.generation_config = model.generation_config
    return llama.eval()


def llama_to_tinyllm_model(model: LlamaForCausalLM) -> TinyllmForCausalLM:
    tinyllm = TinyllmForCausalLM(llama_config_to_tinyllm(model.config)).to(model.dtype)
    _copy_weights(model, tinyllm)
    tinyllm.generation_config = model.generation_config
    return tinyllm.eval()


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer next to the converted weights, naming its class the way transformers 4.x and 5.x both load."""
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    config_path = dst / "tokenizer_config.json"
    if config_path.exists():
        tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
        if tokenizer_config.get("tokenizer_class") in (None, "TokenizersBackend"):
            tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        chat_template = dst / "chat_template.jinja"
        if chat_template.exists() and "chat_template" not in tokenizer_config:
            # transformers 4.x reads the template from tokenizer_config.json only.
            tokenizer_config["chat_template"] = chat_template.read_text(encoding="utf-8")
        config_path.write_text(json.dumps(tokenizer_config, ensure_ascii=False, indent=2), encoding="utf-8")


def write_legacy_config_fields(directory: Path) -> None:
    """Add the config.json keys transformers 4.x reads: without `rope_theta` it silently falls back to 10000."""
    config_path = Path(directory) / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    rope = config.get("rope_parameters") or {}
    config["rope_theta"] = rope.get("rope_theta", 10000.0)
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if "dtype" in config:
        config["torch_dtype"] = config["dtype"]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def convert_checkpoint(src, dst, source_class, convert) -> Path:
    """Load the `source_class` checkpoint in `src` (refusing another model type), apply `convert` to the model and
    write the result, with its tokenizer, to the new or empty directory `dst`."""
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").exists():
        raise MissingFileError(f"{src} is not a model directory (no config.json)")
    if dst.exists() and any(dst.iterdir()):
        raise OutputExistsError(f"output directory {dst} exists and is not empty")
    model_type = json.loads((src / "config.json").read_text(encoding="utf-8")).get("model_type")
    expected = source_class.config_class.model_type
    if model_type != expected:
        raise ConversionError(f"{src} holds a {model_type!r} checkpoint, not a {expected} one")
    converted = convert(source_class.from_pretrained(src))
    # Build beside the destination and rename, so a failed conversion leaves no partial checkpoint behind.
    with atomic_output(dst) as staged:
        converted.save_pretrained(staged)
        write_legacy_config_fields(staged)
        copy_tokenizer_files(src, staged)
    return dst


def tinyllm_to_llama(src, dst) -> Path:
    """Write the Tinyllm checkpoint in `src` as a `LlamaForCausalLM` checkpoint (with its tokenizer) in `dst`."""
    return convert_checkpoint(src, dst, TinyllmForCausalLM, tinyllm_to_llama_model)


def llama_to_tinyllm(src, dst) -> Path:
    """Write the Llama checkpoint in `src` as a Tinyllm checkpoint (with remote code and tokenizer) in `dst`."""
    return convert_checkpoint(src, dst, LlamaForCausalLM, llama_to_tinyllm_model)
