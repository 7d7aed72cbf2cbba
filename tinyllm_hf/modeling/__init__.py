"""Tinyllm model classes and their registration with transformers' Auto classes, done when this package is imported
(`import tinyllm_hf` arranges that for when transformers' Auto classes load)."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from tinyllm_hf.modeling.configuration_tinyllm import PRESETS, TinyllmConfig
from tinyllm_hf.modeling.modeling_tinyllm import (
    TinyllmForCausalLM,
    TinyllmForSequenceClassification,
    TinyllmModel,
    TinyllmPreTrainedModel,
)

# Linear layers LoRA adapts by default (PEFT has no built-in list for model_type "tinyllm").
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

AUTO_CLASSES = (
    (AutoModel, TinyllmModel),
    (AutoModelForCausalLM, TinyllmForCausalLM),
    (AutoModelForSequenceClassification, TinyllmForSequenceClassification),
)


def register_auto_classes() -> None:
    """Make `Auto*.from_pretrained` resolve model_type "tinyllm" to our classes (idempotent), and mark the classes so
    `save_pretrained` copies the modeling files next to the weights and writes `auto_map` for trust_remote_code."""
    AutoConfig.register("tinyllm", TinyllmConfig, exist_ok=True)
    TinyllmConfig.register_for_auto_class()
    for auto_class, model_class in AUTO_CLASSES:
        auto_class.register(TinyllmConfig, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_class.__name__)


register_auto_classes()


__all__ = [
    "LORA_TARGET_MODULES",
    "PRESETS",
    "TinyllmConfig",
    "TinyllmPreTrainedModel",
    "TinyllmModel",
    "TinyllmForCausalLM",
    "TinyllmForSequenceClassification",
    "register_auto_classes",
]
