"""`tinyllm run` end to end with the quickstart recipe cut to a few steps, so no stage can break another silently."""

import json
from pathlib import Path

import pytest
import yaml

from tinyllm_hf.cli import main as tinyllm
from tinyllm_hf.pipeline import as_flags, load_pipeline_recipe, main
from tinyllm_hf.runs import STAGES, RunLayout, atomic_output

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"


def smoke_recipe(tmp_path: Path) -> Path:
    """The quickstart recipe, every stage kept, with step counts and data sizes cut down for CI."""
    recipe = load_pipeline_recipe(ROOT / "recipes" / "quickstart.yaml")
    recipe["tokenizer"].update(corpus="reviews", vocab_size=600)
    few_steps = {"max_steps": 3, "save_steps": 2, "logging_steps": 1, "eval_steps": 2, "report_to": "none"}
    recipe["pretrain"]["args"] = {**few_steps, "dataset_name": "reviews", "config_overrides":
                                  "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=4",
                                  "per_device_train_batch_size": 4, "max_eval_samples": 4}
    preference_sizes = "sentiment=8,idiom_meaning=4"
    recipe["sft"]["args"] = {**few_steps, "sft_tasks": "sentiment,xiehouyu,identity",
                             "task_sizes": "sentiment=16,xiehouyu=8,identity=4", "heldout_eval_sizes": "sentiment=2"}
    preference_args = {"tasks": "sentiment,idiom_meaning", "task_sizes": preference_sizes, "max_eval_samples": 8}
    recipe["reward"]["args"] = {**few_steps, **preference_args}
    recipe["dpo"]["args"] = {**few_steps, **preference_args}
    recipe["eval"].update(task_sizes="sentiment=4,xiehouyu=2", args={"max-new-tokens": 8})
    # C-Eval from the official layout; CMMLU from nowhere (offline, no folder): recorded as skipped.
    recipe["eval"]["benchmarks"].update(ceval_dir=str(FIXTURES / "ceval"), limit=2)
    recipe["quantize"]["methods"] = ["quanto-int8"]  # the ONNX export alone takes minutes; tests/test_quantize.py covers it
    recipe["quantize"]["drift"] = {"tasks": 4, "task_tokens": 4, "eval_chunks": 2, "chunk_len": 32, "gen_tokens": 4,
                                   "speed_tokens": 8}
    recipe["gguf"]["outtypes"] = ["f16"]
    recipe["report"]["prompts"] = recipe["report"]["prompts"][:2]
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), "utf-8")
    return path


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_quickstart_pipeline_runs_every_stage_and_resumes(tmp_path, capsys):
    recipe = smoke_recipe(tmp_path)
    run_dir = tmp_path / "run"
    assert main(["--config", str(recipe), "--output_dir", str(run_dir)]) == 0
    configured = [s for s in STAGES if s in yaml.safe_load(recipe.read_text("utf-8"))]
    # The quickstart runs every stage but GRPO (GPU recipes add it) and distillation (it needs a larger teacher).
    assert set(STAGES) - set(configured) == {"grpo", "distill"}
    for stage in configured:
        assert (run_dir / stage / "stage.json").exists(), f"stage {stage} did not finish"
    report = (run_dir / "report" / "report.md").read_text("utf-8")
    assert "## Stages" in report and "## Evaluation" in report and "## Sample chats" in report
    drift = json.loads((run_dir / "quantize" / "drift.json").read_text())
    assert [v["name"] for v in drift["variants"]] == ["fp32", "quanto-int8", "model-f16.gguf"]
    assert "## Quantized variants" in report and "| quanto-int8 |" in report
    assert (run_dir / "report" / "pretrain_loss.png").exists()
    staged = run_dir / "release" / "staged"
    assert {"README.md", "model.safetensors", "modeling_tinyllm.py", "model-f16.gguf"} <= {p.name for p in staged.iterdir()}
    stages = json.loads((run_dir / "tinyllm_stages.json").read_text())
    assert [s["stage"] for s in stages] == ["pretrain", "sft", "reward", "dpo"]
    assert stages[0]["steps"] == 3 and stages[0]["final_loss"] > 0
    eval_sft = json.loads((run_dir / "eval" / "sft.json").read_text())
    assert 0 < eval_sft["tasks"]["tasks"]["n"] <= 6  # sentiment=4,xiehouyu=2: only the tasks the recipe names
    eval_base = json.loads((run_dir / "eval" / "pretrain.json").read_text())
    assert (eval_base["tasks"]["ceval"]["mode"], eval_base["tasks"]["ceval"]["shots"]) == ("ppl", 5)
    assert eval_sft["tasks"]["ceval"]["mode"] == "gen" and eval_sft["tasks"]["ceval"]["n"] == 10  # 5 subjects x 2
    assert "skipped" in eval_sft["tasks"]["cmmlu"]
    assert "## C-Eval and CMMLU" in report and "| pretrain | base | " in report and "ppl, 5-shot) | skipped" in report
    assert "--tasks cmmlu --cmmlu-dir DIR --mode gen --shots 0`" in report

    # A second run finds every stage finished and does nothing but say so.
    capsys.readouterr()
    assert main(["--config", str(recipe), "--output_dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.count("done already") == len(configured)


def test_an_unfinished_stage_runs_again(tmp_path, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("output_dir: x\nrelease:\n  repo_id: a/b\n", "utf-8")
    ran = []
    from tinyllm_hf import pipeline

    monkeypatch.setattr(pipeline.Pipeline, "release", lambda self: ran.append("release"))
    run_dir = tmp_path / "run"
    (run_dir / "release").mkdir(parents=True)
    (run_dir / "release" / "stage.json.tmp").write_text("{")  # a crash while writing the summary
    assert main(["--config", str(recipe), "--output_dir", str(run_dir)]) == 0
    assert ran == ["release"] and (run_dir / "release" / "stage.json").exists()
    assert main(["--config", str(recipe), "--output_dir", str(run_dir)]) == 0
    assert ran == ["release"]


def test_bad_recipes_give_clear_errors(tmp_path, capsys):
    assert tinyllm(["run", "--config", str(tmp_path / "missing.yaml")]) == 1
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrian: {}\n", "utf-8")
    assert tinyllm(["run", "--config", str(bad)]) == 1
    assert "pretrian" in capsys.readouterr().err


def test_the_tokenizer_stage_passes_on_its_training_text_cap(tmp_path, monkeypatch):
    from tinyllm_hf import pipeline

    commands = []
    monkeypatch.setattr(pipeline.Pipeline, "run_command", lambda self, stage, args, accelerate=None: commands.append(args))
    for cap in (5000, 0, None):
        entry = {"corpus": "reviews", **({"max_train_chars": cap} if cap is not None else {})}
        pipeline.Pipeline({"tokenizer": entry}, tmp_path / "run", tmp_path / "r.yaml").tokenizer()
    assert [args[args.index("--max-train-chars") + 1] if "--max-train-chars" in args else None
            for args in commands] == ["5000", "0", None]  # None: the command's default cap


def test_recipe_args_become_flags():
    assert as_flags({"max_steps": 3, "report_to": ["none"], "resume": True}) == [
        "--max_steps", "3", "--report_to", "none", "--resume", "true"]


@pytest.mark.slow
def test_training_stages_run_under_accelerate_launch(tmp_path):
    recipe = yaml.safe_load(smoke_recipe(tmp_path).read_text("utf-8"))
    recipe = {"accelerate": {"cpu": True, "num_processes": 1, "num_machines": 1, "mixed_precision": "no",
                             "dynamo_backend": "no"},
              "tokenizer": recipe["tokenizer"], "pretrain": recipe["pretrain"]}
    blocks = tmp_path / "blocks"
    recipe["pretrain"]["args"]["tokenized_dataset"] = str(blocks)  # tokenized before the launch, then read
    path = tmp_path / "accelerate.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), "utf-8")
    run_dir = tmp_path / "run"
    assert main(["--config", str(path), "--output_dir", str(run_dir)]) == 0
    log = (run_dir / "pretrain" / "stage.log").read_text("utf-8")
    command = next(line for line in log.splitlines() if line.startswith("$ accelerate"))
    assert command.startswith("$ accelerate launch --cpu ") and " --num_processes 1 " in command
    assert " -m tinyllm_hf.trainers.pretrain --config " in command and f" --tokenized_dataset {blocks} " in command
    assert log.index("$ tinyllm pretokenize --config ") < log.index("$ accelerate launch")
    assert (blocks / "tinyllm_pretokenized.json").is_file()
    assert (run_dir / "tokenizer" / "stage.log").read_text("utf-8").startswith("$ tinyllm tokenizer train")
    summary = json.loads((run_dir / "pretrain" / "stage.json").read_text())
    assert summary["steps"] == 3 and summary["dataset"] == "reviews"


def test_a_bad_accelerate_entry_is_named(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("pretrain: {recipe: recipes/pretrain/quickstart.yaml, accelerate: deepspeed}\n", "utf-8")
    assert tinyllm(["run", "--config", str(path), "--output_dir", str(tmp_path / "run")]) == 1
    assert "accelerate: for pretrain must be a mapping" in capsys.readouterr().err


def test_gpu_pipeline_recipe_names_existing_stage_recipes_and_launcher():
    recipe = load_pipeline_recipe(ROOT / "recipes" / "92m.yaml")
    assert Path(ROOT / recipe["accelerate"]["config_file"]).is_file()
    for stage in ("pretrain", "sft", "reward", "dpo", "grpo"):
        assert (ROOT / recipe[stage]["recipe"]).is_file(), stage
    pretrain = yaml.safe_load((ROOT / recipe["pretrain"]["recipe"]).read_text("utf-8"))
    assert pretrain["model_preset"] == "92m" and pretrain["dataset_name"] != "default"  # a Hub corpus


def test_atomic_output_replaces_a_folder_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as staged:
            staged.mkdir()
            (staged / "new.txt").write_text("half")
            raise RuntimeError("killed while writing")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (target / "old.txt").exists()  # no scratch left
    with atomic_output(target) as staged:
        staged.mkdir()
        (staged / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["model"]
    with atomic_output(tmp_path / "stage.json") as staged:  # a file works the same way
        staged.write_text("{}")
    assert (tmp_path / "stage.json").read_text() == "{}"


def test_run_layout_knows_which_stage_a_model_folder_is(tmp_path):
    run = RunLayout(tmp_path / "run")
    assert run.stage_of(tmp_path / "run" / "sft") == "sft"
    assert run.eval_results(run.stage_of(tmp_path / "run" / "sft")) == tmp_path / "run" / "eval" / "sft.json"
    assert run.stage_of(tmp_path / "elsewhere" / "sft") is None
    assert run.stage_of(tmp_path / "run" / "checkpoint-3") is None


def test_pretrain_tokenizes_once_in_one_process_before_the_launch(tmp_path, monkeypatch):
    """A pretrain recipe with tokenized_dataset (the 92m one): `tinyllm pretokenize` runs first as a plain process,
    writing into the run folder, then the launched training reads the same folder."""
    from tinyllm_hf import pipeline

    monkeypatch.chdir(ROOT)  # the recipe names its stage recipes relative to the repository root
    recipe = load_pipeline_recipe(ROOT / "recipes" / "92m.yaml")
    commands = []
    monkeypatch.setattr(pipeline.Pipeline, "run_command",
                        lambda self, stage, args, accelerate=None: commands.append((stage, args, accelerate)))
    run = pipeline.Pipeline(recipe, tmp_path / "run", ROOT / "recipes" / "92m.yaml")
    run.pretrain()
    (stage, tokenize, plain), (_, train, launched) = commands
    blocks = str(RunLayout(tmp_path / "run").pretokenized)
    assert stage == "pretrain" and tokenize[0] == "pretokenize" and plain is None and tokenize[-1] == "--overwrite"
    assert train[0] == "pretrain" and launched == recipe["accelerate"]
    for args in (tokenize, train):
        assert args[args.index("--tokenized_dataset") + 1] == blocks
        assert args[args.index("--config") + 1] == recipe["pretrain"]["recipe"]
    commands.clear()  # the quickstart's pretrain recipe tokenizes at the start of training, in the launched stage
    quickstart = load_pipeline_recipe(ROOT / "recipes" / "quickstart.yaml")
    pipeline.Pipeline(quickstart, tmp_path / "quick", ROOT / "recipes" / "quickstart.yaml").pretrain()
    assert [args[0] for _, args, _ in commands] == ["pretrain"] and "--tokenized_dataset" not in commands[0][1]
