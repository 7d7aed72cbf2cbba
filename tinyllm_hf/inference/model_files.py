"""What a model path holds and what running it needs: a checkpoint directory, a `tinyllm quantize` output (named by
its `tinyllm_quant.json`) or a GGUF file, the backends that run them, and the command-line options that choose one.
Light on purpose (no torch), so commands can check their input, and print their help, before loading anything.
"""

import argparse
import importlib.util
import json
from pathlib import Path

from tinyllm_hf.errors import MissingFileError, UsageError
from tinyllm_hf.model_utils import add_trust_remote_code_argument
from tinyllm_hf.rope_scaling import SPEC_HELP


QUANT_FILE = "tinyllm_quant.json"  # written by `tinyllm quantize` into every variant: {"method": ..., "source": ...}
# What running each kind of model needs (a `tinyllm quantize` method, "gguf", "checkpoint"), and the pip extra.
RUNTIME_MODULES = {
    "checkpoint": ((), None),
    "gguf": (("llama_cpp",), "llamacpp"),
    "onnx": (("onnxruntime",), "quant"),
    "onnx-int8": (("onnxruntime",), "quant"),
    "quanto-int8": (("optimum.quanto",), "quant"),
    "quanto-int4": (("optimum.quanto",), "quant"),
    "openvino-int8": (("openvino",), "quant"),
    "openvino-int4": (("openvino",), "quant"),
}
PIP_NAMES = {"llama_cpp": "llama-cpp-python", "optimum.quanto": "optimum-quanto"}  # where they differ from the module
# The runtimes `--backend` of `tinyllm serve` and `tinyllm demo` names (runtime.load_backend); here, not in runtime.py,
# so their parsers (and `--help`) need no torch.
BACKENDS = ("transformers", "llamacpp", "onnx")
AUTO_BACKEND = "auto"  # `--backend auto`: inference/runtime_choice.py
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")  # a --host elsewhere exposes the server or demo: they warn


def add_runtime_arguments(parser, what: str) -> None:
    """The options every front end that runs a model shares (`tinyllm serve`, `tinyllm demo`): which model, on which
    backend, in which dtype, with how many threads, whether code shipped with it may run, and where `what` (the
    server, the demo) listens."""
    parser.add_argument("--model", required=True, help="checkpoint directory, .gguf file (llamacpp) or export (onnx)")
    parser.add_argument("--backend", choices=(AUTO_BACKEND, *BACKENDS), default=AUTO_BACKEND,
                        help="auto (default): the fastest runtime that reproduces the model's greedy tokens, measured "
                             "once and saved (inference/runtime_choice.py); or name one")
    parser.add_argument("--host", default="127.0.0.1", help=f"address to bind; 0.0.0.0 exposes {what} to the network")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights dtype for the transformers backend")
    parser.add_argument("--threads", type=positive_int, help="CPU threads per decode step (default: the runtime's; 1 "
                        "suits small models on busy machines, see docs/serving.md)")
    parser.add_argument("--max-batch-size", type=positive_int, default=8, help="sequences decoded together")
    parser.add_argument("--rope-scaling", default=None, metavar="TYPE:FACTOR",
                        help=SPEC_HELP + " (transformers backend)")
    add_trust_remote_code_argument(parser)


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (a queue, a batch or a size of 0 cannot serve anything)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def importable(module: str) -> bool:
    """Whether `module` (dotted names allowed) can be imported here, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # parent package (e.g. `optimum`) missing
        return False


def quantize_method(model_dir: Path) -> str | None:
    """The `tinyllm quantize` method that wrote `model_dir`, or None for a plain checkpoint."""
    info = model_dir / QUANT_FILE
    if not info.is_file():
        return None
    method = json.loads(info.read_text("utf-8")).get("method")
    if method not in RUNTIME_MODULES or method == "checkpoint":
        raise UsageError(f"{info}: unknown method {method!r}")
    return method


def model_kind(path: str | Path, role: str = "model") -> str:
    """"gguf", a `tinyllm quantize` method, or "checkpoint" (a plain transformers directory). `role` names the path in
    error messages (e.g. "variant")."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{role} not found: {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise UsageError(f"{path}: a {role} file must be a .gguf file")
        return "gguf"
    method = quantize_method(path)
    if method is not None:
        return method
    if (path / "config.json").is_file():
        return "checkpoint"
    raise UsageError(f"{path}: not a `tinyllm quantize` output, a .gguf file or a checkpoint directory")


def missing_runtime(kind: str) -> str | None:
    """Why a model of this kind cannot run here (a package is missing), or None."""
    modules, extra = RUNTIME_MODULES[kind]
    missing = [m for m in modules if not importable(m)]
    if not missing:
        return None
    packages = ", ".join(PIP_NAMES.get(m, m) for m in missing)
    return f"running a {kind} model needs {packages}: pip install \"tinyllm-hf[{extra}]\""
