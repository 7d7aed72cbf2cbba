"""Supervised fine-tuning with TRL's `SFTTrainer`: full weights, LoRA or QLoRA, loss on the assistant's tokens only.

    tinyllm sft --config recipes/sft/quickstart.yaml [--any_recipe_key value ...]
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml -m tinyllm_hf.trainers.sft --config ...

The recipe holds the keys of `SFTDataArguments`, TRL's `ModelConfig` (model_name_or_path, dtype, use_peft, lora_*,
load_in_4bit, ...), TRL's `SFTConfig` and `RunArguments`; the command line overrides any of them.

Data: `dataset_name` is "default" (the embedded set of checkable questions, `tinyllm_hf.tasks`), a local
.jsonl/.json file or folder, or a Hugging Face dataset name; several, comma-separated, are concatenated. Every row
becomes `messages`, rendered by the tokenizer's chat template, whose `{% generation %}` markers put the loss on the
assistant's answers and their closing `<|endoftext|>` only (`assistant_only_loss`, on by default here). The
conversations are tokenized by `TinyllmSFTTrainer`, their text as plain text: a control string written in the data
never becomes a control token.

Output: the full model (or, with `use_peft`, the adapter in PEFT format; `tinyllm merge` folds it into the base) with
its tokenizer and a generation_config.json holding the measured sampling defaults (`GENERATION_DEFAULTS`); with the
default set, `heldout_tasks.jsonl` (the held-out questions as task records for `tinyllm eval --tasks tasks`), and with
`heldout_eval_sizes` the held-out accuracy of those tasks in `heldout_results.json`.
"""

import copy
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from transformers import set_seed
from trl import ModelConfig, SFTConfig, SFTTrainer
from trl.trainer.utils import get_quantization_config

import tinyllm_hf  # noqa: F401  (registers the tinyllm model type with the Auto classes)
from tinyllm_hf.data.on_disk import built_once, tokenizer_fingerprint
from tinyllm_hf.data.sft import FORMATS, MESSAGES_FEATURE, build_inputs, load_sft_dataset
from tinyllm_hf.errors import UsageError
from tinyllm_hf.model_utils import get_tokenizer
from tinyllm_hf.options import comma_list
from tinyllm_hf.runs import HELDOUT_RESULTS_FILE, HELDOUT_TASKS_FILE
from tinyllm_hf.tasks import TASKS, build_default_sft, heldout_task_records, parse_task_sizes, write_task_file
from tinyllm_hf.tasks.tool_use import parse_tool_sizes
from tinyllm_hf.tokenizer.chat_template import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    apply_chat_template_to_tokenizer,
    encode_conversation,
    missing_special_tokens,
)
from tinyllm_hf.trainers.common import (
    DatasetArguments,
    HiddenStateLossMixin,
    ReliableTrainerMixin,
    RunArguments,
    ThroughputCallback,
    add_callback_first,
    build_trainer,
    final_eval_metrics,
    fit_global_batch,
    load_policy,
    logger,
    matmul_flops_per_token,
    peak_dtype,
    run_stage,
    train_and_save,
)

# Defaults that differ from SFTConfig's own; recipes and the command line override them. SFTConfig turns on bf16 and
# gradient checkpointing by default: both only slow a small model down on a CPU, so recipes for GPUs switch them on.
# Held-out tool-use conversations of each kind in the validation set.
HELDOUT_TOOL_CONVERSATIONS = 20

DEFAULTS = {
    "output_dir": "outputs/sft",
    "assistant_only_loss": True,
    "bf16": False,
    "activation_checkpointing": False,
    "report_to": ["tensorboard"],
    "logging_steps": 10,
    "include_num_input_tokens_seen": True,  # tokens/s in the logs (padding included)
}


@dataclass
class SFTDataArguments(DatasetArguments):
    dataset_name: str = field(
        default="default",
        metadata={"help": "'default' (embedded checkable questions), a local .jsonl/.json file or folder, or a Hugging "
                          "Face dataset name; several comma-separated are concatenated"},
    )
    dataset_format: str = field(default="auto", metadata={"help": f"row format: {', '.join(FORMATS)}"})
    sft_tasks: str | None = field(
        default=None, metadata={"help": f"tasks of the default set, comma-separated (default: all of {', '.join(TASKS)})"}
    )
    task_sizes: str | None = field(
        default=None,
        metadata={"help": "training conversations per default-set task, e.g. 'sentiment=6000,identity=200' "
                          "(default: all; a size above a task's count repeats it)"},
    )
    tool_task_sizes: str | None = field(
        default=None,
        metadata={"help": "tool-use conversations of the default set by kind, e.g. 'idiom_meaning=1000,not_found=100' "
                          "(kinds: tinyllm_hf.tasks.tool_use.TOOL_KINDS; default: none)"},
    )
    max_eval_samples: int = field(
        default=500, metadata={"help": "held-out conversations for the validation loss (0: no validation set)"}
    )
    eval_fraction: float = field(
        default=0.0, metadata={"help": "share of your own (non-default) data held out for the validation loss"}
    )
    heldout_eval_sizes: str | None = field(
        default=None,
        metadata={"help": "after training, answer this many held-out questions of these default-set tasks and report "
                          "the accuracy in heldout_results.json, e.g. 'sentiment=200,xiehouyu=50'"},
    )
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "default: the model's folder"})

    def __post_init__(self):
        super().__post_init__()
        if self.dataset_format not in FORMATS:
            raise UsageError(f"dataset_format must be one of {', '.join(FORMATS)}, not {self.dataset_format!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise UsageError(f"eval_fraction must be in [0, 1), not {self.eval_fraction}")

    @property
    def sources(self) -> list[str]:
        return comma_list(self.dataset_name)

    @property
    def tasks(self) -> list[str] | None:
        return comma_list(self.sft_tasks) or None

    @property
    def has_validation(self) -> bool:
        """Whether `build_datasets` will hold conversations out: the default set's held-out split, or eval_fraction of
        your own data, capped by max_eval_samples."""
        return self.max_eval_samples > 0 and ("default" in self.sources or self.eval_fraction > 0)


class TinyllmSFTTrainer(ReliableTrainerMixin, HiddenStateLossMixin, SFTTrainer):
    """TRL's SFTTrainer with atomic checkpoints and a stop on non-finite loss, that tokenizes conversations itself:
    the text of the data is encoded as text, so `<|assistant|>` written in a file is never a control token
    (`encode_conversations`); TRL then builds the labels from the assistant masks as it would from its own.

    A Tinyllm model's training steps take the loss from the hidden states at the answer tokens only
    (`HiddenStateLossMixin`): TRL's fused head computes log-probabilities, entropy and top-1 hits at every position,
    padding and prompts included, which made its backward most of a CPU step (bench/trl_cpu_steps.py). The training log
    then has no `entropy` / `mean_token_accuracy` (evaluation still has them). TRL's loss stays for what only it
    computes: `loss_type: dft`, label smoothing, a custom `compute_loss_func`, sequence parallelism."""

    def _hidden_state_loss_applies(self) -> bool:
        parallelism = self.accelerator.parallelism_config
        return (self.args.loss_type == "nll" and self.label_smoother is None and self.compute_loss_func is None
                and not (parallelism is not None and getattr(parallelism, "sp_enabled", False)))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.aux_loss_enabled:  # a MoE model adds its balancing losses (TRL keeps their weights in its config)
            inputs = {**inputs, "output_router_logits": True}
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if isinstance(dataset, datasets.Dataset) and "messages" in dataset.column_names:
            # Tokenized once (by the main process, with dataset_num_proc workers) and saved; every rank, and every
            # restart with the same conversations and tokenizer, loads the saved tokens instead.
            conversations = dataset
            dataset = built_once(
                f"sft-tokens-{dataset_name}",
                lambda: {"conversations": conversations._fingerprint, "rows": len(conversations),
                         "tokenizer": tokenizer_fingerprint(processing_class),
                         "assistant_only_loss": args.assistant_only_loss},
                lambda: encode_conversations(conversations, processing_class, args.dataset_num_proc,
                                             args.assistant_only_loss),
                args,
            )
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)


# --------------------------------------------------------------------------------------------------------------------
# Model, tokenizer, PEFT
# --------------------------------------------------------------------------------------------------------------------


def check_quantization_support() -> None:
    """QLoRA needs bitsandbytes and a GPU it supports; say so plainly instead of failing deep inside loading."""
    problems = []
    if importlib.util.find_spec("bitsandbytes") is None:
        problems.append("bitsandbytes is not installed (pip install bitsandbytes)")
    if not torch.cuda.is_available():
        problems.append("no CUDA GPU is visible")
    if problems:
        raise UsageError(
            "load_in_4bit/load_in_8bit (QLoRA) needs bitsandbytes on a CUDA GPU, but " + " and ".join(problems)
            + ". Train a LoRA adapter on the unquantized model instead (use_peft: true without load_in_4bit)."
        )


def load_tokenizer(data_args: SFTDataArguments, model_args: ModelConfig, trust_remote_code: bool = False):
    path = data_args.tokenizer_name_or_path or model_args.model_name_or_path
    return get_tokenizer(path, revision=model_args.model_revision, trust_remote_code=trust_remote_code,
                         needs_chat_template=True)


def add_tool_tokens(tokenizer) -> list[str]:
    """Give a tinyllm tokenizer trained before the tool and thinking tokens existed those tokens and the current chat
    template (in place); returns the tokens added. A tokenizer with another model's chat template is left alone."""
    missing = missing_special_tokens(tokenizer)
    if missing and (tokenizer.chat_template or "").startswith(CHAT_TEMPLATE.split("\n", 1)[0]):
        apply_chat_template_to_tokenizer(tokenizer, add_missing=True)
        logger.warning(f"the tokenizer lacked the tool and thinking tokens {missing}: added them (ids "
                       f"{len(tokenizer) - len(missing)}..{len(tokenizer) - 1}) and the model's embeddings grow to match")
        return missing
    return []


def load_model(model_args: ModelConfig, tokenizer, args: SFTConfig):
    if not model_args.model_name_or_path:
        raise UsageError("model_name_or_path is not set: give the pretrained model's folder (or a Hub id)")
    quantization_config = None
    if model_args.load_in_4bit or model_args.load_in_8bit:
        if not model_args.use_peft:
            raise UsageError("a quantized (load_in_4bit/8bit) base model cannot be trained itself: set use_peft: true")
        check_quantization_support()
        quantization_config = get_quantization_config(model_args)
    model = load_policy(
        model_args, tokenizer, args, trust_remote_code=args.trust_remote_code, quantization_config=quantization_config,
        # bitsandbytes layers must be placed on the GPU while loading, one full copy per process.
        device_map={"": torch.cuda.current_device()} if quantization_config is not None else None,
    )
    added = [t for t in SPECIAL_TOKENS if tokenizer.convert_tokens_to_ids(t) >= model.config.vocab_size]
    if added and len(tokenizer) - model.config.vocab_size == len(added):
        # Only the tokens `add_tool_tokens` added are new to the model: their rows start at the mean embedding.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    if len(tokenizer) > model.config.vocab_size:
        raise UsageError(
            f"the tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}: use the tokenizer "
            "the model was pretrained with"
        )
    return model


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


def build_datasets(data_args: SFTDataArguments, seed: int) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train, validation) conversations (`messages` only) from every source in `dataset_name`."""
    if not data_args.sources:
        raise UsageError("dataset_name is empty")
    train_parts, eval_parts = [], []
    for source in data_args.sources:
        if source == "default":
            sizes = parse_task_sizes(data_args.task_sizes)
            tool_sizes = parse_tool_sizes(data_args.tool_task_sizes)
            train_parts.append(build_default_sft("train", data_args.tasks, sizes, seed, tool_sizes))
            if data_args.max_eval_samples > 0:
                # Held-out tool-use conversations too (a few of each kind), so the validation loss covers the format.
                heldout_tools = {kind: min(count, HELDOUT_TOOL_CONVERSATIONS) for kind, count in tool_sizes.items()}
                eval_parts.append(build_default_sft("heldout", data_args.tasks, seed=seed, tool_sizes=heldout_tools))
            continue
        dataset = load_sft_dataset(source, data_args.dataset_format, data_args.malformed, data_args.dataset_split,
                                   data_args.dataset_config)
        if data_args.eval_fraction > 0:
            split = dataset.train_test_split(test_size=data_args.eval_fraction, seed=seed)
            dataset = split["train"]
            eval_parts.append(split["test"])
        train_parts.append(dataset)
    train = _concatenate(train_parts).shuffle(seed=seed)
    evaluation = None
    if eval_parts and data_args.max_eval_samples > 0:
        evaluation = _concatenate(eval_parts)
        evaluation = evaluation.shuffle(seed=seed).select(range(min(data_args.max_eval_samples, len(evaluation))))
    return train, evaluation


def shared_datasets(data_args: SFTDataArguments, seed: int, args) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """`build_datasets`, built once by the main process and saved under output_dir (`built_once`); every rank, and
    every restart with the same sources, sizes and seed, loads the saved conversations instead."""
    def build() -> datasets.DatasetDict:
        train, evaluation = build_datasets(data_args, seed)
        return datasets.DatasetDict({"train": train, **({"validation": evaluation} if evaluation is not None else {})})

    splits = built_once("sft-conversations", lambda: build_inputs(data_args, seed, data_args.sources), build, args)
    return splits["train"], splits.get("validation")


def _concatenate(parts: list[datasets.Dataset]) -> datasets.Dataset:
    # Sources carry different extra columns (the default set has id and task); the trainer needs the messages and the
    # tools (JSON, or None for a conversation without tools), which TRL's SFTTrainer hands to the chat template.
    def columns(part: datasets.Dataset) -> datasets.Dataset:
        if "tools" not in part.column_names:
            part = part.add_column("tools", [None] * len(part), feature=datasets.Value("string"))
        return part.select_columns(["messages", "tools"]).cast_column("messages", MESSAGES_FEATURE)

    return datasets.concatenate_datasets([columns(part) for part in parts])


def encode_conversations(dataset: datasets.Dataset, tokenizer, num_proc: int | None,
                         assistant_only_loss: bool = True) -> datasets.Dataset:
    """`input_ids` (and with `assistant_only_loss` the `assistant_masks` that put the loss on the assistant's tokens)
    for each conversation, which TRL's SFTTrainer takes as they are. We tokenize, not TRL, so that the text of the data
    is encoded as text: `<|assistant|>` written in a file is never a control token
    (tokenizer.chat_template.encode_conversation)."""
    def encode(row: dict) -> dict:
        tools = row.get("tools")
        encoded = encode_conversation(tokenizer, row["messages"], json.loads(tools) if isinstance(tools, str) else tools)
        return encoded if assistant_only_loss else {"input_ids": encoded["input_ids"]}

    return dataset.map(encode, remove_columns=dataset.column_names, num_proc=num_proc, desc="Tokenizing conversations")


# --------------------------------------------------------------------------------------------------------------------
# Held-out accuracy
# --------------------------------------------------------------------------------------------------------------------


HELDOUT_MAX_NEW_TOKENS = 64  # the longest held-out answer generated; the model's context must exceed it


def heldout_eval_records(data_args: SFTDataArguments) -> list[dict]:
    """The held-out questions `heldout_eval_sizes` asks to answer after training: the first N of each task, in the
    task file's fixed order ([] when it is not set). Chosen before training, so that a value that cannot work fails
    at the start, not after a finished run (which would then fail again on every rerun)."""
    sizes = parse_task_sizes(data_args.heldout_eval_sizes)
    if not sizes:
        return []
    if "default" not in data_args.sources:
        raise UsageError("heldout_eval_sizes measures the default set's held-out questions, but dataset_name does not "
                         "include 'default'; add it, or leave heldout_eval_sizes out")
    chosen, taken = [], dict.fromkeys(sizes, 0)
    for record in heldout_task_records(data_args.tasks):
        if taken.get(record["task"], 0) < sizes.get(record["task"], 0):
            taken[record["task"]] += 1
            chosen.append(record)
    if not chosen:
        raise UsageError(f"heldout_eval_sizes names no task of this run ({', '.join(data_args.tasks or TASKS)})")
    return chosen


def check_heldout_context(chosen: list[dict], context: int) -> None:
    if chosen and HELDOUT_MAX_NEW_TOKENS >= context:
        raise UsageError(f"heldout_eval_sizes: held-out answers are generated up to {HELDOUT_MAX_NEW_TOKENS} tokens, "
                         f"which needs a model context above that, but the model's is {context}; leave "
                         "heldout_eval_sizes out and measure with `tinyllm eval --tasks tasks --max-new-tokens N`")


def evaluate_heldout(model, tokenizer, data_args: SFTDataArguments, output_dir: str, chosen: list[dict]) -> dict | None:
    """Write the held-out questions as task records (heldout_tasks.jsonl); with `chosen` (`heldout_eval_records`),
    answer those with the evaluation stage's generic evaluator and write the accuracy to heldout_results.json."""
    from tinyllm_hf.evaluation.tasks import evaluate_tasks
    from tinyllm_hf.inference.runtime import TransformersRuntime

    write_task_file(heldout_task_records(data_args.tasks), Path(output_dir) / HELDOUT_TASKS_FILE)
    if not chosen:
        return None
    results = evaluate_tasks(TransformersRuntime(model, tokenizer), chosen, max_new_tokens=HELDOUT_MAX_NEW_TOKENS,
                             progress=False)
    path = Path(output_dir) / HELDOUT_RESULTS_FILE
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    summary = ", ".join(f"{task} {entry['accuracy']:.3f} (n={entry['n']})" for task, entry in results["per_task"].items())
    logger.warning(f"held-out accuracy: {summary}; written to {path}")
    return results


# --------------------------------------------------------------------------------------------------------------------
# Generation defaults
# --------------------------------------------------------------------------------------------------------------------

# What transformers' `generate`, vLLM and the Ollama export use when a request sets nothing else: chosen by measurement
# (bench/generation_defaults.py on the quickstart SFT model's held-out questions; the table and the reasons are in
# docs/sft.md, "Generation defaults"). Evaluation is greedy and unaffected.
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.2}


def write_generation_config(model, output_dir: str) -> None:
    """The model's generation config (its end-of-turn and padding tokens) with `GENERATION_DEFAULTS`, as
    output_dir/generation_config.json; written for an adapter folder too, so that `tinyllm merge` passes it on."""
    config = copy.deepcopy(model.generation_config)
    config.update(**GENERATION_DEFAULTS)
    config._from_model_config = False  # written on purpose: transformers must not rebuild it from config.json
    config.validate(strict=True)
    config.save_pretrained(output_dir)


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------


def train(model_args: ModelConfig, data_args: SFTDataArguments, args: SFTConfig, run_args: RunArguments) -> dict:
    set_seed(args.seed)
    # Everything that can be checked without the model or the data, first.
    if not data_args.has_validation and args.eval_strategy != "no":
        raise UsageError("eval_strategy is set but there is no validation data (max_eval_samples 0, or eval_fraction 0 "
                         "with your own data); set eval_strategy: 'no' or hold data out")
    heldout = heldout_eval_records(data_args)
    tokenizer = load_tokenizer(data_args, model_args, args.trust_remote_code)
    if data_args.tool_task_sizes:
        add_tool_tokens(tokenizer)
    model = load_model(model_args, tokenizer, args)
    context = model.config.max_position_embeddings
    check_heldout_context(heldout, context)
    if args.max_length is None or args.max_length > context:
        logger.warning(f"max_length {args.max_length} -> {context} (the model's context)")
        args.max_length = context
    fit_global_batch(args, run_args, args.max_length if args.packing else None)
    train_dataset, eval_dataset = shared_datasets(data_args, args.data_seed or args.seed, args)
    logger.warning(f"SFT data: {len(train_dataset)} training and {len(eval_dataset or [])} validation conversations")

    trainer = build_trainer(TinyllmSFTTrainer, model, args, tokenizer, model_args, run_args,
                            train_dataset=train_dataset, eval_dataset=eval_dataset)
    base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    add_callback_first(
        trainer, ThroughputCallback(matmul_flops_per_token(base, args.max_length), None, run_args.peak_flops, peak_dtype(args))
    )
    if hasattr(trainer.model, "print_trainable_parameters"):
        trainer.model.print_trainable_parameters()

    metrics = train_and_save(trainer, run_args, evaluate=final_eval_metrics if eval_dataset is not None else None)
    if args.should_save:
        write_generation_config(base, args.output_dir)
    if args.should_save and "default" in data_args.sources:
        results = evaluate_heldout(trainer.model, tokenizer, data_args, args.output_dir, heldout)
        if results is not None:
            metrics.update({f"heldout_accuracy_{task}": e["accuracy"] for task, e in results["per_task"].items()})
    return metrics


# The recipe's sections, in the order `parse_recipe` returns them.
ARGUMENTS = [ModelConfig, SFTDataArguments, SFTConfig, RunArguments]


def main(argv: list[str] | None = None) -> int:
    return run_stage("tinyllm sft", ARGUMENTS, DEFAULTS, train, argv)


if __name__ == "__main__":
    from tinyllm_hf.cli import run_command

    sys.exit(run_command("tinyllm sft", main))
