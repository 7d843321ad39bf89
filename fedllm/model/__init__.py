"""The model: base loading (GGUF, tiny), LoRA adapters and their factors, cards, the wire format."""
