"""How a hospital draws its DP-SGD batches: expected batch, Poisson rate q, steps per round.

Public numbers from public settings and the hospital's example count; both sides and the
audit compute them here. Kept apart from common.privacy so that the launcher and the audit's
config checks need not import dp-accounting for them.
"""
from __future__ import annotations

import math

AUTO_BATCH_SIZES = (16, 128)  # the smallest and largest expected batch "auto" picks


def expected_batch_size(batch_size: int | str, num_examples: int) -> int:
    """A hospital's expected batch: `train.batch_size`, or for "auto" one chosen from its own n.

    "auto" takes the largest power of two up to n / 4, within 16..128 (and never more than n:
    a hospital of a few images then plans, finds no useful noise level and declines, rather
    than the whole federation being refused for it). Every round then has
    at least about 4 DP-SGD steps (momentum needs steps to build up), and no hospital goes
    past 128, the best batch measured on blood cells (n 536-1,051; 64 lost 14 points and 256
    3-5). Measured against n / 2 (BENCHMARKS.md section 3): n / 4 gives BreastMNIST (n ~110)
    16 and balanced accuracy 0.546 over 24 runs against 0.535 over 8, within its run-to-run
    spread; the digits (n ~260) lose 2-3 points at 64 against 128; blood cells get 128 either
    way. The rule stands on giving small hospitals more than 2-3 steps a round.
    """
    if batch_size != "auto":
        return int(batch_size)
    low, high = AUTO_BATCH_SIZES
    return int(min(num_examples, high, max(low, 2 ** math.floor(math.log2(max(1.0, num_examples / 4))))))


def sampling_rate_for(batch_size: int | str, num_examples: int) -> float:
    """Poisson rate q giving an expected batch of `batch_size` (or "auto") out of `num_examples`."""
    return min(1.0, expected_batch_size(batch_size, num_examples) / num_examples)


def steps_for(local_epochs: float, sampling_rate: float) -> int:
    """DP-SGD steps for `local_epochs` expected passes over the data."""
    return max(1, math.ceil(local_epochs / sampling_rate))


def patient_sampling(batch_size: int | str, local_epochs: float, num_patients: int) -> tuple[float, int]:
    """(q, steps) for patient-level DP-SGD, where the unit drawn and clipped is the patient.

    Everything counts patients, not images: `batch_size` is the expected number of patients
    per batch ("auto" picks it from the number of patients P as it would from n), q is that
    over P, and an epoch is one expected pass over the patients. The per-image functions
    above, given P for n, give the same numbers; this names the unit so that callers do not
    pass an image count by mistake."""
    q = sampling_rate_for(batch_size, num_patients)
    return q, steps_for(local_epochs, q)
