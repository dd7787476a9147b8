"""Flower ClientApp: unpack the message, call client/task.py, pack the reply.

Site facts (hospital id, data, budget, odometer) come from the node config in deployment
and from the simulation's config plus partition id in simulation; the round's training
settings come from the coordinator's message.

Errors: nothing a hospital sends may carry text from its data or file system (an image's
path often holds a record number and a diagnosis). Every exception in a handler is caught;
the details go to the hospital's own log (stderr of its SuperNode, and
`<odometer>.errors.log` when the odometer path is known), and the reply is a Flower error
Message whose reason is one fixed category and nothing else:
  "data"     the hospital's data or split could not be read or used;
  "budget"   the odometer is unreadable or tampered with, or the budget settings are invalid;
  "settings" the coordinator's training settings are unusable (refused before any charge);
  "internal" anything else.
The coordinator reads it with `msg.has_error()` and `msg.error.reason`.
"""
import functools
import json
import logging
import sys
import traceback
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.task import SettingsError, TrainSettings, deployment_site, evaluate_round, plan_summary, simulation_site, train_round
from common.config import HOSPITAL_NAME, from_run_config
from common.errors import UserError

ERROR_CATEGORIES = ("data", "budget", "odometer", "settings", "internal")
ERROR_CODE = 2  # Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION: the number carries no text

app = ClientApp()

# The hospital's own log (declined rounds, local training loss): shown on the SuperNode's
# terminal in deployment; it is never sent to the coordinator.
_handler = logging.StreamHandler(sys.stderr)
_handler.setFormatter(logging.Formatter("%(asctime)s hospital %(message)s"))
logging.getLogger("hospital").addHandler(_handler)
logging.getLogger("hospital").setLevel(logging.INFO)


def error_category(error: BaseException) -> str:
    """The fixed category of an exception: the only thing about it that leaves the hospital."""
    category = getattr(error, "category", None)
    if category in ERROR_CATEGORIES:
        return category
    return "data" if isinstance(error, UserError) else "internal"


def _guarded(handler):
    """Run a handler; on any exception reply with its category only and log the details locally."""

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as error:  # noqa: BLE001 - every error must be contained here
            category = error_category(error)
            # A user's mistake is one line (what and how to fix); anything else keeps its traceback.
            details = str(error) if isinstance(error, UserError) else "".join(traceback.format_exception(error))
            logging.getLogger("hospital").error("%s failed (%s): %s", handler.__name__, category, details)
            _error_log(context, f"{handler.__name__} failed ({category}):\n{details}")
            return Message(error=Error(code=ERROR_CODE, reason=_reason(category, context)), reply_to=msg)

    return wrapper


def _reason(category: str, context: Context) -> str:
    """The error's whole text: its category, and the hospital's own name when its node config gives a valid one.

    The name is public (it is in every ledger record); without it a hospital that fails before
    it ever replied would be known to the coordinator only by Flower's node number."""
    name = str(context.node_config.get("hospital-id", ""))
    return f"{category}: {name}" if HOSPITAL_NAME.fullmatch(name) else category


def _error_log(context: Context, text: str) -> None:
    """Append to `<odometer-path>.errors.log` on a deployed hospital (best effort: stderr has it too)."""
    path = context.node_config.get("odometer-path")
    if not path:
        return
    try:
        with open(Path(str(path)).absolute().with_suffix(".errors.log"), "a", encoding="utf-8") as handle:
            handle.write(text + "\n")
    except OSError:
        pass


def _site(context: Context):
    config = from_run_config(context.run_config, int(context.node_config.get("num-partitions", 0)))
    if "hospital-id" in context.node_config:
        return config, deployment_site(context.node_config, config)
    return config, simulation_site(config, int(context.node_config["partition-id"]))


def _coordinator_run(msg: Message, context: Context) -> int:
    """The run the charges belong to: the coordinator's run, which outlives a resume.

    A resumed run is a new Flower run; keyed by Flower's run id, a hospital would plan its
    noise afresh mid-run. Whatever number a coordinator sends, every charge is still checked
    against everything in the odometer.
    """
    value = msg.content["config"].get("coordinator-run", context.run_id)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingsError("the coordinator's run id is not an integer")
    return value


def _settings(round_config) -> TrainSettings:
    missing = [name for name in TrainSettings.__dataclass_fields__ if name not in round_config]
    if missing:
        raise SettingsError(f"the coordinator's training settings lack {', '.join(missing)}")
    return TrainSettings(**{name: round_config[name] for name in TrainSettings.__dataclass_fields__})


@app.query()
@_guarded
def plan(msg: Message, context: Context) -> Message:
    """Before round 1: the hospital's privacy plan for this run (public numbers only)."""
    config, site = _site(context)
    summary = plan_summary(site, _settings(msg.content["config"]), _coordinator_run(msg, context))
    return Message(content=RecordDict({"plan": ConfigRecord({"hospital": site.name, **summary})}), reply_to=msg)


@app.train()
@_guarded
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this hospital's data with DP-SGD, within its budget."""
    config, site = _site(context)
    round_config = msg.content["config"]
    settings = _settings(round_config)
    weights = msg.content["arrays"].to_numpy_ndarrays()
    # The hospital's momentum from its previous round of this run: kept in the node's own
    # state (Flower keeps a Context per node and run), never sent.
    velocity = context.state["velocity"].to_numpy_ndarrays() if "velocity" in context.state else None
    run_id = _coordinator_run(msg, context)
    # A hospital that declined once in a run declines for the rest of it, as its plan said:
    # re-planned for fewer rounds, crumbs of budget would buy a round of near-pure noise.
    declined = "declined" in context.state and context.state["declined"].get("run") == run_id
    outcome = train_round(site, config, settings, weights, run_id, int(round_config["server-round"]), velocity,
                          declined_before=declined)
    if outcome.velocity is not None:
        context.state["velocity"] = ArrayRecord(outcome.velocity)
    if outcome.status == "budget_exhausted":
        context.state["declined"] = ConfigRecord({"run": run_id})

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
        "unit": site.unit,  # what num-examples counts and each epsilon protects: "image" or "patient"
        "prior-events": json.dumps([event.to_dict() for event in outcome.prior_events]),
    })
    content = RecordDict({"metrics": metrics, "privacy": privacy})
    if outcome.weights is not None:
        content["arrays"] = ArrayRecord(outcome.weights)
    return Message(content=content, reply_to=msg)


@app.evaluate()
@_guarded
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global model on this hospital's local held-out split (if the hospital allows it)."""
    config, site = _site(context)
    scores = evaluate_round(site, config, msg.content["arrays"].to_numpy_ndarrays())
    metrics = {"num-examples": 0} if scores is None else {"num-examples": len(site.eval_y), **scores}
    content = RecordDict({"metrics": MetricRecord(metrics), "privacy": ConfigRecord({"hospital": site.name})})
    return Message(content=content, reply_to=msg)
