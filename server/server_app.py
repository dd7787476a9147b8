"""Flower ServerApp: the coordinator's round loop with privacy reporting, named failures,
checkpoints, a graceful stop and resume.

Each round: send the global weights and the round's training settings to the connected
hospitals, validate every reply (server/strategy.py), aggregate those that trained, append
every accepted privacy record to the ledger, evaluate (federated on hospitals' held-out
splits and centrally on the test set), print the round's line (naming hospitals that failed
or were rejected), checkpoint, and stop when no hospital can train any more or a stop was
asked for (`<run-dir>/STOP`, SIGINT, SIGTERM). `status.json` tells how the run ended.
"""
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import RunNotRunningException

from client.odometer import SIMULATION_ODOMETER
from common.config import evaluation_rounds, from_dict, from_run_config, to_dict
from common.durable import disk_full_line, is_disk_full
from common.errors import UserError
from common.federation import central_test_set, hospital_label_counts
from server import checkpoint, run_guard
from server.ledger import PrivacyLedger
from server.plan import ask_plans, plan_lines
from server.replies import RoundPlan
from server.report import round_line, summary_lines
from server.provenance import flower_run_facts, note_flower_run, provenance
from server.report_md import write_report
from server.run_dir import RunDirectory
from server.simulated import simulated_hospitals
from server.strategy import PrivateFedAvg, RoundOutcome

app = ServerApp()
log = logging.getLogger("hospital_fl")

EXIT_FINISHED, EXIT_WITH_PROBLEMS, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
POLL_SECONDS = 1.0
REPLY_POLL_SECONDS = 0.25  # how often a round asks the SuperLink for replies (Flower's own loop: 3 s)


class StopFlag:
    """Set by SIGINT/SIGTERM (where this process receives them) or by the file <run-dir>/STOP.

    A deployed ServerApp that Flower's SuperExec started (`flwr-serverapp --parent-pid`) also
    watches that parent, and the SuperLink the SuperExec serves (its own `--parent-pid`): when
    either is gone, no round can complete and Flower's Runtime API client would retry forever
    (Flower's own parent monitor only raises SIGINT, which here asks for a stop after the
    round). So `on_orphaned` records the run as interrupted and the process ends at once. The
    last checkpoint stands; `resume-dir` continues from it once a SuperLink is back.

    A killed process that its parent has not reaped yet (a zombie) counts as gone. Flower's
    monitor (`os.kill(pid, 0)`) takes a zombie for alive, so a SuperExec outlives its killed
    SuperLink; the ServerApp then sends it the SIGINT Flower's monitor would have sent.
    """

    WATCH_SECONDS = 1.0

    def __init__(self, stop_file: Path):
        self.stop_file = stop_file
        self.signalled = threading.Event()
        self.previous = {}
        self.on_orphaned = None  # called (from a watcher thread) before the process exits with 130

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers (in simulation the process's owner does)
        for number in (signal.SIGINT, signal.SIGTERM):
            self.previous[number] = signal.signal(number, self._handle)
        if "--parent-pid" not in sys.argv:
            return  # not started by Flower's SuperExec (which Flower itself ends the process with)
        parent = os.getppid()
        superlink = _parent_pid_argument(parent)

        def watch() -> None:
            while os.getppid() == parent and not (superlink and _process_gone(superlink)):
                time.sleep(self.WATCH_SECONDS)
            try:
                if self.on_orphaned is not None:
                    self.on_orphaned()
            finally:
                if os.getppid() == parent:  # the SuperLink is gone and its SuperExec has not noticed
                    _interrupt(parent)
                os._exit(EXIT_INTERRUPTED)  # the main thread may be stuck retrying a SuperLink that is gone

        threading.Thread(target=watch, name="hospital-fl-parent-watch", daemon=True).start()

    def _handle(self, number, frame) -> None:
        if self.signalled.is_set():  # a second Ctrl-C: stop now
            signal.signal(number, self.previous.get(number, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.signalled.set()

    def restore(self) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.on_orphaned = None

    def requested(self) -> bool:
        return self.signalled.is_set() or self.stop_file.exists()


def _parent_pid_argument(pid: int) -> int | None:
    """The `--parent-pid` a Flower process was started with (a SuperExec's: its SuperLink), or None."""
    import psutil

    try:
        argv = psutil.Process(pid).cmdline()
        return int(argv[argv.index("--parent-pid") + 1])
    except (psutil.Error, ValueError, IndexError):
        return None


def _process_gone(pid: int) -> bool:
    """Has this process ended? A zombie (dead, not yet reaped by its parent) has."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False  # not ours to inspect: take it for alive, as Flower does


def _interrupt(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGINT)
    except OSError:
        pass  # gone meanwhile


class _EngineErrorsToLog(logging.Filter):
    """Keep ClientApp failures that Flower's simulation engine logs (tracebacks) off the terminal."""

    def __init__(self, file_handler: logging.Handler):
        super().__init__()
        self.file_handler = file_handler

    def filter(self, record: logging.LogRecord) -> bool:
        path = record.pathname.replace("\\", "/")
        if record.levelno >= logging.ERROR and ("/fleet/vce/" in path or "/ray_transport/" in path):
            self.file_handler.handle(record)
            return False
        return True


class _RunLogHandler(logging.FileHandler):
    """run.log. When the disk is full a log line cannot be written; logging would then print a
    traceback for every line, while the round loop says once, in one line, what is full."""

    def handleError(self, record: logging.LogRecord) -> None:
        if is_disk_full(sys.exc_info()[1]):
            return
        super().handleError(record)


def _open_log(run: RunDirectory):
    """Details of failures and rejections go to run.log, one place, not to the terminal."""
    handler = _RunLogHandler(run.log, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    engine_filter = _EngineErrorsToLog(handler)
    for flower_handler in logging.getLogger("flwr").handlers:
        flower_handler.addFilter(engine_filter)

    def close():
        for flower_handler in logging.getLogger("flwr").handlers:
            flower_handler.removeFilter(engine_filter)
        log.removeHandler(handler)
        handler.close()
    return close


def _open_run(context: Context, simulated: int):
    """(config, run directory, checkpoint or None): a new run, or `resume-dir` continued."""
    resume = str(context.run_config.get("resume-dir", "") or "")
    if resume:
        run = RunDirectory.resume(resume)
        import yaml  # noqa: PLC0415 - only a resume reads the saved config back

        config = from_dict(yaml.safe_load(run.config.read_text()))  # the run's own settings, not new ones
        run.stop_request.unlink(missing_ok=True)  # the stop that ended it has been honoured
        return config, run, checkpoint.load(run.checkpoint)
    config = from_run_config(context.run_config, simulated)
    run = RunDirectory.create(context.run_config.get("run-dir", ""))
    run.write_config(to_dict(config))
    return config, run, None


def _wait_for_hospitals(grid: Grid, want: int, minimum: int, timeout: float, stop: StopFlag) -> list[int]:
    """Connected node ids once `want` are there, or after `timeout` s if at least `minimum` are."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= want or stop.requested():
            return nodes
        if time.monotonic() >= deadline:
            return nodes if len(nodes) >= minimum else []
        time.sleep(POLL_SECONDS)


def _outcome_text(outcome: RoundOutcome, updated: bool) -> str:
    """' | hospital-3 failed (out of memory) | hospital-1 rejected (...)' for the round line."""
    parts = [f"{label} failed ({category})" for label, category in sorted(outcome.failed.items())]
    parts += [f"{label} rejected ({reason})" for label, reason in sorted(outcome.rejected.items())]
    if not updated and outcome.averaged:
        parts.append(f"model not updated ({outcome.averaged} update(s), fewer than train.min_hospitals)")
    return "".join(f" | {part}" for part in parts)


def _status(state: str, rounds: int, strategy: PrivateFedAvg, reason: str, exit_code: int | None = None) -> dict:
    failed, rejected = sorted(strategy.failed), sorted(strategy.rejected)
    if exit_code is None:
        exit_code = EXIT_WITH_PROBLEMS if failed or rejected else EXIT_FINISHED
    return {"state": state, "rounds_completed": rounds, "failed_hospitals": failed,
            "rejected_hospitals": rejected, "exit_code": exit_code, "reason": reason, "provenance": provenance()}


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured rounds and write the run directory; status.json tells how it ended."""
    note_flower_run(grid)  # Flower's run and its app bundle hash, for status.json's provenance
    refused = run_guard.refusal(flower_run_facts(grid))
    if refused:  # before anything is written or any hospital asked
        print(f"error: {refused}", flush=True)
        return
    simulated = simulated_hospitals(grid)  # 0 in a deployment
    try:
        config, run, saved = _open_run(context, simulated)
    except UserError as error:  # a deployment's run config: one line in `flwr log`, no run started
        print(f"error: {error}", flush=True)
        return
    run.simulated = bool(simulated)
    close_log = _open_log(run)
    stop = StopFlag(run.stop_request)
    stop.install()
    try:
        _run(grid, context, config, run, saved, stop, simulated)
    except OSError as error:
        if not is_disk_full(error):
            raise
        _stop_on_full_disk(run, error)  # before round 1, or while the last round was saved
    finally:
        stop.restore()
        close_log()


def _stop_on_full_disk(run: RunDirectory, error: OSError, completed: int | None = None, strategy=None) -> None:
    """One line naming the file that could not be written; status.json says so when it can be
    written, and a second line says when even that fails (then the terminal is all there is)."""
    reason = (f"{disk_full_line(error)}; the run stopped. Free space, then resume with --resume {run.path} "
              "(or the run-config key resume-dir): a round whose metrics or checkpoint were not written is repeated")
    print(f"error: {reason}", flush=True)
    if strategy is None:
        return  # nothing is known of the rounds here: status.json keeps what it last said
    try:
        run.write_status(_status("failed", completed, strategy, reason, exit_code=EXIT_WITH_PROBLEMS))
    except OSError as again:
        print(f"error: {run.status} could not be written either ({disk_full_line(again)})", flush=True)


def unsaved_rounds(saved_round: int, ledger: PrivacyLedger) -> list[int]:
    """Rounds the ledger holds that the checkpoint does not: the hospitals were charged for them
    (the charges stand), but their update and metrics were never saved (a full disk, a kill
    between the ledger and the checkpoint), so the model lacks them."""
    return sorted({r["round"] for r in ledger.records if r["round"] > saved_round})


def _restore(saved, run: RunDirectory, ledger: PrivacyLedger, strategy: PrivateFedAvg, grid: Grid, config,
             context: Context, simulated: int):
    """Continue from a checkpoint: (global arrays, metrics so far, Flower run ids, first round to run, rounds to
    repeat)."""
    metrics = [m for m in saved.metrics if m["round"] <= saved.round]
    run.rewrite_metrics(metrics)
    nodes = {str(n) for n in grid.get_node_ids()}
    state = {k: v for k, v in saved.strategy.items() if k != "noise"}  # a new Flower run may plan new noise
    strategy.restore(state, keep_nodes=bool(nodes & set(saved.strategy.get("node_names", {}))))
    for lost in checkpoint.ledger_lost_charges(ledger, Path(config.privacy.odometer_dir), saved.flower_runs,
                                                 config.privacy.max_epsilon, config.train.batch_size):
        log.info("resume: %s's round %d charge had no ledger record: ledgered as lost", lost["hospital"], lost["round"])
    # Records written after the checkpoint (a round cut short) stay: continue after them, so no
    # (round, hospital) is ledgered twice, and repeat each such round's work under a new number.
    repeated = unsaved_rounds(saved.round, ledger)
    first_round = max([saved.round] + [r["round"] for r in ledger.records]) + 1
    cut_short = checkpoint.started_round(run.checkpoint)
    if not simulated and cut_short > saved.round:
        # A deployed round whose messages left but that never completed: any hospital may have
        # been charged for it, which only its next reply can show. Resume after it (never ask
        # for the same round twice) with it marked as unledgered for every hospital it lacks.
        for hospital in sorted({r["hospital"] for r in ledger.records}):
            rounds = strategy.unledgered.setdefault(hospital, [])
            if cut_short not in rounds and not any(r["round"] == cut_short and r["hospital"] == hospital
                                                   for r in ledger.records):
                rounds.append(cut_short)
        log.info("resume: round %d was cut short; a charge any hospital made in it is ledgered as lost when it "
                 "next replies", cut_short)
        first_round = max(first_round, cut_short + 1)
    print(f"Resuming {run.path} after round {first_round - 1}.", flush=True)
    if repeated:
        names = ", ".join(str(r) for r in repeated)
        print(f"Round(s) {names} charged the hospitals (ledgered) but the model after them was never saved: the "
              f"model goes on from round {saved.round}, and the run repeats that work in {len(repeated)} more "
              f"round(s), to round {config.rounds + len(repeated)}.", flush=True)
    return ArrayRecord(saved.weights), metrics, saved.flower_runs + [context.run_id], first_round, repeated


def _run(grid: Grid, context: Context, config, run: RunDirectory, saved, stop: StopFlag, simulated: int) -> None:
    # TensorFlow (and scikit-learn) load here, never at module load: Flower gives its simulation's
    # process 30 s to start, and a deployed SuperExec launches this module for every run.
    from common.model import make_model
    from common.tf_setup import keras

    ledger = PrivacyLedger(run.ledger)
    plan = RoundPlan(config.train.batch_size, config.train.local_epochs, config.train.learning_rate,
                     config.train.momentum, config.dp.l2_norm_clip)
    strategy = PrivateFedAvg(
        ledger, plan, run.rejected, aggregator=config.train.aggregator, min_hospitals=config.train.min_hospitals,
        fraction_train=config.train.fraction_train, fraction_evaluate=config.train.fraction_evaluate,
        min_train_nodes=1, min_evaluate_nodes=0, min_available_nodes=1,
    )
    try:  # a model too large for the machine, say: one line, before any hospital is asked
        dataset, test_x, test_y = central_test_set(config)
        keras.utils.set_random_seed(config.seed)
        model = make_model(config.model, dataset.input_shape, dataset.num_classes)
        strategy.num_classes = max(2, dataset.num_classes)  # what every evaluation reply's counts must match
    except UserError as error:
        run.write_status(_status("failed", saved.round if saved else 0, strategy, str(error), exit_code=EXIT_BAD_INPUT))
        print(f"error: {error}", flush=True)
        return
    flower_runs, metrics, first_round, repeated = [context.run_id], [], 1, []
    arrays = ArrayRecord(model.get_weights())
    if saved is not None:
        arrays, metrics, flower_runs, first_round, repeated = _restore(saved, run, ledger, strategy, grid, config,
                                                                       context, simulated)
    # Every round's update the model lacks is repeated: the last round moves by as many.
    last_round = config.rounds + len(repeated)
    train_config = ConfigRecord({
        "batch_size": config.train.batch_size,
        "local_epochs": config.train.local_epochs,
        "learning_rate": config.train.learning_rate,
        "momentum": config.train.momentum,
        "lr_schedule": config.train.lr_schedule,
        "l2_norm_clip": config.dp.l2_norm_clip,
        "noise_multiplier": config.dp.noise_multiplier,  # a number, or "auto": each hospital plans its own
        # The rounds of the whole run, a repeated one included: a hospital's learning-rate schedule
        # (and its noise plan, "auto") spans them all, so a repeated last round still trains.
        "planned_rounds": last_round,
        # The first Flower run of this run directory: stays the same across resumes, so each
        # hospital keeps the noise it planned for the whole run.
        "coordinator-run": flower_runs[0],
    })
    completed = first_round - 1

    def save_checkpoint(round_number: int) -> None:
        checkpoint.save(run.checkpoint, checkpoint.Checkpoint(round_number, arrays.to_numpy_ndarrays(),
                                                              strategy.state(), metrics, flower_runs))

    def orphaned() -> None:
        reason = (f"the SuperLink went away during round {completed + 1}; start it again and resume with the "
                  f"run-config key resume-dir={run.path}")
        log.info("stopping: %s", reason)
        run.write_status(_status("interrupted", completed, strategy, reason, exit_code=EXIT_INTERRUPTED))

    stop.on_orphaned = orphaned
    run.write_status(_status("running", completed, strategy, "the run has not finished", exit_code=EXIT_WITH_PROBLEMS))
    save_checkpoint(completed)
    print(f"Run directory: {run.path}", flush=True)
    _show_plans(grid, config, run, strategy, train_config, first_round, last_round, stop)
    started = time.time()
    state, reason = "finished", f"all {last_round} rounds ran"
    try:
        for server_round in range(first_round, last_round + 1):
            nodes = _wait_for_hospitals(grid, config.hospitals if server_round == first_round else config.train.min_hospitals,
                                        config.train.min_hospitals, config.train.round_timeout, stop)
            if stop.requested():
                state, reason = "interrupted", f"stopped on request before round {server_round}"
                break
            if len(nodes) < config.train.min_hospitals:
                state, reason = "failed", (f"only {len(nodes)} hospital(s) connected after waiting "
                                           f"{config.train.round_timeout:g} s, fewer than train.min_hospitals")
                print(f"Stopping before round {server_round}: {reason}.", flush=True)
                break
            round_started = time.time()
            checkpoint.mark_started(run.checkpoint, server_round)
            arrays, record, outcome = _train_round(grid, strategy, server_round, arrays, train_config, config,
                                                   model, test_x, test_y, last_round)
            record["seconds"] = round(time.time() - round_started, 3)
            run.append_metrics(record)
            metrics.append(record)
            save_checkpoint(server_round)
            completed = server_round  # saved: a resume continues after it (a full disk before this repeats it)
            run.write_status(_status("running", completed, strategy, "the run has not finished",
                                     exit_code=EXIT_WITH_PROBLEMS))
            print(round_line(record, last_round, ledger.latest()) + _outcome_text(outcome, outcome.updated),
                  flush=True)
            if strategy.everyone_exhausted(config.hospitals) and server_round < last_round:
                reason = "no hospital can afford another round"
                print(f"Stopping after round {server_round}: {reason}.", flush=True)
                break
            if not outcome.trained and (outcome.failed or outcome.rejected or not strategy.sent_to):
                reason = f"no hospital could train in round {server_round} (every one failed, was rejected or declined)"
                print(f"Stopping after round {server_round}: {reason}; details in {run.log}.", flush=True)
                break
            if stop.requested():
                state, reason = "interrupted", f"stopped on request after round {server_round}"
                print(f"Stopping after round {server_round} as asked; resume with --resume {run.path}.", flush=True)
                break
    except KeyboardInterrupt:
        state, reason = "interrupted", f"interrupted during round {completed + 1}"
    except UserError as error:
        run.write_status(_status("failed", completed, strategy, str(error), exit_code=EXIT_BAD_INPUT))
        print(f"error: {error}", flush=True)
        return
    except (Exception, RunNotRunningException) as error:  # noqa: BLE001 - recorded, then Flower sees the failure too
        if is_disk_full(error):
            # The round in progress could not be saved whole: stop here. What it ledgered stands;
            # its metrics and checkpoint are what a resume repeats. Nothing more is written, since
            # every further file (model, plots, report) would only fail the same way.
            _stop_on_full_disk(run, error, completed, strategy)
            return
        # `flwr stop` revokes the run's token: Flower signals this process (a stop request) and
        # its next call to the SuperLink fails. That is the operator's stop, not a crash.
        if simulated or not (stop.requested() or isinstance(error, RunNotRunningException)):
            _record_failure(run, completed, strategy, error)
            raise
        log.info("the SuperLink ended the run (%s: %s)", type(error).__name__, error)
        state, reason = "interrupted", (f"stopped during round {completed + 1} (flwr stop); resume with the "
                                        f"run-config key resume-dir={run.path}")
        print(f"Stopping: {reason}.", flush=True)
    if state == "finished" and not any(r["status"] == "trained" for r in ledger.records):
        # A run that trained nobody produced no model worth having: a failure, said with its cause.
        state, reason = "failed", _nobody_trained(ledger, config, bool(simulated))
        print(f"error: {reason}", flush=True)
    try:
        _finish(run, config, ledger, strategy, model, arrays, flower_runs, started, state, reason, completed,
                first_round, last_round)
        write_report(run, hospital_label_counts(config, dataset) if simulated else None)
    except Exception as error:  # noqa: BLE001
        if is_disk_full(error):  # every round is saved; the model file, say, is not
            _stop_on_full_disk(run, error, completed, strategy)
            return
        _record_failure(run, completed, strategy, error)
        raise


def _show_plans(grid: Grid, config, run: RunDirectory, strategy: PrivateFedAvg, train_config: ConfigRecord,
                first_round: int, last_round: int, stop: StopFlag) -> None:
    """Before the first round: every hospital's privacy plan (public numbers), printed and in plan.json."""
    if run.simulated:  # where the earlier spend in the plan's "epsilon now" column comes from
        print(f"Privacy odometer: {Path(config.privacy.odometer_dir) / SIMULATION_ODOMETER} (shared by the simulated "
              "hospitals; each counts every charge on images of its shard)", flush=True)
    print("Asking the hospitals for their privacy plans (each loads its data and plans its noise) ...", flush=True)
    nodes = _wait_for_hospitals(grid, config.hospitals, config.train.min_hospitals, config.train.round_timeout, stop)
    rounds_left = last_round - first_round + 1
    query = ConfigRecord(dict(train_config) | {"planned_rounds": rounds_left})
    plans, failed, names = ask_plans(grid, nodes, query, timeout=config.train.round_timeout)
    # A hospital that then fails before it ever trains is named, not numbered.
    left_out = strategy.name_nodes(names)
    (run.path / "plan.json").write_text(json.dumps(plans, indent=1, sort_keys=True))
    for line in plan_lines(plans, rounds_left, failed) + left_out:
        print(line, flush=True)
    print(f"Round {first_round}/{last_round} starts: the hospitals compile the DP-SGD step first ...", flush=True)


def _nobody_trained(ledger: PrivacyLedger, config, simulated: bool) -> str:
    """One line: each hospital's spend and budget, where its odometer is, and what to do."""
    latest = ledger.latest()
    spend = ", ".join(f"{name} spent {r['epsilon']:.3f} of {r['max_epsilon']:g}"
                      for name, r in sorted(latest.items(), key=lambda item: (len(item[0]), item[0])))
    spend = spend or "no hospital sent a usable reply"
    if simulated:
        where = f"the simulated hospitals' odometer is {Path(config.privacy.odometer_dir) / SIMULATION_ODOMETER}"
        fix = ("for public or synthetic data, give a fresh privacy.odometer_dir (--set privacy.odometer_dir=DIR); "
               "for real patients' data these budgets are spent")
    else:
        where = "each hospital's odometer is its node config's odometer-path"
        fix = "a hospital whose budget is spent cannot train again on the same data"
    return f"no hospital trained in this run ({spend}); {where}: {fix}"


def _record_failure(run: RunDirectory, completed: int, strategy: PrivateFedAvg, error: Exception) -> None:
    log.error("the coordinator failed: %s", traceback.format_exc())
    run.write_status(_status("failed", completed, strategy, f"the coordinator failed ({type(error).__name__}); "
                             f"details in {run.log}"))


def _finish(run, config, ledger, strategy, model, arrays, flower_runs, started, state, reason, completed,
            first_round, last_round) -> None:
    """Ledger lost charges (simulation), save the model and plots, print the summary, write status.json."""
    from common.model import save_model

    for lost in checkpoint.ledger_lost_charges(ledger, Path(config.privacy.odometer_dir), flower_runs,
                                                 config.privacy.max_epsilon, config.train.batch_size):
        log.info("%s's round %d charge had no ledger record: ledgered as lost", lost["hospital"], lost["round"])
    model.set_weights(arrays.to_numpy_ndarrays())
    save_model(model, run.model)  # standard layers: plain tf_keras.models.load_model reads it
    run.plot_accuracy()
    for line in summary_lines(run, ledger.latest(), strategy.exhausted(), strategy.declined_at, time.time() - started,
                              first_round, last_round):
        print(line, flush=True)
    named = sorted(strategy.failed) + sorted(strategy.rejected)
    if named:
        print(f"Hospitals that failed or were rejected: {', '.join(dict.fromkeys(named))} (details in {run.log}).",
              flush=True)
    exit_code = {"interrupted": EXIT_INTERRUPTED, "failed": EXIT_WITH_PROBLEMS}.get(state)
    run.write_status(_status(state, completed, strategy, reason, exit_code))


def _send_and_receive(grid: Grid, messages, timeout: float) -> list:
    """Grid.send_and_receive, asking for replies every REPLY_POLL_SECONDS instead of every 3 s.

    A deployed round is a few seconds of work (client/hospital_process.py); Flower's loop
    would round each exchange up to a multiple of 3 s. Replies (the SuperLink's own error
    replies for a node that went away included) are collected until all are in or `timeout`.
    Each message lives only until then (its time to live): the SuperLink drops it, and a
    hospital that gets it late refuses before charging (client/task.py _refuse_past)."""
    messages = list(messages)
    for message in messages:
        message.metadata.ttl = timeout + max(time.time() - message.metadata.created_at, 0.0)
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies = []
    while pending:
        found = list(grid.pull_messages(pending))
        replies += found
        pending -= {reply.metadata.reply_to_message_id for reply in found}
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(REPLY_POLL_SECONDS)
    return replies


def _train_round(grid, strategy, server_round, arrays, train_config, config, model, test_x, test_y, last_round):
    """One round: train, aggregate, evaluate. Returns (global arrays, metrics record, outcome).

    The central test set scores the global model every round. Federated evaluation costs each
    hospital evaluation budget, so it runs every `train.evaluate_every` rounds and after the
    last (common.config.evaluation_rounds); each hospital plans its noise from the number of
    evaluations still planned, which the request carries."""
    from common.metrics import evaluate_model

    timeout = config.train.round_timeout
    replies = _send_and_receive(grid, strategy.configure_train(server_round, arrays, train_config, grid), timeout)
    new_arrays, train_summary = strategy.aggregate_train(server_round, replies)
    if new_arrays is not None:
        arrays = new_arrays
    record = {"round": server_round}
    model.set_weights(arrays.to_numpy_ndarrays())
    record.update(evaluate_model(model, test_x, test_y))
    planned = evaluation_rounds(server_round, last_round, config.train.evaluate_every)
    if config.train.fraction_evaluate > 0 and planned and planned[0] == server_round:
        request = ConfigRecord({"coordinator-run": train_config["coordinator-run"], "planned-evaluations": len(planned)})
        messages = strategy.configure_evaluate(server_round, arrays, request, grid)
        federated = strategy.aggregate_evaluate(server_round, _send_and_receive(grid, messages, timeout))
        for line in strategy.evaluation_lines:  # a hospital that declined or was rejected: one line each
            print(line, flush=True)
        if federated:
            record.update({f"federated_{key}": value for key, value in federated.items()})
            record["hospitals_evaluation"] = strategy.round_evaluation
    record["hospitals_trained"] = int(train_summary["hospitals-trained"])
    return arrays, record, strategy.last_outcome
