"""The layout of a `tinyllm run` folder, and the one way outputs are written: atomically.

    RUN/<stage>/            one folder per stage, in the order of STAGES (a stage's model, logs and results)
    RUN/<stage>/stage.json  written last, when the stage finished: a stage without it runs again
    RUN/eval/<stage>.json   `tinyllm eval` results of the model in RUN/<stage>
    RUN/tinyllm_stages.json the training stages' summaries, for the model card

`RunLayout` names every path in such a folder; the file-name constants are the names stages write inside their own
output folder, so a stage run alone (`tinyllm sft --output_dir X`) writes what the pipeline and the card then read.
`atomic_output` / `publish` are how every output (tokenizer, checkpoint, quantized model, GGUF file, stage summary)
reaches its final name: written beside it, then renamed, so a reader never finds half of one.

This module uses only the standard library: the pipeline, the report and the card read it without loading torch.
"""

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# gguf runs before quantize: the quantize stage ends by measuring every variant, GGUF files included, against fp32.
STAGES = ("tokenizer", "pretrain", "sft", "reward", "dpo", "grpo", "eval", "gguf", "quantize", "release", "report")
TRAINING_STAGES = ("pretrain", "sft", "reward", "dpo", "grpo")
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
    leaves a partial output under the final name, only a hidden `.NAME.tmp-*` folder at worst."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        staged = scratch / target.name
        yield staged
        publish(staged, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


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
