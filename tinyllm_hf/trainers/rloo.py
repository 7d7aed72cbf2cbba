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

from trl import ModelConfig, RLOOConfig, RLOOTrainer

from tinyllm_hf.trainers.alignment import PromptDataArguments, train_online, trl_defaults
from tinyllm_hf.trainers.common import NonFiniteLossError, ReliableTrainerMixin, RunArguments, parse_recipe
from tinyllm_hf.trainers.rewards import RewardArguments

# The recipe's sections, in the order `parse_recipe` returns them.
ARGUMENTS = [PromptDataArguments, RewardArguments, ModelConfig, RLOOConfig, RunArguments]
# A small model sampling from its full distribution (TRL's default top_k=0, temperature 1) mostly produces garbage that
# earns no reward: sample from its few most likely tokens instead.
DEFAULTS = trl_defaults("outputs/rloo", num_generations=4, per_device_train_batch_size=8, max_completion_length=64,
                        temperature=0.8, top_k=20, learning_rate=1e-5, log_completions=False)


class TinyllmRLOOTrainer(ReliableTrainerMixin, RLOOTrainer):
    """TRL's RLOOTrainer with atomic checkpoints and a stop on non-finite loss."""


def main(argv: list[str] | None = None) -> int:
    try:
        data_args, reward_args, model_args, training_args, run_args = parse_recipe(
            ARGUMENTS, argv, defaults=DEFAULTS,
            prog="tinyllm rloo",
        )
        train_online(TinyllmRLOOTrainer, data_args, reward_args, model_args, training_args, run_args)
    except (ValueError, FileNotFoundError, NonFiniteLossError) as err:
        print(f"tinyllm rloo: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
