"""`tinyllm run`: every stage of a recipe in order, from raw text to a staged Hub release and a report.

    tinyllm run --config recipes/quickstart.yaml [--output_dir runs/NAME] [--only sft] [--from-stage eval]
    tinyllm run --config recipes/92m.yaml --check     # only check what the stages need (tinyllm_hf.preflight)

Each stage runs its own command (`tinyllm tokenizer`, `tinyllm pretrain`, ...) in a subprocess with the same recipe
entries, writes into `OUTPUT_DIR/<stage>/` and, when it succeeds, a `stage.json` summary. A stage whose summary exists
is skipped, unless the model it left has been damaged since (`output_damage`), so an interrupted run continues where
it stopped (training stages also resume from their last whole checkpoint). Every stage can be run alone with the
command printed in its log. A stage runs in its own process group, which is stopped when the pipeline is interrupted
(Ctrl-C, SIGTERM, an error) and, on Linux, dies with the pipeline even when that is killed with -9.

The recipe names every choice: a top-level `output_dir`, then one mapping per stage, in the order of STAGES. A stage
missing from the recipe is not run. Training stages take `recipe:` (their own YAML recipe) and `args:` (overrides).
A top-level `accelerate:` mapping runs the training stages under `accelerate launch` with those flags (for example
`{config_file: recipes/accelerate/deepspeed_zero2.yaml, num_processes: 8}`); a stage's own `accelerate:` replaces it
for that stage, and `accelerate: false` runs that stage as a plain process.

Several machines sharing the run folder (a shared filesystem) run the same `tinyllm run` command, each with its own
`--node-rank` (`--num-nodes`, `--main-process-ip`, `--main-process-port`; by default from NODE_RANK / SLURM_NODEID,
SLURM_JOB_NUM_NODES, MASTER_ADDR, MASTER_PORT). A training stage under `accelerate launch` runs on every machine,
with that machine's `--machine_rank`; every other stage (and a training stage whose `accelerate:` says
`num_machines: 1`, or is false) runs on node 0 alone while the others wait for its `stage.json`. Only node 0 writes
the run's records; node R > 0 logs into `<stage>/stage.node<R>.log`.
"""

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tinyllm_hf.errors import PipelineError, UsageError
from tinyllm_hf.evaluation.benchmarks import BENCHMARKS
from tinyllm_hf.options import load_yaml_mapping
from tinyllm_hf.runs import (
    ALIGNED_STAGES,
    STAGES,
    TRAINER_STATE_FILE,
    TRAINING_STAGES,
    RunLayout,
    file_damage,
    model_damage,
    write_json,
)


def load_pipeline_recipe(path) -> dict:
    recipe = load_yaml_mapping(path, "pipeline recipe")
    unknown = sorted(set(recipe) - set(STAGES) - {"output_dir", "description", "accelerate"})
    if unknown:
        raise UsageError(f"unknown key(s) in {path}: {', '.join(unknown)}; stages are {', '.join(STAGES)}")
    return recipe


def as_flags(args: dict | None) -> list[str]:
    """{"max_steps": 10, "report_to": ["none"]} -> ["--max_steps", "10", "--report_to", "none"]."""
    flags = []
    for key, value in (args or {}).items():
        flags.append(f"--{key}")
        if isinstance(value, (list, tuple)):
            flags += [str(v) for v in value]
        elif isinstance(value, bool):
            flags.append(str(value).lower())
        else:
            flags.append(str(value))
    return flags


def launch_flags(flags: dict) -> list[str]:
    """`accelerate launch` flags: its booleans are switches, so {"cpu": True, "num_processes": 2} -> ["--cpu",
    "--num_processes", "2"] and a false switch is left out."""
    switches = [f"--{key}" for key, value in flags.items() if value is True]
    return switches + as_flags({key: value for key, value in flags.items() if not isinstance(value, bool)})


BENCHMARK_KEYS = ("run", "source", "ceval_dir", "cmmlu_dir", "base_shots", "chat_shots", "limit", "prompt_style")


def benchmark_flags(benchmarks: dict | None, base: bool) -> list[str]:
    """`tinyllm eval` flags for the recipe's `eval.benchmarks`: C-Eval and CMMLU from the folders it names, else
    downloaded (`source`), else recorded as skipped with the command to run them; few-shot for the base model."""
    if not benchmarks:
        return []
    unknown = sorted(set(benchmarks) - set(BENCHMARK_KEYS))
    if unknown:
        raise UsageError(f"unknown key(s) in eval.benchmarks: {', '.join(unknown)}; known: {', '.join(BENCHMARK_KEYS)}")
    wrong = sorted(set(benchmarks.get("run", BENCHMARKS)) - set(BENCHMARKS))
    if wrong:
        raise UsageError(f"eval.benchmarks.run names {', '.join(wrong)}; choose from {', '.join(BENCHMARKS)}")
    flags = ["--benchmark-source", benchmarks.get("source", "auto"), "--skip-unavailable",
             "--shots", str(benchmarks.get("base_shots" if base else "chat_shots", 5 if base else 0))]
    for name in BENCHMARKS:
        if benchmarks.get(f"{name}_dir"):
            flags += [f"--{name}-dir", str(benchmarks[f"{name}_dir"])]
    if benchmarks.get("limit"):
        flags += ["--limit", str(benchmarks["limit"])]
    if benchmarks.get("prompt_style"):
        flags += ["--prompt-style", benchmarks["prompt_style"]]
    return flags


# ---------------------------------------------------------------------------------------------------------------------
# Stage processes: each in its own process group, never outliving the pipeline
# ---------------------------------------------------------------------------------------------------------------------

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
STOP_GRACE_SECONDS = 10  # after SIGTERM, how long a stage's processes get to exit before SIGKILL


GUARD = "from tinyllm_hf.pipeline import guard_stage; guard_stage()"  # python -c GUARD COMMAND...


def _die_with(parent_pid: int) -> Callable[[], None]:
    """A `preexec_fn` for Linux: the kernel sends the child SIGTERM when the process that started it dies, even by
    kill -9."""
    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # the pipeline died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
    return preexec


def start_stage_process(command: list[str], **popen) -> subprocess.Popen:
    """Start a stage's command under `guard_stage`, the leader of a new session and process group holding every
    process the stage starts (accelerate's workers, data loaders): `stop_stage_process` reaches them all, and on
    Linux the guard is told to stop them when the pipeline dies, however it dies."""
    preexec = _die_with(os.getpid()) if sys.platform.startswith("linux") else None
    return subprocess.Popen([sys.executable, "-c", GUARD, *command], start_new_session=True, preexec_fn=preexec,
                            **popen)


def guard_stage() -> None:
    """The leader of a stage's process group: runs the command in sys.argv[1:] and exits with its status. On SIGTERM
    (from `stop_stage_process`, or from the kernel when the pipeline died) it sends SIGTERM to the whole group, and
    SIGKILL once the command has exited or STOP_GRACE_SECONDS have passed, so no process of the stage is left."""
    stop_requested = []

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group's SIGTERM reaches this process too
        stop_requested.append(time.monotonic())
        os.killpg(0, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    command = subprocess.Popen(sys.argv[1:])
    # wait() in short slices: a signal handler cannot wait on the child itself while the main code does.
    while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
            returncode = command.wait(timeout=0.2)
            break
        if stop_requested and time.monotonic() - stop_requested[0] > STOP_GRACE_SECONDS:
            break
    if stop_requested:
        os.killpg(0, signal.SIGKILL)  # what is left of the stage, this process included
    sys.exit(returncode if returncode >= 0 else 128 - returncode)


def stop_stage_process(process: subprocess.Popen) -> None:
    """SIGTERM to the stage's whole process group, then SIGKILL to what is left after STOP_GRACE_SECONDS."""
    if process.poll() is not None:  # exited: its group id may no longer be its own
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def run_stage_process(command: list[str], log) -> int:
    """Run `command` (see `start_stage_process`), copying its output to the console and the open file `log`; its
    exit status. If the pipeline is interrupted meanwhile (an exception, Ctrl-C, SIGTERM: see `signals_as_exit`),
    the stage's processes are stopped before the exception goes on."""
    process = start_stage_process(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
        return process.wait()
    finally:
        stop_stage_process(process)
        process.stdout.close()


@contextlib.contextmanager
def signals_as_exit():
    """While the block runs, SIGTERM and SIGHUP raise SystemExit (128 + signal) instead of ending the process at once,
    so that `run_stage_process` stops the running stage on the way out."""
    def leave(signum, frame):
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------------------------
# Several machines: which stages each runs, and how the others wait for node 0
# ---------------------------------------------------------------------------------------------------------------------

NODE_RANK_ENV = ("NODE_RANK", "SLURM_NODEID")  # what torchrun-style launchers and SLURM set on each machine
NUM_NODES_ENV = ("NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES")
NODE_POLL_SECONDS = 2  # how often a waiting node looks for node 0's stage.json
NODE_WAIT_REPORT_SECONDS = 300  # how often it says that it is still waiting
STAGE_FAILED_FILE = "stage.failed"  # node 0 writes it into a stage's folder when the stage fails


def env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value:
            try:
                return int(value)
            except ValueError:
                raise UsageError(f"environment variable {name}={value!r} must be a whole number") from None
    return default


@dataclass(frozen=True)
class Nodes:
    """The machines running one pipeline together on a shared run folder, and which of them this process is."""

    count: int = 1
    rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int = 29500

    def __post_init__(self):
        if self.count < 1:
            raise UsageError(f"--num-nodes must be at least 1, not {self.count}")
        if self.count == 1 and self.rank != 0:
            raise UsageError(f"--node-rank {self.rank} (or NODE_RANK / SLURM_NODEID) needs several nodes: give "
                             "--num-nodes, or node rank 0 on a single machine")
        if not 0 <= self.rank < self.count:
            raise UsageError(f"--node-rank {self.rank} is not one of the {self.count} nodes: give 0 to {self.count - 1}")
        if self.count > 1 and not self.main_process_ip:
            raise UsageError(f"--num-nodes {self.count} needs --main-process-ip: the address of node 0, which every "
                             "node's training processes connect to (or set MASTER_ADDR)")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def launch_flags(self) -> dict:
        """The `accelerate launch` flags that place this machine's processes in a job over all nodes."""
        return {"num_machines": self.count, "machine_rank": self.rank, "main_process_ip": self.main_process_ip,
                "main_process_port": self.main_process_port}


class Pipeline:
    def __init__(self, recipe: dict, output_dir: Path, recipe_path: Path, nodes: Nodes = Nodes()):
        self.recipe = recipe
        self.layout = RunLayout(output_dir)
        self.recipe_path = recipe_path
        self.nodes = nodes

    # ---------------------------------------------------------------- helpers

    def configured(self, stage: str) -> bool:
        return stage in self.recipe and self.recipe[stage] is not None

    def chat_model(self) -> Path:
        for stage in ALIGNED_STAGES:
            if self.configured(stage):
                return self.layout.stage_dir(stage)
        return self.layout.stage_dir("sft") if self.configured("sft") else self.layout.stage_dir("pretrain")

    def launch_entry(self, stage: str):
        """The stage's own `accelerate:` entry, else the recipe's (None when there is neither)."""
        entry = self.recipe[stage] or {}
        return entry["accelerate"] if "accelerate" in entry else self.recipe.get("accelerate")

    def launcher(self, stage: str) -> dict | None:
        """The `accelerate launch` flags for a training stage: its own `accelerate:` entry, else the recipe's, with
        this node's place among several (`Nodes.launch_flags`) when the stage spans them."""
        flags = self.launch_entry(stage)
        if flags is None or flags is False:
            return None
        if not isinstance(flags, dict):
            raise UsageError(f"accelerate: for {stage} must be a mapping of `accelerate launch` flags or false, "
                             f"not {flags!r}")
        if self.spans_nodes(stage, flags):
            if flags.get("num_machines", self.nodes.count) != self.nodes.count:
                raise UsageError(f"accelerate: for {stage} sets num_machines {flags['num_machines']}, but "
                                 f"--num-nodes is {self.nodes.count}: give 1 (node 0 alone) or leave it out")
            flags = {**flags, **self.nodes.launch_flags()}
        return flags

    def spans_nodes(self, stage: str, flags: dict | None) -> bool:
        """Whether every node runs this stage: a training stage under `accelerate launch` that does not ask for one
        machine (`num_machines: 1`), when there are several nodes."""
        return (self.nodes.count > 1 and stage in TRAINING_STAGES and isinstance(flags, dict)
                and flags.get("num_machines") != 1)

    def runs_here(self, stage: str) -> bool:
        """Whether this node runs `stage` (node 0 runs every stage; the others only those spanning the nodes)."""
        return self.nodes.is_main or self.spans_nodes(stage, self.launch_entry(stage))

    def wait_for_main_node(self, stage: str, started: float) -> None:
        """On a node other than 0: wait until node 0 has finished `stage` (its stage.json, with whole outputs), or
        stop when node 0 reports the stage failed (its stage.failed, written after `started`, this node's start time
        on the run folder's clock)."""
        summary, failed = self.layout.summary(stage), self.layout.stage_dir(stage) / STAGE_FAILED_FILE
        print(f"[{stage}] node {self.nodes.rank}: waiting for node 0 to finish it ({summary})", flush=True)
        waited, reported = time.monotonic(), time.monotonic()
        while not (self.layout.done(stage) and self.output_damage(stage) is None):
            with contextlib.suppress(FileNotFoundError):
                if failed.stat().st_mtime >= started:
                    error = json.loads(failed.read_text("utf-8"))["error"]
                    raise PipelineError(f"stage {stage} failed on node 0 ({error}); see node 0's output")
            if time.monotonic() - reported > NODE_WAIT_REPORT_SECONDS:
                print(f"[{stage}] node {self.nodes.rank}: still waiting for node 0 "
                      f"({time.monotonic() - waited:.0f} s)", flush=True)
                reported = time.monotonic()
            time.sleep(NODE_POLL_SECONDS)

    def run_command(self, stage: str, args: list[str], accelerate: dict | None = None) -> None:
        """Run `tinyllm <args>` for a stage, or with `accelerate` flags `accelerate launch <flags> -m
        tinyllm_hf.trainers.<stage> <args after the stage name>`, streaming its output to the console and the log."""
        if accelerate is None:
            command = [sys.executable, "-m", "tinyllm_hf.cli", *args]
            printable = " ".join(["tinyllm", *args])
        else:
            launch = [*launch_flags(accelerate), "-m", f"tinyllm_hf.trainers.{args[0]}", *args[1:]]
            command = [sys.executable, "-m", "accelerate.commands.launch", *launch]
            printable = " ".join(["accelerate", "launch", *launch])
        log_path = self.layout.log(stage)
        if not self.nodes.is_main:  # the same stage runs on every node: one log each
            log_path = log_path.with_name(f"{log_path.stem}.node{self.nodes.rank}{log_path.suffix}")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        print(f"[{stage}] $ {printable}", flush=True)
        with log_path.open("a", encoding="utf-8") as log:
            log.write(f"$ {printable}\n")
            log.flush()
            returncode = run_stage_process(command, log)
        if returncode != 0:
            raise PipelineError(f"stage {stage} failed (exit {returncode}); see {log_path}")

    def run_training(self, stage: str, **paths) -> None:
        self.run_command(stage, [stage, *self.training_args(stage, **paths)], self.launcher(stage))

    def training_args(self, stage: str, **paths) -> list[str]:
        entry = self.recipe[stage]
        args = []
        if entry.get("recipe"):
            args += ["--config", str(entry["recipe"])]
        args += as_flags({**paths, "output_dir": self.layout.stage_dir(stage), "resume": True,
                          "include_num_input_tokens_seen": True, **(entry.get("args") or {})})
        return args

    # ---------------------------------------------------------------- stages

    def tokenizer(self):
        entry = self.recipe["tokenizer"]
        output = self.layout.tokenizer
        args = ["tokenizer", "train", "--corpus", str(entry.get("corpus", "default")), "--output", str(output)]
        if entry.get("corpus_config"):
            args += ["--corpus-config", str(entry["corpus_config"])]
        if entry.get("vocab_size"):
            args += ["--vocab-size", str(entry["vocab_size"])]
        if entry.get("max_train_chars") is not None:  # 0: the whole corpus
            args += ["--max-train-chars", str(entry["max_train_chars"])]
        if output.exists():
            args.append("--overwrite")  # a tokenizer without stage.json is incomplete: train it again
        self.run_command("tokenizer", args)

    def pretrain(self):
        paths = {"tokenizer_name_or_path": self.layout.tokenizer}
        if self.stage_setting("pretrain", "tokenized_dataset"):
            # Tokenized once, by one plain process, before the training processes start (launched, they would all
            # wait for rank 0 meanwhile). In the run's own folder (unless `args:` names another), where blocks made
            # with an earlier tokenizer are rebuilt.
            paths["tokenized_dataset"] = self.layout.pretokenized
            own = "tokenized_dataset" not in (self.recipe["pretrain"].get("args") or {})
            # On several nodes only node 0 builds the shared folder; the other nodes' training processes wait for
            # it in the launch's rendezvous, and read it once node 0's processes have opened it.
            if self.nodes.is_main:
                self.run_command("pretrain", ["pretokenize", *self.training_args("pretrain", **paths),
                                              *(["--overwrite"] if own else [])])
        self.run_training("pretrain", **paths)

    def stage_setting(self, stage: str, key: str):
        """A key of a training stage as the stage will see it: its `args:` entry, else its own recipe's."""
        entry = self.recipe[stage] or {}
        if key in (entry.get("args") or {}):
            return entry["args"][key]
        return load_yaml_mapping(entry["recipe"], "recipe file").get(key) if entry.get("recipe") else None

    def distill(self):
        # Optional, beside the main line: a student distilled from the model this run pretrained (with the run's
        # tokenizer), written to RUN/distill. The stage's `args:` name another teacher or tokenizer (they come last).
        paths = {}
        if self.configured("pretrain"):
            paths["teacher_model_name_or_path"] = self.layout.stage_dir("pretrain")
        if self.configured("tokenizer"):
            paths["tokenizer_name_or_path"] = self.layout.tokenizer
        self.run_training("distill", **paths)

    def sft(self):
        self.run_training("sft", model_name_or_path=self.layout.stage_dir("pretrain"))

    def reward(self):
        self.run_training("reward", model_name_or_path=self.layout.stage_dir("sft"))

    def dpo(self):
        self.run_training("dpo", model_name_or_path=self.layout.stage_dir("sft"))

    def grpo(self):
        paths = {"model_name_or_path": self.layout.stage_dir("sft")}
        if self.configured("reward"):
            paths["reward_model_path"] = self.layout.stage_dir("reward")
        self.run_training("grpo", **paths)

    def eval(self):
        entry = self.recipe["eval"]
        from tinyllm_hf.tasks import heldout_task_records, parse_task_sizes, write_task_file

        tasks_file = self.layout.eval_tasks
        # Only the tasks named in task_sizes: a task left out would otherwise contribute every held-out item.
        sizes = parse_task_sizes(entry.get("task_sizes"))
        write_task_file(heldout_task_records(tasks=list(sizes) or None, sizes=sizes), tasks_file)
        models = [s for s in entry.get("models", ["pretrain", "sft", *ALIGNED_STAGES]) if self.configured(s)]
        for model_stage in models:
            # Base models are scored by option likelihood, chat models by their generated answers.
            mode = "ppl" if model_stage == "pretrain" else entry.get("chat_mode", "gen")
            tasks = entry.get("base_tasks", "ppl") if model_stage == "pretrain" else entry.get("tasks", "ppl,tasks")
            if entry.get("benchmarks"):
                asked = tasks.split(",")
                tasks = ",".join(asked + [b for b in entry["benchmarks"].get("run", BENCHMARKS) if b not in asked])
            base = model_stage == "pretrain"
            args = ["eval", "--model", str(self.layout.stage_dir(model_stage)), "--tasks", tasks, "--mode", mode,
                    "--tasks-file", str(tasks_file), "--output", str(self.layout.eval_results(model_stage))]
            args += benchmark_flags(entry.get("benchmarks"), base)
            args += as_flags(entry.get("args"))
            self.run_command("eval", args)

    def gguf_files(self) -> list[Path]:
        if not self.configured("gguf"):
            return []
        return [self.layout.gguf_file(t) for t in self.gguf_outtypes()]

    def gguf_outtypes(self) -> list[str]:
        return self.recipe["gguf"].get("outtypes", ["f16"])

    def gguf(self):
        for outtype in self.gguf_outtypes():
            path = self.layout.gguf_file(outtype)
            self.run_command("gguf", ["export", "gguf", "--model", str(self.chat_model()), "--outtype", outtype,
                                      "--output", str(path)])

    def quantize(self):
        entry = self.recipe["quantize"]
        variants = []
        for method in entry.get("methods", []):
            target = self.layout.stage_dir("quantize") / method
            shutil.rmtree(target, ignore_errors=True)
            self.run_command("quantize", ["quantize", "--model", str(self.chat_model()), "--method", method,
                                          "--output", str(target)])
            variants.append(target)
        self.write_drift_table(entry.get("drift", {}), variants + self.gguf_files())

    def write_drift_table(self, settings, variants: list[Path]) -> None:
        """quantize/drift.md + drift.json: every variant against the chat model in fp32 (`drift: false` turns it off,
        a mapping sets `tinyllm quantize drift` options, e.g. `{tasks: 60, eval_chunks: 16}`)."""
        markdown, result = self.layout.drift_table, self.layout.drift_json
        for path in (markdown, result):
            path.unlink(missing_ok=True)  # never leave the report a table of older variants
        if settings is False or not variants:
            return
        if settings is True or settings is None:
            settings = {}
        if not isinstance(settings, dict):
            raise UsageError(f"quantize.drift must be a mapping of options or false, not {settings!r}")
        args = ["quantize", "drift", "--model", str(self.chat_model()), "--output", str(markdown),
                "--json", str(result)]
        for variant in variants:
            args += ["--variant", str(variant)]
        tasks_file = self.layout.eval_tasks  # the questions the eval stage asked
        if tasks_file.exists() and "tasks_file" not in settings:
            args += ["--tasks-file", str(tasks_file)]
        self.run_command("quantize", args + as_flags(settings))

    def release(self):
        entry = self.recipe["release"]
        staged = self.layout.staged_release
        shutil.rmtree(staged, ignore_errors=True)
        self.write_stage_records()
        # push finds the chat model's results in the run (eval/<stage>.json) itself.
        args = ["push", "--model", str(self.chat_model()), "--repo-id", entry.get("repo_id", "your-name/tinyllm-zh"),
                "--run-dir", str(self.layout.root), "--dry-run", str(staged)]
        if entry.get("license"):  # else the card derives it from the datasets the stages trained on
            args += ["--license", str(entry["license"])]
        ggufs = sorted(self.layout.stage_dir("gguf").glob("*.gguf"))
        if ggufs:
            args += ["--include-gguf", *map(str, ggufs)]
        self.run_command("release", args)

    def report(self):
        from tinyllm_hf.report import write_report

        write_report(self.layout, self.recipe, self.chat_model())

    # ---------------------------------------------------------------- bookkeeping

    def output_damage(self, stage: str) -> str | None:
        """Why the model a finished stage left (a training stage's model, the tokenizer, GGUF files, quantized
        variants) can no longer be used, e.g. truncated after the stage finished; None when it is whole."""
        if stage in TRAINING_STAGES:
            outputs = {self.layout.stage_dir(stage): True}
        elif stage == "tokenizer":
            outputs = {self.layout.tokenizer: False}
        elif stage == "gguf":
            outputs = {path: False for path in self.gguf_files()}
        elif stage == "quantize":
            outputs = {self.layout.stage_dir(stage) / m: False for m in self.recipe[stage].get("methods", [])}
        else:
            return None
        for path, needs_weights in outputs.items():
            damage = file_damage(path) if path.suffix == ".gguf" else model_damage(path, needs_weights)
            if damage is not None:
                return f"{path}: {damage}"
        return None

    def summarize(self, stage: str, seconds: float) -> dict:
        """What the report and the model card say about a stage, read from the files it wrote."""
        summary = {"stage": stage, "wall_time_s": round(seconds, 1), "recipe": None, "dataset": None, "steps": None,
                   "tokens": None, "final_loss": None}
        entry = self.recipe.get(stage) or {}
        if entry.get("recipe"):
            summary["recipe"] = str(entry["recipe"])
        state_path = self.layout.stage_dir(stage) / TRAINER_STATE_FILE
        if state_path.exists():
            state = json.loads(state_path.read_text("utf-8"))
            summary["steps"] = state.get("global_step")
            summary["tokens"] = state.get("num_input_tokens_seen") or None
            losses = [e["loss"] for e in state.get("log_history", []) if "loss" in e]
            summary["final_loss"] = losses[-1] if losses else None
            evals = [e["eval_loss"] for e in state.get("log_history", []) if "eval_loss" in e]
            if evals:
                summary["final_eval_loss"] = evals[-1]
        if stage in TRAINING_STAGES:
            from tinyllm_hf.trainers.common import load_recipe  # torch-heavy: only once a stage has run

            # The command line (args:) overrides the stage recipe, as in the stage itself.
            stage_recipe = load_recipe(entry["recipe"]) if entry.get("recipe") else {}
            dataset = (entry.get("args") or {}).get("dataset_name") or stage_recipe.get("dataset_name")
            summary["dataset"] = "default (embedded)" if dataset in (None, "default") else dataset
        return summary

    def write_stage_records(self) -> None:
        """tinyllm_stages.json in the run folder: the training stages for the model card, in order."""
        records = [json.loads(self.layout.summary(s).read_text("utf-8"))
                   for s in TRAINING_STAGES if self.layout.done(s)]
        write_json(self.layout.stage_records, records)

    def selected_stages(self, only: list[str] | None = None, from_stage: str | None = None) -> list[str]:
        stages = [s for s in STAGES if self.configured(s)]
        if from_stage:
            stages = stages[stages.index(from_stage):]
        if only:
            stages = [s for s in stages if s in only]
        return stages

    def preflight(self, stages: list[str]) -> list:
        """The checks of `tinyllm_hf.preflight` for `stages`: what each will need, found or not."""
        from tinyllm_hf.preflight import Preflight

        return Preflight(self.recipe, self.launcher).run(stages)

    def run(self, only: list[str] | None = None, from_stage: str | None = None, check: bool = True) -> None:
        if only and self.nodes.count > 1:
            raise UsageError("--only runs finished stages again, which several nodes cannot agree on: delete the "
                             "stage's stage.json in the run folder and run without --only")
        stages = self.selected_stages(only, from_stage)
        if check:
            from tinyllm_hf.preflight import raise_on_failures

            # Stages that finished are skipped below: what they needed no longer matters.
            raise_on_failures(self.preflight([s for s in stages if only or not self.layout.done(s)]))
        self.layout.root.mkdir(parents=True, exist_ok=True)
        if not self.nodes.is_main:
            self.run_as_worker_node(stages)
            return
        for stage in stages:
            damage = self.output_damage(stage) if self.layout.done(stage) else None
            if damage is not None:
                print(f"[{stage}] finished before, but its output is damaged ({damage}): running it again", flush=True)
                self.layout.summary(stage).unlink()
            if self.layout.done(stage) and not only:
                print(f"[{stage}] done already ({self.layout.summary(stage)}), skipped", flush=True)
                continue
            if only and self.layout.done(stage):
                self.layout.summary(stage).unlink()
            print(f"[{stage}] starting", flush=True)
            start = time.perf_counter()
            failed = self.layout.stage_dir(stage) / STAGE_FAILED_FILE
            failed.unlink(missing_ok=True)
            try:
                getattr(self, stage)()
            except BaseException as err:
                if self.nodes.count > 1:  # the other nodes wait for this stage: tell them it will not finish
                    write_json(failed, {"error": str(err) or type(err).__name__})
                raise
            summary = self.summarize(stage, time.perf_counter() - start)
            # Written last and atomically: a stage without stage.json did not finish and runs again next time.
            write_json(self.layout.summary(stage), summary)
            print(f"[{stage}] finished in {summary['wall_time_s']:.0f} s", flush=True)

    def run_as_worker_node(self, stages: list[str]) -> None:
        """Node R > 0: run its share of each training stage that spans the nodes (node 0 writes the records), wait
        for node 0 to finish every stage before the next, since the next reads what it wrote."""
        started_file = self.layout.root / f".node{self.nodes.rank}.started"
        started_file.write_text(f"{os.getpid()}\n", "utf-8")
        started = started_file.stat().st_mtime  # the run folder's clock, which node 0's files are stamped by
        for stage in stages:
            if self.layout.done(stage) and self.output_damage(stage) is None:
                print(f"[{stage}] done already ({self.layout.summary(stage)}), skipped", flush=True)
                continue
            if self.runs_here(stage):
                print(f"[{stage}] starting on node {self.nodes.rank}", flush=True)
                getattr(self, stage)()
            self.wait_for_main_node(stage, started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinyllm run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="pipeline recipe, e.g. recipes/quickstart.yaml")
    parser.add_argument("--output_dir", "--output-dir", help="run folder (default: the recipe's output_dir)")
    parser.add_argument("--only", nargs="+", choices=STAGES, help="run just these stages (again, if done)")
    parser.add_argument("--from-stage", choices=STAGES, help="start at this stage")
    parser.add_argument("--check", action="store_true",
                        help="only check what the stages need (datasets, extras, launchers), list the verdicts and "
                             "exit 0 when all pass, else 1; every run does these checks first")
    parser.add_argument("--skip-check", action="store_true", help="run without the checks before stage 1")
    parser.add_argument("--num-nodes", type=int, default=None,
                        help="machines running this pipeline together on a shared run folder (default: "
                             f"{' / '.join(NUM_NODES_ENV)}, else 1)")
    parser.add_argument("--node-rank", type=int, default=None,
                        help=f"this machine's rank, 0 to num-nodes - 1 (default: {' / '.join(NODE_RANK_ENV)}, else 0)")
    parser.add_argument("--main-process-ip", default=None, help="address of node 0 (default: MASTER_ADDR)")
    parser.add_argument("--main-process-port", type=int, default=None,
                        help="port on node 0 for the training processes (default: MASTER_PORT, else 29500)")
    args = parser.parse_args(argv)
    nodes = Nodes(
        count=args.num_nodes if args.num_nodes is not None else env_int(NUM_NODES_ENV, 1),
        rank=args.node_rank if args.node_rank is not None else env_int(NODE_RANK_ENV, 0),
        main_process_ip=args.main_process_ip or os.environ.get("MASTER_ADDR"),
        main_process_port=(args.main_process_port if args.main_process_port is not None
                           else env_int(("MASTER_PORT",), 29500)),
    )
    recipe = load_pipeline_recipe(args.config)
    output_dir = Path(args.output_dir or recipe.get("output_dir") or "runs/" + Path(args.config).stem)
    pipeline = Pipeline(recipe, output_dir, Path(args.config), nodes)
    if args.check:
        from tinyllm_hf.preflight import failures, format_checks

        checks = pipeline.preflight(pipeline.selected_stages(args.only, args.from_stage))
        print(format_checks(checks), flush=True)
        return 1 if failures(checks) else 0
    with signals_as_exit():
        pipeline.run(args.only, args.from_stage, check=not args.skip_check)
    return 0


if __name__ == "__main__":
    from tinyllm_hf.cli import run_command

    sys.exit(run_command("tinyllm run", main))
