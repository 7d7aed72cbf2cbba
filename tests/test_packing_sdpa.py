"""Packed SFT rows under SDPA: each conversation sees only itself, as if it were alone (no flash-attn needed).

TRL packs conversations (best-fit decreasing) and, padding-free, flattens a batch into one row whose `position_ids`
restart at every conversation, with no attention mask. transformers 5's masking (`find_packed_sequence_indices`)
turns restarting positions into a block-diagonal causal mask for SDPA; these tests show Tinyllm's logits and loss on
such a batch equal those of each conversation run alone, in training and in evaluation mode.
"""

import datasets
import pytest
import torch
from trl.data_utils import pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from tinyllm_hf import TinyllmConfig, TinyllmForCausalLM

PAD = 0
LENGTHS = [7, 19, 4, 23, 11, 30, 9]  # packed into rows of at most 32 tokens: several conversations share a row


@pytest.fixture(scope="module")
def conversations():
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(2, 97, (n,), generator=generator).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = TinyllmConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           pad_token_id=PAD, eos_token_id=1, attn_implementation="sdpa")
    return TinyllmForCausalLM(config)


def packed_batch(conversations):
    """The batch TRL's SFTTrainer feeds with `packing: true` (bfd, hence padding-free)."""
    packed = pack_dataset(datasets.Dataset.from_dict({"input_ids": conversations}), seq_length=32, strategy="bfd")
    assert len(packed) < len(conversations)  # really packed: some row holds several conversations
    collator = DataCollatorForLanguageModeling(pad_token_id=PAD, padding_free=True)
    return collator([packed[i] for i in range(len(packed))])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_packed_logits_and_loss_equal_each_conversation_alone(model, conversations, training):
    model.train(training)  # dropout is 0: train mode differs only in what the model builds (no cache)
    batch = packed_batch(conversations)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"])
        alone = {tuple(ids): model(input_ids=torch.tensor([ids])).logits[0] for ids in conversations}

    # Cut the packed row back into conversations at the restarting positions; each slice must match its original.
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    seen = 0
    for start, end in zip(starts, starts[1:]):
        ids = tuple(batch["input_ids"][0, start:end].tolist())
        torch.testing.assert_close(packed.logits[0, start:end], alone[ids], atol=1e-5, rtol=1e-5)
        seen += 1
    assert seen == len(conversations)

    # The loss: mean next-token cross-entropy over every conversation's own tokens (the first of each unscored).
    losses, count = 0.0, 0
    for ids, logits in alone.items():
        targets = torch.tensor(ids[1:])
        losses += torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="sum")
        count += len(targets)
    torch.testing.assert_close(packed.loss, losses / count, atol=1e-5, rtol=1e-5)


def test_without_restarting_positions_the_conversations_would_mix(model, conversations):
    """The control: the same packed row with plain 0..N-1 positions attends across conversations."""
    model.eval()
    batch = packed_batch(conversations)
    plain = torch.arange(batch["input_ids"].shape[1])[None]
    with torch.no_grad():
        restarted = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        mixed = model(input_ids=batch["input_ids"], position_ids=plain).logits
    first = (batch["position_ids"][0] == 0).nonzero().flatten()[1]  # the second conversation of the row
    assert not torch.allclose(restarted[0, first:], mixed[0, first:], atol=1e-3)
