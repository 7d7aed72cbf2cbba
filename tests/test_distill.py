"""`tinyllm distill`: a student trained on a teacher's distributions (corpus and conversations), the shared-tokenizer
check that runs before any weights are loaded, and the stage's place in the CLI and the pipeline."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from conftest import review_lines
from tinyllm_hf import TinyllmForCausalLM, cli
from tinyllm_hf.errors import TinyllmError
from tinyllm_hf.trainers import distill

# A new student of width 32 (2 layers), so a run of a few steps takes seconds.
SMALL_STUDENT = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=4,max_position_embeddings=64"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "reviews.txt"
    path.write_text("\n".join(review_lines(600)) + "\n", encoding="utf-8")
    return path


def run_args(teacher, out, **overrides) -> list[str]:
    values = {"teacher_model_name_or_path": teacher, "config_overrides": SMALL_STUDENT, "block_size": 32,
              "output_dir": out, "max_steps": 12, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
              "warmup_steps": 0, "logging_steps": 1, "eval_strategy": "no", "max_eval_samples": 8,
              "save_strategy": "no", "report_to": "none", "use_cpu": True, "loss_curve": False, "seed": 0, **overrides}
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def read_log(out) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def test_corpus_distillation_lowers_the_divergence_and_saves_a_student_that_reloads(tiny_model_dir, corpus_file,
                                                                                    tmp_path):
    out = tmp_path / "student"
    argv = run_args(tiny_model_dir, out, dataset_name=corpus_file, eval_strategy="steps", eval_steps=12)
    assert cli.main(["distill", *argv]) == 0
    history = read_log(out)
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) == 12 and losses[-1] < 0.7 * losses[0]  # the student moves towards the teacher
    assert all(e["student_ce"] > 0 for e in history if "loss" in e)  # its own next-token loss is logged beside it
    evaluation = json.loads((out / "eval_results.json").read_text())
    student = TinyllmForCausalLM.from_pretrained(out)
    assert student.config.hidden_size == 32 and student.config.num_hidden_layers == 2
    # eval_loss is the student's own next-token loss on the validation blocks (what pretraining reports), not the
    # divergence: a random-weights model of this vocabulary starts near log(vocab).
    assert 0 < evaluation["eval_loss"] < 2 * torch.log(torch.tensor(float(student.config.vocab_size)))
    assert AutoTokenizer.from_pretrained(out).vocab == AutoTokenizer.from_pretrained(tiny_model_dir).vocab


def test_conversation_distillation_with_on_policy_steps_runs(tiny_model_dir, tmp_path):
    """data: sft with lmbda 1: every step trains on the student's own sampled answers to the prompts."""
    out = tmp_path / "student"
    argv = run_args(tiny_model_dir, out, data="sft", sft_tasks="sentiment", task_sizes="sentiment=16", max_steps=2,
                    lmbda=1.0, max_new_tokens=6, divergence="reverse_kl",
                    config_overrides=SMALL_STUDENT.replace("max_position_embeddings=64", "max_position_embeddings=256"))
    argv = [a for a in argv if a not in ("--block_size", "32")]  # a corpus key: refused with data sft
    assert cli.main(["distill", *argv]) == 0
    losses = [e["loss"] for e in read_log(out) if "loss" in e]
    assert len(losses) == 2 and all(loss == loss and loss >= 0 for loss in losses)
    assert (out / "model.safetensors").is_file()


def test_conversation_collator_masks_all_but_the_answers_and_prompts_end_before_the_last_answer():
    collate = distill.ConversationCollator(pad_token_id=0, max_length=16)
    batch = collate([
        {"input_ids": [5, 6, 7, 8, 9, 10], "assistant_masks": [0, 0, 1, 1, 0, 1]},  # two answers: prompt ends at 5
        {"input_ids": [5, 6, 7, 8], "assistant_masks": [0, 0, 1, 1]},
    ])
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, -100, 10], [-100, -100, 7, 8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]
    assert batch["prompts"].tolist() == [[5, 6, 7, 8, 9], [0, 0, 0, 5, 6]]  # left-padded for generation
    assert batch["prompt_attention_mask"].tolist() == [[1] * 5, [0, 0, 0, 1, 1]]


@pytest.fixture(scope="module")
def other_tokenizer_dir(tmp_path_factory):
    """A tokenizer of the same size trained on other text: the same special tokens first, then other ids."""
    from tinyllm_hf.tokenizer.train import train_tokenizer

    path = tmp_path_factory.mktemp("other-tokenizer") / "tok"
    train_tokenizer([line[::-1] + "。天地玄黄宇宙洪荒" for line in review_lines(600)], vocab_size=600, output_dir=path)
    return path


def test_a_teacher_with_another_tokenizer_is_refused_naming_the_first_differing_id_before_loading_weights(
        tiny_model_dir, other_tokenizer_dir, corpus_file, tmp_path, capsys, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the tokenizers were compared")

    monkeypatch.setattr(distill, "get_model", no_weights)
    monkeypatch.setattr(distill.pretrain, "build_model", no_weights)
    out = tmp_path / "out"
    argv = run_args(tiny_model_dir, out, dataset_name=corpus_file, tokenizer_name_or_path=other_tokenizer_dir)
    assert cli.main(["distill", *argv]) == TinyllmError.exit_code
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tinyllm distill: error: ")
    assert "do not share a tokenizer: token id " in lines[0] and "tokenizer extend" in lines[0]
    assert not out.exists()


def test_tokenizer_mismatch_names_ids_only_one_side_has_and_different_splits(tiny_tokenizer_dir):
    student = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert distill.tokenizer_mismatch(student, AutoTokenizer.from_pretrained(tiny_tokenizer_dir)) is None
    longer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    longer.add_tokens(["知识蒸馏"])
    size = len(student)
    assert distill.tokenizer_mismatch(student, longer) == (
        f"the teacher's tokenizer has {size + 1} tokens, the student's {size}: ids {size}..{size} exist only in the "
        "teacher's")
    lowercasing = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    from tokenizers import normalizers

    lowercasing.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert "splits text differently" in distill.tokenizer_mismatch(student, lowercasing)


def test_help_lists_the_distillation_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["distill", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "tinyllm distill" in out
    for key in ("--teacher_model_name_or_path", "--divergence", "--lmbda", "--data", "--model_preset"):
        assert key in out


def test_the_pipeline_distils_from_the_runs_pretrained_model(tmp_path, monkeypatch):
    from tinyllm_hf import pipeline

    recipe = tmp_path / "r.yaml"
    recipe.write_text("tokenizer: {}\npretrain: {recipe: p.yaml}\n"
                      "distill: {recipe: recipes/distill/quickstart.yaml, args: {max_steps: 5}}\n", "utf-8")
    commands = []
    monkeypatch.setattr(pipeline.Pipeline, "run_command", lambda self, stage, args, accelerate=None:
                        commands.append((stage, args)))
    run = tmp_path / "run"
    assert pipeline.main(["--config", str(recipe), "--output_dir", str(run), "--only", "distill"]) == 0
    [(stage, args)] = commands
    flags = dict(zip(args[1::2], args[2::2]))
    assert stage == "distill" and args[0] == "distill"
    assert flags["--config"] == "recipes/distill/quickstart.yaml"
    assert flags["--teacher_model_name_or_path"] == str(run / "pretrain")
    assert flags["--tokenizer_name_or_path"] == str(run / "tokenizer" / "tokenizer")
    assert flags["--output_dir"] == str(run / "distill") and flags["--max_steps"] == "5"
    assert (run / "distill" / "stage.json").exists()


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_chunked_divergence_matches_gkds_value_and_gradient(beta, monkeypatch):
    from trl.experimental.gkd import GKDTrainer

    monkeypatch.setattr(distill, "DIVERGENCE_CHUNK", 5)  # several chunks, the last one short
    torch.manual_seed(0)
    student = torch.randn(3, 7, 11, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 7, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :3] = -100
    ours = distill.divergence_loss(student, teacher, labels, beta)
    (ours_grad,) = torch.autograd.grad(ours, student)
    theirs = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta)
    (theirs_grad,) = torch.autograd.grad(theirs, student)
    assert torch.allclose(ours.double(), theirs, atol=1e-6) and ours > 0
    assert torch.allclose(ours_grad, theirs_grad, atol=1e-6)
    with_count = distill.divergence_loss(student, teacher, labels, beta, num_items_in_batch=40)
    assert torch.allclose(with_count * 40, ours * (labels != -100).sum())
