"""The command line: fast start-up, one-line errors with exit code 2, validate, schema."""

import subprocess
import sys
import time
from pathlib import Path

from toolkit.cli import main

REPO = Path(__file__).resolve().parents[2]


def optkit(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "toolkit.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_help_is_fast_and_imports_nothing_heavy():
    code = ("import sys, time; t=time.perf_counter(); from toolkit.cli import main;\n"
            "try: main(['--help'])\nexcept SystemExit: pass\n"
            "heavy=[m for m in ('torch','transformers','mlflow','sklearn','pydantic') if m in sys.modules];"
            "print(time.perf_counter()-t, heavy, file=sys.stderr)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    secs, heavy = p.stderr.strip().split(" ", 1)
    assert heavy == "[]" and "run" in p.stdout and "validate" in p.stdout
    start = time.perf_counter()
    optkit("--help")
    assert time.perf_counter() - start < 3.0  # whole interpreter start + help; the import itself ~ms
    assert float(secs) < 0.5


def test_validate_ok_and_errors(tmp_path, capsys):
    good = tmp_path / "r.yaml"
    good.write_text("name: t\nteacher: {model: x/y}\ndata: {path: d.jsonl}\ncollect: {}\n")
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
