"""Flower ClientApp: unpack the message, call client/task.py, pack the reply.

Site facts (hospital id, data, budget, odometer) come from the node config in deployment
and from the simulation's config plus partition id in simulation; the round's training
settings come from the coordinator's message.
"""
import json
import logging
import sys

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.task import TrainSettings, deployment_site, evaluate_round, simulation_site, train_round
from common.config import from_run_config

app = ClientApp()

# The hospital's own log (declined rounds, local training loss): shown on the SuperNode's
# terminal in deployment; it is never sent to the coordinator.
_handler = logging.StreamHandler(sys.stderr)
_handler.setFormatter(logging.Formatter("%(asctime)s hospital %(message)s"))
logging.getLogger("hospital").addHandler(_handler)
logging.getLogger("hospital").setLevel(logging.INFO)


def _site(context: Context):
    config = from_run_config(context.run_config, int(context.node_config.get("num-partitions", 0)))
    if "hospital-id" in context.node_config:
        return config, deployment_site(context.node_config, config)
    return config, simulation_site(config, int(context.node_config["partition-id"]))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this hospital's data with DP-SGD, within its budget."""
    config, site = _site(context)
    round_config = msg.content["config"]
    settings = TrainSettings(**{name: round_config[name] for name in TrainSettings.__dataclass_fields__})
    weights = msg.content["arrays"].to_numpy_ndarrays()
    outcome = train_round(site, config, settings, weights, context.run_id, int(round_config["server-round"]))

    # Only the DP weights, the privacy record (public parameters) and the example count leave.
    metrics = MetricRecord({
        "num-examples": outcome.num_examples,
        "epsilon": outcome.epsilon,
        "delta": site.odometer.delta,
        "max-epsilon": site.odometer.max_epsilon,
        "noise-multiplier": outcome.event.noise_multiplier,
        "sampling-rate": outcome.event.sampling_rate,
        "steps": outcome.event.steps,
        "budget-exhausted": int(outcome.status == "budget_exhausted"),
        "can-train-again": int(outcome.can_train_again),
        "epsilon-needed": outcome.epsilon_needed,
    })
    privacy = ConfigRecord({
        "hospital": site.name,
        "status": outcome.status,
        "sampling": outcome.event.sampling,
        "accountant": "pld",
        "prior-events": json.dumps([event.to_dict() for event in outcome.prior_events]),
    })
    content = RecordDict({"metrics": metrics, "privacy": privacy})
    if outcome.weights is not None:
        content["arrays"] = ArrayRecord(outcome.weights)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global model on this hospital's local held-out split (if the hospital allows it)."""
    config, site = _site(context)
    scores = evaluate_round(site, config, msg.content["arrays"].to_numpy_ndarrays())
    metrics = {"num-examples": 0} if scores is None else {"num-examples": len(site.eval_y), **scores}
    content = RecordDict({"metrics": MetricRecord(metrics), "privacy": ConfigRecord({"hospital": site.name})})
    return Message(content=content, reply_to=msg)
