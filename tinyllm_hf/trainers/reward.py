"""Reward model training with TRL's RewardTrainer on `TinyllmForSequenceClassification` (num_labels=1).

    tinyllm reward --config recipes/reward/quickstart.yaml [--model_name_or_path runs/x/sft]

The reward model starts from a chat model (usually the SFT checkpoint) with a fresh scalar head and learns to score
the chosen answer of a pair above the rejected one. At the end its pairwise accuracy on held-out pairs is measured
and written to `output_dir/pairwise_accuracy.json`.
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, set_seed
from trl import ModelConfig, RewardConfig, RewardTrainer

from tinyllm_hf.trainers.alignment import (
    PreferenceDataArguments,
    check_run_args,
    finish,
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
ARGUMENTS = [PreferenceDataArguments, ModelConfig, RewardConfig, RunArguments]
DEFAULTS = trl_defaults("outputs/reward", max_length=256)


class TinyllmRewardTrainer(ReliableTrainerMixin, RewardTrainer):
    """TRL's RewardTrainer with atomic checkpoints and a stop on non-finite loss."""


@torch.no_grad()
def reward_scores(model, tokenizer, conversations: list[list[dict]], batch_size: int = 16, max_length: int = 256):
    """The scalar reward of each full conversation, rendered with the tokenizer's chat template."""
    model.eval()
    scores = []
    for start in range(0, len(conversations), batch_size):
        texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations[start:start + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                          add_special_tokens=False).to(model.device)
        scores += model(**batch).logits[:, 0].float().tolist()
    return scores


def pairwise_accuracy(model, tokenizer, pairs, max_length: int = 256) -> float:
    """Share of pairs whose chosen conversation gets a higher reward than the rejected one."""
    chosen = reward_scores(model, tokenizer, [p["prompt"] + p["chosen"] for p in pairs], max_length=max_length)
    rejected = reward_scores(model, tokenizer, [p["prompt"] + p["rejected"] for p in pairs], max_length=max_length)
    return sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)


def train(data_args: PreferenceDataArguments, model_args: ModelConfig, args: RewardConfig, run_args: RunArguments) -> dict:
    check_run_args(run_args)
    set_seed(args.seed)
    tokenizer = load_tokenizer(model_args)
    train_dataset, eval_dataset = preference_datasets(data_args, args.seed)
    if eval_dataset is None:
        args.eval_strategy = "no"
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path, num_labels=1, pad_token_id=tokenizer.pad_token_id,
        attn_implementation=model_args.attn_implementation or "sdpa",
    )
    trainer = TinyllmRewardTrainer(
        model=model,
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
    metrics = dict(result.metrics)
    if eval_dataset is not None:
        accuracy = pairwise_accuracy(trainer.model, tokenizer, eval_dataset, args.max_length or 256)
        metrics["heldout_pairwise_accuracy"] = accuracy
        if args.should_save:
            Path(args.output_dir, "pairwise_accuracy.json").write_text(
                json.dumps({"heldout_pairs": len(eval_dataset), "pairwise_accuracy": accuracy}, indent=2) + "\n"
            )
        print(f"reward model: pairwise accuracy {accuracy:.3f} on {len(eval_dataset)} held-out pairs")
    finish(trainer, args, metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    try:
        data_args, model_args, training_args, run_args = parse_recipe(
            ARGUMENTS, argv, defaults=DEFAULTS,
            prog="tinyllm reward",
        )
        train(data_args, model_args, training_args, run_args)
    except (ValueError, FileNotFoundError, NonFiniteLossError) as err:
        print(f"tinyllm reward: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
