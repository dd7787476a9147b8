"""The CNN: the brief's reference network, shaped by the data and the config.

Blocks of Conv2D (3x3) + max-pooling, then Flatten, one Dense layer and the output: one
sigmoid unit for two classes, softmax otherwise. No batch normalisation: it mixes examples
in a batch, so per-example clipping would no longer bound one patient's influence. tanh is
the default activation because bounded activations train better under DP-SGD
(Papernot et al., "Tempered Sigmoid Activations for Deep Learning with Differential Privacy").
"""
import importlib

from common.dataset import beyond_machine_share
from common.errors import UserError
from common.tf_setup import keras, tf

# Float32 copies of the weights a training process holds at once: the model, the clipped sum,
# the noise, the momentum, the update sent and the optimizer's scratch.
WEIGHT_COPIES = 6


def make_model(model_config, input_shape, num_classes):
    """The network both sides use: `model.builder` if the config names one, else `build_model`.

    A builder is `package.module:function`, called as function(input_shape, num_classes) and
    returning an uncompiled tf-keras model with one sigmoid unit for two classes or a softmax
    over `num_classes`. Its module must be importable by every process (installed, or on
    PYTHONPATH): the ServerApp's and every hospital's.
    """
    if not model_config.builder:
        return _fits_in_memory(build_model(input_shape, num_classes, model_config.filters, model_config.dense_units,
                                           model_config.activation, model_config.normalization, model_config.head))
    module_name, function_name = model_config.builder.split(":")
    try:
        builder = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise UserError(f"model.builder {model_config.builder!r}: cannot load it ({error}); "
                        "put the module on PYTHONPATH or install it") from None
    model = builder(tuple(input_shape), num_classes)
    if not isinstance(model, keras.Model):
        raise UserError(f"model.builder {model_config.builder!r} returned {type(model).__name__}, "
                        "not a tf-keras model (import keras via tf_keras)")
    want = 1 if num_classes == 2 else num_classes
    if model.output_shape[-1] != want:
        raise UserError(f"model.builder {model_config.builder!r}: the model outputs {model.output_shape[-1]} "
                        f"values, expected {want} for {num_classes} classes")
    return _fits_in_memory(model)


def _fits_in_memory(model):
    """The model, or one line on why this machine cannot train it (before any process runs out of memory)."""
    weights = model.count_params()
    too_large = beyond_machine_share(weights * 4 * WEIGHT_COPIES)
    if too_large:
        shape = "x".join(str(d) for d in model.input_shape[1:])
        raise UserError(f"the model has {weights:,} weights at input {shape}: training holds about {WEIGHT_COPIES} "
                        f"float32 copies of them, {too_large}; lower data.image_size (a flatten head's "
                        "weights grow with the image's area) or model.dense_units")
    return model


def build_model(input_shape, num_classes, filters=(16, 32, 64), dense_units=64, activation="tanh",
                normalization="none", head="flatten"):
    """Return an uncompiled Keras Sequential CNN for images of `input_shape` (H, W, C).

    The defaults are the reference network that bench/dp_sgd.py times (BENCHMARKS.md
    section 1); a run's network comes from its config (common/config.py ModelConfig).

    normalization "group": GroupNorm between each convolution and its activation. It
    normalises within one example (unlike batch norm), so clipping still bounds each
    example. It carries no scale or offset of its own, the next layer's weights absorb
    them, so it has no trainable weights and the DP-SGD engine keeps its fast path.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    layers = [keras.layers.InputLayer(input_shape=tuple(input_shape))]
    for width in filters:
        if normalization == "group":
            layers.append(keras.layers.Conv2D(width, 3, padding="same"))
            layers.append(GroupNorm(_groups(width)))
            layers.append(keras.layers.Activation(activation))
        else:
            layers.append(keras.layers.Conv2D(width, 3, padding="same", activation=activation))
        # "same" pooling keeps small inputs (8x8 digits) valid through three blocks.
        layers.append(keras.layers.MaxPooling2D(2, padding="same"))
    # "avgpool" averages each feature map: the Dense layer then has filters[-1] inputs instead
    # of (H/8)(W/8) times as many, and under DP-SGD every parameter is a coordinate of noise.
    layers.append(keras.layers.GlobalAveragePooling2D() if head == "avgpool" else keras.layers.Flatten())
    layers.append(keras.layers.Dense(dense_units, activation=activation))
    if num_classes == 2:
        layers.append(keras.layers.Dense(1, activation="sigmoid"))
    else:
        layers.append(keras.layers.Dense(num_classes, activation="softmax"))
    return keras.Sequential(layers)


@keras.saving.register_keras_serializable(package="hospital_fl")
class GroupNorm(keras.layers.Layer):
    """GroupNorm without scale or offset: each example's channels, in groups, to mean 0 and variance 1.

    It has no weights and acts on one example at a time. Written here because tf-keras's
    GroupNormalization made a DP-SGD step 4.5x slower on the default CNN (16 steps at
    32x32x3: 6.7 s against 1.5 s without normalisation); see `call` for why this one is not.
    """

    def __init__(self, groups: int, epsilon: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        self.groups = int(groups)
        self.epsilon = float(epsilon)

    def call(self, inputs):
        # Group statistics from per-channel means of x and x^2: reductions over the spatial
        # axes of a 4-D tensor are fast on CPU, a 5-D tf.nn.moments was 10x slower.
        per_group = inputs.shape[-1] // self.groups
        mean_c = tf.reduce_mean(inputs, [1, 2])  # (b, C)
        square_c = tf.reduce_mean(tf.square(inputs), [1, 2])
        mean_g = tf.reduce_mean(tf.reshape(mean_c, [-1, self.groups, per_group]), -1)  # (b, G)
        square_g = tf.reduce_mean(tf.reshape(square_c, [-1, self.groups, per_group]), -1)
        inverse = tf.math.rsqrt(tf.maximum(square_g - tf.square(mean_g), 0.0) + self.epsilon)
        mean = tf.repeat(mean_g, per_group, axis=-1)[:, None, None, :]
        inverse = tf.repeat(inverse, per_group, axis=-1)[:, None, None, :]
        return (inputs - mean) * inverse

    def get_config(self):
        return super().get_config() | {"groups": self.groups, "epsilon": self.epsilon}


def _groups(width: int) -> int:
    """GroupNorm groups: 8 where the width allows (Wu and He 2018 found 8-32 alike), fewer otherwise."""
    for groups in (8, 4, 2):
        if width % groups == 0:
            return groups
    return 1


def per_example_loss(labels, probabilities):
    """Cross-entropy per example, shape (batch,): the loss DP-SGD clips one example at a time."""
    if probabilities.shape[-1] == 1:
        labels = tf.reshape(tf.cast(labels, probabilities.dtype), (-1, 1))
        return keras.losses.binary_crossentropy(labels, probabilities)
    return keras.losses.sparse_categorical_crossentropy(labels, probabilities)


def model_input(images):
    """What the network sees: pixels as float32 in [0, 1].

    Data sets are held as uint8 (a quarter of float32's memory, once per process) and each
    batch is scaled only when it is used; float images are taken as already in [0, 1].
    """
    images = tf.convert_to_tensor(images)
    if images.dtype == tf.uint8:
        return tf.cast(images, tf.float32) * (1.0 / 255.0)
    return tf.cast(images, tf.float32)


def load_model(path):
    """A saved model.keras, with this module's layers (GroupNorm) known to Keras."""
    return keras.models.load_model(path, custom_objects={"GroupNorm": GroupNorm})


def standard_layers(model):
    """The same network built from tf-keras's own layers only, with the same weights.

    GroupNorm becomes `tf_keras.layers.GroupNormalization(groups, epsilon, center=False,
    scale=False)`: the same function (per example, contiguous channel groups, no weights) that
    every Keras knows, so the saved file loads with plain `tf_keras.models.load_model(path)`
    in a process that never imports this project. A model without GroupNorm is returned as is."""
    if not any(isinstance(layer, GroupNorm) for layer in model.layers):
        return model

    def clone(layer):
        if isinstance(layer, GroupNorm):
            return keras.layers.GroupNormalization(groups=layer.groups, epsilon=layer.epsilon, center=False,
                                                   scale=False, name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def save_model(model, path):
    """Write `model` to `path` (model.keras) so that plain `tf_keras.models.load_model(path)` reads it."""
    standard_layers(model).save(path)
