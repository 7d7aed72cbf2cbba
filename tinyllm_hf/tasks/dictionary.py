"""Tasks from jionlp's dictionaries: what a word or a character means, and the second half of a 歇后语."""

import re

from tinyllm_hf.tasks.common import Task, successor_value
from tinyllm_hf.tasks.tools import xiehouyu_answers

MAX_SENSES = 3  # senses of a character kept in its answer


def char_answer(record: dict) -> str | None:
    if not record["readings"] or not record["readings"][0]["senses"]:
        return None
    reading = record["readings"][0]
    senses = [re.sub(r"\s+", "", sense) for sense in reading["senses"][:MAX_SENSES]]
    return f"「{record['char']}」读 {reading['pinyin']}，意思是：{''.join(senses)}"


WORD_DEFINITION = Task(
    name="word_definition",
    kind="words",
    questions=("词语「{word}」是什么意思？", "请解释「{word}」这个词。"),
    answer=lambda r: r["definition"].strip() or None,
    distractor=successor_value("definition"),
    tool="word_lookup",
    tool_arguments=lambda r: {"word": r["word"]},
    paraphrases=("「{word}」这个词是什么意思？", "帮我查一下词语「{word}」。", "词语{word}怎么解释？",
                 "{word}这个词什么意思", "请解释一下词语「{word}」的意思。"),
)
CHAR_DEFINITION = Task(
    name="char_definition",
    kind="chars",
    questions=("汉字「{char}」怎么读？是什么意思？", "「{char}」这个字读什么，有什么意思？"),
    answer=char_answer,
    tool="word_lookup",
    tool_arguments=lambda r: {"word": r["char"]},
    paraphrases=("汉字「{char}」是什么意思？", "{char}这个字怎么读？", "帮我查一下「{char}」字。", "「{char}」字读什么？"),
)
XIEHOUYU = Task(
    name="xiehouyu",
    kind="xiehouyu",
    questions=("歇后语「{riddle}——」的下半句是什么？", "补全歇后语：{riddle}——"),
    answer=lambda r: r["answer"],
    distractor=successor_value("answer"),
    tool="xiehouyu_lookup",
    tool_arguments=lambda r: {"riddle": r["riddle"]},
    paraphrases=("{riddle}——下一句是什么？", "歇后语「{riddle}」的后半句是什么？", "{riddle}，后面一句是什么？",
                 "歇后语{riddle}下半句", "“{riddle}”的下半句是什么？"),
    alternatives=lambda r: xiehouyu_answers(r["riddle"]),
)
