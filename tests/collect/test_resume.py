"""Resumability: `kill -9` an `optkit run` mid-collect, rerun, and no answered prompt is lost or sent twice;
the prompts that were in flight at the kill are sent again, and counted.

The fake server stops answering after N successful replies (the requests then in flight wait), so the kill
lands at a known point: N answers persisted, more requests in flight. The server counts successful replies
per prompt across both runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.collect.conftest import REPO, openai_collect, read_jsonl, write_recipe
from tests.collect.fake_openai_server import answer_for
from toolkit.collect.store import ResultStore

N_PROMPTS, KILL_AFTER = 30, 12


def start_optkit(workdir, recipe) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "toolkit.cli", "run", str(recipe)], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stored(store_path) -> int:
    return sum(1 for line in store_path.read_text().splitlines() if line.strip()) if store_path.exists() else 0


def wait_until(predicate, timeout=120.0, what=""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def settle(server, quiet_s=1.0) -> None:
    """Wait until every request the killed client had sent has reached the server's hold (none still sleeping
    out its delay) and nothing new arrived for quiet_s. Released earlier, such a request would be answered to
    the dead client and counted as a success, and the rerun's resend of it as a second one: a harness race (it
    showed under load, where arrivals stop coming in lockstep), not a repeat by the client."""
    last, since = None, time.monotonic()

    def quiet():
        nonlocal last, since
        now = (len(server.bodies), server.in_flight, server.held)
        if now != last:
            last, since = now, time.monotonic()
        return server.in_flight == server.held and time.monotonic() - since >= quiet_s

    wait_until(quiet, timeout=60.0, what="the killed client's requests to reach the server's hold")


def test_kill_9_mid_run_then_rerun_loses_and_repeats_nothing(workdir, fake_openai):
    server = fake_openai(delay_s=0.05, hold_after=KILL_AFTER)
    recipe = write_recipe(workdir, openai_collect(server, concurrency=4, timeout_s=30), data={"limit": N_PROMPTS})
    store_path = workdir / "artifacts" / "t" / "collect" / "work" / "results.jsonl"

    proc = start_optkit(workdir, recipe)
    try:
        wait_until(lambda: server.held >= 1 and stored(store_path) >= sum(server.successes.values()) >= KILL_AFTER,
                   what="the first answers to be stored while more requests are in flight")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    settle(server)
    done_before = sum(server.successes.values())
    held_at_kill = server.held  # requests the server had received and not answered: in flight when killed
    assert stored(store_path) == done_before < N_PROMPTS
    manifest = json.loads((store_path.parents[1] / "manifest.json").read_text())
    assert manifest["status"] == "running"  # never "done": the kill left it as it was mid-run
    assert not (store_path.parents[1] / "outputs.jsonl").exists()

    server.release()  # held requests now get 503 (their client is gone); new ones are answered
    rerun = start_optkit(workdir, recipe)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out

    records = read_jsonl(store_path.parents[1] / "outputs.jsonl")
    assert len(records) == N_PROMPTS and len({r["id"] for r in records}) == N_PROMPTS
    assert all(r["output"] == answer_for(r["messages"][-1]["content"]) for r in records)
    # The server answered every prompt exactly once over both runs.
    assert len(server.successes) == N_PROMPTS and set(server.successes.values()) == {1}
    summary = json.loads((store_path.parents[1] / "summary.json").read_text())
    assert summary["from_store"] == done_before and summary["answered_this_run"] == N_PROMPTS - done_before
    # The prompts in flight at the kill were sent again (the server may have billed them once already): at
    # least those it was holding, at most `concurrency`, counted in the summary and the manifest.
    assert 1 <= held_at_kill <= summary["resent_after_interrupt"] <= 4
    manifest = json.loads((store_path.parents[1] / "manifest.json").read_text())
    assert manifest["metrics"]["resent_after_interrupt"] == summary["resent_after_interrupt"]


def test_store_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "results.jsonl"
    with ResultStore(path) as store:
        store.put("a", {"output": "x"})
        store.put("b", {"output": "y"})
    with open(path, "a") as f:
        f.write('{"key": "c", "result": {"outp')  # what a kill during a write leaves behind
    with ResultStore(path) as store:
        assert set(store.keys()) == {"a", "b"} and store.get("b") == {"output": "y"}
        store.put("c", {"output": "z"})
    with ResultStore(path) as store:
        assert [store.get(k)["output"] for k in ("a", "b", "c")] == ["x", "y", "z"]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_result_key_changes_with_model_messages_and_params():
    from toolkit.collect.store import result_key

    ident, msgs, params = {"backend": "hf", "model": "m", "dtype": "float32"}, [{"role": "user", "content": "hi"}], \
        {"max_new_tokens": 8, "temperature": 0.0}
    base = result_key(ident, msgs, params)
    assert base == result_key(dict(reversed(list(ident.items()))), msgs, dict(params))  # order does not matter
    assert base != result_key({**ident, "dtype": "bfloat16"}, msgs, params)
    assert base != result_key(ident, [{"role": "user", "content": "hi!"}], params)
    assert base != result_key(ident, msgs, {**params, "max_new_tokens": 9})
