"""Mixture-of-Experts Tinyllm: dispatch equals a per-token reference, balancing losses and bias update behave, the dense
model is untouched, and the Qwen2-MoE export is exact."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2MoeForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from tinyllm_hf import TinyllmConfig, TinyllmForCausalLM
from tinyllm_hf.modeling.configuration_tinyllm import PRESETS
from tinyllm_hf.errors import ConversionError
from tinyllm_hf.modeling.convert_moe import tinyllm_config_to_qwen2_moe, tinyllm_to_qwen2_moe, tinyllm_to_qwen2_moe_model
from tinyllm_hf.modeling.modeling_tinyllm import TinyllmSparseMoeBlock

VOCAB = 97


def moe_config(**overrides):
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, num_experts=4,
                  num_experts_per_tok=2, num_shared_experts=1, moe_intermediate_size=16)
    return TinyllmConfig(**{**fields, **overrides})


def moe_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = TinyllmForCausalLM(moe_config(**overrides))
    with torch.no_grad():  # a sharper router than the 0.02-std init, so the top-k choice actually varies per token
        for router in model.routers():
            router.weight.normal_(0, 1.0)
    return model


def naive_moe(block: TinyllmSparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    """One token at a time: score the experts, take the top-k, sum their weighted SwiGLU outputs, add the shared MLP."""
    router, experts = block.gate, block.experts
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        logits = router.weight @ x[t]
        scores = torch.softmax(logits, -1) if router.scoring == "softmax" else torch.sigmoid(logits)
        choice = scores if router.expert_bias is None else scores + router.expert_bias
        chosen = torch.topk(choice, router.top_k).indices
        weights = scores[chosen] / (scores[chosen].sum() if router.norm_topk_prob else 1)
        for weight, e in zip(weights, chosen):
            gate, up = (experts.gate_up_proj[e] @ x[t]).chunk(2)
            out[t] += weight * (experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
        if block.shared_expert is not None:
            out[t] += block.shared_expert(x[t])
    return out


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(router_scoring="sigmoid", norm_topk_prob=True, num_shared_experts=0),
     dict(router_bias_update_rate=0.01, num_experts_per_tok=3, num_shared_experts=2)],
    ids=["softmax", "sigmoid-normalised", "biased-top3"],
)
def test_moe_block_equals_per_token_reference(implementation, overrides):
    model = moe_model(**overrides).eval()
    model.set_experts_implementation(implementation)
    block = model.model.layers[0].mlp
    if block.gate.expert_bias is not None:
        block.gate.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))  # a bias that changes some choices
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(block(x).reshape(-1, 32), naive_moe(block, x.reshape(-1, 32)), atol=1e-5, rtol=1e-5)


def test_layer_pattern_follows_first_k_dense_replace_and_freq():
    config = moe_config(num_hidden_layers=5, first_k_dense_replace=1, moe_layer_freq=2)
    model = TinyllmForCausalLM(config)
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == ["TinyllmMLP", "TinyllmMLP", "TinyllmSparseMoeBlock", "TinyllmMLP", "TinyllmSparseMoeBlock"]
    assert model.model.layers[0].mlp.gate_proj.out_features == config.intermediate_size
    assert len(model.routers()) == 2


def test_dense_model_is_unchanged_by_the_moe_switch(tmp_path):
    torch.manual_seed(0)
    dense = TinyllmForCausalLM(moe_config(num_experts=0))
    assert not any("experts" in n or ".gate." in n for n, _ in dense.named_parameters())
    ids = torch.randint(2, VOCAB, (2, 8))
    out = dense(ids, labels=ids)
    assert type(out) is CausalLMOutputWithPast
    dense.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["num_experts"] == 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not reloaded.routers()
    torch.testing.assert_close(reloaded(ids).logits, out.logits)


def test_training_loss_adds_weighted_balancing_losses():
    model = moe_model(router_aux_loss_coef=0.1, router_z_loss_coef=0.01).train()
    ids = torch.randint(2, VOCAB, (2, 12))
    out = model(ids, labels=ids)
    lm_loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, lm_loss + 0.1 * out.aux_loss + 0.01 * out.z_loss)
    assert out.expert_counts.shape == (2, 4)
    assert out.expert_counts.sum(-1).tolist() == [2 * 12 * 2] * 2  # each token picks top-2 in each MoE layer
    # Evaluation reports the plain language-model loss unless router logits are asked for.
    model.eval()
    evaluated = model(ids, labels=ids)
    assert evaluated.aux_loss is None
    torch.testing.assert_close(evaluated.loss, lm_loss)
    assert model(ids, labels=ids, output_router_logits=True).aux_loss is not None


def test_aux_loss_is_one_when_perfectly_balanced_and_trains_the_router():
    model = moe_model().train()
    with torch.no_grad():
        for router in model.routers():
            router.weight.zero_()  # uniform scores: every P_i = 1/E and the f_i sum to E, so the loss is exactly 1
    ids = torch.randint(2, VOCAB, (2, 12))
    torch.testing.assert_close(model(ids, labels=ids).aux_loss, torch.tensor(1.0))
    sharp = moe_model().train()
    aux = sharp(ids, labels=ids).aux_loss
    assert aux > 1.0
    aux.backward()
    assert all(router.weight.grad.abs().sum() > 0 for router in sharp.routers())


def test_padding_is_left_out_of_expert_counts():
    model = moe_model().train()
    ids = torch.randint(2, VOCAB, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    counts = model(ids, attention_mask=mask, labels=ids).expert_counts
    assert counts.sum(-1).tolist() == [(20 - 4) * 2] * 2


def test_bias_update_steers_load_towards_idle_experts():
    model = moe_model(router_bias_update_rate=0.05, router_aux_loss_coef=0.0).train()
    ids = torch.randint(2, VOCAB, (4, 16))
    counts = model(ids, labels=ids).expert_counts
    assert all(router.expert_bias.abs().sum() == 0 for router in model.routers())  # applied by the next forward
    model(ids, labels=ids)
    for router, load in zip(model.routers(), counts):
        torch.testing.assert_close(router.expert_bias, 0.05 * torch.sign(load.mean() - load))
    model.eval()
    model(ids, labels=ids)
    model.train()
    model(ids, labels=ids)  # evaluation forwards neither count nor update
    assert model.routers()[0].pending_load.sum() == 2 * 4 * 16
    # The bias picks experts but never scales their outputs: weights still come from the unbiased scores.
    router = model.routers()[0]
    scores = router.score(torch.randn(5, 4))
    weights, index = router.select(scores)
    torch.testing.assert_close(weights, scores.gather(-1, index))


def test_gradient_checkpointing_replays_the_routing_of_the_forward():
    """The bias moves at the start of a training forward, so backward's recomputation routes exactly as the forward."""
    import copy

    plain = moe_model(router_bias_update_rate=0.05).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(2, VOCAB, (2, 16))
    for _ in range(3):  # later steps run with a moved bias
        for model in (plain, checkpointed):
            model.zero_grad()
            model(ids, labels=ids).loss.backward()
    assert plain.routers()[0].expert_bias.abs().sum() > 0
    for (name, p), c in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(c.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_pop_moe_stats_averages_and_resets():
    model = moe_model().train()
    ids = torch.randint(2, VOCAB, (2, 8))
    auxes = [model(ids, labels=ids).aux_loss.item() for _ in range(3)]
    stats = model.pop_moe_stats()
    assert stats["aux_loss"] == pytest.approx(sum(auxes) / 3, rel=1e-5)
    assert sum(map(sum, stats["expert_counts"])) == 3 * 2 * 16 * 2
    assert model.pop_moe_stats() is None


def test_cached_generation_equals_uncached():
    model = moe_model().eval()
    prompt = torch.randint(2, VOCAB, (2, 5))
    cached = model.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(10):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    torch.testing.assert_close(cached, ids)


def test_save_reload_keeps_expert_bias_and_loads_as_remote_code(tmp_path):
    model = moe_model(router_bias_update_rate=0.01).eval()
    with torch.no_grad():
        model.routers()[1].expert_bias.copy_(torch.tensor([0.5, -0.5, 0.25, 0.0]))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded.routers()[1].expert_bias, model.routers()[1].expert_bias)
    ids = torch.randint(2, VOCAB, (2, 9))
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
    script = textwrap.dedent(f"""
        import sys, json, torch
        sys.modules["tinyllm_hf"] = None  # remote code must not need the package
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        print(json.dumps(model(torch.tensor({ids.tolist()})).logits.tolist()))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    remote = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(remote, model(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(num_shared_experts=0, qkv_bias=True), dict(num_hidden_layers=3, first_k_dense_replace=1, tie_word_embeddings=False)],
    ids=["shared", "no-shared-qkv-bias", "dense-first-untied"],
)
def test_qwen2_moe_export_matches_logits(overrides, tmp_path):
    model = moe_model(**overrides).eval()
    if model.config.qkv_bias:
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.bias.normal_()
    ids = torch.randint(2, VOCAB, (2, 14))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    expected = model(ids, attention_mask=mask).logits
    qwen = tinyllm_to_qwen2_moe_model(model)
    torch.testing.assert_close(qwen(ids, attention_mask=mask).logits, expected, atol=1e-4, rtol=0)

    model.save_pretrained(tmp_path / "tinyllm")
    tinyllm_to_qwen2_moe(tmp_path / "tinyllm", tmp_path / "qwen")
    config = json.loads((tmp_path / "qwen" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"] and config["rope_theta"] == 10000.0
    from safetensors import safe_open

    with safe_open(tmp_path / "qwen" / "model.safetensors", "pt") as f:
        # the per-expert layout that vLLM, llama.cpp's converter and transformers 4.x read
        assert f"model.layers.{model.config.num_hidden_layers - 1}.mlp.experts.3.down_proj.weight" in f.keys()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen")
    assert isinstance(reloaded, Qwen2MoeForCausalLM)
    torch.testing.assert_close(reloaded(ids, attention_mask=mask).logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "overrides, message",
    [(dict(router_scoring="sigmoid"), "router_scoring"), (dict(router_bias_update_rate=0.001), "router_bias_update_rate"),
     (dict(attention_bias=True), "attention_bias"), (dict(num_experts=0), "num_experts=0")],
)
def test_qwen2_moe_export_rejects_what_it_cannot_express(overrides, message):
    with pytest.raises(ConversionError, match=message):
        tinyllm_config_to_qwen2_moe(moe_config(**overrides))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(num_experts=-1), "num_experts"),
        (dict(router_scoring="relu"), "router_scoring"),
        (dict(num_experts_per_tok=1, norm_topk_prob=True), "norm_topk_prob"),
        (dict(moe_intermediate_size=20), "moe_intermediate_size"),
        (dict(num_shared_experts=0, shared_expert_intermediate_size=16), "shared_expert_intermediate_size"),
        (dict(first_k_dense_replace=2), "first_k_dense_replace"),
        (dict(moe_layer_freq=0), "moe_layer_freq"),
        (dict(router_aux_loss_coef=-0.1), "router_aux_loss_coef"),
    ],
)
def test_invalid_moe_config_names_the_fields(overrides, message):
    with pytest.raises(ValueError, match=message):
        moe_config(**overrides)


def active_parameters(config: TinyllmConfig) -> int:
    """Parameters one token uses: everything except the routed experts it was not sent to (embeddings counted once)."""
    with torch.device("meta"):
        model = TinyllmForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    for router in model.routers():
        per_expert = 3 * config.hidden_size * config.moe_intermediate_size
        total -= (config.num_experts - config.num_experts_per_tok) * per_expert
    return total


@pytest.mark.parametrize("moe, dense", [("moe-tiny", "tiny"), ("moe-92m", "92m")])
def test_moe_presets_match_their_dense_twin_in_active_parameters(moe, dense):
    assert moe in PRESETS
    moe_active = active_parameters(TinyllmConfig.from_preset(moe))
    dense_active = active_parameters(TinyllmConfig.from_preset(dense))
    assert abs(moe_active - dense_active) / dense_active < 0.02


@pytest.fixture(scope="module")
def moe_gguf(tmp_path_factory):
    """A 2-layer moe-tiny with the fixture tokenizer (larger init so greedy decoding varies), exported to f16 GGUF."""
    pytest.importorskip("gguf", reason='GGUF export needs the `gguf` package: pip install "tinyllm-hf[quant]"')
    from quant_fixtures import build_tokenizer

    from tinyllm_hf.export.gguf import export_gguf

    root = tmp_path_factory.mktemp("gguf-moe")
    tokenizer = build_tokenizer(root / "model")
    config = TinyllmConfig.from_preset("moe-tiny", vocab_size=len(tokenizer), num_hidden_layers=2, initializer_range=0.1,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = TinyllmForCausalLM(config).eval()
    model.save_pretrained(root / "model")
    return model, root / "model", export_gguf(root / "model", root / "model-f16.gguf")


def test_moe_gguf_reads_back_in_transformers(moe_gguf):
    import gguf

    model, model_dir, path = moe_gguf
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "qwen2moe"
    assert reader.fields["qwen2moe.expert_feed_forward_length"].contents() == model.config.moe_intermediate_size
    assert "output.weight" in {t.name for t in reader.tensors}  # llama.cpp's qwen2moe requires it even when tied
    # transformers' GGUF reader ignores expert_feed_forward_length, so it gets the config; the tensors come from the file.
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                  config=tinyllm_config_to_qwen2_moe(model.config)).eval()
    ids = torch.randint(5, model.config.vocab_size, (1, 20))
    with torch.no_grad():
        expected, got = model(ids).logits, loaded(ids).logits
    assert (expected - got).abs().max() < 0.02 * expected.std()  # f16 rounding, far below a layout error


def test_moe_gguf_refuses_what_llama_cpp_cannot_run(moe_gguf, tmp_path):
    from tinyllm_hf.export.gguf import export_gguf

    _, model_dir, _ = moe_gguf
    for overrides, message in [(dict(first_k_dense_replace=1), "dense layers"), (dict(norm_topk_prob=True), "norm_topk_prob")]:
        TinyllmForCausalLM(moe_config(**overrides)).save_pretrained(tmp_path / message)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (tmp_path / message / name).write_bytes((model_dir / name).read_bytes())
        with pytest.raises(ConversionError, match=message):
            export_gguf(tmp_path / message, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_llama_cpp_runs_the_moe_gguf_like_transformers(moe_gguf):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason='llama.cpp checks need llama-cpp-python: pip install "tinyllm-hf[llamacpp]" (builds from source)'
    )
    model, _, path = moe_gguf
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    ids = torch.randint(5, model.config.vocab_size, (24,)).tolist()
    llm.eval(ids)
    got = torch.tensor(llm.scores[: len(ids)])
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    # A 0/0 shared-expert gate would give NaN; a wrong layout or routing gives errors of the logits' own size.
    assert torch.isfinite(got).all()
    assert (expected - got).abs().max() < 0.05 * expected.std()
    # Same next-token choice wherever the reference is not a near-tie that f16 weights may flip.
    top2 = expected.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.05
    assert (expected.argmax(-1) == got.argmax(-1))[clear].all()


@pytest.mark.parametrize("recipe", ["pretrain-quickstart", "pretrain-92m", "sft-quickstart", "sft-92m"])
def test_moe_recipes_parse_with_their_stage(recipe):
    """Every key is one the stage's parser defines, and the pretraining recipes build an MoE config."""
    from tinyllm_hf.trainers.common import parse_recipe

    path = os.path.join(os.path.dirname(__file__), "..", "recipes", "moe", f"{recipe}.yaml")
    gpu_only = ["--bf16", "false", "--optim", "adamw_torch"] if "92m" in recipe else []  # parse on a CPU machine
    if recipe.startswith("pretrain"):
        from transformers import TrainingArguments

        from tinyllm_hf.trainers.pretrain import DataArguments, ModelArguments, parse_overrides

        model_args, *_ = parse_recipe([ModelArguments, DataArguments, TrainingArguments], ["--config", path, *gpu_only])
        config = TinyllmConfig.from_preset(model_args.model_preset, **parse_overrides(model_args.config_overrides))
        assert config.num_experts > 0
    else:
        from trl import ModelConfig, SFTConfig

        from tinyllm_hf.trainers.sft import SFTDataArguments

        parse_recipe([ModelConfig, SFTDataArguments, SFTConfig], ["--config", path, *gpu_only])


def test_moe_callback_logs_load_and_plots(tmp_path):
    from transformers import Trainer, TrainingArguments

    from tinyllm_hf.trainers.common import add_callback_first
    from tinyllm_hf.trainers.moe_callbacks import MoeLoadCallback

    model = moe_model()
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(2, VOCAB, (16, 12))]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, logging_steps=2,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    add_callback_first(trainer, MoeLoadCallback())
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 2 and all(e["moe_load_max_over_mean"] >= 1.0 and e["moe_aux_loss"] > 0 for e in logged)
    history = json.loads((tmp_path / "expert_load.json").read_text())
    assert [sum(map(sum, h["expert_counts"])) for h in history] == [2 * 4 * 12 * 2 * 2] * 2  # steps x batch x seq x k x layers
    assert (tmp_path / "expert_load.png").stat().st_size > 0
