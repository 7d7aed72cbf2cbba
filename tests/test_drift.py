"""`tinyllm quantize drift`: an fp32 copy does not drift, a quantized variant gets finite numbers, a variant whose
runtime is missing is listed as skipped, bad paths fail with one line, and markdown and JSON hold the same numbers."""

import json
import math
import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from quant_fixtures import build_tiny_llama  # noqa: E402
from tinyllm_hf.cli import main as tinyllm  # noqa: E402
from tinyllm_hf.export import drift, quantize  # noqa: E402
from tinyllm_hf.inference import model_files  # noqa: E402

# Sizes that keep one drift run to seconds on the tiny fixture (context 256).
SMALL = ["--tasks", "4", "--task-tokens", "6", "--eval-chunks", "2", "--chunk-len", "32", "--gen-tokens", "8",
         "--speed-tokens", "8", "--threads", "2"]
QUESTIONS = [
    {"task": "sentiment", "messages": [{"role": "user", "content": "评论：房间干净。"},
                                       {"role": "assistant", "content": "正面"}]},
    {"task": "sentiment", "messages": [{"role": "user", "content": "评论：太吵了。"},
                                       {"role": "assistant", "content": "负面"}]},
    {"task": "xiehouyu", "messages": [{"role": "user", "content": "外甥打灯笼——"},
                                      {"role": "assistant", "content": "照旧"}]},
    {"task": "raw", "prompt": "这本书", "answer": "很好", "checker": "contains"},
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One drift run over an fp32 copy, a quanto-int8 variant and a GGUF file whose runtime is made to look missing."""
    root = tmp_path_factory.mktemp("drift")
    model = build_tiny_llama(root / "model")
    copy = shutil.copytree(model, root / "fp32-copy")
    variants = [copy]
    if model_files.importable("optimum.quanto"):
        variants.append(quantize.quantize_checkpoint(model, root / "quanto-int8", "quanto-int8"))
    gguf = root / "model-f16.gguf"
    gguf.write_bytes(b"GGUF")  # never opened: its runtime is reported missing below
    variants.append(gguf)
    tasks_file = root / "tasks.jsonl"
    tasks_file.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in QUESTIONS), "utf-8")

    real = model_files.importable
    patch = pytest.MonkeyPatch()
    patch.setattr(model_files, "importable", lambda module: module != "llama_cpp" and real(module))
    argv = ["drift", "--model", str(model), "--output", str(root / "drift.md"), "--tasks-file", str(tasks_file), *SMALL]
    for variant in variants:
        argv += ["--variant", str(variant)]
    try:
        assert tinyllm(["quantize", *argv]) == 0
    finally:
        patch.undo()
    result = json.loads((root / "drift.json").read_text("utf-8"))
    return result, (root / "drift.md").read_text("utf-8")


def _rows(result):
    return {row["name"]: row for row in result["variants"]}


def test_an_fp32_copy_does_not_drift(run):
    result, _ = run
    fp32, copy = _rows(result)["fp32"], _rows(result)["fp32-copy"]
    assert copy["drift_pct"] == pytest.approx(0.0, abs=1e-9)
    assert copy["greedy_match_min"] == 8 and copy["greedy_match_mean"] == 8.0
    assert copy["same_answer_as_fp32"] == copy["task_n"] == 4
    assert copy["task_correct"] == fp32["task_correct"]
    # The same answers repeat themselves alike: the repetition columns are measured on every variant's replies.
    assert copy["repetition"] == fp32["repetition"] and fp32["repetition"]["replies"] == 4
    assert copy["size_mib"] == pytest.approx(fp32["size_mib"])
    assert result["questions_per_task"] == {"sentiment": 2, "xiehouyu": 1, "raw": 1}


def test_a_quantized_variant_gets_finite_numbers(run):
    result, _ = run
    rows = _rows(result)
    if "quanto-int8" not in rows:
        pytest.skip('quanto-int8 needs optimum-quanto: pip install "tinyllm-hf[quant]"')
    row = rows["quanto-int8"]
    assert row["skipped"] is None and row["kind"] == "quanto-int8"
    for key in ("perplexity", "drift_pct", "size_mib", "decode_tokens_per_s", "greedy_match_mean"):
        assert math.isfinite(row[key]), key
    assert row["size_mib"] < rows["fp32"]["size_mib"]  # int8 linear weights (lm_head/embedding stay fp32)
    assert abs(row["drift_pct"]) < 5 and 0 <= row["greedy_match_min"] <= 8


def test_a_variant_without_its_runtime_is_listed_as_skipped(run):
    result, markdown = run
    row = _rows(result)["model-f16.gguf"]
    assert row["skipped"] and "llama-cpp-python" in row["skipped"]
    assert "| model-f16.gguf | skipped: " in markdown
    # ... and the table says how to add that row: what to install and the drift command for the skipped file.
    hint = next(line for line in markdown.splitlines() if line.startswith("The GGUF rows need llama-cpp-python"))
    assert 'pip install "tinyllm-hf[llamacpp]"' in hint and f"--variant {row['path']}" in hint
    assert f"--model {result['model']}" in hint


def test_markdown_and_json_hold_the_same_numbers(run):
    result, markdown = run
    table = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("| variant"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            table[cells[0]] = cells
    assert list(table) == [row["name"] for row in result["variants"]]
    for row in result["variants"]:
        assert table[row["name"]] == drift.table_row(row)
        if not row["skipped"]:
            assert table[row["name"]][2] == f"{row['perplexity']:.3f}"
            assert table[row["name"]][4].endswith(f"({row['task_correct']}/{row['task_n']})")
            loops = table[row["name"]][drift.HEADER.index("loops")]
            assert loops.endswith(f"({row['repetition']['loops']}/{row['task_n']})")
    assert "| loops | distinct-2 | repeated 4-grams |" in markdown


def test_bad_variants_fail_with_one_line(tmp_path, capsys):
    model = build_tiny_llama(tmp_path / "model")
    missing = tmp_path / "onnx-int8"
    argv = ["drift", "--model", str(model), "--variant", str(missing), "--output", str(tmp_path / "d.md")]
    assert tinyllm(["quantize", *argv]) == 1
    assert f"variant not found: {missing}" in capsys.readouterr().err
    assert not (tmp_path / "d.md").exists()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="must be a .gguf file"):
        drift.measure_drift(model, [tmp_path / "notes.txt"])
    with pytest.raises(ValueError, match="appear twice"):
        drift.measure_drift(model, [model, model])
    with pytest.raises(FileNotFoundError, match="config.json"):
        drift.measure_drift(tmp_path, [model])


def test_questions_are_taken_in_turn_from_each_task():
    records = [{"task": t, "i": i} for t in ("a", "b", "c") for i in range(3)]
    picked = drift.pick_questions(records, 5)
    assert [(r["task"], r["i"]) for r in picked] == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1)]


def _quantize_stage_commands(tmp_path, monkeypatch, quantize_entry, gguf_entry=None):
    from tinyllm_hf import pipeline

    recipe = {"sft": {}, "eval": {}, "quantize": quantize_entry, **({"gguf": gguf_entry} if gguf_entry else {})}
    run = pipeline.Pipeline(recipe, tmp_path, tmp_path / "r.yaml")
    commands = []
    monkeypatch.setattr(pipeline.Pipeline, "run_command", lambda self, stage, args: commands.append((stage, args)))
    run.quantize()
    return commands


def test_the_quantize_stage_measures_its_methods_and_the_recipes_gguf_files(tmp_path, monkeypatch):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "heldout_tasks.jsonl").write_text("{}\n")
    commands = _quantize_stage_commands(tmp_path, monkeypatch, {"methods": ["quanto-int8"], "drift": {"tasks": 5}},
                                        {"outtypes": ["f16", "q8_0"]})
    assert [args[:2] for _, args in commands] == [["quantize", "--model"], ["quantize", "drift"]]
    drift_args = commands[-1][1]
    variants = [drift_args[i + 1] for i, a in enumerate(drift_args) if a == "--variant"]
    assert variants == [str(tmp_path / "quantize" / "quanto-int8"), str(tmp_path / "gguf" / "model-f16.gguf"),
                        str(tmp_path / "gguf" / "model-q8_0.gguf")]
    assert drift_args[drift_args.index("--model") + 1] == str(tmp_path / "sft")
    assert drift_args[drift_args.index("--output") + 1] == str(tmp_path / "quantize" / "drift.md")
    assert drift_args[drift_args.index("--tasks-file") + 1] == str(tmp_path / "eval" / "heldout_tasks.jsonl")
    assert drift_args[-2:] == ["--tasks", "5"]


def test_drift_false_skips_the_table_and_removes_an_old_one(tmp_path, monkeypatch):
    old = tmp_path / "quantize" / "drift.md"
    old.parent.mkdir()
    old.write_text("stale")
    commands = _quantize_stage_commands(tmp_path, monkeypatch, {"methods": ["quanto-int8"], "drift": False})
    assert [args[1] for _, args in commands] == ["--model"] and not old.exists()
    with pytest.raises(ValueError, match="quantize.drift must be a mapping"):
        _quantize_stage_commands(tmp_path, monkeypatch, {"methods": [], "drift": "yes"}, {"outtypes": ["f16"]})


def test_size_counts_model_files_only(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 2**20)
    (tmp_path / "tokenizer.json").write_bytes(b"x" * 2**20)
    (tmp_path / "training_args.bin").write_bytes(b"x" * 2**20)
    (tmp_path / "checkpoint-150").mkdir()
    (tmp_path / "checkpoint-150" / "model.safetensors").write_bytes(b"x" * 2**20)
    assert drift.size_mib(tmp_path) == 1.0
