"""`tinyllm quantize`: smaller / faster copies of a Tinyllm or Llama checkpoint for CPU inference.

    tinyllm quantize --model out/sft --method onnx-int8 --output out/sft-onnx-int8
    tinyllm quantize drift --model out/sft --variant out/sft-onnx-int8 --output drift.md   (see export/drift.py)

Methods (all on the core transformers 5 install plus the `quant` extra, no second transformers):
    onnx           ONNX prefill + decode graphs with explicit KV cache (transformers' own exporter), fp32
    onnx-int8      the same, weights int8 by ONNX Runtime dynamic quantization (activations quantized on the fly)
    quanto-int8    optimum-quanto int8 weight-only, saved as quanto's safetensors + quantization map
    quanto-int4    optimum-quanto int4 weight-only (group-wise)
    openvino-int8  OpenVINO IR (transformers' exporter) with NNCF int8 weight compression
    openvino-int4  OpenVINO IR with NNCF int4 weight compression
GPTQ, AWQ and bitsandbytes need a CUDA GPU: use them through transformers' quantization configs on a GPU machine.

Every output directory holds the tokenizer, the model config and `tinyllm_quant.json`;
`tinyllm_hf.inference.runtime.load_runtime(dir)` runs any of them (and chat, serve and the drift table use it).
"""

import json
from pathlib import Path

from tinyllm_hf.errors import MissingDependencyError, MissingFileError, OutputExistsError, QuantizeError
from tinyllm_hf.inference.model_files import QUANT_FILE, importable
from tinyllm_hf.runs import atomic_output

EXPORT_PROMPT = "你好，请介绍一下你自己。"  # sample input the ONNX/OpenVINO exporters trace generation with

# method -> (modules it needs, the pip extra that provides them)
METHODS = {
    "onnx": (("onnx", "onnxscript", "onnxruntime"), "quant"),
    "onnx-int8": (("onnx", "onnxscript", "onnxruntime"), "quant"),
    "quanto-int8": (("optimum.quanto",), "quant"),
    "quanto-int4": (("optimum.quanto",), "quant"),
    "openvino-int8": (("openvino", "nncf"), "quant"),
    "openvino-int4": (("openvino", "nncf"), "quant"),
}
GPU_ONLY = {
    "gptq": "GPTQConfig",
    "awq": "AwqConfig",
    "bnb-int8": "BitsAndBytesConfig(load_in_8bit=True)",
    "bnb-int4": "BitsAndBytesConfig(load_in_4bit=True)",
}


# ---------------------------------------------------------------------------------------------------------------------
# Checks before any work
# ---------------------------------------------------------------------------------------------------------------------


def check_method(method: str) -> None:
    if method in GPU_ONLY:
        raise QuantizeError(
            f"--method {method} needs a CUDA GPU (it is not available on CPU); on a GPU machine load the model with "
            f"transformers' {GPU_ONLY[method]} instead. CPU methods: {', '.join(METHODS)}"
        )
    if method not in METHODS:
        raise QuantizeError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    modules, extra = METHODS[method]
    missing = [m for m in modules if not importable(m)]
    if missing:
        raise MissingDependencyError(f"--method {method} needs {', '.join(missing)}: pip install \"tinyllm-hf[{extra}]\"")


def check_checkpoint(model_dir: Path) -> dict:
    """The config of a Tinyllm or Llama checkpoint directory; anything else is refused with the reason."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise MissingFileError(f"{path} not found: --model must be a Tinyllm or Llama checkpoint directory")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("model_type") not in ("tinyllm", "llama"):
        raise QuantizeError(f"{path}: model_type {config.get('model_type')!r} is not a Tinyllm or Llama checkpoint")
    return config


def load_source(model_dir: Path, trust_remote_code: bool = False):
    """(fp32 model in eval mode, tokenizer) of the checkpoint to quantize."""
    from tinyllm_hf.model_utils import get_model, get_tokenizer

    model = get_model(str(model_dir), dtype="float32", trust_remote_code=trust_remote_code).eval()
    return model, get_tokenizer(str(model_dir), trust_remote_code=trust_remote_code)


# ---------------------------------------------------------------------------------------------------------------------
# Methods: each writes its files into an (empty, temporary) directory
# ---------------------------------------------------------------------------------------------------------------------


def export_onnx(model, tokenizer, out_dir: Path, int8: bool) -> None:
    from transformers.exporters import OnnxConfig, OnnxExporter, OnnxRuntimeDynamicConfig, OnnxRuntimeQuantizer

    quantizer = OnnxRuntimeQuantizer(OnnxRuntimeDynamicConfig()) if int8 else None
    sample = dict(tokenizer(EXPORT_PROMPT, return_tensors="pt"))
    # multi_token_decode: the decode graph takes any number of new tokens, so the cache length and step are dynamic.
    exported = OnnxExporter().export_for_generation(
        model, sample, OnnxConfig(dynamic=True, quantizer=quantizer), multi_token_decode=True
    )
    exported.save_pretrained(out_dir)


def quantize_quanto(model, out_dir: Path, bits: int) -> None:
    from optimum.quanto import freeze, qint4, qint8, quantization_map, quantize
    from safetensors.torch import save_file

    # lm_head stays fp32: it is tied to the embedding by default (quanto would untie and duplicate it), and the
    # output projection is where rounding moves the argmax most.
    quantize(model, weights=qint8 if bits == 8 else qint4, exclude="lm_head")
    freeze(model)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shares storage with the embedding; re-tied on load
    save_file(state, out_dir / "model.safetensors")
    (out_dir / "quantization_map.json").write_text(json.dumps(quantization_map(model), indent=2))
    model.config.save_pretrained(out_dir)


def export_openvino(model, tokenizer, out_dir: Path, bits: int) -> None:
    from transformers.exporters import (
        NNCFOpenVINOQuantizer,
        NNCFWeightCompressionConfig,
        OpenVINOConfig,
        OpenVINOExporter,
    )

    import nncf

    if bits == 8:
        compression = NNCFWeightCompressionConfig(mode=nncf.CompressWeightsMode.INT8_ASYM)
    else:
        # int4 scales are per group of input channels; the group must divide every linear layer's input width.
        widths = {model.config.hidden_size, model.config.intermediate_size}
        group = next((g for g in (128, 64, 32) if all(w % g == 0 for w in widths)), -1)  # -1: per channel
        compression = NNCFWeightCompressionConfig(mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=group)
    quantizer = NNCFOpenVINOQuantizer(compression)
    sample = dict(tokenizer(EXPORT_PROMPT, return_tensors="pt"))
    exported = OpenVINOExporter().export_for_generation(
        model, sample, OpenVINOConfig(dynamic=True, stateful=False, quantizer=quantizer), multi_token_decode=True
    )
    exported.save_pretrained(out_dir)


def run_method(method: str, model_dir: Path, out_dir: Path, trust_remote_code: bool = False) -> None:
    model, tokenizer = load_source(model_dir, trust_remote_code)
    if method in ("onnx", "onnx-int8"):
        export_onnx(model, tokenizer, out_dir, int8=method == "onnx-int8")
    elif method in ("quanto-int8", "quanto-int4"):
        quantize_quanto(model, out_dir, bits=8 if method == "quanto-int8" else 4)
    else:
        export_openvino(model, tokenizer, out_dir, bits=8 if method == "openvino-int8" else 4)
    tokenizer.save_pretrained(out_dir)
    (out_dir / QUANT_FILE).write_text(
        json.dumps({"method": method, "source": str(model_dir.resolve())}, indent=2) + "\n", encoding="utf-8"
    )


def quantize_checkpoint(model_dir: str | Path, output_dir: str | Path, method: str,
                        trust_remote_code: bool = False) -> Path:
    """Write the `method` variant of `model_dir` to `output_dir`; on any error nothing is left at `output_dir`. Code
    shipped in `model_dir` (a custom tokenizer, say) runs only with `trust_remote_code`."""
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    check_method(method)
    check_checkpoint(model_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise OutputExistsError(f"{output_dir} exists and is not empty: choose a new --output directory")
    # Build next to the destination and rename when complete, so a failure never leaves a half-written model.
    with atomic_output(output_dir) as staged:
        staged.mkdir()
        run_method(method, model_dir, staged, trust_remote_code)
    return output_dir
