"""minilora: LoRA fine-tuning of small causal language models."""

__version__ = "0.1.0"
