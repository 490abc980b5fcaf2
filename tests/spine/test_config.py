"""Recipe schema: unknown keys with suggestions, types, YAML errors with line numbers, overrides, docs."""

import pytest
from pydantic import BaseModel

from toolkit.config import Recipe, apply_overrides, load_recipe, recipe_from_dict, schema_reference
from toolkit.config.loading import _first_model
from toolkit.errors import OptkitError

MINIMAL = {"name": "t", "teacher": {"model": "smollm2-135m-instruct"}, "data": {"path": "d.jsonl"},
           "collect": {}}


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_minimal_recipe_validates_with_defaults():
    r = recipe_from_dict(MINIMAL)
    assert r.stages() == ["collect"]
    assert r.collect.generation.max_new_tokens == 64
    assert r.teacher.trust_remote_code is False


def test_misspelled_key_names_path_and_suggests(tmp_path):
    p = write(tmp_path, "name: t\nteacher: {model: x}\ndata: {path: d.jsonl}\ncollect:\n  generaton: {}\n")
    with pytest.raises(OptkitError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert "collect.generaton" in msg and "did you mean 'generation'" in msg and str(p) in msg


def test_nested_misspelling_suggests_from_the_right_model():
    bad = {**MINIMAL, "collect": {"generation": {"max_new_tokenz": 3}}}
    with pytest.raises(OptkitError, match=r"collect\.generation\.max_new_tokenz: unknown key \(did you mean "
                                          r"'max_new_tokens'\?\)"):
        recipe_from_dict(bad)


def test_wrong_type_names_field():
    with pytest.raises(OptkitError, match=r"collect\.generation\.max_new_tokens: .*integer"):
        recipe_from_dict({**MINIMAL, "collect": {"generation": {"max_new_tokens": "many"}}})


def test_missing_required_key():
    with pytest.raises(OptkitError, match="name: required key is missing"):
        recipe_from_dict({"teacher": {"model": "m"}, "data": {"path": "x"}})
    with pytest.raises(OptkitError, match="data.path: required key is missing"):
        recipe_from_dict({"name": "t", "data": {}})


def test_bad_yaml_reports_line(tmp_path):
    p = write(tmp_path, "name: t\nteacher:\n  model: [unclosed\ndata: {path: x}\n")
    with pytest.raises(OptkitError, match=r"r\.yaml:\d+:\d+: invalid YAML"):
        load_recipe(p)


def test_empty_and_non_mapping_recipes(tmp_path):
    with pytest.raises(OptkitError, match="empty"):
        load_recipe(write(tmp_path, ""))
    with pytest.raises(OptkitError, match="mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(OptkitError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_splits_must_sum_to_one():
    with pytest.raises(OptkitError, match="data.splits: .*must be 1.0"):
        recipe_from_dict({**MINIMAL, "data": {"path": "x", "splits": {"train": 0.5, "val": 0.1, "test": 0.1}}})


def test_overrides_parse_yaml_values_and_create_sections():
    d = apply_overrides({"a": {"b": 1}}, ["a.b=7", "a.c=[1, 2]", "x.y=true", "s=hello", "t=Note: be brief",
                                          "m={k: v}"])
    assert d == {"a": {"b": 7, "c": [1, 2]}, "x": {"y": True}, "s": "hello", "t": "Note: be brief", "m": {"k": "v"}}
    with pytest.raises(OptkitError, match="key.path=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(OptkitError, match="not a section"):
        apply_overrides({"a": 3}, ["a.b=1"])


def test_override_errors_are_validated_like_the_file(tmp_path):
    p = write(tmp_path, "name: t\nteacher: {model: x}\ndata: {path: d.jsonl}\ncollect: {}\n")
    r = load_recipe(p, ["collect.generation.max_new_tokens=5"])
    assert r.collect.generation.max_new_tokens == 5
    with pytest.raises(OptkitError, match="collect.generation.max_new_tokens"):
        load_recipe(p, ["collect.generation.max_new_tokens=-1"])


def test_relative_paths_resolve_against_recipe_dir(tmp_path):
    (tmp_path / "sub").mkdir()
    p = write(tmp_path / "sub", "name: t\nteacher: {model: x}\ndata: {path: d.jsonl}\n")
    r = load_recipe(p)
    assert r.resolve_path(r.data.path) == (tmp_path / "sub" / "d.jsonl")


def test_secrets_are_stripped_from_public_dict():
    r = recipe_from_dict({**MINIMAL, "collect": {"backend": "openai", "openai": {"api_key": "sk-very-secret-1234"}}})
    assert r.collect.openai.api_key.get_secret_value() == "sk-very-secret-1234"
    assert "sk-very-secret-1234" not in repr(r.public_dict())
    assert "api_key" not in r.public_dict()["collect"]["openai"]


def _all_models(cls, seen=None):
    seen = seen if seen is not None else set()
    if cls in seen:
        return seen
    seen.add(cls)
    for f in cls.model_fields.values():
        sub = _first_model(f.annotation)
        if sub is not None:
            _all_models(sub, seen)
    return seen


def test_every_field_is_described_and_every_section_forbids_extras():
    models = _all_models(Recipe)
    assert len(models) > 10
    for cls in models:
        assert cls.model_config.get("extra") == "forbid", cls.__name__
        for name, f in cls.model_fields.items():
            assert f.description, f"{cls.__name__}.{name} has no description"


def test_schema_reference_lists_nested_keys():
    rows = schema_reference()
    keys = [r.split("`")[1] for r in rows]
    assert "collect.generation.max_new_tokens" in keys
    assert "teacher.trust_remote_code" in keys
    assert all(r.count("|") >= 5 for r in rows)


def test_import_is_cheap():
    import subprocess
    import sys

    code = ("import sys, toolkit.config, toolkit.pipeline, toolkit.cli;"
            "bad=[m for m in ('torch','transformers','mlflow','sklearn') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_key_repeated_in_one_mapping_is_refused_with_its_line(tmp_path):
    p = write(tmp_path, "name: t\nteacher: {model: x}\ndata:\n  path: d.jsonl\n  prompt_column: q\ncollect: {}\n"
                        "data:\n  path: other.jsonl\n")
    with pytest.raises(OptkitError, match=r"r\.yaml:7:1: invalid YAML: duplicate key 'data'"):
        load_recipe(p)
    p = write(tmp_path, "name: t\nteacher: {model: x, model: y}\ndata: {path: d.jsonl}\n")
    with pytest.raises(OptkitError, match=r"r\.yaml:2:\d+: invalid YAML: duplicate key 'model'"):
        load_recipe(p)
    # YAML's own merge key may set a key again
    p = write(tmp_path, "name: t\nteacher: {model: x}\ndata: {path: d.jsonl}\ncollect:\n  generation:\n"
                        "    <<: {max_new_tokens: 3, temperature: 0.5}\n    max_new_tokens: 5\n")
    r = load_recipe(p)
    assert (r.collect.generation.max_new_tokens, r.collect.generation.temperature) == (5, 0.5)


def test_an_override_error_names_the_override_not_the_file(tmp_path):
    p = write(tmp_path, "name: t\nteacher: {model: x}\ndata: {path: d.jsonl}\ncollect: {}\n")
    with pytest.raises(OptkitError) as e:
        load_recipe(p, ["data.limit=0"])
    assert str(e.value).startswith("override 'data.limit=0': data.limit:") and str(p) not in str(e.value)
    write(tmp_path, "name: t\nteacher: {model: x}\ndata: {path: d.jsonl}\ncollect: {backnd: hf}\n")
    with pytest.raises(OptkitError, match=r"r\.yaml: collect\.backnd: unknown key"):
        load_recipe(p, ["data.limit=3"])  # the file's own mistake is still the file's


@pytest.mark.parametrize("section, message", [
    ({"evaluate": {"batch_sizes": [1, 0]}}, r"evaluate\.batch_sizes\.1: Input should be greater than 0"),
    ({"evaluate": {"concurrency": [-1]}}, r"evaluate\.concurrency\.0: Input should be greater than 0"),
    ({"evaluate": {"slo": {"e2e_p99_s": -1}}}, r"evaluate\.slo\.e2e_p99_s: Input should be greater than 0"),
    ({"distill": {"student": {"model": "x"}, "training": {"max_steps": 0}}}, r"max_steps: 0 would train nothing"),
    ({"distill": {"student": {"model": "x"}, "training": {"max_steps": -7}}}, r"max_steps: .*greater than or equal"),
    ({"distill": {"student": {"from_teacher": {"num_layers": 3, "layers": [0, 0, 9]}}}}, r"distinct and >= 0"),
    ({"distill": {"student": {"from_teacher": {"num_layers": 2, "layers": [0, 5, 9]}}}}, r"3 indices for num_la"),
    ({"collect": {"splits": []}}, r"collect\.splits: List should have at least 1 item"),
    ({"export": {"include": []}}, r"export\.include: List should have at least 1 item"),
    ({"route": {"labels": {"source": "file", "path": "l.jsonl"}, "costs": {"a": -1, "b": 0}}},
     r"route\.costs\.a: Input should be greater than or equal to 0"),
    ({"route": {"labels": {"source": "file", "path": "l.jsonl"}, "mode": "cascade"},
      "evaluate": {"system": {"student": "gptq"}}}, r"evaluate\.system\.student: route\.mode cascade escalates"),
])
def test_values_no_run_could_use_are_refused_up_front(section, message):
    with pytest.raises(OptkitError, match=message):
        recipe_from_dict({**MINIMAL, **section})


def test_an_empty_stop_string_is_refused():
    """stop: [""] was accepted and hf answers stopped after one token, recorded as finish_reason "length"."""
    with pytest.raises(OptkitError, match=r"collect\.generation\.stop\.1: String should have at least 1 character"):
        recipe_from_dict({**MINIMAL, "collect": {"generation": {"stop": ["\n", ""]}}})
