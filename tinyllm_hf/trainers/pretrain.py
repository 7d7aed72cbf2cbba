"""Pretraining: a Tinyllm model (fresh from a preset, or continued from a checkpoint) on packed blocks of a corpus.

    tinyllm pretrain --config recipes/pretrain/quickstart.yaml [--any_recipe_key value ...]
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml -m tinyllm_hf.trainers.pretrain --config ...

The recipe holds the keys of `ModelArguments`, `DataArguments`, `RunArguments` and `transformers.TrainingArguments`;
the command line overrides any of them. `--resume` continues from the newest complete checkpoint in `output_dir`.
"""

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments, set_seed

import tinyllm_hf  # noqa: F401  (registers the tinyllm model type with the Auto classes)
from tinyllm_hf.data.corpus import load_corpus
from tinyllm_hf.data.packing import collate_blocks, pack_dataset, unigram_entropy
from tinyllm_hf.data.pretokenized import load_pretokenized, pretokenize, pretokenized_inputs
from tinyllm_hf.errors import ConfigError, UsageError
from tinyllm_hf.model_utils import TRUST_REMOTE_CODE_HELP, check_attn_implementation, get_model, get_tokenizer
from tinyllm_hf.modeling import PRESETS, TinyllmConfig
from tinyllm_hf.rope_scaling import model_context, with_rope_scaling
from tinyllm_hf.options import parse_key_values
from tinyllm_hf.trainers.common import (
    HiddenStateLossMixin,
    LossCurveCallback,
    ReliableTrainerMixin,
    RunArguments,
    ThroughputCallback,
    add_callback_first,
    final_eval_metrics,
    fit_global_batch,
    logger,
    matmul_flops_per_token,
    peak_dtype,
    run_stage,
    train_and_save,
)

# Defaults that differ from TrainingArguments' own; recipes and the command line override them.
DEFAULTS = {"output_dir": "outputs/pretrain", "report_to": ["tensorboard"], "logging_steps": 10}
STREAMING_EVAL_BLOCKS = 1000  # validation blocks kept when streaming (when max_eval_samples is not set)


@dataclass
class ModelArguments:
    model_preset: str = field(default="tiny", metadata={"help": f"size of a new model: {', '.join(PRESETS)}"})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "continue training this checkpoint instead of starting from a preset"}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "preset fields to change, e.g. 'hidden_size=64,num_hidden_layers=2,max_position_embeddings=128'"},
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, eager or flash_attention_2"})
    rope_scaling: str | None = field(
        default=None,
        metadata={"help": "extend the context by RoPE scaling, TYPE:FACTOR (e.g. yarn:4 continues a 256-token "
                          "checkpoint at 1,024 tokens; see recipes/pretrain/long-context.yaml and docs/long_context.md)"},
    )
    # TRL's configs (the other stages) have this field; transformers' TrainingArguments has not.
    trust_remote_code: bool = field(default=False, metadata={"help": TRUST_REMOTE_CODE_HELP})


@dataclass
class DataArguments:
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "tokenizer folder (tinyllm tokenizer)"})
    dataset_name: str = field(
        default="default",
        metadata={"help": "corpus for load_corpus: 'default', an embedded source, a local file/folder or a Hub dataset"},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "configuration of a Hub dataset"})
    text_field: str = field(default="text", metadata={"help": "column (or JSON field) holding the documents"})
    block_size: int | None = field(default=None, metadata={"help": "tokens per block; default: the model's context"})
    tokenized_dataset: str | None = field(
        default=None,
        metadata={"help": "folder of blocks pre-tokenized from the corpus keys by `tinyllm pretokenize` (built here "
                          "when missing): each process reads its own blocks, resuming skips trained ones unread"},
    )
    streaming: bool = field(default=False, metadata={"help": "tokenize on the fly (corpora larger than memory)"})
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "blocks in the streaming shuffle buffer"})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "processes for tokenization"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "cap on validation blocks"})


class PretrainTrainer(ReliableTrainerMixin, HiddenStateLossMixin, Trainer):
    """The HF Trainer with atomic checkpoints, a stop on non-finite loss and the loss from the hidden states."""


def load_tokenizer(path: str | None, trust_remote_code: bool = False):
    if not path:
        raise UsageError(
            "tokenizer_name_or_path is not set: train one with `tinyllm tokenizer` and pass its folder "
            "(recipe key tokenizer_name_or_path or --tokenizer_name_or_path)"
        )
    return get_tokenizer(path, trust_remote_code=trust_remote_code)


def parse_overrides(text: str | None) -> dict:
    """'a=1,b=1e-5,c=true,d=x' -> {'a': 1, 'b': 1e-05, 'c': True, 'd': 'x'}: JSON values, else YAML, else strings."""
    return parse_key_values(text, "config_overrides", convert=config_value)


def config_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:  # YAML reads True/False/yes and bare words; "1e-5" is only a float in JSON
        return yaml.safe_load(text)


# Config fields the tokenizer decides: an override of them would disagree with the data the model is trained on.
TOKENIZER_CONFIG_FIELDS = ("vocab_size", "pad_token_id", "eos_token_id")


def check_overrides(overrides: dict, preset: str) -> None:
    """Every key of config_overrides is a TinyllmConfig field the recipe may set (a misspelt key would otherwise be
    stored on the config and silently do nothing)."""
    from_tokenizer = sorted(set(overrides) & set(TOKENIZER_CONFIG_FIELDS))
    if from_tokenizer:
        raise UsageError(f"config_overrides: {', '.join(from_tokenizer)} comes from the tokenizer "
                         "(tokenizer_name_or_path), not from the recipe; remove it from config_overrides")
    defaults = {f.name: f.default for f in dataclasses.fields(TinyllmConfig) if f.init}
    defaults["rope_theta"] = 10000.0  # TinyllmConfig's shorthand for rope_parameters' default RoPE
    defaults.update(PRESETS.get(preset, {}))
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise UsageError(f"config_overrides: unknown TinyllmConfig field(s) {', '.join(unknown)}; see "
                         "tinyllm_hf/modeling/configuration_tinyllm.py for the fields")
    for name, value in overrides.items():  # a number where the preset has one (hidden_size=abc would fail obscurely)
        default = defaults[name]
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            wanted = int if isinstance(default, int) else (int, float)
            if isinstance(value, bool) or not isinstance(value, wanted):
                kind = "a whole number" if wanted is int else "a number"
                raise UsageError(f"config_overrides: {name} must be {kind} (the {preset} preset has {default!r}), "
                                 f"not {value!r}")


def build_model(model_args: ModelArguments, tokenizer, vocab_size: int | None = None):
    """The model to train: `model_name_or_path` loaded, or a new one from `model_preset` with `vocab_size` token rows
    (default `len(tokenizer)`; a distillation student takes its teacher's, which may be padded beyond the tokenizer)."""
    check_attn_implementation(model_args.attn_implementation)
    if model_args.model_name_or_path:
        if model_args.config_overrides:
            raise UsageError("config_overrides applies to a new model from model_preset, not to model_name_or_path")
        model = get_model(model_args.model_name_or_path, attn_implementation=model_args.attn_implementation,
                          trust_remote_code=model_args.trust_remote_code, rope_scaling=model_args.rope_scaling)
        if len(tokenizer) > model.config.vocab_size:  # e.g. a tokenizer extended with new tokens
            logger.warning(f"resizing embeddings from {model.config.vocab_size} to {len(tokenizer)} tokens")
            model.resize_token_embeddings(len(tokenizer))
        return model
    # from_config (not the constructor) so DeepSpeed ZeRO-3 can partition the weights while they are created.
    return AutoModelForCausalLM.from_config(new_model_config(model_args, tokenizer, vocab_size),
                                            attn_implementation=model_args.attn_implementation)


def new_model_config(model_args: ModelArguments, tokenizer, vocab_size: int | None = None) -> TinyllmConfig:
    """The config of a new model from `model_preset` and `config_overrides` (see `build_model`)."""
    overrides = parse_overrides(model_args.config_overrides)
    check_overrides(overrides, model_args.model_preset)
    # The config validates itself with plain ValueErrors (it ships as remote code, free of our errors module); a value
    # of the wrong type (hidden_size=abc) fails its arithmetic with a TypeError.
    try:
        config = TinyllmConfig.from_preset(
            model_args.model_preset,
            **overrides,
            vocab_size=vocab_size or len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model_preset {model_args.model_preset!r} / config_overrides: {err}") from err
    if model_args.rope_scaling:
        config = with_rope_scaling(config, model_args.rope_scaling)
    return config


def recipe_block_size(model_args: ModelArguments, data_args: DataArguments, tokenizer) -> int:
    """`block_size`, else the context of the model the recipe trains (read from its config, no weights built)."""
    if data_args.block_size:
        return data_args.block_size
    if model_args.model_name_or_path:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code)
        if model_args.rope_scaling:
            config = with_rope_scaling(config, model_args.rope_scaling)
        return model_context(config)
    return model_context(new_model_config(model_args, tokenizer))


def build_datasets(data_args: DataArguments, tokenizer, block_size: int, seed: int):
    """(train, validation) packed datasets; validation is always map-style, so it can be measured and reused."""
    if data_args.tokenized_dataset:
        blocks = pretokenized_blocks(data_args, tokenizer, block_size)
        return blocks["train"], capped_validation(blocks["validation"], data_args.max_eval_samples, seed)
    corpus = load_corpus(data_args.dataset_name, streaming=data_args.streaming, text_field=data_args.text_field,
                         config=data_args.dataset_config)
    pack = dict(tokenizer=tokenizer, block_size=block_size, num_proc=data_args.preprocessing_num_workers, seed=seed,
                shuffle_buffer_size=data_args.shuffle_buffer_size)
    train = pack_dataset(corpus["train"], **pack)
    validation = pack_dataset(corpus["validation"], **pack)
    if data_args.streaming:
        n = data_args.max_eval_samples or STREAMING_EVAL_BLOCKS
        validation = datasets.Dataset.from_list(list(validation.take(n)), features=validation.features)
    else:
        validation = capped_validation(validation, data_args.max_eval_samples, seed)
    if len(validation) == 0:
        raise UsageError(f"the validation split of {data_args.dataset_name!r} holds less than one block of {block_size} tokens")
    return train, validation


def capped_validation(validation: datasets.Dataset, max_eval_samples: int | None, seed: int) -> datasets.Dataset:
    """At most `max_eval_samples` validation blocks: a seeded random subset (the corpus is ordered by source, so the
    first blocks would be from a few sources only), the same at every start and resume."""
    if max_eval_samples is None or max_eval_samples >= len(validation):
        return validation
    return validation.shuffle(seed=seed).select(range(max_eval_samples))


def pretokenized_blocks(data_args: DataArguments, tokenizer, block_size: int) -> datasets.DatasetDict:
    """The blocks of `tokenized_dataset`, built there first from the corpus keys when the folder does not exist yet
    (for a large corpus run `tinyllm pretokenize` before launching several processes, which would wait meanwhile)."""
    if data_args.streaming:
        raise UsageError("tokenized_dataset and streaming exclude each other: pre-tokenized blocks are read from disk; "
                         "remove streaming: true")
    inputs = pretokenized_inputs(data_args.dataset_name, tokenizer, block_size, data_args.text_field,
                                 data_args.dataset_config)
    if not Path(data_args.tokenized_dataset).exists():
        pretokenize(data_args.dataset_name, tokenizer, block_size, data_args.tokenized_dataset,
                    text_field=data_args.text_field, dataset_config=data_args.dataset_config,
                    num_proc=data_args.preprocessing_num_workers)
    return load_pretokenized(data_args.tokenized_dataset, inputs)


def train(model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments, run_args: RunArguments,
          callbacks: list | None = None) -> dict:
    """Pretrain and save; `callbacks` are extra `TrainerCallback`s (bench/speedrun.py's clock)."""
    set_seed(args.seed)
    tokenizer = load_tokenizer(data_args.tokenizer_name_or_path, model_args.trust_remote_code)
    model = build_model(model_args, tokenizer)
    context = model_context(model.config)
    block_size = data_args.block_size or context
    if block_size > context:
        raise UsageError(f"block_size {block_size} exceeds the model's context of {context} tokens "
                         "(max_position_embeddings; extend it with rope_scaling, e.g. yarn:4)")
    if data_args.tokenized_dataset and args.accelerator_config.dispatch_batches:
        raise UsageError("accelerator_config dispatch_batches: true would send every batch from process 0; with "
                         "tokenized_dataset each process reads its own blocks: leave dispatch_batches unset")
    fit_global_batch(args, run_args, block_size)
    with args.main_process_first(desc="tokenizing and packing"):
        train_dataset, eval_dataset = build_datasets(data_args, tokenizer, block_size, args.seed if args.data_seed is None else args.data_seed)
    entropy = unigram_entropy(eval_dataset, len(tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    logger.warning(
        f"model: {n_params / 1e6:.2f}M parameters; blocks of {block_size} tokens: "
        f"{len(train_dataset) if hasattr(train_dataset, '__len__') else 'streamed'} train, {len(eval_dataset)} validation; "
        f"validation unigram entropy {entropy:.3f} nats/token"
    )

    trainer = PretrainTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collate_blocks,
        processing_class=tokenizer,
        callbacks=[*([LossCurveCallback({"validation unigram entropy": entropy})] if run_args.loss_curve else []),
                   *(callbacks or [])],
    )
    tokens_per_step = args.train_batch_size * args.gradient_accumulation_steps * args.world_size * block_size
    add_callback_first(
        trainer,
        ThroughputCallback(matmul_flops_per_token(model, block_size), tokens_per_step, run_args.peak_flops, peak_dtype(args)),
    )
    def evaluate(trainer) -> dict:
        metrics = final_eval_metrics(trainer)
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50))
        metrics["eval_unigram_entropy"] = entropy
        return metrics

    return train_and_save(trainer, run_args, evaluate if args.eval_strategy != "no" or args.do_eval else None)


# The recipe's sections, in the order `parse_recipe` returns them.
ARGUMENTS = [ModelArguments, DataArguments, TrainingArguments, RunArguments]


def main(argv: list[str] | None = None) -> int:
    return run_stage("tinyllm pretrain", ARGUMENTS, DEFAULTS, train, argv)


if __name__ == "__main__":
    from tinyllm_hf.cli import run_command

    sys.exit(run_command("tinyllm pretrain", main))
