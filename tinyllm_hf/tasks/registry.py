"""Every task, by name, in the order the default sets list them (the order is part of a set's build: keep it)."""

from tinyllm_hf.errors import UsageError
from tinyllm_hf.tasks.common import Task, correctness
from tinyllm_hf.tasks.dictionary import CHAR_DEFINITION, WORD_DEFINITION, XIEHOUYU
from tinyllm_hf.tasks.identity import IDENTITY
from tinyllm_hf.tasks.idioms import IDIOM_DIALOGUE, IDIOM_MEANING, IDIOM_ORIGIN, IDIOM_USAGE
from tinyllm_hf.tasks.peoples_daily import ENTITIES, SEGMENTATION
from tinyllm_hf.tasks.reviews import SENTIMENT

TASKS: dict[str, Task] = {task.name: task for task in (
    IDIOM_MEANING, IDIOM_ORIGIN, IDIOM_USAGE, IDIOM_DIALOGUE, WORD_DEFINITION, CHAR_DEFINITION, XIEHOUYU, SENTIMENT,
    ENTITIES, SEGMENTATION, IDENTITY,
)}
# The tasks with held-out items: evaluation asks questions about items no stage trained on.
HELDOUT_TASKS = tuple(name for name, task in TASKS.items() if task.has_heldout)
# The tasks of the default preference set, each with a distractor, in build order (the order is part of the build).
PREFERENCE_TASKS = (SENTIMENT.name, IDIOM_MEANING.name, WORD_DEFINITION.name, XIEHOUYU.name)
# RL prompts are the questions of the same tasks: short answers a reward can check.
RL_TASKS = PREFERENCE_TASKS


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


def check_tasks(tasks, allowed: tuple[str, ...], what: str) -> list[str]:
    """`tasks` as a list (None: all of `allowed`), every name checked against `allowed`."""
    tasks = list(allowed) if tasks is None else list(tasks)
    unknown = sorted(set(tasks) - set(allowed))
    if unknown:
        raise UsageError(f"unknown {what} task(s) {', '.join(unknown)}; known: {', '.join(allowed)}")
    return tasks


def reply_reward(task: str, reply: str, reference: str) -> float:
    """The RL correctness score of a reply to a question of `task`; a task not in the registry (your own prompts)
    gets partial credit."""
    return TASKS[task].reward(reply, reference) if task in TASKS else correctness(reply, reference)


def sample_prompt(entry: str | dict) -> str:
    """A prompt given as text, or as a task and the fields its first wording needs, e.g.
    `{"task": "idiom_meaning", "word": "画蛇添足"}` -> "成语「画蛇添足」是什么意思？" (so recipes name a task's question
    instead of copying its text)."""
    if isinstance(entry, str):
        return entry
    if not isinstance(entry, dict) or "task" not in entry:
        raise UsageError(f"a prompt is a string or a mapping with 'task' and the question's fields, not {entry!r}")
    fields = {key: value for key, value in entry.items() if key != "task"}
    return get_task(entry["task"]).ask(**fields)
