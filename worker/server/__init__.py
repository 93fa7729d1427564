"""The worker process: one layer shard behind a ZeroMQ address, continuously batching every upstream.

A `WorkerServer` binds one `Receiver` (it accepts `Forward`, `Release` and `Ping`) and runs three
asyncio tasks beside it:

* the receive loop never stops reading: it files each `Forward` in a bounded FIFO (`max_queue`
  chunks, `max_queue_bytes`) and refuses one that finds it full with an `Error` (code
  "overloaded"; the router re-routes the request), applies `Release` to that FIFO at once and hands
  it to the engine loop, and answers each `Ping` with a `Status`. Pausing the reads instead would
  stall the control messages queued behind the work in the same socket: a busy worker would miss
  its heartbeats and be marked down, and the Releases that make room could not arrive;
* the engine loop does iteration-level continuous batching: whenever chunks are waiting it takes
  as many as the batch limits allow (in arrival order, at most one chunk per request, decodes put
  before prompts so requests already under way get KV before new ones), answers the ones that
  cannot run with an `Error` to their `reply_to`, runs the rest as ONE `engine.step` in a thread
  (the event loop keeps receiving meanwhile), then sends each output on: the next hop gets
  `fwd.advance(hidden, timing)`, the router gets a `Token` when this hop is the route's last;
* an optional heartbeat pushes a `Status` to the router every `heartbeat_interval_s`.

With `keys` (`helix.worker.security`) the socket admits only the cluster's router and peer workers
(CURVE; refused handshakes are counted and reported in every `Status` as `rejected_connections`),
hidden states go only to a holder of the worker key and everything else (tokens, errors, statuses)
only to a holder of the router's key, whatever address a message names.

Only the engine loop touches the engine (it is not thread-safe): releases from messages, from
failed sends and from the idle sweep are queued and applied between steps. Sends are tasks, so
a slow or dead next hop delays only the requests routed to it; a send that times out becomes an
`Error` (code "overloaded") to the router and the request's KV is dropped here.

Invariant the router can rely on: after this worker sends an `Error` for (request, attempt), it
holds no KV for that attempt (the one exception: an Error for a stale attempt, i.e. older than the
one this worker holds, leaves the newer attempt's KV alone). A router that gets an Error releases
the route's other hops and re-runs the request (attempt + 1, prefill from position 0).

Nothing a peer sends can stop the loop: malformed frames are dropped by the Receiver, and every
decodable-but-wrong request (unknown request id, positions that do not match the cache, a hop this
shard cannot play, an unreachable next hop, ...) is answered with an Error and forgotten.

The package splits that one `WorkerServer` object by concept. It stays one object on one event loop
(its parts share the queue, the releases and the engine with no locks), so the split is a stack of
classes, each subclassing the part it calls into; a message goes the other way (received, batched,
sent):

* `state`: `_WorkerState`, the constructor (arguments checked, every shared field created) and the
  read-only view the router and the CLI see (`address`, `ready`, `engine`, `status()`, `describe()`);
  `WorkerStats`, and `_Pending` (a queued chunk);
* `sending`: `_Sending`, everything that leaves the worker (outputs, Errors, Status answers,
  heartbeats) as tasks, the bound on sends under way, the cap on peer connections, a failed send
  turned into an Error and a Release;
* `batching`: `_Batching`, the engine loop (which chunks run in the next step, the checks before it,
  the step in a thread, each output passed on) and the KV kept between steps (Releases, the idle
  sweep); `error_code`;
* `receiving`: `_Receiving`, the receive loop that never stops reading: admission to the bounded
  queue, Releases applied at once, Pings answered;
* `server`: `WorkerServer` itself, start-up (bind, the loops, the engine loaded in a daemon thread),
  `run`, `stop` and shutdown; `default_threads`.

Every part logs to the logger `helix.worker.server`, the name the worker's log lines had before the split.
The parts import one another relatively (`from .state import ...`): mypy reads this folder as
`worker.server` and cannot follow the `helix.worker` mapping, so only a relative import lets it check
each part against the class below it.
"""

from .batching import error_code
from .server import WorkerServer, default_threads
from .state import WorkerStats

__all__ = ["WorkerServer", "WorkerStats", "default_threads", "error_code"]
