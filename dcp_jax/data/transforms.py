"""Image/label transforms following detectron2 / CAT-Seg, with the library each of them uses there:
PIL for the resizes (detectron2's ResizeTransform), OpenCV for the HSV steps of the colour jitter.

Training (CAT-Seg's MaskFormerSemanticDatasetMapper, MODEL.md section 6), in order:
ResizeShortestEdge(crop, max 1333) -> random crop (crop x crop, smaller if the image is) ->
ColorAugSSDTransform -> horizontal flip (p=0.5) -> pad to crop x crop.
Evaluation: ResizeShortestEdge(640, max 2560) on the image only; the label stays original.

Labels are int32 with ignore = -1 throughout. All randomness comes from a `np.random.Generator`
passed in (grain's random_map rng), so a sample is reproducible from (seed, position).
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

# CAT-Seg pads the image with 128 (SIZE_DIVISIBILITY 384 in its configs) and the label with ignore.
IMAGE_PAD_VALUE = 128
LABEL_PAD_VALUE = -1


# --------------------------------------------------------------------------------------------
# geometry


def shortest_edge_shape(height: int, width: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """Output (height, width) of detectron2's ResizeShortestEdge.get_output_shape."""
    scale = short_edge / min(height, width)
    new_h, new_w = (short_edge, scale * width) if height < width else (scale * height, short_edge)
    if max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a uint8 [H, W, 3] image with PIL (as detectron2's ResizeTransform)."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def resize_label(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of an int32 [H, W] label with PIL (mode 'I' keeps -1 and large ids)."""
    if label.shape == (height, width):
        return label
    resized = Image.fromarray(label.astype(np.int32)).resize((width, height), Image.NEAREST)
    return np.asarray(resized, dtype=np.int32)


def resize_shortest_edge(image: np.ndarray, label: np.ndarray | None, short_edge: int, max_size: int):
    """Resize so the short side is `short_edge` (long side capped at `max_size`); label nearest."""
    height, width = shortest_edge_shape(image.shape[0], image.shape[1], short_edge, max_size)
    image = resize_image(image, height, width)
    if label is not None:
        label = resize_label(label, height, width)
    return image, label


def random_crop(image: np.ndarray, label: np.ndarray, crop_size: int, rng: np.random.Generator):
    """detectron2 RandomCrop("absolute"): a crop_size square, clipped to the image if it is smaller."""
    height, width = label.shape
    crop_h, crop_w = min(height, crop_size), min(width, crop_size)
    top = int(rng.integers(height - crop_h + 1))
    left = int(rng.integers(width - crop_w + 1))
    return (image[top:top + crop_h, left:left + crop_w], label[top:top + crop_h, left:left + crop_w])


def pad_to(image: np.ndarray, label: np.ndarray, size: int, image_value: int = IMAGE_PAD_VALUE,
           label_value: int = LABEL_PAD_VALUE):
    """Pad bottom/right to size x size (CAT-Seg pads after augmentation, to SIZE_DIVISIBILITY)."""
    height, width = label.shape
    if (height, width) == (size, size):
        return image, label
    if height > size or width > size:
        raise ValueError(f"cannot pad a {height}x{width} sample to {size}x{size}")
    pad = ((0, size - height), (0, size - width))
    return (np.pad(image, pad + ((0, 0),), constant_values=image_value),
            np.pad(label, pad, constant_values=label_value))


# --------------------------------------------------------------------------------------------
# colour: detectron2's ColorAugSSDTransform (CAT-Seg's training mapper). It works on uint8 with
# truncating casts after every step, and on OpenCV's 8-bit HSV (H in 0..179, S and V in 0..255)
# through cv2.cvtColor, which is used here too. detectron2 flips CAT-Seg's RGB input to BGR and
# converts with COLOR_BGR2HSV; COLOR_RGB2HSV on the RGB image is the same arithmetic.


def _convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """x * alpha + beta, clipped to 0..255 and truncated to uint8 (ColorAugSSDTransform.convert)."""
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def adjust_brightness(image: np.ndarray, delta: float) -> np.ndarray:
    return _convert(image, beta=delta)


def adjust_contrast(image: np.ndarray, alpha: float) -> np.ndarray:
    return _convert(image, alpha=alpha)


def adjust_saturation(image: np.ndarray, alpha: float) -> np.ndarray:
    hsv = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV)
    hsv[..., 1] = _convert(hsv[..., 1], alpha=alpha)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def adjust_hue(image: np.ndarray, delta: int) -> np.ndarray:
    hsv = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(delta)) % 180
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def color_aug_ssd(image: np.ndarray, rng: np.random.Generator, *, brightness_delta: float = 32,
                  contrast_range: tuple[float, float] = (0.5, 1.5),
                  saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """SSD photometric distortion exactly as detectron2's ColorAugSSDTransform draws it.

    Brightness (p=0.5); then either contrast, saturation, hue or saturation, hue, contrast
    (chosen with p=0.5), each step applied with p=0.5.
    """

    def maybe(fn, draw):
        nonlocal image
        if rng.integers(2):
            image = fn(image, draw())

    maybe(adjust_brightness, lambda: rng.uniform(-brightness_delta, brightness_delta))
    contrast = lambda: maybe(adjust_contrast, lambda: rng.uniform(*contrast_range))  # noqa: E731
    saturation = lambda: maybe(adjust_saturation, lambda: rng.uniform(*saturation_range))  # noqa: E731
    hue = lambda: maybe(adjust_hue, lambda: rng.integers(-hue_delta, hue_delta + 1))  # noqa: E731
    order = (contrast, saturation, hue) if rng.integers(2) else (saturation, hue, contrast)
    for step in order:
        step()
    return image


# --------------------------------------------------------------------------------------------
# compositions


def train_augment(image: np.ndarray, label: np.ndarray, crop_size: int, rng: np.random.Generator, *,
                  max_size: int = 1333, color_jitter: bool = True, image_pad_value: int = IMAGE_PAD_VALUE):
    """CAT-Seg's training augmentation; returns (uint8 [S, S, 3], int32 [S, S]) with S = crop_size."""
    image, label = resize_shortest_edge(image, label, crop_size, max_size)
    image, label = random_crop(image, label, crop_size, rng)
    if color_jitter:
        image = color_aug_ssd(image, rng)
    if rng.integers(2):
        image, label = image[:, ::-1], label[:, ::-1]
    image, label = pad_to(image, label, crop_size, image_pad_value)
    return np.ascontiguousarray(image), np.ascontiguousarray(label, dtype=np.int32)


def eval_resize(image: np.ndarray, short_side: int = 640, max_size: int = 2560) -> np.ndarray:
    """detectron2's test-time ResizeShortestEdge(short_side, max_size) on the image (bilinear)."""
    if short_side <= 0:
        return image
    return resize_shortest_edge(image, None, short_side, max_size)[0]
