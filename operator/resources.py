"""The Kubernetes objects a HelixCluster owns, built from its spec and the plan in force. Pure: no API calls.

What a rollout consists of:
- ConfigMap `<name>-plan`: `plan.json`, `cluster.yaml` (the cluster the plan was made for) and
  `workers.txt` (NAME=ADDRESS per worker, the router's `--workers`); annotations record the plan hash,
  its planned tokens/s and the hash of the planning inputs, so a restarted operator can tell that
  nothing changed and re-apply the plan in force without solving again.
- A headless Service `<name>-workers` that gives every worker pod a stable DNS name
  (`<pod>.<name>-workers.<ns>.svc`), published before the pod is ready: the router knows every
  worker's address before the pods have IPs, and a restarted worker keeps its address.
- One worker Pod per plan node, pinned there with `nodeName` (the plan is per node; the scheduler
  has nothing to choose), requesting the GPUs the plan was made with: those of the node that no one
  else held (`operator/gpus.py`). A node that advertises no `nvidia.com/gpu` (a CPU try-out cluster
  with fake GPU labels) gets a CPU worker instead.
- The router Deployment and its Service `<name>-router` — the cluster's endpoint.
- The Secret `<name>-keys` (`keys_secret`, created once by `apply.ensure_keys`, never rewritten): the
  data plane's CURVE key pairs (`helix.worker.security`) and the API key. Worker pods mount only the
  worker secret and the router's public key, the router only its own secret and the workers' public
  key, and gets the API key as HELIX_API_KEY. Pods carry the Secret's uid (`helix.ai/keys`): deleting
  the Secret makes a new one, and with it new pods — that is how keys are rotated.

Every object carries the HelixCluster as controlling owner (deleted with it by garbage collection),
the standard labels and `helix.ai/config-hash`, a digest of the object as built here: the runtime
compares it with the live object's to patch only what changed. A worker pod's hash covers what can
only change by re-creating the pod (its spec, its layers), not the plan hash, so a re-plan that keeps
a node's layers leaves that worker running.

Why one module of about 500 lines: every object the operator creates is built here, so their
shared labels, owner reference and config hash are computed one way.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from helix.operator.crd import API_VERSION, KIND, ContainerResources, HelixClusterSpec
from helix.operator.gpus import RESOURCE_GPU
from helix.operator.kube import CONFIG_MAPS, DEPLOYMENTS, PODS, SERVICES, Kind
from helix.planner.cluster import Cluster, dump_cluster_yaml
from helix.planner.plan import NodeAssignment, Plan
from helix.worker.security import ClusterKeys, Role, key_file

NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
CLUSTER_LABEL = "helix.ai/cluster"
NODE_LABEL = "helix.ai/node"
LAYERS_ANNOTATION = "helix.ai/layers"
PLAN_HASH_ANNOTATION = "helix.ai/plan-hash"
CONFIG_HASH_ANNOTATION = "helix.ai/config-hash"
INPUTS_HASH_ANNOTATION = "helix.ai/inputs-hash"
PLANNED_ANNOTATION = "helix.ai/planned-tokens-per-second"
KEYS_ANNOTATION = "helix.ai/keys"

APP = "helix"
MANAGER = "helix-operator"
PLAN_FILE = "plan.json"
CLUSTER_FILE = "cluster.yaml"
WORKERS_FILE = "workers.txt"
CONFIG_DIR = "/etc/helix"
MODELS_DIR = "/models"
KEYS_DIR = "/etc/helix-keys"
#: The key of the API key in the HelixCluster's Secret.
API_KEY_ENTRY = "api-key"
#: uid/gid the containers run as (non-root; the images' `helix` user).
RUN_AS = 10001

_DNS_INVALID = re.compile(r"[^a-z0-9-]+")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")


class Owner(BaseModel):
    """The HelixCluster the objects belong to."""

    model_config = ConfigDict(frozen=True)

    name: str
    namespace: str
    uid: str

    @classmethod
    def from_body(cls, body: Any) -> Owner:
        meta = body["metadata"]
        return cls(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def reference(self) -> dict[str, Any]:
        return {"apiVersion": API_VERSION, "kind": KIND, "name": self.name, "uid": self.uid,
                "controller": True, "blockOwnerDeletion": True}


class Images(BaseModel):
    model_config = ConfigDict(frozen=True)

    worker: str
    router: str


class Rollout(BaseModel):
    """Everything the owned objects are built from."""

    model_config = ConfigDict(frozen=True)

    owner: Owner
    spec: HelixClusterSpec
    plan: Plan
    cluster: Cluster
    plan_hash: str
    inputs_hash: str
    images: Images
    #: Allocatable `nvidia.com/gpu` of every node that exists (0: a CPU worker). A plan node missing here
    #: is gone: it gets no pod (one pinned to a deleted node could never run).
    node_gpus: dict[str, int]
    service_account: str | None = None
    #: uid of the key Secret the pods read (`apply.ensure_keys`): a new Secret rolls every pod onto its keys.
    keys_version: str = ""


class OwnedObjects(BaseModel):
    """The desired objects of one HelixCluster, in the order they are applied."""

    config_map: dict[str, Any]
    workers_service: dict[str, Any]
    worker_pods: list[dict[str, Any]]
    router_deployment: dict[str, Any]
    router_service: dict[str, Any]

    def ordered(self) -> list[tuple[Kind, dict[str, Any]]]:
        return [(CONFIG_MAPS, self.config_map), (SERVICES, self.workers_service),
                *((PODS, pod) for pod in self.worker_pods),
                (DEPLOYMENTS, self.router_deployment), (SERVICES, self.router_service)]


# -- names ------------------------------------------------------------------------------------------

def dns_label(*parts: str) -> str:
    """`parts` joined by '-' as an RFC 1035 label (what Service and pod host names must be).

    Lower-cased, other characters become '-'; when that changed anything or the result is longer
    than 63, a digest of the original is appended, so two different inputs never share a name.
    """
    original = "-".join(parts)
    clean = _DNS_INVALID.sub("-", original.lower()).strip("-")
    if clean and not clean[0].isalpha():
        clean = "h-" + clean
    if clean == original and len(clean) <= 63:
        return clean
    digest = hashlib.sha256(original.encode()).hexdigest()[:8]
    return f"{clean[:63 - 9].rstrip('-')}-{digest}"


def label_value(text: str) -> str:
    """`text` if it is a valid label value, else a valid one that still identifies it."""
    if len(text) <= 63 and _LABEL_VALUE.match(text):
        return text
    return dns_label(text)


def plan_config_map_name(owner: Owner) -> str:
    return dns_label(owner.name, "plan")


def workers_service_name(owner: Owner) -> str:
    return dns_label(owner.name, "workers")


def router_name(owner: Owner) -> str:
    return dns_label(owner.name, "router")


def worker_pod_name(owner: Owner, node: str) -> str:
    return dns_label(owner.name, "worker", node)


def keys_secret_name(owner: Owner) -> str:
    return dns_label(owner.name, "keys")


def worker_address(owner: Owner, node: str, port: int) -> str:
    """The worker's stable ZeroMQ address (its DNS name under the headless Service)."""
    return f"tcp://{worker_pod_name(owner, node)}.{workers_service_name(owner)}.{owner.namespace}.svc:{port}"


def endpoint(owner: Owner, spec: HelixClusterSpec) -> str:
    """The cluster's OpenAI-compatible endpoint (the router Service)."""
    return f"http://{router_name(owner)}.{owner.namespace}.svc:{spec.router.port}"


def labels(owner: Owner, component: str) -> dict[str, str]:
    return {NAME_LABEL: APP, INSTANCE_LABEL: label_value(owner.name), COMPONENT_LABEL: component,
            MANAGED_BY_LABEL: MANAGER, CLUSTER_LABEL: label_value(owner.name)}


def selector(owner: Owner, component: str) -> dict[str, str]:
    """The labels that pick one cluster's pods of one component (Deployment and Service selectors)."""
    return {NAME_LABEL: APP, INSTANCE_LABEL: label_value(owner.name), COMPONENT_LABEL: component}


def config_hash(obj: dict[str, Any]) -> str:
    """Digest of a built object (without its own hash annotation)."""
    meta = dict(obj.get("metadata") or {})
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != CONFIG_HASH_ANNOTATION}
    stripped = {**obj, "metadata": {**meta, "annotations": annotations}}
    return hashlib.sha256(json.dumps(stripped, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def stamped(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` with its config-hash annotation."""
    obj["metadata"].setdefault("annotations", {})[CONFIG_HASH_ANNOTATION] = config_hash(obj)
    return obj


# -- the weights ------------------------------------------------------------------------------------

class WeightsMount(BaseModel):
    """Where a container finds the model folder, and the volume that puts it there (if any)."""

    model_dir: str
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []


def weights_mount(weights: str) -> WeightsMount:
    """`pvc://CLAIM/PATH` mounts the claim read-only at /models/CLAIM; an absolute path is used as it is.

    `weights` is a validated spec's (crd.WEIGHTS_PATTERN admits these two forms only). Worker pods on
    different nodes and the router all read the same claim, so it must be ReadOnlyMany or ReadWriteMany.
    An absolute path must exist in the images (weights baked in).
    """
    if weights.startswith("pvc://"):
        claim, _, sub = weights.removeprefix("pvc://").partition("/")
        mount_path = f"{MODELS_DIR}/{claim}"
        return WeightsMount(
            model_dir=f"{mount_path}/{sub.strip('/')}" if sub.strip("/") else mount_path,
            volumes=[{"name": "weights", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}],
            mounts=[{"name": "weights", "mountPath": mount_path, "readOnly": True}],
        )
    return WeightsMount(model_dir=weights.rstrip("/") or "/")


# -- the objects ------------------------------------------------------------------------------------

def owned_objects(rollout: Rollout) -> OwnedObjects:
    """Every object of a HelixCluster for the plan in force."""
    weights = weights_mount(rollout.spec.model.weights)
    return OwnedObjects(
        config_map=plan_config_map(rollout),
        workers_service=workers_service(rollout),
        worker_pods=[worker_pod(rollout, node, weights) for node in rollout.plan.nodes
                     if node.name in rollout.node_gpus],
        router_deployment=router_deployment(rollout, weights),
        router_service=router_service(rollout),
    )


def _metadata(owner: Owner, name: str, component: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": owner.namespace, "labels": labels(owner, component),
            "ownerReferences": [owner.reference()], **extra}


def workers_list(rollout: Rollout) -> str:
    """NAME=ADDRESS for every plan node, comma-separated (the router's --workers)."""
    port = rollout.spec.workers.port
    return ",".join(f"{n.name}={worker_address(rollout.owner, n.name, port)}" for n in rollout.plan.nodes)


def plan_config_map(rollout: Rollout) -> dict[str, Any]:
    owner = rollout.owner
    annotations = {PLAN_HASH_ANNOTATION: rollout.plan_hash, INPUTS_HASH_ANNOTATION: rollout.inputs_hash,
                   PLANNED_ANNOTATION: f"{rollout.plan.objective_tokens_per_s:.6g}"}
    return stamped({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, plan_config_map_name(owner), "plan", annotations=annotations),
        "data": {
            PLAN_FILE: rollout.plan.to_json(),
            CLUSTER_FILE: dump_cluster_yaml(rollout.cluster),
            WORKERS_FILE: "".join(f"{item}\n" for item in workers_list(rollout).split(",")),
        },
    })


def workers_service(rollout: Rollout) -> dict[str, Any]:
    owner = rollout.owner
    return stamped({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, workers_service_name(owner), "worker"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # the router dials workers while they load
            "selector": selector(owner, "worker"),
            "ports": [{"name": "zmq", "port": rollout.spec.workers.port, "targetPort": "zmq"}],
        },
    })


def _pod_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _container_security(read_only_root: bool) -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": read_only_root,
            "capabilities": {"drop": ["ALL"]}}


#: Pod IP for --advertise (expanded by the kubelet as $(POD_IP)); caches under a writable /tmp.
_ENV = [
    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    {"name": "HOME", "value": "/tmp"},
    {"name": "HF_HOME", "value": "/tmp/huggingface"},
]
_TMP_VOLUME = {"name": "tmp", "emptyDir": {}}
_TMP_MOUNT = {"name": "tmp", "mountPath": "/tmp"}


def keys_secret(owner: Owner) -> dict[str, Any]:
    """A new Secret with fresh keys: both CURVE key pairs and a random API key (256 bits)."""
    entries = {**ClusterKeys.generate().files(), API_KEY_ENTRY: secrets.token_urlsafe(32)}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _metadata(owner, keys_secret_name(owner), "keys"),
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in sorted(entries.items())},
    }


def _keys_volume(owner: Owner, role: Role) -> dict[str, Any]:
    """The Secret's entries one role reads: its own secret key, the other role's public key (group-readable:
    the containers run as RUN_AS with fsGroup RUN_AS)."""
    other: Role = "worker" if role == "router" else "router"
    items = [{"key": name, "path": name} for name in (key_file(role, "secret"), key_file(other, "public"))]
    return {"name": "keys", "secret": {"secretName": keys_secret_name(owner), "defaultMode": 0o440, "items": items}}


_KEYS_MOUNT = {"name": "keys", "mountPath": KEYS_DIR, "readOnly": True}


def container_resources(given: ContainerResources | None, gpus: int = 0) -> dict[str, dict[str, Any]]:
    """A container's `resources`: the spec's requests and limits, and `gpus` nvidia.com/gpu over the spec's
    own (a worker pinned to a node takes exactly the node's GPUs); empty parts left out, as the API server
    would drop them."""
    resources: dict[str, dict[str, Any]] = {"requests": {}, "limits": {}}
    if given is not None:
        resources["requests"].update(given.requests)
        resources["limits"].update(given.limits)
    if gpus > 0:
        resources["requests"][RESOURCE_GPU] = gpus
        resources["limits"][RESOURCE_GPU] = gpus
    return {k: v for k, v in resources.items() if v}


def worker_pod(rollout: Rollout, node: NodeAssignment, weights: WeightsMount) -> dict[str, Any]:
    owner, spec = rollout.owner, rollout.spec
    port = spec.workers.port
    gpus = worker_gpus(rollout, node.name)
    layers = f"{node.start_layer}:{node.end_layer}"
    name = worker_pod_name(owner, node.name)
    command = ["helix", "worker", "--model", weights.model_dir, "--layers", layers,
               "--listen", f"tcp://0.0.0.0:{port}", "--advertise", f"tcp://$(POD_IP):{port}",
               "--name", node.name, "--engine", spec.workers.engine, "--device", "cuda" if gpus > 0 else "cpu",
               "--dtype", spec.model.dtype, "--keys", KEYS_DIR]
    pod_spec: dict[str, Any] = {
        "nodeName": node.name,
        "hostname": name,
        "subdomain": workers_service_name(owner),
        "restartPolicy": "Always",
        "automountServiceAccountToken": False,
        "securityContext": _pod_security(),
        "tolerations": [{"key": RESOURCE_GPU, "operator": "Exists", "effect": "NoSchedule"}],
        "containers": [{
            "name": "worker",
            "image": spec.workers.image or rollout.images.worker,
            "command": command,
            "env": _ENV,
            "ports": [{"name": "zmq", "containerPort": port, "protocol": "TCP"}],
            # The socket is bound before the engine loads: ready means reachable; the router tracks loading.
            "readinessProbe": {"tcpSocket": {"port": "zmq"}, "periodSeconds": 10},
            "resources": container_resources(spec.workers.resources, gpus),
            "securityContext": _container_security(read_only_root=False),  # engines write compile caches
            "volumeMounts": [*weights.mounts, _TMP_MOUNT, _KEYS_MOUNT],
        }],
        "volumes": [*weights.volumes, _TMP_VOLUME, _keys_volume(owner, "worker")],
    }
    if rollout.service_account:
        pod_spec["serviceAccountName"] = rollout.service_account
    metadata = _metadata(owner, name, "worker", annotations={LAYERS_ANNOTATION: layers,
                                                              KEYS_ANNOTATION: rollout.keys_version})
    metadata["labels"][NODE_LABEL] = label_value(node.name)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}
    stamped(pod)  # the hash leaves the plan hash out: a re-plan that keeps these layers keeps the pod
    metadata["annotations"][PLAN_HASH_ANNOTATION] = rollout.plan_hash
    return pod


def worker_gpus(rollout: Rollout, node: str) -> int:
    """GPUs a plan node's worker requests: those the plan was made with (what others left free), at most the
    node's allocatable; 0 on a node that advertises none (a CPU worker)."""
    allocatable = rollout.node_gpus[node]
    planned = rollout.cluster.node_map[node].gpu_count if node in rollout.cluster.node_map else allocatable
    return min(planned, allocatable)


def router_command(rollout: Rollout, weights: WeightsMount) -> list[str]:
    spec = rollout.spec
    zmq_port = spec.workers.port  # the router's receiver: the same port number as the workers', in its own pod
    command = ["helix", "router", "--plan", f"{CONFIG_DIR}/{PLAN_FILE}", "--model", weights.model_dir,
               "--workers", workers_list(rollout), "--host", "0.0.0.0", "--port", str(spec.router.port),
               "--scheduler", spec.scheduling.method,
               "--listen", f"tcp://0.0.0.0:{zmq_port}", "--advertise", f"tcp://$(POD_IP):{zmq_port}",
               "--max-queue", str(spec.router.max_queue),
               "--request-timeout", f"{spec.router.request_timeout_seconds:g}", "--keys", KEYS_DIR]
    if spec.placement.profiles == "roofline":
        # With the cluster the router recomputes flows when workers come and go; it has roofline profiles
        # built in, but not a profile file that lives in the operator's container.
        command += ["--cluster", f"{CONFIG_DIR}/{CLUSTER_FILE}"]
    if spec.model.name:
        command += ["--served-model-name", spec.model.name]
    return command


def router_deployment(rollout: Rollout, weights: WeightsMount) -> dict[str, Any]:
    owner, spec = rollout.owner, rollout.spec
    name = router_name(owner)
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": _pod_security(),
        "containers": [{
            "name": "router",
            "image": rollout.images.router,
            "command": router_command(rollout, weights),
            "env": [*_ENV, {"name": "HELIX_API_KEY", "valueFrom": {"secretKeyRef": {
                "name": keys_secret_name(owner), "key": API_KEY_ENTRY}}}],
            "ports": [{"name": "http", "containerPort": spec.router.port, "protocol": "TCP"},
                      {"name": "zmq", "containerPort": spec.workers.port, "protocol": "TCP"}],
            # /healthz is 200 once a complete route of workers is up: ready = can serve a request.
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5},
            "livenessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 20, "failureThreshold": 3},
            "resources": container_resources(spec.router.resources),
            "securityContext": _container_security(read_only_root=True),
            "volumeMounts": [{"name": "plan", "mountPath": CONFIG_DIR, "readOnly": True},
                             *weights.mounts, _TMP_MOUNT, _KEYS_MOUNT],
        }],
        "volumes": [{"name": "plan", "configMap": {"name": plan_config_map_name(owner)}},
                    *weights.volumes, _TMP_VOLUME, _keys_volume(owner, "router")],
    }
    if rollout.service_account:
        pod_spec["serviceAccountName"] = rollout.service_account
    return stamped({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner, name, "router"),
        "spec": {
            "replicas": spec.router.replicas,
            "selector": {"matchLabels": selector(owner, "router")},
            "template": {
                # A new plan changes the annotation, which rolls the routers onto it.
                "metadata": {"labels": labels(owner, "router"),
                             "annotations": {PLAN_HASH_ANNOTATION: rollout.plan_hash,
                                             KEYS_ANNOTATION: rollout.keys_version}},
                "spec": pod_spec,
            },
        },
    })


def router_service(rollout: Rollout) -> dict[str, Any]:
    owner, spec = rollout.owner, rollout.spec
    return stamped({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, router_name(owner), "router"),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(owner, "router"),
            "ports": [{"name": "http", "port": spec.router.port, "targetPort": "http", "protocol": "TCP"}],
        },
    })


def node_gpus(nodes: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Allocatable nvidia.com/gpu per node (what a pod pinned there may request)."""
    out: dict[str, int] = {}
    for node in nodes:
        value = ((node.get("status") or {}).get("allocatable") or {}).get(RESOURCE_GPU)
        try:
            out[str(node["metadata"]["name"])] = int(str(value)) if value is not None else 0
        except ValueError:
            out[str(node["metadata"]["name"])] = 0
    return out
