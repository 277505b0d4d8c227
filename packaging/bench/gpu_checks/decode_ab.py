"""GPU check: decode-step variants of the 27-layer fp8 model at the 48B shapes, one model, one table.
Each variant records its own CUDA graph of the step (kimi_desk.bench.model.time_graph_decode) with 131,072 cached
tokens, and its logits are compared with the first variant's. Variants: programmatic dependent launch
(kimi_desk.kernels.pdl) on and off (`without_pdl`), the router's logits by the Triton GEMV or by PyTorch (cuBLAS).
Run from the repo root on the device: source packaging/source_shim.sh && python3 packaging/bench/gpu_checks/decode_ab.py [context]"""

import contextlib
import sys

import torch

import kimi_desk.kernels as kernels
import kimi_desk.kernels.moe as moe_module
from kimi_desk.bench.model import decode_bytes, random_state, slice_config, time_graph_decode
from kimi_desk.bench.random_checkpoint import random_model
from kimi_desk.engine.fuse import fuse_projections

context = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
config = slice_config(27)
model = fuse_projections(random_model(config, seed=0, dtype=torch.bfloat16, device="cuda", quantize="fp8"))
gen = torch.Generator(device="cuda").manual_seed(1)
state = random_state(model, context, gen)
token = torch.tensor([[5]], device="cuda")
saved = state.clone()  # each variant's eager step starts from this state: their logits compare
floor_ms = decode_bytes(model, context) / 2.97e12 * 1e3

kernel_logits = moe_module.router_logits


def torch_logits(x, weight):
    return x.float() @ weight.float().t()


variants = [
    ("PDL on, router GEMV kernel", True, kernel_logits),
    ("PDL off, router GEMV kernel", False, kernel_logits),
    ("PDL on, router in PyTorch", True, torch_logits),
    ("PDL off, router in PyTorch", False, torch_logits),
]
rows, first = [], None
for name, use_pdl, logits_fn in variants:
    moe_module.router_logits = logits_fn
    with contextlib.nullcontext() if use_pdl else kernels.without_pdl():
        logits = model(token, saved.clone())[:, -1].float()
        r = time_graph_decode(model, state, token)
    err = 0.0 if first is None else ((logits - first).norm() / first.norm()).item()
    first = logits if first is None else first
    rows.append((name, r["graph_ms_per_token"], r["graph_synced_ms_per_token"], err))
    print(name, r, flush=True)
print(
    f"{torch.cuda.get_device_name()}, torch {torch.__version__}; 27 layers fp8, {context:,} cached tokens, roofline {floor_ms:.3f} ms"
)
print("| variant | ms/token (graph) | % of roofline | read back each step | logits vs first (one eager step) |")
print("|---|---|---|---|---|")
for name, ms, synced, err in rows:
    print(f"| {name} | {ms:.3f} | {floor_ms / ms:.1%} | {synced:.3f} | {err:.1e} |")
