"""tuneforge: fine-tune Hugging Face language models (causal or encoder-decoder) and classifiers from one YAML
recipe."""

__version__ = "0.1.0"

from tuneforge.api import evaluate, finetune, generate, load_config  # noqa: E402  (cheap: torch loads on first call)

__all__ = ["__version__", "evaluate", "finetune", "generate", "load_config"]
