"""Models: the kind, loading and precision, the training loss, classifier and seq2seq heads, GGUF sources, layers.

Import from the submodules; this package imports nothing, so reading a model's kind (models.kind, the pre-flight) does
not load torch."""
