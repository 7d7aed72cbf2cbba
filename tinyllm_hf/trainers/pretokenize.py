"""`tinyllm pretokenize`: a pretraining recipe's corpus tokenized and packed once into shards on disk.

    tinyllm pretokenize --config recipes/pretrain/92m.yaml [--tokenized_dataset DIR] [--preprocessing_num_workers 16]

It takes the pretraining recipe itself (any of its keys can be overridden, as for `tinyllm pretrain`) and writes the
blocks that recipe would train on to its `tokenized_dataset` folder: the corpus keys (`dataset_name`,
`dataset_config`, `text_field`), `tokenizer_name_or_path` and `block_size` (default: the model's context) say what,
`preprocessing_num_workers` how many processes tokenize. See tinyllm_hf/data/pretokenized.py for the folder, its
manifest and when it is reused, refused or rebuilt. `tinyllm pretrain` with the same recipe then reads the folder.
"""

import sys
from dataclasses import dataclass, field

from tinyllm_hf.data.pretokenized import pretokenize
from tinyllm_hf.errors import UsageError
from tinyllm_hf.trainers.common import parse_recipe
from tinyllm_hf.trainers.pretrain import ARGUMENTS, DEFAULTS, load_tokenizer, recipe_block_size


@dataclass
class PretokenizeArguments:
    overwrite: bool = field(
        default=False,
        metadata={"help": "replace a tokenized_dataset made from other inputs (a matching one is always reused)"},
    )
    num_shards: int | None = field(default=None, metadata={"help": "files of the train split (default: 500 MB each)"})


def main(argv: list[str] | None = None) -> int:
    model_args, data_args, _, _, options = parse_recipe([*ARGUMENTS, PretokenizeArguments], argv, defaults=DEFAULTS,
                                                        prog="tinyllm pretokenize")
    if not data_args.tokenized_dataset:
        raise UsageError("tokenized_dataset is not set: give the folder to write (recipe key tokenized_dataset or "
                         "--tokenized_dataset DIR)")
    tokenizer = load_tokenizer(data_args.tokenizer_name_or_path, model_args.trust_remote_code)
    manifest = pretokenize(data_args.dataset_name, tokenizer, recipe_block_size(model_args, data_args, tokenizer),
                           data_args.tokenized_dataset, text_field=data_args.text_field,
                           dataset_config=data_args.dataset_config, num_proc=data_args.preprocessing_num_workers,
                           num_shards=options.num_shards, overwrite=options.overwrite)
    counts = ", ".join(f"{split} {c['documents']:,} documents -> {c['blocks']:,} blocks ({c['tokens']:,} tokens)"
                       for split, c in manifest["splits"].items())
    print(f"{data_args.tokenized_dataset}: {counts}")
    return 0


if __name__ == "__main__":
    from tinyllm_hf.cli import run_command

    sys.exit(run_command("tinyllm pretokenize", main))
