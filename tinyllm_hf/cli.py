"""The `tinyllm` command: the whole command tree.

The `tokenizer`, `export` and `quantize` sub-trees are declared here and call their modules' work functions. Every
other command's module parses its own arguments in `main(argv)` (the training stages from their recipe dataclasses,
with HfArgumentParser) and is dispatched to. Modules are imported only when their command runs, so `tinyllm --help`
and `tinyllm <command> --help` stay fast and a stage's optional dependencies are needed only when that stage runs.

Exit codes: 0 on success; 1 when the command raises a `TinyllmError`, printed as one line
`tinyllm <command>: error: <message>` on stderr; 2 for a command-line usage error (argparse's code).
"""

import argparse
import importlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tinyllm_hf.errors import TinyllmError, UsageError
from tinyllm_hf.model_utils import add_trust_remote_code_argument

COMMANDS = {
    "run": ("tinyllm_hf.pipeline", "run every stage of a recipe in order, skipping finished ones"),
    "tokenizer": (None, "train a BPE tokenizer or extend an existing one with Chinese"),
    "pretokenize": ("tinyllm_hf.trainers.pretokenize", "tokenize and pack a pretraining corpus once into shards on disk"),
    "pretrain": ("tinyllm_hf.trainers.pretrain", "pretrain a model on a packed corpus"),
    "sft": ("tinyllm_hf.trainers.sft", "supervised fine-tuning (full or LoRA) with TRL"),
    "distill": ("tinyllm_hf.trainers.distill", "knowledge distillation from a teacher sharing the tokenizer (TRL GKD)"),
    "dpo": ("tinyllm_hf.trainers.dpo", "direct preference optimisation with TRL"),
    "reward": ("tinyllm_hf.trainers.reward", "train a reward model with TRL"),
    "grpo": ("tinyllm_hf.trainers.grpo", "on-policy RL with GRPO"),
    "rloo": ("tinyllm_hf.trainers.rloo", "on-policy RL with RLOO"),
    "kto": ("tinyllm_hf.trainers.kto", "KTO preference optimisation (TRL KTOTrainer)"),
    "orpo": ("tinyllm_hf.trainers.orpo", "ORPO preference optimisation (trl.experimental)"),
    "merge": ("tinyllm_hf.trainers.merge", "merge a LoRA adapter into full weights"),
    "eval": ("tinyllm_hf.evaluation.cli", "C-Eval/CMMLU, perplexity and task accuracy"),
    "export": (None, "export to Llama (transformers/vLLM), Qwen2-MoE, GGUF (llama.cpp) or Ollama"),
    "quantize": (None, "quantize with ONNX Runtime, OpenVINO or quanto"),
    "chat": ("tinyllm_hf.inference.chat", "chat with a model in the terminal"),
    "serve": ("tinyllm_hf.inference.server", "OpenAI-compatible API server"),
    "demo": ("tinyllm_hf.inference.demo", "Gradio web chat demo"),
    "push": ("tinyllm_hf.hub.push", "release a model (or Space) on the Hugging Face Hub or ModelScope"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: tinyllm <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "Run `tinyllm <command> --help` for a command's options."]
    return "\n".join(lines)


def run_command(prog: str, main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run one command's `main`; a `TinyllmError` becomes `PROG: error: MESSAGE` on stderr and exit code 1.

    Also the `__main__` of each stage module, so `python -m tinyllm_hf.trainers.sft` and `accelerate launch -m ...`
    fail the same way as `tinyllm sft`.
    """
    try:
        return main(argv) or 0
    except TinyllmError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return TinyllmError.exit_code


# ---------------------------------------------------------------------------------------------------------------------
# tinyllm tokenizer train|extend
# ---------------------------------------------------------------------------------------------------------------------

TOKENIZER_EPILOG = """examples:
    tinyllm tokenizer train --corpus default --vocab-size 8192 --output runs/tokenizer
    tinyllm tokenizer extend --base gpt2 --corpus default --num-new-tokens 4000 --output runs/gpt2-zh \\
        [--model gpt2 --model-output runs/gpt2-zh-model]

`--corpus` takes anything `tinyllm_hf.data.corpus.load_corpus` does: "default", an embedded source name, a local
.txt/.jsonl/.parquet file or directory, or a Hugging Face dataset name. Only its train split is used."""


def tokenizer_parser() -> argparse.ArgumentParser:
    # Literal defaults (tokenizer/train.py's DEFAULT_VOCAB_SIZE and DEFAULT_MODEL_MAX_LENGTH, checked by a test):
    # importing that module for them would load transformers and torch just to print the help.
    parser = argparse.ArgumentParser(prog="tinyllm tokenizer", description=COMMANDS["tokenizer"][1],
                                     epilog=TOKENIZER_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train",
                                help="train a byte-level BPE tokenizer with our special tokens and chat template")
    train.add_argument("--corpus", default="default", help="corpus source (default: the embedded corpus)")
    train.add_argument("--corpus-config", default=None, help="configuration of a Hub corpus (e.g. 20231101.zh)")
    train.add_argument("--vocab-size", type=int, default=8192)
    train.add_argument("--min-frequency", type=int, default=2)
    train.add_argument("--model-max-length", type=int, default=1024)
    train.add_argument("--tool-format", type=int, default=2000, metavar="N",
                       help="also learn from N rendered tool-use conversations of the built-in tools, so that the "
                            "tool list and call JSON get tokens of their own (0: the corpus only; default: 2000)")
    train.add_argument("--max-train-chars", type=int, default=20_000_000, metavar="N",
                       help="train on at most N characters of the corpus, sampled across all of it, which bounds the "
                            "memory (~167 bytes per character trained on); 0: the whole corpus (default: 20,000,000)")
    train.add_argument("--output", required=True, help="directory to save the tokenizer to")
    train.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")

    extend = commands.add_parser("extend", help="add vocabulary learned from a corpus to an existing BPE tokenizer")
    extend.add_argument("--base", required=True, help="tokenizer directory or Hugging Face model name")
    extend.add_argument("--corpus", default="default", help="corpus source (default: the embedded corpus)")
    extend.add_argument("--corpus-config", default=None, help="configuration of a Hub corpus (e.g. 20231101.zh)")
    size = extend.add_mutually_exclusive_group(required=True)
    size.add_argument("--num-new-tokens", type=int)
    size.add_argument("--target-vocab-size", type=int)
    extend.add_argument("--min-frequency", type=int, default=2)
    extend.add_argument("--output", required=True, help="directory to save the extended tokenizer to")
    extend.add_argument("--model", help="model (directory or Hub name) whose embeddings to resize to the new tokenizer")
    extend.add_argument("--model-output", help="directory to save the resized model to (required with --model)")
    extend.add_argument("--overwrite", action="store_true", help="replace non-empty output directories")
    add_trust_remote_code_argument(extend)
    return parser


def tokenizer_command(argv: list[str]) -> int:
    args = tokenizer_parser().parse_args(argv)
    if args.command == "extend" and bool(args.model) != bool(args.model_output):
        raise UsageError("--model and --model-output go together: pass both to resize a model, or neither")
    from tinyllm_hf.data.corpus import iter_texts, load_corpus

    texts = iter_texts(load_corpus(args.corpus, split="train", config=args.corpus_config))
    start = time.perf_counter()
    if args.command == "train":
        from tinyllm_hf.tokenizer.train import train_tokenizer

        if args.tool_format < 0:
            raise UsageError(f"--tool-format must be 0 or more conversations, not {args.tool_format}")
        if args.max_train_chars < 0:
            raise UsageError(f"--max-train-chars must be 0 (no cap) or a number of characters, not {args.max_train_chars}")
        tool_texts = []
        if args.tool_format:
            from tinyllm_hf.tasks.tool_use import tool_format_texts

            tool_texts = tool_format_texts(args.tool_format)  # always learnt from: outside the cap

        tokenizer = train_tokenizer(texts, vocab_size=args.vocab_size, output_dir=args.output,
                                    min_frequency=args.min_frequency, model_max_length=args.model_max_length,
                                    overwrite=args.overwrite, max_train_chars=args.max_train_chars or None,
                                    extra_texts=tool_texts)
        print(f"trained a {len(tokenizer)}-token tokenizer in {time.perf_counter() - start:.1f}s -> {args.output}")
        return 0
    from tinyllm_hf.tokenizer.extend import extend_tokenizer_and_model

    base, extended, model = extend_tokenizer_and_model(
        args.base, texts, num_new_tokens=args.num_new_tokens, target_vocab_size=args.target_vocab_size,
        output_dir=args.output, min_frequency=args.min_frequency, overwrite=args.overwrite,
        model=args.model, model_output=args.model_output, trust_remote_code=args.trust_remote_code,
    )
    print(f"extended {args.base}: {len(base)} -> {len(extended)} tokens -> {args.output}")
    if model is not None:
        rows = model.get_input_embeddings().weight.shape[0]
        print(f"resized {args.model} embeddings to {rows} rows -> {args.model_output}")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# tinyllm export llama|tinyllm|qwen2-moe|gguf
# ---------------------------------------------------------------------------------------------------------------------

EXPORT_FORMATS = {
    "llama": "Tinyllm -> LlamaForCausalLM (transformers 4.x/5.x, vLLM, optimum)",
    "tinyllm": "LlamaForCausalLM -> Tinyllm (continue training a Llama checkpoint with us)",
    "qwen2-moe": "a Mixture-of-Experts Tinyllm -> Qwen2MoeForCausalLM",
}


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinyllm export",
                                     description="write a checkpoint in a format other tools load")
    formats = parser.add_subparsers(dest="format", required=True, metavar="{llama,tinyllm,qwen2-moe,gguf,ollama}")
    for name, help_text in EXPORT_FORMATS.items():
        paths = formats.add_parser(name, help=help_text, description=help_text)
        paths.add_argument("src", help="model directory to convert")
        paths.add_argument("dst", help="new, empty output directory")
    from tinyllm_hf.export.gguf import OUTTYPES  # numpy only: the help stays free of torch

    gguf_help = "GGUF for llama.cpp: `llama` for a dense model, `qwen2moe` for a Mixture-of-Experts one"
    gguf = formats.add_parser("gguf", help=gguf_help, description=gguf_help)
    gguf.add_argument("--model", required=True,
                      help="Tinyllm, Llama or Qwen2-MoE checkpoint directory (safetensors + tokenizer)")
    gguf.add_argument("--output", required=True, help="GGUF file to write, e.g. model-q8_0.gguf")
    gguf.add_argument("--outtype", default="f16", choices=OUTTYPES, help="tensor type (q4_k_m needs [llamacpp])")
    add_trust_remote_code_argument(gguf)
    # A subcommand of its own rather than `gguf --ollama`: its output is a folder (GGUF + Modelfile), not one file.
    ollama_help = "a folder for Ollama: model.gguf and a Modelfile with our chat template, stop tokens and defaults"
    ollama = formats.add_parser("ollama", help=ollama_help, description=ollama_help)
    ollama.add_argument("--model", required=True, help="checkpoint directory (as for gguf) or an exported .gguf file")
    ollama.add_argument("--output", required=True, help="new, empty folder to write model.gguf and Modelfile to")
    ollama.add_argument("--outtype", default="f16", choices=OUTTYPES, help="tensor type when --model is a checkpoint")
    add_trust_remote_code_argument(ollama)
    return parser


def export_command(argv: list[str]) -> int:
    args = export_parser().parse_args(argv)
    if args.format == "ollama":
        from tinyllm_hf.export.ollama import export_ollama

        out = export_ollama(args.model, args.output, args.outtype, args.trust_remote_code)
        print(f"wrote {out}/Modelfile and model.gguf; import with: cd {out} && ollama create NAME -f Modelfile")
        return 0
    if args.format == "gguf":
        from tinyllm_hf.export.gguf import export_gguf

        path = export_gguf(args.model, args.output, args.outtype, args.trust_remote_code)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.outtype})")
        return 0
    if args.format == "qwen2-moe":
        from tinyllm_hf.modeling.convert_moe import tinyllm_to_qwen2_moe as convert
    else:
        from tinyllm_hf.modeling import convert as conversions

        convert = conversions.tinyllm_to_llama if args.format == "llama" else conversions.llama_to_tinyllm
    out = convert(args.src, args.dst)
    print(f"wrote {args.format} checkpoint to {out}")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# tinyllm quantize [drift]
# ---------------------------------------------------------------------------------------------------------------------

def quantize_parser() -> argparse.ArgumentParser:
    from tinyllm_hf.export import quantize  # numpy only: the help stays free of torch

    parser = argparse.ArgumentParser(prog="tinyllm quantize", description=quantize.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Tinyllm or Llama checkpoint directory")
    parser.add_argument("--method", required=True, help=f"one of {', '.join(quantize.METHODS)}")
    parser.add_argument("--output", required=True, help="new output directory")
    add_trust_remote_code_argument(parser)
    return parser


def quantize_command(argv: list[str]) -> int:
    if argv and argv[0] == "drift":  # `tinyllm quantize drift`: measure variants instead of making one
        from tinyllm_hf.export import drift

        return drift.main(argv[1:])
    args = quantize_parser().parse_args(argv)
    from tinyllm_hf.export.quantize import quantize_checkpoint

    out = quantize_checkpoint(args.model, args.output, args.method, args.trust_remote_code)
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    print(f"wrote {args.method} model to {out} ({size / 2**20:.1f} MiB)")
    return 0


TREE_COMMANDS = {"tokenizer": tokenizer_command, "export": export_command, "quantize": quantize_command}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"tinyllm: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if name in TREE_COMMANDS:
        return run_command(f"tinyllm {name}", TREE_COMMANDS[name], rest)
    return run_command(f"tinyllm {name}", importlib.import_module(COMMANDS[name][0]).main, rest)


if __name__ == "__main__":
    sys.exit(main())
