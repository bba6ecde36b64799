"""keras.applications' own test expectations (keras/src/applications/applications_test.py), run on our builders.

Followed: notop with 1 and 4 input channels, notop with a custom input shape, notop on a custom input
tensor (a layer's output), max pooling, the softmax classifier, serialization round trip, and
preprocess_input/decode_predictions called as keras's test calls them. Not followed: the
channels_first variants (keras's own ConvNeXt refuses channels_first too, with the message we give),
and the elephant image with downloaded ImageNet weights (no download here; the converters are
checked against timm, Hugging Face and keras.applications on random weights in test_weights.py).
"""

import keras
import numpy as np
import pytest

import keras_convnext as kc

LAST_DIM = 320  # ConvNeXt-Atto's last stage


@pytest.mark.parametrize("channels", [1, 4])
def test_notop_variable_input_channels(channels):
    model = kc.ConvNeXtAtto(weights=None, include_top=False, input_shape=(None, None, channels))
    assert list(model.outputs[0].shape) == [None, None, None, LAST_DIM]


def test_notop_custom_input_shape():
    model = kc.ConvNeXtAtto(weights=None, include_top=False, input_shape=(123, 123, 3))
    assert list(model.outputs[0].shape)[-1] == LAST_DIM


def test_notop_custom_input_tensor():
    inputs = keras.Input(shape=(200, 200, 4), name="custom_input")
    custom = keras.layers.Conv2D(3, (2, 2), padding="valid", strides=(2, 2))(inputs)
    model = kc.ConvNeXtAtto(weights=None, include_top=False, input_tensor=custom)
    assert list(model.outputs[0].shape)[-1] == LAST_DIM
    assert model.inputs[0] is inputs  # the model starts at the tensor's source input


def test_pooling():
    model = kc.ConvNeXtAtto(weights=None, include_top=False, pooling="max")
    assert list(model.outputs[0].shape) == [None, LAST_DIM]


def test_classifier_activation():
    model = kc.ConvNeXtAtto(weights=None, include_top=True, classifier_activation="softmax")
    assert model.layers[-1].activation.__name__ == "softmax"


def test_base_serializes_and_predicts_through_the_keras_functions():
    model = kc.ConvNeXtAtto(weights=None, input_shape=(64, 64, 3))
    x = np.random.default_rng(0).uniform(0, 255, (1, 64, 64, 3)).astype("float32")
    x = kc.preprocess_input(x)  # the identity: the model normalises inside, as keras's ConvNeXt
    preds = model.predict(x, verbose=0)
    names = [p[1] for p in kc.decode_predictions(preds)[0]]
    assert len(names) == 5 and all(" " not in name for name in names)
    config = keras.saving.serialize_keras_object(model)
    reconstructed = keras.saving.deserialize_keras_object(config)
    assert len(model.weights) == len(reconstructed.weights)
    assert type(reconstructed) is kc.ConvNeXtModel
