"""Corpora and structured records: the embedded Chinese corpus, local files and Hugging Face datasets."""

from .corpus import EMBEDDED_SOURCES, corpus_stats, document_split, iter_texts, load_corpus, normalize_text
from .records import RECORD_KINDS, load_records, split_of

__all__ = [
    "EMBEDDED_SOURCES",
    "RECORD_KINDS",
    "corpus_stats",
    "document_split",
    "iter_texts",
    "load_corpus",
    "load_records",
    "normalize_text",
    "split_of",
]
