"""What the SFT data cache saves at a restart: two `tinyllm sft` starts on the same instruction set.

    python bench/sft_data_cache.py --rows 100000

Writes a local instruction set in the schema of BelleGroup/train_0.5M_CN as the Hub publishes it (JSON lines with
instruction, input, output) from the embedded corpus, a tiny model with an 8,192-token tokenizer learnt from that
text, and prepares an SFT run on it twice into the same output_dir, as `tinyllm sft` does before its first step. The
first start converts and tokenizes the rows (`tinyllm_hf.data.on_disk.built_once`, under output_dir/datasets); the
second loads both from disk. Prints the seconds each start spends on the conversations and on tokenizing them (a markdown table row).
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# One SFT start up to the first step, timing its data preparation: the conversations (read, converted, saved) and
# the trainer's tokenization (TinyllmSFTTrainer._prepare_dataset), each built once or loaded from output_dir/datasets.
PREPARE = """
import json, sys, time
from tinyllm_hf.trainers import sft
from tinyllm_hf.trainers.common import parse_recipe

model_args, data_args, args, _ = parse_recipe(sft.ARGUMENTS, sys.argv[1:], defaults=sft.DEFAULTS)
tokenizer = sft.load_tokenizer(data_args, model_args)
model = sft.load_model(model_args, tokenizer)
began = time.perf_counter()
train, _ = sft.shared_datasets(data_args, args.seed, args)
converted = time.perf_counter()
trainer = sft.TinyllmSFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
tokenized = time.perf_counter()
print(json.dumps({"conversations": converted - began, "tokens": tokenized - converted,
                  "input_ids": sum(map(len, trainer.train_dataset["input_ids"]))}))
"""


def write_belle(path: Path, rows: int, seed: int = 0) -> None:
    from tinyllm_hf.data.corpus import load_corpus

    texts = [t for t in load_corpus("default", split="train")["text"] if len(t) >= 20]
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            text = rng.choice(texts)
            cut = rng.randint(5, min(40, len(text) - 5))
            row = {"instruction": f"请续写下面这段话（第{i}题）：", "input": text[:cut], "output": text[cut:cut + 400]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def tiny_model(path: Path, belle: Path) -> None:
    from tinyllm_hf import TinyllmConfig, TinyllmForCausalLM
    from tinyllm_hf.tokenizer.train import train_tokenizer

    texts = (json.loads(line)["output"] for line in belle.open(encoding="utf-8"))
    tokenizer = train_tokenizer(texts, vocab_size=8192, max_train_chars=2_000_000)
    config = TinyllmConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    TinyllmForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def start(model: Path, belle: Path, output: Path) -> dict:
    command = [sys.executable, "-c", PREPARE, "--model_name_or_path", str(model), "--dataset_name", str(belle),
               "--output_dir", str(output), "--max_length", "512", "--use_cpu", "true", "--report_to", "none",
               "--max_eval_samples", "0", "--eval_strategy", "no"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(command, env=env, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        belle = tmp / "belle.jsonl"
        write_belle(belle, args.rows)
        tiny_model(tmp / "model", belle)
        first = start(tmp / "model", belle, tmp / "sft")
        second = start(tmp / "model", belle, tmp / "sft")
    assert first["input_ids"] == second["input_ids"]
    for name, run in (("first start (build)", first), ("second start (load)", second)):
        print(f"| {args.rows:,} | {name} | {run['conversations']:.1f} | {run['tokens']:.1f} | "
              f"{run['conversations'] + run['tokens']:.1f} |")


if __name__ == "__main__":
    main()
