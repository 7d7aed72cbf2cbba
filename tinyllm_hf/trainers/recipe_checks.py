"""The checks every training stage runs on its recipe before it loads data or a model.

A value of the wrong type, sign or size either crashes a run late (after data preparation, or in TRL's own config
checks with a ZeroDivisionError) or trains silently wrong: `beta: -1` makes DPO prefer the rejected answers,
`max_steps: 0` trains one step and exits 0, `learning_rate: 0` changes nothing. `parse_recipe` calls

- `coerce_recipe_value` on each value of the YAML recipe (and the stage's defaults) before it becomes a parser
  default: the type the field declares (`max_steps: [1, 2]`, `learning_rate: null` are refused; YAML's string "1e-5"
  becomes a float), and
- `check_recipe_values` on the parsed values (recipe < command line) before the argument dataclasses are built: the
  ranges of `VALUE_RULES`, which apply to a key in whichever stage has it, and the paths the stage reads and writes.

Each problem is a one-line UsageError naming the key, the value, where it was set and what to give instead.
"""

import dataclasses
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path

from trl import GRPOConfig, RLOOConfig

from tinyllm_hf.data.corpus import is_local_source
from tinyllm_hf.errors import MissingFileError, OutputExistsError, TinyllmError, UsageError
from tinyllm_hf.model_utils import check_local_folder
from tinyllm_hf.options import comma_list
from tinyllm_hf.rope_scaling import parse_rope_scaling

# --------------------------------------------------------------------------------------------------------------------
# Types: what a recipe value must be for the field it sets
# --------------------------------------------------------------------------------------------------------------------

_KIND_NAMES = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}


def field_types(dataclass_types) -> dict[str, tuple[type | None, bool, object]]:
    """{field name: (scalar type or None when it is not one of int/float/bool/str, whether None is accepted, the
    default)} of every init field of `dataclass_types`."""
    kinds = {}
    for cls in dataclass_types:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            hint = hints.get(f.name, f.type)
            args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
            scalars = [a for a in args if a is not type(None)]
            kind = scalars[0] if len(scalars) == 1 and scalars[0] in _KIND_NAMES else None
            default = f.default if f.default is not dataclasses.MISSING else None
            kinds[f.name] = (kind, type(None) in args or default is None, default)
    return kinds


def coerce_recipe_value(name: str, value, kind: type | None, accepts_none: bool, default, origin: str):
    """`value` as the field's type, or a UsageError: null where the field needs a value, a list or mapping where it
    needs a number, a word that is not a number. A string for a number is converted (YAML reads 1e-5 as a string)."""
    if value is None:
        if accepts_none:
            return None
        raise UsageError(f"{name}: null is not accepted ({origin}); give {_KIND_NAMES.get(kind, 'a value')}, or leave "
                         f"the key out for the default {default!r}")
    if kind in (int, float):
        if isinstance(value, str):
            try:
                return kind(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if kind is float:
                return float(value)
            if float(value).is_integer():
                return int(value)
        raise UsageError(f"{name} must be {_KIND_NAMES[kind]}, not {value!r} ({origin}); e.g. {name}: {default!r}")
    if kind in (bool, str) and isinstance(value, (list, dict)):
        raise UsageError(f"{name} must be {_KIND_NAMES[kind]}, not {value!r} ({origin})")
    return value


# --------------------------------------------------------------------------------------------------------------------
# Ranges: the values that would train silently wrong (or crash late)
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
    """`accepts(value)` must hold for a key's value (None, where a field allows it, means "not set" and passes)."""

    accepts: Callable[[float], bool]
    requirement: str  # "above 0": completes "beta must be ..."
    advice: str = ""  # why, or what to give instead


def above(low: float, advice: str = "") -> Rule:
    return Rule(lambda v: v > low, f"above {low:g}", advice)


def at_least(low: float, advice: str = "") -> Rule:
    return Rule(lambda v: v >= low, f"at least {low:g}", advice)


def within(low: float, high: float, advice: str = "", high_open: bool = False) -> Rule:
    if high_open:
        return Rule(lambda v: low <= v < high, f"in [{low:g}, {high:g})", advice)
    return Rule(lambda v: low <= v <= high, f"in [{low:g}, {high:g}]", advice)


LENGTH = at_least(1, "a length in tokens; leave it out for the default")

# One rule per key, whichever stage's dataclass has it (TrainingArguments, TRL's configs and ModelConfig, ours).
VALUE_RULES: dict[str, Rule] = {
    # transformers.TrainingArguments (every stage)
    "learning_rate": above(0, "a learning rate of 0 or less never moves the weights or moves them the wrong way; "
                              "e.g. 5e-5"),
    "per_device_train_batch_size": at_least(1),
    "per_device_eval_batch_size": at_least(1),
    "gradient_accumulation_steps": at_least(1),
    "warmup_steps": at_least(0, "a step count, or a fraction of the run below 1"),
    "weight_decay": at_least(0),
    "max_grad_norm": at_least(0, "0 turns gradient clipping off"),
    "adam_beta1": within(0, 1, high_open=True),
    "adam_beta2": within(0, 1, high_open=True),
    "adam_epsilon": above(0),
    "label_smoothing_factor": within(0, 1, high_open=True),
    "dataloader_num_workers": at_least(0),
    # TRL's configs
    "max_length": LENGTH,
    "max_completion_length": LENGTH,
    "beta": above(0, "beta weighs the preference term: 0 learns nothing from the pairs, a negative beta learns to "
                     "prefer the rejected answers; e.g. 0.1"),
    "label_smoothing": within(0, 0.5, "the assumed share of mislabelled pairs"),
    "desirable_weight": above(0),
    "undesirable_weight": above(0),
    "num_generations": at_least(2, "the advantage of a completion is its reward against the others of its group, so "
                                   "a group needs 2 or more"),
    "num_generations_eval": at_least(2),
    "num_iterations": at_least(1),
    "steps_per_generation": at_least(1),
    "temperature": above(0, "sampling needs a temperature above 0"),
    "top_p": Rule(lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": at_least(0, "0 turns top-k sampling off"),
    "epsilon": above(0, "the PPO-style clipping range"),
    "epsilon_high": above(0),
    "center_rewards_coefficient": at_least(0),
    "lmbda": within(0, 1, "the share of steps trained on the student's own generations (GKD's on-policy share)"),
    # TRL's ModelConfig (LoRA)
    "lora_r": at_least(1, "the adapter's rank"),
    "lora_alpha": above(0),
    "lora_dropout": within(0, 1, high_open=True),
    # tinyllm's own arguments
    "block_size": LENGTH,
    "max_eval_samples": at_least(0),
    "shuffle_buffer_size": at_least(1),
    "preprocessing_num_workers": at_least(1),
    "max_completion_chars": at_least(1),
}

# beta is the weight of the KL penalty here, where 0 (no reference model) is valid: only a negative one is wrong.
KL_BETA_CONFIGS = (GRPOConfig, RLOOConfig)
KL_BETA = at_least(0, "beta weighs the KL penalty towards the reference model: 0 turns it off, a negative one pushes "
                      "the policy away from it")


# In distillation beta chooses the divergence itself (GKD's generalised Jensen-Shannon divergence): 0 is the forward
# KL, 1 the reverse KL, in between the JSD of the teacher and student mixed in that proportion.
JSD_BETA = within(0, 1, "beta is the JSD's mixture weight: 0 is the forward KL, 1 the reverse KL")
# The divergences a distillation recipe names, and the GKD beta of each (None: the recipe's beta, in [0, 1]).
DIVERGENCES = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": None}


def rule_for(name: str, dataclass_types, values: dict) -> Rule | None:
    if name == "beta" and "divergence" in values:
        return JSD_BETA
    if name == "beta" and any(issubclass(cls, KL_BETA_CONFIGS) for cls in dataclass_types):
        return KL_BETA
    return VALUE_RULES.get(name)


def check_divergence(values: dict, origin: Callable[[str], str]) -> None:
    """The distillation stage's `divergence` is one of DIVERGENCES, and `beta`, the JSD's mixture weight, is set only
    with `jsd` (forward_kl and reverse_kl fix it; a beta set beside them would be silently replaced)."""
    divergence = values["divergence"]
    if divergence not in DIVERGENCES:
        raise UsageError(f"divergence must be one of {', '.join(DIVERGENCES)}, not {divergence!r} "
                         f"({origin('divergence')})")
    if DIVERGENCES[divergence] is not None and origin("beta") != "the stage's defaults":
        raise UsageError(f"beta is the mixture weight of divergence jsd, but divergence is {divergence} (beta "
                         f"{DIVERGENCES[divergence]:g}); remove beta ({origin('beta')}) or set divergence: jsd")


def check_recipe_values(dataclass_types, values: dict, origin: Callable[[str], str]) -> None:
    """Raise a one-line UsageError for the first value of `values` (the parsed recipe and flags) that `VALUE_RULES`
    refuses, for a run that would train nothing, or for a path the stage cannot use. `origin(name)` says where a key
    was set ("command line", "recipe r.yaml")."""
    for name, value in values.items():
        rule = rule_for(name, dataclass_types, values)
        if rule is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not rule.accepts(value):
            advice = f"; {rule.advice}" if rule.advice else ""
            raise UsageError(f"{name} must be {rule.requirement}, not {value!r} ({origin(name)}){advice}")
    max_steps = values.get("max_steps")
    if max_steps is not None and max_steps != -1 and max_steps < 1:
        raise UsageError(f"max_steps must be a positive number of optimizer steps, or -1 to train for "
                         f"num_train_epochs, not {max_steps} ({origin('max_steps')})")
    epochs = values.get("num_train_epochs")
    if max_steps == -1 and epochs is not None and epochs <= 0:
        raise UsageError(f"num_train_epochs must be above 0 when max_steps is not set, not {epochs} "
                         f"({origin('num_train_epochs')}); give a number of epochs or max_steps")
    save_steps = values.get("save_steps")
    if values.get("save_strategy") == "steps" and save_steps is not None and save_steps <= 0:
        raise UsageError(f"save_steps must be above 0 with save_strategy 'steps', not {save_steps} "
                         f"({origin('save_steps')}): no checkpoint would ever be written; use save_strategy 'no' for "
                         "none")
    if values.get("rope_scaling"):
        try:
            parse_rope_scaling(values["rope_scaling"])
        except UsageError as err:
            raise UsageError(f"{err} ({origin('rope_scaling')})") from None
    if "divergence" in values:
        check_divergence(values, origin)
    check_paths(values, origin)


# Keys naming a model or tokenizer the stage loads (a local folder or a Hub id), and what each holds.
MODEL_PATH_KEYS = {"model_name_or_path": "model", "tokenizer_name_or_path": "tokenizer",
                   "reward_model_path": "reward model", "teacher_model_name_or_path": "teacher model"}


DATASET_KEYS = ("dataset_name", "eval_dataset_name")  # comma-separated sources (only SFT takes several)


def check_paths(values: dict, origin: Callable[[str], str]) -> None:
    """The model and tokenizer folders exist (or are Hub ids), every local data file named exists, and output_dir is
    a folder that can be written."""
    for key in DATASET_KEYS:
        for source in comma_list(values.get(key)):
            if is_local_source(source) and not Path(source).expanduser().exists():
                raise MissingFileError(f"{key}: data file or folder not found: {source} ({origin(key)})")
    for key, what in MODEL_PATH_KEYS.items():
        if values.get(key):
            try:
                check_local_folder(values[key], what)
            except TinyllmError as err:  # the same error, saying which key named the path
                raise type(err)(f"{key}: {err}") from None
    output_dir = values.get("output_dir")
    if output_dir:
        path = Path(output_dir).expanduser()
        if path.exists() and not path.is_dir():
            raise OutputExistsError(f"output_dir {output_dir} is a file ({origin('output_dir')}); give a folder "
                                    "path, or move the file away")
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise UsageError(f"output_dir {output_dir} cannot be created or written: {existing} is not a writable "
                             "folder; choose another output_dir")
