"""FedAvg that checks every reply, keeps the privacy ledger and knows when budgets are spent."""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Message, MetricRecord
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from server.ledger import PrivacyLedger

log = logging.getLogger("hospital_fl")


def reply_problem(content, reference: list[np.ndarray]) -> str | None:
    """Why a training reply cannot be averaged (shapes, dtypes, finite values), or None."""
    if "arrays" not in content or "metrics" not in content:
        return "reply lacks weights or metrics"
    arrays = content["arrays"].to_numpy_ndarrays()
    if len(arrays) != len(reference):
        return f"{len(arrays)} weight tensors instead of {len(reference)}"
    for index, (got, want) in enumerate(zip(arrays, reference)):
        if got.shape != want.shape or got.dtype != want.dtype:
            return f"tensor {index} is {got.dtype}{got.shape}, expected {want.dtype}{want.shape}"
        if not np.all(np.isfinite(got)):
            return f"tensor {index} has non-finite values"
    examples = content["metrics"].get("num-examples", 0)
    if not examples or examples <= 0:
        return "num-examples must be positive"
    return None


class PrivateFedAvg(FedAvg):
    """FedAvg weighted by examples; replies that declined (budget spent) are recorded, not averaged."""

    def __init__(self, ledger: PrivacyLedger, **kwargs):
        super().__init__(**kwargs)
        self.ledger = ledger
        self.reference: list[np.ndarray] = []  # the global weights sent this round
        self.can_train: dict[str, bool] = {}  # each hospital's last word on its budget
        self.declined_at: dict[str, float] = {}  # epsilon a declined round would have reached
        self.round_evaluation: dict[str, dict] = {}  # per-hospital federated evaluation scores

    def configure_train(self, server_round, arrays, config, grid):
        self.reference = arrays.to_numpy_ndarrays()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        averaged, rejected = [], []
        for msg in replies:
            if msg.has_error():
                log.warning("round %d: a hospital failed: %s", server_round, msg.error.reason)
                continue
            content = msg.content
            if "privacy" not in content or "metrics" not in content:
                rejected.append("reply without a privacy record")
                continue
            metrics, privacy = content["metrics"], content["privacy"]
            hospital = str(privacy["hospital"])
            trained = privacy["status"] == "trained"
            self._record(server_round, hospital, metrics, privacy)
            self.can_train[hospital] = bool(metrics["can-train-again"])
            if not trained:
                self.declined_at[hospital] = float(metrics["epsilon-needed"])
                continue
            problem = reply_problem(content, self.reference)
            if problem:
                rejected.append(f"{hospital}: {problem}")
                continue
            averaged.append(content)
        for reason in rejected:
            log.warning("round %d: reply rejected, not averaged: %s", server_round, reason)
        if not averaged:
            return None, MetricRecord({"hospitals-trained": 0})
        arrays = aggregate_arrayrecords(averaged, self.weighted_by_key)
        return arrays, MetricRecord({"hospitals-trained": len(averaged)})

    def _record(self, server_round, hospital, metrics, privacy) -> None:
        self.ledger.append(
            {
                "round": server_round,
                "hospital": hospital,
                "status": str(privacy["status"]),
                "noise_multiplier": float(metrics["noise-multiplier"]),
                "sampling_rate": float(metrics["sampling-rate"]),
                "steps": int(metrics["steps"]),
                "sampling": str(privacy["sampling"]),
                "epsilon": float(metrics["epsilon"]),
                "delta": float(metrics["delta"]),
                "max_epsilon": float(metrics["max-epsilon"]),
                "accountant": str(privacy["accountant"]),
                "num_examples": int(metrics["num-examples"]),
            },
            prior_events=json.loads(str(privacy["prior-events"])),
        )

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of each score over the hospitals that evaluated."""
        self.round_evaluation = {}
        for msg in replies:
            if msg.has_error() or "metrics" not in msg.content:
                continue
            metrics = dict(msg.content["metrics"])
            if metrics.get("num-examples", 0) > 0:
                self.round_evaluation[str(msg.content["privacy"]["hospital"])] = metrics
        if not self.round_evaluation:
            return None
        summary = {}
        for key in ("loss", "accuracy", "auc"):
            scored = [m for m in self.round_evaluation.values() if key in m]
            weight = sum(m["num-examples"] for m in scored)
            if weight:
                summary[key] = sum(m[key] * m["num-examples"] for m in scored) / weight
        return MetricRecord(summary)

    def exhausted(self) -> list[str]:
        """Hospitals whose budget cannot cover another round."""
        return sorted(hospital for hospital, can in self.can_train.items() if not can)

    def everyone_exhausted(self, num_hospitals: int) -> bool:
        """True once every hospital has said it cannot afford another round."""
        return len(self.can_train) >= num_hospitals and not any(self.can_train.values())
