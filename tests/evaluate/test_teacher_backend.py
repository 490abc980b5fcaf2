"""evaluate re-measures a local teacher: which one is local is what collect actually ran (collect.backend: auto is
resolved at run time and recorded in collect/summary.json), not the recipe's word."""

import json
from types import SimpleNamespace

from toolkit.config import recipe_from_dict
from toolkit.evaluate.variants import _teacher


def ctx_for(tmp_path, backend: str, used: str | None):
    recipe = recipe_from_dict({"name": "t", "teacher": {"model": "smollm2-135m-instruct"},
                               "data": {"path": "x.jsonl"}, "collect": {"backend": backend}})
    collect = tmp_path / "collect"
    collect.mkdir(exist_ok=True)
    summary = collect / "summary.json"
    summary.unlink(missing_ok=True)
    if used:
        summary.write_text(json.dumps({"backend": {"requested": backend, "used": used, "why": "test"}}))
    # The stage context's two members _teacher reads (the real StageContext needs a whole run directory).
    return SimpleNamespace(recipe=recipe, upstream=lambda stage: tmp_path / stage)


def test_auto_resolved_to_hf_is_re_measured_locally(tmp_path):
    assert _teacher(ctx_for(tmp_path, "auto", "hf")).engine == "transformers"
    assert _teacher(ctx_for(tmp_path, "hf", None)).engine == "transformers"


def test_a_teacher_collected_through_optkits_own_vllm_server_is_re_measured_locally(tmp_path):
    """Its records' latencies were taken with ~128 requests open at once: queueing, not the model's latency."""
    for backend, used in (("auto", "vllm-server"), ("vllm-server", "vllm-server"), ("vllm-server", None)):
        v = _teacher(ctx_for(tmp_path, backend, used))
        assert v.engine == "transformers" and v.model_dir is not None and (v.model_dir / "config.json").is_file()


def test_api_teachers_and_unresolved_auto_keep_collects_records(tmp_path):
    v = _teacher(ctx_for(tmp_path, "auto", "openai"))
    assert v.engine == "records" and v.facts["backend"] == "openai"
    assert _teacher(ctx_for(tmp_path, "openai", "openai")).engine == "records"
    assert _teacher(ctx_for(tmp_path, "auto", None)).engine == "records"
