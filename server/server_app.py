"""Flower ServerApp: the coordinator's round loop with privacy reporting and an early stop.

Each round: send the global weights and the round's training settings, FedAvg the replies
of hospitals that trained, append every hospital's privacy record to the ledger, evaluate
(federated on hospitals' held-out splits and centrally on the test set), print the round's
line, and stop when no hospital can afford another round.
"""
import json
import time

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.config import from_run_config, to_dict
from common.federation import central_test_set
from common.metrics import evaluate_model
from common.model import make_model
from common.tf_setup import keras
from server.ledger import PrivacyLedger
from server.plan import ask_plans, plan_lines, wait_for_hospitals
from server.report import round_line, summary_lines
from server.report_md import write_report
from server.run_dir import RunDirectory
from server.simulated import simulated_hospitals
from server.strategy import PrivateFedAvg

app = ServerApp()

HOSPITAL_WAIT_SECONDS = 600  # how long to wait for the configured hospitals before round 1


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured rounds and write the run directory."""
    simulated = simulated_hospitals(grid)  # 0 in a deployment
    config = from_run_config(context.run_config, simulated)
    run = RunDirectory.create(context.run_config.get("run-dir", ""))
    run.write_config(to_dict(config))
    dataset, test_x, test_y = central_test_set(config)

    keras.utils.set_random_seed(config.seed)
    model = make_model(config.model, dataset.input_shape, dataset.num_classes)
    arrays = ArrayRecord(model.get_weights())
    ledger = PrivacyLedger(run.ledger)
    strategy = PrivateFedAvg(
        ledger,
        fraction_train=config.train.fraction_train,
        fraction_evaluate=config.train.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1 if config.train.fraction_evaluate > 0 else 0,
        min_available_nodes=config.hospitals,
    )
    train_config = ConfigRecord({
        "batch_size": config.train.batch_size,
        "local_epochs": config.train.local_epochs,
        "learning_rate": config.train.learning_rate,
        "momentum": config.train.momentum,
        "l2_norm_clip": config.dp.l2_norm_clip,
        "noise_multiplier": config.dp.noise_multiplier,  # a number, or "auto": each hospital plans its own
        "planned_rounds": config.rounds,
    })
    print(f"Run directory: {run.path}", flush=True)
    print("Asking the hospitals for their privacy plans (each loads its data and plans its noise) ...", flush=True)
    nodes = wait_for_hospitals(grid, config.hospitals, timeout=HOSPITAL_WAIT_SECONDS)
    plans = ask_plans(grid, nodes, train_config, timeout=HOSPITAL_WAIT_SECONDS)
    (run.path / "plan.json").write_text(json.dumps(plans, indent=1, sort_keys=True))
    for line in plan_lines(plans, config.rounds):
        print(line, flush=True)
    print(f"Round 1/{config.rounds} starts: the hospitals compile the DP-SGD step first ...", flush=True)
    started = time.time()
    for server_round in range(1, config.rounds + 1):
        round_started = time.time()
        replies = grid.send_and_receive(strategy.configure_train(server_round, arrays, train_config, grid))
        new_arrays, train_summary = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays

        record = {"round": server_round}
        model.set_weights(arrays.to_numpy_ndarrays())
        record.update(evaluate_model(model, test_x, test_y))
        if config.train.fraction_evaluate > 0:
            federated = strategy.aggregate_evaluate(
                server_round,
                grid.send_and_receive(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid)),
            )
            if federated:
                record.update({f"federated_{key}": value for key, value in federated.items()})
                record["hospitals_evaluation"] = strategy.round_evaluation
        record["hospitals_trained"] = int(train_summary["hospitals-trained"])
        record["seconds"] = round(time.time() - round_started, 3)
        run.append_metrics(record)
        print(round_line(record, config.rounds, ledger.latest()), flush=True)
        if strategy.everyone_exhausted(config.hospitals) and server_round < config.rounds:
            print(f"Stopping after round {server_round}: no hospital can afford another round.", flush=True)
            break

    model.set_weights(arrays.to_numpy_ndarrays())
    model.save(run.model)
    run.plot(ledger.records)
    for line in summary_lines(run, ledger.latest(), strategy.exhausted(), strategy.declined_at, time.time() - started):
        print(line, flush=True)
    write_report(run, config, simulated=bool(simulated))
