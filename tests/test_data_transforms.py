"""Transforms: detectron2 resize arithmetic, PIL nearest labels, OpenCV-style HSV against colorsys,
the SSD colour jitter, and label/image alignment under crop/flip/pad/resize."""

import colorsys

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


def test_rgb_to_hsv_matches_colorsys():
    rgb = np.random.default_rng(1).integers(0, 256, (400, 3), dtype=np.uint8)
    rgb[:4] = [[0, 0, 0], [255, 255, 255], [255, 0, 0], [7, 7, 9]]
    hsv = T.rgb_to_hsv(rgb[None])[0].astype(float)
    ref = np.array([colorsys.rgb_to_hsv(*(c / 255.0)) for c in rgb])
    hue_err = np.abs((hsv[:, 0] * 2 - ref[:, 0] * 360 + 180) % 360 - 180)
    has_hue = ref[:, 1] > 0
    assert hue_err[has_hue].max() <= 1.0 + 1e-6  # H is stored in 2-degree steps, rounded
    assert np.all(hsv[~has_hue, 0] == 0)
    np.testing.assert_allclose(hsv[:, 1], ref[:, 1] * 255, atol=0.5 + 1e-4)
    np.testing.assert_array_equal(hsv[:, 2], rgb.max(axis=1))
    assert hsv[:, 0].max() < 180


def test_hsv_to_rgb_matches_colorsys():
    rng = np.random.default_rng(2)
    hsv = np.stack([rng.integers(0, 180, 400), rng.integers(0, 256, 400), rng.integers(0, 256, 400)], -1)
    rgb = T.hsv_to_rgb(hsv.astype(np.uint8)[None])[0].astype(float)
    ref = np.array([colorsys.hsv_to_rgb(h * 2 / 360, s / 255, v / 255) for h, s, v in hsv]) * 255
    np.testing.assert_allclose(rgb, ref, atol=0.5 + 1e-3)


def test_hsv_round_trip_close():
    rgb = np.random.default_rng(3).integers(0, 256, (1, 500, 3), dtype=np.uint8)
    back = T.hsv_to_rgb(T.rgb_to_hsv(rgb)).astype(int)
    # quantising hue to 2 degrees moves the middle channel by at most (max - min) / 60 + rounding
    assert np.abs(back - rgb).max() <= 5


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
    for out in outs:  # the same input colour maps to the same output colour everywhere
        assert out.dtype == np.uint8 and out.shape == image.shape
        for k in range(6):
            assert len(np.unique(out[idx == k], axis=0)) <= 1
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
    out_img, out_lab = T.train_augment(image, label, 48, np.random.default_rng(seed))
    assert out_img.shape == (48, 48, 3) and out_lab.shape == (48, 48)
    # colour jitter is one function of the input colour, so each label keeps exactly one colour
    for k in np.unique(out_lab):
        assert len(np.unique(out_img[out_lab == k], axis=0)) == 1
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
