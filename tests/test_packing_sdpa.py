"""Packed SFT rows under SDPA: each conversation sees only itself, as if it were alone (no flash-attn needed).

TRL packs conversations (best-fit decreasing) and, padding-free, flattens a batch into one row whose `position_ids`
restart at every conversation, with no attention mask. transformers 5's masking (`find_packed_sequence_indices`)
turns restarting positions into a block-diagonal causal mask for SDPA; these tests show Tinyllm's logits and loss on
such a batch equal those of each conversation run alone, in training and in evaluation mode (where TRL's
`SFTTrainer.compute_loss` passes `use_cache=False`: a cache would switch the packed-row detection off), and that the
SFT stage's trainer reports the same validation loss packed as unpacked.
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
    model.train(training)  # dropout is 0: the modes differ only in whether the model would build a cache
    batch = packed_batch(conversations)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    with torch.no_grad():
        # As SFTTrainer.compute_loss calls it, in training and evaluation alike.
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                       use_cache=False)
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
        restarted = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        mixed = model(input_ids=batch["input_ids"], position_ids=plain).logits
    first = (batch["position_ids"][0] == 0).nonzero().flatten()[1]  # the second conversation of the row
    assert not torch.allclose(restarted[0, first:], mixed[0, first:], atol=1e-3)


CHATS = [[{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
         for question, answer in [("你好", "你好！"), ("这句话是正面还是负面：服务很好，房间也干净。", "正面"),
                                  ("画蛇添足是什么意思？", "比喻做了多余的事，反而不恰当。"), ("一加一等于几？", "二"),
                                  ("外甥打灯笼", "照旧（舅）"), ("请把“今天天气很好”分词。", "今天 / 天气 / 很 / 好")]]


def test_sft_validation_loss_is_the_same_packed_and_unpacked(tiny_model_dir, tmp_path):
    """The SFT stage's trainer on SDPA: one validation batch of these conversations, packed (one padding-free row)
    or not (padded rows with an attention mask), gives the same loss over the same answer tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from tinyllm_hf.trainers.sft import TinyllmSFTTrainer

    conversations = datasets.Dataset.from_dict({"messages": CHATS})
    losses = {}
    for packing in (True, False):
        args = SFTConfig(output_dir=str(tmp_path / str(packing)), assistant_only_loss=True, max_length=256,
                         packing=packing, bf16=False, use_cpu=True, report_to=[], per_device_eval_batch_size=len(CHATS),
                         activation_checkpointing=False, dataloader_num_workers=0, save_strategy="no")
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
        trainer = TinyllmSFTTrainer(model=model, args=args, train_dataset=conversations, eval_dataset=conversations,
                                    processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
        if packing:
            assert len(trainer.eval_dataset) < len(CHATS)  # several conversations share a packed row
        losses[packing] = trainer.evaluate()["eval_loss"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
