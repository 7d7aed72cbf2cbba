"""Peak memory of `tinyllm tokenizer train` against corpus size, with and without the training-text cap.

    python bench/tokenizer_memory.py --chars 40000000 80000000 --max-train-chars 20000000 [--vocab-size 8192]

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


def write_corpus(path: Path, chars: int, pieces: list[str], seed: int = 0) -> None:
    rng = random.Random(seed)
    written = 0
    with path.open("w", encoding="utf-8") as f:
        while written < chars:
            document = []
            for _ in range(rng.randint(4, 16)):
                a, b = rng.choice(pieces), rng.choice(pieces)
                document.append(a[: rng.randint(2, len(a))] + b[rng.randint(0, len(b) - 2):])
            line = "，".join(document) + "。"
            f.write(line + "\n")
            written += len(line)


def measure(corpus: Path, max_train_chars: int, vocab_size: int, workdir: Path) -> tuple[float, float]:
    """(peak RSS in GiB, wall seconds) of one `tinyllm tokenizer train` run."""
    output = workdir / f"tok-{corpus.stem}-{max_train_chars}"
    command = [sys.executable, "-c", TRAIN, "tokenizer", "train", "--corpus", str(corpus), "--vocab-size",
               str(vocab_size), "--max-train-chars", str(max_train_chars), "--tool-format", "0", "--output",
               str(output), "--overwrite"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_CACHE": str(workdir / "datasets-cache"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"tokenizer training failed on {corpus}")
    return usage.ru_maxrss / 2**20, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chars", type=int, nargs="+", required=True, help="corpus sizes in characters")
    parser.add_argument("--max-train-chars", type=int, default=20_000_000, help="the cap (0: the whole corpus)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()
    pieces = clauses()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for chars in args.chars:
            corpus = workdir / f"corpus-{chars}.txt"
            write_corpus(corpus, chars, pieces)
            rss, wall = measure(corpus, args.max_train_chars, args.vocab_size, workdir)
            rows.append(f"| {chars:,} | {args.max_train_chars or 'none'} | {rss:.2f} | {wall:.0f} |")
            print(rows[-1], flush=True)
    print("| corpus chars | max_train_chars | peak RSS GiB | wall s |\n|---:|---:|---:|---:|\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
