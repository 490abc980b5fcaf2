"""Resume state of a distill training run: which checkpoints count, the run-wide loss total carried in them,
and a full disk turned into one line that keeps what was saved.

A checkpoint counts only once its trainer_state.json (written last by the Trainer) exists. A rerun with the same
spec resumes from the newest complete one; a changed spec discards them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Iterator, Optional

from toolkit.errors import OptkitError

log = logging.getLogger("optkit.distill")

# Free bytes under which a failed write is taken for a full disk when the writer hides the errno (torch.save
# reports ENOSPC as "[enforce fail at inline_container.cc] unexpected pos ..."; measured on a full tmpfs).
NEARLY_FULL = 1 << 20
_ENOSPC_TEXT = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """checkpoint-N dirs whose trainer state was written (the Trainer writes it last), oldest first."""
    found = []
    for p in Path(ckpt_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir() and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def drop_incomplete(ckpt_dir: Path) -> None:
    """Remove checkpoint dirs a kill or a full disk left half-written (they cannot be resumed from)."""
    complete = set(complete_checkpoints(ckpt_dir))
    for p in Path(ckpt_dir).glob("checkpoint-*"):
        if p not in complete:
            log.warning("distill: removing incomplete checkpoint %s (interrupted while saving)", p.name)
            shutil.rmtree(p, ignore_errors=True)


def prepare_checkpoint_dir(ckpt_dir: Path, spec_hash: str) -> Optional[Path]:
    """The checkpoint to resume from (None = start fresh). Drops checkpoints of a different spec and
    half-written ones."""
    ckpt_dir = Path(ckpt_dir)
    marker = ckpt_dir / "spec_hash"
    if ckpt_dir.exists() and (not marker.is_file() or marker.read_text().strip() != spec_hash):
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(spec_hash)
    drop_incomplete(ckpt_dir)
    last = complete_checkpoints(ckpt_dir)
    return last[-1] if last else None


# ----------------------------------------------------------------------------------------- full disk


def is_disk_full(exc: BaseException, path: Path) -> bool:
    """ENOSPC / EDQUOT anywhere in the exception chain, or a writer error while the filesystem is (nearly) full."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(seen).lower() for t in _ENOSPC_TEXT):
            return True
        seen = seen.__cause__ or seen.__context__
    if not isinstance(exc, (OSError, RuntimeError)):
        return False
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free < NEARLY_FULL
    except OSError:
        return False


@contextlib.contextmanager
def disk_full_is_user_error(path: Path, ckpt_dir: Optional[Path] = None) -> Iterator[None]:
    """A full disk while saving becomes `disk full: <path>` (an OptkitError: one line, exit 2). The half-written
    checkpoint is removed so its space comes back; complete ones stay, so a re-run resumes from them."""
    try:
        yield
    except OptkitError:
        raise
    except Exception as exc:
        if not is_disk_full(exc, path):
            raise
        kept = []
        if ckpt_dir is not None and Path(ckpt_dir).is_dir():
            drop_incomplete(ckpt_dir)
            kept = [p.name for p in complete_checkpoints(ckpt_dir)]
        how = f"a re-run resumes from {kept[-1]}" if kept else "nothing was checkpointed yet"
        raise OptkitError(f"disk full: {path} (free some space and run again; {how})") from exc


# ----------------------------------------------------------------------------------------- loss total


def make_loss_total():
    """The run-wide training-loss total as a Trainer callback whose state rides in every checkpoint's
    trainer_state.json (transformers' ExportableState), so a resumed run reports the mean over ALL steps.
    (The Trainer's own train_loss restarts its sum at the resume point but divides by the full step count.)
    Built lazily: importing transformers at module import is not allowed."""
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    class LossTotal(TrainerCallback, ExportableState):
        def __init__(self):
            self.total = 0.0  # sum of per-optimizer-step losses, folded at each checkpoint
            self.pending = None  # on-device sum since the last fold: no host sync per step

        def add(self, loss) -> None:
            loss = loss.detach()
            self.pending = loss if self.pending is None else self.pending + loss

        def on_step_end(self, args, state, control, **kwargs):
            # DefaultFlowCallback ran first and decided: fold exactly before a checkpoint is written.
            if control.should_save or control.should_training_stop:
                self.fold(args.device)

        def fold(self, device) -> None:
            value = self.pending if self.pending is not None else torch.zeros((), device=device)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                value = value.clone()  # every rank folds at the same steps: the mean over ranks is one number
                torch.distributed.all_reduce(value)
                value = value / torch.distributed.get_world_size()
            self.total += float(value)
            self.pending = None

        def state(self) -> dict:
            return {"args": {}, "attributes": {"total": self.total}}

        def restore(self, checkpoint: Path) -> None:
            """Read the total back from the checkpoint we resume from (done here rather than through
            restore_callback_states_from_checkpoint, which would also replay the Trainer's control flags)."""
            saved = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
            entry = saved.get("stateful_callbacks", {}).get("LossTotal")
            if entry is None:  # a checkpoint from before the total was kept: its loss sum is unknown
                raise OptkitError(f"distill: {checkpoint} has no loss total (written by an older optkit); "
                                  "delete it to retrain from the start")
            self.total = float(entry["attributes"]["total"])

    return LossTotal


# ----------------------------------------------------------------------------------------- finished at resume


class TrainingAlreadyDone(Exception):
    """The checkpoint resumed from is at the last step: nothing to train (StopWhenDone)."""


def make_stop_when_done():
    """transformers, resumed from a checkpoint AT the last step, still runs one more optimizer step (it checks
    the step limit only after a step), so an interruption between the last checkpoint and the final save (kill,
    full disk) would change the weights on re-run. Stop before that step: the checkpoint's weights, optimizer and
    state are loaded by then (all before on_train_begin)."""
    from transformers import TrainerCallback

    class StopWhenDone(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if 0 < state.max_steps <= state.global_step:
                raise TrainingAlreadyDone()

    return StopWhenDone()
