"""`tinyllm run`: every stage of a recipe in order, from raw text to a staged Hub release and a report.

    tinyllm run --config recipes/quickstart.yaml [--output_dir runs/NAME] [--only sft] [--from-stage eval]

Each stage runs its own command (`tinyllm tokenizer`, `tinyllm pretrain`, ...) in a subprocess with the same recipe
entries, writes into `OUTPUT_DIR/<stage>/` and, when it succeeds, a `stage.json` summary. A stage whose summary exists
is skipped, so an interrupted run continues where it stopped (training stages also resume from their last complete
checkpoint). Every stage can be run alone with the command printed in its log.

The recipe names every choice: a top-level `output_dir`, then one mapping per stage, in the order of STAGES. A stage
missing from the recipe is not run. Training stages take `recipe:` (their own YAML recipe) and `args:` (overrides).
A top-level `accelerate:` mapping runs the training stages under `accelerate launch` with those flags (for example
`{config_file: recipes/accelerate/deepspeed_zero2.yaml, num_processes: 8}`); a stage's own `accelerate:` replaces it
for that stage, and `accelerate: false` runs that stage as a plain process.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tinyllm_hf.errors import PipelineError, UsageError
from tinyllm_hf.options import load_yaml_mapping
from tinyllm_hf.runs import ALIGNED_STAGES, STAGES, TRAINER_STATE_FILE, TRAINING_STAGES, RunLayout, write_json


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


class Pipeline:
    def __init__(self, recipe: dict, output_dir: Path, recipe_path: Path):
        self.recipe = recipe
        self.layout = RunLayout(output_dir)
        self.recipe_path = recipe_path

    # ---------------------------------------------------------------- helpers

    def configured(self, stage: str) -> bool:
        return stage in self.recipe and self.recipe[stage] is not None

    def chat_model(self) -> Path:
        for stage in ALIGNED_STAGES:
            if self.configured(stage):
                return self.layout.stage_dir(stage)
        return self.layout.stage_dir("sft") if self.configured("sft") else self.layout.stage_dir("pretrain")

    def launcher(self, stage: str) -> dict | None:
        """The `accelerate launch` flags for a training stage: its own `accelerate:` entry, else the recipe's."""
        entry = self.recipe[stage] or {}
        flags = entry["accelerate"] if "accelerate" in entry else self.recipe.get("accelerate")
        if flags is None or flags is False:
            return None
        if not isinstance(flags, dict):
            raise UsageError(f"accelerate: for {stage} must be a mapping of `accelerate launch` flags or false, "
                             f"not {flags!r}")
        return flags

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
        log_path.parent.mkdir(parents=True, exist_ok=True)
        print(f"[{stage}] $ {printable}", flush=True)
        with log_path.open("a", encoding="utf-8") as log:
            log.write(f"$ {printable}\n")
            log.flush()
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
            for line in process.stdout:
                sys.stdout.write(line)
                log.write(line)
            if process.wait() != 0:
                raise PipelineError(f"stage {stage} failed (exit {process.returncode}); see {log_path}")

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
        if output.exists():
            args.append("--overwrite")  # a tokenizer without stage.json is incomplete: train it again
        self.run_command("tokenizer", args)

    def pretrain(self):
        self.run_training("pretrain", tokenizer_name_or_path=self.layout.tokenizer)

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
            args = ["eval", "--model", str(self.layout.stage_dir(model_stage)), "--tasks", tasks, "--mode", mode,
                    "--tasks-file", str(tasks_file), "--output", str(self.layout.eval_results(model_stage))]
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
        ggufs = sorted(self.layout.stage_dir("gguf").glob("*.gguf"))
        if ggufs:
            args += ["--include-gguf", *map(str, ggufs)]
        self.run_command("release", args)

    def report(self):
        from tinyllm_hf.report import write_report

        write_report(self.layout, self.recipe, self.chat_model())

    # ---------------------------------------------------------------- bookkeeping

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

    def run(self, only: list[str] | None = None, from_stage: str | None = None) -> None:
        self.layout.root.mkdir(parents=True, exist_ok=True)
        stages = [s for s in STAGES if self.configured(s)]
        if from_stage:
            stages = stages[stages.index(from_stage):]
        if only:
            stages = [s for s in stages if s in only]
        for stage in stages:
            if self.layout.done(stage) and not only:
                print(f"[{stage}] done already ({self.layout.summary(stage)}), skipped", flush=True)
                continue
            if only and self.layout.done(stage):
                self.layout.summary(stage).unlink()
            print(f"[{stage}] starting", flush=True)
            start = time.perf_counter()
            getattr(self, stage)()
            summary = self.summarize(stage, time.perf_counter() - start)
            # Written last and atomically: a stage without stage.json did not finish and runs again next time.
            write_json(self.layout.summary(stage), summary)
            print(f"[{stage}] finished in {summary['wall_time_s']:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinyllm run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="pipeline recipe, e.g. recipes/quickstart.yaml")
    parser.add_argument("--output_dir", "--output-dir", help="run folder (default: the recipe's output_dir)")
    parser.add_argument("--only", nargs="+", choices=STAGES, help="run just these stages (again, if done)")
    parser.add_argument("--from-stage", choices=STAGES, help="start at this stage")
    args = parser.parse_args(argv)
    recipe = load_pipeline_recipe(args.config)
    output_dir = Path(args.output_dir or recipe.get("output_dir") or "runs/" + Path(args.config).stem)
    Pipeline(recipe, output_dir, Path(args.config)).run(args.only, args.from_stage)
    return 0


if __name__ == "__main__":
    from tinyllm_hf.cli import run_command

    sys.exit(run_command("tinyllm run", main))
