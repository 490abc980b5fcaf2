"""Bad input through the CLI: one line on stderr naming the field, file or line; exit code 2; the collect
manifest never says done."""

from __future__ import annotations

import json
import socket

import pytest

from tests.collect.conftest import openai_collect, write_recipe
from toolkit.cli import main


def run_cli(path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["run", str(path)])
    return code, capsys.readouterr().err.strip()


def assert_not_done(workdir):
    manifest = workdir / "artifacts" / "t" / "collect" / "manifest.json"
    assert not manifest.exists() or json.loads(manifest.read_text())["status"] != "done"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HF = {"backend": "hf"}  # data errors surface before any model is loaded


@pytest.mark.parametrize("case", ["missing_file", "bad_jsonl_line", "missing_prompt_column", "empty_dataset",
                                  "missing_template_column", "duplicate_id"])
def test_bad_data(workdir, capsys, case):
    data = workdir / "prompts.jsonl"
    rows = [{"id": i, "instruction": f"message {i}", "category": "ORDER"} for i in range(4)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    overrides, expect = {"path": str(data)}, []
    if case == "missing_file":
        overrides["path"] = str(workdir / "nope.jsonl")
        expect = ["data.path", "nope.jsonl"]
    elif case == "bad_jsonl_line":
        lines = text.splitlines()
        lines[2] = '{"id": 2, "instruction": "broken'
        text = "\n".join(lines) + "\n"
        expect = ["prompts.jsonl:3", "invalid JSON"]
    elif case == "missing_prompt_column":
        overrides["prompt_column"] = "text"
        expect = ["'text'", "data.prompt_column", "instruction"]
    elif case == "empty_dataset":
        text = ""
        expect = ["empty", "data.path"]
    elif case == "missing_template_column":
        overrides["prompt_template"] = "Classify: {message}"
        expect = ["'message'", "data.prompt_template"]
    elif case == "duplicate_id":
        text += json.dumps({"id": 1, "instruction": "another message", "category": "ORDER"}) + "\n"
        expect = ["row 5", "id '1'", "data.id_column"]
    data.write_text(text)
    code, err = run_cli(write_recipe(workdir, HF, data=overrides), capsys)
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err, err
    assert all(e in err for e in expect), err
    assert "at at" not in err
    assert_not_done(workdir)


ROWS = [{"id": i, "instruction": f"message {i}", "category": "ORDER"} for i in range(6)]


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _csv(rows) -> bytes:
    return ("id,instruction,category\n" + "".join(f"{r['id']},{r['instruction']},{r['category']}\n"
                                                   for r in rows)).encode()


def _latin1_row(content: bytes) -> bytes:
    lines = content.splitlines(keepends=True)
    lines[3] = lines[3].replace(b"message", "m\u00e9ssage".encode("latin-1"))  # 0xe9: not UTF-8
    return b"".join(lines)


# case -> (file name, bytes, data overrides, strings the one-line error must contain)
DATA_CASES = {
    "non_utf8_jsonl": ("p.jsonl", _latin1_row(_jsonl(ROWS)), {}, ["p.jsonl:4", "not UTF-8", "0xe9"]),
    "non_utf8_csv": ("p.csv", _latin1_row(_csv(ROWS)), {}, ["p.csv:4", "not UTF-8"]),
    "utf16_file": ("p.jsonl", _jsonl(ROWS).decode().encode("utf-16"), {}, ["p.jsonl:1", "not UTF-8"]),
    "unterminated_last_line": ("p.jsonl", _jsonl(ROWS) + b'{"id": 9, "instruction": "brok', {},
                               ["p.jsonl:7", "invalid JSON (Unterminated string starting at column 26)"]),
    "later_row_without_id": ("p.jsonl", _jsonl(ROWS[:4] + [{"instruction": "no id", "category": "ORDER"}]), {},
                             ["row 5", "'id'", "data.id_column"]),
    "later_csv_row_without_id": ("p.csv", _csv(ROWS) + b",message 9,ORDER\n", {},
                                 ["row 7", "empty id", "data.id_column"]),
    "later_row_without_reference": ("p.jsonl", _jsonl(ROWS + [{"id": 9, "instruction": "x"}]), {},
                                    ["row 7", "'category'", "data.reference_column"]),
    "later_row_without_template_column": (
        "p.jsonl", _jsonl(ROWS + [{"id": 9, "category": "ORDER"}]), {"prompt_template": "Classify: {instruction}"},
        ["row 7", "'instruction'", "data.prompt_template"]),
    "template_index_out_of_range": ("p.jsonl", _jsonl(ROWS), {"prompt_template": "{instruction[20]}"},
                                    ["row 1", "data.prompt_template", "IndexError"]),
    "plain_directory": ("somedir/", b"", {}, ["somedir", "not one saved by datasets.save_to_disk"]),
    "directory_as_jsonl": ("somedir/", b"", {"format": "jsonl"}, ["somedir", "data.format is 'jsonl'"]),
    "file_as_datasets": ("p.jsonl", _jsonl(ROWS), {"format": "datasets"}, ["p.jsonl", "data.format is 'datasets'"]),
    "csv_field_over_limit": ("p.csv", _csv(ROWS).replace(b"message 2", b"m" * 200_000), {},
                             ["p.csv", "invalid CSV", "field limit"]),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_files(workdir, capsys, case):
    name, content, overrides, expect = DATA_CASES[case]
    path = workdir / name
    if name.endswith("/"):
        path.mkdir()
        (path / "rows.jsonl").write_bytes(_jsonl(ROWS))
    else:
        path.write_bytes(content)
    code, err = run_cli(write_recipe(workdir, HF, data={"path": str(path), **overrides}), capsys)
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    assert all(e in err for e in expect), err
    assert_not_done(workdir)


@pytest.mark.parametrize("template, expect", [
    ("{instruction:>>>}", "bad format spec ':>>>'"),
    ("{instruction:.2f}", "bad format spec ':.2f'"),
    ("{instruction!z}", "unknown conversion '!z'"),
    ("{0}", "use named fields"),
    ("{}", "use named fields"),
    ("Classify: {instruction", "invalid format string"),
])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_bad_prompt_template(workdir, capsys, template, expect, command):
    """A template that cannot work on any row fails in `validate` already (and so before `run` does anything)."""
    capsys.readouterr()
    code = main([command, str(write_recipe(workdir, HF, data={"prompt_template": template}))])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    assert "data.prompt_template" in err and expect in err, err
    assert_not_done(workdir)


def test_unknown_template_column_is_named(workdir, capsys):
    code, err = run_cli(write_recipe(workdir, HF, data={"prompt_template": "Classify: {text}"}), capsys)
    assert code == 2 and "\n" not in err
    assert "column 'text' (data.prompt_template) does not exist" in err and "instruction" in err, err
    assert_not_done(workdir)


def test_unreachable_endpoint(workdir, capsys):
    class Nowhere:
        base_url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens here

    code, err = run_cli(write_recipe(workdir, openai_collect(Nowhere), data={"limit": 3}), capsys)
    assert code == 2 and "\n" not in err
    assert "cannot reach the endpoint" in err and "collect.openai.base_url" in err and Nowhere.base_url in err
    assert_not_done(workdir)


def test_bad_api_key_fails_at_once(workdir, capsys, fake_openai):
    server = fake_openai(api_key="sk-right-key-000")
    collect = openai_collect(server, api_key="sk-wrong-key-111", concurrency=2, max_retries=5)
    code, err = run_cli(write_recipe(workdir, collect, data={"limit": 20}), capsys)
    assert code == 2 and "\n" not in err
    assert "rejected the API key (HTTP 401" in err and "OPENAI_API_KEY" in err
    assert "sk-wrong-key-111" not in err  # the server echoed it; we print *** instead
    assert sum(server.hits.values()) <= 2  # not retried: at most the requests already in flight
    assert_not_done(workdir)


def test_wrong_base_url_path_is_one_clear_error(workdir, capsys, fake_openai):
    server = fake_openai()

    class NoV1:
        base_url = server.base_url.removesuffix("/v1") + "/api"

    code, err = run_cli(write_recipe(workdir, openai_collect(NoV1), data={"limit": 3}), capsys)
    assert code == 2 and "HTTP 404" in err and "collect.openai.base_url" in err and "\n" not in err
    assert_not_done(workdir)

