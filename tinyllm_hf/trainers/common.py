"""Pieces every training stage shares: recipe parsing, reliable checkpoints, throughput/MFU and loss-curve logging.

- `parse_recipe`: a YAML recipe (`--config`) parsed into dataclasses with `HfArgumentParser`; any key can be
  overridden on the command line (`--max_steps 10`), unknown keys are an error naming the file, and every value and
  path is checked (`recipe_checks`) before the dataclasses are built. `bf16: auto` becomes true where the device
  training runs on has bf16 matrix instructions (`bf16_in_hardware`), false elsewhere.
- `ReliableTrainerMixin`: mix into any `transformers.Trainer` subclass (TRL's included) for atomic checkpoints
  (written into `tmp-checkpoint-N/`, renamed to `checkpoint-N` once complete), a clear stop on a non-finite loss and an
  optional per-step data-order log.
- `latest_checkpoint` / `resume_checkpoint`: the newest whole checkpoint of a run (`checkpoint_damage` verifies each),
  for `--resume`; a damaged one is set aside, never deleted.
- `ThroughputCallback` (tokens/s and MFU) and `LossCurveCallback` (loss-curve PNG at the end of training).
- `run_stage`, `train_and_save`, `final_eval_metrics`, `peft_config`: the parts every stage's `main`/`train` repeats.
"""

import argparse
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import logging
from trl import ModelConfig, get_peft_config

# After trl: importing transformers' Trainer first starts a circular import through tinyllm_hf's registration hook.
from transformers import Trainer  # noqa: E402
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled  # noqa: E402

from tinyllm_hf.data.sft import MALFORMED_POLICIES
from tinyllm_hf.errors import NonFiniteLossError, TinyllmError, UsageError
from tinyllm_hf.model_utils import get_model
from tinyllm_hf.modeling import LORA_TARGET_MODULES
from tinyllm_hf.modeling.modeling_tinyllm import TinyllmExperts, TinyllmRouter
from tinyllm_hf.options import load_yaml_mapping
from tinyllm_hf.runs import LOSS_CURVE_FILE, TRAINER_STATE_FILE, model_damage, publish
from tinyllm_hf.trainers.recipe_checks import check_recipe_values, coerce_recipe_value, field_types
from tinyllm_hf.tokenizer.train import write_portable_tokenizer_config

logger = logging.get_logger("tinyllm_hf")


def score_only_labelled_positions_on_cpu() -> None:
    """Make TRL's fused LM head (DPO, KTO, ORPO, GRPO, RLOO and SFT with other models) score only the positions with
    a label on a CPU, as it does on Triton devices. Elsewhere it scores every position, prompt and padding included,
    to keep tile shapes fixed for compilers that recompile per shape (Neuron); a CPU has no such compiler, and
    scoring the prompts and padding made most of a DPO step and of its reference pass (bench/trl_cpu_steps.py).
    TRL reads `_use_triton` from its utils module only for that choice (its kernels keep their own binding, so the
    CPU still runs the torch tiles); if a TRL version lays this out differently, nothing changes."""
    import trl.trainer.utils as trl_utils

    chooses_compact = getattr(trl_utils, "_use_triton", None)
    if chooses_compact is None or getattr(chooses_compact, "_compact_on_cpu", False):
        return

    def compact(device) -> bool:
        return device.type == "cpu" or chooses_compact(device)

    compact._compact_on_cpu = True
    trl_utils._use_triton = compact


STAGING_PREFIX = "tmp-"  # checkpoints are written under tmp-checkpoint-N/ and renamed when complete
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


# --------------------------------------------------------------------------------------------------------------------
# Recipes: YAML + command-line overrides -> dataclasses
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class RunArguments:
    """Options of the run itself, shared by every training stage."""

    config: str | None = field(default=None, metadata={"help": "YAML recipe; any of its keys can be overridden on the command line"})
    resume: bool = field(
        default=False, metadata={"help": "continue from the newest complete checkpoint in output_dir (if there is one)"}
    )
    peak_flops: float | None = field(
        default=None,
        metadata={"help": "peak FLOP/s per device for MFU; default: the GPU's datasheet peak in the training dtype "
                          "(DATASHEET_PEAK_TFLOPS) where listed, else measured with a matmul at the start of training"},
    )
    loss_curve: bool = field(default=True, metadata={"help": "write loss_curve.png into output_dir at the end"})
    data_order_log: bool = field(
        default=False,
        metadata={"help": "append every micro-batch's step, rank, token hashes (whole batch and per row) and data "
                          "loader type to output_dir/data_order/rank<N>.jsonl"},
    )
    global_batch_size: int | None = field(
        default=None,
        metadata={"help": "sequences (or pairs) per optimizer step over all processes (pretrain, sft, reward, "
                          "dpo, kto, orpo): at launch "
                          "gradient_accumulation_steps is derived from it and the number of processes, with "
                          "per_device_train_batch_size as the most one process takes at once, so the token budget "
                          "is the same on 1 or 8 GPUs (see `fit_global_batch`)"},
    )


@dataclass
class DatasetArguments:
    """Where a fine-tuning stage's rows come from. Each stage's data arguments extend it and redefine `dataset_name` to
    say what its embedded "default" set is (a redefined field keeps its place: first)."""

    dataset_name: str = field(
        default="default",
        metadata={"help": "'default' (the embedded set), a local .jsonl/.json file or folder, or a Hub dataset"},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "configuration of a Hub dataset"})
    dataset_split: str = field(default="train", metadata={"help": "split of a Hub dataset"})
    malformed: str = field(
        default="error",
        metadata={"help": "a malformed row stops the run ('error') or is skipped, counted and reported ('skip')"},
    )

    def __post_init__(self):
        if self.malformed not in MALFORMED_POLICIES:
            raise UsageError(f"malformed must be one of {', '.join(MALFORMED_POLICIES)}, not {self.malformed!r}")


def load_recipe(path: str | os.PathLike) -> dict:
    """A stage's recipe file as a dict (a one-line error naming the file when it is missing, not YAML or not a
    mapping)."""
    return load_yaml_mapping(path, "recipe file")


def parse_recipe(dataclass_types, argv: list[str] | None = None, defaults: dict | None = None,
                 prog: str | None = None) -> tuple:
    """Instances of `dataclass_types` from `defaults` < the `--config` YAML recipe < command-line flags.

    `RunArguments` is added (last) when not given, since `--config` itself is one of its fields. The recipe's keys
    become parser defaults (as TRL's `TrlParser` does), so `--key value` on the command line always wins.
    """
    dataclass_types = list(dataclass_types)
    if RunArguments not in dataclass_types:
        dataclass_types.append(RunArguments)
    parser = HfArgumentParser(dataclass_types, prog=prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    values = dict(defaults or {})
    config = _config_path(argv)
    if config is not None:
        values.update(load_recipe(config))
    argv = resolve_auto_bf16(values, argv)
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        where = f"recipe {config}" if config else "defaults"
        raise UsageError(f"unknown key(s) in {where}: {', '.join(unknown)} (see --help for the accepted keys)")

    recipe_keys = set(values) - set(defaults or {})

    def origin(name: str) -> str:
        if any(arg == f"--{name}" or arg.startswith(f"--{name}=") for arg in argv):
            return "command line"
        return f"recipe {config}" if name in recipe_keys else "the stage's defaults"

    kinds = field_types(dataclass_types)
    for action in parser._actions:
        if action.dest in values:
            kind, accepts_none, default = kinds.get(action.dest, (None, True, None))
            action.default = coerce_recipe_value(action.dest, values[action.dest], kind, accepts_none, default,
                                                 origin(action.dest))
            action.required = False
    # Ranges and paths before the dataclasses are built: their own checks crash on some values (TRL's GRPOConfig
    # divides by num_generations), and nothing expensive may start on a recipe that cannot work.
    parsed, _ = parser.parse_known_args(args=argv)
    check_recipe_values(dataclass_types, vars(parsed), origin)
    try:
        return parser.parse_args_into_dataclasses(args=argv)
    except TinyllmError:  # our own argument classes' checks already say what to do
        raise
    except ValueError as err:  # transformers' and TRL's config checks (__post_init__) reject a combination of values
        message = " ".join(str(err).split())  # some span several lines; the CLI prints one
        raise UsageError(f"{message} (check the recipe and flags)") from err


BF16_AUTO = "auto"


def bf16_in_hardware(use_cpu: bool) -> tuple[bool, str]:
    """Whether the device training runs on multiplies bf16 matrices in hardware, and what it is: a CUDA GPU that
    supports bf16 (Ampere and newer), or a CPU with AVX-512 BF16 or AMX-BF16 instructions. Elsewhere (older CPUs and
    GPUs, Apple and ARM CPUs, which torch does not report) bf16 autocast is emulated and slower than float32."""
    if not use_cpu and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return torch.cuda.is_bf16_supported(), name
    if not use_cpu and torch.backends.mps.is_available():
        return False, "Apple GPU (mps)"
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    found = [name for name in ("amx_bf16", "avx512_bf16") if capabilities.get(name)]
    cpu = capabilities.get("cpu_name") or "this CPU"
    return bool(found), f"{cpu} ({', '.join(found) or 'no AVX-512 BF16 or AMX-BF16'})"


def resolve_auto_bf16(values: dict, argv: list[str]) -> list[str]:
    """Turn `bf16: auto` (a recipe's or the defaults' value, or `--bf16 auto` on the command line) into true or false
    by `bf16_in_hardware` on the device the run trains on (`use_cpu`), in `values` and in the returned argv. bf16
    autocast keeps float32 weights (`training_dtype`), so only the matmuls change precision: 1.26-1.53x faster steps
    on an AVX-512 BF16 CPU at the quickstart's sizes (docs/benchmarks.md), a float32 run everywhere else."""
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--bf16", nargs="?", const="true")
    peek.add_argument("--use_cpu", "--use-cpu", nargs="?", const="true")
    flags, _ = peek.parse_known_args(argv)
    if flags.bf16 is not None and flags.bf16.lower() == BF16_AUTO:
        values["bf16"] = BF16_AUTO
        argv = _without_flag(argv, "--bf16")
    elif flags.bf16 is not None:
        return argv  # an explicit true/false on the command line wins over the recipe
    if not (isinstance(values.get("bf16"), str) and values["bf16"].lower() == BF16_AUTO):
        return argv
    use_cpu = values.get("use_cpu", False) if flags.use_cpu is None else flags.use_cpu.lower() in ("true", "1", "yes")
    values["bf16"], device = bf16_in_hardware(bool(use_cpu))
    logger.warning(f"bf16: auto -> {str(values['bf16']).lower()} on {device}")
    return argv


def _without_flag(argv: list[str], flag: str) -> list[str]:
    """`argv` without `flag` and its value (`--flag value` or `--flag=value`)."""
    kept, i = [], 0
    while i < len(argv):
        if argv[i] == flag:
            i += 2 if i + 1 < len(argv) and not argv[i + 1].startswith("--") else 1
            continue
        if not argv[i].startswith(flag + "="):
            kept.append(argv[i])
        i += 1
    return kept


def _config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 >= len(argv):
                raise UsageError("--config needs a recipe path")
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, newest complete checkpoint
# --------------------------------------------------------------------------------------------------------------------


def checkpoint_step(path: str | os.PathLike) -> int | None:
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoint_damage(path: str | os.PathLike) -> str | None:
    """Why `checkpoint-N` at `path` cannot be resumed from, or None: its trainer state must parse and hold the step
    (the Trainer writes it last), and its weights, optimizer, scheduler and RNG files must be whole (`model_damage`)."""
    path = Path(path)
    state_path = path / TRAINER_STATE_FILE
    if not state_path.is_file():
        return f"no {TRAINER_STATE_FILE}"
    damage = model_damage(path)
    if damage is not None:
        return damage
    state = json.loads(state_path.read_text("utf-8"))  # model_damage checked that it parses
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return f"{TRAINER_STATE_FILE}: no global_step"
    return None


def checkpoints_by_step(output_dir: str | os.PathLike) -> list[Path]:
    """The `checkpoint-N` folders of `output_dir`, newest (largest N) first; staging folders are not among them."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step, reverse=True)


def latest_checkpoint(output_dir: str | os.PathLike, damaged: list | None = None) -> str | None:
    """The newest whole `checkpoint-N` in `output_dir` (see `checkpoint_damage`), or None. Each newer one that is
    damaged is appended to `damaged` as (path, reason) when a list is given, else warned about with the reason."""
    for path in checkpoints_by_step(output_dir):
        damage = checkpoint_damage(path)
        if damage is None:
            return str(path)
        if damaged is None:
            logger.warning(f"checkpoint {path} is damaged ({damage}): skipped")
        else:
            damaged.append((path, damage))
    return None


DAMAGED_PREFIX = "damaged-"  # where a damaged checkpoint is kept: out of the way of the Trainer's names and rotation


def set_aside(checkpoint: Path) -> Path:
    """Rename a damaged `checkpoint-N` to `damaged-checkpoint-N` (never deleted: it is the user's to inspect), so
    the resumed run can write a new `checkpoint-N` and checkpoint rotation never counts or deletes it."""
    target = checkpoint.with_name(DAMAGED_PREFIX + checkpoint.name)
    n = 1
    while target.exists():
        n += 1
        target = checkpoint.with_name(f"{DAMAGED_PREFIX}{checkpoint.name}.{n}")
    os.replace(checkpoint, target)
    return target


def resume_checkpoint(args: TrainingArguments, run_args: RunArguments) -> str | None:
    """The checkpoint to continue from: `resume_from_checkpoint` when given (an error if it is damaged), else with
    `--resume` the newest whole one in output_dir; without either, None (and a warning when output_dir already holds
    checkpoints).

    With `--resume`, damaged checkpoints newer than the one resumed from are set aside (`set_aside`, with a warning
    naming each and why); when none is whole the run starts from step 0, as with no checkpoint at all, since a
    damaged checkpoint cannot be continued from anyway and stopping would only make every rerun fail the same way."""
    if args.resume_from_checkpoint:
        damage = checkpoint_damage(args.resume_from_checkpoint)
        if damage is not None:
            raise UsageError(f"resume_from_checkpoint {args.resume_from_checkpoint} is damaged ({damage}): "
                             "give another checkpoint, or use --resume to take the newest whole one")
        return args.resume_from_checkpoint
    if not run_args.resume:
        if checkpoints_by_step(args.output_dir):
            logger.warning(f"{args.output_dir} holds checkpoints from an earlier run: starting from step 0 anyway "
                           "(pass --resume to continue instead)")
        return None
    damaged = []
    checkpoint = latest_checkpoint(args.output_dir, damaged)
    if args.should_save:  # one process renames and reports; every process made the same choice
        for path, damage in damaged:
            logger.warning(f"--resume: checkpoint {path} is damaged ({damage}); kept as {set_aside(path)}, "
                           + (f"resuming from {checkpoint}" if checkpoint else "and no older checkpoint is whole"))
    if checkpoint is None:
        logger.warning(f"--resume: no whole checkpoint in {args.output_dir}, starting from step 0")
    return checkpoint


def fit_global_batch(args: TrainingArguments, run_args: RunArguments, tokens_per_sequence: int | None = None) -> None:
    """Make one optimizer step hold `run_args.global_batch_size` sequences on however many processes run, so that a
    recipe's token budget (global batch x max_steps) does not grow with the GPU count. With W processes and
    per_device_train_batch_size P (the most one process takes at once), the fewest accumulation steps A whose
    micro-batch B / (W x A) is a whole number no larger than P are set in `args` (gradient_accumulation_steps = A,
    per_device_train_batch_size = B / (W x A)), and the split is logged. Without global_batch_size, `args` is left
    as the recipe set it (global batch = P x accumulation x W). Call it before the Trainer is built: its accelerator
    and DeepSpeed's "auto" batch sizes read these values then."""
    world = args.world_size
    if run_args.global_batch_size is not None:
        total, most = run_args.global_batch_size, args.per_device_train_batch_size
        if total < 1:
            raise UsageError(f"global_batch_size must be at least 1, not {total}")
        if args.gradient_accumulation_steps != 1:
            raise UsageError(f"global_batch_size {total} and gradient_accumulation_steps "
                             f"{args.gradient_accumulation_steps} are both set: give one (with global_batch_size the "
                             "accumulation is derived from the number of processes)")
        if args.deepspeed:  # its JSON's "auto" batch sizes were filled in when `args` was built, before this
            raise UsageError("global_batch_size does not reach a DeepSpeed JSON given as --deepspeed: launch with a "
                             "DeepSpeed config from recipes/accelerate/ (accelerate launch --config_file ...) instead")
        if total % world:
            raise UsageError(f"global_batch_size {total} is not divisible by the {world} processes of this launch: "
                             f"give a multiple of {world} (e.g. {-(-total // world) * world}) or launch a number of "
                             f"processes that divides {total}")
        share = total // world  # sequences per process and optimizer step
        accumulation = next(a for a in range(-(-share // most), share + 1) if share % a == 0)
        args.gradient_accumulation_steps = accumulation
        args.per_device_train_batch_size = share // accumulation
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    tokens = f" x {tokens_per_sequence} tokens = {per_step * tokens_per_sequence:,} tokens" if tokens_per_sequence else ""
    budget = ""
    if tokens_per_sequence and args.max_steps > 0:
        total = per_step * tokens_per_sequence * args.max_steps
        budget = f"; {args.max_steps} steps: " + (f"{total / 1e6:,.1f}M tokens" if total >= 1e6 else f"{total:,} tokens")
    if args.should_log:
        logger.warning(f"global batch: {per_step} sequences{tokens} per optimizer step = {world} "
                       f"process{'es' if world > 1 else ''} x "
                       f"{args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} "
                       f"accumulation steps{budget}")


def refuse_global_batch(run_args: RunArguments, stage: str) -> None:
    """The stages that do not fit their batch to the world size say so instead of ignoring global_batch_size."""
    if run_args.global_batch_size is not None:
        raise UsageError(f"global_batch_size is not supported by {stage}: set "
                         "per_device_train_batch_size and gradient_accumulation_steps instead")


def remove_staging_dirs(output_dir: str | os.PathLike) -> None:
    """Delete half-written `tmp-checkpoint-N` folders left by a run that was killed while saving."""
    output_dir = Path(output_dir)
    if output_dir.is_dir():
        for path in output_dir.glob(f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-*"):
            logger.warning(f"removing unfinished checkpoint {path}")
            shutil.rmtree(path, ignore_errors=True)




class HiddenStateLossMixin:
    """Training steps ask a Tinyllm model for the loss without full logits (`skip_logits`: chunked cross-entropy from
    the hidden states, only at positions with a label on a CPU; the (tokens, vocab) logits are never held or upcast
    whole). Faster on CPUs (bench/cpu_training_choices.py, bench/trl_cpu_steps.py) and less memory traffic on GPUs.

    Use before the Trainer class: `class MyTrainer(ReliableTrainerMixin, HiddenStateLossMixin, Trainer)`. A subclass
    of a TRL trainer whose own loss adds nothing for this step (`_hidden_state_loss_applies`) gets `Trainer`'s loss,
    the model's `loss` output; evaluation (`return_outputs`) and other models keep the parent's loss.
    """

    def _hidden_state_loss_applies(self) -> bool:
        return True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Under ZeRO-3 the output projection's weight is a shard outside its own module's forward: keep the logits.
        unwrapped = self.accelerator.unwrap_model(model)
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped  # PEFT passes it on
        if (not return_outputs and not is_deepspeed_zero3_enabled() and self._hidden_state_loss_applies()
                and "skip_logits" in inspect.signature(base.forward).parameters):
            return Trainer.compute_loss(self, model, {**inputs, "skip_logits": True},
                                        num_items_in_batch=num_items_in_batch)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


class ReliableTrainerMixin:
    """Atomic checkpoints, a hard stop on non-finite losses and an optional data-order log for any Trainer.

    Use as `class MyTrainer(ReliableTrainerMixin, transformers.Trainer)` (or a TRL trainer). The Trainer writes a
    checkpoint file by file into `checkpoint-N/`, so a run killed while saving leaves a folder that looks like a
    checkpoint but is not one. Here the Trainer writes into `tmp-checkpoint-N/checkpoint-N/`; once every process has
    finished writing, the main process renames it to `checkpoint-N` (atomic on POSIX), so a `checkpoint-N` folder is
    always complete.

    No training step waits for the accelerator: the non-finite-loss check and the count of input tokens seen
    (`include_num_input_tokens_seen`) accumulate on the device and are read once per log, evaluation or save
    (`_sync_step_stats`), and the Trainer's `logging_nan_inf_filter`, which reads every loss on the host and would
    hide a NaN, is switched off.
    """

    data_order_log: bool = False
    _staging_dir: str | None = None
    # Since the last `_sync_step_stats`: micro-steps run, [first non-finite step (inf: none), its loss] on the device,
    # and input tokens counted (an int, or a device tensor for non-padding counts).
    _unsynced_steps: int = 0
    _first_nonfinite: torch.Tensor | None = None
    _unsynced_tokens: "int | torch.Tensor" = 0

    def __init__(self, *args, **kwargs):
        score_only_labelled_positions_on_cpu()  # here, not at import: trl.trainer.utils loads transformers' Trainer
        super().__init__(*args, **kwargs)
        self.args.logging_nan_inf_filter = False  # `training_step` stops on a non-finite loss instead

    def _get_output_dir(self, trial) -> str:
        return self._staging_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / f"{STAGING_PREFIX}{name}"
        self._staging_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()  # every rank has written its files (RNG states, shards)
        if self.args.should_save:
            self._point_best_checkpoint_to(run_dir, staging / name)
            publish(staging / name, run_dir / name)
            shutil.rmtree(staging, ignore_errors=True)
            # Rotation ran inside the staging folder (a no-op there); apply it to the real checkpoints.
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
            )
        self.accelerator.wait_for_everyone()

    def _point_best_checkpoint_to(self, run_dir: Path, staged: Path) -> None:
        # The Trainer looked for the best checkpoint inside the staging folder; name its final location instead.
        best_step = self.state.best_global_step
        if not best_step:
            return
        best = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{best_step}"
        if best_step == self.state.global_step or best.is_dir():
            self.state.best_model_checkpoint = str(best)
            self.state.save_to_json(str(staged / TRAINER_STATE_FILE))

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.data_order_log:
            self._log_data_order(inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        # The Trainer's own `logging_nan_inf_filter` silently replaces a NaN loss with the running mean, so the run
        # would go on training (and checkpointing) NaN weights. Record the first non-finite step on the device
        # (reading the loss here would make every step wait for the accelerator); `_sync_step_stats` stops the run
        # at the next log, evaluation or save, before anything trained on it is written.
        if self._first_nonfinite is None:
            dtype = torch.float32 if loss.device.type == "mps" else torch.float64  # MPS has no float64
            self._first_nonfinite = torch.tensor([math.inf, 0.0], dtype=dtype, device=loss.device)
        value = loss.detach().to(self._first_nonfinite.dtype).mean()
        is_first = ~torch.isfinite(value) & torch.isinf(self._first_nonfinite[0])
        step = torch.full_like(value, self.state.global_step + 1)  # a fill, not a host-to-device copy
        self._first_nonfinite.copy_(torch.where(is_first, torch.stack([step, value]), self._first_nonfinite))
        self._unsynced_steps += 1
        return loss

    def _track_num_input_tokens(self, inputs):
        # The Trainer gathers and reads the count at every micro-step; add it up here and gather it once per log.
        mode = self.args.include_num_input_tokens_seen
        main_input_name = getattr(self.model, "main_input_name", "input_ids")
        if mode == "no" or main_input_name not in inputs:
            return super()._track_num_input_tokens(inputs)  # nothing to count, or the Trainer's own warning
        if mode == "non_padding":
            if "attention_mask" not in inputs:
                return super()._track_num_input_tokens(inputs)  # counting by pad token: the Trainer's own way
            self._unsynced_tokens = self._unsynced_tokens + inputs["attention_mask"].sum()
        else:
            self._unsynced_tokens += inputs[main_input_name].numel()

    def _sync_step_stats(self) -> None:
        """Read what the training steps since the last call accumulated on the device (one gather over processes, one
        host sync): add the input tokens to `state.num_input_tokens_seen`, and raise `NonFiniteLossError` naming the
        first step whose loss was not finite. Every process calls it at the same points (logs, evaluations, saves)."""
        if self._unsynced_steps == 0:
            return
        device = self._first_nonfinite.device
        tokens = torch.as_tensor(self._unsynced_tokens, device=device).to(self._first_nonfinite.dtype)
        stats = torch.cat([self._first_nonfinite, tokens[None]])
        rows = self.accelerator.gather(stats).reshape(-1, 3).tolist()  # the one host sync: [step, loss, tokens] each
        self._unsynced_steps, self._unsynced_tokens, self._first_nonfinite = 0, 0, None
        self.state.num_input_tokens_seen += int(sum(tokens for _, _, tokens in rows))
        bad = [(step, loss) for step, loss, _ in rows if math.isfinite(step)]
        if bad:
            step, loss = min(bad)
            raise NonFiniteLossError(
                f"non-finite training loss ({loss}) at step {int(step)}: training stopped at step "
                f"{self.state.global_step} (losses are read at every log, evaluation and save; nothing from step "
                f"{int(step)} on was saved). "
                "Lower learning_rate, keep max_grad_norm > 0, or check the data; resume from the last checkpoint "
                "with --resume."
            )

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        control = self.control
        if control.should_log or control.should_evaluate or control.should_save or control.should_training_stop:
            self._sync_step_stats()
        return super()._maybe_log_save_evaluate(*args, **kwargs)

    def log(self, logs, *args, **kwargs):
        self._sync_step_stats()  # the logs carry num_input_tokens_seen (and the throughput callback reads it)
        return super().log(logs, *args, **kwargs)

    def _log_data_order(self, inputs) -> None:
        ids = inputs["input_ids"].detach().cpu().contiguous()
        record = {
            "step": self.state.global_step + 1,
            "rank": self.args.process_index,
            "first_ids": ids[:, :8].tolist(),
            "sha1": hashlib.sha1(ids.numpy().tobytes()).hexdigest(),
            "rows": [hashlib.sha1(row.numpy().tobytes()).hexdigest()[:16] for row in ids],
            # DataLoaderShard: this process read its rows itself; DataLoaderDispatcher: process 0 sent them.
            "loader": type(self.callback_handler.train_dataloader).__name__,
        }
        path = Path(self.args.output_dir) / "data_order" / f"rank{self.args.process_index}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# Throughput and MFU
# --------------------------------------------------------------------------------------------------------------------


def matmul_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6 * (weights used in matmuls) + 12 * layers * attention width * seq_len.

    6N counts forward (2N) and backward (4N) multiply-adds of every `nn.Linear` weight; the output projection counts
    even when it is tied to the embedding (it is still a matmul), the embedding lookup and the norms do not. The second
    term is the attention scores and weighted sum (QK^T and AV: 2 * 2 * seq_len * width forward, x3 for training) per
    layer, without halving for the causal mask (the PaLM paper's convention). In a Mixture-of-Experts model N counts the
    router and the experts a token is routed to (active parameters), not all experts.
    """
    config = model.config
    matmul_params = 0
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, TinyllmRouter)):
            matmul_params += _numel(module.weight)
        elif isinstance(module, TinyllmExperts):  # each token passes through num_experts_per_tok of the stacked experts
            stacked = _numel(module.gate_up_proj) + _numel(module.down_proj)
            matmul_params += stacked * config.num_experts_per_tok // config.num_experts
    attention_width = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    return 6 * matmul_params + 12 * config.num_hidden_layers * attention_width * seq_len


def _numel(parameter: torch.nn.Parameter) -> int:
    # DeepSpeed ZeRO-3 partitions parameters: numel() is 0 on every rank, ds_numel is the full size.
    return getattr(parameter, "ds_numel", parameter.numel())


def measure_matmul_peak(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, size: int | None = None,
                        repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of a square matmul on `device`: the practical peak MFU is measured against.
    The default size is 2048 on CPU and 8192 on GPUs, where smaller products do not fill the chip."""
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    iters = 20 if device.type == "cuda" else 1
    best = math.inf
    for _ in range(repeats + 1):  # the first round warms up kernels and caches
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b)
        _synchronize(device)
        best = min(best, (time.perf_counter() - start) / iters)
    return 2 * size**3 / best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_dtype(args: TrainingArguments) -> torch.dtype:
    """The dtype the matmuls of a run use, which is what its MFU is measured against."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


# Dense (no 2:4 sparsity) peak TFLOP/s of common GPUs by matmul dtype, from NVIDIA's datasheets: bf16/fp16 are the
# tensor-core rates with fp32 accumulation (what PyTorch's matmuls use), fp32 the plain CUDA-core rate (what fp32
# matmuls run at unless TF32 is switched on). Keys are searched in `torch.cuda.get_device_name()`; the first match
# wins. Sources: NVIDIA H100 datasheet (SXM5 / PCIe; its table shows sparsity, dense is half), H200 datasheet (the
# SXM part has the H100 SXM's tensor cores), A100 datasheet (SXM and PCIe alike), L40S datasheet, and the Ada
# Lovelace architecture whitepaper (GeForce RTX 4090: 165.2 with fp32 accumulation, 330.3 only with fp16
# accumulation). Variants not listed (H100/H200 NVL, A100X, ...) get no datasheet MFU rather than a wrong one.
DATASHEET_PEAK_TFLOPS = {
    r"H200(?! NVL)": {torch.bfloat16: 989.4, torch.float16: 989.4, torch.float32: 66.9},
    r"H100 PCIe": {torch.bfloat16: 756.0, torch.float16: 756.0, torch.float32: 51.0},
    r"H100 (80GB HBM3|SXM)": {torch.bfloat16: 989.4, torch.float16: 989.4, torch.float32: 66.9},
    r"A100\b": {torch.bfloat16: 312.0, torch.float16: 312.0, torch.float32: 19.5},
    r"L40S": {torch.bfloat16: 362.05, torch.float16: 362.05, torch.float32: 91.6},
    r"RTX 4090": {torch.bfloat16: 165.2, torch.float16: 165.2, torch.float32: 82.6},
}


def datasheet_peak_flops(device_name: str | None, dtype: torch.dtype) -> float | None:
    """The datasheet's dense peak FLOP/s of the GPU named `device_name` for matmuls in `dtype`, or None when the
    table (`DATASHEET_PEAK_TFLOPS`) does not list it."""
    for pattern, peaks in DATASHEET_PEAK_TFLOPS.items():
        if device_name and re.search(pattern, device_name) and dtype in peaks:
            return peaks[dtype] * 1e12
    return None


def accelerator_name(device: torch.device) -> str | None:
    """The GPU's name as its driver reports it (e.g. 'NVIDIA H100 80GB HBM3'); None on a CPU."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


class ThroughputCallback(TrainerCallback):
    """Adds `tokens_per_second` (whole job), `mfu` and `peak_gflops` (per process) to every training log, from the
    wall time and the optimizer steps since the previous log line, evaluation or save. Those are the points where the
    host waits for the device (the log reads the loss), so the time is the device's even though training steps never
    wait for it (timing steps one by one would time the host queuing work). The first log line after the start also
    counts start-up work such as compilation.

    `mfu` is measured against `peak_flops` when it is given, else against the datasheet peak of the GPU in the
    training dtype when `DATASHEET_PEAK_TFLOPS` lists it (the figure peers quote), else against a matmul measured on
    the device (`measure_matmul_peak`). When the datasheet is used and nothing is given, the measured matmul peak is
    also logged and `mfu_vs_measured` is MFU against it (what the chip reaches in practice).

    tokens_per_step: tokens in one optimizer step over all processes (exact for packed blocks). When None, the growth
    of `state.num_input_tokens_seen` is used (set `include_num_input_tokens_seen`).
    """

    def __init__(self, flops_per_token: float, tokens_per_step: int | None = None, peak_flops: float | None = None,
                 peak_dtype: torch.dtype = torch.float32):
        self.flops_per_token = flops_per_token
        self.tokens_per_step = tokens_per_step
        self.given_peak = peak_flops
        self.peak_dtype = peak_dtype
        self.datasheet_peak: float | None = None
        self.measured_peak: float | None = None
        self._anchor: tuple[float, int, int] | None = None  # (time, global step, tokens seen) where timing restarts
        self._measure = peak_flops is None

    @property
    def peak_flops(self) -> float:
        """The peak `mfu` is measured against."""
        return self.given_peak or self.datasheet_peak or self.measured_peak

    def on_train_begin(self, args, state, control, **kwargs):
        dtype = str(self.peak_dtype).removeprefix("torch.")
        if self._measure:
            name = accelerator_name(args.device)
            self.datasheet_peak = datasheet_peak_flops(name, self.peak_dtype)
            self.measured_peak = max(self.measured_peak or 0.0, measure_matmul_peak(args.device, self.peak_dtype))
            measured = (f"measured: {dtype} square matmul on {args.device}, measured again at every evaluation and "
                        "save, the best value used")
            source = (f"the {name} datasheet's dense {dtype} peak; mfu_vs_measured: against the {dtype} matmul "
                      f"measured on it ({self.measured_peak / 1e9:.1f} GFLOP/s at the start)"
                      if self.datasheet_peak else measured)
        else:
            source = "given"
        if state.is_world_process_zero:
            logger.warning(
                f"MFU = tokens/s x {self.flops_per_token:.4g} FLOPs/token / ({args.world_size} x "
                f"{self.peak_flops / 1e9:.1f} GFLOP/s peak per process, {source})"
            )
        self._restart(state)

    def _restart(self, state) -> None:
        self._anchor = (time.perf_counter(), state.global_step, state.num_input_tokens_seen)

    def on_evaluate(self, args, state, control, **kwargs):
        self._pause(args, state)

    def on_save(self, args, state, control, **kwargs):
        self._pause(args, state)

    def _pause(self, args, state) -> None:
        # Training is paused anyway: on a machine shared with other jobs the peak measured at the start can be
        # depressed (MFU above 1), so measure again and keep the best value.
        if self._measure:
            self.measured_peak = max(self.measured_peak, measure_matmul_peak(args.device, self.peak_dtype, repeats=2))
        self._restart(state)  # the next interval counts training steps only, not the evaluation or the save

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self._anchor is None:
            return
        start, start_step, start_tokens = self._anchor
        steps, seconds = state.global_step - start_step, time.perf_counter() - start
        if steps <= 0 or seconds <= 0:
            return
        if self.tokens_per_step is not None:
            tokens_per_second = self.tokens_per_step * steps / seconds
        else:
            tokens_per_second = (state.num_input_tokens_seen - start_tokens) / seconds
        flops_per_process = tokens_per_second * self.flops_per_token / args.world_size
        extra = {
            "tokens_per_second": round(tokens_per_second, 1),
            "mfu": round(flops_per_process / self.peak_flops, 4),
            "peak_gflops": round(self.peak_flops / 1e9, 1),
        }
        if self.datasheet_peak and self.measured_peak:
            extra["mfu_vs_measured"] = round(flops_per_process / self.measured_peak, 4)
            extra["measured_peak_gflops"] = round(self.measured_peak / 1e9, 1)
        logs.update(extra)
        # Trainer.log stored a copy of these logs in log_history before calling the callbacks.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)
        self._restart(state)


def add_callback_first(trainer, callback: TrainerCallback) -> None:
    """Put `callback` before the Trainer's printers and reporters, so the values it adds to logs reach them."""
    trainer.callback_handler.callbacks.insert(0, callback)


# --------------------------------------------------------------------------------------------------------------------
# Loss curve
# --------------------------------------------------------------------------------------------------------------------


def headless_pyplot():
    """matplotlib's pyplot on the Agg backend: training machines have no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write `fig` as a PNG at `path` (folders made as needed) and free it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    headless_pyplot().close(fig)
    return path


def plot_loss_curve(log_history: list[dict], path: str | os.PathLike, reference: dict[str, float] | None = None) -> Path:
    """Training and evaluation loss against step as a PNG; `reference` draws labelled horizontal lines."""
    plt = headless_pyplot()
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss")
    for label, value in (reference or {}).items():
        ax.axhline(value, color="gray", linestyle="--", linewidth=1)
        ax.annotate(label, (0, value), xycoords=("axes fraction", "data"), va="bottom", fontsize=8, color="gray")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


class LossCurveCallback(TrainerCallback):
    """Writes `output_dir/loss_curve.png` when training ends (the whole history, including before a resume)."""

    def __init__(self, reference: dict[str, float] | None = None, filename: str = LOSS_CURVE_FILE):
        self.reference = reference
        self.filename = filename

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            path = plot_loss_curve(state.log_history, Path(args.output_dir) / self.filename, self.reference)
            logger.warning(f"loss curve written to {path}")


# --------------------------------------------------------------------------------------------------------------------
# One stage, start to end: the command line, LoRA, training, the final evaluation and the saved outputs
# --------------------------------------------------------------------------------------------------------------------


def run_stage(prog: str, dataclass_types, defaults: dict, train: Callable, argv: list[str] | None = None) -> int:
    """The `main` of every training stage: parse the recipe into `dataclass_types` (see `parse_recipe`) and call
    `train` with the instances in that order. A bad input or a diverged run raises a `TinyllmError`, which
    `tinyllm_hf.cli.run_command` prints as one line."""
    train(*parse_recipe(dataclass_types, argv, defaults=defaults, prog=prog))
    return 0


def peft_config(model_args: ModelConfig):
    """A LoRA config when `use_peft` is set (else None), targeting every linear layer of the decoder by default, the
    QLoRA paper's recommendation."""
    if model_args.use_peft and not model_args.lora_target_modules:
        model_args.lora_target_modules = list(LORA_TARGET_MODULES)
    return get_peft_config(model_args)


HALF_DTYPES = ("bfloat16", "float16")


def training_dtype(model_args: ModelConfig, args: TrainingArguments) -> str | None:
    """The dtype to load a model that is about to be trained in. Mixed precision (bf16/fp16: true) means float32
    weights, which the optimizer updates, with the matmuls autocast to half precision: a model whose trained weights
    load in half precision would be updated in bf16 with no float32 master copy, rounding small updates away. So
    full-weight training under mixed precision loads in float32 (also when the checkpoint itself is stored in half
    precision), and an explicit half-precision `dtype` is refused. With LoRA (`use_peft`) the frozen base may stay in
    half precision (PEFT keeps the adapters in float32); without mixed precision `dtype` is used as given."""
    if not (args.bf16 or args.fp16) or model_args.use_peft:
        return model_args.dtype
    if str(model_args.dtype).removeprefix("torch.") in HALF_DTYPES:
        mixed = "bf16" if args.bf16 else "fp16"
        raise UsageError(f"dtype: {model_args.dtype} with {mixed}: true would train {model_args.dtype} weights "
                         f"without a float32 master copy: remove dtype (the weights load in float32 and {mixed} "
                         "autocast computes in half precision), or train LoRA adapters (use_peft: true)")
    return "float32"


def load_policy(model_args: ModelConfig, tokenizer, args: TrainingArguments, **from_pretrained_kwargs):
    """The causal LM a fine-tuning stage trains with `args`, as TRL's `ModelConfig` describes it (path, revision,
    dtype as `training_dtype` decides, attention), generating up to the chat tokenizer's end-of-turn token."""
    return get_model(model_args.model_name_or_path, chat_tokenizer=tokenizer, revision=model_args.model_revision,
                     dtype=training_dtype(model_args, args), attn_implementation=model_args.attn_implementation,
                     **from_pretrained_kwargs)


def build_trainer(trainer_class, model, args, tokenizer, model_args: ModelConfig, run_args: RunArguments, **datasets):
    """`trainer_class` (a TRL trainer with `ReliableTrainerMixin`) as every fine-tuning stage builds it: the tokenizer
    as processing class, LoRA when `model_args` asks for it, the loss-curve callback unless `loss_curve` is off;
    `datasets` are the trainer's data arguments (train_dataset, eval_dataset, reward_funcs, ...)."""
    return trainer_class(model=model, args=args, processing_class=tokenizer, peft_config=peft_config(model_args),
                         callbacks=[LossCurveCallback()] if run_args.loss_curve else None, **datasets)


def final_eval_metrics(trainer) -> dict:
    """Validation metrics of the trained model: those the evaluation schedule logged at the last step if it did (no
    second pass over the same data), else a fresh `trainer.evaluate()`."""
    last = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), None)
    if last is not None and last["step"] == trainer.state.global_step:
        return {key: value for key, value in last.items() if key.startswith("eval_")}
    return trainer.evaluate()


def train_and_save(trainer, run_args: RunArguments, evaluate: Callable[..., dict] | None = None) -> dict:
    """Train (resuming as `resume_checkpoint` says), then leave a finished stage's outputs in output_dir: the model
    with its tokenizer (its config rewritten by `write_portable_tokenizer_config`, so transformers 4.x loads it too),
    train_results.json, eval_results.json when there is an `evaluate`, all_results.json and trainer_state.json.

    `evaluate(trainer)` (e.g. `final_eval_metrics`) measures the trained model; it runs before the state is saved, so
    what it logs is part of trainer_state.json. Returns the train and evaluation metrics in one dict.
    """
    args = trainer.args
    trainer.data_order_log = run_args.data_order_log
    if args.should_save:
        remove_staging_dirs(args.output_dir)
    result = trainer.train(resume_from_checkpoint=resume_checkpoint(args, run_args))
    eval_metrics = evaluate(trainer) if evaluate is not None else None
    trainer.save_model()
    trainer.save_metrics("train", result.metrics)
    if eval_metrics is not None:
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    trainer.save_state()
    if args.should_save:
        write_portable_tokenizer_config(args.output_dir)
    return {**result.metrics, **(eval_metrics or {})}
