"""Text generation over exported graphs (ONNX Runtime, OpenVINO): our own small `generate`, with a KV cache.

transformers' exporters (`export_for_generation`) write two graphs, and the exported model has no `generate()`:

    prefill  (input_ids, position_ids)                  -> logits, cache.layers.{i}.{keys,values}
    decode   (input_ids, position_ids, input.cache...)  -> logits, output.cache.layers.{i}.{keys,values}

The prefill graph runs the prompt once; each new token then runs the decode graph on the cache the previous step
returned. Batch size is 1 (the exporters trace batch 1 without an attention mask), which is what chat, the server and
per-example evaluation need. Inference needs only numpy and the runtime (onnxruntime or openvino), not torch.

    model = OnnxCausalLM.from_pretrained("out/onnx-int8")
    new_ids = model.generate(prompt_ids, max_new_tokens=64)
"""

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tinyllm_hf.errors import MissingFileError, UsageError

MANIFEST = "export.json"  # written by transformers' ExportedModel.save_pretrained


def sample_next_token(
    logits: np.ndarray, rng: np.random.Generator, do_sample: bool, temperature: float, top_k: int, top_p: float
) -> int:
    """Greedy argmax, or a sample from the temperature / top-k / top-p filtered distribution (as `generate` does)."""
    if not do_sample:
        return int(np.argmax(logits))
    logits = logits.astype(np.float64) / max(temperature, 1e-5)
    if 0 < top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        # keep the smallest prefix whose mass reaches top_p (always at least the most likely token)
        keep = np.cumsum(probs[order]) - probs[order] < top_p
        filtered = np.zeros_like(probs)
        filtered[order[keep]] = probs[order[keep]]
        probs = filtered / filtered.sum()
    return int(rng.choice(len(probs), p=probs))


def read_manifest(model_dir: Path) -> dict[str, str]:
    """{component: file} of a prefill + decode export."""
    path = model_dir / MANIFEST
    if not path.is_file():
        raise MissingFileError(f"{path} not found: not an export written by `tinyllm quantize`")
    components = json.loads(path.read_text(encoding="utf-8"))["components"]
    if set(components) != {"prefill", "decode"}:
        raise UsageError(f"{path}: expected prefill and decode graphs, found {sorted(components)}")
    return {name: entry["file"] for name, entry in components.items()}


class CachedDecoder:
    """The decoding loop shared by the runtimes; a subclass runs one graph: `_run(graph, feeds) -> [logits, *cache]`."""

    cache_inputs: list[str]  # decode-graph input names of the cache tensors, in the order the graphs output them

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        config_path = self.model_dir / "config.json"
        self.config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, num_threads: int | None = None):
        return cls(model_dir, num_threads=num_threads)

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def _step(self, graph: str, input_ids: list[int], start: int, cache: list[np.ndarray] | None):
        feeds = {
            "input_ids": np.asarray([input_ids], dtype=np.int64),
            "position_ids": np.arange(start, start + len(input_ids), dtype=np.int64)[None],
        }
        if cache is not None:
            feeds.update(zip(self.cache_inputs, cache))
        logits, *new_cache = self._run(graph, feeds)
        return logits[0], new_cache

    def __call__(self, input_ids: list[int]) -> np.ndarray:
        """Logits for every position of `input_ids` (shape [len, vocab]), e.g. for perplexity."""
        return self._step("prefill", list(input_ids), 0, None)[0]

    def stream(
        self,
        input_ids: list[int],
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        seed: int | None = None,
    ) -> Iterator[int]:
        """Yield new token ids one at a time (stops after an EOS token, which is yielded, or `max_new_tokens`)."""
        if not input_ids:
            raise UsageError("input_ids is empty: the prompt needs at least one token")
        if eos_token_id is None:
            eos_token_id = self.config.get("eos_token_id")
        stop = set(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]) - {None}
        rng = np.random.default_rng(seed)
        logits, cache = self._step("prefill", list(input_ids), 0, None)
        position = len(input_ids)
        for _ in range(max_new_tokens):
            token = sample_next_token(logits[-1], rng, do_sample, temperature, top_k, top_p)
            yield token
            if token in stop:
                return
            logits, cache = self._step("decode", [token], position, cache)
            position += 1

    def generate(self, input_ids: list[int], max_new_tokens: int = 64, **kwargs) -> list[int]:
        """The new token ids (prompt excluded); keyword arguments as in `stream`."""
        return list(self.stream(input_ids, max_new_tokens=max_new_tokens, **kwargs))


class OnnxCausalLM(CachedDecoder):
    """ONNX prefill + decode graphs in ONNX Runtime CPU sessions."""

    def __init__(self, model_dir: str | Path, num_threads: int | None = None):
        import onnxruntime as ort

        super().__init__(model_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads or os.cpu_count() or 1
        self.sessions = {
            name: ort.InferenceSession(str(self.model_dir / file), options, providers=["CPUExecutionProvider"])
            for name, file in read_manifest(self.model_dir).items()
        }
        self.cache_inputs = [i.name for i in self.sessions["decode"].get_inputs() if "cache" in i.name]

    def _run(self, graph, feeds):
        return self.sessions[graph].run(None, feeds)


class OpenVINOCausalLM(CachedDecoder):
    """OpenVINO IR prefill + decode graphs (exported with explicit cache inputs, `stateful=False`), compiled for CPU."""

    def __init__(self, model_dir: str | Path, num_threads: int | None = None):
        import openvino

        super().__init__(model_dir)
        core = openvino.Core()
        properties = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": num_threads or os.cpu_count() or 1}
        self.requests = {
            name: core.compile_model(core.read_model(self.model_dir / file), "CPU", properties).create_infer_request()
            for name, file in read_manifest(self.model_dir).items()
        }
        decode_inputs = self.requests["decode"].model_inputs
        self.cache_inputs = [port.get_any_name() for port in decode_inputs if "cache" in port.get_any_name()]

    def _run(self, graph, feeds):
        request = self.requests[graph]
        result = request.infer(feeds)
        return [result[port] for port in request.model_outputs]
