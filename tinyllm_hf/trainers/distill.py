"""Knowledge distillation: a student trained to match a teacher's next-token distributions, with TRL's GKDTrainer.

    tinyllm distill --config recipes/distill/quickstart.yaml [--teacher_model_name_or_path runs/big/pretrain] ...
    accelerate launch -m tinyllm_hf.trainers.distill --config ...

Teacher: any causal LM folder (`teacher_model_name_or_path`) whose tokenizer is the student's: a larger Tinyllm model
you trained, or any Hugging Face model after `tinyllm tokenizer extend`. The tokenizers are compared before any
weights are loaded (`tokenizer_mismatch`). Student: a new model from `model_preset` (with `config_overrides`), or a
folder (`model_name_or_path`) to continue.

Loss: the generalised Jensen-Shannon divergence between the teacher's and the student's distributions at every
position that carries loss, named by `divergence`: `forward_kl` (KL(teacher || student), the classic distillation
loss), `reverse_kl` (KL(student || teacher), mode-seeking) or `jsd` with `beta` its mixture weight.

Data (`data`): `corpus` - packed blocks of a pretraining corpus, exactly as `tinyllm pretrain` builds them (the same
blocks and validation split for the same seed, so a distilled run compares with a plain one); `sft` - conversations
as `tinyllm sft` builds them (loss on the assistant's tokens), where a share `lmbda` of the steps trains on the
student's own answers to the prompts instead (on-policy distillation, the GKD paper's point), and `seq_kd` on the
teacher's.

Why GKD (trl.experimental) and not TRL's DistillationTrainer: DistillationTrainer trains only on completions the
student generates for prompts, every step. Distilling on a pretraining corpus means scoring the corpus text itself
(teacher-forced, off-policy), which GKD does with `lmbda: 0`, and GKD mixes in on-policy steps where there are
prompts. The validation loss is the student's own next-token loss on the validation data (not the divergence), so
it reads like the pretraining and SFT stages' and a distilled student compares with one trained without a teacher.
"""

import dataclasses
import math
import sys
import warnings
from dataclasses import dataclass, field

import datasets
import torch
from transformers import set_seed

with warnings.catch_warnings():  # TRL warns on every import that trl.experimental may change; the docs say so once
    warnings.simplefilter("ignore")
    from trl.experimental.gkd import GKDConfig, GKDTrainer

import tinyllm_hf  # noqa: F401  (registers the tinyllm model type with the Auto classes)
from tinyllm_hf.data.packing import collate_blocks
from tinyllm_hf.errors import UsageError
from tinyllm_hf.model_utils import get_config, get_model, get_tokenizer
from tinyllm_hf.modeling import PRESETS
from tinyllm_hf.tokenizer.chat_template import missing_special_tokens
from tinyllm_hf.trainers import pretrain, sft
from tinyllm_hf.trainers.common import (
    LossCurveCallback,
    ReliableTrainerMixin,
    RunArguments,
    ThroughputCallback,
    add_callback_first,
    final_eval_metrics,
    logger,
    matmul_flops_per_token,
    peak_dtype,
    refuse_global_batch,
    run_stage,
    train_and_save,
)
from tinyllm_hf.trainers.recipe_checks import DIVERGENCES

DATA_KINDS = ("corpus", "sft")

# Defaults that differ from GKDConfig's own. GKDConfig (an SFTConfig) turns on bf16 and activation checkpointing,
# which only slow a small model down on a CPU; its learning rate (SFT's 2e-5) is far too low for a student trained
# from scratch.
DEFAULTS = {
    "output_dir": "outputs/distill",
    "bf16": False,
    "activation_checkpointing": False,
    "learning_rate": 2e-3,
    "lmbda": 0.0,
    "max_new_tokens": 64,
    "report_to": ["tensorboard"],
    "logging_steps": 10,
    "include_num_input_tokens_seen": True,
}


@dataclass
class StudentArguments:
    """The student: a new model from a preset, or a folder to continue (as `tinyllm pretrain` takes them)."""

    model_preset: str = field(default="tiny", metadata={"help": f"size of a new student: {', '.join(PRESETS)}"})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "continue this student checkpoint instead of starting from model_preset"}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "preset fields to change for a new student, e.g. 'num_hidden_layers=2'"}
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, eager or flash_attention_2"})
    divergence: str = field(
        default="forward_kl",
        metadata={"help": f"{', '.join(DIVERGENCES)}: forward_kl is KL(teacher||student), reverse_kl "
                          "KL(student||teacher), jsd their generalised JSD with mixture weight beta"},
    )


@dataclass
class DistillDataArguments(sft.SFTDataArguments):
    data: str = field(
        default="corpus",
        metadata={"help": "'corpus': packed blocks of a pretraining corpus (dataset_name as for tinyllm pretrain); "
                          "'sft': conversations (dataset_name and the task keys as for tinyllm sft)"},
    )
    text_field: str = field(default="text", metadata={"help": "data corpus: column (or JSON field) of the documents"})
    block_size: int | None = field(
        default=None, metadata={"help": "data corpus: tokens per block; default: the student's context"}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.data not in DATA_KINDS:
            raise UsageError(f"data must be one of {', '.join(DATA_KINDS)}, not {self.data!r}")
        # Keys of the other kind of data would be silently ignored: refuse them.
        only = SFT_ONLY_KEYS if self.data == "corpus" else CORPUS_ONLY_KEYS
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        given = [name for name in only if getattr(self, name) != defaults[name]]
        if given:
            other = "sft" if self.data == "corpus" else "corpus"
            raise UsageError(f"{', '.join(given)} applies to data: {other}, but data is {self.data}; remove it or set "
                             f"data: {other}")


SFT_ONLY_KEYS = ("dataset_format", "sft_tasks", "task_sizes", "tool_task_sizes", "eval_fraction", "heldout_eval_sizes")
CORPUS_ONLY_KEYS = ("text_field", "block_size")


# --------------------------------------------------------------------------------------------------------------------
# Teacher and student: one tokenizer
# --------------------------------------------------------------------------------------------------------------------

# Text the two tokenizers must split into the same ids: equal vocabularies with different merges or normalisers
# would still disagree on every position.
PROBE_TEXT = "知识蒸馏：小模型向大模型学习。Knowledge distillation, 2024年3月 <b>ok</b>\n  你好！"


def tokenizer_mismatch(student, teacher) -> str | None:
    """Why `teacher`'s next-token distributions cannot teach a student using `student` (both tokenizers), or None:
    the first id whose token differs, ids only one of them has, or a different split of the same text."""
    common = min(len(student), len(teacher))
    student_tokens = student.convert_ids_to_tokens(list(range(common)))
    teacher_tokens = teacher.convert_ids_to_tokens(list(range(common)))
    for token_id, (ours, theirs) in enumerate(zip(student_tokens, teacher_tokens)):
        if ours != theirs:
            return (f"token id {token_id} is {ours!r} in the student's tokenizer but {theirs!r} in the teacher's "
                    f"(vocabularies {len(student)} and {len(teacher)} tokens)")
    if len(student) != len(teacher):
        longer, shorter = ("student", "teacher") if len(student) > len(teacher) else ("teacher", "student")
        return (f"the {longer}'s tokenizer has {max(len(student), len(teacher))} tokens, the {shorter}'s {common}: "
                f"ids {common}..{max(len(student), len(teacher)) - 1} exist only in the {longer}'s")
    ours, theirs = student.encode(PROBE_TEXT, add_special_tokens=False), teacher.encode(PROBE_TEXT, add_special_tokens=False)
    if ours != theirs:
        position = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        return (f"the same vocabulary splits text differently: token {position} of {PROBE_TEXT!r} is id "
                f"{ours[position] if position < len(ours) else 'none'} for the student, "
                f"{theirs[position] if position < len(theirs) else 'none'} for the teacher")
    return None


def load_tokenizers(student_args: StudentArguments, data_args: DistillDataArguments, args: GKDConfig):
    """The student's tokenizer (tokenizer_name_or_path, else the student folder's, else for a new student the
    teacher's), checked against the teacher's: a UsageError naming the first mismatching ids. No weights are loaded."""
    teacher_path = args.teacher_model_name_or_path
    needs_chat_template = data_args.data == "sft"
    teacher = get_tokenizer(teacher_path, trust_remote_code=args.trust_remote_code,
                            needs_chat_template=needs_chat_template)
    student_path = data_args.tokenizer_name_or_path or student_args.model_name_or_path
    if student_path is None:
        return teacher
    student = get_tokenizer(student_path, trust_remote_code=args.trust_remote_code,
                            needs_chat_template=needs_chat_template)
    mismatch = tokenizer_mismatch(student, teacher)
    if mismatch is not None:
        raise UsageError(f"the teacher {teacher_path} and the student ({student_path}) do not share a tokenizer: "
                         f"{mismatch}; distillation compares distributions over the same ids, so train the student "
                         "with the teacher's tokenizer (or extend the teacher's with `tinyllm tokenizer extend`)")
    return student


def check_vocab_sizes(student_args: StudentArguments, args: GKDConfig) -> int:
    """The teacher's number of output rows, which a student folder must have too (read from the configs only)."""
    teacher_rows = get_config(args.teacher_model_name_or_path, trust_remote_code=args.trust_remote_code).vocab_size
    if student_args.model_name_or_path:
        student_rows = get_config(student_args.model_name_or_path, trust_remote_code=args.trust_remote_code).vocab_size
        if student_rows != teacher_rows:
            raise UsageError(f"the student {student_args.model_name_or_path} has {student_rows} output rows "
                             f"(vocab_size) but the teacher {args.teacher_model_name_or_path} {teacher_rows}; the "
                             "divergence compares them id by id: resize one, or start a new student from a preset")
    return teacher_rows


def build_student(student_args: StudentArguments, tokenizer, vocab_size: int, trust_remote_code: bool):
    model_args = pretrain.ModelArguments(
        model_preset=student_args.model_preset, model_name_or_path=student_args.model_name_or_path,
        config_overrides=student_args.config_overrides, attn_implementation=student_args.attn_implementation,
        trust_remote_code=trust_remote_code,
    )
    return pretrain.build_model(model_args, tokenizer, vocab_size=vocab_size)


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


def collate_corpus_blocks(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Packed blocks for GKD: every position carries loss, nothing is padded."""
    batch = collate_blocks(examples)
    return {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}


class ConversationCollator:
    """Encoded conversations (`input_ids`, `assistant_masks`, see `sft.encode_conversations`) -> what GKD trains on:
    right-padded `input_ids`/`attention_mask`, `labels` on the assistant's tokens only, and for on-policy steps the
    `prompts` (everything before the last assistant turn) left-padded with their `prompt_attention_mask`."""

    def __init__(self, pad_token_id: int, max_length: int):
        self.pad_token_id = pad_token_id
        self.max_length = max_length

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows, prompts = [], []
        for example in examples:
            ids = list(example["input_ids"])[: self.max_length]
            mask = list(example["assistant_masks"])[: self.max_length]
            last_turn = len(mask)
            while last_turn > 0 and mask[last_turn - 1] == 0:  # past the last assistant token
                last_turn -= 1
            while last_turn > 0 and mask[last_turn - 1] == 1:  # back to where that turn starts
                last_turn -= 1
            rows.append((ids, [t if m else -100 for t, m in zip(ids, mask)]))
            prompts.append(ids[:last_turn])
        width = max(len(ids) for ids, _ in rows)
        prompt_width = max(1, max(len(p) for p in prompts))
        pad = self.pad_token_id
        return {
            "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
            "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows]),
            "prompts": torch.tensor([[pad] * (prompt_width - len(p)) + p for p in prompts]),
            "prompt_attention_mask": torch.tensor([[0] * (prompt_width - len(p)) + [1] * len(p) for p in prompts]),
        }


def build_datasets(data_args: DistillDataArguments, tokenizer, context: int, args: GKDConfig):
    """(train, validation or None, collator) for the kind of data the recipe names."""
    seed = args.seed if args.data_seed is None else args.data_seed
    if data_args.data == "corpus":
        block_size = data_args.block_size or context
        if block_size > context:
            raise UsageError(f"block_size {block_size} exceeds the student's max_position_embeddings {context}")
        corpus_args = pretrain.DataArguments(
            tokenizer_name_or_path=data_args.tokenizer_name_or_path, dataset_name=data_args.dataset_name,
            dataset_config=data_args.dataset_config, text_field=data_args.text_field, block_size=block_size,
            max_eval_samples=data_args.max_eval_samples or None,
        )
        train, validation = pretrain.build_datasets(corpus_args, tokenizer, block_size, seed)
        return train, (validation if data_args.max_eval_samples else None), collate_corpus_blocks
    train, validation = sft.build_datasets(data_args, seed)
    max_length = min(args.max_length or context, context)
    encode = dict(tokenizer=tokenizer, num_proc=args.dataset_num_proc, assistant_only_loss=True)
    train = answered_within(sft.encode_conversations(train, **encode), max_length, "training")
    if validation is not None:
        validation = answered_within(sft.encode_conversations(validation, **encode), max_length, "validation")
    return train, validation, ConversationCollator(tokenizer.pad_token_id, max_length)


def answered_within(conversations: datasets.Dataset, max_length: int, name: str) -> datasets.Dataset:
    """The encoded conversations with an answer token within their first `max_length` tokens; the others (nothing
    to learn, and no prompt to answer on-policy) are left out with a warning saying how many."""
    kept = conversations.filter(lambda row: any(row["assistant_masks"][:max_length]), desc="Finding answers")
    if len(kept) < len(conversations):
        logger.warning(f"{len(conversations) - len(kept)} of {len(conversations)} {name} conversations have no "
                       f"answer within their first {max_length} tokens (max_length): left out")
    if len(kept) == 0:
        raise UsageError(f"no {name} conversation has an answer within its first {max_length} tokens; raise "
                         "max_length (up to the student's context)")
    return kept


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------


DIVERGENCE_CHUNK = 256  # positions whose vocabulary-wide divergence is computed at once


class ChunkedDivergence(torch.autograd.Function):
    """GKD's generalised JSD per position (beta 0: KL(teacher || student), 1: KL(student || teacher), between: the
    JSD with mixture m = beta * teacher + (1 - beta) * student), from (N, V) student and teacher logits, N
    positions at a time DIVERGENCE_CHUNK rows, its gradient computed in the same pass. Autograd through GKD's own
    formula keeps several (N, V) intermediates and took 2.5x as long on a CPU (docs/distillation.md)."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, beta: float):
        losses = student_logits.new_empty(student_logits.shape[0], dtype=torch.float32)
        grad = torch.empty_like(student_logits, dtype=torch.float32)
        for start in range(0, student_logits.shape[0], DIVERGENCE_CHUNK):
            rows = slice(start, start + DIVERGENCE_CHUNK)
            log_q = torch.log_softmax(student_logits[rows].float(), dim=-1)
            log_p = torch.log_softmax(teacher_logits[rows].float(), dim=-1)
            q = log_q.exp()
            if beta == 0:  # d/ds KL(p || q) = q - p
                p = log_p.exp()
                losses[rows] = (p * (log_p - log_q)).sum(-1)
                grad[rows] = q - p
                continue
            if beta == 1:  # d/ds KL(q || p) = q * (log q - log p - KL)
                log_ratio = log_q - log_p
                kl = (q * log_ratio).sum(-1, keepdim=True)
                losses[rows] = kl.squeeze(-1)
                grad[rows] = q * (log_ratio - kl)
                continue
            p = log_p.exp()
            log_m = torch.logaddexp(log_q + math.log(1 - beta), log_p + math.log(beta))
            losses[rows] = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
            # dL/dq = (1 - beta) * log(q / m); through the softmax: q * (g - sum(q * g))
            g = (1 - beta) * (log_q - log_m)
            grad[rows] = q * (g - (q * g).sum(-1, keepdim=True))
        ctx.save_for_backward(grad)
        ctx.dtype = student_logits.dtype
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad,) = ctx.saved_tensors
        return (grad * grad_losses[:, None]).to(ctx.dtype), None, None


def divergence_loss(student_logits, teacher_logits, labels, beta: float, num_items_in_batch=None):
    """GKD's `generalized_jsd_loss` (the same value and gradient): the divergence summed over the positions whose
    label is not -100, divided by `num_items_in_batch` when given (gradient accumulation), else by their number."""
    valid = labels != -100
    if valid.all():
        student_logits, teacher_logits = student_logits.flatten(0, 1), teacher_logits.flatten(0, 1)
    else:
        student_logits, teacher_logits = student_logits[valid], teacher_logits[valid]
    total = ChunkedDivergence.apply(student_logits, teacher_logits, beta).sum()
    if num_items_in_batch is not None:
        return total / torch.as_tensor(num_items_in_batch, device=total.device)
    return total / valid.sum().clamp_min(1)


class TinyllmDistillTrainer(ReliableTrainerMixin, GKDTrainer):
    """TRL's GKDTrainer with atomic checkpoints and a stop on non-finite loss. Training minimises the divergence
    (`divergence_loss`) and logs the student's own next-token loss on the same tokens beside it (`student_ce`);
    evaluation reports the student's next-token loss on the validation data as `eval_loss`, the pretraining and SFT
    stages' measure."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            labels=inputs["labels"])
            return (outputs.loss, outputs) if return_outputs else outputs.loss
        student = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        self.teacher_model.eval()
        with torch.no_grad():
            teacher = self.teacher_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        # Logits at position i predict token i + 1; positions without a label (-100) carry no loss.
        student_logits, teacher_logits = student.logits[:, :-1, :], teacher.logits[:, :-1, :]
        labels = inputs["labels"][:, 1:]
        if self.lmbda > 0 or self.seq_kd:
            # The Trainer counted the data's answer tokens, not those of the generated answers that replace them on
            # some steps: each micro-batch is averaged over its own.
            num_items_in_batch = None
        loss = divergence_loss(student_logits, teacher_logits, labels, self.beta, num_items_in_batch)
        with torch.no_grad():
            student_ce = torch.nn.functional.cross_entropy(student_logits.flatten(0, 1).float(), labels.flatten(),
                                                           ignore_index=-100)
        self._metrics["train"]["student_ce"].append(student_ce.item())
        return (loss, student) if return_outputs else loss


def check_settings(data_args: DistillDataArguments, args: GKDConfig, student_args: StudentArguments,
                   run_args: RunArguments) -> None:
    """What can be refused before anything is loaded."""
    if not args.teacher_model_name_or_path:
        raise UsageError("teacher_model_name_or_path is not set: give the teacher model's folder (a larger model "
                         "trained with the same tokenizer)")
    if data_args.data == "corpus" and (args.lmbda > 0 or args.seq_kd):
        raise UsageError("lmbda > 0 and seq_kd generate answers to prompts, which data: corpus has none of; use "
                         "data: sft, or lmbda: 0 and seq_kd: false")
    if not data_args.max_eval_samples and args.eval_strategy != "no":
        raise UsageError("eval_strategy is set but max_eval_samples is 0 (no validation data); set eval_strategy: "
                         "'no' or hold data out")
    if data_args.data == "sft" and not data_args.has_validation and args.eval_strategy != "no":
        raise UsageError("eval_strategy is set but there is no validation data (eval_fraction 0 with your own "
                         "data); set eval_strategy: 'no' or hold data out")
    if run_args.data_order_log and data_args.data == "sft" and args.lmbda > 0:
        raise UsageError("data_order_log records the data's batches, but with lmbda > 0 steps train on generated "
                         "answers instead; turn one of them off")
    refuse_global_batch(run_args, "distill")
    args.beta = DIVERGENCES[student_args.divergence] if DIVERGENCES[student_args.divergence] is not None else args.beta


def train(student_args: StudentArguments, data_args: DistillDataArguments, args: GKDConfig,
          run_args: RunArguments) -> dict:
    set_seed(args.seed)
    check_settings(data_args, args, student_args, run_args)
    heldout = sft.heldout_eval_records(data_args) if data_args.data == "sft" else []
    tokenizer = load_tokenizers(student_args, data_args, args)  # before any weights: the cheap check first
    if data_args.tool_task_sizes and missing_special_tokens(tokenizer):
        raise UsageError(f"tool_task_sizes needs the tool tokens {missing_special_tokens(tokenizer)}, which the "
                         "shared tokenizer lacks; adding them would give the student ids the teacher never saw")
    vocab_size = check_vocab_sizes(student_args, args)
    student = build_student(student_args, tokenizer, vocab_size, args.trust_remote_code)
    context = student.config.max_position_embeddings
    sft.check_heldout_context(heldout, context)
    if args.max_length is None or args.max_length > context:
        args.max_length = context
    with args.main_process_first(desc="building the distillation data"):
        train_dataset, eval_dataset, collator = build_datasets(data_args, tokenizer, context, args)
    if eval_dataset is None:
        args.eval_strategy = "no"
    teacher = get_model(args.teacher_model_name_or_path, chat_tokenizer=tokenizer if data_args.data == "sft" else None,
                        trust_remote_code=args.trust_remote_code)
    n_student, n_teacher = (sum(p.numel() for p in m.parameters()) for m in (student, teacher))
    logger.warning(f"distilling a {n_teacher / 1e6:.2f}M-parameter teacher into a {n_student / 1e6:.2f}M-parameter "
                   f"student with {student_args.divergence} (beta {args.beta:g}), on-policy share {args.lmbda:g}; "
                   f"{len(train_dataset)} training and {len(eval_dataset or [])} validation examples")

    trainer = TinyllmDistillTrainer(
        model=student, teacher_model=teacher, args=args, data_collator=collator, train_dataset=train_dataset,
        eval_dataset=eval_dataset, processing_class=tokenizer,
        callbacks=[LossCurveCallback()] if run_args.loss_curve else None,
    )
    # A step is the student's training pass and the teacher's forward pass (a third of a training pass).
    length = (data_args.block_size or context) if data_args.data == "corpus" else args.max_length
    flops = matmul_flops_per_token(student, length) + matmul_flops_per_token(teacher, length) / 3
    tokens_per_step = (args.train_batch_size * args.gradient_accumulation_steps * args.world_size * length
                       if data_args.data == "corpus" else None)
    add_callback_first(trainer, ThroughputCallback(flops, tokens_per_step, run_args.peak_flops, peak_dtype(args)))

    metrics = train_and_save(trainer, run_args, evaluate=final_eval_metrics if eval_dataset is not None else None)
    if args.should_save and data_args.data == "sft" and "default" in data_args.sources:
        results = sft.evaluate_heldout(trainer.model, tokenizer, data_args, args.output_dir, heldout)
        if results is not None:
            metrics.update({f"heldout_accuracy_{task}": e["accuracy"] for task, e in results["per_task"].items()})
    return metrics


# The recipe's sections, in the order `parse_recipe` returns them.
ARGUMENTS = [StudentArguments, DistillDataArguments, GKDConfig, RunArguments]


def main(argv: list[str] | None = None) -> int:
    return run_stage("tinyllm distill", ARGUMENTS, DEFAULTS, train, argv)


if __name__ == "__main__":
    from tinyllm_hf.cli import run_command

    sys.exit(run_command("tinyllm distill", main))
