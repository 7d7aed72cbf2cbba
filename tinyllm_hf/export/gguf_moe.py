"""Export a Mixture-of-Experts Tinyllm (or a Qwen2-MoE checkpoint) to a GGUF file that upstream llama.cpp loads as its
`qwen2moe` architecture.

The model first goes through the exact Qwen2-MoE mapping of `tinyllm_hf.modeling.convert_moe`; the tokenizer is written
as in `tinyllm_hf.export.gguf` (gpt2 BPE, chat template). llama.cpp's qwen2moe graph is narrower than Qwen2-MoE in
transformers, so this export also refuses:

- dense layers (`first_k_dense_replace` / `moe_layer_freq`): llama.cpp builds every qwen2moe layer as MoE;
- `norm_topk_prob=True`: llama.cpp's qwen2moe never renormalises the top-k weights.

Two details keep the file exact. llama.cpp computes the shared-expert gate as silu(z) / z, which is 0/0 at z = 0, so
the zero gate of the Qwen2-MoE export is written as a tiny constant (2^-60): the gate input is then ~1e-18 and both
llama.cpp and transformers round sigmoid of it to exactly 0.5. And llama.cpp's qwen2moe requires `output.weight`, so a
tied head is written out explicitly. Qwen2 models use NEOX-style RoPE, so q/k need no permutation (unlike `llama`).

    tinyllm export gguf-moe --model DIR --outtype q8_0 --output model-q8_0.gguf
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from tinyllm_hf.export.gguf import OUTTYPES, require_gguf, write_gguf_atomically, write_hparams, write_tokenizer
from tinyllm_hf.modeling.convert import ConversionError

SHARED_GATE_WEIGHT = 2.0**-60
# Kept in f32 like llama.cpp's own converter does: norms, biases, gates (routing is sensitive to rounding).
F32_SUFFIXES = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")


def load_qwen2_moe(model_dir: Path):
    """The checkpoint in `model_dir` as a Qwen2MoeForCausalLM: a MoE Tinyllm is converted exactly, a Qwen2-MoE loaded."""
    from transformers import Qwen2MoeForCausalLM

    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: --model must be a checkpoint directory")
    model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    if model_type == "tinyllm":
        from tinyllm_hf.modeling.convert_moe import tinyllm_to_qwen2_moe_model
        from tinyllm_hf.modeling.modeling_tinyllm import TinyllmForCausalLM

        return tinyllm_to_qwen2_moe_model(TinyllmForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    if model_type == "qwen2_moe":
        return Qwen2MoeForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    raise ValueError(f"{config_path}: model_type {model_type!r} is not a Mixture-of-Experts Tinyllm or Qwen2-MoE")


def check_llama_cpp_can_express(config) -> None:
    if config.mlp_only_layers or config.decoder_sparse_step != 1:
        raise ConversionError(
            f"dense layers {config.mlp_only_layers or 'from decoder_sparse_step'}: llama.cpp's qwen2moe makes every "
            "layer MoE; train with first_k_dense_replace=0 and moe_layer_freq=1 for a GGUF"
        )
    if config.norm_topk_prob:
        raise ConversionError("norm_topk_prob=True: llama.cpp's qwen2moe never renormalises the top-k routing weights")


def gguf_tensors(qwen) -> dict[str, np.ndarray]:
    """Qwen2-MoE weights under llama.cpp's names, as float32 arrays (stacked experts: (experts, out, in))."""
    gguf = require_gguf()
    config = qwen.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2MOE, config.num_hidden_layers)
    state = {k: v.float().numpy() for k, v in qwen.state_dict().items()}
    if "lm_head.weight" not in state or config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # qwen2moe in llama.cpp requires output.weight
    tensors = {}
    for hf_name, data in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if hf_name.endswith("mlp.experts.gate_up_proj"):
            gate, up = np.split(data, 2, axis=1)  # (experts, 2 * inter, hidden) -> two (experts, inter, hidden)
            prefix = hf_name.removesuffix("gate_up_proj")
            pieces = {prefix + "gate_proj.weight": gate, prefix + "up_proj.weight": up}
        elif hf_name.endswith("mlp.experts.down_proj"):
            pieces = {hf_name + ".weight": data}
        elif hf_name.endswith("shared_expert_gate.weight"):
            if np.any(data):
                raise ConversionError(f"{hf_name} is not zero: only the exact Tinyllm mapping (gate fixed at 0.5) is supported")
            pieces = {hf_name: np.full(data.shape[-1], SHARED_GATE_WEIGHT, dtype=np.float32)}
        else:
            pieces = {hf_name: data}
        for name, array in pieces.items():
            gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ConversionError(f"tensor {name!r} has no counterpart in llama.cpp's qwen2moe architecture")
            tensors[gguf_name] = array
    return tensors


def write_moe_gguf(model_dir: Path, path: Path, outtype: str) -> None:
    gguf = require_gguf()
    qwen = load_qwen2_moe(model_dir)
    config = qwen.config
    check_llama_cpp_can_express(config)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2MOE])
    write_hparams(writer, config.to_dict(), name=model_dir.resolve().name)
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if outtype == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_tokenizer(writer, model_dir, config.vocab_size)
    for name, data in gguf_tensors(qwen).items():
        if data.ndim == 1 or name.endswith(F32_SUFFIXES):
            writer.add_tensor(name, data.astype(np.float32))
        elif outtype == "q8_0" and data.shape[-1] % 32 == 0:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_moe_gguf(model_dir: str | Path, output_file: str | Path, outtype: str = "f16") -> Path:
    """Write a MoE Tinyllm or Qwen2-MoE checkpoint as a llama.cpp `qwen2moe` GGUF; nothing is left behind on error."""
    return write_gguf_atomically(write_moe_gguf, Path(model_dir), Path(output_file), outtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinyllm export gguf-moe", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="MoE Tinyllm or Qwen2-MoE checkpoint directory (with tokenizer)")
    parser.add_argument("--output", required=True, help="GGUF file to write, e.g. model-q8_0.gguf")
    parser.add_argument("--outtype", default="f16", choices=OUTTYPES, help="tensor type (q4_k_m needs [llamacpp])")
    args = parser.parse_args(argv)
    try:
        path = export_moe_gguf(args.model, args.output, args.outtype)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as err:
        print(f"tinyllm export gguf-moe: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.outtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
