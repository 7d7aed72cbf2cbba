"""Tinyllm: a small Llama-style decoder (pre-norm RMSNorm, RoPE, grouped-query causal attention, SwiGLU MLP).

With `config.num_experts > 0` the MLP of some layers becomes a Mixture of Experts (router -> top-k routed experts +
always-on shared experts); attention, norms and cache are the same code in both variants.

Read top to bottom in the order data flows: norm -> rotary embedding -> MLP -> Mixture of Experts -> attention ->
decoder layer -> model -> task heads. Parameter names mirror transformers' `LlamaForCausalLM`, so a checkpoint converts to Llama by config
mapping alone and tools that know Llama (vLLM, llama.cpp, optimum) load it unchanged.

This file ships as Hub remote code: it imports only torch, transformers and `configuration_tinyllm`.
"""

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.integrations.moe import use_experts_implementation
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_tinyllm import TinyllmConfig
from .loss_tinyllm import causal_lm_loss, compute_dtype, logits_loss


class TinyllmRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype == self.weight.dtype == torch.float32:
            # One op instead of seven, bitwise equal to the lines below in fp32: it shortens every decoding step.
            return nn.functional.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)
        # Normalise in fp32 so bf16/fp16 training keeps a stable variance.
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class TinyllmRotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE; scaled RoPE types come from transformers' ROPE_INIT_FUNCTIONS."""

    def __init__(self, config: TinyllmConfig):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        # Non-persistent: recomputed in `_init_weights`, because from_pretrained builds modules on the meta device.
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: TinyllmConfig, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: (batch, seq) -> cos, sin: (batch, seq, head_dim)
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        cos = torch.cat((freqs, freqs), dim=-1).cos() * self.attention_scaling
        # The first half negated: `apply_rotary_pos_emb` rotates by rolling instead of splitting and negating.
        signed_sin = torch.cat((-freqs, freqs), dim=-1).sin() * self.attention_scaling
        # Computed in fp32, returned in the dtype q and k come in (autocast's under autocast, where the hidden states
        # stay fp32): fp32 tables would upcast q and k in every layer, and attention would cast them back.
        dtype = compute_dtype(x)
        return cos.to(dtype=dtype), signed_sin.to(dtype=dtype)


def apply_rotary_pos_emb(q, k, cos, signed_sin):
    """RoPE in Llama's rotate-half layout: x * cos + rotate_half(x) * sin, where rotate_half(x) = cat(-x2, x1) is
    written as roll(x, half) * signed_sin: four ops per tensor instead of six, bitwise the same result.

    q: (batch, heads, seq, head_dim), k: (batch, kv_heads, seq, head_dim), cos/signed_sin: (batch, seq, head_dim)."""
    cos, signed_sin = cos.unsqueeze(1), signed_sin.unsqueeze(1)
    half = q.shape[-1] // 2
    return q * cos + q.roll(half, dims=-1) * signed_sin, k * cos + k.roll(half, dims=-1) * signed_sin


class TinyllmMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: TinyllmConfig, intermediate_size: int | None = None):
        super().__init__()
        intermediate_size = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class TinyllmRouter(nn.Module):
    """Scores every expert for every token and picks the top-k.

    With `router_bias_update_rate > 0` a per-expert bias (DeepSeek-V3's auxiliary-loss-free balancing) is added to the
    scores when *choosing* experts but not when weighting them, so it steers load without distorting outputs.
    """

    def __init__(self, config: TinyllmConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.scoring = config.router_scoring
        self.norm_topk_prob = config.norm_topk_prob
        self.bias_update_rate = config.router_bias_update_rate
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))
        if self.bias_update_rate > 0:
            # Persistent: the bias is part of the trained model. `pending_load` counts tokens until the next update.
            self.register_buffer("expert_bias", torch.zeros(config.num_experts))
            self.register_buffer("pending_load", torch.zeros(config.num_experts), persistent=False)
        else:
            self.expert_bias = None

    def score(self, router_logits: torch.Tensor) -> torch.Tensor:
        """(tokens, experts) logits -> fp32 scores: a softmax over experts or an independent sigmoid per expert."""
        if self.scoring == "sigmoid":
            return torch.sigmoid(router_logits.float())
        return nn.functional.softmax(router_logits, dim=-1, dtype=torch.float32)

    def select(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 scores (tokens, experts) -> routing weights and expert ids, both (tokens, top_k)."""
        if self.expert_bias is None:
            top_weights, top_index = torch.topk(scores, self.top_k, dim=-1)
        else:
            top_index = torch.topk(scores + self.expert_bias, self.top_k, dim=-1).indices
            top_weights = scores.gather(-1, top_index)
        if self.norm_topk_prob:
            top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        return top_weights, top_index

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens, hidden) -> router logits (tokens, experts), routing weights and expert ids (tokens, top_k)."""
        router_logits = nn.functional.linear(hidden_states, self.weight)
        top_weights, top_index = self.select(self.score(router_logits))
        return router_logits, top_weights.to(hidden_states.dtype), top_index

    @torch.no_grad()
    def update_bias(self) -> None:
        """One auxiliary-loss-free balancing step: move the bias of each expert by `bias_update_rate` up if it received
        fewer tokens than the mean since the last update, down if more; then start counting afresh."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.pending_load)  # every rank must keep the same bias, so balance the global load
        self.expert_bias += self.bias_update_rate * torch.sign(self.pending_load.mean() - self.pending_load)
        self.pending_load.zero_()


@use_experts_implementation
class TinyllmExperts(nn.Module):
    """The routed experts of one layer as stacked SwiGLU weights, laid out as transformers' Qwen2-MoE experts:
    gate_up_proj (experts, 2 * moe_intermediate, hidden) holds [gate; up], down_proj (experts, hidden, moe_intermediate).

    `forward` is the default "eager" dispatch; `config._experts_implementation` (set with `experts_implementation=` in
    `from_pretrained` or `model.set_experts_implementation`) swaps in transformers' "grouped_mm" or "batched_mm".
    """

    def __init__(self, config: TinyllmConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(config.num_experts, 2 * config.moe_intermediate_size, config.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(config.num_experts, config.hidden_size, config.moe_intermediate_size))
        self.act_fn = nn.functional.silu

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states (tokens, hidden), top_k_index / top_k_weights (tokens, top_k) -> (tokens, hidden).

        Sorting the (token, expert) pairs by expert makes each expert's tokens one contiguous slice, so every expert
        runs as a single matmul; the only Python loop is over experts.
        """
        top_k = top_k_index.shape[-1]
        expert_of_pair = top_k_index.reshape(-1)  # (tokens * top_k,)
        order = torch.argsort(expert_of_pair, stable=True)
        token_of_pair = order // top_k  # source token of each sorted pair
        tokens_per_expert = torch.bincount(expert_of_pair, minlength=self.num_experts).tolist()  # one host sync
        grouped = hidden_states[token_of_pair]  # (pairs, hidden), grouped by expert
        outputs, start = [], 0
        for expert, count in enumerate(tokens_per_expert):
            if count == 0:
                continue
            gate, up = nn.functional.linear(grouped[start:start + count], self.gate_up_proj[expert]).chunk(2, dim=-1)
            outputs.append(nn.functional.linear(self.act_fn(gate) * up, self.down_proj[expert]))
            start += count
        weighted = torch.cat(outputs) * top_k_weights.reshape(-1)[order, None]
        return torch.zeros_like(hidden_states).index_add_(0, token_of_pair, weighted.to(hidden_states.dtype))


class TinyllmSparseMoeBlock(nn.Module):
    """Mixture-of-Experts MLP: each token goes through its top-k routed experts (weighted by the router) plus the
    shared expert, if any. Parameter names match transformers' Qwen2-MoE block (`gate`, `experts`, `shared_expert`)."""

    def __init__(self, config: TinyllmConfig):
        super().__init__()
        self.gate = TinyllmRouter(config)
        self.experts = TinyllmExperts(config)
        self.shared_expert = (
            TinyllmMLP(config, config.shared_expert_intermediate_size) if config.num_shared_experts else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, shape[-1])  # (batch * seq, hidden)
        _, top_k_weights, top_k_index = self.gate(hidden_states)
        output = self.experts(hidden_states, top_k_index, top_k_weights)
        if self.shared_expert is not None:
            output = output + self.shared_expert(hidden_states)
        return output.reshape(shape)


def router_balance_losses(router: TinyllmRouter, router_logits: torch.Tensor, token_mask: torch.Tensor | None):
    """Load statistics of one MoE layer from its router logits (tokens, experts); `token_mask` (tokens,) drops padding.

    Returns the Switch-Transformer load-balancing loss `sum_i f_i * P_i` (f_i: share of routed slots sent to expert
    i, times num_experts; P_i: mean normalised score of expert i; 1.0 when perfectly balanced), the router z-loss
    (mean squared log-sum-exp of the logits) and the number of tokens each expert received (experts,).
    """
    scores = router.score(router_logits)  # (tokens, experts), fp32
    _, top_index = router.select(scores)
    num_experts = scores.shape[-1]
    weight = torch.ones(scores.shape[0], device=scores.device) if token_mask is None else token_mask.float()
    num_tokens = weight.sum().clamp(min=1)
    slots = nn.functional.one_hot(top_index, num_experts).sum(1).float()  # (tokens, experts) selections
    tokens_per_expert = (slots * weight[:, None]).sum(0)
    load_fraction = tokens_per_expert * num_experts / (num_tokens * router.top_k)
    probs = scores / scores.sum(-1, keepdim=True)  # sigmoid scores normalised per token; softmax is unchanged
    mean_prob = (probs * weight[:, None]).sum(0) / num_tokens
    aux_loss = (load_fraction * mean_prob).sum()
    z_loss = (torch.logsumexp(router_logits.float(), dim=-1).square() * weight).sum() / num_tokens
    return aux_loss, z_loss, tokens_per_expert


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, head_dim) -> (batch, kv_heads * n_rep, seq, head_dim)."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, seq_len, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, seq_len, head_dim)
    return hidden_states.reshape(batch, kv_heads * n_rep, seq_len, head_dim)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention; `attention_mask` is an additive float mask (batch, 1, q_len, kv_len) or None."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def attention_in_fp32(query: torch.Tensor) -> bool:
    """Under CPU autocast, attention runs in fp32 (the projections around it stay in bf16): torch's CPU attention
    kernels are slower in bf16 than in fp32 at small head sizes, and fp32 is the more exact (docs/benchmarks.md)."""
    return query.device.type == "cpu" and torch.is_autocast_enabled("cpu")


class TinyllmAttention(nn.Module):
    """Causal self-attention with RoPE and grouped-query heads, dispatched through transformers' attention interface
    (`config._attn_implementation`: "sdpa" by default, "eager", or "flash_attention_2" where installed)."""

    def __init__(self, config: TinyllmConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        qkv_bias = config.attention_bias or config.qkv_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache: Cache | None = None, **kwargs):
        input_shape = hidden_states.shape[:-1]  # (batch, seq)
        hidden_shape = (*input_shape, -1, self.head_dim)
        # (batch, seq, heads * head_dim) -> (batch, heads, seq, head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        fp32_attention = attention_in_fp32(query)
        if fp32_attention:
            query, key, value = query.float(), key.float(), value.float()
        with torch.autocast("cpu", enabled=False) if fp32_attention else contextlib.nullcontext():
            attn_output, attn_weights = attention_interface(
                self,
                query,
                key,
                value,
                attention_mask,
                dropout=self.config.attention_dropout if self.training else 0.0,
                scaling=self.scaling,
                **kwargs,
            )
        # (batch, seq, heads, head_dim) -> (batch, seq, hidden)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class TinyllmDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: TinyllmConfig, layer_idx: int):
        super().__init__()
        self.self_attn = TinyllmAttention(config, layer_idx)
        self.mlp = TinyllmSparseMoeBlock(config) if config.is_moe_layer(layer_idx) else TinyllmMLP(config)
        self.input_layernorm = TinyllmRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = TinyllmRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, **kwargs):
        attn_output, _ = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache=cache, **kwargs
        )
        hidden_states = hidden_states + attn_output
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class TinyllmPreTrainedModel(PreTrainedModel):
    config_class = TinyllmConfig
    config: TinyllmConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TinyllmDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "hidden_states": TinyllmDecoderLayer,
        "attentions": TinyllmAttention,
        "router_logits": OutputRecorder(TinyllmRouter, index=0),
    }

    def save_pretrained(self, save_directory, *args, **kwargs):
        # transformers writes `auto_map` only for the saved class; list every head so AutoModel,
        # AutoModelForCausalLM and AutoModelForSequenceClassification all load the folder as remote code.
        self.config.auto_map = {
            **(getattr(self.config, "auto_map", None) or {}),
            "AutoConfig": "configuration_tinyllm.TinyllmConfig",
            "AutoModel": "modeling_tinyllm.TinyllmModel",
            "AutoModelForCausalLM": "modeling_tinyllm.TinyllmForCausalLM",
            "AutoModelForSequenceClassification": "modeling_tinyllm.TinyllmForSequenceClassification",
        }
        return super().save_pretrained(save_directory, *args, **kwargs)

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        # transformers defaults to "grouped_mm", but torch's CPU grouped matmul has no backward (torch 2.13): default to
        # the sorted per-expert loop and let GPU runs ask for `experts_implementation="grouped_mm"`.
        return super().get_correct_experts_implementation(requested_experts or "eager")

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, TinyllmExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, TinyllmRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.expert_bias is not None:
                init.zeros_(module.expert_bias)
                init.zeros_(module.pending_load)
        elif isinstance(module, TinyllmRotaryEmbedding):
            inv_freq, _ = (
                module.compute_default_rope_parameters(module.config)
                if module.rope_type == "default"
                else ROPE_INIT_FUNCTIONS[module.rope_type](module.config)
            )
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.original_inv_freq, inv_freq)


class TinyllmModel(TinyllmPreTrainedModel):
    """The decoder stack without a head: embeddings -> layers -> final norm."""

    def __init__(self, config: TinyllmConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([TinyllmDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = TinyllmRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = TinyllmRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | MoeModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if cache is None:
            # transformers < 5 called it past_key_values; accept it so older callers don't silently lose the cache.
            cache = kwargs.pop("past_key_values", None)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (batch, seq, hidden)
        if use_cache is None:
            # A cache is only useful when decoding; building one during training costs memory for nothing.
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        # Positions the caller gives may describe several sequences packed in a row (padding-free batches); made
        # here they are one sequence, and the mask need not look (that check reads the device: one sync per step).
        packed_positions = position_ids
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen).unsqueeze(0)

        # None (SDPA's is_causal fast path) when there is no padding and nothing cached, else an explicit mask that
        # keeps every position able to attend to itself.
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=packed_positions,
        )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                position_embeddings,
                attention_mask=causal_mask,
                cache=cache,
                position_ids=position_ids,
                **kwargs,
            )
        # The MoE output has a `router_logits` field, which `capture_outputs` fills when `output_router_logits=True`.
        output_class = MoeModelOutputWithPast if self.config.num_experts else BaseModelOutputWithPast
        return output_class(last_hidden_state=self.norm(hidden_states), cache=cache)


@dataclass
class TinyllmMoeCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """`MoeCausalLMOutputWithPast` plus the router z-loss and the tokens each expert received.

    aux_loss / z_loss: load-balancing and z-loss averaged over MoE layers, before their coefficients (the `loss` field
    already includes `router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss` when labels are given).
    expert_counts: (moe_layers, num_experts) tokens routed to each expert in this batch, padding excluded.
    """

    z_loss: torch.FloatTensor | None = None
    expert_counts: torch.FloatTensor | None = None


class TinyllmForCausalLM(TinyllmPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TinyllmConfig):
        super().__init__(config)
        self.model = TinyllmModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._moe_log = None  # running sums since the last `pop_moe_stats()`, filled by training forwards
        self.post_init()

    def routers(self) -> list[TinyllmRouter]:
        """The router of every MoE layer, in layer order (empty for a dense model)."""
        return [layer.mlp.gate for layer in self.model.layers if isinstance(layer.mlp, TinyllmSparseMoeBlock)]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_router_logits: bool | None = None,
        skip_logits: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast | TinyllmMoeCausalLMOutputWithPast:
        """`labels` are the input ids (shifted inside the loss); -100 marks positions without loss. Extra keyword
        arguments reach the loss, so the Trainer's `num_items_in_batch` normalises gradient accumulation correctly.

        `skip_logits=True` (with labels) computes the loss from the hidden states chunk by chunk (`LinearCrossEntropy`)
        and returns `logits=None`: the same loss and gradients without the (tokens, vocab) logits in memory. The
        pretraining Trainer asks for it in every training step (docs/training.md).

        Mixture of Experts: in training (or with `output_router_logits=True`) the router logits are collected and the
        balancing losses computed; `loss` is then the language-model loss plus the weighted balancing losses."""
        if self.config.num_experts:
            if output_router_logits is None:
                output_router_logits = self.training or self.config.output_router_logits
            if self.training and self.config.router_bias_update_rate > 0:
                # Apply the load counted by earlier forwards now, not at the end of this one: gradient checkpointing
                # re-runs the routers during backward and must see the bias this forward used.
                for router in self.routers():
                    router.update_bias()
            kwargs["output_router_logits"] = output_router_logits
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        # Only the positions whose logits are needed (the last one while generating) go through the vocab projection.
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:, :]
        else:
            hidden_states = hidden_states[:, logits_to_keep, :]
        loss = logits = None
        if skip_logits and labels is not None:
            loss = causal_lm_loss(hidden_states, labels, lm_head_weight=self.lm_head.weight, **kwargs)
        else:
            logits = self.lm_head(hidden_states)  # (batch, kept, vocab)
            if labels is not None:
                loss = logits_loss(self.loss_function, logits, labels, self.config.vocab_size, **kwargs)
        if self.config.num_experts:
            return self._moe_output(loss, logits, outputs, attention_mask)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def _moe_output(self, loss, logits, outputs, attention_mask) -> TinyllmMoeCausalLMOutputWithPast:
        aux_loss = z_loss = expert_counts = None
        router_logits = outputs.router_logits
        if router_logits:
            # Padding is excluded when the mask covers exactly the routed tokens (not while decoding with a cache).
            token_mask = None
            if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.numel() == router_logits[0].shape[0]:
                token_mask = attention_mask.reshape(-1).to(router_logits[0].device).bool()
            per_layer = [router_balance_losses(r, lg, token_mask) for r, lg in zip(self.routers(), router_logits)]
            aux_loss = torch.stack([layer[0] for layer in per_layer]).mean()
            z_loss = torch.stack([layer[1] for layer in per_layer]).mean()
            expert_counts = torch.stack([layer[2] for layer in per_layer])  # (moe_layers, experts)
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
                loss = loss + self.config.router_z_loss_coef * z_loss.to(loss.device)
            if self.training:
                self._accumulate_moe_stats(aux_loss, z_loss, expert_counts)
        return TinyllmMoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            expert_counts=expert_counts,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=router_logits,
        )

    @torch.no_grad()
    def _accumulate_moe_stats(self, aux_loss, z_loss, expert_counts) -> None:
        for router, counts in zip(self.routers(), expert_counts):
            if router.expert_bias is not None:
                router.pending_load += counts
        # Detached device tensors: no host sync per step; `pop_moe_stats` syncs once per logging interval.
        if self._moe_log is None:
            self._moe_log = {"aux_loss": 0.0, "z_loss": 0.0, "forwards": 0, "expert_counts": 0.0}
        self._moe_log["aux_loss"] += aux_loss.detach()
        self._moe_log["z_loss"] += z_loss.detach()
        self._moe_log["expert_counts"] += expert_counts.detach()
        self._moe_log["forwards"] += 1

    def pop_moe_stats(self) -> dict | None:
        """Mean aux/z loss and summed tokens per expert (moe_layers x experts) over the training forwards since the
        last call, then reset; None if there were none. Trainer callbacks call this to log expert load."""
        log, self._moe_log = self._moe_log, None
        if log is None:
            return None
        return {
            "aux_loss": float(log["aux_loss"]) / log["forwards"],
            "z_loss": float(log["z_loss"]) / log["forwards"],
            "expert_counts": log["expert_counts"].tolist(),
        }


# For classes registered with `register_for_auto_class`, transformers' generate() calls `inspect.signature(forward)` at
# every decoding step (a check for the removed `cache_position` argument), ~24 us per token on a CPU, which Llama does
# not pay; with the signature precomputed the check costs ~7 us.
TinyllmForCausalLM.forward.__signature__ = inspect.signature(TinyllmForCausalLM.forward)


class TinyllmForSequenceClassification(TinyllmPreTrainedModel):
    """A scalar (or `num_labels`) head on the last non-padding token; reward models use `num_labels=1`.

    It builds `TinyllmModel` itself rather than through `AutoModel.from_config`, so it also works as remote code.
    """

    def __init__(self, config: TinyllmConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = TinyllmModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,  # accepted for trainers that pass it; scoring never needs a cache
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)  # (batch, seq, num_labels)
        batch_size, seq_len = logits.shape[:2]
        positions = torch.arange(seq_len, device=logits.device)
        # The rightmost real token of each row, whichever side the padding is on.
        if attention_mask is not None:
            last_token = (positions * attention_mask.to(logits.device, torch.long)).argmax(-1)
        elif input_ids is not None and self.config.pad_token_id is not None:
            last_token = (positions * (input_ids != self.config.pad_token_id).to(logits.device, torch.long)).argmax(-1)
        elif batch_size == 1:
            last_token = torch.full((1,), seq_len - 1, device=logits.device)
        else:
            raise ValueError("batches of more than one sequence need an attention_mask or config.pad_token_id")
        pooled_logits = logits[torch.arange(batch_size, device=logits.device), last_token]  # (batch, num_labels)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled_logits, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss, logits=pooled_logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


__all__ = [
    "TinyllmPreTrainedModel",
    "TinyllmModel",
    "TinyllmForCausalLM",
    "TinyllmForSequenceClassification",
    "TinyllmMoeCausalLMOutputWithPast",
]
