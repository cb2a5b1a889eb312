"""Any Hugging Face chat model, through its tokenizer's own chat template; ``offline`` is the small demo
model that runs when no model hub is reachable."""
