"""Build every quantized / exported variant of one checkpoint, then measure them with `tinyllm quantize drift`.

    python bench/quant_table.py --model outputs/pretrain-16m --work /tmp/quant-bench [--tasks 60 ...]

Variants are written to --work (reused when present): the `tinyllm quantize` methods and GGUF f16/q8_0/q4_k_m; the
table goes to WORK/drift.md and WORK/drift.json. Any other option is passed to the measurement,
tinyllm_hf/export/drift.py. A variant whose packages are missing here is listed as skipped with the reason.
"""

import argparse
import sys
from pathlib import Path

from tinyllm_hf.export import drift, quantize
from tinyllm_hf.export import gguf as gguf_export
from tinyllm_hf.inference.model_files import missing_runtime

GGUF_TYPES = ["f16", "q8_0", "q4_k_m"]


def build(model_dir: Path, work: Path, name: str) -> Path:
    """The variant called `name` (a quantize method or gguf-<type>), written to `work` unless it is there already."""
    if name.startswith("gguf-"):
        out = work / f"model-{name.removeprefix('gguf-')}.gguf"
        if not out.exists():
            gguf_export.export_gguf(model_dir, out, name.removeprefix("gguf-"))
        return out
    out = work / name
    if not out.exists():
        quantize.quantize_checkpoint(model_dir, out, name)
    return out


def missing_packages(name: str) -> str | None:
    """Why the variant `name` cannot be built and run here (a package is missing), or None."""
    if name.startswith("gguf-"):
        return missing_runtime("gguf")
    try:
        quantize.check_method(name)  # building needs more than running (the exporters)
    except ImportError as err:
        return str(err)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="Tinyllm or Llama checkpoint")
    parser.add_argument("--work", required=True, type=Path, help="where variants are written (reused if present)")
    parser.add_argument("--variants", default=",".join([*quantize.METHODS, *(f"gguf-{t}" for t in GGUF_TYPES)]))
    args, drift_args = parser.parse_known_args(argv)
    built, unavailable = [], {}
    for name in args.variants.split(","):
        reason = missing_packages(name)
        if reason:
            unavailable[name] = reason
        else:
            built.append(build(args.model, args.work, name))
    variants = [a for path in built for a in ("--variant", str(path))]
    return drift.main(["--model", str(args.model), "--output", str(args.work / "drift.md"), *variants, *drift_args],
                      unavailable)


if __name__ == "__main__":
    sys.exit(main())
