"""`--backend auto` (inference/runtime_choice.py): it runs only runtimes that reproduce the model's greedy tokens,
picks the fastest of them by measurement, saves the decision (the next start neither exports nor measures), does not
trust a saved decision whose export changed, and leaves models that run one way only to that way."""

import io
import json

import pytest

from tinyllm_hf.inference import runtime_choice
from tinyllm_hf.inference.model_files import missing_runtime


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(runtime_choice.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "runtimes"


def choose(model, **kwargs):
    log = io.StringIO()
    runtime = runtime_choice.choose_runtime(model, log=log, **kwargs)
    return runtime, log.getvalue()


needs_onnx = pytest.mark.skipif(missing_runtime("onnx") is not None, reason=str(missing_runtime("onnx")))


@needs_onnx
def test_auto_picks_the_fastest_runtime_that_reproduces_the_model_and_saves_it(tiny_model_dir, cache, monkeypatch):
    speeds = {"TransformersRuntime": 100.0, "ExportedRuntime": 300.0, "LlamaCppRuntime": 200.0}
    monkeypatch.setattr(runtime_choice, "decode_speed", lambda runtime, prompt, streams: speeds[type(runtime).__name__])
    runtime, line = choose(tiny_model_dir)
    assert runtime.backend == "onnx" and line.startswith("runtime: onnx (onnx 300 tok/s; ")
    assert "transformers 100 tok/s" in line
    # The chosen runtime gives the reference's greedy tokens (what the choice measured, checked again here).
    from tinyllm_hf.inference.runtime import TransformersRuntime

    reference = TransformersRuntime.from_pretrained(tiny_model_dir)
    prompt = reference.encode_chat([{"role": "user", "content": "你好"}])
    assert runtime_choice.greedy_tokens(runtime, [prompt], 12) == runtime_choice.greedy_tokens(reference, [prompt], 12)

    # The second start loads the saved choice: no export, no measurement.
    monkeypatch.setattr(runtime_choice, "cached_export", lambda *a: pytest.fail("exported again"))
    monkeypatch.setattr(runtime_choice, "decode_speed", lambda *a: pytest.fail("measured again"))
    runtime, line = choose(tiny_model_dir)
    assert runtime.backend == "onnx" and "chosen earlier, saved in" in line


@needs_onnx
def test_a_runtime_whose_tokens_differ_is_rejected(tiny_model_dir, cache, monkeypatch):
    from tinyllm_hf.inference.runtime import ExportedRuntime

    real = runtime_choice.greedy_tokens

    def greedy(runtime, prompts, max_tokens):
        tokens = real(runtime, prompts, max_tokens)
        if isinstance(runtime, ExportedRuntime):  # a runtime that goes wrong at the 3rd token of the 2nd prompt
            tokens[1][2] = (tokens[1][2] + 1) % runtime.vocab_size
        return tokens

    monkeypatch.setattr(runtime_choice, "greedy_tokens", greedy)
    monkeypatch.setattr(runtime_choice, "decode_speed",
                        lambda runtime, prompt, streams: 1000.0 if isinstance(runtime, ExportedRuntime) else 10.0)
    runtime, line = choose(tiny_model_dir)
    assert runtime.backend != "onnx"
    assert "onnx: rejected, its greedy tokens differ from transformers fp32 at prompt 2, token 3" in line


@needs_onnx
def test_a_saved_choice_whose_export_changed_is_measured_again(tiny_model_dir, cache, monkeypatch):
    monkeypatch.setattr(runtime_choice, "decode_speed",
                        lambda runtime, prompt, streams: 300.0 if runtime.backend == "onnx" else 100.0)
    choose(tiny_model_dir)
    onnx_file = next(p for p in (cache).rglob("*.onnx"))
    onnx_file.write_bytes(onnx_file.read_bytes()[:-10])  # truncated: the saved sizes no longer match
    runtime, line = choose(tiny_model_dir)
    assert "chosen earlier" not in line and "is damaged; exporting and measuring again" in line
    decision = json.loads(next(cache.rglob("choice-*.json")).read_text("utf-8"))
    assert decision["backend"] == runtime.backend


def test_a_server_batch_keeps_the_batched_runtime(tiny_model_dir, cache, monkeypatch):
    """With streams > 1 only the batched transformers runtime is measured (a single-sequence runtime would make
    concurrent requests queue), nothing is exported, and the saved decision is kept apart from the single-stream one."""
    seen = []
    real = runtime_choice.decode_speed
    monkeypatch.setattr(runtime_choice, "unavailable_backends", lambda: {"onnx": None, "llamacpp": "not installed here"})
    monkeypatch.setattr(runtime_choice, "cached_export", lambda *a: pytest.fail("exported for a batch"))
    monkeypatch.setattr(runtime_choice, "SPEED_TOKENS", 4)
    monkeypatch.setattr(runtime_choice, "decode_speed",
                        lambda runtime, prompt, streams: seen.append(streams) or real(runtime, prompt, streams))
    runtime, line = choose(tiny_model_dir, streams=4)
    assert runtime.backend == "transformers" and seen == [4]
    assert "tok/s with 4 streams" in line and "llamacpp: not installed here" in line
    assert "onnx: not considered for 4 streams, since it decodes one sequence at a time" in line
    monkeypatch.setattr(runtime_choice, "unavailable_backends", lambda: {"onnx": "off", "llamacpp": "off"})
    runtime_choice.choose_runtime(tiny_model_dir, streams=1, log=io.StringIO())
    assert len(list(cache.rglob("choice-*.json"))) == 2


def test_models_that_run_one_way_are_not_measured(tiny_model_dir, tmp_path):
    assert runtime_choice.is_auto_eligible(tiny_model_dir)
    assert not runtime_choice.is_auto_eligible(tiny_model_dir, dtype="bfloat16")
    assert not runtime_choice.is_auto_eligible(tiny_model_dir, rope_scaling="yarn:2")
    assert not runtime_choice.is_auto_eligible(tiny_model_dir, trust_remote_code=True)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert not runtime_choice.is_auto_eligible(gguf)


def test_a_runtime_that_cannot_take_the_model_drops_out(tiny_model_dir, cache, monkeypatch):
    """An export that fails (here: the exporter raises) leaves that runtime out with its reason; the model still runs."""
    def failing_export(backend, model_dir, folder):
        raise RuntimeError(f"{backend} exporter crashed\nwith a long trace")

    monkeypatch.setattr(runtime_choice, "unavailable_backends", lambda: {"onnx": None, "llamacpp": None})
    monkeypatch.setattr(runtime_choice, "cached_export", failing_export)
    monkeypatch.setattr(runtime_choice, "SPEED_TOKENS", 4)
    runtime, line = choose(tiny_model_dir)
    assert runtime.backend == "transformers"
    assert "onnx: cannot run this model (onnx exporter crashed)" in line and "llamacpp: cannot run" in line
