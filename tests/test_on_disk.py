"""Datasets built once and shared from disk (`tinyllm_hf.data.on_disk.built_once`): reuse, rebuild on new inputs,
damage detection."""

import contextlib
import logging
from types import SimpleNamespace

import datasets
import pytest

from tinyllm_hf.data.on_disk import CACHE_DIR, MANIFEST_FILE, built_once


def stage_args(tmp_path, local_process_index: int = 0):
    """The parts of a stage's TrainingArguments `built_once` reads, for the process `local_process_index`."""
    return SimpleNamespace(output_dir=str(tmp_path), local_process_index=local_process_index, dataset_num_proc=None,
                           main_process_first=lambda desc=None: contextlib.nullcontext())


class CountingBuild:
    def __init__(self, rows: int = 50):
        self.calls, self.rows = 0, rows

    def __call__(self):
        self.calls += 1
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"x": list(range(self.rows))})})


def test_built_once_is_reused_by_other_ranks_and_restarts_and_rebuilt_for_new_inputs(tmp_path):
    build = CountingBuild()
    first = built_once("demo", lambda: {"size": 50}, build, stage_args(tmp_path))
    assert build.calls == 1 and first["train"]["x"] == list(range(50))
    # Loaded from its folder (memory-mapped), so caches written beside it are files every rank can open.
    folder = tmp_path / CACHE_DIR
    assert first["train"].cache_files and all(f["filename"].startswith(str(folder)) for f in first["train"].cache_files)
    again = built_once("demo", lambda: {"size": 50}, build, stage_args(tmp_path))  # a restart
    rank1 = built_once("demo", lambda: {"size": 50}, build, stage_args(tmp_path, local_process_index=1))
    assert build.calls == 1
    assert again["train"]["x"] == rank1["train"]["x"] == first["train"]["x"]
    assert again["train"]._fingerprint == first["train"]._fingerprint  # so TRL's map caches beside it are found again
    other = built_once("demo", lambda: {"size": 20}, CountingBuild(20), stage_args(tmp_path))
    assert len(other["train"]) == 20 and len(list(folder.glob("demo-*"))) == 2


@pytest.mark.parametrize("damage", ["truncated", "same size, other bytes", "no manifest"])
def test_damaged_data_is_reported_and_built_again(tmp_path, caplog, damage):
    build = CountingBuild()
    built_once("demo", lambda: {}, build, stage_args(tmp_path))
    (folder,) = (tmp_path / CACHE_DIR).glob("demo-*")
    (arrow,) = folder.glob("train/*.arrow")
    data = arrow.read_bytes()
    if damage == "truncated":
        arrow.write_bytes(data[: len(data) // 2])
        reason = "train/data-00000-of-00001.arrow has"
    elif damage == "same size, other bytes":
        arrow.write_bytes(data[:-9] + bytes(b ^ 0xFF for b in data[-9:]))
        reason = "checksum differs"
    else:
        (folder / MANIFEST_FILE).unlink()
        reason = "the build did not finish"
    with caplog.at_level(logging.WARNING):
        rebuilt = built_once("demo", lambda: {}, build, stage_args(tmp_path))
    assert build.calls == 2 and rebuilt["train"]["x"] == list(range(50))
    assert "is damaged" in caplog.text and reason in caplog.text
