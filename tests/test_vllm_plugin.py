"""The vLLM plugin registers lazily and idempotently, and aligns Tinyllm's bias flags with vLLM's Llama.

vLLM itself is not installed in the test environment (official wheels need CUDA); `bench/vllm_check.sh` serves a
model with a real vLLM. Here a stand-in `vllm` module records what `register()` does.
"""

import sys
import types
from importlib.metadata import entry_points

import pytest

from tinyllm_hf.export import vllm_plugin
from tinyllm_hf.modeling import TinyllmConfig


class FakeRegistry:
    def __init__(self):
        self.models = {"LlamaForCausalLM": "vllm.model_executor.models.llama:LlamaForCausalLM"}
        self.calls = 0

    def get_supported_archs(self):
        return list(self.models)

    def register_model(self, arch, model_cls):
        self.calls += 1
        self.models[arch] = model_cls


def test_entry_point_is_declared():
    names = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert names.get("tinyllm") == "tinyllm_hf.export.vllm_plugin:register"


def test_register_is_lazy_and_idempotent(monkeypatch):
    registry = FakeRegistry()
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(ModelRegistry=registry))
    vllm_plugin.register()
    vllm_plugin.register()  # vLLM calls it once per process; a second call must not re-register
    assert registry.calls == 1
    assert registry.models["TinyllmForCausalLM"] == "tinyllm_hf.export.vllm_model:TinyllmForCausalLM"
    assert "tinyllm_hf.export.vllm_model" not in sys.modules  # the model module (imports vLLM) stays unloaded
    from transformers import AutoConfig

    assert AutoConfig.for_model("tinyllm").__class__ is TinyllmConfig


@pytest.mark.parametrize(
    "attention_bias, qkv_bias, expected_qkv",
    [(False, False, False), (True, False, True), (False, True, True), (True, True, True)],
)
def test_bias_flags_match_tinyllm(attention_bias, qkv_bias, expected_qkv):
    config = TinyllmConfig(hidden_size=64, num_attention_heads=4, attention_bias=attention_bias, qkv_bias=qkv_bias)
    vllm_plugin.vllm_bias_flags(config)
    # vLLM's Llama: q/k/v bias = config.qkv_bias, o_proj bias = config.attention_bias
    assert config.qkv_bias is expected_qkv and config.attention_bias is attention_bias


def test_moe_is_refused():
    config = TinyllmConfig(hidden_size=64, num_attention_heads=4, num_experts=4, num_experts_per_tok=2)
    with pytest.raises(ValueError, match="Mixture-of-Experts"):
        vllm_plugin.check_vllm_compatible(config)
