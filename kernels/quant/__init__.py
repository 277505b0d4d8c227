"""Weight-only quantization: `fp8_linear(x, q, scale)` is x @ (Q * s)^T for an fp8 weight Q [O, D] with
one float32 scale per output row s [O] (naive.py has the format and the formula).

On CUDA, up to GEMV_MAX_TOKENS rows of x (leading dims flattened: decode, speculative decode) go to the
Triton GEMV of gemv.py, which reads the fp8 weight once for all rows (half the bytes of bf16: decode is
bound by reading weights); more rows, and the CPU, take the PyTorch form, which dequantizes the weight
then multiplies.
"""

from kimi_desk.kernels import use_triton
from kimi_desk.kernels.quant.naive import FP8, dequantize_fp8_rows, fp8_linear_torch, quantize_fp8_rows

__all__ = ["FP8", "dequantize_fp8_rows", "fp8_linear", "quantize_fp8_rows"]

# Rows up to which the GEMV kernel runs: it pads x to 16 rows (tl.dot's smallest side) and reads each
# weight tile once for all of them. Past that, a product on the dequantized weight (prefill) has the
# tensor cores' full width and the dequantized copy's bytes are shared by many rows.
GEMV_MAX_TOKENS = 16


def fp8_linear(x, q, scale):
    if x.shape[:-1].numel() <= GEMV_MAX_TOKENS and use_triton(x):
        # Imported here: Triton is only loaded when a CUDA tensor asks for it.
        from kimi_desk.kernels.quant.gemv import fp8_linear_gemv

        return fp8_linear_gemv(x, q, scale)
    return fp8_linear_torch(x, q, scale)
