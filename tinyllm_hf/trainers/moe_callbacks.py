"""Expert load logging for Mixture-of-Experts training: makes routing imbalance visible while training and after it.

At every Trainer log the callback reads the model's statistics since the last log (`TinyllmForCausalLM.pop_moe_stats`)
and adds to the logs:

- `moe_aux_loss`, `moe_z_loss`: the balancing losses before their coefficients (the `loss` column already includes them);
- `moe_load_max_over_mean`: tokens of the busiest expert over the mean, worst layer (1.0 is perfect balance, and
  num_experts / top_k means one set of experts takes every token).

When training ends it writes `expert_load.json` (per-layer, per-expert token counts of every logging interval) and
`expert_load.png` (imbalance over steps, and each expert's share of the tokens in each layer over the whole run).
Counts are those of the process that logs (rank 0 under DDP).
"""

import json
import os
from pathlib import Path

from transformers import TrainerCallback

from tinyllm_hf.trainers.common import headless_pyplot, logger, save_figure


def max_over_mean(counts: list[list[float]]) -> float:
    """Busiest expert's tokens over the mean, for the worst layer; `counts` is (moe_layers, experts)."""
    return max(max(layer) / (sum(layer) / len(layer)) for layer in counts if sum(layer) > 0)


def plot_expert_load(history: list[dict], path: str | os.PathLike) -> Path:
    """Two panels: max/mean load per logging step, and a heat map of each expert's token share per MoE layer."""
    import numpy as np

    plt = headless_pyplot()

    totals = np.sum([entry["expert_counts"] for entry in history], axis=0)  # (moe_layers, experts)
    shares = totals / totals.sum(axis=1, keepdims=True)
    fig, (curve, heat) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1.2]})
    curve.plot([e["step"] for e in history], [e["max_over_mean"] for e in history], "o-", markersize=3)
    curve.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    curve.set_xlabel("step")
    curve.set_ylabel("busiest expert / mean (worst layer)")
    curve.grid(alpha=0.3)
    image = heat.imshow(shares, aspect="auto", cmap="viridis", vmin=0)
    heat.set_xlabel("expert")
    heat.set_ylabel("MoE layer")
    heat.set_title(f"token share over the run (uniform = {1 / shares.shape[1]:.3f})", fontsize=9)
    fig.colorbar(image, ax=heat)
    return save_figure(fig, path)


class MoeLoadCallback(TrainerCallback):
    """Logs expert load and balancing losses of a Mixture-of-Experts Tinyllm; plots the load when training ends.

    Register it before the Trainer's printers and reporters (`add_callback_first`) so they see the added values.
    """

    def __init__(self, filename: str = "expert_load"):
        self.filename = filename
        self.history: list[dict] = []

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        model = getattr(model, "module", model)  # DDP wraps the model
        stats = model.pop_moe_stats() if hasattr(model, "pop_moe_stats") else None
        if stats is None or logs is None or "loss" not in logs:
            return  # evaluation logs: evaluation forwards are not counted
        extra = {
            "moe_aux_loss": round(stats["aux_loss"], 4),
            "moe_z_loss": round(stats["z_loss"], 4),
            "moe_load_max_over_mean": round(max_over_mean(stats["expert_counts"]), 3),
        }
        logs.update(extra)
        # Trainer.log stored a copy of these logs in log_history before calling the callbacks.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)
        self.history.append({"step": state.global_step, "max_over_mean": extra["moe_load_max_over_mean"],
                             "expert_counts": stats["expert_counts"]})

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.history:
            return
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{self.filename}.json").write_text(json.dumps(self.history), encoding="utf-8")
        path = plot_expert_load(self.history, out / f"{self.filename}.png")
        logger.warning(f"expert load written to {path} and {self.filename}.json")
