"""Evaluation: benchmark loaders on the official layouts, ppl/gen scoring, letter parsing, perplexity, tasks, results,
lm-eval agreement. Models are tiny Llamas or fakes whose preferences are known, built here."""

import importlib.machinery
import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tinyllm_hf.cli import main as tinyllm
from tinyllm_hf.errors import DatasetUnavailableError
from tinyllm_hf.evaluation import benchmarks, harness, mc
from tinyllm_hf.evaluation.benchmarks import Benchmark, Question, format_question, load_local, load_mapping
from tinyllm_hf.evaluation.engine import encode_pair, greedy_generate, loglikelihoods
from tinyllm_hf.evaluation.mc import evaluate_multiple_choice, parse_letter, score_choices
from tinyllm_hf.evaluation.perplexity import load_texts, perplexity, windows
from tinyllm_hf.evaluation.results import load_results, make_results, results_table, save_results
from tinyllm_hf.evaluation.tasks import evaluate_tasks
from tinyllm_hf.inference.runtime import TransformersRuntime

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
needs_fixtures = pytest.mark.skipif(
    not (FIXTURES / "ceval").is_dir() or not (FIXTURES / "cmmlu").is_dir(),
    reason=f"benchmark fixtures not found at {FIXTURES} (a copy of shared/ beside the repository)",
)

SPECIALS = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
# Newlines as Jinja string literals: transformers renders templates with trim_blocks, which eats a newline after a tag.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ '<|endoftext|>' }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
SENTENCES = [
    "今天天气很好，我们去公园散步。", "这部电影非常好看，情节紧凑。", "以下是中国关于法学考试的单项选择题，请选出其中的正确答案。",
    "答案：A", "答案：B", "答案：C", "答案：D", "下列说法正确的是", "学习使人进步，骄傲使人落后。", "他在图书馆里读了一下午的书。",
    "画蛇添足比喻做了多余的事，反而不恰当。", "春天来了，花儿都开了。", "计算机网络是现代社会的基础设施。", "化学反应遵循质量守恒定律。",
]


def _sentences():
    # A few hundred lines: every sentence with a few prefixes, so common pairs become merges.
    return [f"{prefix}{s}" for s in SENTENCES for prefix in ("", "我认为", "老师说", "据报道，", "其实")] * 4


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_sentences(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>", additional_special_tokens=SPECIALS[2:]
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(tokenizer, context=4096, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=context, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=False,
        # Large weights give peaked, clearly different option scores, so argmax is robust to float noise.
        initializer_range=0.5,
    )
    return LlamaForCausalLM(config).eval()


def tiny_tinyllm(tokenizer, context=4096, seed=0):
    from tinyllm_hf.modeling import TinyllmConfig, TinyllmForCausalLM

    torch.manual_seed(seed)
    config = TinyllmConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=context, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=0.5,
    )
    return TinyllmForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama(tokenizer):
    return tiny_llama(tokenizer)


@pytest.fixture(scope="module")
def saved_llama(tokenizer, llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    llama.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def toy_benchmark(answers="ABCDABCDAB", dev=2) -> Benchmark:
    def q(i, answer, subject="toy"):
        return Question(subject, str(i), f"第{i}题：下列说法正确的是____", (f"甲{i}", f"乙{i}", f"丙{i}", f"丁{i}"), answer)

    questions = [q(i, a) for i, a in enumerate(answers)]
    return Benchmark(
        name="ceval",
        split="val",
        questions={"toy": questions},
        dev={"toy": [q(100 + i, "ABCD"[i % 4]) for i in range(dev)]},
        subject_names={"toy": "测试"},
        categories={"toy": ["STEM"]},
    )


class FakeLM(torch.nn.Module):
    """A causal LM whose next-token logits favour `choose(decoded input text)` at every position."""

    def __init__(self, tokenizer, choose, context=4096):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device
        self.tokenizer, self.choose = tokenizer, choose
        # A real config (one layer) lets TransformersRuntime build its KV cache for the model.
        self.config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
            max_position_embeddings=context, eos_token_id=tokenizer.eos_token_id,
        )
        self.generation_config = SimpleNamespace(eos_token_id=None)

    @property
    def device(self):
        return self.anchor.device

    def forward(self, input_ids, attention_mask=None, **_):
        logits = torch.zeros(*input_ids.shape, len(self.tokenizer))
        for i, row in enumerate(input_ids):
            text = self.tokenizer.decode(row[attention_mask[i].bool()])
            logits[i, :, self.choose(text)] = 10.0
        return SimpleNamespace(logits=logits)


def letter_token(tokenizer, letter):
    # The last token of the scored continuation " X" (a leading space token, if separate, is shared by all options).
    return encode_pair(tokenizer, "答案：", " " + letter)[1][-1]


def oracle(tokenizer, questions):
    by_prompt = {format_question(q): q.answer for q in questions}

    def choose(text):
        answer = next(a for p, a in by_prompt.items() if text.rstrip().endswith(p))
        return letter_token(tokenizer, answer)

    return choose


# ---------------------------------------------------------------- loaders


@needs_fixtures
def test_ceval_loader_reads_official_layout():
    bench = load_local("ceval", FIXTURES / "ceval", "val")
    assert sorted(bench.questions) == sorted(p.name[: -len("_val.csv")] for p in (FIXTURES / "ceval" / "val").glob("*.csv"))
    law = bench.questions["law"]
    assert law[0].question.startswith("下列关于法律推理的表述") and law[0].answer == "C" and law[0].id == "0"
    assert all(q.answer in "ABCD" for qs in bench.questions.values() for q in qs)
    assert len(bench.dev["law"]) == 5 and bench.scored
    assert bench.categories["law"] == ["Humanities"] and bench.subject_names["law"] == "法学"


@needs_fixtures
def test_cmmlu_loader_reads_official_layout():
    bench = load_local("cmmlu", FIXTURES / "cmmlu", subjects=["agronomy", "anatomy"])
    assert bench.split == "test" and list(bench.questions) == ["agronomy", "anatomy"]
    first = bench.questions["agronomy"][0]
    assert first.question.startswith("在农业生产中被当作") and first.options[1] == "土地" and first.answer == "B"
    assert bench.categories["anatomy"] == ["STEM"] and bench.categories["agronomy"] == ["Other"]


@needs_fixtures
def test_packaged_ceval_mapping_agrees_with_fixture_mapping():
    ours = load_mapping(None, "ceval")
    theirs = load_mapping(FIXTURES / "ceval" / "mapping.json")
    assert ours.keys() == theirs.keys() and len(ours) == 52
    for subject, (name, cats) in ours.items():
        # The fixture spells one category "Social Sciences"; C-Eval's subject_mapping.json says "Social Science".
        assert theirs[subject] == (name, [c + "s" if c == "Social Science" else c for c in cats])


@needs_fixtures
def test_cmmlu_mapping_covers_every_subject():
    mapping = load_mapping(None, "cmmlu")
    assert set(mapping) == {p.stem for p in (FIXTURES / "cmmlu" / "dev").glob("*.csv")}
    counts = {c: sum(c in cats for _, cats in mapping.values()) for c in ("STEM", "Humanities", "Social Science", "Other", "China specific")}
    assert counts == {"STEM": 17, "Humanities": 13, "Social Science": 22, "Other": 15, "China specific": 15}  # the CMMLU paper


def test_unlabelled_split_is_reported_unscored(tmp_path, tokenizer):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "law_test.csv").write_text("id,question,A,B,C,D,answer\n0,问题一____,甲,乙,丙,丁,\n1,问题二,甲,乙,丙,丁,\n", "utf-8")
    bench = load_local("ceval", tmp_path, "test")
    assert not bench.scored
    model = FakeLM(tokenizer, lambda text: letter_token(tokenizer, "D"))
    result = evaluate_multiple_choice(TransformersRuntime(model, tokenizer), bench, progress=False)
    assert result["accuracy"] is None and result["scored"] is False and result["n"] == 2
    assert result["predictions"] == {"law": {"0": "D", "1": "D"}}  # C-Eval's submission format


def test_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no val/ folder"):
        load_local("ceval", tmp_path, "val")
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "law_val.csv").write_text("id,question,A,B,C,D,answer\n0,问,甲,乙,丙,丁,E\n", "utf-8")
    with pytest.raises(ValueError, match=r"law_val.csv: row 0 has answer 'E'"):
        load_local("ceval", tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="subject\\(s\\) physics"):
        load_local("ceval", tmp_path, "val", subjects=["physics"])
    with pytest.raises(DatasetUnavailableError, match="--cmmlu-dir"):
        benchmarks.load_remote("cmmlu", "hub", subjects=["agronomy"])  # HF_HUB_OFFLINE=1: nothing can be downloaded


def _rows(bench: Benchmark, benchmark: str, questions) -> list[dict]:
    """Questions back as the rows of the published Hub/ModelScope copies (C-Eval: id, question, .., answer,
    explanation; CMMLU: Question, .., Answer)."""
    question_col, answer_col = ("question", "answer") if benchmark == "ceval" else ("Question", "Answer")
    extra = (lambda q: {"id": int(q.id), "explanation": ""}) if benchmark == "ceval" else (lambda q: {})
    return [{**extra(q), question_col: q.question, **dict(zip("ABCD", q.options)), answer_col: q.answer or ""}
            for q in questions]


@needs_fixtures
def test_cmmlu_from_the_hubs_parquet_conversion_equals_the_official_files(tmp_path, monkeypatch):
    """haonan-li/cmmlu is read from its refs/convert/parquet branch ({subject}/{split}/0000.parquet, the published
    columns), here a local copy of that layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    local = load_local("cmmlu", FIXTURES / "cmmlu", subjects=["agronomy", "anatomy"])
    for subject in local.questions:
        for split, questions in (("test", local.questions[subject]), ("dev", local.dev[subject])):
            (tmp_path / subject / split).mkdir(parents=True)
            pq.write_table(pa.Table.from_pylist(_rows(local, "cmmlu", questions)), tmp_path / subject / split / "0000.parquet")
    monkeypatch.setitem(benchmarks.HUB_PARQUET, "cmmlu", str(tmp_path))
    remote = benchmarks.load_benchmark("cmmlu", "hub", subjects=["agronomy", "anatomy"])
    strip_ids = lambda qs: [(q.question, q.options, q.answer) for q in qs]  # noqa: E731  (the CSV's ids are its row numbers)
    assert {s: strip_ids(qs) for s, qs in remote.questions.items()} == {s: strip_ids(qs) for s, qs in local.questions.items()}
    assert {s: len(qs) for s, qs in remote.dev.items()} == {"agronomy": 5, "anatomy": 5}
    assert remote.categories == local.categories and remote.subject_names == local.subject_names


@needs_fixtures
def test_modelscope_source_reads_opencompass_copies(monkeypatch):
    import types

    local = load_local("ceval", FIXTURES / "ceval", "val", subjects=["law"])
    asked = []

    def load(dataset_name, subset_name):  # modelscope.MsDataset.load, as OpenCompass calls it
        asked.append((dataset_name, subset_name))
        return {"val": _rows(local, "ceval", local.questions[subset_name]),
                "dev": _rows(local, "ceval", local.dev[subset_name]), "test": []}

    fake = types.ModuleType("modelscope")
    fake.MsDataset = SimpleNamespace(load=load)
    fake.__spec__ = importlib.machinery.ModuleSpec("modelscope", None)
    monkeypatch.setitem(sys.modules, "modelscope", fake)
    remote = benchmarks.load_benchmark("ceval", "modelscope", subjects=["law"])
    assert asked == [("opencompass/ceval-exam", "law")]
    assert remote.questions == local.questions and remote.dev == local.dev
    # "auto": the Hub first (offline here, so it fails), then ModelScope.
    assert benchmarks.load_benchmark("ceval", "auto", subjects=["law"]).questions == local.questions


def test_unreachable_benchmarks_are_skipped_with_the_command_to_run(saved_llama, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # not installed, wherever the suite runs
    out = tmp_path / "r.json"
    argv = ["eval", "--model", str(saved_llama), "--tasks", "ceval,cmmlu", "--output", str(out), "--no-progress"]
    # Without --skip-unavailable, unreachable data is an error naming both sources and the folder option.
    assert tinyllm(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "from hub" in err and "modelscope package is not installed" in err
    assert tinyllm(argv + ["--skip-unavailable", "--shots", "5"]) == 0
    tasks = load_results(out)["tasks"]
    assert tasks["ceval"]["command"] == f"tinyllm eval --model {saved_llama} --tasks ceval --ceval-dir DIR --mode ppl --shots 5"
    assert tasks["cmmlu"]["skipped"] and tasks["cmmlu"]["split"] == "test"
    assert "skipped" in results_table(load_results(out))
    # A local folder that is missing is the user's mistake, never skipped.
    assert tinyllm(argv + ["--skip-unavailable", "--ceval-dir", str(tmp_path / "nope")]) == 1
    assert "no val/ folder" in capsys.readouterr().err


def test_benchmark_tables_show_model_type_questions_mode_and_shots():
    from tinyllm_hf.evaluation.results import benchmark_table, category_table, skipped_benchmarks

    scored = {"mode": "ppl", "shots": 5, "scored": True, "accuracy": 0.253, "n": 1346,
              "per_category": {"STEM": {"accuracy": 0.2}, "Humanities": {"accuracy": 0.3}}}
    skipped = {"skipped": "offline.", "mode": "gen", "shots": 0, "split": "test", "command": "tinyllm eval --x"}
    models = {"pretrain": ("base", {"tasks": {"ceval": scored}}),
              "sft": ("chat", {"tasks": {"ceval": {**scored, "mode": "gen", "shots": 0}, "cmmlu": skipped}})}
    assert benchmark_table(models).splitlines()[2:] == [
        "| pretrain | base | 25.3 (1,346 q, ppl, 5-shot) | not run |",
        "| sft | chat | 25.3 (1,346 q, gen, 0-shot) | skipped (no data) |"]
    assert "| pretrain | C-Eval | 20.0 | – | 30.0 | – | 25.3 |" in category_table(models)
    assert skipped_benchmarks(models) == ["CMMLU on sft: offline. Run: `tinyllm eval --x`"]


def test_opencompass_prompt_style_writes_opencompass_text():
    """The text OpenCompass's base-model ppl configs score for answer B (turns joined with newlines), and its chat
    turns; bench/opencompass_compare.py checks the predictions against OpenCompass itself."""
    style = benchmarks.PROMPT_STYLES["opencompass"]
    q = Question("law", "1", "问题？", ("甲", "乙", "丙", "丁"), "B")
    e = Question("law", "0", "例题？", ("一", "二", "三", "四"), "A")
    ceval = Benchmark("ceval", "val", {"law": [q]}, {"law": [e]}, {"law": "法学"})
    human = "以下是中国关于法学考试的单项选择题，请选出其中的正确答案。\n{}\nA. {}\nB. {}\nC. {}\nD. {}\n答案: "
    assert style.ppl_context(ceval, q, [e]) + style.target(ceval, "B") == (
        human.format("例题？", "一", "二", "三", "四") + "\nA\n\n\n\n\n" + human.format("问题？", "甲", "乙", "丙", "丁") + "\nB")
    cmmlu = Benchmark("cmmlu", "test", {"law": [q]}, {"law": [e]}, {"law": "法学"})
    context, target = style.ppl_context(cmmlu, q, []), style.target(cmmlu, "B")
    assert context + target == "以下是关于法学的单项选择题，请直接给出正确答案的选项。\n题目：问题？\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案是: B"
    assert target == " B"  # the letter is scored, after the shared "答案是:"
    assert style.chat_messages(cmmlu, q, [e])[1] == {"role": "assistant", "content": "答案是: A"}


# ---------------------------------------------------------------- ppl mode


def test_ppl_scores_equal_hand_computed_loglikelihood(tokenizer, llama):
    bench = toy_benchmark()
    prompt = mc.ppl_prompt(bench, bench.questions["toy"][3], 1, tokenizer, 4096).text
    scores = score_choices(llama, tokenizer, [prompt])[0]
    for letter, score in zip("ABCD", scores):
        ids = tokenizer(prompt + " " + letter).input_ids
        n_cont = len(ids) - len(tokenizer(prompt).input_ids)
        with torch.no_grad():
            logprobs = torch.log_softmax(llama(torch.tensor([ids])).logits[0].float(), -1)
        expected = sum(logprobs[t - 1, ids[t]].item() for t in range(len(ids) - n_cont, len(ids)))
        assert score == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("architecture", ["llama", "tinyllm"])
def test_batched_loglikelihoods_equal_one_by_one(architecture, tokenizer):
    # Mixed lengths and multi-token continuations: left padding and position ids must not change any score.
    llama = (tiny_llama if architecture == "llama" else tiny_tinyllm)(tokenizer)
    requests = [("今天天气很好", "，我们去公园"), ("答案：", " B"), ("学习使人进步，骄傲使人落后。他在", "图书馆里读书"), ("春天", "来了")]
    batched = loglikelihoods(llama, tokenizer, requests, batch_size=4)
    single = [loglikelihoods(llama, tokenizer, [r], batch_size=1)[0] for r in requests]
    assert batched == pytest.approx(single, abs=1e-4)


def test_oracle_model_scores_100_percent(tokenizer):
    bench = toy_benchmark()
    model = FakeLM(tokenizer, oracle(tokenizer, bench.questions["toy"]))
    result = evaluate_multiple_choice(TransformersRuntime(model, tokenizer), bench, "ppl", shots=2, batch_size=3, progress=False)
    assert result["accuracy"] == 1.0 and result["n"] == 10 and result["mean_shots"] == 2
    assert result["per_subject"]["toy"]["accuracy"] == 1.0 and result["per_category"]["STEM"]["accuracy"] == 1.0


@needs_fixtures
def test_constant_model_scores_the_share_of_its_letter(tokenizer):
    bench = load_local("ceval", FIXTURES / "ceval", "val")
    model = FakeLM(tokenizer, lambda text: letter_token(tokenizer, "C"))
    result = evaluate_multiple_choice(TransformersRuntime(model, tokenizer), bench, "ppl", batch_size=8, progress=False)
    answers = [q.answer for qs in bench.questions.values() for q in qs]
    assert result["accuracy"] == pytest.approx(answers.count("C") / len(answers))
    for subject, qs in bench.questions.items():
        assert result["per_subject"][subject]["correct"] == sum(q.answer == "C" for q in qs)
    humanities = [q for s, qs in bench.questions.items() if bench.categories[s] == ["Humanities"] for q in qs]
    assert result["per_category"]["Humanities"]["n"] == len(humanities)


def test_exemplars_are_dropped_to_fit_never_the_question(tokenizer):
    bench = toy_benchmark(dev=5)
    q = bench.questions["toy"][0]
    full = mc.ppl_prompt(bench, q, 5, tokenizer, 100_000)
    assert full.shots == 5 and full.text.endswith(format_question(q))
    budget = len(tokenizer(full.text).input_ids) - 1
    cut = mc.ppl_prompt(bench, q, 5, tokenizer, budget)
    assert cut.shots == 4 and cut.text.endswith(format_question(q)) and not cut.overflow
    assert len(tokenizer(cut.text).input_ids) <= budget
    tiny = mc.ppl_prompt(bench, q, 5, tokenizer, 10)
    assert tiny.shots == 0 and tiny.overflow and format_question(q) in tiny.text


# ---------------------------------------------------------------- gen mode


@pytest.mark.parametrize(
    "reply, letter",
    [
        ("答案是B", "B"), ("B.", "B"), ("(B)", "B"), ("（C）", "C"), ("选 B", "B"), ("B", "B"), ("正确答案：D", "D"),
        ("答案：A。因为……", "A"), ("我认为答案应该是 C", "C"), ("故选D", "D"), ("C选项正确", "C"), ("B、土地", "B"),
        ("答案为选项A", "A"), ("经过分析，本题选择：B", "B"), ("我觉得是 C 吧", "C"), ("ｂ", None), ("Ｂ", "B"),
        ("我不知道", None), ("A和B都有可能", None), ("Because it is obvious", None), ("", None),
    ],
)
def test_parse_letter(reply, letter):
    assert parse_letter(reply) == letter


class FakeChatLM(FakeLM):
    """Greedily answers the question in the last user turn with a fixed reply, then EOS (styles vary to exercise the
    parser). It runs on TransformersRuntime: its KV cache holds each position's token id (keys) and whether it came
    with the prompt (values), so each step sees every row's prompt and reply so far, however the runtime pads, drops
    and merges rows."""

    STYLES = ("答案是{}", "{}.", "({})", "选 {}", "正确答案：{}")

    def __init__(self, tokenizer, questions, reply=None, context=4096):
        super().__init__(tokenizer, choose=lambda text: 0, context=context)
        self.questions, self.reply = questions, reply

    def reply_to(self, prompt: str) -> str:
        if self.reply:
            return self.reply
        last_user = prompt.rsplit("<|user|>\n", 1)[1]
        i, q = next((i, q) for i, q in enumerate(self.questions) if format_question(q) in last_user)
        return self.STYLES[i % len(self.STYLES)].format(q.answer)

    def forward(self, input_ids, attention_mask, cache, **_):
        from_prompt = torch.full(input_ids.shape, float(cache.get_seq_length() == 0))  # the first call is the prefill
        keys, values = cache.update(input_ids[:, None, :, None].float(), from_prompt[:, None, :, None], 0)
        ids, in_prompt = keys[:, 0, :, 0], values[:, 0, :, 0]
        logits = torch.zeros(len(input_ids), 1, len(self.tokenizer))
        for i, (row, prompt_part, mask) in enumerate(zip(ids.long(), in_prompt.bool(), attention_mask.bool())):
            prompt, generated = row[mask & prompt_part], row[mask & ~prompt_part]
            reply = self.tokenizer(self.reply_to(self.tokenizer.decode(prompt))).input_ids + [self.tokenizer.eos_token_id]
            logits[i, 0, reply[min(len(generated), len(reply) - 1)]] = 10.0
        return SimpleNamespace(logits=logits, cache=cache)


def test_gen_mode_with_a_right_chat_model_scores_100_percent(tokenizer):
    bench = toy_benchmark()
    runtime = TransformersRuntime(FakeChatLM(tokenizer, bench.questions["toy"]), tokenizer)
    result = evaluate_multiple_choice(runtime, bench, "gen", shots=2, batch_size=4, max_new_tokens=16, progress=False)
    assert result["accuracy"] == 1.0 and result["unparsed"] == 0 and result["mean_shots"] == 2


def test_gen_mode_counts_unparseable_replies(tokenizer):
    bench = toy_benchmark()
    model = FakeChatLM(tokenizer, bench.questions["toy"], reply="我不知道")
    result = evaluate_multiple_choice(TransformersRuntime(model, tokenizer), bench, "gen", progress=False)
    assert result["accuracy"] == 0.0 and result["unparsed"] == 10 == result["per_subject"]["toy"]["unparsed"]


def test_gen_prompt_is_a_multi_turn_chat(tokenizer, llama):
    bench = toy_benchmark(dev=2)
    q = bench.questions["toy"][0]
    messages = benchmarks.DEFAULT_STYLE.chat_messages(bench, q, bench.dev["toy"])
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("以下是中国关于测试考试的单项选择题") and messages[1]["content"] == "A"
    assert messages[-1]["content"] == format_question(q)
    assert mc.gen_prompt(bench, q, 2, TransformersRuntime(llama, tokenizer), 4096).text.endswith(format_question(q) + "\n<|assistant|>\n")


@pytest.mark.parametrize("architecture", ["llama", "tinyllm"])
def test_batched_generation_equals_one_by_one(architecture, tokenizer):
    runtime = TransformersRuntime((tiny_llama if architecture == "llama" else tiny_tinyllm)(tokenizer), tokenizer)
    prompts = ["今天天气", "学习使人进步，骄傲使人落后。他在图书馆", "春天来了"]
    batched = greedy_generate(runtime, prompts, max_new_tokens=8, batch_size=3)
    single = [greedy_generate(runtime, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
    assert batched == single and all(batched)


def test_replies_default_to_the_rest_of_the_context(tokenizer):
    # A reply longer than the context: without max_new_tokens each prompt gets what its own length leaves.
    reply = "学习使人进步，骄傲使人落后。" * 40
    reply_ids = tokenizer(reply).input_ids
    context = 48
    assert len(reply_ids) > context
    runtime = TransformersRuntime(FakeChatLM(tokenizer, [], reply=reply, context=context), tokenizer)
    prompts = ["今天天气", "学习使人进步，骄傲使人落后。他在图书馆", "春天来了"]
    expected = [tokenizer.decode(reply_ids[: context - len(tokenizer(p).input_ids)]) for p in prompts]
    assert greedy_generate(runtime, prompts, batch_size=2) == expected
    assert greedy_generate(runtime, prompts, max_new_tokens=5) == [tokenizer.decode(reply_ids[:5])] * 3
    with pytest.raises(ValueError, match=r"max_new_tokens \(48\) must be below the model's context \(48\); leave it out"):
        greedy_generate(runtime, prompts, max_new_tokens=48)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1, not 0"):
        greedy_generate(runtime, prompts, max_new_tokens=0)
    records = [{"prompt": p, "answer": reply} for p in prompts]
    assert evaluate_tasks(runtime, records, progress=False)["n"] == 3  # the same default: no context error


def test_generation_stops_at_eos_id_0(tokenizer):
    # tinyllm's tokenizers put <|endoftext|> first, as this one does: the runtime must stop there, not run the budget.
    from tinyllm_hf.inference.runtime import SamplingParams, stream

    assert tokenizer.eos_token_id == 0
    runtime = TransformersRuntime(FakeChatLM(tokenizer, [], reply="答案是B"), tokenizer)
    assert runtime.eos_token_ids == {0}
    tokens = list(stream(runtime, tokenizer("问题").input_ids, SamplingParams(max_tokens=30, temperature=0.0)))
    assert tokens == tokenizer("答案是B").input_ids + [0]


def test_generation_batches_no_larger_than_the_runtime_takes(tokenizer, llama):
    class OneAtATime(TransformersRuntime):
        max_batch_size = 1  # as the llama.cpp and exported-graph runtimes

    prompts = ["今天天气", "学习使人进步，骄傲使人落后。他在图书馆", "春天来了"]
    batched = greedy_generate(TransformersRuntime(llama, tokenizer), prompts, max_new_tokens=6, batch_size=3)
    assert greedy_generate(OneAtATime(llama, tokenizer), prompts, max_new_tokens=6, batch_size=3) == batched


def test_ppl_mode_needs_a_transformers_model():
    gguf_like = SimpleNamespace(chat_template=CHAT_TEMPLATE, context_length=4096)
    with pytest.raises(ValueError, match=r"ppl mode scores log-likelihoods with a transformers model.*--mode gen"):
        evaluate_multiple_choice(gguf_like, toy_benchmark(), "ppl", progress=False)


def test_gen_mode_needs_a_chat_template(tokenizer, llama):
    plain = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>")
    with pytest.raises(ValueError, match="chat template"):
        evaluate_multiple_choice(TransformersRuntime(llama, plain), toy_benchmark(), "gen", progress=False)


# ---------------------------------------------------------------- perplexity


def test_windows_score_every_token_once():
    for n, length, stride in [(10, 4, 2), (10, 4, 3), (3, 8, 4), (17, 5, 1)]:
        spans = windows(n, length, stride)
        scored = [t for b, e, k in spans for t in range(e - k, e)]
        assert scored == list(range(1, n)) and all(e - b <= length and k < e - b for b, e, k in spans)
    with pytest.raises(ValueError, match="stride"):
        windows(10, 4, 4)


def test_perplexity_matches_direct_computation_and_sliding_is_consistent(tokenizer, llama):
    texts = ["今天天气很好，我们去公园散步。", "画蛇添足比喻做了多余的事，反而不恰当。春天来了，花儿都开了。"]
    full = perplexity(llama, tokenizer, texts, progress=False)
    nll, n = 0.0, 0
    for text in texts:
        ids = [tokenizer.eos_token_id] + tokenizer(text).input_ids
        with torch.no_grad():
            logprobs = torch.log_softmax(llama(torch.tensor([ids])).logits[0], -1)
        nll -= sum(logprobs[t - 1, ids[t]].item() for t in range(1, len(ids)))
        n += len(ids) - 1
    assert full["n_tokens"] == n and full["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert full["bits_per_char"] == pytest.approx(nll / math.log(2) / sum(map(len, texts)), rel=1e-4)
    # A short window changes the context each token sees, not which tokens are scored.
    windowed = perplexity(llama, tokenizer, texts, max_length=4, stride=2, batch_size=3, progress=False)
    assert windowed["n_tokens"] == n and windowed["bits_per_char"] != full["bits_per_char"]


def test_default_texts_are_the_corpus_validation_split(monkeypatch):
    import datasets

    import tinyllm_hf.data.corpus as corpus

    calls = []

    def fake_load_corpus(source, split=None, **kwargs):
        calls.append((source, split))
        return datasets.Dataset.from_dict({"text": ["验证集第一篇", "验证集第二篇"], "source": ["a", "b"]})

    monkeypatch.setattr(corpus, "load_corpus", fake_load_corpus)
    assert load_texts(None) == ["验证集第一篇", "验证集第二篇"] and calls == [("default", "validation")]


def test_load_texts_from_files(tmp_path):
    (tmp_path / "a.txt").write_text("第一行\n\n第二行\n", "utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "你好"}\n{"text": "世界"}\n', "utf-8")
    (tmp_path / "c.jsonl").write_text('{"content": "你好"}\n', "utf-8")
    assert load_texts(tmp_path / "a.txt") == ["第一行", "第二行"]
    assert load_texts(str(tmp_path / "b.jsonl")) == ["你好", "世界"]
    with pytest.raises(ValueError, match="c.jsonl:1: .*'text'"):
        load_texts(tmp_path / "c.jsonl")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_texts(tmp_path / "missing.txt")


# ---------------------------------------------------------------- task accuracy


def test_task_accuracy_with_exact_and_contains_checkers(tokenizer):
    replies = {"这句话的情感是？": "积极。", "“画蛇添足”是什么意思？": "比喻做了多余的事", "写一个名字": "王小明"}

    class Replier(FakeChatLM):
        def reply_to(self, prompt):
            return next(r for q, r in replies.items() if q in prompt)

    examples = [
        {"task": "sentiment", "messages": [{"role": "user", "content": "这句话的情感是？"}], "answer": "积极"},
        {"task": "sentiment", "messages": [{"role": "user", "content": "这句话的情感是？"}, {"role": "assistant", "content": "消极"}]},
        {"task": "idiom", "prompt": "“画蛇添足”是什么意思？", "answer": ["多余", "没必要"], "checker": "contains"},
        {"task": "names", "messages": [{"role": "user", "content": "写一个名字"}], "answer": "李雷", "checker": "contains"},
    ]
    runtime = TransformersRuntime(Replier(tokenizer, []), tokenizer)
    result = evaluate_tasks(runtime, examples, progress=False)
    assert result["per_task"]["sentiment"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert result["per_task"]["idiom"]["accuracy"] == 1.0 and result["per_task"]["names"]["accuracy"] == 0.0
    assert result["accuracy"] == 0.5 and result["n"] == 4
    with pytest.raises(ValueError, match="task record 0: checker must be one of"):
        evaluate_tasks(runtime, [{"prompt": "x", "answer": "y", "checker": "regex"}])


def test_task_results_report_the_repetition_of_the_replies(tokenizer):
    # One reply loops until its budget runs out (the last copy cut short), the other answers and stops.
    replies = {"这句话的情感是？": "正面", "“画蛇添足”是什么意思？": "多余的事，" * 30}

    class Replier(FakeChatLM):
        def reply_to(self, prompt):
            return next(r for q, r in replies.items() if q in prompt)

    examples = [
        {"task": "sentiment", "messages": [{"role": "user", "content": "这句话的情感是？"}], "answer": "正面"},
        {"task": "idiom", "messages": [{"role": "user", "content": "“画蛇添足”是什么意思？"}], "answer": "多余"},
    ]
    result = evaluate_tasks(TransformersRuntime(Replier(tokenizer, []), tokenizer), examples, max_new_tokens=90,
                            progress=False)
    repetition = result["repetition"]
    assert repetition["replies"] == 2 and repetition["loops"] == 1 and repetition["loop_share"] == 0.5
    assert repetition["repeated_4gram_rate"] > 0.5  # the looping reply's 4-grams are mostly repeats
    assert 0 < repetition["distinct_2"] < 1


# ---------------------------------------------------------------- results, CLI, lm-eval


def test_results_roundtrip_and_version_check(tmp_path):
    results = make_results("out/model", "sha256:abc", {"ppl": {"n_tokens": 5, "perplexity": 3.0, "bits_per_char": 1.5}})
    path = save_results(results, tmp_path / "r.json")
    assert load_results(path) == results and results["format_version"] == 1
    assert "1.500 bits/char" in results_table(results)
    path.write_text(json.dumps({**results, "format_version": 99}), "utf-8")
    with pytest.raises(ValueError, match="format_version 99"):
        load_results(path)


@needs_fixtures
def test_cli_writes_results(tmp_path, saved_llama, capsys):
    from tinyllm_hf.evaluation.cli import main

    text_file = tmp_path / "texts.txt"
    text_file.write_text("今天天气很好。\n春天来了，花儿都开了。\n", "utf-8")
    out = tmp_path / "results.json"
    argv = [
        "--model", str(saved_llama), "--tasks", "ceval,cmmlu,ppl", "--ceval-dir", str(FIXTURES / "ceval"),
        "--cmmlu-dir", str(FIXTURES / "cmmlu"), "--cmmlu-subjects", "anatomy", "--limit", "3", "--shots", "1",
        "--text-file", str(text_file), "--output", str(out), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    results = load_results(out)
    assert results["model"] == str(saved_llama) and results["revision"].startswith("sha256:")
    ceval = results["tasks"]["ceval"]
    assert ceval["n"] == 15 and ceval["mode"] == "ppl" and ceval["shots"] == 1 and len(ceval["per_subject"]) == 5
    assert 0.0 <= ceval["accuracy"] <= 1.0 and set(ceval["per_category"]) <= {"STEM", "Social Science", "Humanities", "Other"}
    assert results["tasks"]["cmmlu"]["n"] == 3 and results["tasks"]["ppl"]["n_texts"] == 2
    assert "| ceval | ppl | 1 |" in capsys.readouterr().out
    assert tinyllm(["eval", "--model", str(saved_llama), "--tasks", "ceval", "--ceval-dir", str(tmp_path / "nope")]) == 1
    assert "no val/ folder" in capsys.readouterr().err


def test_eval_runs_no_code_from_the_model_folder_unless_trusted(saved_llama, tmp_path, capsys):
    """A folder whose config maps the Auto classes to its own module: without --trust-remote-code that module is never
    imported, and the error names the flag."""
    import json
    import shutil

    folder = tmp_path / "custom"
    shutil.copytree(saved_llama, folder)
    marker = tmp_path / "code-ran"
    (folder / "custom_model.py").write_text(f"open({str(marker)!r}, 'w').close()\n", "utf-8")
    config = json.loads((folder / "config.json").read_text("utf-8"))
    config.update(model_type="custom-untrusted", auto_map={"AutoConfig": "custom_model.Config",
                                                           "AutoModelForCausalLM": "custom_model.Model"})
    (folder / "config.json").write_text(json.dumps(config), "utf-8")
    assert tinyllm(["eval", "--model", str(folder), "--tasks", "ppl", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "--trust-remote-code" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


def test_cli_task_accuracy_defaults_to_embedded_heldout_tasks(saved_llama, tmp_path, monkeypatch):
    import tinyllm_hf.tasks as tasks
    from tinyllm_hf.evaluation.cli import main

    calls = []

    def fake_records(tasks=None, sizes=None):
        calls.append(sizes)
        return [{"task": "sentiment", "messages": [{"role": "user", "content": "好评还是差评？"}, {"role": "assistant", "content": "好评"}]}]

    monkeypatch.setattr(tasks, "heldout_task_records", fake_records)
    out = tmp_path / "r.json"
    # transformers named: this test is about the task records (tests/test_runtime_choice.py tests auto in eval).
    argv = ["--model", str(saved_llama), "--tasks", "tasks", "--task-sizes", "sentiment=1", "--max-new-tokens", "4",
            "--backend", "transformers", "--output", str(out), "--no-progress"]
    assert main(argv) == 0 and calls == ["sentiment=1"]
    assert load_results(out)["tasks"]["tasks"]["per_task"]["sentiment"]["n"] == 1


def test_shipped_lm_eval_yamls_are_up_to_date():
    expected = harness.task_files()
    shipped = {p.name: p.read_text("utf-8") for p in harness.TASKS_DIR.glob("*.yaml")}
    assert shipped == expected, "run `python -m tinyllm_hf.evaluation.harness` to regenerate lm_eval_tasks/"


@needs_fixtures
@pytest.mark.parametrize("architecture", ["llama", "tinyllm"])
def test_lm_eval_agrees_with_our_ppl_mode(architecture, tokenizer, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from tinyllm_hf.evaluation.cli import load_model

    model = (tiny_llama if architecture == "llama" else tiny_tinyllm)(tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, tok = load_model(str(tmp_path), device="cpu")  # what `tinyllm eval --model DIR` runs
    # The subject with the shortest questions, and its first questions only, keep this test to seconds.
    subject, task, limit = "chinese_language_and_literature", "tinyllm_ceval_chinese_language_and_literature", 12
    monkeypatch.setenv("TINYLLM_CEVAL_DIR", str(FIXTURES / "ceval"))
    bench = load_local("ceval", FIXTURES / "ceval", "val", subjects=[subject])
    ours = evaluate_multiple_choice(TransformersRuntime(model, tok), bench, "ppl", shots=1, limit=limit, progress=False)
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(tmp_path), "dtype": "float32", "trust_remote_code": True},
        tasks=[task],
        num_fewshot=1,
        limit=limit,
        batch_size=8,
        device="cpu",
        task_manager=TaskManager(include_path=str(harness.TASKS_DIR), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,  # no stderr estimates: they take longer than the evaluation
    )
    assert out["results"][task]["acc,none"] == pytest.approx(ours["accuracy"])
    # Same prompts, same tokens: the per-option log-likelihoods agree too (lm-eval pads right, we pad left).
    prompts = [mc.ppl_prompt(bench, q, 1, tok, 4096).text for q in bench.questions[subject][:limit]]
    scores = score_choices(model, tok, prompts)
    samples = out["samples"][task]
    assert len(samples) == len(prompts) == ours["n"] == limit
    for sample in samples:
        theirs = [resp[0][0] for resp in sample["resps"]]
        assert theirs == pytest.approx(scores[sample["doc_id"]], abs=1e-3)
