"""A folder of your own images for `keras-convnext train --task detection|segmentation`.

Layout (the held-out part in `val/`, or in another folder given as `--val-dir`, with the same layout):

    DATA/train/images/*.png|jpg        the images (any format PIL reads)
    DATA/train/masks/<stem>.png        segmentation: one 8-bit PNG per image (mode L or P), the pixel's class
                                       0..K-1 (0 is usually the background), 255 for pixels to ignore
    DATA/train/annotations.json        detection: COCO's layout: "images" [{"id", "file_name"}],
                                       "annotations" [{"image_id", "bbox": [x, y, w, h], "category_id"}],
                                       "categories" [{"id", "name"}]
    DATA/val/...                       the same

Every image is resized to `image_size` x `image_size` (masks nearest, boxes scaled with it) and held in
memory: this is for datasets of up to some thousands of images; larger ones belong in TFDS. Every file is
checked before use: the image decoder's own bounds (`preprocessing.decode_image_bytes`), an annotation
file's size, every field's type and range, file names that stay inside `images/`.
"""

import json
import math
import os

import numpy as np

from keras_convnext import checks

MAX_ANNOTATION_BYTES = 256 * 1024 * 1024  # COCO 2017's train annotations are 448 MB with masks, 100 MB without
IGNORE = 255
PAD = -1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def folder_datasets(root, task, image_size, batch_size, seed=0, val_dir=None):
    """(train, held-out, number of classes, description) tf.data datasets of a folder in the layout above."""
    import tensorflow as tf

    train_dir = os.path.join(root, "train")
    val_dir = val_dir if val_dir is not None else os.path.join(root, "val")
    for name, folder in (("train", train_dir), ("val", val_dir)):
        if not os.path.isdir(os.path.join(folder, "images")):
            raise ValueError(f"The {task} folder needs {name}/images/ (docs/dense.md has the layout). "
                             f"Received: data={root!r}")
    if task == "segmentation":
        (x, y), (vx, vy) = (read_segmentation(d, image_size) for d in (train_dir, val_dir))
        classes = max(2, int(max(_top_label(y), _top_label(vy))) + 1)
    else:
        x, y, categories = read_detection(train_dir, image_size)
        vx, vy, _ = read_detection(val_dir, image_size, categories=categories)
        classes = len(categories)

    def batched(images, targets, shuffle):
        ds = tf.data.Dataset.from_tensor_slices((images.astype("float32"), targets))
        if shuffle:
            ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    return (batched(x, y, True), batched(vx, vy, False), classes,
            f"{root} ({len(x)} train / {len(vx)} held out, {image_size} px)")


def read_segmentation(folder, image_size):
    """(uint8 (N, S, S, 3) images, int32 (N, S, S) labels) of `folder/images` and `folder/masks`."""
    from PIL import Image

    images, masks = [], []
    for path in _image_files(os.path.join(folder, "images")):
        stem = os.path.splitext(os.path.basename(path))[0]
        mask_path = os.path.join(folder, "masks", stem + ".png")
        if not os.path.isfile(mask_path):
            raise ValueError(f"No mask for this image: expected {mask_path}. Received: image={path!r}")
        image = _read_image(path)
        mask = read_mask(mask_path)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"A mask must have its image's size {image.shape[1]}x{image.shape[0]}. "
                             f"Received: mask={mask_path!r} of size {mask.shape[1]}x{mask.shape[0]}")
        images.append(np.asarray(Image.fromarray(image).resize((image_size, image_size), Image.Resampling.BILINEAR)))
        masks.append(np.asarray(Image.fromarray(mask).resize((image_size, image_size), Image.Resampling.NEAREST)))
    return np.stack(images), np.stack(masks).astype("int32")


def read_mask(path):
    """An 8-bit class mask (PNG of mode L, or P read as its palette indices) as uint8 (H, W)."""
    from keras_convnext.preprocessing import ImageReadError, open_image

    image = open_image(path)
    with image:
        if image.mode not in ("L", "P"):
            raise ValueError(f"A mask must be an 8-bit single-channel PNG (mode L or P) of class indices. "
                             f"Received: {path!r} of mode {image.mode}")
        try:
            return np.asarray(image, dtype=np.uint8).copy()
        except Exception as e:  # truncated or damaged pixel data
            raise ImageReadError(path, checks.reason(e)) from e


def read_detection(folder, image_size, categories=None):
    """(uint8 (N, S, S, 3) images, {"boxes" (N, M, 4) xyxy pixels, "labels" (N, M)} padded with -1, the
    category ids in label order) of `folder/images` and `folder/annotations.json`.

    Labels are the category's position among the sorted ids of `categories` (the training folder's, so a
    held-out folder maps alike); images without any box are kept (background only).
    """
    from PIL import Image

    path = os.path.join(folder, "annotations.json")
    spec = _load_annotations(path)
    ids = sorted(spec["categories"]) if categories is None else categories
    index = {c: i for i, c in enumerate(ids)}
    per_image = {image_id: [] for image_id in spec["images"]}
    for image_id, box, category in spec["annotations"]:
        if category not in index:
            raise ValueError(f"{path}: an annotation's category_id is not among the training categories "
                             f"{ids}. Received: category_id={category}")
        per_image[image_id].append((box, index[category]))
    most = max([len(v) for v in per_image.values()] + [1])
    images = np.empty((len(per_image), image_size, image_size, 3), np.uint8)
    boxes = np.full((len(per_image), most, 4), PAD, np.float32)
    labels = np.full((len(per_image), most), PAD, np.int32)
    for i, (image_id, found) in enumerate(sorted(per_image.items())):
        image_path = os.path.join(folder, "images", spec["images"][image_id])
        image = _read_image(image_path)
        height, width = image.shape[:2]
        images[i] = np.asarray(Image.fromarray(image).resize((image_size, image_size), Image.Resampling.BILINEAR))
        for k, ((x, y, w, h), label) in enumerate(found):
            if x + w > width + 0.5 or y + h > height + 0.5:
                raise ValueError(f"{path}: a box lies outside its {width}x{height} image "
                                 f"{spec['images'][image_id]!r}. Received: bbox={[x, y, w, h]}")
            sx, sy = image_size / width, image_size / height
            boxes[i, k] = (x * sx, y * sy, (x + w) * sx, (y + h) * sy)
            labels[i, k] = label
    return images, {"boxes": boxes, "labels": labels}, ids


def _load_annotations(path):
    """A COCO annotation file, checked: {"images": {id: file name}, "annotations": [(image id, (x, y, w, h),
    category id)], "categories": [ids]}."""
    if not os.path.isfile(path):
        raise ValueError(f"A detection folder needs annotations.json (COCO's layout). Received: missing {path!r}")
    size = os.path.getsize(path)
    if size > MAX_ANNOTATION_BYTES:
        raise ValueError(f"{path}: an annotation file of {size:,} bytes is more than the {MAX_ANNOTATION_BYTES:,} "
                         f"allowed (use TFDS for a dataset this size). Received: {size:,} bytes")
    try:
        with open(path, "rb") as f:
            spec = json.loads(f.read())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({checks.reason(e)}). Received: {path!r}") from e
    if not isinstance(spec, dict) or not all(isinstance(spec.get(k), list) for k in ("images", "annotations",
                                                                                     "categories")):
        raise ValueError(f"{path}: COCO annotations need the lists 'images', 'annotations' and 'categories'. "
                         f"Received: keys {sorted(spec) if isinstance(spec, dict) else type(spec).__name__}")
    images = {}
    for entry in spec["images"]:
        image_id, name = _field(path, entry, "id", int), _field(path, entry, "file_name", str)
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise ValueError(f"{path}: an image's file_name must be a plain name inside images/. "
                             f"Received: file_name={name!r}")
        if image_id in images:
            raise ValueError(f"{path}: two images share one id. Received: id={image_id}")
        images[image_id] = name
    categories = [_field(path, entry, "id", int) for entry in spec["categories"]]
    if not categories or len(set(categories)) != len(categories):
        raise ValueError(f"{path}: 'categories' must list distinct ids, at least one. Received: {categories}")
    annotations = []
    for entry in spec["annotations"]:
        image_id, category = _field(path, entry, "image_id", int), _field(path, entry, "category_id", int)
        box = _field(path, entry, "bbox", list)
        if (len(box) != 4 or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                 for v in box) or box[0] < 0 or box[1] < 0 or box[2] <= 0 or box[3] <= 0):
            raise ValueError(f"{path}: a bbox must be [x, y, width, height], finite, x and y >= 0, width and "
                             f"height > 0. Received: bbox={box}")
        if image_id not in images:
            raise ValueError(f"{path}: an annotation names an image that is not in 'images'. "
                             f"Received: image_id={image_id}")
        if entry.get("iscrowd", 0):
            continue  # crowd regions are not objects to find (COCO's rule)
        annotations.append((image_id, tuple(float(v) for v in box), category))
    return {"images": images, "annotations": annotations, "categories": categories}


def _field(path, entry, key, kind):
    value = entry.get(key) if isinstance(entry, dict) else None
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{path}: each entry needs {key!r} as {kind.__name__}. Received: {key}={value!r}")
    return value


def _image_files(folder):
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise ValueError(f"No images in this folder (suffixes {', '.join(IMAGE_SUFFIXES)}). Received: {folder!r}")
    return [os.path.join(folder, n) for n in names]


def _read_image(path):
    from keras_convnext.preprocessing import MAX_ASPECT_RATIO, decode_image_bytes

    return decode_image_bytes(path, max_aspect_ratio=MAX_ASPECT_RATIO)


def _top_label(labels):
    valid = labels[labels != IGNORE]
    return valid.max() if valid.size else 0
