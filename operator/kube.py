"""Kubernetes API access for the operator: plain JSON objects in and out, over the official client's transport.

The official client supplies what is hard to get right — in-cluster service-account tokens and their
rotation, kubeconfig contexts, exec plugins, TLS — and we keep the objects as dicts, as kopf hands
them to handlers and as `operator/resources.py` builds them, instead of converting to and from the
generated model classes. Patches are JSON merge patches: lists are replaced whole, the same on every
API server, with no strategic-merge keys to know. Calls block; the handlers run them in threads.

The same configuration logs kopf in (`connection_info()`), so the operator's watches and its writes
use one identity.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import kopf
import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from helix.operator.crd import API_VERSION, PLURAL

MERGE_PATCH = "application/merge-patch+json"


@dataclass(frozen=True)
class Kind:
    """A resource type: where its objects live in the API."""

    api_version: str  # "v1", "apps/v1", "helix.ai/v1alpha1"
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
        parts = ["/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"]
        if self.namespaced and namespace is not None:
            parts += ["namespaces", quote(namespace, safe="")]
        parts.append(self.plural)
        if name is not None:
            parts.append(quote(name, safe=""))
            if subresource is not None:
                parts.append(subresource)
        return "/".join(parts)


CONFIG_MAPS = Kind("v1", "configmaps")
PODS = Kind("v1", "pods")
SERVICES = Kind("v1", "services")
SECRETS = Kind("v1", "secrets")
DEPLOYMENTS = Kind("apps/v1", "deployments")
NODES = Kind("v1", "nodes", namespaced=False)
HELIX_CLUSTERS = Kind(API_VERSION, PLURAL)


class ApiError(Exception):
    """The API server refused a request (or could not be reached: status 0)."""

    def __init__(self, status: int, reason: str, message: str, request: str) -> None:
        self.status = status
        self.reason = reason
        self.message = message
        super().__init__(f"{request}: {status} {reason}: {message}" if status else f"{request}: {message}")

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def retriable(self) -> bool:
        """Worth retrying unchanged: server trouble, throttling, conflicts, unreachable, or RBAC being fixed."""
        return self.status in (0, 401, 403, 404, 409, 429) or self.status >= 500


def load_configuration() -> k8s_client.Configuration:
    """In-cluster service account if there is one, else the kubeconfig ($KUBECONFIG, read now, or ~/.kube/config)."""
    configuration = k8s_client.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=configuration)
    except k8s_config.ConfigException:
        try:
            k8s_config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None,
                                        client_configuration=configuration, persist_config=False)
        except (k8s_config.ConfigException, OSError) as exc:
            raise kopf.LoginError(f"no in-cluster service account and no usable kubeconfig: {exc}") from exc
    return configuration


class KubeClient:
    """JSON CRUD on any resource, with merge-patch updates."""

    def __init__(self, configuration: k8s_client.Configuration, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._api = k8s_client.ApiClient(configuration)

    @classmethod
    def from_environment(cls, timeout_s: float = 30.0) -> KubeClient:
        return cls(load_configuration(), timeout_s)

    def reload(self) -> None:
        """Read the credentials again (kopf calls this on login, e.g. after a 401 with a rotated token)."""
        api = k8s_client.ApiClient(load_configuration())
        with self._lock:
            self._api = api

    def connection_info(self) -> kopf.ConnectionInfo:
        """The same credentials, as kopf's login handlers return them."""
        config = self._api.configuration
        header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix("authorization")
        scheme, _, token = (header or "").rpartition(" ")
        return kopf.ConnectionInfo(
            server=config.host,
            ca_path=config.ssl_ca_cert,
            insecure=not config.verify_ssl,
            username=config.username or None,
            password=config.password or None,
            scheme=scheme or None,
            token=token or None,
            certificate_path=config.cert_file,
            private_key_path=config.key_file,
        )

    # -- verbs --------------------------------------------------------------------------------------

    def get(self, kind: Kind, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", kind.path(namespace, name))
        except ApiError as exc:
            if exc.not_found:
                return None
            raise

    def list(self, kind: Kind, namespace: str | None, labels: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        query = {"labelSelector": ",".join(f"{k}={v}" for k, v in sorted(labels.items()))} if labels else None
        items = self.request("GET", kind.path(namespace), query=query).get("items") or []
        return [item for item in items if isinstance(item, dict)]

    def create(self, kind: Kind, namespace: str | None, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("POST", kind.path(namespace), body=body)

    def patch(self, kind: Kind, namespace: str | None, name: str, body: Mapping[str, Any],
              subresource: str | None = None) -> dict[str, Any]:
        return self.request("PATCH", kind.path(namespace, name, subresource), body=body, content_type=MERGE_PATCH)

    def delete(self, kind: Kind, namespace: str | None, name: str) -> bool:
        """Delete (in the background: dependents go by garbage collection); False when it was already gone."""
        try:
            self.request("DELETE", kind.path(namespace, name), body={"propagationPolicy": "Background"})
        except ApiError as exc:
            if exc.not_found:
                return False
            raise
        return True

    def request(self, method: str, path: str, *, query: Mapping[str, str] | None = None,
                body: Mapping[str, Any] | None = None, content_type: str = "application/json") -> dict[str, Any]:
        with self._lock:
            api = self._api
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        what = f"{method} {path}"
        try:
            params = api.param_serialize(method=method, resource_path=path, query_params=list((query or {}).items()),
                                         header_params=headers, body=body, auth_settings=["BearerToken"])
            response = api.call_api(*params, _request_timeout=self.timeout_s)
            response.read()
        except k8s_client.ApiException as exc:
            raise _api_error(exc.status or 0, exc.reason or "", exc.body, what) from exc
        except (OSError, urllib3.exceptions.HTTPError) as exc:  # refused, reset, timed out, DNS
            raise ApiError(0, "Unreachable", str(exc), what) from exc
        data = response.data or b""
        if not 200 <= response.status < 300:
            raise _api_error(response.status, response.reason or "", data, what)
        if not data:
            return {}
        decoded = json.loads(data)
        return decoded if isinstance(decoded, dict) else {}


def _api_error(status: int, reason: str, body: bytes | str | None, what: str) -> ApiError:
    """The API server's Status message, when the body is one."""
    message = body.decode(errors="replace") if isinstance(body, bytes) else (body or "")
    try:
        status_object = json.loads(message)
    except ValueError:
        status_object = None
    if isinstance(status_object, dict):
        reason = str(status_object.get("reason") or reason)
        message = str(status_object.get("message") or message)
    return ApiError(status, reason, " ".join(message.split())[:500], what)
