"""Datasets that every process of a run shares: built once, saved to disk, loaded from there by every rank.

A fine-tuning stage builds its data in Python (the embedded sets, rows of your files converted to conversations or
pairs, conversations tokenized). Built in memory on each rank, that costs every rank the whole build at every start
and resume (SFT on BELLE: 10-25 min per rank), and a dataset in memory has no folder: TRL's caches beside it (DPO's
and KTO's precomputed reference log-probs) then land in a per-process temp dir the other ranks cannot open.

`built_once(name, inputs, build, args)` keys the data by a fingerprint of what it is made from (`inputs`: sources
and their files' size and mtime, task sizes, seed, tokenizer, ... plus the code that builds it) and keeps it in
`<output_dir>/datasets/<name>-<fingerprint>/`. The main process of each machine goes first: it loads that folder when
it is whole, else builds, saves (`save_to_disk`, into a staging folder renamed into place, so a killed build leaves
nothing that looks whole) and records every file's size and checksum in a manifest. The other processes then load
the same folder (memory-mapped). A change of inputs gives another fingerprint, so another folder; a folder whose
files no longer match the manifest (truncated, edited, half-deleted) is reported and built again.
"""

import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import datasets

from tinyllm_hf.data.corpus import SOURCE_FILES, is_installed, source_signature

logger = logging.getLogger(__name__)

CACHE_DIR = "datasets"  # under the stage's output_dir
MANIFEST_FILE = "tinyllm_manifest.json"
PACKAGE_DIR = Path(__file__).resolve().parents[1]
# The code that turns inputs into rows and rows into tokens: a change to any of it builds the data again.
CODE_DIRS = ("data", "tasks", "tokenizer")
CODE_FILES = ("trainers/alignment.py", "trainers/sft.py")
CHUNK = 1 << 22


def code_fingerprint() -> str:
    hasher = hashlib.blake2b(digest_size=16)
    files = [p for d in CODE_DIRS for p in sorted((PACKAGE_DIR / d).rglob("*.py"))]
    for path in files + [PACKAGE_DIR / f for f in CODE_FILES]:
        hasher.update(str(path.relative_to(PACKAGE_DIR)).encode() + b"\0" + path.read_bytes())
    return hasher.hexdigest()


def fingerprint(inputs) -> str:
    """A short hash of `inputs` (anything JSON can write; keys sorted) and of the package's data-building code."""
    text = json.dumps([code_fingerprint(), inputs], sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=12).hexdigest()


def files_signature(paths) -> list[str]:
    """Each file's path, size and modification time: what a build from local files depends on."""
    return [f"{p.resolve()}|{p.stat().st_size}|{p.stat().st_mtime_ns}" for p in paths]


def embedded_signature() -> list[str]:
    """What the embedded ("default") sets depend on: the installed data packages' versions and files."""
    return [source_signature(name) for name in SOURCE_FILES if is_installed(name)]


def tokenizer_fingerprint(tokenizer) -> str:
    """What tokenized data depends on in a tokenizer: its vocabulary, merges, pre-tokenizer, added tokens and chat
    template; not the truncation and padding settings the backend keeps as state (they change when it is called)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
    else:  # a slow (Python) tokenizer
        state = sorted(tokenizer.get_vocab().items())
    description = {"class": type(tokenizer).__name__, "backend": state, "chat_template": tokenizer.chat_template,
                   "special_tokens": tokenizer.all_special_tokens}
    text = json.dumps(description, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def _checksum(path: Path) -> str:
    hasher = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def write_manifest(folder: Path, name: str, key: str, inputs) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    manifest = {"name": name, "fingerprint": key, "inputs": inputs,
                "files": {str(p.relative_to(folder)): {"size": p.stat().st_size, "blake2b": _checksum(p)}
                          for p in files}}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, ensure_ascii=False, default=str) + "\n",
                                        encoding="utf-8")


def damage(folder: Path, verify_checksums: bool = True) -> str | None:
    """Why the saved dataset in `folder` is not whole (None when it is): no manifest (never finished), a file it
    lists missing or of another size, or with `verify_checksums` another content. Files written later beside the
    saved ones (the `cache-*.arrow` of datasets' and TRL's maps) are not part of it."""
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        return "missing" if not folder.exists() else f"no {MANIFEST_FILE} (the build did not finish)"
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError) as err:
        return f"unreadable {MANIFEST_FILE} ({err})"
    for relative, expected in files.items():
        path = folder / relative
        if not path.is_file():
            return f"{relative} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{relative} has {path.stat().st_size} bytes, not {expected['size']}"
        if verify_checksums and _checksum(path) != expected["blake2b"]:
            return f"{relative} has changed since it was written (checksum differs)"
    return None


def _save(dataset, folder: Path, name: str, key: str, inputs, num_proc: int | None) -> None:
    """Save into a staging folder beside `folder`, then rename it into place: a build killed half-way leaves a
    staging folder (removed by the next build), never a `folder` that looks whole."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.{socket.gethostname()}-{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    dataset.save_to_disk(str(staging), num_proc=num_proc)
    write_manifest(staging, name, key, inputs)
    shutil.rmtree(folder, ignore_errors=True)  # a damaged copy
    try:
        os.rename(staging, folder)
    except OSError:  # another machine's main process, sharing the folder, finished the same build first
        shutil.rmtree(staging, ignore_errors=True)
        if damage(folder, verify_checksums=False) is not None:
            raise


def cache_root(args) -> Path:
    return Path(args.output_dir) / CACHE_DIR


def built_once(name: str, inputs: Callable[[], object], build: Callable[[], datasets.Dataset | datasets.DatasetDict],
               args) -> datasets.Dataset | datasets.DatasetDict:
    """The dataset `build()` makes, saved once under `cache_root(args)` and loaded from there by every process.

    name: what it is (the folder's prefix), e.g. "sft-conversations". inputs: returns what the build depends on (JSON
    writable), called inside the main-process-first block so that only the main process downloads a Hub dataset
    first. args: the stage's TrainingArguments (output_dir, main_process_first, dataset_num_proc)."""
    with args.main_process_first(desc=f"building the {name} data"):
        described = inputs()
        key = fingerprint(described)
        folder = cache_root(args) / f"{name}-{key}"
        # The main process of each machine checks every byte; the others, which load after it, only the sizes.
        is_first = getattr(args, "local_process_index", 0) == 0
        problem = damage(folder, verify_checksums=is_first)
        if problem is None:
            logger.warning(f"{name}: reusing the data built before in {folder}")
        else:
            if problem != "missing":
                logger.warning(f"{name}: the saved data in {folder} is damaged ({problem}): building it again")
            for stale in folder.parent.glob(f".{folder.name}.{socket.gethostname()}-*.tmp") if is_first else ():
                shutil.rmtree(stale, ignore_errors=True)  # left by a build on this machine that was killed
            _save(build(), folder, name, key, described, getattr(args, "dataset_num_proc", None))
            logger.warning(f"{name}: built and saved to {folder}")
        return datasets.load_from_disk(str(folder))
