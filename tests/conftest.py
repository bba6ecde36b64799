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


# The `slow` marker: `make test` (and CI, through .ci/run) runs everything; `make test-fast` runs
# `-m "not slow"`. The marks are given here, by test file and name (a parametrized case by its id),
# until the owners of the test files put `@pytest.mark.slow` on the tests themselves. Only the digits
# run has a recorded time; the others are judged from what they start. `make test` prints the 20
# slowest tests of each backend (--durations), which is how to check and trim this list.
SLOW = {
    # ConvNeXt-Atto trained 12 epochs on 1,437 digits through `train`: the suite's longest test
    # (556 s on torch in the last fresh-clone CI run: 2-core AMD EPYC, the three backends side by side).
    "test_training.py": {
        "test_train_command_on_digits_from_scratch",
        # Two child processes, each starting the backend, compiling and training 5 epochs (killed,
        # then resumed).
        "test_training_resumes_after_a_kill",
    },
    # Full size is the point of the parameter counts; Base, Large and XLarge hold 88M-350M parameters
    # (0.35-1.4 GB of float32 each, drawn on the host), which is why the fixture above collects
    # garbage after a big test. Atto..Small stay in the fast run and still check the variant table.
    "test_model.py": {
        "test_parameter_count_of_every_variant[base]",
        "test_parameter_count_of_every_variant[large]",
        "test_parameter_count_of_every_variant[xlarge]",
    },
    # Three exports in child processes (a JAX parent that starts a TensorFlow child), each killed at a
    # random point of its run, then a complete export.
    "test_export.py": {
        "test_export_killed_at_random_points_keeps_the_live_version_and_leaves_no_orphan",
    },
}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: over a minute on 2 cores, or a full-size model; `make test-fast` (-m 'not slow') "
                   "leaves these out, `make test` and CI run them"
    )


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        slow = SLOW.get(item.path.name, ())
        if item.name in slow or getattr(item, "originalname", None) in slow:
            item.add_marker(pytest.mark.slow)


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend {keras.backend.backend()}"
