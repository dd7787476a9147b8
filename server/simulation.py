"""Simulate N hospitals on one machine through Flower's public CLI: `flwr run` on a local simulation.

    python simulate.py                                   # the embedded default (configs/default.yaml)
    python simulate.py --set dp.noise_multiplier=1.5 --set rounds=10 --out runs/sigma15
    python simulate.py --config configs/my.yaml
    hospital-fl simulate --set rounds=2                  # the same, once the package is installed

What it does, in Flower's own terms: start a private SuperLink in simulation mode, write a
Flower Configuration naming it (in a private FLWR_HOME, so the user's own
`~/.flwr/config.toml` is never touched), then `flwr run APP CONNECTION --stream` with
`--federation-config num-supernodes=<hospitals>` and the resolved config as `--run-config`.
The ServerApp's round lines are shown as they arrive; Flower's own INFO chatter is kept in
`<run-dir>/flower.log`. Ctrl-C or SIGTERM once asks the ServerApp to stop after the round
(`<run-dir>/STOP`); twice stops everything now. The exit code is the ServerApp's (`<run-dir>/status.json`), 2 for
bad input, 130 when interrupted.
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import time
from pathlib import Path

from common.durable import DISK_FULL_WORDS
from common.errors import UserError
from server.flower_launch import Simulation


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None,
                        help="YAML file of overrides (default: configs/default.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set dp.noise_multiplier=1.2 (repeatable)")
    parser.add_argument("--out", default=None, help="run directory to create (default: runs/run-<time>)")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR",
                        help="continue this run directory from its last checkpoint (its config.yaml, then --set)")
    parser.add_argument("--verbose", action="store_true", help="show Flower's own log lines as well")
    return parser.parse_args(argv)


def default_config_path() -> Path:
    from common.config import PROJECT_ROOT

    return PROJECT_ROOT / "configs" / "default.yaml"


def _absolute_paths(resolved: dict) -> dict:
    """Paths in the config, made absolute against the user's directory: the apps run elsewhere."""
    data = resolved["data"]
    if isinstance(data["path"], list):
        data["path"] = [str(Path(p).expanduser().resolve()) for p in data["path"]]
    elif data["path"]:
        data["path"] = str(Path(data["path"]).expanduser().resolve())
    privacy = resolved["privacy"]
    privacy["odometer_dir"] = str(Path(privacy["odometer_dir"]).expanduser().resolve())
    return resolved


def check_writable(out: Path) -> None:
    """Create the (empty) run directory now and probe it, so a bad --out fails before start-up."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        reason = error.strerror or str(error)
        raise UserError(f"cannot write the run directory {out}: {reason}; choose another --out") from None


def _note_old_odometer(config) -> None:
    """Earlier versions kept the default odometer in the project: say where it is, so no spend is forgotten."""
    from common.config import PROJECT_ROOT, default_odometer_dir

    old = PROJECT_ROOT / "odometer" / "simulation.jsonl"
    if Path(config.privacy.odometer_dir) == default_odometer_dir() and old.is_file():
        print(f"note: an odometer of an earlier version is at {old.parent}; the default is now "
              f"{default_odometer_dir()}: to keep counting that spend, pass --set privacy.odometer_dir={old.parent}")


def prepare(args):
    """Resolve the config, check the data and the run directory before anything starts."""
    from common.config import load_config, to_dict
    from common.federation import build_federation
    from common.partition import hospital_table
    from common.privacy import delta_refusal

    if args.resume:
        out = Path(args.resume).expanduser().resolve()
        if not (out / "config.yaml").is_file():
            raise UserError(f"--resume {out}: not a run directory (no config.yaml in it); pass the run's directory")
        if args.out and Path(args.out).expanduser().resolve() != out:
            raise UserError("--resume continues the given run directory: leave out --out")
        from server import checkpoint
        from server.run_dir import RunDirectory

        # The coordinator loads it again inside Flower; a damaged one is one line here instead,
        # before Flower starts and before anything (status.json) is rewritten.
        checkpoint.load(RunDirectory.resume(out).checkpoint)
        config = load_config(args.config or out / "config.yaml", args.overrides)
    else:
        config = load_config(args.config or default_config_path(), args.overrides)
        out = Path(args.out) if args.out else Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")
        out = out.expanduser().resolve()
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UserError(f"run directory {out} already exists and is not empty: choose another --out")
    if config.model.builder:  # import it in every process later; find it now, before anything starts
        import importlib.util

        module = config.model.builder.split(":")[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise UserError(f"model.builder {config.model.builder!r}: no module {module!r} on this Python's path; "
                            "install it or add its folder to PYTHONPATH")
    # Not the per-process cache: the table needs the data once, and this process then only
    # streams Flower's output for the whole run (at 224 px it would hold ~1 GB of images).
    federation = build_federation(config)
    for shard in federation.shards:  # every hospital would refuse it in its first round: say so now
        refusal = delta_refusal(shard.name, config.privacy.delta, len(shard.train_y))
        if refusal:
            raise UserError(f"privacy.delta: {refusal} (1e-5 is usual)")
    if not args.resume:  # after the data checks: a refused run leaves no directory behind
        check_writable(out)
    for note in federation.dataset.notes:
        print(f"note: {note}")
    print(hospital_table([s.train_y for s in federation.shards], federation.dataset.class_names,
                         [s.name for s in federation.shards]))
    print(f"Central test set: {len(federation.test_y)} examples; input {federation.dataset.input_shape}, "
          f"{federation.dataset.num_classes} classes.")
    placed = {s.name: s.identical_sets for s in federation.shards if s.identical_sets}
    if placed:
        print(f"Identical images: {sum(placed.values())} set(s), each kept whole in one hospital and out of the "
              f"central test set: {', '.join(f'{name} {count}' for name, count in placed.items())}.")
    _note_old_odometer(config)
    return config, _absolute_paths(to_dict(config)), out



def _written_state(out: Path) -> str | None:
    try:
        return str(json.loads((out / "status.json").read_text())["state"])
    except (ValueError, KeyError, TypeError, OSError):
        return None


def outcome(out: Path, succeeded: bool | None, interrupted: bool) -> int:
    """The ServerApp's exit code from status.json; else 130 if interrupted, 0 if Flower saw success."""
    status = out / "status.json"
    if status.is_file():
        try:
            written = json.loads(status.read_text())
            if written.get("state") == "running":
                # A run stopped at once (second Ctrl-C) never wrote its final status; nor did a
                # coordinator that was killed (out of memory, say): that run failed.
                if not interrupted:
                    return 1
            else:
                return int(written["exit_code"])
        except (ValueError, KeyError, TypeError, OSError, AttributeError):
            pass
    if interrupted:
        return 130
    if succeeded is False or not (out / "metrics.jsonl").is_file():
        return 1
    return 0


def _mark_failed(out: Path, reason: str) -> None:
    """Record in status.json that a run the ServerApp left "running" failed (what it would have written)."""
    from server.run_dir import RunDirectory

    try:
        status = json.loads((out / "status.json").read_text())
        RunDirectory(out).write_status(status | {"state": "failed", "exit_code": 1, "reason": reason})
    except (ValueError, TypeError, OSError):
        pass


class Progress:
    """A spinner with the elapsed time between the ServerApp's lines (only on a terminal)."""

    def __init__(self, rounds: int):
        from rich.console import Console

        self.console = Console(highlight=False, soft_wrap=True)
        self.rounds = rounds
        self.status = None
        self.started = time.monotonic()
        if self.console.is_terminal:
            self.status = self.console.status("Starting Flower's simulation: Ray, TensorFlow, the first DP-SGD trace ...")
            self.status.start()

    def show(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False)
        if self.status is None:
            return
        done = re.match(r"Round (\d+)/(\d+) \|", line)
        if done:
            next_round = int(done.group(1)) + 1
            if next_round <= int(done.group(2)):
                self.status.update(f"Round {next_round}/{done.group(2)}: hospitals training ...")
        elif line.startswith("Run directory:") and self.status:
            self.status.update(f"Round 1/{self.rounds}: hospitals load TensorFlow and train ...")

    def close(self) -> None:
        if self.status is not None:
            self.status.stop()


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config, resolved, out = prepare(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before the run started: nothing was written", file=sys.stderr)
        return 130
    print(f"Simulating {config.hospitals} hospitals for up to {config.rounds} rounds "
          f"(DP-SGD: noise multiplier {config.dp.noise_multiplier}, clip {config.dp.l2_norm_clip}, "
          f"batch {config.train.batch_size}; budget epsilon {config.privacy.max_epsilon} at delta {config.privacy.delta:g})",
          flush=True)

    simulation = Simulation(config, resolved, out, bool(args.resume), args.verbose)
    progress = None
    # Ctrl-C and SIGTERM (a service manager, `kill`) stop the same way: after the round, then now.
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, lambda *_: simulation.request_stop("Ctrl-C")),
                signal.SIGTERM: signal.signal(signal.SIGTERM, lambda *_: simulation.request_stop("SIGTERM or Ctrl-C"))}
    try:
        simulation.start_superlink()
        progress = Progress(config.rounds)
        simulation.wait_for_superlink()
        simulation.stream(progress.show)
        progress.close()
        # status.json (the ServerApp's own word) makes asking Flower unnecessary.
        succeeded = None if simulation.stop_requests > 1 or (out / "status.json").is_file() \
            else simulation.run_succeeded()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        print(f"error: Flower did not start: {error}", file=sys.stderr)
        return 1
    finally:
        if progress is not None:
            progress.close()
        simulation.cleanup()
        for number, handler in previous.items():
            signal.signal(number, handler)
    if simulation.stalled:
        print("error: Flower's simulation process took longer than the 30 s Flower 1.42 allows it to start "
              "(it imports TensorFlow; the machine is very busy) and was relaunched again and again: "
              "try again when the machine is less loaded", file=sys.stderr)
        return 1
    code = outcome(out, succeeded, simulation.stop_requests > 0)
    if simulation.disk_filled():
        # The ServerApp's own line (already shown) names the full file; if status.json could not
        # say so, this is the run's last word, not a guess about memory.
        if _written_state(out) == "running":
            reason = next(line for line in simulation.transcript if DISK_FULL_WORDS in line)[len("error: "):]
            _mark_failed(out, reason)
            said = any("could not be written either" in line for line in simulation.transcript)  # the ServerApp's
            if _written_state(out) == "running" and not said:
                print(f"error: {out / 'status.json'} still says running: it could not be rewritten ({reason})",
                      file=sys.stderr)
        return 1
    if code not in (0, 130) and not (out / "status.json").is_file():
        print(f"error: the run failed; Flower's log is in {out / 'flower.log'}", file=sys.stderr)
    elif code not in (0, 130) and _written_state(out) == "running":
        reason = ("the coordinator's process ended before the run did (killed: most often the machine ran out of "
                  f"memory; lower data.image_size or the hospitals per worker); {out / 'flower.log'} and run.log "
                  f"say more; --resume {out} continues from the last checkpoint")
        _mark_failed(out, reason)
        print(f"error: {reason}", file=sys.stderr)
    elif code == 130:
        print(f"interrupted: {_resume_hint(out)}", file=sys.stderr)
    return code


def _resume_hint(out: Path) -> str:
    """How far an interrupted run got and how to continue it (only a checkpointed round can be resumed)."""
    try:
        done = json.loads((out / "checkpoint" / "state.json").read_text())["round"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no round was checkpointed, so there is nothing to resume; {out} keeps what was written"
    return (f"stopped after round {done}; the run directory and odometers keep what was written; "
            f"continue with: python simulate.py --resume {out}")


if __name__ == "__main__":
    sys.exit(main())
