"""The KDA prefill's intra-chunk kernel against an earlier form of it, on the same inputs in one process:
kernels/kda/chunk.py as it is against `kda_chunk_before.py` beside this script (a copy of chunk.py from an
earlier commit, put there for the call: `git show COMMIT:kernels/kda/chunk.py > ...`), with fla-core's
chunk_kda as the reference, at several lengths and gates; the outputs of both forms compared.

    source packaging/source_shim.sh && python3 packaging/bench/gpu_checks/kda_intra_ab.py
"""

import importlib.util
import sys
from pathlib import Path

import torch
from fla.ops.kda import chunk_kda as fla_chunk

from kimi_desk.bench.kernels import H, K, _bench, kda_inputs, sweep_gate
from kimi_desk.kernels.kda import chunk as now

spec = importlib.util.spec_from_file_location("kda_chunk_before", Path(__file__).with_name("kda_chunk_before.py"))
before = importlib.util.module_from_spec(spec)
spec.loader.exec_module(before)


def compare(T: int) -> None:
    q, k, v, _, beta, h0 = kda_inputs(1, T, "mild", seed=T)
    scale = K**-0.5
    for gate in ("model-init", "U(-10,0)", "U(-50,0)"):
        g = sweep_gate(gate, (1, T, H, K), torch.Generator(device="cuda").manual_seed(T + 1), "cuda").float()
        row = dict(T=T, gate=gate)
        for name, mod in (("before", before), ("now", now)):
            row[f"{name}_intra_us"] = _bench(lambda: mod.chunk_kda_intra(q, k, v, g, beta, scale))
            row[f"{name}_call_us"] = _bench(lambda: mod.chunk_kda_triton(q, k, v, g, beta, scale, h0, True))
            row[f"{name}_regs_spills"] = mod.chunk_kda_intra(q, k, v, g, beta, scale)["compiled"]
        row["fla_call_us"] = _bench(lambda: fla_chunk(q, k, v, g, beta, initial_state=h0, output_final_state=True))
        o1, _ = before.chunk_kda_triton(q, k, v, g, beta, scale, h0, True)
        o2, _ = now.chunk_kda_triton(q, k, v, g, beta, scale, h0, True)
        row["o_rel_diff"] = ((o1.float() - o2.float()).norm() / o1.float().norm()).item()
        row["fla_over_now"] = row["fla_call_us"] / row["now_call_us"]
        row["before_over_now"] = row["before_call_us"] / row["now_call_us"]
        print({key: round(x, 4) if isinstance(x, float) else x for key, x in row.items()}, flush=True)


print(torch.cuda.get_device_name(), file=sys.stderr)
for T in (8192, 32768, 131072):
    compare(T)
    torch.cuda.empty_cache()
