"""Parameter counts of the named presets, for the README table (checked against the code by a test).

    python -m tinyllm_hf.modeling.presets [VOCAB_SIZE]
"""

import sys

import torch

from tinyllm_hf.modeling.configuration_tinyllm import PRESETS, TinyllmConfig
from tinyllm_hf.modeling.modeling_tinyllm import TinyllmForCausalLM


def preset_parameter_counts(vocab_size: int) -> dict[str, tuple[int, int]]:
    """preset -> (all parameters, embedding parameters), built on the meta device so even 1.5b costs no memory."""
    counts = {}
    for name in PRESETS:
        with torch.device("meta"):
            model = TinyllmForCausalLM(TinyllmConfig.from_preset(name, vocab_size=vocab_size))
        embedding = model.model.embed_tokens.weight.numel()
        if not model.config.tie_word_embeddings:
            embedding += model.lm_head.weight.numel()
        counts[name] = (model.num_parameters(), embedding)
    return counts


def preset_table(vocab_size: int) -> str:
    lines = [
        f"| preset | hidden | intermediate | layers | heads | context | parameters (vocab {vocab_size:,}) | embedding share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (total, embedding) in preset_parameter_counts(vocab_size).items():
        p = PRESETS[name]
        lines.append(
            f"| `{name}` | {p['hidden_size']} | {p['intermediate_size']} | {p['num_hidden_layers']} | "
            f"{p['num_attention_heads']} | {p['max_position_embeddings']} | {total / 1e6:,.2f}M | "
            f"{100 * embedding / total:.1f}% |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    from tinyllm_hf.tokenizer.train import DEFAULT_VOCAB_SIZE

    print(preset_table(int(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_VOCAB_SIZE))
