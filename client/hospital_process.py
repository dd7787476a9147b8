"""The hospital's own long-lived process in deployment: TensorFlow, data and odometer stay loaded.

Flower 1.42 starts a fresh `flwr-clientapp` process for every message (with `--isolation
process` too); importing TensorFlow and tracing the DP-SGD step there cost about half a
minute per round. So the ClientApp process only forwards: the first message of a hospital
starts this process (detached, so it outlives that ClientApp process), and every message
after it reaches the same process over a Unix socket.

Where it lives: a private folder of the node's user (mode 0700, checked before each use):
`$HOSPITAL_FL_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/hospital-fl`, else
`/tmp/hospital-fl-<uid>`. For each hospital process it holds `<key>.sock` (the socket),
`<key>.authkey` (a random key, mode 0600: a client must prove it holds it before anything is
read) and `<key>.lock` (taken while starting, so two ClientApp processes never start two).

One process per key: the node config, the app's code folder (a new app bundle is a new
folder) and the SuperNode that started it. A process checks every request against its own
key, so a stale process never serves other code or another node config.

It stops when idle for `$HOSPITAL_FL_IDLE_SECONDS` (default 600) and when the SuperNode (or
the SuperExec) that started it is gone; it writes to the SuperNode's stderr, which it
inherits. Errors: a failing request is answered with its category only, the details go to
the hospital's own log (client/client_app.py's rules); a process that cannot be started or
reached makes the ClientApp reply "internal".

    python -m client.hospital_process --dir DIR --key KEY --watch PID:START[,PID:START] --idle SECONDS
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import secrets
import stat
import subprocess
import sys
import threading
import time
from multiprocessing.connection import AuthenticationError, Client, Listener
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent.parent  # the app's code: this checkout or an installed app bundle
IDLE_SECONDS = 600.0  # default idle time before the process stops
START_TIMEOUT = 120.0  # seconds a ClientApp waits for a process it started to accept
WATCH_SECONDS = 1.0  # how often the process checks its SuperNode and its idle time
MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to 108 bytes on Linux

log = logging.getLogger("hospital")


class HospitalProcessError(Exception):
    """The hospital process could not be started or reached (the reply says "internal")."""


# ------------------------------------------------------------------ where and who

def runtime_dir() -> Path:
    """The node user's private folder for hospital processes, created 0700 and checked."""
    chosen = os.environ.get("HOSPITAL_FL_RUNTIME_DIR")
    if chosen:
        folder = Path(chosen)
    elif os.environ.get("XDG_RUNTIME_DIR") and Path(os.environ["XDG_RUNTIME_DIR"]).is_dir():
        folder = Path(os.environ["XDG_RUNTIME_DIR"]) / "hospital-fl"
    else:
        folder = Path("/tmp") / f"hospital-fl-{os.geteuid()}"
    try:
        folder.mkdir(mode=0o700, parents=False, exist_ok=True)
        info = os.lstat(folder)
    except OSError as error:
        raise HospitalProcessError(f"cannot create the hospital process folder {folder}: {error}") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise HospitalProcessError(f"{folder} is not a folder of this user with mode 0700 (someone else made it, "
                                   "or it is a link): remove it or set HOSPITAL_FL_RUNTIME_DIR to a private folder")
    return folder


def _start_time(pid: int) -> float | None:
    """A process's start time (None when gone or a zombie): with the pid it names one process."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _same(pid: int, started: float) -> bool:
    """Is process `pid` still the one that started at `started` (not gone, not a zombie, not reused)?"""
    now = _start_time(pid)
    return now is not None and abs(now - started) < 0.5


def owners() -> list[tuple[int, float]]:
    """The processes whose end ends the hospital process: this ClientApp's parent (the
    SuperExec or the SuperNode) and, when that is a SuperExec started by a SuperNode, the
    SuperNode (Flower passes it as `--parent-pid`)."""
    import psutil

    chain = []
    try:
        parent = psutil.Process(os.getppid())
        chain.append((parent.pid, parent.create_time()))
        argv = parent.cmdline()
        if argv and "superexec" in " ".join(argv[:2]) and "--parent-pid" in argv:
            supernode = int(argv[argv.index("--parent-pid") + 1])
            started = _start_time(supernode)
            if started is not None:
                chain.append((supernode, started))
    except (psutil.Error, ValueError, IndexError):
        pass
    return chain


def key_of(node_config: dict, app_dir: Path, watched: list[tuple[int, float]]) -> str:
    """What determines the hospital a process serves: its node config, its code, its SuperNode."""
    facts = {"node-config": node_config, "app": str(app_dir), "python": sys.executable,
             "owners": [[pid, round(started, 2)] for pid, started in watched]}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _paths(folder: Path, key: str) -> tuple[Path, Path, Path]:
    sock = folder / f"{key}.sock"
    if len(str(sock)) >= MAX_SOCKET_PATH:
        raise HospitalProcessError(f"the socket path {sock} is {len(str(sock))} characters, over the "
                                   f"{MAX_SOCKET_PATH - 1} a Unix socket allows: set HOSPITAL_FL_RUNTIME_DIR to a shorter folder")
    return sock, folder / f"{key}.authkey", folder / f"{key}.lock"


# ------------------------------------------------------------------ the ClientApp's side

def _connect(sock: Path, authkey_path: Path):
    """A connection to a running process, or None when there is none (or it is not ours)."""
    try:
        authkey = authkey_path.read_bytes()
        return Client(str(sock), family="AF_UNIX", authkey=authkey)
    except (OSError, EOFError, AuthenticationError):
        return None


def _write_authkey(path: Path) -> None:
    temporary = path.with_name(path.name + ".new")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(secrets.token_bytes(32))
    os.replace(temporary, path)


def _start(folder: Path, key: str, watched: list[tuple[int, float]]):
    """Start the process (under the lock, unless another ClientApp process just did) and connect."""
    sock, authkey_path, lock_path = _paths(folder, key)
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    with os.fdopen(descriptor, "r+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            connection = _connect(sock, authkey_path)  # started while this one waited for the lock
            if connection is not None:
                return connection
            _write_authkey(authkey_path)
            sock.unlink(missing_ok=True)  # a dead process's socket
            idle = os.environ.get("HOSPITAL_FL_IDLE_SECONDS", str(IDLE_SECONDS))
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join([str(APP_DIR), *filter(None, [env.get("PYTHONPATH")])])
            argv = [sys.executable, "-m", "client.hospital_process", "--dir", str(folder), "--key", key,
                    "--watch", ",".join(f"{pid}:{started!r}" for pid, started in watched), "--idle", idle]
            # Its own session: a signal to this ClientApp's process group is not for it. stderr
            # is the SuperNode's, so the hospital's log stays where it was.
            child = subprocess.Popen(argv, cwd=APP_DIR, env=env, stdin=subprocess.DEVNULL,
                                     stdout=2, start_new_session=True)
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline:
                if child.poll() is not None:
                    raise HospitalProcessError(f"the hospital process exited at start with code {child.returncode} "
                                               "(its reason is above in this log)")
                connection = _connect(sock, authkey_path)
                if connection is not None:
                    return connection
                time.sleep(0.05)
            raise HospitalProcessError(f"the hospital process {child.pid} did not accept within {START_TIMEOUT:g} s")
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _ready(connection) -> bool:
    """The process's go-ahead on a new connection; False when it stopped before taking it."""
    try:
        return connection.recv() == "ready"
    except (OSError, EOFError):
        connection.close()
        return False


def call(request: dict) -> dict:
    """Send one message's plain content to this hospital's process; its reply:
    {"ok": <what client/handlers.handle returned>, "pid": ...} or {"error": <category>, "pid": ...}."""
    watched = owners()
    folder = runtime_dir()
    key = key_of(request["node-config"], APP_DIR, watched)
    sock, authkey_path, _ = _paths(folder, key)
    connection = _connect(sock, authkey_path)
    if connection is None or not _ready(connection):
        # None running, or it stopped (idle) just as this connected: the request was not sent yet.
        connection = _start(folder, key, watched)
        if not _ready(connection):
            raise HospitalProcessError("the hospital process it started closed the connection at once")
    with connection:
        connection.send({**request, "key": key})
        try:
            return connection.recv()
        except EOFError:
            raise HospitalProcessError("the hospital process closed the connection before replying "
                                       "(it stopped or was killed: see this log)") from None


# ------------------------------------------------------------------ the hospital process

class _Server:
    def __init__(self, folder: Path, key: str, watched: list[tuple[int, float]], idle: float):
        self.folder, self.key, self.watched, self.idle = folder, key, watched, idle
        self.sock, self.authkey_path, _ = _paths(folder, key)
        self.busy = False
        self.lock = threading.Lock()  # the watcher never stops the process while it takes a request
        self.last = time.monotonic()
        self.listener = None
        self.bound: tuple[int, int] | None = None  # (device, inode) of our socket file

    def stop(self, why: str) -> None:
        log.info("hospital process %d stops: %s", os.getpid(), why)
        try:  # only our own socket: a successor may already have bound the path
            info = os.stat(self.sock)
            if (info.st_dev, info.st_ino) == self.bound:
                self.sock.unlink()
        except OSError:
            pass
        sys.stderr.flush()
        os._exit(0)

    def watch(self) -> None:
        while True:
            time.sleep(WATCH_SECONDS)
            with self.lock:
                if self.busy:
                    continue  # a request in progress finishes (its charge is already on disk)
                gone = [pid for pid, started in self.watched if not _same(pid, started)]
                if gone:
                    self.stop(f"process {gone[-1]} that started it (its SuperNode or SuperExec) is gone")
                if time.monotonic() - self.last > self.idle:
                    self.stop(f"no message for {self.idle:g} s")

    def serve(self) -> None:
        authkey = self.authkey_path.read_bytes()
        self.listener = Listener(str(self.sock), family="AF_UNIX", backlog=16, authkey=authkey)
        os.chmod(self.sock, 0o600)
        info = os.stat(self.sock)
        self.bound = (info.st_dev, info.st_ino)
        log.info("hospital process %d serves %s; it stops after %g s without a message or when its SuperNode "
                 "stops", os.getpid(), self.sock, self.idle)
        self.busy = True  # importing TensorFlow is not idling
        threading.Thread(target=self.watch, daemon=True).start()
        from client import handlers  # TensorFlow, once for the process's life

        handlers.KEEP_SITES = True
        with self.lock:
            self.busy, self.last = False, time.monotonic()
        while True:
            try:
                connection = self.listener.accept()
            except (AuthenticationError, OSError, EOFError) as error:
                log.warning("hospital process %d refused a connection: %s", os.getpid(),
                            type(error).__name__ if not str(error) else error)
                continue
            with self.lock:  # past this, the watcher waits for the request to finish
                self.busy = True
            try:
                with connection:
                    connection.send("ready")
                    request = connection.recv()
                    connection.send({**self.answer(request, handlers), "pid": os.getpid()})
            except (OSError, EOFError):
                pass  # the ClientApp process went away; nothing to answer
            finally:
                with self.lock:
                    self.busy = False
                    self.last = time.monotonic()

    def answer(self, request: dict, handlers) -> dict:
        from client.client_app import contain

        node_config = request.get("node-config", {})
        try:
            if request.get("key") != self.key or key_of(node_config, APP_DIR, self.watched) != self.key:
                raise HospitalProcessError("a request for another node config or app version reached this hospital "
                                           "process; it was refused")
            return {"ok": handlers.handle(request)}
        except Exception as error:  # noqa: BLE001 - every error must be contained here
            name = {"query": "plan"}.get(request.get("kind"), request.get("kind"))
            return {"error": contain(str(name), error, node_config)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.hospital_process",
                                     description="A hospital's long-lived process (started by its ClientApp).")
    parser.add_argument("--dir", type=Path, required=True, help="the private runtime folder")
    parser.add_argument("--key", required=True, help="the process's key (names its socket and authkey)")
    parser.add_argument("--watch", default="", help="PID:START pairs: stop when any of them is gone")
    parser.add_argument("--idle", type=float, default=IDLE_SECONDS, help="stop after this many seconds idle")
    args = parser.parse_args(argv)
    from client import client_app  # noqa: F401 - the hospital's log format on stderr

    try:
        watched = [(int(pid), float(started)) for pid, started in
                   (item.split(":") for item in args.watch.split(",") if item)]
    except ValueError:
        parser.error("--watch takes PID:START pairs separated by commas")
    if not args.idle > 0:
        parser.error("--idle must be a positive number of seconds")
    _Server(args.dir, args.key, watched, args.idle).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
