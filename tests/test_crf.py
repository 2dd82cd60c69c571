import pickle
import sys

import numpy as np
import pytest

from utils.crf import DenseCRF
from utils.errors import BanaError

VOC_STAGE2 = [4, 55, 3, 3, 3]


def random_probs(rng, c, h, w):
    p = rng.random((c, h, w)).astype(np.float32) + 0.05
    return p / p.sum(0)


def test_output_is_a_distribution_per_pixel():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    out = DenseCRF.from_list(VOC_STAGE2)(image, random_probs(rng, 4, 24, 32))
    assert out.dtype == np.float32 and out.shape == (4, 24, 32)
    assert out.min() >= 0
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)


def test_without_pairwise_terms_the_output_is_the_clipped_renormalised_input():
    """With compat 0, mean field gives Q = softmax(-U) = clip(p) / Σ clip(p), U = -log clip(p)."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    probs = random_probs(rng, 3, 10, 12)
    probs[0, :2] = 0.0  # clipped to 1e-5 before the log
    probs[1:, :2] /= probs[1:, :2].sum(0)
    out = DenseCRF(0, 55, 3, 0, 3)(image, probs)
    clipped = np.clip(probs, 1e-5, 1)
    np.testing.assert_allclose(out, clipped / clipped.sum(0), rtol=1e-4, atol=1e-6)


def test_kernels_follow_the_config_order():
    """DCRF = [bi_w, bi_xy_std, bi_rgb_std, pos_w, pos_xy_std], checked against pydensecrf called
    directly with distinct values so that any swapped parameter changes the result."""
    import pydensecrf.densecrf as dcrf

    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    probs = random_probs(rng, 3, 20, 24)
    model = dcrf.DenseCRF2D(24, 20, 3)
    model.setUnaryEnergy(np.ascontiguousarray(-np.log(probs).reshape(3, -1)))
    model.addPairwiseGaussian(sxy=1.5, compat=2.0)
    model.addPairwiseBilateral(sxy=7.0, srgb=13.0, rgbim=image, compat=5.0)
    expected = np.array(model.inference(4), np.float32).reshape(3, 20, 24)
    out = DenseCRF.from_list([5.0, 7.0, 13.0, 2.0, 1.5], iterations=4)(image, probs)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_a_confident_unary_keeps_its_argmax():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    labels = np.zeros((32, 40), np.int64)
    labels[:, 20:] = 1
    labels[16:, :] += 2  # four quadrants, labels 0..3
    probs = np.full((4, 32, 40), 0.01, np.float32)
    np.put_along_axis(probs, labels[None], 0.97, axis=0)
    out = DenseCRF.from_list(VOC_STAGE2)(image, probs)
    np.testing.assert_array_equal(out.argmax(0), labels)


def test_noisy_unary_is_cleaned_up_to_the_colour_boundary():
    rng = np.random.default_rng(3)
    h, w, edge = 40, 48, 21
    image = np.zeros((h, w, 3), np.uint8)
    image[:, :edge] = (200, 40, 40)
    image[:, edge:] = (40, 40, 200)
    truth = np.zeros((h, w), np.int64)
    truth[:, edge:] = 1
    flipped = rng.random((h, w)) < 0.3
    noisy = np.where(flipped, 1 - truth, truth)
    probs = np.stack([np.where(noisy == 0, 0.65, 0.35), np.where(noisy == 1, 0.65, 0.35)])
    out = DenseCRF.from_list(VOC_STAGE2)(image, probs.astype(np.float32)).argmax(0)
    assert (noisy != truth).mean() > 0.25
    assert (out != truth).mean() < 0.01


def test_pickled_crf_gives_the_same_result():
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
    probs = random_probs(rng, 3, 16, 20)
    crf = DenseCRF(4, 55, 3, 3, 3, iterations=5)
    clone = pickle.loads(pickle.dumps(crf))
    assert repr(clone) == repr(crf)
    np.testing.assert_array_equal(clone(image, probs), crf(image, probs))


def test_shape_and_dtype_errors():
    crf = DenseCRF.from_list(VOC_STAGE2)
    image = np.zeros((8, 9, 3), np.uint8)
    probs = np.full((2, 8, 9), 0.5, np.float32)
    with pytest.raises(ValueError, match=r"\(8, 9, 3\).*\(2, 7, 9\)"):
        crf(image, probs[:, :7])
    with pytest.raises(ValueError, match="uint8"):
        crf(image.astype(np.float32), probs)
    with pytest.raises(ValueError, match="uint8"):
        crf(image[..., :2], probs)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        crf(image, probs[0])
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        crf(image, (probs > 0.1).astype(np.int64))
    with pytest.raises(ValueError, match="five numbers"):
        DenseCRF.from_list([4, 55, 3, 3])
    with pytest.raises(ValueError, match="bi_rgb_std"):
        DenseCRF(4, 55, 0, 3, 3)
    with pytest.raises(ValueError, match="pos_w"):
        DenseCRF(4, 55, 3, -1, 3)
    with pytest.raises(ValueError, match="iterations"):
        DenseCRF(4, 55, 3, 3, 3, iterations=0)


def test_missing_pydensecrf_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(BanaError, match="pip install pydensecrf2"):
        DenseCRF.from_list(VOC_STAGE2)
