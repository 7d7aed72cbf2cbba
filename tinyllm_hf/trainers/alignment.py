"""Pieces the alignment stages share: preference and prompt data arguments, policy/tokenizer loading, TRL defaults, and
the training runs themselves: `train_offline` (DPO, KTO, ORPO: fixed preference pairs) and `train_online` (GRPO, RLOO:
sampled completions scored by reward functions). Each stage's module keeps only its TRL trainer, config and defaults."""

from dataclasses import dataclass, field

import datasets
import torch
from transformers import set_seed
from trl import ModelConfig

import tinyllm_hf  # noqa: F401  (registers the tinyllm model type with the Auto classes)
from tinyllm_hf.data.on_disk import built_once
from tinyllm_hf.data.preference import load_preference_dataset, load_prompt_dataset
from tinyllm_hf.data.sft import build_inputs
from tinyllm_hf.errors import UsageError
from tinyllm_hf.inference.tool_loop import Toolbox
from tinyllm_hf.model_utils import get_tokenizer
from tinyllm_hf.options import comma_list
from tinyllm_hf.tasks import build_default_preferences, build_prompt_dataset, parse_task_sizes
from tinyllm_hf.tokenizer.chat_template import CHAT_TEMPLATE, RESPONSE_TEMPLATE
from tinyllm_hf.trainers.common import (
    DatasetArguments,
    RunArguments,
    build_trainer,
    final_eval_metrics,
    fit_global_batch,
    load_policy,
    logger,
    refuse_global_batch,
    train_and_save,
)
from tinyllm_hf.trainers.rewards import build_rewards


def trl_defaults(output_dir: str, **overrides) -> dict:
    """Defaults for TRL configs. TRL turns bf16 on by default, which fails on CPUs and pre-Ampere GPUs, and activation
    (gradient) checkpointing, which only slows a small model down; recipes for big models on GPUs switch it back on.
    The setting goes by transformers' new name: the old one, TRL's default, only warns."""
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return {"output_dir": output_dir, "report_to": ["tensorboard"], "logging_steps": 10, "bf16": bf16,
            "activation_checkpointing": False, **overrides}


def online_defaults(output_dir: str, **overrides) -> dict:
    """`trl_defaults` plus the sampling and batch defaults of the on-policy stages (GRPO, RLOO). A small model sampling
    from its full distribution (TRL's default top_k=0, temperature 1) mostly produces garbage that earns no reward:
    sample from its few most likely tokens instead."""
    return trl_defaults(output_dir, num_generations=4, per_device_train_batch_size=8, max_completion_length=64,
                        temperature=0.8, top_k=20, learning_rate=1e-5, log_completions=False, **overrides)


@dataclass
class PreferenceDataArguments(DatasetArguments):
    dataset_name: str = field(
        default="default",
        metadata={"help": "'default' (the embedded preference set), a local .jsonl/.json file or folder, or a Hub dataset"},
    )
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "held-out pairs for evaluation (default set: its held-out split)"}
    )
    tasks: str | None = field(default=None, metadata={"help": "embedded tasks, comma-separated (default: all)"})
    task_sizes: str | None = field(default=None, metadata={"help": "pairs per embedded task, e.g. 'sentiment=2000'"})
    max_eval_samples: int | None = field(default=256, metadata={"help": "cap on held-out pairs evaluated"})


PAIR_COLUMNS = ["prompt", "chosen", "rejected"]  # what the TRL preference trainers take


def build_preference_splits(data_args: PreferenceDataArguments, seed: int) -> datasets.DatasetDict:
    """"train" (and "heldout" when there is held-out data) preference pairs, with every column they came with."""
    if data_args.dataset_name == "default":
        tasks, sizes = comma_list(data_args.tasks) or None, parse_task_sizes(data_args.task_sizes)
        splits = {"train": build_default_preferences("train", tasks, sizes, seed=seed),
                  "heldout": build_default_preferences("heldout", tasks, seed=seed)}
    else:
        splits = {"train": load_preference_dataset(data_args.dataset_name, data_args.malformed,
                                                   data_args.dataset_split, data_args.dataset_config)}
    if data_args.eval_dataset_name:
        splits["heldout"] = load_preference_dataset(data_args.eval_dataset_name, data_args.malformed)
    return datasets.DatasetDict(splits)


def preference_datasets(data_args: PreferenceDataArguments, seed: int, eval_extra_columns: tuple[str, ...] = (),
                        train_extra_columns: tuple[str, ...] = (), args=None):
    """(train, eval or None) with prompt/chosen/rejected columns only, plus those of `train_extra_columns` the training
    pairs have (the reward stage keeps `margin`, which it trains with) and those of `eval_extra_columns` the held-out
    pairs have (the reward stage keeps `task` to report its accuracy per task). Margins a stage does not use are
    reported, not dropped silently. With the stage's `args`, the pairs are built once and loaded from disk by every
    process (`built_once`): TRL's caches (the precomputed reference log-probs) are then files all ranks share."""
    if args is None:
        splits = build_preference_splits(data_args, seed)
    else:
        sources = [data_args.dataset_name, data_args.eval_dataset_name]
        splits = built_once("preferences", lambda: build_inputs(data_args, seed, sources),
                            lambda: build_preference_splits(data_args, seed), args)
    train, evaluation = splits["train"], splits.get("heldout")
    if evaluation is not None and data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    if "margin" in train.column_names and "margin" not in train_extra_columns:
        logger.warning(f"{data_args.dataset_name}: the pairs' margin column is not used by this stage (only `tinyllm "
                       "reward` trains with margins)")
    train = train.select_columns(PAIR_COLUMNS + [c for c in train_extra_columns if c in train.column_names])
    if evaluation is not None:
        kept = [c for c in eval_extra_columns if c in evaluation.column_names]
        evaluation = evaluation.select_columns(PAIR_COLUMNS + kept)
    return train, evaluation


@dataclass
class PromptDataArguments(DatasetArguments):
    dataset_name: str = field(
        default="default",
        metadata={"help": "'default' (the embedded checkable questions), or a local .jsonl/.json file or folder or a Hub "
                          "dataset with prompt (string or messages) and, for the correctness reward, answer and task"},
    )
    tasks: str | None = field(default=None, metadata={"help": "embedded tasks, comma-separated (default: all checkable)"})
    task_sizes: str | None = field(default=None, metadata={"help": "prompts per embedded task, e.g. 'sentiment=500'"})


def build_prompts(data_args: PromptDataArguments, seed: int) -> datasets.Dataset:
    if data_args.dataset_name == "default":
        tasks, sizes = comma_list(data_args.tasks) or None, parse_task_sizes(data_args.task_sizes)
        dataset = build_prompt_dataset("train", tasks, sizes, seed=seed)
        return dataset.select_columns(["prompt", "answer", "task"])
    return load_prompt_dataset(data_args.dataset_name, data_args.malformed, data_args.dataset_split,
                               data_args.dataset_config)


def prompt_dataset(data_args: PromptDataArguments, seed: int, args=None) -> datasets.Dataset:
    """Training prompts with the columns the reward functions read (answer, task); with the stage's `args` built once
    and loaded from disk by every process (`built_once`)."""
    if args is None:
        return build_prompts(data_args, seed)
    return built_once("prompts", lambda: build_inputs(data_args, seed, [data_args.dataset_name]),
                      lambda: build_prompts(data_args, seed), args)


TOOL_SETS = ("builtin",)


@dataclass
class ToolArguments:
    tools: str | None = field(
        default=None,
        metadata={"help": "tools the policy may call in its rollouts: 'builtin' (the dictionary lookups and the "
                          "calculator of tinyllm_hf.tasks.tools); TRL runs each call and the policy continues after the "
                          "result, for up to max_tool_calling_iterations rounds. Default: none"},
    )

    def __post_init__(self):
        if self.tools is not None and self.tools not in TOOL_SETS:
            raise UsageError(f"tools: unknown tool set {self.tools!r}; choose from {', '.join(TOOL_SETS)}")

    def toolbox(self) -> Toolbox | None:
        return Toolbox.builtin() if self.tools == "builtin" else None


def load_tokenizer(model_args: ModelConfig, trust_remote_code: bool = False):
    if not model_args.model_name_or_path:
        raise UsageError("model_name_or_path is not set: point it at an SFT checkpoint (recipe key or --model_name_or_path)")
    return get_tokenizer(model_args.model_name_or_path, revision=model_args.model_revision,
                         trust_remote_code=trust_remote_code, needs_pad_token=True)


def check_run_args(run_args) -> None:
    # The data-order log hashes `input_ids`, which preference and RL batches do not have (they carry prompt/chosen/
    # completion ids): refuse it rather than ignore it.
    if run_args.data_order_log:
        raise UsageError("data_order_log is supported by pretrain and sft only, not by the alignment stages")


def train_offline(trainer_class, data_args: PreferenceDataArguments, model_args: ModelConfig, args,
                  run_args: RunArguments) -> dict:
    """Offline preference optimisation (DPO, KTO or ORPO, by `trainer_class`) of the policy on prompt/chosen/rejected
    pairs; evaluated on the held-out pairs when there are any; the final model saved into output_dir."""
    check_run_args(run_args)
    set_seed(args.seed)
    tokenizer = load_tokenizer(model_args, args.trust_remote_code)
    train_dataset, eval_dataset = preference_datasets(data_args, args.seed, args=args)
    if eval_dataset is None:
        args.eval_strategy = "no"
    fit_global_batch(args, run_args)
    trainer = build_trainer(trainer_class, load_policy(model_args, tokenizer, args, trust_remote_code=args.trust_remote_code), args, tokenizer, model_args, run_args,
                            train_dataset=train_dataset, eval_dataset=eval_dataset)
    return train_and_save(trainer, run_args, evaluate=final_eval_metrics if eval_dataset is not None else None)


def train_online(trainer_class, data_args: PromptDataArguments, reward_args, model_args: ModelConfig, args,
                 run_args: RunArguments, toolbox: Toolbox | None = None) -> dict:
    """One on-policy run (GRPO or RLOO, by `trainer_class`): sample completions of the prompts, score them with the
    weighted reward functions, update the policy; save the final model into output_dir. With `toolbox` (GRPO only)
    the prompts offer its tools and TRL runs the calls the policy makes during generation."""
    check_run_args(run_args)
    # Their generation batch (per_device_train_batch_size x processes x steps_per_generation) is fixed when the
    # config is built, before the world size could change the accumulation.
    refuse_global_batch(run_args, "the on-policy stages (grpo, rloo)")
    set_seed(args.seed)
    tokenizer = load_tokenizer(model_args, args.trust_remote_code)
    tools = {}
    if toolbox is not None:
        # TRL finds the calls with the tokenizer's response template; a tokenizer saved before RESPONSE_TEMPLATE
        # existed has our chat template but none.
        if tokenizer.chat_template == CHAT_TEMPLATE and tokenizer.response_template is None:
            tokenizer.response_template = RESPONSE_TEMPLATE
        tools = {"tools": toolbox.as_functions()}
    reward_funcs, reward_tokenizers = build_rewards(reward_args, tokenizer, toolbox, args.trust_remote_code)
    train_dataset = prompt_dataset(data_args, args.seed, args)
    if "correctness" in reward_args.names and not any(train_dataset["answer"]):
        raise UsageError(f"{data_args.dataset_name}: the correctness reward needs an 'answer' column with references")
    trainer = build_trainer(trainer_class, load_policy(model_args, tokenizer, args, trust_remote_code=args.trust_remote_code), args, tokenizer, model_args, run_args,
                            reward_funcs=reward_funcs, train_dataset=train_dataset,
                            reward_processing_classes=reward_tokenizers, **tools)
    return train_and_save(trainer, run_args)
