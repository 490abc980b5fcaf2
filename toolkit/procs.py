"""Child processes that die with optkit and never outlive a run.

`run()` starts a command in its own process group (its own session), asks the Linux kernel to SIGKILL it
when optkit dies (prctl PR_SET_PDEATHSIG, so even `kill -9 optkit` takes it down), and kills the whole group
when the caller is interrupted (an exception, Ctrl-C, or SIGTERM, which is turned into SystemExit for the
duration). While it runs, a JSON record (pid, process group, start time, the temporaries it writes) sits in a
directory the stage chooses; `reap_stale()` at the next start kills whatever still runs in a recorded group and
deletes the recorded temporaries, so a re-run never races a leftover process writing into the same files.

Limits: PR_SET_PDEATHSIG is Linux-only and reaches the direct child only (a child that forks its own workers
must kill them itself, or they are left to `reap_stale`, which kills the recorded group); elsewhere only the
group kill on exit and `reap_stale` apply.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

log = logging.getLogger("optkit.procs")

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def run(cmd: Sequence[str], *, record: Optional[Path] = None, temporaries: Sequence[Path] = (),
        env: Optional[dict] = None, grace_s: float = 5.0) -> subprocess.CompletedProcess:
    """Run cmd to completion (stdout/stderr captured as text). `record`: where to note the child while it runs;
    `temporaries`: paths it writes that are garbage if it is killed (deleted then, and by `reap_stale`)."""
    temporaries = [Path(t) for t in temporaries]
    if record is not None:  # noted before the start: a kill in between still leaves the temporaries known
        _write_record(record, {"pid": None, "temporaries": [str(t) for t in temporaries]})
    try:
        proc = subprocess.Popen(list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, preexec_fn=_die_with(os.getpid()))
        if record is not None:
            _write_record(record, {"pid": proc.pid, "pgid": proc.pid, "started": _start_time(proc.pid),
                                   "cmd": [str(c) for c in cmd], "temporaries": [str(t) for t in temporaries]})
        try:
            with _sigterm_raises():
                out, err = proc.communicate()
        except BaseException:
            kill_group(proc.pid, grace_s, child=proc)
            _remove(temporaries)
            raise
    finally:
        if record is not None:
            Path(record).unlink(missing_ok=True)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def reap_stale(record_dir: Path, grace_s: float = 5.0) -> list[dict]:
    """Kill every child a previous run recorded in record_dir and is still running, delete its temporaries and
    its record. Call it only while holding the run (the pipeline's run lock): a record is then never live."""
    reaped = []
    for path in sorted(Path(record_dir).glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):  # torn by a kill mid-write: nothing recoverable in it
            rec = {}
        pgid = rec.get("pgid")
        if isinstance(pgid, int) and _group_is_ours(pgid, rec.get("started")):
            # The leader itself died with its parent (PR_SET_PDEATHSIG); what it started may still be running.
            log.warning("killing processes left running by an interrupted run: %s",
                        " ".join(rec.get("cmd") or [])[:200])
            kill_group(pgid, grace_s)
        _remove([Path(t) for t in rec.get("temporaries") or []])
        path.unlink(missing_ok=True)
        reaped.append(rec)
    return reaped


def kill_group(pgid: int, grace_s: float = 5.0, child: Optional[subprocess.Popen] = None) -> None:
    """SIGTERM the group, SIGKILL it after grace_s, and wait (bounded) until it is gone."""
    _signal_group(pgid, signal.SIGTERM)
    if not _wait_gone(pgid, grace_s, child):
        _signal_group(pgid, signal.SIGKILL)
        _wait_gone(pgid, grace_s, child)
    if group_members(pgid):  # members the leader left behind (checked: a pgid is reusable once its group is empty)
        _signal_group(pgid, signal.SIGKILL)


def group_members(pgid: int) -> Optional[list[tuple[int, int]]]:
    """(pid, start time) of each running process in the group; None where there is no /proc."""
    if not Path("/proc/self/stat").is_file():
        return None
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after the command name: state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] not in "ZX":
            members.append((int(entry.name), int(fields[19])))
    return members


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet waited for, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] not in "ZX"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _die_with(parent: int):
    """preexec_fn: in the child, between fork and exec. prctl is looked up here, in the parent, because
    loading a library after fork in a threaded process can deadlock."""
    prctl = None
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took hold: follow it now
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM's default action ends Python without unwinding, so the group kill would not run: while a child
    runs, SIGTERM raises SystemExit(143) instead (main thread only; a handler someone set is left alone)."""
    in_main = threading.current_thread() is threading.main_thread()
    if not in_main or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _wait_gone(pgid: int, timeout_s: float, child: Optional[subprocess.Popen]) -> bool:
    if child is not None:  # our own child leads the group: wait() also reaps it
        try:
            child.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout_s
    while _group_running(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _group_running(pgid: int) -> bool:
    members = group_members(pgid)
    return alive(pgid) if members is None else bool(members)


def _start_time(pid: int) -> Optional[int]:
    """The process's start time (clock ticks since boot): with the pid it names one process, even if the pid
    is reused later. None where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _group_is_ours(pgid: int, started: Optional[int]) -> bool:
    """Whether the recorded group still runs and is the one we started: with the leader's start time, every
    member started at or after it (a pid reused since then could not be). Without /proc, the leader must still
    lead its own group."""
    members = group_members(pgid)
    if members is None:
        try:
            return alive(pgid) and os.getpgid(pgid) == pgid
        except OSError:
            return False
    return bool(members) and (started is None or all(t >= started for _pid, t in members))


def _write_record(path: Path, rec: dict) -> None:
    from toolkit.io import atomic_write_json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(path), rec)


def _remove(paths: Sequence[Path]) -> None:
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
