"""The environment TensorFlow must see before it is first imported (no TensorFlow import here).

common/tf_setup.py applies it to its own process; the simulation launcher passes it to every
Flower process, because Flower's simulation runtime imports TensorFlow itself before any of
our code runs (flwr/simulation/ray_transport/utils.py), in the ServerApp's process and in
every Ray worker. Set there too, TensorFlow's import skips Keras 3 (tf-keras is the Keras we
use): about 3 CPU seconds less per process (BENCHMARKS.md section 4).
"""
import os


def tf_environment() -> dict[str, str]:
    """Variables and values; callers set them only where the user has not."""
    env = {
        "TF_USE_LEGACY_KERAS": "1",  # tensorflow-privacy's Keras classes are tf-keras
        "TF_CPP_MIN_LOG_LEVEL": "3",  # C++ log lines after start-up: none below FATAL
    }
    if not os.path.exists("/proc/driver/nvidia/version"):  # no NVIDIA driver: do not even try CUDA
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env
