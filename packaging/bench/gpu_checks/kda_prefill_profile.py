"""GPU check: where KDA prefill's time goes, ours against fla-core 0.6.0's chunk_kda, kernel by kernel, at
the 48B shapes (B = 1, H = 32, K = V = 128, bf16, the model's gate), T = 32,768 by default. Prints each
side's kernels (GPU time from torch.profiler, one call after warm-up) and a short table last.
Needs fla-core (carry its wheel). Run from the repo root on the device:
source packaging/source_shim.sh && python3 packaging/bench/gpu_checks/kda_prefill_profile.py [T]"""

import sys

import torch
from fla.ops.kda import chunk_kda as fla_chunk
from torch.profiler import ProfilerActivity, profile

from kimi_desk.bench.kernels import kda_inputs
from kimi_desk.kernels.kda.chunk import chunk_kda_triton

T = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
q, k, v, g, beta, h0 = kda_inputs(1, T, "model", seed=7)
runs = {
    "ours": lambda: chunk_kda_triton(q, k, v, g, beta, None, h0, True),
    "fla": lambda: fla_chunk(q, k, v, g, beta, initial_state=h0, output_final_state=True),
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
print(
    f"\n{torch.cuda.get_device_name()}, T = {T:,}: ours {totals['ours']:.0f} us, fla {totals['fla']:.0f} us, "
    f"ratio {totals['fla'] / totals['ours']:.2f}x (GPU time of the kernels, one call each)"
)
