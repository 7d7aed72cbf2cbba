"""The `tinyllm` command tree: one error model (a TinyllmError is one stderr line and exit code 1, a usage error 2)
and help that does not import torch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinyllm_hf import cli
from tinyllm_hf.errors import (
    APIError,
    ConversionError,
    EngineOverloaded,
    MissingDependencyError,
    MissingFileError,
    OutputExistsError,
    TinyllmError,
    UsageError,
)

REPO = Path(__file__).resolve().parents[1]

# Commands whose --help still imports torch, and why. The training stages build their help from TRL's and
# transformers' config dataclasses, whose modules import torch (transformers.training_args does whenever torch is
# installed); eval's parser module imports the scoring code at its top.
HELP_IMPORTS_TORCH = {
    "pretrain": "TrainingArguments (transformers.training_args imports torch)",
    "pretokenize": "the pretrain recipe's TrainingArguments (it reads the same recipe)",
    "sft": "trl.SFTConfig", "dpo": "trl.DPOConfig", "reward": "trl.RewardConfig", "grpo": "trl.GRPOConfig",
    "rloo": "trl.RLOOConfig", "kto": "trl.KTOConfig", "orpo": "trl.experimental ORPOConfig",
    "distill": "trl.experimental GKDConfig",
}
HELP_ARGV = [[]] + [[name] for name in cli.COMMANDS] + [
    ["tokenizer", "train"], ["tokenizer", "extend"], ["export", "llama"], ["export", "qwen2-moe"], ["export", "gguf"],
    ["quantize", "drift"],
]


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("argv", [a for a in HELP_ARGV if not a or a[0] not in HELP_IMPORTS_TORCH], ids=" ".join)
def test_help_does_not_import_torch(argv):
    code = ("import contextlib, io, sys\nfrom tinyllm_hf.cli import main\nout = io.StringIO()\n"
            "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
            "    main(sys.argv[1:] + ['--help'])\n"
            "assert 'usage:' in out.getvalue(), out.getvalue()\n"
            "print(sorted(m for m in ('torch', 'transformers.modeling_utils') if m in sys.modules))")
    result = run_python(code, *argv)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_importing_the_package_registers_the_auto_classes_without_torch(tmp_path):
    code = ("import sys\nimport tinyllm_hf\nassert 'torch' not in sys.modules\n"
            "from transformers import AutoConfig, AutoModelForCausalLM\n"
            "from tinyllm_hf import TinyllmConfig, TinyllmForCausalLM\n"
            "assert type(AutoConfig.for_model('tinyllm')) is TinyllmConfig\n"
            "config = TinyllmConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,\n"
            "                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)\n"
            "TinyllmForCausalLM(config).save_pretrained(sys.argv[1])\n"
            "print(type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__name__)")
    result = run_python(code, str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "TinyllmForCausalLM"
    assert json.loads((tmp_path / "m" / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
    assert (tmp_path / "m" / "modeling_tinyllm.py").is_file()


def test_errors_keep_the_builtin_types_callers_catch():
    assert issubclass(UsageError, ValueError) and issubclass(ConversionError, ValueError)
    assert issubclass(MissingFileError, FileNotFoundError) and issubclass(OutputExistsError, FileExistsError)
    assert issubclass(MissingDependencyError, ImportError) and issubclass(EngineOverloaded, RuntimeError)
    assert str(MissingFileError("x not found")) == "x not found"
    assert APIError(429, "slow down").body()["error"]["message"] == "slow down"


def test_a_tinyllm_error_is_one_line_and_exit_code_1(capsys):
    def fails(argv):
        raise ConversionError("cannot express this; export it with `tinyllm export qwen2-moe`")

    assert cli.run_command("tinyllm export", fails, []) == TinyllmError.exit_code == 1
    assert capsys.readouterr().err == (
        "tinyllm export: error: cannot express this; export it with `tinyllm export qwen2-moe`\n")

    def crashes(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):  # a bug is not a user error: it keeps its traceback
        cli.run_command("tinyllm export", crashes, [])


@pytest.mark.parametrize("argv, message", [
    (["run", "--config", "{tmp}/missing.yaml"], "pipeline recipe not found"),
    (["tokenizer", "extend", "--base", "gpt2", "--num-new-tokens", "3", "--output", "{tmp}/t", "--model", "gpt2"],
     "--model and --model-output go together"),
    (["tokenizer", "train", "--corpus", "{tmp}/latin1.txt", "--vocab-size", "300", "--output", "{tmp}/t"],
     "latin1.txt"),
    (["export", "llama", "{tmp}/missing", "{tmp}/out"], "is not a model directory"),
    (["export", "gguf", "--model", "{tmp}/missing", "--output", "{tmp}/m.gguf"], "config.json not found"),
    (["quantize", "--model", "{tmp}/missing", "--method", "onnx", "--output", "{tmp}/q"], "config.json not found"),
    (["quantize", "drift", "--model", "{tmp}/missing", "--output", "{tmp}/d.md"], "missing"),
    (["pretrain", "--config", "{tmp}/missing.yaml"], "recipe file not found"),
    (["sft", "--config", "{tmp}/missing.yaml"], "recipe file not found"),
    (["merge", "--adapter", "{tmp}", "--output", "{tmp}/m"], "not a PEFT adapter folder"),
    (["chat", "--model", "{tmp}/missing"], "model folder not found"),
    (["serve", "--model", "{tmp}/missing"], "not found"),
    (["push", "--model", "{tmp}/missing", "--repo-id", "a/b", "--dry-run", "{tmp}/o"], "no config.json"),
], ids=lambda v: " ".join(v[:2]) if isinstance(v, list) else None)
def test_bad_input_gives_one_line_error_and_exit_code_1(argv, message, tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"tinyllm {argv[0]}: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_usage_errors_keep_argparse_exit_code_2(capsys):
    assert cli.main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err
    for argv in (["export"], ["export", "gguf"], ["tokenizer", "train"], ["quantize", "--model", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in cli.COMMANDS)


def test_tokenizer_help_defaults_match_the_trainer():
    from tinyllm_hf.tokenizer.train import DEFAULT_MAX_TRAIN_CHARS, DEFAULT_MODEL_MAX_LENGTH, DEFAULT_VOCAB_SIZE

    args = cli.tokenizer_parser().parse_args(["train", "--output", "x"])
    assert (args.vocab_size, args.model_max_length, args.max_train_chars) == (
        DEFAULT_VOCAB_SIZE, DEFAULT_MODEL_MAX_LENGTH, DEFAULT_MAX_TRAIN_CHARS)


def test_module_entry_points_print_the_same_one_line_error(tmp_path):
    """`python -m tinyllm_hf.trainers.sft` (and so `accelerate launch -m ...`) goes through the same wrapper."""
    for module, prog in (("tinyllm_hf.trainers.sft", "tinyllm sft"), ("tinyllm_hf.pipeline", "tinyllm run")):
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        result = subprocess.run([sys.executable, "-m", module, "--config", str(tmp_path / "missing.yaml")],
                                capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 1
        assert result.stderr.splitlines()[-1].startswith(f"{prog}: error: ") and "Traceback" not in result.stderr
