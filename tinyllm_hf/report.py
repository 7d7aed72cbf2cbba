"""The run report: `RUN/report/report.md` with its PNGs, written from the files the stages left behind.

Sections: per-stage time, steps, tokens and final losses; the loss curves; evaluation tables comparing the base,
SFT and aligned models (held-out tasks; C-Eval and CMMLU, or the command that runs them); the quantization table; and sample chats with the prompts fixed in the recipe.
"""

import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from tinyllm_hf.evaluation.repetition import REPETITION_HEADER, format_repetition
from tinyllm_hf.evaluation.results import BENCHMARK_TITLES, benchmark_table, category_table, skipped_benchmarks
from tinyllm_hf.runs import STAGES, TRAINING_STAGES, RunLayout
from tinyllm_hf.tasks import sample_prompt

# Free text, or a task and the fields of its question (`tinyllm_hf.tasks.sample_prompt`), as recipes write them.
DEFAULT_PROMPTS = [
    "你好，请介绍一下你自己。",
    {"task": "idiom_meaning", "word": "画蛇添足"},
    {"task": "sentiment", "text": "房间干净，服务也很热情。"},
    {"task": "xiehouyu", "riddle": "外甥打灯笼"},
    {"task": "segmentation", "text": "今天北京的天气很好"},
    "请帮我算一下 (17+25)*3。",
]
MAX_NEW_TOKENS = 64


def _read_json(path: Path):
    return json.loads(path.read_text("utf-8")) if path.exists() else None


def _fmt(value, pattern="{:,.0f}"):
    return "–" if value is None else pattern.format(value)


def stage_table(run: RunLayout, stages) -> str:
    rows = ["| stage | wall time | steps | tokens | final train loss | final eval loss |", "|---|---|---|---|---|---|"]
    for stage in stages:
        summary = _read_json(run.summary(stage))
        if summary is None:
            continue
        rows.append(
            f"| {stage} | {_fmt(summary['wall_time_s'], '{:,.0f} s')} | {_fmt(summary.get('steps'))} | "
            f"{_fmt(summary.get('tokens'))} | {_fmt(summary.get('final_loss'), '{:.4f}')} | "
            f"{_fmt(summary.get('final_eval_loss'), '{:.4f}')} |"
        )
    return "\n".join(rows)


def eval_table(run: RunLayout, model_stages) -> str:
    """One row per evaluated model (and one more per model evaluated with the built-in tools): perplexity, held-out
    task accuracy (overall and per task), tool-call validity, and the repetition of the replies (loops, distinct-2,
    repeated 4-grams: `evaluation/repetition.py`). C-Eval and CMMLU have their own tables
    (`benchmark_section`)."""
    results = {s: _read_json(run.eval_results(s)) for s in model_stages}
    results = {s: r for s, r in results.items() if r}
    if not results:
        return "_No evaluation results._"
    held_keys = ("tasks", "tasks_tools")
    task_names = sorted({t for r in results.values() for key in held_keys
                         for t in r["tasks"].get(key, {}).get("per_task", {})})
    header = ["model", "tools", "bits/char", "perplexity", "held-out tasks", *task_names, "valid tool calls",
              *REPETITION_HEADER]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def accuracy(entry):
        return "–" if not entry or entry.get("accuracy") is None else f"{100 * entry['accuracy']:.1f}%"

    for stage, result in results.items():
        tasks = result["tasks"]
        ppl = tasks.get("ppl", {})
        for key in [k for k in held_keys if k in tasks] or ["tasks"]:
            held = tasks.get(key, {})
            per_task = held.get("per_task", {})
            calls = held.get("tool_calls")
            validity = f"{100 * calls['validity']:.1f}% of {calls['n']}" if calls and calls.get("n") else "–"
            cells = [stage, "on" if key == "tasks_tools" else "off", _fmt(ppl.get("bits_per_char"), "{:.3f}"),
                     _fmt(ppl.get("perplexity"), "{:.2f}"), accuracy(held) + (f" ({held.get('mode')})" if held else ""),
                     *[accuracy(per_task.get(t)) for t in task_names], validity,
                     *format_repetition(held.get("repetition"))]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def benchmark_section(run: RunLayout, model_stages) -> list[str]:
    """C-Eval and CMMLU as the reference project reports them (model, type, C-Eval, CMMLU), then per category; a
    benchmark whose data was not reachable is named with the command that runs it."""
    models = {s: ("base" if s == "pretrain" else "chat", r) for s in model_stages if (r := _read_json(run.eval_results(s)))}
    models = {s: entry for s, entry in models.items() if any(b in entry[1]["tasks"] for b in BENCHMARK_TITLES)}
    if not models:
        return []
    lines = ["## C-Eval and CMMLU", "", "Accuracy in %: the base model by option likelihood (ppl mode), chat models by "
             "their generated answers (gen mode); C-Eval on its val split, CMMLU on its test split.", "",
             benchmark_table(models), ""]
    categories = category_table(models)
    if categories:
        lines += [categories, ""]
    skipped = skipped_benchmarks(models)
    if skipped:
        lines += ["Skipped, because the data was not reachable (no local folder in the recipe's `eval.benchmarks`, "
                  "and neither the Hub nor ModelScope answered). Put the official layout in a folder, then:", "",
                  *[f"- {line}" for line in skipped], "",
                  "or set `eval.benchmarks.ceval_dir` / `cmmlu_dir` in the recipe and rerun `tinyllm run --config "
                  "RECIPE --output_dir RUN --from-stage eval`.", ""]
    return lines


def sample_chats(model_dir: Path, prompts: list[str]) -> list[tuple[str, str]]:
    """(prompt, the exchange as the model saw it) for each prompt, as a one-turn chat with the built-in tools: greedy
    replies through the tool loop, each call's result and the answer rendered with their special tokens."""
    from tinyllm_hf.inference.runtime import SamplingParams, TransformersRuntime
    from tinyllm_hf.inference.tool_loop import Toolbox, run_tool_loop

    runtime = TransformersRuntime.from_pretrained(model_dir)
    toolbox = Toolbox.builtin()
    conversations = [[{"role": "user", "content": prompt}] for prompt in prompts]
    greedy = [SamplingParams(MAX_NEW_TOKENS, temperature=0.0) for _ in prompts]
    chats = []
    for conversation, done in zip(conversations, run_tool_loop(runtime, conversations, toolbox, greedy,
                                                               max_tokens=MAX_NEW_TOKENS)):
        before = runtime.render_chat(conversation, toolbox.schemas)
        after = runtime.tokenizer.apply_chat_template(conversation + done.messages, tools=toolbox.schemas,
                                                      tokenize=False)
        chats.append((conversation[0]["content"], after[len(before):]))
    return chats


def cpu_name() -> str:
    """The CPU's model name where Linux says it (`platform.processor()` is often empty), else the architecture."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def write_report(run: RunLayout, recipe: dict, chat_model: Path) -> Path:
    report_dir = run.report_dir
    report_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# tinyllm run report: {run.root.name}",
        "",
        f"Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {cpu_name()} ({platform.machine()}), "
        f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
        + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU") + ".",
        "",
        "## Stages",
        "",
        stage_table(run, [s for s in STAGES if s != "report"]),
    ]
    total = sum((_read_json(run.summary(s)) or {}).get("wall_time_s", 0) for s in STAGES)
    lines += ["", f"Total wall time of the finished stages: {total / 60:.1f} min.", ""]

    curves = []
    for stage in TRAINING_STAGES:
        source = run.loss_curve(stage)
        if source.exists():
            shutil.copy2(source, report_dir / f"{stage}_loss.png")
            curves.append(f"![{stage} loss]({stage}_loss.png)")
    if curves:
        lines += ["## Loss curves", "", *curves, ""]

    lines += ["## Evaluation", "", "Base model scored by likelihood (ppl mode), chat models by their generated answers "
              "on the held-out items of the embedded tasks (none of them seen in training).", "",
              eval_table(run, [s for s in TRAINING_STAGES if s != "reward"]), ""]
    lines += benchmark_section(run, [s for s in TRAINING_STAGES if s != "reward"])
    reward = _read_json(run.reward_accuracy)
    if reward:
        per_task = "; ".join(f"{task} {100 * r['pairwise_accuracy']:.1f}% of {r['pairs']}"
                             for task, r in reward.get("per_task", {}).items())
        lines += [f"Reward model: pairwise accuracy {100 * reward['pairwise_accuracy']:.1f}% on "
                  f"{reward['heldout_pairs']} held-out preference pairs" + (f" ({per_task})." if per_task else "."), ""]

    quant = run.drift_table
    if quant.exists():
        lines += ["## Quantized variants", "", quant.read_text("utf-8"), ""]

    prompts = [sample_prompt(p) for p in (recipe.get("report") or {}).get("prompts") or DEFAULT_PROMPTS]
    lines += ["## Sample chats", "", f"Greedy replies of `{chat_model.name}` with the built-in tools (special tokens "
              "shown: a `<tool_call>`, the tool's `<|tool|>` result, then the answer).", ""]
    for prompt, reply in sample_chats(chat_model, prompts):
        lines += [f"**User:** {prompt}", "", "**Assistant:**", "", "```text", reply, "```", ""]

    release = run.staged_release
    if release.exists():
        lines += ["## Release", "", f"Staged for the Hub in `{release}`: "
                  + ", ".join(sorted(p.name for p in release.iterdir())) + ".", ""]
    path = run.report
    path.write_text("\n".join(lines), "utf-8")
    print(f"report written to {path}")
    return path
