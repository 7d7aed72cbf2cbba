"""Pretraining: packing, recipes, the Trainer run end to end, kill -9 + resume, non-finite loss, 2-process DDP,
and the shipped accelerate/DeepSpeed configs."""

import functools
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from transformers import PreTrainedTokenizerFast, TrainingArguments

from tinyllm_hf import TinyllmConfig, TinyllmForCausalLM
from tinyllm_hf.cli import main as tinyllm
from tinyllm_hf.data import packing
from tinyllm_hf.data.packing import collate_blocks, pack_dataset, packing_stats, unigram_entropy
from tinyllm_hf.errors import NonFiniteLossError
from tinyllm_hf.rope_scaling import model_context, with_rope_scaling
from tinyllm_hf.tokenizer.train import train_tokenizer
from tinyllm_hf.trainers import pretrain
from tinyllm_hf.trainers.common import (
    checkpoint_step,
    latest_checkpoint,
    matmul_flops_per_token,
    parse_recipe,
    remove_staging_dirs,
)

REPO = Path(__file__).resolve().parents[1]
SUBJECTS = ["小明", "老师", "我们", "妈妈", "学生", "医生"]
VERBS = ["喜欢", "看见", "买了", "想要", "找到"]
OBJECTS = ["苹果", "新书", "小猫", "电影", "大海", "花园"]
PLACES = ["在北京", "在学校", "在家里", "在公园"]


def sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)}{rng.choice(PLACES)}{rng.choice(VERBS)}{rng.choice(OBJECTS)}。"


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    """~600 short documents of templated Chinese: learnable structure, enough for a validation split."""
    rng = random.Random(0)
    lines = [f"{i}号：" + "".join(sentence(rng) for _ in range(rng.randint(1, 4))) for i in range(600)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, corpus_file) -> Path:
    """The project's byte-level BPE (EOS <|endoftext|>, pad <|pad|>), small enough for tiny models."""
    path = tmp_path_factory.mktemp("tokenizer") / "tok"
    train_tokenizer(corpus_file.read_text(encoding="utf-8").splitlines(), vocab_size=400, output_dir=path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)


def recipe_args(corpus_file, tokenizer_dir, output_dir, **overrides) -> list[str]:
    """Command-line arguments of a tiny pretraining run (hidden 32, 2 layers, blocks of 32 tokens)."""
    values = {
        "tokenizer_name_or_path": tokenizer_dir,
        "dataset_name": corpus_file,
        "config_overrides": "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,max_position_embeddings=32",
        "output_dir": output_dir,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 2,
        "max_steps": 20,
        "logging_steps": 1,
        "save_steps": 10,
        "eval_strategy": "steps",
        "eval_steps": 10,
        "per_device_eval_batch_size": 8,
        "peak_flops": 1e11,  # skip the matmul measurement: it is not what these tests check
        "dataloader_num_workers": 0,
        "use_cpu": True,
        **overrides,
    }
    argv = []
    for key, value in values.items():
        if value is not None:  # None: leave the key at its default
            argv += [f"--{key}", str(value)]
    return argv


def read_state(output_dir) -> dict:
    return json.loads((Path(output_dir) / "trainer_state.json").read_text())


def data_order(output_dir, rank=0) -> dict[int, str]:
    """step -> hash of the batch; a step logged twice (re-run after a resume) keeps its last record."""
    lines = (Path(output_dir) / "data_order" / f"rank{rank}.jsonl").read_text().splitlines()
    return {record["step"]: record["sha1"] for record in map(json.loads, lines)}


def subprocess_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on a shared CPU two OpenMP threads waiting for each other made
    steps ~30x slower. Subprocesses get OMP_NUM_THREADS=1 for the same reason."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------------------------


def documents(texts) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": texts, "source": ["test"] * len(texts)})


def test_packing_appends_eos_keeps_order_and_wastes_at_most_one_block_per_batch(tokenizer):
    rng = random.Random(1)
    docs = documents(["".join(sentence(rng) for _ in range(rng.randint(1, 5))) for _ in range(300)])
    packed = pack_dataset(docs, tokenizer, block_size=16)
    blocks = np.array(packed["input_ids"])
    assert blocks.shape[1] == 16 and blocks.dtype == np.int64 or blocks.dtype == np.int32
    stream = [i for text in docs["text"] for i in tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    n = blocks.size
    assert blocks.ravel().tolist() == stream[:n]  # one batch here: blocks are the document stream, in order
    assert len(stream) - n < 16
    stats = packing_stats(docs, packed, tokenizer)
    assert stats["tokens"] == len(stream) and stats["packed_tokens"] == n
    assert (blocks == tokenizer.eos_token_id).sum() >= 300 - 2  # one EOS per document (the last may be cut)
    assert tokenizer.pad_token_id not in blocks


def test_packing_is_cached_and_multiprocess_gives_the_same_blocks(tokenizer, monkeypatch, tmp_path):
    rng = random.Random(2)
    texts = ["".join(sentence(rng) for _ in range(3)) for _ in range(600)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts), encoding="utf-8")
    docs = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    monkeypatch.setattr(packing, "PACK_BATCH_DOCS", 100)  # several batches, so several workers have work
    monkeypatch.setattr(packing, "MIN_DOCS_PER_PROCESS", 1)
    single = pack_dataset(docs, tokenizer, block_size=32)
    again = pack_dataset(docs, tokenizer, block_size=32)
    assert again.cache_files == single.cache_files  # the second call loads the cached blocks
    multi = pack_dataset(docs, tokenizer, block_size=24, num_proc=2)
    single_24 = pack_dataset(docs, tokenizer, block_size=24)
    assert multi["input_ids"] == single_24["input_ids"]
    assert multi.cache_files != single.cache_files


def test_streaming_packing_gives_the_same_blocks_shuffled_deterministically(tokenizer):
    rng = random.Random(3)
    docs = documents(["".join(sentence(rng) for _ in range(2)) for _ in range(200)])
    reference = pack_dataset(docs, tokenizer, block_size=16)["input_ids"]
    streamed = [list(b["input_ids"]) for b in pack_dataset(docs.to_iterable_dataset(), tokenizer, 16, seed=7, shuffle_buffer_size=50)]
    again = [list(b["input_ids"]) for b in pack_dataset(docs.to_iterable_dataset(), tokenizer, 16, seed=7, shuffle_buffer_size=50)]
    assert sorted(streamed) == sorted(reference)
    assert streamed == again and streamed != reference


def test_packing_rejects_bad_input(tokenizer):
    with pytest.raises(ValueError, match="no column 'body'"):
        pack_dataset(documents(["你好"]), tokenizer, 16, text_field="body")
    no_eos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(ValueError, match="no EOS token"):
        pack_dataset(documents(["你好"]), no_eos, 16)


def test_collate_and_unigram_entropy():
    blocks = datasets.Dataset.from_dict({"input_ids": [[0, 1, 2, 3], [0, 0, 1, 1]]})
    batch = collate_blocks([blocks[0], blocks[1]])
    assert batch["input_ids"].dtype == torch.long and torch.equal(batch["labels"], batch["input_ids"])
    p = np.array([3, 3, 1, 1]) / 8
    assert unigram_entropy(blocks, vocab_size=5) == pytest.approx(float(-(p * np.log(p)).sum()))


# --------------------------------------------------------------------------------------------------------------------
# Recipes and helpers
# --------------------------------------------------------------------------------------------------------------------


def test_recipe_values_are_overridden_by_the_command_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_preset: 16m\nlearning_rate: 0.001\nmax_steps: 100\noutput_dir: out\n")
    model_args, data_args, args, run_args = parse_recipe(
        [pretrain.ModelArguments, pretrain.DataArguments, TrainingArguments],
        ["--config", str(recipe), "--max_steps", "10", "--resume"],
        defaults=pretrain.DEFAULTS,
    )
    assert (model_args.model_preset, args.learning_rate, args.max_steps) == ("16m", 0.001, 10)
    assert run_args.resume and args.report_to == ["tensorboard"]
    recipe.write_text("learning_rate: 0.001\nlearnig_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) in recipe .*r.yaml: learnig_rate"):
        parse_recipe([TrainingArguments], ["--config", str(recipe)])
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        parse_recipe([TrainingArguments], ["--config", str(tmp_path / "missing.yaml")])


def test_config_overrides_are_typed_and_validated():
    assert pretrain.parse_overrides("hidden_size=64, rms_norm_eps=1e-5,tie_word_embeddings=false") == {
        "hidden_size": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    with pytest.raises(ValueError, match="expected key=value"):
        pretrain.parse_overrides("hidden_size")


def test_flops_per_token_formula():
    config = TinyllmConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=64)
    model = TinyllmForCausalLM(config)
    per_layer = 4 * 32 * 32 + 3 * 32 * 64
    assert matmul_flops_per_token(model, 64) == 6 * (2 * per_layer + 100 * 32) + 12 * 2 * 32 * 64


def test_flops_per_token_counts_active_experts_only():
    config = TinyllmConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=64, num_experts=8, num_experts_per_tok=2,
                           num_shared_experts=1, moe_intermediate_size=16, shared_expert_intermediate_size=16)
    model = TinyllmForCausalLM(config)
    attention, router = 4 * 32 * 32, 8 * 32
    routed = 2 * 3 * 32 * 16  # two of the eight experts, gate/up/down each hidden x moe_intermediate
    shared = 3 * 32 * 16
    per_layer = attention + router + routed + shared
    assert matmul_flops_per_token(model, 64) == 6 * (2 * per_layer + 100 * 32) + 12 * 2 * 32 * 64


def test_flops_per_token_reads_zero3_partitioned_sizes():
    config = TinyllmConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=64)
    model = TinyllmForCausalLM(config)
    expected = matmul_flops_per_token(model, 64)
    for parameter in model.parameters():  # what ZeRO-3 leaves on a rank: an empty tensor that knows its full size
        parameter.ds_numel = parameter.numel()
        parameter.data = torch.empty(0)
    assert matmul_flops_per_token(model, 64) == expected


def test_latest_checkpoint_ignores_partial_and_staging_folders(tmp_path):
    from safetensors.torch import save_file

    def checkpoint(name, complete=True):
        path = tmp_path / name
        path.mkdir()
        save_file({"w": torch.zeros(2)}, path / "model.safetensors")
        if complete:
            (path / "trainer_state.json").write_text('{"global_step": 1}')
        return path

    assert latest_checkpoint(tmp_path) is None
    checkpoint("checkpoint-5")
    checkpoint("checkpoint-10")
    checkpoint("checkpoint-20", complete=False)
    checkpoint("tmp-checkpoint-30")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    remove_staging_dirs(tmp_path)
    assert not (tmp_path / "tmp-checkpoint-30").exists() and (tmp_path / "checkpoint-20").exists()


# --------------------------------------------------------------------------------------------------------------------
# Training runs
# --------------------------------------------------------------------------------------------------------------------


def test_pretrain_end_to_end(corpus_file, tokenizer_dir, tmp_path):
    from tinyllm_hf.cli import main as cli_main

    out = tmp_path / "run"
    argv = recipe_args(corpus_file, tokenizer_dir, out, max_steps=60, save_steps=20, eval_steps=20, peak_flops=None)
    assert cli_main(["pretrain", *argv]) == 0
    state = read_state(out)
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    evals = [e["eval_loss"] for e in state["log_history"] if "eval_loss" in e]
    assert state["global_step"] == 60 and losses[-1] < losses[0] - 1.0
    assert evals[-1] < losses[0]
    logged = [e for e in state["log_history"] if "mfu" in e]
    assert logged and all(e["tokens_per_second"] > 0 and 0 < e["mfu"] < 1.5 for e in logged)
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_loss"] < results["eval_unigram_entropy"]  # learnt more than token frequencies
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-40", "checkpoint-60"]
    assert not list(out.glob("tmp-*"))
    assert (out / "loss_curve.png").stat().st_size > 10_000
    assert list(out.glob("runs/*/events.out.tfevents.*"))
    model = TinyllmForCausalLM.from_pretrained(out)
    assert model.config.hidden_size == 32 and model.config.eos_token_id == 0
    assert PreTrainedTokenizerFast.from_pretrained(out).eos_token == "<|endoftext|>"


def test_continued_pretraining_extends_the_context_with_yarn(corpus_file, tokenizer_dir, tmp_path):
    """rope_scaling on a checkpoint (recipes/pretrain/long-context.yaml's path): the run trains and evaluates on blocks
    twice the trained context and saves a YaRN config that reloads as such."""
    base = tmp_path / "base"
    short = dict(max_steps=2, eval_strategy="no", report_to="none", loss_curve=False)
    assert tinyllm(["pretrain", *recipe_args(corpus_file, tokenizer_dir, base, **short)]) == 0
    out = tmp_path / "long"
    argv = recipe_args(corpus_file, tokenizer_dir, out, config_overrides=None, model_name_or_path=base,
                       rope_scaling="yarn:2", block_size=64, **{**short, "eval_strategy": "steps", "eval_steps": 2})
    assert tinyllm(["pretrain", *argv]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["max_position_embeddings"] == 64
    assert config["rope_parameters"] == {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                                         "original_max_position_embeddings": 32}
    assert math.isfinite(json.loads((out / "eval_results.json").read_text())["eval_loss"])
    reloaded = TinyllmForCausalLM.from_pretrained(out)
    assert reloaded.model.rotary_emb.rope_type == "yarn" and reloaded.model.rotary_emb.attention_scaling > 1


def test_training_steps_skip_logits_and_evaluation_keeps_them(tmp_path, monkeypatch):
    """The Trainer's training forwards (on any device; here a CPU) ask Tinyllm for the loss without logits;
    evaluation, which returns the outputs, does not; a model whose forward lacks the argument (Llama) is called as
    before."""
    from tinyllm_hf.modeling.convert import tinyllm_to_llama_model

    config = TinyllmConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, max_position_embeddings=16)
    blocks = datasets.Dataset.from_dict({"input_ids": torch.randint(0, 64, (8, 16)).tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, eval_strategy="steps",
                             eval_steps=2, save_strategy="no", report_to=[], use_cpu=True, prediction_loss_only=False)
    for model in (TinyllmForCausalLM(config), tinyllm_to_llama_model(TinyllmForCausalLM(config))):
        calls = []
        forward = type(model).forward

        @functools.wraps(forward)
        def recording_forward(self, *inputs, **kwargs):
            calls.append((self.training, kwargs.get("skip_logits", False)))
            return forward(self, *inputs, **kwargs)

        monkeypatch.setattr(type(model), "forward", recording_forward)
        trainer = pretrain.PretrainTrainer(model=model, args=args, train_dataset=blocks, eval_dataset=blocks,
                                           data_collator=collate_blocks)
        trainer.train()
        is_tinyllm = isinstance(model, TinyllmForCausalLM)
        assert [skip for training, skip in calls if training] == [is_tinyllm] * 2
        assert [skip for training, skip in calls if not training] == [False]  # one evaluation, one batch of 8
        assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_pretrain_streaming(corpus_file, tokenizer_dir, tmp_path):
    out = tmp_path / "stream"
    argv = recipe_args(corpus_file, tokenizer_dir, out, streaming=True, shuffle_buffer_size=50, max_eval_samples=4,
                       max_steps=6, save_steps=3, eval_steps=3, report_to="none", data_order_log=True)
    assert pretrain.main(argv) == 0
    assert read_state(out)["global_step"] == 6 and len(set(data_order(out).values())) == 6
    results = json.loads((out / "eval_results.json").read_text())
    assert math.isfinite(results["eval_loss"]) and (out / "checkpoint-6" / "trainer_state.json").is_file()


def test_capped_validation_is_a_seeded_random_subset(corpus_file, tokenizer_dir):
    model_args, data_args, args, _ = parse_recipe(
        [pretrain.ModelArguments, pretrain.DataArguments, TrainingArguments],
        recipe_args(corpus_file, tokenizer_dir, "unused", block_size=16),
    )
    tokenizer = pretrain.load_tokenizer(data_args.tokenizer_name_or_path)
    _, full = pretrain.build_datasets(data_args, tokenizer, 16, seed=0)
    data_args.max_eval_samples = 4
    _, capped = pretrain.build_datasets(data_args, tokenizer, 16, seed=0)
    _, again = pretrain.build_datasets(data_args, tokenizer, 16, seed=0)
    assert len(full) > 8 and len(capped) == 4 and capped["input_ids"] == again["input_ids"]
    assert capped["input_ids"] != full["input_ids"][:4]  # not just the head of a source-ordered corpus
    assert all(block in full["input_ids"] for block in capped["input_ids"])


def test_non_finite_loss_stops_with_a_clear_message(corpus_file, tokenizer_dir, tmp_path, capsys):
    # Inf in the weights makes the very first loss NaN.
    model_args, data_args, args, run_args = parse_recipe(
        [pretrain.ModelArguments, pretrain.DataArguments, TrainingArguments],
        recipe_args(corpus_file, tokenizer_dir, tmp_path / "nan", report_to="none", max_steps=5, eval_strategy="no"),
    )
    tokenizer = pretrain.load_tokenizer(data_args.tokenizer_name_or_path)
    model = pretrain.build_model(model_args, tokenizer)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(float("inf"))
    train_dataset, _ = pretrain.build_datasets(data_args, tokenizer, 32, seed=0)
    trainer = pretrain.PretrainTrainer(model=model, args=args, train_dataset=train_dataset, data_collator=collate_blocks)
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss \(nan\) at step 1: training stopped"):
        trainer.train()
    assert not list((tmp_path / "nan").glob("checkpoint-*"))
    # Through main: one line on stderr and exit code 1 (here: a learning rate that blows up).
    code = tinyllm(["pretrain", *recipe_args(corpus_file, tokenizer_dir, tmp_path / "lr", report_to="none",
                                     learning_rate=1e38, warmup_steps=0, max_grad_norm=0, max_steps=20)])
    assert code == 1 and "non-finite training loss" in capsys.readouterr().err


def test_bad_recipe_input_gives_one_line_errors(corpus_file, tokenizer_dir, tmp_path, capsys):
    assert tinyllm(["pretrain", *recipe_args(corpus_file, tmp_path / "nope", tmp_path / "o")]) == 1
    assert "tokenizer folder not found" in capsys.readouterr().err
    assert tinyllm(["pretrain", *recipe_args(corpus_file, tokenizer_dir, tmp_path / "o", block_size=64)]) == 1
    assert "block_size 64 exceeds the model's context of 32 tokens" in capsys.readouterr().err


def test_resume_skips_a_damaged_newest_checkpoint(corpus_file, tokenizer_dir, tmp_path, caplog):
    """A run resumed after its newest checkpoint was truncated continues from the one before and keeps the damaged
    one aside, instead of crashing on every rerun."""
    argv = recipe_args(corpus_file, tokenizer_dir, tmp_path, max_steps=4, save_steps=2, eval_strategy="no",
                       report_to="none", loss_curve=False)
    assert tinyllm(["pretrain", *argv]) == 0
    weights = tmp_path / "checkpoint-4" / "model.safetensors"
    damaged = weights.read_bytes()[:100]
    weights.write_bytes(damaged)
    with caplog.at_level("WARNING", logger="tinyllm_hf"):
        assert tinyllm(["pretrain", *argv, "--resume"]) == 0
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert "checkpoint-4 is damaged (model.safetensors: truncated" in warnings
    assert f"resuming from {tmp_path / 'checkpoint-2'}" in warnings
    assert (tmp_path / "damaged-checkpoint-4" / "model.safetensors").read_bytes() == damaged
    assert read_state(tmp_path)["global_step"] == 4 and latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    steps = [e["step"] for e in read_state(tmp_path)["log_history"] if "loss" in e]
    assert steps == [1, 2, 3, 4]  # steps 3 and 4 trained again from checkpoint-2, not from scratch


def run_pretrain(argv, **popen):
    return subprocess.Popen([sys.executable, "-m", "tinyllm_hf.trainers.pretrain", *argv], cwd=REPO,
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)


@pytest.mark.slow
def test_kill_9_then_resume_reproduces_the_uninterrupted_run(corpus_file, tokenizer_dir, tmp_path):
    common_args = dict(max_steps=60, save_steps=10, eval_steps=30, data_order_log=True, report_to="none",
                       save_total_limit=2)
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    ref_proc = run_pretrain(recipe_args(corpus_file, tokenizer_dir, reference, **common_args))
    proc = run_pretrain(recipe_args(corpus_file, tokenizer_dir, interrupted, **common_args))
    deadline = time.time() + 240
    while not (interrupted / "checkpoint-20").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint-20 within 240 s"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (interrupted / "trainer_state.json").exists(), "the run finished before it was killed"
    assert ref_proc.wait(timeout=300) == 0, ref_proc.stderr.read().decode()[-3000:]

    # What a kill while saving would leave: a staging folder, or a (non-atomic) checkpoint folder without its state.
    (interrupted / "tmp-checkpoint-50" / "checkpoint-50").mkdir(parents=True)
    (interrupted / "checkpoint-55").mkdir()
    (interrupted / "checkpoint-55" / "model.safetensors").write_bytes(b"partial")
    last = latest_checkpoint(interrupted)
    killed_at = checkpoint_step(last)
    assert killed_at is not None and 20 <= killed_at < 50
    state_before = json.loads((Path(last) / "trainer_state.json").read_text())

    resumed = run_pretrain(recipe_args(corpus_file, tokenizer_dir, interrupted, resume=True, **common_args))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-3000:]

    assert not (interrupted / "tmp-checkpoint-50").exists()
    ref_state, state = read_state(reference), read_state(interrupted)
    assert state["global_step"] == ref_state["global_step"] == 60
    assert data_order(interrupted) == data_order(reference)  # same batches at every step, before and after the kill
    losses = {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}
    ref_losses = {e["step"]: e["loss"] for e in ref_state["log_history"] if "loss" in e}
    # One continuous curve: steps up to the checkpoint come from before the kill, the rest from the resumed run.
    assert sorted(losses) == list(range(1, 61))
    before = {e["step"]: e["loss"] for e in state_before["log_history"] if "loss" in e}
    assert sorted(before) == list(range(1, killed_at + 1)) and all(losses[s] == before[s] for s in before)
    for step in range(1, 61):
        assert losses[step] == pytest.approx(ref_losses[step], rel=1e-4, abs=1e-4), step


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_on_cpu_see_different_data(corpus_file, tokenizer_dir, tmp_path):
    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
              "-m", "tinyllm_hf.trainers.pretrain"]
    argv = recipe_args(corpus_file, tokenizer_dir, out, max_steps=3, save_steps=3, eval_steps=3, data_order_log=True,
                       report_to="none")
    result = subprocess.run(launch + argv, cwd=REPO, env={**subprocess_env(), "ACCELERATE_USE_CPU": "true"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = data_order(out, 0), data_order(out, 1)
    assert sorted(rank0) == sorted(rank1) == [1, 2, 3]
    assert all(rank0[step] != rank1[step] for step in rank0)
    state = read_state(out)
    assert state["global_step"] == 3 and (out / "checkpoint-3" / "rng_state_1.pth").is_file()


# --------------------------------------------------------------------------------------------------------------------
# Shipped recipes and launcher configs
# --------------------------------------------------------------------------------------------------------------------


PRETRAIN_RECIPES = sorted((REPO / "recipes" / "pretrain").glob("*.yaml"))


@pytest.mark.parametrize("recipe", PRETRAIN_RECIPES, ids=lambda p: p.stem)
def test_pretrain_recipes_parse_and_fit_their_preset(recipe):
    values = yaml.safe_load(recipe.read_text())
    model_args, data_args, args, _ = parse_recipe(
        [pretrain.ModelArguments, pretrain.DataArguments, TrainingArguments],
        ["--config", str(recipe), "--use_cpu", "true", "--bf16", "false"],
        defaults=pretrain.DEFAULTS,
    )
    config = TinyllmConfig.from_preset(model_args.model_preset, **pretrain.parse_overrides(model_args.config_overrides))
    if model_args.rope_scaling:  # a context-extension recipe: the preset's context, scaled
        config = with_rope_scaling(config, model_args.rope_scaling)
    assert (data_args.block_size or model_context(config)) <= model_context(config)
    assert args.lr_scheduler_type in ("cosine", "warmup_stable_decay")
    assert args.report_to == ["tensorboard"] and args.max_steps > 0
    if recipe.stem not in ("quickstart", "long-context"):  # GPU recipes train in bf16
        assert values.get("bf16") is True and model_args.model_preset == recipe.stem


def test_recipes_cover_every_preset_and_both_schedules():
    names = {p.stem for p in PRETRAIN_RECIPES}
    assert {"quickstart", "16m", "42m", "92m", "210m", "440m", "1.5b"} <= names
    schedules = {yaml.safe_load(p.read_text())["lr_scheduler_type"] for p in PRETRAIN_RECIPES}
    assert schedules == {"cosine", "warmup_stable_decay"}


ACCELERATE_CONFIGS = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))


def launcher_settings(config_path, monkeypatch):
    """What `accelerate launch --config_file config_path` would hand its processes, computed without starting any:
    the launcher's own parser and validation, then (for DeepSpeed) the environment and the DeepSpeedPlugin that each
    process would build from it, which reads and checks the DeepSpeed JSON without needing deepspeed installed."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(config_path), "-m", "tinyllm_hf.trainers.pretrain"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if not args.use_deepspeed:
        return args, None
    # As accelerate's launch_command does before calling the DeepSpeed launcher:
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    _, env = prepare_deepspeed_cmd_env(args)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(REPO)  # the configs name their DeepSpeed JSON relative to the repository root
    return args, DeepSpeedPlugin()


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.stem)
def test_accelerate_configs_are_accepted_by_the_launcher(path, monkeypatch):
    raw = yaml.safe_load(path.read_text())
    args, plugin = launcher_settings(path, monkeypatch)
    assert args.num_processes >= 1 and args.num_machines == raw["num_machines"]
    if args.num_machines > 1:
        assert raw["main_process_ip"] and raw["machine_rank"] == 0 and raw["rdzv_backend"] == "static"
    if plugin is None:
        assert raw["mixed_precision"] == "no"  # precision is the recipe's bf16 setting, in one place
        return
    assert "mixed_precision" not in raw
    expected_stage = 3 if "zero3" in path.stem else 2
    assert plugin.zero_stage == expected_stage and plugin.zero3_init_flag == (expected_stage == 3)
    zero = plugin.deepspeed_config["zero_optimization"]
    offload = zero.get("offload_optimizer", {}).get("device", "none")
    assert (offload == "cpu") == ("offload" in path.stem)
    # Batch sizes, clipping and precision are filled from the Trainer's arguments, so recipes stay the one source.
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping"):
        assert plugin.deepspeed_config[key] == "auto", key
    assert plugin.deepspeed_config["bf16"]["enabled"] == "auto"


def test_deepspeed_config_with_mixed_precision_is_rejected(tmp_path, monkeypatch):
    """The check above is real: accelerate refuses mixed_precision next to a deepspeed_config_file."""
    config = yaml.safe_load((REPO / "recipes" / "accelerate" / "deepspeed_zero2.yaml").read_text())
    config["mixed_precision"] = "bf16"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="When using `deepspeed_config_file`, the following accelerate config"):
        launcher_settings(bad, monkeypatch)


def load_speedrun():
    """bench/speedrun.py as a module (bench/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("speedrun", Path(__file__).resolve().parents[1] / "bench/speedrun.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def speedrun_setup(corpus_file, tokenizer_dir, tmp_path, monkeypatch):
    """The speedrun script on a tiny recipe, with the corpus' last documents standing in for the validation text."""
    speedrun = load_speedrun()
    texts = corpus_file.read_text(encoding="utf-8").splitlines()[-40:]
    monkeypatch.setattr(speedrun, "load_texts", lambda source: texts)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model_preset": "tiny", "dataset_name": str(corpus_file), "block_size": 32, "max_steps": 40,
        "config_overrides": "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,max_position_embeddings=32",
        "per_device_train_batch_size": 4, "learning_rate": 1e-2, "warmup_steps": 2, "peak_flops": 1e11,
        "use_cpu": True, "dataloader_num_workers": 0, "seed": 0}), encoding="utf-8")
    return speedrun, ["--tokenizer", str(tokenizer_dir), "--recipe", str(recipe), "--check-every", "10"]


def test_speedrun_stops_at_the_first_check_that_reaches_the_target(speedrun_setup, tmp_path, capsys):
    speedrun, argv = speedrun_setup
    first = tmp_path / "first.json"
    assert speedrun.main([*argv, "--target", "0.01", "--json", str(first)]) == 1  # out of reach: all 40 steps
    checks = json.loads(first.read_text())["checks"]
    assert [c["step"] for c in checks] == [10, 20, 30, 40] and "NOT reached" in capsys.readouterr().out
    assert checks[-1]["bits_per_char"] < checks[0]["bits_per_char"]  # it learns
    assert all(later["seconds"] > earlier["seconds"] for earlier, later in zip(checks, checks[1:]))
    # A target between the second and the third check's scores is reached at the third check, where training stops.
    target = (checks[1]["bits_per_char"] + checks[2]["bits_per_char"]) / 2
    result_file = tmp_path / "result.json"
    assert speedrun.main([*argv, "--target", str(target), "--json", str(result_file), "--", "--max_steps", "40"]) == 0
    result = json.loads(result_file.read_text())
    assert result["reached"] and result["step"] == 30 and [c["step"] for c in result["checks"]] == [10, 20, 30]
    assert result["bits_per_char"] == pytest.approx(checks[2]["bits_per_char"], abs=2e-3)  # the same run again
    assert result["tokens"] == 30 * 4 * 32 and result["flags"] == "--max_steps 40"
    assert f"| {result['step']} | " in capsys.readouterr().out  # the table row


def test_speedrun_refuses_bad_arguments(speedrun_setup, capsys):
    speedrun, argv = speedrun_setup
    for bad, message in ((["--check-every", "0"], "--check-every must be at least 1"),
                         (["--target", "-1"], "--target must be a positive number")):
        with pytest.raises(SystemExit) as exit_info:
            speedrun.main([*argv, *bad])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------------
# Pre-tokenized shards (tinyllm pretokenize)
# --------------------------------------------------------------------------------------------------------------------


class Calls:
    """Counts the calls of a function it replaces, passing them through."""

    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


def pretokenize_args(corpus_file, tokenizer_dir, blocks, **overrides) -> list[str]:
    return ["pretokenize", *recipe_args(corpus_file, tokenizer_dir, blocks.parent / "unused", tokenized_dataset=blocks,
                                        **overrides)]


def test_pretokenize_writes_shards_and_a_manifest_then_reuses_them(corpus_file, tokenizer_dir, tokenizer, tmp_path,
                                                                      monkeypatch, capsys):
    from tinyllm_hf.data import pretokenized
    from tinyllm_hf.data.corpus import load_corpus

    blocks = tmp_path / "blocks"
    assert tinyllm(pretokenize_args(corpus_file, tokenizer_dir, blocks, block_size=16, num_shards=3)) == 0
    manifest = json.loads((blocks / pretokenized.MANIFEST_FILE).read_text())
    corpus = load_corpus(str(corpus_file))
    saved = datasets.load_from_disk(str(blocks))
    for split in ("train", "validation"):  # the same documents and blocks as the tokenize-at-start path
        expected = pack_dataset(corpus[split], tokenizer, 16)
        assert saved[split]["input_ids"] == expected["input_ids"]
        assert manifest["splits"][split] | {"packing_seconds": 0} == {
            "documents": len(corpus[split]), "blocks": len(expected), "tokens": 16 * len(expected), "packing_seconds": 0}
    assert len(list((blocks / "train").glob("*.arrow"))) == 3
    assert manifest["inputs"]["block_size"] == 16 and manifest["inputs"]["corpus"]["dataset_name"] == str(corpus_file)
    assert f"{blocks}: train {len(corpus['train']):,} documents" in capsys.readouterr().out

    # Again with the same inputs: nothing read or tokenized.
    loads, packs = Calls(pretokenized.load_corpus), Calls(packing.pack_batch)
    monkeypatch.setattr(pretokenized, "load_corpus", loads)
    monkeypatch.setattr(packing, "pack_batch", packs)
    assert tinyllm(pretokenize_args(corpus_file, tokenizer_dir, blocks, block_size=16)) == 0
    assert loads.calls == packs.calls == 0
    # Other inputs: refused with what differs, rebuilt only when asked to.
    assert tinyllm(pretokenize_args(corpus_file, tokenizer_dir, blocks, block_size=8)) == 1
    assert (f"tinyllm pretokenize: error: {blocks} holds blocks made from other inputs: block_size 16 (asked: 8); "
            "point tokenized_dataset elsewhere, or pass --overwrite to rebuild it") in capsys.readouterr().err
    assert tinyllm([*pretokenize_args(corpus_file, tokenizer_dir, blocks, block_size=8), "--overwrite"]) == 0
    assert loads.calls == 1 and json.loads((blocks / pretokenized.MANIFEST_FILE).read_text())["inputs"]["block_size"] == 8
    other_tokenizer = tmp_path / "tok2"
    train_tokenizer(corpus_file.read_text(encoding="utf-8").splitlines(), vocab_size=300, output_dir=other_tokenizer)
    assert tinyllm(pretokenize_args(corpus_file, other_tokenizer, blocks, block_size=8)) == 1
    assert "made from other inputs: another tokenizer" in capsys.readouterr().err


def test_a_half_written_or_damaged_pretokenized_folder_is_not_trusted(corpus_file, tokenizer_dir, tmp_path,
                                                                        monkeypatch, capsys):
    from tinyllm_hf.data import pretokenized

    blocks = tmp_path / "blocks"
    # Killed while saving: nothing under the final name.
    def killed(self, path, **kwargs):
        (Path(path) / "train").mkdir(parents=True)
        (Path(path) / "train" / "data-00000-of-00001.arrow").write_bytes(b"partial")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(datasets.DatasetDict, "save_to_disk", killed)
        with pytest.raises(KeyboardInterrupt):
            tinyllm(pretokenize_args(corpus_file, tokenizer_dir, blocks, block_size=16))
    assert not blocks.exists() and not list(tmp_path.glob(".blocks.tmp-*"))

    assert tinyllm(pretokenize_args(corpus_file, tokenizer_dir, blocks, block_size=16)) == 0
    shard = next((blocks / "train").glob("*.arrow"))
    size = shard.stat().st_size
    with shard.open("r+b") as f:
        f.truncate(size // 2)
    run = recipe_args(corpus_file, tokenizer_dir, tmp_path / "run", tokenized_dataset=blocks, block_size=16)
    assert tinyllm(["pretrain", *run]) == 1
    assert (f"tinyllm pretrain: error: tokenized_dataset {blocks}: train/{shard.name} has {size // 2} bytes, {size} "
            "when written; build it with `tinyllm pretokenize --config RECIPE` (it replaces a damaged one)"
            ) in capsys.readouterr().err
    assert tinyllm(pretokenize_args(corpus_file, tokenizer_dir, blocks, block_size=16)) == 0  # rebuilt
    assert pretokenized.pretokenized_damage(blocks) is None and shard.stat().st_size == size
    # A folder that is not ours is never replaced silently.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert tinyllm(pretokenize_args(corpus_file, tokenizer_dir, tmp_path / "mine", block_size=16)) == 1
    assert "exists and is not a pre-tokenized dataset" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert tinyllm(["pretrain", *run, "--streaming", "true"]) == 1
    assert "tokenized_dataset and streaming exclude each other" in capsys.readouterr().err


def test_resume_on_pretokenized_blocks_seeks_instead_of_reading(corpus_file, tokenizer_dir, tmp_path, monkeypatch):
    """A run resumed late (step 120 of 130, in its second epoch) trains on the same batches as the uninterrupted run,
    reads only the blocks of the 10 steps left and tokenizes nothing."""
    blocks = tmp_path / "blocks"
    common = dict(tokenized_dataset=blocks, max_steps=130, save_steps=120, eval_strategy="no", report_to="none",
                  loss_curve=False, data_order_log=True)
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert pretrain.main(recipe_args(corpus_file, tokenizer_dir, reference, **common)) == 0  # builds the blocks
    train_blocks = json.loads((blocks / "tinyllm_pretokenized.json").read_text())["splits"]["train"]["blocks"]
    assert 120 * 4 > train_blocks  # the checkpoint is past the first epoch
    resumed.mkdir()
    shutil.copytree(reference / "checkpoint-120", resumed / "checkpoint-120")
    rows_read, read_rows = [], datasets.Dataset.__getitems__

    def counting_reads(self, keys):  # what the DataLoader calls for every batch of a map-style dataset
        rows_read.append(len(keys))
        return read_rows(self, keys)

    packs = Calls(packing.pack_batch)
    monkeypatch.setattr(datasets.Dataset, "__getitems__", counting_reads)
    monkeypatch.setattr(packing, "pack_batch", packs)
    assert pretrain.main(recipe_args(corpus_file, tokenizer_dir, resumed, resume=True, **common)) == 0
    # The 10 batches left and the one accelerate's loader reads ahead (to know which batch is the last): nothing of
    # the 120 batches trained before the checkpoint is read again.
    assert packs.calls == 0 and rows_read == [4] * 11
    expected = {step: sha for step, sha in data_order(reference).items() if step > 120}
    assert data_order(resumed) == expected and len(expected) == 10
    assert {json.loads(line)["loader"] for line in (resumed / "data_order" / "rank0.jsonl").open()} == {"DataLoaderShard"}


def data_rows(output_dir, rank=0) -> dict[int, list[str]]:
    lines = (Path(output_dir) / "data_order" / f"rank{rank}.jsonl").read_text().splitlines()
    return {record["step"]: record["rows"] for record in map(json.loads, lines)}


@pytest.mark.slow
def test_ddp_two_processes_read_their_own_pretokenized_blocks(corpus_file, tokenizer_dir, tmp_path):
    """2 processes x 4 blocks read, each itself (no batches sent from rank 0), disjoint blocks at every step whose union
    is what one process with 8 blocks per step trains on."""
    blocks = tmp_path / "blocks"
    common = dict(tokenized_dataset=blocks, max_steps=3, save_steps=3, eval_strategy="no", data_order_log=True,
                  report_to="none", loss_curve=False)
    single = tmp_path / "single"
    assert pretrain.main(recipe_args(corpus_file, tokenizer_dir, single, per_device_train_batch_size=8, **common)) == 0
    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(free_port()), "-m", "tinyllm_hf.trainers.pretrain"]
    result = subprocess.run(launch + recipe_args(corpus_file, tokenizer_dir, out, **common), cwd=REPO,
                            env={**subprocess_env(), "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1, one = data_rows(out, 0), data_rows(out, 1), data_rows(single)
    assert sorted(rank0) == sorted(rank1) == sorted(one) == [1, 2, 3]
    for step in one:
        assert len(rank0[step]) == len(rank1[step]) == 4 and not set(rank0[step]) & set(rank1[step])
        assert sorted(rank0[step] + rank1[step]) == sorted(one[step])
    for rank in (0, 1):
        loaders = {json.loads(line)["loader"] for line in (out / "data_order" / f"rank{rank}.jsonl").open()}
        assert loaders == {"DataLoaderShard"}


def test_pretokenize_a_hub_corpus_in_its_published_schema(corpus_file, tokenizer_dir, tokenizer, tmp_path, monkeypatch):
    """The Hub branch (`wikimedia/wikipedia`, `20231101.zh`: parquet with id, url, title, text) through a
    `datasets.load_dataset` shim pointing at local files: the blocks are those of the same documents read locally."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tinyllm_hf.data.corpus import load_corpus

    texts = corpus_file.read_text(encoding="utf-8").splitlines()
    folder = tmp_path / "wikipedia" / "20231101.zh"
    folder.mkdir(parents=True)
    for part, rows in enumerate((texts[:300], texts[300:])):
        pq.write_table(pa.table({"id": [str(i) for i in range(len(rows))], "url": ["https://zh.wikipedia.org/"] * len(rows),
                                 "title": ["标题"] * len(rows), "text": rows}),
                       folder / f"train-{part:05d}-of-00002.parquet")
    load_dataset = datasets.load_dataset

    def hub_shim(name, config=None, **kwargs):
        assert (name, config) == ("wikimedia/wikipedia", "20231101.zh")
        return load_dataset("parquet", data_files=sorted(map(str, folder.glob("*.parquet"))), **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", hub_shim)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    blocks = tmp_path / "blocks"
    assert tinyllm(pretokenize_args(corpus_file, tokenizer_dir, blocks, block_size=16,
                                    dataset_name="wikimedia/wikipedia", dataset_config="20231101.zh")) == 0
    manifest = json.loads((blocks / "tinyllm_pretokenized.json").read_text())
    assert manifest["inputs"]["corpus"] | {"fingerprint": None} == {
        "dataset_name": "wikimedia/wikipedia", "dataset_config": "20231101.zh", "text_field": "text", "fingerprint": None}
    local = load_corpus(str(corpus_file))
    saved = datasets.load_from_disk(str(blocks))
    for split in ("train", "validation"):
        assert manifest["splits"][split]["documents"] == len(local[split])
        assert saved[split]["input_ids"] == pack_dataset(local[split], tokenizer, 16)["input_ids"]


def test_blocks_of_a_corpus_changed_since_are_refused(corpus_file, tokenizer_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    shutil.copy(corpus_file, corpus)
    blocks = tmp_path / "blocks"
    assert tinyllm(pretokenize_args(corpus, tokenizer_dir, blocks, block_size=16)) == 0
    with corpus.open("a", encoding="utf-8") as f:
        f.write("新的一行：小明在北京看见大海。\n")
    run = recipe_args(corpus, tokenizer_dir, tmp_path / "run", tokenized_dataset=blocks, block_size=16, max_steps=1)
    assert tinyllm(["pretrain", *run]) == 1
    assert (f"tinyllm pretrain: error: tokenized_dataset {blocks} was made from other inputs: the corpus changed since "
            "(its files, package versions or the cleaning code); rebuild it with `tinyllm pretokenize --config RECIPE "
            "--overwrite` or point tokenized_dataset elsewhere") in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------------
# GPU speed, checked on a CPU: no host syncs between logs, the non-finite check, datasheet MFU
# --------------------------------------------------------------------------------------------------------------------

# What makes the host wait for the device when called on a GPU tensor.
SYNC_POINTS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


def tiny_pretrain_trainer(tmp_path, callbacks=(), **arguments):
    config = TinyllmConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, max_position_embeddings=16)
    torch.manual_seed(0)
    blocks = datasets.Dataset.from_dict({"input_ids": torch.randint(0, 64, (64, 16)).tolist()})
    values = {**dict(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     logging_steps=4, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                     disable_tqdm=True), **arguments}
    return pretrain.PretrainTrainer(model=TinyllmForCausalLM(config), args=TrainingArguments(**values),
                                    train_dataset=blocks, data_collator=collate_blocks, callbacks=list(callbacks))


def test_training_steps_between_logs_make_no_host_syncs(tmp_path, monkeypatch):
    """From the start of an optimizer step to its end (the micro-steps' forward, loss, backward, the non-finite check,
    the token count, clipping, the optimizer), nothing reads a tensor on the host; the reads happen at logging steps,
    which still log the loss and the exact number of tokens seen."""
    from transformers import TrainerCallback

    seen = {"window": False, "calls": []}
    for name in SYNC_POINTS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            if seen["window"]:
                seen["calls"].append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)

    class Window(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen["window"] = True

        def on_step_end(self, args, state, control, **kwargs):
            seen["window"] = False
            seen.setdefault("steps", []).append((state.global_step, list(seen["calls"])))
            seen["calls"].clear()

    trainer = tiny_pretrain_trainer(tmp_path, [Window()], include_num_input_tokens_seen=True, max_grad_norm=1.0)
    trainer.train()
    assert [step for step, _ in seen["steps"]] == list(range(1, 9))
    assert [calls for _, calls in seen["steps"]] == [[]] * 8
    # The spies work: reading a tensor inside a window is counted.
    seen["window"] = True
    torch.ones(1).item()
    assert seen["calls"] == ["item"]
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logged] == [4, 8] and all(math.isfinite(e["loss"]) for e in logged)
    assert [e["num_input_tokens_seen"] for e in logged] == [4 * 2 * 2 * 16, 8 * 2 * 2 * 16]
    assert trainer.args.logging_nan_inf_filter is False


def test_non_finite_loss_between_logs_stops_at_the_next_check_naming_its_step(tmp_path):
    """A loss that turns NaN at step 3 is read at the step-4 log (and save): the run stops there naming step 3,
    before the step-4 checkpoint is written."""
    from transformers import TrainerCallback

    class PoisonAfterStep2(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    model.model.layers[0].mlp.down_proj.weight.fill_(float("inf"))

    trainer = tiny_pretrain_trainer(tmp_path, [PoisonAfterStep2()], save_strategy="steps", save_steps=4)
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss \(nan\) at step 3: training stopped"):
        trainer.train()
    assert trainer.state.global_step == 4 and not list(tmp_path.glob("checkpoint-*"))


@pytest.mark.parametrize("name, dtype, tflops", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756.0),
    ("NVIDIA H200", torch.bfloat16, 989.4),
    ("NVIDIA H200", torch.float32, 66.9),
    ("NVIDIA A100-SXM4-80GB", torch.float16, 312.0),
    ("NVIDIA A100 80GB PCIe", torch.float32, 19.5),
    ("NVIDIA L40S", torch.bfloat16, 362.05),
    ("NVIDIA GeForce RTX 4090", torch.bfloat16, 165.2),
    ("NVIDIA H200 NVL", torch.bfloat16, None),  # another part with lower clocks: not guessed
    ("NVIDIA H100 NVL", torch.bfloat16, None),
    ("Tesla T4", torch.float16, None),
    (None, torch.bfloat16, None),  # a CPU
])
def test_datasheet_peak_by_device_name(name, dtype, tflops):
    from tinyllm_hf.trainers.common import datasheet_peak_flops

    assert datasheet_peak_flops(name, dtype) == (None if tflops is None else pytest.approx(tflops * 1e12))


@pytest.mark.parametrize("device_name, given", [("NVIDIA H100 80GB HBM3", None), ("NVIDIA H100 80GB HBM3", 5e14),
                                                (None, None)])
def test_mfu_against_the_datasheet_and_the_measured_peak(device_name, given, monkeypatch):
    """MFU = tokens/s x FLOPs/token / (processes x peak): against a given peak, else the datasheet's (with the
    measured matmul's MFU beside it), else the measured matmul's."""
    from types import SimpleNamespace

    from tinyllm_hf.trainers import common

    monkeypatch.setattr(common, "accelerator_name", lambda device: device_name)
    monkeypatch.setattr(common, "measure_matmul_peak", lambda device, dtype, repeats=5: 6e14)
    clock = iter([10.0, 12.0, 12.0])  # the start, then a log line 4 optimizer steps (2 s) later
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    callback = common.ThroughputCallback(flops_per_token=1e9, tokens_per_step=200_000, peak_flops=given,
                                         peak_dtype=torch.bfloat16)
    args = SimpleNamespace(device=torch.device("cpu"), world_size=2)
    state = SimpleNamespace(is_world_process_zero=True, num_input_tokens_seen=0, log_history=[], global_step=0)
    callback.on_train_begin(args, state, None)
    state.global_step = 4
    logs = {"loss": 1.0}
    callback.on_log(args, state, None, logs=logs)
    per_process = 200_000 / 0.5 * 1e9 / 2  # 2e14 FLOP/s
    peak = given or (989.4e12 if device_name else 6e14)
    assert logs["tokens_per_second"] == 400_000 and logs["mfu"] == round(per_process / peak, 4)
    assert logs["peak_gflops"] == round(peak / 1e9, 1)
    if device_name and not given:
        assert logs["mfu_vs_measured"] == round(per_process / 6e14, 4) and logs["measured_peak_gflops"] == 600_000
    else:
        assert "mfu_vs_measured" not in logs
