"""Child processes die with optkit (kill -9 included), and a re-run reaps what an interrupted run left.

Real processes throughout: a python "optkit" process starts children through toolkit.procs exactly as the
stage does, the test kills it and watches the children with /proc. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from toolkit import procs

REPO = Path(__file__).resolve().parents[2]
GONE_WITHIN_S = 5.0  # PR_SET_PDEATHSIG acts at once; an orphan that keeps running lives ~60 s here

# A child that writes a temporary, may start a process of its own (same group), then runs for 60 s.
CHILD = textwrap.dedent("""
    import subprocess, sys, time
    tmp, pidfile, spawn = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    pids = []
    if spawn:
        pids.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]).pid)
    open(pidfile, "w").write(" ".join(map(str, pids)))
    open(tmp, "w").write("half written")
    time.sleep(60)
""")

# The "optkit" process: runs the child through toolkit.procs, as the quantize stage runs the converter.
# SIGINT as a terminal's Ctrl-C finds it, whatever the test run inherited: a run started in the background by a
# script (`pytest &`, no job control) ignores SIGINT, every process it starts inherits that through exec, and Python
# then installs no KeyboardInterrupt handler (one xdist worker failed so; in one process an earlier test had reset it).
PARENT = textwrap.dedent("""
    import signal, sys
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from pathlib import Path
    from toolkit import procs
    record, tmp, pidfile, spawn, child = sys.argv[1:6]
    procs.run([sys.executable, "-c", child, tmp, pidfile, spawn], record=Path(record), temporaries=[Path(tmp)])
""")


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def recorded_pid(record: Path):
    try:
        return json.loads(record.read_text()).get("pid")
    except (OSError, ValueError):
        return None


def start_parent(tmp_path: Path, spawn: bool = False):
    """(parent process, record, temporary, pid of the child, pids the child started)."""
    record, tmp, pidfile = tmp_path / "children" / "sleeper.json", tmp_path / "out.tmp", tmp_path / "pids"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(record), str(tmp), str(pidfile),
                               "1" if spawn else "0", CHILD], env=env)
    child = wait_for(lambda: recorded_pid(record), 30, "the child's record")
    wait_for(lambda: tmp.is_file() and pidfile.is_file(), 30, "the child to start writing")
    spawned = [int(p) for p in pidfile.read_text().split()]
    return parent, record, tmp, child, spawned


def cleanup(*pgids: int) -> None:
    for pgid in pgids:  # only groups this test started, and only while they still run
        if procs.group_members(pgid):
            procs.kill_group(pgid, grace_s=1)


def test_kill_9_of_optkit_kills_the_child_and_a_rerun_cleans_its_temporary(tmp_path):
    parent, record, tmp, child, _ = start_parent(tmp_path)
    try:
        assert procs.alive(child)
        assert os.getpgid(child) == child != os.getpgid(parent.pid)  # its own process group
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        wait_for(lambda: not procs.alive(child), GONE_WITHIN_S, "the child to die with its parent")
        # What the killed run left: its record and the half-written temporary. The re-run's first step:
        assert record.is_file() and tmp.is_file()
        [rec] = procs.reap_stale(record.parent)
        assert rec["pid"] == child and rec["temporaries"] == [str(tmp)]
        assert not tmp.exists() and not record.exists()
    finally:
        cleanup(child)


def test_rerun_kills_what_the_dead_child_left_running(tmp_path):
    """PR_SET_PDEATHSIG reaches the direct child only; a process it started lives on in the recorded group
    until the re-run reaps it."""
    parent, record, tmp, child, [grandchild] = start_parent(tmp_path, spawn=True)
    try:
        assert os.getpgid(grandchild) == child
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        wait_for(lambda: not procs.alive(child), GONE_WITHIN_S, "the child to die with its parent")
        time.sleep(0.5)
        assert procs.alive(grandchild)  # still running, still in the group
        started = time.monotonic()
        procs.reap_stale(record.parent)
        assert time.monotonic() - started < GONE_WITHIN_S
        assert not procs.alive(grandchild) and not tmp.exists() and not record.exists()
    finally:
        cleanup(child)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_kills_the_group_and_deletes_the_temporary(tmp_path, sig):
    parent, record, tmp, child, [grandchild] = start_parent(tmp_path, spawn=True)
    try:
        parent.send_signal(sig)
        rc = parent.wait(timeout=20)
        assert rc == (143 if sig == signal.SIGTERM else -signal.SIGINT)  # SystemExit(128 + 15) / Ctrl-C
        assert not procs.alive(child) and not procs.alive(grandchild)
        assert not tmp.exists() and not record.exists()
    finally:
        cleanup(child)


def test_record_of_a_reused_pid_is_not_killed(tmp_path):
    """A record whose group id now belongs to a process that started earlier than the recorded one (a reused
    id) is cleaned up without signalling anybody."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        record = tmp_path / "children" / "old.json"
        record.parent.mkdir()
        started = procs.group_members(bystander.pid)[0][1]
        record.write_text(json.dumps({"pid": bystander.pid, "pgid": bystander.pid, "started": started + 1,
                                      "temporaries": []}))
        procs.reap_stale(record.parent)
        assert procs.alive(bystander.pid) and not record.exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_kill_9_during_the_real_gguf_conversion(pruned_dir, workdir):
    """The stage's converter step (llama.cpp's convert_hf_to_gguf.py on a real model) in an "optkit" process
    that is killed -9: the converter goes down with it, and the stage's first step on the re-run deletes the
    converter's temporaries (the re-run's conversion itself: test_stage)."""
    from toolkit.quantize import CHILDREN, clean_stale, gguf

    from .conftest import fake_run, recipe, stage_ctx

    run = fake_run(workdir, pruned_dir)
    ctx = stage_ctx(run, recipe({"gguf": {}}))
    work, children = ctx.work_dir / "verified" / "k" / "gguf", ctx.work_dir / CHILDREN
    work.mkdir(parents=True)
    out = work / ".model-F16.gguf.tmp"
    conv = gguf.converter_dir()  # fetched here, not in the process that is killed
    code = ("import sys; from pathlib import Path; from toolkit.quantize import gguf; "
            "gguf.convert(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))")
    parent = subprocess.Popen([sys.executable, "-c", code, str(run / "distill/model"), str(out), str(conv),
                               str(children)], env={**os.environ, "PYTHONPATH": str(REPO)})
    record = children / "convert_hf_to_gguf.json"
    converter = wait_for(lambda: recorded_pid(record), 60, "the converter to start")
    try:
        assert procs.alive(converter) and os.getpgid(converter) == converter
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        wait_for(lambda: not procs.alive(converter), GONE_WITHIN_S, "the converter to die with optkit")
        view = work / "converter-view"  # the tokenizer fix-up the converter reads (see gguf.converter_view)
        assert view.is_dir() and record.is_file()  # left behind by the kill
        clean_stale(ctx)
        assert not view.exists() and not out.exists() and not record.exists()
    finally:
        cleanup(converter)
