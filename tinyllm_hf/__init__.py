"""tinyllm-hf: from raw Chinese text to a released small Chinese chat model on the Hugging Face stack."""

__version__ = "0.1.0"
