"""DP-SGD for the hospital's CNN: per-example clipping without per-example gradients.

Textbook DP-SGD (Abadi et al. 2016) with Poisson sampling. Every step draws each of the n
examples independently with probability q, clips each example's gradient to global L2 norm
C, sums, adds N(0, (sigma*C)^2) to every coordinate and divides by the *expected* batch size
q*n. The drawn size depends on who is in the data, so it is never used as the divisor, and
an empty draw is a valid, noise-only step.

Why it is fast: a Sequential model of Conv2D/Dense layers is walked layer by layer, keeping
each layer's input a and pre-activation z. One backward pass of the summed per-example
losses gives dL/dz, and because no layer mixes examples, row i of dL/dz belongs to example i
alone. From (a, dL/dz) each example's squared gradient norm is exact and cheap:

- Dense (2-D input): ||a_i||^2 ||g_i||^2 for the kernel, ||g_i||^2 for the bias.
- Conv2D: the per-example kernel gradient patches_i^T g_i (materialised for one layer at a
  time, b*K*O floats; the clipped sum is then a weighted sum of them), or, for tiny feature
  maps, the "ghost norm" sum_{t,s} (a_t . a_s)(g_t . g_s); the bias gradient is g summed over
  positions.

The clipped sum then needs no second backward pass: the clip factors c_i scale the rows of
dL/dz and one weight-gradient product per layer (matmul / Conv2DBackpropFilter, or a
weighted sum of the per-example kernels already computed) gives the sum. Layers the walk
does not know run on a correct, slower path (tf.vectorized_map over examples), with one
warning per process.
"""
from __future__ import annotations

import logging
import math
import secrets
import time
from dataclasses import dataclass

import numpy as np

from common.model import GroupNorm, model_input, per_example_loss
from common.tf_setup import keras, tf

log = logging.getLogger(__name__)

# Layers without trainable weights that act on each example on its own (called with
# training=False: the engine clips one example's influence, and inference-mode layers are
# per-example by construction).
_PER_EXAMPLE_LAYERS = (
    keras.layers.InputLayer,
    keras.layers.Flatten,
    keras.layers.Reshape,
    keras.layers.Permute,
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
    keras.layers.Softmax,
    keras.layers.Dropout,
    keras.layers.SpatialDropout2D,
    keras.layers.GaussianNoise,
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling2D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.ZeroPadding2D,
    keras.layers.Cropping2D,
    keras.layers.Rescaling,
    keras.layers.GroupNormalization,  # only without scale/offset (no trainable weights): see _make_plan
    keras.layers.LayerNormalization,
    GroupNorm,
)

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


@dataclass
class TrainStats:
    """What one call of DPSGDEngine.train did. mean_loss is on training data: keep it local."""

    steps: int  # DP-SGD steps run (each one noisy update)
    batch_sizes: list[int]  # Poisson-drawn batch size of every step (may be 0)
    mean_loss: float  # mean per-example loss over all drawn examples (nan if none drawn)
    seconds: float  # wall-clock time of the whole call


@dataclass
class _LayerPlan:
    kind: str  # "dense", "conv" (trainable, handled by the fast path) or "call"
    layer: object
    kernel_index: int | None = None  # position in model.trainable_variables
    bias_index: int | None = None
    ghost: bool = False  # Conv2D: ghost norm (True) or per-example kernels (False)


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
        self._plan, reason = _make_plan(model, self._variables)
        self.fast_path = self._plan is not None
        # Examples processed at once: per-example terms (im2col patches, per-example kernels,
        # activations) grow with the image, so a 224 px batch of 256 would need ~15 GB.
        # Clipping is per example, so summing chunk by chunk is exact.
        self.chunk_size = max(1, int(memory_budget // _per_example_bytes(model, self._plan)))
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

    def clipped_gradient_sum(self, x, y) -> list[np.ndarray]:
        """Noise-free sum over examples of each example's gradient clipped to l2_norm_clip
        (global L2 norm over all trainable variables), in model.trainable_variables order."""
        x_all, y_all = self._as_tensors(x, y)
        sums, _ = self._accumulate(x_all, y_all, np.arange(len(x), dtype=np.int32), self.chunk_size)
        return [s.numpy() for s in sums]

    def train(self, x, y, *, sampling_rate: float, steps: int) -> TrainStats:
        """Run `steps` DP-SGD steps on (x, y) with Poisson sampling rate q = sampling_rate."""
        start = time.perf_counter()
        if not (isinstance(sampling_rate, (int, float)) and 0 < sampling_rate <= 1):
            raise ValueError(f"DPSGDEngine.train: sampling_rate must be in (0, 1], got {sampling_rate!r}")
        if not (isinstance(steps, (int, np.integer)) and steps >= 0):
            raise ValueError(f"DPSGDEngine.train: steps must be a non-negative int, got {steps!r}")
        n = len(x)
        if n == 0 or len(y) != n:
            raise ValueError(f"DPSGDEngine.train: need as many labels as examples (>0), got {n} and {len(y)}")
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

        fns = {"apply": tf.function(self._apply, jit_compile=jit,
                                    input_signature=[sums_spec, seed_spec, scale_spec])}
        if jit:
            # XLA compiles one program per shape: pad every draw to a fixed size and mask.
            mask_spec = tf.TensorSpec([None], tf.float32)
            fns["step"] = tf.function(step, jit_compile=True, input_signature=[
                x_spec, y_spec, idx_spec, mask_spec, seed_spec, scale_spec])
            fns["accumulate"] = tf.function(accumulate, jit_compile=True, input_signature=[
                x_spec, y_spec, idx_spec, mask_spec])
        else:
            fns["step"] = tf.function(lambda x_all, y_all, idx, seed, scale: step(
                x_all, y_all, idx, None, seed, scale),
                input_signature=[x_spec, y_spec, idx_spec, seed_spec, scale_spec])
            fns["accumulate"] = tf.function(accumulate, input_signature=[x_spec, y_spec, idx_spec])
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
            losses = _loss_from_logits(y, logits, act) if logits is not None else per_example_loss(y, h)
            if mask is not None:
                losses = losses * mask
            total = tf.reduce_sum(losses)
        grads = tape.gradient(total, [z for _, _, z in records])

        sq_norm = tf.zeros_like(losses)
        finish = []  # per record: function of clip factors c -> {var index: clipped sum}
        for (p, a, _), g in zip(records, grads):
            if p.kind == "dense":
                sq, fin = _dense_terms(p, a, g)
            else:
                sq, fin = _conv_terms(p, a, g)
            sq_norm += sq
            finish.append(fin)
        clip, finite = _clip_factors(sq_norm, losses, self.l2_norm_clip)
        sums = [None] * len(self._variables)
        for fin in finish:
            for index, value in fin(clip).items():
                sums[index] = value
        return sums, tf.reduce_sum(tf.where(finite, losses, 0.0))

    def _clipped_sum_slow(self, x, y, mask):
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
        sq = tf.add_n([tf.reduce_sum(tf.reshape(tf.square(g), [tf.shape(g)[0], -1]), 1) for g in per_ex])
        clip, finite = _clip_factors(sq, losses, self.l2_norm_clip)
        sums = [tf.tensordot(clip, _finite_rows(g, finite), 1) for g in per_ex]
        return sums, tf.reduce_sum(tf.where(finite, losses, 0.0))


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


def _clip_factors(sq_norm, losses, clip_norm):
    """(c_i = min(1, C/||g_i||), finite_i): c_i = 0 for an example whose gradient or loss is not finite.

    C / max(norm, C) does not bound NaN, and weights chosen by a hostile coordinator can make
    one example's loss overflow: that example then counts as zero (norm 0 <= C), so it moves
    the sum by at most C whatever the weights. Written so a zero gradient gives c_i = 1."""
    finite = tf.math.is_finite(sq_norm) & tf.math.is_finite(losses)
    safe_sq = tf.where(finite, sq_norm, 0.0)
    return tf.where(finite, clip_norm / tf.maximum(tf.sqrt(safe_sq), clip_norm), 0.0), finite


def _finite_rows(x, keep):
    """x with the rows (examples) where keep is False set to zero: 0 * NaN would still be NaN."""
    return tf.where(tf.reshape(keep, [-1] + [1] * (x.shape.rank - 1)), x, tf.zeros_like(x))


# ---------------------------------------------------------------------- layer maths


def _loss_from_logits(y, logits, activation):
    """Per-example cross-entropy from the last layer's logits (equal to per_example_loss)."""
    if activation == "sigmoid":
        labels = tf.reshape(tf.cast(y, logits.dtype), tf.shape(logits))
        return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits), -1)
    labels = tf.reshape(tf.cast(y, tf.int32), [-1])
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)


def _dense_terms(p, a, g):
    """Squared per-example norms and clipped-sum builder for a Dense layer on 2-D input."""
    g_sq = tf.reduce_sum(tf.square(g), 1)  # (b,)
    sq = tf.reduce_sum(tf.square(a), 1) * g_sq
    if p.bias_index is not None:
        sq += g_sq

    def finish(clip):
        keep = clip > 0  # rows of non-finite examples are zeroed, inputs included (inf * 0 is NaN)
        cg = _finite_rows(g, keep) * clip[:, None]
        out = {p.kernel_index: tf.matmul(_finite_rows(a, keep), cg, transpose_a=True)}
        if p.bias_index is not None:
            out[p.bias_index] = tf.reduce_sum(cg, 0)
        return out

    return sq, finish


def _conv_terms(p, a, g):
    """Squared per-example norms and clipped-sum builder for a Conv2D layer (NHWC)."""
    layer = p.layer
    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    dh, dw = layer.dilation_rate
    padding = layer.padding.upper()
    out_ch = g.shape[-1]
    b = tf.shape(a)[0]
    patches, k_major = _patches(a, layer, g.shape[1], g.shape[2])
    g_flat = tf.reshape(g, [b, -1, out_ch])  # (b, T, O)
    gb = None
    sq = 0.0
    if p.bias_index is not None:
        gb = tf.reduce_sum(g_flat, 1)  # (b, O)
        sq = tf.reduce_sum(tf.square(gb), 1)
    if p.ghost:
        # ||sum_t a_t g_t^T||^2 = sum_{t,s} (a_t . a_s)(g_t . g_s): cheaper when T is small.
        gram_a = tf.matmul(patches, patches, transpose_a=k_major, transpose_b=not k_major)  # (b, T, T)
        gram_g = tf.matmul(g_flat, g_flat, transpose_b=True)
        sq += tf.reduce_sum(gram_a * gram_g, [1, 2])
    else:
        per_ex_kernel = tf.matmul(patches, g_flat, transpose_a=not k_major)  # (b, K, O): one weight gradient's flops
        sq += tf.reduce_sum(tf.square(per_ex_kernel), [1, 2])

    def finish(clip):
        keep = clip > 0  # rows of non-finite examples are zeroed, inputs included (inf * 0 is NaN)
        if p.ghost:
            kernel = tf.raw_ops.Conv2DBackpropFilter(
                input=_finite_rows(a, keep), filter_sizes=tf.shape(layer.kernel),
                out_backprop=_finite_rows(g, keep) * clip[:, None, None, None],
                strides=[1, sh, sw, 1], padding=padding, dilations=[1, dh, dw, 1])
        else:
            kernel = tf.reshape(tf.tensordot(clip, _finite_rows(per_ex_kernel, keep), 1), layer.kernel.shape)
        out = {p.kernel_index: kernel}
        if gb is not None:
            out[p.bias_index] = tf.tensordot(clip, _finite_rows(gb, keep), 1)
        return out

    return sq, finish


def _patches(a, layer, h_out, w_out):
    """The im2col matrix of a Conv2D input, (b, T, K) or, flagged True, (b, K, T).

    T = h_out*w_out positions, K = kh*kw*c_in in the kernel's (kh, kw, c_in) order.
    Built from kh*kw strided slices of the padded input: on CPU this is several times faster
    than tf.image.extract_patches, which XLA also lowers to a wasteful identity convolution."""
    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    dh, dw = layer.dilation_rate
    height, width, c_in = a.shape[1], a.shape[2], a.shape[3]
    if layer.padding == "same":  # TF's SAME: the odd pixel of padding goes bottom/right
        ph = max((h_out - 1) * sh + (kh - 1) * dh + 1 - height, 0)
        pw = max((w_out - 1) * sw + (kw - 1) * dw + 1 - width, 0)
        a = tf.pad(a, [[0, 0], [ph // 2, ph - ph // 2], [pw // 2, pw - pw // 2], [0, 0]])
    cols = [a[:, i * dh: i * dh + (h_out - 1) * sh + 1: sh, j * dw: j * dw + (w_out - 1) * sw + 1: sw, :]
            for i in range(kh) for j in range(kw)]
    b = tf.shape(a)[0]
    if c_in == 1:  # stacking whole planes copies contiguous rows; concat on a 1-wide axis does not
        return tf.reshape(tf.stack(cols, 1), [b, kh * kw, h_out * w_out]), True
    return tf.reshape(tf.concat(cols, -1), [b, h_out * w_out, kh * kw * c_in]), False


# ---------------------------------------------------------------------- planning


def _make_plan(model, variables):
    """Layer plan for the fast path, or (None, reason) when the model needs the slow path."""
    if not isinstance(model, keras.Sequential):
        return None, f"model type {type(model).__name__} is not a keras.Sequential"
    index = {v.ref(): i for i, v in enumerate(variables)}
    plan, covered = [], set()
    for layer in model.layers:
        name = type(layer).__name__
        try:
            in_shape, out_shape = layer.input_shape, layer.output_shape
        except (AttributeError, RuntimeError):  # e.g. a layer shared between models
            return None, f"layer {layer.name} ({name}) has no single known input/output shape"
        if not layer.trainable_weights:
            if isinstance(layer, _PER_EXAMPLE_LAYERS) or type(layer) in (keras.layers.Dense, keras.layers.Conv2D):
                plan.append(_LayerPlan("call", layer))
                continue
            return None, f"layer {layer.name} ({name}) is not known to act per example"
        if type(layer) is keras.layers.Dense:
            if len(in_shape) != 2:
                return None, f"Dense layer {layer.name} has input of rank {len(in_shape)}"
            entry = _LayerPlan("dense", layer)
        elif type(layer) is keras.layers.Conv2D:
            if layer.groups != 1 or layer.data_format != "channels_last" or layer.padding not in ("same", "valid"):
                return None, f"Conv2D layer {layer.name} uses groups/channels_first/causal padding"
            kh, kw = layer.kernel_size
            _, h_out, w_out, out_ch = out_shape
            t = h_out * w_out
            k = kh * kw * in_shape[-1]
            # Per-example kernels cost one weight gradient's flops (t*k*o) and then make the
            # clipped sum almost free; the ghost norm adds t^2 (k + o) and still needs that
            # weight gradient for the sum. So it pays only when the grams are smaller than
            # the per-example kernels themselves (tiny feature maps, wide layers).
            entry = _LayerPlan("conv", layer, ghost=t * t * (k + out_ch) < k * out_ch)
        else:
            return None, f"layer {layer.name} ({name}) has trainable weights the fast path does not support"
        entry.kernel_index = index.get(layer.kernel.ref())
        entry.bias_index = index.get(layer.bias.ref()) if layer.use_bias else None
        if entry.kernel_index is None or (layer.use_bias and entry.bias_index is None):
            return None, f"layer {layer.name} has only some of its weights trainable"
        if len(layer.trainable_weights) != (2 if layer.use_bias else 1):
            return None, f"layer {layer.name} has extra trainable weights"
        covered.update(w.ref() for w in layer.trainable_weights)
        plan.append(entry)
    if covered != set(index):
        return None, "some trainable variables do not belong to a top-level Conv2D/Dense layer"
    return plan, ""


def _per_example_bytes(model, plan) -> int:
    """A generous estimate of one example's working memory in a DP-SGD step (float32)."""
    floats = 0
    for layer in model.layers:
        try:
            size_in = int(np.prod(layer.input_shape[1:]))
            size_out = int(np.prod(layer.output_shape[1:]))
        except (AttributeError, RuntimeError, TypeError):
            return 64 * 2**20  # unknown shapes: assume large, chunks stay small
        floats += size_in + 3 * size_out  # input, pre-activation, its gradient, activation
    for p in plan or []:
        if p.kind == "conv":
            _, h_out, w_out, out_ch = p.layer.output_shape
            k = int(np.prod(p.layer.kernel.shape[:3]))
            t = h_out * w_out
            floats += 2 * t * k + (2 * t * t if p.ghost else k * out_ch)  # patches (+ a copy), kernels
    if plan is None:  # the slow path holds a full per-example gradient of every variable
        floats += 2 * sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    return 4 * 2 * floats  # float32, and a factor 2 for the backward pass's temporaries


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
