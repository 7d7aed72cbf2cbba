"""The one runtime: load a model (transformers, llama.cpp, ONNX Runtime, OpenVINO, quanto), decode, sample, serve."""
