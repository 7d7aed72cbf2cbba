"""ModelScope (魔搭): the same releases as on the Hugging Face Hub, for users who reach modelscope.cn faster.

    tinyllm push --hub modelscope --model runs/quickstart/dpo --repo-id you/tinyllm-zh-quickstart [--dry-run OUT]
    tinyllm push --hub modelscope --space --model you/tinyllm-zh-quickstart --repo-id you/tinyllm-zh-demo
    TINYLLM_HUB=modelscope tinyllm eval --model you/tinyllm-zh-quickstart ...   # load repo ids from ModelScope

A model release is the Hub release (`push.stage_model`: weights, remote code, tokenizer, card) plus what ModelScope
reads: `configuration.json` (framework and task; `allow_remote` for a model that ships its modeling code) and, in the
card's YAML header, ModelScope's `tasks` and `frameworks` next to the Hub's fields. A Studio (创空间) runs the demo's
app.py unchanged, as the Hub Space does, with `ms_deploy.json` saying how to run it. Everything goes through the
`modelscope` SDK (`pip install "tinyllm-hf[modelscope]"`), imported only when a ModelScope command runs.
"""

import json
import os
from pathlib import Path

from huggingface_hub import ModelCard

from tinyllm_hf.errors import MissingDependencyError, ReleaseError
from tinyllm_hf.hub.card import PROJECT_LICENCE

TOKEN_ENV = "MODELSCOPE_API_TOKEN"  # the SDK's own variable; https://modelscope.cn/my/myaccesstoken
CONFIGURATION_FILE = "configuration.json"
DEPLOY_FILE = "ms_deploy.json"
# A Gradio Studio on ModelScope's free CPU machines; the app listens where the platform routes traffic.
STUDIO_RESOURCES = "platform/2v-cpu-16g-mem"
STUDIO_ENVIRONMENT = {"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7860", "TINYLLM_HUB": "modelscope"}
# Our repo types -> ModelScope's.
REPO_TYPES = {"model": "model", "space": "studio"}


def require_modelscope():
    try:
        import modelscope
    except ImportError:
        raise MissingDependencyError('ModelScope needs its SDK: pip install "tinyllm-hf[modelscope]"') from None
    return modelscope


def configuration(model_type: str) -> dict:
    """ModelScope's configuration.json: how its pipelines and `snapshot_download` users should treat the model."""
    config = {"framework": "pytorch", "task": "text-generation"}
    if model_type == "tinyllm":
        config["allow_remote"] = True  # the release ships configuration_/modeling_tinyllm.py (auto_map)
    return config


def stage_model_extras(out_dir, repo_id: str) -> None:
    """Add ModelScope's files to a staged Hub release in `out_dir`: configuration.json and the card's metadata."""
    out_dir = Path(out_dir)
    config_file = out_dir / "config.json"  # absent from a LoRA adapter's release
    model_type = json.loads(config_file.read_text("utf-8")).get("model_type") if config_file.is_file() else None
    (out_dir / CONFIGURATION_FILE).write_text(json.dumps(configuration(model_type), indent=2) + "\n", "utf-8")
    card = ModelCard.load(out_dir / "README.md")
    card.data.tasks = ["text-generation"]
    card.data.frameworks = ["pytorch"]
    card.text = (
        f"\n> On ModelScope: `from modelscope import snapshot_download; path = snapshot_download(\"{repo_id}\")`, "
        "then load `path` as below (or set `TINYLLM_HUB=modelscope` and give tinyllm commands the repo id).\n"
        + card.text
    )
    card.save(out_dir / "README.md")


def stage_studio(model_repo_id: str, out_dir, studio_repo_id: str) -> None:
    """A ModelScope Studio (创空间) running the demo's app.py unchanged: add its deploy spec and README to the files
    `push.stage_space` wrote (app.py, requirements.txt, model_id.txt)."""
    import gradio

    out_dir = Path(out_dir)
    deploy = {
        "$schema": "https://modelscope.cn/api/v1/studios/deploy_schema.json",
        "sdk_type": "gradio",
        "sdk_version": gradio.__version__,
        "resource_configuration": STUDIO_RESOURCES,
        "environment_variables": [{"name": name, "value": value} for name, value in STUDIO_ENVIRONMENT.items()],
    }
    (out_dir / DEPLOY_FILE).write_text(json.dumps(deploy, indent=2) + "\n", "utf-8")
    readme = (
        "---\n"
        "domain:\n- nlp\n"
        f"models:\n- {model_repo_id}\n"
        f"license: {PROJECT_LICENCE}\n"  # the Studio is tinyllm-hf's demo app; the model's card has the model's
        "tags:\n- tinyllm\n- chinese\n"
        "---\n\n"
        f"# {studio_repo_id.split('/')[-1]}\n\n"
        f"Chat demo of [{model_repo_id}](https://modelscope.cn/models/{model_repo_id}), served by `tinyllm demo`'s "
        "app.\nThe app downloads the model from ModelScope (`TINYLLM_HUB=modelscope` in ms_deploy.json); set "
        f"`TINYLLM_MODEL` to load another one, or it loads `{model_repo_id}`.\n"
    )
    (out_dir / "README.md").write_text(readme, "utf-8")


def upload(staged_dir, repo_id: str, repo_type: str = "model", private: bool = False, revision: str | None = None,
           commit_message: str | None = None):
    """Create the ModelScope repo if needed and upload the staged folder with the SDK's `upload_folder`."""
    token = os.environ.get(TOKEN_ENV)
    if not token:
        raise ReleaseError(f"no ModelScope token: set {TOKEN_ENV} (an access token from "
                           "https://modelscope.cn/my/myaccesstoken), then push again")
    require_modelscope()
    from modelscope.hub.api import HubApi

    api = HubApi(token=token)
    ms_type = REPO_TYPES[repo_type]
    api.create_repo(repo_id, repo_type=ms_type, visibility="private" if private else "public", exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id, folder_path=str(staged_dir), repo_type=ms_type, revision=revision,
        commit_message=commit_message or f"Release {repo_id.split('/')[-1]} with tinyllm push",
    )


def snapshot(repo_id: str, revision: str | None = None) -> str:
    """The local folder of ModelScope repo `repo_id` (downloaded once into ModelScope's cache)."""
    modelscope = require_modelscope()
    return modelscope.snapshot_download(repo_id, revision=revision)
