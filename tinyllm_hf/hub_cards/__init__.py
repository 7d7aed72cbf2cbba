"""tinyllm_hf.hub_cards"""
