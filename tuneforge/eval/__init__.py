"""Evaluation: validation loss, generation, SQuAD, classification, lm-evaluation-harness.

Import from the modules themselves (`tuneforge.eval.generate`, `tuneforge.eval.evaluate`, ...): this package binds
no names, so none shadows a submodule. A finished run loads through `tuneforge.run.load`."""
