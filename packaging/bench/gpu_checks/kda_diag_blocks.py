"""The KDA prefill's first kernel alone (kernels/kda/chunk.py, `chunk_kda_diag_blocks`: the pairs inside the
16-row sub-chunks): its blocks against float64 at T = 1,061 on three gates, then its launch settings timed
at the 48B shapes on the model-init gate, T = 32,768 by default, beside fla-core's token-parallel kernel
of the same pairs (`chunk_kda_fwd_intra_token_parallel`, given a plain cumulative gate: timing only) and
beside the whole `chunk_kda_intra` (this kernel, then the intra kernel).

    source packaging/source_shim.sh && python3 packaging/bench/gpu_checks/kda_diag_blocks.py [T]
"""

import sys

import torch
from fla.ops.kda.chunk_intra_token_parallel import chunk_kda_fwd_intra_token_parallel

from kimi_desk.bench.kernels import H, K, _bench, kda_inputs, sweep_gate
from kimi_desk.kernels.kda.chunk import SUB_CHUNK, chunk_kda_diag_blocks, chunk_kda_intra

# (rows, warps): the default first.
SETTINGS = [(4, 1), (2, 1), (8, 1), (4, 2), (8, 2), (4, 4)]


def diag_blocks_f64(q, k, g, beta, scale):
    """Aqk's and Akk's diagonal blocks in float64, [B, T, H, SUB_CHUNK] (zeros above the diagonal)."""
    B, T, Hh, Kk = q.shape
    n = -(-T // SUB_CHUNK) * SUB_CHUNK

    def split(x):
        x = torch.nn.functional.pad(x.double(), (0, 0) * (x.dim() - 2) + (0, n - T))
        return x.unflatten(1, (n // SUB_CHUNK, SUB_CHUNK))

    qs, ks, bs = split(q), split(k), split(beta[..., None])[..., 0]
    G = split(g).cumsum(2)
    o = torch.arange(SUB_CHUNK, device=q.device)
    on_or_below = (o[:, None] >= o[None, :])[None, None, :, :, None, None]
    decay = torch.where(on_or_below, G[:, :, :, None] - G[:, :, None, :], -torch.inf).exp()
    aqk = scale * (qs[:, :, :, None] * ks[:, :, None, :] * decay).sum(-1)
    akk = (ks[:, :, :, None] * ks[:, :, None, :] * decay).sum(-1) * bs[:, :, :, None, :]
    akk = torch.where((o[:, None] > o[None, :])[None, None, :, :, None], akk, 0.0)
    out = lambda x: x.permute(0, 1, 2, 4, 3).flatten(1, 2)[:, :T]  # noqa: E731
    return out(aqk), out(akk)


def check(T=1061):
    scale = K**-0.5
    for gate in ("model-init", "half-8/-0.02", "U(-50,0)"):
        q, k, v, _, beta, _ = kda_inputs(1, T, "mild", seed=T)
        g = sweep_gate(gate, (1, T, H, K), torch.Generator(device="cuda").manual_seed(T + 1), "cuda").float()
        aqk_ref, akk_ref = diag_blocks_f64(q, k, g, beta, scale)
        aqk, akk, _ = chunk_kda_diag_blocks(q, k, g, beta, scale)
        err = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
        print(dict(T=T, gate=gate, aqk_rel_err=err(aqk, aqk_ref), akk_rel_err=err(akk, akk_ref)), flush=True)
        del q, k, v, g, beta, aqk_ref, akk_ref, aqk, akk
        torch.cuda.empty_cache()


def main() -> None:
    T = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
    print(torch.cuda.get_device_name(), file=sys.stderr)
    check()
    scale = K**-0.5
    q, k, v, _, beta, _ = kda_inputs(1, T, "mild", seed=T)
    g = sweep_gate("model-init", (1, T, H, K), torch.Generator(device="cuda").manual_seed(T + 1), "cuda").float()
    for rows, warps in SETTINGS:
        us = _bench(lambda: chunk_kda_diag_blocks(q, k, g, beta, scale, rows, warps))
        compiled = chunk_kda_diag_blocks(q, k, g, beta, scale, rows, warps)[2]
        print(dict(T=T, rows=rows, warps=warps, us=round(us, 1), regs_spills=(compiled.n_regs, compiled.n_spills)))
    aqk = torch.empty(1, T, H, 64, dtype=torch.float32, device="cuda")
    akk = torch.empty(1, T, H, SUB_CHUNK, dtype=torch.float32, device="cuda")
    gk = g.unflatten(1, (-1, 64)).cumsum(2).flatten(1, 2) if T % 64 == 0 else g.cumsum(1)
    us = _bench(lambda: chunk_kda_fwd_intra_token_parallel(q, k, gk, beta, aqk, akk, scale))
    print(dict(T=T, kernel="fla token-parallel", us=round(us, 1)), flush=True)
    for rows, warps in SETTINGS[:2]:
        us = _bench(lambda: chunk_kda_intra(q, k, v, g, beta, scale, diag_rows=rows, diag_warps=warps))
        bufs = chunk_kda_intra(q, k, v, g, beta, scale, diag_rows=rows, diag_warps=warps)
        print(dict(T=T, call="chunk_kda_intra", rows=rows, warps=warps, us=round(us, 1), intra=bufs["compiled"]))


if __name__ == "__main__":
    main()
