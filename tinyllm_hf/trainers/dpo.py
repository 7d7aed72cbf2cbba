"""Direct preference optimisation of a chat model with TRL's DPOTrainer.

    tinyllm dpo --config recipes/dpo/quickstart.yaml [--model_name_or_path runs/x/sft] [--beta 0.1] [--loss_type ipo]
    accelerate launch -m tinyllm_hf.trainers.dpo --config ...

The recipe holds the keys of `PreferenceDataArguments`, TRL's `ModelConfig` (model path, LoRA) and `DPOConfig`
(beta, loss_type: sigmoid, ipo, hinge, ...). The reference model is a frozen copy of the starting policy (with LoRA:
the policy with its adapter disabled), and its log-probabilities are computed once up front by default.
"""

import sys
from functools import partial

from trl import DPOConfig, DPOTrainer, ModelConfig

from tinyllm_hf.trainers.alignment import PreferenceDataArguments, train_offline, trl_defaults
from tinyllm_hf.trainers.common import ReliableTrainerMixin, RunArguments, run_stage

# The recipe's sections, in the order `parse_recipe` returns them.
ARGUMENTS = [PreferenceDataArguments, ModelConfig, DPOConfig, RunArguments]
DEFAULTS = trl_defaults("outputs/dpo", precompute_ref_log_probs=True, max_length=256)


class TinyllmDPOTrainer(ReliableTrainerMixin, DPOTrainer):
    """TRL's DPOTrainer with atomic checkpoints and a stop on non-finite loss."""


train = partial(train_offline, TinyllmDPOTrainer)  # called with the ARGUMENTS instances, in order


def main(argv: list[str] | None = None) -> int:
    return run_stage("tinyllm dpo", ARGUMENTS, DEFAULTS, train, argv)


if __name__ == "__main__":
    from tinyllm_hf.cli import run_command

    sys.exit(run_command("tinyllm dpo", main))
