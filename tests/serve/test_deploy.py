"""Export's deployment files, checked structurally (no Docker or cluster here): docker-compose.yaml runs serve.sh's
exact model-server commands on serve.sh's ports with the bundle mounted where those commands read it, the gateway's
config reaches each backend by service name, and the Kubernetes manifests wire serve.yaml, probes, ports and
mounts together. Also: the run summary ends with the command that serves the bundle."""

from __future__ import annotations

import re
import shlex
from types import SimpleNamespace

import pytest
import yaml

from toolkit.config.serve import ServeConfig, load_serve_config

PORT, PREFIX = 8000, "evtest"
MODELS = [
    {"name": "student", "kind": "hf", "path": "models/student", "served_name": "evtest-student"},
    {"name": "student-base", "kind": "hf", "path": "models/student-base", "served_name": "evtest-student-base"},
    {"name": "student-lora", "kind": "lora", "path": "adapters/student-lora", "served_name": "evtest-student-lora",
     "base": "models/student-base", "rank": 32},
    {"name": "gguf-Q4_1", "kind": "gguf", "path": "gguf/model-Q4_1.gguf"},
]


def make_bundle(root, api_teacher: bool = True):
    """A bundle directory with the model paths in MODELS, serve.sh, serve.yaml and the deployment files, written
    by export's own functions (teacher: an external API whose key is in OPENAI_API_KEY, or a local one)."""
    from toolkit.export.build import write_deploy
    from toolkit.export.serve import serve_script
    from toolkit.serve.bundle_config import serve_yaml

    for m in MODELS:
        path = root / m["path"]
        if m["kind"] == "gguf":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"GGUF")
        else:
            path.mkdir(parents=True)
            (path / "config.json").write_text("{}")
    openai = SimpleNamespace(base_url="https://api.example.com/v1", model="gpt-x", api_key_env="OPENAI_API_KEY")
    recipe = SimpleNamespace(collect=SimpleNamespace(backend="openai" if api_teacher else "hf", openai=openai),
                             teacher=SimpleNamespace(model="gpt-x"), evaluate=None)
    (root / "serve.sh").write_text(serve_script(MODELS, PREFIX, PORT, ["--max-model-len", "2048"]))
    (root / "serve.yaml").write_text(serve_yaml(MODELS, PREFIX, PORT, recipe))
    write_deploy(root, MODELS, PREFIX, SimpleNamespace(port=PORT, vllm_args=["--max-model-len", "2048"]))
    return root


@pytest.fixture
def bundle(tmp_path):
    return make_bundle(tmp_path / "bundle")


def serve_sh_lines(root) -> dict[str, list[str]]:
    """serve.sh case name -> the argv it execs."""
    text = (root / "serve.sh").read_text()
    # each model line ends in "${@:2}" (flags after the name reach the server): not part of the command itself
    # (a GGUF's case tries llama-server first, then llama-cpp-python: its llama-server line is the one compared)
    return {name: [a for a in shlex.split(line) if a != "${@:2}"]
            for name, line in re.findall(r"^  ([\w.-]+)\)\n(?:    if .*\n)?\s+exec ((?:vllm|llama-server) .+)$",
                                         text, re.M)}


def test_compose_runs_serve_sh_commands_and_the_gateway(bundle):
    compose = yaml.safe_load((bundle / "docker-compose.yaml").read_text())
    services = compose["services"]
    sh = serve_sh_lines(bundle)
    assert set(services) == {"gateway", "vllm-student", "vllm-student-base", "llama-gguf-q4-1"}
    for name, svc in services.items():
        if name == "gateway":
            continue
        assert svc["volumes"] == ["./:/bundle:ro"] and svc["working_dir"] == "/bundle"
        argv = (svc.get("entrypoint") or ["llama-server"]) + svc["command"]
        model = name.split("-", 1)[1] if name.startswith("vllm-") else "gguf-Q4_1"
        assert argv[:argv.index("--host")] + argv[argv.index("--host") + 2:] == sh[model]  # serve.sh's own line
        port = argv[argv.index("--port") + 1]
        assert svc["expose"] == [port] and port in " ".join(svc["healthcheck"]["test"])
        for arg in argv:  # every bundle path a command reads exists under the mount
            for rel in re.findall(r"\./([\w./-]+)", arg):
                assert (bundle / rel).exists(), rel
        gpu = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        assert bool(gpu) == name.startswith("vllm-")
    assert services["vllm-student"]["image"].startswith("vllm/vllm-openai:")
    assert "--lora-modules" in services["vllm-student-base"]["command"]

    gw = services["gateway"]
    assert gw["ports"] == ["8080:8080"] and gw["volumes"] == ["./:/bundle:ro"]
    assert gw["command"][:5] == ["optkit", "serve", "/bundle", "--config", "/bundle/serve.compose.yaml"]
    # The gateway waits for the one model server its config calls; the others (each claiming a GPU) are opt-in.
    assert set(gw["depends_on"]) == {"vllm-student"} and compose["name"] == "optkit-evtest"
    assert {n: s.get("profiles") for n, s in services.items() if n != "gateway"} == {
        "vllm-student": None, "vllm-student-base": ["all-models"], "llama-gguf-q4-1": ["all-models"]}
    assert gw["environment"] == {"OPENAI_API_KEY": "${OPENAI_API_KEY:?set OPENAI_API_KEY to the teacher's key}"}

    cfg = load_serve_config(bundle / "serve.compose.yaml")  # what the gateway will load, validated
    local = load_serve_config(bundle / "serve.yaml")
    student = cfg.backends["student"]
    host, port = re.match(r"http://([\w-]+):(\d+)/v1$", student.base_url).groups()
    served = services[host]["command"]
    assert services[host]["expose"] == [port] and served[served.index("--served-model-name") + 1] == student.model
    assert local.backends["student"].base_url == f"http://127.0.0.1:{port}/v1"  # the same server serve.sh starts
    assert cfg.backends["teacher"] == local.backends["teacher"]  # external: unchanged, key by env var only


def test_kubernetes_gateway_manifests(bundle):
    docs = list(yaml.safe_load_all((bundle / "k8s/gateway.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ConfigMap", "Deployment", "Service"}
    cfg = ServeConfig.model_validate(yaml.safe_load(kinds["ConfigMap"]["data"]["serve.yaml"]))
    assert cfg.backends["student"].base_url == "http://evtest-vllm-student:8000/v1"
    assert cfg.model_name == load_serve_config(bundle / "serve.yaml").model_name

    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["ports"] == [{"name": "http", "containerPort": 8080}]
    assert c["command"][c["command"].index("--port") + 1] == "8080"
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts) == set(volumes)
    assert c["command"][2] == mounts["bundle"] and "persistentVolumeClaim" in volumes["bundle"]
    config_arg = c["command"][c["command"].index("--config") + 1]
    assert config_arg == f"{mounts['config']}/serve.yaml"
    assert volumes["config"]["configMap"]["name"] == kinds["ConfigMap"]["metadata"]["name"]
    assert c["env"][0]["name"] == "OPENAI_API_KEY" and "secretKeyRef" in c["env"][0]["valueFrom"]

    svc = kinds["Service"]["spec"]
    labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert svc["selector"] == labels == kinds["Deployment"]["spec"]["selector"]["matchLabels"]
    assert svc["ports"] == [{"name": "http", "port": 8080, "targetPort": "http"}]
    text = (bundle / "k8s/gateway.yaml").read_text()
    assert "sk-" not in text and "&id0" not in text  # no key, no YAML anchors


def test_a_local_teacher_is_reached_outside_the_gateway_container(tmp_path):
    """serve.yaml's local teacher (127.0.0.1:8100) would be the gateway's own loopback inside a container: compose
    reaches it on the Docker host, Kubernetes as a Service; its optional key variable is passed, not required."""
    root = make_bundle(tmp_path / "bundle", api_teacher=False)
    assert load_serve_config(root / "serve.yaml").backends["teacher"].base_url == "http://127.0.0.1:8100/v1"
    compose = yaml.safe_load((root / "docker-compose.yaml").read_text())
    gw = compose["services"]["gateway"]
    assert load_serve_config(root / "serve.compose.yaml").backends["teacher"].base_url == \
        "http://host.docker.internal:8100/v1"
    assert gw["extra_hosts"] == ["host.docker.internal:host-gateway"]
    assert gw["environment"] == {"OPTKIT_TEACHER_API_KEY": "${OPTKIT_TEACHER_API_KEY:-}"}
    assert "Not started here: teacher" in (root / "docker-compose.yaml").read_text()
    text = (root / "k8s/gateway.yaml").read_text()
    docs = {d["kind"]: d for d in yaml.safe_load_all(text)}
    cfg = ServeConfig.model_validate(yaml.safe_load(docs["ConfigMap"]["data"]["serve.yaml"]))
    assert cfg.backends["teacher"].base_url == "http://evtest-teacher:8100/v1"
    assert "evtest-vllm-student:8000, evtest-teacher:8100" in text and "127.0.0.1" not in text
    (c,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert c["env"] == [{"name": "OPTKIT_TEACHER_API_KEY", "valueFrom": {"secretKeyRef": {
        "name": "evtest-gateway-keys", "key": "OPTKIT_TEACHER_API_KEY", "optional": True}}}]


def test_summary_ends_with_the_serve_command(tmp_path, capsys):
    from toolkit.pipeline import StageOutcome
    from toolkit.ui import print_summary

    run_dir = tmp_path / "artifacts" / "quickstart"
    outcomes = [StageOutcome("evaluate", "ran", 1.0, {}), StageOutcome("export", "ran", 0.5, {"files": 3})]
    print_summary(run_dir, outcomes)
    assert "optkit serve" not in capsys.readouterr().err  # no bundle on disk: nothing to serve
    (run_dir / "export" / "bundle").mkdir(parents=True)
    (run_dir / "export" / "bundle" / "manifest.json").write_text("{}")
    print_summary(run_dir, outcomes)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith(f"optkit serve {run_dir}/export/bundle --port 8080")
    print_summary(run_dir, outcomes[:1])  # no export stage this run
    assert "optkit serve" not in capsys.readouterr().err
