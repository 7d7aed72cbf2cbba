"""What loading and resuming guarantee: no command runs code a model folder ships unless --trust-remote-code is given;
a damaged checkpoint or final model is never trusted; a killed pipeline takes its stage with it; a killed export's
temporaries are cleaned up; a staged release is readable by everyone."""

import json
import shutil
import sys

import pytest

from tinyllm_hf.cli import main as tinyllm

# ---------------------------------------------------------------------------------------------------------------------
# Remote code is opt-in
# ---------------------------------------------------------------------------------------------------------------------

PLANTED_MODULE = """open({marker!r}, "w").close()  # proof that this file ran

from tinyllm_hf import TinyllmConfig, TinyllmForCausalLM
from transformers import PreTrainedTokenizerFast


class Config(TinyllmConfig):
    model_type = "custom-untrusted"


class Model(TinyllmForCausalLM):
    config_class = Config


class Tokenizer(PreTrainedTokenizerFast):
    pass
"""


def plant(source, folder, marker, where: str):
    """A copy of the model folder `source` whose `where` ("model": config.json, "tokenizer": tokenizer_config.json)
    maps its Auto class to a module in the folder that writes `marker` when it is imported."""
    shutil.copytree(source, folder)
    (folder / "custom_model.py").write_text(PLANTED_MODULE.format(marker=str(marker)), "utf-8")
    if where == "model":
        path = folder / "config.json"
        config = json.loads(path.read_text("utf-8"))
        config.update(model_type="custom-untrusted", auto_map={"AutoConfig": "custom_model.Config",
                                                               "AutoModelForCausalLM": "custom_model.Model"})
    else:  # a Tinyllm model whose tokenizer is custom code: the commands that check the model type accept it
        path = folder / "tokenizer_config.json"
        config = json.loads(path.read_text("utf-8"))
        config.update(tokenizer_class="Tokenizer", auto_map={"AutoTokenizer": ["custom_model.Tokenizer", None]})
    path.write_text(json.dumps(config), "utf-8")
    return folder


@pytest.fixture(params=["model", "tokenizer"])
def planted(request, tiny_model_dir, tmp_path):
    """(folder with planted code, the marker its code would write)."""
    marker = tmp_path / "code-ran"
    return plant(tiny_model_dir, tmp_path / f"custom-{request.param}", marker, request.param), marker


def failed_in_one_line(argv: list[str], capsys) -> str:
    """Run `tinyllm ARGV`; assert it failed with exit code 1 and a one-line error (no traceback); return that line."""
    assert tinyllm(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    line = err.splitlines()[-1]  # earlier lines, if any, are progress bars of the work done before loading
    assert line.startswith("tinyllm ") and ": error: " in line and err.count(": error: ") == 1, err
    return line


def refused(argv: list[str], marker, capsys) -> str:
    """`failed_in_one_line`, naming --trust-remote-code, and no planted code ran."""
    line = failed_in_one_line(argv, capsys)
    assert not marker.exists(), "the folder's code ran without --trust-remote-code"
    assert "--trust-remote-code" in line, line
    return line


TEXTS = "今天天气很好，我们去公园散步。\n这本书写得很好，值得一读。\n"


def text_file(folder):
    path = folder / "texts.txt"
    path.write_text(TEXTS, "utf-8")
    return path


COMMANDS = {
    "eval": lambda m, out: ["eval", "--model", m, "--tasks", "ppl", "--text-file", str(text_file(out)), "--output",
                            f"{out}/r.json", "--no-progress"],
    "chat": lambda m, out: ["chat", "--model", m],
    "serve": lambda m, out: ["serve", "--model", m],
    "demo": lambda m, out: ["demo", "--model", m],
    "sft": lambda m, out: ["sft", "--model_name_or_path", m, "--output_dir", f"{out}/sft", "--report_to", "none"],
    "dpo": lambda m, out: ["dpo", "--model_name_or_path", m, "--output_dir", f"{out}/dpo", "--report_to", "none"],
    "merge": lambda m, out: ["merge", "--adapter", str(adapter_for(m, out)), "--output", f"{out}/merged"],
    "quantize": lambda m, out: ["quantize", "--model", m, "--method", "quanto-int8", "--output", f"{out}/q"],
    "drift": lambda m, out: ["quantize", "drift", "--model", m, "--output", f"{out}/drift.md", "--tasks", "0"],
    "export-gguf": lambda m, out: ["export", "gguf", "--model", m, "--output", f"{out}/m.gguf"],
    "tokenizer-extend": lambda m, out: ["tokenizer", "extend", "--base", m, "--corpus", str(text_file(out)),
                                        "--num-new-tokens", "8", "--min-frequency", "1", "--output", f"{out}/tok",
                                        "--model", m, "--model-output", f"{out}/resized"],
}
# Commands that accept only Tinyllm or Llama checkpoints refuse another model type before loading anything; their
# remote-code risk is the tokenizer.
TINYLLM_ONLY = {"quantize", "drift", "export-gguf"}
# `merge` loads the base model first, then the adapter (this test has none to give): only the model case applies.
MODEL_ONLY = {"merge"}


def adapter_for(base: str, folder):
    """An adapter folder naming `base` as its base model (no weights: loading the base comes first)."""
    adapter = folder / "adapter"
    adapter.mkdir(exist_ok=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}), "utf-8")
    return adapter


@pytest.mark.parametrize("command", COMMANDS)
def test_no_command_runs_code_from_a_model_folder_without_the_flag(command, planted, tmp_path, capsys):
    folder, marker = planted
    kind = folder.name.removeprefix("custom-")
    if command in MODEL_ONLY and kind == "tokenizer":
        pytest.skip(f"{command} loads the tokenizer after the adapter, which this test does not build")
    if command in TINYLLM_ONLY and kind == "model":
        failed_in_one_line(COMMANDS[command](str(folder), tmp_path), capsys)  # refused for what it is
        assert not marker.exists()
        return
    refused(COMMANDS[command](str(folder), tmp_path), marker, capsys)


def test_the_flag_lets_the_folder_code_run(tiny_model_dir, tmp_path, capsys):
    """With --trust-remote-code the planted classes are the ones loaded: eval imports the module and evaluates."""
    marker = tmp_path / "code-ran"
    folder = plant(tiny_model_dir, tmp_path / "custom", marker, "model")
    argv = ["eval", "--model", str(folder), "--tasks", "ppl", "--text-file", str(text_file(tmp_path)), "--output",
            str(tmp_path / "r.json"), "--no-progress", "--device", "cpu", "--trust-remote-code"]
    assert tinyllm(argv) == 0, capsys.readouterr().err
    assert marker.exists()
    assert json.loads((tmp_path / "r.json").read_text("utf-8"))["tasks"]["ppl"]["n_texts"] == 2


def test_runtime_loaders_pass_the_flag_through(tiny_model_dir, tmp_path):
    """serve, demo and the drift table load through `load_backend` / `load_runtime`: off by default, on when asked."""
    from tinyllm_hf.errors import UsageError
    from tinyllm_hf.inference.runtime import load_backend, load_runtime

    marker = tmp_path / "code-ran"
    folder = plant(tiny_model_dir, tmp_path / "custom", marker, "tokenizer")
    with pytest.raises(UsageError, match="--trust-remote-code"):
        load_runtime(folder)
    assert not marker.exists()
    runtime = load_backend("transformers", folder, trust_remote_code=True)
    assert marker.exists() and type(runtime.tokenizer).__name__ == "Tokenizer"


def test_every_loading_command_offers_the_flag(capsys):
    """One shared option: each command's --help lists --trust-remote-code."""
    helps = [["eval"], ["chat"], ["serve"], ["demo"], ["merge"], ["quantize"], ["quantize", "drift"],
             ["export", "gguf"], ["tokenizer", "extend"], ["pretrain"], ["sft"], ["dpo"], ["kto"], ["orpo"],
             ["reward"], ["grpo"], ["rloo"]]
    for argv in helps:
        with pytest.raises(SystemExit):
            tinyllm([*argv, "--help"])
        assert "--trust-remote-code" in capsys.readouterr().out.replace("--trust_remote_code", "--trust-remote-code"), argv
