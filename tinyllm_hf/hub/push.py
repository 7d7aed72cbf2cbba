"""`tinyllm push`: release a model, its demo Space or an embedded dataset on the Hugging Face Hub in one commit.

    tinyllm push --model runs/quickstart/sft --repo-id me/tinyllm-zh-tiny [--private] [--include-gguf FILE ...]
    tinyllm push --model runs/quickstart/sft --repo-id me/tinyllm-zh-tiny --dry-run staged/   # stage, upload nothing
    tinyllm push --space --model me/tinyllm-zh-tiny --repo-id me/tinyllm-zh-tiny-demo
    tinyllm push --dataset sft --repo-id me/tinyllm-zh-sft [--tasks ...] [--task-sizes ...] [--heldout-sizes ...]
    tinyllm push --hub modelscope --model runs/quickstart/sft --repo-id me/tinyllm-zh-tiny   # ModelScope (魔搭)

A model release holds the safetensors weights, config.json with `auto_map` and the remote-code files, the tokenizer
with its chat template, the generation config, a model card built from the pipeline's own result files, plots, and the
chosen GGUF variants. A dataset release (`--dataset sft|preferences`) holds the embedded set's train and held-out
splits as parquet files (data/train-*.parquet, data/test-*.parquet) and a dataset card read back from them.
`--dry-run OUT` writes exactly the files that would be uploaded into OUT. Staged files are world-readable (0644, folders
0755), whatever modes their sources had. `--hub modelscope` releases a model or a Studio on ModelScope instead (see
`tinyllm_hf.hub.modelscope`).
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import datasets
from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id

from tinyllm_hf.errors import MissingFileError, ReleaseError, TinyllmError
from tinyllm_hf.hub.card import (
    DATA_DIR,
    build_dataset_card,
    build_model_card,
    gather_dataset_facts,
    gather_facts,
)
from tinyllm_hf.options import comma_list
from tinyllm_hf.runs import ADAPTER_CONFIG_FILE, RELEASE_RESULTS_FILE, STAGE_RECORDS_FILE
from tinyllm_hf.tasks import (
    HELDOUT_TASKS,
    PREFERENCE_TASKS,
    TASKS,
    build_default_preferences,
    build_default_sft,
    parse_task_sizes,
)

MODELING_DIR = Path(__file__).resolve().parents[1] / "modeling"
REMOTE_CODE = ("configuration_tinyllm.py", "loss_tinyllm.py", "modeling_tinyllm.py")
MODEL_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", ADAPTER_CONFIG_FILE, STAGE_RECORDS_FILE,
)
SPACE_APP = Path(__file__).resolve().parents[1] / "inference" / "app.py"
# The embedded datasets that can be published: name -> the task names of the builder behind it.
EMBEDDED_DATASETS = {"sft": TASKS, "preferences": PREFERENCE_TASKS}
# Our held-out split is published as "test", the split name the Hub's viewer and `load_dataset` users expect.
HUB_SPLITS = {"train": "train", "heldout": "test"}
MODEL_ONLY_OPTIONS = ("include_gguf", "results", "run_dir", "base_model", "datasets", "license", "space")
DATASET_ONLY_OPTIONS = ("tasks", "task_sizes", "heldout_sizes")
HUBS = ("huggingface", "modelscope")


def finish_staging(out_dir: Path) -> list[Path]:
    """Make the staged release readable by everyone, whatever the umask or the sources' modes (`save_pretrained`
    writes weights 0600, `tempfile.mkdtemp` makes folders 0700): folders 0755, files 0644. Returns the staged files
    (relative paths)."""
    for path in [out_dir, *out_dir.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
    return sorted(p.relative_to(out_dir) for p in out_dir.rglob("*") if p.is_file())


def stage_model(model_dir, out_dir, repo_id, include_gguf=(), results_file=None, run_dir=None, base_model=None,
                datasets=None, license=None) -> list[Path]:
    """Write the release of `model_dir` into `out_dir` and return the staged files (relative paths)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    facts = gather_facts(model_dir, results_file=results_file, run_dir=run_dir, gguf_files=include_gguf)
    model_type = facts.config.get("model_type")
    if model_type not in ("tinyllm", "llama"):
        raise ReleaseError(f"{model_dir} holds a {model_type!r} model; `tinyllm push` releases tinyllm or llama models")
    for gguf in facts.gguf_files:
        if not gguf.is_file():
            raise MissingFileError(f"GGUF file to include not found: {gguf}")
    out_dir.mkdir(parents=True, exist_ok=True)

    for name in MODEL_FILES:
        if (model_dir / name).exists():
            shutil.copy2(model_dir / name, out_dir / name)
    for weights in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.safetensors.index.json")):
        shutil.copy2(weights, out_dir / weights.name)
    if model_type == "tinyllm" and not facts.adapter:
        # The remote code always comes from the installed package, so a release never ships stale modeling files.
        for name in REMOTE_CODE:
            shutil.copy2(MODELING_DIR / name, out_dir / name)
    for plot in facts.plots:
        source = model_dir / plot if (model_dir / plot).exists() else Path(run_dir) / plot
        shutil.copy2(source, out_dir / plot)
    if facts.results:
        results = json.dumps(facts.results, ensure_ascii=False, indent=2) + "\n"
        (out_dir / RELEASE_RESULTS_FILE).write_text(results, "utf-8")
    for gguf in facts.gguf_files:
        shutil.copy2(gguf, out_dir / gguf.name)
    card = build_model_card(facts, repo_id, base_model=base_model, datasets=datasets, license=license)
    card.save(out_dir / "README.md")
    return finish_staging(out_dir)


def stage_space(model_repo_id: str, out_dir, space_repo_id: str) -> list[Path]:
    """A Gradio Space running the demo's app.py unchanged, pointed at a released model."""
    if not SPACE_APP.exists():
        raise ReleaseError(f"the demo app {SPACE_APP} is missing from this installation")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(SPACE_APP, out_dir / "app.py")
    import tinyllm_hf

    (out_dir / "requirements.txt").write_text(f"tinyllm-hf[serve]=={tinyllm_hf.__version__}\n", "utf-8")
    readme = (
        "---\n"
        f"title: {space_repo_id.split('/')[-1]}\n"
        "sdk: gradio\n"
        "app_file: app.py\n"
        f"models:\n- {model_repo_id}\n"
        "tags:\n- tinyllm\n- chinese\n"
        "---\n\n"
        f"Chat demo of [{model_repo_id}](https://huggingface.co/{model_repo_id}), served by `tinyllm demo`'s app.\n"
        "The app reads the model to load from the `TINYLLM_MODEL` variable (set it in the Space's settings),\n"
        f"or loads `{model_repo_id}` by default.\n"
    )
    (out_dir / "README.md").write_text(readme, "utf-8")
    (out_dir / "model_id.txt").write_text(model_repo_id + "\n", "utf-8")
    return finish_staging(out_dir)


def _check_sizes(sizes: str | None, tasks: list[str], option: str) -> dict[str, int]:
    parsed = parse_task_sizes(sizes)
    stray = sorted(set(parsed) - set(tasks))
    if stray:
        raise ReleaseError(f"{option} names task(s) {', '.join(stray)} that this build leaves out; "
                           f"its tasks are {', '.join(tasks)}")
    return parsed


def build_embedded_dataset(name: str, tasks: list[str] | None = None, task_sizes: str | None = None,
                           heldout_sizes: str | None = None) -> dict[str, datasets.Dataset]:
    """{Hub split: rows} of an embedded set: its train split (`task_sizes` rows per task, default all) and its
    held-out split (`heldout_sizes`, default all), each decided per record by `records.split_of`."""
    if name not in EMBEDDED_DATASETS:
        raise ReleaseError(f"unknown dataset {name!r}; the embedded datasets are {', '.join(EMBEDDED_DATASETS)}")
    tasks = list(tasks or EMBEDDED_DATASETS[name])
    unknown = sorted(set(tasks) - set(EMBEDDED_DATASETS[name]))
    if unknown:
        raise ReleaseError(f"unknown {name} task(s) {', '.join(unknown)}; known: {', '.join(EMBEDDED_DATASETS[name])}")
    sizes = _check_sizes(task_sizes, tasks, "--task-sizes")
    heldout_tasks = [t for t in tasks if t in HELDOUT_TASKS]  # identity questions are train-only
    held_sizes = _check_sizes(heldout_sizes, heldout_tasks, "--heldout-sizes")
    build = build_default_sft if name == "sft" else build_default_preferences
    splits = {HUB_SPLITS["train"]: build("train", tasks, sizes)}
    if heldout_tasks:
        splits[HUB_SPLITS["heldout"]] = build("heldout", heldout_tasks, held_sizes)
    return splits


def stage_dataset(name: str, out_dir, repo_id: str, tasks: list[str] | None = None, task_sizes: str | None = None,
                  heldout_sizes: str | None = None) -> list[Path]:
    """Write an embedded dataset's splits as parquet plus its card (README.md) into `out_dir`; return the files."""
    splits = build_embedded_dataset(name, tasks, task_sizes, heldout_sizes)
    out_dir = Path(out_dir)
    (out_dir / DATA_DIR).mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        # One shard per split, named as `push_to_hub` names shards, so the Hub's split detection agrees with the card.
        rows.to_parquet(out_dir / DATA_DIR / f"{split}-00000-of-00001.parquet")
    command = " ".join(
        [f"tinyllm push --dataset {name} --repo-id {repo_id}"]
        + [f"--{flag} {value}" for flag, value in
           (("tasks", ",".join(tasks) if tasks else None), ("task-sizes", task_sizes), ("heldout-sizes", heldout_sizes))
           if value]
    )
    task_kinds = {task: TASKS[task].kind for task in EMBEDDED_DATASETS[name]}
    facts = gather_dataset_facts(out_dir, name, task_kinds, command)
    build_dataset_card(facts, repo_id, out_dir).save(out_dir / "README.md")
    return finish_staging(out_dir)


def upload(staged_dir, files, repo_id, repo_type="model", private=False, revision=None, create_pr=False,
           commit_message=None):
    """Create the repo if needed and upload every staged file in a single commit."""
    token = get_token()
    if not token:
        raise ReleaseError("no Hugging Face token: run `hf auth login` or set HF_TOKEN, then push again")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True,
                    space_sdk="gradio" if repo_type == "space" else None)
    if revision and not revision.startswith("refs/pr/"):
        # The Hub refuses a commit to a branch that does not exist yet (a pull request ref cannot be created).
        api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=str(f), path_or_fileobj=str(Path(staged_dir) / f)) for f in files]
    return api.create_commit(
        repo_id, operations, repo_type=repo_type, revision=revision, create_pr=create_pr,
        commit_message=commit_message or f"Release {repo_id.split('/')[-1]} with tinyllm push ({len(files)} files)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinyllm push", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="model folder (or, with --space, the released model's repo id)")
    what.add_argument("--dataset", choices=list(EMBEDDED_DATASETS), help="an embedded dataset to publish")
    parser.add_argument("--repo-id", required=True, help="OWNER/NAME of the repository to create or update")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", help="branch to commit to (default: main)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    parser.add_argument("--include-gguf", nargs="*", default=[], metavar="FILE", help="GGUF files to release too")
    parser.add_argument("--results", help="evaluation results JSON (default: MODEL/results.json, else "
                        "RUN_DIR/eval/STAGE.json when MODEL is the run's folder RUN_DIR/STAGE)")
    parser.add_argument("--run-dir", help="the `tinyllm run` output folder, for stage summaries and plots")
    parser.add_argument("--base-model", help="base model repo id for a fine-tune's card metadata")
    parser.add_argument("--datasets", nargs="*", help="dataset repo ids for the card metadata (default: the Hub "
                        "datasets the run's stages trained on)")
    parser.add_argument("--license", help="the model's licence (a Hub licence id); default: derived from the "
                        "training data the run recorded (its terms are listed in the card either way)")
    parser.add_argument("--space", action="store_true", help="release the web demo as a Gradio Space")
    parser.add_argument("--tasks", help="--dataset: tasks to include, comma-separated (default: all)")
    parser.add_argument("--task-sizes", help="--dataset: train rows per task, e.g. sentiment=4000,xiehouyu=400 "
                                             "(default: every train row)")
    parser.add_argument("--heldout-sizes", help="--dataset: held-out (test) rows per task (default: all)")
    parser.add_argument("--dry-run", metavar="OUT", help="stage the files into OUT and upload nothing")
    parser.add_argument("--message", help="commit message")
    parser.add_argument("--hub", choices=HUBS, default="huggingface",
                        help="where to release: the Hugging Face Hub (default) or ModelScope (model or --space)")
    args = parser.parse_args(argv)
    if args.hub == "modelscope" and (args.dataset or args.create_pr):
        parser.error(f"--hub modelscope releases models and Studios; {'--dataset' if args.dataset else '--create-pr'} "
                     "is for the Hugging Face Hub")
    if "/" not in args.repo_id:
        parser.error(f"--repo-id must be OWNER/NAME, got {args.repo_id!r}")
    try:
        validate_repo_id(args.repo_id)
    except HFValidationError as error:
        parser.error(f"--repo-id {args.repo_id!r} is not a valid repo id: {error}")
    release = "dataset" if args.dataset else "model"
    for option in MODEL_ONLY_OPTIONS if args.dataset else DATASET_ONLY_OPTIONS:
        if getattr(args, option):
            parser.error(f"--{option.replace('_', '-')} does not apply to a {release} release")

    if args.dry_run and Path(args.dry_run).exists() and any(Path(args.dry_run).iterdir()):
        parser.error(f"--dry-run folder {args.dry_run} exists and is not empty")
    staging = Path(args.dry_run) if args.dry_run else Path(tempfile.mkdtemp(prefix="tinyllm-push-"))
    try:
        if args.dataset:
            tasks = comma_list(args.tasks) or None
            files = stage_dataset(args.dataset, staging, args.repo_id, tasks, args.task_sizes, args.heldout_sizes)
        elif args.space:
            files = stage_space(args.model, staging, args.repo_id)
        else:
            files = stage_model(args.model, staging, args.repo_id, include_gguf=args.include_gguf,
                                results_file=args.results, run_dir=args.run_dir, base_model=args.base_model,
                                datasets=args.datasets, license=args.license)
        if args.hub == "modelscope":
            from tinyllm_hf.hub import modelscope

            if args.space:
                modelscope.stage_studio(args.model, staging, args.repo_id)
            else:
                modelscope.stage_model_extras(staging, args.repo_id)
            files = finish_staging(staging)
        if args.dry_run:
            print(f"staged {len(files)} files in {staging} (nothing uploaded):")
            print("\n".join(f"  {f}" for f in files))
            return 0
        repo_type = "dataset" if args.dataset else "space" if args.space else "model"
        if args.hub == "modelscope":
            modelscope.upload(staging, args.repo_id, repo_type=repo_type, private=args.private, revision=args.revision,
                              commit_message=args.message)
            site = "studios" if args.space else "models"
            print(f"uploaded {len(files)} files: https://modelscope.cn/{site}/{args.repo_id}")
            return 0
        info = upload(staging, files, args.repo_id, repo_type=repo_type,
                      private=args.private, revision=args.revision, create_pr=args.create_pr,
                      commit_message=args.message)
        print(f"uploaded {len(files)} files: {info.pr_url or info.commit_url}")
        return 0
    except TinyllmError:
        if args.dry_run:  # a half-staged release is no use
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if not args.dry_run:
            shutil.rmtree(staging, ignore_errors=True)
