"""The Kubernetes manifests: each overlay renders, validates, and keeps the project's policy.

Built-in kinds are validated strictly (unknown fields rejected) against the schemas that
kubernetes-validate bundles, for the oldest and the newest Kubernetes the manifests
support. Custom resources (KEDA's ScaledObject, the Prometheus Operator's PodMonitor)
have no bundled schema; they are validated against the schemas in ``schemas/``.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from support import OVERLAYS_DIR, REPO

OVERLAYS = ("cpu-dev", "gpu")
#: Oldest and newest Kubernetes minor versions the manifests are checked against.
KUBERNETES_VERSIONS = ("1.29", "1.37")
#: The storyreel services and their gRPC ports (each service's settings.py default).
SERVICES = {"gateway": 50050, "llm": 50051, "diffusion": 50052, "composer": 50053}
#: The gateway's web port (the studio page and gRPC-Web): its gRPC port + 4.
GATEWAY_WEB_PORT = 50054
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")
SCHEMAS = Path(__file__).parent / "schemas"
CUSTOM_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): SCHEMAS / "keda-scaledobject-v1alpha1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): SCHEMAS / "prometheus-podmonitor-v1.json",
    ("cert-manager.io/v1", "Certificate"): SCHEMAS / "certmanager-certificate-v1.json",
}
#: The custom resources each overlay renders (kind/name).
CUSTOM_RESOURCES = {
    "cpu-dev": [],
    "gpu": ["Certificate/gateway", "PodMonitor/diffusion", "ScaledObject/diffusion"],
}
DOCS = REPO / "docs" / "deploy.md"
#: The gateway's job database: the setting that names it, and PostgreSQL's port.
DATABASE_URL = "STORYREEL_GATEWAY_DATABASE_URL"
DATABASE_URL_FILE = "STORYREEL_GATEWAY_DATABASE_URL_FILE"
POSTGRES_PORT = 5432

overlays = pytest.mark.parametrize("overlay", OVERLAYS)


# --- helpers ---------------------------------------------------------------------------


def find(objects: list[dict], kind: str, name: str) -> dict:
    """The one object of ``kind`` named ``name``."""
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in WORKLOAD_KINDS]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict) -> Iterator[dict]:
    """Every container of a workload, init containers included."""
    spec = pod_spec(workload)
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def template_labels(workload: dict) -> dict[str, str]:
    """The labels of a workload's pods."""
    return workload["spec"]["template"]["metadata"]["labels"]


def env_of(container: dict) -> dict[str, dict]:
    """A container's env entries by name."""
    return {entry["name"]: entry for entry in container.get("env", [])}


def env_value(objects: list[dict], container: dict, name: str) -> str | None:
    """A variable's literal value, from ``env`` or else the ConfigMaps in ``envFrom``."""
    entry = env_of(container).get(name)
    if entry is not None:
        return entry.get("value")
    for source in reversed(container.get("envFrom", [])):  # the last source wins
        ref = source.get("configMapRef")
        if ref:
            data = find(objects, "ConfigMap", ref["name"]).get("data", {})
            if name in data:
                return data[name]
    return None


def label(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels and In/NotIn/Exists expressions) matches."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def validate_builtin(obj: dict, version: str) -> None:
    kubernetes_validate.validate(obj, version, strict=True)


def validate_custom(obj: dict) -> None:
    schema = json.loads(CUSTOM_SCHEMAS[(obj["apiVersion"], obj["kind"])].read_text())
    jsonschema.Draft202012Validator(schema).validate(obj)


# --- rendering and schemas -----------------------------------------------------------------


def test_both_overlays_render(rendered):
    assert set(OVERLAYS) <= set(rendered)
    for name in OVERLAYS:
        assert rendered[name], f"overlay {name} rendered nothing"


@overlays
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_builtin_object_validates_strictly_against_kubernetes_schemas(
    rendered, overlay, version
):
    failures = []
    for obj in rendered[overlay]:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_SCHEMAS:
            continue
        try:
            validate_builtin(obj, version)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            failures.append(f"{label(obj)}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            failures.append(f"{label(obj)}: {exc.message}; add a schema to CUSTOM_SCHEMAS")
    assert not failures, "\n".join(failures)


def custom_resources(objects: list[dict]) -> list[dict]:
    return [o for o in objects if (o["apiVersion"], o["kind"]) in CUSTOM_SCHEMAS]


@overlays
def test_each_overlay_renders_exactly_its_custom_resources(rendered, overlay):
    found = sorted(label(obj) for obj in custom_resources(rendered[overlay]))
    assert found == CUSTOM_RESOURCES[overlay]


# Only overlays with custom resources: cpu-dev runs without KEDA, the Prometheus Operator
# and cert-manager, so it has none (the test above holds it to that), and a case for it
# here would validate nothing.
@pytest.mark.parametrize("overlay", [name for name in OVERLAYS if CUSTOM_RESOURCES[name]])
def test_custom_resources_validate_against_their_schemas(rendered, overlay):
    custom = custom_resources(rendered[overlay])
    assert len(custom) == len(CUSTOM_RESOURCES[overlay]) > 0
    for obj in custom:
        validate_custom(obj)


def test_strict_validation_rejects_a_misspelled_field(rendered):
    gateway = copy.deepcopy(find(rendered["gpu"], "Deployment", "gateway"))
    container = pod_spec(gateway)["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_builtin(gateway, KUBERNETES_VERSIONS[-1])


def test_scaledobject_schema_rejects_a_numeric_threshold(rendered):
    scaler = copy.deepcopy(find(rendered["gpu"], "ScaledObject", "diffusion"))
    scaler["spec"]["triggers"][0]["metadata"]["threshold"] = 4
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(scaler)


def test_podmonitor_schema_rejects_an_unknown_field(rendered):
    monitor = copy.deepcopy(find(rendered["gpu"], "PodMonitor", "diffusion"))
    monitor["spec"]["podMetricEndpoints"] = monitor["spec"].pop("podMetricsEndpoints")
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(monitor)


# --- per service ---------------------------------------------------------------------------


@overlays
def test_every_service_has_a_deployment_a_service_and_its_own_service_account(rendered, overlay):
    objects = rendered[overlay]
    for name in SERVICES:
        deployment = find(objects, "Deployment", name)
        find(objects, "Service", name)
        account = find(objects, "ServiceAccount", name)
        assert pod_spec(deployment)["serviceAccountName"] == name
        assert account.get("automountServiceAccountToken") is False
        assert pod_spec(deployment).get("automountServiceAccountToken") is False


@overlays
def test_services_listen_on_all_interfaces_on_their_grpc_port(rendered, overlay):
    for name, port in SERVICES.items():
        container = pod_spec(find(rendered[overlay], "Deployment", name))["containers"][0]
        env = env_of(container)
        prefix = f"STORYREEL_{name.upper()}_"
        assert env[prefix + "HOST"]["value"] == "0.0.0.0"
        assert env[prefix + "PORT"]["value"] == str(port)
        assert {"name": "grpc", "containerPort": port} in container["ports"]
        service = find(rendered[overlay], "Service", name)
        ports = service["spec"]["ports"]
        if service["spec"].get("type") == "LoadBalancer":
            # The public gateway: published on the TLS port clients expect (443).
            assert all(p["targetPort"] == "grpc" for p in ports), ports
        else:
            assert any(p["port"] == port and p["targetPort"] == "grpc" for p in ports)


@overlays
def test_gateway_upstream_addresses_name_services_that_exist(rendered, overlay):
    objects = rendered[overlay]
    env = env_of(pod_spec(find(objects, "Deployment", "gateway"))["containers"][0])
    upstreams = {"LLM": "llm", "DIFFUSION": "diffusion", "COMPOSER": "composer"}
    for setting, service_name in upstreams.items():
        address = env[f"STORYREEL_GATEWAY_{setting}_ADDRESS"]["value"]
        match = re.fullmatch(r"dns:///([a-z0-9-]+):(\d+)", address)
        assert match, f"{setting}: {address!r} is not dns:///name:port"
        assert match.group(1) == service_name
        service = find(objects, "Service", service_name)
        assert int(match.group(2)) in [p["port"] for p in service["spec"]["ports"]]


# --- probes, resources, security ----------------------------------------------------------


@overlays
def test_every_long_running_container_has_startup_readiness_and_liveness_probes(rendered, overlay):
    for workload in workloads(rendered[overlay]):
        if workload["kind"] == "Job":
            continue
        for container in pod_spec(workload)["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in container, f"{label(workload)}/{container['name']} lacks {probe}"


def serves_tls(container: dict) -> bool:
    """Whether the container's gRPC port serves TLS (the gateway's TLS settings are set)."""
    return "STORYREEL_GATEWAY_TLS_CERT_FILE" in env_of(container)


@overlays
def test_storyreel_services_use_native_grpc_probes_with_room_to_load_models(rendered, overlay):
    for name, port in SERVICES.items():
        container = pod_spec(find(rendered[overlay], "Deployment", name))["containers"][0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if serves_tls(container):
                # The kubelet's gRPC probe speaks plaintext only: on a TLS port it would
                # never succeed. The port accepting connections is what it can check.
                assert "grpc" not in container[probe], f"{name} {probe} on a TLS port"
                assert container[probe]["tcpSocket"]["port"] in ("grpc", port)
            else:
                assert container[probe]["grpc"] == {"port": port}, f"{name} {probe}"
        startup = container["startupProbe"]
        budget_s = startup["periodSeconds"] * startup["failureThreshold"]
        if name in ("llm", "diffusion"):
            # Model services get at least 15 minutes to download and load their model.
            assert budget_s >= 15 * 60, f"{name} startup budget is only {budget_s} s"


#: Seconds a pod needs beyond its service's drain (``STORYREEL_<SERVICE>_GRACE_PERIOD_S``)
#: before the kubelet kills it. The gateway then stops its jobs and hands their leases
#: back, a database write per job, so that another replica adopts them at once.
SHUTDOWN_AFTER_DRAIN_S = {"gateway": 30}


@overlays
def test_pods_are_given_longer_to_stop_than_their_service_drains(rendered, overlay):
    for name in SERVICES:
        deployment = find(rendered[overlay], "Deployment", name)
        env = env_of(pod_spec(deployment)["containers"][0])
        drain_s = float(env[f"STORYREEL_{name.upper()}_GRACE_PERIOD_S"]["value"])
        # 30 s is the Kubernetes default.
        termination_s = pod_spec(deployment).get("terminationGracePeriodSeconds", 30)
        margin_s = SHUTDOWN_AFTER_DRAIN_S.get(name, 10)
        assert termination_s >= drain_s + margin_s, (
            f"{name}: {termination_s} s to stop, {drain_s} s of drain plus {margin_s} s needed"
        )


@overlays
def test_every_container_has_cpu_and_memory_requests_and_limits(rendered, overlay):
    for workload in workloads(rendered[overlay]):
        for container in containers(workload):
            resources = container.get("resources", {})
            for part in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resource in resources.get(part, {}), (
                        f"{label(workload)}/{container['name']} lacks {part}.{resource}"
                    )


@overlays
def test_every_pod_runs_as_non_root_with_a_read_only_root_and_no_capabilities(rendered, overlay):
    for workload in workloads(rendered[overlay]):
        pod = pod_spec(workload)
        pod_security = pod.get("securityContext", {})
        assert pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault"
        for container in containers(workload):
            where = f"{label(workload)}/{container['name']}"
            security = {**pod_security, **container.get("securityContext", {})}
            assert security.get("runAsNonRoot") is True, where
            assert security.get("runAsUser", 0) != 0, where
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("readOnlyRootFilesystem") is True, where
            assert security.get("capabilities", {}).get("drop") == ["ALL"], where


@overlays
def test_namespace_enforces_the_restricted_pod_security_standard(rendered, overlay):
    namespace = find(rendered[overlay], "Namespace", "storyreel")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in rendered[overlay]:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "storyreel", label(obj)


@overlays
def test_every_object_is_labelled_as_part_of_storyreel(rendered, overlay):
    for obj in rendered[overlay]:
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "storyreel", label(obj)


@overlays
def test_every_image_names_an_exact_version(rendered, overlay):
    for workload in workloads(rendered[overlay]):
        for container in containers(workload):
            image = container["image"]
            name_tag = image.split("@")[0]
            tag = name_tag.rsplit(":", 1)[1] if ":" in name_tag.rsplit("/", 1)[-1] else ""
            assert tag and tag != "latest", f"{label(workload)}: {image} has no exact tag"


# --- the render tier ------------------------------------------------------------------------


def gpu_limit(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def test_diffusion_and_tgi_get_a_gpu_each_in_the_gpu_overlay(rendered):
    for name in ("diffusion", "tgi"):
        deployment = find(rendered["gpu"], "Deployment", name)
        container = pod_spec(deployment)["containers"][0]
        assert gpu_limit(container) == 1, f"{name} has no nvidia.com/gpu limit"
        tolerations = pod_spec(deployment).get("tolerations", [])
        assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), name
    diffusion = pod_spec(find(rendered["gpu"], "Deployment", "diffusion"))["containers"][0]
    assert env_of(diffusion)["STORYREEL_DIFFUSION_DEVICE"]["value"] == "cuda"


def test_gpu_overlay_runs_only_the_gpu_tier_on_gpus(rendered):
    for workload in workloads(rendered["gpu"]):
        if workload["metadata"]["name"] in ("diffusion", "tgi"):
            continue
        for container in containers(workload):
            assert gpu_limit(container) == 0, f"{label(workload)} asks for a GPU"


def test_cpu_dev_overlay_needs_no_gpu(rendered):
    for workload in workloads(rendered["cpu-dev"]):
        for container in containers(workload):
            assert gpu_limit(container) == 0, f"{label(workload)} asks for a GPU"
    assert not of_kind(rendered["cpu-dev"], "ScaledObject")
    diffusion = pod_spec(find(rendered["cpu-dev"], "Deployment", "diffusion"))["containers"][0]
    assert env_of(diffusion)["STORYREEL_DIFFUSION_DEVICE"]["value"] == "cpu"


@overlays
def test_render_tier_has_a_headless_service_shared_memory_and_the_model_cache(rendered, overlay):
    objects = rendered[overlay]
    assert find(objects, "Service", "diffusion")["spec"]["clusterIP"] == "None"
    for name in ("diffusion", "tgi"):
        if name == "tgi" and overlay != "gpu":
            continue
        pod = pod_spec(find(objects, "Deployment", name))
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", name
        claim = volumes[mounts["/cache"]]["persistentVolumeClaim"]["claimName"]
        find(objects, "PersistentVolumeClaim", claim)
        env = env_of(pod["containers"][0])
        assert env["HF_HOME"]["value"].startswith("/cache/"), name


def test_gpu_model_cache_can_be_shared_by_replicas_on_many_nodes(rendered):
    claim = find(rendered["gpu"], "PersistentVolumeClaim", "model-cache")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_render_tier_scales_on_render_queue_depth_within_bounds(rendered):
    objects = rendered["gpu"]
    scaler = find(objects, "ScaledObject", "diffusion")
    spec = scaler["spec"]
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "diffusion"}
    assert spec["scaleTargetRef"] == target
    assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert "storyreel_render_queue_depth" in trigger["metadata"]["query"]
    assert float(trigger["metadata"]["threshold"]) > 0
    # Prometheus can only see the metric if it scrapes the port the service exports it on.
    container = pod_spec(find(objects, "Deployment", "diffusion"))["containers"][0]
    env = env_of(container)
    metrics_port = int(env["STORYREEL_DIFFUSION_METRICS_PORT"]["value"])
    assert env["STORYREEL_DIFFUSION_METRICS_HOST"]["value"] == "0.0.0.0"
    assert {"name": "metrics", "containerPort": metrics_port} in container["ports"]
    monitor = find(objects, "PodMonitor", "diffusion")
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    assert selects(
        monitor["spec"]["selector"], template_labels(find(objects, "Deployment", "diffusion"))
    )


# --- autoscaling and availability -------------------------------------------------------------


@overlays
def test_gateway_and_composer_scale_on_cpu(rendered, overlay):
    for name in ("gateway", "composer"):
        hpa = find(rendered[overlay], "HorizontalPodAutoscaler", name)
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
        }
        assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
        assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]


@overlays
def test_autoscaled_deployments_leave_the_replica_count_to_the_autoscaler(rendered, overlay):
    objects = rendered[overlay]
    scalers = of_kind(objects, "HorizontalPodAutoscaler") + of_kind(objects, "ScaledObject")
    scaled = {scaler["spec"]["scaleTargetRef"]["name"] for scaler in scalers}
    assert scaled, "nothing is autoscaled"
    for name in scaled:
        assert "replicas" not in find(objects, "Deployment", name)["spec"], name


@overlays
def test_every_deployment_has_a_disruption_budget(rendered, overlay):
    objects = rendered[overlay]
    budgets = of_kind(objects, "PodDisruptionBudget")
    for deployment in of_kind(objects, "Deployment"):
        labels = template_labels(deployment)
        assert any(selects(b["spec"]["selector"], labels) for b in budgets), label(deployment)


# --- exposure and traffic ---------------------------------------------------------------------


#: The one Ingress, per overlay: the gpu overlay's, to the gateway's web port (the studio).
INGRESSES = {"cpu-dev": [], "gpu": ["gateway-web"]}


@overlays
def test_only_the_gateway_is_exposed_outside_the_cluster(rendered, overlay):
    objects = rendered[overlay]
    for service in of_kind(objects, "Service"):
        spec = service["spec"]
        exposed = spec.get("type", "ClusterIP") in ("NodePort", "LoadBalancer") or spec.get(
            "externalIPs"
        )
        if service["metadata"]["name"] != "gateway":
            assert not exposed, f"{label(service)} is reachable from outside"
    for kind in ("Gateway", "HTTPRoute", "GRPCRoute", "Route"):
        assert not of_kind(objects, kind), f"{overlay} renders an {kind}"
    ingresses = of_kind(objects, "Ingress")
    assert [i["metadata"]["name"] for i in ingresses] == INGRESSES[overlay]
    for ingress in ingresses:
        # Only to the gateway's web port, and over TLS only.
        assert ingress["spec"]["tls"] and ingress.get("spec", {}).get("defaultBackend") is None
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                service = find(objects, "Service", backend["name"])
                [port] = [
                    p for p in service["spec"]["ports"] if p["name"] == backend["port"]["name"]
                ]
                assert port["targetPort"] == "web", label(ingress)
                assert selects(
                    {"matchLabels": service["spec"]["selector"]},
                    template_labels(find(objects, "Deployment", "gateway")),
                )


@overlays
def test_the_gateway_serves_the_studio_on_its_web_port(rendered, overlay):
    objects = rendered[overlay]
    [container] = containers(find(objects, "Deployment", "gateway"))
    web = [p for p in container["ports"] if p["name"] == "web"]
    assert web and str(web[0]["containerPort"]) == env_value(
        objects, container, "STORYREEL_GATEWAY_WEB_PORT"
    )
    labels = template_labels(find(objects, "Deployment", "gateway"))
    allowed = {p["port"] for rule in ingress_rules_for(objects, labels) for p in rule["ports"]}
    assert web[0]["containerPort"] in allowed
    for workload in workloads(objects):
        pod = pod_spec(workload)
        assert not pod.get("hostNetwork"), label(workload)
        for container in containers(workload):
            assert all("hostPort" not in p for p in container.get("ports", [])), label(workload)


def test_gpu_overlay_gives_the_gateway_a_load_balancer(rendered):
    assert find(rendered["gpu"], "Service", "gateway")["spec"]["type"] == "LoadBalancer"


@overlays
def test_any_gateway_replica_answers_for_any_job(rendered, overlay):
    # Replicas share their jobs through the database, so a client's calls may land anywhere.
    objects = rendered[overlay]
    service = find(objects, "Service", "gateway")
    assert service["spec"].get("sessionAffinity", "None") == "None"
    # ... and the artifacts those jobs name through the store: a file:// folder is one
    # pod's own.
    for container in containers(find(objects, "Deployment", "gateway")):
        url = env_value(objects, container, "STORYREEL_STORAGE_URL")
        assert url and url.startswith("s3://"), f"the gateway stores jobs in {url!r}"


@overlays
def test_each_gateway_replica_is_named_after_its_pod(rendered, overlay):
    # The instance id owns jobs in the store: unique among running replicas, and kept
    # across a container restart so the restarted process takes its jobs back at once.
    container = pod_spec(find(rendered[overlay], "Deployment", "gateway"))["containers"][0]
    entry = env_of(container)["STORYREEL_GATEWAY_INSTANCE_ID"]
    assert "value" not in entry
    assert entry["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_production_keeps_a_second_gateway_to_adopt_the_jobs_of_one_that_dies(rendered):
    objects = rendered["gpu"]
    hpa = find(objects, "HorizontalPodAutoscaler", "gateway")
    min_replicas = hpa["spec"]["minReplicas"]
    assert min_replicas >= 2
    deployment = find(objects, "Deployment", "gateway")
    labels = template_labels(deployment)
    # A voluntary disruption (a node drain) leaves at least one replica running.
    (budget,) = [
        b for b in of_kind(objects, "PodDisruptionBudget") if selects(b["spec"]["selector"], labels)
    ]
    if "maxUnavailable" in budget["spec"]:
        assert isinstance(budget["spec"]["maxUnavailable"], int)
        assert budget["spec"]["maxUnavailable"] < min_replicas
    else:
        assert isinstance(budget["spec"]["minAvailable"], int)
        assert budget["spec"]["minAvailable"] >= 1
    # ... and the replicas are spread over nodes, so one node failing leaves another.
    spread = pod_spec(deployment).get("topologySpreadConstraints", [])
    assert any(
        c["topologyKey"] == "kubernetes.io/hostname" and selects(c["labelSelector"], labels)
        for c in spread
    ), "gateway replicas are not spread over nodes"


def ingress_rules_for(objects: list[dict], pod_labels: dict[str, str]) -> list[dict]:
    rules = []
    for policy in of_kind(objects, "NetworkPolicy"):
        if selects(policy["spec"]["podSelector"], pod_labels):
            rules.extend(policy["spec"].get("ingress", []))
    return rules


@overlays
def test_network_policies_deny_ingress_unless_allowed(rendered, overlay):
    policy = find(rendered[overlay], "NetworkPolicy", "default-deny-ingress")
    assert policy["spec"]["podSelector"] == {}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert "ingress" not in policy["spec"]


@overlays
def test_internal_services_accept_traffic_only_from_the_gateway(rendered, overlay):
    objects = rendered[overlay]
    gateway_labels = template_labels(find(objects, "Deployment", "gateway"))
    for name, port in SERVICES.items():
        if name == "gateway":
            continue
        labels = template_labels(find(objects, "Deployment", name))
        rules = ingress_rules_for(objects, labels)
        grpc_rules = [r for r in rules if any(p.get("port") == port for p in r.get("ports", []))]
        assert grpc_rules, f"nothing may call {name}"
        for rule in rules:
            ports = [p.get("port") for p in rule.get("ports", [])]
            assert ports, f"{name} has a rule open on every port"
            if port in ports:
                peers = rule.get("from")
                assert peers, f"{name} accepts gRPC from anywhere"
                for peer in peers:
                    assert set(peer) == {"podSelector"}, f"{name}: {peer}"
                    assert selects(peer["podSelector"], gateway_labels)
                    assert peer["podSelector"] == {
                        "matchLabels": {"app.kubernetes.io/name": "gateway"}
                    }, f"{name} accepts gRPC from more than the gateway: {peer}"


@overlays
def test_the_gateway_accepts_clients_on_its_grpc_and_web_ports_only(rendered, overlay):
    objects = rendered[overlay]
    labels = template_labels(find(objects, "Deployment", "gateway"))
    rules = ingress_rules_for(objects, labels)
    assert rules
    for rule in rules:
        assert [p["port"] for p in rule["ports"]] == [SERVICES["gateway"], GATEWAY_WEB_PORT]


def test_tgi_accepts_traffic_only_from_the_llm_service(rendered):
    objects = rendered["gpu"]
    labels = template_labels(find(objects, "Deployment", "tgi"))
    rules = ingress_rules_for(objects, labels)
    assert rules
    for rule in rules:
        assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "llm"}}}]


# --- configuration and secrets ----------------------------------------------------------------


def secret_refs(objects: list[dict], *, include_optional: bool = False) -> dict[str, set[str]]:
    """Secret name -> keys that workloads read from it: env entries and mounted volumes.

    Optional references are left out unless ``include_optional``; so are Secrets that a
    cert-manager Certificate of the same overlay issues.
    """
    issued = {c["spec"]["secretName"] for c in of_kind(objects, "Certificate")}
    refs: dict[str, set[str]] = {}
    for workload in workloads(objects):
        for container in containers(workload):
            for entry in container.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref and (include_optional or not ref.get("optional")):
                    refs.setdefault(ref["name"], set()).add(ref["key"])
        for volume in pod_spec(workload).get("volumes", []):
            secret = volume.get("secret")
            if secret and (include_optional or not secret.get("optional")):
                assert secret.get("items"), f"{label(workload)}: say which keys {volume} reads"
                keys = {item["key"] for item in secret["items"]}
                refs.setdefault(secret["secretName"], set()).update(keys)
    return {name: keys for name, keys in refs.items() if name not in issued}


def test_cpu_dev_renders_every_secret_and_key_its_pods_read(rendered):
    objects = rendered["cpu-dev"]
    refs = secret_refs(objects, include_optional=True)
    assert refs
    for name, keys in refs.items():
        secret = find(objects, "Secret", name)
        assert keys <= set(secret.get("data", {})), f"{name} lacks {keys}"


def test_gpu_overlay_ships_no_credentials_and_the_docs_say_how_to_create_them(rendered):
    objects = rendered["gpu"]
    assert not of_kind(objects, "Secret")
    docs = DOCS.read_text()
    referenced = secret_refs(objects, include_optional=True)
    assert referenced.keys() == {
        "storyreel-minio",
        "storyreel-api-keys",
        "storyreel-postgres",
        "storyreel-database",
        "storyreel-gateway-api-keys",
        "storyreel-internal",
    }
    for name, keys in referenced.items():
        command = re.search(
            rf"kubectl -n storyreel create secret generic {name}"
            r"((?:\s+\\?\s*--from-(?:literal|file)=\S+)+)",
            docs,
        )
        assert command, f"docs/deploy.md does not show how to create {name}"
        for key in keys:
            assert re.search(rf"--from-(literal|file)={re.escape(key)}=", command.group(1)), (
                f"{name}: key {key}"
            )


@overlays
def test_every_referenced_config_map_and_claim_exists(rendered, overlay):
    objects = rendered[overlay]
    for workload in workloads(objects):
        pod = pod_spec(workload)
        for container in containers(workload):
            for source in container.get("envFrom", []):
                find(objects, "ConfigMap", source["configMapRef"]["name"])
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                find(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
            if "configMap" in volume:
                find(objects, "ConfigMap", volume["configMap"]["name"])


@overlays
def test_services_that_store_artifacts_can_reach_minio(rendered, overlay):
    objects = rendered[overlay]
    minio_labels = template_labels(find(objects, "StatefulSet", "minio"))
    peers = [
        peer["podSelector"]
        for rule in ingress_rules_for(objects, minio_labels)
        for peer in rule.get("from", [])
    ]
    for workload in workloads(objects):
        for container in containers(workload):
            sources = [s.get("configMapRef", {}).get("name") for s in container.get("envFrom", [])]
            if "storyreel-storage" in sources:
                labels = template_labels(workload)
                assert any(selects(p, labels) for p in peers), f"{label(workload)}: no MinIO"


# --- the job database -------------------------------------------------------------------------


def gateway_container(objects: list[dict]) -> dict:
    return pod_spec(find(objects, "Deployment", "gateway"))["containers"][0]


def postgres_container(objects: list[dict]) -> dict:
    (container,) = [
        c
        for c in pod_spec(find(objects, "StatefulSet", "postgres"))["containers"]
        if c["name"] == "postgres"
    ]
    return container


def secret_value(objects: list[dict], name: str, key: str) -> str:
    secret = find(objects, "Secret", name)
    if key in secret.get("stringData", {}):
        return secret["stringData"][key]
    return base64.b64decode(secret["data"][key]).decode()


def quantity(value: str | int) -> float:
    """A Kubernetes quantity (``250m``, ``512Mi``, ``20Gi``, ``2``) as a number."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3}
    units |= {"M": 1e6, "G": 1e9, "T": 1e12}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match, f"not a quantity: {value!r}"
    return float(match.group(1)) * units.get(match.group(2), 1)


def egress_allows(
    objects: list[dict], source: dict[str, str], target: dict[str, str], port: int, port_name: str
) -> bool:
    """Whether pods labelled ``source`` may open ``port`` (``port_name``) on pods ``target``.

    Without an egress policy selecting the source, everything is allowed; with one, some
    rule must name the port (or none) and a peer that selects the target (or none).
    """
    policies = [
        p
        for p in of_kind(objects, "NetworkPolicy")
        if "Egress" in p["spec"].get("policyTypes", [])
        and selects(p["spec"]["podSelector"], source)
    ]
    if not policies:
        return True
    for policy in policies:
        for rule in policy["spec"].get("egress", []):
            ports = [p.get("port") for p in rule.get("ports", [])]
            peers = rule.get("to", [])
            port_ok = not ports or port in ports or port_name in ports
            peer_ok = not peers or any(
                "podSelector" in peer and selects(peer["podSelector"], target) for peer in peers
            )
            if port_ok and peer_ok:
                return True
    return False


def database_url_secret(objects: list[dict]) -> tuple[str, str, dict]:
    """The Secret (name, key) and volume of the gateway's database URL file."""
    workload = find(objects, "Deployment", "gateway")
    return file_setting(workload, gateway_container(objects), DATABASE_URL_FILE)


@overlays
def test_gateway_reads_its_database_url_from_a_secret(rendered, overlay):
    # Without the URL the gateway keeps its jobs in a SQLite file of its own: replicas
    # would not share them. The URL carries the password, so it comes from a Secret,
    # mounted as a file (STORYREEL_GATEWAY_DATABASE_URL_FILE), never an env variable.
    env = env_of(gateway_container(rendered[overlay]))
    assert DATABASE_URL not in env, f"{DATABASE_URL} is an environment variable"
    name, key, volume = database_url_secret(rendered[overlay])
    assert name and key
    assert not volume["secret"].get("optional"), "an optional URL falls back to SQLite"


def test_cpu_dev_database_url_reaches_the_in_cluster_postgres(rendered):
    objects = rendered["cpu-dev"]
    name, key, _ = database_url_secret(objects)
    url = urlsplit(secret_value(objects, name, key))
    assert url.scheme == "postgresql+asyncpg", url.scheme
    # The host is the postgres Service, on a port it serves, in front of the StatefulSet.
    service = find(objects, "Service", url.hostname)
    assert url.port in [p["port"] for p in service["spec"]["ports"]]
    postgres = find(objects, "StatefulSet", "postgres")
    assert selects({"matchLabels": service["spec"]["selector"]}, template_labels(postgres))
    # User, database and password are the ones PostgreSQL creates on its first start.
    container = postgres_container(objects)
    env = env_of(container)
    assert url.username == env["POSTGRES_USER"]["value"]
    assert url.path == "/" + env["POSTGRES_DB"]["value"]
    name, key, _ = file_setting(postgres, container, "POSTGRES_PASSWORD_FILE")
    assert unquote(url.password or "") == secret_value(objects, name, key)


@overlays
def test_postgres_is_a_stateful_set_with_a_volume_claim_template(rendered, overlay):
    objects = rendered[overlay]
    assert not [d for d in of_kind(objects, "Deployment") if d["metadata"]["name"] == "postgres"]
    postgres = find(objects, "StatefulSet", "postgres")
    spec = postgres["spec"]
    assert spec.get("replicas", 1) == 1, "one PostgreSQL, not several writing one database"
    templates = {t["metadata"]["name"]: t for t in spec.get("volumeClaimTemplates", [])}
    assert templates, "postgres has no volumeClaimTemplates: its data would die with the pod"
    container = postgres_container(objects)
    assert re.fullmatch(r"postgres:16(\.\d+)?", container["image"].split("@")[0])
    # The data directory lies on a claim from a template, not on a pod volume.
    data_dir = env_of(container).get("PGDATA", {}).get("value", "/var/lib/postgresql/data")
    mounts = [m for m in container["volumeMounts"] if (data_dir + "/").startswith(m["mountPath"])]
    assert mounts, f"nothing is mounted at {data_dir}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    assert mount["name"] in templates, f"{data_dir} is on {mount['name']}, not a claim template"
    assert mount["name"] not in {v["name"] for v in pod_spec(postgres).get("volumes", [])}
    assert templates[mount["name"]]["spec"]["accessModes"] == ["ReadWriteOnce"]
    # Its governing Service answers on 5432 for these pods.
    service = find(objects, "Service", spec["serviceName"])
    assert service["metadata"]["name"] == "postgres"
    assert selects({"matchLabels": service["spec"]["selector"]}, template_labels(postgres))
    assert POSTGRES_PORT in [p["port"] for p in service["spec"]["ports"]]
    assert {"name": "postgres", "containerPort": POSTGRES_PORT} in container["ports"]
    # Its password comes from a Secret too, as a file (the image reads *_FILE).
    assert "POSTGRES_PASSWORD" not in env_of(container)
    name, key, _ = file_setting(postgres, container, "POSTGRES_PASSWORD_FILE")
    assert (name, key) == ("storyreel-postgres", "password")


@overlays
def test_postgres_probes_ask_pg_isready_and_it_runs_as_the_images_own_user(rendered, overlay):
    postgres = find(rendered[overlay], "StatefulSet", "postgres")
    container = postgres_container(rendered[overlay])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe].get("exec", {}).get("command", [])
        assert command[:1] == ["pg_isready"], f"{probe}: {command}"
    security = pod_spec(postgres)["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 999
    assert security["fsGroup"] == 999


def test_cpu_dev_runs_a_smaller_postgres_than_production(rendered):
    def sizes(overlay: str) -> dict[str, float]:
        objects = rendered[overlay]
        resources = postgres_container(objects)["resources"]
        (claim,) = find(objects, "StatefulSet", "postgres")["spec"]["volumeClaimTemplates"]
        return {
            "cpu request": quantity(resources["requests"]["cpu"]),
            "memory request": quantity(resources["requests"]["memory"]),
            "memory limit": quantity(resources["limits"]["memory"]),
            "volume": quantity(claim["spec"]["resources"]["requests"]["storage"]),
        }

    small, production = sizes("cpu-dev"), sizes("gpu")
    for what, value in small.items():
        assert value < production[what], f"cpu-dev asks for as much {what} as production"
    assert small["volume"] <= 5 * 2**30


@overlays
def test_only_the_gateway_reaches_postgres(rendered, overlay):
    objects = rendered[overlay]
    gateway_labels = template_labels(find(objects, "Deployment", "gateway"))
    postgres_labels = template_labels(find(objects, "StatefulSet", "postgres"))
    rules = ingress_rules_for(objects, postgres_labels)
    admits_gateway = False
    for rule in rules:
        ports = [p.get("port") for p in rule.get("ports", [])]
        assert ports, "postgres has a rule open on every port"
        peers = rule.get("from")
        assert peers, "postgres accepts connections from anywhere"
        for peer in peers:
            assert set(peer) == {"podSelector"}, f"postgres: {peer}"
            for workload in workloads(objects):
                if selects(peer["podSelector"], template_labels(workload)):
                    assert label(workload) == "Deployment/gateway", (
                        f"{label(workload)} may reach postgres"
                    )
            if POSTGRES_PORT in ports and selects(peer["podSelector"], gateway_labels):
                admits_gateway = True
    assert admits_gateway, "no NetworkPolicy admits the gateway to postgres:5432"
    # Should the gateway's egress ever be restricted, postgres must stay allowed.
    assert egress_allows(objects, gateway_labels, postgres_labels, POSTGRES_PORT, "postgres")


def test_an_egress_policy_that_forgets_postgres_is_caught(rendered):
    objects = copy.deepcopy(rendered["gpu"])
    gateway_labels = template_labels(find(objects, "Deployment", "gateway"))
    postgres_labels = template_labels(find(objects, "StatefulSet", "postgres"))
    objects.append(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "gateway-egress"},
            "spec": {
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway"}},
                "policyTypes": ["Egress"],
                "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}],
            },
        }
    )
    assert not egress_allows(objects, gateway_labels, postgres_labels, POSTGRES_PORT, "postgres")


def test_an_external_database_is_one_secret_away(rendered, kustomize, tmp_path):
    # The overlay that docs/deploy.md gives for a managed database drops the in-cluster
    # PostgreSQL and leaves the gateway exactly as it was: only the URL Secret changes.
    blocks = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), re.DOTALL)
    (block,) = [b for b in blocks if "$patch: delete" in b and "kind: StatefulSet" in b]
    kustomization = yaml.safe_load(textwrap.dedent(block))
    assert kustomization["resources"] == ["../gpu"]
    kustomization["resources"] = [os.path.relpath(OVERLAYS_DIR / "gpu", tmp_path)]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    objects = kustomize(tmp_path)
    assert not [o for o in of_kind(objects, "StatefulSet") if o["metadata"]["name"] == "postgres"]
    gateway = find(objects, "Deployment", "gateway")
    assert gateway == find(rendered["gpu"], "Deployment", "gateway")
    assert database_url_secret(objects)[:2] == ("storyreel-database", "url")


def test_docs_say_how_to_back_up_migrate_and_import_jobs(rendered):
    docs = DOCS.read_text()
    env = env_of(postgres_container(rendered["gpu"]))
    user, database = env["POSTGRES_USER"]["value"], env["POSTGRES_DB"]["value"]
    pod = "postgres-0"  # the StatefulSet's one pod
    assert f"kubectl -n storyreel exec {pod} -- pg_dump -U {user} -d {database} -Fc" in docs
    assert re.search(rf"kubectl -n storyreel exec -i {pod} --\s*\\?\s*pg_restore -U {user}", docs)
    assert 'sqlite3 data/gateway.db ".backup' in docs
    assert "python -m storyreel_gateway migrate" in docs
    assert "python -m storyreel_gateway import-manifests" in docs


# --- authentication: API keys, the internal token, TLS ----------------------------------------

#: Where the API keys and the internal token come from: Secret name and key.
API_KEYS_SECRET = ("storyreel-gateway-api-keys", "keys.json")
INTERNAL_SECRET = ("storyreel-internal", "token")
#: Secrets that a program can only take from the environment (it has no *_FILE form); the
#: checkov skips of CKV_K8S_35 name them. Workload -> variables. storyreel's own settings
#: all have a file form, so only TGI is here.
SECRET_ENV_ALLOWED = {"tgi": {"HF_TOKEN"}}
#: The S3 keys, as every service that stores artifacts reads them: setting -> Secret key.
S3_KEY_FILES = {
    "STORYREEL_STORAGE_S3_ACCESS_KEY_FILE": ("storyreel-minio", "access-key"),
    "STORYREEL_STORAGE_S3_SECRET_KEY_FILE": ("storyreel-minio", "secret-key"),
}


def secret_file(workload: dict, container: dict, path: str) -> tuple[str, str, dict]:
    """The Secret (name, key) and volume that the file at ``path`` in ``container`` is."""
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(prefix):
            continue
        volume = volumes[mount["name"]]
        assert "secret" in volume, f"{path} is on {mount['name']}, which is not a Secret"
        assert "subPath" not in mount, "a subPath mount never sees the Secret change"
        relative = path[len(prefix) :]
        for item in volume["secret"].get("items", []):
            if item["path"] == relative:
                return volume["secret"]["secretName"], item["key"], volume
        return volume["secret"]["secretName"], relative, volume
    raise AssertionError(f"{label(workload)}: nothing is mounted at {path}")


def file_setting(workload: dict, container: dict, variable: str) -> tuple[str, str, dict]:
    """The Secret (name, key) and volume behind a ``*_FILE`` setting of ``container``."""
    entry = env_of(container).get(variable)
    assert entry, f"{label(workload)} has no {variable}"
    assert "value" in entry, f"{variable} should name a file: {entry}"
    return secret_file(workload, container, entry["value"])


def rendered_secret(objects: list[dict], name: str, key: str) -> str:
    return secret_value(objects, name, key)


def gateway_settings_from(keys_json: str, tmp_path: Path):
    """GatewaySettings as the gateway builds them on 0.0.0.0 from this keys file."""
    from storyreel_gateway.settings import GatewaySettings

    path = tmp_path / "keys.json"
    path.write_text(keys_json)
    return GatewaySettings(host="0.0.0.0", api_keys_file=path)


@overlays
def test_gateway_reads_its_api_keys_from_a_mounted_secret(rendered, overlay):
    # The gateway listens on 0.0.0.0, where it refuses to start without a key.
    objects = rendered[overlay]
    workload = find(objects, "Deployment", "gateway")
    container = gateway_container(objects)
    env = env_of(container)
    assert env["STORYREEL_GATEWAY_HOST"]["value"] == "0.0.0.0"
    assert "STORYREEL_GATEWAY_API_KEYS" not in env, "keys are written into the manifest"
    name, key, volume = file_setting(workload, container, "STORYREEL_GATEWAY_API_KEYS_FILE")
    assert (name, key) == API_KEYS_SECRET
    assert not volume["secret"].get("optional"), "a missing Secret would start no gateway"


def test_cpu_dev_gateway_starts_with_its_development_key(rendered, tmp_path):
    objects = rendered["cpu-dev"]
    keys_json = rendered_secret(objects, *API_KEYS_SECRET)
    settings = gateway_settings_from(keys_json, tmp_path)
    from storyreel_gateway.auth import ApiKeys

    keys = ApiKeys(settings.tenant_keys())
    assert keys.enabled
    # The key docs/deploy.md tells cpu-dev users to pass.
    assert "--api-key storyreel-dev-key" in DOCS.read_text()
    assert keys.tenant_for("Bearer storyreel-dev-key") == "dev"


@overlays
def test_every_service_reads_the_internal_token_from_a_mounted_secret(rendered, overlay):
    # The gateway presents it; llm, diffusion and composer refuse calls without it.
    objects = rendered[overlay]
    for name in SERVICES:
        workload = find(objects, "Deployment", name)
        container = pod_spec(workload)["containers"][0]
        assert "STORYREEL_INTERNAL_TOKEN" not in env_of(container), f"{name}: token in env"
        secret, key, volume = file_setting(workload, container, "STORYREEL_INTERNAL_TOKEN_FILE")
        assert (secret, key) == INTERNAL_SECRET, name
        assert not volume["secret"].get("optional"), f"{name} may start without the token"


def test_cpu_dev_generates_a_development_internal_token(rendered):
    token = rendered_secret(rendered["cpu-dev"], *INTERNAL_SECRET)
    assert len(token) >= 16 and token == token.strip()


@overlays
def test_every_mounted_secret_is_readable_by_its_container_and_no_one_else(rendered, overlay):
    for workload in workloads(rendered[overlay]):
        pod = pod_spec(workload)
        security = pod.get("securityContext", {})
        for volume in pod.get("volumes", []):
            if "secret" not in volume:
                continue
            mode = volume["secret"].get("defaultMode", 0o644)
            where = f"{label(workload)} volume {volume['name']}"
            assert not mode & 0o007, f"{where}: mode {mode:o} lets any user read it"
            assert not mode & 0o333, f"{where}: mode {mode:o} (a decimal 440 for octal 0440?)"
            # Secret files belong to root and to the pod's fsGroup: the group must read them.
            assert mode & 0o040, f"{where}: mode {mode:o}"
            assert security.get("fsGroup") is not None, f"{where}: no fsGroup owns the files"


@overlays
def test_secrets_reach_containers_as_files_except_settings_without_a_file_form(rendered, overlay):
    for workload in workloads(rendered[overlay]):
        for container in containers(workload):
            from_secrets = {
                entry["name"]
                for entry in container.get("env", [])
                if "secretKeyRef" in entry.get("valueFrom", {})
            }
            allowed = SECRET_ENV_ALLOWED.get(workload["metadata"]["name"], set())
            assert from_secrets <= allowed, (
                f"{label(workload)} takes {sorted(from_secrets - allowed)} from a Secret as "
                "environment variables: mount it as a file (or skip CKV_K8S_35 with a reason)"
            )


@overlays
def test_services_that_store_artifacts_read_the_s3_keys_from_mounted_files(rendered, overlay):
    objects = rendered[overlay]
    for name in ("gateway", "diffusion", "composer"):
        workload = find(objects, "Deployment", name)
        container = pod_spec(workload)["containers"][0]
        env = env_of(container)
        for variable, secret in S3_KEY_FILES.items():
            assert variable.removesuffix("_FILE") not in env, f"{name}: S3 key in env"
            mounted, key, volume = file_setting(workload, container, variable)
            assert (mounted, key) == secret, f"{name} {variable}"
            assert not volume["secret"].get("optional"), f"{name} may start without S3 keys"


def test_the_gateways_startup_budget_covers_its_wait_for_the_upstreams(rendered):
    # The gateway reports NOT_SERVING until llm, diffusion and composer report SERVING, for
    # at most retry_give_up_after_s; a startup probe that gives up sooner restarts it in a
    # loop while a model loads. 30 s more for the migrations and the start itself.
    from storyreel_gateway.settings import GatewaySettings

    wait_s = GatewaySettings.model_fields["retry_give_up_after_s"].default
    for overlay, objects in rendered.items():
        container = gateway_container(objects)
        setting = env_of(container).get("STORYREEL_GATEWAY_RETRY_GIVE_UP_AFTER_S", {})
        wait = float(setting.get("value", wait_s))
        startup = container["startupProbe"]
        budget_s = startup["periodSeconds"] * startup["failureThreshold"]
        assert budget_s >= max(330, wait + 30), f"{overlay}: gateway startup budget {budget_s} s"


def test_gpu_gateway_serves_tls_from_a_certificate_that_cert_manager_issues(rendered):
    objects = rendered["gpu"]
    workload = find(objects, "Deployment", "gateway")
    container = gateway_container(objects)
    cert_name, cert_key, cert_volume = file_setting(
        workload, container, "STORYREEL_GATEWAY_TLS_CERT_FILE"
    )
    key_name, key_key, _ = file_setting(workload, container, "STORYREEL_GATEWAY_TLS_KEY_FILE")
    assert cert_name == key_name
    assert (cert_key, key_key) == ("tls.crt", "tls.key")  # a kubernetes.io/tls Secret
    assert not cert_volume["secret"].get("optional")
    (certificate,) = [
        c for c in of_kind(objects, "Certificate") if c["spec"]["secretName"] == cert_name
    ]
    spec = certificate["spec"]
    assert spec["issuerRef"]["name"] and spec["issuerRef"].get("kind") in (
        "Issuer",
        "ClusterIssuer",
    )
    assert spec["dnsNames"], "the certificate names no host"
    assert "server auth" in spec.get("usages", ["server auth"])
    # ... and the docs say how to set the name and the issuer, or bring a TLS Secret.
    docs = DOCS.read_text()
    assert "kubectl -n storyreel create secret tls " + cert_name in docs
    assert "issuerRef" in docs and "dnsNames" in docs


def test_gpu_load_balancer_publishes_only_the_gateways_tls_port(rendered):
    objects = rendered["gpu"]
    service = find(objects, "Service", "gateway")
    assert service["spec"]["type"] == "LoadBalancer"
    container = gateway_container(objects)
    assert serves_tls(container), "the gateway's port is plaintext"
    (grpc_port,) = [p for p in container["ports"] if p["name"] == "grpc"]
    ports = service["spec"]["ports"]
    assert ports, "the Service publishes nothing"
    for port in ports:
        assert port["targetPort"] in ("grpc", grpc_port["containerPort"]), port
        assert port["port"] == 443, f"TLS is published on {port['port']}, not 443"
    # The container serves nothing else but the web port, which only the Ingress reaches
    # (through a ClusterIP Service, TLS at the Ingress).
    assert [p["name"] for p in container["ports"]] == ["grpc", "web"]
    web = find(objects, "Service", "gateway-web")
    assert web["spec"]["type"] == "ClusterIP"


def test_cpu_dev_gateway_is_not_published_beyond_the_cluster(rendered):
    # Plaintext, with a development key: reachable through kubectl port-forward only.
    service = find(rendered["cpu-dev"], "Service", "gateway")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"


def docs_overlay(kustomize, tmp_path: Path, marker: str) -> list[dict]:
    """Render the ``my-overlay`` kustomization in docs/deploy.md that contains ``marker``."""
    blocks = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), re.DOTALL)
    (block,) = [b for b in blocks if "my-overlay/kustomization.yaml" in b and marker in b]
    kustomization = yaml.safe_load(textwrap.dedent(block))
    assert kustomization["resources"] == ["../gpu"]
    kustomization["resources"] = [os.path.relpath(OVERLAYS_DIR / "gpu", tmp_path)]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return kustomize(tmp_path)


def test_the_documented_internal_mtls_overlay_wires_every_service(kustomize, tmp_path):
    objects = docs_overlay(kustomize, tmp_path, "STORYREEL_INTERNAL_TLS_CA_FILE")
    files = {"CA": "ca.crt", "CERT": "tls.crt", "KEY": "tls.key"}
    for name, port in SERVICES.items():
        workload = find(objects, "Deployment", name)
        container = pod_spec(workload)["containers"][0]
        for setting, key in files.items():
            secret, item, volume = file_setting(
                workload, container, f"STORYREEL_INTERNAL_TLS_{setting}_FILE"
            )
            assert (secret, item) == ("storyreel-internal-tls", key), name
            assert volume["secret"]["defaultMode"] == 0o440, name
        # Probes that can reach a port that wants a client certificate.
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert "grpc" not in container[probe], f"{name} {probe}"
            assert container[probe]["tcpSocket"]["port"] in ("grpc", port)
        # ... and still the token.
        assert file_setting(workload, container, "STORYREEL_INTERNAL_TOKEN_FILE")[:2] == (
            INTERNAL_SECRET
        )
    for version in KUBERNETES_VERSIONS:
        for obj in objects:
            if obj["kind"] == "Deployment":
                validate_builtin(obj, version)


def test_the_documented_certificate_patch_sets_the_name_and_the_issuer(kustomize, tmp_path):
    objects = docs_overlay(kustomize, tmp_path, "kind: Certificate, name: gateway")
    spec = find(objects, "Certificate", "gateway")["spec"]
    assert spec["dnsNames"] == ["storyreel.example.org"]
    assert spec["issuerRef"]["name"] == "letsencrypt"
    validate_custom(find(objects, "Certificate", "gateway"))
