"""Augmentation multiplicity: K random views of each example, averaged before clipping.

De et al. 2022 ("Unlocking high-accuracy differentially private image classification
through scale", section 3.1): each example's gradient is the mean of its gradients on K
augmented copies, clipped once. The clipped quantity is still one example's contribution,
so the sensitivity, the accountant and the privacy cost are those of K = 1; what changes
is that the gradient averages out the augmentation's own variance. Costs K times the
compute of a step.

The views: a random shift of up to an eighth of the side (reflect-padded) and a random
horizontal flip, the standard pair for small images. Both keep a cell, a lesion or an
organ what it is; rotations and vertical flips would not for every modality (a chest X-ray
upside down is no chest X-ray), so they are left out.
"""
from common.tf_setup import tf


def augmented_views(images, copies: int, generator: "tf.random.Generator"):
    """(b*copies, H, W, C): `copies` random views of each of the b images, example-major
    (rows i*copies .. i*copies+copies-1 are views of image i)."""
    x = tf.repeat(images, copies, axis=0)
    n = tf.shape(x)[0]
    height, width = images.shape[1], images.shape[2]
    pad_h, pad_w = max(1, height // 8), max(1, width // 8)
    padded = tf.pad(x, [[0, 0], [pad_h, pad_h], [pad_w, pad_w], [0, 0]], mode="REFLECT")
    top = generator.uniform([n], 0, 2 * pad_h + 1, dtype=tf.int32)
    left = generator.uniform([n], 0, 2 * pad_w + 1, dtype=tf.int32)
    rows = top[:, None] + tf.range(height)[None, :]  # (n, H)
    cols = left[:, None] + tf.range(width)[None, :]
    x = tf.gather(padded, rows, axis=1, batch_dims=1)  # (n, H, W + 2 pad_w, C)
    x = tf.gather(x, cols, axis=2, batch_dims=1)  # (n, H, W, C)
    flip = generator.uniform([n], 0, 2, dtype=tf.int32) > 0
    return tf.where(flip[:, None, None, None], tf.reverse(x, [2]), x)
