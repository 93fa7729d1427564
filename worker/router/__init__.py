"""The router: admits requests, picks their routes with the simulator's schedulers, drives decoding.

`Router` is one class built in layers, a module each, every layer calling only the ones below it
(so none has to declare another's methods); the modules beside them hold the data all layers share.
Each module's docstring has the details.

* `core.py` — `Router`: lifecycle (start, close) and `submit`, the top layer.
* `decoding.py` — `Decoding`: the per-request task (prefill in chunks, decode, stream, re-route,
  finish).
* `workers.py` — `WorkerTracking`: sends and replies, the heartbeat, Status, workers marked down
  and up, /healthz; the module doc describes fault handling.
* `admission.py` — `Admission`: routes from the scheduler committed to the cluster state, the wait
  queue, 429s.
* `state.py` — `RouterState`: the constructor and the state every layer shares (cluster state,
  scheduler, worker records, live requests, queue).
* `requests.py` — a request's records: `GenerationParams`, `StreamEvent`, `RequestHandle`, `_Live`
  and its inbox messages.
* `options.py` — `RouterOptions`, `WorkerAddress`, `parse_workers`.
* `topology.py` — `Topology`, `PlanProfiles`, `plan_cluster`, and the plans served: `local_plan`,
  `load_served_plan`.
* `errors.py` — `RouterError` and the errors a client sees.

Importing this package imports every module above: `helix.cli.prefork` preloads it by this name.
"""

from helix.worker.router.core import Router
from helix.worker.router.errors import (
    Overloaded,
    RequestFailed,
    RequestTimeout,
    RouterError,
    TooLarge,
    Unavailable,
)
from helix.worker.router.options import RouterOptions, WorkerAddress, parse_workers
from helix.worker.router.requests import GenerationParams, RequestHandle, StreamEvent
from helix.worker.router.topology import (
    LOCAL_TOKENS_PER_S_PER_LAYER,
    SPARE_SHARE,
    PlanProfiles,
    Topology,
    load_served_plan,
    local_plan,
    plan_cluster,
)

__all__ = [
    "LOCAL_TOKENS_PER_S_PER_LAYER",
    "SPARE_SHARE",
    "GenerationParams",
    "Overloaded",
    "PlanProfiles",
    "RequestFailed",
    "RequestHandle",
    "RequestTimeout",
    "Router",
    "RouterError",
    "RouterOptions",
    "StreamEvent",
    "TooLarge",
    "Topology",
    "Unavailable",
    "WorkerAddress",
    "load_served_plan",
    "local_plan",
    "parse_workers",
    "plan_cluster",
]
