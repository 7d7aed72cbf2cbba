"""Direct preference optimisation of a chat model with TRL's DPOTrainer.

    tinyllm dpo --config recipes/dpo/quickstart.yaml [--model_name_or_path runs/x/sft] [--beta 0.1] [--loss_type ipo]
    accelerate launch -m tinyllm_hf.trainers.dpo --config ...

The recipe holds the keys of `PreferenceDataArguments`, TRL's `ModelConfig` (model path, LoRA) and `DPOConfig`
(beta, loss_type: sigmoid, ipo, hinge, ...). The reference model is a frozen copy of the starting policy (with LoRA:
the policy with its adapter disabled), and its log-probabilities are computed once up front by default.
"""

import sys

from transformers import set_seed
from trl import DPOConfig, DPOTrainer, ModelConfig

from tinyllm_hf.trainers.alignment import (
    PreferenceDataArguments,
    check_run_args,
    finish,
    load_policy,
    load_tokenizer,
    peft_config,
    preference_datasets,
    trl_defaults,
)
from tinyllm_hf.trainers.common import (
    LossCurveCallback,
    NonFiniteLossError,
    ReliableTrainerMixin,
    RunArguments,
    latest_checkpoint,
    parse_recipe,
    remove_staging_dirs,
)

# The recipe's sections, in the order `parse_recipe` returns them.
ARGUMENTS = [PreferenceDataArguments, ModelConfig, DPOConfig, RunArguments]
DEFAULTS = trl_defaults("outputs/dpo", precompute_ref_log_probs=True, max_length=256)


class TinyllmDPOTrainer(ReliableTrainerMixin, DPOTrainer):
    """TRL's DPOTrainer with atomic checkpoints and a stop on non-finite loss."""


def train(data_args: PreferenceDataArguments, model_args: ModelConfig, args: DPOConfig, run_args: RunArguments,
          trainer_class=TinyllmDPOTrainer) -> dict:
    """Offline preference optimisation; `trainer_class` is any trainer taking the same arguments (KTO reuses it)."""
    check_run_args(run_args)
    set_seed(args.seed)
    tokenizer = load_tokenizer(model_args)
    train_dataset, eval_dataset = preference_datasets(data_args, args.seed)
    if eval_dataset is None:
        args.eval_strategy = "no"
    trainer = trainer_class(
        model=load_policy(model_args, tokenizer),
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config(model_args),
        callbacks=[LossCurveCallback()] if run_args.loss_curve else None,
    )
    if args.should_save:
        remove_staging_dirs(args.output_dir)
    result = trainer.train(resume_from_checkpoint=latest_checkpoint(args.output_dir) if run_args.resume else None)
    finish(trainer, args, result.metrics)
    metrics = dict(result.metrics)
    if eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    try:
        data_args, model_args, training_args, run_args = parse_recipe(
            ARGUMENTS, argv, defaults=DEFAULTS, prog="tinyllm dpo"
        )
        train(data_args, model_args, training_args, run_args)
    except (ValueError, FileNotFoundError, NonFiniteLossError) as err:
        print(f"tinyllm dpo: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
