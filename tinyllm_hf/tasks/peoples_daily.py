"""Tasks on People's Daily sentences: the person, place and organisation names in one, and its word segmentation."""

from tinyllm_hf.tasks.common import Task

ENTITY_NAMES = {"person": "人名", "place": "地名", "organization": "机构名"}
NONE_ANSWER = "无"
# A long sentence would not fit the small models' 256-token context next to the question; a short one teaches little.
MIN_SENTENCE_CHARS = 8
MAX_SENTENCE_CHARS = 80


def usable_sentence(record: dict) -> bool:
    return MIN_SENTENCE_CHARS <= len(record["text"]) <= MAX_SENTENCE_CHARS


def entities_answer(entities: list[dict]) -> str:
    """'人名：江泽民；地名：无；机构名：中共中央' (each name once, in order of appearance)."""
    parts = []
    for label, name in ENTITY_NAMES.items():
        found = list(dict.fromkeys(e["text"] for e in entities if e["label"] == label))
        parts.append(f"{name}：{'、'.join(found) or NONE_ANSWER}")
    return "；".join(parts)


def entities_reference(record: dict) -> str | None:
    # Only sentences that name something: most sentences name nothing, and "无" everywhere teaches little.
    if not usable_sentence(record) or not record["entities"]:
        return None
    return entities_answer(record["entities"])


def segmentation_reference(record: dict) -> str | None:
    words = [w for w in record["words"] if w.strip()]
    if not usable_sentence(record) or len(words) < 2:
        return None
    return " ".join(words)


ENTITIES = Task(
    name="entities",
    kind="ner_sentences",
    questions=("找出下面句子中的人名、地名和机构名。\n句子：{text}", "请列出这句话里的人名、地名、机构名：{text}"),
    answer=entities_reference,
)
SEGMENTATION = Task(
    name="segmentation",
    kind="ner_sentences",
    questions=("请对下面的句子分词，词语之间用空格隔开。\n{text}", "给这句话分词（用空格分隔）：{text}"),
    answer=segmentation_reference,
)
