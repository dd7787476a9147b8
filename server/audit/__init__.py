"""Independent audit of a privacy ledger: re-derive every epsilon from the mechanism fields alone.

    python -m server.audit runs/RUN_DIR                      # summary; exit 0 if every figure recomputes
    python -m server.audit runs/RUN_DIR --rounds             # ... and the per-round table
    python -m server.audit runs/RUN_DIR/privacy_ledger.jsonl --accountant pld
    python -m server.audit runs/RUN_DIR --json               # one JSON object instead of the table
    python -m server.audit runs/RUN_DIR --plot epsilon.png   # cumulative epsilon per hospital (or --plot DIR)
    python -m server.audit runs/RUN_DIR --odometer /var/lib/hospital-fl/odometer.jsonl

Layout: reading.py (ledger, run files, field checks), accounting.py (PLD/RDP), checks.py (the
audit), odometer.py (the ledger against the odometers), output.py (summary, table, plot), cli.py
(arguments only; `__main__.py` runs it).

Exit status: 0 every check passes; 1 discrepancies (listed, numbered); 2 bad input (missing
file, malformed JSON line, missing field, values beyond what can be recomputed: one line on
stderr, never a traceback).

Trust boundary. This package is for a privacy officer who does not trust the training code, so it
imports only the standard library, numpy, matplotlib, PyYAML and dp_accounting: nothing that trains
(no tensorflow, no common.*, client.* or other server.* module). It reads the ledger's public
mechanism fields (noise multiplier, Poisson sampling rate, steps) and recomputes.

Privacy unit: one example of one hospital's training set, zero-out adjacency (equivalently
add/remove-one with the data set size n public, which every record carries). The
mechanism is DP-SGD with Poisson subsampling; anything else is refused ("unsupported sampling").

Canonical accounting (the training side computes it the same way):
  1. A hospital's events are its `prior_events` (spend on the same data before this ledger,
     written on its first record), every `added_prior_events` of its records up to the round in
     question (charges on the same data that entered its odometer view during the run: another
     run, or a simulated shard sharing images), and each of its records with steps > 0, up to
     and including that round. Events with 0 steps compose nothing and are dropped
     (dp_accounting also refuses a count of 0). `unit` ("image" or "patient", absent: "image")
     says what one example is; it is shown and must not change within a hospital.
  2. Events with identical (noise_multiplier, sampling_rate, sampling) form one group whose
     steps are summed: composition is commutative, and one self-composition per group keeps
     PLD exact (a single FFT power) and fast.
  3. Each group is SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps);
     the groups are composed, in order of first appearance, into
     dp_accounting.pld.PLDAccountant() with default arguments, and get_epsilon(delta) is the
     figure. A hospital with no steps has epsilon 0; any group with sigma == 0 gives inf.
  4. Cross-check: dp_accounting.rdp.RdpAccountant() with default orders, same events. RDP is
     an upper bound, so PLD above RDP by more than 1% is noted (it should not happen).

Speed. PLDAccountant rebuilds the subsampled-Gaussian PLD for every call and self-composes each
group from scratch (0.2-0.5 s a record), so the audit builds that PLD once per (sigma, q) with
the very call and arguments the accountant uses, self-composes one round's steps once, and
composes each of a hospital's records onto the PLD of its record before (one convolution, then
get_epsilon_for_delta); RDP sums count * RDP(q, sigma) over groups. The incremental figures
differ from PLDAccountant's in about the tenth digit, so every audit checks its most complex
history against PLDAccountant (within 1e-8) and RdpAccountant (bit for bit): a changed
dp_accounting is caught rather than trusted. Identical histories are computed once, and
hospitals are spread over processes for large ledgers (--jobs). 5 hospitals x 20 rounds, each
with its own sigma and q: ~7 s (24-28 s before incremental composition, on 2 shared cores).

Checks, each failure one numbered discrepancy:
  - reported epsilon equals the PLD recomputation (relative 1e-6, absolute 1e-9 near zero);
    an understated figure is the serious case, an overstated one is still a mismatch;
  - no epsilon (reported or recomputed) exceeds the hospital's max_epsilon;
  - max_epsilon and delta never change for a hospital; steps == 0 when budget_exhausted;
    rounds strictly increase per hospital; types and ranges: 0 < q <= 1, sigma >= 0,
    steps >= 0, 0 < delta < 1, sampling "poisson", accountant "pld"; steps > 0 when trained;
    at most 1e7 steps per record and sigma 0 or >= 0.1 (beyond that, recomputing would not end);
  - against config.yaml beside the ledger: sigma equals dp.noise_multiplier (with "auto", it
    stays fixed per hospital), q = min(1, batch_size / num_examples), trained steps =
    max(1, ceil(local_epochs / q));
  - with every hospital asked every round (fraction_train 1): no hospital's records stop
    before the run's last round without a budget_exhausted record (unless status.json names
    it failed or rejected), and every configured hospital has records;
  - metrics.jsonl: no round has more hospitals_trained than trained ledger records;
  - --odometer FILE (odometer.py): the hash chain is intact; by the run id (checkpoint/state.json)
    and (hospital, round), the ledger holds exactly the odometer's charges of this run, for every
    hospital in the odometer, with their delta; prior_events and added_prior_events are the
    odometer's other charges counted for the hospital's data; the headline maximum takes the
    larger of the ledger's and the odometer's figure. Without it the verdict says what a ledger
    alone cannot show.
  - evaluation_ledger.jsonl beside the ledger (evaluation.py): every evaluation epsilon (noisy
    per-class counts, one Gaussian event per evaluation, sampling rate 1) recomputed the same
    way, within the hospital's evaluation budget, its delta equal to the training delta; with
    --odometer FILE, against FILE's `.eval.jsonl` sibling. The output gives each hospital's
    training and evaluation epsilon and the patient's (the larger).
"""
from server.audit.accounting import _pld_epsilon, _rdp_epsilon, reference_epsilons  # noqa: F401
from server.audit.checks import ACCOUNTANTS, AuditReport, AuditRow, HospitalSummary, audit_ledger  # noqa: F401
from server.audit.cli import main  # noqa: F401
from server.audit.output import format_report, plot_report  # noqa: F401
from server.audit.reading import LEDGER_NAME, LedgerError, RunContext, ledger_path, read_context, read_ledger  # noqa: F401
