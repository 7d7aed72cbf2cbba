"""tinyllm_hf.tokenizer"""
