"""Test-only: `datasets.load_dataset` answers a few Hugging Face Hub names from local files, in every process started
with this folder on PYTHONPATH (the stages of `tinyllm run` and their `accelerate launch` workers).

TINYLLM_TEST_HUB_FILES holds JSON {hub name: {"config": name or null, "builder": "parquet" | "json",
"data_files": [paths]}}: those files are written in the dataset's published schema, so the project's loaders read
them exactly as they would the Hub's. Every such call is appended as a JSON line to TINYLLM_TEST_HUB_LOG. Other names
go to the real `load_dataset`. The patch is applied when `datasets` is first imported, so processes that never use it
do not pay for importing it.
"""

import importlib.abc
import importlib.util
import json
import os
import sys


def _patch(datasets) -> None:
    files = json.loads(os.environ["TINYLLM_TEST_HUB_FILES"])
    real = datasets.load_dataset

    def load_dataset(path, name=None, *args, **kwargs):
        entry = files.get(path)
        if entry is None:
            return real(path, name, *args, **kwargs)
        if name != entry["config"]:
            raise ValueError(f"{path} has no configuration {name!r} here (only {entry['config']!r})")
        with open(os.environ["TINYLLM_TEST_HUB_LOG"], "a", encoding="utf-8") as log:
            log.write(json.dumps({"path": path, "name": name, "pid": os.getpid(), "split": kwargs.get("split"),
                                  "streaming": kwargs.get("streaming", False)}) + "\n")
        return real(entry["builder"], *args, data_files=entry["data_files"], **kwargs)

    datasets.load_dataset = load_dataset


class _PatchDatasetsOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "datasets":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("datasets")
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if os.environ.get("TINYLLM_TEST_HUB_FILES"):
    sys.meta_path.insert(0, _PatchDatasetsOnImport())
