"""What a task is, and how its answers are judged.

A `Task` is a set of items (structured records of one kind from `tinyllm_hf.data.records`, split into train and
held-out by item), a few wordings of the question asked about an item, the reference answer of an item, and the rules
that judge a reply: the evaluation checker and the RL reward's partial credit. SFT conversations, preference pairs, RL
prompts and evaluation records are all built from the same Task objects (`tinyllm_hf.tasks.build`), so every stage asks
the same questions and checks the same answers.
"""

import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from tinyllm_hf.data.corpus import stable_fraction
from tinyllm_hf.data.records import record_id, split_records
from tinyllm_hf.errors import UsageError

SPLITS = ("train", "heldout")

# --------------------------------------------------------------------------------------------------------------------
# Judging a reply
# --------------------------------------------------------------------------------------------------------------------

# Punctuation around a short answer ("积极。", "「画蛇添足」") does not make it wrong.
EDGE_PUNCTUATION = " \t\n\r。．.，,！!？?、；;：:\"'“”‘’「」『』《》()（）[]【】"


def normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text).strip(EDGE_PUNCTUATION).lower()


def check_exact(reply: str, answers: list[str]) -> bool:
    return normalize(reply) in {normalize(a) for a in answers}


def check_contains(reply: str, answers: list[str]) -> bool:
    reply = normalize(reply)
    return any(normalize(a) and normalize(a) in reply for a in answers)


CHECKERS = {"exact": check_exact, "contains": check_contains}


def char_f1(prediction: str, reference: str) -> float:
    """F1 of the characters the normalised prediction and reference share (a bag of characters, as in CMRC's F1)."""
    prediction, reference = normalize(prediction), normalize(reference)
    common = sum((Counter(prediction) & Counter(reference)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def correctness(reply: str, reference: str, partial_credit: bool = True) -> float:
    """1.0 for the reference after normalisation; otherwise the character F1 with it (`partial_credit`, which gives an
    RL policy a gradient before it can produce an exact answer) or 0.0."""
    if normalize(reply) == normalize(reference):
        return 1.0
    return char_f1(reply, reference) if partial_credit else 0.0


# --------------------------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------------------------


def pick(options: tuple[str, ...], item_id: str, salt: str) -> str:
    """One of `options`, chosen from the item id: the same wording for an item on every run and machine. (The salt's
    "sft-" predates the registry; changing it would change every built set.)"""
    return options[int(stable_fraction(item_id, f"sft-wording-{salt}:") * len(options))]


def chat(*turns: str) -> list[dict]:
    """Alternating user and assistant messages, starting with the user."""
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]


@dataclass(frozen=True)
class Distractor:
    """How a preference pair's rejected answer is made: a wrong value of the record field `field`, from the record and
    its successor in a fixed pseudo-random order of the task's records (None or the right value: no pair)."""

    field: str
    wrong_value: Callable[[dict, dict], object]


def successor_value(field: str) -> Distractor:
    """The same field of another entry, so the wrong answer reads like a real answer but answers something else."""
    return Distractor(field, lambda record, successor: successor[field])


@dataclass(frozen=True)
class Task:
    """A question about the records of one kind, with its reference answer and how a reply is judged.

    name: the key recipes and data columns use. kind: the record kind (`tinyllm_hf.data.records.RECORD_KINDS`).
    questions: wordings (str.format fields are the record's), one chosen per item from its id.
    answer: the reference answer of a record, or None to leave the record out of the task.
    checker: how evaluation judges a reply (a key of CHECKERS).
    partial_credit: the RL correctness reward gives a reply that is not exactly right its character F1 with the
        reference (True) or 0.0 (False: a label is right or wrong).
    distractor: how preference pairs get their wrong answer (None: the task has no preference pairs).
    tool: the built-in tool (`tinyllm_hf.tasks.tools.BUILTIN_TOOLS`) that answers the question, and
    tool_arguments: its arguments for a record. A task with a tool has tool-use conversations (`tool_use.py`): the
        model calls the tool and answers with what it returns.
    paraphrases: more wordings of the question, as users put it, for tool-use conversations (`questions` stay the
        ones evaluation asks).
    alternatives: other answers that are just as right for a record (a 歇后语 with several second halves).
    """

    name: str
    kind: str
    questions: tuple[str, ...]
    answer: Callable[[dict], str | None]
    checker: str = "exact"
    partial_credit: bool = True
    distractor: Distractor | None = None
    tool: str | None = None
    tool_arguments: Callable[[dict], dict] | None = None
    paraphrases: tuple[str, ...] = ()
    alternatives: Callable[[dict], list[str]] | None = None

    def __post_init__(self):
        if self.checker not in CHECKERS:
            raise ValueError(f"task {self.name}: checker must be one of {', '.join(CHECKERS)}, not {self.checker!r}")

    def records(self, split: str) -> list[dict]:
        """The task's items in `split` ("train" or "heldout", decided per item by `records.split_of`), in file order."""
        return split_records(self.kind, split)

    @property
    def has_heldout(self) -> bool:
        """Whether some items are held out (and so evaluable on items never trained on)."""
        return True

    def question(self, record: dict) -> str:
        """The item's wording of the question, filled with its fields."""
        return pick(self.questions, record["id"], self.name).format(**record)

    def ask(self, **fields) -> str:
        """The first wording filled with `fields`: the task's question about an item of your own (a sample chat)."""
        try:
            return self.questions[0].format(**fields)
        except KeyError as err:
            raise UsageError(f"task {self.name}'s question needs the field {err.args[0]!r} "
                             f"(wording: {self.questions[0]!r})") from None

    def conversation(self, record: dict) -> list[dict] | None:
        """[user question, assistant answer] for a record, or None when the record does not make a good item."""
        answer = self.answer(record)
        return None if answer is None else chat(self.question(record), answer)

    def accepted_answers(self, record: dict) -> list[str]:
        """Every reply evaluation counts as right for a record: its answer, the alternatives, and what the task's tool
        returns for it (the dictionary's whole entry, e.g. all second halves of a 歇后语 joined)."""
        answers = [self.answer(record)]
        if self.alternatives is not None:
            answers += self.alternatives(record)
        if self.tool is not None:
            answers.append(self.call_tool(record))
        return list(dict.fromkeys(a for a in answers if a))

    def call_tool(self, record: dict) -> str:
        """What the task's tool returns for a record."""
        from tinyllm_hf.tasks.tools import BUILTIN_TOOLS

        return BUILTIN_TOOLS[self.tool](**self.tool_arguments(record))

    def reward(self, reply: str, reference: str) -> float:
        """The RL correctness score of a reply (see `correctness`)."""
        return correctness(reply, reference, self.partial_credit)


@dataclass(frozen=True)
class FollowUpTask(Task):
    """Two turns about one item: `first`'s question and answer, then a follow-up question (one of `questions`) that
    refers back to the first ("它"), so answering it needs the history. `answer` is the follow-up's answer."""

    first: Task | None = None

    def conversation(self, record: dict) -> list[dict] | None:
        opening, answer = self.first.conversation(record), self.answer(record)
        if opening is None or answer is None:
            return None
        # The wording salt predates the task's name; changing it would change every built conversation.
        return opening + chat(pick(self.questions, record["id"], "follow-up"), answer)


@dataclass(frozen=True)
class FixedTask(Task):
    """A task whose items are written here, not read from a corpus: (question, answer) pairs, all in train."""

    pairs: tuple[tuple[str, str], ...] = ()

    def records(self, split: str) -> list[dict]:
        if split == "heldout":
            return []
        return [{"id": record_id(self.kind, question), "question": question, "answer": answer}
                for question, answer in self.pairs]

    @property
    def has_heldout(self) -> bool:
        return False
