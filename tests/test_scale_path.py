"""The scale path: token budgets that do not grow with the GPU count, DDP without the unused-parameter search, float32
master weights under bf16 autocast, `tinyllm run` on several nodes, and the whole `recipes/92m.yaml` pipeline shape
run with 2 processes (gloo on the CPU) on local files in the published schemas of its Hub datasets."""

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


def fitted(monkeypatch, world: int, per_device: int, global_batch: int | None, accumulation: int = 1):
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: world))
    args = TrainingArguments(output_dir="unused", use_cpu=True, per_device_train_batch_size=per_device,
                             gradient_accumulation_steps=accumulation, max_steps=15000, report_to="none")
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


def test_gpu_recipes_state_their_global_batch_and_the_documented_budget():
    """The budgets docs/training.md gives: global batch x block x steps, on any number of GPUs."""
    budgets = {"92m": (64, 983_040_000), "210m": (128, 2_621_440_000), "440m": (128, 5_242_880_000),
               "1.5b": (256, 15_728_640_000)}
    for name, (batch, tokens) in budgets.items():
        recipe = yaml.safe_load((REPO / "recipes" / "pretrain" / f"{name}.yaml").read_text("utf-8"))
        assert "gradient_accumulation_steps" not in recipe, name
        assert recipe["global_batch_size"] == batch and batch * recipe["block_size"] * recipe["max_steps"] == tokens
        assert batch % 8 == 0 and (batch // 8) % min(recipe["per_device_train_batch_size"], batch // 8) == 0
        launcher = "multi_gpu" if name in ("92m", "210m") else "deepspeed_zero3"
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
    (["--num-nodes", "2", "--node-rank", "2", "--main-process-ip", "h"], "--node-rank 2 is not one of the 2 node(s)"),
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
