"""The run: configuration, data, the training loop, metrics and the entry points."""
