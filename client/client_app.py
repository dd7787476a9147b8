"""Flower ClientApp: unpack the message, hand its plain content to client/handlers.py, pack the reply.

Thin on purpose: importing this module imports neither TensorFlow nor the hospital's data
(Flower gives a ClientApp process 30 s to start in simulation, and in deployment starts a
fresh `flwr-clientapp` process for every message). Where the work happens:
- in simulation (Flower's workers live across messages) client/handlers.py is imported on
  the first message and runs in the worker;
- in deployment (inside a `flwr-clientapp` process, with a `hospital-id` in the node config)
  the content is forwarded to the hospital's own long-lived process
  (client/hospital_process.py), which keeps TensorFlow, the data, the compiled DP-SGD step
  and the odometer across messages, and the reply comes back from there.

Site facts (hospital id, data, budget, odometer) come from the node config in deployment
and from the simulation's config plus partition id in simulation; the round's training
settings come from the coordinator's message.

Errors: nothing a hospital sends may carry text from its data or file system (an image's
path often holds a record number and a diagnosis). Every exception in a handler is caught;
the details go to the hospital's own log (stderr of its SuperNode, and
`<odometer>.errors.log` when the odometer path is known), and the reply is a Flower error
Message whose reason is one fixed category and nothing else:
  "data"     the hospital's data or split could not be read or used;
  "budget"   the budget settings are invalid;
  "odometer" the odometer is unreadable, tampered with or cannot be written;
  "settings" the coordinator's training settings are unusable (refused before any charge);
  "internal" anything else (the hospital process could not be started or reached included).
The coordinator reads it with `msg.has_error()` and `msg.error.reason`.
"""
import functools
import logging
import os
import sys
import traceback
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common.config import HOSPITAL_NAME
from common.errors import UserError

ERROR_CATEGORIES = ("data", "budget", "odometer", "settings", "internal")
ERROR_CODE = 2  # Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION: the number carries no text

app = ClientApp()

# The hospital's own log (declined rounds, epsilon spent and left, local training loss):
# shown on the SuperNode's terminal in deployment; it is never sent to the coordinator. A
# simulated hospital has no terminal of its own: Flower forwards its workers' output into the
# run's log stream (`flwr run --stream`, simulate.py's flower.log), so there it shows only
# warnings and errors, and its epsilon is on the coordinator's round line (_show_hospital_log).
_handler = logging.StreamHandler(sys.stderr)
_handler.setFormatter(logging.Formatter("%(asctime)s hospital %(message)s"))
logging.getLogger("hospital").addHandler(_handler)
logging.getLogger("hospital").setLevel(logging.INFO)


class HospitalFailed(Exception):
    """The hospital process answered with an error category; it has logged the details itself."""

    def __init__(self, category: str):
        super().__init__(category)
        self.category = category if category in ERROR_CATEGORIES else "internal"


def error_category(error: BaseException) -> str:
    """The fixed category of an exception: the only thing about it that leaves the hospital."""
    category = getattr(error, "category", None)
    if category in ERROR_CATEGORIES:
        return category
    return "data" if isinstance(error, UserError) else "internal"


def contain(what: str, error: BaseException, node_config: dict) -> str:
    """Log an exception's details locally (stderr and the errors file); return its category."""
    category = error_category(error)
    # A user's mistake is one line (what and how to fix); anything else keeps its traceback.
    details = str(error) if isinstance(error, UserError) else "".join(traceback.format_exception(error))
    logging.getLogger("hospital").error("%s failed (%s): %s", what, category, details)
    _error_log(node_config, f"{what} failed ({category}):\n{details}")
    return category


def _guarded(handler):
    """Run a handler; on any exception reply with its category only and log the details locally."""

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except HospitalFailed as error:  # the hospital process logged it
            category = error.category
        except Exception as error:  # noqa: BLE001 - every error must be contained here
            category = contain(handler.__name__, error, context.node_config)
        return Message(error=Error(code=ERROR_CODE, reason=_reason(category, context)), reply_to=msg)

    return wrapper


def _reason(category: str, context: Context) -> str:
    """The error's whole text: its category, and the hospital's own name when its node config gives a valid one.

    The name is public (it is in every ledger record); without it a hospital that fails before
    it ever replied would be known to the coordinator only by Flower's node number."""
    name = str(context.node_config.get("hospital-id", ""))
    return f"{category}: {name}" if HOSPITAL_NAME.fullmatch(name) else category


def _error_log(node_config: dict, text: str) -> None:
    """Append to `<odometer-path>.errors.log` on a deployed hospital (best effort: stderr has it too)."""
    path = node_config.get("odometer-path")
    if not path:
        return
    try:
        with open(Path(str(path)).absolute().with_suffix(".errors.log"), "a", encoding="utf-8") as handle:
            handle.write(text + "\n")
    except OSError:
        pass


def _forwarded(context: Context) -> bool:
    """Deployment: a one-message `flwr-clientapp` process serving a hospital's node config.

    HOSPITAL_FL_PROCESS=off keeps the work in the ClientApp process (slow: TensorFlow per
    message); =on forwards from any process (the tests' own ClientApp calls)."""
    switch = os.environ.get("HOSPITAL_FL_PROCESS", "auto")
    if switch == "off" or "hospital-id" not in context.node_config:
        return False
    return switch == "on" or Path(sys.argv[0]).name == "flwr-clientapp"


def _show_hospital_log(context: Context) -> None:
    """Info lines on a deployed hospital's own terminal; warnings and errors only in simulation."""
    _handler.setLevel(logging.INFO if "hospital-id" in context.node_config else logging.WARNING)


def _work(kind: str, msg: Message, context: Context, **content) -> dict:
    """The message's plain content -> the hospital's plain reply, here or in the hospital process."""
    _show_hospital_log(context)
    request = {"kind": kind, "node-config": dict(context.node_config), "run-config": dict(context.run_config),
               "config": dict(msg.content["config"]) if "config" in msg.content else {},
               "flower-run": context.run_id, **content}
    if _forwarded(context):
        from client import hospital_process

        reply = hospital_process.call(request)
        if "error" in reply:
            raise HospitalFailed(str(reply["error"]))
        return reply["ok"]
    from client import handlers  # TensorFlow and the data: first message of this worker

    return handlers.handle(request)


def _deadline(msg: Message) -> float | None:
    """When the coordinator stops waiting for the reply: the message's creation time plus its time to live."""
    import math

    deadline = float(msg.metadata.created_at) + float(msg.metadata.ttl)
    return deadline if math.isfinite(deadline) else None


@app.query()
@_guarded
def plan(msg: Message, context: Context) -> Message:
    """Before round 1: the hospital's privacy plan for this run (public numbers only)."""
    reply = _work("query", msg, context)
    return Message(content=RecordDict({"plan": ConfigRecord(reply["plan"])}), reply_to=msg)


@app.train()
@_guarded
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this hospital's data with DP-SGD, within its budget."""
    # The hospital's momentum from its previous round of this run, and whether it declined in
    # this run: kept in the node's own state (Flower keeps a Context per node and run), never sent.
    velocity = context.state["velocity"].to_numpy_ndarrays() if "velocity" in context.state else None
    declined = context.state["declined"].get("run") if "declined" in context.state else None
    reply = _work("train", msg, context, arrays=msg.content["arrays"].to_numpy_ndarrays(), velocity=velocity,
                  **{"declined-run": declined, "deadline": _deadline(msg)})
    if reply["velocity"] is not None:
        context.state["velocity"] = ArrayRecord(reply["velocity"])
    if reply["declined-run"] is not None:
        context.state["declined"] = ConfigRecord({"run": reply["declined-run"]})
    # Only the DP weights, the privacy record (public parameters) and the example count leave.
    content = RecordDict({"metrics": MetricRecord(reply["metrics"]), "privacy": ConfigRecord(reply["privacy"])})
    if reply["arrays"] is not None:
        content["arrays"] = ArrayRecord(reply["arrays"])
    return Message(content=content, reply_to=msg)


@app.evaluate()
@_guarded
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global model on this hospital's local held-out split (if the hospital allows it)."""
    reply = _work("evaluate", msg, context, arrays=msg.content["arrays"].to_numpy_ndarrays())
    content = RecordDict({"metrics": MetricRecord(reply["metrics"]), "privacy": ConfigRecord(reply["privacy"])})
    return Message(content=content, reply_to=msg)
