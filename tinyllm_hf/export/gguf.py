"""Export a checkpoint to a GGUF file that upstream llama.cpp loads: a dense Tinyllm or Llama as the `llama`
architecture, a Mixture-of-Experts Tinyllm (or a Qwen2-MoE checkpoint) as `qwen2moe`.

Tinyllm uses Llama's parameter names and math, so a dense GGUF is written directly from the safetensors state dict with
the `gguf` package, the way llama.cpp's `convert_hf_to_gguf.py` writes a Llama model:

- hyperparameters under `llama.*`; Q and K projection rows permuted from HF's half-rotation RoPE layout to the
  interleaved layout llama.cpp's `llama` graph expects;
- the tokenizer as a `gpt2` (byte-level BPE) vocabulary with merges, pre-tokenizer `gpt-2` (the regex of our ByteLevel
  pre-tokenizer; `convert_hf_to_gguf.py` rejects our tokenizer because it only knows pre-tokenizers by hash), special
  tokens typed CONTROL (the tool and thinking tokens too), EOS/pad ids and the chat template (tools included);
- f16 and q8_0 tensors are written by the `gguf` package; q4_k_m is produced from the f16 file by llama.cpp's own
  quantizer through `llama-cpp-python` (`pip install "tinyllm-hf[llamacpp]"`).

A MoE model first goes through the exact Qwen2-MoE mapping of `tinyllm_hf.modeling.convert_moe`; hyperparameters,
tokenizer and tensor types are written as for a dense one, plus the expert counts and sizes. llama.cpp's qwen2moe graph
is narrower than Qwen2-MoE in transformers, so the export also refuses:

- dense layers (`first_k_dense_replace` / `moe_layer_freq`): llama.cpp builds every qwen2moe layer as MoE;
- `norm_topk_prob=True`: llama.cpp's qwen2moe never renormalises the top-k weights.

Two details keep the MoE file exact. llama.cpp computes the shared-expert gate as silu(z) / z, which is 0/0 at z = 0,
so the zero gate of the Qwen2-MoE export is written as a tiny constant (2^-60): the gate input is then ~1e-18 and both
llama.cpp and transformers round sigmoid of it to exactly 0.5. And llama.cpp's qwen2moe requires `output.weight`, so a
tied head is written out explicitly. Qwen2 models use NEOX-style RoPE, so q/k need no permutation (unlike `llama`).

    tinyllm export gguf --model DIR --outtype q8_0 --output model-q8_0.gguf
"""

import json
import os
import re
from pathlib import Path

import numpy as np

from tinyllm_hf.errors import ConversionError, ExternalToolError, MissingDependencyError, MissingFileError, UsageError
from tinyllm_hf.runs import atomic_output

OUTTYPES = ("f16", "q8_0", "q4_k_m")
SUPPORTED_MODEL_TYPES = ("tinyllm", "llama", "qwen2_moe")
SHARED_GATE_WEIGHT = 2.0**-60
# Kept in f32 like llama.cpp's own converter does: the MoE routing gates (routing is sensitive to rounding).
F32_SUFFIXES = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise MissingDependencyError('GGUF export needs the `gguf` package: pip install "tinyllm-hf[quant]"') from None
    return gguf


# ---------------------------------------------------------------------------------------------------------------------
# Reading the checkpoint
# ---------------------------------------------------------------------------------------------------------------------


def read_config(model_dir: Path) -> dict:
    """config.json of a Tinyllm, Llama or Qwen2-MoE checkpoint, rejecting anything else with a one-line reason."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise MissingFileError(f"{path} not found: --model must be a Tinyllm or Llama checkpoint directory")
    config = json.loads(path.read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UsageError(f"{path}: model_type {model_type!r} is not a Tinyllm or Llama checkpoint "
                         "(nor a Qwen2-MoE one)")
    if config.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{path}: hidden_act {config['hidden_act']!r} is not supported (llama.cpp uses silu)")
    return config


def is_moe(config: dict) -> bool:
    return config["model_type"] == "qwen2_moe" or bool(config.get("num_experts"))


def read_state_dict(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of the (possibly sharded) safetensors checkpoint, as float32 numpy arrays."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif (model_dir / "model.safetensors").is_file():
        files = [model_dir / "model.safetensors"]
    else:
        raise MissingFileError(f"no model.safetensors in {model_dir} (save the model with save_pretrained)")
    tensors = {}
    for file in files:
        # framework="pt" reads bf16 too, which numpy cannot represent.
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name).float().numpy()
    return tensors


# YaRN keys of transformers' rope_parameters that llama.cpp's GGUF can carry (as its convert_hf_to_gguf.py writes them).
YARN_GGUF_KEYS = {"attention_factor": "add_rope_scaling_yarn_attn_factor", "beta_fast": "add_rope_scaling_yarn_beta_fast",
                  "beta_slow": "add_rope_scaling_yarn_beta_slow"}
# YaRN keys llama.cpp has no equivalent of (DeepSeek's mscale pair; `truncate=False` keeps a fractional ramp).
YARN_UNSUPPORTED_KEYS = ("mscale", "mscale_all_dim", "truncate")


def rope_settings(config: dict) -> dict:
    """The RoPE of a checkpoint's config.json (transformers 5 `rope_parameters` or the older flat fields) as
    {"theta", "type", "factor", and for YaRN "original_context" and any of YARN_GGUF_KEYS}. Dynamic NTK is refused:
    llama.cpp has no dynamic RoPE, and a GGUF without it would silently run a different model past the trained
    context."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear", "yarn"):
        hint = " (run it with --rope-scaling yarn:FACTOR instead, which llama.cpp supports)" if rope_type == "dynamic" else ""
        raise ConversionError(f"rope_type {rope_type!r} has no GGUF export here (supported: default, linear, yarn){hint}")
    settings = {"theta": float(theta), "type": rope_type, "factor": float(params.get("factor", 1.0))}
    if rope_type == "yarn":
        unsupported = [key for key in YARN_UNSUPPORTED_KEYS if params.get(key) not in (None, True)]
        if unsupported:
            raise ConversionError(f"YaRN with {', '.join(unsupported)} set has no llama.cpp equivalent; remove it from "
                                  "rope_parameters to export")
        settings["original_context"] = int(params.get("original_max_position_embeddings") or config["max_position_embeddings"])
        settings.update({key: float(params[key]) for key in YARN_GGUF_KEYS if params.get(key) is not None})
    return settings


def permute_for_llama_cpp(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from HF's [first half | second half] RoPE pairing to llama.cpp's interleaved pairs.

    Same as `LlamaModel.permute` in llama.cpp's convert_hf_to_gguf.py; applies to q/k weights and biases.
    """
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def load_qwen2_moe(model_dir: Path, model_type: str):
    """The MoE checkpoint in `model_dir` as a Qwen2MoeForCausalLM: a MoE Tinyllm is converted exactly, a Qwen2-MoE
    loaded as it is."""
    import torch
    from transformers import Qwen2MoeForCausalLM

    if model_type == "tinyllm":
        from tinyllm_hf.modeling.convert_moe import tinyllm_to_qwen2_moe_model
        from tinyllm_hf.modeling.modeling_tinyllm import TinyllmForCausalLM

        return tinyllm_to_qwen2_moe_model(TinyllmForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    return Qwen2MoeForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def check_llama_cpp_can_express(qwen_config) -> None:
    if qwen_config.mlp_only_layers or qwen_config.decoder_sparse_step != 1:
        raise ConversionError(
            f"dense layers {qwen_config.mlp_only_layers or 'from decoder_sparse_step'}: llama.cpp's qwen2moe makes "
            "every layer MoE; train with first_k_dense_replace=0 and moe_layer_freq=1 for a GGUF"
        )
    if qwen_config.norm_topk_prob:
        raise ConversionError("norm_topk_prob=True: llama.cpp's qwen2moe never renormalises the top-k routing weights")


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------


def write_hparams(writer, config: dict, name: str) -> None:
    gguf = require_gguf()
    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    rope = rope_settings(config)
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_rope_freq_base(rope["theta"])
    writer.add_rope_dimension_count(head_dim)
    if head_dim * n_head != config["hidden_size"]:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope["type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope["type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_context"])
        for key, add in YARN_GGUF_KEYS.items():
            if key in rope:
                getattr(writer, add)(rope[key])
    writer.add_vocab_size(config["vocab_size"])


def check_tokenizer_matches_gpt2_pretokenizer(tokenizer_json: dict) -> None:
    """llama.cpp re-implements tokenization: refuse tokenizers its `gpt-2` pre-tokenizer would split differently."""
    model = tokenizer_json.get("model", {})
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    problems = []
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        problems.append("model is not a byte-level BPE")
    if tokenizer_json.get("normalizer"):
        problems.append(f"normalizer {tokenizer_json['normalizer'].get('type')} is set")
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        problems.append("pre-tokenizer is not ByteLevel(add_prefix_space=False, use_regex=True)")
    if problems:
        raise ConversionError("tokenizer cannot be expressed as llama.cpp's gpt-2 BPE: " + "; ".join(problems))


def template_for_llama_cpp(template: str) -> str:
    """The chat template with `{% generation %}` / `{% endgeneration %}` turned into comments.

    Those tags only mark assistant tokens for training masks (a transformers extension); llama.cpp's and
    llama-cpp-python's Jinja reject them as unknown. As comments with the same `-` whitespace control, the template
    renders exactly the same text.
    """
    return re.sub(r"\{%(-?)\s*(end)?generation\s*(-?)%\}", r"{#\1 \2generation \3#}", template)


def write_tokenizer(writer, model_dir: Path, vocab_size: int, trust_remote_code: bool = False) -> None:
    """Vocabulary, merges, token types, special ids and chat template, as llama.cpp reads a `gpt2` tokenizer."""
    gguf = require_gguf()
    from tinyllm_hf.model_utils import get_tokenizer

    tokenizer = get_tokenizer(str(model_dir), trust_remote_code=trust_remote_code)
    tok_json = json.loads(tokenizer.backend_tokenizer.to_str())
    check_tokenizer_matches_gpt2_pretokenizer(tok_json)
    if len(tokenizer) > vocab_size:
        raise ConversionError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}")

    id_to_token = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = id_to_token.get(i)
        if token is None:  # embedding rows beyond the tokenizer (vocab padded for speed): never produced
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[token].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.eos_token_id is None:
        raise ConversionError(f"tokenizer in {model_dir} has no eos_token: generation in llama.cpp would never stop")
    # Our tokenizer has no BOS (documents are separated by EOS, as in GPT-2); llama.cpp still wants an id, and a BPE
    # vocab without one defaults to id 11 -- use EOS, as GPT-2 does, and never prepend it.
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False))
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(template_for_llama_cpp(tokenizer.chat_template))


def llama_tensors(config: dict, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A dense checkpoint's weights under llama.cpp's `llama` names, q/k rows permuted to its RoPE layout."""
    gguf = require_gguf()
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    tensors = {}
    for hf_name, data in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from rope theta by llama.cpp
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings", True):
            continue  # tied: llama.cpp falls back to token_embd when there is no output.weight
        if ".q_proj." in hf_name:
            data = permute_for_llama_cpp(data, n_head)
        elif ".k_proj." in hf_name:
            data = permute_for_llama_cpp(data, n_kv)
        tensors[llama_cpp_name(name_map, hf_name, "llama")] = data
    return tensors


def qwen2_moe_tensors(qwen) -> dict[str, np.ndarray]:
    """Qwen2-MoE weights under llama.cpp's `qwen2moe` names (stacked experts: (experts, out, in))."""
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
            tensors[llama_cpp_name(name_map, name, "qwen2moe")] = array
    return tensors


def llama_cpp_name(name_map, hf_name: str, architecture: str) -> str:
    gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise ConversionError(f"tensor {hf_name!r} has no counterpart in llama.cpp's {architecture} architecture")
    return gguf_name


def add_tensor(writer, name: str, data: np.ndarray, outtype: str) -> None:
    """As llama.cpp's converter: 1-D tensors (norms, biases) and routing gates stay f32; q8_0 needs rows that split
    into 32-blocks; everything else is f16."""
    gguf = require_gguf()
    if data.ndim == 1 or name.endswith(F32_SUFFIXES):
        writer.add_tensor(name, data.astype(np.float32))
    elif outtype == "q8_0" and data.shape[-1] % 32 == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    else:
        writer.add_tensor(name, data.astype(np.float16))


def write_gguf(model_dir: Path, path: Path, outtype: str, trust_remote_code: bool = False) -> None:
    """Write an f16 or q8_0 GGUF of `model_dir` to `path`: `llama` for a dense checkpoint, `qwen2moe` for a MoE one.
    The weights are read by known classes only; the tokenizer runs shipped code only with `trust_remote_code`."""
    gguf = require_gguf()
    config = read_config(model_dir)
    if is_moe(config):
        qwen = load_qwen2_moe(model_dir, config["model_type"])
        check_llama_cpp_can_express(qwen.config)
        architecture, config, tensors = gguf.MODEL_ARCH.QWEN2MOE, qwen.config.to_dict(), qwen2_moe_tensors(qwen)
    else:
        architecture, tensors = gguf.MODEL_ARCH.LLAMA, llama_tensors(config, read_state_dict(model_dir))
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[architecture])
    write_hparams(writer, config, name=Path(model_dir).resolve().name)
    if architecture == gguf.MODEL_ARCH.QWEN2MOE:
        writer.add_expert_count(config["num_experts"])
        writer.add_expert_used_count(config["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
        writer.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if outtype == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_tokenizer(writer, model_dir, config["vocab_size"], trust_remote_code)
    for name, data in tensors.items():
        add_tensor(writer, name, data, outtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize_with_llama_cpp(f16_file: Path, output_file: Path, outtype: str = "q4_k_m") -> None:
    """Run llama.cpp's quantizer (k-quants need its importance-aware rounding, which the gguf package lacks)."""
    try:
        import llama_cpp
    except ImportError:
        raise MissingDependencyError(f'--outtype {outtype} needs llama.cpp\'s quantizer: pip install "tinyllm-hf[llamacpp]"') from None
    import ctypes

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[outtype]
    params.nthread = os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(str(f16_file).encode(), str(output_file).encode(), ctypes.byref(params))
    if status != 0:
        raise ExternalToolError(f"llama.cpp failed to quantize {f16_file} to {outtype} (status {status})")


def export_gguf(model_dir: str | Path, output_file: str | Path, outtype: str = "f16",
                trust_remote_code: bool = False) -> Path:
    """Write `model_dir` (a Tinyllm, Llama or Qwen2-MoE checkpoint) as a llama.cpp GGUF.

    The file is written into a temporary folder next to `output_file`, quantized there by llama.cpp for q4_k_m, and
    renamed at the end: a failed export leaves nothing behind, and what a killed one left (the folder, with the f16
    intermediate of a q4_k_m export) is removed by the next export to the same file, unless its process still runs.
    """
    model_dir, output_file = Path(model_dir), Path(output_file)
    read_config(model_dir)  # fail on a wrong directory before any work
    if outtype not in OUTTYPES:
        raise UsageError(f"unknown --outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    with atomic_output(output_file) as staged:
        if outtype == "q4_k_m":
            f16 = staged.with_name(staged.name + ".f16")  # in atomic_output's scratch folder, deleted with it
            write_gguf(model_dir, f16, "f16", trust_remote_code)
            quantize_with_llama_cpp(f16, staged, outtype)
        else:
            write_gguf(model_dir, staged, outtype, trust_remote_code)
    return output_file
