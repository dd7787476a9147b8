"""FedAvg that validates every reply before it changes anything, keeps the privacy ledger and
knows who failed, who was rejected and who can still train.

Order of business for each training reply (validate before you mutate):
1. a Flower-level error becomes a named failure with a category (`failure_category`);
2. the privacy record is read completely (server/replies.py) and checked against what this
   coordinator knows: the node's bound name, the hospital's declared example count, its
   noise multiplier, delta and budget, and the epsilon recomputed from its events;
3. only then is the record appended to the ledger, and the update checked (shapes, finite
   values, distance from the global model) before it may be averaged.
A reply that fails step 2 is rejected: written to `rejected.jsonl`, named in the round's
line, and kept out of the ledger (its privacy record cannot be trusted).
"""
from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg
from flwr.serverapp.strategy import FedAvg

from common.config import HOSPITAL_NAME
from common.privacy import PrivacyEvent, compute_ahead, epsilon
from common.sampling import steps_for
from common.eval_privacy import federated_scores, scores
from server.eval_replies import EvaluationReport, read_evaluation
from server.ledger import EVALUATION_LEDGER, EvaluationLedger, PrivacyLedger, added_events
from server.replies import (PrivacyReport, Rejected, RoundPlan, distance, read_privacy, read_weights,
                            update_bound)

log = logging.getLogger("hospital_fl")

EPSILON_REL_TOL = 1e-6  # the coordinator runs the same accountant: figures agree to ~1e-12
TRIM_FRACTION = 0.2  # trimmed_mean drops this share of values at each end, per coordinate
CATEGORIES = ("data", "budget", "settings", "odometer", "internal", "out of memory", "crash", "timeout")


def _own_report(msg: Message) -> tuple[str, str] | None:
    """(category, hospital name) of a ClientApp's own error text `category[: name]`, or None."""
    category, _, name = (msg.error.reason or "").strip().partition(": ")
    if category.lower() in CATEGORIES and (not name or HOSPITAL_NAME.fullmatch(name)):
        return category.lower(), name
    return None


def failure_name(msg: Message) -> str:
    """The hospital name a failed reply gives for itself ("" when none)."""
    own = _own_report(msg) if msg.has_error() else None
    return own[1] if own else ""


def failure_category(msg: Message) -> str:
    """A fixed category for a failed reply; the reason text itself goes to run.log only."""
    reason = (msg.error.reason or "").strip()
    own = _own_report(msg)
    if own is not None:  # a ClientApp that reports its own category
        return own[0]
    lowered = reason.lower()
    # A simulated hospital's Ray worker that died (killed, segfault): Ray's text lists the OOM
    # killer among possible causes, so this comes before the memory words. Ray's own memory
    # monitor raises OutOfMemoryError instead, which stays "out of memory".
    if "actordiederror" in lowered or "rayactorerror" in lowered:
        return "crash"
    if any(word in lowered for word in ("memoryerror", "out of memory", "resourceexhausted", "oom")):
        return "out of memory"
    if msg.error.code == ErrorCode.CLIENT_APP_CRASHED:
        return "crash"
    if msg.error.code in (ErrorCode.NODE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
                          ErrorCode.MESSAGE_UNAVAILABLE):
        return "timeout"
    if "odometer" in lowered:
        return "odometer"
    if "budget" in lowered:
        return "budget"
    if "usererror" in lowered or "data" in lowered:
        return "data"
    return "internal"


@dataclass
class RoundOutcome:
    """Who trained, failed or was rejected in one round (labels are names or `node <id>`)."""

    trained: list[str] = field(default_factory=list)
    declined: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # label -> category
    rejected: dict[str, str] = field(default_factory=dict)  # label -> reason
    averaged: int = 0
    updated: bool = False


class PrivateFedAvg(FedAvg):
    """FedAvg (or a robust aggregate) over validated updates; every accepted privacy record ledgered."""

    def __init__(self, ledger: PrivacyLedger, plan: RoundPlan, rejected_path: str | Path,
                 aggregator: str = "fedavg", min_hospitals: int = 1,
                 evaluation_ledger: EvaluationLedger | None = None, num_classes: int = 2, **kwargs):
        super().__init__(**kwargs)
        # The evaluation half of the ledger (beside the training ledger unless given) and the
        # global model's class count, which every evaluation reply's counts must match.
        self.evaluation_ledger = evaluation_ledger or EvaluationLedger(Path(ledger.path).with_name(EVALUATION_LEDGER))
        self.num_classes = max(2, int(num_classes))
        self.evaluation_lines: list[str] = []  # one line per hospital that declined or was rejected this round
        self.ledger = ledger
        self.plan = plan
        self.rejected_path = Path(rejected_path)
        self.aggregator = aggregator
        self.min_hospitals = min_hospitals
        self.reference: list[np.ndarray] = []  # the global weights sent this round
        self.sent_to: list[int] = []  # node ids asked to train this round
        self.connected: set[int] | None = None  # node ids online when the round was configured
        self.sent_messages: list[Message] = []
        self.round_evaluation: dict[str, dict] = {}  # per-hospital federated evaluation scores
        self.last_outcome = RoundOutcome()
        # Strategy state (checkpointed; see `state` / `restore`).
        self.can_train: dict[str, bool] = {}  # each hospital's last word on its budget
        self.declined_at: dict[str, float] = {}  # epsilon a declined round would have reached
        self.node_names: dict[str, str] = {}  # Flower node id -> the first name it used
        self.declared: dict[str, int] = {}  # hospital -> num-examples of its first reply this run
        self.noise: dict[str, float] = {}  # hospital -> noise multiplier of its first reply this run
        self.unledgered: dict[str, list[int]] = {}  # hospital -> rounds it was asked but left no record
        self.failed: dict[str, str] = {}  # label -> last failure category
        self.rejected: dict[str, str] = {}  # label -> last rejection reason
        self.excluded: dict[str, str] = {}  # Flower node id -> why it is not asked to train again this run
        self.eval_declined: dict[str, float] = {}  # hospital -> evaluation epsilon when it declined evaluation
        self.eval_noise: dict[str, float] = {}  # hospital -> its evaluation sigma this run

    # ------------------------------------------------------------------ state

    def state(self) -> dict:
        return {name: getattr(self, name) for name in
                ("can_train", "declined_at", "node_names", "declared", "noise", "unledgered", "failed", "rejected",
                 "excluded", "eval_declined", "eval_noise")}

    def restore(self, state: dict, keep_nodes: bool) -> None:
        """Continue from a checkpoint; node bindings only where node ids survive (deployment)."""
        for name, value in state.items():
            if name in ("node_names", "excluded") and not keep_nodes:
                continue
            setattr(self, name, value)

    def name_nodes(self, names: dict[int, str]) -> list[str]:
        """Bind the names hospitals gave in their privacy plans, as a first reply would.

        A name claimed by two nodes, or already another node's, binds neither, and those nodes
        are not asked to train: every update one of them sent would be rejected after its
        hospital had paid for it. Returns a line for each node left out."""
        claims = Counter(names.values())
        lines = []
        for node, name in names.items():
            taken = any(bound == name for other, bound in self.node_names.items() if other != str(node))
            if claims[name] == 1 and not taken:
                self.node_names.setdefault(str(node), name)
                continue
            self._exclude(node, f"its hospital-id {name} is also another node's")
            lines.append(f"  node {node} is not asked to train: its hospital-id {name} is also another node's "
                         "(give each SuperNode its own hospital-id, then start a new run)")
        return lines

    def _exclude(self, node: int, reason: str) -> None:
        self.excluded.setdefault(str(node), reason)

    def label(self, node_id: int, failed: Message | None = None) -> str:
        """The node's hospital name; for a node not yet bound, the name its own error reply gives, if free."""
        if str(node_id) in self.node_names:
            return self.node_names[str(node_id)]
        claimed = failure_name(failed) if failed is not None else ""
        if claimed and claimed not in self.node_names.values():
            return claimed
        return f"node {node_id}"

    # ------------------------------------------------------------------ sending

    def configure_train(self, server_round, arrays, config, grid):
        """Ask every connected node (a share of them with fraction_train); never wait here."""
        self.reference = arrays.to_numpy_ndarrays()
        connected = sorted(grid.get_node_ids())
        self.connected = set(connected)
        nodes = [node for node in connected if str(node) not in self.excluded]
        count = max(1, int(len(nodes) * self.fraction_train)) if nodes else 0
        self.sent_to = sorted(np.random.default_rng(server_round).choice(nodes, count, replace=False).tolist()) \
            if count < len(nodes) else nodes
        config["server-round"] = server_round
        # Kept: pushing gives each message its id, which the SuperLink's own error replies
        # (a node that went away) name instead of the node.
        self.sent_messages = list(self._construct_messages(
            RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config}), self.sent_to, MessageType.TRAIN))
        return self.sent_messages

    def configure_evaluate(self, server_round, arrays, config, grid):
        """Ask every connected node that has not declined evaluation this run.

        `config` carries the coordinator's run id and `planned-evaluations` (this one and the
        rest the run plans): each hospital plans its evaluation noise from it."""
        if self.fraction_evaluate == 0.0:
            return []
        declined = {node for node, name in self.node_names.items() if name in self.eval_declined}
        nodes = [node for node in sorted(grid.get_node_ids())
                 if str(node) not in self.excluded and str(node) not in declined]
        config["server-round"] = server_round
        return self._construct_messages(RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config}),
                                        nodes, MessageType.EVALUATE)

    # ------------------------------------------------------------------ receiving

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        outcome = RoundOutcome()
        accepted: list[tuple[list[np.ndarray], int]] = []
        seen_nodes: set[int] = set()
        seen_names: set[str] = set()
        for msg in replies:
            node = self._sender(msg)
            if node in seen_nodes or node not in self.sent_to:
                self._reject(outcome, server_round, self.label(node), "a second or unrequested reply this round")
                continue
            seen_nodes.add(node)
            if msg.has_error():
                category = failure_category(msg)
                outcome.failed[self.label(node, msg)] = category
                self._note_missing(node, server_round)
                log.info("round %d: %s failed (%s): code %s, %s", server_round, self.label(node, msg), category,
                         msg.error.code, msg.error.reason)
                continue
            try:
                report = self._checked_privacy(msg, node, seen_names)
            except Rejected as why:
                self._reject(outcome, server_round, self.label(node), str(why))
                self._note_missing(node, server_round)
                continue
            seen_names.add(report.hospital)
            self._commit(server_round, node, report)
            if report.status != "trained":
                outcome.declined.append(report.hospital)
                continue
            try:
                weights = read_weights(msg.content, self.reference)
                self._check_distance(report, weights)
            except Rejected as why:
                self._reject(outcome, server_round, report.hospital, str(why))
                continue
            outcome.trained.append(report.hospital)
            accepted.append((weights, min(report.num_examples, self.declared[report.hospital])))
        for node, name in self.node_names.items():  # a known hospital whose node went away
            if self.connected is not None and int(node) not in self.connected:
                # Named, but not noted as possibly charged: nothing was sent to it this round, so
                # a charge its next reply shows belongs to a round it was asked to train.
                outcome.failed[name] = "timeout"
                log.info("round %d: %s's node is not connected", server_round, name)
        for node in self.sent_to:
            if node not in seen_nodes:
                outcome.failed[self.label(node)] = "timeout"
                self._note_missing(node, server_round)
                log.info("round %d: %s sent no reply within the round's timeout", server_round, self.label(node))
        self.failed.update(outcome.failed)
        self.last_outcome = outcome
        outcome.averaged = len(accepted)
        if len(accepted) < max(1, self.min_hospitals):
            return None, MetricRecord({"hospitals-trained": len(accepted)})
        outcome.updated = True
        return ArrayRecord(self._aggregate(accepted)), MetricRecord({"hospitals-trained": len(accepted)})

    def _sender(self, msg: Message) -> int:
        """The node a reply speaks for: its source, or for the SuperLink's error replies the node asked."""
        node = int(msg.metadata.src_node_id)
        if node == SUPERLINK_NODE_ID:
            for sent in self.sent_messages:
                if sent.metadata.message_id and sent.metadata.message_id == msg.metadata.reply_to_message_id:
                    return int(sent.metadata.dst_node_id)
        return node

    def _checked_privacy(self, msg: Message, node: int, seen_names: set[str]) -> PrivacyReport:
        """The reply's privacy record, consistent with everything known so far, or Rejected."""
        report = read_privacy(msg.content, self.plan)
        name = report.hospital
        bound = self.node_names.get(str(node))
        if bound is not None and bound != name:  # a named node lying: keep asking, keep rejecting, keep naming
            raise Rejected(f"node {node} is {bound}; it may not reply as another hospital")
        owner = next((n for n, h in self.node_names.items() if h == name), None)
        if owner is not None and owner != str(node):
            # Most likely two SuperNodes configured with one hospital-id: this one would pay for every
            # further update and have it rejected, so it is not asked again.
            self._exclude(node, f"its hospital-id {name} belongs to another node")
            raise Rejected(f"the name {name} belongs to another node (not asked again this run: give each "
                           "SuperNode its own hospital-id)")
        if name in seen_names:
            raise Rejected(f"a second reply as {name} this round")
        declared = self.declared.get(name)
        if declared is not None and report.num_examples > declared:
            raise Rejected(f"'num-examples' {report.num_examples} exceeds the {declared} it declared first")
        sigma = self.noise.get(name)
        if sigma is not None and report.event.noise_multiplier != sigma:
            raise Rejected(f"'noise-multiplier' changed from {sigma:g} to {report.event.noise_multiplier:g} within a run")
        first = self.ledger.first(name)
        if first is not None:
            for key, value in (("delta", report.delta), ("max_epsilon", report.max_epsilon)):
                if value != first[key]:
                    raise Rejected(f"'{key.replace('_', '-')}' changed from {first[key]:g} to {value:g}")
            if report.unit != first.get("unit", "image"):
                raise Rejected(f"'unit' changed from {first.get('unit', 'image')} to {report.unit}")
        self._check_epsilon(report, self._missing_rounds(name, node))
        return report

    def _added_prior(self, report: PrivacyReport) -> list[PrivacyEvent]:
        """Prior events the reply carries beyond those the ledger holds (one accounting view).

        A hospital's prior events are every charge its odometer counts but its own rounds of
        this run: they can grow during a run (a concurrent run on the same odometer, a shard
        sharing images) and are then ledgered where they first appear, never shrink."""
        if self.ledger.first(report.hospital) is None:
            return []  # the first record carries them all as prior_events
        added = added_events(list(report.prior_events), self.ledger.known_prior(report.hospital))
        if added is None:
            raise Rejected("'prior-events' lacks events this hospital reported before: an odometer only grows")
        return added

    def _history(self, report: PrivacyReport) -> list[PrivacyEvent]:
        """Everything the ledger holds for this hospital with what the reply adds (or the reply's prior, if new)."""
        if self.ledger.first(report.hospital) is None:
            return list(report.prior_events)
        return self.ledger.history(report.hospital) + self._added_prior(report)

    def _missing_rounds(self, name: str, node: int) -> list[int]:
        """Rounds this hospital (or its node, before its name was known) left without a record."""
        return sorted(self.unledgered.get(name, []) + self.unledgered.get(f"node {node}", []))

    def _check_epsilon(self, report: PrivacyReport, missing: list[int]) -> None:
        """Recompute the reply's epsilon; a lower claim is forged, a higher one must be explained."""
        history = self._history(report)
        expected = epsilon(history + [report.event], report.delta)
        if _close(report.epsilon, expected):
            self._lost = 0
            if report.can_train_again and report.event.steps > 0:
                # Its next reply, if it runs the same mechanism again, recomputes to this figure.
                compute_ahead(history + [report.event, report.event], report.delta)
            return
        if report.epsilon < expected:
            raise Rejected(f"'epsilon' {report.epsilon:.6g} is below {expected:.6g} recomputed from its events")
        # More spend than the ledger knows: charges of rounds whose replies failed or were
        # rejected. Each was one round of the same mechanism; find how many explain it.
        round_event = PrivacyEvent(report.event.noise_multiplier, report.event.sampling_rate,
                                   steps_for(self.plan.local_epochs, report.event.sampling_rate))
        for lost in range(1, len(missing) + 1):
            if _close(report.epsilon, epsilon(history + [round_event] * lost + [report.event], report.delta)):
                self._lost = lost
                return
        raise Rejected(f"'epsilon' {report.epsilon:.6g} does not recompute from its events ({expected:.6g})")

    def _commit(self, server_round: int, node: int, report: PrivacyReport) -> None:
        """The reply passed: bind its name, then ledger any lost rounds and this record."""
        name = report.hospital
        self.node_names.setdefault(str(node), name)
        self.declared.setdefault(name, report.num_examples)
        self.noise.setdefault(name, report.event.noise_multiplier)
        missing = self._missing_rounds(name, node)
        self.unledgered.pop(name, None)
        self.unledgered.pop(f"node {node}", None)
        prior = [e.to_dict() for e in report.prior_events]  # kept on the hospital's first record only
        added = [e.to_dict() for e in self._added_prior(report)]  # on the first record written now
        if self._lost:
            history = self._history(report)
            round_event = PrivacyEvent(report.event.noise_multiplier, report.event.sampling_rate,
                                       steps_for(self.plan.local_epochs, report.event.sampling_rate))
            for lost_round in missing[-self._lost:]:
                history.append(round_event)
                self.ledger.append(report.ledger_record(lost_round, "lost", epsilon(history, report.delta),
                                                        round_event), prior_events=prior, added_prior_events=added)
                added = []
                log.info("round %d: %s's reply was lost but its charge stands: ledgered as lost", lost_round, name)
        self.ledger.append(report.ledger_record(server_round), prior_events=prior, added_prior_events=added)
        self.can_train[name] = report.can_train_again
        if report.status != "trained":
            self.declined_at[name] = report.epsilon_needed
        self._lost = 0

    _lost = 0  # rounds of lost charges found by the last `_check_epsilon`

    def _check_distance(self, report: PrivacyReport, weights: list[np.ndarray]) -> None:
        parameters = sum(w.size for w in weights)
        bound = update_bound(self.plan, report.event.noise_multiplier, report.event.sampling_rate,
                             report.num_examples, report.event.steps, parameters)
        moved = distance(weights, self.reference)
        if not moved <= bound:
            raise Rejected(f"update moved the weights {moved:.3g}, more than an honest round can ({bound:.3g})")

    def _note_missing(self, node: int, server_round: int) -> None:
        """A round that may have been charged but left no ledger record (kept by name, or by node)."""
        self.unledgered.setdefault(self.label(node), []).append(server_round)

    def _reject(self, outcome: RoundOutcome, server_round: int, label: str, reason: str) -> None:
        outcome.rejected[label] = reason
        self.rejected[label] = reason
        with open(self.rejected_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"round": server_round, "hospital": label, "reason": reason}) + "\n")
        log.info("round %d: %s rejected: %s", server_round, label, reason)

    def _aggregate(self, accepted: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
        """FedAvg weighted by (capped) examples, or an unweighted coordinate-wise robust aggregate."""
        layers = list(zip(*(weights for weights, _ in accepted)))
        dtypes = [layer[0].dtype for layer in layers]
        # The robust aggregates are Flower's own (what FedMedian and FedTrimmedAvg compute); the
        # replies reaching them were validated here first.
        if self.aggregator == "median":
            return [w.astype(d) for w, d in zip(aggregate_median(accepted), dtypes)]
        if self.aggregator == "trimmed_mean":
            return [w.astype(d) for w, d in zip(aggregate_trimmed_avg(accepted, TRIM_FRACTION), dtypes)]
        total = float(sum(examples for _, examples in accepted))
        return [sum(w.astype(np.float64) * (examples / total) for w, (_, examples) in zip(layer, accepted))
                .astype(layer[0].dtype) for layer in layers]

    # ------------------------------------------------------------------ evaluation and status

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Check every evaluation reply, ledger its charge, and score the sum of the noisy counts.

        Validate before you mutate, as for training: the reply is read completely
        (server/eval_replies.py), must come from a bound node under its own name, keep its
        noise, size, unit and delta within the run, and claim exactly the evaluation epsilon
        that its evaluation events recompute to; only then is it ledgered and its counts used.
        A declined reply is ledgered, said in one line (`evaluation_lines`) and its hospital is
        not asked again this run. Scores are post-processing of the noisy counts."""
        self.round_evaluation, self.evaluation_lines = {}, []
        counted: list[tuple[list, list, float]] = []
        seen: set[str] = set()
        for msg in replies:
            node = self._sender(msg)
            name = self.node_names.get(str(node))
            if name is None or msg.has_error() or name in seen:
                if msg.has_error():
                    log.info("round %d: %s failed evaluation (%s)", server_round, self.label(node, msg),
                             failure_category(msg))
                continue
            seen.add(name)
            try:
                report = self._checked_evaluation(msg, name)
            except Rejected as why:
                self._reject_evaluation(server_round, name, str(why))
                continue
            if report.status == "off":
                continue
            self._commit_evaluation(server_round, report)
            if report.status == "declined":
                self.eval_declined[name] = report.epsilon
                self.evaluation_lines.append(
                    f"  {name} declined evaluation (evaluation budget spent: epsilon {report.epsilon:.3f} of "
                    f"{report.max_epsilon:g}); it is not asked again this run")
                continue
            found = scores(report.correct, report.missed, report.num_examples)
            self.round_evaluation[name] = {"num-examples": report.num_examples, **found,
                                           "evaluation_epsilon": report.epsilon,
                                           "noise_multiplier": report.noise_multiplier,
                                           "correct": list(report.correct), "missed": list(report.missed)}
            counted.append((list(report.correct), list(report.missed), report.num_examples))
        if not counted:
            return None
        summary = {key: value for key, value in federated_scores(counted).items() if key != "recall"}
        return MetricRecord(summary)

    def _checked_evaluation(self, msg: Message, name: str) -> EvaluationReport:
        report = read_evaluation(msg.content, self.num_classes)
        if report.hospital != name:
            raise Rejected(f"the node is {name}; it may not reply as another hospital")
        if report.status == "off":
            return report
        first = self.evaluation_ledger.first(name)
        if first is not None:
            for key, value in (("delta", report.delta), ("max_epsilon", report.max_epsilon),
                               ("num_examples", report.num_examples)):
                if value != first[key]:
                    raise Rejected(f"evaluation '{key.replace('_', '-')}' changed from {first[key]:g} to {value:g}")
            if report.unit != first["unit"]:
                raise Rejected(f"evaluation 'unit' changed from {first['unit']} to {report.unit}")
        trained = self.ledger.first(name)
        if trained is not None and report.delta != trained["delta"]:
            raise Rejected(f"evaluation 'delta' {report.delta:g} is not the hospital's delta {trained['delta']:g}")
        sigma = self.eval_noise.get(name)
        if sigma is not None and report.status == "evaluated" and report.noise_multiplier != sigma:
            raise Rejected(f"evaluation 'noise-multiplier' changed from {sigma:g} to {report.noise_multiplier:g} "
                           "within a run")
        expected = epsilon(self._evaluation_history(report) + [report.event], report.delta)
        if not _close(report.epsilon, expected):
            raise Rejected(f"'evaluation-epsilon' {report.epsilon:.6g} does not recompute from its evaluation "
                           f"events ({expected:.6g})")
        return report

    def _evaluation_added(self, report: EvaluationReport) -> list[PrivacyEvent]:
        if self.evaluation_ledger.first(report.hospital) is None:
            return []
        added = added_events(list(report.prior_events), self.evaluation_ledger.known_prior(report.hospital))
        if added is None:
            raise Rejected("evaluation 'prior-events' lacks events this hospital reported before: an odometer only "
                           "grows")
        return added

    def _evaluation_history(self, report: EvaluationReport) -> list[PrivacyEvent]:
        if self.evaluation_ledger.first(report.hospital) is None:
            return list(report.prior_events)
        return self.evaluation_ledger.history(report.hospital) + self._evaluation_added(report)

    def _commit_evaluation(self, server_round: int, report: EvaluationReport) -> None:
        added = [e.to_dict() for e in self._evaluation_added(report)]
        if report.status == "evaluated":
            self.eval_noise.setdefault(report.hospital, report.noise_multiplier)
        self.evaluation_ledger.append(report.ledger_record(server_round),
                                      prior_events=[e.to_dict() for e in report.prior_events],
                                      added_prior_events=added)

    def _reject_evaluation(self, server_round: int, name: str, reason: str) -> None:
        with open(self.rejected_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"round": server_round, "hospital": name, "evaluation": True,
                                     "reason": reason}) + "\n")
        log.info("round %d: %s's evaluation rejected: %s", server_round, name, reason)
        self.evaluation_lines.append(f"  {name}'s evaluation was rejected (details in run.log)")

    def exhausted(self) -> list[str]:
        """Hospitals whose budget cannot cover another round."""
        return sorted(hospital for hospital, can in self.can_train.items() if not can)

    def everyone_exhausted(self, num_hospitals: int) -> bool:
        """True once every hospital has said it cannot afford another round."""
        return len(self.can_train) >= num_hospitals and not any(self.can_train.values())


def _close(reported: float, expected: float) -> bool:
    return math.isclose(reported, expected, rel_tol=EPSILON_REL_TOL, abs_tol=1e-9)
