"""DP-SGD for the hospital's CNN: per-example clipping without per-example gradients.

Textbook DP-SGD (Abadi et al. 2016) with Poisson sampling. Every step draws each of the n
examples independently with probability q, clips each example's gradient to global L2 norm
C, sums, adds N(0, (sigma*C)^2) to every coordinate and divides by the *expected* batch size
q*n. The drawn size depends on who is in the data, so it is never used as the divisor, and
an empty draw is a valid, noise-only step.

Why it is fast: each example's gradient norm and the clipped sum come from one backward
pass, layer by layer, without materialising per-example gradients (common/layer_terms.py).
Models whose layers that walk does not know run on a correct, slower path
(tf.vectorized_map over examples), with one warning per process.

Patient-level DP-SGD (`units=`): when each image's patient is known, the unit of privacy can
be the patient. Each step then Poisson-samples patients at rate q, clips the SUM of each
drawn patient's image gradients to C as one unit, adds the same noise and divides by the
expected number of patients q*P. A patient's images are one unit with more positions in the
same layer terms (common/layer_terms.py, common/unit_batch.py), so it costs about as much as
per-image DP-SGD on the same images.
"""
from __future__ import annotations

import logging
import math
import secrets
import time
from dataclasses import dataclass

import numpy as np

from common.layer_terms import (Units, clip_factors, conv_terms, conv_unit_terms, dense_terms, dense_unit_terms,
                                 finite_rows, loss_from_logits, make_plan, per_example_bytes, rows_finite, unit_sums)
from common.model import model_input, per_example_loss
from common.tf_setup import tf
from common.unit_batch import UnitIndex

log = logging.getLogger(__name__)

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


@dataclass
class TrainStats:
    """What one call of DPSGDEngine.train did. mean_loss is on training data: keep it local."""

    steps: int  # DP-SGD steps run (each one noisy update)
    batch_sizes: list[int]  # Poisson-drawn batch size of every step, in units (images or patients; may be 0)
    mean_loss: float  # mean per-image loss over all drawn images (nan if none drawn)
    seconds: float  # wall-clock time of the whole call
    images: list[int] | None = None  # patient-level training: images drawn at every step


class DPSGDEngine:
    """DP-SGD trainer for one Keras model: Poisson sampling, per-example clipping, Gaussian noise.

    The model's trainable variables are updated in place. `seed=None` draws the sampling and
    noise seed from the OS entropy pool (what production must use); an int makes runs
    reproducible for tests. `jit_compile` selects XLA with fixed-size masked batches (True)
    or a graph whose batch dimension is left unknown (False, the default: faster here, see
    bench/DP_SGD_RESULTS.md). Either way no step retraces when the drawn size changes.
    """

    def __init__(self, model, *, l2_norm_clip: float, noise_multiplier: float, learning_rate: float,
                 momentum: float = 0.0, seed: int | None = None, jit_compile: bool = False,
                 memory_budget: int = 2**30):
        for name, value, ok in (
            ("l2_norm_clip", l2_norm_clip, l2_norm_clip > 0),
            ("noise_multiplier", noise_multiplier, noise_multiplier >= 0),
            ("learning_rate", learning_rate, learning_rate > 0),
            ("momentum", momentum, 0 <= momentum < 1),
        ):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
                raise ValueError(f"DPSGDEngine: bad {name}={value!r}")
        if not model.built or not model.trainable_variables:
            raise ValueError("DPSGDEngine: the model must be built and have trainable variables")
        self.model = model
        self.l2_norm_clip = float(l2_norm_clip)
        # A variable, not a constant baked into the trace: with planned noise every hospital
        # has its own sigma, and one compiled step must serve them all.
        self._noise_multiplier = tf.Variable(float(noise_multiplier), trainable=False, dtype=tf.float32)
        # Also a variable: the step size follows a schedule over the rounds (set per round).
        self._learning_rate = tf.Variable(float(learning_rate), trainable=False, dtype=tf.float32)
        self.momentum = float(momentum)
        self.jit_compile = bool(jit_compile)
        # One 128-bit secret when unseeded: the noise must not be predictable by anyone who
        # sees the code, and numpy's default seeding is not meant for that.
        self._rng = np.random.Generator(np.random.PCG64(secrets.randbits(128) if seed is None else seed))
        self._variables = list(model.trainable_variables)
        self._velocity = ([tf.Variable(tf.zeros_like(v), trainable=False) for v in self._variables]
                          if self.momentum else None)
        self._plan, reason = make_plan(model, self._variables)
        self.fast_path = self._plan is not None
        # Examples processed at once: per-example terms (im2col patches, per-example kernels,
        # activations) grow with the image, so a 224 px batch of 256 would need ~15 GB.
        # Clipping is per example, so summing chunk by chunk is exact.
        self.chunk_size = max(1, int(memory_budget // per_example_bytes(model, self._plan)))
        if not self.fast_path:
            _warn_once(reason, f"DP-SGD: {reason}; using the slower per-example-gradient path "
                               "(tf.vectorized_map), which is exact but several times slower")
        self._functions: dict = {}

    # ------------------------------------------------------------------ public API

    @property
    def noise_multiplier(self) -> float:
        return float(self._noise_multiplier.numpy())

    @noise_multiplier.setter
    def noise_multiplier(self, value: float) -> None:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"DPSGDEngine: bad noise_multiplier={value!r}")
        self._noise_multiplier.assign(float(value))

    @property
    def learning_rate(self) -> float:
        return float(self._learning_rate.numpy())

    @learning_rate.setter
    def learning_rate(self, value: float) -> None:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"DPSGDEngine: bad learning_rate={value!r}")
        self._learning_rate.assign(float(value))

    def reset_optimizer(self) -> None:
        """Zero the momentum, so a reused engine starts a new round afresh."""
        for velocity in self._velocity or []:
            velocity.assign(tf.zeros_like(velocity))

    def velocity(self) -> list[np.ndarray] | None:
        """The momentum buffers (None without momentum): the optimizer's state after a round."""
        return None if self._velocity is None else [v.numpy() for v in self._velocity]

    def set_velocity(self, arrays) -> bool:
        """Start from momentum buffers a previous round left; False (and zeros) if they do not fit.

        The buffers are sums of this hospital's own noisy gradients: post-processing, so
        carrying them costs no privacy, and they never leave the hospital."""
        self.reset_optimizer()
        if self._velocity is None or arrays is None or len(arrays) != len(self._velocity):
            return False
        if any(tuple(a.shape) != tuple(v.shape) or not np.all(np.isfinite(a))
               for a, v in zip(arrays, self._velocity)):
            return False
        for variable, value in zip(self._velocity, arrays):
            variable.assign(np.asarray(value, np.float32))
        return True

    def clipped_gradient_sum(self, x, y, *, units=None) -> list[np.ndarray]:
        """Noise-free sum over examples of each example's gradient clipped to l2_norm_clip
        (global L2 norm over all trainable variables), in model.trainable_variables order.

        With `units` (one patient index 0..P-1 per image), the sum over patients of each
        patient's summed image gradients, clipped to l2_norm_clip as one."""
        x_all, y_all = self._as_tensors(x, y)
        if units is None:
            sums, _ = self._accumulate(x_all, y_all, np.arange(len(x), dtype=np.int32), self.chunk_size)
        else:
            index = UnitIndex(units, len(x))
            sums, _ = self._accumulate_units(x_all, y_all, index, np.arange(index.count), *self._unit_limits(index))
        return [s.numpy() for s in sums]

    def train(self, x, y, *, sampling_rate: float, steps: int, units=None) -> TrainStats:
        """Run `steps` DP-SGD steps on (x, y) with Poisson sampling rate q = sampling_rate.

        `units=None`: the unit is the image (q = expected batch / n). `units`: an int array
        giving each image's patient 0..P-1; the unit is the patient (q = expected patients
        per batch / P), each drawn patient's summed gradient is clipped to C, and the noisy
        sum is divided by q*P."""
        start = time.perf_counter()
        if not (isinstance(sampling_rate, (int, float)) and 0 < sampling_rate <= 1):
            raise ValueError(f"DPSGDEngine.train: sampling_rate must be in (0, 1], got {sampling_rate!r}")
        if not (isinstance(steps, (int, np.integer)) and steps >= 0):
            raise ValueError(f"DPSGDEngine.train: steps must be a non-negative int, got {steps!r}")
        n = len(x)
        if n == 0 or len(y) != n:
            raise ValueError(f"DPSGDEngine.train: need as many labels as examples (>0), got {n} and {len(y)}")
        if units is not None:
            return self._train_units(x, y, UnitIndex(units, n), sampling_rate, int(steps), start)
        x_all, y_all = self._as_tensors(x, y)
        # Public divisor: the expected batch size, never the drawn one.
        scale = tf.constant(1.0 / (sampling_rate * n), tf.float32)
        fns = self._fns(x_all, y_all)
        pad = _pad_size(n, sampling_rate) if self.jit_compile else None
        loss_sums, sizes = [], []
        for _ in range(int(steps)):
            idx = np.flatnonzero(self._rng.random(n) < sampling_rate).astype(np.int32)
            seed = tf.constant(self._rng.integers(0, 2**62, size=2), tf.int64)
            sizes.append(len(idx))
            if len(idx) == 0:
                fns["apply"]([tf.zeros_like(v) for v in self._variables], seed, scale)
            elif not self.jit_compile and len(idx) <= self.chunk_size:
                loss_sums.append(fns["step"](x_all, y_all, tf.constant(idx), seed, scale))
            elif not self.jit_compile:  # large images: per-example terms chunk by chunk, one update
                sums, loss_sum = self._accumulate(x_all, y_all, idx, self.chunk_size)
                fns["apply"](sums, seed, scale)
                loss_sums.append(loss_sum)
            elif len(idx) <= pad:
                loss_sums.append(fns["step"](x_all, y_all, *_pad(idx, pad), seed, scale))
            else:  # rare overflow of the padded size: accumulate in chunks, then one update
                sums, loss_sum = self._accumulate(x_all, y_all, idx, pad)
                fns["apply"](sums, seed, scale)
                loss_sums.append(loss_sum)
        drawn = sum(sizes)
        mean_loss = float(tf.add_n(loss_sums).numpy()) / drawn if drawn else math.nan
        return TrainStats(steps=int(steps), batch_sizes=sizes, mean_loss=mean_loss,
                          seconds=time.perf_counter() - start)

    def _train_units(self, x, y, index: UnitIndex, q: float, steps: int, start: float) -> TrainStats:
        """train() with patients as units: Poisson-sample patients, clip each one's summed gradient."""
        x_all, y_all = self._as_tensors(x, y)
        # Public divisor: the expected number of patients, never the drawn one.
        scale = tf.constant(1.0 / (q * index.count), tf.float32)
        fns = self._fns(x_all, y_all)
        limits = self._unit_limits(index, q)
        loss_sums, sizes, images = [], [], []
        for _ in range(steps):
            drawn = np.flatnonzero(self._rng.random(index.count) < q)
            seed = tf.constant(self._rng.integers(0, 2**62, size=2), tf.int64)
            batch = index.batch(drawn)
            sizes.append(len(drawn))
            images.append(batch.images)
            if len(drawn) == 0:
                fns["apply"]([tf.zeros_like(v) for v in self._variables], seed, scale)
            elif batch.images <= limits[0] and (limits[1] is None or batch.pairs <= limits[1]):
                loss_sums.append(fns["unit_step"](x_all, y_all, *self._unit_tensors(batch, limits), seed, scale))
            else:  # more images than fit at once: whole patients chunk by chunk, then one update
                sums, loss_sum = self._accumulate_units(x_all, y_all, index, drawn, *limits)
                fns["apply"](sums, seed, scale)
                loss_sums.append(loss_sum)
        total = sum(images)
        mean_loss = float(tf.add_n(loss_sums).numpy()) / total if total else math.nan
        return TrainStats(steps=steps, batch_sizes=sizes, mean_loss=mean_loss,
                          seconds=time.perf_counter() - start, images=images)

    # ------------------------------------------------------------------ internals

    def _as_tensors(self, x, y):
        # uint8 images stay uint8 (a quarter of the memory); each batch is scaled when gathered.
        x = np.asarray(x)
        if x.dtype != np.uint8:
            x = x.astype(np.float32, copy=False)
        y = np.asarray(y)
        y = y.astype(np.int32) if np.issubdtype(y.dtype, np.integer) else y.astype(np.float32)
        return tf.convert_to_tensor(x), tf.convert_to_tensor(y)

    def _fns(self, x_all, y_all):
        """The compiled functions for this data's shape/dtype (traced once, any batch size)."""
        key = (tuple(x_all.shape[1:]), x_all.dtype, y_all.dtype, tuple(y_all.shape[1:]))
        if key in self._functions:
            return self._functions[key]
        x_spec = tf.TensorSpec([None, *x_all.shape[1:]], x_all.dtype)
        y_spec = tf.TensorSpec([None, *y_all.shape[1:]], y_all.dtype)
        idx_spec = tf.TensorSpec([None], tf.int32)
        seed_spec = tf.TensorSpec([2], tf.int64)
        scale_spec = tf.TensorSpec([], tf.float32)
        sums_spec = [tf.TensorSpec(v.shape, v.dtype) for v in self._variables]
        jit = self.jit_compile

        def accumulate(x_all, y_all, idx, mask=None):
            x, y = model_input(tf.gather(x_all, idx)), tf.gather(y_all, idx)
            return self._clipped_sum(x, y, mask)

        def step(x_all, y_all, idx, mask, seed, scale):
            sums, loss_sum = accumulate(x_all, y_all, idx, mask)
            self._apply(sums, seed, scale)
            return loss_sum

        # Patient-level batches: each image's unit within the batch, and the same-unit image pairs.
        unit_spec = [idx_spec, idx_spec, idx_spec, tf.TensorSpec([None], tf.float32)]

        def accumulate_units(x_all, y_all, idx, mask, segment, first, second, weight):
            x, y = model_input(tf.gather(x_all, idx)), tf.gather(y_all, idx)
            return self._clipped_unit_sum(x, y, mask, Units(segment, first, second, weight))

        def unit_step(x_all, y_all, idx, mask, segment, first, second, weight, seed, scale):
            sums, loss_sum = accumulate_units(x_all, y_all, idx, mask, segment, first, second, weight)
            self._apply(sums, seed, scale)
            return loss_sum

        fns = {"apply": tf.function(self._apply, jit_compile=jit,
                                    input_signature=[sums_spec, seed_spec, scale_spec])}
        if jit:
            # XLA compiles one program per shape: pad every draw to a fixed size and mask.
            mask_spec = tf.TensorSpec([None], tf.float32)
            fns["step"] = tf.function(step, jit_compile=True, input_signature=[
                x_spec, y_spec, idx_spec, mask_spec, seed_spec, scale_spec])
            fns["accumulate"] = tf.function(accumulate, jit_compile=True, input_signature=[
                x_spec, y_spec, idx_spec, mask_spec])
            fns["unit_step"] = tf.function(unit_step, jit_compile=True, input_signature=[
                x_spec, y_spec, idx_spec, mask_spec, *unit_spec, seed_spec, scale_spec])
            fns["unit_accumulate"] = tf.function(accumulate_units, jit_compile=True, input_signature=[
                x_spec, y_spec, idx_spec, mask_spec, *unit_spec])
        else:
            fns["step"] = tf.function(lambda x_all, y_all, idx, seed, scale: step(
                x_all, y_all, idx, None, seed, scale),
                input_signature=[x_spec, y_spec, idx_spec, seed_spec, scale_spec])
            fns["accumulate"] = tf.function(accumulate, input_signature=[x_spec, y_spec, idx_spec])
            fns["unit_step"] = tf.function(lambda x_all, y_all, idx, *rest: unit_step(
                x_all, y_all, idx, None, *rest), input_signature=[
                x_spec, y_spec, idx_spec, *unit_spec, seed_spec, scale_spec])
            fns["unit_accumulate"] = tf.function(lambda x_all, y_all, idx, *rest: accumulate_units(
                x_all, y_all, idx, None, *rest), input_signature=[x_spec, y_spec, idx_spec, *unit_spec])
        self._functions[key] = fns
        return fns

    def _accumulate(self, x_all, y_all, idx, pad=256):
        """Clipped sum over the examples at idx, in chunks of at most `pad` (bounded memory)."""
        fns = self._fns(x_all, y_all)
        sums, loss_sum = [tf.zeros_like(v) for v in self._variables], tf.constant(0.0)
        for start in range(0, len(idx), pad):
            chunk = idx[start:start + pad]
            if self.jit_compile:
                part, part_loss = fns["accumulate"](x_all, y_all, *_pad(chunk, pad))
            else:
                part, part_loss = fns["accumulate"](x_all, y_all, tf.constant(chunk))
            sums = [a + b for a, b in zip(sums, part)]
            loss_sum += part_loss
        return sums, loss_sum

    def _unit_limits(self, index: UnitIndex, q: float = 1.0) -> tuple[int, int | None]:
        """(images, pairs) per compiled call: the memory chunk, or under XLA the fixed padded sizes."""
        if not self.jit_compile:
            return self.chunk_size, None
        images, pairs = index.pad_sizes(q)
        # A chunk never needs more room than the memory budget allows, nor less than the largest patient.
        largest = int(index.sizes.max())
        images = max(min(images, self.chunk_size), largest)
        return images, max(min(pairs, index.pair_count()), largest * (largest + 1) // 2)

    def _unit_tensors(self, batch, limits):
        """The compiled unit functions' batch arguments: padded to the fixed sizes under XLA."""
        if self.jit_compile:
            return [tf.constant(t) for t in batch.padded(*limits)]
        return [tf.constant(t) for t in (batch.idx, batch.segment, batch.first, batch.second, batch.weight)]

    def _accumulate_units(self, x_all, y_all, index: UnitIndex, units, max_images, max_pairs=None):
        """Clipped sum over whole units, in chunks of whole units (a unit's norm needs all its images)."""
        fns = self._fns(x_all, y_all)
        sums, loss_sum = [tf.zeros_like(v) for v in self._variables], tf.constant(0.0)
        limits = (max_images, max_pairs)
        for chunk in index.chunks(units, max_images, max_pairs):
            part, part_loss = fns["unit_accumulate"](x_all, y_all, *self._unit_tensors(index.batch(chunk), limits))
            sums = [a + b for a, b in zip(sums, part)]
            loss_sum += part_loss
        return sums, loss_sum

    def _apply(self, sums, seed, scale):
        """Add N(0, (sigma C)^2) to the clipped sum, divide by q*n, take one SGD step."""
        sizes = [int(np.prod(v.shape)) for v in self._variables]
        noise = tf.random.stateless_normal([sum(sizes)], seed=seed,
                                           stddev=self._noise_multiplier * self.l2_norm_clip)
        for i, (v, s, z) in enumerate(zip(self._variables, sums, tf.split(noise, sizes))):
            grad = (s + tf.reshape(z, v.shape)) * scale
            if self._velocity is None:
                v.assign_sub(self._learning_rate * grad)
            else:  # tf-keras legacy SGD: velocity = m*velocity - lr*g; w += velocity
                vel = self._velocity[i]
                vel.assign(self.momentum * vel - self._learning_rate * grad)
                v.assign_add(vel)

    def _clipped_sum(self, x, y, mask):
        """(clipped gradient sum per variable, summed loss) for one batch; mask zeroes padding."""
        if self._plan is None:
            return self._clipped_sum_slow(x, y, mask)
        return self._clipped_sum_fast(x, y, mask)

    def _clipped_sum_fast(self, x, y, mask):
        records, grads, losses = self._forward_backward(x, y, mask)
        sq_norm = tf.zeros_like(losses)
        finish = []  # per record: function of clip factors c -> {var index: clipped sum}
        for (p, a, _), g in zip(records, grads):
            if p.kind == "dense":
                sq, fin = dense_terms(p, a, g)
            else:
                sq, fin = conv_terms(p, a, g)
            sq_norm += sq
            finish.append(fin)
        clip, finite = clip_factors(sq_norm, losses, self.l2_norm_clip)
        return self._finish(finish, clip), tf.reduce_sum(tf.where(finite, losses, 0.0))

    def _finish(self, finish, clip):
        """The clipped sum per variable from each layer's builder and the clip factors."""
        sums = [None] * len(self._variables)
        for fin in finish:
            for index, value in fin(clip).items():
                sums[index] = value
        return sums

    def _forward_backward(self, x, y, mask):
        """One forward pass keeping each trainable layer's input a and pre-activation z, and dL/dz.

        Returns ([(plan entry, a, z)], [dL/dz], per-example losses (masked))."""
        records = []  # (plan entry, layer input a, pre-activation z)
        with tf.GradientTape(watch_accessed_variables=False, persistent=False) as tape:
            h = x
            last = len(self._plan) - 1
            logits = None
            for i, p in enumerate(self._plan):
                if p.kind == "call":
                    h = p.layer(h, training=False)
                    continue
                layer = p.layer
                z = tf.matmul(h, layer.kernel) if p.kind == "dense" else layer.convolution_op(h, layer.kernel)
                if layer.use_bias:
                    z = tf.nn.bias_add(z, layer.bias)
                tape.watch(z)
                records.append((p, h, z))
                act = getattr(layer.activation, "__name__", "")
                if i == last and act in ("softmax", "sigmoid"):
                    logits = z  # cross-entropy from logits: what Keras itself does, and stabler
                h = layer.activation(z)
            losses = loss_from_logits(y, logits, act) if logits is not None else per_example_loss(y, h)
            if mask is not None:
                losses = losses * mask
            total = tf.reduce_sum(losses)
        return records, tape.gradient(total, [z for _, _, z in records]), losses

    def _clipped_unit_sum(self, x, y, mask, units):
        """(clipped sum per variable, summed loss) over the units (patients) of one batch."""
        if self._plan is None:
            return self._clipped_unit_sum_slow(x, y, mask, units)
        records, grads, losses = self._forward_backward(x, y, mask)
        # An image with a non-finite loss, activation or gradient counts as zero within its
        # unit (as a non-finite example does per image): its rows are zeroed before any sum.
        keep = tf.math.is_finite(losses)
        for (_, a, _), g in zip(records, grads):
            keep &= rows_finite(a) & rows_finite(g)
        sq_norm = tf.zeros_like(losses)  # one entry per unit slot (units are numbered < b)
        finish = []
        for (p, a, _), g in zip(records, grads):
            terms = dense_unit_terms if p.kind == "dense" else conv_unit_terms
            sq, fin = terms(p, a, g, units, keep)
            sq_norm += sq
            finish.append(fin)
        # A unit whose summed norm still overflows counts as zero (clip_factors gives it 0).
        clip, _ = clip_factors(sq_norm, tf.zeros_like(sq_norm), self.l2_norm_clip)
        return self._finish(finish, clip), tf.reduce_sum(tf.where(keep, losses, 0.0))

    def _clipped_sum_slow(self, x, y, mask):
        per_ex, losses = self._per_example_gradients(x, y, mask)
        sq = tf.add_n([tf.reduce_sum(tf.reshape(tf.square(g), [tf.shape(g)[0], -1]), 1) for g in per_ex])
        clip, finite = clip_factors(sq, losses, self.l2_norm_clip)
        sums = [tf.tensordot(clip, finite_rows(g, finite), 1) for g in per_ex]
        return sums, tf.reduce_sum(tf.where(finite, losses, 0.0))

    def _per_example_gradients(self, x, y, mask):
        """Every example's gradient of every variable (tf.vectorized_map), and the losses; mask zeroes padding."""
        variables = self._variables
        model = self.model

        def one_example(args):
            xi, yi = args
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(per_example_loss(yi[None], model(xi[None], training=False)))
            grads = tape.gradient(loss, variables)
            return [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables)], loss

        per_ex, losses = tf.vectorized_map(one_example, (x, y))
        if mask is not None:
            per_ex = [g * tf.reshape(mask, [-1] + [1] * (g.shape.rank - 1)) for g in per_ex]
            losses = losses * mask
        return per_ex, losses

    def _clipped_unit_sum_slow(self, x, y, mask, units):
        """The exact per-unit path for models the layer walk does not cover: per-image gradients, summed per unit."""
        per_ex, losses = self._per_example_gradients(x, y, mask)
        sq = tf.add_n([tf.reduce_sum(tf.reshape(tf.square(g), [tf.shape(g)[0], -1]), 1) for g in per_ex])
        _, keep = clip_factors(sq, losses, self.l2_norm_clip)  # finite images only
        per_unit = [unit_sums(finite_rows(g, keep), units) for g in per_ex]
        unit_sq = tf.add_n([tf.reduce_sum(tf.reshape(tf.square(g), [tf.shape(g)[0], -1]), 1) for g in per_unit])
        clip, _ = clip_factors(unit_sq, tf.zeros_like(unit_sq), self.l2_norm_clip)
        return [tf.tensordot(clip, g, 1) for g in per_unit], tf.reduce_sum(tf.where(keep, losses, 0.0))


def scheduled_learning_rate(base: float, schedule: str, round_number: int, rounds: int) -> float:
    """The step size of round `round_number` of `rounds`: never above `base`.

    cosine (Loshchilov and Hutter 2017, per round): large steps while the model is far from
    a solution, small ones at the end, where under DP noise a large step mostly moves the
    weights by noise. Every round's rate is at most the base rate, which the coordinator's
    bound on an honest update (server/replies.py) relies on."""
    if schedule == "constant":
        return base
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}")
    progress = min(max(round_number - 1, 0), rounds) / max(rounds, 1)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def _pad_size(n, q):
    """Fixed XLA batch size: mean + 4 standard deviations of the Poisson draw, rounded up to 8.

    A larger draw (probability below 1e-4 per step) is still handled exactly, in chunks."""
    bound = n * q + 4 * math.sqrt(n * q * (1 - q)) + 1
    return int(min(n, 8 * math.ceil(bound / 8)))


def _pad(idx, size):
    """Indices padded to `size` (repeating index 0) and the 0/1 mask of real rows."""
    pidx = np.zeros(size, np.int32)
    pidx[: len(idx)] = idx
    mask = np.zeros(size, np.float32)
    mask[: len(idx)] = 1.0
    return tf.constant(pidx), tf.constant(mask)
