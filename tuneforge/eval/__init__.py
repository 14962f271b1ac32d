"""Loading a finished run's model, and generation."""
from tuneforge.eval.generate import generate, load_run, load_run_model

__all__ = ["generate", "load_run", "load_run_model"]
