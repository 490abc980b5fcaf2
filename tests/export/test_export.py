"""The export stage on the evaluated small run (tests/evaluate/fakerun.py): the bundle's files, manifest and
serve.sh; integrity checks (verify, refusing tampered files); the router and cache loading in a fresh process
that imports only the runtime; the compressed-tensors model loading and generating in vLLM; the MLflow registry."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.evaluate import fakerun
from toolkit.bundle import Bundle, BundleIntegrityError, verify_bundle

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
VLLM_PY = REPO / ".venv-vllm" / "bin" / "python"


def test_bundle_holds_every_part_with_hashes(exported):
    bundle, outcome = exported
    m = json.loads((bundle / "manifest.json").read_text())
    assert {x["name"]: x["kind"] for x in m["models"]} == {
        "student": "hf", "student-base": "hf", "student-lora": "lora", "int8": "hf", "gguf-Q4_1": "gguf"}
    for rel in ("models/student/model.safetensors", "models/student/generation_config.json",
                "models/student/tokenizer.json", "models/int8/config.json", "adapters/student-lora/adapter_config.json",
                "gguf/model-Q4_1.gguf", "gguf/Modelfile", "route/router.json", "route/router.safetensors",
                "cache.json", "serve.sh", "README.md"):
        assert rel in m["files"], rel
        assert m["files"][rel]["sha256"] == hashlib.sha256((bundle / rel).read_bytes()).hexdigest()
    assert not (bundle / "gguf" / "model-Q4_1.gguf").is_symlink()  # a real copy: the bundle stands alone
    # The adapter names its base inside the bundle, not the build machine's path (peft's template README dropped).
    adapter = json.loads((bundle / "adapters/student-lora/adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "models/student-base"
    assert not (bundle / "adapters/student-lora/README.md").exists()
    assert json.loads((bundle / "models/int8/config.json").read_text())["quantization_config"]["quant_method"] \
        == "compressed-tensors"
    assert all(not x.get("missing") for x in m["models"])
    assert m["recipe"]["name"] == fakerun.RUN and m["versions"]["torch"].startswith("2.")
    assert [r["variant"] for r in m["metrics"]][:2] == ["teacher", "student"]
    assert outcome.metrics["files"] == len(m["files"])
    stage_manifest = json.loads((bundle.parent / "manifest.json").read_text())
    assert stage_manifest["bundle_manifest_sha256"] == hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()


def test_serve_script_has_exact_vllm_lines(exported):
    bundle, _ = exported
    text = (bundle / "serve.sh").read_text()
    assert "exec vllm serve ./models/student --served-model-name evtest-student --port 8000" in text
    assert ("vllm serve ./models/student-base --served-model-name evtest-student-base --port 8001 --enable-lora "
            "--lora-modules evtest-student-lora=./adapters/student-lora") in text
    assert "vllm serve ./models/int8 --served-model-name evtest-int8 --port 8002" in text
    assert "ollama create evtest -f Modelfile" in text
    assert subprocess.run(["bash", "-n", str(bundle / "serve.sh")]).returncode == 0
    usage = subprocess.run(["bash", str(bundle / "serve.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "student-base" in usage.stderr
    assert os.access(bundle / "serve.sh", os.X_OK)


def test_model_card_reports_measured_numbers(exported, evaluated):
    bundle, _ = exported
    root, _ = evaluated
    card = (bundle / "README.md").read_text()
    rows = json.loads((root / "artifacts" / fakerun.RUN / "evaluate" / "variants.json").read_text())
    teacher = rows[0]
    assert f"| teacher | transformers | {teacher['quality']:.3g} |" in card
    assert "## Limits" in card and "11 held-out prompts" in card and "--enable-lora" in card


def test_verify_accepts_the_bundle_and_refuses_tampering(exported, capsys):
    from toolkit.cli import main

    bundle, _ = exported
    assert verify_bundle(bundle) == []
    assert main(["verify", str(bundle)]) == 0
    target = bundle / "route" / "router.safetensors"
    original = target.read_bytes()
    extra = bundle / "models" / "student" / "notes.txt"
    try:
        target.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one bit, same size
        extra.write_text("added after export")
        problems = verify_bundle(bundle)
        assert "route/router.safetensors: sha256 does not match the manifest" in problems
        assert "models/student/notes.txt: not listed in the manifest" in problems
        capsys.readouterr()
        assert main(["verify", str(bundle)]) == 1
        assert "MISMATCH route/router.safetensors" in capsys.readouterr().out
        with pytest.raises(BundleIntegrityError, match="refusing to load route/router.safetensors"):
            Bundle.open(bundle).router()
        with pytest.raises(BundleIntegrityError):
            Bundle.open(bundle, verify=True)
    finally:
        target.write_bytes(original)
        extra.unlink(missing_ok=True)
    assert verify_bundle(bundle) == []
    digest = Bundle.open(bundle).manifest_sha256()
    assert main(["verify", str(bundle), "--manifest-sha256", digest]) == 0
    assert main(["verify", str(bundle), "--manifest-sha256", "0" * 64]) == 1
    assert main(["verify", str(bundle.parent.parent)]) == 2  # not a bundle: a user error


RUNTIME_ONLY = r"""
import json, sys
from toolkit.bundle import Bundle
from toolkit.cache import SemanticCache
from toolkit.route import Router
# Before any embedder loads, the runtime itself costs numpy (+ safetensors) only.
before_embedder = sorted(m for m in ("torch", "transformers", "sentence_transformers", "sklearn", "scipy")
                         if m in sys.modules)
b = Bundle.open(sys.argv[1])
router, cache = b.router(), b.cache()
prompt = "I want to cancel my order"
choice = router.route(prompt)
assert cache.lookup(prompt) is None
cache.insert(prompt, "ORDER")
exact = cache.lookup(prompt)
near = cache.lookup("i want to cancel my order please")
# sentence-transformers brings torch/transformers (and peft/sklearn) with the embedder; optkit's own training
# side and the heavy tools must stay out.
training = sorted(m for m in sys.modules if m.split(".")[0] in ("mlflow", "llmcompressor", "llama_cpp", "matplotlib",
                  "vllm") or (m.startswith("toolkit.") and m not in ("toolkit.bundle", "toolkit.cache",
                  "toolkit.cache.runtime", "toolkit.cache.space", "toolkit.cache.cachefile", "toolkit.cache.local",
                  "toolkit.route",
                  "toolkit.route.runtime", "toolkit.route.spec", "toolkit.route.shift", "toolkit.errors",
                  "toolkit.io", "toolkit.models") and not m.startswith("toolkit.route.routers")))
# (toolkit.route.routers[.<model>]: the numpy predictor of the router loaded, by design its only import there)
print(json.dumps({"choice": choice, "models": router.models, "exact": exact.exact, "answer": exact.answer,
                  "near": None if near is None else [near.answer, near.similarity], "threshold": cache.threshold,
                  "training": training, "before_embedder": before_embedder}))
"""


def test_router_and_cache_load_in_a_fresh_runtime_only_process(exported):
    bundle, _ = exported
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", RUNTIME_ONLY, str(bundle)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["training"] == [] and out["before_embedder"] == []
    assert out["models"] == ["student", "teacher"] and out["choice"] in out["models"]
    assert out["exact"] is True and out["answer"] == "ORDER"
    assert out["threshold"] == 0.93
    if out["near"] is not None:  # a paraphrase is served only above the tuned threshold
        assert out["near"][0] == "ORDER" and out["near"][1] >= 0.93


@pytest.mark.skipif(not VLLM_PY.exists(), reason="no vLLM venv: run bash .ci/setup_vllm_cpu.sh (CI does)")
def test_exported_models_generate_in_vllm(exported):
    """The bundle's compressed-tensors model loads and generates in vLLM through evaluate's in-process engine."""
    bundle, _ = exported
    assert Bundle.open(bundle, verify=True)  # hash-checked before anything is handed to vLLM
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env["PYTHONPATH"] = str(REPO)  # for toolkit.evaluate.engines (stdlib imports only)
    proc = subprocess.run([str(VLLM_PY), str(Path(__file__).with_name("vllm_bundle.py")), str(bundle)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["name"]: r for r in (json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))}
    int8 = results["int8"]
    assert int8["quantization"] == "compressed-tensors" and int8["batch"] == 2 and 1 <= int8["tokens"] <= 8
    assert 0 < int8["ttft"] <= int8["e2e"] and int8["timed_tokens"] == int8["tokens"] and int8["ppl"] > 1


def start_serve_sh(bundle: Path, args: list[str], env: dict, log_path: Path, timeout_s: float):
    """`bash serve.sh ARGS` in its own process group: (process, its /v1/models reply, None if it never answered)."""
    import time

    import httpx

    port = args[args.index("--port") + 1]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["bash", str(bundle / "serve.sh"), *args], env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline, models = time.monotonic() + timeout_s, None
    while proc.poll() is None and time.monotonic() < deadline and models is None:
        try:
            models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()
        except httpx.HTTPError:
            time.sleep(0.3)
    return proc, models


@pytest.mark.server
@pytest.mark.skipif(not VLLM_PY.exists(), reason="no vLLM venv: run bash .ci/setup_vllm_cpu.sh (CI does)")
def test_serve_sh_starts_vllm_cpu_and_serves_the_adapter_on_its_base(exported, tmp_path):
    """What a CPU user types: `VLLM_PYTHON=... ./serve.sh student-base --port N`. vllm-cpu's `vllm` script is
    broken, so serve.sh's shim starts vLLM's python -m entry point; the LoRA adapter answers under its served name,
    flags after the name reach the server, and the model's worker runs inside the engine process."""
    import httpx

    from toolkit.engines.servers import free_port
    from toolkit.procs import kill_group

    import shutil
    import tempfile

    bundle, _ = exported
    port = free_port()
    # serve.sh's shim lands in $TMPDIR, and so do vLLM's zmq IPC sockets, whose paths may not exceed 107 bytes: a
    # pytest tmp_path (pytest-of-<user>/pytest-<N>/popen-gw0/<test>/) is too long on a machine with many runs
    short_tmp = tempfile.mkdtemp(prefix="optkit-")
    env = {**os.environ, "VLLM_PYTHON": str(VLLM_PY), "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "TMPDIR": short_tmp}
    env.pop("PYTHONPATH", None)
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not (Path(p) / "vllm").exists())
    flags = ["--port", str(port), "--max-model-len", "256", "--enforce-eager", "--gpu-memory-utilization", "0.2"]
    proc, models = start_serve_sh(bundle, ["student-base", *flags], env, tmp_path / "serve.log", 300)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        assert models is not None, (tmp_path / "serve.log").read_text()[-3000:]
        assert {"evtest-student-base", "evtest-student-lora"} <= {m["id"] for m in models["data"]}
        r = httpx.post(f"{base}/chat/completions", timeout=120, json={
            "model": "evtest-student-lora", "messages": [{"role": "user", "content": "I want to cancel my order"}],
            "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
        # bash exec'd the shim, which exec'd Python: the server is the process we started.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
        assert cmdline[:3] == [str(VLLM_PY).encode(), b"-m", b"vllm.entrypoints.openai.api_server"], cmdline
        assert cmdline[-3:-1] == [b"--distributed-executor-backend", b"uni"]
        assert b"VLLM_ENABLE_V1_MULTIPROCESSING=0" in environ
    finally:
        kill_group(proc.pid, 10.0, child=proc)
        shutil.rmtree(short_tmp, ignore_errors=True)


@pytest.mark.server
def test_serve_sh_serves_the_gguf_with_llama_cpp_python_when_llama_server_is_missing(exported, tmp_path):
    """No `llama-server` binary on PATH (pip installs have none): serve.sh starts llama-cpp-python's server from
    $LLAMA_CPP_PYTHON on the same port; with neither it says what is missing and exits 127."""
    import shutil

    pytest.importorskip("llama_cpp.server")

    from toolkit.engines.servers import free_port
    from toolkit.procs import kill_group

    bundle, _ = exported
    port = free_port()
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "llama-server").exists())
    env = {**os.environ, "PATH": path, "LLAMA_CPP_PYTHON": sys.executable}
    assert shutil.which("llama-server", path=path) is None
    proc, models = start_serve_sh(bundle, ["gguf-Q4_1", "--port", str(port), "--n_threads", "1"], env,
                                  tmp_path / "serve.log", 120)
    try:
        assert models and models["data"], (tmp_path / "serve.log").read_text()[-2000:]
        assert Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[1:3] == [b"-m", b"llama_cpp.server"]
    finally:
        kill_group(proc.pid, 10.0, child=proc)
    bare = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    none = subprocess.run(["bash", str(bundle / "serve.sh"), "gguf-Q4_1"], env=bare, capture_output=True, text=True)
    assert none.returncode == 127 and "neither llama-server nor llama-cpp-python[server]" in none.stderr


def test_bundle_is_registered_in_mlflow(exported, evaluated):
    from mlflow.tracking import MlflowClient

    bundle, _ = exported
    root, _ = evaluated
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    (version,) = client.search_model_versions("name = 'evtest'")
    assert version.source.endswith("/bundle")
    assert version.tags["optkit.manifest_sha256"] == Bundle.open(bundle).manifest_sha256()
    artifacts = {a.path for a in client.list_artifacts(version.run_id, "bundle")}
    assert "bundle/manifest.json" in artifacts and "bundle/serve.sh" in artifacts


def test_export_leaves_out_parts_whose_stage_did_not_run(built_root, tmp_path):
    from toolkit.config import recipe_from_dict
    from toolkit.pipeline import run_pipeline

    fakerun.copy_run(built_root, tmp_path)
    data = fakerun.recipe_dict(tmp_path, export={"include": ["student", "route", "cache"]})
    for stage in ("quantize", "evaluate"):
        data.pop(stage, None)
    run_pipeline(recipe_from_dict(data), only="export")
    bundle = tmp_path / "artifacts" / fakerun.RUN / "export" / "bundle"
    m = json.loads((bundle / "manifest.json").read_text())
    assert [x["name"] for x in m["models"]] == ["student"]
    assert m["metrics"] == [] and "No evaluate stage ran" in (bundle / "README.md").read_text()
    assert not (bundle / "gguf").exists() and not (bundle / "adapters").exists()
    assert verify_bundle(bundle) == []


def test_unknown_quantized_artifact_is_a_one_line_error(built_root, tmp_path):
    from toolkit.config import recipe_from_dict
    from toolkit.errors import OptkitError
    from toolkit.pipeline import run_pipeline

    fakerun.copy_run(built_root, tmp_path)
    data = fakerun.recipe_dict(tmp_path, export={"quantized": ["awq"]})
    data.pop("evaluate", None)
    with pytest.raises(OptkitError, match=r"export.quantized: 'awq' is not an artifact .* \(has: int8, gguf-Q4_1\)"):
        run_pipeline(recipe_from_dict(data), only="export")
