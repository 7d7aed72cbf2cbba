"""OpenCompass config: a Tinyllm base model, exported with `tinyllm export llama` (plain LlamaForCausalLM: no remote
code), on C-Eval and CMMLU in ppl mode, 5-shot - the setting of the reference project's base-model numbers.

    tinyllm export llama --model runs/quickstart/pretrain --output runs/quickstart/pretrain-llama
    opencompass recipes/opencompass/tinyllm_llama_base.py --debug

docs/evaluation.md compares these prompts with ours (`tinyllm eval --mode ppl --shots 5`).
"""

from mmengine.config import read_base
from opencompass.models import HuggingFaceBaseModel

with read_base():
    from opencompass.configs.datasets.ceval.ceval_ppl_578f8d import ceval_datasets
    from opencompass.configs.datasets.cmmlu.cmmlu_ppl_8b9c76 import cmmlu_datasets

MODEL_PATH = "runs/quickstart/pretrain-llama"  # the `tinyllm export llama` folder
CONTEXT = 256  # the model's max_position_embeddings

datasets = [*ceval_datasets, *cmmlu_datasets]
models = [
    dict(
        type=HuggingFaceBaseModel,
        abbr="tinyllm-base-llama",
        path=MODEL_PATH,
        max_seq_len=CONTEXT,
        max_out_len=1,
        batch_size=16,
        run_cfg=dict(num_gpus=0),
    )
]
