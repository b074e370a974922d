"""Transforms: detectron2 resize arithmetic, PIL nearest labels, the SSD colour jitter against a
transcription of detectron2's (OpenCV HSV), and label/image alignment under crop/flip/pad/resize."""

import cv2
import numpy as np
import pytest

from dcp_jax.data import transforms as T


@pytest.mark.parametrize("hw, short, max_size, expected", [
    ((480, 640), 384, 1333, (384, 512)),
    ((640, 480), 384, 1333, (512, 384)),
    ((333, 500), 384, 1333, (384, 577)),  # 500 * 384 / 333 = 576.58 -> 577
    ((100, 1000), 384, 1333, (133, 1333)),  # long side capped: 3840 -> 1333, short 384 * 1333/3840 = 133.3
    ((375, 500), 640, 2560, (640, 853)),  # eval: 853.33 -> 853
    ((384, 384), 384, 1333, (384, 384)),
])
def test_shortest_edge_shape_matches_hand_computed(hw, short, max_size, expected):
    assert T.shortest_edge_shape(*hw, short, max_size) == expected


@pytest.mark.parametrize("src, dst", [((7, 9), (13, 5)), ((10, 10), (3, 4)), ((37, 21), (64, 30))])
def test_resize_label_is_pil_nearest(src, dst):
    label = np.random.default_rng(0).integers(-1, 900, src).astype(np.int32)
    out = T.resize_label(label, *dst)
    # PIL NEAREST samples the source pixel under each output pixel centre
    ys = np.floor((np.arange(dst[0]) + 0.5) * src[0] / dst[0]).astype(int)
    xs = np.floor((np.arange(dst[1]) + 0.5) * src[1] / dst[1]).astype(int)
    np.testing.assert_array_equal(out, label[ys][:, xs])
    assert out.dtype == np.int32


class Detectron2ColorAugSSD:
    """detectron2's ColorAugSSDTransform.apply_image for img_format="RGB" (CAT-Seg's), transcribed: BGR
    flip, cv2.COLOR_BGR2HSV, its step order; its `random` draws are taken from `rng` in the same order."""

    def __init__(self, rng):
        self.rng = rng

    def apply_image(self, img):
        img = img[:, :, [2, 1, 0]]
        img = self.brightness(img)
        if self.rng.integers(2):
            img = self.hue(self.saturation(self.contrast(img)))
        else:
            img = self.contrast(self.hue(self.saturation(img)))
        return img[:, :, [2, 1, 0]]

    @staticmethod
    def convert(img, alpha=1, beta=0):
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def brightness(self, img):
        return self.convert(img, beta=self.rng.uniform(-32, 32)) if self.rng.integers(2) else img

    def contrast(self, img):
        return self.convert(img, alpha=self.rng.uniform(0.5, 1.5)) if self.rng.integers(2) else img

    def saturation(self, img):
        if self.rng.integers(2):
            img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
            img[:, :, 1] = self.convert(img[:, :, 1], alpha=self.rng.uniform(0.5, 1.5))
            return cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
        return img

    def hue(self, img):
        if self.rng.integers(2):
            img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
            img[:, :, 0] = (img[:, :, 0].astype(int) + self.rng.integers(-18, 19)) % 180
            return cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
        return img


def test_color_aug_equals_detectron2_transform_draw_for_draw():
    image = np.random.default_rng(7).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    crop = image[2:10, 3:17]  # a crop view, as the pipeline hands over
    for seed in range(40):
        ours = T.color_aug_ssd(crop, np.random.default_rng(seed))
        reference = Detectron2ColorAugSSD(np.random.default_rng(seed)).apply_image(crop)
        np.testing.assert_array_equal(ours, reference)


def test_colour_adjustments_hand_examples():
    px = np.array([[[10, 250, 100]]], np.uint8)
    np.testing.assert_array_equal(T.adjust_brightness(px, 10.7), [[[20, 255, 110]]])  # truncating cast, clip
    np.testing.assert_array_equal(T.adjust_contrast(px, 0.5), [[[5, 125, 50]]])
    red, green = np.array([[[255, 0, 0]]], np.uint8), np.array([[[0, 255, 0]]], np.uint8)
    np.testing.assert_array_equal(T.adjust_hue(red, 30), [[[255, 255, 0]]])  # +60 degrees: yellow
    np.testing.assert_array_equal(T.adjust_hue(green, 30), [[[0, 255, 255]]])  # +60 degrees: cyan
    np.testing.assert_array_equal(T.adjust_hue(red, -30), [[[255, 0, 255]]])  # -60 degrees: magenta
    grey = T.adjust_saturation(np.array([[[200, 100, 50]]], np.uint8), 0.0)
    np.testing.assert_array_equal(grey, [[[200, 200, 200]]])  # no saturation: r = g = b = V


def test_color_aug_is_deterministic_and_per_pixel():
    rng = np.random.default_rng(4)
    palette = rng.integers(0, 256, (6, 3), dtype=np.uint8)
    idx = rng.integers(0, 6, (16, 16))
    image = palette[idx]
    outs = [T.color_aug_ssd(image, np.random.default_rng(s)) for s in range(20)]
    np.testing.assert_array_equal(outs[3], T.color_aug_ssd(image, np.random.default_rng(3)))
    for out in outs:  # the same input colour maps to the same output colour everywhere, up to 1: OpenCV's
        assert out.dtype == np.uint8 and out.shape == image.shape  # SIMD and scalar HSV paths round apart
        for k in range(6):
            assert np.ptp(out[idx == k].astype(int), axis=0).max(initial=0) <= 1
    # each of the 4 steps fires with p = 1/2, so about 1 in 16 images stays unchanged
    unchanged = sum(np.array_equal(T.color_aug_ssd(image[:2, :2], np.random.default_rng(s)), image[:2, :2])
                    for s in range(320))
    assert 8 <= unchanged <= 35


def _colour_coded(label: np.ndarray) -> np.ndarray:
    """An image whose colour encodes the label (-1 -> black)."""
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]], np.uint8)
    return np.where(label[..., None] >= 0, palette[np.maximum(label, 0)], 0).astype(np.uint8)


@pytest.mark.parametrize("seed", range(8))
def test_crop_flip_pad_keep_image_and_label_aligned(seed):
    # short side already equals the crop, so no resampling: alignment must be exact
    rng = np.random.default_rng(100 + seed)
    label = np.repeat(np.repeat(rng.integers(0, 5, (6, 12)), 8, 0), 8, 1).astype(np.int32)  # 48 x 96
    image = _colour_coded(label)
    out_img, out_lab = T.train_augment(image, label, 48, np.random.default_rng(seed), color_jitter=False)
    assert out_img.shape == (48, 48, 3) and out_lab.shape == (48, 48)
    np.testing.assert_array_equal(out_img, _colour_coded(out_lab))  # each pixel keeps its label's colour
    # and the crop is a (possibly flipped) window of the input label
    windows = [label[:, x:x + 48] for x in range(49)]
    assert any(np.array_equal(out_lab, w) or np.array_equal(out_lab, w[:, ::-1]) for w in windows)


def test_crops_and_flips_vary_with_the_rng():
    label = np.tile(np.arange(96, dtype=np.int32) % 5, (48, 1))
    image = _colour_coded(label)
    firsts = {tuple(T.train_augment(image, label, 48, np.random.default_rng(s), color_jitter=False)[1][0, :3])
              for s in range(30)}
    assert len(firsts) >= 4


def test_resize_then_crop_keeps_alignment_in_block_interiors():
    label = np.repeat(np.repeat(np.random.default_rng(5).integers(0, 5, (5, 10)), 20, 0), 20, 1).astype(np.int32)
    image = _colour_coded(label)  # 100 x 200 -> short side 40 (scale 0.4)
    out_img, out_lab = T.train_augment(image, label, 40, np.random.default_rng(0), color_jitter=False)
    # away from block edges (bilinear blends there) the colour must still encode the label
    interior = np.ones_like(out_lab, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            interior &= np.roll(out_lab, (dy, dx), (0, 1)) == out_lab
    interior[[0, -1]] = interior[:, [0, -1]] = False
    assert interior.mean() > 0.5
    np.testing.assert_array_equal(out_img[interior], _colour_coded(out_lab)[interior])


def test_pad_when_crop_exceeds_the_resized_image():
    # 10 x 2000: short side 32 would make the long side 6400 > 1333, so the short side ends up 7
    label = np.full((10, 2000), 3, np.int32)
    out_img, out_lab = T.train_augment(_colour_coded(label), label, 32, np.random.default_rng(0),
                                       color_jitter=False)
    assert out_lab.shape == (32, 32)
    np.testing.assert_array_equal(out_lab[:7], 3)
    np.testing.assert_array_equal(out_lab[7:], -1)
    np.testing.assert_array_equal(out_img[7:], T.IMAGE_PAD_VALUE)
    assert (out_img[:7] == _colour_coded(label)[0, 0]).all()


def test_eval_resize_short_side():
    image = np.zeros((375, 500, 3), np.uint8)
    assert T.eval_resize(image, 640).shape == (640, 853, 3)
    assert T.eval_resize(np.zeros((100, 3000, 3), np.uint8), 640).shape == (85, 2560, 3)
    assert T.eval_resize(image, 0) is image
