"""`tinyllm run --check` and the checks before stage 1: datasets, extras and launchers a recipe needs, one line each."""

import textwrap

import datasets
import pytest
from huggingface_hub import constants

from tinyllm_hf import preflight
from tinyllm_hf.cli import run_command
from tinyllm_hf.pipeline import main as run_main

SFT_FLASH = """\
dataset_name: default
attn_implementation: flash_attention_2
report_to: [none]
"""


def write_recipe(tmp_path, stages: str, **files) -> str:
    for name, text in files.items():
        (tmp_path / name).write_text(textwrap.dedent(text), "utf-8")
    recipe = tmp_path / "pipeline.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\n" + textwrap.dedent(stages), "utf-8")
    return str(recipe)


def without_modules(monkeypatch, *missing: str) -> None:
    """As if `missing` were not installed, whatever this environment has."""
    real = preflight.importable
    monkeypatch.setattr(preflight, "importable", lambda module: module not in missing and real(module))


def test_missing_extra_fails_the_check_and_the_run_before_any_stage(tmp_path, monkeypatch, capsys):
    without_modules(monkeypatch, "flash_attn")
    recipe = write_recipe(tmp_path, f"sft:\n  recipe: {tmp_path / 'sft.yaml'}\n", **{"sft.yaml": SFT_FLASH})
    line = (f"[FAIL] sft: extra flash-attn ({tmp_path / 'sft.yaml'} attn_implementation: flash_attention_2): not "
            "installed: pip install flash-attn --no-build-isolation; or set attn_implementation: sdpa")

    assert run_main(["--config", recipe, "--check"]) == 1
    out = capsys.readouterr().out
    assert line in out.splitlines()
    assert out.splitlines()[-1] == "preflight: 1 of 3 check(s) failed"  # the others: TRL, the embedded dataset

    assert run_command("tinyllm run", run_main, ["--config", recipe]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tinyllm run: error: preflight: 1 check(s) failed before any stage ran:\n  " + line)
    assert not (tmp_path / "run").exists()  # nothing started: no run folder, no stage folder


def test_q4_k_m_needs_llama_cpp_quantizer(tmp_path, monkeypatch, capsys):
    without_modules(monkeypatch, "llama_cpp")
    recipe = write_recipe(tmp_path, "gguf:\n  outtypes: [f16, q4_k_m]\n")
    assert run_main(["--config", recipe, "--check"]) == 1
    assert ('[FAIL] gguf: extra llama-cpp-python (llama.cpp\'s quantizer) (gguf.outtypes: q4_k_m): not installed: '
            'pip install "tinyllm-hf[llamacpp]" (builds llama.cpp from source: scripts/test.sh shows the flags)'
            in capsys.readouterr().out.splitlines())


def test_llama_cpp_quantizer_loads_when_installed():
    pytest.importorskip("llama_cpp", reason='needs llama-cpp-python: pip install "tinyllm-hf[llamacpp]"')
    check = preflight.llama_cpp_quantizer_check()
    assert check.verdict == preflight.OK, check.line()


def test_quickstart_recipe_passes():
    checks = preflight.Preflight(*quickstart()).run(["tokenizer", "pretrain", "sft", "reward", "dpo", "eval", "gguf",
                                                      "quantize", "release", "report"])
    assert not preflight.failures(checks), preflight.format_checks(checks)
    assert {"tokenizer", "pretrain", "sft", "reward", "dpo", "gguf", "quantize"} <= {
        stage for c in checks for stage in c.stage.split(",")}


def quickstart():
    from pathlib import Path

    from tinyllm_hf.pipeline import Pipeline, load_pipeline_recipe

    recipe = load_pipeline_recipe("recipes/quickstart.yaml")
    return recipe, Pipeline(recipe, Path("runs/unused"), Path("recipes/quickstart.yaml")).launcher


def test_quickstart_check_exits_0(capsys):
    assert run_main(["--config", "recipes/quickstart.yaml", "--check"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("preflight: all ")


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE as set before import, and an empty datasets cache."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "datasets-cache"
    cache.mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_hub_dataset_offline_without_a_copy_is_one_line_naming_it_and_the_fix(tmp_path, offline_hub, capsys):
    recipe = write_recipe(tmp_path, f"sft:\n  recipe: {tmp_path / 'sft.yaml'}\n",
                          **{"sft.yaml": "dataset_name: default,BelleGroup/train_0.5M_CN\nreport_to: [none]\n"})
    assert run_main(["--config", recipe, "--check"]) == 1
    failed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[FAIL]")]
    assert failed == [
        f"[FAIL] sft: dataset BelleGroup/train_0.5M_CN ({tmp_path / 'sft.yaml'} dataset_name): HF_HUB_OFFLINE is set "
        "and there is no local copy: load it once with the Hub reachable (datasets then keeps a copy it reads under "
        "HF_HUB_OFFLINE=1), or `hf download BelleGroup/train_0.5M_CN --repo-type dataset --local-dir "
        "data/train_0.5M_CN` and set dataset_name to data/train_0.5M_CN"
    ]


def test_hub_dataset_offline_is_found_where_datasets_reads_it(offline_hub):
    """The prepared copy the check accepts is the one `datasets` itself loads offline (its CachedDatasetModuleFactory)."""
    from datasets.load import CachedDatasetModuleFactory

    name, config = "wikimedia/wikipedia", "20231101.zh"
    assert preflight.hub_dataset_check("pretrain", "dataset_name", name, config).verdict == preflight.FAIL
    with pytest.raises(FileNotFoundError):
        CachedDatasetModuleFactory(name, cache_dir=str(offline_hub)).get_module()

    (offline_hub / "wikimedia___wikipedia" / config / "0.0.0" / "abc123").mkdir(parents=True)
    check = preflight.hub_dataset_check("pretrain", "dataset_name", name, config)
    assert check.verdict == preflight.OK and "datasets cache" in check.detail
    CachedDatasetModuleFactory(name, cache_dir=str(offline_hub)).get_module()  # datasets finds the same copy
    # Another configuration of the same dataset is not there.
    assert preflight.hub_dataset_check("pretrain", "dataset_name", name, "20231101.en").verdict == preflight.FAIL


def test_local_datasets_must_exist_and_hold_data(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("一篇文档\n", "utf-8")
    checks = {c.what: c for c in preflight.corpus_checks("pretrain", "dataset_name", str(tmp_path / "corpus"), None)
              + preflight.corpus_checks("pretrain", "dataset_name", str(tmp_path / "missing"), None)
              + preflight.rows_checks("sft", "dataset_name", [str(tmp_path / "empty")], None)}
    assert checks[f"dataset {tmp_path / 'corpus'}"].verdict == preflight.OK
    assert checks[f"dataset {tmp_path / 'missing'}"].detail == f"corpus not found: {tmp_path / 'missing'}"
    assert checks[f"dataset {tmp_path / 'empty'}"].detail == f"{tmp_path / 'empty'}: no .jsonl/.json files in this directory"


def test_launchers_config_deepspeed_json_and_gpu_count(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "cuda_device_count", lambda: 2)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    ds_config = tmp_path / "ds.yaml"
    ds_config.write_text("distributed_type: DEEPSPEED\nnum_processes: 8\n"
                         f"deepspeed_config:\n  deepspeed_config_file: {tmp_path / 'zero2.json'}\n", "utf-8")
    lines = [c.line() for c in preflight.launcher_checks("pretrain", {"config_file": str(ds_config)}, "accelerate:")]
    assert f"[FAIL] pretrain: file {tmp_path / 'zero2.json'} ({ds_config} deepspeed_config_file): not found (paths " \
           "are relative to where `tinyllm run` runs)" in lines
    assert ("[FAIL] pretrain: 8 process(es) on 1 machine(s) (accelerate:): 8 per machine, but 2 CUDA device(s) are "
            "visible here: set num_processes to 2 (accelerate: in the recipe), check CUDA_VISIBLE_DEVICES, or run on "
            "CPU with ACCELERATE_USE_CPU=true") in lines

    # The shipped configs parse; 16 processes on 2 machines fit 8 GPUs each; the command line's flags win.
    monkeypatch.setattr(preflight, "cuda_device_count", lambda: 8)
    for flags in ({"config_file": "recipes/accelerate/multi_node.yaml"},
                  {"config_file": "recipes/accelerate/multi_gpu.yaml", "num_processes": 8}):
        assert all(c.verdict == preflight.OK for c in preflight.launcher_checks("sft", flags, "accelerate:"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("distributed_type: [\n", "utf-8")
    (check,) = preflight.launcher_checks("sft", {"config_file": str(broken)}, "accelerate:")
    assert check.verdict == preflight.FAIL and "is not valid YAML" in check.detail


def test_92m_recipe_names_every_extra_it_needs(monkeypatch):
    """Everything missing at once: each is its own line, naming the stage and the key."""
    without_modules(monkeypatch, "deepspeed", "vllm", "llama_cpp", "flash_attn", "openvino")
    monkeypatch.setattr(preflight, "cuda_device_count", lambda: 8)
    monkeypatch.setattr(preflight, "hub_dataset_check",
                        lambda stage, key, name, config=None, **kw: preflight.Check(stage, name, key, "ok", "stub"))
    from pathlib import Path

    from tinyllm_hf.pipeline import Pipeline, load_pipeline_recipe

    recipe = load_pipeline_recipe("recipes/92m.yaml")
    pipeline = Pipeline(recipe, Path("runs/unused"), Path("recipes/92m.yaml"))
    failed = {(c.what, c.needed_by) for c in preflight.failures(pipeline.preflight(pipeline.selected_stages()))}
    assert not any("deepspeed" in what for what, _ in failed)  # plain DDP at 92m (docs/training.md)
    assert ("extra vllm", "recipes/grpo/vllm.yaml use_vllm: true") in failed
    assert ("extra llama-cpp-python (llama.cpp's quantizer)", "gguf.outtypes: q4_k_m") in failed
    assert ("extra openvino, nncf", "quantize.methods: openvino-int8") in failed
    assert not any("flash" in what for what, _ in failed)  # the SFT recipe runs on sdpa

    # The larger presets' ZeRO-3 launcher needs deepspeed.
    recipe["accelerate"] = {**recipe["accelerate"], "config_file": "recipes/accelerate/deepspeed_zero3.yaml"}
    pipeline = Pipeline(recipe, Path("runs/unused"), Path("recipes/92m.yaml"))
    failed = {(c.what, c.needed_by) for c in preflight.failures(pipeline.preflight(pipeline.selected_stages()))}
    assert ("extra deepspeed", "accelerate: distributed_type: DEEPSPEED") in failed


def test_a_stage_asked_for_flash_attention_without_flash_attn_stops_at_once(tiny_model_dir):
    """Run alone (not through `tinyllm run`), a stage still says what is missing before loading anything, instead of
    transformers fetching a kernel from the Hub."""
    import importlib.util

    from tinyllm_hf.errors import MissingDependencyError
    from tinyllm_hf.model_utils import get_model

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(MissingDependencyError) as error:
        get_model(str(tiny_model_dir), attn_implementation="flash_attention_2")
    assert str(error.value) == (
        "attn_implementation flash_attention_2 needs the flash_attn package, which is not installed: pip install "
        "flash-attn --no-build-isolation, or set attn_implementation: sdpa (packed rows stay per-conversation there "
        "too: docs/sft.md)")


def test_hub_dataset_online_checks_name_configuration_and_reachability(monkeypatch, offline_hub):
    """With the Hub answering (its metadata only), a missing name or configuration is named; an unreachable Hub
    falls back to datasets' cache, as `load_dataset` does."""
    from types import SimpleNamespace

    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    wikipedia = SimpleNamespace(gated=False, card_data=None, siblings=[
        SimpleNamespace(rfilename=f) for f in ("README.md", "20231101.zh/train-00000-of-00003.parquet",
                                               "20231101.en/train-00000-of-00041.parquet")])

    def dataset_info(self, repo_id, **kwargs):
        if repo_id == "wikimedia/wikipedia":
            return wikipedia
        if repo_id == "nobody/nothing":
            response = SimpleNamespace(headers={}, request=None, status_code=404)  # what the error reads of it
            raise RepositoryNotFoundError("404 Client Error", response=response)
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(HfApi, "dataset_info", dataset_info)
    check = preflight.hub_dataset_check
    assert check("pretrain", "k", "wikimedia/wikipedia", "20231101.zh").detail == "on the Hub"
    assert check("pretrain", "k", "wikimedia/wikipedia", "20231101.xx").detail == (
        "the dataset has no configuration '20231101.xx' (20231101.en, 20231101.zh)")
    assert check("sft", "k", "nobody/nothing").detail == (
        "no such dataset on the Hub (or it is private: `hf auth login`); check the name")
    unreachable = check("sft", "k", "BelleGroup/train_0.5M_CN")
    assert unreachable.verdict == preflight.FAIL
    assert unreachable.detail.startswith("the Hub is unreachable (ConnectionError) and there is no local copy: ")
