"""tuneforge: fine-tune Hugging Face causal language models from one YAML recipe."""

__version__ = "0.1.0"
