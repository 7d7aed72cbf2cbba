"""Reward model training with TRL's RewardTrainer on `TinyllmForSequenceClassification` (num_labels=1).

    tinyllm reward --config recipes/reward/quickstart.yaml [--model_name_or_path runs/x/sft]

The reward model starts from a chat model (usually the SFT checkpoint) with a fresh scalar head and learns to score
the chosen answer of a pair above the rejected one (by at least the pair's `margin`, when your pairs give one). At the
end its pairwise accuracy on held-out pairs is measured and written to `output_dir/pairwise_accuracy.json`.
"""

import json
import sys
from functools import partial
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, set_seed
from trl import ModelConfig, RewardConfig, RewardTrainer

from tinyllm_hf.model_utils import get_model
from tinyllm_hf.runs import PAIRWISE_ACCURACY_FILE
from tinyllm_hf.trainers.alignment import (
    PAIR_COLUMNS,
    PreferenceDataArguments,
    check_run_args,
    load_tokenizer,
    preference_datasets,
    trl_defaults,
)
from tinyllm_hf.trainers.common import (
    ReliableTrainerMixin,
    RunArguments,
    build_trainer,
    fit_global_batch,
    run_stage,
    train_and_save,
    training_dtype,
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


def pairwise_wins(model, tokenizer, pairs, max_length: int = 256) -> list[bool]:
    """For each pair, whether the chosen conversation gets a higher reward than the rejected one."""
    chosen = reward_scores(model, tokenizer, [p["prompt"] + p["chosen"] for p in pairs], max_length=max_length)
    rejected = reward_scores(model, tokenizer, [p["prompt"] + p["rejected"] for p in pairs], max_length=max_length)
    return [c > r for c, r in zip(chosen, rejected)]


def heldout_accuracy(trainer, tokenizer, pairs) -> dict:
    """The reward model's pairwise accuracy on the held-out pairs, overall and per task where the pairs name one,
    also written to output_dir/pairwise_accuracy.json."""
    wins = pairwise_wins(trainer.model, tokenizer, pairs, trainer.args.max_length or 256)
    accuracy = sum(wins) / len(wins)
    result = {"heldout_pairs": len(pairs), "pairwise_accuracy": accuracy}
    if "task" in pairs.column_names:
        by_task = {}
        for task, win in zip(pairs["task"], wins):
            by_task.setdefault(task, []).append(win)
        result["per_task"] = {task: {"pairs": len(w), "pairwise_accuracy": sum(w) / len(w)}
                              for task, w in sorted(by_task.items())}
    if trainer.args.should_save:
        Path(trainer.args.output_dir, PAIRWISE_ACCURACY_FILE).write_text(json.dumps(result, indent=2) + "\n")
    per_task = result.get("per_task", {})
    tasks = "".join(f"; {t} {r['pairwise_accuracy']:.3f} (n={r['pairs']})" for t, r in per_task.items())
    print(f"reward model: pairwise accuracy {accuracy:.3f} on {len(pairs)} held-out pairs{tasks}")
    return {"heldout_pairwise_accuracy": accuracy}


def train(data_args: PreferenceDataArguments, model_args: ModelConfig, args: RewardConfig, run_args: RunArguments) -> dict:
    check_run_args(run_args)
    set_seed(args.seed)
    tokenizer = load_tokenizer(model_args, args.trust_remote_code)
    train_dataset, heldout_pairs = preference_datasets(data_args, args.seed, eval_extra_columns=("task",),
                                                       train_extra_columns=("margin",), args=args)
    eval_dataset = heldout_pairs.select_columns(PAIR_COLUMNS) if heldout_pairs is not None else None
    if eval_dataset is None:
        args.eval_strategy = "no"
    fit_global_batch(args, run_args)
    model = get_model(model_args.model_name_or_path, auto_class=AutoModelForSequenceClassification, num_labels=1,
                      pad_token_id=tokenizer.pad_token_id, attn_implementation=model_args.attn_implementation or "sdpa",
                      dtype=training_dtype(model_args, args), trust_remote_code=args.trust_remote_code)
    trainer = build_trainer(TinyllmRewardTrainer, model, args, tokenizer, model_args, run_args,
                            train_dataset=train_dataset, eval_dataset=eval_dataset)
    evaluate = None if heldout_pairs is None else partial(heldout_accuracy, tokenizer=tokenizer, pairs=heldout_pairs)
    return train_and_save(trainer, run_args, evaluate)


def main(argv: list[str] | None = None) -> int:
    return run_stage("tinyllm reward", ARGUMENTS, DEFAULTS, train, argv)


if __name__ == "__main__":
    from tinyllm_hf.cli import run_command

    sys.exit(run_command("tinyllm reward", main))
