"""Flower's side of simulate.py: a private SuperLink in simulation mode, a private Flower
Configuration naming it, and one `flwr run APP CONNECTION --stream` on the hospital-fl App.

Everything it starts (SuperLink, SuperExec, flwr-simulation, Ray) ends with it, however
simulate.py ends, SIGKILL included: every such process carries the run's marker in its
environment (RUN_MARKER, inherited by everything below, even the Ray daemons that detach
from the tree), and a small watchdog process that simulate.py starts first kills every
process carrying it as soon as simulate.py is gone (see `watch`). The SuperLink and `flwr run`
also get a parent-death signal, so they go at once. The user's
own `~/.flwr/config.toml` is never touched: a throw-away FLWR_HOME, unless the user set one.
Only Flower's public commands are used (flower-superlink, flwr run, flwr list), so any flwr
within pyproject's range works.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from common.cpus import usable_cpus
from common.durable import DISK_FULL_WORDS, disk_full_line, is_disk_full, naming
from common.errors import UserError
from common.tf_env import tf_environment

ROOT = Path(__file__).resolve().parent.parent  # the source tree, or site-packages once installed
CONNECTION = "hospital-fl-simulation"  # the connection's name in the private Flower Configuration
APP_PACKAGES = ("server", "client", "common", "configs")  # what an installed app is assembled from
# The package's copy of pyproject.toml when installed from a wheel (see pyproject's force-include).
INSTALLED_APP_TOML = ROOT / "server" / "flower_app" / "pyproject.toml"
# Flower's INFO lines repeat what the round lines say; they go to flower.log, not the terminal.
# Ray's raylet lines (a worker that died, with its PID and exit details) likewise: the round
# line names the hospital and its failure category.
FLOWER_CHATTER = re.compile(r"^(\x1b\[[0-9;]*m)*(INFO|DEBUG)\b|Since flwr 1\.32|^Successfully (started run|installed)"
                            r"|^Using SuperLink: |^(\x1b\[[0-9;]*m)*\(raylet\)")
ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")  # Flower colours its level names; flower.log is plain text
STARTUP_TIMEOUT = 60.0  # seconds to wait for the private SuperLink to answer
# Flower 1.42 gives its simulation process 30 s from launch to its first heartbeat; one that
# starts slower (it imports TensorFlow; a very busy machine) is relaunched, forever. The
# SuperLink's log says so with this line, and simulate.py then stops with a clear message.
RELAUNCH_LOOP = "task-token authentication failed"
RELAUNCHES_TOLERATED = 10  # ~30-40 s each: minutes of patience on a busy machine, not forever
# In the environment of every process a simulation starts; its value names the simulation.
RUN_MARKER = "HOSPITAL_FL_SIMULATION"
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies (Linux)
WATCH_SECONDS = 1.0  # how often the watchdog lists the simulation's processes


def _find_prctl():
    """libc's prctl, looked up now: a child between fork and exec should do as little as possible."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _find_prctl()


def die_with_parent() -> None:
    """In a child before it execs (Popen's preexec_fn): be killed when simulate.py dies.

    Only for the direct child (what it starts in turn is the watchdog's), and only on Linux;
    elsewhere the watchdog alone ends the processes.
    """
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def marked_processes(marker: str) -> list:
    """Every process whose environment carries this simulation's marker (but this one)."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(RUN_MARKER) == marker:
                found.append(proc)
        except psutil.Error:  # gone, a zombie, or not ours to read: nothing of this run
            continue
    return found


def _family(marker: str) -> dict[int, float]:
    """{pid: start time} of every marked process and everything below it.

    Below matters: Ray renames its agents (`ray::DashboardAgent`) with setproctitle, which
    overwrites the environment /proc shows, so they carry no visible marker; they are known
    as children of a marked raylet."""
    import psutil

    found = {}
    for proc in marked_processes(marker):
        try:
            for member in [proc, *proc.children(recursive=True)]:
                found[member.pid] = member.create_time()
        except psutil.Error:
            continue
    return found


def kill_family(known: dict[int, float], marker: str, attempts: int = 20) -> int:
    """SIGKILL every process of this simulation: those seen before (`known`, still the same
    processes: same start time) and those marked now, again until none is left (a dying Flower
    or Ray process may start another just before); return how many were killed."""
    import psutil

    killed = 0
    for _ in range(attempts):
        targets = []
        for pid, started in (known | _family(marker)).items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE:
                    targets.append(proc)
            except psutil.Error:
                continue
        if not targets:
            break
        for proc in targets:
            try:
                proc.kill()  # no grace: with simulate.py gone, nobody may finish a round unattended
                killed += 1
            except psutil.Error:
                pass
        psutil.wait_procs(targets, timeout=5)
    return killed


def watch(marker: str) -> None:
    """The watchdog: until simulate.py closes our stdin (it ended, or was killed: the kernel
    closes its end either way), keep a list of the simulation's processes; then kill them all.

    It runs in a session of its own and ignores the terminal's signals, so a Ctrl-C or a kill
    of simulate.py's process group cannot take it down before it has done its job.
    """
    import select

    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)
    known: dict[int, float] = {}
    stdin = sys.stdin.fileno()
    while True:
        ready, _, _ = select.select([stdin], [], [], WATCH_SECONDS)
        if ready and not os.read(stdin, 4096):
            break  # end of file: simulate.py is gone
        known |= _family(marker)  # a process that has ended is checked by its start time at the end
    kill_family(known, marker)


def start_watchdog(marker: str) -> subprocess.Popen:
    """The watchdog process (`python -m server.flower_launch --watch MARKER`, from ROOT so that
    `-m` finds the package in the source tree or site-packages alike)."""
    env = {k: v for k, v in os.environ.items() if k != RUN_MARKER}
    return subprocess.Popen([sys.executable, "-m", "server.flower_launch", "--watch", marker], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=str(ROOT),
                            start_new_session=True)



def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 now: all probes stay open until every port is
    drawn, so two of them can never be the same port."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def child_environment(flwr_home: Path) -> dict:
    """The environment of every Flower process (and so of Ray's workers and the apps)."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    # Flower starts its helpers (flower-superexec, flwr-simulation) by name: put this Python's
    # scripts first, so an un-activated venv (`/venv/bin/hospital-fl simulate`) works too.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # Flower reports usage unless told not to
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    # The SuperExec looks for a submitted run once a second by default: up to 1 s of start-up.
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's future-GPU-handling warning
    for name, value in tf_environment().items():  # Flower imports TensorFlow before our code runs
        env.setdefault(name, value)
    env.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")
    return env


def app_directory(flwr_home: Path) -> Path:
    """The Flower App to run: the source tree itself, or one assembled from the installed package."""
    if (ROOT / "pyproject.toml").is_file() and (ROOT / "configs").is_dir():
        return ROOT
    if not INSTALLED_APP_TOML.is_file():
        raise UserError(f"cannot find the Flower App's pyproject.toml under {ROOT}: reinstall hospital-fl")
    app = flwr_home / "app"
    for name in APP_PACKAGES:
        shutil.copytree(ROOT / name, app / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(INSTALLED_APP_TOML, app / "pyproject.toml")
    return app


def drop_superseded_launches(root_pid: int) -> int:
    """Kill every flwr-simulation process below `root_pid` but the newest; return how many.

    Flower launches a new simulation process only when the previous one missed its first
    heartbeat, and then revokes the old one's token: the old process can never run the
    run, but it goes on importing (TensorFlow, Ray) and loading the machine, which makes
    the next launch miss its heartbeat too. Left alone, a busy machine collected dozens of
    them (2026-11-26, load 36); dropped at once, one launch at a time competes for the CPU.
    """
    import psutil

    try:
        below = psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        return 0
    def is_simulation(proc) -> bool:
        return any(Path(part).name == "flwr-simulation" for part in proc.cmdline()[:3])

    launched = []
    for proc in below:
        try:
            # A launch is started by Flower's SuperExec; a process forked by a launch carries
            # the same command line until it execs, and must not count as a newer launch.
            if is_simulation(proc) and not (proc.parent() and is_simulation(proc.parent())):
                launched.append((proc.create_time(), proc))
        except psutil.Error:
            continue
    launched.sort(key=lambda pair: pair[0])
    for _, proc in launched[:-1]:
        try:
            for part in [*proc.children(recursive=True), proc]:
                part.kill()
        except psutil.Error:
            continue
    return max(0, len(launched) - 1)


class Simulation:
    """One private SuperLink (simulation mode) and one `flwr run`; everything they start ends with it."""

    def __init__(self, config, resolved: dict, out: Path, resume: bool, verbose: bool):
        self.config, self.resolved, self.out, self.resume, self.verbose = config, resolved, out, resume, verbose
        user_home = os.environ.get("FLWR_HOME")
        # A user-set FLWR_HOME is theirs to keep; otherwise a throw-away one, so ~/.flwr is untouched.
        self.flwr_home = Path(user_home) if user_home else Path(tempfile.mkdtemp(prefix="hospital-fl-flwr-"))
        self.own_home = not user_home
        self.env = child_environment(self.flwr_home)
        self.marker = uuid.uuid4().hex
        self.env[RUN_MARKER] = self.marker
        self.watchdog: subprocess.Popen | None = None
        self.superlink: subprocess.Popen | None = None
        self.flwr_run: subprocess.Popen | None = None
        self.run_id: int | None = None
        self.transcript: list[str] = []  # Flower's lines without colour codes
        self.received: list[float] = []  # when each of them arrived (time.time())
        self.stop_requests = 0
        self.server_started = False  # the ServerApp has opened the run directory
        self.stalled = False
        self.saved_config: bytes | None = None

    # -- start-up -------------------------------------------------------------------------------------
    def start_superlink(self) -> None:
        # First of all: whatever is started after this ends when simulate.py does.
        self.watchdog = start_watchdog(self.marker)
        self.port, control = free_ports(2)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        log_file = self.flwr_home / "superlink.log"
        command = [_executable("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
                   "--host", "127.0.0.1", "--port", str(self.port), "--control-api-address", f"127.0.0.1:{control}",
                   # The apps' dependencies are this environment's; never `uv sync` a new one per run.
                   "--disable-runtime-dependency-installation", "--log-file", str(log_file)]
        # Its own session: the terminal's Ctrl-C reaches simulate.py only, which decides what stops.
        self.superlink = subprocess.Popen(command, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True, preexec_fn=die_with_parent)
        config_toml = self.flwr_home / "config.toml"
        # A user-set FLWR_HOME may hold the user's own Flower Configuration: put it back at the end.
        self.saved_config = config_toml.read_bytes() if config_toml.is_file() else None
        config_toml.write_text(
            "# Written by hospital-fl's simulate: one local simulation SuperLink, started and stopped per run.\n"
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n')

    def wait_for_superlink(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.superlink.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with code {self.superlink.returncode}; "
                                   f"see {self.flwr_home / 'superlink.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"flower-superlink did not answer within {STARTUP_TIMEOUT:.0f} s")

    def watch_for_relaunch_loop(self) -> None:
        """In a thread: drop superseded launches, and stop everything if Flower keeps relaunching
        a simulation that starts too slowly."""
        import threading

        def watch():
            log_file = self.flwr_home / "superlink.log"
            while self.flwr_run is None or self.flwr_run.poll() is None:
                time.sleep(2)
                if self.superlink is not None:
                    drop_superseded_launches(self.superlink.pid)
                try:
                    failures = log_file.read_text(errors="replace").count(RELAUNCH_LOOP)
                except OSError:
                    continue
                if failures >= 3 * RELAUNCHES_TOLERATED:  # three failed calls per launch
                    self.stalled = True
                    self.shutdown()
                    return

        threading.Thread(target=watch, daemon=True).start()

    def run_config_file(self) -> Path:
        import tomli_w

        run_config = {"config-json": json.dumps(self.resolved), "run-dir": str(self.out), "config-path": ""}
        if self.resume:
            run_config["resume-dir"] = str(self.out)
        path = self.flwr_home / "run-config.toml"
        path.write_text(tomli_w.dumps(run_config))
        return path

    def flwr_run_command(self, app: Path) -> list[str]:
        cpus = usable_cpus()
        federation = [
            f"num-supernodes={self.config.hospitals}",
            f"client-resources-num-cpus={max(1, round(self.config.simulation.cpus_per_client))}",
            "client-resources-num-gpus=0.0",
            f"init-args-num-cpus={cpus}",
            'init-args-logging-level="ERROR"',
            # Each hospital's own log (local training loss) stays out of the coordinator's terminal.
            "init-args-log-to-driver=false",
        ]
        return [_executable("flwr"), "run", str(app), CONNECTION, "--stream",
                "--run-config", str(self.run_config_file()),
                "--federation-config", " ".join(federation)]

    # -- running ----------------------------------------------------------------------------------------
    def stream(self, show) -> int | None:
        """Run `flwr run --stream`, pass its lines to `show`; return its exit code (None if killed)."""
        app = app_directory(self.flwr_home)
        self.flwr_run = subprocess.Popen(self.flwr_run_command(app), env=self.env, cwd=app, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
                                         preexec_fn=die_with_parent)
        self.watch_for_relaunch_loop()
        for line in self.flwr_run.stdout:
            line = line.rstrip("\n")
            self.transcript.append(ANSI_CODES.sub("", line))
            self.received.append(time.time())
            if self.run_id is None and (found := re.search(r"Successfully started run (\d+)", line)):
                self.run_id = int(found.group(1))
            if line.startswith("Run directory:"):
                self.server_started = True
            if self.verbose or not FLOWER_CHATTER.search(line):
                show(line)
        return self.flwr_run.wait()

    def request_stop(self, how: str = "Ctrl-C") -> None:
        """Ctrl-C or SIGTERM: once asks for a stop after this round (the STOP file); twice stops now.

        Before the ServerApp has opened the run directory there is no round to finish (and a
        STOP file would make a new run's directory look taken): the first request stops now.
        """
        self.stop_requests += 1
        if self.stop_requests == 1 and self.server_started:
            try:
                (self.out / "STOP").touch()
            except OSError:
                pass
            print(f"\nstopping after this round ({how} again to stop now)", file=sys.stderr, flush=True)
        else:
            print("\nstopping now", file=sys.stderr, flush=True)
            self.shutdown()

    def run_succeeded(self) -> bool | None:
        """Did Flower see the run complete? (None when it cannot be asked.)"""
        if self.run_id is None:
            return None
        try:
            result = subprocess.run([_executable("flwr"), "list", CONNECTION, "--run-id", str(self.run_id),
                                     "--format", "json"], env=self.env, capture_output=True, text=True, timeout=30)
            status = json.dumps(json.loads(result.stdout))
        except (subprocess.SubprocessError, ValueError, OSError):
            return None
        if "finished:completed" in status:
            return True
        return False if "finished:" in status else None

    # -- ending -----------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """End `flwr run`, the SuperLink and everything below it (the simulation, Ray and its workers)."""
        import psutil

        procs = []
        for parent in (self.flwr_run, self.superlink):
            if parent is None or parent.poll() is not None:
                continue
            try:
                root = psutil.Process(parent.pid)
                procs += [root, *root.children(recursive=True)]
            except psutil.Error:
                pass
        for proc in procs:
            try:
                proc.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)

    def save_transcript(self) -> None:
        """Flower's lines of this run, added to <run-dir>/flower.log (a full disk: one line, no traceback)."""
        if not (self.out.is_dir() and self.transcript):
            return
        path = self.out / "flower.log"
        now = time.time()  # for any line recorded without its own time
        stamps = [*self.received, *[now] * (len(self.transcript) - len(self.received))]
        lines = [f"{_utc(stamp)} {line}" for stamp, line in zip(stamps, self.transcript)]
        try:
            with naming(path), open(path, "a", encoding="utf-8") as handle:
                handle.write("\n".join(lines) + "\n")
        except OSError as error:
            why = disk_full_line(error) if is_disk_full(error) else f"cannot write {path}: {error.strerror or error}"
            print(f"error: {why}; Flower's log of this run is not saved", file=sys.stderr, flush=True)

    def disk_filled(self) -> bool:
        """Did the ServerApp stop because the disk was full (its one line, in the stream)?"""
        return any(line.startswith("error: cannot write ") and DISK_FULL_WORDS in line for line in self.transcript)

    def stop_watchdog(self) -> None:
        """Close the watchdog's stdin: it kills whatever of the run is left (a Ray daemon that
        left the tree) and exits; wait for it, so nothing runs once simulate.py returns."""
        if self.watchdog is None:
            return
        try:
            self.watchdog.stdin.close()
            self.watchdog.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            kill_family({}, self.marker)  # the watchdog is stuck: do its job here

    def cleanup(self) -> None:
        self.shutdown()
        self.stop_watchdog()
        self.save_transcript()
        if self.own_home:
            shutil.rmtree(self.flwr_home, ignore_errors=True)
        elif self.saved_config is not None:
            (self.flwr_home / "config.toml").write_bytes(self.saved_config)


def _utc(stamp: float) -> str:
    """A flower.log time stamp: UTC to the millisecond, as in 2026-12-03T11:16:42.173Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp)) + f".{int(stamp % 1 * 1000):03d}Z"


def _executable(name: str) -> str:
    """Flower's command next to this Python (the venv's bin), or on the PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise UserError(f"cannot find Flower's `{name}` command: install hospital-fl's dependencies (flwr[simulation])")
    return found


if __name__ == "__main__" and sys.argv[1:2] == ["--watch"]:
    watch(sys.argv[2])
