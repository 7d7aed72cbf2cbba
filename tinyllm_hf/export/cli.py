"""`tinyllm export`: write a checkpoint in a format other tools load.

    tinyllm export llama SRC DST      Tinyllm -> LlamaForCausalLM (transformers 4.x/5.x, vLLM, optimum)
    tinyllm export tinyllm SRC DST    LlamaForCausalLM -> Tinyllm (continue training a Llama checkpoint with us)
    tinyllm export gguf ...           GGUF for llama.cpp (see `tinyllm export gguf --help`)
    tinyllm export qwen2-moe ...      a MoE Tinyllm as Qwen2MoeForCausalLM
    tinyllm export gguf-moe ...       a MoE Tinyllm as a qwen2moe GGUF
"""

import argparse

from tinyllm_hf.modeling import convert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinyllm export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("format", choices=["llama", "tinyllm", "gguf", "qwen2-moe", "gguf-moe"])
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.format == "qwen2-moe":
        from tinyllm_hf.modeling import convert_moe

        return convert_moe.main(args.rest)
    if args.format == "gguf-moe":
        from tinyllm_hf.export import gguf_moe

        return gguf_moe.main(args.rest)
    if args.format == "gguf":
        from tinyllm_hf.export import gguf

        return gguf.main(args.rest)
    paths = argparse.ArgumentParser(prog=f"tinyllm export {args.format}")
    paths.add_argument("src", help="model directory to convert")
    paths.add_argument("dst", help="new, empty output directory")
    path_args = paths.parse_args(args.rest)
    to_format = convert.tinyllm_to_llama if args.format == "llama" else convert.llama_to_tinyllm
    try:
        out = to_format(path_args.src, path_args.dst)
    except (convert.ConversionError, FileNotFoundError, FileExistsError) as error:
        parser.exit(2, f"tinyllm export: error: {error}\n")
    print(f"wrote {args.format} checkpoint to {out}")
    return 0
