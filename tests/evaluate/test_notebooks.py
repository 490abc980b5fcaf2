"""notebooks/ are executed (jupytext -> nbformat -> nbclient, a real Jupyter kernel) against the small evaluated
run, so a change in the run layout that breaks them fails here."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.evaluate import fakerun

pytestmark = pytest.mark.slow
NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.py"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_against_a_run(path, evaluated, tmp_path, monkeypatch):
    import jupytext
    from nbclient import NotebookClient

    root, _ = evaluated
    monkeypatch.setenv("OPTKIT_RUN", str(root / "artifacts" / fakerun.RUN))
    monkeypatch.setenv("OPTKIT_FIGS", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    nb = jupytext.read(path)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "Pareto set:" in text and "at the calibrated threshold" in text and "hit rate at the tuned threshold" in text
    assert "student wrong where the teacher is right" in text
    assert {p.name for p in tmp_path.glob("*.png")} == {"pareto.png", "router_tradeoff.png", "cache_curve.png"}
