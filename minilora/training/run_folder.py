"""A run's output folder: claimed for one run at a time, never holding the user's files, and an
earlier run in it replaced only when asked.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed as dist

from minilora.core.errors import CheckpointError, OutputError
from minilora.core.outputs import FolderLock, check_not_an_input, check_own_folder
from minilora.training.checkpoint import latest_checkpoint, unfinished
from minilora.training.config import TrainConfig
from minilora.training.run_layout import RunLayout

# What train writes into out_dir; anything else there is the user's and is never touched.
RUN_OUTPUTS = RunLayout.OUTPUTS


def claim_out(config: TrainConfig, rank: int) -> FolderLock | None:
    """Rank 0 checks out_dir and locks it for this run; returns the lock (None off rank 0).

    Raises:
        OutputError: out_dir is or holds an input, holds files that are not a run's, or another
            process trains into it.
        OSError: out_dir cannot be created.
    """
    if rank != 0:
        return None
    out = Path(config.out_dir)
    # Only data that is a file: a folder given as data is refused as data, by load_jsonl.
    inputs = {k: p for k, p in (("data", config.data), ("eval_data", config.eval_data))
              if p is not None and Path(p).is_file()}
    check_not_an_input(out, inputs, "out_dir (--out)")
    check_own_folder(out, RUN_OUTPUTS, "train", "out_dir (--out)")
    try:
        return FolderLock(out, "train").acquire()
    except OSError as err:
        raise OSError(err.errno, f"cannot write the output folder {out}: "
                      f"{err.strerror or err}; choose another out_dir (--out)") from None


def replace_earlier_run(out: Path, overwrite: bool, rank: int) -> None:
    """A fresh run into a folder that holds an earlier run: refused unless ``overwrite``.

    An unfinished run is named as such (--resume continues it). With ``overwrite`` the earlier
    outputs are removed before this run writes anything, so nothing of that run is left beside
    this run's config.json; save_checkpoint would otherwise take a stale step folder for ours.
    """
    latest = latest_checkpoint(RunLayout(out).checkpoints)
    if latest is not None and not overwrite and unfinished(latest):
        raise CheckpointError(
            f"{latest} holds an unfinished run: pass {{resume}} to continue it, or train into "
            "another {out_dir}", fields={"resume": "resume=True", "out_dir": "out_dir"})
    earlier = [n for n in RunLayout.EARLIER if (out / n).exists()]
    if earlier and not overwrite:
        raise OutputError(f"{out} holds an earlier run ({', '.join(earlier)}): pass {{overwrite}} "
                          "to replace it, or train into another {out_dir}",
                          fields={"overwrite": "overwrite=True", "out_dir": "out_dir"})
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank has looked before rank 0 removes or writes anything
    if rank == 0:  # every output of the earlier run, its plot too (a new run may draw none)
        for name in [n for n in RUN_OUTPUTS if (out / n).exists()] if earlier else []:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()


