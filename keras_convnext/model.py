"""ConvNeXt (Liu et al., "A ConvNet for the 2020s", CVPR 2022) as Keras 3 functional models.

Layer names are the weight contract: each is the official checkpoint key with "." -> "_"
(`stages.2.5.pwconv1` <-> `stages_2_5_pwconv1`), so that loading a checkpoint is a renaming.
"""

import functools
import os

import keras

from keras_convnext import checks
from keras_convnext import presets as presets_lib
from keras_convnext.layers import (ConvNeXtPreprocessing, DepthwiseConv, HostConstant, HostTruncatedNormal, LayerNorm,
                                   LayerScale, PatchifyStem, PointwiseDense, StochasticDepth)
from keras_convnext.variants import MIN_IMAGE_SIZE, VARIANTS

LN_EPS = 1e-6  # every ConvNeXt LayerNorm, stem to head
POOLINGS = (None, "avg", "max")
PYRAMID_LEVELS = ("P2", "P3", "P4", "P5")  # strides 4, 8, 16, 32, keras-hub's convention
MIN_SIZE = MIN_IMAGE_SIZE


def keras_name(key):
    """Official checkpoint module key -> Keras layer name (`stages.2.5.pwconv1` -> `stages_2_5_pwconv1`)."""
    return key.replace(".", "_")


def _kernel_init(scale=1.0):
    # Official init: truncated normal, std 0.02, for every conv and linear kernel (drawn on the host:
    # Keras's backend draw leaves ~200 MB of freed working memory in the process, layers.py).
    return HostTruncatedNormal(stddev=0.02 * scale)


def _zeros():
    return HostConstant(0.0)  # every bias: zeros, filled on the host (layers.py)


def _layer_norm(name, **kwargs):
    # LayerNormalization in the fastest form per backend; gamma 1, beta 0, filled on the host.
    return LayerNorm(epsilon=LN_EPS, name=name, gamma_initializer=HostConstant(1.0), beta_initializer=_zeros(),
                     **kwargs)


def _block(x, dim, drop_path, layer_scale_init_value, prefix):
    """One ConvNeXt block: dwconv 7x7 -> LN -> Dense 4C -> GELU -> Dense C -> scale -> drop path, + x."""
    shortcut = x
    # A real depthwise op (not a grouped Conv2D), in each backend's fastest form (backend_ops).
    x = DepthwiseConv(7, kernel_initializer=_kernel_init(), name=f"{prefix}_dwconv")(x)
    x = _layer_norm(f"{prefix}_norm")(x)
    # Pointwise convs as Dense on (N, H, W, C): the same maths as 1x1 convs, as in the paper's code.
    # PointwiseDense: Dense with the bias and GELU fused into the product where the backend can.
    x = PointwiseDense(
        4 * dim, activation="gelu", kernel_initializer=_kernel_init(), bias_initializer=_zeros(),
        name=f"{prefix}_pwconv1",
    )(x)  # "gelu" is Keras's exact (erf) GELU, as the paper uses
    x = PointwiseDense(dim, kernel_initializer=_kernel_init(), bias_initializer=_zeros(), name=f"{prefix}_pwconv2")(x)
    if layer_scale_init_value:
        x = LayerScale(layer_scale_init_value, name=f"{prefix}_gamma")(x)
    if drop_path > 0:
        x = StochasticDepth(drop_path, name=f"{prefix}_drop_path")(x)
    return keras.layers.Add(name=f"{prefix}_add")([shortcut, x])


@keras.saving.register_keras_serializable(package="keras_convnext")
class ConvNeXtModel(keras.Model):
    """A functional model whose forward pass frees each intermediate after its last use.

    Keras's functional executor keeps every intermediate tensor until the forward ends; in eager
    execution (PyTorch's `predict`, a direct call) that holds all of a ConvNeXt's activations at
    once, ~3x timm's inference memory. Same graph, same weights, same numbers; only the
    bookkeeping differs. Under jit (JAX, tf.function) it changes nothing.
    """

    def _check_image_arrays(self, x):
        """A too-small array batch is refused before Keras's loop starts (on JAX, an error inside the
        traced predict leaves the model's variables purged, so a later good call fails too)."""
        shape = getattr(x, "shape", None)
        if shape is None or len(self.inputs) != 1 or len(shape) != 4:
            return
        if any(s is not None and s < MIN_SIZE for s in tuple(shape)[1:3]):
            raise ValueError(
                f"ConvNeXt needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels (four downsamplings to 1x1). "
                f"Received: x with shape={tuple(shape)}"
            )

    def predict(self, x, *args, **kwargs):
        self._check_image_arrays(x)
        return super().predict(x, *args, **kwargs)

    def evaluate(self, x=None, *args, **kwargs):
        self._check_image_arrays(x)
        return super().evaluate(x, *args, **kwargs)

    def fit(self, x=None, *args, **kwargs):
        self._check_image_arrays(x)
        return super().fit(x, *args, **kwargs)

    # The graph is fixed once the model is built: what the forward looks up in it is derived once.
    @functools.cached_property
    def _release_counts(self):
        """{id(tensor): how many nodes take it as input}."""
        counts = {}
        for nodes in self._nodes_by_depth.values():
            for node in nodes:
                if node.operation and not node.is_input:
                    for x in node.input_tensors:
                        counts[id(x)] = counts.get(id(x), 0) + 1
        return counts

    @functools.cached_property
    def _block_tails(self):
        """{id(pwconv2 node): (its LayerScale node, the Add node, the shortcut)} for every block
        ending PointwiseDense -> LayerScale -> Add (without drop path) whose inner tensors are
        not model outputs: the steps `PointwiseDense.scale_add` can compute in one."""
        keep = {id(x) for x in self.outputs}
        consumers = {}
        for nodes in self._nodes_by_depth.values():
            for node in nodes:
                for x in node.input_tensors:
                    consumers.setdefault(id(x), []).append(node)

        def only_consumer(node, kind):
            after = consumers.get(id(node.outputs[0]), [])
            ok = len(node.outputs) == 1 and len(after) == 1 and isinstance(after[0].operation, kind)
            return after[0] if ok and id(node.outputs[0]) not in keep else None

        tails = {}
        for nodes in self._nodes_by_depth.values():
            for node in nodes:
                if not isinstance(node.operation, PointwiseDense) or len(node.input_tensors) != 1:
                    continue
                scale = only_consumer(node, LayerScale)
                add = scale and only_consumer(scale, keras.layers.Add)
                if add and len(add.input_tensors) == 2:
                    shortcut = next(x for x in add.input_tensors if x is not scale.outputs[0])
                    tails[id(node)] = (scale, add, shortcut)
        return tails

    def _run_through_graph(self, inputs, operation_fn=lambda op: op, call_fn=None):
        tensors = {id(x): y for x, y in zip(self.inputs, keras.tree.flatten(inputs))}
        keep = {id(x) for x in self.outputs}
        remaining = dict(self._release_counts)
        # Eager PyTorch inference computes each block's tail in one op (backend_ops.dense_scale_add).
        tails = self._block_tails if call_fn is None and keras.backend.backend() == "torch" else {}

        def consumed(tensors_used):
            for x in tensors_used:
                remaining[id(x)] -= 1
                if remaining[id(x)] == 0 and id(x) not in keep:
                    tensors.pop(id(x), None)

        for depth in sorted(self._nodes_by_depth, reverse=True):
            for node in self._nodes_by_depth[depth]:
                if not node.operation or node.is_input:
                    continue
                if any(id(x) not in tensors for x in node.input_tensors):
                    continue  # (also the LayerScale and Add of a fused tail: their inputs never exist)
                if id(node) in tails:
                    scale, add, shortcut = tails[id(node)]
                    out = node.operation.scale_add(tensors[id(node.input_tensors[0])], scale.operation.gamma,
                                                   tensors[id(shortcut)])
                    if out is not None:
                        tensors[id(add.outputs[0])] = out
                        consumed([node.input_tensors[0], shortcut])
                        continue
                args, kwargs = node.arguments.fill_in(tensors)
                if call_fn is not None:
                    outputs = call_fn(operation_fn(node.operation), *args, **kwargs)
                else:
                    outputs = operation_fn(self._get_operation_for_node(node))(*args, **kwargs)
                for x, y in zip(node.outputs, keras.tree.flatten(outputs)):
                    tensors[id(x)] = y
                del args, kwargs, outputs
                consumed(node.input_tensors)
        missing = [x for x in self.outputs if id(x) not in tensors]
        if missing:
            raise ValueError(f"Outputs {missing} are not connected to the model's inputs.")
        return keras.tree.pack_sequence_as(self._outputs_struct, [tensors[id(x)] for x in self.outputs])


def _check_args(depths, dims, include_top, include_preprocessing, weights, input_tensor, input_shape, pooling,
                classes, classifier_activation, name, drop_path_rate, layer_scale_init_value, head_init_scale):
    """Every argument checked before any file is fetched; returns the resolved input shape."""
    if not isinstance(depths, (list, tuple)) or not isinstance(dims, (list, tuple)) or len(depths) != 4 or (
            len(dims) != 4):
        raise ValueError(
            "ConvNeXt has four stages: `depths` and `dims` need four entries each. "
            f"Received: depths={depths!r}, dims={dims!r}"
        )
    for i, (depth, dim) in enumerate(zip(depths, dims)):
        checks.integer(f"depths[{i}]", depth, minimum=1)
        checks.integer(f"dims[{i}]", dim, minimum=1)
    checks.boolean("include_top", include_top)
    checks.boolean("include_preprocessing", include_preprocessing)
    checks.choice("pooling", pooling, POOLINGS)
    if include_top:
        checks.integer("classes", classes, minimum=1)
    if classifier_activation is not None and not isinstance(classifier_activation, str) and (
            not callable(classifier_activation)):
        raise ValueError(
            "`classifier_activation` must be None, an activation name or a callable. "
            f"Received: classifier_activation={classifier_activation!r}"
        )
    checks.optional_str("name", name)
    checks.number("drop_path_rate", drop_path_rate, 0.0, 1.0, high_open=True)
    if layer_scale_init_value is not None:
        checks.number("layer_scale_init_value", layer_scale_init_value, 0.0)
    checks.number("head_init_scale", head_init_scale, 0.0, low_open=True)
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise ValueError(
            "`weights` must be None, 'imagenet', a preset name or a file path. "
            f"Received: weights={weights!r}"
        )
    if input_tensor is not None:
        if not hasattr(input_tensor, "shape"):
            raise ValueError(f"`input_tensor` must be a Keras tensor. Received: input_tensor={input_tensor!r}")
        shape = tuple(input_tensor.shape[1:])
    elif input_shape is not None:
        if not isinstance(input_shape, (list, tuple)):
            raise ValueError(f"`input_shape` must be (height, width, 3). Received: input_shape={input_shape!r}")
        shape = tuple(input_shape)
    else:
        shape = None
    if shape is not None:
        if len(shape) != 3:
            raise ValueError(
                f"`input_shape` must be (height, width, 3). Received: input_shape={shape}"
            )
        if any(s is not None and (isinstance(s, bool) or not isinstance(s, int)) for s in shape):
            raise ValueError(
                f"`input_shape` must hold integers or None. Received: input_shape={shape}"
            )
        if shape[-1] != 3:
            raise ValueError(
                "ConvNeXt takes RGB images, 3 channels last. " f"Received: input_shape={shape}"
            )
        if any(s is not None and s < MIN_SIZE for s in shape[:2]):
            raise ValueError(
                f"ConvNeXt needs inputs of at least {MIN_SIZE}x{MIN_SIZE} pixels. "
                f"Received: input_shape={shape}"
            )
    return shape


def _resolve_preset(weights, variant):
    """`weights` -> the registry entry it names (None for no weights or a file path)."""
    if weights is None:
        return None
    weights = os.fspath(weights)
    if weights == "imagenet":
        if variant is None:
            raise ValueError(
                "weights='imagenet' needs one of the named variants' depths and dims; pass "
                "weights=None or a file path for a custom ConvNeXt. Received: weights='imagenet'"
            )
        return presets_lib.PRESETS[presets_lib.IMAGENET_DEFAULT[variant]]
    if weights in presets_lib.PRESETS:
        preset = presets_lib.PRESETS[weights]
        if variant is not None and preset.variant != variant:
            raise ValueError(
                f"Preset {weights!r} holds ConvNeXt-{preset.variant.capitalize()} weights, "
                f"not {variant.capitalize()}: use ConvNeXt{preset.variant.capitalize()}. "
                f"Received: weights={weights!r}"
            )
        return preset
    if os.path.isdir(weights):
        raise ValueError(f"`weights` is a folder, not a checkpoint file. Received: weights={weights!r}")
    if os.path.isfile(weights):
        return None
    valid = ", ".join(["None", "'imagenet'", *sorted(presets_lib.PRESETS), "or a file path"])
    raise ValueError(f"Unknown `weights`. Valid values: {valid}. Received: weights={weights!r}")


def _variant_of(depths, dims):
    for variant in VARIANTS.values():
        if tuple(depths) == variant.depths and tuple(dims) == variant.dims:
            return variant.name
    return None


def ConvNeXt(
    depths,
    dims,
    include_top=True,
    include_preprocessing=True,
    weights="imagenet",
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    name=None,
    drop_path_rate=0.0,
    layer_scale_init_value=1e-6,
    head_init_scale=1.0,
):
    """Builds a ConvNeXt of any depths and widths as a functional `keras.Model`.

    Args:
        depths: blocks per stage, four integers (ConvNeXt-T: `(3, 3, 9, 3)`).
        dims: channels per stage, four integers (ConvNeXt-T: `(96, 192, 384, 768)`).
        include_top: end in the classifier (pool -> LayerNorm -> Dense -> activation).
        include_preprocessing: take raw pixels in [0, 255] and normalise them inside the model
            with the weights' mean and std. With False, feed `preprocess_input(x)`.
        weights: None (random init), "imagenet" (the variant's best 1000-class checkpoint), a preset
            name from `list_presets()`, or a path to a checkpoint file.
        input_tensor: optional Keras tensor to use as the model's input.
        input_shape: (height, width, 3), at least 32x32; height and width may be None. Defaults to
            the weights' resolution with the top, (None, None, 3) without.
        pooling: without the top, None returns the last stage's (N, H/32, W/32, C) map as it is;
            "avg" or "max" pools it and applies the head's LayerNorm (the classifier's features).
        classes: number of classes of the top.
        classifier_activation: activation of the top ("softmax", None for logits, ...).
        name: model name; defaults to "convnext" or "convnext_<variant>".
        drop_path_rate: stochastic depth of the last block; earlier blocks rise linearly from 0.
        layer_scale_init_value: initial layer scale (0 or None: no layer scale).
        head_init_scale: multiplies the initial head kernel (0.001 for fine-tuning, as in the paper).

    Returns:
        A `keras.Model`.
    """
    shape = _check_args(depths, dims, include_top, include_preprocessing, weights, input_tensor, input_shape,
                        pooling, classes, classifier_activation, name, drop_path_rate, layer_scale_init_value,
                        head_init_scale)
    depths, dims = tuple(depths), tuple(dims)
    variant = _variant_of(depths, dims)
    preset = _resolve_preset(weights, variant)
    if shape is None:
        size = preset.image_size if preset else 224
        shape = (size, size, 3) if include_top else (None, None, 3)
    name = name or (f"convnext_{variant}" if variant else "convnext")

    if input_tensor is None:
        inputs = keras.Input(shape=shape, name="images")
    elif keras.backend.is_keras_tensor(input_tensor):
        inputs = input_tensor
    else:
        inputs = keras.Input(tensor=input_tensor, shape=shape, name="images")

    x = inputs
    if include_preprocessing:
        mean = preset.mean if preset else presets_lib.IMAGENET_MEAN
        std = preset.std if preset else presets_lib.IMAGENET_STD
        x = ConvNeXtPreprocessing(mean, std, name="preprocessing")(x)

    # Stem: "patchify" 4x4 stride-4 conv, then LayerNorm.
    x = PatchifyStem(dims[0], 4, strides=4, kernel_initializer=_kernel_init(), bias_initializer=_zeros(),
                     name=keras_name("downsample_layers.0.0"))(x)
    x = _layer_norm(keras_name("downsample_layers.0.1"))(x)

    total = sum(depths)
    block_index = 0
    for stage, (depth, dim) in enumerate(zip(depths, dims)):
        if stage > 0:
            x = _layer_norm(keras_name(f"downsample_layers.{stage}.0"))(x)
            x = keras.layers.Conv2D(dim, 2, strides=2, kernel_initializer=_kernel_init(), bias_initializer=_zeros(),
                                    name=keras_name(f"downsample_layers.{stage}.1"))(x)
        for block in range(depth):
            # Linear stochastic depth rule over all blocks: rate * k / (n - 1).
            rate = drop_path_rate * block_index / max(total - 1, 1)
            x = _block(x, dim, rate, layer_scale_init_value, keras_name(f"stages.{stage}.{block}"))
            block_index += 1

    if include_top or pooling is not None:
        pool = keras.layers.GlobalMaxPooling2D if pooling == "max" else keras.layers.GlobalAveragePooling2D
        x = pool(name=f"{pooling or 'avg'}_pool")(x)
        # pool -> norm -> head, as the official weights expect; the pooled features leave in float32.
        x = _layer_norm("norm", dtype="float32")(x)
    if include_top:
        x = keras.layers.Dense(classes, kernel_initializer=_kernel_init(head_init_scale), bias_initializer=_zeros(),
                               name="head")(x)
        # A float32 activation: mixed-precision models still return float32 probabilities.
        x = keras.layers.Activation(classifier_activation, dtype="float32",
                                    name="predictions")(x)

    model = ConvNeXtModel(inputs, x, name=name)
    if weights is not None:
        from keras_convnext import weights as weights_lib  # deferred: pulls in the converters

        weights_lib.load_weights(model, weights, preset=preset, include_top=include_top,
                                 classes=classes, head_init_scale=head_init_scale)
    return model


def _builder(variant_name):
    variant = VARIANTS[variant_name]

    def builder(include_top=True, include_preprocessing=True, weights="imagenet", input_tensor=None,
                input_shape=None, pooling=None, classes=1000, classifier_activation="softmax",
                name=None, drop_path_rate=None, layer_scale_init_value=1e-6, head_init_scale=1.0):
        return ConvNeXt(
            variant.depths, variant.dims, include_top=include_top,
            include_preprocessing=include_preprocessing, weights=weights,
            input_tensor=input_tensor, input_shape=input_shape, pooling=pooling, classes=classes,
            classifier_activation=classifier_activation, name=name,
            drop_path_rate=variant.drop_path_rate if drop_path_rate is None else drop_path_rate,
            layer_scale_init_value=layer_scale_init_value, head_init_scale=head_init_scale,
        )

    builder.__name__ = f"ConvNeXt{variant_name.capitalize()}"
    builder.__qualname__ = builder.__name__
    builder.__doc__ = (
        f"ConvNeXt-{variant_name.capitalize()}: depths {variant.depths}, dims {variant.dims}, "
        f"{variant.params:,} parameters with the 1000-class head, {variant.gmacs} GMACs at 224 px.\n\n"
        f"Arguments as `ConvNeXt`; `drop_path_rate` defaults to the variant's recipe value "
        f"({variant.drop_path_rate}).\n"
    )
    return builder


ConvNeXtAtto = _builder("atto")
ConvNeXtFemto = _builder("femto")
ConvNeXtPico = _builder("pico")
ConvNeXtNano = _builder("nano")
ConvNeXtTiny = _builder("tiny")
ConvNeXtSmall = _builder("small")
ConvNeXtBase = _builder("base")
ConvNeXtLarge = _builder("large")
ConvNeXtXLarge = _builder("xlarge")
ConvNeXtXLarge.__name__ = ConvNeXtXLarge.__qualname__ = "ConvNeXtXLarge"


def _stage_outputs(model):
    """The four stage outputs of a builder's model: the last block's residual add of each stage."""
    last = {}
    for layer in model.layers:
        parts = layer.name.split("_")
        if len(parts) == 4 and parts[0] == "stages" and parts[3] == "add":
            stage, block = int(parts[1]), int(parts[2])
            if block >= last.get(stage, (-1, None))[0]:
                last[stage] = (block, layer)
    if sorted(last) != [0, 1, 2, 3]:
        raise ValueError(
            "`feature_pyramid` needs a model built by keras_convnext (layers named "
            f"'stages_<i>_<j>_add' for the four stages). Received: model={model.name!r}"
        )
    return [last[stage][1] for stage in range(4)]


def feature_pyramid(model, norm=True):
    """The four stage outputs of a ConvNeXt as a dict model, for detection and segmentation.

    Args:
        model: a model from any builder here, with or without its top.
        norm: pass each level through its own LayerNorm (`norm0`..`norm3`), as the official
            detection and segmentation backbones do. These start at identity (gamma 1, beta 0).

    Returns:
        A `keras.Model` sharing `model`'s layers, whose output is a dict `{"P2", "P3", "P4", "P5"}`
        of maps with strides 4, 8, 16 and 32.
    """
    outputs = {}
    for stage, layer in enumerate(_stage_outputs(model)):
        x = layer.output
        if norm:
            x = _layer_norm(f"norm{stage}", dtype=layer.dtype_policy)(x)
        outputs[PYRAMID_LEVELS[stage]] = x
    return ConvNeXtModel(model.input, outputs, name=f"{model.name}_pyramid")
