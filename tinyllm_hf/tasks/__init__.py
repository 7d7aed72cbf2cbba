"""The tasks: checkable questions about the embedded corpus's structured records, and the data sets built from them.

A task (`Task`, in `common.py`) is a dataset of conversations with its evaluation criteria: the items it asks about
(records of one kind, split into train and held-out by item id), several wordings of its question, each item's
reference answer, the evaluation checker and the RL reward's partial credit, and how a preference pair's wrong answer
is made. One module per source defines its tasks (`idioms.py`, `dictionary.py`, `reviews.py`, `peoples_daily.py`,
`identity.py`); `registry.py` lists them all (`TASKS`); `build.py` turns them into the SFT set, preference pairs, RL
prompts and held-out evaluation records that the training stages, `tinyllm eval`, the drift table and the Hub release
read. `tinyllm_hf.data` keeps the generic readers of your own conversations.
"""

from tinyllm_hf.tasks.build import (
    build_default_preferences,
    build_default_sft,
    build_prompt_dataset,
    heldout_task_records,
    parse_task_sizes,
    write_task_file,
)
from tinyllm_hf.tasks.common import CHECKERS, SPLITS, Task, char_f1, check_contains, check_exact, normalize
from tinyllm_hf.tasks.registry import (
    HELDOUT_TASKS,
    PREFERENCE_TASKS,
    RL_TASKS,
    TASKS,
    get_task,
    reply_reward,
    sample_prompt,
)

__all__ = [
    "CHECKERS",
    "HELDOUT_TASKS",
    "PREFERENCE_TASKS",
    "RL_TASKS",
    "SPLITS",
    "TASKS",
    "Task",
    "build_default_preferences",
    "build_default_sft",
    "build_prompt_dataset",
    "char_f1",
    "check_contains",
    "check_exact",
    "get_task",
    "heldout_task_records",
    "normalize",
    "parse_task_sizes",
    "reply_reward",
    "sample_prompt",
    "write_task_file",
]
