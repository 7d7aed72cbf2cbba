"""On-policy RLHF with TRL's GRPOTrainer: sample a group of answers per prompt, score them with the reward functions,
push the policy towards the answers that beat their group's mean.

    tinyllm grpo --config recipes/grpo/quickstart.yaml [--model_name_or_path runs/x/sft] [--max_steps 20]
    accelerate launch -m tinyllm_hf.trainers.grpo --config recipes/grpo/vllm.yaml     # GPU, vLLM rollouts

The recipe holds the keys of `PromptDataArguments` (the prompts: the embedded checkable questions by default),
`RewardArguments` (which rewards: correctness, format, reward_model, and the reward model's folder), TRL's
`ModelConfig` (model path, LoRA) and `GRPOConfig` (num_generations, temperature/top_k, beta, reward_weights, use_vllm,
...). Rollouts use `model.generate` (works on a CPU); `use_vllm: true` switches them to vLLM on GPUs.
"""

import sys

from trl import GRPOConfig, GRPOTrainer, ModelConfig

from tinyllm_hf.trainers.alignment import PromptDataArguments, train_online, trl_defaults
from tinyllm_hf.trainers.common import NonFiniteLossError, ReliableTrainerMixin, RunArguments, parse_recipe
from tinyllm_hf.trainers.rewards import RewardArguments

# The recipe's sections, in the order `parse_recipe` returns them.
ARGUMENTS = [PromptDataArguments, RewardArguments, ModelConfig, GRPOConfig, RunArguments]
# A small model sampling from its full distribution (TRL's default top_k=0, temperature 1) mostly produces garbage that
# earns no reward: sample from its few most likely tokens instead.
DEFAULTS = trl_defaults("outputs/grpo", num_generations=4, per_device_train_batch_size=8, max_completion_length=64,
                        temperature=0.8, top_k=20, learning_rate=1e-5, beta=0.04, log_completions=False)


class TinyllmGRPOTrainer(ReliableTrainerMixin, GRPOTrainer):
    """TRL's GRPOTrainer with atomic checkpoints and a stop on non-finite loss."""


def main(argv: list[str] | None = None) -> int:
    try:
        data_args, reward_args, model_args, training_args, run_args = parse_recipe(
            ARGUMENTS, argv, defaults=DEFAULTS,
            prog="tinyllm grpo",
        )
        train_online(TinyllmGRPOTrainer, data_args, reward_args, model_args, training_args, run_args)
    except (ValueError, FileNotFoundError, NonFiniteLossError) as err:
        print(f"tinyllm grpo: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
