"""tinyllm-hf: from raw Chinese text to a released small Chinese chat model on the Hugging Face stack.

Importing the package registers the Tinyllm config and models with transformers' Auto classes.
"""

from tinyllm_hf.modeling import (
    TinyllmConfig,
    TinyllmForCausalLM,
    TinyllmForSequenceClassification,
    TinyllmModel,
    register_auto_classes,
)

register_auto_classes()

__version__ = "0.1.0"
__all__ = ["TinyllmConfig", "TinyllmModel", "TinyllmForCausalLM", "TinyllmForSequenceClassification", "__version__"]
