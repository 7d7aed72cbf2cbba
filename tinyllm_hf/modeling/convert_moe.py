"""Export a Mixture-of-Experts Tinyllm as Qwen2-MoE (`Qwen2MoeForCausalLM`), which transformers (4.x and 5.x), vLLM and
llama.cpp load natively.

The mapping is exact, not approximate:

- the router (`mlp.gate`), the stacked routed experts (`mlp.experts.gate_up_proj` / `down_proj`) and the shared expert
  (`mlp.shared_expert.*`) already have Qwen2-MoE's names and layouts;
- Qwen2-MoE scales its shared expert by `sigmoid(shared_expert_gate(x))`. A zero gate gives exactly 0.5, so the shared
  expert's `down_proj` is doubled (a power-of-two scale: exact in floating point);
- without shared experts, a zero-weight shared expert (it outputs exactly 0) fills the slot Qwen2-MoE always has;
- dense layers (`first_k_dense_replace` / `moe_layer_freq`) become Qwen2-MoE's `mlp_only_layers`, same width;
- Qwen2-MoE loaders other than transformers 5 always build q/k/v biases, so they are written (zeros without `qkv_bias`).

Rejected with `ConversionError`: sigmoid router scoring and the auxiliary-loss-free expert bias (Qwen2-MoE routes with a
plain softmax top-k), a bias on o_proj, and a head_dim other than hidden_size / num_attention_heads (vLLM's Qwen2-MoE
derives it).

    tinyllm export qwen2-moe SRC DST
"""

import torch
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

from tinyllm_hf.errors import ConversionError
from tinyllm_hf.modeling.configuration_tinyllm import TinyllmConfig
from tinyllm_hf.modeling.convert import convert_checkpoint
from tinyllm_hf.modeling.modeling_tinyllm import TinyllmForCausalLM

SHARED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "initializer_range", "rms_norm_eps", "tie_word_embeddings",
    "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "num_experts",
    "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "router_aux_loss_coef",
)


def tinyllm_config_to_qwen2_moe(config: TinyllmConfig) -> Qwen2MoeConfig:
    if not config.num_experts:
        raise ConversionError("num_experts=0: a dense Tinyllm exports as Llama (`tinyllm export llama`)")
    if config.router_scoring != "softmax":
        raise ConversionError(f"router_scoring={config.router_scoring!r}: Qwen2-MoE routes with a softmax only")
    if config.router_bias_update_rate > 0:
        raise ConversionError(
            "router_bias_update_rate > 0: Qwen2-MoE has no expert-selection bias, so routing would change"
        )
    if config.attention_bias:
        raise ConversionError("attention_bias=True puts a bias on o_proj, which Qwen2-MoE does not have")
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        raise ConversionError(
            f"head_dim={config.head_dim} differs from hidden_size / num_attention_heads; vLLM's Qwen2-MoE derives it"
        )
    fields = {name: getattr(config, name) for name in SHARED_FIELDS}
    return Qwen2MoeConfig(
        **fields,
        hidden_act="silu",
        qkv_bias=True,
        shared_expert_intermediate_size=config.shared_expert_intermediate_size or config.moe_intermediate_size,
        decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(config.num_hidden_layers) if not config.is_moe_layer(i)],
        use_sliding_window=False,
        rope_parameters=dict(config.rope_parameters),
    )


@torch.no_grad()
def tinyllm_to_qwen2_moe_model(model: TinyllmForCausalLM) -> Qwen2MoeForCausalLM:
    config = model.config
    qwen = Qwen2MoeForCausalLM(tinyllm_config_to_qwen2_moe(config)).to(model.dtype)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    for i in range(config.num_hidden_layers):
        attn = f"model.layers.{i}.self_attn"
        for proj in ("q_proj", "k_proj", "v_proj"):
            state.setdefault(f"{attn}.{proj}.bias", torch.zeros_like(qwen.get_parameter(f"{attn}.{proj}.bias")))
        if not config.is_moe_layer(i):
            continue
        shared = f"model.layers.{i}.mlp.shared_expert"
        if config.num_shared_experts:
            # sigmoid(0) = 0.5 exactly, and doubling is exact: the gated shared expert equals ours bit for bit.
            state[f"{shared}.down_proj.weight"] = state[f"{shared}.down_proj.weight"] * 2
        else:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                state[f"{shared}.{proj}.weight"] = torch.zeros_like(qwen.get_parameter(f"{shared}.{proj}.weight"))
        gate = f"model.layers.{i}.mlp.shared_expert_gate.weight"
        state[gate] = torch.zeros_like(qwen.get_parameter(gate))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = qwen.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ConversionError(f"weights do not map one to one: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        qwen.tie_weights()
    qwen.generation_config = model.generation_config
    return qwen.eval()


def tinyllm_to_qwen2_moe(src, dst):
    """Write the MoE Tinyllm checkpoint in `src` as a `Qwen2MoeForCausalLM` checkpoint (with its tokenizer) in `dst`.

    transformers 5 saves experts in the original per-expert layout (`mlp.experts.N.gate_proj.weight`), which vLLM,
    llama.cpp's converter and transformers 4.x expect."""
    return convert_checkpoint(src, dst, TinyllmForCausalLM, tinyllm_to_qwen2_moe_model)
