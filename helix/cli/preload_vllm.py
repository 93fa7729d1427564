"""Imported by serve's forkserver when the workers run vLLM (`prefork.preload_engine`), so each worker
forks with vLLM loaded rather than importing it itself.

The forkserver survives only import errors of the modules it preloads; anything else would end it and
with it every later start. A vLLM that cannot be imported here is left for the worker, which imports
it again and reports why in its own log.
"""

from __future__ import annotations

import contextlib

with contextlib.suppress(Exception):
    from helix.worker.engines import get_engine

    get_engine("vllm")
