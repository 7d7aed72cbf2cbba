"""OpenCompass config: a Tinyllm chat model (an SFT/DPO checkpoint or a `tinyllm push` release folder) on C-Eval and
CMMLU in gen mode, through its own chat template - the setting of the reference project's chat-model numbers.

    opencompass recipes/opencompass/tinyllm_chat.py --debug

OpenCompass loads the folder with trust_remote_code=True: it runs modeling_tinyllm.py, the file `save_pretrained` wrote
beside the weights (this package's own modeling code). docs/evaluation.md compares these prompts with ours.
"""

from mmengine.config import read_base
from opencompass.models import HuggingFacewithChatTemplate

with read_base():
    from opencompass.configs.datasets.ceval.ceval_gen_5f30c7 import ceval_datasets
    from opencompass.configs.datasets.cmmlu.cmmlu_0shot_cot_gen_305931 import cmmlu_datasets

MODEL_PATH = "runs/quickstart/sft"  # a Tinyllm checkpoint or release folder
CONTEXT = 256  # the model's max_position_embeddings

datasets = [*ceval_datasets, *cmmlu_datasets]
models = [
    dict(
        type=HuggingFacewithChatTemplate,
        abbr="tinyllm-chat",
        path=MODEL_PATH,
        max_seq_len=CONTEXT,
        max_out_len=32,
        batch_size=16,
        stop_words=["<|endoftext|>"],
        run_cfg=dict(num_gpus=0),
    )
]
