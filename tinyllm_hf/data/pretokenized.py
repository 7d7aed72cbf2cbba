"""Pretraining blocks tokenized once and saved to disk in shards, with a manifest of what they were made from.

    tinyllm pretokenize --config recipes/pretrain/92m.yaml [--preprocessing_num_workers 16] [--overwrite]

`pretokenize` reads a corpus with `load_corpus` (the same cleaning and train/validation split as every other path),
packs each split with `pack_dataset` (`datasets.map` over `num_proc` processes) and writes both splits with
`save_to_disk` into a folder that appears under its final name only when complete (`atomic_output`): its manifest,
written last, names the corpus (with `corpus_fingerprint`), the tokenizer (`tokenizer_fingerprint`), the block size
and the documents, blocks and tokens of each split, and lists every file with its size.

A folder is trusted only when its manifest parses and every listed file has its size (`pretokenized_damage`), so a
half-copied or truncated folder is found before training starts. Asking again for the same inputs reuses the folder
without reading the corpus; asking for other inputs (another tokenizer, block size or corpus) is refused unless
`overwrite` says to replace it, so blocks of two tokenizers are never mixed.

Training reads the blocks memory-mapped (`load_pretokenized`): a map-style dataset, so with several processes each one
reads only the blocks its `DistributedSampler` share names (no batches sent from rank 0), and a resumed run skips the
trained batches by their indices without reading or tokenizing them.
"""

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import datasets
from transformers.utils import logging

from tinyllm_hf.data.corpus import SPLITS, corpus_fingerprint, load_corpus
from tinyllm_hf.data.packing import PACK_BATCH_DOCS, pack_dataset, tokenizer_fingerprint
from tinyllm_hf.errors import UsageError
from tinyllm_hf.runs import atomic_output

MANIFEST_FILE = "tinyllm_pretokenized.json"
FORMAT_VERSION = 1

logger = logging.get_logger("tinyllm_hf")


def pretokenized_inputs(dataset_name: str, tokenizer, block_size: int, text_field: str = "text",
                        dataset_config: str | None = None) -> dict:
    """What a pre-tokenized dataset is made from; two datasets with equal inputs hold the same blocks."""
    return {
        "format": FORMAT_VERSION,
        "corpus": {"dataset_name": str(dataset_name), "dataset_config": dataset_config, "text_field": text_field,
                   "fingerprint": corpus_fingerprint(str(dataset_name), text_field, dataset_config)},
        "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer),
                      "eos_token_id": tokenizer.eos_token_id},
        "block_size": block_size,
        "pack_batch_docs": PACK_BATCH_DOCS,
    }


def read_manifest(path: str | Path) -> dict | None:
    """The manifest of the pre-tokenized dataset at `path`, or None when there is none (or it does not parse)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def pretokenized_damage(path: str | Path) -> str | None:
    """Why the folder at `path` is not a whole pre-tokenized dataset, or None: the manifest must parse and every file
    it lists must exist with the size it had when written (a folder copied or written halfway fails this)."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        return f"no readable {MANIFEST_FILE} (not written by `tinyllm pretokenize`, or not finished)"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return f"{MANIFEST_FILE} lists no files"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} when written"
    return None


def inputs_mismatch(found: dict, wanted: dict) -> str | None:
    """Which inputs of a manifest differ from the ones asked for, in words, or None."""
    differences = []
    for key in ("format", "block_size", "pack_batch_docs"):
        if found.get(key) != wanted[key]:
            differences.append(f"{key} {found.get(key)} (asked: {wanted[key]})")
    if (found.get("tokenizer") or {}).get("fingerprint") != wanted["tokenizer"]["fingerprint"]:
        differences.append("another tokenizer")
    corpus, asked = found.get("corpus") or {}, wanted["corpus"]
    if {k: corpus.get(k) for k in asked if k != "fingerprint"} != {k: v for k, v in asked.items() if k != "fingerprint"}:
        differences.append(f"corpus {corpus.get('dataset_name')!r}/{corpus.get('dataset_config')}/"
                           f"{corpus.get('text_field')} (asked: {asked['dataset_name']!r}/{asked['dataset_config']}/"
                           f"{asked['text_field']})")
    elif corpus.get("fingerprint") != asked["fingerprint"]:
        differences.append("the corpus changed since (its files, package versions or the cleaning code)")
    return "; ".join(differences) or None


def pretokenize(dataset_name: str, tokenizer, block_size: int, output: str | Path, text_field: str = "text",
                dataset_config: str | None = None, num_proc: int | None = None, num_shards: int | None = None,
                overwrite: bool = False) -> dict:
    """Tokenize and pack a corpus into `output` once (see the module's docstring); the manifest.

    A whole dataset of the same inputs already at `output` is reused as it is. One of other inputs is an error unless
    `overwrite`; a damaged one (its manifest says it is ours) is rebuilt; a folder that is not a pre-tokenized dataset
    at all is never replaced without `overwrite`. `num_shards`: files of the train split (default: datasets' 500 MB
    per shard).
    """
    output = Path(output)
    wanted = pretokenized_inputs(dataset_name, tokenizer, block_size, text_field, dataset_config)
    if output.exists():
        manifest, damage = read_manifest(output), pretokenized_damage(output)
        if manifest is None:
            if not overwrite and not (output.is_dir() and not any(output.iterdir())):
                raise UsageError(f"{output} exists and is not a pre-tokenized dataset ({damage}); remove it, choose "
                                 "another tokenized_dataset, or pass --overwrite to replace it")
        else:
            mismatch = inputs_mismatch(manifest.get("inputs") or {}, wanted)
            if mismatch is not None and not overwrite:
                raise UsageError(f"{output} holds blocks made from other inputs: {mismatch}; point tokenized_dataset "
                                 "elsewhere, or pass --overwrite to rebuild it")
            if mismatch is None and damage is None:
                logger.warning(f"pre-tokenized blocks in {output} match the corpus, tokenizer and block size: reused")
                return manifest
            if damage is not None:
                logger.warning(f"pre-tokenized dataset {output} is damaged ({damage}): building it again")
    if num_shards is not None and num_shards < 1:
        raise UsageError(f"num_shards must be at least 1, not {num_shards}")

    start = time.perf_counter()
    corpus = load_corpus(dataset_name, text_field=text_field, config=dataset_config)
    blocks, splits = {}, {}
    for split in SPLITS:
        documents = corpus[split]
        packing_start = time.perf_counter()
        blocks[split] = pack_dataset(documents, tokenizer, block_size, num_proc=num_proc)
        seconds = time.perf_counter() - packing_start
        splits[split] = {"documents": len(documents), "blocks": len(blocks[split]),
                         "tokens": len(blocks[split]) * block_size, "packing_seconds": round(seconds, 2)}
    if splits["validation"]["blocks"] == 0:
        raise UsageError(f"the validation split of {dataset_name!r} holds less than one block of {block_size} tokens")
    with atomic_output(output) as staged:
        shards = {"train": num_shards} if num_shards else None
        datasets.DatasetDict(blocks).save_to_disk(str(staged), num_shards=shards,
                                                  num_proc=num_proc if num_proc and num_proc > 1 else None)
        files = {p.relative_to(staged).as_posix(): p.stat().st_size for p in sorted(staged.rglob("*")) if p.is_file()}
        manifest = {"inputs": wanted, "splits": splits, "files": files, "num_proc": num_proc,
                    "seconds": round(time.perf_counter() - start, 2),
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        # Last: a folder holding the manifest has everything the manifest lists.
        (staged / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", "utf-8")
    train = splits["train"]
    logger.warning(f"pre-tokenized {train['documents']:,} + {splits['validation']['documents']:,} documents into "
                   f"{train['blocks']:,} + {splits['validation']['blocks']:,} blocks of {block_size} tokens in "
                   f"{manifest['seconds']:.1f} s -> {output}")
    return manifest


def load_pretokenized(path: str | Path, wanted: dict) -> datasets.DatasetDict:
    """The train and validation blocks at `path`, memory-mapped, after checking that the folder is whole and was made
    from the `wanted` inputs (`pretokenized_inputs`)."""
    path = Path(path)
    damage = pretokenized_damage(path)
    if damage is not None:
        raise UsageError(f"tokenized_dataset {path}: {damage}; build it with `tinyllm pretokenize --config RECIPE` "
                         "(it replaces a damaged one)")
    mismatch = inputs_mismatch(read_manifest(path).get("inputs") or {}, wanted)
    if mismatch is not None:
        raise UsageError(f"tokenized_dataset {path} was made from other inputs: {mismatch}; rebuild it with "
                         "`tinyllm pretokenize --config RECIPE --overwrite` or point tokenized_dataset elsewhere")
    return datasets.load_from_disk(str(path))
