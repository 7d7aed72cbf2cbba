"""The scale path: token budgets that do not grow with the GPU count, DDP without the unused-parameter search, float32
master weights under bf16 autocast, `tinyllm run` on several nodes, and the whole `recipes/92m.yaml` pipeline shape
run with 2 processes (gloo on the CPU) on local files in the published schemas of its Hub datasets."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import FIXTURES, review_lines
from transformers import TrainingArguments

from tinyllm_hf import TinyllmConfig, TinyllmForCausalLM
from tinyllm_hf.errors import UsageError
from tinyllm_hf.pipeline import Nodes, Pipeline, load_pipeline_recipe
from tinyllm_hf.runs import STAGES, TRAINING_STAGES
from tinyllm_hf.trainers import sft
from tinyllm_hf.trainers.common import RunArguments, fit_global_batch, training_dtype

REPO = Path(__file__).resolve().parents[1]
HUB_SHIM = Path(__file__).resolve().parent / "hub_shim"  # sitecustomize.py: load_dataset for the names below


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------------------------------
# Global batch: derived from the world size at launch
# --------------------------------------------------------------------------------------------------------------------


def fitted(monkeypatch, world: int, per_device: int, global_batch: int | None, accumulation: int = 1,
           deepspeed: str | None = None):
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: world))
    args = TrainingArguments(output_dir="unused", use_cpu=True, per_device_train_batch_size=per_device,
                             gradient_accumulation_steps=accumulation, max_steps=15000, report_to="none")
    args.deepspeed = deepspeed  # as --deepspeed ds.json leaves it (building that needs deepspeed installed)
    fit_global_batch(args, RunArguments(global_batch_size=global_batch), tokens_per_sequence=1024)
    return args.per_device_train_batch_size, args.gradient_accumulation_steps


def test_the_global_batch_is_the_same_on_one_or_eight_gpus(monkeypatch, caplog):
    # The 92m recipe: 64 blocks per step, at most 32 per GPU at once.
    assert fitted(monkeypatch, 1, 32, 64) == (32, 2)
    assert fitted(monkeypatch, 2, 32, 64) == (32, 1)
    assert fitted(monkeypatch, 8, 32, 64) == (8, 1)
    assert fitted(monkeypatch, 8, 8, 256) == (8, 4)  # 1.5b
    assert fitted(monkeypatch, 4, 5, 64) == (4, 4)  # 16 per process: 5 does not divide it, 4 x 4 does
    assert fitted(monkeypatch, 8, 32, None, accumulation=2) == (32, 2)  # without it, as the recipe says
    with caplog.at_level("WARNING", logger="tinyllm_hf"):
        fitted(monkeypatch, 8, 32, 64)
    assert ("global batch: 64 sequences x 1024 tokens = 65,536 tokens per optimizer step = 8 processes x 8 per "
            "device x 1 accumulation steps; 15000 steps: 983.0M tokens") in caplog.text


def test_a_global_batch_that_does_not_split_is_refused(monkeypatch):
    with pytest.raises(UsageError, match=r"^global_batch_size 64 is not divisible by the 3 processes of this launch: "
                                         r"give a multiple of 3 \(e.g. 66\) or launch a number of processes that "
                                         r"divides 64$"):
        fitted(monkeypatch, 3, 32, 64)
    with pytest.raises(UsageError, match="global_batch_size 64 and gradient_accumulation_steps 2 are both set"):
        fitted(monkeypatch, 1, 32, 64, accumulation=2)
    with pytest.raises(UsageError, match="global_batch_size does not reach a DeepSpeed JSON given as --deepspeed"):
        fitted(monkeypatch, 8, 32, 64, deepspeed="recipes/accelerate/deepspeed/zero3.json")


def test_gpu_recipes_state_their_global_batch_and_the_documented_budget():
    """The budgets docs/training.md gives: global batch x block x steps, on any number of GPUs."""
    budgets = {"16m": (32, 65_536_000), "42m": (64, 393_216_000), "92m": (64, 983_040_000), "210m": (128, 2_621_440_000), "440m": (128, 5_242_880_000),
               "1.5b": (256, 15_728_640_000)}
    for name, (batch, tokens) in budgets.items():
        recipe = yaml.safe_load((REPO / "recipes" / "pretrain" / f"{name}.yaml").read_text("utf-8"))
        assert "gradient_accumulation_steps" not in recipe, name
        assert recipe["global_batch_size"] == batch and batch * recipe["block_size"] * recipe["max_steps"] == tokens
        assert batch % 8 == 0 and (batch // 8) % min(recipe["per_device_train_batch_size"], batch // 8) == 0
        launcher = "deepspeed_zero3" if name in ("440m", "1.5b") else "multi_gpu"
        assert f"--config_file recipes/accelerate/{launcher}.yaml" in (REPO / "recipes" / "pretrain" / f"{name}.yaml").read_text()
        assert recipe.get("ddp_find_unused_parameters") is (False if launcher == "multi_gpu" else None)
    sft_recipe = yaml.safe_load((REPO / "recipes" / "sft" / "92m.yaml").read_text("utf-8"))
    assert sft_recipe["global_batch_size"] == 32 and sft_recipe["ddp_find_unused_parameters"] is False
    assert "dtype" not in sft_recipe and "gradient_accumulation_steps" not in sft_recipe
    pipeline = load_pipeline_recipe(REPO / "recipes" / "92m.yaml")
    assert pipeline["accelerate"]["config_file"] == "recipes/accelerate/multi_gpu.yaml"
    for stage in ("reward", "dpo"):
        assert pipeline[stage]["args"]["global_batch_size"] == 32
        assert pipeline[stage]["args"]["ddp_find_unused_parameters"] is False


def test_stages_that_cannot_fit_the_global_batch_refuse_it(tiny_model_dir, tmp_path):
    from tinyllm_hf.trainers import grpo

    with pytest.raises(UsageError, match=r"^global_batch_size is not supported by the on-policy stages \(grpo, rloo\)"):
        grpo.main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "grpo"),
                   "--global_batch_size", "8", "--use_cpu", "true", "--bf16", "false", "--report_to", "none"])


# --------------------------------------------------------------------------------------------------------------------
# DDP without find_unused_parameters: every parameter gets a gradient
# --------------------------------------------------------------------------------------------------------------------


def test_every_parameter_gets_a_gradient_from_one_backward():
    """What `ddp_find_unused_parameters: false` relies on: a parameter without a gradient would make DDP wait for it
    forever (or fail at the next step). Causal LM (pretrain, SFT, DPO) and reward model alike."""
    from tinyllm_hf import TinyllmForSequenceClassification

    config = TinyllmConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                           eos_token_id=1)
    ids = torch.randint(2, 97, (2, 16))
    torch.manual_seed(0)
    for model, loss in ((TinyllmForCausalLM(config), lambda m: m(input_ids=ids, labels=ids).loss),
                        (TinyllmForSequenceClassification(config.__class__(**{**config.to_dict(), "num_labels": 1})),
                         lambda m: m(input_ids=ids).logits.sum())):
        loss(model).backward()
        missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert missing == [], type(model).__name__


# --------------------------------------------------------------------------------------------------------------------
# bf16 autocast trains float32 weights
# --------------------------------------------------------------------------------------------------------------------


def sft_argv(model_dir, output_dir, *extra) -> list[str]:
    return ["--model_name_or_path", str(model_dir), "--output_dir", str(output_dir), "--dataset_name", "default",
            "--sft_tasks", "sentiment", "--task_sizes", "sentiment=8", "--max_eval_samples", "0",
            "--eval_strategy", "no", "--max_steps", "2", "--per_device_train_batch_size", "4", "--max_length", "128",
            "--use_cpu", "true", "--report_to", "none", "--save_strategy", "no", "--loss_curve", "false",
            "--peak_flops", "1e11", *extra]


def test_sft_under_bf16_autocast_trains_float32_master_weights(tiny_model_dir, tmp_path, monkeypatch):
    """bf16: true means float32 weights the optimizer updates, matmuls autocast to bf16: seen inside the model's
    forward during training steps, and in the saved weights."""
    seen = []
    load_model = sft.load_model

    def load_and_watch(*args, **kwargs):
        model = load_model(*args, **kwargs)

        def record(module, inputs):  # the decoder runs inside the forward that accelerate wraps in autocast
            if module.training:
                seen.append(({p.dtype for p in model.parameters()}, torch.is_autocast_enabled("cpu"),
                             torch.get_autocast_dtype("cpu")))

        model.get_decoder().register_forward_pre_hook(record)
        return model

    monkeypatch.setattr(sft, "load_model", load_and_watch)
    assert sft.main(sft_argv(tiny_model_dir, tmp_path / "sft", "--bf16", "true")) == 0
    assert len(seen) == 2 and all(s == ({torch.float32}, True, torch.bfloat16) for s in seen)
    from safetensors import safe_open

    with safe_open(tmp_path / "sft" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_a_half_precision_dtype_under_mixed_precision_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(UsageError, match=r"^dtype: bfloat16 with bf16: true would train bfloat16 weights without a "
                                         r"float32 master copy: remove dtype"):
        sft.main(sft_argv(tiny_model_dir, tmp_path / "sft", "--bf16", "true", "--dtype", "bfloat16"))


def test_training_dtype_keeps_half_precision_only_where_nothing_trains_in_it():
    from trl import ModelConfig

    mixed = TrainingArguments(output_dir="unused", use_cpu=True, bf16=True, report_to="none")
    plain = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    assert training_dtype(ModelConfig(dtype="auto"), mixed) == "float32"  # a checkpoint stored in bf16 loads in fp32
    assert training_dtype(ModelConfig(dtype="bfloat16", use_peft=True), mixed) == "bfloat16"  # frozen LoRA base
    assert training_dtype(ModelConfig(dtype="bfloat16"), plain) == "bfloat16"  # pure bf16, asked for as such


# --------------------------------------------------------------------------------------------------------------------
# tinyllm run on several nodes
# --------------------------------------------------------------------------------------------------------------------


def test_each_node_launches_training_with_its_rank_and_leaves_the_rest_to_node_0(tmp_path, monkeypatch):
    from tinyllm_hf import pipeline

    commands = []

    def fake_stage(command, log):
        commands.append((command, Path(log.name).name))
        return 0

    monkeypatch.setattr(pipeline, "run_stage_process", fake_stage)
    recipe = {"accelerate": {"config_file": "recipes/accelerate/multi_node.yaml", "num_processes": 16},
              "pretrain": {"recipe": "recipes/pretrain/92m.yaml"},
              "grpo": {"accelerate": {"config_file": "recipes/accelerate/single_gpu.yaml", "num_machines": 1}},
              "release": {"repo_id": "a/b"}}
    run = Pipeline(recipe, tmp_path / "run", tmp_path / "r.yaml", Nodes(count=2, rank=1, main_process_ip="10.0.0.1",
                                                                         main_process_port=29511))
    assert [s for s in ("pretrain", "grpo", "release") if run.runs_here(s)] == ["pretrain"]
    run.pretrain()
    (command, log_name), = commands
    start = command.index("accelerate.commands.launch") + 1
    launch = command[start:command.index("-m", start)]
    assert launch == ["--config_file", "recipes/accelerate/multi_node.yaml", "--num_processes", "16",
                      "--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "10.0.0.1",
                      "--main_process_port", "29511"]
    assert log_name == "stage.node1.log"
    node0 = Pipeline(recipe, tmp_path / "run", tmp_path / "r.yaml", Nodes(count=2, rank=0, main_process_ip="10.0.0.1"))
    assert all(node0.runs_here(s) for s in ("pretrain", "grpo", "release"))
    assert "--machine_rank" not in pipeline.launch_flags(node0.launcher("grpo"))  # one machine: node 0's own job


def test_a_worker_node_stops_when_node_0_reports_the_stage_failed(tmp_path, monkeypatch):
    from tinyllm_hf import pipeline

    monkeypatch.setattr(pipeline, "NODE_POLL_SECONDS", 0.01)
    run = Pipeline({"release": {"repo_id": "a/b"}}, tmp_path / "run", tmp_path / "r.yaml",
                   Nodes(count=2, rank=1, main_process_ip="127.0.0.1"))
    (tmp_path / "run" / "release").mkdir(parents=True)
    monkeypatch.setattr(pipeline.Pipeline, "release", lambda self: pytest.fail("node 1 ran a node-0 stage"))
    monkeypatch.setattr(pipeline.time, "sleep", lambda s: pipeline.write_json(
        tmp_path / "run" / "release" / pipeline.STAGE_FAILED_FILE, {"error": "disk full"}))
    with pytest.raises(pipeline.PipelineError, match=r"stage release failed on node 0 \(.*disk full"):
        run.run()


@pytest.mark.parametrize("argv, message", [
    (["--num-nodes", "2", "--node-rank", "1"], "--num-nodes 2 needs --main-process-ip"),
    (["--num-nodes", "2", "--node-rank", "2", "--main-process-ip", "h"], "--node-rank 2 is not one of the 2 nodes: give 0 to 1"),
    (["--node-rank", "1"], "--node-rank 1 (or NODE_RANK / SLURM_NODEID) needs several nodes"),
    (["--num-nodes", "2", "--main-process-ip", "h", "--only", "eval"], "--only runs finished stages again"),
])
def test_bad_node_settings_are_named(argv, message, tmp_path, capsys, monkeypatch):
    from tinyllm_hf.cli import main as tinyllm

    for name in ("NODE_RANK", "SLURM_NODEID", "NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("eval: {}\n", "utf-8")
    assert tinyllm(["run", "--config", str(recipe), "--output_dir", str(tmp_path / "run"), *argv]) == 1
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------------
# The whole 92m pipeline shape with 2 processes
# --------------------------------------------------------------------------------------------------------------------

TINY_MODEL = ("hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=4,num_key_value_heads=2,"
              "max_position_embeddings=128")
WIKIPEDIA, BELLE = "wikimedia/wikipedia", "BelleGroup/train_0.5M_CN"


def write_hub_files(root: Path) -> dict:
    """Local copies of the 92m recipe's Hub datasets in their published schemas, as the load_dataset shim
    (tests/hub_shim/sitecustomize.py) reads them: Chinese Wikipedia 20231101.zh as parquet (id, url, title, text),
    BelleGroup/train_0.5M_CN as JSON lines (instruction, input, output)."""
    lines = review_lines(1500)
    documents = ["".join(lines[i:i + 3]) for i in range(0, len(lines), 3)]
    wiki = root / "wikipedia" / "20231101.zh" / "train-00000-of-00001.parquet"
    wiki.parent.mkdir(parents=True)
    pq.write_table(pa.table({
        "id": [str(i + 1) for i in range(len(documents))],
        "url": [f"https://zh.wikipedia.org/wiki?curid={i + 1}" for i in range(len(documents))],
        "title": [text[:8] for text in documents],
        "text": documents,
    }), wiki)
    belle = root / "belle" / "Belle_open_source_0.5M.json"
    belle.parent.mkdir(parents=True)
    half = len(lines) // 2  # review_lines: the positive reviews, then the negative ones
    rows = [{"instruction": "判断下面这条评论的情感是正面还是负面。", "input": line, "output": label}
            for label, part in (("正面。", lines[:20]), ("负面。", lines[half:half + 20])) for line in part]
    rows += [{"instruction": f"请复述这句话：{line}", "input": "", "output": line} for line in lines[20:40]]
    belle.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), "utf-8")
    return {WIKIPEDIA: {"config": "20231101.zh", "builder": "parquet", "data_files": [str(wiki)]},
            BELLE: {"config": None, "builder": "json", "data_files": [str(belle)]}}


def scale_path_recipe(tmp_path: Path, port: int) -> Path:
    """recipes/92m.yaml with every stage kept, its stage recipes and Hub datasets, launched as 2 processes (gloo on
    the CPU): only sizes, step counts and what a CPU cannot run (vLLM, torch.compile, flash attention) changed."""
    recipe = load_pipeline_recipe(REPO / "recipes" / "92m.yaml")
    two_processes = {**recipe["accelerate"], "num_processes": 2, "main_process_port": port}
    recipe["accelerate"] = two_processes
    recipe["tokenizer"]["vocab_size"] = 600
    few_steps = {"logging_steps": 1, "report_to": "none", "use_cpu": True}  # bf16 autocast on the CPU
    recipe["pretrain"]["args"] = {
        **few_steps, "config_overrides": TINY_MODEL, "block_size": 64, "global_batch_size": 8,
        "per_device_train_batch_size": 2, "max_steps": 4, "warmup_steps": 1, "eval_steps": 4, "save_steps": 4,
        "max_eval_samples": 4, "per_device_eval_batch_size": 4, "torch_compile": False, "data_order_log": True}
    recipe["sft"]["args"] = {
        **few_steps, "attn_implementation": "sdpa", "sft_tasks": "sentiment,identity",
        "task_sizes": "sentiment=16,identity=4", "heldout_eval_sizes": "sentiment=2", "eval_fraction": 0.1,
        "max_eval_samples": 8, "max_length": 128, "global_batch_size": 4, "per_device_train_batch_size": 1,
        "max_steps": 3, "eval_steps": 3, "save_steps": 3}
    preference_args = {"max_length": 128, "global_batch_size": 8, "per_device_train_batch_size": 2, "max_steps": 3,
                       "save_steps": 3, "tasks": "sentiment,idiom_meaning", "task_sizes": "sentiment=8,idiom_meaning=4",
                       "max_eval_samples": 8, **few_steps}
    for stage in ("reward", "dpo"):
        recipe[stage]["args"] = {**recipe[stage]["args"], **preference_args}
    recipe["grpo"]["accelerate"] = two_processes  # the recipe's single GPU is for vLLM, which a CPU cannot run
    recipe["grpo"]["args"] = {**few_steps, "use_vllm": False, "ddp_find_unused_parameters": False, "max_steps": 2, "save_steps": 2, "num_generations": 2,
                              "per_device_train_batch_size": 2, "max_completion_length": 8, "tasks": "sentiment",
                              "task_sizes": "sentiment=8"}
    recipe["eval"].update(task_sizes="sentiment=2,xiehouyu=1", args={"max-new-tokens": 4})
    recipe["eval"]["benchmarks"].update(ceval_dir=str(FIXTURES / "ceval"), cmmlu_dir=str(FIXTURES / "cmmlu"), limit=1)
    if importlib.util.find_spec("llama_cpp") is None:  # q4_k_m needs llama.cpp's quantizer (llama-cpp-python)
        recipe["gguf"]["outtypes"] = [t for t in recipe["gguf"]["outtypes"] if t != "q4_k_m"]
    recipe["quantize"] = {"methods": ["quanto-int8"],  # the cheapest; tests/test_quantize.py covers the others
                          "drift": {"tasks": 2, "task_tokens": 4, "eval_chunks": 2, "chunk_len": 32, "gen_tokens": 4,
                                    "speed_tokens": 8}}
    recipe["report"] = {"prompts": ["你好", {"task": "sentiment", "text": "服务很热情。"}]}
    path = tmp_path / "scale.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), "utf-8")
    return path


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_92m_pipeline_shape_runs_every_stage_with_two_processes(tmp_path, monkeypatch):
    from tinyllm_hf.pipeline import main

    from tinyllm_hf import preflight

    hub_log = tmp_path / "hub_calls.jsonl"
    hub_files = write_hub_files(tmp_path / "hub")
    # The preflight (in this process) asks the Hub, which is offline here; the stages' processes read the shim's
    # local copies. So the Hub check answers for the shim's names, configuration included, and records what it saw.
    hub_checked, real_hub_check = [], preflight.hub_dataset_check

    def hub_check(stage, needed_by, repo_id, config=None, **kwargs):
        if repo_id not in hub_files:
            return real_hub_check(stage, needed_by, repo_id, config, **kwargs)
        hub_checked.append((stage, repo_id, config))
        verdict = preflight.OK if config == hub_files[repo_id]["config"] else preflight.FAIL
        return preflight.Check(stage, f"dataset {repo_id}", needed_by, verdict, "local copy (test)")

    monkeypatch.setattr(preflight, "hub_dataset_check", hub_check)
    for name, value in {"PYTHONPATH": os.pathsep.join([str(HUB_SHIM), str(REPO), os.environ.get("PYTHONPATH", "")]),
                        "TINYLLM_TEST_HUB_FILES": json.dumps(hub_files),
                        "TINYLLM_TEST_HUB_LOG": str(hub_log), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
                        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        monkeypatch.setenv(name, value)
    recipe_path = scale_path_recipe(tmp_path, free_port())
    recipe = yaml.safe_load(recipe_path.read_text("utf-8"))
    run_dir = tmp_path / "run"
    assert main(["--config", str(recipe_path), "--output_dir", str(run_dir)]) == 0
    assert {(stage, repo) for stage, repo, _ in hub_checked} >= {
        ("tokenizer", "wikimedia/wikipedia"), ("pretrain", "wikimedia/wikipedia"), ("sft", "BelleGroup/train_0.5M_CN")}
    check_scale_path_run(run_dir, recipe, hub_log)


def check_scale_path_run(run_dir: Path, recipe: dict, hub_log: Path) -> None:
    configured = [s for s in STAGES if s in recipe]
    assert set(STAGES) - set(configured) == {"distill"}
    for stage in configured:
        assert (run_dir / stage / "stage.json").exists(), f"stage {stage} did not finish"
    for stage in (s for s in configured if s in TRAINING_STAGES):  # two processes each, the global batch as asked
        commands = [line for line in (run_dir / stage / "stage.log").read_text("utf-8").splitlines()
                    if line.startswith("$ ")]
        if stage == "pretrain":  # the corpus is tokenized once, by one plain process, before the launch
            assert commands[0].startswith("$ tinyllm pretokenize ")
            commands = commands[1:]
        command = commands[0]
        assert command.startswith("$ accelerate launch --config_file recipes/accelerate/multi_gpu.yaml ")
        assert " --num_processes 2 " in command and f" -m tinyllm_hf.trainers.{stage} " in command
        summary = json.loads((run_dir / stage / "stage.json").read_text())
        assert summary["steps"] == recipe[stage]["args"]["max_steps"], stage
    pretrain_log = (run_dir / "pretrain" / "stage.log").read_text("utf-8")
    assert ("global batch: 8 sequences x 64 tokens = 512 tokens per optimizer step = 2 processes x 2 per device x 2 "
            "accumulation steps") in pretrain_log
    assert {p.name for p in (run_dir / "pretrain" / "data_order").iterdir()} == {"rank0.jsonl", "rank1.jsonl"}
    # The Hub code paths ran on the local copies: the tokenizer and the pre-tokenizing process streamed Wikipedia
    # (the training ranks read the shards, each its own rows: no batches dispatched from rank 0), both SFT ranks
    # opened Belle.
    calls = [json.loads(line) for line in hub_log.read_text("utf-8").splitlines()]
    assert len({c["pid"] for c in calls if c["path"] == WIKIPEDIA and c["streaming"]}) == 2
    rows = {}
    for rank in (0, 1):
        logged = [json.loads(line) for line in (run_dir / "pretrain" / "data_order" / f"rank{rank}.jsonl").open()]
        assert {entry["loader"] for entry in logged} == {"DataLoaderShard"}
        rows[rank] = {row for entry in logged for row in entry["rows"]}
    assert rows[0] and rows[1] and not rows[0] & rows[1]
    assert len({c["pid"] for c in calls if c["path"] == BELLE}) >= 2
    sft_eval = json.loads((run_dir / "eval" / "sft.json").read_text())
    for benchmark in ("ceval", "cmmlu"):
        assert sft_eval["tasks"][benchmark]["n"] > 0, benchmark
    staged = {p.name for p in (run_dir / "release" / "staged").iterdir()}
    assert {"README.md", "model.safetensors"} <= staged
    assert {f"model-{t}.gguf" for t in recipe["gguf"]["outtypes"]} <= staged
    assert [s["stage"] for s in json.loads((run_dir / "tinyllm_stages.json").read_text())] == [
        "pretrain", "sft", "reward", "dpo", "grpo"]
    assert "## Stages" in (run_dir / "report" / "report.md").read_text("utf-8")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_tinyllm_runs_on_one_machine_act_as_two_nodes(tmp_path):
    """Node 0 trains the tokenizer while node 1 waits for it; both then launch their share of the 2-process
    pretraining (one process each, gloo), and node 1 waits for node 0's stage.json before it exits."""
    recipe = {"accelerate": {"multi_gpu": True, "num_processes": 2, "mixed_precision": "no", "dynamo_backend": "no"},
              "tokenizer": {"corpus": "reviews", "vocab_size": 600},
              "pretrain": {"recipe": "recipes/pretrain/quickstart.yaml", "args": {
                  "dataset_name": "reviews", "config_overrides": TINY_MODEL, "block_size": 64, "max_steps": 2,
                  "per_device_train_batch_size": 2, "save_steps": 2, "eval_steps": 2, "max_eval_samples": 4,
                  "logging_steps": 1, "report_to": "none", "data_order_log": True}}}
    path = tmp_path / "nodes.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), "utf-8")
    run_dir, port = tmp_path / "run", free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    nodes = [subprocess.Popen([sys.executable, "-m", "tinyllm_hf.cli", "run", "--config", str(path), "--output_dir",
                               str(run_dir), "--num-nodes", "2", "--node-rank", str(rank), "--main-process-ip",
                               "127.0.0.1", "--main-process-port", str(port)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (1, 0)]  # the worker first: it must wait for node 0's tokenizer
    outputs = [node.communicate(timeout=540)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(out[-3000:] for out in outputs)
    worker, main = outputs
    assert "[tokenizer] node 1: waiting for node 0 to finish it" in worker and "[tokenizer] $" not in worker
    assert "[pretrain] node 1: waiting for node 0" in worker
    assert not (run_dir / "tokenizer" / "stage.node1.log").exists()
    logs = {rank: (run_dir / "pretrain" / name).read_text("utf-8").splitlines()[0]
            for rank, name in ((0, "stage.log"), (1, "stage.node1.log"))}
    for rank, command in logs.items():
        assert (f" --num_machines 2 --machine_rank {rank} --main_process_ip 127.0.0.1 --main_process_port {port} "
                "-m tinyllm_hf.trainers.pretrain ") in command
    assert {p.name for p in (run_dir / "pretrain" / "data_order").iterdir()} == {"rank0.jsonl", "rank1.jsonl"}
    summary = json.loads((run_dir / "pretrain" / "stage.json").read_text())
    assert summary["steps"] == 2 and "[pretrain] finished" in main
