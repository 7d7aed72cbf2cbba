"""Tool-use SFT conversations, built from the task registry and the built-in tools (`tools.py`).

Each conversation is shown the built-in tools' schemas (a `tools` column, JSON, which TRL's SFTTrainer passes to the
chat template) and is one of these kinds, by name in `TOOL_KINDS` (`tool_task_sizes` in a recipe sizes them):

    <task>       a question of a task with a tool (idiom_meaning, word_definition, char_definition, xiehouyu), in one
                 of its wordings or the paraphrases users write; the model calls the tool, reads the entry and answers
                 with it
    not_found    the same questions about words that are in no dictionary: the tool says so, and so does the model
    calculator   arithmetic questions answered through the calculator
    direct       questions no tool answers (sentiment, segmentation, names, identity): the model answers at once
    multi_turn   two lookups in one conversation, the second after the first answer
    thinking     lookups with a short reasoning before the call and before the answer (`enable_thinking`)

Only items of the requested split are used, so held-out items stay held out of training; at run time the dictionary
still answers questions about them, as it would for any user.
"""

import json
import random
import re

from tinyllm_hf.errors import UsageError
from tinyllm_hf.tasks.common import Task, pick
from tinyllm_hf.tasks.registry import TASKS
from tinyllm_hf.tasks.tools import BUILTIN_TOOLS, idiom_lookup, word_lookup

TOOL_TASKS = tuple(name for name, task in TASKS.items() if task.tool is not None)
DIRECT_TASKS = ("sentiment", "segmentation", "entities", "identity")
TOOL_KINDS = (*TOOL_TASKS, "not_found", "calculator", "direct", "multi_turn", "thinking")
# Tool conversations whose answer is longer than this are left out of training: with the tool list, the call, the
# entry and the copied answer, a longer one does not fit a 256-token context. Evaluation asks about every item.
MAX_TOOL_ANSWER_CHARS = 60
NOT_FOUND_ANSWER = "抱歉，{result}请检查一下写法。"
THINK_BEFORE_CALL = {
    "idiom_lookup": "用户想知道成语「{word}」的意思，我来查成语词典。",
    "word_lookup": "用户问的是「{word}」的释义，我来查词典。",
    "xiehouyu_lookup": "这是歇后语「{riddle}」，我来查它的下半句。",
    "calculator": "这是一道算术题，用计算器算：{expression}。",
}
THINK_BEFORE_ANSWER = "查到了，照着结果回答。"
CALCULATOR_QUESTIONS = ("计算 {expression}", "{expression} 等于多少？", "请帮我算一下 {expression}。", "{expression}=？")


def tool_schemas_json() -> str:
    """The built-in tools' schemas as the JSON string the `tools` column holds."""
    from tinyllm_hf.inference.tool_loop import check_tool_schemas

    return json.dumps(check_tool_schemas(list(BUILTIN_TOOLS.values())), ensure_ascii=False)


def tool_call(name: str, arguments: dict) -> dict:
    # Arguments as a JSON string (OpenAI's form): rows with different argument names then share one Arrow type.
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def lookup_turns(question: str, name: str, arguments: dict, answer: str | None = None,
                 thinking: bool = False) -> list[dict]:
    """user question -> assistant call -> tool result -> assistant answer (the result itself unless `answer`)."""
    result = BUILTIN_TOOLS[name](**arguments)
    call = {"role": "assistant", "content": "", "tool_calls": [tool_call(name, arguments)]}
    final = {"role": "assistant", "content": result if answer is None else answer.format(result=result)}
    if thinking:
        call["reasoning_content"] = THINK_BEFORE_CALL[name].format(**arguments)
        final["reasoning_content"] = THINK_BEFORE_ANSWER
    return [{"role": "user", "content": question}, call, {"role": "tool", "content": result}, final]


def task_lookup(task: Task, record: dict, thinking: bool = False) -> list[dict] | None:
    """A tool-use conversation about one record, or None when the record has no answer or too long a one."""
    answer = task.answer(record)
    if answer is None or len(task.call_tool(record)) > MAX_TOOL_ANSWER_CHARS:
        return None
    question = pick(task.questions + task.paraphrases, record["id"], f"tools-{task.name}").format(**record)
    return lookup_turns(question, task.tool, task.tool_arguments(record), thinking=thinking)


def unknown_word(rng: random.Random, words: list[str], known) -> str:
    """A word built from the characters of real ones that no dictionary lists (a plausible typo)."""
    while True:
        length = len(rng.choice(words))
        candidate = "".join(rng.choice(rng.choice(words)) for _ in range(length))
        if not known(candidate):
            return candidate


def not_found_rows(records: dict[str, list[dict]], count: int, rng: random.Random) -> list[dict]:
    idioms = [r["word"] for r in records["idioms"]]
    words = [r["word"] for r in records["words"]]
    rows = []
    for i in range(count):
        task = TASKS["idiom_meaning"] if i % 2 == 0 else TASKS["word_definition"]
        pool, lookup = (idioms, idiom_lookup) if task.name == "idiom_meaning" else (words, word_lookup)
        word = unknown_word(rng, pool, lambda w, lookup=lookup: not lookup(w).startswith("未找到"))
        question = rng.choice(task.questions + task.paraphrases).format(word=word)
        rows.append({"id": f"not_found-{i}", "task": "not_found",
                     "messages": lookup_turns(question, task.tool, {"word": word}, NOT_FOUND_ANSWER)})
    return rows


def calculator_rows(count: int, rng: random.Random) -> list[dict]:
    rows = []
    for i in range(count):
        a, b, c = rng.randint(2, 999), rng.randint(2, 99), rng.randint(1, 50)
        expression = rng.choice((f"{a}+{b}", f"{a}-{b}", f"{a}*{b}", f"{a}/{b}", f"({a}+{b})*{c}", f"{a}*{b}-{c}"))
        shown = expression.replace("*", "×").replace("/", "÷") if rng.random() < 0.5 else expression
        question = rng.choice(CALCULATOR_QUESTIONS).format(expression=shown)
        arguments = {"expression": expression}
        rows.append({"id": f"calculator-{i}", "task": "calculator",
                     "messages": lookup_turns(question, "calculator", arguments, f"{shown} = {{result}}")})
    return rows


def build_tool_rows(split: str, sizes: dict[str, int], seed: int) -> list[dict]:
    """Rows (id, task, messages, tools) of each kind in `sizes` ({kind: count}, kinds from TOOL_KINDS)."""
    from tinyllm_hf.tasks.build import records_by_kind, take, task_conversation

    unknown = sorted(set(sizes) - set(TOOL_KINDS))
    if unknown:
        raise UsageError(f"unknown tool-use conversation kind(s) {', '.join(unknown)}; known: {', '.join(TOOL_KINDS)}")
    rng = random.Random(f"tool-use-{split}-{seed}")
    records = records_by_kind([*TOOL_TASKS, *DIRECT_TASKS], split)

    def lookups(names, count: int, order: str, thinking: bool = False) -> list[dict]:
        candidates = [(name, record) for name in names for record in records[TASKS[name].kind]]
        return take(candidates, lambda name, record: task_lookup(TASKS[name], record, thinking), count, order,
                    repeat=True)

    rows = []
    for kind, count in sizes.items():
        if kind in TOOL_TASKS:
            rows += lookups([kind], count, f"tools-{kind}")
        elif kind == "not_found":
            rows += not_found_rows(records, count, rng)
        elif kind == "calculator":
            rows += calculator_rows(count, rng)
        elif kind == "direct":
            candidates = [(name, record) for name in DIRECT_TASKS for record in TASKS[name].records(split)]
            rows += take(candidates, task_conversation, count, "tools-direct", repeat=True)
        elif kind == "thinking":
            rows += [{**row, "task": "thinking"} for row in lookups(TOOL_TASKS, count, "tools-thinking", thinking=True)]
        elif kind == "multi_turn":
            pool = lookups(TOOL_TASKS, 2 * count, "tools-multi-turn")
            rows += [{"id": f"{first['id']}+{second['id']}", "task": "multi_turn",
                      "messages": first["messages"] + second["messages"]}
                     for first, second in zip(pool[0::2], pool[1::2])]
    tools = tool_schemas_json()
    return [{**row, "tools": tools} for row in rows]


def parse_tool_sizes(text: str | dict | None) -> dict[str, int]:
    """'idiom_meaning=800,not_found=100' (or a dict) -> {kind: count}, kinds checked against TOOL_KINDS."""
    from tinyllm_hf.options import parse_key_values

    if not text:
        return {}
    sizes = dict(text) if isinstance(text, dict) else parse_key_values(text, "tool_task_sizes", "kind=count", int)
    for kind, count in sizes.items():
        if kind not in TOOL_KINDS:
            raise UsageError(f"tool_task_sizes: unknown kind {kind!r}; known: {', '.join(TOOL_KINDS)}")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise UsageError(f"tool_task_sizes: {kind} needs a count of 0 or more, not {count!r}")
    return sizes



def tool_format_texts(count: int = 2000) -> list[str]:
    """The text of `count` rendered tool-use conversations, split at the special tokens, for training a tokenizer
    (`tinyllm tokenizer train --tool-format`): the tool list and call JSON, in ASCII that a Chinese corpus hardly has,
    then get tokens of their own - about 120 fewer per conversation, in a 256-token context."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from tinyllm_hf.tokenizer.chat_template import CHAT_TEMPLATE, SPECIAL_TOKENS

    tools = json.loads(tool_schemas_json())
    conversations = []
    for i, name in enumerate(TOOL_TASKS):
        task = TASKS[name]
        records = task.records("train")[: (count + len(TOOL_TASKS) - 1 - i) // len(TOOL_TASKS)]
        conversations += [lookup_turns(task.question(record), task.tool, task.tool_arguments(record))
                          for record in records if task.answer(record) is not None]
    rendered, _ = render_jinja_template(conversations, tools=tools, chat_template=CHAT_TEMPLATE)
    separators = re.compile("|".join(map(re.escape, SPECIAL_TOKENS)))
    return [piece for text in rendered for piece in separators.split(text) if piece.strip()]
