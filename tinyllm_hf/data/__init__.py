"""tinyllm_hf.data"""
