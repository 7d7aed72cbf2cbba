"""The `tinyllm` command: one subcommand per stage, each handled by the module that implements the stage.

Every stage module exposes `main(argv: list[str] | None)`; this file only maps names to modules, imported lazily so
`tinyllm --help` stays fast and a stage's optional dependencies are needed only when that stage runs.
"""

import importlib
import sys

SUBCOMMANDS = {
    "run": ("tinyllm_hf.pipeline", "run every stage of a recipe in order, skipping finished ones"),
    "tokenizer": ("tinyllm_hf.tokenizer.cli", "train a BPE tokenizer or extend an existing one with Chinese"),
    "pretrain": ("tinyllm_hf.trainers.pretrain", "pretrain a model on a packed corpus"),
    "sft": ("tinyllm_hf.trainers.sft", "supervised fine-tuning (full or LoRA) with TRL"),
    "dpo": ("tinyllm_hf.trainers.dpo", "direct preference optimisation with TRL"),
    "reward": ("tinyllm_hf.trainers.reward", "train a reward model with TRL"),
    "grpo": ("tinyllm_hf.trainers.grpo", "on-policy RL with GRPO"),
    "rloo": ("tinyllm_hf.trainers.rloo", "on-policy RL with RLOO"),
    "kto": ("tinyllm_hf.trainers.kto", "KTO preference optimisation (TRL KTOTrainer)"),
    "orpo": ("tinyllm_hf.trainers.orpo", "ORPO preference optimisation (trl.experimental)"),
    "merge": ("tinyllm_hf.trainers.merge", "merge a LoRA adapter into full weights"),
    "eval": ("tinyllm_hf.evaluation.cli", "C-Eval/CMMLU, perplexity and task accuracy"),
    "export": ("tinyllm_hf.export.cli", "export to Llama (transformers/vLLM) or GGUF (llama.cpp)"),
    "quantize": ("tinyllm_hf.export.quantize", "quantize with ONNX Runtime, OpenVINO or quanto"),
    "chat": ("tinyllm_hf.inference.chat", "chat with a model in the terminal"),
    "serve": ("tinyllm_hf.inference.server", "OpenAI-compatible API server"),
    "demo": ("tinyllm_hf.inference.demo", "Gradio web chat demo"),
    "push": ("tinyllm_hf.hub.push", "release a model (or Space) on the Hugging Face Hub"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: tinyllm <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    lines += ["", "Run `tinyllm <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"tinyllm: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
