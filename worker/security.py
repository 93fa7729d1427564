"""CURVE keys of one Helix data plane, and the ZAP check that lets only its own processes in.

Threat: anyone who can open a TCP connection to a worker or router socket. Without this, a
hand-made `Forward` runs on a worker and its tokens go wherever `reply_to` says, a `Ping` makes a
worker connect to any address it names, and a `Release` frees any request's KV cache.

Keys are per HelixCluster and per role, two CURVE key pairs (libsodium, built into pyzmq):

* the **router** pair: the router's PULL socket serves with it, and it is the router's identity as
  a client of the workers;
* the **worker** pair, shared by every worker of the cluster: each worker's PULL socket serves with
  it, and it is a worker's identity as a client of the next hop and of the router.

A worker's socket admits clients holding the router's or the worker secret key; the router's
admits the worker key only (routers never send to each other). The check is ZeroMQ's ZAP: a
handshake with any other key (or none: a plain socket fails on the mechanism) is refused before a
single message is read, and counted (`Receiver.stats.rejected_connections`). Because every
outgoing connection also names the public key its server must prove it holds, a worker sends a
token or a status only to a process holding the router's secret key, and hidden states only to one
holding the worker key, whatever address a message names: the plan's own processes are the only
places replies can go. Messages are encrypted and authenticated on the wire as well.

On disk (a key folder, a Kubernetes Secret's files) keys are Z85 text, 40 characters:
`router.secret`, `router.public`, `worker.secret`, `worker.public`. A process needs its own role's
secret and the other role's public key (`load_keys`); the router's pod never sees the worker
secret, a worker's pod never sees the router's.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from helix.planner.errors import HelixInputError

Role = Literal["router", "worker"]
ROLES: tuple[Role, ...] = ("router", "worker")
KEY_OPTION = "--keys"


def _other(role: Role) -> Role:
    return "worker" if role == "router" else "router"


def key_file(role: Role, part: Literal["public", "secret"]) -> str:
    """The file (and Secret key) name of one role's public or secret key."""
    return f"{role}.{part}"


@dataclass(frozen=True)
class Keypair:
    """A CURVE key pair, both halves Z85-encoded (40 bytes each)."""

    public: bytes
    secret: bytes

    @classmethod
    def generate(cls) -> Keypair:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    @classmethod
    def from_secret(cls, secret: bytes) -> Keypair:
        return cls(zmq.curve_public(secret), secret)


@dataclass(frozen=True)
class CurveKeys:
    """What one process holds: its own pair and the public key of the other role."""

    role: Role
    own: Keypair
    peer_public: bytes  # the other role's public key

    def server_key(self, to: Role) -> bytes:
        """The public key a server of role `to` must prove it holds."""
        return self.own.public if to == self.role else self.peer_public

    @property
    def clients(self) -> frozenset[bytes]:
        """Client keys this process's socket admits: a worker, the router and its peers; the router, workers."""
        return frozenset({self.own.public, self.peer_public}) if self.role == "worker" else frozenset(
            {self.peer_public})


@dataclass(frozen=True)
class ClusterKeys:
    """Both key pairs of one data plane (what the operator keeps in a Secret; `serve --local` in memory)."""

    router: Keypair
    worker: Keypair

    @classmethod
    def generate(cls) -> ClusterKeys:
        return cls(Keypair.generate(), Keypair.generate())

    def pair(self, role: Role) -> Keypair:
        return self.router if role == "router" else self.worker

    def for_role(self, role: Role) -> CurveKeys:
        return CurveKeys(role, self.pair(role), self.pair(_other(role)).public)

    def files(self) -> dict[str, str]:
        """Every key as Z85 text, by file name."""
        return {key_file(role, part): getattr(self.pair(role), part).decode() for role in ROLES
                for part in ("public", "secret")}

    def write(self, directory: Path, role: Role) -> None:
        """The files `load_keys(directory, role)` reads: this role's secret, the other's public key (mode 600)."""
        directory.mkdir(parents=True, exist_ok=True)
        for name in (key_file(role, "secret"), key_file(_other(role), "public")):
            path = directory / name
            path.touch(mode=0o600)
            path.write_text(self.files()[name] + "\n")


def _read_key(path: Path) -> bytes:
    if not path.is_file():
        raise HelixInputError(f"{path}: no such key file (a key folder holds {path.name} as 40 characters of Z85)",
                              KEY_OPTION)
    try:
        text = path.read_bytes().strip()
        if len(text) != 40 or len(z85.decode(text)) != 32:
            raise ValueError
    except (OSError, ValueError, KeyError):
        raise HelixInputError(f"{path}: not a CURVE key (expected 40 characters of Z85, as zmq.curve_keypair "
                              "writes)", KEY_OPTION) from None
    return text


def load_keys(directory: Path, role: Role) -> CurveKeys:
    """A process's keys from a key folder: `<role>.secret` and the other role's `.public`."""
    if not directory.is_dir():
        raise HelixInputError(f"{directory}: no such folder", KEY_OPTION)
    own = Keypair.from_secret(_read_key(directory / key_file(role, "secret")))
    peer = _read_key(directory / key_file(_other(role), "public"))
    own_public = directory / key_file(role, "public")
    if own_public.is_file() and _read_key(own_public) != own.public:
        raise HelixInputError(f"{own_public} does not belong to {key_file(role, 'secret')}", KEY_OPTION)
    return CurveKeys(role, own, peer)


def keys_from_options(directory: Path | None, insecure: bool, role: Role) -> CurveKeys | None:
    """The keys `helix worker` / `helix router` run with: a key folder, or none only when asked for by name."""
    if directory is not None and insecure:
        raise HelixInputError("give either a key folder or --insecure, not both", KEY_OPTION)
    if directory is not None:
        return load_keys(directory, role)
    if insecure:
        return None
    raise HelixInputError(
        f"the {role} admits only its cluster's processes: give the key folder ({key_file(role, 'secret')} and "
        f"{key_file(_other(role), 'public')}; the operator mounts one, `helix serve --local` makes its own), or "
        "--insecure to let anyone who reaches the socket in", KEY_OPTION)


class _Allowed:
    """A ZAP credentials provider: admits exactly the given client keys."""

    def __init__(self, keys: frozenset[bytes]) -> None:
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


class _Guards:
    """One ZAP authenticator per ZeroMQ context (ZAP is per context), one domain per bound socket.

    Each socket names its own ZAP domain, so sockets with different admitted keys (a router and
    workers in one test process) share the context's authenticator. The authenticator stops with
    its last socket, so the context can be terminated afterwards.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._auth: dict[int, ThreadAuthenticator] = {}
        self._domains: dict[int, set[str]] = {}
        self._numbers = itertools.count(1)

    def admit(self, ctx: zmq.Context, clients: frozenset[bytes]) -> str:
        """A new ZAP domain admitting `clients` on `ctx` (set it as the socket's ZAP_DOMAIN before binding)."""
        key = ctx.underlying
        with self._lock:
            auth = self._auth.get(key)
            if auth is None:
                auth = self._auth[key] = ThreadAuthenticator(ctx)
                auth.start()
                self._domains[key] = set()
            domain = f"helix-{next(self._numbers)}"
            auth.configure_curve_callback(domain, _Allowed(clients))
            self._domains[key].add(domain)
            return domain

    def forget(self, ctx: zmq.Context, domain: str) -> None:
        key = ctx.underlying
        with self._lock:
            auth = self._auth.get(key)
            if auth is None:
                return
            auth.credentials_providers.pop(domain, None)
            domains = self._domains[key]
            domains.discard(domain)
            if not domains:
                del self._auth[key], self._domains[key]
                auth.stop()


GUARDS = _Guards()


__all__ = ["GUARDS", "KEY_OPTION", "ROLES", "ClusterKeys", "CurveKeys", "Keypair", "Role", "key_file",
           "keys_from_options", "load_keys"]
