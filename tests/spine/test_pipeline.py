"""The stage loop: resolved recipe first, manifests, skip when unchanged, re-run on change, failures never
marked done, --only/--from, upstream checks. The two stages here are small real modules written for the test
(the loop is what is under test; the real stages have their own tests)."""

import json
import sys
import types

import pytest

from toolkit import pipeline
from toolkit.config import recipe_from_dict
from toolkit.errors import OptkitError
from toolkit.io import read_jsonl
from toolkit.tracking import NullTracker

CALLS = []


def _first_stage(ctx):
    """Writes one output per prompt, resumably: work/ keeps finished items; can be told to die half-way."""
    CALLS.append(ctx.name)
    data = ctx.add_input(ctx.recipe.resolve_path(ctx.recipe.data.path))
    rows = read_jsonl(data)
    done_file = ctx.work_dir / "done.txt"
    done = set(done_file.read_text().split()) if done_file.exists() else set()
    for i, row in enumerate(rows):
        if row["prompt"] in done:
            continue
        if FAIL_AT.get("n") is not None and i == FAIL_AT["n"]:
            raise RuntimeError("boom half-way")
        with open(done_file, "a") as f:
            f.write(row["prompt"] + "\n")
        done.add(row["prompt"])
    (ctx.dir / "out.txt").write_text("\n".join(sorted(done)) + f"\n{ctx.config.generation.max_new_tokens}\n")
    return {"n": len(done)}


def _second_stage(ctx):
    CALLS.append(ctx.name)
    text = (ctx.upstream("collect") / "out.txt").read_text()
    (ctx.dir / "upper.txt").write_text(text.upper())
    ctx.log_metrics({"loss": 1.0}, step=1)  # a curve point: MLflow only, not a headline metric
    return {"chars": len(text)}


FAIL_AT = {}


@pytest.fixture
def stages(monkeypatch):
    mod1 = types.ModuleType("optkit_test_stage1")
    mod1.run, mod1.READS = _first_stage, ("data",)
    mod2 = types.ModuleType("optkit_test_stage2")
    mod2.run, mod2.READS = _second_stage, ("collect",)
    monkeypatch.setitem(sys.modules, mod1.__name__, mod1)
    monkeypatch.setitem(sys.modules, mod2.__name__, mod2)
    monkeypatch.setitem(pipeline.STAGES, "collect", mod1.__name__)
    monkeypatch.setitem(pipeline.STAGES, "distill", mod2.__name__)
    CALLS.clear()
    FAIL_AT.clear()


def make_recipe(workdir, **collect):
    data = workdir / "d.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(5)))
    r = recipe_from_dict({"name": "run1", "teacher": {"model": "x/y"}, "data": {"path": str(data)},
                          "collect": collect, "distill": {"student": {"model": "x/z"}}})
    return r


def test_runs_then_skips_when_unchanged(workdir, stages):
    r = make_recipe(workdir)
    out = pipeline.run_pipeline(r, tracker=NullTracker())
    assert [o.status for o in out] == ["ran", "ran"] and CALLS == ["collect", "distill"]
    run_dir = workdir / "artifacts" / "run1"
    assert (run_dir / "recipe.yaml").is_file()
    m = json.loads((run_dir / "collect" / "manifest.json").read_text())
    assert m["status"] == "done" and m["metrics"] == {"n": 5}
    assert set(m["outputs"]) == {"out.txt"}  # work/ is resumable state, not an output
    assert list(m["inputs"].values())[0] == pipeline.sha256_file(workdir / "d.jsonl")
    m2 = json.loads((run_dir / "distill" / "manifest.json").read_text())
    assert m2["upstream"] == {"collect": m["fingerprint"]} and "loss" not in m2["metrics"]

    CALLS.clear()
    out = pipeline.run_pipeline(r, tracker=NullTracker())
    assert [o.status for o in out] == ["skipped", "skipped"] and CALLS == []
    assert out[0].metrics == {"n": 5}


def test_config_change_reruns_stage_and_downstream(workdir, stages):
    pipeline.run_pipeline(make_recipe(workdir), tracker=NullTracker())
    CALLS.clear()
    out = pipeline.run_pipeline(make_recipe(workdir, generation={"max_new_tokens": 9}), tracker=NullTracker())
    assert [o.status for o in out] == ["ran", "ran"]
    assert out[0].reason == "" and CALLS == ["collect", "distill"]


def test_input_file_change_reruns(workdir, stages):
    r = make_recipe(workdir)
    pipeline.run_pipeline(r, tracker=NullTracker())
    (workdir / "d.jsonl").write_text(json.dumps({"prompt": "new"}) + "\n")
    CALLS.clear()
    out = pipeline.run_pipeline(r, tracker=NullTracker())
    assert out[0].status == "ran" and CALLS == ["collect", "distill"]


def test_deleted_output_reruns(workdir, stages):
    r = make_recipe(workdir)
    pipeline.run_pipeline(r, tracker=NullTracker())
    (workdir / "artifacts" / "run1" / "distill" / "upper.txt").unlink()
    CALLS.clear()
    out = pipeline.run_pipeline(r, tracker=NullTracker())
    assert [o.status for o in out] == ["skipped", "ran"]


def test_failure_is_never_done_and_resume_keeps_work(workdir, stages):
    r = make_recipe(workdir)
    FAIL_AT["n"] = 3
    with pytest.raises(RuntimeError, match="boom"):
        pipeline.run_pipeline(r, tracker=NullTracker())
    m = json.loads((workdir / "artifacts/run1/collect/manifest.json").read_text())
    assert m["status"] == "failed" and "boom" in m["error"]
    assert not (workdir / "artifacts/run1/distill").exists()
    done = (workdir / "artifacts/run1/collect/work/done.txt").read_text().split()
    assert done == ["p0", "p1", "p2"]
    FAIL_AT.clear()
    out = pipeline.run_pipeline(r, tracker=NullTracker())
    assert [o.status for o in out] == ["ran", "ran"]
    # resumed: items done before the crash were not done again (no duplicates in the work log)
    done = (workdir / "artifacts/run1/collect/work/done.txt").read_text().split()
    assert done == ["p0", "p1", "p2", "p3", "p4"]


def test_only_and_from(workdir, stages):
    r = make_recipe(workdir)
    with pytest.raises(OptkitError, match="needs the outputs of stage 'collect'"):
        pipeline.run_pipeline(r, only="distill", tracker=NullTracker())
    assert CALLS == [] and not (workdir / "artifacts/run1/distill/manifest.json").exists()
    pipeline.run_pipeline(r, only="collect", tracker=NullTracker())
    assert CALLS == ["collect"]
    CALLS.clear()
    out = pipeline.run_pipeline(r, from_stage="distill", tracker=NullTracker())
    assert [o.status for o in out] == ["skipped", "ran"] and CALLS == ["distill"]
    with pytest.raises(OptkitError, match="--only route: not a stage of this recipe"):
        pipeline.run_pipeline(r, only="route", tracker=NullTracker())


def test_torn_manifest_counts_as_not_done(workdir, stages):
    r = make_recipe(workdir)
    pipeline.run_pipeline(r, tracker=NullTracker())
    (workdir / "artifacts/run1/collect/manifest.json").write_text('{"status": "do')
    CALLS.clear()
    out = pipeline.run_pipeline(r, tracker=NullTracker())
    assert out[0].status == "ran"


def test_concurrent_run_on_same_dir_is_refused(workdir, stages):
    """Another process holds the run lock (filelock, as optkit takes it): this run is refused, not queued."""
    import subprocess

    r = make_recipe(workdir)
    run_dir = workdir / "artifacts" / "run1"
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, filelock; lock = filelock.FileLock(sys.argv[1]); "
                               "lock.acquire(); print('held', flush=True); sys.stdin.read()", str(run_dir / ".lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OptkitError, match="another optkit run"):
            pipeline.run_pipeline(r, tracker=NullTracker())
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert [o.status for o in pipeline.run_pipeline(r, tracker=NullTracker())] == ["ran", "ran"]  # lock released


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    from toolkit.io import atomic_dir

    with pytest.raises(ValueError):
        with atomic_dir(tmp_path / "m") as d:
            (d / "half.bin").write_bytes(b"x")
            raise ValueError
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(tmp_path / "m") as d:
        (d / "full.bin").write_bytes(b"x")
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["full.bin"]


def test_reading_an_undeclared_upstream_is_a_bug_not_a_silent_dependency(workdir, stages, monkeypatch):
    r = make_recipe(workdir)
    pipeline.run_pipeline(r, only="collect", tracker=NullTracker())
    monkeypatch.setattr(sys.modules["optkit_test_stage2"], "READS", ())
    with pytest.raises(TypeError, match="reads the outputs of 'collect' without declaring it in READS"):
        pipeline.run_pipeline(r, only="distill", tracker=NullTracker())
