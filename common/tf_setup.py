"""The one place that configures TensorFlow and imports tensorflow-privacy.

tensorflow-privacy's Keras optimizers and models are built on legacy Keras (tf-keras), so the
environment variable must be set before TensorFlow is first imported. Its package
``__init__`` imports TF-estimator code that TensorFlow 2.16+ removed; the documented escape
hatch is ``sys.skip_tf_privacy_import``, after which submodules import on their own.

TensorFlow 2.21 writes its start-up notes (oneDNN, "could not find cuda drivers", cuInit)
through C++ absl logging before any Python setting can reach it, whatever
TF_CPP_MIN_LOG_LEVEL says: the import and the first device query run with the process's
stderr pointed at /dev/null, then stderr is restored so real errors still show.
"""
import os
import sys

from common.tf_env import tf_environment

for _name, _value in tf_environment().items():
    os.environ.setdefault(_name, _value)
sys.skip_tf_privacy_import = True


def _import_quietly():
    """Import TensorFlow and tf-keras with the C++ start-up chatter sent to /dev/null."""
    try:
        sys.stderr.flush()
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except OSError:  # no usable file descriptor 2: nothing to hide
        import tensorflow
        import tf_keras

        return tensorflow, tf_keras
    os.dup2(null, 2)
    try:
        import tensorflow
        import tf_keras

        tensorflow.config.list_physical_devices()  # device discovery logs here, once
        return tensorflow, tf_keras
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


tf, keras = _import_quietly()
tf.get_logger().setLevel("ERROR")
try:  # absl's Python logger (used by TensorFlow's Python side) at errors only
    from absl import logging as _absl_logging

    _absl_logging.set_verbosity(_absl_logging.ERROR)
except ImportError:  # absl ships with TensorFlow; nothing to quiet without it
    pass


def tf_privacy():
    """Return the tensorflow-privacy submodules the tests and benchmarks compare against.

    Optional: install with the `compare` extra (`pip install hospital-fl[compare]`; uv's dev
    group has it). The training itself uses common/dp_sgd.py and dp-accounting only.
    """
    from tensorflow_privacy.privacy.analysis import compute_dp_sgd_privacy_lib
    from tensorflow_privacy.privacy.keras_models import dp_keras_model
    from tensorflow_privacy.privacy.optimizers import dp_optimizer_keras_vectorized

    return dp_keras_model, dp_optimizer_keras_vectorized, compute_dp_sgd_privacy_lib


__all__ = ["tf", "keras", "tf_privacy"]
