"""Long context by RoPE scaling: YaRN and dynamic NTK set from a `TYPE:FACTOR` spec at load or training time, the same
numbers as transformers' Llama, and kept by the Llama export, the GGUF export (checked against llama.cpp beyond the
original context) and the config vLLM reads."""

import json
import math
import os
import subprocess
import textwrap

import pytest
import torch

from tinyllm_hf.cli import main as tinyllm
from tinyllm_hf.errors import ConversionError, UsageError
from tinyllm_hf.modeling import TinyllmConfig, TinyllmForCausalLM
from tinyllm_hf.modeling.convert import tinyllm_to_llama, tinyllm_to_llama_model
from tinyllm_hf.rope_scaling import model_context, parse_rope_scaling, with_rope_scaling

ORIGINAL_CONTEXT = 64
VOCAB = 300


def small_config(**overrides) -> TinyllmConfig:
    values = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=ORIGINAL_CONTEXT, pad_token_id=1, eos_token_id=0)
    return TinyllmConfig(**{**values, **overrides})


def peaked_model(config: TinyllmConfig, seed: int = 0) -> TinyllmForCausalLM:
    """Random weights at std 0.15 (as the GGUF fixtures): peaked logits, so small numeric drift cannot hide."""
    torch.manual_seed(seed)
    model = TinyllmForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.15)
    return model


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[0]


def test_spec_sets_yarn_and_dynamic_relative_to_the_trained_context():
    base = small_config()
    yarn = with_rope_scaling(base, "yarn:4")
    assert yarn.max_position_embeddings == 4 * ORIGINAL_CONTEXT == model_context(yarn)
    assert yarn.rope_parameters == {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                    "original_max_position_embeddings": ORIGINAL_CONTEXT}
    # Dynamic NTK scales from max_position_embeddings onwards, so that stays the trained context.
    dynamic = with_rope_scaling(base, "dynamic:2")
    assert dynamic.max_position_embeddings == ORIGINAL_CONTEXT and model_context(dynamic) == 2 * ORIGINAL_CONTEXT
    # A model extended before is rescaled from its original context, not from the extended one.
    assert with_rope_scaling(yarn, "yarn:8").max_position_embeddings == 8 * ORIGINAL_CONTEXT
    assert base.rope_parameters["rope_type"] == "default"  # the input config is left alone


@pytest.mark.parametrize("spec, message", [
    ("ntk:4", "TYPE one of yarn, dynamic, linear"),
    ("yarn", "expected TYPE:FACTOR"),
    ("yarn:1", "factor must be a number > 1"),
    ("dynamic:0.5", "factor must be a number > 1"),
    ("yarn:four", "factor must be a number > 1"),
])
def test_bad_specs_are_one_line_usage_errors(spec, message):
    with pytest.raises(UsageError, match=message) as err:
        parse_rope_scaling(spec)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "ntk", "factor": 4.0}, "unknown rope_type 'ntk'"),
    ({"rope_type": "yarn", "factor": 1.0, "original_max_position_embeddings": 64}, "needs a factor > 1"),
    ({"rope_type": "dynamic", "factor": 0.5}, "needs a factor > 1"),
])
def test_config_rejects_unknown_rope_types_and_factors_that_do_not_extend(rope, message):
    """transformers itself only logs a warning for these (and a KeyError deep in the model for an unknown type)."""
    with pytest.raises(ValueError, match=message):
        small_config(rope_parameters={**rope, "rope_theta": 10000.0})


def test_eval_refuses_a_bad_spec_in_one_line_before_loading(tiny_model_dir, capsys):
    assert tinyllm(["eval", "--model", str(tiny_model_dir), "--tasks", "ppl", "--rope-scaling", "yarn:1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tinyllm eval: error: rope scaling 'yarn:1'") and "\n" not in err


def test_a_bad_spec_in_a_recipe_fails_while_the_recipe_is_parsed(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from tinyllm_hf.trainers import pretrain

    def must_not_run(*args):
        raise AssertionError("the stage started")

    monkeypatch.setattr(pretrain, "train", must_not_run)
    argv = ["pretrain", "--model_name_or_path", str(tiny_model_dir), "--tokenizer_name_or_path", str(tiny_model_dir),
            "--rope_scaling", "ntk:4", "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"]
    assert tinyllm(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "rope scaling 'ntk:4'" in err and "(command line)" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec", ["yarn:2", "yarn:4", "dynamic:2", "linear:2"])
def test_scaled_rope_matches_llama_beyond_the_original_context(spec):
    """Tinyllm builds scaled RoPE with transformers' own functions: logits equal LlamaForCausalLM's, at 2x and more
    of the trained context; a sequence within it runs dynamic NTK exactly as the unscaled model."""
    base = peaked_model(small_config())
    scaled = peaked_model(with_rope_scaling(base.config, spec))
    ids = torch.randint(2, VOCAB, (1, 2 * ORIGINAL_CONTEXT))
    unscaled = logits(base, ids)
    if spec.startswith("dynamic"):  # first, while the model has seen no sequence longer than its trained context
        within = logits(scaled, ids[:, :ORIGINAL_CONTEXT])
        torch.testing.assert_close(within, unscaled[:ORIGINAL_CONTEXT], atol=1e-5, rtol=0)
    ours = logits(scaled, ids)
    torch.testing.assert_close(logits(tinyllm_to_llama_model(scaled), ids), ours, atol=1e-4, rtol=0)
    assert (ours[ORIGINAL_CONTEXT:] - unscaled[ORIGINAL_CONTEXT:]).abs().max() > 0.1  # the scaling does something


def test_rope_scaling_at_load_time_and_the_llama_export_keep_yarn(tmp_path):
    """`get_model(..., rope_scaling=)` (what --rope-scaling does) gives the YaRN model without retraining; saving
    it and exporting to Llama keep the scaling (rope_parameters, and rope_scaling for transformers 4.x / vLLM)."""
    from transformers import AutoModelForCausalLM

    from tinyllm_hf.model_utils import get_model

    peaked_model(small_config()).save_pretrained(tmp_path / "base")
    model = get_model(str(tmp_path / "base"), rope_scaling="yarn:2").eval()
    assert model.config.rope_parameters["rope_type"] == "yarn" and model.config.max_position_embeddings == 128
    ids = torch.randint(2, VOCAB, (1, 2 * ORIGINAL_CONTEXT))
    ours = logits(model, ids)
    torch.testing.assert_close(logits(peaked_model(with_rope_scaling(small_config(), "yarn:2")), ids), ours,
                               atol=1e-5, rtol=0)

    model.save_pretrained(tmp_path / "yarn")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "yarn").eval()  # inv_freq rebuilt off the meta device
    torch.testing.assert_close(logits(reloaded, ids), ours, atol=1e-5, rtol=0)

    tinyllm_to_llama(tmp_path / "yarn", tmp_path / "llama")
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "yarn" and config["max_position_embeddings"] == 128
    assert config["rope_scaling"] == {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}
    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "llama").eval()
    assert type(llama).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(llama, ids), ours, atol=1e-4, rtol=0)


def test_the_vllm_plugin_passes_yarn_through():
    """vLLM (not installed here) builds RoPE from the config its plugin checks: that config keeps rope_parameters."""
    from tinyllm_hf.export.vllm_plugin import check_vllm_compatible, vllm_bias_flags

    config = with_rope_scaling(small_config(), "yarn:4")
    check_vllm_compatible(config)
    vllm_bias_flags(config)
    assert config.rope_parameters["rope_type"] == "yarn" and config.max_position_embeddings == 256


# --------------------------------------------------------------------------------------------------------------------
# GGUF: llama.cpp runs the YaRN model beyond the original context as we do
# --------------------------------------------------------------------------------------------------------------------


def gguf_checkpoint(tmp_path, spec: str | None):
    """A peaked random Tinyllm with our tokenizer (needed by the GGUF writer), weights rounded to fp16 so an f16 GGUF
    holds them exactly; RoPE scaled by `spec` (None: unscaled)."""
    from quant_fixtures import build_tokenizer

    tokenizer = build_tokenizer(tmp_path / "tok")
    config = small_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    model = peaked_model(with_rope_scaling(config, spec) if spec else config)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.half().float())
    folder = tmp_path / (spec or "default").replace(":", "-")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("factor", [2, 4])
def test_llama_cpp_matches_our_yarn_logits_at_twice_the_trained_context(tmp_path, factor):
    pytest.importorskip("gguf", reason='GGUF export needs the `gguf` package: pip install "tinyllm-hf[quant]"')
    llama_cpp = pytest.importorskip("llama_cpp", reason='needs llama-cpp-python: pip install "tinyllm-hf[llamacpp]"')
    import gguf

    from tinyllm_hf.export.gguf import export_gguf

    model, folder = gguf_checkpoint(tmp_path, f"yarn:{factor}")
    path = export_gguf(folder, tmp_path / "yarn.gguf", "f16")
    fields = gguf.GGUFReader(path).fields
    assert fields["llama.rope.scaling.type"].contents() == "yarn"
    assert fields["llama.rope.scaling.factor"].contents() == factor
    assert fields["llama.rope.scaling.original_context_length"].contents() == ORIGINAL_CONTEXT
    assert fields["llama.context_length"].contents() == factor * ORIGINAL_CONTEXT

    n = 2 * ORIGINAL_CONTEXT
    ids = torch.randint(20, model.config.vocab_size, (1, n))
    ours = logits(model, ids)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n, n_batch=n, logits_all=True, n_threads=1, verbose=False)
    llm.eval(ids[0].tolist())
    theirs = torch.from_numpy(llm.scores[:n].copy()).float()
    unscaled = logits(gguf_checkpoint(tmp_path, None)[0], ids)
    beyond = slice(ORIGINAL_CONTEXT, n)
    error = (theirs[beyond] - ours[beyond]).abs().mean()
    # llama.cpp keeps its KV cache in f16: ~0.1% of the logits' spread (measured 0.0013 at std 1.19); the same weights
    # without YaRN are ~700x that far off.
    assert error < 0.004 * ours.std(), f"llama.cpp differs from ours by {error:.4f} beyond the original context"
    assert (unscaled[beyond] - ours[beyond]).abs().mean() > 100 * error
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() > 0.95


def test_gguf_export_refuses_dynamic_ntk(tmp_path, capsys):
    pytest.importorskip("gguf", reason='GGUF export needs the `gguf` package: pip install "tinyllm-hf[quant]"')
    from tinyllm_hf.export.gguf import export_gguf

    _, folder = gguf_checkpoint(tmp_path, "dynamic:2")
    capsys.readouterr()  # the fixture's progress bars
    with pytest.raises(ConversionError, match="'dynamic' has no GGUF export"):
        export_gguf(folder, tmp_path / "dynamic.gguf")
    assert tinyllm(["export", "gguf", "--model", str(folder), "--output", str(tmp_path / "d.gguf")]) == 1
    err = capsys.readouterr().err.strip()
    assert "yarn:FACTOR" in err and "\n" not in err and not (tmp_path / "d.gguf").exists()


@pytest.mark.skipif(not os.environ.get("TINYLLM_LEGACY_PYTHON"), reason="set TINYLLM_LEGACY_PYTHON to a python with "
                    "transformers 4.x (the version vLLM and optimum-onnx pin)")
def test_transformers_4_runs_the_yarn_llama_export_as_we_do(tmp_path):
    """The Llama export's `rope_scaling` is what transformers 4.x (and the vLLM versions pinned to it) read: the same
    logits at twice the original context."""
    model = peaked_model(with_rope_scaling(small_config(), "yarn:2"))
    model.save_pretrained(tmp_path / "yarn")
    tinyllm_to_llama(tmp_path / "yarn", tmp_path / "llama")
    ids = torch.randint(2, VOCAB, (1, 2 * ORIGINAL_CONTEXT))
    script = textwrap.dedent(f"""
        import json, torch, transformers
        from transformers import AutoModelForCausalLM
        assert transformers.__version__.startswith("4."), transformers.__version__
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "llama")!r}).eval()
        assert model.config.rope_scaling["rope_type"] == "yarn", model.config.rope_scaling
        with torch.no_grad():
            print(json.dumps(model(torch.tensor({ids.tolist()})).logits[0].tolist()))
    """)
    result = subprocess.run([os.environ["TINYLLM_LEGACY_PYTHON"], "-c", script], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    legacy = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(legacy, logits(model, ids), atol=1e-4, rtol=0)


def test_eval_and_chat_run_the_scaled_model_at_the_longer_context(tiny_model_dir, tmp_path):
    """`--rope-scaling` reaches the loaded model: eval's perplexity window and chat's context grow with it (dynamic
    NTK included, whose max_position_embeddings stays the trained one), and the results record the setting."""
    from tinyllm_hf.inference.chat import load_chat_model

    assert load_chat_model(str(tiny_model_dir)).context_length == 256
    for spec in ("yarn:2", "dynamic:2"):
        runtime = load_chat_model(str(tiny_model_dir), rope_scaling=spec)
        assert runtime.context_length == 512 and runtime.model.config.rope_parameters["rope_type"] == spec[:-2]
    texts = tmp_path / "long.txt"
    texts.write_text("我正在写这本书的心得，人际关系的交际技巧。" * 40 + "\n", encoding="utf-8")
    out = tmp_path / "results.json"
    argv = ["eval", "--model", str(tiny_model_dir), "--tasks", "ppl", "--text-file", str(texts), "--rope-scaling",
            "yarn:2", "--output", str(out), "--no-progress"]
    assert tinyllm(argv) == 0
    results = json.loads(out.read_text())
    ppl = results["tasks"]["ppl"]
    assert results["settings"]["rope_scaling"] == "yarn:2"
    assert ppl["max_length"] == 512 and math.isfinite(ppl["perplexity"])


def test_a_hand_edited_config_with_an_unknown_rope_type_is_one_line(tiny_model_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "ntk", "factor": 4.0, "rope_theta": 10000.0}
    (broken / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert tinyllm(["eval", "--model", str(broken), "--tasks", "ppl"]) == 1
    err = capsys.readouterr().err.strip()
    assert f"the config.json of {broken} is invalid" in err and "unknown rope_type 'ntk'" in err and "\n" not in err


def test_serve_and_demo_backends_take_the_scaling_on_checkpoints_only(tiny_model_dir, tmp_path, capsys):
    from tinyllm_hf.inference.runtime import load_backend

    assert load_backend("transformers", tiny_model_dir, rope_scaling="yarn:2").context_length == 512
    with pytest.raises(UsageError, match="--rope-scaling needs the transformers backend"):
        load_backend("llamacpp", tmp_path / "model.gguf", rope_scaling="yarn:2")
    capsys.readouterr()  # the loading progress bar above
    assert tinyllm(["serve", "--model", str(tiny_model_dir), "--rope-scaling", "yarn:0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tinyllm serve: error: rope scaling 'yarn:0'") and "\n" not in err
