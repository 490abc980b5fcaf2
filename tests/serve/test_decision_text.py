"""The gateway decides on the text route and cache were fit on: the recipe's prompt column, read back out of the
user turn its prompt template rendered (toolkit/serve/decision_text.py). Checked on the quickstart's real data
(every row), in the cache key space, in the serve.yaml export writes, and live through the real gateway."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolkit.config.serve import ServeConfig, load_serve_config
from toolkit.errors import OptkitError
from toolkit.serve.decision_text import DecisionText
from toolkit.serve.protocol import ChatRequest, CompletionRequest, keyed

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = {"student": {"base_url": "http://127.0.0.1:9/v1", "model": "s"}}
TWO = "Translate to {lang}:\n{text}\nAnswer in {lang} only."


def quickstart():
    from toolkit.config import load_recipe

    return load_recipe(ROOT / "recipes/quickstart.yaml")


def test_every_quickstart_row_gives_back_its_prompt_column():
    """What collect rendered into the user turn, read back: exactly the records' `prompt` (the text route and
    cache were fit on and evaluate's replay decides on), for all rows of the data file."""
    from toolkit.collect.prompts import load_prompts

    recipe = quickstart()
    data = recipe.data.model_copy(update={"limit": None})
    prompts = load_prompts(data, recipe.resolve_path(data.path), recipe.seed)
    assert len(prompts) > 700
    dt = DecisionText(data.prompt_template, data.prompt_column)
    for p in prompts:
        user = p.messages[-1]["content"]
        assert user != p.prompt  # the template really wraps it
        found = dt.extract(user)
        assert found is not None and found[0] == p.prompt, p.id


def _key(dt, content: str, tenant: str = "t", kind: str = "chat"):
    if kind == "chat":
        body = {"model": "m", "messages": [{"role": "user", "content": content}], "temperature": 0}
        req = ChatRequest.model_validate(body)
    else:
        body = {"model": "m", "prompt": content, "temperature": 0}
        req = CompletionRequest.model_validate(body)
    return keyed(kind, req, body, tenant, "m", ServeConfig(backends=BACKENDS).cache, False, False, dt)


def test_key_space_keeps_other_fields_the_template_and_tenants_apart():
    dt = DecisionText(TWO, "text")
    fr = _key(dt, TWO.format(lang="French", text="good  morning"))
    assert fr.query == "good  morning" and fr.templated is True
    de = _key(dt, TWO.format(lang="German", text="good  morning"))
    assert de.query == fr.query and de.namespace != fr.namespace  # asked another thing: never the same answer
    assert _key(dt, TWO.format(lang="French", text="good  morning")).namespace == fr.namespace
    assert _key(dt, TWO.format(lang="French", text="good  morning"), tenant="u").namespace != fr.namespace
    raw = _key(dt, "good  morning")  # the bare text: not the template, decided on whole, its own key space
    assert raw.query == "good  morning" and raw.templated is False and raw.namespace != fr.namespace
    assert _key(None, "good  morning").templated is None
    # The completions endpoint reads its prompt the same way; reformatted whitespace still matches.
    comp = _key(dt, "  Translate to French: good morning\n Answer in French only.\n", kind="completions")
    assert comp.templated is True and comp.query == "good morning"
    # A repeated field must repeat the same value; an empty column value is no decision text.
    assert _key(dt, TWO.format(lang="French", text="x").replace("in French", "in German")).templated is False
    assert _key(dt, TWO.format(lang="French", text=" ")).templated is False


def test_a_template_the_gateway_cannot_read_back_is_refused(tmp_path):
    path = tmp_path / "serve.yaml"
    for template, why in (("Classify: {text!r}", "conversion or format spec"),
                          ("Classify: {body}", "never uses {text}"), ("Classify: {text", "invalid format string")):
        path.write_text(f"backends: {{student: {{base_url: 'http://127.0.0.1:9/v1', model: s}}}}\n"
                        f"decision_text: {{template: {template!r}, column: text}}\n")
        with pytest.raises(OptkitError) as err:
            load_serve_config(path)
        assert "decision_text" in str(err.value) and why in str(err.value)


def test_export_writes_the_recipe_template_and_column(tmp_path):
    from toolkit.config import recipe_from_dict
    from toolkit.serve.bundle_config import serve_yaml

    models = [{"name": "gguf-Q4_K_M", "kind": "gguf", "path": "gguf/m.gguf"}]
    recipe = quickstart()
    path = tmp_path / "serve.yaml"
    path.write_text(serve_yaml(models, "quickstart", 9000, recipe))
    cfg = load_serve_config(path)
    assert cfg.decision_text.template == recipe.data.prompt_template
    assert cfg.decision_text.column == "instruction"
    # No template (the prompt column is the user turn) or one without the column plainly: the whole turn.
    for data in ({"path": "p.jsonl"}, {"path": "p.jsonl", "prompt_template": "Q: {title}"}):
        plain = recipe_from_dict({"name": "run", "teacher": {"model": "m"}, "data": data})
        path.write_text(serve_yaml(models, "run", 9000, plain))
        assert load_serve_config(path).decision_text is None


# ---------------------------------------------------------------------------------------------- live gateway

TEMPLATE = 'Question from a user: "{prompt}"\n\nAnswer in one word.'


@pytest.fixture(scope="module")
def templated_gateway(bundle, student, tmp_path_factory):
    from tests.serve.conftest import _stop, serve_config, start_gateway

    cfg = serve_config(student.url, student.url, decision_text={"template": TEMPLATE, "column": "prompt"})
    gw = start_gateway(bundle, tmp_path_factory.mktemp("templated"), cfg)
    try:
        yield gw
    finally:
        _stop(gw.proc)


@pytest.mark.slow
@pytest.mark.server
def test_gateway_decides_on_the_prompt_column_not_the_template(templated_gateway, bundle):
    import re

    import httpx

    from tests.serve.conftest import CANDIDATES, chat
    from toolkit.bundle import Bundle

    router = Bundle.open(bundle).router()
    asked = 0
    for prompt in CANDIDATES[:4]:
        resp = templated_gateway.post("/v1/chat/completions", chat(TEMPLATE.format(prompt=prompt)),
                                      headers={"cache-control": "no-cache, no-store"})
        assert resp.status_code == 200, resp.text
        asked += 1
        got = float(resp.headers["x-optkit-router-score"])
        assert got == pytest.approx(router.score([prompt])[0], abs=1e-5)  # the column's score ...
        assert got != pytest.approx(router.score([TEMPLATE.format(prompt=prompt)])[0], abs=1e-5)  # ... not the turn's
    stored = templated_gateway.post("/v1/chat/completions", chat(TEMPLATE.format(prompt=CANDIDATES[5])))
    again = templated_gateway.post("/v1/chat/completions", chat(TEMPLATE.format(prompt=CANDIDATES[5])))
    assert stored.headers["x-optkit-route"] in ("student", "teacher")
    assert again.headers["x-optkit-route"] == "exact-cache"
    bare = templated_gateway.post("/v1/chat/completions", chat(CANDIDATES[5]))  # the same text, not templated
    assert bare.headers["x-optkit-route"] in ("student", "teacher")  # another question: not the cached answer
    metrics = httpx.get(templated_gateway.url + "/metrics", timeout=10).text
    counts = dict(re.findall(r'optkit_decision_text_total\{source="(\w+)"\} ([0-9.]+)', metrics))
    assert float(counts["template"]) == asked + 2 and float(counts["whole_turn"]) == 1
