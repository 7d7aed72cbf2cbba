"""Bad input to the training stages (and eval, run, merge) as a table: each is refused with ONE line on stderr,
`tinyllm <command>: error: ...` naming the problem, and exit code 1, before any model is trained.

The cases are those a hostile-user pass found ending in a traceback, a late failure (after data preparation or after
training) or a run that trains silently wrong (`--beta -1`, `--max_steps 0`), and the neighbours of each.
"""

import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from tinyllm_hf import cli
from tinyllm_hf.errors import TinyllmError
from tinyllm_hf.trainers.common import parse_recipe

REPO = Path(__file__).resolve().parents[1]

# Recipe files the cases name as {tmp}/NAME.
RECIPES = {
    "syntax.yaml": "max_steps: [1\nlearning_rate: :\n",
    "list.yaml": "max_steps: [1, 2]\n",
    "null.yaml": "learning_rate: null\n",
    "words.yaml": "per_device_train_batch_size: eight\n",
    "fraction.yaml": "max_steps: 1.5\n",
}

# (argv, words the one error line must contain). Placeholders: {model} a tiny chat model, {tok} its tokenizer only,
# {short} the same model with a 48-token context, {trunc} it with truncated weights, {tmp} a scratch folder holding
# RECIPES and a plain file `afile`, {out} an output folder that must still not exist afterwards.
CASES = [
    # Values that train silently wrong
    (["dpo", "--model_name_or_path", "{model}", "--beta", "-1"], ["beta", "-1", "rejected"]),
    (["dpo", "--model_name_or_path", "{model}", "--beta", "0"], ["beta", "above 0"]),
    (["dpo", "--model_name_or_path", "{model}", "--max_steps", "0"], ["max_steps", "not 0"]),
    (["sft", "--model_name_or_path", "{model}", "--max_steps", "-5"], ["max_steps", "-5"]),
    (["sft", "--model_name_or_path", "{model}", "--learning_rate", "0"], ["learning_rate", "above 0"]),
    (["sft", "--model_name_or_path", "{model}", "--learning_rate=-1e-4"], ["learning_rate", "-0.0001"]),
    (["sft", "--model_name_or_path", "{model}", "--num_train_epochs", "0"], ["num_train_epochs", "max_steps"]),
    (["sft", "--model_name_or_path", "{model}", "--per_device_train_batch_size", "0"],
     ["per_device_train_batch_size", "at least 1"]),
    (["sft", "--model_name_or_path", "{model}", "--gradient_accumulation_steps", "0"],
     ["gradient_accumulation_steps", "at least 1"]),
    (["sft", "--model_name_or_path", "{model}", "--warmup_steps", "-1"], ["warmup_steps", "-1"]),
    (["sft", "--model_name_or_path", "{model}", "--max_grad_norm", "-1"], ["max_grad_norm", "clipping off"]),
    (["sft", "--model_name_or_path", "{model}", "--max_length", "-5"], ["max_length", "-5"]),
    (["sft", "--model_name_or_path", "{model}", "--save_steps", "0"], ["save_steps", "no checkpoint"]),
    (["sft", "--model_name_or_path", "{model}", "--use_peft", "--lora_r", "0"], ["lora_r", "at least 1"]),
    (["sft", "--model_name_or_path", "{model}", "--use_peft", "--lora_alpha", "-16"], ["lora_alpha", "-16"]),
    (["sft", "--model_name_or_path", "{model}", "--use_peft", "--lora_dropout", "1.5"], ["lora_dropout", "1.5"]),
    (["kto", "--model_name_or_path", "{model}", "--beta", "-0.1"], ["beta", "-0.1"]),
    (["kto", "--model_name_or_path", "{model}", "--desirable_weight", "0"], ["desirable_weight", "above 0"]),
    (["orpo", "--model_name_or_path", "{model}", "--beta", "-1"], ["beta", "-1"]),
    (["reward", "--model_name_or_path", "{model}", "--max_length", "0"], ["max_length", "at least 1"]),
    (["reward", "--model_name_or_path", "{model}", "--center_rewards_coefficient", "-1"],
     ["center_rewards_coefficient", "-1"]),
    (["grpo", "--model_name_or_path", "{model}", "--num_generations", "1"], ["num_generations", "2"]),
    (["grpo", "--model_name_or_path", "{model}", "--num_generations", "0"], ["num_generations", "not 0"]),
    (["grpo", "--model_name_or_path", "{model}", "--beta", "-0.04"], ["beta", "KL"]),
    (["rloo", "--model_name_or_path", "{model}", "--temperature", "0"], ["temperature", "above 0"]),
    (["rloo", "--model_name_or_path", "{model}", "--num_generations", "1"], ["num_generations", "2"]),
    (["pretrain", "--tokenizer_name_or_path", "{tok}", "--block_size", "0"], ["block_size", "at least 1"]),
    (["pretrain", "--tokenizer_name_or_path", "{tok}", "--config_overrides", "vocab_size=0"],
     ["config_overrides", "vocab_size", "tokenizer"]),
    (["pretrain", "--tokenizer_name_or_path", "{tok}", "--config_overrides", "hidden_sise=64"],
     ["config_overrides", "hidden_sise"]),
    (["pretrain", "--tokenizer_name_or_path", "{tok}", "--config_overrides", "hidden_size=abc"],
     ["config_overrides", "hidden_size", "abc"]),
    (["pretrain", "--tokenizer_name_or_path", "{tok}", "--config_overrides", "hidden_size=0"],
     ["hidden_size", "positive integer"]),
    (["pretrain", "--tokenizer_name_or_path", "{tok}", "--model_name_or_path", "{model}", "--config_overrides",
      "num_hidden_layers=1"], ["config_overrides", "model_name_or_path"]),
    # Distillation: the divergence and its mixture weight, the sampling temperature, the on-policy share
    (["distill", "--teacher_model_name_or_path", "{model}", "--divergence", "kl"],
     ["divergence", "forward_kl, reverse_kl, jsd", "'kl'"]),
    (["distill", "--teacher_model_name_or_path", "{model}", "--divergence", "jsd", "--beta", "1.5"],
     ["beta", "in [0, 1]", "1.5"]),
    (["distill", "--teacher_model_name_or_path", "{model}", "--beta", "0.3"], ["beta", "divergence jsd", "forward_kl"]),
    (["distill", "--teacher_model_name_or_path", "{model}", "--temperature", "0"], ["temperature", "above 0"]),
    (["distill", "--teacher_model_name_or_path", "{model}", "--lmbda", "1.5"], ["lmbda", "in [0, 1]"]),
    (["distill", "--teacher_model_name_or_path", "{model}", "--lmbda", "0.5"], ["lmbda", "data: corpus", "prompts"]),
    (["distill", "--teacher_model_name_or_path", "{model}", "--data", "sft", "--block_size", "64"],
     ["block_size", "data: corpus"]),
    (["distill", "--teacher_model_name_or_path", "{model}", "--task_sizes", "sentiment=8"],
     ["task_sizes", "data: sft"]),
    (["distill", "--model_preset", "tiny"], ["teacher_model_name_or_path", "not set"]),
    (["distill", "--teacher_model_name_or_path", "{tmp}/no/teacher"], ["teacher_model_name_or_path", "not found"]),
    # Recipe values of the wrong type, and recipe files that are not YAML
    (["sft", "--model_name_or_path", "{model}", "--config", "{tmp}/list.yaml"], ["max_steps", "[1, 2]", "list.yaml"]),
    (["sft", "--model_name_or_path", "{model}", "--config", "{tmp}/null.yaml"], ["learning_rate", "null", "null.yaml"]),
    (["sft", "--model_name_or_path", "{model}", "--config", "{tmp}/words.yaml"],
     ["per_device_train_batch_size", "whole number", "'eight'"]),
    (["dpo", "--model_name_or_path", "{model}", "--config", "{tmp}/fraction.yaml"], ["max_steps", "1.5"]),
    (["sft", "--config", "{tmp}/syntax.yaml"], ["syntax.yaml", "not valid YAML", "line 2"]),
    (["run", "--config", "{tmp}/syntax.yaml"], ["syntax.yaml", "not valid YAML", "line 2"]),
    # Paths: missing, a file where a folder belongs, not a model, damaged
    (["sft", "--model_name_or_path", "{tmp}/runs/missing/sft"], ["model_name_or_path", "not found"]),
    (["sft", "--model_name_or_path", "runs/missing/sft"], ["model_name_or_path", "not found", "Hub id"]),
    (["sft", "--model_name_or_path", "tinyllm-no-such-org/no-such-model"], ["could not be loaded from the Hub"]),
    (["eval", "--model", "runs/missing/sft", "--tasks", "tasks"], ["model folder not found", "runs/missing/sft"]),
    (["eval", "--model", "tinyllm-no-such-org/no-such-model", "--tasks", "tasks"],
     ["could not be loaded from the Hub"]),
    (["dpo", "--model_name_or_path", "{tok}"], ["model_name_or_path", "holds no model", "config.json"]),
    (["pretrain", "--tokenizer_name_or_path", "{tmp}/afile"], ["tokenizer_name_or_path", "is a file"]),
    (["sft", "--model_name_or_path", "{trunc}", "--sft_tasks", "sentiment", "--task_sizes", "sentiment=4"],
     ["weights", "damaged or truncated", "Error while deserializing header"]),
    (["sft", "--model_name_or_path", "{model}", "--dataset_name", "default,{tmp}/missing.jsonl"],
     ["dataset_name", "not found", "missing.jsonl"]),
    (["grpo", "--model_name_or_path", "{model}", "--rewards", "reward_model", "--reward_model_path",
      "{tmp}/no/reward"], ["reward_model_path", "not found"]),
    # Checks that used to come after data preparation or after training
    (["sft", "--model_name_or_path", "{model}", "--output_dir", "{tmp}/afile"], ["output_dir", "is a file"]),
    (["pretrain", "--tokenizer_name_or_path", "{tok}", "--output_dir", "{tmp}/afile/sub"],
     ["output_dir", "cannot be created"]),
    (["sft", "--model_name_or_path", "{short}", "--heldout_eval_sizes", "sentiment=2"],
     ["heldout_eval_sizes", "context", "48"]),
    (["sft", "--model_name_or_path", "{model}", "--heldout_eval_sizes", "sentiment=2", "--dataset_name",
      "{tmp}/rows.jsonl"], ["heldout_eval_sizes", "default"]),
    (["sft", "--model_name_or_path", "{model}", "--max_eval_samples", "0", "--eval_strategy", "steps"],
     ["eval_strategy", "no validation data"]),
    (["merge", "--adapter", "{tmp}/adapter", "--output", "{tmp}/afile"], ["afile", "is not a directory"]),
    # Reward-model margins: a negative one teaches the rejected answer may win; one on some pairs only is ambiguous
    (["reward", "--model_name_or_path", "{model}", "--dataset_name", "{tmp}/negative_margin.jsonl"],
     ["negative_margin.jsonl", "margin must be a number >= 0", "-1"]),
    (["reward", "--model_name_or_path", "{model}", "--dataset_name", "{tmp}/some_margins.jsonl"],
     ["some_margins.jsonl", "1 of 2 pairs have a margin", "every pair or none"]),
]


def pair_lines(*margins) -> str:
    """A preference .jsonl file with one pair per entry of `margins` (None: no margin field)."""
    rows = [{"prompt": f"问题{i}", "chosen": "好的回答", "rejected": "坏", **({} if m is None else {"margin": m})}
            for i, m in enumerate(margins)]
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)

# Cases that load a model before they can fail (its progress bar may precede the error line on stderr).
LOADS_A_MODEL = {"{short}", "{trunc}"}


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_model_dir, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from tinyllm_hf import TinyllmForCausalLM

    root = tmp_path_factory.mktemp("bad-inputs")
    short = root / "short-context"
    model = TinyllmForCausalLM(tiny_config(AutoTokenizer.from_pretrained(tiny_tokenizer_dir), 48))
    model.save_pretrained(short)
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(short)
    trunc = root / "truncated"
    shutil.copytree(tiny_model_dir, trunc)
    weights = trunc / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return {"model": str(tiny_model_dir), "tok": str(tiny_tokenizer_dir), "short": str(short), "trunc": str(trunc)}


@pytest.mark.parametrize("argv, words", CASES, ids=[" ".join(argv) for argv, _ in CASES])
def test_bad_input_is_one_line_and_exit_code_1_before_training(argv, words, paths, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a Hub id is looked up in the cache only: no network, no waiting
    monkeypatch.chdir(tmp_path)  # default output folders (outputs/<stage>) land here
    for name, text in RECIPES.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "afile").write_text("not a folder\n")
    (tmp_path / "rows.jsonl").write_text('{"prompt": "你好", "response": "你好！"}\n')
    (tmp_path / "negative_margin.jsonl").write_text(pair_lines(0.5, -1))
    (tmp_path / "some_margins.jsonl").write_text(pair_lines(0.5, None))
    (tmp_path / "adapter").mkdir()  # checked as far as merge reads it before loading the base model
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": paths["model"]}))
    out = tmp_path / "out"
    if "--output_dir" not in argv and argv[0] not in ("eval", "run", "merge"):
        argv = [*argv, "--output_dir", "{out}"]
    filled = [a.format(tmp=tmp_path, out=out, **paths) for a in argv]

    assert cli.main(filled) == TinyllmError.exit_code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    if not LOADS_A_MODEL & set(argv):
        assert len(lines) == 1, err
    assert lines[-1].startswith(f"tinyllm {argv[0]}: error: "), err
    for word in words:
        assert word in lines[-1], lines[-1]
    assert not out.exists()  # refused before anything was trained or written


@pytest.mark.parametrize("stage, recipe", [
    (path.parent.name, path) for path in sorted((REPO / "recipes").glob("*/*.yaml"))
    if path.parent.name in ("pretrain", "distill", "sft", "dpo", "reward", "grpo", "rloo", "kto", "orpo")
], ids=lambda v: v.name if isinstance(v, Path) else v)
def test_every_shipped_recipe_passes_the_checks(stage, recipe, paths, tmp_path):
    """The checks refuse only what is wrong: each recipe in recipes/ parses (its model paths pointed at the tiny
    model, bf16 off for this CPU)."""
    module = importlib.import_module(f"tinyllm_hf.trainers.{stage}")
    path_flags = (["--tokenizer_name_or_path", paths["tok"]] if stage == "pretrain"
                  else ["--teacher_model_name_or_path", paths["model"]] if stage == "distill"
                  else ["--model_name_or_path", paths["model"]])
    if stage in ("grpo", "rloo"):
        path_flags += ["--reward_model_path", paths["model"]]
    argv = ["--config", str(recipe), *path_flags, "--output_dir", str(tmp_path / "out"), "--bf16", "false"]
    parsed = parse_recipe(module.ARGUMENTS, argv, defaults=module.DEFAULTS)
    training_args = next(a for a in parsed if hasattr(a, "learning_rate"))
    assert training_args.learning_rate > 0 and isinstance(training_args.learning_rate, float)


def test_recipe_numbers_written_as_yaml_strings_become_numbers(tmp_path):
    """YAML reads `1e-5` (no dot) as a string: it is converted to the field's type, not refused or kept as text."""
    from tinyllm_hf.trainers import dpo

    (tmp_path / "r.yaml").write_text("learning_rate: 1e-5\nmax_steps: '3'\nbeta: 0.2\n")
    args = parse_recipe(dpo.ARGUMENTS, ["--config", str(tmp_path / "r.yaml"), "--output_dir", str(tmp_path / "o")],
                        defaults=dpo.DEFAULTS)[2]
    assert (args.learning_rate, args.max_steps, args.beta) == (1e-5, 3, 0.2)


@pytest.mark.parametrize("hardware", [True, False])
@pytest.mark.parametrize("where", ["recipe", "flag", "flag="])
def test_bf16_auto_follows_the_training_device(monkeypatch, tmp_path, caplog, hardware, where):
    """`bf16: auto` (recipe) or `--bf16 auto` becomes true exactly where `bf16_in_hardware` says the device has bf16
    matmuls, asked about the device the run trains on (use_cpu), and the run says which it chose; an explicit
    `--bf16 false` on the command line wins over a recipe's auto."""
    from tinyllm_hf.trainers import common, pretrain

    asked = []

    def fake_hardware(use_cpu):
        asked.append(use_cpu)
        return hardware, "a test CPU (avx512_bf16)" if hardware else "a test CPU (no AVX-512 BF16 or AMX-BF16)"

    monkeypatch.setattr(common, "bf16_in_hardware", fake_hardware)
    (tmp_path / "r.yaml").write_text("use_cpu: true\n" + ("bf16: auto\n" if where == "recipe" else ""))
    flag = {"recipe": [], "flag": ["--bf16", "auto"], "flag=": ["--bf16=auto"]}[where]
    argv = ["--config", str(tmp_path / "r.yaml"), "--output_dir", str(tmp_path / "o"), *flag]
    args = next(a for a in parse_recipe(pretrain.ARGUMENTS, argv, defaults=pretrain.DEFAULTS) if hasattr(a, "bf16"))
    assert args.bf16 is hardware and asked == [True]
    assert f"bf16: auto -> {str(hardware).lower()} on a test CPU" in caplog.text
    if where == "recipe":
        args = next(a for a in parse_recipe(pretrain.ARGUMENTS, [*argv, "--bf16", "false"], defaults=pretrain.DEFAULTS)
                    if hasattr(a, "bf16"))
        assert args.bf16 is False and asked == [True]


def test_bf16_in_hardware_reads_the_cpu_flags(monkeypatch):
    """On the CPU, bf16 counts as hardware only with AVX-512 BF16 or AMX-BF16 (torch's CPU capability report)."""
    from tinyllm_hf.trainers.common import bf16_in_hardware

    for flags, expected in [({"avx512_bf16": True}, True), ({"amx_bf16": True}, True),
                            ({"avx512_bf16": False, "avx2": True}, False)]:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda flags=flags: {"cpu_name": "X", **flags})
        assert bf16_in_hardware(use_cpu=True)[0] is expected


def test_grpo_beta_zero_is_accepted():
    """In GRPO/RLOO beta weighs a KL penalty and 0 (no reference model) is valid; only DPO-style betas must be > 0."""
    from tinyllm_hf.trainers import grpo

    args = parse_recipe(grpo.ARGUMENTS, ["--beta", "0", "--output_dir", "o"], defaults=grpo.DEFAULTS)[4]
    assert args.beta == 0


def test_a_bad_value_fails_before_the_stage_starts(monkeypatch, tiny_model_dir, tmp_path, capsys):
    """The checks run while the recipe is parsed: the stage's training function (which loads the tokenizer, the data
    and the model) is never called for a recipe that cannot work."""
    from tinyllm_hf.trainers import dpo

    def must_not_run(*args):
        raise AssertionError("the stage started")

    monkeypatch.setattr(dpo, "train", must_not_run)
    argv = ["dpo", "--model_name_or_path", str(tiny_model_dir), "--beta", "-1", "--output_dir", str(tmp_path / "o")]
    assert cli.main(argv) == 1
    assert "beta must be above 0" in capsys.readouterr().err


def test_reward_margins_reach_the_loss_and_other_stages_say_they_ignore_them(paths, tmp_path, monkeypatch, caplog):
    """Margins in your pairs are trained with by the reward stage (TRL's margin loss), not dropped on the way."""
    from trl.trainer import reward_trainer

    from tinyllm_hf.trainers.alignment import PreferenceDataArguments, preference_datasets

    data = tmp_path / "margins.jsonl"
    data.write_text(pair_lines(*[1.0] * 8))
    batches = []
    compute_loss = reward_trainer.RewardTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        batches.append(inputs.get("margin"))
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(reward_trainer.RewardTrainer, "compute_loss", recording)
    argv = ["reward", "--model_name_or_path", paths["model"], "--dataset_name", str(data), "--output_dir",
            str(tmp_path / "rm"), "--max_steps", "1", "--per_device_train_batch_size", "4", "--save_strategy", "no",
            "--report_to", "none", "--use_cpu", "true"]
    assert cli.main(argv) == 0
    assert batches and batches[0].tolist() == [1.0] * 4

    train, _ = preference_datasets(PreferenceDataArguments(dataset_name=str(data)), seed=0)
    assert "margin" not in train.column_names
    assert "margin column is not used by this stage" in caplog.text
