"""Peak memory of `tinyllm tokenizer train` against corpus size, with and without the training-text cap.

    python bench/tokenizer_memory.py --chars 40000000 100000000 --max-train-chars 20000000 [--vocab-size 8192]
    python bench/tokenizer_memory.py --streamed --chars 1000000000 --max-train-chars 20000000

For each size, writes a synthetic corpus of that many characters (.txt, one document per line) and runs
`tinyllm tokenizer train` on it in a child process, reporting the child's peak RSS (`os.wait4`) and wall time.
The corpus is made from the embedded corpus's train split: each clause is glued from two random pieces of real
clauses, so nearly every clause is new, as in a large real corpus (the trainer's memory grows with distinct
pre-tokens, and GPT-2's regex keeps a whole Chinese clause as one; repeating the embedded text would not grow it).
"""

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = "import sys; from tinyllm_hf.cli import main; sys.exit(main(sys.argv[1:]))"


def clauses() -> list[str]:
    from tinyllm_hf.data.corpus import load_corpus

    pieces = []
    for text in load_corpus("default", split="train")["text"]:
        pieces += [c for c in re.split(r"[，。！？；、\s]+", text) if len(c) >= 4]
    return pieces


def documents(chars: int, pieces: list[str], seed: int = 0):
    """Synthetic documents, `chars` characters in all: clauses glued from two random pieces of real clauses."""
    rng = random.Random(seed)
    written = 0
    while written < chars:
        document = []
        for _ in range(rng.randint(4, 16)):
            a, b = rng.choice(pieces), rng.choice(pieces)
            document.append(a[: rng.randint(2, len(a))] + b[rng.randint(0, len(b) - 2):])
        line = "，".join(document) + "。"
        written += len(line)
        yield line


def write_corpus(path: Path, chars: int, pieces: list[str]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for line in documents(chars, pieces):
            f.write(line + "\n")


# --streamed: `train_tokenizer` on documents generated in the process, no corpus file: the 1B-character setting without
# writing and preparing a 3 GB file (it measures the trainer and the sampling, not `load_corpus`).
STREAMED = """
import sys
sys.path.insert(0, sys.argv[1])
import tokenizer_memory
from tinyllm_hf.tokenizer.train import train_tokenizer
chars, cap, vocab_size = map(int, sys.argv[2:5])
train_tokenizer(tokenizer_memory.documents(chars, tokenizer_memory.clauses()), vocab_size=vocab_size,
                max_train_chars=cap or None)
"""


def measure(command: list[str], workdir: Path) -> tuple[float, float]:
    """(peak RSS in GiB, wall seconds) of one child process."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_CACHE": str(workdir / "datasets-cache"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"tokenizer training failed: {command}")
    return usage.ru_maxrss / 2**20, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chars", type=int, nargs="+", required=True, help="corpus sizes in characters")
    parser.add_argument("--max-train-chars", type=int, default=20_000_000, help="the cap (0: the whole corpus)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--streamed", action="store_true",
                        help="generate the documents inside the training process and call train_tokenizer on them "
                             "(no corpus file, no load_corpus), for corpora too large to write here")
    args = parser.parse_args()
    pieces = None if args.streamed else clauses()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for chars in args.chars:
            if args.streamed:
                command = [sys.executable, "-c", STREAMED, str(Path(__file__).parent), str(chars),
                           str(args.max_train_chars), str(args.vocab_size)]
            else:
                corpus = workdir / f"corpus-{chars}.txt"
                write_corpus(corpus, chars, pieces)
                command = [sys.executable, "-c", TRAIN, "tokenizer", "train", "--corpus", str(corpus), "--vocab-size",
                           str(args.vocab_size), "--max-train-chars", str(args.max_train_chars), "--tool-format", "0",
                           "--output", str(workdir / f"tok-{chars}"), "--overwrite"]
            rss, wall = measure(command, workdir)
            how = "train_tokenizer, streamed" if args.streamed else "tinyllm tokenizer train, .txt file"
            rows.append(f"| {chars:,} | {how} | {args.max_train_chars or 'none'} | {rss:.2f} | {wall:.0f} |")
            print(rows[-1], flush=True)
    print("| corpus chars | run | max_train_chars | peak RSS GiB | wall s |\n|---:|---|---:|---:|---:|\n"
          + "\n".join(rows))


if __name__ == "__main__":
    main()
