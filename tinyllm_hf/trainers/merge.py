"""`tinyllm merge`: fold a LoRA adapter into its base model's weights and save a plain, full checkpoint.

    tinyllm merge --adapter outputs/sft-lora --output outputs/sft-merged [--base outputs/pretrain]

The merged folder loads like any Tinyllm checkpoint (no peft needed), with the adapter folder's tokenizer (the one SFT
trained with) or else the base model's, and likewise the adapter folder's generation_config.json (SFT's sampling
defaults). `--base` defaults to the base model the adapter was trained on, as recorded in
its adapter_config.json.
"""

import argparse
import json
import sys
from pathlib import Path

from tinyllm_hf.errors import MissingFileError, UsageError
from tinyllm_hf.model_utils import add_trust_remote_code_argument, check_local_path, get_model, get_tokenizer
from tinyllm_hf.runs import ADAPTER_CONFIG_FILE, atomic_output

DTYPES = ("float32", "bfloat16", "float16")


def adapter_base(adapter_dir: Path) -> str:
    config_path = adapter_dir / ADAPTER_CONFIG_FILE
    if not config_path.is_file():
        raise MissingFileError(f"{adapter_dir} is not a PEFT adapter folder: no {ADAPTER_CONFIG_FILE}")
    base = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise UsageError(f"{config_path} does not name its base model: pass --base")
    return base


def merge_adapter(adapter_dir: str | Path, output_dir: str | Path, base: str | None = None, dtype: str = "float32",
                  overwrite: bool = False, trust_remote_code: bool = False) -> Path:
    """Load `base`, apply the adapter, merge it into the weights and save model + tokenizer to `output_dir`; code
    shipped with the base model or tokenizer runs only with `trust_remote_code`.

    Merging runs in `dtype` (float32 by default: merging in half precision rounds the sum of base and update)."""
    from peft import PeftModel
    from transformers import GenerationConfig
    from transformers.utils import GENERATION_CONFIG_NAME

    # Here, not at the top: the tokenizer package loads transformers' AutoTokenizer, which imports torch, and
    # `tinyllm merge --help` (and `tinyllm chat`, for `adapter_base`) should not wait for it.
    from tinyllm_hf.tokenizer.train import check_output_dir, write_portable_tokenizer_config

    adapter_dir = Path(adapter_dir)
    base = base or adapter_base(adapter_dir)
    if not (adapter_dir / ADAPTER_CONFIG_FILE).is_file():
        raise MissingFileError(f"{adapter_dir} is not a PEFT adapter folder: no {ADAPTER_CONFIG_FILE}")
    check_local_path(base, "base model")
    check_output_dir(Path(output_dir), overwrite)  # before the merge, which loads the whole model
    model = get_model(base, dtype=dtype, trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    if (adapter_dir / GENERATION_CONFIG_NAME).is_file():  # the sampling defaults SFT wrote, not the base model's
        merged.generation_config = GenerationConfig.from_pretrained(adapter_dir)
    tokenizer_source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base
    tokenizer = get_tokenizer(str(tokenizer_source), trust_remote_code=trust_remote_code)
    with atomic_output(output_dir) as staging:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_portable_tokenizer_config(staging)
    return Path(output_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tinyllm merge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="folder with adapter_config.json and the adapter weights")
    p.add_argument("--output", required=True, help="folder for the merged model")
    p.add_argument("--base", default=None, help="base model folder or Hub id (default: the adapter's recorded base)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype to merge and save in")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    add_trust_remote_code_argument(p)
    args = p.parse_args(argv)
    path = merge_adapter(args.adapter, args.output, args.base, args.dtype, args.overwrite, args.trust_remote_code)
    print(f"merged model written to {path}")
    return 0


if __name__ == "__main__":
    from tinyllm_hf.cli import run_command

    sys.exit(run_command("tinyllm merge", main))
