"""Preflight of `tinyllm run`: before stage 1, check everything the recipe's stages will need, and say what to fix.

    tinyllm run --config recipes/92m.yaml --check     # the checks only: a list of verdicts, exit 0 or 1

`tinyllm run` does the same checks first (for the stages it is about to run) and stops within seconds, before any
stage folder is written, when one fails. What is checked, for each stage of the recipe that will run:

- recipe files: each stage's `recipe:` exists and parses; its keys and `args:` together are what the stage runs with;
- datasets: `default` / embedded sources (their packages installed), local files and folders (exist, hold data
  files), Hugging Face Hub datasets (the repository and configuration exist: `HfApi.dataset_info`, no download; under
  `HF_HUB_OFFLINE=1` or with the Hub unreachable, a prepared copy in `datasets`' cache, the only one `load_dataset`
  reads offline); C-Eval / CMMLU of the eval stage, which it skips when unreachable (a warning, not a failure);
- extras, found with `importlib.util.find_spec` without importing them: TRL and TensorBoard for training, flash-attn for
  `attn_implementation: flash_attention_2`, peft / bitsandbytes for LoRA / QLoRA, vLLM for `use_vllm`, the `gguf`
  package and llama.cpp's quantizer (llama-cpp-python's `llama_model_quantize`) for GGUF outtypes, each quantize
  method's modules (`tinyllm_hf.export.quantize.METHODS`);
- launchers: an `accelerate:` config_file exists and parses, its DeepSpeed JSON exists and parses and deepspeed is
  installed, and num_processes per machine does not exceed the visible CUDA devices (unless the run is on CPU).

Each check is one `Check`: what, which stage and recipe key needs it, the verdict and, when it fails, the fix.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tinyllm_hf.errors import PreflightError, TinyllmError
from tinyllm_hf.inference.model_files import importable
from tinyllm_hf.model_utils import FLASH_ATTENTION_PACKAGES
from tinyllm_hf.options import comma_list, load_yaml_mapping

OK, WARN, FAIL = "ok", "warn", "FAIL"
TRAIN_EXTRA = 'pip install "tinyllm-hf[train]"'
# What the stage entry points run with when neither the recipe nor args set these keys.
STAGE_DEFAULT_ATTENTION = {"pretrain": "sdpa", "distill": "sdpa"}
TRL_STAGES = ("distill", "sft", "reward", "dpo", "grpo")
PREFERENCE_STAGES = ("reward", "dpo")


@dataclass(frozen=True)
class Check:
    stage: str  # the stage that needs it ("run" for the pipeline recipe itself)
    what: str  # "dataset wikimedia/wikipedia (20231101.zh)", "extra flash-attn", "launcher recipes/accelerate/..."
    needed_by: str  # the recipe key behind it: "recipes/sft/92m.yaml attn_implementation: flash_attention_2"
    verdict: str  # OK, WARN (the stage copes without it) or FAIL
    detail: str  # where it was found, or why not and the command that fixes it

    def line(self) -> str:
        return f"[{self.verdict:>4}] {self.stage}: {self.what} ({self.needed_by}): {self.detail}"


def extra_check(stage: str, needed_by: str, module: str, fix: str, name: str | None = None) -> Check:
    found = importable(module)
    return Check(stage, f"extra {name or module}", needed_by, OK if found else FAIL,
                 "installed" if found else f"not installed: {fix}")


# ---------------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------------


def hub_download_hint(repo_id: str, config: str | None) -> str:
    """How to make a Hub dataset readable where the Hub is not: `datasets` reads offline only its own prepared copy
    (not the Hub's file cache), so either load it once where the Hub is reachable, or download the files and name
    the local folder instead."""
    include = f' --include "{config}/*"' if config else ""
    local = f"data/{repo_id.split('/')[-1]}"
    return (f"load it once with the Hub reachable (datasets then keeps a copy it reads under HF_HUB_OFFLINE=1), or "
            f"`hf download {repo_id} --repo-type dataset{include} --local-dir {local}` and set dataset_name to "
            f"{local}{'/' + config if config else ''}")


def cached_hub_dataset(repo_id: str, config: str | None) -> str | None:
    """Where `datasets` keeps a prepared copy of Hub dataset `repo_id` (and `config`), which `load_dataset` uses when
    the Hub is offline or unreachable; None when there is none. The folder is the one `datasets`'
    CachedDatasetModuleFactory looks in: HF_DATASETS_CACHE/<owner>___<snake_case name>/<config>/<version>/<hash>."""
    import datasets.config
    from datasets.naming import camelcase_to_snakecase

    owner_and_name = repo_id.split("/")
    owner_and_name[-1] = camelcase_to_snakecase(owner_and_name[-1])
    root = Path(datasets.config.HF_DATASETS_CACHE) / "___".join(owner_and_name)
    prepared = [p for p in root.glob(f"{config or '*'}/*/*") if p.is_dir()]
    return f"a prepared copy in the datasets cache ({prepared[0]})" if prepared else None


def hub_dataset_check(stage: str, needed_by: str, repo_id: str, config: str | None = None,
                      verdict_if_missing: str = FAIL, fix: str | None = None) -> Check:
    """Whether Hub dataset `repo_id` (and `config`) can be read: on the Hub (metadata only), else in a local cache."""
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    what = f"dataset {repo_id}" + (f" ({config})" if config else "")
    fix = fix or hub_download_hint(repo_id, config)
    reason = "HF_HUB_OFFLINE is set"
    if not constants.HF_HUB_OFFLINE:
        try:
            info = HfApi().dataset_info(repo_id, timeout=10)
        except GatedRepoError:
            return Check(stage, what, needed_by, verdict_if_missing,
                         f"gated on the Hub: accept its terms at https://huggingface.co/datasets/{repo_id}, then "
                         "`hf auth login`")
        except RepositoryNotFoundError:
            return Check(stage, what, needed_by, verdict_if_missing,
                         "no such dataset on the Hub (or it is private: `hf auth login`); check the name")
        except Exception as err:  # refused, DNS, timeout, 5xx (whose classes depend on huggingface_hub's HTTP
            # client: httpx, httpx2): whatever stops the metadata call, the local copy may still do
            reason = f"the Hub is unreachable ({type(err).__name__})"
        else:
            if info.gated and get_token() is None:
                return Check(stage, what, needed_by, verdict_if_missing,
                             f"gated: accept its terms on https://huggingface.co/datasets/{repo_id}, then `hf auth login`")
            configs = _hub_configs(info)
            if config and configs and config not in configs:
                shown = ", ".join(sorted(configs)[:8]) + (", ..." if len(configs) > 8 else "")
                return Check(stage, what, needed_by, FAIL, f"the dataset has no configuration {config!r} ({shown})")
            return Check(stage, what, needed_by, OK, "on the Hub")
    cached = cached_hub_dataset(repo_id, config)
    if cached:
        return Check(stage, what, needed_by, OK, f"{reason}; {cached}")
    return Check(stage, what, needed_by, verdict_if_missing, f"{reason} and there is no local copy: {fix}")


def _hub_configs(info) -> set[str]:
    """Configuration names of a Hub dataset: its card's `configs`, else the top-level folders of its files."""
    card = getattr(info, "card_data", None)
    named = {c.get("config_name") for c in (getattr(card, "configs", None) or []) if isinstance(c, dict)}
    folders = {s.rfilename.split("/", 1)[0] for s in (info.siblings or []) if "/" in s.rfilename}
    return (named - {None}) | folders


def corpus_checks(stage: str, needed_by: str, source: str, config: str | None) -> list[Check]:
    """A text corpus as `tinyllm_hf.data.corpus.load_corpus` reads it: embedded, local, or a Hub dataset."""
    from tinyllm_hf.data.corpus import EMBEDDED_SOURCES, OPTIONAL_SOURCES, is_installed, is_local_source, local_files

    if source == "default" or source in EMBEDDED_SOURCES:
        if source in OPTIONAL_SOURCES and not is_installed(source):
            return [Check(stage, f"corpus {source}", needed_by, FAIL, f"not installed: {OPTIONAL_SOURCES[source]}")]
        return [Check(stage, f"corpus {source}", needed_by, OK, "embedded")]
    if is_local_source(source):
        return [local_data_check(stage, needed_by, source, lambda path: local_files(path))]
    return [hub_dataset_check(stage, needed_by, source, config)]


def rows_checks(stage: str, needed_by: str, sources: list[str], config: str | None) -> list[Check]:
    """Instruction / preference / prompt data as `tinyllm_hf.data.sft.read_rows` reads it ("default" embedded)."""
    from tinyllm_hf.data.corpus import is_local_source, local_files
    from tinyllm_hf.data.sft import LOCAL_SUFFIXES

    checks = []
    for source in sources:
        if source == "default":
            checks.append(Check(stage, "dataset default", needed_by, OK, "embedded"))
        elif is_local_source(source, LOCAL_SUFFIXES):
            checks.append(local_data_check(stage, needed_by, source,
                                           lambda path: local_files(path, LOCAL_SUFFIXES, "data")))
        else:
            checks.append(hub_dataset_check(stage, needed_by, source, config))
    return checks


def local_data_check(stage: str, needed_by: str, source: str, list_files) -> Check:
    path = Path(source).expanduser()
    try:
        files = list_files(path)
    except TinyllmError as err:
        return Check(stage, f"dataset {source}", needed_by, FAIL, str(err))
    empty = [f for f in files if f.stat().st_size == 0]
    if len(empty) == len(files):
        return Check(stage, f"dataset {source}", needed_by, FAIL, f"{'all ' if len(files) > 1 else ''}empty: no data")
    return Check(stage, f"dataset {source}", needed_by, OK, f"{len(files)} data file(s), "
                 f"{sum(f.stat().st_size for f in files) / 2**20:.1f} MiB")


# ---------------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------------


def cuda_device_count() -> int:
    import torch  # only when a launcher asks for GPUs

    return torch.cuda.device_count()


def launcher_checks(stage: str, flags: dict, where: str) -> list[Check]:
    """An `accelerate launch` setup: its config file, DeepSpeed (JSON and package), and processes vs CUDA devices."""
    checks, config = [], {}
    config_file = flags.get("config_file")
    if config_file:
        try:
            config = load_yaml_mapping(config_file, "accelerate config")
            checks.append(Check(stage, f"launcher {config_file}", where, OK, "parses"))
        except TinyllmError as err:
            return [Check(stage, f"launcher {config_file}", where, FAIL, str(err))]
    deepspeed = config.get("distributed_type") == "DEEPSPEED" or flags.get("use_deepspeed") is True
    if deepspeed:
        checks.append(extra_check(stage, f"{where} distributed_type: DEEPSPEED", "deepspeed",
                                  'pip install "tinyllm-hf[deepspeed]"'))
        ds_file = flags.get("deepspeed_config_file") or (config.get("deepspeed_config") or {}).get("deepspeed_config_file")
        if ds_file:
            checks.append(json_file_check(stage, ds_file, f"{config_file or where} deepspeed_config_file"))
    on_cpu = (flags.get("cpu") is True or config.get("use_cpu") is True
              or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))
    processes = int(flags.get("num_processes") or config.get("num_processes") or 1)
    machines = int(flags.get("num_machines") or config.get("num_machines") or 1)
    per_machine = max(1, processes // machines)
    single = config.get("distributed_type", "NO") == "NO" and not deepspeed and processes == 1
    if not on_cpu and not single:
        devices = cuda_device_count()
        what = f"{processes} process(es) on {machines} machine(s)"
        if devices < per_machine:
            checks.append(Check(stage, what, where, FAIL,
                                f"{per_machine} per machine, but {devices} CUDA device(s) are visible here: set "
                                f"num_processes to {devices * machines or 'the GPU count'} (accelerate: in the recipe), "
                                "check CUDA_VISIBLE_DEVICES, or run on CPU with ACCELERATE_USE_CPU=true"))
        else:
            checks.append(Check(stage, what, where, OK, f"{devices} CUDA device(s) visible"))
    return checks


def json_file_check(stage: str, path: str, needed_by: str) -> Check:
    file = Path(path)
    if not file.is_file():
        return Check(stage, f"file {path}", needed_by, FAIL, "not found (paths are relative to where `tinyllm run` runs)")
    try:
        json.loads(file.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return Check(stage, f"file {path}", needed_by, FAIL, f"not valid JSON: {err}")
    return Check(stage, f"file {path}", needed_by, OK, "parses")


# ---------------------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------------------


def stage_settings(entry: dict) -> tuple[dict, str, list[Check]]:
    """(the keys a training stage runs with: its recipe file updated by `args:`, where they come from, checks)."""
    recipe_file = entry.get("recipe")
    settings, checks = {}, []
    if recipe_file:
        try:
            settings = load_yaml_mapping(recipe_file, "recipe file")
        except TinyllmError as err:
            checks.append(Check("", f"recipe {recipe_file}", "recipe:", FAIL, str(err)))
    settings.update(entry.get("args") or {})
    return settings, str(recipe_file or "args"), checks


class Preflight:
    """The checks of a pipeline recipe (`tinyllm_hf.pipeline`): `Preflight(recipe, launcher).run(stages)`.
    `launcher(stage)` is the pipeline's own answer to which `accelerate launch` flags a stage runs under."""

    def __init__(self, recipe: dict, launcher):
        self.recipe = recipe
        self.launcher = launcher

    def run(self, stages: list[str]) -> list[Check]:
        """The checks of `stages`, in stage order; the same check of several stages (a shared launcher, the TRL
        extra) is listed once, naming them all."""
        merged: dict[tuple, list[str]] = {}
        for stage in stages:
            for check in getattr(self, f"check_{stage}", lambda: [])():
                stages_of = merged.setdefault((check.what, check.needed_by, check.verdict, check.detail), [])
                stages_of.append(check.stage or stage)
        return [Check(",".join(dict.fromkeys(s)), *key) for key, s in merged.items()]

    def entry(self, stage: str) -> dict:
        return self.recipe.get(stage) or {}

    # ------------------------------------------------------------- shared by the training stages

    def training(self, stage: str) -> tuple[dict, str, list[Check]]:
        settings, where, checks = stage_settings(self.entry(stage))
        if stage in TRL_STAGES:
            checks.append(extra_check(stage, "training stages", "trl", TRAIN_EXTRA))
        if "tensorboard" in (settings.get("report_to") or []):
            checks.append(extra_check(stage, f"{where} report_to: tensorboard", "tensorboard", TRAIN_EXTRA))
        attention = settings.get("attn_implementation", STAGE_DEFAULT_ATTENTION.get(stage))
        if attention in FLASH_ATTENTION_PACKAGES:
            module, fix = FLASH_ATTENTION_PACKAGES[attention]
            checks.append(extra_check(stage, f"{where} attn_implementation: {attention}", module,
                                      f"{fix}; or set attn_implementation: sdpa", name=module.replace("_", "-")))
        if settings.get("use_peft"):
            checks.append(extra_check(stage, f"{where} use_peft: true", "peft", TRAIN_EXTRA))
        if settings.get("load_in_4bit") or settings.get("load_in_8bit"):
            checks.append(extra_check(stage, f"{where} load_in_4bit/load_in_8bit", "bitsandbytes",
                                      "pip install bitsandbytes (needs a CUDA GPU)"))
        try:
            flags = self.launcher(stage)
        except TinyllmError as err:
            checks.append(Check(stage, "launcher", "accelerate:", FAIL, str(err)))
            flags = None
        if flags:
            checks += launcher_checks(stage, flags, "accelerate:")
        return settings, where, checks

    # ------------------------------------------------------------- one method per stage that needs anything

    def check_tokenizer(self) -> list[Check]:
        entry = self.entry("tokenizer")
        return corpus_checks("tokenizer", "corpus:", str(entry.get("corpus", "default")), entry.get("corpus_config"))

    def check_pretrain(self) -> list[Check]:
        settings, where, checks = self.training("pretrain")
        return checks + corpus_checks("pretrain", f"{where} dataset_name", str(settings.get("dataset_name", "default")),
                                      settings.get("dataset_config"))

    def check_distill(self) -> list[Check]:
        settings, where, checks = self.training("distill")
        source = str(settings.get("dataset_name", "default"))
        if settings.get("data", "corpus") == "corpus":
            return checks + corpus_checks("distill", f"{where} dataset_name", source, settings.get("dataset_config"))
        return checks + rows_checks("distill", f"{where} dataset_name", comma_list(source), settings.get("dataset_config"))

    def check_sft(self) -> list[Check]:
        settings, where, checks = self.training("sft")
        sources = comma_list(str(settings.get("dataset_name", "default")))
        return checks + rows_checks("sft", f"{where} dataset_name", sources, settings.get("dataset_config"))

    def preference(self, stage: str) -> list[Check]:
        settings, where, checks = self.training(stage)
        checks += rows_checks(stage, f"{where} dataset_name", [str(settings.get("dataset_name", "default"))],
                              settings.get("dataset_config"))
        if settings.get("eval_dataset_name"):
            checks += rows_checks(stage, f"{where} eval_dataset_name", [settings["eval_dataset_name"]], None)
        return checks

    def check_reward(self) -> list[Check]:
        return self.preference("reward")

    def check_dpo(self) -> list[Check]:
        return self.preference("dpo")

    def check_grpo(self) -> list[Check]:
        settings, where, checks = self.training("grpo")
        checks += rows_checks("grpo", f"{where} dataset_name", [str(settings.get("dataset_name", "default"))],
                              settings.get("dataset_config"))
        if settings.get("use_vllm"):
            checks.append(extra_check("grpo", f"{where} use_vllm: true", "vllm",
                                      "pip install vllm (a build matching this torch and transformers: docs/alignment.md)"))
        rewards = comma_list(settings.get("rewards"))
        if "reward_model" in rewards and not self.recipe.get("reward"):
            path = settings.get("reward_model_path")
            found = bool(path) and Path(path, "config.json").is_file()
            checks.append(Check("grpo", f"reward model {path}", f"{where} rewards: reward_model", OK if found else FAIL,
                                "found" if found else "not a model folder: add a reward stage to the recipe, or set "
                                "reward_model_path to a folder written by `tinyllm reward`"))
        return checks

    def check_eval(self) -> list[Check]:
        from tinyllm_hf.evaluation.benchmarks import BENCHMARKS, HUB_NAMES

        benchmarks = self.entry("eval").get("benchmarks") or {}
        checks = []
        for name in benchmarks.get("run", BENCHMARKS) if benchmarks else []:
            folder = benchmarks.get(f"{name}_dir")
            key = f"benchmarks.{name}_dir"
            if folder:
                found = Path(folder).is_dir()
                checks.append(Check("eval", f"benchmark {name} {folder}", key, OK if found else FAIL,
                                    "found" if found else "not a folder: give the official layout's folder"))
            elif benchmarks.get("source", "auto") in ("auto", "hub"):
                # The stage runs with --skip-unavailable: a benchmark it cannot fetch is recorded as skipped.
                checks.append(hub_dataset_check("eval", key, HUB_NAMES[name], verdict_if_missing=WARN,
                                                fix=f"the stage skips it (or set {key} to a local copy)"))
        return checks

    def check_gguf(self) -> list[Check]:
        outtypes = self.entry("gguf").get("outtypes", ["f16"])
        checks = [extra_check("gguf", f"gguf.outtypes: {', '.join(outtypes)}", "gguf", 'pip install "tinyllm-hf[quant]"')]
        if "q4_k_m" in outtypes:
            checks.append(llama_cpp_quantizer_check())
        return checks

    def check_quantize(self) -> list[Check]:
        from tinyllm_hf.export.quantize import GPU_ONLY, METHODS

        checks = []
        for method in self.entry("quantize").get("methods", []):
            key = f"quantize.methods: {method}"
            if method not in METHODS:
                why = "needs a CUDA GPU" if method in GPU_ONLY else "unknown method"
                checks.append(Check("quantize", f"method {method}", key, FAIL, f"{why}; CPU methods: {', '.join(METHODS)}"))
                continue
            modules, extra = METHODS[method]
            missing = [m for m in modules if not importable(m)]
            checks.append(Check("quantize", f"extra {', '.join(modules)}", key, FAIL if missing else OK,
                                f"not installed: {', '.join(missing)}: pip install \"tinyllm-hf[{extra}]\"" if missing
                                else "installed"))
        return checks


def llama_cpp_quantizer_check() -> Check:
    """llama.cpp's quantizer as `tinyllm_hf.export.gguf.quantize_with_llama_cpp` calls it: llama-cpp-python's bundled
    library, loaded (a wheel built for another CPU or a missing shared library fails here, not hours in)."""
    what, key = "extra llama-cpp-python (llama.cpp's quantizer)", "gguf.outtypes: q4_k_m"
    fix = 'pip install "tinyllm-hf[llamacpp]" (builds llama.cpp from source: scripts/test.sh shows the flags)'
    if not importable("llama_cpp"):
        return Check("gguf", what, key, FAIL, f"not installed: {fix}")
    try:
        import llama_cpp
    except Exception as err:  # the package is there but its shared library does not load
        return Check("gguf", what, key, FAIL, f"installed but does not load ({type(err).__name__}: {err}); reinstall: {fix}")
    if not hasattr(llama_cpp, "llama_model_quantize"):
        return Check("gguf", what, key, FAIL, f"this llama-cpp-python has no llama_model_quantize: {fix}")
    return Check("gguf", what, key, OK, f"installed ({getattr(llama_cpp, '__version__', '?')})")


# ---------------------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------------------


def failures(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.verdict == FAIL]


def format_checks(checks: list[Check]) -> str:
    failed, warned = len(failures(checks)), sum(c.verdict == WARN for c in checks)
    lines = [c.line() for c in checks] or ["(nothing to check)"]
    verdict = (f"preflight: {failed} of {len(checks)} check(s) failed" if failed
               else f"preflight: all {len(checks)} check(s) passed" + (f" ({warned} warning(s))" if warned else ""))
    return "\n".join([*lines, verdict])


def raise_on_failures(checks: list[Check]) -> None:
    failed = failures(checks)
    if failed:
        listing = "\n  ".join(c.line() for c in failed)
        raise PreflightError(f"preflight: {len(failed)} check(s) failed before any stage ran:\n  {listing}\n"
                             "fix them and run again (`tinyllm run --config RECIPE --check` lists every check)")
