"""Collect-test helpers: recipes over the shipped Bitext extract, a fake OpenAI server per test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.collect.fake_openai_server import FakeOpenAI

REPO = Path(__file__).resolve().parents[2]
BITEXT = REPO / "recipes" / "data" / "bitext" / "bitext_cs_quickstart.jsonl"


def bitext_rows(n: int) -> list[dict]:
    rows = [json.loads(line) for line in BITEXT.read_text().splitlines()]
    return rows[:: max(1, len(rows) // n)][:n]  # spread over the file (it is sorted by label)


def write_recipe(workdir: Path, collect: dict, data: dict | None = None, name: str = "t", **top) -> Path:
    """A recipe file over the Bitext extract (or `data`), tracking off unless asked for."""
    recipe = {"name": name, "teacher": {"model": "smollm2-135m-instruct"},
              "data": {"path": str(BITEXT), "id_column": "id", "prompt_column": "instruction",
                       "reference_column": "category", **(data or {})},
              "tracking": {"enabled": False}, "collect": {"backend": "hf", **collect}, **top}
    # hf unless a test names an engine: the default (auto) depends on the machine (resolve_backend has its own tests)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def openai_collect(server: FakeOpenAI, **openai) -> dict:
    cfg = {"base_url": server.base_url, "model": "fake-model", "concurrency": 4, "timeout_s": 1.0,
           "max_retries": 4, "backoff_base_s": 0.01, "backoff_max_s": 0.05, **openai}
    return {"backend": "openai", "openai": cfg, "generation": {"max_new_tokens": 8}}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture
def fake_openai():
    """Factory: fake_openai(**options) -> a started FakeOpenAI, stopped after the test."""
    servers = []

    def make(**kw) -> FakeOpenAI:
        server = FakeOpenAI(**kw).start()
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.stop()
