"""tinyllm_hf.trainers"""
