"""Every manifest under k8s/ validates against the schemas of what will run it.

- RayCluster / RayJob / RayService: KubeRay v1.7.0's CRD `openAPIV3Schema` (tests/data/kuberay-crds-v1.7.0),
  made strict the way `kubectl --validate=strict` is (unknown fields are errors, not silently pruned).
- Core kinds (PersistentVolumeClaim, ConfigMap): Kubernetes' own JSON schemas (kubernetes-validate, strict).
- PodMonitor / ServiceMonitor / PrometheusRule: no offline package ships prometheus-operator's schema, so a structural
  schema of the fields we use, closed to unknown fields, stands in for it.
- kustomization.yaml: built by kustomize itself (`kubectl kustomize`), which rejects unknown fields.
- RayService.serveConfigV2: Ray Serve's own `ServeDeploySchema`, and it must be the serving config.
- RayJob entrypoints: a real module and an existing config that validates; runs written to the shared volume.
- Every pod and container runs restricted (non-root as the image's user, no privilege escalation, no
  capabilities, RuntimeDefault seccomp); a NetworkPolicy keeps Ray's private ports inside; the serving API
  keys are a file on the serving pods only.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from cluster.entrypoints import check_entrypoint, config_path, module_path
from cluster.cluster_view import cluster_from_raycluster

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
CRD_DIR = REPO / "tests" / "data" / "kuberay-crds-v1.7.0"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}
KUBERNETES_VERSION = "1.32.0"
OVERLAYS = ["cpu-dev", "gpu-prod"]
SERVING_CONFIG_OF = {"base": "serving/configs/causal_lm_gpu.yaml", "gpu-prod": "serving/configs/causal_lm_gpu.yaml", "cpu-dev": "serving/configs/causal_lm_cpu.yaml"}


# -------------------------------------------------------------------------------------------------
# Schemas


def _strict(schema):
    """Close every object schema that lists its properties, as the API server's strict field validation does."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@lru_cache(maxsize=None)
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    schema = crd_schema(kind)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return cls(schema)


@lru_cache(maxsize=None)
def crd_schema(kind: str) -> dict:
    path = CRD_DIR / CRD_FILES[kind]
    if not path.is_file():
        pytest.fail(
            f"KubeRay CRD {path} is missing: the manifests are validated against KubeRay v1.7.0's CRDs, which the "
            "repository carries in tests/data/kuberay-crds-v1.7.0/ (see its README for the source)"
        )
    crd = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _strict(version["schema"]["openAPIV3Schema"])


_RELABEL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "action": {"enum": ["replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep", "lowercase", "uppercase", "keepequal", "dropequal"]},
        "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"}},
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "replacement": {"type": "string"},
        "separator": {"type": "string"},
        "modulus": {"type": "integer"},
    },
}
_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["port"],
    "properties": {
        "port": {"type": "string"},
        "path": {"type": "string"},
        "scheme": {"enum": ["http", "https"]},
        "interval": {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
        "scrapeTimeout": {"type": "string"},
        "honorLabels": {"type": "boolean"},
        "relabelings": {"type": "array", "items": _RELABEL},
        "metricRelabelings": {"type": "array", "items": _RELABEL},
    },
}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}, "matchExpressions": {"type": "array"}},
}
_MONITOR_META = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}, "labels": {"type": "object"}, "namespace": {"type": "string"}}}
# The fields of monitoring.coreos.com/v1 that these manifests use, as prometheus-operator defines them.
MONITOR_SCHEMAS = {
    "ServiceMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "ServiceMonitor"},
            "metadata": _MONITOR_META,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", "endpoints"],
                "properties": {
                    "jobLabel": {"type": "string"},
                    "selector": _LABEL_SELECTOR,
                    "namespaceSelector": {"type": "object"},
                    "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
                    "targetLabels": {"type": "array", "items": {"type": "string"}},
                    "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
    "PodMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PodMonitor"},
            "metadata": _MONITOR_META,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", "podMetricsEndpoints"],
                "properties": {
                    "jobLabel": {"type": "string"},
                    "selector": _LABEL_SELECTOR,
                    "namespaceSelector": {"type": "object"},
                    "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
                    "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}


_DURATION = {"type": "string", "pattern": r"^((([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?|0)$"}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# prometheus-operator's PrometheusRule (monitoring.coreos.com/v1), the fields of its CRD, closed to unknown fields.
MONITOR_SCHEMAS["PrometheusRule"] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": _MONITOR_META,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": _DURATION,
                            "query_offset": _DURATION,
                            "limit": {"type": "integer"},
                            "partial_response_strategy": {"type": "string"},
                            "labels": _STRING_MAP,
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["expr"],
                                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                    "properties": {
                                        "alert": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"},
                                        "record": {"type": "string"},
                                        "expr": {"type": "string", "minLength": 1},
                                        "for": _DURATION,
                                        "keep_firing_for": _DURATION,
                                        "labels": _STRING_MAP,
                                        "annotations": _STRING_MAP,
                                    },
                                },
                            },
                        },
                    },
                }
            },
        },
    },
}


def validate_manifest(doc: dict) -> None:
    """Raise with the path of the first schema violation of one Kubernetes object."""
    kind = doc.get("kind")
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), f"{kind}: name is not DNS-1123"
    if kind in CRD_FILES:
        assert doc.get("apiVersion") == "ray.io/v1", f"{kind} {doc['metadata']['name']}: apiVersion must be ray.io/v1"
        crd_validator(kind).validate(doc)
    elif kind in MONITOR_SCHEMAS:
        jsonschema.validate(doc, MONITOR_SCHEMAS[kind])
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


# -------------------------------------------------------------------------------------------------
# Manifests as files and as kustomize builds


def kustomize(target: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed: it builds the kustomize overlays (apt-get install kubectl)")
    result = subprocess.run([kubectl, "kustomize", str(target)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {target} failed:\n{result.stderr}"
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@lru_cache(maxsize=None)
def built(name: str) -> tuple:
    target = K8S / "base" if name == "base" else K8S / "overlays" / name
    return tuple(kustomize(target))


def manifest_files() -> list[Path]:
    # k8s/monitoring holds a plain Prometheus rules file, not a Kubernetes object (tests/test_k8s_alerts.py).
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml" and not {"overlays", "monitoring"} & set(p.parts))


def docs_of_kind(kind: str, build: str) -> list[dict]:
    return [d for d in built(build) if d["kind"] == kind]


def cluster_specs(doc: dict) -> dict:
    spec = doc["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}[doc["kind"]]


def containers(cluster_spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", cluster_spec["headGroupSpec"])] + [(g["groupName"], g) for g in cluster_spec.get("workerGroupSpecs", [])]
    return [(name, c) for name, g in groups for c in g["template"]["spec"]["containers"]]


# -------------------------------------------------------------------------------------------------
# Tests


def test_kuberay_crds_are_present():
    for kind in CRD_FILES:
        assert crd_schema(kind)["properties"]["spec"]["type"] == "object"


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_base_manifest_files_validate(path):
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    assert docs, f"{path} holds no manifest"
    for doc in docs:
        validate_manifest(doc)


@pytest.mark.parametrize("build", ["base"] + OVERLAYS)
def test_kustomize_builds_validate(build):
    docs = built(build)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["ConfigMap", "NetworkPolicy", "PersistentVolumeClaim", "PodMonitor", "PrometheusRule", "RayCluster", "RayJob", "RayJob", "RayService", "ServiceMonitor"])
    for doc in docs:
        validate_manifest(doc)
    if build != "base":
        assert {d["metadata"].get("namespace") for d in docs} == {"raylm-dev" if build == "cpu-dev" else "raylm"}


def test_strict_validation_rejects_a_misspelled_field():
    """The CRD check is not vacuous: a typo in a nested field is an error, as it would be for the API server."""
    doc = copy.deepcopy(docs_of_kind("RayCluster", "base")[0])
    doc["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        validate_manifest(doc)
    doc = copy.deepcopy(docs_of_kind("RayCluster", "base")[0])
    doc["spec"]["authOptions"]["mode"] = "tokens"
    with pytest.raises(jsonschema.ValidationError):
        validate_manifest(doc)


@pytest.mark.parametrize("build", ["base"] + OVERLAYS)
def test_rayjob_entrypoints_name_real_modules_and_valid_configs(build):
    from training.config import load_config
    from tune.config import load_sweep

    jobs = docs_of_kind("RayJob", build)
    assert jobs
    for job in jobs:
        entrypoint = job["spec"]["entrypoint"]
        assert check_entrypoint(entrypoint, REPO) == [], entrypoint
        assert module_path(REPO, "training.pretrain") is not None
        config = config_path(entrypoint)
        assert config and (REPO / config).is_file()
        if yaml.safe_load((REPO / config).read_text()).get("kind") == "tune":
            load_sweep(REPO / config)  # a sweep: its base run validates too
        else:
            load_config(REPO / config)  # raises ConfigError listing every problem
        runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
        assert runtime_env["working_dir"] == "/opt/raylm", "the image keeps the repository at /opt/raylm"
    expected = {"cpu-dev": "configs/pretrain/demo_cpu.yaml"}.get(build, "configs/pretrain/llama_125m_gpu.yaml")
    pretrain_job = next(j for j in jobs if j["metadata"]["name"] == "raylm-pretrain")
    assert config_path(pretrain_job["spec"]["entrypoint"]) == expected


def _without_k8s_deltas(serve: dict) -> dict:
    serve = copy.deepcopy(serve)
    serve["http_options"].pop("host")
    for app in serve["applications"]:
        for key in ("export_dir", "adapters_dir", "api_keys_env", "api_keys_file"):
            app["args"].pop(key, None)
    return serve


@pytest.mark.parametrize("build", ["base"] + OVERLAYS)
def test_serve_config_v2_is_the_serving_config_and_validates(build):
    from ray.serve.schema import ServeDeploySchema

    (service,) = docs_of_kind("RayService", build)
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve)
    from serving.args import ServingArgs

    for app in serve["applications"]:
        ServingArgs.model_validate(app["args"])
        module, _, attr = app["import_path"].partition(":")
        source = module_path(REPO, module)
        assert source is not None, f"import_path {app['import_path']}: no module {module}"
        assert re.search(rf"^def {attr}\(", source.read_text(encoding="utf-8"), re.M), f"{module} has no {attr}()"
    assert serve["http_options"]["host"] == "0.0.0.0", "the proxy must listen on the pod IP for the serve Service"
    assert all(a["args"]["export_dir"].startswith("/mnt/shared/") for a in serve["applications"])
    reference = yaml.safe_load((REPO / SERVING_CONFIG_OF[build]).read_text(encoding="utf-8"))
    assert _without_k8s_deltas(serve) == _without_k8s_deltas(reference), f"serveConfigV2 drifted from {SERVING_CONFIG_OF[build]}"


@pytest.mark.parametrize("build", ["base"] + OVERLAYS)
def test_every_ray_cluster_is_secure_autoscaled_and_scraped(build):
    for doc in [d for d in built(build) if d["kind"] in CRD_FILES]:
        spec = cluster_specs(doc)
        where = f"{build} {doc['kind']} {doc['metadata']['name']}"
        assert spec["authOptions"] == {"mode": "token"}, f"{where}: token auth must be on"
        assert spec["rayVersion"] == "2.60.0", where
        assert spec["enableInTreeAutoscaling"] is True, where
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress"), f"{where}: dashboard must not be public"
        assert head["rayStartParams"]["num-cpus"] == "0", f"{where}: the head runs no training"
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], f"{where} {group['groupName']}"
        for name, container in containers(spec):
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            assert ports.get("metrics") == 8080, f"{where} {name}: the monitors scrape the port named metrics"
            assert container["image"].split("/")[-1].startswith("raylm:"), f"{where} {name}: {container['image']}"
            assert any(m["mountPath"] == "/mnt/shared" for m in container.get("volumeMounts", [])), f"{where} {name}: no shared volume"
        gpus = [g for g in spec["workerGroupSpecs"] for _, c in containers({"headGroupSpec": head, "workerGroupSpecs": [g]})[1:] if "nvidia.com/gpu" in c["resources"].get("limits", {})]
        head_limits = head["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert "nvidia.com/gpu" not in head_limits, f"{where}: the head is a CPU node"
        if build == "cpu-dev":
            assert not gpus, f"{where}: cpu-dev must not ask for GPUs"
        else:
            assert gpus, f"{where}: a GPU worker group is expected"


def test_gpu_prod_cluster_holds_the_gpu_configs():
    """The preflight capacity check agrees: the gpu-prod RayCluster autoscales to the 1B config's 16 GPU workers."""
    from cluster.preflight import check_capacity

    (cluster,) = docs_of_kind("RayCluster", "gpu-prod")
    view = cluster_from_raycluster(cluster, "gpu-prod RayCluster")
    assert view.shared_paths == ["/mnt/shared"]
    for config in ("llama_125m_gpu", "llama_1b_gpu"):
        raw = yaml.safe_load((REPO / f"configs/pretrain/{config}.yaml").read_text(encoding="utf-8"))
        findings = check_capacity(raw, view)
        assert [f for f in findings if not f.ok] == [], findings


def test_monitors_select_the_pods_kuberay_labels():
    (service_monitor,) = docs_of_kind("ServiceMonitor", "base")
    (pod_monitor,) = docs_of_kind("PodMonitor", "base")
    assert service_monitor["spec"]["selector"]["matchLabels"] == {"ray.io/node-type": "head"}
    assert pod_monitor["spec"]["selector"]["matchLabels"] == {"ray.io/node-type": "worker"}
    assert [e["port"] for e in service_monitor["spec"]["endpoints"]] == ["metrics"]
    assert [e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]


def _metric_names_known() -> str:
    """Source text in which Ray's and raylm's metric names are defined."""
    import ray

    ray_dir = Path(ray.__file__).parent
    sources = [REPO / "serving" / "metrics.py"]
    for sub in ("dashboard/modules/reporter", "train/v2/_internal/metrics", "serve/_private"):
        sources += sorted((ray_dir / sub).rglob("*.py"))
    return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in sources)


def test_grafana_dashboard_shows_training_and_serving_with_real_metrics():
    (config_map,) = docs_of_kind("ConfigMap", "base")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["raylm-dashboard.json"])
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert any("Training" in r for r in rows) and any("Serving" in r for r in rows), rows
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    known = _metric_names_known()
    for expr in exprs:
        for metric in re.findall(r"\b(ray_[a-z0-9_]+)\{", expr):
            base = re.sub(r"_(total|bucket|sum|count)$", "", metric.removeprefix("ray_"))
            assert f'"{base}"' in known, f"{metric} in {expr!r} is not a metric Ray or raylm defines"


# -------------------------------------------------------------------------------------------------
# Restricted pods, network policy, API keys, run storage


def image_uid() -> int:
    """The numeric user the image runs as: the last USER line of k8s/image/Dockerfile."""
    users = re.findall(r"^USER\s+(\S+)", (K8S / "image" / "Dockerfile").read_text(encoding="utf-8"), re.M)
    assert users, "k8s/image/Dockerfile sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), f"Dockerfile USER {users[-1]!r}: use a numeric uid, so that runAsNonRoot can be verified"
    return int(uid)


def pod_specs(node, where: str = ""):
    """Every pod spec (a mapping with a `containers` list) inside a manifest, with its path."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield where, node
        for key, value in node.items():
            yield from pod_specs(value, f"{where}.{key}" if where else key)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            name = value.get("groupName") or value.get("name") if isinstance(value, dict) else None
            yield from pod_specs(value, f"{where}[{name or i}]")


def restriction_problems(doc: dict, uid: int) -> list[str]:
    """What each pod and container of a manifest lacks of the restricted securityContext, by name."""
    problems = []
    where_doc = f"{doc['kind']} {doc['metadata']['name']}"
    pods = list(pod_specs(doc))
    for path, pod in pods:
        pod_ctx = pod.get("securityContext") or {}
        where = f"{where_doc} {path}"
        if pod_ctx.get("runAsNonRoot") is not True:
            problems.append(f"{where}: pod securityContext.runAsNonRoot is not true")
        if pod_ctx.get("runAsUser") != uid:
            problems.append(f"{where}: pod securityContext.runAsUser {pod_ctx.get('runAsUser')!r} is not the image's user {uid}")
        if (pod_ctx.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: pod securityContext.seccompProfile is not RuntimeDefault")
        containers = [(c.get("name", "?"), c) for c in pod["containers"] + pod.get("initContainers", [])]
        # The autoscaler sidecar KubeRay adds to the head pod takes its securityContext from autoscalerOptions.
        cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig")
        if cluster and cluster.get("enableInTreeAutoscaling") and path.endswith("headGroupSpec.template.spec"):
            containers.append(("autoscaler (autoscalerOptions)", cluster.get("autoscalerOptions") or {}))
        for name, container in containers:
            ctx = container.get("securityContext") or {}
            effective = {**pod_ctx, **ctx}
            cwhere = f"{where} container {name}"
            if ctx.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cwhere}: allowPrivilegeEscalation is not false")
            if "ALL" not in ((ctx.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{cwhere}: capabilities.drop lacks ALL")
            if (ctx.get("capabilities") or {}).get("add"):
                problems.append(f"{cwhere}: capabilities.add {ctx['capabilities']['add']}")
            if effective.get("runAsNonRoot") is not True:
                problems.append(f"{cwhere}: runAsNonRoot is not true")
            if effective.get("runAsUser") != uid:
                problems.append(f"{cwhere}: runAsUser {effective.get('runAsUser')!r} is not the image's user {uid}")
            if (effective.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
                problems.append(f"{cwhere}: seccompProfile is not RuntimeDefault")
            if ctx.get("privileged"):
                problems.append(f"{cwhere}: privileged")
    return problems


@pytest.mark.parametrize("build", ["base"] + OVERLAYS)
def test_every_pod_and_container_is_restricted(build):
    uid = image_uid()
    checked, problems = 0, []
    for doc in built(build):
        problems += restriction_problems(doc, uid)
        checked += len(list(pod_specs(doc)))
    assert problems == [], "\n".join(problems)
    # head + 2 groups (RayCluster), head + group + submitter per RayJob (pretrain, tune), head + group (RayService);
    # cpu-dev has one group each
    assert checked == {"cpu-dev": 10}.get(build, 11), checked


def test_restriction_check_names_what_is_missing():
    """The check above can fail, and says which pod and container lacks what."""
    uid = image_uid()
    (job,) = [j for j in docs_of_kind("RayJob", "cpu-dev") if j["metadata"]["name"] == "raylm-pretrain"]
    job = copy.deepcopy(job)
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    del worker["containers"][0]["securityContext"]["capabilities"]
    worker["securityContext"]["seccompProfile"] = {"type": "Unconfined"}
    job["spec"]["rayClusterSpec"]["autoscalerOptions"].pop("securityContext")
    job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["securityContext"]["runAsUser"] = 0
    found = restriction_problems(job, uid)
    prefix = "RayJob raylm-pretrain spec."
    assert f"{prefix}rayClusterSpec.workerGroupSpecs[cpu-workers].template.spec container ray-worker: capabilities.drop lacks ALL" in found
    assert f"{prefix}rayClusterSpec.workerGroupSpecs[cpu-workers].template.spec: pod securityContext.seccompProfile is not RuntimeDefault" in found
    assert f"{prefix}rayClusterSpec.headGroupSpec.template.spec container autoscaler (autoscalerOptions): allowPrivilegeEscalation is not false" in found
    assert f"{prefix}submitterPodTemplate.spec container ray-job-submitter: runAsUser 0 is not the image's user {uid}" in found
    # ... and nothing else: the autoscaler's two, the worker's seccomp twice (pod, and the container inheriting it)
    assert len(found) == 6, found


PRIVATE_PORTS = {6379: "GCS", 8265: "dashboard", 10001: "Ray client", 8080: "metrics"}
RAY_PODS = {"matchExpressions": [{"key": "ray.io/cluster", "operator": "Exists"}]}


def admitted_peers(policy: dict, port: int) -> list[dict | None]:
    """The `from` peers of every ingress rule that admits `port` (None: a rule open to every source)."""
    peers: list[dict | None] = []
    for rule in policy["spec"].get("ingress") or []:
        ports = rule.get("ports")
        if ports and not any(p.get("port") == port and p.get("protocol", "TCP") == "TCP" for p in ports):
            continue
        peers += rule.get("from") or [None]
    return peers


MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
DASHBOARD_CLIENTS = ({"app.kubernetes.io/name": "kuberay-operator"}, {"app.kubernetes.io/component": "ray-job-submitter"})


def network_policy_problems(policy: dict) -> list[str]:
    """Where the policy lets a private Ray port be reached from outside the Ray pods, monitoring (metrics
    only), the KubeRay operator and the RayJob submitter (dashboard only); or blocks what must get through."""
    problems = []
    if policy["spec"].get("podSelector") != RAY_PODS:
        problems.append(f"podSelector {policy['spec'].get('podSelector')} does not select every pod labelled ray.io/cluster")
    if "Ingress" not in policy["spec"].get("policyTypes", []):
        problems.append("policyTypes lacks Ingress")
    for port, name in PRIVATE_PORTS.items():
        for peer in admitted_peers(policy, port):
            if peer == {"podSelector": RAY_PODS}:
                continue  # pods of the Ray clusters (same namespace: no namespaceSelector)
            if peer == MONITORING and port == 8080:
                continue
            if peer is not None and set(peer) <= {"podSelector", "namespaceSelector"} and port == 8265 \
                    and (peer.get("podSelector") or {}).get("matchLabels") in DASHBOARD_CLIENTS:
                continue
            problems.append(f"{name} port {port} admits {peer or 'every source'}")
        if {"podSelector": RAY_PODS} not in admitted_peers(policy, port):
            problems.append(f"{name} port {port}: Ray pods cannot reach each other")
    if MONITORING not in admitted_peers(policy, 8080):
        problems.append("the monitoring namespace cannot scrape the metrics port")
    if None not in admitted_peers(policy, 8000):
        problems.append("clients cannot reach the Serve port 8000")
    if None in admitted_peers(policy, 6380):
        problems.append("a rule opens every port to every source")
    return problems


@pytest.mark.parametrize("build", ["base"] + OVERLAYS)
def test_network_policy_keeps_ray_ports_inside(build):
    (policy,) = docs_of_kind("NetworkPolicy", build)
    assert network_policy_problems(policy) == []
    # The submitter the policy admits is the RayJob's.
    for job in docs_of_kind("RayJob", build):
        assert job["spec"]["submitterPodTemplate"]["metadata"]["labels"]["app.kubernetes.io/component"] == "ray-job-submitter"


def test_network_policy_check_catches_openings():
    (policy,) = docs_of_kind("NetworkPolicy", "base")
    opened = copy.deepcopy(policy)
    opened["spec"]["ingress"].append({"ports": [{"protocol": "TCP", "port": 8265}]})
    assert network_policy_problems(opened) == ["dashboard port 8265 admits every source"]
    opened = copy.deepcopy(policy)
    opened["spec"]["ingress"][1]["ports"].append({"protocol": "TCP", "port": 6379})  # monitoring may reach the GCS
    assert network_policy_problems(opened) == [f"GCS port 6379 admits {MONITORING}"]
    opened = copy.deepcopy(policy)
    opened["spec"]["ingress"][0]["from"][0]["namespaceSelector"] = {}  # Ray-labelled pods of any namespace
    assert "GCS port 6379: Ray pods cannot reach each other" in network_policy_problems(opened)
    assert any(p.startswith("GCS port 6379 admits {'podSelector'") for p in network_policy_problems(opened))
    opened = copy.deepcopy(policy)
    opened["spec"]["ingress"].append({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]})
    assert "metrics port 8080 admits {'ipBlock': {'cidr': '0.0.0.0/0'}}" in network_policy_problems(opened)


def _mentions_secret(node, name: str) -> bool:
    return name in json.dumps(node)


@pytest.mark.parametrize("build", ["base"] + OVERLAYS)
def test_api_keys_are_a_file_on_the_serving_pods_only(build):
    secret = "raylm-serving-api-keys"
    for doc in built(build):
        for path, pod in pod_specs(doc):
            for container in pod["containers"]:
                env = json.dumps([container.get("env"), container.get("envFrom")])
                assert secret not in env and "RAYLM_API_KEYS" not in env, f"{doc['kind']} {path}: API keys in the environment"
            serving_group = doc["kind"] == "RayService" and ".workerGroupSpecs[" in path
            assert _mentions_secret(pod.get("volumes"), secret) == serving_group, f"{build} {doc['kind']} {path}"
    (service,) = docs_of_kind("RayService", build)
    spec = service["spec"]["rayClusterConfig"]
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "replicas never land on the head, which has no keys"
    for app in serve["applications"]:
        assert app["args"]["api_keys_env"] is None
        keys_file = Path(app["args"]["api_keys_file"])
        for group in spec["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            (volume,) = [v for v in pod["volumes"] if "secret" in v]
            assert volume["secret"]["secretName"] == secret and volume["secret"]["defaultMode"] == 0o440
            (item,) = volume["secret"]["items"]
            (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
            assert mount["readOnly"] is True
            assert keys_file == Path(mount["mountPath"]) / item["path"], f"{group['groupName']}: api_keys_file {keys_file} is not the mounted key"
            assert pod["securityContext"]["fsGroup"] == 100, "the ray user reads the 0440 key file through its group"


@pytest.mark.parametrize("build", ["base"] + OVERLAYS)
def test_rayjob_runs_are_written_to_the_shared_volume(build):
    """The job's cluster is deleted after the job: a run outside the shared volume would go with it."""
    from training.config import load_config

    for job in docs_of_kind("RayJob", build):
        argv = job["spec"]["entrypoint"].split()
        overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        if argv[:3] == ["python", "-m", "tune.search"]:  # a sweep: its trials live under its storage_path
            from tune.config import load_sweep

            storage = str(load_sweep(REPO / config_path(job["spec"]["entrypoint"]), overrides).sweep_dir)
        else:
            storage = load_config(REPO / config_path(job["spec"]["entrypoint"]), overrides).run.storage_path
        assert storage.startswith("/mnt/shared/"), f"{build}: {job['metadata']['name']} writes to {storage}"
        for _, container in containers(cluster_specs(job)):
            assert any(m["mountPath"] == "/mnt/shared" and not m.get("readOnly") for m in container["volumeMounts"])


def test_prometheus_rule_schema_rejects_what_the_operator_would():
    (rule,) = docs_of_kind("PrometheusRule", "base")
    assert rule["metadata"]["labels"]["release"] == "prometheus", "kube-prometheus-stack selects rules by its release label"
    for breakage in (
        lambda r: r["spec"]["groups"][0]["rules"][0].update(severity="critical"),  # a label outside `labels`
        lambda r: r["spec"]["groups"][0]["rules"][0].update(**{"for": "5 minutes"}),
        lambda r: r["spec"]["groups"][0]["rules"][0].pop("expr"),
        lambda r: r["spec"]["groups"][0]["rules"][0]["annotations"].update(runbook=3),
    ):
        broken = copy.deepcopy(rule)
        breakage(broken)
        with pytest.raises(jsonschema.ValidationError):
            validate_manifest(broken)


@pytest.mark.parametrize("build", ["base"] + OVERLAYS)
def test_serving_nodes_install_the_proxy_error_hook(build):
    """Serve's proxy reads its callback when it starts: every RayService container must carry it (serving/errors.py)."""
    (service,) = docs_of_kind("RayService", build)
    for where, container in containers(cluster_specs(service)):
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env.get("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH") == "serving.errors:proxy_middlewares", f"{build} {where}"


@pytest.mark.parametrize("build", ["base"] + OVERLAYS)
def test_serving_nodes_start_with_the_shipped_request_path(build):
    """Serve reads its request-path switches when its processes start: every RayService container carries
    serving.ingress.NODE_ENV (the environment the serving tests run with)."""
    from serving.ingress import NODE_ENV

    (service,) = docs_of_kind("RayService", build)
    for where, container in containers(cluster_specs(service)):
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert {k: env.get(k) for k in NODE_ENV} == NODE_ENV, f"{build} {where}"


# -------------------------------------------------------------------------------------------------
# Scheduled re-fine-tuning: a CronJob that submits the fine-tune, then the promote-if-better step


CRONJOB = K8S / "base" / "cronjob-refinetune.yaml"
SAMPLE_JOB_NAME = "raylm-refinetune-29402520"  # what the CronJob controller names a night's Job


def cronjob_steps(doc: dict) -> list[tuple[str, argparse.Namespace, dict[str, str]]]:
    """(container name, its parsed `cluster.submit` arguments with $(VAR)s expanded, env) of each step, in order."""
    from cluster.submit import parse_args

    pod = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    steps = []
    for container in pod.get("initContainers", []) + pod["containers"]:
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert list(env)[0] == "RUN_NAME", "$(RUN_NAME) must be defined before the variables that could use it"
        command = [re.sub(r"\$\(RUN_NAME\)", SAMPLE_JOB_NAME, a) for a in container["command"]]
        assert command[:3] == ["python", "-m", "cluster.submit"], command
        steps.append((container["name"], parse_args(command[3:]), env))
    return steps


def test_refinetune_cronjob_is_not_in_the_base_but_validates_and_runs_restricted():
    (doc,) = [d for d in yaml.safe_load_all(CRONJOB.read_text(encoding="utf-8")) if d]
    validate_manifest(doc)  # Kubernetes' own batch/v1 CronJob schema, strict
    assert all(d["kind"] != "CronJob" for d in built("base")), "it needs data on the volume first, like rayjob-finetune"
    assert restriction_problems(doc, image_uid()) == []
    assert len(list(pod_specs(doc))) == 1
    spec = doc["spec"]
    assert spec["concurrencyPolicy"] == "Forbid", "two fine-tunes of one adapter must never overlap"
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0 and job["template"]["spec"]["restartPolicy"] == "Never"
    assert job["template"]["spec"]["automountServiceAccountToken"] is False, "it only talks to Ray, never to the API server"


def test_refinetune_cronjob_reaches_the_raycluster_with_its_token():
    (doc,) = [d for d in yaml.safe_load_all(CRONJOB.read_text(encoding="utf-8")) if d]
    (cluster,) = docs_of_kind("RayCluster", "base")
    name = cluster["metadata"]["name"]
    (policy,) = docs_of_kind("NetworkPolicy", "base")
    labels = doc["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    submitters = [p["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"] for p in rule.get("from", [])
                  if 8265 in [q["port"] for q in rule.get("ports", [])] and "podSelector" in p]
    assert any(set(s.items()) <= set(labels.items()) for s in submitters), "the NetworkPolicy must admit it to the dashboard"
    pod = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    for container in pod.get("initContainers", []) + pod["containers"]:
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_ADDRESS"]["value"] == f"http://{name}-head-svc:8265", "KubeRay's head Service is <cluster>-head-svc"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": name, "key": "auth_token"}
        assert env["RUN_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"
        assert not container.get("volumeMounts"), "the submitter holds no data: the Ray jobs read and write the volume"


def test_refinetune_cronjob_fine_tunes_fresh_then_promotes_that_run_into_the_served_adapters():
    from training.config import load_config

    (doc,) = [d for d in yaml.safe_load_all(CRONJOB.read_text(encoding="utf-8")) if d]
    (finetune_step, finetune, _), (promote_step, promote, _) = cronjob_steps(doc)
    assert (finetune_step, promote_step) == ("finetune", "promote"), "initContainers run first: promote only after it"
    configs = {}
    for args in (finetune, promote):
        assert args.wait, "each step waits for its Ray job and fails the pod with it"
        assert args.working_dir == "/opt/raylm" and args.submission_id.startswith(SAMPLE_JOB_NAME)
        entrypoint = " ".join(args.entrypoint)
        assert check_entrypoint(entrypoint, REPO) == [], entrypoint
        argv = args.entrypoint
        overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        configs[argv[2]] = load_config(REPO / config_path(entrypoint), overrides)
    run, gate = configs["training.finetune"], configs["training.promote"]
    assert run.kind == "finetune" and run.method.type == "lora" and gate.kind == "promote"
    assert run.run.name == SAMPLE_JOB_NAME, "a fresh run per night: the same name would resume the last one"
    assert str(run.run_dir) == gate.candidate.path and run.run_dir.parts[:3] == ("/", "mnt", "shared")
    # The fine-tune starts from what is served, and promote publishes where serving reads its adapters.
    (service,) = docs_of_kind("RayService", "base")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert run.model.source == "raylm_export" and run.model.path == app["args"]["export_dir"] == gate.served.base
    assert gate.served.adapters_dir == app["args"]["adapters_dir"]
    assert all(f.startswith("/mnt/shared/") for f in gate.evaluation.files + run.data.train_files)
    assert not any(fnmatch.fnmatch(f, pattern) for f in gate.evaluation.files for pattern in run.data.train_files), \
        "the fixed test file is never trained on"
    if gate.evaluation.device.startswith("cuda"):
        assert promote.entrypoint_num_gpus >= 1, "promote evaluates on a GPU: its Ray job must land on a GPU worker"
    (cluster,) = docs_of_kind("RayCluster", "base")
    for group in cluster["spec"]["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            assert any(m["mountPath"] == "/mnt/shared" and not m.get("readOnly") for m in container["volumeMounts"])
