"""Kahneman-Tversky optimisation (KTO) of a chat model with TRL's KTOTrainer.

    tinyllm kto --config recipes/kto/quickstart.yaml [--desirable_weight 1.0]

KTO learns from answers labelled good or bad one at a time rather than from pairs. The preference data is the same as
for DPO (the embedded set or your own prompt/chosen/rejected files); TRL splits each pair into a desirable (chosen) and
an undesirable (rejected) example. Keys: `PreferenceDataArguments`, TRL's `ModelConfig` and `KTOConfig` (beta,
desirable_weight, undesirable_weight, ...). The reference model is a frozen copy of the starting policy.
"""

import sys
from functools import partial

from trl import KTOConfig, KTOTrainer, ModelConfig

from tinyllm_hf.trainers.alignment import PreferenceDataArguments, train_offline, trl_defaults
from tinyllm_hf.trainers.common import ReliableTrainerMixin, RunArguments, run_stage

# The recipe's sections, in the order `parse_recipe` returns them.
ARGUMENTS = [PreferenceDataArguments, ModelConfig, KTOConfig, RunArguments]
DEFAULTS = trl_defaults("outputs/kto", precompute_ref_log_probs=True, max_length=256)


class TinyllmKTOTrainer(ReliableTrainerMixin, KTOTrainer):
    """TRL's KTOTrainer with atomic checkpoints and a stop on non-finite loss."""


train = partial(train_offline, TinyllmKTOTrainer)  # called with the ARGUMENTS instances, in order


def main(argv: list[str] | None = None) -> int:
    return run_stage("tinyllm kto", ARGUMENTS, DEFAULTS, train, argv)


if __name__ == "__main__":
    from tinyllm_hf.cli import run_command

    sys.exit(run_command("tinyllm kto", main))
