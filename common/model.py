"""The CNN: the brief's reference network, shaped by the data and the config.

Blocks of Conv2D (3x3) + max-pooling, then Flatten, one Dense layer and the output: one
sigmoid unit for two classes, softmax otherwise. No batch normalisation: it mixes examples
in a batch, so per-example clipping would no longer bound one patient's influence. tanh is
the default activation because bounded activations train better under DP-SGD
(Papernot et al., "Tempered Sigmoid Activations for Deep Learning with Differential Privacy").
"""
import importlib

from common.errors import UserError
from common.tf_setup import keras, tf


def make_model(model_config, input_shape, num_classes):
    """The network both sides use: `model.builder` if the config names one, else `build_model`.

    A builder is `package.module:function`, called as function(input_shape, num_classes) and
    returning an uncompiled tf-keras model with one sigmoid unit for two classes or a softmax
    over `num_classes`. Its module must be importable by every process (installed, or on
    PYTHONPATH): the ServerApp's and every hospital's.
    """
    if not model_config.builder:
        return build_model(input_shape, num_classes, model_config.filters, model_config.dense_units,
                           model_config.activation)
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
    return model


def build_model(input_shape, num_classes, filters=(16, 32, 64), dense_units=64, activation="tanh"):
    """Return an uncompiled Keras Sequential CNN for images of `input_shape` (H, W, C)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    layers = [keras.layers.InputLayer(input_shape=tuple(input_shape))]
    for width in filters:
        layers.append(keras.layers.Conv2D(width, 3, padding="same", activation=activation))
        # "same" pooling keeps small inputs (8x8 digits) valid through three blocks.
        layers.append(keras.layers.MaxPooling2D(2, padding="same"))
    layers.append(keras.layers.Flatten())
    layers.append(keras.layers.Dense(dense_units, activation=activation))
    if num_classes == 2:
        layers.append(keras.layers.Dense(1, activation="sigmoid"))
    else:
        layers.append(keras.layers.Dense(num_classes, activation="softmax"))
    return keras.Sequential(layers)


def per_example_loss(labels, probabilities):
    """Cross-entropy per example, shape (batch,): the loss DP-SGD clips one example at a time."""
    if probabilities.shape[-1] == 1:
        labels = tf.reshape(tf.cast(labels, probabilities.dtype), (-1, 1))
        return keras.losses.binary_crossentropy(labels, probabilities)
    return keras.losses.sparse_categorical_crossentropy(labels, probabilities)
