"""Meta native Llama 4 checkpoints <-> Hugging Face format."""
