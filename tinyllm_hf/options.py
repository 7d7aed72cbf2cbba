"""The compact values recipes and command lines share (`a,b,c` lists and `key=value,...` mappings), and the one
reader of YAML recipe files.

    comma_list("sentiment, xiehouyu")                 -> ["sentiment", "xiehouyu"]
    parse_key_values("sentiment=200,xiehouyu=50", "task_sizes", "task=count", count)
                                                      -> {"sentiment": 200, "xiehouyu": 50}
    load_yaml_mapping("recipes/sft/quickstart.yaml", "recipe file") -> {"model_name_or_path": ..., ...}
"""

import os
from collections.abc import Callable
from pathlib import Path

import yaml

from tinyllm_hf.errors import MissingFileError, UsageError


def load_yaml_mapping(path: str | os.PathLike, what: str) -> dict:
    """The YAML mapping in the file at `path` ({} for an empty file). `what` names the file in errors ("recipe file",
    "pipeline recipe"): a missing file is a MissingFileError, a syntax error or a document that is not a mapping a
    one-line UsageError giving the line and column."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} not found: {path}")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UsageError(f"{what} {path} is not valid YAML{where}: {problem}; fix the syntax there") from None
    except UnicodeDecodeError:
        raise UsageError(f"{what} {path} is not UTF-8 text; save it as UTF-8") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise UsageError(f"{what} {path} must be a YAML mapping of names to values, not a {type(document).__name__}")
    return document


def comma_list(text: str | None) -> list[str]:
    """A comma-separated value ("a, b,c") as its non-empty, stripped items (["a", "b", "c"]); None -> []."""
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def parse_key_values(text: str | None, option: str, form: str = "key=value",
                     convert: Callable[[str], object] = str) -> dict:
    """'a=1, b=2' -> {"a": convert("1"), "b": convert("2")} (None or "" -> {}).

    An item without "=", with an empty key, or whose value `convert` rejects (ValueError) is an error naming `option`,
    the item and the expected `form`, e.g. "task_sizes: expected task=count, got 'sentiment'"."""
    pairs = {}
    for item in comma_list(text):
        key, sep, value = (part.strip() for part in item.partition("="))
        try:
            if not sep or not key:
                raise ValueError
            pairs[key] = convert(value)
        except ValueError:
            raise UsageError(f"{option}: expected {form}, got {item!r} (items are comma-separated)") from None
    return pairs


def count(text: str) -> int:
    """A non-negative whole number written in digits ("200"); anything else is a ValueError."""
    if not text.isdigit():
        raise ValueError(f"not a count: {text!r}")
    return int(text)
