"""The operator process: kopf's settings, start-up and login, and `run()` for `helix operator`.

Two ways in, the same handlers: `helix operator ...` calls `run(settings)`; kopf's own CLI
(`kopf run -m helix.operator.main`, and `kopf.testing.KopfRunner`) imports this module and takes our
settings from `HELIX_OPERATOR_*` variables. Either way the start-up handler below builds the runtime
(API client, metrics endpoint, planner pool) and tunes kopf:

- progress and the last handled spec are kept in `kopf.helix.ai/` annotations (never in `status`,
  which the CRD's schema owns);
- Kubernetes Events (`kubectl describe hxc`): each rollout, and every warning and failure (planning's
  step-by-step summary stays in the operator's log);
- watches restart every ten minutes (long idle streams are cut by load balancers silently);
- peering: off with `--standalone`; otherwise kopf uses its peering objects when they are installed.

kopf logs in with the same credentials as our own API calls (in-cluster service account, else
$KUBECONFIG or ~/.kube/config), re-read on every login so rotated tokens are picked up.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from helix.operator import handlers  # importing registers the handlers
from helix.operator.reconcile import Logger, Runtime
from helix.operator.settings import OperatorSettings

#: kopf ignores every annotation under its own prefix when it diffs an object, so it must not be `helix.ai`
#: (helix.ai/paused and helix.ai/nodes-fingerprint are changes the handlers must see).
ANNOTATION_PREFIX = "kopf.helix.ai"
WATCH_SERVER_TIMEOUT_S = 600


def configure(kopf_settings: kopf.OperatorSettings, ours: OperatorSettings) -> None:
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    kopf_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration")
    kopf_settings.posting.enabled = True
    kopf_settings.posting.level = logging.WARNING
    kopf_settings.watching.server_timeout = WATCH_SERVER_TIMEOUT_S
    kopf_settings.watching.client_timeout = WATCH_SERVER_TIMEOUT_S + 60
    kopf_settings.networking.request_timeout = ours.api_timeout_seconds
    kopf_settings.queueing.error_delays = (1, 2, 5, 10, 20, 30, 60)  # watch-stream errors: back off, never crash


@kopf.on.startup()
def start(settings: kopf.OperatorSettings, memo: Any, logger: Logger, **_: Any) -> None:
    ours = memo.get("settings")
    if not isinstance(ours, OperatorSettings):
        ours = OperatorSettings.from_env()
    configure(settings, ours)
    rt = Runtime.start(ours)
    memo["runtime"] = rt
    port = rt.metrics_server.port if rt.metrics_server is not None else None
    logger.info("helix operator: metrics on %s:%s, %d planner thread(s)", ours.host, port, ours.planner_threads)


@kopf.on.login()
def login(memo: Any, **_: Any) -> kopf.ConnectionInfo:
    rt = handlers.runtime(memo)
    rt.kube.reload()
    return rt.kube.connection_info()


@kopf.on.cleanup()
def stop(memo: Any, **_: Any) -> None:
    rt = memo.get("runtime")
    if isinstance(rt, Runtime):
        rt.close()


def run(settings: OperatorSettings, verbose: bool = False) -> None:
    """Run the operator until SIGINT/SIGTERM (the `helix operator` command)."""
    kopf.configure(verbose=verbose)
    kopf.run(
        standalone=settings.standalone,
        clusterwide=settings.clusterwide,
        namespaces=settings.namespaces,
        liveness_endpoint=settings.liveness_endpoint,
        memo=kopf.Memo(settings=settings),
    )
