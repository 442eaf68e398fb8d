"""rwkv_hf: RWKV-4/5/6/7 for Hugging Face transformers."""
