"""The quantized kernels compile for an H100 (sm_90a) with Triton's own compiler and ptxas, on this
machine without a GPU (packaging/bench/gpu_checks/compile_sm90.py). The interpreter runs the kernels'
arithmetic but not the GPU compiler: a kernel can pass every interpreter test and still fail to compile
for the GPU (as a launcher whose constexpr branches returned tiles of different shapes once did)."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "packaging" / "bench" / "gpu_checks" / "compile_sm90.py"


def test_the_quantized_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "quant_formats"], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    compiled = [line for line in result.stdout.splitlines() if " regs " in line]
    # fp8, int8 and int4: the decode GEMV, the MoE GEMV's two kernels, the grouped GEMM's two.
    assert len(compiled) == 15, result.stdout
