"""One run directory: resolved config, per-round metrics, privacy ledger, final model, plots,
the coordinator's log, rejected replies, checkpoints and the run's outcome (status.json)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml

from common.durable import append_line, is_disk_full, replace_file
from common.errors import UserError


STATUS_RESERVE = 4096  # bytes status.json always takes: room to say, on a full disk, why the run stopped


def _overwrite_within_blocks(path: Path, data: bytes) -> bool:
    """Write `data` over `path` in place when it is no longer than the file (padded to its length,
    so no new block is needed); True if done."""
    try:
        size = path.stat().st_size
        if len(data) > size:
            return False
        with open(path, "r+b") as handle:
            handle.write(data.rstrip() + b" " * (size - 1 - len(data.rstrip())) + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        return True
    except OSError:
        return False


class RunDirectory:
    """The files a run writes; a directory that already holds files is never reused."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.ledger = self.path / "privacy_ledger.jsonl"
        self.model = self.path / "model.keras"
        self.accuracy_plot = self.path / "accuracy.png"
        self.log = self.path / "run.log"  # failure details: never on the terminal
        self.rejected = self.path / "rejected.jsonl"  # replies refused before the ledger, with the reason
        self.status = self.path / "status.json"  # the run's outcome (README: "When things fail")
        self.checkpoint = self.path / "checkpoint"
        self.stop_request = self.path / "STOP"  # created by anyone who wants the run to stop after this round
        # True when the hospitals are simulated and take their budgets from config.yaml; False in a
        # deployment, where each hospital's node config sets its own. status.json says which.
        self.simulated: bool | None = None

    @classmethod
    def create(cls, path: str | Path | None) -> "RunDirectory":
        """Make the directory; refuse one that exists and is not empty (nothing is overwritten)."""
        if not path:
            path = Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UserError(f"run directory {path} already exists and is not empty: choose another (simulate.py --out, or the run-config key run-dir)")
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    @classmethod
    def resume(cls, path: str | Path) -> "RunDirectory":
        """An existing run directory to continue; it must hold a checkpoint."""
        run = cls(path)
        if not (run.checkpoint / "state.json").is_file():
            raise UserError(f"cannot resume {run.path}: it holds no checkpoint (checkpoint/state.json); "
                            "pass the run directory of an earlier run")
        return run

    def write_status(self, status: dict) -> None:
        """status.json, replaced atomically (readers never see half a file).

        On a full disk there is no room for the new copy, yet this is the file that must say the
        run stopped for lack of space. So every copy is padded with spaces (which JSON ignores)
        to STATUS_RESERVE bytes, and on a full disk the new content is written over the old in
        place: the same length, so no block is allocated and the file is never cut short."""
        if self.simulated is not None:
            status = status | {"simulated": self.simulated}
        data = json.dumps(status, indent=2).encode()
        data += b" " * (STATUS_RESERVE - 1 - len(data)) + b"\n"
        try:
            replace_file(self.status, data)
        except OSError as error:
            if not (is_disk_full(error) and _overwrite_within_blocks(self.status, data)):
                raise

    def rewrite_metrics(self, records: list[dict]) -> None:
        """metrics.jsonl as exactly `records` (on resume: drop rounds after the checkpoint)."""
        replace_file(self.metrics, "".join(json.dumps(r) + "\n" for r in records).encode())

    def write_config(self, resolved: dict) -> None:
        self.config.write_text(yaml.safe_dump(resolved, sort_keys=False))

    def append_metrics(self, record: dict) -> None:
        """One round's line, whole or not at all (a full disk cuts no line in half; see durable)."""
        append_line(self.metrics, json.dumps(record))

    def read_metrics(self) -> list[dict]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def plot_accuracy(self) -> None:
        """accuracy.png: central and federated accuracy against round (report.md draws epsilon.png)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        metrics = self.read_metrics()
        figure, axis = plt.subplots(figsize=(6, 4))
        rounds = [m["round"] for m in metrics]
        axis.plot(rounds, [m["accuracy"] for m in metrics], marker="o", label="central test set")
        federated = [(m["round"], m["federated_accuracy"]) for m in metrics if "federated_accuracy" in m]
        if federated:
            axis.plot(*zip(*federated), marker="s", linestyle="--", label="hospitals' held-out splits")
        axis.set(xlabel="round", ylabel="accuracy", title="Global model accuracy", ylim=(0, 1))
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        axis.grid(alpha=0.3)
        axis.legend()
        figure.tight_layout()
        figure.savefig(self.accuracy_plot, dpi=120)
        plt.close(figure)


