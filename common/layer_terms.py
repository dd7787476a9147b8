"""Per-example gradient norms and clipped sums, layer by layer, without per-example gradients.

The DP-SGD engine (common/dp_sgd.py) walks a Sequential model of Conv2D/Dense layers layer by
layer, keeping each layer's input a and pre-activation z. One backward pass of the summed
per-example losses gives g = dL/dz, and because no layer mixes examples, row i of g belongs
to example i alone. From (a, g) each example's squared gradient norm is exact and cheap:

- Dense (2-D input): ||a_i||^2 ||g_i||^2 for the kernel, ||g_i||^2 for the bias.
- Conv2D: the per-example kernel gradient patches_i^T g_i (materialised for one layer at a
  time, b*K*O floats; the clipped sum is then a weighted sum of them), or, for tiny feature
  maps, the "ghost norm" sum_{t,s} (a_t . a_s)(g_t . g_s); the bias gradient is g summed over
  positions.

The clipped sum then needs no second backward pass: the clip factors c_i scale the rows of
g and one weight-gradient product per layer (matmul / Conv2DBackpropFilter, or a weighted
sum of the per-example kernels already computed) gives the sum. `make_plan` says which
models this covers; the others run on the engine's slower, exact path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from common.model import GroupNorm
from common.tf_setup import keras, tf

# Layers without trainable weights that act on each example on its own (called with
# training=False: the engine clips one example's influence, and inference-mode layers are
# per-example by construction).
PER_EXAMPLE_LAYERS = (
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
    keras.layers.GroupNormalization,  # only without scale/offset (no trainable weights): see make_plan
    keras.layers.LayerNormalization,
    GroupNorm,
)

# Keras's own element-wise activations (softmax: along the last axis), by identity: a layer's
# `activation` is one of these functions unless a builder passed its own.
KERAS_ACTIVATIONS = frozenset(getattr(keras.activations, name) for name in (
    "elu", "exponential", "gelu", "hard_sigmoid", "linear", "mish", "relu", "selu", "sigmoid", "softmax",
    "softplus", "softsign", "swish", "tanh"))


@dataclass
class LayerPlan:
    kind: str  # "dense", "conv" (trainable, handled by the fast path) or "call"
    layer: object
    kernel_index: int | None = None  # position in model.trainable_variables
    bias_index: int | None = None
    ghost: bool = False  # Conv2D: ghost norm (True) or per-example kernels (False)


def clip_factors(sq_norm, losses, clip_norm):
    """(c_i = min(1, C/||g_i||), finite_i): c_i = 0 for an example whose gradient or loss is not finite.

    C / max(norm, C) does not bound NaN, and weights chosen by a hostile coordinator can make
    one example's loss overflow: that example then counts as zero (norm 0 <= C), so it moves
    the sum by at most C whatever the weights. Written so a zero gradient gives c_i = 1.
    Conv2D's norm formula (a sum of products of Gram matrices) can round a true norm of ~0 to
    a tiny negative square, whose sqrt is NaN: a negative square counts as a norm of 0."""
    finite = tf.math.is_finite(sq_norm) & tf.math.is_finite(losses)
    safe_sq = tf.where(finite, tf.maximum(sq_norm, 0.0), 0.0)
    return tf.where(finite, clip_norm / tf.maximum(tf.sqrt(safe_sq), clip_norm), 0.0), finite


def finite_rows(x, keep):
    """x with the rows (examples) where keep is False set to zero: 0 * NaN would still be NaN."""
    return tf.where(tf.reshape(keep, [-1] + [1] * (x.shape.rank - 1)), x, tf.zeros_like(x))


def loss_from_logits(y, logits, activation):
    """Per-example cross-entropy from the last layer's logits (equal to per_example_loss)."""
    if activation == "sigmoid":
        labels = tf.reshape(tf.cast(y, logits.dtype), tf.shape(logits))
        return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits), -1)
    labels = tf.reshape(tf.cast(y, tf.int32), [-1])
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)


def dense_terms(p, a, g):
    """Squared per-example norms and clipped-sum builder for a Dense layer on 2-D input."""
    g_sq = tf.reduce_sum(tf.square(g), 1)  # (b,)
    sq = tf.reduce_sum(tf.square(a), 1) * g_sq
    if p.bias_index is not None:
        sq += g_sq

    def finish(clip):
        keep = clip > 0  # rows of non-finite examples are zeroed, inputs included (inf * 0 is NaN)
        cg = finite_rows(g, keep) * clip[:, None]
        out = {p.kernel_index: tf.matmul(finite_rows(a, keep), cg, transpose_a=True)}
        if p.bias_index is not None:
            out[p.bias_index] = tf.reduce_sum(cg, 0)
        return out

    return sq, finish


def conv_terms(p, a, g):
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
                input=finite_rows(a, keep), filter_sizes=tf.shape(layer.kernel),
                out_backprop=finite_rows(g, keep) * clip[:, None, None, None],
                strides=[1, sh, sw, 1], padding=padding, dilations=[1, dh, dw, 1])
        else:
            kernel = tf.reshape(tf.tensordot(clip, finite_rows(per_ex_kernel, keep), 1), layer.kernel.shape)
        out = {p.kernel_index: kernel}
        if gb is not None:
            out[p.bias_index] = tf.tensordot(clip, finite_rows(gb, keep), 1)
        return out

    return sq, finish



# ---------------------------------------------------------------------- patient-level units
#
# With patients as the DP unit, a unit's gradient is the sum of its images' gradients:
# sum_i a_i g_i^T for a Dense kernel, the same over all positions of all its images for a
# Conv2D kernel. Its squared norm is sum over image pairs (i, j) of one unit of <G_i, G_j>,
# which for Dense is (a_i . a_j)(g_i . g_j) and for a ghost-norm Conv2D the pair's Gram
# blocks; a Conv2D layer that materialises per-image kernels sums them per unit instead.
# Units are numbered within the batch, so there are never more than b of them: b segments
# keeps every shape a function of the (padded) batch size, which XLA needs.


class Units(NamedTuple):
    """A batch's images grouped into units (patients), as tensors (common/unit_batch.py builds them)."""

    segment: Any  # (b,) int32: each image's unit, numbered 0..k-1 < b within the batch
    first: Any  # (p,) int32: pairs first <= second of images of one unit (batch positions)
    second: Any
    weight: Any  # (p,) float32: 2 for first < second (the pair counts both ways), 1 on the diagonal, 0 padding


def rows_finite(x):
    """(b,) True where row (image) i of x has only finite entries."""
    return tf.reduce_all(tf.math.is_finite(tf.reshape(x, [tf.shape(x)[0], -1])), 1)


def unit_sums(x, units):
    """Rows of x summed per unit: (b, ...) -> (b, ...), row u = unit u (empty units are zero)."""
    return tf.math.unsorted_segment_sum(x, units.segment, tf.shape(units.segment)[0])


def pair_total(products, units):
    """Per unit, the weighted sum of its pairs' products (p,) -> (b,): sum over all (i, j) of the unit."""
    unit_of_pair = tf.gather(units.segment, units.first)
    return tf.math.unsorted_segment_sum(products * units.weight, unit_of_pair, tf.shape(units.segment)[0])


def _pair_dots(x, units):
    """(p,) inner products <x_i, x_j> of the rows of each pair."""
    axes = list(range(1, x.shape.rank))
    return tf.reduce_sum(tf.gather(x, units.first) * tf.gather(x, units.second), axes)


def dense_unit_terms(p, a, g, units, keep):
    """Squared per-unit norms (b,) and clipped-sum builder for a Dense layer; `keep` = finite images.

    Rows of non-finite images are zeroed first: such an image counts as zero within its unit."""
    a, g = finite_rows(a, keep), finite_rows(g, keep)
    # ||sum_i a_i g_i^T||^2 = sum_{i,j} (a_i . a_j)(g_i . g_j): no per-unit kernel is formed.
    sq = pair_total(_pair_dots(a, units) * _pair_dots(g, units), units)
    gb = None
    if p.bias_index is not None:
        gb = unit_sums(g, units)  # (b, O) per-unit bias gradients: cheap to form outright
        sq += tf.reduce_sum(tf.square(gb), 1)

    def finish(clip):  # clip: (b,) per-unit factors
        cg = g * tf.gather(clip, units.segment)[:, None]  # each image scaled by its unit's factor
        out = {p.kernel_index: tf.matmul(a, cg, transpose_a=True)}
        if gb is not None:
            out[p.bias_index] = tf.tensordot(clip, gb, 1)
        return out

    return sq, finish


def conv_unit_terms(p, a, g, units, keep):
    """Squared per-unit norms (b,) and clipped-sum builder for a Conv2D layer (NHWC).

    A unit's positions are all positions of all its images: the per-image kernels patches_i^T g_i
    are summed per unit, or (ghost norm) the unit's Gram matrices are the blocks of its image pairs."""
    layer = p.layer
    sh, sw = layer.strides
    dh, dw = layer.dilation_rate
    out_ch = g.shape[-1]
    a, g = finite_rows(a, keep), finite_rows(g, keep)
    b = tf.shape(a)[0]
    patches, k_major = _patches(a, layer, g.shape[1], g.shape[2])
    g_flat = tf.reshape(g, [b, -1, out_ch])  # (b, T, O)
    gb = None
    sq = 0.0
    if p.bias_index is not None:
        gb = unit_sums(tf.reduce_sum(g_flat, 1), units)  # (b, O)
        sq = tf.reduce_sum(tf.square(gb), 1)
    unit_kernel = None
    if p.ghost:
        first_p, second_p = tf.gather(patches, units.first), tf.gather(patches, units.second)
        gram_a = tf.matmul(first_p, second_p, transpose_a=k_major, transpose_b=not k_major)  # (p, T, T)
        gram_g = tf.matmul(tf.gather(g_flat, units.first), tf.gather(g_flat, units.second), transpose_b=True)
        sq += pair_total(tf.reduce_sum(gram_a * gram_g, [1, 2]), units)
    else:
        per_image = tf.matmul(patches, g_flat, transpose_a=not k_major)  # (b, K, O)
        unit_kernel = unit_sums(per_image, units)
        sq += tf.reduce_sum(tf.square(unit_kernel), [1, 2])

    def finish(clip):  # clip: (b,) per-unit factors
        if p.ghost:
            kernel = tf.raw_ops.Conv2DBackpropFilter(
                input=a, filter_sizes=tf.shape(layer.kernel),
                out_backprop=g * tf.gather(clip, units.segment)[:, None, None, None],
                strides=[1, sh, sw, 1], padding=layer.padding.upper(), dilations=[1, dh, dw, 1])
        else:
            kernel = tf.reshape(tf.tensordot(clip, unit_kernel, 1), layer.kernel.shape)
        out = {p.kernel_index: kernel}
        if gb is not None:
            out[p.bias_index] = tf.tensordot(clip, gb, 1)
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


def make_plan(model, variables):
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
        mixing = _mixes_examples(layer, len(in_shape))
        if mixing:
            return None, f"layer {layer.name} ({name}) {mixing}"
        if not layer.trainable_weights:
            if type(layer) in PER_EXAMPLE_LAYERS or type(layer) in (keras.layers.Dense, keras.layers.Conv2D):
                plan.append(LayerPlan("call", layer))
                continue
            return None, f"layer {layer.name} ({name}) is not known to act per example"
        if type(layer) is keras.layers.Dense:
            if len(in_shape) != 2:
                return None, f"Dense layer {layer.name} has input of rank {len(in_shape)}"
            entry = LayerPlan("dense", layer)
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
            entry = LayerPlan("conv", layer, ghost=t * t * (k + out_ch) < k * out_ch)
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


def _mixes_examples(layer, rank: int) -> str:
    """Why `layer` might mix the examples of a batch ("" when it cannot).

    The fast path runs each layer on the whole batch and takes row i of dL/dz as example i's
    alone: a softmax or normalisation over the batch axis, or an activation that is not one of
    Keras's own (a function of the whole tensor), would break that. Exact types only: a
    subclass can override what a listed layer does. Such models take the exact per-example path.
    """
    activation = getattr(layer, "activation", None)
    if activation is not None and activation not in KERAS_ACTIVATIONS:
        return "has an activation that is not one of Keras's own"
    if hasattr(layer, "axis"):
        axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        if any(int(a) % rank == 0 for a in axes):
            return "acts along the batch axis"
    return ""


def per_example_bytes(model, plan) -> int:
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
