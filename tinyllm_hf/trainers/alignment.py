"""Pieces the alignment stages share: preference data arguments, policy/tokenizer loading, LoRA configuration."""

from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, get_peft_config

import tinyllm_hf  # noqa: F401  (registers the tinyllm model type with the Auto classes)
from tinyllm_hf.data.preference import build_default_preferences, load_preference_dataset
from tinyllm_hf.data.sft import MALFORMED_POLICIES, parse_task_sizes
from tinyllm_hf.modeling import LORA_TARGET_MODULES


def trl_defaults(output_dir: str, **overrides) -> dict:
    """Defaults for TRL configs: TRL turns bf16 on by default, which fails on CPUs and pre-Ampere GPUs."""
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return {"output_dir": output_dir, "report_to": ["tensorboard"], "logging_steps": 10, "bf16": bf16, **overrides}


@dataclass
class PreferenceDataArguments:
    dataset_name: str = field(
        default="default",
        metadata={"help": "'default' (the embedded preference set), a local .jsonl/.json file or folder, or a Hub dataset"},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "configuration of a Hub dataset"})
    dataset_split: str = field(default="train", metadata={"help": "split of a Hub dataset"})
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "held-out pairs for evaluation (default set: its held-out split)"}
    )
    tasks: str | None = field(default=None, metadata={"help": "embedded tasks, comma-separated (default: all)"})
    task_sizes: str | None = field(default=None, metadata={"help": "pairs per embedded task, e.g. 'sentiment=2000'"})
    max_eval_samples: int | None = field(default=256, metadata={"help": "cap on held-out pairs evaluated"})
    malformed: str = field(default="error", metadata={"help": f"malformed rows: {' or '.join(MALFORMED_POLICIES)}"})


def _task_list(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def preference_datasets(data_args: PreferenceDataArguments, seed: int):
    """(train, eval or None) with prompt/chosen/rejected columns only."""
    columns = ["prompt", "chosen", "rejected"]
    if data_args.dataset_name == "default":
        tasks, sizes = _task_list(data_args.tasks), parse_task_sizes(data_args.task_sizes)
        train = build_default_preferences("train", tasks, sizes, seed=seed)
        evaluation = build_default_preferences("heldout", tasks, seed=seed)
    else:
        train = load_preference_dataset(data_args.dataset_name, data_args.malformed, data_args.dataset_split,
                                        data_args.dataset_config)
        evaluation = None
    if data_args.eval_dataset_name:
        evaluation = load_preference_dataset(data_args.eval_dataset_name, data_args.malformed)
    if evaluation is not None and data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    train = train.select_columns(columns)
    return train, evaluation.select_columns(columns) if evaluation is not None else None


def load_tokenizer(model_args: ModelConfig):
    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path is not set: point it at an SFT checkpoint (recipe key or --model_name_or_path)")
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    if tokenizer.pad_token is None:
        raise ValueError(f"the tokenizer in {model_args.model_name_or_path} has no pad token; TRL trainers need one")
    return tokenizer


def load_policy(model_args: ModelConfig):
    return AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, attn_implementation=model_args.attn_implementation or "sdpa",
        dtype=model_args.dtype or "float32",
    )


def peft_config(model_args: ModelConfig):
    """A LoRA config when `use_peft` is set, targeting every linear layer of the decoder by default."""
    if model_args.use_peft and not model_args.lora_target_modules:
        model_args.lora_target_modules = list(LORA_TARGET_MODULES)
    return get_peft_config(model_args)
