"""On-policy RLHF with TRL's GRPOTrainer: sample a group of answers per prompt, score them with the reward functions,
push the policy towards the answers that beat their group's mean.

    tinyllm grpo --config recipes/grpo/quickstart.yaml [--model_name_or_path runs/x/sft] [--max_steps 20]
    tinyllm grpo --config recipes/grpo/tools-quickstart.yaml                          # tool use: tools: builtin
    accelerate launch -m tinyllm_hf.trainers.grpo --config recipes/grpo/vllm.yaml     # GPU, vLLM rollouts

The recipe holds the keys of `PromptDataArguments` (the prompts: the embedded checkable questions by default),
`ToolArguments` (`tools: builtin` offers the built-in tools in every prompt; TRL runs the calls during generation),
`RewardArguments` (which rewards: correctness, format, reward_model, and the reward model's folder), TRL's
`ModelConfig` (model path, LoRA) and `GRPOConfig` (num_generations, temperature/top_k, beta, reward_weights, use_vllm,
...). Rollouts use `model.generate` (works on a CPU); `use_vllm: true` switches them to vLLM on GPUs.
"""

import sys

from trl import GRPOConfig, GRPOTrainer, ModelConfig

from tinyllm_hf.trainers.alignment import PromptDataArguments, ToolArguments, online_defaults, train_online
from tinyllm_hf.trainers.common import ReliableTrainerMixin, RunArguments, run_stage
from tinyllm_hf.trainers.rewards import RewardArguments

# The recipe's sections, in the order `parse_recipe` returns them.
ARGUMENTS = [PromptDataArguments, ToolArguments, RewardArguments, ModelConfig, GRPOConfig, RunArguments]
DEFAULTS = online_defaults("outputs/grpo", beta=0.04)


class TinyllmGRPOTrainer(ReliableTrainerMixin, GRPOTrainer):
    """TRL's GRPOTrainer with atomic checkpoints and a stop on non-finite loss."""


def train(data_args: PromptDataArguments, tool_args: ToolArguments, reward_args: RewardArguments,
          model_args: ModelConfig, args: GRPOConfig, run_args: RunArguments) -> dict:
    return train_online(TinyllmGRPOTrainer, data_args, reward_args, model_args, args, run_args,
                        toolbox=tool_args.toolbox())


def main(argv: list[str] | None = None) -> int:
    return run_stage("tinyllm grpo", ARGUMENTS, DEFAULTS, train, argv)


if __name__ == "__main__":
    from tinyllm_hf.cli import run_command

    sys.exit(run_command("tinyllm grpo", main))
