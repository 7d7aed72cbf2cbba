"""The web chat demo as a Hugging Face Space or a ModelScope Studio: `tinyllm push --space [--hub modelscope]` copies
this file unchanged into it.

The model comes from the `TINYLLM_MODEL` variable (a Hub repo id or a local directory; set it in the Space's
settings), else from `model_id.txt` next to this file (written by `tinyllm push --space`). On a Space, Gradio's
`GRADIO_SERVER_NAME` / `GRADIO_SERVER_PORT` variables say where to listen; locally it binds 127.0.0.1:7860. A
`TINYLLM_DEMO_AUTH` secret (`USER:PASSWORD`) puts a login in front of the chat; the queue of waiting replies is bounded
as `tinyllm demo`'s is by default.

    TINYLLM_MODEL=out/sft python app.py
"""

import os
import sys
from pathlib import Path

from tinyllm_hf.errors import UsageError
from tinyllm_hf.inference.demo import AUTH_ENV, build_demo, launch, parse_auth
from tinyllm_hf.inference.engine import Engine
from tinyllm_hf.inference.runtime import TransformersRuntime


def model_source() -> str:
    if os.environ.get("TINYLLM_MODEL"):
        return os.environ["TINYLLM_MODEL"]
    id_file = Path(__file__).with_name("model_id.txt")
    if id_file.is_file():
        return id_file.read_text(encoding="utf-8").strip()
    raise SystemExit("set TINYLLM_MODEL to a model repo id or checkpoint directory (or write model_id.txt)")


def model_dir(source: str) -> Path:
    """A local checkpoint directory as is; anything else is a repo id, downloaded once from the Hugging Face Hub, or
    from ModelScope with TINYLLM_HUB=modelscope (as on a ModelScope Studio)."""
    from tinyllm_hf.model_utils import resolve_model_source, selected_hub

    if Path(source).is_dir() or selected_hub() == "modelscope":
        return Path(resolve_model_source(source))
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source))


def login() -> tuple[str, str] | None:
    try:
        return parse_auth(os.environ[AUTH_ENV]) if os.environ.get(AUTH_ENV) else None
    except UsageError as exc:
        raise SystemExit(str(exc)) from None


def main() -> int:
    auth = login()  # before the model downloads
    source = model_source()
    engine = Engine(TransformersRuntime.from_pretrained(model_dir(source)))
    host = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    port = int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
    launch(build_demo(engine, title=f"tinyllm chat: {source}"), host, port, auth=auth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
