"""The one place that configures TensorFlow and imports tensorflow-privacy.

tensorflow-privacy's Keras optimizers and models are built on legacy Keras (tf-keras), so the
environment variable must be set before TensorFlow is first imported. Its package
``__init__`` imports TF-estimator code that TensorFlow 2.16+ removed; the documented escape
hatch is ``sys.skip_tf_privacy_import``, after which submodules import on their own.
"""
import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # hide C++ start-up chatter, keep errors
sys.skip_tf_privacy_import = True

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

tf.get_logger().setLevel("ERROR")


def tf_privacy():
    """Return the tensorflow-privacy submodules this project uses (imported on first call)."""
    from tensorflow_privacy.privacy.analysis import compute_dp_sgd_privacy_lib
    from tensorflow_privacy.privacy.keras_models import dp_keras_model
    from tensorflow_privacy.privacy.optimizers import dp_optimizer_keras_vectorized

    return dp_keras_model, dp_optimizer_keras_vectorized, compute_dp_sgd_privacy_lib


__all__ = ["tf", "keras", "tf_privacy"]
