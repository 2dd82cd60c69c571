"""Fully connected CRF (Krähenbühl & Koltun) over per-pixel class probabilities, via pydensecrf.

Shape shorthand: C classes, image H × W.
"""

import numpy as np

from utils.errors import BanaError

# Probabilities are clipped before the log so that a zero never becomes an infinite unary.
_CLIP = 1e-5


def _densecrf():
    """The pydensecrf.densecrf module, or a BanaError saying how to install it."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as err:
        raise BanaError(
            f"DenseCRF needs the 'pydensecrf' module, which failed to import ({err}). Install it "
            "with `pip install pydensecrf2` (the original pydensecrf 1.0rc3 does not build on "
            "Python 3.11).") from err
    return dcrf


class DenseCRF:
    """Callable DenseCRF: `crf(image, probs) -> refined probs`.

    Unary = -log(clip(probs)); a Gaussian kernel (sxy = pos_xy_std, compat = pos_w) and a bilateral
    kernel (sxy = bi_xy_std, srgb = bi_rgb_std, compat = bi_w) on the RGB image; `iterations`
    mean-field steps. Holds only numbers, so it pickles into worker processes.
    """

    def __init__(self, bi_w: float, bi_xy_std: float, bi_rgb_std: float, pos_w: float,
                 pos_xy_std: float, iterations: int = 10):
        for name, value in (("bi_w", bi_w), ("pos_w", pos_w)):
            if not value >= 0:
                raise ValueError(f"DenseCRF {name} must be >= 0, got {value}.")
        for name, value in (("bi_xy_std", bi_xy_std), ("bi_rgb_std", bi_rgb_std),
                            ("pos_xy_std", pos_xy_std)):
            if not value > 0:
                raise ValueError(f"DenseCRF {name} is a standard deviation and must be > 0, got "
                                 f"{value}.")
        if int(iterations) != iterations or iterations < 1:
            raise ValueError(f"DenseCRF iterations must be an integer >= 1, got {iterations}.")
        _densecrf()  # fail when the CRF is configured, not in the middle of a run
        self.bi_w, self.bi_xy_std = float(bi_w), float(bi_xy_std)
        self.bi_rgb_std = float(bi_rgb_std)
        self.pos_w, self.pos_xy_std = float(pos_w), float(pos_xy_std)
        self.iterations = int(iterations)

    @classmethod
    def from_list(cls, values, iterations: int = 10) -> "DenseCRF":
        """From the config's `DCRF: [bi_w, bi_xy_std, bi_rgb_std, pos_w, pos_xy_std]`."""
        values = list(values)
        if len(values) != 5:
            raise ValueError("DCRF must list five numbers [bi_w, bi_xy_std, bi_rgb_std, pos_w, "
                             f"pos_xy_std], got {values}.")
        return cls(*values, iterations=iterations)

    def __repr__(self) -> str:
        return (f"DenseCRF(bi_w={self.bi_w}, bi_xy_std={self.bi_xy_std}, "
                f"bi_rgb_std={self.bi_rgb_std}, pos_w={self.pos_w}, pos_xy_std={self.pos_xy_std}, "
                f"iterations={self.iterations})")

    def __call__(self, image: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """image uint8 (H,W,3) RGB; probs (C,H,W), each pixel a distribution. Returns float32
        (C,H,W), each pixel a distribution."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
                or image.shape[2] != 3:
            found = (f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray)
                     else type(image).__name__)
            raise ValueError(f"DenseCRF expects the image as a uint8 (H, W, 3) RGB array, got "
                             f"{found}.")
        probs = np.asarray(probs)
        if probs.ndim != 3 or probs.shape[0] < 1 or not np.issubdtype(probs.dtype, np.floating):
            raise ValueError("DenseCRF expects probabilities as a float (C, H, W) array, got "
                             f"{probs.dtype} of shape {probs.shape}.")
        c, h, w = probs.shape
        if image.shape[:2] != (h, w):
            raise ValueError(f"DenseCRF: image of shape {image.shape} and probabilities of shape "
                             f"{probs.shape} differ in size (H, W).")
        unary = -np.log(np.clip(probs, _CLIP, 1.0).astype(np.float32)).reshape(c, -1)
        model = _densecrf().DenseCRF2D(w, h, c)
        model.setUnaryEnergy(np.ascontiguousarray(unary))
        model.addPairwiseGaussian(sxy=self.pos_xy_std, compat=self.pos_w)
        model.addPairwiseBilateral(sxy=self.bi_xy_std, srgb=self.bi_rgb_std,
                                   rgbim=np.ascontiguousarray(image), compat=self.bi_w)
        refined = model.inference(self.iterations)
        return np.asarray(refined, dtype=np.float32).reshape(c, h, w)


# MODEL.CRF_BACKEND: name -> a class with `from_list(MODEL.DCRF)` whose instances map (image
# uint8 (H,W,3), probs (C,H,W)) to refined probs and pickle into worker processes. A new backend
# is a module of its own and one line here.
CRF_BACKENDS = {
    "pydensecrf": DenseCRF,
}


def make_crf(params, backend: str = "pydensecrf"):
    """The CRF of MODEL.DCRF `params` with MODEL.CRF_BACKEND `backend`; bad parameters are a
    BanaError naming MODEL.DCRF."""
    if backend not in CRF_BACKENDS:
        raise BanaError(f"MODEL.CRF_BACKEND {backend!r} is unknown; choose one of "
                        f"{', '.join(CRF_BACKENDS)}.")
    try:
        return CRF_BACKENDS[backend].from_list(params)
    except ValueError as e:
        raise BanaError(f"MODEL.DCRF = {list(params)}: {e}") from None


def softmax(logits: np.ndarray, axis: int = 0) -> np.ndarray:
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def crf_labels(crf, image: np.ndarray, cos: np.ndarray, temperature: float) -> np.ndarray:
    """Test-time post-processing (SPEC §5): softmax(T·cos) refined by the DenseCRF, then argmax.

    crf(image uint8 (H, W, 3), probs (C, H, W)) -> probs (C, H, W); image is the real RGB image
    (not the network input: SPEC §7); cos float (C, H, W) in [-1, 1]. Returns uint8 (H, W).
    """
    probs = softmax(temperature * cos.astype(np.float32), axis=0)
    return np.asarray(crf(image, probs)).argmax(0).astype(np.uint8)


def crf_in_regions(crf, image: np.ndarray, probs: np.ndarray,
                   class_regions: np.ndarray) -> np.ndarray:
    """Stage 2's CRF (SPEC §3 steps 4-5): the refined probabilities, each class zeroed outside
    its boxes, then the arg-max channel (H,W) int64. probs (L,H,W) float32, channel 0 =
    background; class_regions (L-1,H,W) bool."""
    refined = np.asarray(crf(image, probs), dtype=np.float32).copy()
    refined[1:] *= class_regions
    # NumPy's argmax over the leading axis is ~6x faster than torch's on the CPU, with the same
    # ties (the first maximum).
    return refined.argmax(0)


# Worker jobs (utils/pool.py): numpy and the CRF only, so a worker that runs them imports
# neither torch nor Lightning.
def labels_job(job: dict) -> np.ndarray:
    """`crf_labels` of job {"crf", "image", "cos", "temperature"}."""
    return crf_labels(job["crf"], job["image"], job["cos"], job["temperature"])


def regions_job(job: dict) -> np.ndarray:
    """`crf_in_regions` of job {"crf", "image", "probs", "class_regions"}, as uint8."""
    return crf_in_regions(job["crf"], job["image"], job["probs"],
                          job["class_regions"]).astype(np.uint8)
