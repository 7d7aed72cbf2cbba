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
}


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
            or a scaled type such as `{"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}`. `rope_theta=` is
            accepted as a shortcut.
        tie_word_embeddings: share the input embedding with the output projection (saves `vocab * hidden` weights).
        attention_bias: bias on q/k/v/o projections (Llama's flag). qkv_bias: bias on q/k/v only (Qwen2 style).
        initializer_range: standard deviation of the normal weight initialisation.
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

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads and self.hidden_size % self.num_attention_heads == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
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
        if self.hidden_act != "silu":
            raise ValueError(f"TinyllmConfig.hidden_act must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"TinyllmConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TinyllmConfig":
        """A named preset (`tiny`, `16m`, ..., `1.5b`) with any field overridden, e.g. `vocab_size=len(tokenizer)`."""
        if name not in PRESETS:
            raise ValueError(f"unknown Tinyllm preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


__all__ = ["TinyllmConfig", "PRESETS"]
