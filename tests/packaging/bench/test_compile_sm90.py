"""The kernels compile for an H100 (sm_90a) with Triton's own compiler and ptxas, on this machine without a
GPU (packaging/bench/gpu_checks/compile_sm90.py): the quantized ones at their launchers' settings, and
every kernel the model launches, through the model's own code on the meta device. The interpreter runs the kernels'
arithmetic but not the GPU compiler: a kernel can pass every interpreter test and still fail to compile
for the GPU (as a launcher whose constexpr branches returned tiles of different shapes once did)."""

import os
import re
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


# Launched only where routed experts live in RAM (engine/offload.py), which the meta model does not plan;
# and a function the kernels call (compiled inside each of them), not a kernel.
NOT_LAUNCHED_BY_THE_MODEL = {"tiled_int4_gemv_kernel", "gather_rows_kernel", "wait_for_previous_kernel"}


def test_every_kernel_the_model_launches_compiles_for_sm90():
    """A 48B-shaped model on the meta device, in every weight format, through its own launchers (decode,
    recorded decode, question, prefill): each Triton kernel of kernels/ compiles for sm_90a, and every
    one of them is launched but the RAM experts' two (their launchers are compiled on the GPU only)."""
    kernels_dir = SCRIPT.parents[3] / "kernels"
    defined = {
        match
        for path in kernels_dir.rglob("*.py")
        for match in re.findall(r"@triton\.jit(?:\([^)]*\))?\s*\ndef (\w+_kernel)\(", path.read_text())
    }
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KIMI_DESK_KERNELS")}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "model"], capture_output=True, text=True, env=env, timeout=900
    )
    assert result.returncode == 0, result.stderr[-2000:]
    launched = {line.split()[0] for line in result.stdout.splitlines() if " regs " in line}
    formats = {line.split("(")[1].split(",")[0] for line in result.stdout.splitlines() if " regs " in line}
    assert formats == {"none", "fp8", "int8", "int4"}
    assert launched == defined - NOT_LAUNCHED_BY_THE_MODEL, (defined, launched)
