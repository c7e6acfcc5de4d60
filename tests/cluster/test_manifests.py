"""cluster/ against Ray's own validators and against the stage configs it launches.

Nothing here starts Ray or contacts any address: the launcher YAML goes through the autoscaler's
``prepare_config`` + ``validate_config`` (JSON schema, defaults merge, node types), the Serve config through
``ServeDeploySchema``, runtime envs through ``RuntimeEnv``. KubeRay CRDs have no offline validator, so the
RayCluster / RayJob / RayService checks are structural plus what matters to us: every entrypoint builds a
valid stage config, the pods can hold the workers that config asks for, stages read where earlier stages
write, and secrets come from Kubernetes Secrets. A stage whose module or config file has not landed yet is
skipped with the reason, so these checks tighten as the stages arrive.
"""

from __future__ import annotations

import ast
import copy
import importlib
import importlib.util
import inspect
import re
import shlex
import socket
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from jobs.submit import EXCLUDES, JOB_ENV
from stmed.config import build_config, config_to_dict, read_yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
CONFIGS = REPO / "jobs" / "configs"
STAGES = ["sft", "generate", "dpo", "evaluate"]
SHARED = "/mnt/shared"
RUNS = "/mnt/shared/stmed/runs/"
ALL_YAML = sorted(CLUSTER.rglob("*.yaml")) + sorted(CONFIGS.rglob("*.yaml"))


def _dockerfile(instruction: str) -> str:
    lines = (CLUSTER / "Dockerfile").read_text().splitlines()
    return next(line.split(None, 1)[1] for line in lines if line.startswith(instruction + " "))


IMAGE_ROOT = _dockerfile("WORKDIR")  # where the image holds the project: the RayJobs' working_dir


def _doc(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path}: expected one YAML document, found {len(docs)}"
    return docs[0]


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every mapping inside a YAML tree."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _in_repo(path: str) -> Path:
    """A path as the image sees it (/home/ray/stmed/…) or relative to it, mapped onto this checkout."""
    return REPO / Path(path).relative_to(IMAGE_ROOT) if path.startswith(IMAGE_ROOT) else REPO / path


def _config_class(module_name: str) -> type:
    """The dataclass a job's ``__main__`` parses: ``run_job(main, <ConfigClass>)`` or ``load_config(<ConfigClass>)``."""
    module = importlib.import_module(module_name)
    tree = ast.parse(Path(module.__file__).read_text())
    for node in ast.walk(tree):
        name = getattr(node.func, "id", None) if isinstance(node, ast.Call) else None
        if name == "run_job" and len(node.args) == 2:
            return getattr(module, node.args[1].id)
        if name == "load_config" and node.args:
            return getattr(module, node.args[0].id)
    raise AssertionError(f"{module_name} never calls run_job(main, <ConfigClass>) or load_config(<ConfigClass>)")


def _stage_or_skip(stage: str) -> tuple[str, Path]:
    module = f"jobs.{stage}"
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"jobs/{stage}.py does not exist yet; this check runs once it lands")
    config = CONFIGS / f"{stage}.yaml"
    if not config.is_file():
        pytest.skip(f"jobs/configs/{stage}.yaml does not exist yet; this check runs once it lands")
    return module, config


def _entrypoint(stage: str) -> tuple[str, str, list[str]]:
    """(module, config path, overrides) of rayjob-<stage>.yaml, checked for the launch shape."""
    argv = shlex.split(_doc(KUBERAY / f"rayjob-{stage}.yaml")["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", f"jobs.{stage}"] and argv[3] == "--config", argv
    return argv[2], argv[4], argv[5:]


def _stage_config(stage: str) -> Any:
    """The config rayjob-<stage>.yaml would run, built by the stage's own config class."""
    _stage_or_skip(stage)
    module, config, overrides = _entrypoint(stage)
    return build_config(_config_class(module), read_yaml(_in_repo(config)), overrides)


def _cluster_spec(stage: str) -> dict[str, Any]:
    """The RayCluster spec a RayJob runs on: its own rayClusterSpec, or the RayCluster it selects."""
    spec = _doc(KUBERAY / f"rayjob-{stage}.yaml")["spec"]
    if "rayClusterSpec" in spec:
        return spec["rayClusterSpec"]
    name = spec["clusterSelector"]["ray.io/cluster"]
    clusters = [_doc(p) for p in KUBERAY.glob("*.yaml") if _doc(p).get("kind") == "RayCluster"]
    matches = [c["spec"] for c in clusters if c["metadata"]["name"] == name]
    assert len(matches) == 1, f"rayjob-{stage}.yaml selects RayCluster '{name}', found {len(matches)}"
    return matches[0]


def _groups(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Head and worker groups, each with ``replicas`` (the head counts once)."""
    return [{"replicas": 1, **spec["headGroupSpec"]}, *spec.get("workerGroupSpecs", [])]


def _quantity(value: Any) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _fit(groups: list[dict[str, Any]], cpus_each: float, gpus_each: float) -> int:
    """How many actors of (cpus_each, gpus_each) the pods hold; Ray takes CPUs/GPUs from the pod limits."""
    total = 0
    for group in groups:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        params = group.get("rayStartParams") or {}
        cpus = _quantity(params.get("num-cpus", limits["cpu"]))
        gpus = _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
        per_pod = min(
            cpus // cpus_each if cpus_each else float("inf"), gpus // gpus_each if gpus_each else float("inf")
        )
        total += int(per_pod) * int(group["replicas"])
    return total


def _ray_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [g["template"]["spec"]["containers"][0] for g in _groups(spec)]


def _all_cluster_specs() -> dict[str, dict[str, Any]]:
    specs = {
        "raycluster.yaml": _doc(KUBERAY / "raycluster.yaml")["spec"],
        "rayservice.yaml": _doc(KUBERAY / "rayservice.yaml")["spec"]["rayClusterConfig"],
        "rayservice-review.yaml": _doc(KUBERAY / "rayservice-review.yaml")["spec"]["rayClusterConfig"],
    }
    for stage in STAGES:
        job = _doc(KUBERAY / f"rayjob-{stage}.yaml")["spec"]
        if "rayClusterSpec" in job:
            specs[f"rayjob-{stage}.yaml"] = job["rayClusterSpec"]
    return specs


# ----------------------------------------------------------------------------- every file


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_parses_to_a_mapping(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), path


def test_no_secret_values_in_any_manifest() -> None:
    def secret(name: str) -> bool:  # OPENAI_API_KEY, RAY_AUTH_TOKEN… but not TOKENIZERS_PARALLELISM
        return bool({"KEY", "APIKEY", "TOKEN", "SECRET", "PASSWORD"} & set(name.upper().split("_")))

    for path in sorted(CLUSTER.rglob("*.yaml")):
        for node in _walk(_doc(path)):
            if "name" in node and "value" in node and secret(str(node["name"])):
                pytest.fail(
                    f"{path.name}: env {node['name']} has a literal value; use valueFrom.secretKeyRef"
                )
            for text in (v for k, v in node.items() if k in ("runtimeEnvYAML", "serveConfigV2")):
                env = next((n["env_vars"] for n in _walk(yaml.safe_load(text)) if "env_vars" in n), {})
                assert not [k for k in env if secret(k)], f"{path.name}: secret-like env var in {env}"


# ----------------------------------------------------------------------------- runtime env


def test_runtime_env_file_is_valid_and_matches_the_submit_helper() -> None:
    from ray.runtime_env import RuntimeEnv

    data = read_yaml(CLUSTER / "runtime_env.yaml")
    RuntimeEnv(**data, working_dir=str(REPO))  # Ray's own validation of every field
    assert data["excludes"] == EXCLUDES and data["env_vars"] == JOB_ENV
    assert {".venv", "runs", ".git"} <= set(data["excludes"])
    assert "pip" not in data and "conda" not in data, "nodes have the project installed; no per-job venv"


# ----------------------------------------------------------------------------- cluster launcher


@pytest.fixture
def launcher(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """ray-cluster.yaml through the autoscaler's own preparation and validation, with the network cut."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"the launcher config check tried to reach the network: {args}")

    for name in ("getaddrinfo", "create_connection"):
        monkeypatch.setattr(socket, name, refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    prepared = prepare_config(copy.deepcopy(read_yaml(CLUSTER / "ray-cluster.yaml")))
    validate_config(prepared)
    return prepared


def test_launcher_passes_ray_validation(launcher: dict[str, Any]) -> None:
    assert launcher["provider"]["type"] == "aws"
    assert launcher["head_node_type"] in launcher["available_node_types"]
    gpu_types = [t for t in launcher["available_node_types"].values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types and all(t["min_workers"] >= 1 for t in gpu_types)


def test_launcher_validation_is_not_vacuous() -> None:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = read_yaml(CLUSTER / "ray-cluster.yaml")
    broken["max_worker"] = 2  # a typo of max_workers
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(broken))


def test_launcher_dashboard_on_loopback_with_token_auth(launcher: dict[str, Any]) -> None:
    head = " ".join(launcher["head_start_ray_commands"])
    worker = " ".join(launcher["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head + worker
    assert "RAY_AUTH_MODE=token ray start" in head and "RAY_AUTH_MODE=token ray start" in worker
    assert launcher["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_launcher_installs_the_project_with_the_gpu_extra(launcher: dict[str, Any]) -> None:
    remote = next(r for r, local in launcher["file_mounts"].items() if local == ".")
    assert launcher["setup_commands"] == [f'cd {remote} && pip install --quiet -e ".[gpu]"']
    assert "gpu" in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert launcher["rsync_filter"] == [".gitignore"], "the checkout's .venv and runs/ must not be synced"


def test_launcher_and_image_run_the_installed_ray() -> None:
    expected = f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert read_yaml(CLUSTER / "ray-cluster.yaml")["docker"]["image"] == expected
    assert _dockerfile("FROM") == expected


@pytest.mark.parametrize("stage", STAGES)
def test_launcher_gpu_node_holds_each_stage(stage: str, launcher: dict[str, Any]) -> None:
    _, config = _stage_or_skip(stage)
    ray_cfg = read_yaml(config).get("ray", {})
    workers, cpw = ray_cfg.get("num_workers", 2), ray_cfg.get("cpus_per_worker", 1.0)
    gpus_each = 1 if ray_cfg.get("use_gpu") else 0
    fit = 0
    for name, node in launcher["available_node_types"].items():
        count = 1 if name == launcher["head_node_type"] else node["max_workers"]
        res = node["resources"]
        per_node = min(
            res.get("CPU", 0) // cpw, res.get("GPU", 0) // gpus_each if gpus_each else float("inf")
        )
        fit += int(per_node) * count
    assert fit >= workers, f"{stage}: {workers} workers x ({cpw} CPU, {gpus_each} GPU) do not fit the nodes"


# ----------------------------------------------------------------------------- KubeRay


def test_kuberay_kinds_and_names() -> None:
    assert _doc(KUBERAY / "raycluster.yaml")["kind"] == "RayCluster"
    assert _doc(KUBERAY / "rayservice.yaml")["kind"] == "RayService"
    assert _doc(KUBERAY / "rayservice-review.yaml")["kind"] == "RayService"
    storage = _doc(KUBERAY / "storage.yaml")
    assert storage["kind"] == "PersistentVolumeClaim" and storage["spec"]["accessModes"] == ["ReadWriteMany"]
    for stage in STAGES:
        job = _doc(KUBERAY / f"rayjob-{stage}.yaml")
        assert (job["apiVersion"], job["kind"], job["metadata"]["name"]) == (
            "ray.io/v1",
            "RayJob",
            f"stmed-{stage}",
        )
        assert job["spec"].get("shutdownAfterJobFinishes") is not True or "rayClusterSpec" in job["spec"]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayservice.yaml", "rayservice-review.yaml"])
def test_cluster_specs_are_consistent(name: str) -> None:
    spec = _all_cluster_specs()[name]
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}, (
        "the dashboard listens on the pod IP: token auth is required"
    )
    images = {c["image"] for c in _ray_containers(spec)}
    assert len(images) == 1, f"{name}: head and workers must run one image, got {images}"
    claim = _doc(KUBERAY / "storage.yaml")["metadata"]["name"]
    for group in _groups(spec):
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        assert container["resources"]["requests"] == container["resources"]["limits"], (
            "Ray sizes itself from limits"
        )
        mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        shared = [
            n for n, v in volumes.items() if v.get("persistentVolumeClaim", {}).get("claimName") == claim
        ]
        assert shared and mounts.get(shared[0]) == SHARED, f"{name}: every pod mounts {claim} at {SHARED}"


def test_no_kubernetes_object_exposes_the_cluster() -> None:
    for path in sorted(KUBERAY.glob("*.yaml")):
        doc = _doc(path)
        assert doc["kind"] not in ("Ingress", "Service"), f"{path.name}: the cluster stays ClusterIP-only"
        for node in _walk(doc):
            assert node.get("type") != "LoadBalancer" and "serviceType" not in node, path.name


@pytest.mark.parametrize("stage", STAGES)
def test_rayjob_runtime_env(stage: str) -> None:
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(_doc(KUBERAY / f"rayjob-{stage}.yaml")["spec"]["runtimeEnvYAML"])
    assert env["working_dir"] == IMAGE_ROOT
    assert env["excludes"] == EXCLUDES and env["env_vars"] == JOB_ENV
    RuntimeEnv(**{**env, "working_dir": str(REPO)})  # Ray's validation, on this checkout as the image's copy


@pytest.mark.parametrize("stage", STAGES)
def test_rayjob_entrypoint_builds_the_stage_config(stage: str) -> None:
    module, config, _ = _entrypoint(stage)
    _stage_or_skip(stage)
    assert _in_repo(config).is_file()
    cfg = _stage_config(stage)  # raises ConfigError on an unknown key or a bad value in the overrides
    assert cfg.output_dir == RUNS + stage
    assert importlib.import_module(module).main, f"{module} has no main()"


@pytest.mark.parametrize("stage", STAGES)
def test_rayjob_cluster_holds_the_stage_workers(stage: str) -> None:
    ray_cfg = _stage_config(stage).ray
    spec = _cluster_spec(stage)
    fit = _fit(_groups(spec), ray_cfg.cpus_per_worker, 1 if ray_cfg.use_gpu else 0)
    assert fit >= ray_cfg.num_workers, (
        f"{stage}: ray.num_workers={ray_cfg.num_workers} x ({ray_cfg.cpus_per_worker} CPU, "
        f"{int(ray_cfg.use_gpu)} GPU) but the cluster holds {fit}"
    )


@pytest.mark.parametrize("stage", STAGES)
def test_stage_api_keys_come_from_secrets_on_every_pod(stage: str) -> None:
    names = {
        n["api_key_env"]
        for n in _walk(config_to_dict(_stage_config(stage), redact=False))
        if n.get("api_key_env")
    }
    for container in _ray_containers(_cluster_spec(stage)):
        env = {e["name"]: e for e in container.get("env", [])}
        for name in names:
            assert name in env and "secretKeyRef" in env[name].get("valueFrom", {}), (
                f"{stage} reads its key from ${name}: {container['name']} needs it from a Secret"
            )


def test_stages_read_where_earlier_stages_write() -> None:
    """A stage path a landed config names (…/stmed/[runs/]<stage>/…) lies under that stage's RayJob output_dir."""
    outputs = {stage: dict(o.split("=", 1) for o in _entrypoint(stage)[2])["output_dir"] for stage in STAGES}
    stage_path = re.compile(rf"^{re.escape(SHARED)}/stmed/(?:runs/)?({'|'.join(STAGES)})(?:/|$)")
    checked = 0
    for stage in STAGES:
        try:
            cfg = _stage_config(stage)
        except pytest.skip.Exception:
            continue
        for node in _walk(config_to_dict(cfg, redact=False)):
            for key, value in node.items():
                match = stage_path.match(value) if isinstance(value, str) else None
                if match:
                    out = outputs[match.group(1)]
                    assert value == out or value.startswith(out + "/"), (
                        f"rayjob-{stage}.yaml: {key}={value}, but rayjob-{match.group(1)}.yaml writes to {out}"
                    )
                    checked += 1
    if not checked:
        pytest.skip("no landed stage config names another stage's output yet")


# ----------------------------------------------------------------------------- RayService


def _serve_app(name: str = "rayservice.yaml") -> dict[str, Any]:
    from ray.serve.schema import ServeDeploySchema

    serve_config = yaml.safe_load(_doc(KUBERAY / name)["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)  # Serve's own schema: import paths, runtime envs, http
    assert serve_config["http_options"]["host"] == "0.0.0.0", (
        "the serve Service reaches the proxy on the pod IP"
    )
    (app,) = serve_config["applications"]
    return app


def _serve_builder() -> Any:
    module_name, _, attr = _serve_app()["import_path"].partition(":")
    if not (REPO / Path(*module_name.split("."))).with_suffix(".py").is_file():
        pytest.skip(f"{module_name} does not exist yet")
    module = importlib.import_module(module_name)
    if not hasattr(module, attr):
        pytest.skip(
            f"{module_name} has no '{attr}' yet: the RayService needs an application builder "
            f"{attr}(args: dict) -> serve.Application (see the cluster helper's report)"
        )
    return getattr(module, attr)


def test_rayservice_import_path_is_a_serve_application_builder() -> None:
    from ray.serve import Application

    builder = _serve_builder()
    if isinstance(builder, Application):
        return
    params = list(inspect.signature(builder).parameters.values())
    assert callable(builder) and len(params) >= 1, "Serve calls the builder with one argument: the args dict"
    assert all(p.default is not inspect.Parameter.empty for p in params[1:]), (
        f"{builder} needs more than args"
    )


def test_rayservice_args_build_the_serve_config_and_fit_the_cluster() -> None:
    _serve_builder()
    args = _serve_app()["args"]
    cfg = build_config(
        _config_class("jobs.serve"), read_yaml(_in_repo(args["config"])), args.get("overrides", [])
    )
    assert cfg.model.name_or_path == RUNS + "dpo/merged"
    spec = _doc(KUBERAY / "rayservice.yaml")["spec"]["rayClusterConfig"]
    fit = _fit(_groups(spec), cfg.replica.num_cpus, cfg.replica.num_gpus)
    assert fit >= cfg.autoscaling.max_replicas, f"{cfg.autoscaling.max_replicas} replicas, room for {fit}"


def test_launcher_mounts_one_shared_filesystem_on_every_node(launcher: dict[str, Any]) -> None:
    """The driver runs on the head and the workers on the GPU node: without one filesystem at /mnt/shared on
    both, Ray Train refuses its storage and generate's parts split across nodes."""
    init = " ".join(launcher["initialization_commands"])
    assert "mount -t nfs4" in init and ":/ /mnt/shared" in init  # a network filesystem, not a local folder
    assert "/mnt/shared:/mnt/shared" in " ".join(launcher["docker"]["run_options"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):  # Ray starts only on a mounted one
        assert launcher[key][0].startswith("mountpoint -q /mnt/shared ||"), key
    for name in ("raycluster.yaml", "rayservice.yaml"):  # KubeRay: every pod mounts the ReadWriteMany claim
        text = (REPO / "cluster" / "kuberay" / name).read_text()
        assert text.count("claimName: stmed-shared") == 2 and text.count("mountPath: /mnt/shared") == 2
    assert "ReadWriteMany" in (REPO / "cluster" / "kuberay" / "storage.yaml").read_text()


def test_review_rayservice_builds_the_review_config_with_its_database_url_from_a_secret() -> None:
    """rayservice-review.yaml: Serve's schema, jobs.review's builder, a ReviewConfig built from its args that
    reads the database URL from the variable the pod gets from a Secret, and the pairs generate writes."""
    from jobs.review import ReviewConfig, app_builder

    app = _serve_app("rayservice-review.yaml")
    assert app["import_path"] == "jobs.review:app_builder" and callable(app_builder)
    args = app["args"]
    cfg = build_config(ReviewConfig, read_yaml(_in_repo(args["config"])), args.get("overrides", []))
    assert cfg.database is None and cfg.database_env, "a cluster's review database URL comes from a variable"
    assert cfg.output_dir == RUNS + "review"
    generate_out = dict(o.split("=", 1) for o in _entrypoint("generate")[2])["output_dir"]
    assert cfg.queue.preferences == generate_out + "/preferences.parquet"
    spec = _doc(KUBERAY / "rayservice-review.yaml")["spec"]["rayClusterConfig"]
    for container in _ray_containers(spec):  # the builder and the replica may run on any pod
        env = {e["name"]: e for e in container.get("env", [])}
        ref = env[cfg.database_env].get("valueFrom", {}).get("secretKeyRef", {})
        assert ref.get("name") and ref.get("key"), f"{container['name']}: {cfg.database_env} from a Secret"
    assert _fit(_groups(spec), 0.25, 0) >= 1  # the builder's one replica at 0.25 CPU
    text = (KUBERAY / "rayservice-review.yaml").read_text()
    assert text.count("claimName: stmed-shared") == len(_groups(spec)) == text.count("mountPath: /mnt/shared")
