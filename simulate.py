"""Simulate N hospitals on one machine: the same ServerApp and ClientApp as a deployment.

    python simulate.py                                   # the embedded default (configs/default.yaml)
    python simulate.py --set dp.noise_multiplier=1.5 --set rounds=10 --out runs/sigma15
    python simulate.py --config configs/my.yaml

Prints one line per round (accuracy, loss, each hospital's epsilon, the maximum, delta) and
writes a run directory; see README.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from common.errors import UserError

# Ray would otherwise warn on every start that a future release changes GPU handling.
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML file of overrides (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set dp.noise_multiplier=1.2 (repeatable)")
    parser.add_argument("--out", default=None, help="run directory to create (default: runs/run-<time>)")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR",
                        help="continue RUN_DIR from its last checkpoint, with its own config.yaml")
    return parser.parse_args(argv)


def prepare(args):
    """Resolve the config, check the data and the run directory before anything trains."""
    from common.config import load_config, to_dict
    from common.federation import load_federation
    from common.partition import hospital_table

    if args.resume:
        args.config, args.out = str(Path(args.resume) / "config.yaml"), args.resume
    config = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else ROOT / "runs" / time.strftime("run-%Y%m%d-%H%M%S")
    if not args.resume and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"run directory {out} already exists and is not empty: choose another --out")
    federation = load_federation(config)
    for note in federation.dataset.notes:
        print(f"note: {note}")
    print(hospital_table([s.train_y for s in federation.shards], federation.dataset.class_names,
                         [s.name for s in federation.shards]))
    print(f"Central test set: {len(federation.test_y)} examples; input {federation.dataset.input_shape}, "
          f"{federation.dataset.num_classes} classes.")
    return config, to_dict(config), out


def run(config, resolved: dict, out: Path, resume: bool = False) -> None:
    """Start Flower's simulation engine with the project's apps and the resolved config."""
    # run_simulation() cannot pass a run config; its private twin can (pinned: flwr 1.42.0).
    from flwr.app import Context, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    run_config = {"config-json": json.dumps(resolved), "run-dir": str(out), "config-path": ""}
    if resume:
        run_config["resume-dir"] = str(out)
    run_id = int.from_bytes(os.urandom(7), "big")
    flower_run = Run.create_empty(run_id=run_id)
    flower_run.override_config = run_config
    flower_run.primary_task_id = int.from_bytes(os.urandom(7), "big")
    flower_run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    server_context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    cpus = os.cpu_count() or 1
    backend = {
        "init_args": {"num_cpus": cpus, "logging_level": "ERROR", "log_to_driver": False, "include_dashboard": False},
        "client_resources": {"num_cpus": config.simulation.cpus_per_client, "num_gpus": 0.0},
    }
    # Flower's own log repeats what our round lines say; keep its warnings and errors.
    logging.getLogger("flwr").setLevel(logging.WARNING)
    _run_simulation(
        num_supernodes=config.hospitals,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        # Loaded from the project directory as `flwr run` would, so each simulated
        # hospital's context gets the run config (pyproject defaults + our overrides).
        client_app_attr="client.client_app:app",
        server_app_attr="server.server_app:app",
        is_app=True,
        backend_config=backend,
        app_dir=str(ROOT),
        run=flower_run,
        server_app_context=server_context,
    )


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config, resolved, out = prepare(args)
        print(f"Simulating {config.hospitals} hospitals for up to {config.rounds} rounds "
              f"(DP-SGD: noise multiplier {config.dp.noise_multiplier}, clip {config.dp.l2_norm_clip}, "
              f"batch {config.train.batch_size}; budget epsilon {config.privacy.max_epsilon} at delta {config.privacy.delta:g})",
              flush=True)
        run(config, resolved, out, resume=bool(args.resume))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the run directory and odometers keep what was written", file=sys.stderr)
        return 130
    status = out / "status.json"  # the ServerApp's verdict: 0, 1 (failed or rejected hospitals) or 130
    return json.loads(status.read_text()).get("exit_code", 1) if status.is_file() else 1


if __name__ == "__main__":
    sys.exit(main())
