"""The layout of a training run's folder (out_dir), written down once.

Every module that reads or writes a run folder (the loop, checkpoints, the run log, describing a
run, the train command) names its parts through `RunLayout`; nothing else spells them. Importing
this module imports no torch (the command line reads a run folder before it loads a model).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    """A run folder's parts.

    Attributes:
        root: the run folder (out_dir).
    """

    root: Path

    ADAPTER = "adapter"  # the last adapter (LoRA runs)
    MODEL = "model"  # the last model folder (full fine-tuning)
    BEST = "best"  # the adapter (or model) of the lowest eval loss
    CHECKPOINTS = "checkpoints"  # step-NNNNNNNN checkpoint folders
    METRICS = "metrics.jsonl"  # one JSON line per logged step and per eval
    PLOT = "loss.png"  # the loss curve drawn from METRICS
    CONFIG = "config.json"  # the run's TrainConfig
    TENSORBOARD = "tensorboard"  # TensorBoard's event files (--log-to tensorboard)
    # What a run writes; anything else in the folder is the user's and is never touched.
    OUTPUTS = (ADAPTER, MODEL, BEST, CHECKPOINTS, METRICS, PLOT, CONFIG, TENSORBOARD)
    # The outputs that mean an earlier run was here (a config.json alone is a run's settings).
    EARLIER = (ADAPTER, MODEL, BEST, CHECKPOINTS, METRICS)

    def __init__(self, root: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def adapter(self) -> Path:
        return self.root / self.ADAPTER

    @property
    def model(self) -> Path:
        return self.root / self.MODEL

    @property
    def best(self) -> Path:
        return self.root / self.BEST

    @property
    def checkpoints(self) -> Path:
        return self.root / self.CHECKPOINTS

    @property
    def metrics(self) -> Path:
        return self.root / self.METRICS

    @property
    def plot(self) -> Path:
        return self.root / self.PLOT

    @property
    def config(self) -> Path:
        return self.root / self.CONFIG

    def weights(self, full: bool) -> Path:
        """Where the run's last weights go: the model folder (full fine-tuning) or the adapter."""
        return self.model if full else self.adapter
