r"""Per-question predictions of OpenCompass and of `tinyllm eval --prompt-style opencompass` on the same model and the
same C-Eval / CMMLU questions (ppl mode, 5-shot, OpenCompass's `ceval_ppl_578f8d` and `cmmlu_ppl_8b9c76` configs).

OpenCompass pins `datasets<4`, so it lives in its own virtual environment (`--opencompass-python`, e.g. made with
`python -m venv /tmp/oc && /tmp/oc/bin/pip install torch==2.13.0 opencompass`). The model is a Llama with random,
deliberately large weights (so the four letters' likelihoods differ clearly) and our tokenizer, with a 2,048-token
context so that no 5-shot prompt is cut: both sides see whole prompts. OpenCompass reads the official layouts from
./data under its working directory (its `local` paths), copied there from the shared fixtures.

    python bench/opencompass_compare.py --opencompass-python /tmp/oc-venv/bin/python
"""

import argparse
import csv
import datetime
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tinyllm_hf.evaluation.benchmarks import LETTERS, PROMPT_STYLES, load_local
from tinyllm_hf.evaluation.mc import ppl_prompts, score_choices

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
CONFIGS = {"ceval": "ceval_ppl_578f8d", "cmmlu": "cmmlu_ppl_8b9c76"}
CONTEXT = 2048


def build_model(out_dir: Path):
    from tinyllm_hf.data.corpus import load_corpus
    from tinyllm_hf.tokenizer.train import train_tokenizer

    tokenizer = train_tokenizer(load_corpus("default", split="validation")["text"], vocab_size=4096,
                                output_dir=out_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=CONTEXT, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.3)
    model.save_pretrained(out_dir)
    return model.eval(), tokenizer


def opencompass_data(work: Path) -> None:
    """The fixtures where OpenCompass's local paths expect them (C-Eval also needs a test split: header-only files)."""
    ceval = work / "data" / "ceval" / "formal_ceval"
    shutil.copytree(FIXTURES / "ceval", ceval, ignore=shutil.ignore_patterns("mapping.json"))
    (ceval / "test").mkdir(exist_ok=True)
    for val in (ceval / "val").glob("*_val.csv"):
        with val.open(encoding="utf-8") as f:
            header = next(csv.reader(f))
        (ceval / "test" / val.name.replace("_val.csv", "_test.csv")).write_text(",".join(header) + "\n", "utf-8")
    shutil.copytree(FIXTURES / "cmmlu", work / "data" / "cmmlu")


def opencompass_config(path: Path, model_dir: Path, subjects: dict[str, list[str]]) -> None:
    abbrs = [f"ceval-{s}" for s in subjects["ceval"]] + [f"cmmlu-{s}" for s in subjects["cmmlu"]]
    path.write_text(f'''from mmengine.config import read_base
from opencompass.models import HuggingFaceBaseModel

with read_base():
    from opencompass.configs.datasets.ceval.{CONFIGS["ceval"]} import ceval_datasets
    from opencompass.configs.datasets.cmmlu.{CONFIGS["cmmlu"]} import cmmlu_datasets

datasets = [d for d in [*ceval_datasets, *cmmlu_datasets] if d["abbr"] in {abbrs!r}]
models = [dict(type=HuggingFaceBaseModel, abbr="tiny-llama", path={str(model_dir)!r}, max_seq_len={CONTEXT},
               max_out_len=1, batch_size=8, run_cfg=dict(num_gpus=0))]
''', "utf-8")


def opencompass_predictions(work: Path) -> dict[str, list[str]]:
    """{dataset abbr: the predicted letter of each question, in file order} from OpenCompass's predictions folder."""
    (folder,) = (work / "outputs").glob("*/predictions/tiny-llama")
    predictions = {}
    for file in folder.glob("*.json"):
        rows = json.loads(file.read_text("utf-8"))
        predictions[file.stem] = [rows[str(i)]["prediction"] for i in range(len(rows))]
    return predictions


def our_predictions(model, tokenizer, subjects: dict[str, list[str]], style_name: str) -> dict[str, list[str]]:
    style = PROMPT_STYLES[style_name]
    predictions = {}
    for name, names in subjects.items():
        bench = load_local(name, FIXTURES / name, subjects=names)
        for subject in names:
            questions = bench.questions[subject]
            prompts = ppl_prompts(bench, questions, 5, tokenizer, CONTEXT, style)
            assert all(p.shots == 5 for p in prompts), "a prompt lost exemplars: raise CONTEXT"
            targets = tuple(style.target(bench, letter) for letter in LETTERS)
            scores = score_choices(model, tokenizer, [p.text for p in prompts], 8, False, targets)
            predictions[f"{name}-{subject}"] = [LETTERS[max(range(4), key=s.__getitem__)] for s in scores]
    return predictions


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--opencompass-python", required=True, help="python of the environment with opencompass")
    parser.add_argument("--work-dir", default=None, help="default: a temporary folder")
    parser.add_argument("--reuse", action="store_true", help="read the model and OpenCompass's predictions from an "
                        "earlier run in --work-dir instead of running it again")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="opencompass-compare-"))
    subjects = {name: sorted(load_local(name, FIXTURES / name).questions) for name in CONFIGS}
    if args.reuse:
        from transformers import AutoTokenizer

        model, tokenizer = LlamaForCausalLM.from_pretrained(work / "model").eval(), AutoTokenizer.from_pretrained(work / "model")
        theirs, seconds = opencompass_predictions(work), None
    else:
        model, tokenizer = build_model(work / "model")
        theirs, seconds = run_opencompass(args.opencompass_python, work, subjects)
    ours = {style: our_predictions(model, tokenizer, subjects, style) for style in ("opencompass", "lm-eval")}

    print(f"\n## OpenCompass vs `--prompt-style opencompass`, ppl mode 5-shot ({datetime.date.today()})\n")
    ran = f"OpenCompass ran in {seconds:.0f} s" if seconds else "OpenCompass's predictions of an earlier run"
    print(f"Random-weight Llama (hidden 64, 2 layers, vocab {len(tokenizer)}, context {CONTEXT}), the shared fixtures; "
          f"{ran}. Work folder: {work}\n")
    print("| dataset | questions | same prediction, `--prompt-style opencompass` | same prediction, `lm-eval` (default) |")
    print("|---|---|---|---|")
    totals = {style: 0 for style in ours}
    n = 0
    for abbr in sorted(ours["opencompass"]):
        reference = theirs.get(abbr, [])
        agree = {style: sum(x == y for x, y in zip(pred[abbr], reference)) for style, pred in ours.items()}
        assert len(reference) == len(ours["opencompass"][abbr]), f"{abbr}: OpenCompass has {len(reference)} questions"
        n += len(reference)
        totals = {style: totals[style] + agree[style] for style in ours}
        print(f"| {abbr} | {len(reference)} | {agree['opencompass']} | {agree['lm-eval']} |")
    print(f"| all | {n} | {totals['opencompass']} ({100 * totals['opencompass'] / n:.1f}%) | "
          f"{totals['lm-eval']} ({100 * totals['lm-eval'] / n:.1f}%) |")


def run_opencompass(python: str, work: Path, subjects: dict[str, list[str]]) -> tuple[dict[str, list[str]], float]:
    opencompass_data(work)
    opencompass_config(work / "config.py", work / "model", subjects)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("DATASET_SOURCE", None)
    runner = Path(python).parent / "opencompass"
    start = time.perf_counter()
    result = subprocess.run([str(runner), "config.py", "-w", "outputs", "--debug"], cwd=work, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"opencompass failed (rc {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return opencompass_predictions(work), time.perf_counter() - start


if __name__ == "__main__":
    main()
