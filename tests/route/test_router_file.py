"""router.json / router.safetensors are untrusted files: every class of corruption is one OptkitError line that
names the file and the field, never a raw KeyError and never a router that quietly sends everything one way."""

import json
import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from toolkit.errors import OptkitError
from toolkit.route import Router
from toolkit.route.runtime import text_features

from .conftest import EXTRACT, write_small_router


@pytest.fixture(scope="module")
def good_router(tmp_path_factory):
    directory = tmp_path_factory.mktemp("router")
    write_small_router(directory)
    return directory


@pytest.fixture
def router_dir(good_router, tmp_path):
    directory = tmp_path / "route"
    shutil.copytree(good_router, directory)
    return directory


def _edit_json(directory, edit):
    path = directory / "router.json"
    spec = json.loads(path.read_text())
    edit(spec)
    path.write_text(json.dumps(spec))  # json.dumps writes NaN as NaN, as a careless editor would


def _load_error(directory) -> str:
    with pytest.raises(OptkitError) as info:
        Router.load(directory, embedder=object())
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def test_the_untouched_router_loads_and_routes_both_ways(router_dir):
    router = Router.load(router_dir, embedder=object())
    x = text_features([json.loads(line)["prompt"] for line in EXTRACT.read_text().splitlines()[:200]])
    x = (x - router.weights["feat.mean"]) / router.weights["feat.scale"]
    P = router.predict_from_features(x, x)
    assert P.shape == (200, 2) and np.isfinite(router.threshold)
    strong = (P[:, 1] - P[:, 0]) >= router.threshold
    assert 0 < strong.mean() < 1  # the calibrated router really routes: neither model gets everything


def _set(*path_and_value):
    *path, value = path_and_value

    def edit(spec):
        node = spec
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


def _drop(*path):
    def edit(spec):
        node = spec
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return edit


SPEC_CORRUPTIONS = {
    "threshold_nan": (_set("threshold", float("nan")), r"threshold"),
    "threshold_inf": (_set("threshold", float("inf")), r"threshold"),
    "threshold_null": (_set("threshold", None), r"threshold"),
    "threshold_minus_5": (_set("threshold", -5), r"threshold: -5 is outside the score's range \[-2, 2\]"),
    "threshold_string": (_set("threshold", "0.1"), r"threshold"),
    "threshold_bool": (_set("threshold", True), r"threshold"),
    "cost_norm_too_long": (_set("cost_norm", [0.0, 1.0, 1.0]), r"cost_norm: 3 values for 2 models"),
    "cost_norm_too_short": (_set("cost_norm", [1.0]), r"cost_norm"),
    "cost_norm_swapped": (_set("cost_norm", [1.0, 0.0]), r"cost_norm.*not the costs scaled"),
    "cost_norm_nan": (_set("cost_norm", [0.0, float("nan")]), r"cost_norm"),
    "cost_norm_not_a_list": (_set("cost_norm", 1.0), r"cost_norm"),
    "costs_missing_a_model": (_set("costs", {"gpt4_1106": 1.0}), r"costs: keys"),
    "costs_negative": (_set("costs", {"mixtral_8x7b": -1.0, "gpt4_1106": 1.0}), r"costs"),
    "costs_all_equal": (_set("costs", {"mixtral_8x7b": 1.0, "gpt4_1106": 1.0}), r"costs"),
    "strong_unknown": (_set("strong", "gpt5"), r"strong: 'gpt5' is not one of models"),
    "strong_is_the_cheap_one": (_set("strong", "mixtral_8x7b"), r"strong: 'mixtral_8x7b' is not the costliest"),
    "one_model": (_set("models", ["gpt4_1106"]), r"models"),
    "duplicate_models": (_set("models", ["gpt4_1106", "gpt4_1106"]), r"models"),
    "models_not_strings": (_set("models", [1, 2]), r"models"),
    "three_models_two_costs": (_set("models", ["mixtral_8x7b", "gpt4_1106", "x"]), r"costs|cost_norm"),
    "unknown_head": (_set("head", "forest"), r"head"),
    "head_of_another_model": (_set("head", "mlp"), r"head: model 'logreg' writes head 'linear'"),
    "unknown_model": (_set("model", "xgboost"), r"model"),
    "dim_off_by_one": (_set("features", "dim", 11), r"feat.mean: shape \[10\], expected \[11\]"),
    "text_features_flag_flipped": (_set("features", "text_features", True), r"features"),
    "static_without_files": (_set("features", "embedding", "static"), r"features.*static_files"),
    "max_seq_length_zero": (_set("features", "max_seq_length", 0), r"features.max_seq_length"),
    "tensor_table_disagrees": (_set("tensors", "head.coef", "shape", [10, 3]), r"head.coef.*tensors.head.coef"),
    "typo_key": (_set("treshold", 0.1), r"treshold: unknown field"),
    "format_version_2": (_set("format_version", 2), r"format_version: 2 is not 1"),
    "format_version_missing": (_drop("format_version"), r"format_version: None is not 1"),
    "format_version_true": (_set("format_version", True), r"format_version: True is not 1"),
    "format_version_float": (_set("format_version", 1.0), r"format_version: 1.0 is not 1"),
}
for _key in ("models", "strong", "costs", "cost_norm", "threshold", "model", "head", "features", "tensors"):
    SPEC_CORRUPTIONS[f"missing_{_key}"] = (_drop(_key), rf"{_key}: required field is missing")
for _key in ("embedder", "dim", "max_seq_length", "text_features"):
    SPEC_CORRUPTIONS[f"missing_features.{_key}"] = (_drop("features", _key),
                                                    rf"features.{_key}: required field is missing")


@pytest.mark.parametrize("case", sorted(SPEC_CORRUPTIONS))
def test_corrupted_router_json_is_one_line_naming_file_and_field(router_dir, case):
    edit, pattern = SPEC_CORRUPTIONS[case]
    _edit_json(router_dir, edit)
    msg = _load_error(router_dir)
    assert "router." in msg and str(router_dir) in msg, msg
    assert re.search(pattern, msg), msg


def _edit_weights(directory, edit):
    """Rewrite router.safetensors and keep router.json's tensor table in step, so only the arrays are off."""
    weights = load_file(str(directory / "router.safetensors"))
    edit(weights)
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(directory / "router.safetensors"))
    _edit_json(directory, _set("tensors", {k: {"shape": list(v.shape), "dtype": str(v.dtype)}
                                           for k, v in weights.items()}))


def _put(name, fn):
    def edit(w):
        w[name] = fn(w[name])
    return edit


WEIGHT_CORRUPTIONS = {
    "coef_transposed": (_put("head.coef", lambda v: v.T), r"head.coef: shape \[2, 10\], expected \[10, 2\]"),
    "coef_one_model_short": (_put("head.coef", lambda v: v[:, :1]), r"head.coef: shape"),
    "intercept_missing": (lambda w: w.pop("head.intercept"), r"missing \['head.intercept'\]"),
    "extra_tensor": (lambda w: w.update({"head.w1": np.zeros((10, 4), np.float32)}), r"unexpected \['head.w1'\]"),
    "nan_weight": (_put("head.coef", lambda v: np.where(np.arange(v.size).reshape(v.shape) == 3, np.nan, v)),
                   r"head.coef: holds NaN"),
    "inf_scale": (_put("feat.scale", lambda v: np.full_like(v, np.inf)), r"feat.scale: holds NaN or infinite"),
    "zero_scale": (_put("feat.scale", lambda v: np.zeros_like(v)), r"feat.scale: feature scales must be > 0"),
    "integer_coef": (_put("head.coef", lambda v: v.astype(np.int64)), r"head.coef: dtype int64"),
    "scalar_mean": (_put("feat.mean", lambda v: v[:1].reshape(())), r"feat.mean: shape"),
}


@pytest.mark.parametrize("case", sorted(WEIGHT_CORRUPTIONS))
def test_corrupted_weights_are_one_line_naming_file_and_tensor(router_dir, case):
    edit, pattern = WEIGHT_CORRUPTIONS[case]
    _edit_weights(router_dir, edit)
    msg = _load_error(router_dir)
    assert "router.safetensors" in msg, msg
    assert re.search(pattern, msg), msg


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


FILE_CORRUPTIONS = {
    "json_missing": (lambda d: (d / "router.json").unlink(), r"router.json: not found"),
    "json_truncated": (lambda d: _truncate(d / "router.json"), r"router.json:\d+: invalid JSON \(.*, column \d+\)"),
    "json_not_utf8": (lambda d: (d / "router.json").write_bytes(b'{"models": "\xff\xfe"}'), r"router.json: not UTF-8"),
    "json_a_list": (lambda d: (d / "router.json").write_text("[1, 2]"), r"router.json: expected a JSON object"),
    "json_empty": (lambda d: (d / "router.json").write_text(""), r"router.json:1: invalid JSON"),
    "weights_missing": (lambda d: (d / "router.safetensors").unlink(), r"router.safetensors: not found"),
    "weights_truncated": (lambda d: _truncate(d / "router.safetensors"), r"router.safetensors: cannot read"),
    "weights_garbage": (lambda d: (d / "router.safetensors").write_bytes(b"\x00" * 64),
                        r"router.safetensors: cannot read"),
}


@pytest.mark.parametrize("case", sorted(FILE_CORRUPTIONS))
def test_damaged_files_are_one_line(router_dir, case):
    damage, pattern = FILE_CORRUPTIONS[case]
    damage(router_dir)
    assert re.search(pattern, _load_error(router_dir))


def test_no_json_error_says_at_at(router_dir):
    (router_dir / "router.json").write_text('{"models": "unterminated')
    msg = _load_error(router_dir)
    assert "at at" not in msg and "Unterminated string starting" in msg, msg


def test_an_embedder_of_another_width_is_refused_not_broadcast(router_dir):
    class Other:  # stands in for a different sentence-transformers model (its own embedding width)
        def encode(self, texts, **kw):
            return np.ones((len(texts), 7), np.float32) / np.sqrt(7)

    router = Router.load(router_dir, embedder=Other())
    with pytest.raises(OptkitError, match=r"embedder gives 7-dim vectors.*trained on features.embedder"):
        router.route("What is 2 + 2?")


def test_the_writer_refuses_what_the_loader_would(tmp_path):
    from toolkit.route.stage import save_router

    spec = write_small_router(tmp_path / "ok")
    weights = load_file(str(tmp_path / "ok" / "router.safetensors"))
    with pytest.raises(OptkitError, match="threshold"):
        save_router(tmp_path / "bad", {**spec, "threshold": None}, weights)
    assert not (tmp_path / "bad" / "router.json").exists()


def test_router_json_is_strict_json(router_dir):
    text = (router_dir / "router.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"router.json holds {c}"))
