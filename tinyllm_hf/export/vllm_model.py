"""Tinyllm inside vLLM: vLLM's Llama implementation, after checking and aligning the config.

Imported by vLLM only (through the lazy registration in `vllm_plugin`), so importing vLLM at the top is fine here.
"""

from vllm.model_executor.models.llama import LlamaForCausalLM

from tinyllm_hf.export.vllm_plugin import check_vllm_compatible, vllm_bias_flags


class TinyllmForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        config = vllm_config.model_config.hf_config
        check_vllm_compatible(config)
        vllm_bias_flags(config)
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
