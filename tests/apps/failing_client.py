"""Test-only ClientApp: hospital-2 plans, then fails every training round; hospital-1 is rejected every round.

hospital-2's privacy plan comes through (the real ClientApp's), so the coordinator knows its
name; every training message then fails the way a hospital whose images became unreadable
fails: the real ClientApp's error handling replies with the category "data" and nothing else.
hospital-1 trains for real (its odometer is charged) and its reply then lacks its "epsilon"
metric, so the coordinator rejects it every round: its charges must still reach the ledger.
Every other hospital is the real ClientApp (tests/test_faults.py).
"""
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import client_app as honest
from common.errors import UserError

app = ClientApp()


@honest._guarded
def _unreadable(msg: Message, context: Context) -> Message:
    raise UserError("the hospital's images became unreadable (test fault)")


def _broken(msg: Message, context: Context) -> bool:
    return int(context.node_config["partition-id"]) == 2


@app.train()
def train(msg: Message, context: Context) -> Message:
    if _broken(msg, context):
        return _unreadable(msg, context)
    reply = honest.train(msg, context)
    if int(context.node_config["partition-id"]) == 1 and reply.has_content():
        del reply.content["metrics"]["epsilon"]  # charged, then malformed: rejected
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return honest.evaluate(msg, context)


@app.query()
def plan(msg: Message, context: Context) -> Message:
    return honest.plan(msg, context)
