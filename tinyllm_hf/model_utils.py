"""The one tokenizer, config and model loader of every command, and the one `--trust-remote-code` option.

Trust model: no command runs Python code shipped in a model folder or Hub repo (`auto_map` in its config) unless the
user passes `--trust-remote-code`. Tinyllm folders need no remote code, since `import tinyllm_hf` registers the
Tinyllm classes with the Auto classes, and transformers' own architectures need none either. The loaders here always
pass `trust_remote_code` to transformers explicitly: left at None, transformers asks on stdin whether to run the code,
so a piped "y" would run it.

`get_tokenizer` checks what the stage needs of the tokenizer (a chat template to train on conversations, a pad token
for TRL's batches); `get_model` loads any Auto class (a causal LM by default), and given the chat tokenizer makes
generation stop at the end-of-turn token the answers are trained to end with. Both say in one line when a local folder
is missing, is a file, lacks its files or holds damaged weights, or a Hub id cannot be fetched. torch and transformers
are imported when a loader runs, so importing this module (e.g. for `tinyllm eval --help`) stays light; nothing here
needs TRL.

Repo ids come from the Hugging Face Hub, or from ModelScope with `TINYLLM_HUB=modelscope` (`resolve_model_source`,
the one switch every loader and the demo app go through).
"""

import contextlib
import os
from pathlib import Path

from tinyllm_hf.errors import ConfigError, MissingFileError, UsageError

TRUST_REMOTE_CODE_HELP = ("run the Python code a model folder or Hub repo ships (auto_map in its config); read it "
                          "first. Tinyllm and transformers' own models need none")


def add_trust_remote_code_argument(parser) -> None:
    """`--trust-remote-code` (default off) on an argparse parser. The training stages get the same flag (also spelt
    `--trust_remote_code`, or `trust_remote_code:` in a recipe) from TRL's configs (`SFTConfig.trust_remote_code`,
    ...; pretrain: its ModelArguments, with this help)."""
    parser.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)


def check_local_path(name_or_path: str, what: str = "model") -> None:
    """A name that is neither an existing path nor shaped like a Hub id ('name' or 'org/name') is a MissingFileError
    naming it: a path-like name (./x, /x, ~/x) or one with two slashes (runs/x/sft) never reaches the Hub, whose
    lookup would fail with a chain of tracebacks. An existing path, or a Hub id, passes."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    name_or_path = str(name_or_path)
    if Path(name_or_path).expanduser().exists():
        return
    if name_or_path.startswith((".", "/", "~")):
        raise MissingFileError(f"{what} folder not found: {name_or_path}")
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise MissingFileError(f"{what} folder not found: {name_or_path} (and it is not a Hub id like 'org/name'); "
                               "check the path") from None


# A local folder holds a tokenizer if it has one of these (fast, config-only, or a slow tokenizer's vocabulary).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")


def check_local_folder(name_or_path: str, what: str = "model") -> None:
    """`check_local_path`, and an existing path must be a folder holding a `what` ("model": a config.json; "tokenizer":
    one of TOKENIZER_FILES), not a file or an unrelated folder."""
    check_local_path(name_or_path, what)
    path = Path(str(name_or_path)).expanduser()
    if not path.exists():
        return
    if not path.is_dir():
        raise UsageError(f"{what} path {name_or_path} is a file; give the folder that holds the {what}")
    needed = TOKENIZER_FILES if what == "tokenizer" else ("config.json",)
    if not any((path / name).is_file() for name in needed):
        raise MissingFileError(f"{name_or_path} holds no {what} (no {' or '.join(needed)}); give a folder written "
                               "by tinyllm (or save_pretrained)")


@contextlib.contextmanager
def reporting_load_errors(name_or_path: str, what: str = "model"):
    """A folder or Hub id `from_pretrained` cannot load becomes one line naming it: transformers raises OSError for
    a folder missing its files or a Hub id that cannot be fetched (offline, no such repository), safetensors raises
    SafetensorError for damaged weights. The first line of their message is the one that says what is wrong."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as err:
        raise UsageError(f"the {what} weights in {name_or_path} are damaged or truncated ({err}); copy them again "
                         "or retrain") from None
    except OSError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if Path(str(name_or_path)).expanduser().is_dir():
            raise MissingFileError(f"cannot load the {what} in {name_or_path}: {reason}") from None
        raise MissingFileError(f"{what} {name_or_path} is not a local folder and could not be loaded from the Hub "
                               f"({reason}); give an existing folder, or a Hub id and network access") from None


def check_model_reachable(name_or_path: str, revision: str | None = None) -> None:
    """`check_local_path`, and a Hub id must answer with its config.json (from the cache when offline): a cheap check
    that a mistyped or unreachable id fails before the work a command does before loading the model."""
    check_local_path(name_or_path)
    if Path(str(name_or_path)).expanduser().exists() or selected_hub() != "huggingface":
        return
    from huggingface_hub import hf_hub_download

    with reporting_load_errors(name_or_path):
        hf_hub_download(str(name_or_path), "config.json", revision=revision)


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


@contextlib.contextmanager
def reporting_config_errors(name_or_path: str):
    """A Tinyllm config.json the config class refuses (its own checks raise ValueError "TinyllmConfig.<field> ...",
    e.g. an unknown rope_type written by hand) becomes one line naming the folder."""
    try:
        yield
    except ValueError as err:
        if not str(err).startswith("TinyllmConfig."):
            raise
        raise ConfigError(f"the config.json of {name_or_path} is invalid: {err}; fix it there") from None


def get_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False,
                  needs_chat_template: bool = False, needs_pad_token: bool = False):
    from transformers import AutoTokenizer

    check_local_folder(name_or_path, "tokenizer")
    source = resolve_model_source(name_or_path, revision)
    if source != name_or_path:
        revision = None  # the snapshot is that revision
    with refusing_remote_code(name_or_path), reporting_load_errors(name_or_path, "tokenizer"):
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
    with refusing_remote_code(name_or_path), reporting_config_errors(name_or_path):
        return AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)


# attn_implementation -> (the module transformers looks for, what installs it). When it is missing, transformers 5 does
# not fail: with the `kernels` package installed it downloads a kernel from the Hub instead, which an offline GPU node
# cannot, and without it fails deep in model loading. `check_attn_implementation` (and `tinyllm run`'s preflight) say
# so first.
FLASH_ATTENTION_PACKAGES = {
    "flash_attention_2": ("flash_attn", "pip install flash-attn --no-build-isolation"),
    "flash_attention_3": ("flash_attn_interface", "build FlashAttention-3 (hopper/) from "
                          "https://github.com/Dao-AILab/flash-attention"),
}


def check_attn_implementation(attn_implementation: str | None) -> None:
    """A clear error when a flash attention implementation is asked for but its package is not installed."""
    if attn_implementation not in FLASH_ATTENTION_PACKAGES:
        return
    import importlib.util

    module, install = FLASH_ATTENTION_PACKAGES[attn_implementation]
    if importlib.util.find_spec(module) is None:
        from tinyllm_hf.errors import MissingDependencyError

        raise MissingDependencyError(f"attn_implementation {attn_implementation} needs the {module} package, which is "
                                     f"not installed: {install}, or set attn_implementation: sdpa (packed rows stay "
                                     "per-conversation there too: docs/sft.md)")


def get_model(name_or_path: str, chat_tokenizer=None, auto_class=None, dtype=None, trust_remote_code: bool = False,
              rope_scaling: str | None = None, **from_pretrained_kwargs):
    """`auto_class.from_pretrained` (default AutoModelForCausalLM) with the Tinyllm classes registered.

    dtype: a torch dtype, its name ("float32", "bfloat16", ...), "auto", or None for transformers' default. With
    `chat_tokenizer`, generation (RL rollouts, evaluation, the saved model's default) stops at its end-of-turn token.
    rope_scaling: a `TYPE:FACTOR` spec such as "yarn:4" (`tinyllm_hf/rope_scaling.py`) applied to the config before the
    weights load, so the model runs beyond its trained context without retraining."""
    import torch
    from transformers import AutoModelForCausalLM

    import tinyllm_hf  # noqa: F401  (registers the tinyllm model type with the Auto classes)

    check_local_folder(name_or_path)
    check_attn_implementation(from_pretrained_kwargs.get("attn_implementation"))
    from_pretrained_kwargs["trust_remote_code"] = trust_remote_code
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if dtype is not None:
        from_pretrained_kwargs["dtype"] = dtype
    source = resolve_model_source(name_or_path, from_pretrained_kwargs.get("revision"))
    if source != name_or_path:
        from_pretrained_kwargs.pop("revision", None)  # the snapshot is that revision
    if rope_scaling:
        from tinyllm_hf.rope_scaling import parse_rope_scaling, with_rope_scaling

        parse_rope_scaling(rope_scaling)  # a bad spec fails before the config is read
        config = get_config(source, revision=from_pretrained_kwargs.get("revision"), trust_remote_code=trust_remote_code)
        from_pretrained_kwargs["config"] = with_rope_scaling(config, rope_scaling)
    with refusing_remote_code(name_or_path), reporting_config_errors(name_or_path), reporting_load_errors(name_or_path):
        model = (auto_class or AutoModelForCausalLM).from_pretrained(source, **from_pretrained_kwargs)
    if chat_tokenizer is not None:
        model.generation_config.eos_token_id = chat_tokenizer.eos_token_id
        model.generation_config.pad_token_id = chat_tokenizer.pad_token_id
    return model
