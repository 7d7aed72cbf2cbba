"""On-policy RLHF with TRL's RLOOTrainer (REINFORCE with a leave-one-out baseline): sample several answers per prompt,
score them with the reward functions; each answer's advantage is its reward minus the mean reward of the others.

    tinyllm rloo --config recipes/rloo/quickstart.yaml [--model_name_or_path runs/x/sft] [--max_steps 20]
    accelerate launch -m tinyllm_hf.trainers.rloo --config recipes/rloo/vllm.yaml     # GPU, vLLM rollouts

The recipe holds the keys of `PromptDataArguments` (the prompts: the embedded checkable questions by default),
`RewardArguments` (which rewards: correctness, format, reward_model, and the reward model's folder), TRL's
`ModelConfig` (model path, LoRA) and `RLOOConfig` (num_generations, temperature/top_k, beta, reward_weights, use_vllm,
...). Rollouts use `model.generate` (works on a CPU); `use_vllm: true` switches them to vLLM on GPUs.
"""

import sys
from functools import partial

from trl import ModelConfig, RLOOConfig, RLOOTrainer

from tinyllm_hf.trainers.alignment import PromptDataArguments, online_defaults, train_online
from tinyllm_hf.trainers.common import ReliableTrainerMixin, RunArguments, run_stage
from tinyllm_hf.trainers.rewards import RewardArguments

# The recipe's sections, in the order `parse_recipe` returns them.
ARGUMENTS = [PromptDataArguments, RewardArguments, ModelConfig, RLOOConfig, RunArguments]
DEFAULTS = online_defaults("outputs/rloo")


class TinyllmRLOOTrainer(ReliableTrainerMixin, RLOOTrainer):
    """TRL's RLOOTrainer with atomic checkpoints and a stop on non-finite loss."""


train = partial(train_online, TinyllmRLOOTrainer)  # called with the ARGUMENTS instances, in order


def main(argv: list[str] | None = None) -> int:
    return run_stage("tinyllm rloo", ARGUMENTS, DEFAULTS, train, argv)


if __name__ == "__main__":
    from tinyllm_hf.cli import run_command

    sys.exit(run_command("tinyllm rloo", main))
