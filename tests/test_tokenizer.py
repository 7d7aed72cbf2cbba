"""Tokenizer training, chat format, vocabulary extension and embedding resizing (offline, small corpora)."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import review_lines
from transformers import AutoTokenizer

from tinyllm_hf.tokenizer import (
    CHAT_TEMPLATE,
    DEFAULT_SYSTEM_PROMPT,
    SPECIAL_TOKENS,
    apply_chat_template_to_tokenizer,
    extend_tokenizer,
    resize_model_embeddings,
    train_tokenizer,
)
from tinyllm_hf.cli import main as tinyllm

ENGLISH = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a small english corpus for a test",
    "tokenizers are fun to build and to test carefully",
] * 40
ROUND_TRIP = [
    "今天天气很好，我们去公园散步吧！",
    "emoji 😀🤖👨‍👩‍👧 and rare characters 𠀀𪚥龘 ＡＢＣ",
    "  leading spaces, tabs\tand\r\nnewlines\n\n",
    "mixed 中文English123混排。\u200b\x00\x7f",
    "",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_saved_tokenizer_loads_with_special_tokens_and_config(tiny_tokenizer_dir, tokenizer):
    assert tokenizer.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == SPECIAL_TOKENS
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|endoftext|>", 0)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|pad|>", 1)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert len(tokenizer) == 600
    config = json.loads((tiny_tokenizer_dir / "tokenizer_config.json").read_text("utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["model_max_length"] == tokenizer.model_max_length == 1024
    assert config["chat_template"] == CHAT_TEMPLATE
    for token in SPECIAL_TOKENS:  # each is one id, even inside text
        assert tokenizer.encode(f"你好{token}好") == tokenizer.encode("你好") + [tokenizer.convert_tokens_to_ids(token)] + tokenizer.encode("好")


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_is_lossless(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_compresses_chinese(tokenizer):
    text = "".join(review_lines(40))
    byte_tokens = len(text.encode("utf-8"))
    # At 600 tokens most merges go into whole characters (3 bytes each), so about half the bytes' token count.
    assert len(tokenizer.encode(text)) < 0.6 * byte_tokens


def test_legacy_transformers_loads_the_tokenizer(tiny_tokenizer_dir, tokenizer):
    legacy_python = os.environ.get("TINYLLM_LEGACY_PYTHON")
    if not legacy_python:
        pytest.skip("TINYLLM_LEGACY_PYTHON (a transformers 4.57 environment, see scripts/test.sh) is not set")
    text = ROUND_TRIP[0]
    code = (
        "import json, sys; from transformers import AutoTokenizer; t = AutoTokenizer.from_pretrained(sys.argv[1]); "
        "print(json.dumps([t.encode(sys.argv[2]), t.eos_token_id, t.pad_token_id, "
        "t.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=False)]))"
    )
    result = subprocess.run([legacy_python, "-c", code, str(tiny_tokenizer_dir), text], capture_output=True, text=True,
                            check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    ids, eos, pad, rendered = json.loads(result.stdout.strip().splitlines()[-1])
    assert ids == tokenizer.encode(text)
    assert (eos, pad) == (0, 1)
    assert rendered == tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


# --- bad input: clear errors, nothing left on disk -------------------------------------------------------------------

@pytest.mark.parametrize(
    "texts, vocab_size, message",
    [
        ([], 600, "corpus is empty"),
        (["", ""], 600, "corpus is empty"),
        (["你好"], 260, "at least 267"),
        (["ok", b"bytes"], 600, "must be str"),
        (["ok", "bad \udcff surrogate"], 600, "not valid UTF-8"),
    ],
)
def test_bad_input_raises_and_leaves_no_directory(tmp_path, texts, vocab_size, message):
    output = tmp_path / "out" / "tok"
    with pytest.raises(ValueError, match=message):
        train_tokenizer(texts, vocab_size=vocab_size, output_dir=output)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    output = tmp_path / "tok"
    train_tokenizer(review_lines(50), vocab_size=300, output_dir=output)
    with pytest.raises(FileExistsError, match="not empty"):
        train_tokenizer(review_lines(50), vocab_size=320, output_dir=output)
    train_tokenizer(review_lines(50), vocab_size=320, output_dir=output, overwrite=True)
    assert len(AutoTokenizer.from_pretrained(output)) == 320
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no staging or retired directories left


def test_cli_train_from_text_file(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(review_lines(200)), encoding="utf-8")
    assert tinyllm(["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "400", "--output", str(tmp_path / "tok")]) == 0
    assert len(AutoTokenizer.from_pretrained(tmp_path / "tok")) == 400


@pytest.mark.parametrize("command", ["train", "extend"])
def test_cli_hands_the_hub_corpus_config_to_the_loader(command, tmp_path, monkeypatch):
    import tinyllm_hf.data.corpus as corpus

    if command == "extend":
        extend_base_english().save_pretrained(tmp_path / "base")
    command = ["train"] if command == "train" else ["extend", "--base", str(tmp_path / "base"), "--num-new-tokens", "9"]
    seen = {}

    def load_corpus(source, split=None, config=None):
        seen.update(source=source, split=split, config=config)
        raise RuntimeError("no Hub here")

    monkeypatch.setattr(corpus, "load_corpus", load_corpus)
    with pytest.raises(RuntimeError, match="no Hub here"):
        tinyllm(["tokenizer", *command, "--corpus", "wikimedia/wikipedia", "--corpus-config", "20231101.zh",
                  "--output", str(tmp_path / "tok")])
    assert seen == {"source": "wikimedia/wikipedia", "split": "train", "config": "20231101.zh"}


def test_cli_rejects_non_utf8_file_without_output(tmp_path, capsys):
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("café au lait\n".encode("latin-1"))
    assert tinyllm(["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "300", "--output", str(tmp_path / "tok")]) == 1
    assert "latin1.txt" in capsys.readouterr().err
    assert not (tmp_path / "tok").exists()


# --- chat format -----------------------------------------------------------------------------------------------------

def _piecewise_ids(tokenizer, pieces):
    """Reference ids: special tokens as their single id, text pieces encoded on their own."""
    ids = []
    for piece in pieces:
        ids += [tokenizer.convert_tokens_to_ids(piece)] if piece in SPECIAL_TOKENS else tokenizer.encode(piece)
    return ids


def test_chat_template_matches_reference_ids_and_masks_answer_plus_eos(tokenizer):
    system, user, answer = "你是一个数学老师。", "一加一等于几？", "一加一等于二。"
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user},
                {"role": "assistant", "content": answer}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == f"<|system|>\n{system}\n<|user|>\n{user}\n<|assistant|>\n{answer}<|endoftext|>"

    out = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    prompt_ids = _piecewise_ids(tokenizer, ["<|system|>", f"\n{system}\n", "<|user|>", f"\n{user}\n", "<|assistant|>", "\n"])
    answer_ids = _piecewise_ids(tokenizer, [answer, "<|endoftext|>"])
    assert out["input_ids"] == prompt_ids + answer_ids
    assert out["assistant_masks"] == [0] * len(prompt_ids) + [1] * len(answer_ids)


def test_chat_template_default_system_prompt_and_generation_prompt(tokenizer):
    messages = [{"role": "user", "content": "你好"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == f"<|system|>\n{DEFAULT_SYSTEM_PROMPT}\n<|user|>\n你好\n<|assistant|>\n"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[-2:] == [tokenizer.convert_tokens_to_ids("<|assistant|>"), tokenizer.encode("\n")[0]]
    assert not tokenizer.apply_chat_template(messages, tokenize=False).endswith("<|assistant|>\n")


def test_chat_template_multi_turn(tokenizer):
    turns = [("你好", "你好！"), ("你是谁？", "我是助手。"), ("再见", "再见！")]
    messages = [m for user, answer in turns for m in ({"role": "user", "content": user},
                                                      {"role": "assistant", "content": answer})]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    expected = f"<|system|>\n{DEFAULT_SYSTEM_PROMPT}\n" + "".join(
        f"<|user|>\n{user}\n<|assistant|>\n{answer}<|endoftext|>" for user, answer in turns)
    assert rendered == expected
    # A conversation's rendering is a prefix of its continuation's (no separator between turns).
    assert rendered.startswith(tokenizer.apply_chat_template(messages[:2], tokenize=False))

    out = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert masked == _piecewise_ids(tokenizer, [p for _, answer in turns for p in (answer, "<|endoftext|>")])


def test_trl_assistant_only_loss_trains_on_answers_and_eos(tokenizer, tmp_path):
    """What TRL's SFTTrainer actually puts in `labels` with assistant_only_loss=True: answers + EOS, nothing else."""
    pytest.importorskip("trl")
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    turns = [("你好", "你好！"), ("再见", "再见！")]
    messages = [m for user, answer in turns for m in ({"role": "user", "content": user},
                                                      {"role": "assistant", "content": answer})]
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=128))
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, max_length=128, report_to=[], use_cpu=True)
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=datasets.Dataset.from_list([{"messages": messages}]))
    row = trainer.train_dataset[0]
    assert row["input_ids"] == tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"]
    trained = [i for i, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert trained == _piecewise_ids(tokenizer, [p for _, answer in turns for p in (answer, "<|endoftext|>")])


def test_chat_template_rejects_unknown_roles(tokenizer):
    with pytest.raises(Exception, match="got role function"):
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "function", "content": "y"}],
                                      tokenize=False)


def test_apply_chat_template_to_tokenizer_needs_special_tokens(tokenizer):
    plain = extend_base_english()
    with pytest.raises(ValueError, match="lacks the special tokens"):
        apply_chat_template_to_tokenizer(plain)
    tokenizer.chat_template = None
    assert apply_chat_template_to_tokenizer(tokenizer).chat_template == CHAT_TEMPLATE


# --- vocabulary extension --------------------------------------------------------------------------------------------

def extend_base_english():
    """An English-only byte-level BPE without our special tokens (like a GPT-2 style base)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(ENGLISH, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


def _check_extension(base, extended, chinese, english, num_new):
    assert len(extended) == len(base) + num_new
    old_vocab, new_vocab = base.get_vocab(), extended.get_vocab()
    assert all(new_vocab[token] == i for token, i in old_vocab.items())  # every old id kept
    assert sorted(set(new_vocab.values()) - set(old_vocab.values())) == list(range(len(base), len(extended)))
    for text in chinese + english + ROUND_TRIP:
        old_ids, new_ids = base.encode(text, add_special_tokens=False), extended.encode(text, add_special_tokens=False)
        assert extended.decode(new_ids) == base.decode(old_ids)
    for text in english:  # no new pair occurs in English text: the very same ids
        assert extended.encode(text) == base.encode(text)
    chars = sum(map(len, chinese))
    old_tokens = sum(len(base.encode(t, add_special_tokens=False)) for t in chinese)
    new_tokens = sum(len(extended.encode(t, add_special_tokens=False)) for t in chinese)
    assert chars / new_tokens > 1.5 * chars / old_tokens


def test_extend_byte_level_bpe_keeps_ids_and_decoding(tmp_path):
    base = extend_base_english()
    chinese = review_lines(400)
    extended = extend_tokenizer(base, chinese[:300], num_new_tokens=300, output_dir=tmp_path / "ext")
    _check_extension(base, extended, chinese[300:], ENGLISH[:3], 300)
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "ext")
    assert reloaded.get_vocab() == extended.get_vocab() and reloaded.eos_token == "<eos>"
    assert reloaded.encode(chinese[350]) == extended.encode(chinese[350])


def test_extend_sentencepiece_bpe_adds_characters_then_merges(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from transformers import LlamaTokenizer

    model_dir = tmp_path / "sp"
    model_dir.mkdir()
    with open(model_dir / "tokenizer.model", "wb") as model_file:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(ENGLISH), model_writer=model_file, vocab_size=300,
                                       model_type="bpe", byte_fallback=True, minloglevel=2)
    base = LlamaTokenizer.from_pretrained(model_dir)  # Llama-2 style: Metaspace + BPE with byte fallback
    chinese = review_lines(400)
    # min_frequency 8 leaves ~800 missing characters, so the rest of the 1000 new tokens must be merges.
    extended = extend_tokenizer(base, chinese[:300], target_vocab_size=len(base) + 1000, min_frequency=8)
    _check_extension(base, extended, chinese[300:], ENGLISH[:3], 1000)
    new_tokens = extended.convert_ids_to_tokens(list(range(len(base), len(extended))))
    assert "的" in new_tokens[:50]  # the most frequent missing characters come first
    assert any(len(token) > 1 for token in new_tokens)  # then merges of them


def test_extend_refuses_bad_requests():
    base = extend_base_english()
    with pytest.raises(ValueError, match="exactly one"):
        extend_tokenizer(base, ["你好"], num_new_tokens=10, target_vocab_size=400)
    with pytest.raises(ValueError, match="nothing to add"):
        extend_tokenizer(base, ["你好"], target_vocab_size=len(base))
    with pytest.raises(ValueError, match="empty"):
        extend_tokenizer(base, [""], num_new_tokens=10)


def test_resize_model_embeddings_initialises_new_rows_from_pieces():
    from transformers import LlamaConfig, LlamaForCausalLM

    from tinyllm_hf.tokenizer.extend import new_token_pieces

    base = extend_base_english()
    extended = extend_tokenizer(base, review_lines(300), num_new_tokens=200)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(base), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    old_input = model.get_input_embeddings().weight.detach().clone()
    old_output = model.get_output_embeddings().weight.detach().clone()
    english_ids = torch.tensor([base.encode(ENGLISH[0])])
    old_logits = model(english_ids).logits

    resize_model_embeddings(model, base, extended)
    new_input, new_output = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert new_input.shape[0] == new_output.shape[0] == model.config.vocab_size == len(extended)
    assert torch.equal(new_input[: len(base)], old_input) and torch.equal(new_output[: len(base)], old_output)
    pieces = new_token_pieces(base, extended)
    assert all(len(p) >= 2 for p in pieces.values())  # each new token replaces several old ones
    for new_id, old_ids in pieces.items():
        assert "".join(base.convert_ids_to_tokens(old_ids)) == extended.convert_ids_to_tokens(new_id)
        torch.testing.assert_close(new_input[new_id], old_input[old_ids].mean(0))
        torch.testing.assert_close(new_output[new_id], old_output[old_ids].mean(0))
    # Old-token logits are unchanged: the old rows and the rest of the model are untouched.
    torch.testing.assert_close(model(english_ids).logits[..., : len(base)], old_logits)


def test_cli_extend_with_model(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    base = extend_base_english()
    base.save_pretrained(tmp_path / "base")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(base), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=64)).save_pretrained(tmp_path / "model")
    corpus = tmp_path / "zh.txt"
    corpus.write_text("\n".join(review_lines(300)), encoding="utf-8")
    rc = tinyllm(["tokenizer", "extend", "--base", str(tmp_path / "base"), "--corpus", str(corpus), "--num-new-tokens", "100",
                   "--output", str(tmp_path / "ext"), "--model", str(tmp_path / "model"),
                   "--model-output", str(tmp_path / "model-ext")])
    assert rc == 0, capsys.readouterr().err
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model-ext")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model-ext")
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == len(base) + 100
    assert Path(tmp_path / "ext" / "tokenizer.json").exists()


# --- docs/tokenizer.md states what the code does -----------------------------------------------------------------------

def test_tokenizer_doc_matches_the_code():
    from tinyllm_hf.modeling.presets import preset_parameter_counts
    from tinyllm_hf.tokenizer import DEFAULT_VOCAB_SIZE

    doc = (Path(__file__).resolve().parents[1] / "docs" / "tokenizer.md").read_text("utf-8")
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert f"| {token_id} | `{token.replace('|', chr(92) + '|')}` |" in doc
    assert f"DEFAULT_SYSTEM_PROMPT = \"{DEFAULT_SYSTEM_PROMPT}\"" in doc
    assert f"## Default vocabulary size: {DEFAULT_VOCAB_SIZE:,} (measured)" in doc
    # The sweep table's parameter counts and embedding shares are those of the presets in the code.
    for size in (4096, DEFAULT_VOCAB_SIZE, 32768):
        counts = preset_parameter_counts(size)
        row = next(line for line in doc.splitlines() if line.replace("*", "").startswith(f"| {size:,} |"))
        for preset in ("tiny", "16m", "92m"):
            total, embedding = counts[preset]
            assert f"{total / 1e6:.2f}M ({100 * embedding / total:.0f}%)" in row.replace("*", "")


# --------------------------------------------------------------------------------------------------------------------
# Training text cap
# --------------------------------------------------------------------------------------------------------------------


def test_the_training_sample_is_capped_deterministic_and_spread_over_the_whole_corpus():
    from tinyllm_hf.tokenizer.train import sample_texts

    documents = [f"第{i}篇" + "文" * (i % 7) for i in range(4000)]  # 3-10 characters each, all different
    total = sum(map(len, documents))
    batches = [documents[i:i + 100] for i in range(0, len(documents), 100)]
    seen = {}
    sample = sample_texts(batches, total // 4, seen)
    assert sum(map(len, sample)) == seen["sampled_chars"] <= total // 4
    assert seen["sampled_chars"] > total // 4 - 10  # filled up to the last document that fits
    assert sample == sample_texts(batches, total // 4, {})  # the same sample on every run
    # Every quarter of the corpus gives about a quarter of the sample, not just its head.
    position = {text: i for i, text in enumerate(documents)}
    quarters = [sum(position[text] * 4 // len(documents) == q for text in sample) for q in range(4)]
    assert all(abs(count - len(sample) / 4) < len(sample) * 0.06 for count in quarters), quarters
    assert sample_texts(batches, total, {}) == documents  # a corpus within the cap is used whole, in order
    # A document longer than the cap is left out instead of emptying the sample.
    assert sample_texts(batches + [["长" * (total // 4 + 1)]], total // 4, {}) == sample


def test_cli_caps_the_training_text(tmp_path, caplog):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(review_lines(600)), encoding="utf-8")
    cap = sum(len(line) for line in review_lines(600)) // 3
    with caplog.at_level("WARNING"):
        assert tinyllm(["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "400", "--max-train-chars",
                        str(cap), "--tool-format", "0", "--output", str(tmp_path / "tok")]) == 0
    message = next(r.getMessage() for r in caplog.records if "training the tokenizer on" in r.getMessage())
    sampled, read = (int(n.replace(",", "")) for n in re.search(r"on ([\d,]+) of the corpus's ([\d,]+)", message).groups())
    assert sampled <= cap < read
    assert len(AutoTokenizer.from_pretrained(tmp_path / "tok")) == 400


def test_extra_texts_are_learnt_from_whole_outside_the_cap():
    """The CLI's tool-use conversations go in as `extra_texts`: a small cap on the corpus must not sample them away."""
    extra = ["qxzqxzqxzqxz"] * 40
    tokenizer = train_tokenizer(review_lines(100), vocab_size=320, max_train_chars=200, extra_texts=extra)
    assert tokenizer.tokenize(extra[0]) == ["qxzqxzqxzqxz"]


def test_a_bad_training_text_cap_is_refused(tmp_path, capsys):
    assert tinyllm(["tokenizer", "train", "--max-train-chars", "-1", "--output", str(tmp_path / "tok")]) == 1
    assert "--max-train-chars must be 0 (no cap) or a number of characters, not -1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_train_chars must be a positive number"):
        train_tokenizer(["你好"], vocab_size=300, max_train_chars=0)
