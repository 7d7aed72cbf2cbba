"""tinyllm_hf.integrations"""
