"""TinyllmForCausalLM behaves like a Hugging Face causal LM: masking, cache, padding, save/load, remote code, Llama."""

import json
import os
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaForCausalLM

from tinyllm_hf import TinyllmConfig, TinyllmForCausalLM, TinyllmForSequenceClassification, TinyllmModel
from tinyllm_hf.errors import ConversionError
from tinyllm_hf.modeling.convert import tinyllm_config_to_llama, tinyllm_to_llama, tinyllm_to_llama_model

VOCAB = 97


def tiny_config(**overrides):
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1)
    return TinyllmConfig(**{**fields, **overrides})


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyllmForCausalLM(tiny_config()).eval()


def test_shapes_and_causal_masking(model):
    ids = torch.randint(2, VOCAB, (3, 12))
    logits = model(ids).logits
    assert logits.shape == (3, 12, VOCAB)
    changed = ids.clone()
    changed[:, 8:] = torch.randint(2, VOCAB, (3, 4))
    new_logits = model(changed).logits
    torch.testing.assert_close(new_logits[:, :8], logits[:, :8])  # the past never sees the future
    assert not torch.allclose(new_logits[:, 8:], logits[:, 8:])


def test_sdpa_and_eager_attention_agree(model):
    ids = torch.randint(2, VOCAB, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    sdpa = model(ids, attention_mask=mask).logits
    model.set_attn_implementation("eager")
    eager = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(sdpa[0, 3:], eager[0, 3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sdpa[1], eager[1], atol=1e-5, rtol=1e-5)


def test_cpu_autocast_runs_attention_in_fp32(model):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    seen = []

    def recording_sdpa(module, query, key, value, attention_mask, **kwargs):
        seen.append((query.dtype, key.dtype, value.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("recording_sdpa", recording_sdpa)
    AttentionMaskInterface.register("recording_sdpa", sdpa_mask)
    ids = torch.randint(2, VOCAB, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    fp32_logits = model(ids, attention_mask=mask).logits
    model.config._attn_implementation = "recording_sdpa"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_logits = model(ids, attention_mask=mask).logits
    assert seen == [(torch.float32, torch.float32, torch.float32, False)] * model.config.num_hidden_layers
    assert bf16_logits.dtype == torch.bfloat16  # the projections around attention still run in bf16
    real = mask.bool()
    error = (bf16_logits.float()[real] - fp32_logits[real]).norm() / fp32_logits[real].norm()
    assert error < 0.02  # bf16 rounding of the projections, not wrong attention (a dropped mask gives ~0.3)


def greedy_without_cache(model, ids, steps):
    with torch.no_grad():
        for _ in range(steps):
            next_id = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    return ids


def test_cached_generation_equals_uncached(model):
    prompt = torch.randint(2, VOCAB, (2, 6))
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    torch.testing.assert_close(cached, greedy_without_cache(model, prompt, 12))


def test_left_padded_batch_equals_each_row(model):
    rows = [torch.randint(2, VOCAB, (n,)) for n in (7, 4, 2)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    for i, r in enumerate(rows):
        alone = model.generate(r[None], max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert torch.equal(batch[i, width:], alone[0, len(r):]), f"row {i} differs when batched with left padding"
        batch_logits = model(ids[i:i + 1], attention_mask=mask[i:i + 1]).logits[0, width - len(r):]
        torch.testing.assert_close(batch_logits, model(r[None]).logits[0], atol=1e-5, rtol=1e-5)


def test_save_and_reload_safetensors_only(model, tmp_path):
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)
    assert {"configuration_tinyllm.py", "loss_tinyllm.py", "modeling_tinyllm.py"} <= files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded, TinyllmForCausalLM)
    ids = torch.randint(2, VOCAB, (2, 9))
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
    # RoPE tables are non-persistent buffers: they must be recomputed, not left as meta-device garbage.
    torch.testing.assert_close(reloaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    assert isinstance(AutoModel.from_pretrained(tmp_path), TinyllmModel)


def test_tied_embeddings_are_shared_and_not_saved_twice(model, tmp_path):
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()


def test_remote_code_loads_without_the_package(model, tmp_path):
    """In a process where `import tinyllm_hf` fails, trust_remote_code loads the saved model and generates the same."""
    model.save_pretrained(tmp_path)
    prompt = torch.randint(2, VOCAB, (1, 5))
    expected = model.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    script = textwrap.dedent(f"""
        import sys, json, torch
        sys.modules["tinyllm_hf"] = None  # make `import tinyllm_hf` fail
        try:
            import tinyllm_hf
            raise SystemExit("tinyllm_hf is importable")
        except ImportError:
            pass
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        out = model.generate(torch.tensor({prompt.tolist()}), max_new_tokens=10, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        reward = AutoModelForSequenceClassification.from_pretrained({str(tmp_path)!r}, trust_remote_code=True,
                                                                     num_labels=1)
        print(json.dumps([type(model).__module__, out.tolist(), type(reward).__name__]))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    module, tokens, reward_class = json.loads(result.stdout.strip().splitlines()[-1])
    assert module.startswith("transformers_modules")
    assert tokens == expected.tolist()
    assert reward_class == "TinyllmForSequenceClassification"


def test_matches_llama_logits_and_exports(model, tmp_path):
    llama = tinyllm_to_llama_model(model)
    assert isinstance(llama, LlamaForCausalLM)
    ids = torch.randint(2, VOCAB, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    torch.testing.assert_close(llama(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                               atol=1e-4, rtol=0)
    model.save_pretrained(tmp_path / "tinyllm")
    tinyllm_to_llama(tmp_path / "tinyllm", tmp_path / "llama")
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["rope_theta"] == 10000.0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
    assert isinstance(reloaded, LlamaForCausalLM)
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_and_rmsnorm_compute_what_llamas_do(dtype):
    """The decoding-speed rewrites (RoPE as a roll with a sign-folded sin, RMSNorm as one fused op in fp32) keep
    Llama's numbers: RoPE bitwise in every dtype, RMSNorm to fp32 rounding."""
    from transformers.models.llama import modeling_llama

    from tinyllm_hf.modeling.modeling_tinyllm import TinyllmRMSNorm, TinyllmRotaryEmbedding, apply_rotary_pos_emb

    config = tiny_config(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})
    llama_config = tinyllm_config_to_llama(config)
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 7, 8, dtype=dtype), torch.randn(2, 2, 7, 8, dtype=dtype)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [3, 4, 5, 6, 7, 8, 9]])
    ours = apply_rotary_pos_emb(q, k, *TinyllmRotaryEmbedding(config)(q, positions))
    theirs = modeling_llama.apply_rotary_pos_emb(q, k, *modeling_llama.LlamaRotaryEmbedding(llama_config)(q, positions))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))

    norm, llama_norm = TinyllmRMSNorm(32, eps=1e-6), modeling_llama.LlamaRMSNorm(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        llama_norm.weight.copy_(norm.weight)
    norm, llama_norm = norm.to(dtype), llama_norm.to(dtype)
    hidden = torch.randn(3, 5, 32, dtype=dtype) * 4
    torch.testing.assert_close(norm(hidden), llama_norm(hidden), atol=0, rtol=1e-6 if dtype == torch.float32 else 0)


def test_llama_export_rejects_what_llama_cannot_express():
    with pytest.raises(ConversionError, match="qkv_bias"):
        tinyllm_config_to_llama(tiny_config(qkv_bias=True))


def test_export_to_non_empty_directory_fails_cleanly(model, tmp_path):
    model.save_pretrained(tmp_path / "tinyllm")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        tinyllm_to_llama(tmp_path / "tinyllm", tmp_path / "taken")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        tinyllm_to_llama(tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not os.environ.get("TINYLLM_LEGACY_PYTHON"), reason="set TINYLLM_LEGACY_PYTHON to a python with "
                    "transformers 4.57 (scripts/test.sh builds one) to test loading in older transformers")
def test_llama_export_loads_in_transformers_4(tiny_model_dir, tmp_path):
    """vLLM and optimum-onnx pin transformers 4.x: the export (weights, rope_theta, tokenizer, chat template) must load
    there and give the same logits and the same chat prompt ids."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tinyllm_to_llama(tiny_model_dir, tmp_path / "llama")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": "你好"}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    ids = torch.randint(2, model.config.vocab_size, (2, 12))
    script = textwrap.dedent(f"""
        import json, torch, transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
        assert transformers.__version__.startswith("4."), transformers.__version__
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "llama")!r})
        tokenizer = AutoTokenizer.from_pretrained({str(tmp_path / "llama")!r})
        prompt = tokenizer.apply_chat_template({messages!r}, add_generation_prompt=True)
        print(json.dumps([model(torch.tensor({ids.tolist()})).logits.tolist(), prompt, type(model).__name__]))
    """)
    result = subprocess.run([os.environ["TINYLLM_LEGACY_PYTHON"], "-c", script], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    legacy_logits, legacy_prompt, legacy_class = json.loads(result.stdout.strip().splitlines()[-1])
    assert legacy_class == "LlamaForCausalLM"
    torch.testing.assert_close(torch.tensor(legacy_logits), model(ids).logits, atol=1e-4, rtol=0)
    assert legacy_prompt == list(prompt_ids)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden_size=30, num_attention_heads=4), "hidden_size"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(hidden_size=12, num_attention_heads=4, num_key_value_heads=4), "head_dim"),
        (dict(hidden_act="gelu"), "hidden_act"),
    ],
)
def test_invalid_config_names_the_fields(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="16m"):
        TinyllmConfig.from_preset("17m")


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = TinyllmForCausalLM(tiny_config()).train()
    ids = torch.randint(2, VOCAB, (2, 16))

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = grads()
    assert model.model.layers[0].gradient_checkpointing
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_loss_honours_num_items_in_batch(model):
    ids = torch.randint(2, VOCAB, (2, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    mean_loss = model(ids, labels=labels).loss
    counted = (labels[:, 1:] != -100).sum()
    summed = model(ids, labels=labels, num_items_in_batch=counted * 2).loss
    torch.testing.assert_close(summed, mean_loss / 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["mean", "num_items_tensor", "num_items_int", "shift_labels"])
def test_chunked_loss_matches_transformers_loss(dtype, case, monkeypatch):
    from transformers.loss.loss_utils import ForCausalLMLoss

    from tinyllm_hf.modeling import loss_tinyllm

    torch.manual_seed(0)
    logits = torch.randn(3, 40, VOCAB).to(dtype)
    labels = torch.randint(0, VOCAB, (3, 40))
    labels[0, :15] = -100
    kwargs = {"num_items_tensor": {"num_items_in_batch": torch.tensor(200)}, "num_items_int": {"num_items_in_batch": 77},
              "shift_labels": {"shift_labels": labels.roll(-1, dims=1)}, "mean": {}}[case]
    # 1,100 logits per chunk -> 11 rows: the 120 rows cross chunk boundaries and end in a partial chunk.
    monkeypatch.setattr(loss_tinyllm, "LOSS_CHUNK_LOGITS", 1100)

    def loss_and_grad(loss_fn):
        leaf = logits.clone().requires_grad_()
        loss = loss_fn(leaf)
        loss.backward()
        return loss, leaf.grad

    expected = loss_and_grad(lambda x: ForCausalLMLoss(x, labels, vocab_size=VOCAB, **kwargs))
    chunked = loss_and_grad(lambda x: loss_tinyllm.causal_lm_loss(x, labels, **kwargs))
    assert chunked[0].dtype == torch.float32 and chunked[1].dtype == dtype
    torch.testing.assert_close(chunked[0], expected[0], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(chunked[1], expected[1], atol=1e-8 if dtype == torch.float32 else 1e-4, rtol=1e-5)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("case", ["mean", "num_items_tensor", "shift_labels", "ignore_index"])
def test_loss_without_logits_matches_head_then_loss(autocast, case, monkeypatch):
    """`skip_logits=True` (LinearCrossEntropy) gives the loss and every parameter gradient of the head-then-loss path,
    returns no logits, and makes no gradients under no_grad."""
    from tinyllm_hf.modeling import loss_tinyllm

    torch.manual_seed(0)
    model = TinyllmForCausalLM(tiny_config(tie_word_embeddings=case != "mean")).train()
    ids = torch.randint(2, VOCAB, (3, 20))
    labels = ids.clone()
    labels[0, :7] = -100
    kwargs = {"num_items_tensor": {"num_items_in_batch": torch.tensor(50)}, "mean": {},
              "shift_labels": {"shift_labels": labels.roll(-1, dims=1)}, "ignore_index": {"ignore_index": -1}}[case]
    if case == "ignore_index":  # another marker for "no loss here"
        labels = labels.masked_fill(labels == -100, -1)
    # 500 logits per chunk -> 5 rows: the 60 rows cross chunk boundaries and end in a partial chunk.
    monkeypatch.setattr(loss_tinyllm, "LOSS_CHUNK_LOGITS", 500)

    def loss_and_grads(**skip):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            output = model(ids, labels=labels, **kwargs, **skip)
        output.loss.backward()
        return output, {name: p.grad.clone() for name, p in model.named_parameters()}

    (full, expected), (skipped, got) = loss_and_grads(), loss_and_grads(skip_logits=True)
    assert full.logits is not None and skipped.logits is None
    torch.testing.assert_close(skipped.loss, full.loss, atol=1e-5, rtol=1e-6)
    for name in expected:  # bf16: the head's matmuls round in bf16 either way, in a different order
        torch.testing.assert_close(got[name], expected[name], atol=1e-6 if not autocast else 2e-3,
                                   rtol=1e-4 if not autocast else 2e-2, msg=name)
    # exp_ turns log-probabilities into the gradient: not wanted when no gradient will be asked for.
    with torch.no_grad(), mock.patch.object(torch.Tensor, "exp_", side_effect=AssertionError("gradient work")):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(ids, labels=labels, skip_logits=True, **kwargs).loss
    torch.testing.assert_close(loss, full.loss.detach(), atol=1e-5, rtol=1e-6)


def test_sequence_classification_pools_last_real_token(tmp_path):
    torch.manual_seed(0)
    classifier = TinyllmForSequenceClassification(tiny_config(num_labels=1)).eval()
    ids = torch.randint(2, VOCAB, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)  # left padding
    right_padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    alone = classifier(ids).logits
    left = classifier(padded, attention_mask=(padded != 0).long()).logits
    right = classifier(right_padded, attention_mask=(right_padded != 0).long()).logits
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)
    classifier.save_pretrained(tmp_path)
    assert isinstance(AutoModelForSequenceClassification.from_pretrained(tmp_path), TinyllmForSequenceClassification)


def test_scaled_rope_is_used():
    ids = torch.randint(2, VOCAB, (1, 12))
    torch.manual_seed(0)
    plain = TinyllmForCausalLM(tiny_config()).eval()
    torch.manual_seed(0)
    scaled = TinyllmForCausalLM(tiny_config(rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                             "rope_theta": 10000.0})).eval()
    assert not torch.allclose(plain(ids).logits, scaled(ids).logits)
    torch.testing.assert_close(tinyllm_to_llama_model(scaled)(ids).logits, scaled(ids).logits, atol=1e-4, rtol=0)


def test_rope_tables_come_in_the_compute_dtype(model, monkeypatch):
    """cos/sin are made in fp32 and handed out in the dtype q and k come in: autocast's under autocast (the fp32
    hidden states would otherwise make every layer upcast q and k), the model's own without it; the bf16 tables move
    the logits by no more than bf16 rounding."""
    from tinyllm_hf.modeling import modeling_tinyllm

    tables = []
    model.model.rotary_emb.register_forward_hook(lambda module, args, out: tables.append((out[0].dtype, out[1].dtype)))
    ids = torch.randint(2, VOCAB, (2, 40))
    fp32_logits = model(ids).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_logits = model(ids).logits
    monkeypatch.setattr(modeling_tinyllm, "compute_dtype", lambda x: x.dtype)  # the fp32 tables of before
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before_logits = model(ids).logits
    assert tables == [(torch.float32,) * 2, (torch.bfloat16,) * 2, (torch.float32,) * 2]
    def relative_error(logits, reference):
        return ((logits.float() - reference.float()).norm() / reference.float().norm()).item()

    assert relative_error(bf16_logits, before_logits) < 0.01
    # Against fp32, bf16 tables add almost nothing to the error bf16 autocast already has (0.0029 -> 0.0029 here).
    assert relative_error(bf16_logits, fp32_logits) < 1.2 * relative_error(before_logits, fp32_logits)


def test_loss_chunks_are_cache_sized_on_cpus_and_kernel_sized_on_accelerators():
    from tinyllm_hf.modeling.loss_tinyllm import loss_chunk_rows

    assert loss_chunk_rows(torch.device("cpu"), 32_000) == 2**21 // 32_000 == 65
    assert loss_chunk_rows(torch.device("cuda"), 32_000) == 2**27 // 32_000 == 4194
    assert loss_chunk_rows(torch.device("cpu"), 2**22) == 1  # at least one row per chunk
