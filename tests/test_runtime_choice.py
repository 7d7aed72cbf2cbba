"""`--backend auto` (inference/runtime_choice.py): it runs only runtimes that reproduce the model's greedy tokens,
picks the fastest of them by measurement, saves the decision (the next start neither exports nor measures), redoes a
damaged export or decision, and leaves models that run one way only (and forced backends) to that way.

The exports are made once per module and copied into each test's cache: the tests exercise the choice, not the
exporters (tests/test_gguf.py and tests/test_quantize.py do)."""

import io
import json
import shutil

import pytest

from tinyllm_hf.inference import runtime_choice
from tinyllm_hf.inference.model_files import missing_runtime

needs_onnx = pytest.mark.skipif(missing_runtime("onnx") is not None, reason=str(missing_runtime("onnx")))
needs_llamacpp = pytest.mark.skipif(missing_runtime("gguf") is not None, reason=str(missing_runtime("gguf")))


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    """A cache root holding every export this machine can make of the tiny model."""
    root = tmp_path_factory.mktemp("exports")
    folder = root / "runtimes" / runtime_choice.checkpoint_fingerprint(tiny_model_dir)
    for backend, missing in runtime_choice.unavailable_backends().items():
        if missing is None:
            runtime_choice.cached_export(backend, tiny_model_dir, folder)
    return root


@pytest.fixture
def cache(exported, tmp_path, monkeypatch):
    shutil.copytree(exported, tmp_path / "cache")
    monkeypatch.setenv(runtime_choice.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "runtimes"


@pytest.fixture
def exports_made(monkeypatch):
    """The backends exported during the test (the real exporters run, counted)."""
    from tinyllm_hf.export import gguf, quantize

    made = []
    for module, name, backend in ((gguf, "export_gguf", "llamacpp"), (quantize, "quantize_checkpoint", "onnx")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, backend=backend, **k: made.append(backend) or real(*a, **k))
    return made


def choose(model, **kwargs):
    log = io.StringIO()
    runtime = runtime_choice.choose_runtime(model, log=log, **kwargs)
    return runtime, log.getvalue()


def measured_as(speeds: dict[str, float], seen: list | None = None):
    """A decode_speed that reports `speeds[backend]` (and records (backend, streams) in `seen`)."""
    def speed(runtime, prompt, streams):
        if seen is not None:
            seen.append((runtime.backend, streams))
        return speeds[runtime.backend]
    return speed


@needs_onnx
def test_auto_picks_the_fastest_runtime_that_reproduces_the_model_and_saves_it(tiny_model_dir, cache, monkeypatch):
    monkeypatch.setattr(runtime_choice, "decode_speed",
                        measured_as({"transformers": 100.0, "onnx": 300.0, "llamacpp": 200.0}))
    runtime, line = choose(tiny_model_dir)
    assert runtime.backend == "onnx" and line.startswith("runtime: onnx (onnx 300 tok/s; ")
    assert "transformers 100 tok/s" in line and len(line.strip().splitlines()) == 1
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
    real = runtime_choice.greedy_tokens

    def greedy(runtime, prompts, max_tokens):
        tokens = real(runtime, prompts, max_tokens)
        if runtime.backend == "onnx":  # a runtime that goes wrong at the 3rd token of the 2nd prompt
            tokens[1][2] = (tokens[1][2] + 1) % runtime.vocab_size
        return tokens

    monkeypatch.setattr(runtime_choice, "greedy_tokens", greedy)
    monkeypatch.setattr(runtime_choice, "decode_speed",
                        measured_as({"transformers": 10.0, "onnx": 1000.0, "llamacpp": 20.0}))
    runtime, line = choose(tiny_model_dir)
    assert runtime.backend != "onnx"
    assert "onnx: rejected, its greedy tokens differ from transformers fp32 at prompt 2, token 3" in line


@needs_llamacpp
def test_a_damaged_export_or_decision_is_redone(tiny_model_dir, cache, monkeypatch, exports_made):
    monkeypatch.setattr(runtime_choice, "decode_speed",
                        measured_as({"transformers": 100.0, "onnx": 200.0, "llamacpp": 300.0}))
    choose(tiny_model_dir)
    assert exports_made == []  # the module's exports were reused
    gguf = next(cache.rglob("model-f16.gguf"))
    gguf.write_bytes(gguf.read_bytes()[:-10])  # truncated: its recorded size no longer matches
    runtime, line = choose(tiny_model_dir)
    assert "chosen earlier" not in line and "is damaged; measuring again" in line
    assert exports_made == ["llamacpp"] and runtime.backend == "llamacpp"  # only the damaged export is written again
    decision = next(cache.rglob("choice-*.json"))
    assert json.loads(decision.read_text("utf-8"))["backend"] == "llamacpp"

    decision.write_text('{"backend": "llamacpp", "summ', "utf-8")  # a decision cut short
    runtime, line = choose(tiny_model_dir)
    assert "is damaged; measuring again" in line and runtime.backend == "llamacpp"
    assert exports_made == ["llamacpp"]  # the intact exports are reused
    assert "chosen earlier" in choose(tiny_model_dir)[1]


def test_a_server_batch_keeps_the_batched_runtime(tiny_model_dir, cache, monkeypatch):
    """A server batch (streams > 1, serial runtimes not allowed) measures the batched transformers runtime only, exports
    nothing, and is saved apart from the single-stream decision."""
    seen = []
    monkeypatch.setattr(runtime_choice, "unavailable_backends", lambda: {"onnx": None, "llamacpp": "not installed here"})
    monkeypatch.setattr(runtime_choice, "cached_export", lambda *a: pytest.fail("exported for a batch"))
    monkeypatch.setattr(runtime_choice, "decode_speed", measured_as({"transformers": 100.0}, seen))
    runtime, line = choose(tiny_model_dir, streams=4)
    assert runtime.backend == "transformers" and seen == [("transformers", 4)]
    assert "tok/s with 4 streams" in line and "llamacpp: not installed here" in line
    assert "onnx: not considered for a server batch of 4, since it decodes one sequence at a time" in line
    monkeypatch.setattr(runtime_choice, "unavailable_backends", lambda: {"onnx": "off", "llamacpp": "off"})
    before = set(cache.rglob("choice-*.json"))
    runtime_choice.choose_runtime(tiny_model_dir, streams=1, log=io.StringIO())
    assert len(set(cache.rglob("choice-*.json")) - before) == 1


@needs_onnx
def test_an_evaluation_batch_takes_the_fastest_in_aggregate(tiny_model_dir, cache, monkeypatch):
    """Evaluation (serial_ok) measures every runtime at its batch size; a one-sequence runtime's aggregate is its
    single-stream speed, measured over one stream."""
    seen = []
    monkeypatch.setattr(runtime_choice, "unavailable_backends", lambda: {"onnx": None, "llamacpp": "off"})
    monkeypatch.setattr(runtime_choice, "decode_speed", measured_as({"transformers": 500.0, "onnx": 300.0}, seen))
    runtime, line = choose(tiny_model_dir, streams=4, serial_ok=True)
    assert runtime.backend == "transformers" and line.startswith("runtime: transformers (transformers 500 tok/s with 4")
    assert seen == [("transformers", 4), ("onnx", 4)]


def test_a_serial_runtime_is_timed_over_one_stream(tiny_model_dir, monkeypatch):
    from tinyllm_hf.inference import runtime
    from tinyllm_hf.inference.runtime import TransformersRuntime

    batches = []
    real = runtime.stream_batch
    monkeypatch.setattr(runtime, "stream_batch", lambda rt, prompts, *a, **k: batches.append(len(prompts))
                        or real(rt, prompts, *a, **k))
    monkeypatch.setattr(runtime_choice, "SPEED_TOKENS", 4)
    model = TransformersRuntime.from_pretrained(tiny_model_dir)
    prompt = model.encode_chat([{"role": "user", "content": "你好"}])
    assert runtime_choice.decode_speed(model, prompt, 3) > 0
    monkeypatch.setattr(model, "max_batch_size", 1)
    assert runtime_choice.decode_speed(model, prompt, 3) > 0
    assert batches[-2:] == [1, 1] and 3 in batches  # warm-up and one stream, against a batch of 3 before


@needs_onnx
def test_generation_mode_eval_runs_on_the_choice_and_records_it(tiny_model_dir, cache, tmp_path, monkeypatch):
    from tinyllm_hf import tasks
    from tinyllm_hf.evaluation.cli import main
    from tinyllm_hf.evaluation.results import load_results

    record = {"task": "sentiment", "messages": [{"role": "user", "content": "好评还是差评？"},
                                                {"role": "assistant", "content": "好评"}]}
    monkeypatch.setattr(tasks, "heldout_task_records", lambda tasks=None, sizes=None: [record])  # not the full set
    monkeypatch.setattr(runtime_choice, "unavailable_backends", lambda: {"onnx": None, "llamacpp": "off"})
    monkeypatch.setattr(runtime_choice, "decode_speed", measured_as({"transformers": 1.0, "onnx": 2.0}))
    out = tmp_path / "r.json"
    argv = ["--model", str(tiny_model_dir), "--tasks", "tasks", "--max-new-tokens", "4",
            "--batch-size", "2", "--output", str(out), "--no-progress"]
    assert main(argv) == 0
    assert load_results(out)["settings"]["backend"] == "onnx"
    # A log-likelihood task needs transformers: auto does not measure, and the results say transformers ran.
    monkeypatch.setattr(runtime_choice, "choose_runtime", lambda *a, **k: pytest.fail("measured for ppl"))
    texts = tmp_path / "t.txt"
    texts.write_text("今天天气很好。\n", "utf-8")
    assert main(argv[:3] + ["ppl,tasks", "--text-file", str(texts)] + argv[4:]) == 0
    assert load_results(out)["settings"]["backend"] == "transformers"


@needs_onnx
def test_a_forced_backend_is_never_measured(tiny_model_dir, cache, monkeypatch, capsys):
    from tinyllm_hf.inference.chat import build_parser, load_chat_runtime
    from tinyllm_hf.inference.runtime import load_backend

    monkeypatch.setattr(runtime_choice, "choose_runtime", lambda *a, **k: pytest.fail("measured a forced backend"))
    assert load_backend("transformers", tiny_model_dir).backend == "transformers"
    onnx = runtime_choice.cached_export("onnx", tiny_model_dir, next(cache.iterdir()))
    assert load_backend("onnx", onnx).backend == "onnx"
    args = build_parser().parse_args(["--model", str(tiny_model_dir), "--backend", "transformers", "--device", "cpu"])
    assert load_chat_runtime(args).backend == "transformers"
    assert "runtime:" not in capsys.readouterr().err


def test_models_that_run_one_way_are_not_measured(tiny_model_dir, tmp_path):
    from tinyllm_hf.runs import ADAPTER_CONFIG_FILE

    assert runtime_choice.is_auto_eligible(tiny_model_dir)
    assert not runtime_choice.is_auto_eligible(tiny_model_dir, dtype="bfloat16")
    assert not runtime_choice.is_auto_eligible(tiny_model_dir, rope_scaling="yarn:2")
    assert not runtime_choice.is_auto_eligible(tiny_model_dir, trust_remote_code=True)
    assert not runtime_choice.is_auto_eligible(tiny_model_dir, device="cuda")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert not runtime_choice.is_auto_eligible(gguf)
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_model_dir, adapter)
    (adapter / ADAPTER_CONFIG_FILE).write_text("{}", "utf-8")
    assert not runtime_choice.is_auto_eligible(adapter)


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
