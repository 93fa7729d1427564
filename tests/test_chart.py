"""The Helm chart, its Grafana dashboard and the Dockerfile, checked with the real tools' own engines.

Helm's Go engine (bundled by helm-python-sdk) lints the chart, checks values against
values.schema.json and renders it with default and non-default values; every rendered object is
validated strictly (unknown fields fail) against Kubernetes' OpenAPI schemas (kubernetes-validate)
for the oldest and the newest Kubernetes the chart supports. RBAC is checked both ways: nothing
beyond what the operator does, and everything it does (the objects operator/resources.py builds,
the HelixClusters it reconciles, the Nodes it reads). The dashboard may query only metrics that
exist. The Dockerfile is read with Docker's own parser (the `dockerfile` package); no image is built
here (no Docker engine), so what is checked is what can be without one.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest

helm = pytest.importorskip("helm_python", reason="needs the dev extra (helm-python-sdk)")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="needs the dev extra (kubernetes-validate)")
dockerfile = pytest.importorskip("dockerfile", reason="needs the dev extra (dockerfile)")

from helix import __version__  # noqa: E402
from helix.operator import kube  # noqa: E402
from helix.operator.crd import HelixClusterSpec  # noqa: E402
from helix.operator.metrics import METRIC_NAMES as OPERATOR_METRIC_NAMES  # noqa: E402
from helix.operator.metrics import OperatorMetrics  # noqa: E402
from helix.operator.resources import CLUSTER_LABEL, Images, Owner, Rollout, owned_objects  # noqa: E402
from helix.operator.settings import DEFAULT_ROUTER_IMAGE, DEFAULT_WORKER_IMAGE  # noqa: E402
from helix.planner.generators import single_region  # noqa: E402
from helix.worker.metrics import METRIC_NAMES as ROUTER_METRIC_NAMES  # noqa: E402
from helix.worker.router import local_plan  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "helix"
DASHBOARD = CHART / "dashboards" / "helix.json"
RELEASE, NAMESPACE = "hx", "helix-system"
#: The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest the schemas know.
KUBE_VERSIONS = ("1.25.0", kubernetes_validate.utils.latest_version())

DEFAULTS: dict[str, Any] = {}
NAMESPACED: dict[str, Any] = {"operator": {"watchNamespaces": ["team-a", "team-b"]},
                              "metrics": {"serviceMonitor": {"enabled": True}}}
CLUSTER_WIDE: dict[str, Any] = {"operator": {"clusterWide": True}}
PEERING: dict[str, Any] = {"operator": {"replicas": 2, "peering": {"enabled": True}, "clusterWide": True},
                           "metrics": {"serviceMonitor": {"enabled": True}}}
EVERYTHING: dict[str, Any] = {
    "fullnameOverride": "helix-operator",
    "image": {"repository": "registry.example.com/helix/operator", "tag": "dev", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "registry"}],
    "operator": {
        "watchNamespaces": ["team-a"], "replicas": 3, "peering": {"enabled": True},
        "extraEnv": [{"name": "TZ", "value": "UTC"}],
        "resources": {"requests": {"cpu": "2", "memory": "1Gi"}, "limits": {"cpu": "4", "memory": "4Gi"}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "nvidia.com/gpu.present", "operator": "DoesNotExist"}]}]}}},
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"example.com/team": "ml"}, "podLabels": {"team": "ml"},
        "plannerThreads": 4, "verbose": True,
    },
    "workers": {"image": {"repository": "registry.example.com/helix/worker", "tag": "cu12"}},
    "routers": {"image": {"repository": "registry.example.com/helix/router"}},
    "workloadServiceAccount": "llm-pods",
    "serviceAccount": {"create": True, "name": "helix-ops", "annotations": {"example.com/role": "operator"}},
    "health": {"port": 9091},
    "metrics": {"port": 9090, "service": {"type": "NodePort", "annotations": {"example.com/scrape": "true"}},
                "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"},
                                   "interval": "15s", "scrapeTimeout": "5s", "routers": True}},
    "dashboards": {"namespace": "monitoring", "labelValue": "helix", "annotations": {"grafana_folder": "Helix"}},
}
NOTHING_OPTIONAL: dict[str, Any] = {"rbac": {"create": False}, "serviceAccount": {"create": False},
                                    "dashboards": {"enabled": False}}
VALUE_SETS = {"defaults": DEFAULTS, "namespaced": NAMESPACED, "cluster-wide": CLUSTER_WIDE, "peering": PEERING,
              "everything": EVERYTHING, "nothing-optional": NOTHING_OPTIONAL}


@pytest.fixture(scope="module")
def chart() -> Iterator[Any]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: Any, values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every object the chart renders (templates only; the CRD is in crds/)."""
    manifests = chart.render(copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE)
    return [obj for path, text in sorted(manifests.items()) if path.endswith(".yaml")
            for obj in yaml.safe_load_all(text) if obj]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}: {[o['metadata']['name'] for o in found]}"
    return found[0]


def operator_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0])


# -- Helm's own checks ------------------------------------------------------------------------------

@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_helm_lint_is_clean(values: dict[str, Any]) -> None:
    report = helm.lint(CHART, copy.deepcopy(values), strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors (strict)
    assert not problems and not report["errors"], report


@pytest.mark.parametrize("values", [
    {"operator": {"replica": 2}},  # a typo: unknown keys are refused, not ignored
    {"operator": {"watchNamespaces": ["Team_A"]}},  # not a namespace name
    {"operator": {"replicas": 0}},
    {"image": {"repository": "x", "pullPolicy": "Sometimes"}},
    {"metrics": {"port": 70000}},
    {"metrics": {"serviceMonitor": {"interval": "30"}}},  # a duration needs its unit
    {"dashboards": {"label": ""}},
    {"operator": {"clusterWide": "yes"}},
], ids=str)
def test_values_schema_refuses_mistakes(chart: Any, values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmValuesError):
        render(chart, values)


def test_default_values_satisfy_the_schema(chart: Any) -> None:
    chart.validate_schema(chart.values)
    for values in VALUE_SETS.values():
        chart.validate_schema(copy.deepcopy(values))


def test_more_than_one_replica_needs_peering(chart: Any) -> None:
    with pytest.raises(helm.HelmRenderError, match="peering"):
        render(chart, {"operator": {"replicas": 2}})


def test_cluster_wide_and_watched_namespaces_exclude_each_other(chart: Any) -> None:
    with pytest.raises(helm.HelmRenderError, match="clusterWide"):
        render(chart, {"operator": {"clusterWide": True, "watchNamespaces": ["team-a"]}})


def test_chart_and_default_image_follow_the_project_version(chart: Any) -> None:
    metadata = chart.metadata
    assert metadata["version"] == metadata["appVersion"] == __version__
    assert operator_container(render(chart, DEFAULTS))["image"].endswith(f":{__version__}")
    assert operator_container(render(chart, EVERYTHING))["image"] == "registry.example.com/helix/operator:dev"


# -- Kubernetes schemas -----------------------------------------------------------------------------

@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_rendered_objects_match_the_kubernetes_schema(chart: Any, values: dict[str, Any], version: str) -> None:
    objects = render(chart, values)
    assert objects
    for obj in objects:
        if obj["apiVersion"] == "monitoring.coreos.com/v1":  # a Prometheus-operator CRD: see the ServiceMonitor test
            continue
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_the_chart_ships_the_crd_and_it_matches_the_kubernetes_schema(chart: Any, version: str) -> None:
    crds = [yaml.safe_load(c["data"]) for c in chart.crds]
    assert [c["metadata"]["name"] for c in crds] == ["helixclusters.helix.ai"]
    kubernetes_validate.validate(crds[0], version, strict=True)


def test_the_schema_check_catches_a_broken_object(chart: Any) -> None:
    deployment = one(render(chart, DEFAULTS), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[-1], strict=True)


# -- the operator Deployment ------------------------------------------------------------------------

def option_values(args: list[str], option: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == option]


def test_watched_namespaces_become_operator_arguments(chart: Any) -> None:
    args = operator_container(render(chart, DEFAULTS))["args"]
    assert args[0] == "operator" and option_values(args, "--namespace") == [NAMESPACE]  # the release's own
    assert "--all-namespaces" not in args and "--standalone" in args
    args = operator_container(render(chart, NAMESPACED))["args"]
    assert option_values(args, "--namespace") == ["team-a", "team-b"] and "--all-namespaces" not in args
    args = operator_container(render(chart, CLUSTER_WIDE))["args"]
    assert "--all-namespaces" in args and "--namespace" not in args
    assert "--standalone" not in operator_container(render(chart, PEERING))["args"]


def test_the_operator_is_told_the_images_and_account_of_the_pods_it_creates(chart: Any) -> None:
    container = operator_container(render(chart, DEFAULTS))
    args = container["args"]
    assert option_values(args, "--worker-image") == [DEFAULT_WORKER_IMAGE]  # the operator's own defaults
    assert option_values(args, "--router-image") == [DEFAULT_ROUTER_IMAGE] == [container["image"]]
    assert "--service-account" not in args and "--verbose" not in args
    args = operator_container(render(chart, EVERYTHING))["args"]
    assert option_values(args, "--worker-image") == ["registry.example.com/helix/worker:cu12"]
    assert option_values(args, "--router-image") == [f"registry.example.com/helix/router:{__version__}"]
    assert option_values(args, "--service-account") == ["llm-pods"]
    assert option_values(args, "--planner-threads") == ["4"] and "--verbose" in args


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_the_operator_runs_non_root_on_a_read_only_filesystem(chart: Any, values: dict[str, Any]) -> None:
    objects = render(chart, values)
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    container = operator_container(objects)
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    tmp = {m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/tmp"}
    assert {v["name"] for v in pod["volumes"] if "emptyDir" in v} >= tmp and tmp
    # one standalone operator at a time, even while a new version rolls out
    peering = values.get("operator", {}).get("peering", {}).get("enabled", False)
    assert deployment["spec"].get("strategy", {}).get("type") == (None if peering else "Recreate")


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_probes_ports_and_metrics_service_line_up(chart: Any, values: dict[str, Any]) -> None:
    objects = render(chart, values)
    container = operator_container(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = container["args"]
    assert option_values(args, "--metrics-port") == [str(ports["metrics"])]
    assert option_values(args, "--health-port") == [str(ports["health"])]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    deployment = one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = one(objects, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["metrics"]


def test_the_operator_cli_accepts_the_chart_arguments(chart: Any) -> None:
    """The arguments parse with the real `helix operator` command (parsed, not run)."""
    import typer

    from helix.cli.app import app

    group = typer.main.get_command(app)
    for values in VALUE_SETS.values():
        args = operator_container(render(chart, values))["args"]
        parent = group.make_context("helix", list(args), resilient_parsing=False)
        command = group.get_command(parent, args[0])  # type: ignore[attr-defined]
        assert command is not None, "helix has no `operator` command"
        command.make_context(args[0], list(args[1:]), parent=parent)


# -- RBAC -------------------------------------------------------------------------------------------

@dataclass
class Grants:
    """The rules bound to the operator's service account: cluster-wide, and per namespace."""

    cluster: list[dict[str, Any]] = field(default_factory=list)
    namespaced: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @classmethod
    def of(cls, objects: list[dict[str, Any]], account: str) -> Grants:
        def bound(binding: dict[str, Any]) -> bool:
            return any(s["kind"] == "ServiceAccount" and s["name"] == account and s["namespace"] == NAMESPACE
                       for s in binding["subjects"])

        grants = cls()
        for binding in objects:
            if binding["kind"] == "ClusterRoleBinding" and bound(binding):
                grants.cluster += one(objects, "ClusterRole", binding["roleRef"]["name"])["rules"]
            elif binding["kind"] == "RoleBinding" and bound(binding):
                namespace = binding["metadata"]["namespace"]
                role = [o for o in objects if o["kind"] == "Role" and o["metadata"]["namespace"] == namespace
                        and o["metadata"]["name"] == binding["roleRef"]["name"]]
                grants.namespaced.setdefault(namespace, []).extend(role[0]["rules"])
        return grants

    def allows(self, group: str, resource: str, verb: str, namespace: str | None = None) -> bool:
        rules = self.cluster + (self.namespaced.get(namespace, []) if namespace else [])
        return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)


def grants(chart: Any, values: dict[str, Any]) -> Grants:
    objects = render(chart, values)
    account = one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    return Grants.of(objects, account)


def group_of(kind: kube.Kind) -> str:
    return kind.api_version.rpartition("/")[0]


def example_rollout(namespace: str) -> Rollout:
    spec = HelixClusterSpec.model_validate({"model": {"name": "llama2-7b", "weights": "pvc://models/llama-2-7b"}})
    plan = local_plan(32, 2, "llama2-7b")
    return Rollout(owner=Owner(name="llama", namespace=namespace, uid="0a1b"), spec=spec, plan=plan,
                   cluster=single_region({"L4": 2}), plan_hash="p", inputs_hash="i",
                   images=Images(worker="helix-worker:dev", router="helix-operator:dev"),
                   node_gpus={node.name: 1 for node in plan.nodes})


def operator_needs(namespace: str) -> list[tuple[str, str, str]]:
    """(API group, resource, verb) of everything the operator does in a namespace it serves.

    The objects are the ones operator/resources.py builds for a rollout (the operator applies them
    with get, create, merge patch and delete, lists and watches them for readiness); HelixClusters
    are watched by kopf and patched by it and by the status writer; kopf posts events. An owner
    reference with blockOwnerDeletion needs `update` on the owner's finalizers subresource where the
    OwnerReferencesPermissionEnforcement admission plugin runs — the only reason for that grant (the
    operator has no deletion handler, so kopf adds no finalizer).
    """
    objects = owned_objects(example_rollout(namespace)).ordered()
    needs = [(group_of(kind), kind.plural, verb) for kind in {kind for kind, _ in objects}
             for verb in ("get", "list", "watch", "create", "patch", "delete")]
    clusters = group_of(kube.HELIX_CLUSTERS), kube.HELIX_CLUSTERS.plural
    needs += [(*clusters, verb) for verb in ("get", "list", "watch", "patch")]
    needs += [(clusters[0], f"{clusters[1]}/status", "patch"), ("", "events", "create")]
    needs += [(group_of(kube.SECRETS), kube.SECRETS.plural, verb) for verb in ("get", "create")]  # apply.ensure_keys
    if any(ref.get("blockOwnerDeletion") for _, obj in objects for ref in obj["metadata"]["ownerReferences"]):
        needs.append((clusters[0], f"{clusters[1]}/finalizers", "update"))
    return needs


#: What the operator reads outside the namespaces it serves: pods, to count the GPUs others hold there.
CLUSTER_READS = [("", "pods", "list")]


@pytest.mark.parametrize("values", [CLUSTER_WIDE, PEERING], ids=["cluster-wide", "peering"])
def test_cluster_wide_rbac_covers_what_the_operator_does(chart: Any, values: dict[str, Any]) -> None:
    g = grants(chart, values)
    for need in operator_needs("any-namespace"):
        assert g.allows(*need, namespace="any-namespace"), need
    for verb in ("get", "list", "watch"):
        assert g.allows(group_of(kube.NODES), kube.NODES.plural, verb)
    for need in CLUSTER_READS:
        assert g.allows(*need)


@pytest.mark.parametrize(("values", "served"), [(DEFAULTS, [NAMESPACE]), (NAMESPACED, ["team-a", "team-b"])],
                         ids=["defaults", "namespaced"])
def test_namespaced_rbac_covers_the_watched_namespaces_only(chart: Any, values: dict[str, Any],
                                                           served: list[str]) -> None:
    g = grants(chart, values)
    assert sorted(g.namespaced) == served
    for namespace in served:
        for need in operator_needs(namespace):
            assert g.allows(*need, namespace=namespace), (namespace, need)
    for need in operator_needs("elsewhere"):
        if need not in CLUSTER_READS:
            assert not g.allows(*need, namespace="elsewhere"), need
    for verb in ("get", "list", "watch"):  # Nodes are cluster-scoped: read everywhere
        assert g.allows(group_of(kube.NODES), kube.NODES.plural, verb)
    for need in CLUSTER_READS:
        assert g.allows(*need)


#: Cluster-scoped rights the operator may have in any mode, and how.
CLUSTER_SCOPED = {("", "nodes"): {"get", "list", "watch"},
                  ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
                  ("", "namespaces"): {"list", "watch"},
                  ("", "pods"): {"list"},
                  ("kopf.dev", "clusterkopfpeerings"): {"get", "list", "watch", "patch"}}


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_rbac_grants_nothing_more(chart: Any, values: dict[str, Any]) -> None:
    objects = render(chart, values)
    rules = [(o, r) for o in objects if o["kind"] in ("ClusterRole", "Role") for r in o["rules"]]
    if not values.get("rbac", {}).get("create", True):
        assert not rules
        return
    allowed: dict[tuple[str, str], set[str]] = {}
    for group, resource, verb in operator_needs("x"):
        allowed.setdefault((group, resource), set()).add(verb)
    allowed[("kopf.dev", "kopfpeerings")] = {"get", "list", "watch", "patch"}
    clusterwide = values.get("operator", {}).get("clusterWide", False)
    for role, rule in rules:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no nonResourceURLs, no wildcards by name
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                key = (group, resource)
                granted = set(rule["verbs"])
                assert "*" not in granted and "*" not in key, rule
                if role["kind"] == "Role" or clusterwide:
                    assert granted <= allowed.get(key, set()) | CLUSTER_SCOPED.get(key, set()), rule
                else:
                    assert granted <= CLUSTER_SCOPED.get(key, set()), f"namespaced rights cluster-wide: {rule}"
    peering = values.get("operator", {}).get("peering", {}).get("enabled", False)
    resources = {r for _, rule in rules for r in rule["resources"]}
    assert bool(resources & {"kopfpeerings", "clusterkopfpeerings"}) == peering


def rules_by_scope(objects: list[dict[str, Any]]) -> dict[str, set[tuple[str, str, str]]]:
    """Every (API group, resource, verbs) granted, by where: "cluster", or the Role's namespace."""
    out: dict[str, set[tuple[str, str, str]]] = {}
    for role in objects:
        if role["kind"] in ("ClusterRole", "Role"):
            scope = "cluster" if role["kind"] == "ClusterRole" else role["metadata"]["namespace"]
            out.setdefault(scope, set()).update((g, r, ",".join(rule["verbs"])) for rule in role["rules"]
                                                for g in rule["apiGroups"] for r in rule["resources"])
    return out


RW = "get,list,watch,create,patch,delete"
#: What the operator may do in a namespace it serves (the Role, or the ClusterRole when cluster-wide).
WORKLOAD = {("helix.ai", "helixclusters", "get,list,watch,patch"), ("helix.ai", "helixclusters/status", "patch"),
            ("helix.ai", "helixclusters/finalizers", "update"), ("", "configmaps", RW), ("", "pods", RW),
            ("", "services", RW), ("apps", "deployments", RW), ("", "events", "create"), ("", "secrets", "get,create")}
READ_CLUSTER = {("", "nodes", "get,list,watch"), ("apiextensions.k8s.io", "customresourcedefinitions", "list,watch")}


def test_the_rules_of_each_mode(chart: Any) -> None:
    """The whole RBAC of each mode, listed: writes only where HelixClusters are served unless clusterWide."""
    namespaced_reads = READ_CLUSTER | {("", "pods", "list"), ("", "namespaces", "list,watch")}
    assert rules_by_scope(render(chart, DEFAULTS)) == {"cluster": namespaced_reads, NAMESPACE: WORKLOAD}
    assert rules_by_scope(render(chart, NAMESPACED)) == {"cluster": namespaced_reads, "team-a": WORKLOAD,
                                                         "team-b": WORKLOAD}
    assert rules_by_scope(render(chart, CLUSTER_WIDE)) == {"cluster": READ_CLUSTER | WORKLOAD}
    peering = ("kopf.dev", "clusterkopfpeerings", "get,list,watch,patch")
    assert rules_by_scope(render(chart, PEERING)) == {"cluster": READ_CLUSTER | WORKLOAD | {peering}}
    assert rules_by_scope(render(chart, EVERYTHING)) == {
        "cluster": namespaced_reads, "team-a": WORKLOAD | {("kopf.dev", "kopfpeerings", "get,list,watch,patch")}}
    for values in VALUE_SETS.values():  # secrets: the key Secrets it makes and reads back, never more
        assert {r for rules in rules_by_scope(render(chart, values)).values() for r in rules if r[1] == "secrets"
                } <= {("", "secrets", "get,create")}


# -- ServiceMonitors and the dashboard ConfigMap ----------------------------------------------------

def test_service_monitors_select_the_operator_and_the_routers_it_creates(chart: Any) -> None:
    assert not [o for o in render(chart, DEFAULTS) if o["kind"] == "ServiceMonitor"]
    for values, namespaces in ((EVERYTHING, {"matchNames": ["team-a"]}), (PEERING, {"any": True}),
                               ({"metrics": {"serviceMonitor": {"enabled": True}}}, {"matchNames": [NAMESPACE]})):
        objects = render(chart, values)
        monitors = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ServiceMonitor"}
        service = one(objects, "Service")
        operator_monitor = monitors.pop(service["metadata"]["name"].removesuffix("-metrics"))
        spec = operator_monitor["spec"]
        assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        assert [e["port"] for e in spec["endpoints"]] == [p["name"] for p in service["spec"]["ports"]]
        (router_monitor,) = monitors.values()
        spec = router_monitor["spec"]
        assert spec["namespaceSelector"] == namespaces
        router = owned_objects(example_rollout("team-a")).router_service
        assert spec["selector"]["matchLabels"].items() <= router["metadata"]["labels"].items()
        (endpoint,) = spec["endpoints"]
        assert endpoint["port"] in [p["name"] for p in router["spec"]["ports"]] and endpoint["path"] == "/metrics"
        # helix_cluster="<namespace>/<name>": the form of the operator metrics' `cluster` label
        (relabel,) = endpoint["relabelings"]
        sanitized = re.sub(r"[^a-zA-Z0-9_]", "_", CLUSTER_LABEL)
        assert relabel["sourceLabels"] == ["__meta_kubernetes_namespace",
                                           f"__meta_kubernetes_service_label_{sanitized}"]
        assert relabel["separator"] == "/" and relabel["targetLabel"] == "helix_cluster"
        extra_labels = values["metrics"]["serviceMonitor"].get("labels", {})
        for monitor in (operator_monitor, router_monitor):
            assert extra_labels.items() <= monitor["metadata"]["labels"].items()
    assert len([o for o in render(chart, {"metrics": {"serviceMonitor": {"enabled": True, "routers": False}}})
                if o["kind"] == "ServiceMonitor"]) == 1


def test_dashboard_config_map_carries_the_sidecar_label_and_the_dashboard(chart: Any) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    config_map = one(render(chart, DEFAULTS), "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == NAMESPACE
    assert json.loads(config_map["data"]["helix.json"]) == dashboard
    config_map = one(render(chart, EVERYTHING), "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "helix"
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "Helix"}
    assert not [o for o in render(chart, NOTHING_OPTIONAL) if o["kind"] == "ConfigMap"]


# -- the Grafana dashboard --------------------------------------------------------------------------

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def dashboard_panels() -> list[dict[str, Any]]:
    return list(json.loads(DASHBOARD.read_text())["panels"])


def queried_metrics(panel: dict[str, Any]) -> set[str]:
    """Metric families a panel queries (histogram series named by their family; label names left out)."""
    names = set()
    for target in panel.get("targets", []):
        for name in re.findall(r"\bhelix_[a-z0-9_]+\b(?!\s*[=!]~?)", target["expr"]):
            for suffix in HISTOGRAM_SUFFIXES:
                if name.endswith(suffix) and name.removesuffix(suffix) in (*ROUTER_METRIC_NAMES,
                                                                           *OPERATOR_METRIC_NAMES):
                    name = name.removesuffix(suffix)
            names.add(name)
    return names


def test_the_dashboard_queries_only_metrics_that_exist() -> None:
    queried = set().union(*(queried_metrics(p) for p in dashboard_panels()))
    assert queried <= set(ROUTER_METRIC_NAMES) | set(OPERATOR_METRIC_NAMES), queried
    text = generate_latest(OperatorMetrics().registry).decode()  # the operator's names as really exposed
    for name in queried & set(OPERATOR_METRIC_NAMES):
        assert f"# TYPE {name} " in text, name


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    by_title = {p["title"]: queried_metrics(p) for p in dashboard_panels()}

    def panel_with(*metrics: str) -> str:
        titles = [t for t, names in by_title.items() if set(metrics) <= names]
        assert titles, f"no panel queries {metrics} together"
        return titles[0]

    panel_with("helix_generated_tokens_total", "helix_planned_max_flow_tokens_per_second",
               "helix_operator_planned_tokens_per_second", "helix_operator_simulated_tokens_per_second")
    panel_with("helix_time_to_first_token_seconds")
    panel_with("helix_inter_token_latency_seconds")
    panel_with("helix_worker_kv_used_tokens", "helix_worker_kv_capacity_tokens")
    panel_with("helix_worker_in_flight_requests")
    panel_with("helix_worker_busy_seconds_total")  # per-node utilization
    panel_with("helix_worker_up")
    panel_with("helix_queue_depth")
    panel_with("helix_operator_reconciles_total")
    panel_with("helix_operator_plan_solve_seconds")
    layer_map = [p for p in dashboard_panels() if p["type"] == "table"
                 and "helix_operator_layer_assignment" in queried_metrics(p)]
    assert layer_map and all(t.get("format") == "table" and t.get("instant") for t in layer_map[0]["targets"])


def test_the_dashboard_layout_is_sound() -> None:
    board = json.loads(DASHBOARD.read_text())
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    taken: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])


# -- the Dockerfile ---------------------------------------------------------------------------------

@dataclass
class Stage:
    name: str
    base: str
    commands: list[Any]


def dockerfile_stages() -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARGs (name -> default) and the stages, as Docker's parser reads the Dockerfile."""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for command in dockerfile.parse_file(str(REPO / "Dockerfile")):
        if command.cmd == "FROM":
            base, as_, name = command.value
            assert as_.upper() == "AS"
            current = stages[name] = Stage(name, base, [])
        elif current is None:
            assert command.cmd == "ARG", command.original
            name, _, default = command.value[0].partition("=")
            global_args[name] = default
        else:
            current.commands.append(command)
    return global_args, stages


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_dockerfile_targets_and_build_args() -> None:
    global_args, stages = dockerfile_stages()
    assert {"build", "operator", "worker", "worker-cpu"} <= set(stages)
    assert {"PYTHON_VERSION", "VLLM_IMAGE", "VLLM_VERSION"} <= set(global_args)
    assert global_args["PYTHON_VERSION"] == pyproject()["project"]["requires-python"].removeprefix(">=")
    assert stages["worker"].base == "${VLLM_IMAGE}:${VLLM_VERSION}"
    for name in ("build", "operator", "worker-cpu"):
        assert stages[name].base == "python:${PYTHON_VERSION}-slim"
    for name in ("operator", "worker", "worker-cpu"):
        users = [c.value[0] for c in stages[name].commands if c.cmd == "USER"]
        assert users and users[-1].split(":")[0] not in ("0", "root"), name
        assert [c.value for c in stages[name].commands if c.cmd == "ENTRYPOINT"] == [("helix",)]
    assert [c.value for c in stages["operator"].commands if c.cmd == "CMD"] == [("operator", "--all-namespaces")]


def test_the_worker_image_has_a_vllm_the_engine_supports() -> None:
    """The base image's vLLM series must be one worker/engines/vllm_compat.py accepts (read, not imported:
    importing it needs vLLM)."""
    import ast

    global_args, _ = dockerfile_stages()
    tree = ast.parse((REPO / "worker" / "engines" / "vllm_compat.py").read_text())
    (supported,) = [ast.literal_eval(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == "SUPPORTED_VERSIONS" for t in node.targets)]
    series = ".".join(global_args["VLLM_VERSION"].removeprefix("v").split(".")[:2])
    assert series in supported, (global_args["VLLM_VERSION"], supported)


def test_dockerfile_copies_what_the_wheel_needs_and_it_exists() -> None:
    _, stages = dockerfile_stages()
    copied = []
    for stage in stages.values():
        for command in stage.commands:
            if command.cmd == "COPY" and not any(f.startswith("--from=") for f in command.flags):
                copied += list(command.value[:-1])
    for source in copied:
        assert (REPO / source).exists(), source
    setuptools = pyproject()["tool"]["setuptools"]
    assert set(setuptools["package-dir"].values()) | {"pyproject.toml", "README.md"} <= set(copied)
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for source in copied:
        assert not [p for p in ignored if fnmatch.fnmatch(source, p)], f".dockerignore drops {source}"


def test_images_take_torch_only_as_pinned() -> None:
    """The GPU worker keeps its base image's torch; worker-cpu installs exactly the worker extra's pin."""
    _, stages = dockerfile_stages()
    extras = pyproject()["project"]["optional-dependencies"]
    (pin,) = [r for r in extras["worker"] if r.startswith("torch")]
    runs = {name: " ".join(c.value[0] for c in stage.commands if c.cmd == "RUN") for name, stage in stages.items()}
    assert re.findall(r'"?torch==[^"\s]+"?', runs["worker-cpu"]) == [f'"{pin}"']
    assert "[worker]" not in runs["worker"] and "--constraint" in runs["worker"]
    assert not re.search(r"torch[<>~!]", " ".join(runs.values()))  # never a range
    assert "[router]" in runs["operator"] and "router" in extras


def test_docs_name_only_targets_and_build_args_that_exist() -> None:
    global_args, stages = dockerfile_stages()
    stage_args = {c.value[0].partition("=")[0] for s in stages.values() for c in s.commands if c.cmd == "ARG"}
    docs = (REPO / "docs" / "deploy.md").read_text()
    targets = set(re.findall(r"--target[ =]([\w-]+)", docs))
    build_args = set(re.findall(r"--build-arg[ =](\w+)=", docs))
    assert {"operator", "worker", "worker-cpu"} <= targets <= set(stages)
    assert build_args and build_args <= set(global_args) | stage_args


def test_the_kind_walkthrough_serves_the_model_the_worker_cpu_image_bakes_in() -> None:
    """docs/deploy.md's HelixCluster is a valid spec whose model.config is the tiny model's shape."""
    import inspect

    from helix.worker.tiny_model import BYTE_VOCAB, create_tiny_model

    docs = (REPO / "docs" / "deploy.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", docs, re.S)]
    (cluster,) = [b for b in blocks if isinstance(b, dict) and b.get("kind") == "HelixCluster"]
    spec = HelixClusterSpec.model_validate(cluster["spec"])
    defaults = {k: p.default for k, p in inspect.signature(create_tiny_model).parameters.items()}
    config = cluster["spec"]["model"]["config"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"],
            config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (
        defaults["num_layers"], defaults["hidden"], defaults["intermediate"], defaults["heads"],
        defaults["kv_heads"], BYTE_VOCAB)
    _, stages = dockerfile_stages()
    baked = " ".join(c.value[0] for c in stages["worker-cpu"].commands if c.cmd == "RUN")
    assert f"create_tiny_model('{spec.model.weights}')" in baked
    assert spec.workers.engine == "torch"



def _selects(selector: dict[str, Any], pod_labels: dict[str, str]) -> bool:
    """Whether a LabelSelector (matchLabels, matchExpressions with In) picks a pod with `pod_labels`."""
    if any(pod_labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    return all(e["operator"] == "In" and pod_labels.get(e["key"]) in e["values"]
               for e in selector.get("matchExpressions") or [])


def test_network_policies_let_workers_hear_only_routers_and_peers(chart: Any) -> None:
    objects = owned_objects(example_rollout("team-a"))
    worker = objects.worker_pods[0]["metadata"]["labels"]
    router_template = objects.router_deployment["spec"]["template"]
    router = router_template["metadata"]["labels"]
    other = {"app.kubernetes.io/name": "something-else"}
    policies = [o for o in render(chart, NAMESPACED) if o["kind"] == "NetworkPolicy"]
    assert sorted(p["metadata"]["namespace"] for p in policies) == ["team-a", "team-a", "team-b", "team-b"]
    for policy in (p for p in policies if p["metadata"]["namespace"] == "team-a"):
        spec = policy["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        if _selects(spec["podSelector"], worker):
            assert not _selects(spec["podSelector"], router)
            peers = [peer["podSelector"] for rule in spec["ingress"] for peer in rule["from"]]
            assert any(_selects(s, router) for s in peers) and any(_selects(s, worker) for s in peers)
            assert not any(_selects(s, other) for s in peers)
            assert all("ports" not in rule for rule in spec["ingress"])
        else:
            assert _selects(spec["podSelector"], router)
            from_workers, http = spec["ingress"]
            assert [_selects(peer["podSelector"], worker) for peer in from_workers["from"]] == [True]
            ports = [p["name"] for p in router_template["spec"]["containers"][0]["ports"]]
            assert "from" not in http and http["ports"] == [{"port": "http", "protocol": "TCP"}] and "http" in ports
    assert not [o for o in render(chart, CLUSTER_WIDE) if o["kind"] == "NetworkPolicy"]
    assert not [o for o in render(chart, {"networkPolicy": {"enabled": False}}) if o["kind"] == "NetworkPolicy"]
