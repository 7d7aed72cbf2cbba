"""The layout of a `tinyllm run` folder, and the one way outputs are written: atomically.

    RUN/<stage>/            one folder per stage, in the order of STAGES (a stage's model, logs and results)
    RUN/<stage>/stage.json  written last, when the stage finished: a stage without it runs again
    RUN/eval/<stage>.json   `tinyllm eval` results of the model in RUN/<stage>
    RUN/tinyllm_stages.json the training stages' summaries, for the model card
    RUN/pretokenized/       the pretraining blocks, when the pretrain recipe sets tokenized_dataset

`RunLayout` names every path in such a folder; the file-name constants are the names stages write inside their own
output folder, so a stage run alone (`tinyllm sft --output_dir X`) writes what the pipeline and the card then read.
`atomic_output` / `publish` are how every output (tokenizer, checkpoint, quantized model, GGUF file, stage summary)
reaches its final name: written beside it, then renamed, so a reader never finds half of one. `file_damage` /
`model_damage` say whether a file or a model folder damaged later (a full disk, a truncated copy) can still be read
whole, without reading the weights: checkpoints are verified before a run resumes from them, and a finished stage's
model before the pipeline skips the stage.

This module uses only the standard library: the pipeline, the report and the card read it without loading torch.
"""

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("tinyllm_hf")

# gguf runs before quantize: the quantize stage ends by measuring every variant, GGUF files included, against fp32.
STAGES = ("tokenizer", "pretrain", "distill", "sft", "reward", "dpo", "grpo", "eval", "gguf", "quantize", "release", "report")
TRAINING_STAGES = ("pretrain", "distill", "sft", "reward", "dpo", "grpo")
ALIGNED_STAGES = ("grpo", "dpo")  # the chat model released is the last of these that ran, else the SFT model

# Files a stage writes into its own output folder.
STAGE_SUMMARY_FILE = "stage.json"
STAGE_LOG_FILE = "stage.log"
TRAINER_STATE_FILE = "trainer_state.json"  # written by the transformers Trainer
LOSS_CURVE_FILE = "loss_curve.png"
HELDOUT_TASKS_FILE = "heldout_tasks.jsonl"  # held-out questions as task records (sft and eval stages)
HELDOUT_RESULTS_FILE = "heldout_results.json"  # the SFT stage's held-out accuracy
PAIRWISE_ACCURACY_FILE = "pairwise_accuracy.json"  # the reward stage's held-out pairwise accuracy
ADAPTER_CONFIG_FILE = "adapter_config.json"  # written by PEFT: the folder is a LoRA adapter, not a full model
# Files of the run folder itself, and of a release.
STAGE_RECORDS_FILE = "tinyllm_stages.json"
RELEASE_RESULTS_FILE = "results.json"  # the evaluation results shipped beside a released model


@dataclass(frozen=True)
class RunLayout:
    """Every path of the run folder `root`."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def summary(self, stage: str) -> Path:
        return self.stage_dir(stage) / STAGE_SUMMARY_FILE

    def log(self, stage: str) -> Path:
        return self.stage_dir(stage) / STAGE_LOG_FILE

    def done(self, stage: str) -> bool:
        return self.summary(stage).exists()

    def loss_curve(self, stage: str) -> Path:
        return self.stage_dir(stage) / LOSS_CURVE_FILE

    def stage_of(self, model_dir) -> str | None:
        """The stage whose output folder is `model_dir` (e.g. RUN/sft -> "sft"), or None if it is none of them."""
        model_dir = Path(model_dir).resolve()
        if model_dir.parent == self.root.resolve() and model_dir.name in STAGES:
            return model_dir.name
        return None

    @property
    def tokenizer(self) -> Path:
        return self.stage_dir("tokenizer") / "tokenizer"

    @property
    def pretokenized(self) -> Path:
        """The pretraining blocks, tokenized once before the training processes start (`tinyllm pretokenize`)."""
        return self.root / "pretokenized"

    @property
    def eval_tasks(self) -> Path:
        """The held-out questions the eval stage asked every model (the drift table asks them again)."""
        return self.stage_dir("eval") / HELDOUT_TASKS_FILE

    def eval_results(self, model_stage: str) -> Path:
        """`tinyllm eval` results of the model trained by `model_stage`."""
        return self.stage_dir("eval") / f"{model_stage}.json"

    def gguf_file(self, outtype: str) -> Path:
        return self.stage_dir("gguf") / f"model-{outtype}.gguf"

    @property
    def drift_table(self) -> Path:
        return self.stage_dir("quantize") / "drift.md"

    @property
    def drift_json(self) -> Path:
        return self.stage_dir("quantize") / "drift.json"

    @property
    def reward_accuracy(self) -> Path:
        return self.stage_dir("reward") / PAIRWISE_ACCURACY_FILE

    @property
    def staged_release(self) -> Path:
        return self.stage_dir("release") / "staged"

    @property
    def report_dir(self) -> Path:
        return self.stage_dir("report")

    @property
    def report(self) -> Path:
        return self.report_dir / "report.md"

    @property
    def stage_records(self) -> Path:
        return self.root / STAGE_RECORDS_FILE


# --------------------------------------------------------------------------------------------------------------------
# Atomic outputs
# --------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a path beside `target` that does not exist yet; write a file or a folder there. When the block ends
    without error it replaces `target` (see `publish`); on error it is deleted, so a failed or killed writer never
    leaves a partial output under the final name, only a hidden `.NAME.tmp-*` folder at worst, which the next writer
    of `target` removes once its owner process is gone (`remove_stale_scratch`)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(target)
    scratch = Path(tempfile.mkdtemp(prefix=_scratch_prefix(target), dir=target.parent))
    (scratch / SCRATCH_OWNER_FILE).write_text(json.dumps(_this_process()), "utf-8")
    try:
        staged = scratch / target.name
        yield staged
        publish(staged, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


SCRATCH_OWNER_FILE = ".owner.json"  # in each scratch folder: the host, pid and start time of the writer
UNOWNED_SCRATCH_GRACE_SECONDS = 60  # a scratch folder without an owner file may be one being created right now


def _scratch_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def _process_start_time(pid: int) -> str | None:
    """The start time of process `pid` (Linux: /proc/PID/stat field 22), which tells a pid reused by a new process
    from the old one; None where it cannot be read."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start_time(os.getpid())}


def _owner_is_gone(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname():
        return False  # a writer on another machine sharing this disk: there is no telling, so keep it
    pid = owner.get("pid")
    if not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    start = _process_start_time(pid)
    return start is not None and owner.get("start") is not None and start != owner["start"]


def remove_stale_scratch(target: str | os.PathLike) -> list[Path]:
    """Delete the `.NAME.tmp-*` scratch folders `atomic_output` left beside `target` in writers that were killed
    (their owner process is gone); a live writer's folder, such as a concurrent export's, is kept. Returns what was
    removed."""
    target = Path(target)
    removed = []
    for scratch in target.parent.glob(_scratch_prefix(target) + "*"):
        if not scratch.is_dir():
            continue
        try:
            owner = json.loads((scratch / SCRATCH_OWNER_FILE).read_text("utf-8"))
            stale = not isinstance(owner, dict) or _owner_is_gone(owner)
        except FileNotFoundError:
            stale = time.time() - scratch.stat().st_mtime > UNOWNED_SCRATCH_GRACE_SECONDS
        except (OSError, ValueError):
            stale = True
        if stale:
            logger.warning(f"removing {scratch}, left by an interrupted writer of {target}")
            shutil.rmtree(scratch, ignore_errors=True)
            removed.append(scratch)
    return removed


def publish(staged: Path, target: Path) -> None:
    """Move a fully written file or folder to `target` with one rename, replacing what is there. The data is flushed
    to disk first (renaming is atomic, but without fsync a power loss could leave the renamed files empty). An
    existing folder is moved aside first, so `target` is never missing for longer than one rename."""
    _fsync_tree(staged)
    if target.is_dir() and not target.is_symlink():
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, retired / target.name)
        os.replace(staged, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staged, target)
    _fsync_dir(target.parent)


def write_json(path: str | os.PathLike, data) -> Path:
    """`data` as indented UTF-8 JSON at `path`, written atomically."""
    with atomic_output(path) as staged:
        staged.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", "utf-8")
    return Path(path)


def _fsync_tree(root: Path) -> None:
    paths = [root] if root.is_file() else [p for p in sorted(root.rglob("*")) if p.is_file()]
    for path in paths:
        with path.open("rb") as f:
            os.fsync(f.fileno())
    if root.is_dir():
        _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------------------------
# Whole or damaged: cheap checks of what a reader will need (headers, sizes, archive directories), not the values
# --------------------------------------------------------------------------------------------------------------------

TORCH_SAVE_SUFFIXES = (".pt", ".pth", ".bin")  # torch.save files (optimizer, scheduler, RNG states, .bin weights)
ZIP_MAGIC = b"PK\x03\x04"
# global_step*: DeepSpeed's checkpoint folders; pytorch_model_fsdp_*: FSDP's sharded ones (their .distcp files unread)
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "global_step*", "pytorch_model_fsdp_*")
GGUF_MAGIC = b"GGUF"


def file_damage(path: str | os.PathLike) -> str | None:
    """Why the file at `path` cannot be read whole, or None. Checked by kind: a safetensors file's header must parse
    and its tensors end exactly at the end of the file; a torch.save file is a zip archive whose central directory
    must read and whose members must fit the file (a .bin file only if it is a zip archive at all: OpenVINO's weights
    are .bin files too); a JSON file must parse; a GGUF file must start with its magic. Any of them empty is damaged.
    Other files pass."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    suffix = path.suffix
    if suffix not in (".safetensors", ".json", ".gguf", *TORCH_SAVE_SUFFIXES):
        return None
    if size == 0:
        return "empty file"
    try:
        if suffix == ".safetensors":
            return _safetensors_damage(path, size)
        if suffix == ".json":
            json.loads(path.read_text("utf-8"))
            return None
        if suffix == ".gguf":
            with path.open("rb") as f:
                return None if f.read(4) == GGUF_MAGIC else "not a GGUF file (no GGUF magic)"
        if suffix == ".bin":
            with path.open("rb") as f:
                if f.read(4) != ZIP_MAGIC:
                    return None
        return _zip_damage(path, size)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "does not parse as JSON"
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"


def _safetensors_damage(path: Path, size: int) -> str | None:
    # Layout: 8-byte little-endian header length N, N bytes of JSON, then the tensors' bytes at their data_offsets.
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated ({size} bytes, shorter than the safetensors header)"
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8:
            return f"truncated: its header needs {header_len + 8} bytes, the file has {size}"
        try:
            header = json.loads(f.read(header_len))
            ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, IndexError, TypeError):
            return "its safetensors header does not parse"
    needed = 8 + header_len + max(ends, default=0)
    if needed != size:
        state = "truncated" if needed > size else "longer than its tensors"
        return f"{state}: its tensors need {needed} bytes, the file has {size}"
    return None


def _zip_damage(path: Path, size: int) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except zipfile.BadZipFile:
        return "not a complete torch.save archive (truncated, or its zip directory is unreadable)"
    for member in members:
        if member.header_offset + member.compress_size > size:
            return f"truncated: archive member {member.filename} runs past the end of the file"
    return None


def model_damage(model_dir: str | os.PathLike, needs_weights: bool = True) -> str | None:
    """Why the saved model (or checkpoint, or with `needs_weights=False` any saved folder: a tokenizer, an exported
    model) in `model_dir` cannot be loaded whole, or None: every file directly in it (config, weights, tokenizer,
    optimizer state, ...) and in DeepSpeed's step folders must pass `file_damage`; a sharded model's index must name
    shards that exist. Sub-folders such as checkpoint-N are not part of the model and are not read."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return "missing" if not model_dir.exists() else "not a folder"
    if needs_weights and not any(any(model_dir.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        return "no model weights"
    files = [p for p in model_dir.iterdir() if p.is_file()]
    files += [p for step_dir in model_dir.glob("global_step*") if step_dir.is_dir() for p in step_dir.rglob("*")
              if p.is_file()]
    for path in sorted(files):
        damage = file_damage(path)
        if damage is not None:
            return f"{path.relative_to(model_dir)}: {damage}"
    for index in model_dir.glob("*.safetensors.index.json"):
        weight_map = json.loads(index.read_text("utf-8")).get("weight_map")
        if not isinstance(weight_map, dict):
            return f"{index.name} has no weight_map"
        missing = sorted({shard for shard in weight_map.values() if not (model_dir / shard).is_file()})
        if missing:
            return f"{index.name} names shards that are missing: {', '.join(missing)}"
    return None
