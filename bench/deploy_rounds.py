"""Seconds per round of a real deployment on loopback: one SuperLink (TLS, node auth), two SuperNodes.

    uv run python -m bench.deploy_rounds                      # 10 rounds of digits, this checkout
    uv run python -m bench.deploy_rounds --repo /tmp/old-copy # the same for another copy of the app

Each hospital holds half of scikit-learn's digits (8x8) in an .npz, as in tests/test_deploy.py.
The figures come from the run's own metrics.jsonl (`seconds` per round, measured by the
ServerApp from sending the round's messages to having aggregated, checkpointed and
ledgered the replies). Prints one JSON line; results in BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


from tests.deploy_helpers import (Deployment, certs_and_keys, digits_hospitals, hospital_processes, parse_json_output,
                                  quiet_env, superlink_argv, supernode_argv, wait_for)

CONNECTION = "bench"


def _hospital_process_pids(deployment: Deployment) -> list[int]:
    """The hospital processes (client/hospital_process.py) that the SuperNodes' ClientApps started."""
    import psutil

    family = set()
    for proc in deployment.procs:
        try:
            root = psutil.Process(proc.popen.pid)
            family |= {root.pid, *(child.pid for child in root.children(recursive=True))}
        except psutil.NoSuchProcess:
            pass
    return sorted(proc.pid for proc in hospital_processes(family))


def run(repo: Path, rounds: int, evaluate: bool, work: Path) -> dict:
    os.environ["HFL_DEPLOY_LOOPBACK"] = "1"
    hospitals = ("h1", "h2")
    load_before = os.getloadavg()[0]  # the machine is shared: say how busy it was
    deployment = Deployment(work)
    try:
        deployment.setup_network(list(hospitals))
        certs, keys = work / "certs", work / "keys"
        certs_and_keys(deployment, certs, keys, hospitals)
        digits_hospitals(work, hospitals)
        config = work / "bench.yaml"
        config.write_text(f"rounds: {rounds}\nhospitals: 2\ndata:\n  source: digits\n"
                          f"train:\n  fraction_evaluate: {1 if evaluate else 0}\n  round_timeout: 600\n")
        deployment.spawn("superlink", superlink_argv(deployment, certs),
                         env=quiet_env({"FLWR_HOME": str(work / "home-superlink")}))
        operator = deployment.write_flower_config(work / "home-operator", CONNECTION, certs / "ca.crt")

        def flwr(*args, timeout=120):
            return deployment.run(["flwr", *args], env=operator, timeout=timeout, cwd=repo)

        wait_for(lambda: deployment.port_open(deployment.link_host, deployment.link_port), 60, 0.5, "the SuperLink")
        for result in deployment.run_many(
                [["flwr", "supernode", "register", str(keys / f"{n}.pub"), CONNECTION, "--name", n, "--format", "json"]
                 for n in hospitals], env=operator, timeout=120):
            assert parse_json_output(result.stdout).get("success"), result.stdout + result.stderr
        for name in hospitals:
            node_config = (f'hospital-id="{name}" data-source="npz" data-path="{work / name}.npz" '
                           f'max-epsilon=8.0 delta=1e-5 odometer-path="{work / name}-odometer.jsonl"')
            deployment.spawn(name, supernode_argv(deployment, certs / "ca.crt", keys / f"{name}.key", node_config),
                             env=quiet_env({"FLWR_HOME": str(work / f"home-{name}")}))
        run_dir = work / "run"
        started_at = time.monotonic()
        started = flwr("run", str(repo), CONNECTION, "--format", "json", "--run-config",
                       f'run-dir="{run_dir}" config-path="{config}"')
        run_id = parse_json_output(started.stdout).get("run-id")
        assert run_id, started.stdout + started.stderr

        def ended():  # the run's own status file: a `flwr ls` every few seconds would cost a core
            try:
                return json.loads((run_dir / "status.json").read_text()).get("state") in ("finished", "failed")
            except (OSError, ValueError):
                return False

        def finished():
            listed = parse_json_output(flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json").stdout)
            status = listed["runs"][0]["status"] if listed.get("runs") else ""
            return status if status.startswith("finished") else ""

        wait_for(ended, 120 + 120 * rounds, 1, "the run to write its final status")
        status = wait_for(finished, 120, 2, "Flower to report the run finished")
        wall = time.monotonic() - started_at
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        seconds = [float(r["seconds"]) for r in rows if "seconds" in r]
        processes = _hospital_process_pids(deployment)
    finally:
        deployment.close()
    return {"status": status, "rounds": len(seconds), "seconds_per_round": [round(s, 2) for s in seconds],
            "first_round_s": round(seconds[0], 2) if seconds else None,
            "median_later_rounds_s": round(statistics.median(seconds[1:]), 2) if len(seconds) > 1 else None,
            "mean_s": round(statistics.fmean(seconds), 2) if seconds else None,
            "wall_s_from_flwr_run": round(wall, 1), "hospital_processes_during_run": len(processes),
            "load_average_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
            "evaluate": evaluate, "repo": str(repo), "cpus": os.cpu_count(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.deploy_rounds", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the app to submit with flwr run (default: this checkout)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of the run (default 10)")
    parser.add_argument("--evaluate", action="store_true", help="also evaluate on every hospital each round")
    parser.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.work is None:
        with tempfile.TemporaryDirectory(prefix="hfl-bench-") as work:
            result = run(args.repo.resolve(), args.rounds, args.evaluate, Path(work))
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        result = run(args.repo.resolve(), args.rounds, args.evaluate, args.work.resolve())
    print(json.dumps(result))
    return 0 if result["status"] == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
