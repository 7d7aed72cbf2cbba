"""tinyllm_hf.evaluation"""
