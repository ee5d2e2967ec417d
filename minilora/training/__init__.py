"""A run: its config, datasets, the loop, checkpoints, the run folder and log, distributed,
precision, compile and memory."""
