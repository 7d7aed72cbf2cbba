"""The one tokenizer, config and model loader of every command, and the one `--trust-remote-code` option.

Trust model: no command runs Python code shipped in a model folder or Hub repo (`auto_map` in its config) unless the
user passes `--trust-remote-code`. Tinyllm folders need no remote code, since `import tinyllm_hf` registers the
Tinyllm classes with the Auto classes, and transformers' own architectures need none either. The loaders here always
pass `trust_remote_code` to transformers explicitly: left at None, transformers asks on stdin whether to run the code,
so a piped "y" would run it.

`get_tokenizer` checks what the stage needs of the tokenizer (a chat template to train on conversations, a pad token
for TRL's batches); `get_model` loads any Auto class (a causal LM by default), and given the chat tokenizer makes
generation stop at the end-of-turn token the answers are trained to end with. Both say plainly when a local folder is
missing. torch and transformers are imported when a loader runs, so importing this module (e.g. for `tinyllm eval
--help`) stays light; nothing here needs TRL.

Repo ids come from the Hugging Face Hub, or from ModelScope with `TINYLLM_HUB=modelscope` (`resolve_model_source`,
the one switch every loader and the demo app go through).
"""

import contextlib
import os
from pathlib import Path

from tinyllm_hf.errors import MissingFileError, UsageError

TRUST_REMOTE_CODE_HELP = ("run the Python code a model folder or Hub repo ships (auto_map in its config); read it "
                          "first. Tinyllm and transformers' own models need none")


def add_trust_remote_code_argument(parser) -> None:
    """`--trust-remote-code` (default off) on an argparse parser. The training stages get the same flag (also spelt
    `--trust_remote_code`, or `trust_remote_code:` in a recipe) from TRL's configs (`SFTConfig.trust_remote_code`,
    ...; pretrain: its ModelArguments, with this help)."""
    parser.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)


def check_local_path(name_or_path: str, what: str = "model") -> None:
    """A path-like name (./x, /x, ~/x) that does not exist is a MissingFileError naming it; Hub ids pass."""
    if str(name_or_path).startswith((".", "/", "~")) and not Path(name_or_path).expanduser().exists():
        raise MissingFileError(f"{what} folder not found: {name_or_path}")


HUB_ENV = "TINYLLM_HUB"
HUBS = ("huggingface", "modelscope")


def selected_hub() -> str:
    hub = os.environ.get(HUB_ENV, "").strip().lower() or "huggingface"
    if hub not in HUBS:
        raise UsageError(f"{HUB_ENV}={hub!r} is not a hub we load from; set it to {' or '.join(HUBS)} (or unset it)")
    return hub


def resolve_model_source(name_or_path: str, revision: str | None = None) -> str:
    """What to hand `from_pretrained`: a local folder as it is; with TINYLLM_HUB=modelscope, a repo id's snapshot
    downloaded from ModelScope (its local folder); otherwise the repo id, which transformers fetches from the Hub."""
    if Path(name_or_path).expanduser().exists() or selected_hub() == "huggingface":
        return name_or_path
    from tinyllm_hf.hub.modelscope import snapshot

    return snapshot(name_or_path, revision=revision)


@contextlib.contextmanager
def refusing_remote_code(name_or_path: str):
    """transformers refuses a folder whose config maps the Auto classes to code it ships (auto_map) unless
    trust_remote_code is set; say so as a UsageError that names the flag."""
    try:
        yield
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise UsageError(f"{name_or_path} ships its own Python code (auto_map in its config.json or "
                         "tokenizer_config.json), which runs only if you trust it: read that code, then pass "
                         "--trust-remote-code") from None


def get_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False,
                  needs_chat_template: bool = False, needs_pad_token: bool = False):
    from transformers import AutoTokenizer

    check_local_path(name_or_path, "tokenizer")
    source = resolve_model_source(name_or_path, revision)
    if source != name_or_path:
        revision = None  # the snapshot is that revision
    with refusing_remote_code(name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    if needs_chat_template and not tokenizer.chat_template:
        raise UsageError(f"the tokenizer in {name_or_path} has no chat template; give a tinyllm tokenizer "
                         "(tokenizer_name_or_path)")
    if needs_pad_token and tokenizer.pad_token is None:
        raise UsageError(f"the tokenizer in {name_or_path} has no pad token; TRL trainers need one")
    return tokenizer


def get_config(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The model config (`AutoConfig`), with the Tinyllm config registered."""
    from transformers import AutoConfig

    import tinyllm_hf  # noqa: F401  (registers the tinyllm model type with the Auto classes)

    check_local_path(name_or_path)
    with refusing_remote_code(name_or_path):
        return AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)


def get_model(name_or_path: str, chat_tokenizer=None, auto_class=None, dtype=None, trust_remote_code: bool = False,
              **from_pretrained_kwargs):
    """`auto_class.from_pretrained` (default AutoModelForCausalLM) with the Tinyllm classes registered.

    dtype: a torch dtype, its name ("float32", "bfloat16", ...), "auto", or None for transformers' default. With
    `chat_tokenizer`, generation (RL rollouts, evaluation, the saved model's default) stops at its end-of-turn token."""
    import torch
    from transformers import AutoModelForCausalLM

    import tinyllm_hf  # noqa: F401  (registers the tinyllm model type with the Auto classes)

    check_local_path(name_or_path)
    from_pretrained_kwargs["trust_remote_code"] = trust_remote_code
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if dtype is not None:
        from_pretrained_kwargs["dtype"] = dtype
    source = resolve_model_source(name_or_path, from_pretrained_kwargs.get("revision"))
    if source != name_or_path:
        from_pretrained_kwargs.pop("revision", None)  # the snapshot is that revision
    with refusing_remote_code(name_or_path):
        model = (auto_class or AutoModelForCausalLM).from_pretrained(source, **from_pretrained_kwargs)
    if chat_tokenizer is not None:
        model.generation_config.eos_token_id = chat_tokenizer.eos_token_id
        model.generation_config.pad_token_id = chat_tokenizer.pad_token_id
    return model
