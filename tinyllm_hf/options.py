"""The compact values recipes and command lines share: `a,b,c` lists and `key=value,...` mappings.

    comma_list("sentiment, xiehouyu")                 -> ["sentiment", "xiehouyu"]
    parse_key_values("sentiment=200,xiehouyu=50", "task_sizes", "task=count", count)
                                                      -> {"sentiment": 200, "xiehouyu": 50}
"""

from collections.abc import Callable

from tinyllm_hf.errors import UsageError


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
