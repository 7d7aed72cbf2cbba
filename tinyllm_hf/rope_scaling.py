"""Longer context by RoPE scaling, chosen when a model is loaded or trained: `TYPE:FACTOR`, e.g. `yarn:4`.

    tinyllm eval --model runs/qs/pretrain --tasks ppl --rope-scaling yarn:4        # inference only, no retraining
    tinyllm pretrain --config recipes/pretrain/long-context.yaml                   # rope_scaling: yarn:4, then train

The factor is relative to the context the model was first pretrained with: `original_max_position_embeddings` when
its config already has one (a model extended before), else `max_position_embeddings`. Types:

- `yarn`: YaRN (Peng et al. 2023): low RoPE frequencies interpolated by the factor, high ones kept, attention
  temperature sqrt-log corrected; `max_position_embeddings` becomes original * factor. The type to train with.
- `dynamic`: dynamic NTK: RoPE's base grows with the sequence length once it passes the trained context, so a
  sequence within it runs exactly as trained; `max_position_embeddings` stays the trained context (transformers
  reads it as the point where scaling starts) and `model_context` reports original * factor.
- `linear`: position interpolation (positions divided by the factor); `max_position_embeddings` = original * factor.

This module only edits configs (any transformers config with `rope_parameters`); the Tinyllm model builds the scaled
RoPE from them with transformers' `ROPE_INIT_FUNCTIONS` and `dynamic_rope_update`, as Llama does.
"""

import copy

from tinyllm_hf.errors import UsageError

SCALING_TYPES = ("yarn", "dynamic", "linear")
SPEC_HELP = ("RoPE scaling TYPE:FACTOR to run the model beyond the context it was trained with, e.g. yarn:4 (YaRN, "
             f"max_position_embeddings x4), dynamic:4 (dynamic NTK) or linear:2; types: {', '.join(SCALING_TYPES)}")


def parse_rope_scaling(spec: str) -> tuple[str, float]:
    """'yarn:4' -> ('yarn', 4.0). An unknown type or a factor that is not a number > 1 is a one-line UsageError."""
    rope_type, sep, factor_text = str(spec).strip().partition(":")
    rope_type = rope_type.strip().lower()
    if rope_type not in SCALING_TYPES or not sep:
        raise UsageError(f"rope scaling {spec!r}: expected TYPE:FACTOR with TYPE one of {', '.join(SCALING_TYPES)}, "
                         "e.g. yarn:4")
    try:
        factor = float(factor_text)
    except ValueError:
        factor = float("nan")
    if not factor > 1:  # also rejects NaN
        raise UsageError(f"rope scaling {spec!r}: the factor must be a number > 1 (how many times the trained context "
                         f"to run at), got {factor_text.strip()!r}")
    return rope_type, factor


def trained_context(config) -> int:
    """The context the model was first pretrained with (before any RoPE scaling)."""
    rope = getattr(config, "rope_parameters", None) or {}
    return int(rope.get("original_max_position_embeddings") or config.max_position_embeddings)


def model_context(config) -> int:
    """The longest sequence the config is meant to run: max_position_embeddings, times the factor for dynamic NTK."""
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") == "dynamic":
        return int(config.max_position_embeddings * rope["factor"])
    return config.max_position_embeddings


def scaled_rope_fields(config, spec: str) -> dict:
    """The config fields (`rope_parameters`, `max_position_embeddings`) that give `config` the RoPE scaling `spec`."""
    rope_type, factor = parse_rope_scaling(spec)
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        raise UsageError(f"rope scaling {spec!r}: the model's config ({type(config).__name__}) has no transformers-5 "
                         "rope_parameters with a rope_theta, so its RoPE cannot be rescaled here")
    original = trained_context(config)
    parameters = {"rope_type": rope_type, "factor": factor, "rope_theta": rope["rope_theta"]}
    if "partial_rotary_factor" in rope:
        parameters["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if rope_type == "dynamic":
        return {"rope_parameters": parameters, "max_position_embeddings": original}
    if rope_type == "yarn":
        parameters["original_max_position_embeddings"] = original
    return {"rope_parameters": parameters, "max_position_embeddings": int(round(original * factor))}


def with_rope_scaling(config, spec: str):
    """A copy of `config` with the RoPE scaling `spec` (the original is left as it is)."""
    fields = scaled_rope_fields(config, spec)
    scaled = copy.deepcopy(config)
    for name, value in fields.items():
        setattr(scaled, name, value)
    validate = getattr(scaled, "validate_tinyllm", None)
    if validate is not None:
        try:
            validate()
        except ValueError as err:  # the config's own check; raised before any weights load
            raise UsageError(f"rope scaling {spec!r}: {err}") from None
    return scaled
