"""The command line: fast start-up, one-line errors with exit code 2, validate, schema."""

import json
import subprocess
import sys
from pathlib import Path

from toolkit.cli import main

REPO = Path(__file__).resolve().parents[2]


def optkit(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "toolkit.cli", *args], capture_output=True, text=True, cwd=cwd)


HEAVY = ("numpy", "torch", "transformers", "mlflow", "sklearn", "scipy")


def _modules_after(argv: list[str], cwd=None) -> list[str]:
    """Heavy modules a fresh interpreter holds after running the CLI with argv (no timing: robust under load)."""
    code = ("import sys; from toolkit.cli import main\n"
            "try: main(sys.argv[1:])\nexcept SystemExit: pass\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)")
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=cwd)
    return eval(p.stderr.strip().splitlines()[-1]), p.stdout  # noqa: S307 (our own repr of a list)


def test_help_and_validate_import_nothing_heavy(tmp_path):
    heavy, out = _modules_after(["--help"])
    assert heavy == [] and "run" in out and "validate" in out
    heavy, out = _modules_after(["validate", str(REPO / "recipes" / "quickstart.yaml")])
    assert heavy == [] and "ok" in out
    code = "import sys, toolkit.cli, toolkit.config, toolkit.pipeline; print('pydantic' in sys.modules, " \
           f"[m for m in {HEAVY!r} if m in sys.modules])"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.stdout.strip() == "True []", p.stderr


def test_validate_ok_and_errors(tmp_path, capsys):
    good = tmp_path / "r.yaml"
    good.write_text("name: t\nteacher: {model: x/y}\ndata: {path: d.jsonl}\ncollect: {}\n")
    (tmp_path / "d.jsonl").write_text('{"prompt": "p"}\n')
    assert main(["validate", str(good)]) == 0
    assert "ok" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\nteacher: {model: x/y}\ndata: {path: d.jsonl}\ncollect: {backnd: hf}\n")
    p = optkit("validate", str(bad))
    assert p.returncode == 2
    assert p.stderr.startswith("error: ") and "collect.backnd: unknown key (did you mean 'backend'?)" in p.stderr
    assert "Traceback" not in p.stderr


def test_run_bad_input_exit_2_and_nothing_marked_done(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("name: t\nteacher: {model: x/y}\ndata: {path: d.jsonl}\n")
    p = optkit("run", str(bad), cwd=tmp_path)
    assert p.returncode == 2 and "no stage sections" in p.stderr
    p = optkit("run", str(bad), "collect.generation.max_new_tokens=zero", cwd=tmp_path)
    assert p.returncode == 2 and "collect.generation.max_new_tokens" in p.stderr
    assert not list(tmp_path.rglob("manifest.json"))


def test_usage_errors():
    assert optkit().returncode == 2
    p = optkit("run", "x.yaml", "--only", "a", "--from", "b")
    assert p.returncode == 2 and "not allowed with" in p.stderr


def test_schema_prints_reference(capsys):
    assert main(["schema"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| key | type | default | description |")
    assert "`data.prompt_column`" in out


def test_every_shipped_recipe_validates():
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    for r in recipes:
        p = optkit("validate", str(r))
        assert p.returncode == 0, (r, p.stderr)


def test_non_utf8_recipe_is_one_line_with_the_line(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_bytes(b"name: t\nteacher: {model: x/y}\ndescription: caf\xe9\ndata: {path: d.jsonl}\n")
    p = optkit("validate", str(bad))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == f"error: {bad}:3: not UTF-8 (byte 0xe9); save the file as UTF-8"


def test_validate_refuses_what_run_would_refuse(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("name: t\nteacher: {model: x/y}\ndata: {path: d.jsonl}\nroute: {labels: {source: pipeline}}\n")
    p = optkit("validate", str(r))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "route.labels.source: pipeline labels prompts with the collect and distill outputs" in p.stderr
    r.write_text("name: t\nteacher: {model: x/y}\ndata: {path: d.jsonl}\ndistill: {student: {model: x/z}}\n")
    p = optkit("validate", str(r))
    assert p.returncode == 2 and "distill: trains on the teacher's outputs" in p.stderr


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bogus_tracking_uri_is_one_line_and_fast(tmp_path):
    import time

    (tmp_path / "d.jsonl").write_text('{"prompt": "p"}\n')
    base = "name: t\nteacher: {model: x/y}\ndata: {path: d.jsonl}\ncollect: {}\n"
    for uri, msg in (("foo://x", "tracking.uri: cannot use the MLflow tracking store foo://x"),
                     (f"http://u:pw@127.0.0.1:{_closed_port()}", "is not reachable")):
        (tmp_path / "r.yaml").write_text(base + f"tracking: {{uri: '{uri}'}}\n")
        start = time.monotonic()
        p = optkit("run", "r.yaml", cwd=tmp_path)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert msg in p.stderr and "pw" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
        assert time.monotonic() - start < 120  # bounded: not MLflow's minutes of retries
    assert not list(tmp_path.rglob("manifest.json"))


def test_evaluate_refuses_a_non_bundle_without_loading_anything(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": 1, "text": "hi", "label": "A"}\n')
    heavy, _ = _modules_after(["evaluate", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "o")])
    assert heavy == []
    p = optkit("evaluate", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and "not an optkit bundle" in p.stderr and "Traceback" not in p.stderr
    p = optkit("evaluate", str(tmp_path))  # --data and --out are required
    assert p.returncode == 2 and "--data" in p.stderr


def test_overrides_after_an_option_and_malformed_option_values(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("name: t\nteacher: {model: x/y}\ndata: {path: d.jsonl}\ncollect: {}\n")
    p = optkit("run", str(r), "--only", "collect", "collect.generation.max_new_tokens=zero", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.startswith("error: override 'collect.generation.max_new_tokens=zero'")
    p = optkit("validate", str(r), "--bogus", "seed=3")
    assert p.returncode == 2 and "unrecognized arguments: --bogus" in p.stderr
    p = optkit("serve", str(tmp_path), "--port", "99999")
    assert p.returncode == 2 and "'99999' is not a port (1-65535)" in p.stderr and "Traceback" not in p.stderr
    p = optkit("verify", str(tmp_path), "--manifest-sha256", "abc")
    assert p.returncode == 2 and "64 hex digits" in p.stderr
    p = optkit("serve", str(tmp_path / "nope"))
    assert p.returncode == 2 and p.stderr.strip() == f"error: {tmp_path / 'nope'}: no such bundle directory"
    assert not list(tmp_path.rglob("manifest.json"))


def test_evaluate_out_that_cannot_be_written_is_named_and_old_results_never_look_current(tmp_path):
    from toolkit.evaluate.bundle import RESULTS, prepare_out

    old = tmp_path / "old"
    old.mkdir()
    for name in RESULTS:
        (old / name).write_text("from an earlier evaluation")
    (old / "work").mkdir()
    (old / "work" / "answers.jsonl").write_text("{}\n")
    prepare_out(old)  # what a run does once its inputs passed their checks
    assert [p.name for p in old.iterdir()] == ["work"] and (old / "work" / "answers.jsonl").exists()

    bundle = tmp_path / "b"
    bundle.mkdir()
    from toolkit.bundle import FORMAT

    recipe = {"name": "t", "teacher": {"model": "smollm2-135m-instruct"},
              "data": {"path": "x.jsonl", "prompt_column": "text", "reference_column": "label"}, "collect": {}}
    (bundle / "manifest.json").write_text(json.dumps({"format": FORMAT, "models": [], "files": {},
                                                      "recipe": recipe}))
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": 1, "text": "hi", "label": "A"}\n')
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    p = optkit("evaluate", str(bundle), "--data", str(data), "--out", str(blocker))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.startswith(f"error: --out: cannot write results to {blocker}")


def test_validate_reads_the_prompts_file_as_collect_will(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("name: t\nteacher: {model: x/y}\ndata: {path: d.jsonl, prompt_column: q}\ncollect: {}\n")
    p = optkit("validate", str(r))
    assert p.returncode == 2 and p.stderr.strip() == f"error: data.path: file not found: {tmp_path / 'd.jsonl'}"
    (tmp_path / "d.jsonl").write_text('{"q": "a"}\n{"q": "b"}\n{"text": "c"}\n')
    p = optkit("validate", str(r))
    assert p.returncode == 2 and "d.jsonl: row 3: empty prompt in column 'q'" in p.stderr
    (tmp_path / "d.jsonl").write_text("".join(f'{{"q": "question {i}"}}\n' for i in range(40)))
    p = optkit("validate", str(r), "data.splits={train: 0.5, val: 0.25, test: 0.25}")
    assert p.returncode == 0 and "; 40 prompts (train " in p.stdout, p.stderr
