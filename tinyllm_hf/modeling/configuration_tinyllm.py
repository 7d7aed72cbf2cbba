"""Tinyllm model configuration.

This file ships as Hub remote code next to `modeling_tinyllm.py`: it imports only transformers.
"""

from transformers import PretrainedConfig

# Reference sizes (hidden / intermediate / layers / heads / context). The vocabulary comes from the tokenizer, so the
# parameter count of a preset depends on it; README.md lists the counts at the default vocabulary.
PRESETS = {
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=256),
    "16m": dict(hidden_size=120, intermediate_size=384, num_hidden_layers=6, num_attention_heads=6, max_position_embeddings=512),
    "42m": dict(hidden_size=288, intermediate_size=768, num_hidden_layers=6, num_attention_heads=6, max_position_embeddings=512),
    "92m": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, max_position_embeddings=1024),
    "210m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=12, max_position_embeddings=1024),
    "440m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16, max_position_embeddings=1024),
    "1.5b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16, max_position_embeddings=1024),
    # Mixture-of-Experts twins of `tiny` and `92m` with about the same ACTIVE parameters per token: top-2 routed experts
    # plus one shared expert, each a third of the dense MLP width (3 * 120 ~ 352, 3 * 464 ~ 1408).
    "moe-tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=256,
                     num_experts=8, num_experts_per_tok=2, num_shared_experts=1, moe_intermediate_size=120),
    "moe-92m": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, max_position_embeddings=1024,
                    num_experts=16, num_experts_per_tok=2, num_shared_experts=1, moe_intermediate_size=464),
}
ROUTER_SCORINGS = ("softmax", "sigmoid")
# RoPE types this model builds: "default" and the scaled types of transformers' ROPE_INIT_FUNCTIONS that Llama uses
# ("llama3" and "longrope" arrive with converted Llama checkpoints). "dynamic" (NTK) keeps max_position_embeddings as
# the trained context and rescales beyond it; "yarn" and "linear" set max_position_embeddings to the extended one.
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
FACTOR_ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")  # scaled by one `factor` (longrope: per dimension)


class TinyllmConfig(PretrainedConfig):
    r"""Configuration of a Tinyllm decoder: pre-norm RMSNorm, RoPE, (grouped-query) causal attention, SwiGLU MLP.

    The parameter names and semantics follow `LlamaConfig`, so every dense Tinyllm model is exactly a Llama model
    (see `tinyllm_hf.modeling.convert`), except with `qkv_bias=True`, which Llama cannot express.

    Args:
        vocab_size: number of token ids (take it from the tokenizer: `len(tokenizer)`).
        hidden_size / intermediate_size: widths of the residual stream and of the SwiGLU MLP.
        num_hidden_layers / num_attention_heads: depth and query heads.
        head_dim: width of one head; `None` means `hidden_size // num_attention_heads` (which must then divide evenly).
        num_key_value_heads: key/value heads; `None` means multi-head attention, fewer heads give grouped-query attention.
        max_position_embeddings: context length the model is trained for.
        rms_norm_eps: epsilon of every RMSNorm.
        rope_parameters: RoPE settings as transformers defines them, e.g. `{"rope_type": "default", "rope_theta": 1e4}`
            or a scaled type (ROPE_TYPES) such as `{"rope_type": "yarn", "factor": 4.0,
            "original_max_position_embeddings": 256, "rope_theta": 1e4}` with `max_position_embeddings=1024`, or
            `{"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4}` (dynamic NTK: max_position_embeddings stays
            the trained context). `rope_theta=` is accepted as a shortcut. `tinyllm_hf.rope_scaling` builds
            these from a `yarn:4`-style spec.
        tie_word_embeddings: share the input embedding with the output projection (saves `vocab * hidden` weights).
        attention_bias: bias on q/k/v/o projections (Llama's flag). qkv_bias: bias on q/k/v only (Qwen2 style).
        initializer_range: standard deviation of the normal weight initialisation.

    Mixture of Experts (all ignored while `num_experts=0`, the dense default):
        num_experts: routed experts per MoE layer; 0 builds the dense model.
        num_experts_per_tok: experts each token is routed to (top-k).
        num_shared_experts: experts every token always goes through; they are stored merged as one SwiGLU MLP
            (`mlp.shared_expert`) of width `shared_expert_intermediate_size`.
        moe_intermediate_size: width of each routed expert (`None`: `intermediate_size`).
        shared_expert_intermediate_size: width of the merged shared expert (`None`: num_shared_experts *
            moe_intermediate_size, which is exactly that many experts summed).
        router_scoring: "softmax" over all experts (Mixtral, Qwen2-MoE) or independent "sigmoid" scores (DeepSeek-V3).
        norm_topk_prob: rescale the k selected scores to sum to 1 (off by default, as in Qwen2-MoE: llama.cpp's
            qwen2moe graph never rescales, so GGUF export needs it off).
        first_k_dense_replace / moe_layer_freq: layer `i` is MoE when `i >= first_k_dense_replace` and
            `i % moe_layer_freq == 0` (DeepSeek's definition); the other layers keep the dense MLP of `intermediate_size`.
        router_aux_loss_coef: weight of the Switch-Transformer load-balancing loss added to the training loss.
        router_z_loss_coef: weight of the router z-loss (mean squared log-sum-exp of router logits, ST-MoE).
        router_bias_update_rate: > 0 enables DeepSeek-V3's auxiliary-loss-free balancing: a per-expert bias, used only
            to choose the top-k experts, moves by this rate towards under-loaded experts after every training forward.
        output_router_logits: return router logits (and compute the auxiliary losses) also outside training.
    """

    model_type = "tinyllm"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 8192
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 256
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = True
    rope_parameters: dict | None = None
    attention_bias: bool = False
    qkv_bias: bool = False
    attention_dropout: float = 0.0
    num_experts: int = 0
    num_experts_per_tok: int = 2
    num_shared_experts: int = 0
    moe_intermediate_size: int | None = None
    shared_expert_intermediate_size: int | None = None
    router_scoring: str = "softmax"
    norm_topk_prob: bool = False
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    router_bias_update_rate: float = 0.0
    output_router_logits: bool = False

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads and self.hidden_size % self.num_attention_heads == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_experts:
            if self.moe_intermediate_size is None:
                self.moe_intermediate_size = self.intermediate_size
            if self.shared_expert_intermediate_size is None and self.num_shared_experts:
                self.shared_expert_intermediate_size = self.num_shared_experts * self.moe_intermediate_size
        else:
            # A dense model has no router: TRL trainers read a non-zero coefficient as "this is an MoE model".
            self.router_aux_loss_coef = 0.0
        if self.rope_parameters is None and "rope_scaling" not in kwargs:
            self.rope_parameters = {"rope_type": "default", "rope_theta": kwargs.pop("rope_theta", 10000.0)}
        super().__post_init__(**kwargs)
        self.validate_tinyllm()

    def validate_tinyllm(self):
        """Reject combinations the architecture cannot build, naming the fields involved."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TinyllmConfig.{name} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            raise ValueError(
                f"TinyllmConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"TinyllmConfig.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(
                f"TinyllmConfig.head_dim must be a positive even integer for RoPE, got {self.head_dim!r}"
            )
        self.validate_rope_parameters()
        if self.hidden_act != "silu":
            raise ValueError(f"TinyllmConfig.hidden_act must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"TinyllmConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if not isinstance(self.num_experts, int) or self.num_experts < 0:
            raise ValueError(f"TinyllmConfig.num_experts must be 0 (dense) or a positive integer, got {self.num_experts!r}")
        if self.num_experts:
            self.validate_moe()

    def validate_rope_parameters(self):
        """Reject a RoPE type this model cannot build or a scaling factor that does not extend the context
        (transformers only logs a warning for both)."""
        rope = self.rope_parameters or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"TinyllmConfig.rope_parameters: unknown rope_type {rope_type!r}; choose one of "
                             f"{', '.join(ROPE_TYPES)}")
        if rope_type not in FACTOR_ROPE_TYPES:
            return
        factor = rope.get("factor")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
            raise ValueError(f"TinyllmConfig.rope_parameters: {rope_type} RoPE needs a factor > 1 (how many times the "
                             f"trained context to extend to), got {factor!r}")
        if rope_type == "yarn":
            original = rope.get("original_max_position_embeddings")
            if not isinstance(original, int) or isinstance(original, bool) or original <= 0:
                raise ValueError("TinyllmConfig.rope_parameters: yarn RoPE needs original_max_position_embeddings, "
                                 f"the context the model was pretrained with, as a positive integer; got {original!r}")

    def validate_moe(self):
        """Reject Mixture-of-Experts settings that cannot be built or cannot train, naming the fields involved."""
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"TinyllmConfig.num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and "
                f"num_experts ({self.num_experts})"
            )
        if self.norm_topk_prob and self.num_experts_per_tok == 1:
            raise ValueError(
                "TinyllmConfig.norm_topk_prob=True with num_experts_per_tok=1 makes every routing weight 1, so the "
                "router never receives a gradient; set norm_topk_prob=False or route to more experts"
            )
        if self.router_scoring not in ROUTER_SCORINGS:
            raise ValueError(f"TinyllmConfig.router_scoring must be one of {ROUTER_SCORINGS}, got {self.router_scoring!r}")
        for name in ("moe_intermediate_size", "moe_layer_freq"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TinyllmConfig.{name} must be a positive integer, got {value!r}")
        # Expert weights are stacked 3D tensors; torch's grouped matmul needs 16-byte aligned rows even in bf16.
        for name in ("hidden_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
            value = getattr(self, name)
            if value is not None and value % 8:
                raise ValueError(f"TinyllmConfig.{name} must be a multiple of 8 in a Mixture-of-Experts model, got {value}")
        if self.num_shared_experts < 0:
            raise ValueError(f"TinyllmConfig.num_shared_experts must be >= 0, got {self.num_shared_experts!r}")
        if not self.num_shared_experts and self.shared_expert_intermediate_size:
            raise ValueError(
                f"TinyllmConfig.shared_expert_intermediate_size ({self.shared_expert_intermediate_size}) is set but "
                "num_shared_experts is 0"
            )
        if self.first_k_dense_replace < 0 or not any(map(self.is_moe_layer, range(self.num_hidden_layers))):
            raise ValueError(
                f"TinyllmConfig.first_k_dense_replace ({self.first_k_dense_replace}) and moe_layer_freq "
                f"({self.moe_layer_freq}) must leave at least one of the {self.num_hidden_layers} num_hidden_layers "
                "as a Mixture-of-Experts layer"
            )
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_bias_update_rate"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"TinyllmConfig.{name} must be >= 0, got {getattr(self, name)!r}")

    def is_moe_layer(self, layer_idx: int) -> bool:
        return bool(self.num_experts) and layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TinyllmConfig":
        """A named preset (`tiny`, `16m`, ..., `1.5b`, `moe-tiny`, `moe-92m`) with any field overridden, e.g. `vocab_size=len(tokenizer)`."""
        if name not in PRESETS:
            raise ValueError(f"unknown Tinyllm preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


__all__ = ["TinyllmConfig", "PRESETS", "ROPE_TYPES"]
