"""Dataset loader for the tinyllm_ceval_* / tinyllm_cmmlu_* lm-eval tasks (referenced as `!function utils.load_dataset`).

lm-eval calls it with the task's `dataset_kwargs` (benchmark, subject) and its metadata (which `--metadata` extends).
Questions are read by tinyllm_hf's own loader, so lm-eval and `tinyllm eval` see the same data.
"""

import os


def load_dataset(benchmark: str, subject: str, ceval_dir: str | None = None, cmmlu_dir: str | None = None, **_):
    import datasets

    from tinyllm_hf.evaluation.benchmarks import DEFAULT_SPLIT, load_local

    root = {"ceval": ceval_dir, "cmmlu": cmmlu_dir}[benchmark] or os.environ.get(f"TINYLLM_{benchmark.upper()}_DIR")
    if not root:
        raise ValueError(
            f"set TINYLLM_{benchmark.upper()}_DIR (or --metadata '{{\"{benchmark}_dir\": ...}}') to the local {benchmark} folder"
        )
    split = DEFAULT_SPLIT[benchmark]
    bench = load_local(benchmark, root, split, [subject])

    def rows(questions):
        return [{"id": q.id, "question": q.question, **dict(zip("ABCD", q.options)), "answer": q.answer} for q in questions]

    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_list(rows(bench.questions[subject])),
            "dev": datasets.Dataset.from_list(rows(bench.dev.get(subject, []))),
        }
    )
