"""vLLM plugin: `vllm serve DIR` on a Tinyllm checkpoint, without patching vLLM.

pyproject declares the entry point `vllm.general_plugins: tinyllm = "tinyllm_hf.export.vllm_plugin:register"`.
vLLM calls `register()` in every process it starts, before loading any model, so it must be cheap and idempotent:
it registers our config with transformers' AutoConfig (no `--trust-remote-code` needed) and names the model class
by a lazy "module:Class" string, which vLLM imports only when a checkpoint asks for `TinyllmForCausalLM`.

A dense Tinyllm is a Llama (same parameter names and math), so the model class is vLLM's own Llama implementation
with the config adjusted for the one flag the two read differently (see `tinyllm_hf.export.vllm_model`).
Checkpoints exported with `tinyllm export llama` need no plugin at all.
"""

ARCHITECTURE = "TinyllmForCausalLM"
MODEL_CLASS = "tinyllm_hf.export.vllm_model:TinyllmForCausalLM"


def check_vllm_compatible(config) -> None:
    """Refuse configs vLLM's Llama cannot run, before any weights load (a silent mismatch would serve garbage)."""
    if getattr(config, "num_experts", 0):
        raise ValueError("a Mixture-of-Experts Tinyllm cannot be served with vLLM's Llama; export it first "
                         "(`tinyllm export --help` lists the formats)")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config.hidden_act!r}: vLLM's Llama MLP supports silu only")


def vllm_bias_flags(config) -> None:
    """Make vLLM's Llama build the same biases as Tinyllm.

    Tinyllm: q/k/v carry a bias if `attention_bias or qkv_bias`, o_proj if `attention_bias`. vLLM's Llama (InternLM3
    convention): q/k/v use `qkv_bias` when the config has that field, else `attention_bias`; o_proj uses
    `attention_bias`. Setting `qkv_bias` to Tinyllm's effective value makes both agree.
    """
    config.qkv_bias = bool(getattr(config, "attention_bias", False) or getattr(config, "qkv_bias", False))


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from tinyllm_hf.modeling.configuration_tinyllm import TinyllmConfig

    AutoConfig.register("tinyllm", TinyllmConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
