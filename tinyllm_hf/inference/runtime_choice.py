"""`--backend auto`: the fastest runtime that reproduces a checkpoint, chosen by measuring, once per model and machine.

For a checkpoint folder, the candidates are transformers in float32 (the reference), ONNX Runtime on a float32 ONNX
export (`tinyllm quantize` method `onnx`, when onnxruntime is installed) and llama.cpp on an f16 GGUF
(`tinyllm export gguf`, when llama-cpp-python is installed). Each export is written once into a cache folder keyed by
the checkpoint's content (`$TINYLLM_CACHE`, default `~/.cache/tinyllm-hf/runtimes/<fingerprint>/`), never into the
model folder. A candidate must reproduce the model: its greedy tokens on `PARITY_PROMPTS` equal the reference's, or it
is rejected (the printed line names the first differing position). Of those that do, the fastest by a short measured
decode wins. `streams` is how many sequences run at once: 1 for `tinyllm chat` (and a server or demo run with
`--max-batch-size 1`), the batch size for generation-mode `tinyllm eval` and for `tinyllm serve` / `tinyllm demo`.
Over several streams a batched runtime (transformers) decodes them together and a one-sequence runtime (ONNX,
llama.cpp) one after another, so its aggregate speed is its single-stream speed, measured as such. Evaluation
(`serial_ok=True`) takes whichever is fastest in aggregate. A server with a batch of several (`serial_ok=False`)
keeps the batched transformers runtime without measuring the others: with a one-sequence runtime concurrent
requests queue behind each other (one long reply holds every other request up), and llama.cpp cannot return prompt
logprobs (`echo` with `logprobs`, which lm-eval's `local-completions` uses), so the default server's API would depend
on what is installed. `--backend llamacpp` / `onnx` serves with them anyway.

The decision is saved next to the exports (keyed by the batch size, whether serial runtimes count, the thread count
and the runtimes' versions), so the next start loads the chosen runtime without exporting or measuring. Each export
is saved with the list of its files and sizes; an export that no longer matches it (a truncated or deleted file) is
written again, and a saved decision that cannot be read or whose export is damaged is measured again.

Everything else keeps its one runtime: a .gguf file (llama.cpp), a `tinyllm quantize` output (its own runtime), a
folder whose model needs `--rope-scaling`, a dtype other than float32, or code shipped with the model (its exports
would run that code again), a LoRA adapter folder, a GPU (CUDA available), and for `tinyllm eval` a Hub id, a
`--revision` or a log-likelihood task (ppl) go to `runtime.load_runtime` / transformers as before.
"""

import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import time
from pathlib import Path

from tinyllm_hf.inference.model_files import missing_runtime, model_kind
from tinyllm_hf.runs import atomic_output

CACHE_ENV = "TINYLLM_CACHE"
# Short chat prompts of the kinds the quickstart model answers; rendered with the model's own template.
PARITY_PROMPTS = ("你好，请介绍一下你自己。", "房间干净，服务也很热情。这条评论是正面还是负面？", "请帮我算一下 (17+25)*3。")
PARITY_TOKENS = 32   # greedy tokens per prompt that must match the reference
SPEED_TOKENS = 64    # decoded tokens per timed stream (EOS ignored)
DECISION_VERSION = 2
EXPORT_NAMES = {"llamacpp": "model-f16.gguf", "onnx": "onnx"}  # in the cache folder


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tinyllm-hf") / "runtimes"


def checkpoint_fingerprint(model_dir: Path) -> str:
    """A digest of every file at the top of `model_dir` (names and contents): a retrained or edited model gets new
    exports, a copy of the same model in another folder reuses them."""
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:24]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _files(path: Path) -> dict[str, int]:
    """{relative name: size} of an export (a file or a folder): what is checked before an export is reused."""
    if path.is_file():
        return {path.name: path.stat().st_size}
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


def _manifest(export: Path) -> Path:
    return export.with_name(export.name + ".files.json")


def export_intact(export: Path) -> bool:
    """Whether `export` still has the files and sizes recorded when it was written."""
    try:
        return export.exists() and json.loads(_manifest(export).read_text("utf-8")) == _files(export)
    except (OSError, ValueError):
        return False


def unavailable_backends() -> dict[str, str | None]:
    """{backend: why it cannot run here, or None} for the exports a checkpoint can be run from."""
    return {"onnx": missing_runtime("onnx"), "llamacpp": missing_runtime("gguf")}


def cached_export(backend: str, model_dir: Path, folder: Path) -> Path:
    """The cached export `backend` runs: reused if intact, otherwise (missing or damaged) written again, atomically,
    with the list of its files."""
    path = folder / EXPORT_NAMES[backend]
    if export_intact(path):
        return path
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    if backend == "llamacpp":
        from tinyllm_hf.export.gguf import export_gguf

        export_gguf(model_dir, path, "f16")
    else:
        from tinyllm_hf.export.quantize import quantize_checkpoint

        quantize_checkpoint(model_dir, path, "onnx")
    with atomic_output(_manifest(path)) as staged:
        staged.write_text(json.dumps(_files(path), indent=1) + "\n", "utf-8")
    return path


def load_export(backend: str, path: Path, threads: int | None):
    from tinyllm_hf.inference.runtime import (
        ExportedRuntime,
        LlamaCppRuntime,
        TransformersRuntime,
    )

    if backend == "transformers":
        return TransformersRuntime.from_pretrained(path)
    if backend == "llamacpp":
        return LlamaCppRuntime(path, n_threads=threads)
    return ExportedRuntime(path, num_threads=threads)


def greedy_tokens(runtime, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from tinyllm_hf.inference.runtime import SamplingParams, generate

    return [generate(runtime, ids, SamplingParams(max_tokens, temperature=0.0), eos_token_ids=()) for ids in prompts]


def decode_speed(runtime, prompt: list[int], streams: int) -> float:
    """Tokens per second of `streams` greedy sequences decoded together (one batch where the runtime batches, one
    after another where it does not), EOS ignored, after a warm-up reply."""
    from tinyllm_hf.inference.runtime import SamplingParams, stream_batch

    greedy_tokens(runtime, [prompt], 4)  # first-call costs (allocation, graph set-up) are not decode speed
    if runtime.max_batch_size == 1:  # one sequence after another: the aggregate is the one-stream speed
        streams = 1
    batch = min(streams, runtime.max_batch_size)
    started, produced = time.perf_counter(), 0
    for _ in range(0, streams, batch):
        params = [SamplingParams(SPEED_TOKENS, temperature=0.0)] * batch
        produced += sum(1 for _ in stream_batch(runtime, [prompt] * batch, params, eos_token_ids=()))
    return produced / (time.perf_counter() - started)


def first_difference(a: list[list[int]], b: list[list[int]]) -> str | None:
    for i, (x, y) in enumerate(zip(a, b)):
        for j, (p, q) in enumerate(zip(x, y)):
            if p != q:
                return f"prompt {i + 1}, token {j + 1}"
    return None


def choose_runtime(model: str | Path, streams: int = 1, threads: int | None = None, serial_ok: bool = False,
                   log=None):
    """The runtime `--backend auto` runs `model` on (see the module docstring): measured and saved the first time,
    loaded from the saved decision afterwards. `streams`: how many sequences run at once (1 for chat, a server's or an
    evaluation's batch size); `serial_ok`: whether a one-sequence-at-a-time runtime may take several streams
    (evaluation: yes; a server: no). Prints one line to `log` (stderr) saying which runtime and why."""
    log = log or sys.stderr
    model_dir = Path(model)
    folder = cache_root() / checkpoint_fingerprint(model_dir)
    serial_ok = serial_ok or streams == 1
    key = {"version": DECISION_VERSION, "streams": streams, "serial_ok": serial_ok, "threads": threads,
           **{name: _version(name) for name in ("torch", "onnxruntime", "llama_cpp_python", "tinyllm-hf")}}
    decision_file = folder / f"choice-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.json"
    saved = _saved_decision(decision_file)
    if saved is not None:
        backend = saved["backend"]
        path = model_dir if backend == "transformers" else Path(saved["export"])
        print(f"runtime: {backend} ({saved['summary']}; chosen earlier, saved in {decision_file})", file=log)
        return load_export(backend, path, threads)
    if decision_file.exists():
        print(f"runtime: the saved choice {decision_file} or its export is damaged; measuring again", file=log)

    from tinyllm_hf.inference.runtime import TransformersRuntime

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    reference = TransformersRuntime.from_pretrained(model_dir)
    prompts = [reference.encode_chat([{"role": "user", "content": text}]) for text in PARITY_PROMPTS]
    expected = greedy_tokens(reference, prompts, PARITY_TOKENS)
    speeds = {"transformers": decode_speed(reference, prompts[0], streams)}
    notes, exports = [], {}
    folder.mkdir(parents=True, exist_ok=True)
    for backend, missing in unavailable_backends().items():
        if missing:
            notes.append(f"{backend}: {missing}")
            continue
        if not serial_ok:
            notes.append(f"{backend}: not considered for a server batch of {streams}, since it decodes one sequence "
                         f"at a time and requests would wait for each other (--backend {backend} runs it anyway)")
            continue
        try:
            exports[backend] = cached_export(backend, model_dir, folder)
            runtime = load_export(backend, exports[backend], threads)
        except Exception as err:  # noqa: BLE001 - an optional runtime that cannot take this model (llama.cpp cannot
            # express it, the ONNX exporter fails on it) drops out of the choice; transformers still runs it
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            notes.append(f"{backend}: cannot run this model ({reason})")
            continue
        differs = first_difference(greedy_tokens(runtime, prompts, PARITY_TOKENS), expected)
        if differs:
            notes.append(f"{backend}: rejected, its greedy tokens differ from transformers fp32 at {differs}")
        else:
            speeds[backend] = decode_speed(runtime, prompts[0], streams)
        del runtime
    backend = max(speeds, key=speeds.get)
    unit = "tok/s" if streams == 1 else f"tok/s with {streams} streams"
    summary = "; ".join([f"{name} {speed:.0f} {unit}" for name, speed in sorted(speeds.items(), key=lambda kv: -kv[1])]
                        + notes)
    export = exports.get(backend)
    record = {"backend": backend, "summary": summary, "speeds": speeds, "key": key,
              "export": str(export) if export else None}
    with atomic_output(decision_file) as staged:
        staged.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", "utf-8")
    print(f"runtime: {backend} ({summary})", file=log)
    if backend == "transformers":
        return reference
    del reference
    return load_export(backend, export, threads)


def _saved_decision(path: Path) -> dict | None:
    """A saved decision whose export is intact; None otherwise (measure again)."""
    try:
        record = json.loads(path.read_text("utf-8"))
        intact = record["backend"] == "transformers" or export_intact(Path(record["export"]))
        return record if intact and isinstance(record["summary"], str) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_auto_eligible(model: str | Path, dtype: str = "float32", rope_scaling: str | None = None,
                     trust_remote_code: bool = False, device: str | None = None) -> bool:
    """Whether `--backend auto` measures runtimes for `model`, or (False) runs it the one way it can run."""
    from tinyllm_hf.runs import ADAPTER_CONFIG_FILE

    path = Path(model)
    return (path.is_dir() and model_kind(path) == "checkpoint" and not (path / ADAPTER_CONFIG_FILE).is_file()
            and dtype == "float32" and not rope_scaling and not trust_remote_code
            and device in (None, "cpu") and not _cuda())


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
