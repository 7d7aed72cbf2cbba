"""The causal-LM loss of Tinyllm: cross-entropy in chunks, with or without the full logits.

Training steps (on CPUs and accelerators alike) take the loss straight from the hidden states (`LinearCrossEntropy`):
the (tokens, vocab) logits are never held, and never upcast whole to fp32. The chunk size depends on the device:
cache-sized on a CPU, a few thousand rows on a GPU, where each chunk costs a few kernel launches.

This file ships as Hub remote code next to `modeling_tinyllm.py`: it imports only torch.
"""

import torch
from torch import nn


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on `x` run in: autocast's dtype when autocast is on for its device, else its own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (tokens, vocab) logits against (tokens,) targets (-100 = no loss), `rows` tokens at a time.

    Same value and gradient as `F.cross_entropy(logits.float(), targets, reduction="sum")`, with less memory traffic:
    each chunk is upcast and (log-)softmaxed while it is in cache, and backward keeps only the logits (the standard
    path also writes and keeps an fp32 log-softmax of the logits' size) and recomputes the softmax chunk by chunk.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        has_loss = targets != -100
        targets = targets.clamp(min=0)  # ignored positions pick any logit; `has_loss` zeroes their terms
        target_log_probs = torch.cat(
            [
                torch.log_softmax(logits[i : i + rows].float(), dim=-1).gather(-1, targets[i : i + rows, None])
                for i in range(0, len(logits), rows)
            ]
        ).squeeze(-1)  # (tokens,)
        ctx.save_for_backward(logits, targets, has_loss)
        ctx.rows = rows
        return -(target_log_probs * has_loss).sum()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, targets, has_loss = ctx.saved_tensors
        rows = ctx.rows
        weight = (grad_loss * has_loss)[:, None]  # (tokens, 1)
        minus_one = torch.full_like(weight, -1.0)
        grad = torch.empty_like(logits)
        for i in range(0, len(logits), rows):
            # d(-log_softmax(logits)[target]) / d logits = softmax(logits) - one_hot(target), in fp32 until written.
            chunk = torch.softmax(logits[i : i + rows].float(), dim=-1)
            chunk.scatter_add_(-1, targets[i : i + rows, None], minus_one[i : i + rows])
            grad[i : i + rows] = chunk.mul_(weight[i : i + rows])
        return grad, None, None


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against targets (-100 = no loss), `rows` tokens at a time, without
    ever holding the (tokens, vocab) logits: each chunk of logits is made, turned into its gradient (softmax minus
    one-hot) while it is in cache, and multiplied straight into the gradients of `hidden` and `weight`, so the
    gradients are computed in forward and backward only scales them. Under autocast the matmuls run in the autocast
    dtype and the softmax in fp32, as the unfused head and loss would.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int,
                needs_grad: bool) -> torch.Tensor:
        device_type = hidden.device.type
        dtype = compute_dtype(hidden)
        has_loss = (targets != -100)[:, None]  # (tokens, 1)
        targets = targets.clamp(min=0)[:, None]  # ignored positions pick any logit; `has_loss` zeroes their terms
        matmul_weight = weight.to(dtype)
        minus_one = torch.full((rows, 1), -1.0, device=hidden.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        with torch.autocast(device_type, enabled=False):
            for i in range(0, len(hidden), rows):
                chunk = hidden[i : i + rows].to(dtype)
                log_probs = torch.log_softmax((chunk @ matmul_weight.T).float(), dim=-1)  # (rows, vocab)
                loss -= (log_probs.gather(-1, targets[i : i + rows]) * has_loss[i : i + rows]).sum()
                if not needs_grad:
                    continue
                # d(-log_softmax(logits)[target]) / d logits = softmax(logits) - one_hot(target), made in place
                grad = log_probs.exp_()
                grad.scatter_add_(-1, targets[i : i + rows], minus_one[: len(grad)])
                grad.mul_(has_loss[i : i + rows])
                if dtype == torch.float32:  # straight into the outputs, no (vocab, hidden) temporary per chunk
                    torch.mm(grad, matmul_weight, out=grad_hidden[i : i + rows])
                    grad_weight.addmm_(grad.T, chunk)
                else:  # low-precision matmuls as under autocast, the weight gradient summed in fp32
                    grad = grad.to(dtype)
                    grad_hidden[i : i + rows] = grad @ matmul_weight
                    grad_weight += (grad.T @ chunk).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, (grad_weight * grad_loss).to(ctx.weight_dtype), None, None, None


LOSS_CHUNK_LOGITS = 2**21  # logits per chunk of the chunked losses on a CPU: 8 MB in fp32, small enough to stay in cache
# On accelerators: 128M logits per chunk (512 MB in fp32; e.g. 4,096 rows at a vocab of 32k), so that each chunk's
# matmuls fill the chip and a step runs a handful of chunks, not thousands.
LOSS_CHUNK_LOGITS_ACCELERATOR = 2**27


def loss_chunk_rows(device: torch.device, vocab_size: int) -> int:
    """Tokens per chunk of the chunked losses on `device`."""
    logits = LOSS_CHUNK_LOGITS if device.type == "cpu" else LOSS_CHUNK_LOGITS_ACCELERATOR
    return max(1, logits // vocab_size)


def causal_lm_loss(logits, labels, num_items_in_batch=None, ignore_index=-100, shift_labels=None, lm_head_weight=None,
                   **kwargs):
    """transformers' `ForCausalLMLoss` (labels shifted inside; mean over labelled tokens, or sum / num_items_in_batch
    under gradient accumulation) computed with `ChunkedCrossEntropy`; with `lm_head_weight`, `logits` are the hidden
    states before the head and the loss is `LinearCrossEntropy` (the logits are never materialised)."""
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(logits.device)
    if ignore_index != -100:
        targets = targets.masked_fill(targets == ignore_index, -100)
    logits = logits.reshape(-1, logits.shape[-1])
    has_loss = targets != -100
    num_labelled = has_loss.sum()
    if logits.device.type == "cpu":
        # Only positions with a label go through the head and the softmax (padding and, in SFT, the prompts are often
        # half of a batch). Not on accelerators: boolean indexing waits for the device.
        logits, targets = logits[has_loss], targets[has_loss]
    if lm_head_weight is None:
        loss = ChunkedCrossEntropy.apply(logits, targets, loss_chunk_rows(logits.device, logits.shape[-1]))
    else:
        rows = loss_chunk_rows(logits.device, len(lm_head_weight))
        # Gradients are made in forward, so it must know whether anyone will ask for them (not under no_grad).
        needs_grad = torch.is_grad_enabled() and (logits.requires_grad or lm_head_weight.requires_grad)
        loss = LinearCrossEntropy.apply(logits, lm_head_weight, targets, rows, needs_grad)
    if num_items_in_batch is None:
        return loss / num_labelled.clamp(min=1)  # a batch without labels: 0, not 0 / 0
    return loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch)


def logits_loss(loss_function, logits, labels, vocab_size, **kwargs):
    """The loss of full logits: on a CPU the chunked loss, which makes training steps faster
    (bench/cpu_training_choices.py); on accelerators, where each chunk would be a few kernel launches, transformers'
    `loss_function`."""
    if logits.device.type == "cpu":
        return causal_lm_loss(logits, labels, **kwargs)
    return loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)
