"""GPU check: where KDA prefill's time goes, ours against fla-core 0.6.0's chunk_kda, kernel by kernel, at
the 48B shapes (B = 1, H = 32, K = V = 128, bf16, the model's gate), T = 32,768 by default. Four calls:
the plain call on prepared inputs, ours and fla's; then the layer's call on the raw projections (q, k
before their norm, the gate's input, beta's logits): ours, the prepass (kernels/kda/prepare.py) then the
plain call, and fla's chunk_kda with the gate, the norms and beta's sigmoid in its kernels. Ours at the
default launch settings, which the layer takes. Prints each call's kernels (GPU time from torch.profiler, one call
after warm-up) and a short table last.
Needs fla-core (carry its wheel). Run from the repo root on the device:
source packaging/source_shim.sh && python3 packaging/bench/gpu_checks/kda_prefill_profile.py [T]"""

import sys

import torch
from fla.ops.kda import chunk_kda as fla_chunk
from torch.profiler import ProfilerActivity, profile

from kimi_desk.bench.kernels import _fla_fused, _raw_inputs, kda_inputs
from kimi_desk.kernels.kda.chunk import chunk_kda_triton
from kimi_desk.kernels.kda.prepare import prepare_kda_triton

T = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
q, k, v, g, beta, h0 = kda_inputs(1, T, "model", seed=7)
(q_raw, k_raw, v_raw, x, bl, A_log, dt_bias, h0_raw), _ = _raw_inputs(1, T, seed=7)


def prepass_then_plain():
    qn, kn, gn, bn = prepare_kda_triton(q_raw, k_raw, x, A_log, dt_bias, bl)
    return chunk_kda_triton(qn, kn, v_raw, gn, bn, None, h0_raw, True)


runs = {
    "ours": lambda: chunk_kda_triton(q, k, v, g, beta, None, h0, True),
    "fla": lambda: fla_chunk(q, k, v, g, beta, initial_state=h0, output_final_state=True),
    "ours prepass + plain": prepass_then_plain,
    "fla fused": lambda: _fla_fused(q_raw, k_raw, v_raw, x, bl, A_log, dt_bias, h0_raw),
}
totals = {}
for name, run in runs.items():
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    kernels = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name] = kernels.get(e.name, 0.0) + e.time_range.elapsed_us()
    totals[name] = sum(kernels.values())
    print(f"{name}: {totals[name]:.0f} us of GPU time")
    for kname, us in sorted(kernels.items(), key=lambda x: -x[1]):
        print(f"  {us:9.1f} us  {kname[:100]}")
print(f"\n{torch.cuda.get_device_name()}, T = {T:,} (GPU time of the kernels, one call each):")
print(f"  plain: ours {totals['ours']:.0f} us, fla {totals['fla']:.0f} us, ratio {totals['fla'] / totals['ours']:.2f}x")
ours, fla = totals["ours prepass + plain"], totals["fla fused"]
print(f"  raw projections: ours prepass + plain {ours:.0f} us, fla fused {fla:.0f} us, ratio {fla / ours:.2f}x")
