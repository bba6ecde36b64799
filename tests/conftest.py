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


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(1)
    yield
    keras.config.set_dtype_policy("float32")
    keras.backend.clear_session()


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3)).astype("uint8")


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend {keras.backend.backend()}"
