"""Numbers the docs state are checked against the code that produces them."""

from pathlib import Path

from tinyllm_hf.modeling.presets import preset_table
from tinyllm_hf.tokenizer.train import DEFAULT_VOCAB_SIZE

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_preset_table_matches_the_code():
    assert preset_table(DEFAULT_VOCAB_SIZE) in README.read_text("utf-8"), (
        "README's preset table is stale: regenerate it with `python -m tinyllm_hf.modeling.presets`"
    )
