"""Mixed precision (TRAINER.PRECISION): the autocast a stage runs its backbone under, and the
float32 islands inside it.

Autocast runs convolutions and matrix products in bfloat16 / float16. Kept in float32, whatever
the precision (`float32_region`), are the parts whose result is a small difference of large or
many terms, or feeds a threshold:
- BAP (models/labeler.py `Labeler.head`): cosines with the background prototypes, the attention
  A_fg = 1 - mean ReLU(cos), the weighted means Σ A·F / Σ A and the classifier on them; bf16
  keeps 8 bits of mantissa, so a cosine near 1 (the background, by construction) would lose the
  differences the attention is made of.
- the cosine classifier of DeepLab (models/deeplab.py): normalisation, the 1x1 product and the
  upsampling; the NAL confidence σ = ((1 + s_y) / max(1 + s))^γ raises a ratio near 1 to γ = 7.
- every loss (models/losses.py `compute_loss`).
- stage 2's per-pixel work and every CRF input (engine/stage2.py, evaluate.py): the backbone's
  features are cast to float32 before upsampling, cosines, unaries and the softmax.
"""

from __future__ import annotations

import contextlib

import torch

from utils.errors import BanaError

_DTYPES = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def autocast_dtype(precision: str):
    """torch dtype of the autocast of TRAINER.PRECISION, None for float32."""
    try:
        return _DTYPES[precision]
    except KeyError:
        raise BanaError(f"TRAINER.PRECISION {precision!r} is unknown; choose one of "
                        f"{', '.join(_DTYPES)}.") from None


def check_precision(precision: str, accelerator: str) -> None:
    """Refuse a precision the device cannot run, before any work: float16 autocast on the CPU,
    bfloat16 on a GPU without bf16 support (before Ampere)."""
    if precision == "16-mixed" and accelerator != "gpu":
        raise BanaError("TRAINER.PRECISION 16-mixed needs a CUDA GPU (float16 autocast with loss "
                        "scaling); on the CPU use bf16-mixed or 32.")
    if precision == "bf16-mixed" and accelerator == "gpu" and not torch.cuda.is_bf16_supported():
        raise BanaError("TRAINER.PRECISION bf16-mixed: this GPU has no bfloat16 support (it "
                        "needs compute capability 8.0, e.g. A100, H100, RTX 30xx); use 16-mixed "
                        "or 32.")


def inference_autocast(precision: str, device: torch.device):
    """The autocast stage 2, evaluate.py and predict.py run their networks under."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def float32_region(device_type: str):
    """Autocast off: what runs inside computes in the dtype of its inputs (cast them to float32)."""
    return torch.autocast(device_type=device_type, enabled=False)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in float32 if autocast made it bfloat16 / float16; float32 and float64 as they are."""
    return tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor
