"""Skip/resume integrity (issue 12 items 3, 7, 9): a finished stage is skipped only when its outputs' content still
matches its manifest, no stage starts on upstream files that changed, a crashed stage is cleaned up and never
marked done, a full disk and an unwritable artifacts_dir are one-line errors. Same two small real stage modules
as test_pipeline.py (the loop is under test)."""

import json
import logging
import os
import sys
import types

import pytest

from tests.spine.test_pipeline import CALLS, make_recipe, stages  # noqa: F401  (fixture)
from toolkit import pipeline
from toolkit.errors import OptkitError
from toolkit.tracking import NullTracker

RUN = ("artifacts", "run1")


def _run(r, **kw):
    return [o.status for o in pipeline.run_pipeline(r, tracker=NullTracker(), **kw)]


def _edit_same_size(path, keep_mtime=False):
    st = path.stat()
    text = path.read_text()
    edited = text.replace("p1", "q1")
    assert edited != text and len(edited) == len(text)
    path.write_text(edited)
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_same_size_edit_of_an_output_reruns_the_stage(workdir, stages):
    """Issue 12.3: an edited cache.json of the same size was skipped as unchanged (sizes only were compared)."""
    r = make_recipe(workdir)
    _run(r)
    out = workdir.joinpath(*RUN, "collect", "out.txt")
    _edit_same_size(out)
    CALLS.clear()
    outcomes = pipeline.run_pipeline(r, tracker=NullTracker())
    assert [o.status for o in outcomes] == ["ran", "skipped"] and CALLS == ["collect"]
    assert "q1" not in out.read_text()  # the stage rewrote its output
    # distill consumed exactly the content collect wrote again: its upstream fingerprint matches, nothing to redo
    assert outcomes[1].reason == "unchanged"


def test_downstream_reruns_when_the_rerun_upstream_writes_something_else(workdir, stages):
    r = make_recipe(workdir)
    _run(r)
    (workdir / "d.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(6)))
    _edit_same_size(workdir.joinpath(*RUN, "collect", "out.txt"))
    CALLS.clear()
    assert _run(r) == ["ran", "ran"] and CALLS == ["collect", "distill"]


def test_edit_that_restores_mtime_is_caught_by_verify(workdir, stages):
    r = make_recipe(workdir)
    _run(r)
    _edit_same_size(workdir.joinpath(*RUN, "collect", "out.txt"), keep_mtime=True)
    assert _run(r) == ["skipped", "skipped"]  # the documented limit of the size + mtime fast path
    CALLS.clear()
    assert _run(r, verify=True) == ["ran", "skipped"] and CALLS == ["collect"]


def test_touched_but_identical_output_is_still_skipped(workdir, stages):
    r = make_recipe(workdir)
    _run(r)
    os.utime(workdir.joinpath(*RUN, "collect", "out.txt"))  # new mtime, same bytes: hashed, found equal
    assert _run(r) == ["skipped", "skipped"]


def test_a_stage_never_consumes_an_edited_upstream(workdir, stages):
    r = make_recipe(workdir)
    _run(r)
    _edit_same_size(workdir.joinpath(*RUN, "collect", "out.txt"))
    CALLS.clear()
    with pytest.raises(OptkitError, match=r"outputs of stage 'collect', which changed since it finished "
                                          r"\(output changed: out.txt\); re-run it: optkit run RECIPE --from collect"):
        pipeline.run_pipeline(r, only="distill", force=True, tracker=NullTracker())
    assert CALLS == []
    m = json.loads(workdir.joinpath(*RUN, "distill", "manifest.json").read_text())
    assert m["status"] == "done"  # the earlier good result is left as it was, not overwritten


def test_stale_temporaries_and_a_running_manifest_are_recovered(workdir, stages, caplog):
    r = make_recipe(workdir)
    _run(r)
    d = workdir.joinpath(*RUN, "collect")
    (d / ".out.txt.tmp-999").write_text("half")
    (d / ".bundle.tmp-abc").mkdir()
    (d / ".bundle.tmp-abc" / "w.bin").write_bytes(b"x")
    (d / "work" / ".done.txt.tmp-998").write_text("half")
    m = json.loads((d / "manifest.json").read_text())
    m["status"] = "running"  # what kill -9 / ENOSPC mid-stage leaves
    (d / "manifest.json").write_text(json.dumps(m))
    CALLS.clear()
    with caplog.at_level(logging.WARNING, logger="optkit.pipeline"):
        assert _run(r, only="collect") == ["ran"]
    assert not [p for p in d.rglob(".*") if ".tmp-" in p.name]
    assert "removed 3 half-written temporary file(s)" in caplog.text
    assert "died while running; marked failed" in caplog.text
    assert json.loads((d / "manifest.json").read_text())["status"] == "done"


def test_running_manifest_is_marked_failed_even_when_the_stage_is_not_selected(workdir, stages):
    r = make_recipe(workdir)
    _run(r)
    d = workdir.joinpath(*RUN, "distill")
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**m, "status": "running"}))
    _run(r, only="collect")
    m = json.loads((d / "manifest.json").read_text())
    assert m["status"] == "failed" and "interrupted" in m["error"]


def _disk_full_stage(ctx):
    """Saves one unit of work, then hits a real ENOSPC (/dev/full) as a stage writing a big file would."""
    CALLS.append(ctx.name)
    (ctx.work_dir / "saved.txt").write_text("kept")
    with open("/dev/full", "w") as f:
        f.write("x" * 10_000)
        f.flush()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full for a real ENOSPC")
def test_disk_full_is_one_line_names_the_path_and_keeps_work(workdir, stages, monkeypatch):
    mod = types.ModuleType("optkit_test_diskfull")
    mod.run, mod.READS = _disk_full_stage, ("data",)
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(pipeline.STAGES, "collect", mod.__name__)
    r = make_recipe(workdir)
    with pytest.raises(OptkitError) as err:
        _run(r)
    msg = str(err.value)
    # a plain write() error carries no file name: the stage directory is named instead
    assert msg.startswith("disk full: stage 'collect' could not write under artifacts/run1/collect; free space")
    assert "\n" not in msg and "resumes" in msg
    d = workdir.joinpath(*RUN, "collect")
    assert (d / "work" / "saved.txt").read_text() == "kept"
    m = json.loads((d / "manifest.json").read_text())
    assert m["status"] == "failed" and "No space left" in m["error"] and m["outputs"] == {}


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_artifacts_dir_is_one_line(workdir, stages):
    ro = workdir / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    r = make_recipe(workdir)
    r.artifacts_dir = str(ro)
    try:
        with pytest.raises(OptkitError, match=r"^artifacts_dir: cannot write the run directory .*ro/run1 "
                                              r"\(Permission denied\)"):
            _run(r)
    finally:
        ro.chmod(0o700)


def test_artifacts_dir_that_is_a_file_is_one_line(workdir, stages):
    (workdir / "afile").write_text("x")
    r = make_recipe(workdir)
    r.artifacts_dir = str(workdir / "afile")
    with pytest.raises(OptkitError, match=r"^artifacts_dir: cannot write the run directory .*afile/run1"):
        _run(r)


def test_jsonl_error_names_line_and_column_without_at_at(tmp_path):
    from toolkit.io import read_jsonl

    f = tmp_path / "x.jsonl"
    f.write_text('{"a": 1}\n{"a": "unterminated')
    with pytest.raises(OptkitError) as err:
        read_jsonl(f)
    assert str(err.value) == f"{f}:2: invalid JSON (Unterminated string starting at column 7)"


def test_json_outputs_are_strict_an_undefined_figure_is_null(tmp_path):
    """quantize's summary.json, distill's train_result.json and collect's outputs.jsonl went through json.dumps'
    default allow_nan=True: a NaN perplexity or grad_norm became the token NaN, which strict parsers reject."""
    import numpy as np

    from toolkit.io import atomic_write_json, read_jsonl, write_jsonl

    obj = {"perplexity": float("nan"), "grad_norm": np.float32("inf"), "rows": [1.5, np.float64(-np.inf)],
           "score": np.float32(0.25), "n": np.int64(3), "ok": np.bool_(True), "curve": np.array([1.0, np.nan])}
    atomic_write_json(tmp_path / "s.json", obj)
    write_jsonl(tmp_path / "r.jsonl", [obj])

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))

    want = {"perplexity": None, "grad_norm": None, "rows": [1.5, None], "score": 0.25, "n": 3, "ok": True,
            "curve": [1.0, None]}
    assert strict((tmp_path / "s.json").read_text()) == want
    assert [strict(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()] == [want]
    assert read_jsonl(tmp_path / "r.jsonl") == [want]
