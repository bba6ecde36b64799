"""Training and scoring keras-hub's dense tasks on a ConvNeXt: RetinaNet detection, DeepLabV3 and UperNet
segmentation, on digit scenes, a TFDS dataset or a folder (`dense_folder.py`).

The tasks are keras-hub's own (`RetinaNetObjectDetector`, `DeepLabV3ImageSegmenter`) and this package's
`UperNetImageSegmenter`, each with a keras-hub preprocessor whose `ConvNeXtImageConverter` normalises
[0, 255] pixels, so a trained task takes raw images in `predict` as every keras-hub task does. The scores
are the field's: COCO mAP from pycocotools' `COCOeval`, mIoU from `keras.metrics.MeanIoU`.
"""

import contextlib
import io
import json
import os
import time

import numpy as np

from keras_convnext import checks

HEADS = {"detection": ("retinanet",), "segmentation": ("deeplabv3", "upernet")}
TASKS = tuple(HEADS)
DIGIT_SCENES = "digit-scenes"
BOX_FORMAT = "xyxy"  # pixels: left, top, right, bottom (the pipelines' and COCO's corners)
SCORE_THRESHOLD = 0.05  # detections kept for mAP: COCO practice (mmdet, Detectron2 and torchvision use 0.05)


def check_head(task, head):
    """The head for `task` (its first one by default); a one-line error for a head of another task."""
    checks.choice("task", task, TASKS)
    if head is None:
        return HEADS[task][0]
    return checks.choice("head", head, HEADS[task])


def check_retinanet_size(image_size):
    """RetinaNet's input side: P7 is stride 128, and every level must divide the input exactly for the anchors."""
    size = checks.integer("image_size", image_size, minimum=32)
    if size % 128:
        raise ValueError(f"RetinaNet needs an image size divisible by 128 (its P7 is stride 128). "
                         f"Received: image_size={size}")
    return size


def build_task(task, backbone, num_classes, head=None, image_size=None, pre_logits_num_conv_layers=4,
               upernet_channels=(512, 256), seed=None):
    """A keras-hub task on `backbone` (a `ConvNeXtBackbone`), taking [0, 255] pixels.

    Args:
        task: "detection" (RetinaNet, P3..P7 from P3..P5, boxes in `BOX_FORMAT`) or "segmentation".
        head: "retinanet"; "deeplabv3" (ASPP on P5 at rates 6, 12, 18, low-level features P2, keras-hub's
            settings for a stride-32 encoder) or "upernet" (`keras_convnext.upernet`).
        num_classes: detection: the object classes; segmentation: the mask's classes, background included.
        image_size: detection only: the fixed side RetinaNet is built for (its loss reads the batch's shape).
        pre_logits_num_conv_layers: RetinaNet's convs before each head's logits (4 as the paper).
        upernet_channels: UperNet's (head, auxiliary head) widths (512, 256 as mmseg's ConvNeXt configs).
    """
    import keras_hub

    from keras_convnext.hub import ConvNeXtBackbone, ConvNeXtImageConverter

    head = check_head(task, head)
    if not isinstance(backbone, ConvNeXtBackbone):
        raise TypeError(f"`backbone` must be a ConvNeXtBackbone. Received: backbone of type {type(backbone).__name__}")
    num_classes = checks.integer("num_classes", num_classes, minimum=1 if task == "detection" else 2)
    pre_logits_num_conv_layers = checks.integer("pre_logits_num_conv_layers", pre_logits_num_conv_layers, minimum=0)
    converter = ConvNeXtImageConverter.for_stats()  # ImageNet statistics, as every ConvNeXt checkpoint
    if head == "retinanet":
        size = check_retinanet_size(image_size)
        shape = (size, size, backbone.input_shape[-1])
        neck = keras_hub.models.RetinaNetBackbone(image_encoder=backbone, min_level=3, max_level=7, use_p5=False,
                                                  image_shape=shape)
        decoder = keras_hub.layers.NonMaxSuppression(bounding_box_format=BOX_FORMAT, from_logits=True,
                                                     confidence_threshold=SCORE_THRESHOLD, max_detections=100)
        detector = keras_hub.models.RetinaNetObjectDetector(
            backbone=neck, num_classes=num_classes, bounding_box_format=BOX_FORMAT,
            preprocessor=keras_hub.models.RetinaNetObjectDetectorPreprocessor(image_converter=converter),
            pre_logits_num_conv_layers=pre_logits_num_conv_layers, prediction_decoder=decoder)
        retinanet_paper_init(detector, seed=seed)
        return detector
    preprocessor = keras_hub.models.ImageSegmenterPreprocessor(image_converter=converter)
    if head == "deeplabv3":
        neck = keras_hub.models.DeepLabV3Backbone(image_encoder=backbone, spatial_pyramid_pooling_key="P5",
                                                  low_level_feature_key="P2", upsampling_size=8,
                                                  dilation_rates=[6, 12, 18])
        return keras_hub.models.DeepLabV3ImageSegmenter(backbone=neck, num_classes=num_classes,
                                                        preprocessor=preprocessor)
    from keras_convnext.upernet import UperNetImageSegmenter

    channels, aux_channels = upernet_channels
    return UperNetImageSegmenter(backbone=backbone, num_classes=num_classes, preprocessor=preprocessor,
                                 channels=channels, aux_channels=aux_channels, seed=seed)


def retinanet_paper_init(detector, prior=0.01, std=0.01, seed=None):
    """Re-initialises a keras-hub RetinaNet's two heads as the paper does (Lin et al. 2017, section 4.1).

    Every head conv: kernel N(0, 0.01), bias 0; the classification logits' bias -log((1 - prior) / prior), so
    every anchor starts at probability `prior`. keras-hub 0.32 builds its heads with Keras's default
    `random_normal` (std 0.05) and gives the prior bias to the box head instead of the classification head:
    on a unit-variance pyramid its initial logits have a std of about 25 and half the anchors start at
    p > 0.5, a focal loss near 900 (measured), and training from it diverges (boxes of +-500 px, mAP 0).
    Only public layer attributes are touched (`conv_layers`, `prediction_layer`).
    """
    import keras

    rng = np.random.default_rng(seed)
    for name in ("classification_head", "box_head"):
        head = detector.get_layer(name)
        for conv in [*head.conv_layers, head.prediction_layer]:
            conv.kernel.assign(rng.normal(0.0, std, conv.kernel.shape).astype(keras.backend.standardize_dtype(
                conv.kernel.dtype)))
            bias = np.zeros(conv.bias.shape, keras.backend.standardize_dtype(conv.bias.dtype))
            if name == "classification_head" and conv is head.prediction_layer:
                bias[:] = -np.log((1.0 - prior) / prior)
            conv.bias.assign(bias)


# ---- scores --------------------------------------------------------------------------------------

def mean_iou(model, dataset, num_classes, ignore_class=None):
    """mIoU of a segmenter over a dataset of (images, (N, H, W) labels), by `keras.metrics.MeanIoU`.

    Classes absent from both the labels and the predictions do not count (Keras's rule). Labels equal
    to `ignore_class` (ADE20K's 255) are left out.
    """
    import keras

    metric = keras.metrics.MeanIoU(num_classes=num_classes, ignore_class=ignore_class)
    for images, labels in dataset:
        logits = keras.ops.convert_to_numpy(model.predict(np.asarray(images), verbose=0))
        metric.update_state(np.asarray(labels).reshape(-1), logits.argmax(-1).reshape(-1))
    return float(metric.result())


def coco_map(model, dataset, num_classes):
    """COCO box mAP of a detector over (images, {"boxes" xyxy pixels, "labels" padded with -1}) batches.

    Returns {"map": AP@[.5:.95], "map50": AP@0.5, "map75": AP@0.75}, pycocotools' `COCOeval` (its printout
    silenced) over every detection the model returns (`SCORE_THRESHOLD` and up, 100 per image at most).
    """
    truth, found = [], []
    for images, targets in dataset:
        out = model.predict(np.asarray(images), verbose=0)
        out = {k: np.asarray(_numpy(v)) for k, v in out.items()}
        boxes, labels = np.asarray(targets["boxes"]), np.asarray(targets["labels"])
        for i in range(len(boxes)):
            image_id = len(truth) + 1
            keep = labels[i] >= 0
            truth.append((image_id, boxes[i][keep], labels[i][keep]))
            n = int(out["num_detections"][i])
            found.append((image_id, out["boxes"][i, :n], out["labels"][i, :n], out["confidence"][i, :n]))
    return coco_scores(truth, found, num_classes)


def coco_scores(truth, found, num_classes):
    """pycocotools' box AP from ground truth [(image_id, (k, 4) xyxy, (k,) labels)] and detections
    [(image_id, (m, 4) xyxy, (m,) labels, (m,) scores)]; 0.0 everywhere when nothing was detected."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    annotations = []
    for image_id, boxes, labels in truth:
        for box, label in zip(boxes, labels):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            annotations.append({"id": len(annotations) + 1, "image_id": int(image_id), "category_id": int(label),
                                "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h, "iscrowd": 0})
    results = [{"image_id": int(image_id), "category_id": int(label),
                "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
                "score": float(score)}
               for image_id, boxes, labels, scores in found for box, label, score in zip(boxes, labels, scores)]
    if not results or not annotations:
        return {"map": 0.0, "map50": 0.0, "map75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        gt = COCO()
        gt.dataset = {"images": [{"id": int(t[0])} for t in truth], "annotations": annotations,
                      "categories": [{"id": c} for c in range(num_classes)]}
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = [max(float(s), 0.0) for s in evaluation.stats[:3]]  # -1 where no box of a size exists
    return {"map": stats[0], "map50": stats[1], "map75": stats[2]}


def _numpy(value):
    import keras

    return keras.ops.convert_to_numpy(value)


# ---- data ------------------------------------------------------------------------------------------

def dense_data(data, task, image_size, batch_size, seed=0, num_scenes=(3072, 128), scene_args=None,
               val_dir=None):
    """(train dataset, held-out dataset, number of classes, description) for a `train_dense` source.

    `data` is "digit-scenes" (`num_scenes` = (train, held out) scenes of `image_size` px, held out
    from the other half of `load_digits`; `scene_args`: `digit_scenes`'s other arguments), a TFDS
    name ("coco/2017" for detection, "scene_parse150" for segmentation, as `dense_data.py` prepares
    them), or a folder (`dense_folder.py`'s layout).
    """
    from keras_convnext import dense_data as tfds_pipelines
    from keras_convnext import scenes

    if data == DIGIT_SCENES:
        train_n, test_n = num_scenes
        kwargs = dict(task=task, batch_size=batch_size, image_size=image_size, bounding_box_format=BOX_FORMAT,
                      **(scene_args or {}))
        train = scenes.digit_scenes_dataset("train", train_n, seed=seed, shuffle=True, **kwargs)
        test = scenes.digit_scenes_dataset("test", test_n, seed=seed, **kwargs)
        classes = 10 if task == "detection" else scenes.NUM_CLASSES
        return train, test, classes, f"digit scenes ({train_n} train / {test_n} held out, {image_size} px)"
    if os.path.isdir(data):
        from keras_convnext import dense_folder

        return dense_folder.folder_datasets(data, task, image_size, batch_size, seed=seed, val_dir=val_dir)
    if data == tfds_pipelines.COCO_NAME and task == "detection":
        kwargs = dict(image_size=(image_size, image_size), batch_size=batch_size, bounding_box_format=BOX_FORMAT,
                      seed=seed)
        return (tfds_pipelines.coco_detection("train", **kwargs), tfds_pipelines.coco_detection("validation", **kwargs),
                tfds_pipelines.COCO_CLASSES, f"TFDS {data}")
    if data == tfds_pipelines.ADE20K_NAME and task == "segmentation":
        crop = (image_size, image_size)
        train = tfds_pipelines.ade20k_segmentation("train", crop_size=crop, batch_size=batch_size, seed=seed)
        test = tfds_pipelines.ade20k_segmentation("test", crop_size=crop, batch_size=1, seed=seed)
        return train, test, tfds_pipelines.ADE20K_CLASSES, f"TFDS {data}"
    expected = {"detection": tfds_pipelines.COCO_NAME, "segmentation": tfds_pipelines.ADE20K_NAME}[task]
    raise ValueError(f"`data` for {task} must be {DIGIT_SCENES!r}, the TFDS name {expected!r} or a folder "
                     f"(docs/dense.md). Received: data={data!r}")


# ---- training ----------------------------------------------------------------------------------------

def train_dense(data, out, task, head=None, variant="atto", weights=None, image_size=128, epochs=12,
                batch_size=16, lr=1e-3, weight_decay=0.05, seed=0, num_scenes=(3072, 128), scene_args=None,
                val_dir=None, upernet_channels=(512, 256), pre_logits_num_conv_layers=4, verbose="auto"):
    """Trains a keras-hub dense task on a ConvNeXt backbone and scores it on held-out data.

    Args:
        data: "digit-scenes", a TFDS name or a folder (`dense_data`).
        out: a folder for `task.keras` (the trained task), `history.csv` and `result.json`.
        task, head: as `build_task`.
        variant: the backbone's variant (a name of `kc.VARIANTS`, or a `Variant`), V1 or V2; with `weights`,
            the checkpoint's own architecture is used.
        weights: None (from scratch), or a preset name or checkpoint file whose backbone starts the task
            (a classifier's: its head is dropped; the pyramid norms start at identity).
        image_size: the square side the images are trained at (a multiple of 32; 128 for RetinaNet).
        epochs, batch_size, lr, weight_decay: AdamW with a linear warm-up over the first epoch, then cosine.
        num_scenes, scene_args: digit scenes only: (train, held out) scene counts, `digit_scenes`'s other
            arguments (digit sizes, digits per scene).
        val_dir: a folder's held-out part, when it is not the folder's own `val/`.
        upernet_channels, pre_logits_num_conv_layers: as `build_task`.

    Returns:
        A dict: task, head, variant, weights, data, epochs, seconds (training), the held-out score
        ("miou", or "map", "map50", "map75"), the paths written.
    """
    import keras

    from keras_convnext import files
    from keras_convnext.hub import ConvNeXtBackbone
    from keras_convnext.variants import VARIANTS, Variant

    head = check_head(task, head)
    if not isinstance(variant, Variant):
        variant = VARIANTS[checks.choice("variant", variant, tuple(VARIANTS))]
    image_size = checks.integer("image_size", image_size, minimum=32)
    if image_size % 32:
        raise ValueError(f"`image_size` must be a multiple of 32 (the backbone's stride). "
                         f"Received: image_size={image_size}")
    if head == "retinanet":
        check_retinanet_size(image_size)
    epochs = checks.integer("epochs", epochs, minimum=1)
    checks.integer("pre_logits_num_conv_layers", pre_logits_num_conv_layers, minimum=0)
    batch_size = checks.integer("batch_size", batch_size, minimum=1)
    lr = checks.number("lr", lr, 0.0, None, low_open=True)
    weight_decay = checks.number("weight_decay", weight_decay, 0.0, None)
    seed = checks.integer("seed", seed, minimum=0)
    if not isinstance(data, (str, os.PathLike)):
        raise ValueError(f"`data` must be {DIGIT_SCENES!r}, a TFDS name or a folder. Received: data={data!r}")
    data = os.fspath(data)
    if (not isinstance(num_scenes, (tuple, list)) or len(num_scenes) != 2
            or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in num_scenes)):
        raise ValueError(f"`num_scenes` must be two positive integers (train, held out). "
                         f"Received: num_scenes={num_scenes!r}")
    out = os.fspath(out)
    train, test, num_classes, described = dense_data(data, task, image_size, batch_size, seed=seed,
                                                     num_scenes=num_scenes, scene_args=scene_args, val_dir=val_dir)
    if task == "segmentation":  # (N, H, W, 1), as keras-hub's segmenters' default accuracy metric reads them
        train, test = (ds.map(lambda x, y: (x, y[..., None])) for ds in (train, test))
    keras.utils.set_random_seed(seed)
    shape = (image_size, image_size, 3) if task == "detection" else (None, None, 3)
    if weights is None:
        backbone = ConvNeXtBackbone(variant.depths, variant.dims, version=variant.version, image_shape=shape)
    else:
        backbone = ConvNeXtBackbone.from_weights(weights, image_shape=shape)
    model = build_task(task, backbone, num_classes, head=head, image_size=image_size, seed=seed,
                       upernet_channels=upernet_channels, pre_logits_num_conv_layers=pre_logits_num_conv_layers)
    steps = int(train.cardinality()) if int(train.cardinality()) > 0 else None
    schedule = lr if steps is None else keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(1, (epochs - 1) * steps), warmup_target=lr, warmup_steps=steps)
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=weight_decay)
    if task == "detection":
        model.compile(optimizer=optimizer)  # RetinaNet's own focal and smooth-L1 losses
    else:
        ignore = 255 if num_classes > 255 or data != DIGIT_SCENES else None
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, ignore_class=ignore))
    os.makedirs(out, exist_ok=True)
    history_path = os.path.join(out, "history.csv")
    start = time.perf_counter()
    history = model.fit(train, epochs=epochs, verbose=verbose, shuffle=False)  # the dataset shuffles itself
    seconds = time.perf_counter() - start
    if task == "detection":
        score = coco_map(model, test, num_classes)
    else:
        score = {"miou": mean_iou(model, test, num_classes, ignore_class=None if data == DIGIT_SCENES else 255)}
    model_path = os.path.join(out, "task.keras")
    with files.atomic_path(model_path) as tmp:
        model.save(tmp)
    with files.atomic_path(history_path) as tmp, open(tmp, "w") as f:
        f.write("epoch,loss\n" + "".join(f"{i + 1},{v:.6f}\n" for i, v in enumerate(history.history["loss"])))
    result = {"task": task, "head": head, "variant": variant.name, "weights": weights, "data": described,
              "epochs": epochs, "batch_size": batch_size, "image_size": image_size, "seconds": seconds,
              "backend": keras.backend.backend(), **score, "model": model_path, "history": history_path}
    if task == "detection":
        result["pre_logits_num_conv_layers"] = model.pre_logits_num_conv_layers
    with files.atomic_path(os.path.join(out, "result.json")) as tmp, open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    return result

