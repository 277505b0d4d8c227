"""Where the KDA prefill's state-free part spends its time: kernels/kda/chunk.py's `chunk_kda_intra` (the
kernel of the pairs inside the sub-chunks, then the intra kernel) timed whole and with stages cut out of
copies of its source (their results are wrong by design; only their time means something), at the 48B
shapes on the model-init gate, T = 32,768 by default; and the first kernel alone. A cut that no longer
matches the source stops the script: update the cuts with the kernels.

    source packaging/source_shim.sh && python3 packaging/bench/gpu_checks/kda_stages.py [T]

The stages, each cut from the form above it in the list:
- whole: the kernel as it is;
- no_levels: without the pairs inside the 16-row sub-chunks (the first kernel's launch; the intra kernel
  still reads its uninitialised buffers);
- no_levels_between: without the pairs between sub-chunks too;
- base: without the inverse and the W / U products too (what is left: loading q, k, g, v, the per-token
  factors, the stores);
and, cut from the whole kernel alone: no_between, no_solve (the inverse), no_solve_wu.
"""

import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

from kimi_desk.bench.kernels import H, K, _bench, kda_inputs, sweep_gate

SOURCE = Path(__file__).resolve().parents[3] / "kernels" / "kda" / "chunk.py"

LEVELS = (
    "    aqk_diag, akk_diag, compiled_diag = chunk_kda_diag_blocks(q, k, g, beta, scale, diag_rows, diag_warps)\n",
    "    aqk_diag = akk_diag = torch.empty(B, T, H, BC, dtype=torch.float32, device=dev)\n    compiled_diag = None\n",
)
BETWEEN = ("        for j in tl.static_range(NB - 1):\n", "        for j in tl.static_range(0):\n")
SOLVE = (
    "    b_Ai = _join_blocks(b_I, b_Akk, b_I, o_i, 4, True, SOLVE_PRECISION)\n"
    "    b_Ai = _join_blocks(b_Ai, b_Akk, b_I, o_i, 16, False, SOLVE_PRECISION)\n"
    "    b_Ai = _join_blocks(b_Ai, b_Akk, b_I, o_i, 64, False, SOLVE_PRECISION)\n",
    "    b_Ai = b_I + b_Akk\n",
)
# W and U without their products (Ai still read, so that nothing else is optimised away).
W_U = (
    (
        "    b_w = tl.dot(b_Ai_lo, b_kb, tl.dot(b_Ai_hi, b_kb))\n",
        "    b_w = b_kb.to(tl.float32) + tl.sum(b_Ai, 1)[:, None]\n",
    ),
    ("    b_u = tl.dot(b_Ai_hi, b_bv_lo, tl.dot(b_Ai_lo, b_bv_hi, tl.dot(b_Ai_hi, b_bv_hi)))\n", "    b_u = b_bv\n"),
)
STAGES = {
    "whole": [],
    "no_levels": [LEVELS],
    "no_levels_between": [LEVELS, BETWEEN],
    "base": [LEVELS, BETWEEN, SOLVE, *W_U],
    "no_between": [BETWEEN],
    "no_solve": [SOLVE],
    "no_solve_wu": [SOLVE, *W_U],
}


def cut(source: str, cuts) -> str:
    for old, new in cuts:
        if old not in source:
            sys.exit(f"kda_stages.py: the cut {old.strip()[:60]!r} no longer matches kernels/kda/chunk.py")
        source = source.replace(old, new)
    return source


def load(name: str, source: str, folder: Path):
    path = folder / f"kda_stage_{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    T = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
    source = SOURCE.read_text()
    print(torch.cuda.get_device_name(), file=sys.stderr)
    q, k, v, _, beta, _ = kda_inputs(1, T, "mild", seed=T)
    g = sweep_gate("model-init", (1, T, H, K), torch.Generator(device="cuda").manual_seed(T + 1), "cuda").float()
    with tempfile.TemporaryDirectory() as folder:
        modules = {name: load(name, cut(source, cuts), Path(folder)) for name, cuts in STAGES.items()}
        for _ in range(2):  # twice, in order, so that drift shows
            for name, module in modules.items():
                us = _bench(lambda: module.chunk_kda_intra(q, k, v, g, beta, K**-0.5))
                compiled = module.chunk_kda_intra(q, k, v, g, beta, K**-0.5)["compiled"]
                print(dict(T=T, stage=name, intra_us=round(us, 1), registers_spills=compiled), flush=True)
            module = modules["whole"]
            us = _bench(lambda: module.chunk_kda_diag_blocks(q, k, g, beta, K**-0.5))
            compiled = module.chunk_kda_intra(q, k, v, g, beta, K**-0.5)["compiled_diag"]
            print(dict(T=T, stage="diag_blocks_alone", us=round(us, 1), registers_spills=compiled), flush=True)


if __name__ == "__main__":
    main()
