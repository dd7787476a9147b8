"""The coordinator's side of a round, with real Flower messages and the real accountant.

Each hostile reply from issue 12 is built from an honest one (figures from common/privacy.py,
the same PLD accountant the hospitals use) and handed to PrivateFedAvg.aggregate_train:
it must be rejected and named, leave the ledger as it was, and not stop the round.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from common.privacy import PrivacyEvent, epsilon
from common.sampling import sampling_rate_for, steps_for
from server.ledger import PrivacyLedger
from server.replies import Rejected, RoundPlan, distance, parse_prior_events, update_bound
from server.strategy import PrivateFedAvg

PLAN = RoundPlan(batch_size=32, local_epochs=1.0, learning_rate=0.5, momentum=0.5, l2_norm_clip=1.0)
SIGMA, DELTA, BUDGET = 1.5, 1e-5, 8.0
NODES = {"hospital-0": 101, "hospital-1": 102, "hospital-2": 103}
EXAMPLES = {"hospital-0": 320, "hospital-1": 400, "hospital-2": 500}
PRIOR = [PrivacyEvent(2.0, 0.1, 30)]  # hospital-0 spent some budget before this run


@pytest.fixture(autouse=True)
def task_identity():
    """Messages need a run id; the ServerApp's process sets it, so does this fixture."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _reference():
    rng = np.random.default_rng(0)
    return [rng.normal(size=(5, 4)).astype(np.float32), np.zeros(4, np.float32)]


class _Grid:
    """The one thing configure_train asks of Flower's grid: which nodes are connected."""

    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return self.nodes


class Federation:
    """A strategy, its ledger, and honest hospitals whose spend is tracked like their odometers."""

    def __init__(self, tmp_path, aggregator="fedavg"):
        self.ledger = PrivacyLedger(tmp_path / "privacy_ledger.jsonl")
        self.rejected = tmp_path / "rejected.jsonl"
        self.strategy = PrivateFedAvg(self.ledger, PLAN, self.rejected, aggregator=aggregator, fraction_train=1.0,
                                      fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
        self.strategy.reference = _reference()
        self.spent = {name: [] for name in NODES}  # the hospitals' own odometers
        self.round = 0

    def request(self, name):
        return Message(RecordDict({"config": ConfigRecord({"server-round": self.round})}),
                       dst_node_id=NODES[name], message_type="train")

    def honest(self, name, shift=0.01, charge=True, prior=None):
        """The reply client/client_app.py would send after an honest round."""
        n = EXAMPLES.get(name, 300)
        q = sampling_rate_for(PLAN.batch_size, n)
        event = PrivacyEvent(SIGMA, q, steps_for(PLAN.local_epochs, q))
        if prior is None:
            prior = PRIOR if name == "hospital-0" else []
        if charge:
            self.spent.setdefault(name, []).append(event)
        eps = epsilon(prior + self.spent.get(name, [event]), DELTA)
        weights = [w + shift for w in self.strategy.reference]
        metrics = MetricRecord({"num-examples": n, "epsilon": eps, "delta": DELTA, "max-epsilon": BUDGET,
                                "noise-multiplier": SIGMA, "sampling-rate": q, "steps": event.steps,
                                "budget-exhausted": 0, "can-train-again": 1, "epsilon-needed": eps})
        privacy = ConfigRecord({"hospital": name, "status": "trained", "sampling": "poisson", "accountant": "pld",
                                "unit": "image",
                                "prior-events": json.dumps([e.to_dict() for e in prior])})
        return Message(RecordDict({"metrics": metrics, "privacy": privacy, "arrays": ArrayRecord(weights)}),
                       reply_to=self.request(name))

    def run(self, replies, sent=None):
        self.round += 1
        self.strategy.sent_to = sorted(NODES[n] for n in (sent or NODES))
        arrays, _ = self.strategy.aggregate_train(self.round, replies)
        return arrays, self.strategy.last_outcome

    def rejected_lines(self):
        return [json.loads(line) for line in self.rejected.read_text().splitlines()] if self.rejected.exists() else []


def test_honest_round_is_ledgered_and_averaged(tmp_path):
    fed = Federation(tmp_path)
    arrays, outcome = fed.run([fed.honest(n) for n in NODES])
    assert sorted(outcome.trained) == sorted(NODES) and not outcome.rejected and not outcome.failed
    assert len(fed.ledger.records) == 3
    assert fed.ledger.first("hospital-0")["prior_events"] == [e.to_dict() for e in PRIOR]
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], fed.strategy.reference[0] + 0.01, rtol=1e-5)


def test_an_infinite_cost_of_one_more_round_is_an_honest_answer(tmp_path):
    # A huge budget planned to a tiny sigma: the accountant has no finite epsilon for another round.
    fed = Federation(tmp_path)
    replies = [fed.honest(n) for n in NODES]
    replies[0].content["metrics"]["epsilon-needed"] = math.inf
    _, outcome = fed.run(replies)
    assert sorted(outcome.trained) == sorted(NODES) and not outcome.rejected


def _set(section, key, value):
    def mutate(msg):
        msg.content[section][key] = value
    return mutate


def _drop(section, key):
    def mutate(msg):
        del msg.content[section][key]
    return mutate


def _weights(value):
    def mutate(msg):
        msg.content["arrays"] = ArrayRecord([np.full_like(w, value) for w in msg.content["arrays"].to_numpy_ndarrays()])
    return mutate


HOSTILE = {
    "weights 1e30": (_weights(1e30), "moved the weights"),
    "weights NaN": (_weights(np.nan), "non-finite"),
    "num-examples 1e9": (_set("metrics", "num-examples", 10**9), "sampling-rate"),
    "forged epsilon 0": (_set("metrics", "epsilon", 0.0), "below"),
    "negative epsilon": (_set("metrics", "epsilon", -1.0), "'epsilon'"),
    "over-budget epsilon": (_set("metrics", "epsilon", 1e6), "budget"),
    "infinite epsilon": (_set("metrics", "epsilon", math.inf), "not finite"),
    "sampling-rate 7": (_set("metrics", "sampling-rate", 7.0), "'sampling-rate'"),
    "steps 41.0": (_set("metrics", "steps", 41.0), "'steps' must be an integer"),
    "bogus status": (_set("privacy", "status", "all good"), "'status'"),
    "another hospital's name": (_set("privacy", "hospital", "hospital-1"), "node"),
    "name with control characters": (_set("privacy", "hospital", "h\x1b[2J"), "'hospital'"),
    "missing hospital": (_drop("privacy", "hospital"), "lacks 'hospital'"),
    "missing steps": (_drop("metrics", "steps"), "lacks 'steps'"),
    "missing can-train-again": (_drop("metrics", "can-train-again"), "lacks 'can-train-again'"),
    "missing epsilon-needed": (_drop("metrics", "epsilon-needed"), "lacks 'epsilon-needed'"),
    "epsilon-needed NaN": (_set("metrics", "epsilon-needed", math.nan), "'epsilon-needed' is not finite"),
    "prior-events not JSON": (_set("privacy", "prior-events", "{not json"), "not valid JSON"),
    "prior-events deeply nested": (_set("privacy", "prior-events", "[" * 100000 + "]" * 100000), "JSON"),
    "prior-events with zero noise": (_set("privacy", "prior-events", json.dumps(
        [{"noise_multiplier": 0.0, "sampling_rate": 0.1, "steps": 5, "sampling": "poisson"}])), "noise_multiplier"),
    "noise changed within the run": (_set("metrics", "noise-multiplier", 3.0), "noise-multiplier"),
    "delta changed": (_set("metrics", "delta", 0.5), "delta"),
    "unknown unit": (_set("privacy", "unit", "household"), "'unit'"),
    "unit changed within the run": (_set("privacy", "unit", "patient"), "'unit' changed"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_each_hostile_reply_is_rejected_named_and_the_round_goes_on(tmp_path, case):
    mutate, why = HOSTILE[case]
    fed = Federation(tmp_path)
    fed.run([fed.honest(n) for n in NODES])  # round 1 binds names, declared examples and noise
    before = list(fed.ledger.records)
    hostile = fed.honest("hospital-0")
    mutate(hostile)
    arrays, outcome = fed.run([hostile, fed.honest("hospital-1"), fed.honest("hospital-2")])
    assert list(outcome.rejected) == ["hospital-0"], outcome
    assert why in outcome.rejected["hospital-0"], outcome.rejected
    assert sorted(outcome.trained) == ["hospital-1", "hospital-2"]
    assert arrays is not None  # the others were averaged
    assert [line["hospital"] for line in fed.rejected_lines()] == ["hospital-0"]
    new = fed.ledger.records[len(before):]
    if case in ("weights 1e30", "weights NaN"):
        # The privacy record itself was sound: the spend is ledgered, the update is not averaged.
        assert sorted(r["hospital"] for r in new) == sorted(NODES)
        assert np.all(np.abs(arrays.to_numpy_ndarrays()[0] - fed.strategy.reference[0]) < 1)
    else:
        assert sorted(r["hospital"] for r in new) == ["hospital-1", "hospital-2"]


def test_duplicate_and_unrequested_replies_are_rejected(tmp_path):
    fed = Federation(tmp_path)
    fed.run([fed.honest(n) for n in NODES])
    first, again = fed.honest("hospital-0"), fed.honest("hospital-0", charge=False)
    _, outcome = fed.run([first, again, fed.honest("hospital-1")], sent=["hospital-0", "hospital-1"])
    assert outcome.trained == ["hospital-0", "hospital-1"]
    assert list(outcome.rejected) == ["hospital-0"] and "second" in outcome.rejected["hospital-0"]
    assert sum(r["round"] == 2 for r in fed.ledger.records) == 2


def test_a_new_node_cannot_take_a_bound_name(tmp_path):
    fed = Federation(tmp_path)
    fed.run([fed.honest(n) for n in NODES])
    NODES["hospital-9"] = 109
    try:
        impostor = fed.honest("hospital-9", charge=False)
        impostor.content["privacy"]["hospital"] = "hospital-2"
        _, outcome = fed.run([fed.honest("hospital-2"), impostor], sent=["hospital-2", "hospital-9"])
    finally:
        del NODES["hospital-9"]
    assert outcome.trained == ["hospital-2"]
    assert "belongs to another node" in outcome.rejected["node 109"]
    # Not asked again: each further update of node 109 would be charged on its side and rejected here.
    asked = fed.strategy.configure_train(3, ArrayRecord(fed.strategy.reference), ConfigRecord({}),
                                         _Grid(sorted(NODES.values()) + [109]))
    assert 109 not in [m.metadata.dst_node_id for m in asked] and len(asked) == len(NODES)


def test_failures_are_named_with_a_category_and_a_lost_charge_is_ledgered(tmp_path):
    fed = Federation(tmp_path)
    fed.run([fed.honest(n) for n in NODES])
    # Round 2: hospital-0 was charged, then ran out of memory; hospital-1 never answered.
    fed.spent["hospital-0"].append(fed.spent["hospital-0"][-1])
    oom = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="ResourceExhaustedError: OOM when allocating"),
                  reply_to=fed.request("hospital-0"))
    _, outcome = fed.run([oom, fed.honest("hospital-2")])
    assert outcome.failed == {"hospital-0": "out of memory", "hospital-1": "timeout"}
    assert outcome.trained == ["hospital-2"]
    # Round 3: hospital-0's epsilon includes round 2's charge; the coordinator ledgers it as lost.
    _, outcome = fed.run([fed.honest(n) for n in NODES])
    assert sorted(outcome.trained) == sorted(NODES), outcome
    own = [r for r in fed.ledger.records if r["hospital"] == "hospital-0"]
    assert [(r["round"], r["status"]) for r in own] == [(1, "trained"), (2, "lost"), (3, "trained")]
    history = PRIOR + [PrivacyEvent(r["noise_multiplier"], r["sampling_rate"], r["steps"]) for r in own]
    assert own[-1]["epsilon"] == pytest.approx(epsilon(history, DELTA), rel=1e-9)
    assert sum(r["steps"] for r in own) == sum(e.steps for e in fed.spent["hospital-0"])


def test_error_reply_categories():
    from server.strategy import failure_category

    def reply(code, reason):
        return Message(Error(code=code, reason=reason), reply_to=Message(RecordDict(), dst_node_id=5, message_type="train"))

    assert failure_category(reply(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "data")) == "data"
    assert failure_category(reply(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "settings")) == "settings"
    assert failure_category(reply(ErrorCode.CLIENT_APP_CRASHED, "worker died")) == "crash"
    assert failure_category(reply(ErrorCode.NODE_UNAVAILABLE, "")) == "timeout"
    assert failure_category(reply(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "<class 'MemoryError'>")) == "out of memory"
    # A simulated hospital's Ray worker killed mid-round (Flower 1.42 reports code UNKNOWN with Ray's
    # text, which lists the OOM killer among possible causes): a crash, not "out of memory".
    died = ("<class 'ray.exceptions.ActorDiedError'>:<'The actor died unexpectedly before finishing this task.\n"
            "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit "
            "detail: Worker unexpectedly exits with a connection error code 2. End of file. Some common causes "
            "include: (1) the process was killed by the OOM killer due to high memory usage'>")
    assert failure_category(reply(ErrorCode.UNKNOWN, died)) == "crash"
    assert failure_category(reply(ErrorCode.UNKNOWN, "<class 'ray.exceptions.OutOfMemoryError'>:<'Task was killed "
                                  "due to the node running low on memory.'>")) == "out of memory"
    assert failure_category(reply(ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                  "UserError: privacy odometer /x/h.jsonl line 2 is unreadable")) == "odometer"


def test_median_ignores_one_outlier(tmp_path):
    fed = Federation(tmp_path, "median")
    arrays, _ = fed.run([fed.honest("hospital-0", shift=0.5), fed.honest("hospital-1", shift=0.01),
                         fed.honest("hospital-2", shift=0.02)])
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[1], 0.02, rtol=1e-5)


def test_trimmed_mean_drops_a_fifth_at_each_end(tmp_path):
    fed = Federation(tmp_path, "trimmed_mean")
    updates = [([np.full(3, value, np.float32)], 100) for value in (-50.0, 1.0, 2.0, 3.0, 1e6)]
    (got,) = fed.strategy._aggregate(updates)
    np.testing.assert_allclose(got, 2.0)
    fed.strategy.aggregator = "fedavg"  # weighted by examples: the outlier dominates
    (got,) = fed.strategy._aggregate(updates)
    assert got[0] > 1e5


def test_prior_events_parser_refuses_bad_shapes():
    assert parse_prior_events("[]") == ()
    for text in ('{"a": 1}', '[1]', '[{"noise_multiplier": 1, "sampling_rate": 2, "steps": 1, "sampling": "poisson"}]',
                 '[{"noise_multiplier": 1, "sampling_rate": 0.1, "steps": 1e400, "sampling": "poisson"}]',
                 '[{"noise_multiplier": 1, "sampling_rate": 0.1, "steps": 1, "sampling": "shuffle"}]'):
        with pytest.raises(Rejected):
            parse_prior_events(text)


def test_update_bound_holds_for_a_real_dp_sgd_round():
    """An honest DP-SGD round (common/dp_sgd.py, real noise) stays inside the bound; 1e30 does not."""
    from sklearn.datasets import load_digits

    from common.dp_sgd import DPSGDEngine
    from common.model import build_model

    digits = load_digits()
    x = (digits.images[:300, :, :, None] / 16).astype(np.float32)
    y = digits.target[:300].astype(np.int64)
    model = build_model((8, 8, 1), 10, [4], 8, "tanh")
    before = [w.copy() for w in model.get_weights()]
    plan = RoundPlan(batch_size=30, local_epochs=1.0, learning_rate=0.5, momentum=0.9, l2_norm_clip=1.0)
    q = sampling_rate_for(plan.batch_size, len(y))
    steps = steps_for(plan.local_epochs, q)
    engine = DPSGDEngine(model, l2_norm_clip=1.0, noise_multiplier=0.8, learning_rate=0.5, momentum=0.9)
    engine.train(x, y, sampling_rate=q, steps=steps)
    moved = distance(model.get_weights(), before)
    bound = update_bound(plan, 0.8, q, len(y), steps, sum(w.size for w in before))
    assert 0 < moved <= bound
    assert distance([np.full_like(w, 1e30) for w in before], before) > bound


def test_a_charge_lost_before_the_name_was_known_is_ledgered_with_the_prior_spend(tmp_path):
    fed = Federation(tmp_path)
    # Round 1: hospital-0 was charged, then crashed before its name ever reached the coordinator.
    fed.spent["hospital-0"].append(PrivacyEvent(SIGMA, sampling_rate_for(32, 320), steps_for(1.0, sampling_rate_for(32, 320))))
    crash = Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason="killed"), reply_to=fed.request("hospital-0"))
    _, outcome = fed.run([crash, fed.honest("hospital-1"), fed.honest("hospital-2")])
    assert outcome.failed == {"node 101": "crash"}
    _, outcome = fed.run([fed.honest(n) for n in NODES])
    assert sorted(outcome.trained) == sorted(NODES), outcome
    own = [r for r in fed.ledger.records if r["hospital"] == "hospital-0"]
    assert [(r["round"], r["status"]) for r in own] == [(1, "lost"), (2, "trained")]
    assert own[0]["prior_events"] == [e.to_dict() for e in PRIOR]
    assert own[1]["epsilon"] == pytest.approx(epsilon(PRIOR + fed.spent["hospital-0"], DELTA), rel=1e-9)


def test_names_from_the_privacy_plans_name_a_hospital_that_fails_before_it_ever_trains(tmp_path):
    fed = Federation(tmp_path)
    # Plans came from every node; 104 and 105 both claimed "hospital-9", so neither is bound.
    left_out = fed.strategy.name_nodes({101: "hospital-0", 102: "hospital-1", 103: "hospital-2", 104: "hospital-9",
                                        105: "hospital-9"})
    assert [fed.strategy.label(n) for n in (101, 104, 105)] == ["hospital-0", "node 104", "node 105"]
    # Neither claimant is asked to train: whichever replied second would pay for a rejected update.
    assert len(left_out) == 2 and all("hospital-id hospital-9 is also another node's" in line for line in left_out)
    asked = fed.strategy.configure_train(1, ArrayRecord(fed.strategy.reference), ConfigRecord({}), _Grid([101, 102, 103, 104, 105]))
    assert sorted(m.metadata.dst_node_id for m in asked) == [101, 102, 103]
    fed.strategy.reference = _reference()
    fed.spent["hospital-0"].append(PrivacyEvent(SIGMA, sampling_rate_for(32, 320), steps_for(1.0, sampling_rate_for(32, 320))))
    crash = Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason="killed"), reply_to=fed.request("hospital-0"))
    _, outcome = fed.run([crash, fed.honest("hospital-1"), fed.honest("hospital-2")])
    assert outcome.failed == {"hospital-0": "crash"}
    # Bound by its plan as by a first reply: another node may not then take the name.
    assert fed.strategy.name_nodes({106: "hospital-1"})  # left out too
    assert fed.strategy.label(106) == "node 106"
    _, outcome = fed.run([fed.honest(n) for n in NODES])
    assert sorted(outcome.trained) == sorted(NODES), outcome
    own = [r for r in fed.ledger.records if r["hospital"] == "hospital-0"]
    assert [(r["round"], r["status"]) for r in own] == [(1, "lost"), (2, "trained")]


def test_the_superlinks_error_reply_for_a_vanished_node_names_that_node(tmp_path):
    """Flower's SuperLink answers for a node that went away, from its own node id (1)."""
    fed = Federation(tmp_path)
    fed.run([fed.honest(n) for n in NODES])
    asked = fed.request("hospital-2")
    asked.metadata.__dict__["_message_id"] = "m-42"  # set by the grid when it pushes the message
    fed.strategy.sent_messages = [asked]
    lost = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="node unavailable"), reply_to=asked)
    lost.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
    assert lost.metadata.reply_to_message_id == "m-42" and lost.metadata.src_node_id == SUPERLINK_NODE_ID
    _, outcome = fed.run([fed.honest("hospital-0"), fed.honest("hospital-1"), lost])
    assert outcome.failed == {"hospital-2": "timeout"} and not outcome.rejected, outcome


def test_a_charge_lost_before_a_node_went_away_is_ledgered_under_the_round_it_was_asked(tmp_path):
    """Charged in round 2, then gone (round 3 is not sent to it), back in round 4."""
    fed = Federation(tmp_path)
    fed.run([fed.honest(n) for n in NODES])
    fed.honest("hospital-2")  # round 2: charged, but its reply never arrives
    fed.strategy.connected = set(NODES.values())
    _, outcome = fed.run([fed.honest("hospital-0"), fed.honest("hospital-1")])
    assert outcome.failed == {"hospital-2": "timeout"}
    fed.strategy.connected = {NODES["hospital-0"], NODES["hospital-1"]}  # round 3: its node is not connected
    _, outcome = fed.run([fed.honest("hospital-0"), fed.honest("hospital-1")], sent=["hospital-0", "hospital-1"])
    assert outcome.failed == {"hospital-2": "timeout"}
    fed.strategy.connected = set(NODES.values())  # round 4: back, its reply shows round 2's charge
    _, outcome = fed.run([fed.honest(n) for n in NODES])
    assert sorted(outcome.trained) == sorted(NODES) and not outcome.rejected, outcome
    own = [(r["round"], r["status"]) for r in fed.ledger.records if r["hospital"] == "hospital-2"]
    assert own == [(1, "trained"), (2, "lost"), (4, "trained")]


def test_with_batch_size_auto_the_coordinator_expects_each_hospitals_own_batch(tmp_path):
    global PLAN
    saved = PLAN
    PLAN = RoundPlan(batch_size="auto", local_epochs=1.0, learning_rate=0.5, momentum=0.5, l2_norm_clip=1.0)
    try:
        fed = Federation(tmp_path)
        honest = [fed.honest(n) for n in NODES]  # q = the auto batch (64 for 320, 400 and 500) over n
        assert honest[0].content["metrics"]["sampling-rate"] == 64 / 320
        arrays, outcome = fed.run(honest)
        assert sorted(outcome.trained) == sorted(NODES) and not outcome.rejected
        # A hospital claiming batch 32 over 400 examples (q 0.08) under "auto" is refused.
        (tmp_path / "two").mkdir()
        fed2 = Federation(tmp_path / "two")
        lying = fed2.honest("hospital-1")
        lying.content["metrics"]["sampling-rate"] = 32 / 400
        _, outcome = fed2.run([lying], sent=["hospital-1"])
        assert outcome.rejected == {"node 102": "'sampling-rate' 0.08 is not batch_size/num-examples = 0.16"}
    finally:
        PLAN = saved


def test_prior_spend_that_appears_during_the_run_is_ledgered_where_it_appears_and_recomputes(tmp_path):
    """One accounting view: a concurrent run charges hospital-1's odometer between its rounds."""
    fed = Federation(tmp_path)
    fed.run([fed.honest(n) for n in NODES])
    concurrent = [PrivacyEvent(1.1, 0.08, 13), PrivacyEvent(1.1, 0.08, 13)]
    _, outcome = fed.run([fed.honest("hospital-0"), fed.honest("hospital-1", prior=concurrent),
                          fed.honest("hospital-2")])
    assert sorted(outcome.trained) == sorted(NODES) and not outcome.rejected, outcome
    own = [r for r in fed.ledger.records if r["hospital"] == "hospital-1"]
    assert "added_prior_events" not in own[0] and own[1]["added_prior_events"] == [e.to_dict() for e in concurrent]
    assert own[1]["epsilon"] == pytest.approx(epsilon(concurrent + fed.spent["hospital-1"], DELTA), rel=1e-9)
    assert fed.ledger.history("hospital-1") == concurrent + fed.spent["hospital-1"]
    # Round 3: the same prior again adds nothing; a reply that drops one of them is not an odometer's.
    _, outcome = fed.run([fed.honest(n, prior=concurrent if n == "hospital-1" else None) for n in NODES])
    assert not outcome.rejected and "added_prior_events" not in fed.ledger.records[-2]
    _, outcome = fed.run([fed.honest("hospital-1", prior=concurrent[:1])], sent=["hospital-1"])
    assert "hospital-1" in outcome.rejected and "only grows" in outcome.rejected["hospital-1"]
