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


@pytest.mark.parametrize("command", ["eval", "chat-runtime", "export-llama"])
def test_a_tinyllm_folder_s_own_modeling_files_never_run(command, tiny_model_dir, tmp_path, capsys):
    """A Tinyllm folder ships modeling_tinyllm.py for remote-code users (auto_map); with the package installed the
    installed classes load it, so a tampered copy in the folder is never run."""
    from tinyllm_hf.inference.runtime import load_runtime

    folder = tmp_path / "tinyllm"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "code-ran"
    assert json.loads((folder / "config.json").read_text("utf-8"))["auto_map"]
    for name in ("configuration_tinyllm.py", "modeling_tinyllm.py"):
        path = folder / name
        path.write_text(f"open({str(marker)!r}, 'w').close()\n" + path.read_text("utf-8"), "utf-8")
    if command == "eval":
        assert tinyllm(COMMANDS["eval"](str(folder), tmp_path)) == 0
    elif command == "chat-runtime":
        assert load_runtime(folder).context_length == 256
    else:
        assert tinyllm(["export", "llama", str(folder), str(tmp_path / "llama")]) == 0
    assert not marker.exists()


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


# ---------------------------------------------------------------------------------------------------------------------
# Damaged checkpoints and final models are never trusted
# ---------------------------------------------------------------------------------------------------------------------


def write_checkpoint(folder, step: int):
    """A checkpoint folder with the files the Trainer writes: weights, optimizer, scheduler, RNG state, trainer state."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"embed.weight": torch.randn(16, 8), "norm.weight": torch.ones(8)}, folder / "model.safetensors")
    torch.save({"state": {0: {"exp_avg": torch.randn(16, 8)}}, "param_groups": [{"lr": 1e-3}]}, folder / "optimizer.pt")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    torch.save({"python": 1, "cpu": torch.random.get_rng_state()}, folder / "rng_state.pth")
    (folder / "config.json").write_text(json.dumps({"model_type": "tinyllm"}), "utf-8")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}), "utf-8")
    return folder


def truncate(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGES = {
    "empty weights": (lambda c: (c / "model.safetensors").write_bytes(b""), "model.safetensors: empty file"),
    "truncated weights": (lambda c: truncate(c / "model.safetensors", 0.8), "model.safetensors: truncated"),
    "weights cut inside the header": (lambda c: truncate(c / "model.safetensors", 0.02), "model.safetensors: truncated"),
    "garbage weights": (lambda c: (c / "model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"not json!" * 4),
                        "model.safetensors: its safetensors header does not parse"),
    "truncated optimizer": (lambda c: truncate(c / "optimizer.pt"), "optimizer.pt: not a complete torch.save"),
    "truncated rng state": (lambda c: truncate(c / "rng_state.pth", 0.9), "rng_state.pth: not a complete torch.save"),
    "corrupt trainer state": (lambda c: (c / "trainer_state.json").write_text('{"global_step": 2', "utf-8"),
                              "trainer_state.json: does not parse as JSON"),
    "trainer state without step": (lambda c: (c / "trainer_state.json").write_text("{}", "utf-8"),
                                   "trainer_state.json: no global_step"),
    "no trainer state": (lambda c: (c / "trainer_state.json").unlink(), "no trainer_state.json"),
    "no weights": (lambda c: (c / "model.safetensors").unlink(), "no model weights"),
}


def test_a_whole_checkpoint_passes(tmp_path):
    from tinyllm_hf.trainers.common import checkpoint_damage

    assert checkpoint_damage(write_checkpoint(tmp_path / "checkpoint-2", 2)) is None


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_falls_back_from_a_damaged_checkpoint_and_keeps_it(damage, tmp_path, caplog):
    """The newest checkpoint damaged in each way: --resume takes the previous one, warns naming the damaged one and
    why, and keeps it (renamed out of the Trainer's way, its files untouched)."""
    from transformers import TrainingArguments

    from tinyllm_hf.trainers.common import RunArguments, checkpoint_damage, resume_checkpoint

    damage_it, reason = DAMAGES[damage]
    good = write_checkpoint(tmp_path / "checkpoint-2", 2)
    bad = write_checkpoint(tmp_path / "checkpoint-4", 4)
    damage_it(bad)
    assert reason in checkpoint_damage(bad)
    files = {p.name: p.read_bytes() for p in bad.iterdir()}
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    with caplog.at_level("WARNING", logger="tinyllm_hf"):
        assert resume_checkpoint(args, RunArguments(resume=True)) == str(good)
    kept = tmp_path / "damaged-checkpoint-4"
    assert not bad.exists() and {p.name: p.read_bytes() for p in kept.iterdir()} == files
    warning = next(r.getMessage() for r in caplog.records if "damaged" in r.getMessage())
    assert str(bad) in warning and reason in warning and str(kept) in warning and str(good) in warning


def test_resume_with_no_whole_checkpoint_starts_over_and_keeps_them(tmp_path, caplog):
    from transformers import TrainingArguments

    from tinyllm_hf.trainers.common import RunArguments, resume_checkpoint

    truncate(write_checkpoint(tmp_path / "checkpoint-2", 2) / "model.safetensors")
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    with caplog.at_level("WARNING", logger="tinyllm_hf"):
        assert resume_checkpoint(args, RunArguments(resume=True)) is None
    assert (tmp_path / "damaged-checkpoint-2" / "model.safetensors").is_file()
    assert any("starting from step 0" in r.getMessage() for r in caplog.records)


def test_a_named_damaged_checkpoint_is_a_one_line_error(tmp_path):
    from transformers import TrainingArguments

    from tinyllm_hf.errors import UsageError
    from tinyllm_hf.trainers.common import RunArguments, resume_checkpoint

    bad = write_checkpoint(tmp_path / "checkpoint-4", 4)
    truncate(bad / "optimizer.pt")
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], resume_from_checkpoint=str(bad))
    with pytest.raises(UsageError, match=r"checkpoint-4 is damaged \(optimizer.pt: .*\): give another checkpoint"):
        resume_checkpoint(args, RunArguments())
    assert bad.is_dir()


def test_only_torch_save_bin_files_are_read_as_archives(tmp_path):
    """OpenVINO's weights are .bin files that are no zip archives: whole as far as this check can tell; a truncated
    torch.save .bin is damaged."""
    import torch

    from tinyllm_hf.runs import file_damage

    (tmp_path / "openvino_model.bin").write_bytes(b"\x01\x02raw weights")
    torch.save({"w": torch.zeros(64)}, tmp_path / "pytorch_model.bin")
    truncate(tmp_path / "pytorch_model.bin")
    assert file_damage(tmp_path / "openvino_model.bin") is None
    assert "not a complete torch.save archive" in file_damage(tmp_path / "pytorch_model.bin")


def test_sharded_weights_need_every_shard(tmp_path):
    from tinyllm_hf.runs import model_damage

    folder = write_checkpoint(tmp_path / "model", 1)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"embed.weight": "model-00001-of-00002.safetensors",
                            "norm.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index), "utf-8")
    assert "model-00002-of-00002.safetensors" in model_damage(folder)


def test_a_finished_stage_whose_model_was_damaged_runs_again(tmp_path, monkeypatch, capsys):
    """`tinyllm run` skips a stage with a stage.json only while the model it left is whole."""
    from tinyllm_hf import pipeline

    recipe = tmp_path / "r.yaml"
    recipe.write_text("output_dir: x\nsft: {}\n", "utf-8")
    run_dir = tmp_path / "run"
    ran = []

    def fake_sft(self):  # a training stage that leaves a whole model
        ran.append("sft")
        shutil.rmtree(run_dir / "sft" / "model", ignore_errors=True)
        write_checkpoint(run_dir / "sft" / "model", 3)
        for path in (run_dir / "sft" / "model").iterdir():
            path.replace(run_dir / "sft" / path.name)

    monkeypatch.setattr(pipeline.Pipeline, "sft", fake_sft)
    assert pipeline.main(["--config", str(recipe), "--output_dir", str(run_dir)]) == 0
    assert ran == ["sft"]
    assert pipeline.main(["--config", str(recipe), "--output_dir", str(run_dir)]) == 0
    assert ran == ["sft"] and "done already" in capsys.readouterr().out
    truncate(run_dir / "sft" / "model.safetensors")
    assert pipeline.main(["--config", str(recipe), "--output_dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert ran == ["sft", "sft"] and "its output is damaged" in out and "model.safetensors: truncated" in out


# ---------------------------------------------------------------------------------------------------------------------
# A stage never outlives the pipeline
# ---------------------------------------------------------------------------------------------------------------------

# A pipeline in miniature: it runs one stage through the pipeline's own launcher and logger. The stage starts a
# grandchild in its process group, prints both ids, and sleeps.
MINI_PIPELINE = """
import sys
from tinyllm_hf.pipeline import run_stage_process, signals_as_exit

stage = '''
import os, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(os.getpid(), grandchild.pid, flush=True)
time.sleep(120)
'''
with open(sys.argv[1], "w") as log, signals_as_exit():
    run_stage_process([sys.executable, "-c", stage], log)
"""


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by whoever adopted it, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def start_mini_pipeline(tmp_path):
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    parent = subprocess.Popen([sys.executable, "-c", MINI_PIPELINE, str(tmp_path / "stage.log")],
                              stdout=subprocess.PIPE, text=True, env=env)
    stage_pid, grandchild_pid = map(int, parent.stdout.readline().split())
    assert alive(stage_pid) and alive(grandchild_pid)
    return parent, stage_pid, grandchild_pid


def gone_within(pids, seconds: float) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(alive(pid) for pid in pids)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_the_stage_dies_when_the_pipeline_is_killed_9(tmp_path):
    import os
    import signal

    parent, stage_pid, grandchild_pid = start_mini_pipeline(tmp_path)
    try:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert gone_within([stage_pid, grandchild_pid], 5), "a stage process outlived the pipeline killed with -9"
    finally:
        for pid in (stage_pid, grandchild_pid):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT"])
def test_an_interrupted_pipeline_stops_the_stage_s_whole_process_group(how, tmp_path):
    import os
    import signal

    parent, stage_pid, grandchild_pid = start_mini_pipeline(tmp_path)
    try:
        os.kill(parent.pid, getattr(signal, how))
        assert parent.wait(timeout=20) != 0
        assert gone_within([stage_pid, grandchild_pid], 5), "a stage process outlived the interrupted pipeline"
    finally:
        for pid in (stage_pid, grandchild_pid):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------------------------
# A killed export's temporaries are removed by the next one, a running export's never
# ---------------------------------------------------------------------------------------------------------------------

# A writer of OUTPUT that has written part of its file and then waits: as an export is when it is killed.
WRITER = """
import sys, time
from tinyllm_hf.runs import atomic_output

with atomic_output(sys.argv[1]) as staged:
    staged.write_bytes(b"half a GGUF file")
    print(staged.parent, flush=True)
    time.sleep(120)
"""


def start_writer(output):
    import os
    import subprocess
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(output)], stdout=subprocess.PIPE, text=True, env=env)
    return writer, Path(writer.stdout.readline().strip())


def test_the_next_export_removes_a_killed_export_s_temporaries_but_not_a_running_one_s(tiny_model_dir, tmp_path):
    pytest.importorskip("gguf")
    from tinyllm_hf.export.gguf import export_gguf

    output = tmp_path / "model-f16.gguf"
    running, running_scratch = start_writer(output)
    killed, killed_scratch = start_writer(output)
    killed.kill()
    killed.wait()
    try:
        assert killed_scratch.is_dir() and running_scratch.is_dir()
        assert export_gguf(tiny_model_dir, output) == output and output.read_bytes()[:4] == b"GGUF"
        assert not killed_scratch.exists(), "the killed export's temporaries were left"
        assert (running_scratch / output.name).read_bytes() == b"half a GGUF file", "a running export was disturbed"
    finally:
        running.kill()
        running.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([output.name, running_scratch.name])


def test_scratch_without_an_owner_is_removed_only_once_it_is_old(tmp_path):
    import os
    import time

    from tinyllm_hf.runs import UNOWNED_SCRATCH_GRACE_SECONDS, remove_stale_scratch

    target = tmp_path / "out"
    fresh, old = tmp_path / ".out.tmp-fresh", tmp_path / ".out.tmp-old"
    fresh.mkdir()
    old.mkdir()
    long_ago = time.time() - 2 * UNOWNED_SCRATCH_GRACE_SECONDS
    os.utime(old, (long_ago, long_ago))
    assert remove_stale_scratch(target) == [old] and fresh.is_dir()


def test_a_stage_s_output_and_exit_status_pass_through_its_guard(tmp_path, capsys):
    from tinyllm_hf.pipeline import run_stage_process

    log_path = tmp_path / "stage.log"
    with log_path.open("w") as log:
        status = run_stage_process([sys.executable, "-c", "print('训练中'); raise SystemExit(3)"], log)
    assert status == 3 and log_path.read_text() == "训练中\n" and "训练中" in capsys.readouterr().out
