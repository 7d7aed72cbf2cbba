"""Exports and quantized variants: GGUF (dense and MoE), ONNX/OpenVINO/quanto, the drift table, the vLLM plugin."""
