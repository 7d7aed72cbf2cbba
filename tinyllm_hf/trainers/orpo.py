"""Odds-ratio preference optimisation (ORPO) of a chat model with TRL's experimental ORPOTrainer.

    python -m tinyllm_hf.trainers.orpo --config recipes/orpo/quickstart.yaml [--beta 0.1]

ORPO adds a preference term (the log odds ratio of chosen over rejected, weighted by `beta`) to the usual supervised
loss on the chosen answer, so it needs no reference model and can start from a base or an SFT model. Same preference
data as DPO. Keys: `PreferenceDataArguments`, TRL's `ModelConfig` and `trl.experimental.orpo.ORPOConfig`. TRL keeps
ORPO under `trl.experimental`: its API may change between TRL releases.
"""

import sys

from trl import ModelConfig
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from tinyllm_hf.trainers.alignment import PreferenceDataArguments, trl_defaults
from tinyllm_hf.trainers.common import NonFiniteLossError, ReliableTrainerMixin, RunArguments, parse_recipe
from tinyllm_hf.trainers.dpo import train

# The recipe's sections, in the order `parse_recipe` returns them.
ARGUMENTS = [PreferenceDataArguments, ModelConfig, ORPOConfig, RunArguments]
DEFAULTS = trl_defaults("outputs/orpo", max_length=256)


class TinyllmORPOTrainer(ReliableTrainerMixin, ORPOTrainer):
    """TRL's ORPOTrainer with atomic checkpoints and a stop on non-finite loss."""


def main(argv: list[str] | None = None) -> int:
    try:
        data_args, model_args, training_args, run_args = parse_recipe(
            ARGUMENTS, argv, defaults=DEFAULTS, prog="python -m tinyllm_hf.trainers.orpo"
        )
        train(data_args, model_args, training_args, run_args, trainer_class=TinyllmORPOTrainer)
    except (ValueError, FileNotFoundError, NonFiniteLossError) as err:
        print(f"orpo: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
