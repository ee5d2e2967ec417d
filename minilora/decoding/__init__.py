"""Text out of a model: sampling, generation (one adapter per row), chat answers."""
