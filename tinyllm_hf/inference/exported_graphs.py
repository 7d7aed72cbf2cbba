"""The graphs transformers' exporters write (ONNX Runtime, OpenVINO), run one step at a time with an explicit KV cache.

`export_for_generation` writes two graphs, and the exported model has no `generate()`:

    prefill  (input_ids, position_ids)                  -> logits, cache.layers.{i}.{keys,values}
    decode   (input_ids, position_ids, input.cache...)  -> logits, output.cache.layers.{i}.{keys,values}

The prefill graph runs the prompt once; each new token then runs the decode graph on the cache the previous step
returned. Batch size is 1 (the exporters trace batch 1 without an attention mask). `runtime.ExportedRuntime` puts
these graphs behind the runtime interface every caller uses (sampling, the generation loop and serving live there).
"""

import json
import os
from pathlib import Path

import numpy as np

from tinyllm_hf.errors import MissingFileError, UsageError


MANIFEST = "export.json"  # written by transformers' ExportedModel.save_pretrained


def read_manifest(model_dir: Path) -> dict[str, str]:
    """{component: file} of a prefill + decode export."""
    path = model_dir / MANIFEST
    if not path.is_file():
        raise MissingFileError(f"{path} not found: not an export written by `tinyllm quantize`")
    components = json.loads(path.read_text(encoding="utf-8"))["components"]
    if set(components) != {"prefill", "decode"}:
        raise UsageError(f"{path}: expected prefill and decode graphs, found {sorted(components)}")
    return {name: entry["file"] for name, entry in components.items()}


class ExportedGraphs:
    """The prefill and decode graphs of one export; a subclass runs one graph: `run(graph, feeds) -> [logits, *cache]`."""

    cache_inputs: list[str]  # decode-graph input names of the cache tensors, in the order the graphs output them

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        config_path = self.model_dir / "config.json"
        self.config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def step(self, graph: str, input_ids: list[int], start: int, cache: list[np.ndarray] | None):
        """(logits [len, vocab], new cache) of `input_ids` at positions start.. through "prefill" or "decode"."""
        feeds = {
            "input_ids": np.asarray([input_ids], dtype=np.int64),
            "position_ids": np.arange(start, start + len(input_ids), dtype=np.int64)[None],
        }
        if cache is not None:
            feeds.update(zip(self.cache_inputs, cache))
        logits, *new_cache = self.run(graph, feeds)
        return logits[0], new_cache


class OnnxGraphs(ExportedGraphs):
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

    def run(self, graph, feeds):
        return self.sessions[graph].run(None, feeds)


class OpenVINOGraphs(ExportedGraphs):
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

    def run(self, graph, feeds):
        request = self.requests[graph]
        result = request.infer(feeds)
        return [result[port] for port in request.model_outputs]
