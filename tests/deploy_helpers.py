"""Start a real Flower deployment (SuperLink, SuperNodes, `flwr`) for tests/test_deploy.py.

Network rule: servers listen and are contacted only on loopback, or inside network
namespaces this module creates itself. As root with `ip netns`, the coordinator gets a
namespace with a bridge (10.213.0.1) and every hospital a namespace joined to that bridge
by a veth pair; nothing is ever added to the host's own network. Otherwise everything runs
on 127.0.0.1 with free ports, and `Deployment.note` says so.

Every process started here is killed on close (with its descendants, and in netns mode
every process left inside the namespaces), and every namespace is deleted.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SUBNET = "10.213.0"  # only ever configured inside this module's own namespaces
LINK_IP = f"{SUBNET}.1"
LINK_PORT = 9093  # inside the coordinator's namespace, so no clash with the host
NODE_PORT = 9094  # SuperNode Runtime API, each SuperNode in its own namespace
SUPEREXEC_POLL_SECONDS = "0.2"  # as the README's flower-supernode commands set it (Flower's default: 1 s)


def quiet_env(extra: dict | None = None) -> dict:
    """Environment for Flower processes: the venv first on PATH, no telemetry, no update check."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_TELEMETRY_ENABLED"] = "0"  # Flower would otherwise post events to telemetry.flower.ai
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"  # ...and ask PyPI for a newer release
    env["PYTHONUNBUFFERED"] = "1"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    # A SuperNode's SuperExec looks for a message to start a ClientApp for every 1 s by default
    # (set it in the environment to measure with another value).
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", SUPEREXEC_POLL_SECONDS)
    env.pop("VIRTUAL_ENV", None)
    if extra:
        env.update(extra)
    return env


def _run(cmd: list[str], timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)


_HANDED_OUT: set[int] = set()  # ports given to this test session's processes


def free_port() -> int:
    """A port free now that this session has not handed out before (the OS may offer a port
    again as soon as its probe closes, before the process it was meant for has bound it)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    namespace: str | None = None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class Deployment:
    """One coordinator plus SuperNodes, each in its own namespace when possible."""

    workdir: Path
    namespaces: list[str] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)
    mode: str = "loopback"
    note: str = ""
    link_host: str = "127.0.0.1"
    link_port: int = 0
    coordinator_ns: str | None = None
    node_ns: dict[str, str] = field(default_factory=dict)  # SuperNode name -> namespace
    _prefix: str = ""
    _next_ip: int = 11

    # ------------------------------------------------------------------ network

    @staticmethod
    def netns_possible() -> tuple[bool, str]:
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            return False, "not running as root"
        if shutil.which("ip") is None:
            return False, "the `ip` command is not installed"
        return True, ""

    def setup_network(self, node_names: list[str]) -> None:
        """Namespaces for the coordinator and each named SuperNode, or loopback as a fallback."""
        possible, why = self.netns_possible()
        if os.environ.get("HFL_DEPLOY_LOOPBACK") == "1":
            possible, why = False, "HFL_DEPLOY_LOOPBACK=1"
        if possible:
            try:
                self._setup_netns(node_names)
                self.mode = "netns"
                self.note = (f"network namespaces: coordinator {self.coordinator_ns} at {LINK_IP}, "
                             + ", ".join(f"{n} in {ns}" for n, ns in self.node_ns.items()))
                return
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as error:
                detail = getattr(error, "stderr", "") or str(error)
                why = f"creating network namespaces failed ({detail.strip()})"
                self._delete_namespaces()
        self.mode = "loopback"
        self.link_host = "127.0.0.1"
        self.link_port = free_port()
        self.note = f"NOTE: every process runs on loopback 127.0.0.1 (no network namespaces: {why})"

    def _setup_netns(self, node_names: list[str]) -> None:
        self._prefix = f"hfl{os.getpid()}"
        coord = f"{self._prefix}-c"
        _run(["ip", "netns", "add", coord])
        self.namespaces.append(coord)
        self.coordinator_ns = coord
        self._in(coord, "ip", "link", "set", "lo", "up")
        self._in(coord, "ip", "link", "add", "br0", "type", "bridge")
        self._in(coord, "ip", "addr", "add", f"{LINK_IP}/24", "dev", "br0")
        self._in(coord, "ip", "link", "set", "br0", "up")
        for index, name in enumerate(node_names, start=1):
            ns = f"{self._prefix}-{index}"
            _run(["ip", "netns", "add", ns])
            self.namespaces.append(ns)
            # The veth pair is created inside the coordinator's namespace and its peer moved
            # straight into the hospital's: no interface ever appears in the host namespace.
            self._in(coord, "ip", "link", "add", f"v{index}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._in(coord, "ip", "link", "set", f"v{index}", "master", "br0")
            self._in(coord, "ip", "link", "set", f"v{index}", "up")
            self._in(ns, "ip", "link", "set", "lo", "up")
            self._in(ns, "ip", "addr", "add", f"{SUBNET}.{10 + index}/24", "dev", "eth0")
            self._in(ns, "ip", "link", "set", "eth0", "up")
            self.node_ns[name] = ns
        self.link_host = LINK_IP
        self.link_port = LINK_PORT

    @staticmethod
    def _in(ns: str, *cmd: str) -> None:
        _run(["ip", "netns", "exec", ns, *cmd])

    def _delete_namespaces(self) -> None:
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        self.namespaces.clear()
        self.node_ns.clear()
        self.coordinator_ns = None

    @property
    def superlink_address(self) -> str:
        return f"{self.link_host}:{self.link_port}"

    def node_port(self) -> int:
        """A SuperNode's Runtime API port: Flower's default in its own namespace, else a free one."""
        return NODE_PORT if self.mode == "netns" else free_port()

    def write_flower_config(self, home: Path, name: str, root_certificates: Path) -> dict:
        """The operator's Flower Configuration ($FLWR_HOME/config.toml); returns the env to use it."""
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{name}"\n\n'
            f'[superlink.{name}]\naddress = "{self.superlink_address}"\n'
            f'root-certificates = "{root_certificates}"\n'
        )
        return quiet_env({"FLWR_HOME": str(home)})

    # ------------------------------------------------------------------ processes

    def _wrap(self, argv: list[str], namespace: str | None) -> list[str]:
        return ["ip", "netns", "exec", namespace, *argv] if namespace else argv

    def spawn(self, name: str, argv: list[str], namespace: str | None = None, env: dict | None = None,
              cwd: Path | None = None) -> Proc:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as handle:
            popen = subprocess.Popen(self._wrap(argv, namespace), stdout=handle, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env or quiet_env(), cwd=cwd or self.workdir,
                                     start_new_session=True)
        proc = Proc(name, popen, log, namespace)
        self.procs.append(proc)
        return proc

    def run(self, argv: list[str], namespace: str | None = None, env: dict | None = None, timeout: float = 60,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run a short command (a `flwr` call) to completion, bounded by `timeout`."""
        popen = subprocess.Popen(self._wrap(argv, namespace), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 stdin=subprocess.DEVNULL, text=True, env=env or quiet_env(),
                                 cwd=cwd or self.workdir, start_new_session=True)
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(popen.pid)
            out, err = popen.communicate(timeout=10)
            raise AssertionError(f"{' '.join(argv)} did not finish within {timeout} s:\n{out}\n{err}") from None
        return subprocess.CompletedProcess(argv, popen.returncode, out, err)

    def run_many(self, commands: list[list[str]], namespace: str | None = None, env: dict | None = None,
                 timeout: float = 60) -> list[subprocess.CompletedProcess]:
        """Run several short commands at once (each `flwr` call spends seconds importing)."""
        popens = [subprocess.Popen(self._wrap(argv, namespace), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   stdin=subprocess.DEVNULL, text=True, env=env or quiet_env(), cwd=self.workdir,
                                   start_new_session=True) for argv in commands]
        deadline = time.monotonic() + timeout
        results = []
        try:
            for argv, popen in zip(commands, popens):
                out, err = popen.communicate(timeout=max(1.0, deadline - time.monotonic()))
                results.append(subprocess.CompletedProcess(argv, popen.returncode, out, err))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{' '.join(argv)} did not finish within {timeout} s") from None
        finally:
            for popen in popens:
                if popen.poll() is None:
                    _kill_tree(popen.pid)
        return results

    def port_open(self, host: str, port: int, namespace: str | None = None) -> bool:
        """Can a TCP connection to host:port be made (from inside `namespace`)?"""
        probe = f"import socket; socket.create_connection(({host!r}, {port}), timeout=2).close()"
        done = subprocess.run(self._wrap([sys.executable, "-S", "-c", probe], namespace), capture_output=True,
                              timeout=20)
        return done.returncode == 0

    def close(self) -> None:
        """Kill every process started here; then check that each SuperNode's hospital process
        (client/hospital_process.py, detached by design) stopped by itself with its SuperNode."""
        family = set()
        for proc in self.procs:
            try:
                root = psutil.Process(proc.popen.pid)
                family |= {root.pid, *(child.pid for child in root.children(recursive=True))}
            except psutil.NoSuchProcess:
                pass
        hospitals = hospital_processes(family)
        for proc in reversed(self.procs):
            _kill_tree(proc.popen.pid)
        # Anything still inside our namespaces was started by us (detached SuperExecs, apps).
        for ns in self.namespaces:
            listed = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=20)
            for pid in listed.stdout.split():
                _kill_pid(int(pid))
        self._delete_namespaces()
        deadline = time.monotonic() + HOSPITAL_STOP_SECONDS
        alive = [proc for proc in hospitals if _running(proc)]
        while alive and time.monotonic() < deadline:  # not psutil.wait_procs: an unreaped zombie has stopped
            time.sleep(0.2)
            alive = [proc for proc in alive if _running(proc)]
        for proc in alive:
            _kill_pid(proc.pid)
        assert not alive, (f"hospital processes {[p.pid for p in alive]} were still running "
                           f"{HOSPITAL_STOP_SECONDS} s after their SuperNode was stopped (killed now)")


HOSPITAL_STOP_SECONDS = 30  # a hospital process finishes the request it is serving, then stops


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def hospital_processes(watched: set[int]) -> list[psutil.Process]:
    """Running hospital processes (python -m client.hospital_process) that watch any of `watched`."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []
        if "client.hospital_process" not in argv or "--watch" not in argv or not _running(proc):
            continue
        try:
            pids = {int(item.split(":")[0]) for item in argv[argv.index("--watch") + 1].split(",") if item}
        except (ValueError, IndexError):
            continue
        if pids & watched:
            found.append(proc)
    return found


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_tree(pid: int, grace: float = 5.0) -> None:
    """SIGTERM the process and every descendant (Flower detaches its SuperExec), then SIGKILL."""
    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in family:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def parse_json_output(text: str) -> dict:
    """The JSON object `flwr ... --format json` prints (the last line that parses)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise AssertionError(f"no JSON in flwr output:\n{text}") from None


# ---------------------------------------------------------------------- a federation's pieces

def write_hospital_npz(path: Path, part, images, labels) -> None:
    """A MedMNIST-layout .npz (uint8 images, integer labels) with a local held-out split."""
    import numpy as np

    cut = int(len(part) * 0.85)
    np.savez(path, train_images=images[part[:cut]], train_labels=labels[part[:cut]],
             test_images=images[part[cut:]], test_labels=labels[part[cut:]])


def digits_hospitals(workdir: Path, names, parts: int | None = None) -> None:
    """`<name>.npz` for each hospital: every `parts`-th of scikit-learn's bundled digits (8x8,
    labels 0..9) in a fixed shuffled order, so the hospitals hold disjoint shares."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(digits.target))
    for index, name in enumerate(names):
        write_hospital_npz(workdir / f"{name}.npz", order[index::parts or len(names)], images, digits.target)


def certs_and_keys(deployment: "Deployment", certs: Path, keys: Path, names) -> None:
    """The coordinator's CA and server certificate for the address the hospitals use, and a key per name."""
    from server.certs import create_coordinator_certs, create_hospital_key

    create_coordinator_certs(certs, ["localhost"] if deployment.mode == "loopback" else [], [deployment.link_host])
    for name in names:
        create_hospital_key(keys, name)


def superlink_argv(deployment: Deployment, certs: Path) -> list[str]:
    return ["flower-superlink",
            "--ssl-ca-certfile", str(certs / "ca.crt"),
            "--ssl-certfile", str(certs / "server.crt"),
            "--ssl-keyfile", str(certs / "server.key"),
            "--enable-supernode-auth",
            "--host", deployment.link_host, "--port", str(deployment.link_port),
            "--disable-runtime-dependency-installation"]


def supernode_argv(deployment: Deployment, root_ca: Path, key: Path, node_config: str | None = None,
                    give_up: bool = False) -> list[str]:
    argv = ["flower-supernode",
            "--superlink", deployment.superlink_address,
            "--root-certificates", str(root_ca),
            "--auth-supernode-private-key", str(key),
            "--port", str(deployment.node_port())]
    if node_config:
        argv += ["--node-config", node_config]
    if give_up:  # intruders: a few tries, then exit instead of retrying forever
        argv += ["--max-retries", "2", "--max-wait-time", "15"]
    return argv
