"""Test-only ClientApp: hospital-0 turns hostile, one attack per round (tests/test_faults.py).

It trains honestly with the real ClientApp (so its odometer is really charged), then
tampers with the reply. Round 1 and the last round are honest; round r in between sends
ATTACKS[r - 2]. Every other hospital is the real, honest ClientApp.
"""
import numpy as np
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from client import client_app as honest

ATTACKS = ["weights 1e30", "num-examples 1e9", "epsilon 0", "epsilon -1", "epsilon over budget",
           "sampling-rate 7", "bogus status", "another hospital's name", "missing steps", "prior-events not JSON"]

app = ClientApp()


def _tamper(reply: Message, attack: str) -> None:
    metrics, privacy = reply.content["metrics"], reply.content["privacy"]
    if attack == "weights 1e30":
        reply.content["arrays"] = ArrayRecord([np.full_like(w, 1e30) for w in reply.content["arrays"].to_numpy_ndarrays()])
    elif attack == "num-examples 1e9":
        metrics["num-examples"] = 10**9
    elif attack == "epsilon 0":
        metrics["epsilon"] = 0.0
    elif attack == "epsilon -1":
        metrics["epsilon"] = -1.0
    elif attack == "epsilon over budget":
        metrics["epsilon"] = float(metrics["max-epsilon"]) * 100
    elif attack == "sampling-rate 7":
        metrics["sampling-rate"] = 7.0
    elif attack == "bogus status":
        privacy["status"] = "definitely-fine"
    elif attack == "another hospital's name":
        privacy["hospital"] = "hospital-1"
    elif attack == "missing steps":
        del metrics["steps"]
    elif attack == "prior-events not JSON":
        privacy["prior-events"] = "{not json"


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = honest.train(msg, context)
    index = int(msg.content["config"]["server-round"]) - 2
    if int(context.node_config["partition-id"]) == 0 and 0 <= index < len(ATTACKS):
        _tamper(reply, ATTACKS[index])
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return honest.evaluate(msg, context)


@app.query()
def plan(msg: Message, context: Context) -> Message:
    return honest.plan(msg, context)
