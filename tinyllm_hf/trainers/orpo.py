"""Odds-ratio preference optimisation (ORPO) of a chat model with TRL's experimental ORPOTrainer.

    tinyllm orpo --config recipes/orpo/quickstart.yaml [--beta 0.1]

ORPO adds a preference term (the log odds ratio of chosen over rejected, weighted by `beta`) to the usual supervised
loss on the chosen answer, so it needs no reference model and can start from a base or an SFT model. Same preference
data as DPO. Keys: `PreferenceDataArguments`, TRL's `ModelConfig` and `trl.experimental.orpo.ORPOConfig`. TRL keeps
ORPO under `trl.experimental`: its API may change between TRL releases.
"""

import sys
from functools import partial

from trl import ModelConfig
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from tinyllm_hf.trainers.alignment import PreferenceDataArguments, train_offline, trl_defaults
from tinyllm_hf.trainers.common import ReliableTrainerMixin, RunArguments, run_stage

# The recipe's sections, in the order `parse_recipe` returns them.
ARGUMENTS = [PreferenceDataArguments, ModelConfig, ORPOConfig, RunArguments]
DEFAULTS = trl_defaults("outputs/orpo", max_length=256)


class TinyllmORPOTrainer(ReliableTrainerMixin, ORPOTrainer):
    """TRL's ORPOTrainer with atomic checkpoints and a stop on non-finite loss."""


train = partial(train_offline, TinyllmORPOTrainer)  # called with the ARGUMENTS instances, in order


def main(argv: list[str] | None = None) -> int:
    return run_stage("tinyllm orpo", ARGUMENTS, DEFAULTS, train, argv)


if __name__ == "__main__":
    from tinyllm_hf.cli import run_command

    sys.exit(run_command("tinyllm orpo", main))
