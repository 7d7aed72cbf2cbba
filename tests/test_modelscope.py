"""ModelScope: `tinyllm push --hub modelscope` stages the Hub release plus ModelScope's files and uploads it with the
SDK; `TINYLLM_HUB=modelscope` loads repo ids from ModelScope; the Studio layout runs the demo app unchanged.

The SDK's network calls are answered by `FakeModelScope`, a stand-in `modelscope` module installed in sys.modules that
records each call and the staged files it was given. Where the real SDK is installed (the `[modelscope]` extra, part
of `[dev]`), every recorded call is also bound to the real SDK's signatures, so a call the SDK would reject fails here.
"""

import inspect
import json
import sys
import types
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from tinyllm_hf.cli import main as tinyllm
from tinyllm_hf.errors import MissingDependencyError, UsageError
from tinyllm_hf.hub import push

APP = Path(push.__file__).resolve().parents[1] / "inference" / "app.py"


def real_sdk():
    """The installed SDK's (create_repo, upload_folder, snapshot_download), or None without it."""
    try:
        from modelscope.hub.api import HubApi
        from modelscope.hub.snapshot_download import snapshot_download
        from modelscope_hub.api import HubApi as InnerHubApi
    except ImportError:
        return None
    # The legacy HubApi.upload_folder takes **kwargs and hands them to the inner API's upload_folder.
    return HubApi.create_repo, InnerHubApi.upload_folder, snapshot_download


REAL_SDK = real_sdk()


class FakeModelScope:
    """Records HubApi calls (with a copy of the uploaded folder) and snapshot downloads; serves `snapshot_dir`."""

    def __init__(self, snapshot_dir=None):
        self.calls = []
        self.uploaded = {}
        fake = self

        class HubApi:
            def __init__(self, endpoint=None, token=None, **kwargs):
                fake.calls.append(("HubApi", (), {"token": token}))

            def create_repo(self, repo_id, **kwargs):
                fake.calls.append(("create_repo", (repo_id,), kwargs))

            def upload_folder(self, repo_id, folder_path=None, **kwargs):
                fake.calls.append(("upload_folder", (repo_id,), {"folder_path": folder_path, **kwargs}))
                fake.uploaded = {str(p.relative_to(folder_path)): p.read_bytes()
                                 for p in Path(folder_path).rglob("*") if p.is_file()}
                return {"commit": "a" * 40}

        def snapshot_download(model_id, **kwargs):
            fake.calls.append(("snapshot_download", (model_id,), kwargs))
            return str(snapshot_dir)

        self.module = types.ModuleType("modelscope")
        self.module.snapshot_download = snapshot_download
        self.module.hub = types.ModuleType("modelscope.hub")
        self.module.hub.api = types.ModuleType("modelscope.hub.api")
        self.module.hub.api.HubApi = HubApi

    def install(self, monkeypatch):
        for name, module in (("modelscope", self.module), ("modelscope.hub", self.module.hub),
                             ("modelscope.hub.api", self.module.hub.api)):
            monkeypatch.setitem(sys.modules, name, module)
        return self

    def named(self, name):
        return [(args, kwargs) for call, args, kwargs in self.calls if call == name]


def check_against_real_sdk(fake):
    if REAL_SDK is None:
        return
    create_repo, upload_folder, snapshot_download = REAL_SDK
    for args, kwargs in fake.named("create_repo"):
        inspect.signature(create_repo).bind(None, *args, **kwargs)
    for args, kwargs in fake.named("upload_folder"):
        inspect.signature(upload_folder).bind(None, *args, **kwargs)
    for args, kwargs in fake.named("snapshot_download"):
        inspect.signature(snapshot_download).bind(*args, **kwargs)


@pytest.fixture
def staged(tiny_model_dir, tmp_path):
    out = tmp_path / "staged"
    assert push.main(["--hub", "modelscope", "--model", str(tiny_model_dir), "--repo-id", "alice/tiny",
                      "--dry-run", str(out)]) == 0
    return out


def test_the_release_is_the_hub_release_plus_configuration_json(staged, tiny_model_dir, tmp_path):
    hub = tmp_path / "hub"
    assert push.main(["--model", str(tiny_model_dir), "--repo-id", "alice/tiny", "--dry-run", str(hub)]) == 0
    assert {p.name for p in staged.iterdir()} == {p.name for p in hub.iterdir()} | {"configuration.json"}
    assert (staged / "model.safetensors").read_bytes() == (hub / "model.safetensors").read_bytes()
    assert json.loads((staged / "configuration.json").read_text()) == {
        "framework": "pytorch", "task": "text-generation", "allow_remote": True}


def test_the_card_carries_modelscope_metadata_and_keeps_the_hubs(staged):
    card = ModelCard.load(staged / "README.md")
    header = yaml.safe_load((staged / "README.md").read_text("utf-8").split("---")[1])
    assert header["tasks"] == ["text-generation"] and header["frameworks"] == ["pytorch"]
    assert card.data.language == "zh" and card.data.pipeline_tag == "text-generation"
    assert 'snapshot_download("alice/tiny")' in card.text


def test_upload_creates_the_repo_and_uploads_the_staged_folder(tiny_model_dir, staged, tmp_path, monkeypatch, capsys):
    fake = FakeModelScope().install(monkeypatch)
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", "ms-test")
    assert tinyllm(["push", "--hub", "modelscope", "--model", str(tiny_model_dir), "--repo-id", "alice/tiny",
                    "--private", "--revision", "dev", "--message", "first release"]) == 0
    assert fake.named("HubApi") == [((), {"token": "ms-test"})]
    assert fake.named("create_repo") == [(("alice/tiny",), {"repo_type": "model", "visibility": "private",
                                                             "exist_ok": True})]
    [(args, kwargs)] = fake.named("upload_folder")
    assert args == ("alice/tiny",) and kwargs["revision"] == "dev" and kwargs["commit_message"] == "first release"
    assert kwargs["repo_type"] == "model"
    assert set(fake.uploaded) == {p.name for p in staged.iterdir()}
    assert fake.uploaded["model.safetensors"] == (staged / "model.safetensors").read_bytes()
    assert not Path(kwargs["folder_path"]).exists()  # the temporary staging folder is cleaned up
    assert "https://modelscope.cn/models/alice/tiny" in capsys.readouterr().out
    check_against_real_sdk(fake)


def test_upload_without_a_token_says_which_variable_to_set(tiny_model_dir, monkeypatch, capsys):
    fake = FakeModelScope().install(monkeypatch)
    monkeypatch.delenv("MODELSCOPE_API_TOKEN", raising=False)
    assert tinyllm(["push", "--hub", "modelscope", "--model", str(tiny_model_dir), "--repo-id", "alice/tiny"]) == 1
    err = capsys.readouterr().err
    assert "no ModelScope token" in err and "MODELSCOPE_API_TOKEN" in err and len(err.strip().splitlines()) == 1
    assert fake.calls == []


@pytest.mark.parametrize("extra", [["--dataset", "sft"], ["--model", "m", "--create-pr"]])
def test_hub_only_releases_are_refused_for_modelscope(extra, capsys):
    with pytest.raises(SystemExit) as exit_info:
        push.main(["--hub", "modelscope", "--repo-id", "alice/x", *extra])
    assert exit_info.value.code == 2
    assert "is for the Hugging Face Hub" in capsys.readouterr().err


def test_studio_layout_runs_the_demo_app_from_modelscope(tmp_path, monkeypatch):
    pytest.importorskip("gradio", reason='the Studio runs the Gradio demo: pip install "tinyllm-hf[serve]"')
    import gradio

    out = tmp_path / "studio"
    assert push.main(["--hub", "modelscope", "--space", "--model", "alice/tiny", "--repo-id", "alice/tiny-demo",
                      "--dry-run", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "app.py", "model_id.txt", "ms_deploy.json",
                                                      "requirements.txt"]
    assert (out / "app.py").read_bytes() == APP.read_bytes()
    assert (out / "requirements.txt").read_text().startswith("tinyllm-hf[serve]==")
    assert (out / "model_id.txt").read_text() == "alice/tiny\n"
    deploy = json.loads((out / "ms_deploy.json").read_text())
    assert deploy["sdk_type"] == "gradio" and deploy["sdk_version"] == gradio.__version__
    env = {item["name"]: item["value"] for item in deploy["environment_variables"]}
    assert env["TINYLLM_HUB"] == "modelscope" and env["GRADIO_SERVER_NAME"] == "0.0.0.0"
    header = yaml.safe_load((out / "README.md").read_text("utf-8").split("---")[1])
    assert header["models"] == ["alice/tiny"] and header["domain"] == ["nlp"]

    # What the Studio's environment makes the app do: download the model id from ModelScope.
    fake = FakeModelScope(snapshot_dir=tmp_path / "snap").install(monkeypatch)
    (tmp_path / "snap").mkdir()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TINYLLM_MODEL", raising=False)
    sys.path.insert(0, str(out))
    try:
        import app as studio_app
    finally:
        sys.path.remove(str(out))
        sys.modules.pop("app", None)
    assert studio_app.model_dir(studio_app.model_source()) == tmp_path / "snap"
    assert fake.named("snapshot_download") == [(("alice/tiny",), {"revision": None})]


def test_tinyllm_hub_modelscope_loads_repo_ids_from_modelscope(tiny_model_dir, monkeypatch):
    from tinyllm_hf.model_utils import get_model, get_tokenizer

    fake = FakeModelScope(snapshot_dir=tiny_model_dir).install(monkeypatch)
    monkeypatch.setenv("TINYLLM_HUB", "modelscope")
    tokenizer = get_tokenizer("alice/tiny", revision="v1", needs_chat_template=True)
    model = get_model("alice/tiny", chat_tokenizer=tokenizer)
    assert model.config.model_type == "tinyllm" and len(tokenizer) == model.config.vocab_size
    assert fake.named("snapshot_download") == [(("alice/tiny",), {"revision": "v1"}),
                                               (("alice/tiny",), {"revision": None})]
    get_tokenizer(str(tiny_model_dir))  # a local folder is never looked up
    assert len(fake.named("snapshot_download")) == 2
    check_against_real_sdk(fake)


def test_a_wrong_hub_name_or_a_missing_sdk_is_a_clear_error(monkeypatch):
    from tinyllm_hf.model_utils import get_tokenizer

    monkeypatch.setenv("TINYLLM_HUB", "modelscop")
    with pytest.raises(UsageError, match="TINYLLM_HUB='modelscop'.*huggingface or modelscope"):
        get_tokenizer("alice/tiny")
    monkeypatch.setenv("TINYLLM_HUB", "modelscope")
    monkeypatch.setitem(sys.modules, "modelscope", None)
    with pytest.raises(MissingDependencyError, match=r"tinyllm-hf\[modelscope\]"):
        get_tokenizer("alice/tiny")
