"""Before round 1: ask every hospital for its privacy plan and show it.

With `dp.noise_multiplier: auto` each hospital chooses its own noise from its own facts (its
examples, budget, delta and odometer); the coordinator only learns the result. The plan
travels as a query message and holds public numbers only: the example count (public
metadata), its unit of privacy (image, or patient when its data names patients), q, steps per
round, the planned sigma and the epsilon it leads to.
"""
from __future__ import annotations

from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from server.replies import UNITS
from server.strategy import failure_category, failure_name


def ask_plans(grid, node_ids: list[int], train_config: ConfigRecord,
              timeout: float | None) -> tuple[dict[str, dict], dict[str, str], dict[int, str]]:
    """({hospital: plan} from every node that answered with a well-formed plan, {node: failure category},
    {node id: the hospital name it answered with})."""
    messages = [Message(RecordDict({"config": train_config}), node, MessageType.QUERY) for node in node_ids]
    plans, failed, names = {}, {}, {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():  # the category (and the hospital's name) only: nothing else is read
            failed[failure_name(reply) or f"node {reply.metadata.src_node_id}"] = failure_category(reply)
            continue
        if "plan" not in reply.content:
            continue
        record = reply.content["plan"]
        hospital = str(record.get("hospital", f"node {reply.metadata.src_node_id}"))
        values = {key: value for key, value in record.items() if key not in ("hospital", "unit")}
        unit = record.get("unit", "image")
        if all(isinstance(v, (int, float)) for v in values.values()) and unit in UNITS:
            plans[hospital] = values | {"unit": unit}
            names[int(reply.metadata.src_node_id)] = hospital
    return plans, failed, names


def plan_lines(plans: dict[str, dict], rounds: int, failed: dict[str, str] | None = None) -> list[str]:
    """A table: per hospital its n and unit, expected batch, q, steps per round, planned sigma, final epsilon."""
    failures = [f"  {node} could not plan ({category}): it will fail its rounds the same way; its own log says why"
                for node, category in sorted((failed or {}).items())]
    if not plans:
        if failures:
            return ["Privacy plan: no hospital could plan:", *failures]
        return ["Privacy plan: no hospital answered in time (still loading its data); "
                "each plans its noise before it trains all the same, and the ledger records it."]
    lines = [f"Privacy plan for {rounds} round(s), chosen by each hospital from its own budget:",
             f"  {'hospital':<14} {'n':>6} {'unit':<8} {'batch':>5} {'q':>7} {'steps/round':>11} {'sigma':>7} "
             f"{'epsilon now':>11} {'epsilon at end':>14} {'budget':>7}"]
    for hospital in sorted(plans, key=lambda name: (len(name), name)):
        p = plans[hospital]
        if "noise-multiplier" in p:
            sigma, final = f"{p['noise-multiplier']:.4g}", f"{p['epsilon-planned']:.3f}"
        else:
            sigma, final = "-", "declines"
        batch = round(p["sampling-rate"] * p["num-examples"])  # expected batch: q n
        lines.append(f"  {hospital:<14} {int(p['num-examples']):>6} {p.get('unit', 'image') + 's':<8} {batch:>5} "
                     f"{p['sampling-rate']:>7.4f} "
                     f"{int(p['steps-per-round']):>11} {sigma:>7} {p['epsilon-before']:>11.3f} {final:>14} "
                     f"{p['max-epsilon']:>7g}")
    units = {p.get("unit", "image") for p in plans.values()}
    lines.append("  Unit of privacy: " + ("the patient (each epsilon protects all of one patient's images together)"
                                        if units == {"patient"} else
                                        "the image (each epsilon protects one image; a patient with k images is "
                                        "protected only at group size k)" if units == {"image"} else
                                        "the patient where a hospital's data names patients, else the image"))
    return lines + failures
