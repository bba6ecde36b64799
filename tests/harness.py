"""The shared model test harness: every way Keras lets a user compose, freeze and save a model.

As keras-hub's `run_vision_backbone_test`: a model family gives a builder `build(**kwargs) -> keras.Model`
(a small configuration; keras.applications' arguments: include_top, pooling, input_shape, classes,
weights=None) and the harness checks it on the current backend. tests/test_model.py runs it for each
builder family; later families (ConvNeXt V2) add themselves there.
"""

import contextlib

import keras
import numpy as np

SIZE = 32  # the smallest image the four downsamplings take


def numpy(x):
    return keras.ops.convert_to_numpy(x)


def pixels(n=2, size=SIZE, channels=3, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, size=(n, size, size, channels)).astype("float32")


def eager_call(model, x, **kwargs):
    """The model called directly (eager; on PyTorch with autograd on: the plain, unfused forward)."""
    return numpy(model(keras.ops.convert_to_tensor(x), **kwargs))


def check_shapes(build, num_features):
    """Every include_top/pooling combination gives keras.applications' output shapes."""
    x = pixels()
    cases = [
        (dict(include_top=True, classes=5), (2, 5)),
        (dict(include_top=False, pooling=None), (2, SIZE // 32, SIZE // 32, num_features)),
        (dict(include_top=False, pooling="avg"), (2, num_features)),
        (dict(include_top=False, pooling="max"), (2, num_features)),
    ]
    for kwargs, shape in cases:
        model = build(input_shape=(SIZE, SIZE, 3), **kwargs)
        assert tuple(model.output.shape) == (None, *shape[1:]), kwargs
        assert model.predict(x, verbose=0).shape == shape, kwargs


def check_every_layer_is_built(build):
    """A model with stochastic depth comes out built to its last sublayer, so that predict and evaluate compile it
    straight away (an unbuilt layer makes Keras's JAX trainer call the whole model eagerly on the first batch)."""
    model = build(input_shape=(SIZE, SIZE, 3), drop_path_rate=0.3)
    blocks = [block for layer in model.layers for block in getattr(layer, "blocks", ())]
    assert all(layer.built for layer in model.layers)
    dropping = [block for block in blocks if block.drop_path is not None]  # the first block's rate is 0
    assert len(dropping) == len(blocks) - 1 and all(block.built for block in blocks)
    for block in dropping:
        assert block.drop_path.built, block.name


def check_variable_input_size(build):
    """One flexible model takes several image sizes, and gives the fixed-size model's numbers."""
    flexible = build(include_top=False, pooling="avg", input_shape=(None, None, 3))
    for size in (32, 48, 64):
        x = pixels(size=size, seed=size)
        fixed = build(include_top=False, pooling="avg", input_shape=(size, size, 3))
        fixed.set_weights(flexible.get_weights())
        np.testing.assert_allclose(flexible.predict(x, verbose=0), fixed.predict(x, verbose=0), rtol=1e-5,
                                   atol=1e-5)


def check_input_channels(build):
    """keras.applications' expectation: any channel count with weights=None."""
    for channels in (1, 4):
        model = build(include_top=False, pooling="avg", input_shape=(SIZE, SIZE, channels))
        out = model.predict(pixels(channels=channels), verbose=0)
        assert out.shape[0] == 2 and np.isfinite(out).all(), channels


def check_composition(build):
    """Functional composition on symbolic inputs, Sequential and TimeDistributed give the model's own numbers."""
    base = build(include_top=False, pooling="avg", input_shape=(None, None, 3))
    x = pixels()
    own = base.predict(x, verbose=0)
    # predict (inference) and a direct eager call (on PyTorch, with autograd: no fused inference form)
    np.testing.assert_allclose(eager_call(base, x), own, rtol=1e-5, atol=1e-5)

    head = keras.layers.Dense(3, name="new_head")
    wrapped = keras.Model(base.input, head(base.output))  # the usual way to add a head
    np.testing.assert_allclose(wrapped.predict(x, verbose=0), numpy(head(own)), rtol=1e-5, atol=1e-5)

    inputs = keras.Input((SIZE, SIZE, 3))  # the model called on a new symbolic input
    nested = keras.Model(inputs, head(base(inputs)))
    np.testing.assert_allclose(nested.predict(x, verbose=0), numpy(head(own)), rtol=1e-5, atol=1e-5)

    sequential = keras.Sequential([keras.Input((SIZE, SIZE, 3)), base, head])
    np.testing.assert_allclose(sequential.predict(x, verbose=0), numpy(head(own)), rtol=1e-5, atol=1e-5)

    frames = np.stack([x, x[::-1]], axis=1)  # (batch 2, time 2, H, W, C)
    timed = keras.Sequential([keras.Input((2, SIZE, SIZE, 3)), keras.layers.TimeDistributed(base)])
    out = timed.predict(frames, verbose=0)
    np.testing.assert_allclose(out[:, 0], own, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[:, 1], own[::-1], rtol=1e-5, atol=1e-5)


@contextlib.contextmanager
def plain_forms():
    """Inside: backend_ops dispatches as on an accelerator, where every op is Keras's own (the plain form)."""
    from keras_convnext import hardware

    real = hardware.detect
    here = dict(real(keras.backend.backend()), device="gpu")
    hardware.detect = lambda backend=None: here
    try:
        yield
    finally:
        hardware.detect = real


def sgd_step_moves(model, x, y):
    """{variable path: how far one SGD step (lr 1) moved it}: the gradient of every trainable variable."""
    before = [numpy(v).copy() for v in model.trainable_variables]
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0), loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    return {v.path: b - numpy(v) for v, b in zip(model.trainable_variables, before)}


def fast_and_plain(build, numbers, input_shape):
    """numbers(model) for a model with the CPU forms and for one with the same weights and the plain Keras ops."""
    fast_model = build(include_top=True, classes=3, input_shape=input_shape)
    weights = fast_model.get_weights()
    fast = numbers(fast_model)
    with plain_forms():
        plain_model = build(include_top=True, classes=3, input_shape=input_shape)
        plain_model.set_weights(weights)
        return fast, numbers(plain_model)


def check_fast_forms_match_plain_forms(build):
    """The CPU forms (backend_ops.DISPATCH) give the plain Keras ops' numbers and gradients in every pattern.

    predict, an eager call, the model nested in a functional model on a new symbolic input, in Sequential, in
    TimeDistributed, and one SGD step (lr 1: every trainable variable moves by its gradient); float32.
    """
    x, y = pixels(n=4), np.array([0, 1, 2, 1])

    def numbers(model):
        out = {"predict": model.predict(x, verbose=0), "eager": eager_call(model, x)}
        inputs = keras.Input((SIZE, SIZE, 3))
        out["nested"] = keras.Model(inputs, model(inputs)).predict(x, verbose=0)
        out["sequential"] = keras.Sequential([keras.Input((SIZE, SIZE, 3)), model]).predict(x, verbose=0)
        timed = keras.Sequential([keras.Input((2, SIZE, SIZE, 3)), keras.layers.TimeDistributed(model)])
        out["time_distributed"] = timed.predict(np.stack([x, x[::-1]], axis=1), verbose=0)
        out.update({f"gradient of {path}": moved for path, moved in sgd_step_moves(model, x, y).items()})
        return out

    fast, plain = fast_and_plain(build, numbers, (None, None, 3))
    assert fast.keys() == plain.keys() and len(fast) > 6
    for key in fast:
        scale = max(1.0, float(np.abs(plain[key]).max()))
        np.testing.assert_allclose(fast[key], plain[key], atol=1e-4 * scale, rtol=0, err_msg=key)


def check_fast_forms_train_like_plain_forms(build, policy):
    """Under a mixed policy, one SGD step (lr 1: every variable moves by its gradient) with the CPU forms and
    with the plain Keras ops: the same gradients to the policy's rounding, every trainable variable reached.

    The float32 check above covers every Keras pattern; this one covers what differs in half precision (the
    forms' float32 statistics and products, XLA's passes in TensorFlow training, loss scaling in float16).
    """
    x, y = pixels(n=4), np.array([0, 1, 2, 1])
    try:
        keras.config.set_dtype_policy(policy)
        fast, plain = fast_and_plain(build, lambda model: sgd_step_moves(model, x, y), (SIZE, SIZE, 3))
    finally:
        keras.config.set_dtype_policy("float32")
    assert fast.keys() == plain.keys() and len(fast) > 6
    for key in fast:
        assert np.abs(plain[key]).max() > 0, key
        scale = float(np.abs(plain[key]).max())
        # bfloat16 keeps 8 bits: a wrong formula is off by far more than the two forms' roundings
        np.testing.assert_allclose(fast[key], plain[key], atol=0.1 * scale, rtol=0, err_msg=f"{policy} {key}")


def check_clone_model(build):
    """clone_model rebuilds the same graph with fresh variables; with the weights copied, the same numbers."""
    model = build(include_top=True, classes=4, input_shape=(SIZE, SIZE, 3))
    clone = keras.models.clone_model(model)
    assert clone is not model and clone.count_params() == model.count_params()
    assert [v.shape for v in clone.weights] == [v.shape for v in model.weights]
    x = pixels()
    assert not np.allclose(clone.predict(x, verbose=0), model.predict(x, verbose=0))  # fresh draws
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(clone.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6, atol=1e-6)


def check_summary(build):
    model = build(include_top=True, classes=4, input_shape=(SIZE, SIZE, 3))
    lines = []
    model.summary(print_fn=lambda line, **_: lines.append(line))
    text = "\n".join(lines)
    assert f"{model.count_params():,}" in text and "stages_0" in text


def check_keras_round_trip(build, tmp_path, max_config_bytes=4000):
    """A .keras file holds the constructor arguments, not the graph, and loads bit-exact without custom_objects."""
    import json
    import zipfile

    model = build(include_top=True, classes=4, input_shape=(SIZE, SIZE, 3))
    path = str(tmp_path / "model.keras")
    model.save(path)
    with zipfile.ZipFile(path) as z:
        config = z.read("config.json")
    assert len(config) < max_config_bytes, len(config)
    assert "depths" in json.loads(config)["config"]
    loaded = keras.saving.load_model(path)
    assert type(loaded) is type(model) and loaded.get_config() == model.get_config()
    x = pixels()
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def check_mixed_precision(build, policy="mixed_bfloat16"):
    """Under a mixed policy: float32 outputs, half-precision maths inside, close to the float32 model."""
    x = pixels()
    reference = build(include_top=True, classes=4, input_shape=(SIZE, SIZE, 3))
    try:
        keras.config.set_dtype_policy(policy)
        mixed = build(include_top=True, classes=4, input_shape=(SIZE, SIZE, 3))
    finally:
        keras.config.set_dtype_policy("float32")
    mixed.set_weights(reference.get_weights())
    assert all(v.dtype == "float32" for v in mixed.weights)
    block = mixed.get_layer("stages_0").blocks[0]
    parts = [block, block.dwconv, block.norm, block.pwconv1, block.pwconv2] + [block.grn_layer] * block.grn
    assert {layer.compute_dtype for layer in parts} == {policy.split("_")[1]}
    out = mixed.predict(x, verbose=0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, reference.predict(x, verbose=0), atol=0.05)
    np.testing.assert_allclose(eager_call(mixed, x), out, atol=0.02)


def check_training_step_under_freezing(build, freeze, name):
    """One SGD step after `freeze(model)`: every trainable variable moves, no frozen one does.

    With plain SGD a variable moves exactly when its gradient is non-zero, on every backend.
    """
    model = build(include_top=True, classes=3, input_shape=(SIZE, SIZE, 3))
    freeze(model)
    trainable = {id(v) for v in model.trainable_variables}
    assert trainable and len(trainable) < len(model.weights) or name == "nothing frozen", name
    before = {id(v): numpy(v).copy() for v in model.weights}
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0), loss="sparse_categorical_crossentropy")
    x, y = pixels(n=4), np.array([0, 1, 2, 1])
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    for v in model.weights:
        moved = not np.array_equal(numpy(v), before[id(v)])
        assert moved == (id(v) in trainable), f"{name}: {v.path} {'moved' if moved else 'did not move'}"


def freezing_patterns():
    """(name, freeze function) pairs: the partial-freezing patterns users write."""

    def stem_and_stage_0(model):
        model.get_layer("stages_0").trainable = False

    def only_layer_scales(model):
        # every layer frozen but the blocks' own scales: V1's layer scale gamma (the block's own
        # variable), V2's GRN (gamma, beta)
        for layer in model.layers:
            if not layer.name.startswith("stages_"):
                layer.trainable = False
        for stage in model.stages:
            stage.downsample.trainable = False
            for block in stage.blocks:
                for sub in (block.dwconv, block.norm, block.pwconv1, block.pwconv2):
                    sub.trainable = False

    def only_head(model):
        for layer in model.layers:
            layer.trainable = layer.name == "head"

    def one_block_and_its_kernels(model):
        model.get_layer("stages_2").blocks[0].trainable = False
        model.get_layer("stages_3").blocks[0].pwconv2.trainable = False  # the block's gamma still trains

    def nothing(model):
        pass

    return [("stem and stage 0", stem_and_stage_0), ("only layer scales", only_layer_scales),
            ("only the head", only_head), ("one block, one kernel", one_block_and_its_kernels),
            ("nothing frozen", nothing)]
