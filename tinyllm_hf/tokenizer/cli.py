"""`tinyllm tokenizer train|extend`: a byte-level BPE from a corpus, or Chinese vocabulary added to an existing one.

    tinyllm tokenizer train --corpus default --vocab-size 8192 --output runs/tokenizer
    tinyllm tokenizer extend --base gpt2 --corpus default --num-new-tokens 4000 --output runs/gpt2-zh \\
        [--model gpt2 --model-output runs/gpt2-zh-model]

`--corpus` takes anything `tinyllm_hf.data.corpus.load_corpus` does: "default", an embedded source name, a local
.txt/.jsonl/.parquet file or directory, or a Hugging Face dataset name. Only its train split is used.
"""

import argparse
import sys
import time
from pathlib import Path

from tinyllm_hf.tokenizer.train import DEFAULT_MODEL_MAX_LENGTH, DEFAULT_VOCAB_SIZE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinyllm tokenizer", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a byte-level BPE tokenizer with our special tokens and chat template")
    train.add_argument("--corpus", default="default", help="corpus source (default: the embedded corpus)")
    train.add_argument("--corpus-config", default=None, help="configuration of a Hub corpus (e.g. 20231101.zh)")
    train.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    train.add_argument("--min-frequency", type=int, default=2)
    train.add_argument("--model-max-length", type=int, default=DEFAULT_MODEL_MAX_LENGTH)
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
    return parser


def _train_texts(source: str, config: str | None = None):
    from tinyllm_hf.data.corpus import iter_texts, load_corpus

    return iter_texts(load_corpus(source, split="train", config=config))


def run_train(args) -> None:
    from tinyllm_hf.tokenizer.train import train_tokenizer

    start = time.perf_counter()
    tokenizer = train_tokenizer(
        _train_texts(args.corpus, args.corpus_config),
        vocab_size=args.vocab_size,
        output_dir=args.output,
        min_frequency=args.min_frequency,
        model_max_length=args.model_max_length,
        overwrite=args.overwrite,
    )
    print(f"trained a {len(tokenizer)}-token tokenizer in {time.perf_counter() - start:.1f}s -> {args.output}")


def run_extend(args) -> None:
    from tinyllm_hf.tokenizer.extend import extend_tokenizer, load_base_tokenizer, resize_model_embeddings
    from tinyllm_hf.runs import atomic_output
    from tinyllm_hf.tokenizer.train import check_output_dir, write_portable_tokenizer_config

    if bool(args.model) != bool(args.model_output):
        raise ValueError("--model and --model-output go together")
    if args.model_output:
        # Checked before the (slow) extension so a bad path fails fast.
        check_output_dir(Path(args.model_output), args.overwrite)
    base = load_base_tokenizer(args.base)
    extended = extend_tokenizer(
        base,
        _train_texts(args.corpus, args.corpus_config),
        num_new_tokens=args.num_new_tokens,
        target_vocab_size=args.target_vocab_size,
        output_dir=args.output,
        min_frequency=args.min_frequency,
        overwrite=args.overwrite,
    )
    print(f"extended {args.base}: {len(base)} -> {len(extended)} tokens -> {args.output}")
    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model)
        resize_model_embeddings(model, base, extended)
        with atomic_output(args.model_output) as staging:  # its folder was checked above
            model.save_pretrained(staging)
            extended.save_pretrained(staging)
            write_portable_tokenizer_config(staging)
        print(f"resized {args.model} embeddings to {model.get_input_embeddings().weight.shape[0]} rows -> {args.model_output}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_train(args) if args.command == "train" else run_extend(args)
    except (ValueError, ImportError, OSError) as err:
        print(f"tinyllm tokenizer {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
