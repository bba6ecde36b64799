import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
try:  # torchvision must load before TensorFlow: the reverse order segfaults (TF 2.21, torchvision 0.29)
    import torchvision  # noqa: F401
except ImportError:
    pass

import keras
import numpy as np
import pytest

TINY = dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32))


def tiny_variant():
    """TINY as a `Variant`: what the training-mechanics tests train (compiling Atto costs 2-3x more)."""
    from keras_convnext.variants import Variant

    return Variant("test_tiny", TINY["depths"], TINY["dims"])


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(1)
    yield
    keras.config.set_dtype_policy("float32")
    # Without the full garbage collection (1-5 s a test, 215 s of the TensorFlow suite), unless
    # the process has grown: the full-size models of the parameter-count tests weigh gigabytes.
    keras.backend.clear_session(free_memory=_resident_gb() > 4)


def _resident_gb():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError):
        return float("inf")  # not Linux: always collect


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3)).astype("uint8")


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend {keras.backend.backend()}"
