r"""`tinyllm eval`: C-Eval / CMMLU (ppl or gen mode), perplexity and task accuracy, written to one results JSON.

    tinyllm eval --model out/pretrain --tasks ceval,cmmlu,ppl --ceval-dir data/ceval --cmmlu-dir data/cmmlu \
        --mode ppl --shots 5 --output out/pretrain/eval_results.json
"""

import argparse
import sys
from pathlib import Path

from tinyllm_hf.errors import DatasetUnavailableError, UsageError
from tinyllm_hf.evaluation.benchmarks import (
    BENCHMARKS,
    DEFAULT_SPLIT,
    HUB_NAMES,
    MODELSCOPE_NAMES,
    MODES,
    PROMPT_STYLES,
    SOURCES,
    load_benchmark,
)
from tinyllm_hf.evaluation.results import make_results, results_table, save_results, weights_revision
from tinyllm_hf.inference.model_files import AUTO_BACKEND, BACKENDS, positive_int
from tinyllm_hf.model_utils import add_trust_remote_code_argument, check_model_reachable, get_model, get_tokenizer
from tinyllm_hf.rope_scaling import SPEC_HELP, parse_rope_scaling
from tinyllm_hf.options import comma_list

TASKS = (*BENCHMARKS, "ppl", "tasks")
TOOL_MODES = ("off", "on", "both")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinyllm eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder or Hub id (any causal LM; Tinyllm included), a `tinyllm "
                   "quantize` output or a .gguf file (ONNX, OpenVINO and GGUF models: --mode gen and --tasks tasks only)")
    p.add_argument("--revision", default=None, help="Hub revision of --model")
    add_trust_remote_code_argument(p)
    p.add_argument("--tasks", default="ceval,cmmlu,ppl", help=f"comma-separated, from {', '.join(TASKS)}")
    p.add_argument("--output", default=None, help="results JSON (default: MODEL/eval_results.json, or ./eval_results.json)")
    p.add_argument("--mode", choices=MODES, default="ppl", help="ppl: option log-likelihood (base models); gen: chat + parse")
    p.add_argument("--shots", type=int, default=0, help="few-shot exemplars from the dev split")
    p.add_argument("--prompt-style", choices=tuple(PROMPT_STYLES), default="lm-eval",
                   help="C-Eval/CMMLU prompt text: lm-evaluation-harness's (default) or OpenCompass's, whose numbers "
                        "the reference project reports (docs/evaluation.md)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions of each subject")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None, help="longest reply in gen mode and for --tasks tasks "
                   "(default: the rest of the model's context after each prompt)")
    for name in BENCHMARKS:
        p.add_argument(f"--{name}-dir", default=None, help=f"local {name} folder in the official layout (default: "
                       f"downloaded, see --benchmark-source)")
        p.add_argument(f"--{name}-split", default=DEFAULT_SPLIT[name], help=f"split to evaluate (default {DEFAULT_SPLIT[name]})")
        p.add_argument(f"--{name}-subjects", default=None, help="comma-separated subjects (default: all present)")
    p.add_argument("--benchmark-source", choices=("auto", *SOURCES), default="auto",
                   help="where C-Eval/CMMLU come from without --ceval-dir/--cmmlu-dir: the Hugging Face Hub ("
                        f"{', '.join(HUB_NAMES.values())}), ModelScope ({', '.join(MODELSCOPE_NAMES.values())}), or auto "
                        "(the Hub, then ModelScope)")
    p.add_argument("--skip-unavailable", action="store_true",
                   help="a benchmark that cannot be downloaded is recorded as skipped, with the command to run once "
                        "its data is there, instead of failing (a local folder that is missing still fails)")
    p.add_argument("--ceval-mapping", default=None, help="C-Eval subject_mapping.json (default: the packaged one)")
    p.add_argument("--text-file", default=None, help="ppl texts: .txt (one per line) or .jsonl (default: corpus validation split)")
    p.add_argument("--ppl-max-length", type=int, default=None, help="ppl window (default: the model's context)")
    p.add_argument("--ppl-stride", type=int, default=None, help="ppl window step (default: half the window)")
    p.add_argument("--tasks-file", default=None, help="JSONL of task records for --tasks tasks (default: the embedded "
                   "held-out SFT tasks)")
    p.add_argument("--tools", choices=TOOL_MODES, default="off",
                   help="--tasks tasks with the built-in tools (the dictionary lookups and calculator, run by the tool "
                        "loop): off, on (results under 'tasks_tools'), or both")
    p.add_argument("--task-sizes", default=None, help="with the embedded tasks: records per task, e.g. sentiment=200,xiehouyu=50")
    p.add_argument("--backend", choices=(AUTO_BACKEND, *BACKENDS), default=AUTO_BACKEND,
                   help="runtime of generation-mode tasks: auto (default): for a float32 checkpoint folder, the fastest "
                        "runtime that reproduces its greedy tokens at --batch-size streams, measured once and saved "
                        "(inference/runtime_choice.py); transformers when a task scores log-likelihoods (ppl); or "
                        "name one")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads per decode step (default: the runtime's)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--rope-scaling", default=None, metavar="TYPE:FACTOR", help=SPEC_HELP + " (checkpoints only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def load_model(name: str, revision: str | None = None, dtype: str = "auto", device: str | None = None,
               trust_remote_code: bool = False, rope_scaling: str | None = None):
    """Model and tokenizer for any causal LM; Tinyllm checkpoints resolve through the Auto classes, so code shipped
    in a model folder runs only with `trust_remote_code`. `rope_scaling` ("yarn:4", ...) rescales its RoPE."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        # bf16 halves memory and time on GPUs; CPU matmuls are fastest (and exact) in fp32.
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    tokenizer = get_tokenizer(name, revision=revision, trust_remote_code=trust_remote_code)
    model = get_model(name, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code,
                      rope_scaling=rope_scaling)
    return model.to(device).eval(), tokenizer


def load_eval_runtime(name: str, revision: str | None = None, dtype: str = "auto", device: str | None = None,
                      trust_remote_code: bool = False, rope_scaling: str | None = None,
                      backend: str = "transformers", batch_size: int = 16, threads: int | None = None):
    """The runtime (`inference/runtime.py`) evaluated. `backend` auto: a float32 checkpoint folder runs on the fastest
    runtime that reproduces it at `batch_size` streams (`runtime_choice.choose_runtime`; pass transformers where
    log-likelihoods are scored); llamacpp/onnx: that runtime's file; otherwise a checkpoint folder or Hub id through
    `load_model`, and a `tinyllm quantize` output or a .gguf file through `load_runtime`, as `tinyllm serve` runs it."""
    from tinyllm_hf.inference.model_files import model_kind
    from tinyllm_hf.inference.runtime import (
        TransformersRuntime,
        load_backend,
        load_runtime,
    )
    from tinyllm_hf.inference.runtime_choice import choose_runtime, is_auto_eligible

    local = Path(name).exists()
    if backend == AUTO_BACKEND and local and revision is None and is_auto_eligible(
            name, "float32" if dtype == "auto" else dtype, rope_scaling, trust_remote_code, device):
        return choose_runtime(name, streams=batch_size, threads=threads, serial_ok=True)
    if backend in ("llamacpp", "onnx"):
        return load_backend(backend, name, threads=threads, trust_remote_code=trust_remote_code,
                            rope_scaling=rope_scaling)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if local and model_kind(name) != "checkpoint":
        if rope_scaling:
            raise UsageError(f"--rope-scaling applies to checkpoint folders; {name} is a {model_kind(name)} export "
                             "(export the checkpoint again after extending it, or evaluate the checkpoint)")
        return load_runtime(name, trust_remote_code=trust_remote_code)
    return TransformersRuntime(*load_model(name, revision, dtype, device, trust_remote_code, rope_scaling))


def skipped_benchmark(name: str, args: argparse.Namespace, reason: str) -> dict:
    """The results entry of a benchmark whose data could not be read: why, and the command that runs it."""
    command = (f"tinyllm eval --model {args.model} --tasks {name} --{name}-dir DIR --mode {args.mode} "
               f"--shots {args.shots}")
    print(f"{name} skipped: {reason}", file=sys.stderr)
    return {"skipped": reason.splitlines()[0], "mode": args.mode, "shots": args.shots, "split": getattr(args, f"{name}_split"),
            "command": command}


def run(args: argparse.Namespace) -> dict:
    # The scoring modules load torch: imported here, so `tinyllm eval --help` stays light.
    from tinyllm_hf.evaluation.engine import transformers_model
    from tinyllm_hf.evaluation.mc import evaluate_multiple_choice

    tasks = comma_list(args.tasks)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise UsageError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    if args.rope_scaling:
        parse_rope_scaling(args.rope_scaling)  # a bad spec fails before anything is read
    check_model_reachable(args.model, args.revision)  # a mistyped path or id fails before the data is read
    # Data first: a missing folder or file fails before the model is loaded.
    benchmarks, skipped = {}, {}
    for name in (b for b in BENCHMARKS if b in tasks):
        folder = getattr(args, f"{name}_dir")
        try:
            benchmarks[name] = load_benchmark(
                name,
                folder or args.benchmark_source,
                getattr(args, f"{name}_split"),
                comma_list(getattr(args, f"{name}_subjects")) or None,
                args.ceval_mapping if name == "ceval" else None,
            )
        except DatasetUnavailableError as err:
            if folder or not args.skip_unavailable:
                raise
            skipped[name] = skipped_benchmark(name, args, str(err))
    if "ppl" in tasks:
        from tinyllm_hf.evaluation.perplexity import load_texts

        texts = load_texts(args.text_file)
    if "tasks" in tasks and args.tasks_file:
        from tinyllm_hf.evaluation.tasks import load_examples

        examples = load_examples(args.tasks_file)
    elif "tasks" in tasks:
        # The held-out questions of the embedded SFT set: never seen in training, checkable by exact match.
        from tinyllm_hf.tasks import heldout_task_records

        examples = heldout_task_records(sizes=args.task_sizes)
    scores_likelihoods = "ppl" in tasks or bool(benchmarks and args.mode == "ppl")
    generates = "tasks" in tasks or bool(benchmarks and args.mode == "gen")
    # auto measures runtimes only for a run that generates and needs no log-likelihoods (only transformers has them).
    measure = args.backend == AUTO_BACKEND and generates and not scores_likelihoods
    backend = "transformers" if args.backend == AUTO_BACKEND and not measure else args.backend
    runtime = load_eval_runtime(args.model, args.revision, args.dtype, args.device, args.trust_remote_code,
                                args.rope_scaling, backend, args.batch_size, args.threads)
    if scores_likelihoods:
        transformers_model(runtime, "--tasks ppl" if "ppl" in tasks else "--mode ppl")  # fails before any task runs
    progress = not args.no_progress
    results = {}
    for name in tasks:
        if name in skipped:
            results[name] = skipped[name]
        elif name in benchmarks:
            results[name] = evaluate_multiple_choice(
                runtime, benchmarks[name], args.mode, args.shots, args.batch_size, args.max_new_tokens, args.limit,
                progress, args.prompt_style,
            )
        elif name == "ppl":
            from tinyllm_hf.evaluation.perplexity import perplexity

            model, tokenizer = transformers_model(runtime, "--tasks ppl")
            results[name] = perplexity(model, tokenizer, texts, args.ppl_max_length, args.ppl_stride, progress=progress)
        else:
            from tinyllm_hf.evaluation.tasks import evaluate_tasks
            from tinyllm_hf.inference.tool_loop import Toolbox

            if args.tools in ("off", "both"):
                results[name] = evaluate_tasks(runtime, examples, args.max_new_tokens, args.batch_size, progress)
            if args.tools in ("on", "both"):
                results[f"{name}_tools"] = evaluate_tasks(runtime, examples, args.max_new_tokens, args.batch_size,
                                                          progress, toolbox=Toolbox.builtin())
    # The runtime that ran, not the option (auto), so results say what produced them.
    settings = {**{k: v for k, v in vars(args).items() if k not in ("model", "output", "no_progress")},
                "backend": runtime.backend}
    revision = args.revision or weights_revision(args.model)
    return make_results(args.model, revision, results, settings)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = run(args)
    default = Path(args.model) / "eval_results.json" if Path(args.model).is_dir() else Path("eval_results.json")
    path = save_results(results, args.output or default)
    print(results_table(results))
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    from tinyllm_hf.cli import run_command

    sys.exit(run_command("tinyllm eval", main))
