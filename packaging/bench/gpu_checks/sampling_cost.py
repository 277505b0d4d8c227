"""GPU check: what a sampled token's choice costs at the 48B vocabulary (163,840), each variant recorded
20 times in a CUDA graph: choose_token greedy and sampled (the TUI's default temperature 0.7 / top-p
0.9, and bench's rule with top-k and a repetition penalty), pieces of it, and the form it replaced
(a sort of the vocabulary for top-p, one top-k of the whole row). First the Triton choices
(kernels/sampling/top_p.py, and top_k.py's whole choice under top-k) against naive.py's on the GPU,
token for token.

    source packaging/source_shim.sh && python3 packaging/bench/gpu_checks/sampling_cost.py
"""

import torch
import triton

from kimi_desk.engine.generate import Sampling, choose_token
from kimi_desk.kernels.sampling.naive import choose_sampled_torch, filter_top_k, top_k_weights
from kimi_desk.kernels.sampling.top_k import choose_top_k_triton
from kimi_desk.kernels.sampling.top_p import choose_sampled_triton

V = 163840
dev = "cuda"
logits = torch.randn(V, device=dev) * 3
uniform = torch.tensor([0.37], dtype=torch.float64, device=dev)
seen = torch.rand(V, device=dev) < 0.01
probs = torch.softmax(logits / 0.7, -1)


def graph_us(fn, calls=20):
    """Median microseconds per call of `fn`, `calls` of them recorded back to back in one graph."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return triton.testing.do_bench(g.replay, warmup=10, rep=200, return_mode="median") * 1e3 / calls


def sorted_top_p(probs, p):
    """The top-p filter this check's kernels replaced: a sort of the whole vocabulary."""
    sorted_probs, order = torch.sort(probs, descending=True)
    drop = torch.zeros_like(sorted_probs, dtype=torch.bool).scatter(
        -1, order, torch.cumsum(sorted_probs, -1) - sorted_probs >= p
    )
    return probs.masked_fill(drop, 0.0)


def before(logits, top_k, top_p):
    """choose_token's sampled path before (top-k of the whole row, softmax, sorted top-p, float64 cumsum)."""
    if top_k:
        logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[-1], -float("inf"))
    probs = sorted_top_p(torch.softmax(logits, -1), top_p)
    cdf = torch.cumsum(probs.double(), -1)
    return torch.searchsorted(cdf, uniform.view(1) * cdf[-1:], right=True)


mismatches = 0
for trial in range(200):
    scale = [0.3, 1.0, 3.0, 10.0][trial % 4]
    w = torch.softmax(torch.randn(V, device=dev) * scale, -1)
    w = w / w.max()
    p = [0.9, 0.5, 0.99, 1.0][trial // 4 % 4]
    u = torch.rand(1, dtype=torch.float64, device=dev)
    mismatches += int(choose_sampled_triton(w, p, u)) != int(choose_sampled_torch(w, p, u))
print(f"Triton against naive.py, 200 draws at V = {V}: {mismatches} different tokens")
mismatches = 0
for trial in range(200):
    x = torch.randn(V, device=dev) * [0.3, 1.0, 3.0, 10.0][trial % 4]
    k, p, penalty = [1, 20, 50, 64][trial // 4 % 4], [0.9, 0.5, 1.0][trial % 3], [1.0, 1.1, 1.5][trial % 3]
    u = torch.rand(1, dtype=torch.float64, device=dev)
    want = choose_sampled_torch(top_k_weights(x, k, 0.7, seen, penalty), p, u)
    mismatches += int(choose_top_k_triton(x, k, p, u, 0.7, seen, penalty)) != int(want)
print(f"top_k.py against naive.py, 200 draws at V = {V}: {mismatches} different tokens")

variants = {
    "greedy": lambda: choose_token(logits, Sampling(0.0), uniform),
    "T 0.7, top-p 0.9 (TUI)": lambda: choose_token(logits, Sampling(0.7, top_p=0.9), uniform),
    "T 0.7 only": lambda: choose_token(logits, Sampling(0.7), uniform),
    "T 0.7, top-k 50, top-p 0.9, penalty 1.1 (bench)": lambda: choose_token(
        logits, Sampling(0.7, top_k=50, top_p=0.9, repetition_penalty=1.1), uniform, seen
    ),
    "top-k 50, T 0.7, top-p 0.9, penalty 1.1: the PyTorch pieces": lambda: choose_sampled_triton(
        top_k_weights(logits, 50, 0.7, seen, 1.1), 0.9, uniform
    ),
    "top_k.py, k 1, no top-p, no penalty": lambda: choose_top_k_triton(logits, 1, 1.0, uniform, 0.7),
    "top_k.py, k 20, top-p 0.9": lambda: choose_top_k_triton(logits, 20, 0.9, uniform, 0.7),
    "top_k.py, k 64, top-p 0.9, penalty 1.1": lambda: choose_top_k_triton(logits, 64, 0.9, uniform, 0.7, seen, 1.1),
    "before: T 0.7, top-p 0.9": lambda: before(logits / 0.7, 0, 0.9),
    "before: T 0.7, top-k 50, top-p 0.9": lambda: before(logits / 0.7, 50, 0.9),
    "softmax": lambda: torch.softmax(logits / 0.7, -1),
    "sort with indices": lambda: torch.sort(probs, descending=True),
    "sorted top-p filter": lambda: sorted_top_p(probs, 0.9),
    "top-k 50 filter, stable sort (the PyTorch path)": lambda: filter_top_k(logits, 50),
    "choose_sampled_triton, top-p 0.9": lambda: choose_sampled_triton(probs / probs.max(), 0.9, uniform),
    "choose_sampled_triton, top-p 1": lambda: choose_sampled_triton(probs / probs.max(), 1.0, uniform),
    "cumsum float64 + searchsorted": lambda: torch.searchsorted(
        torch.cumsum(probs.double(), -1), uniform.view(1), right=True
    ),
    "cumsum float32": lambda: torch.cumsum(probs, -1),
    "topk 50": lambda: torch.topk(logits, 50),
    "topk 1024": lambda: torch.topk(probs, 1024),
    "sum": lambda: probs.sum(),
    "where (penalty)": lambda: torch.where(seen, logits * 1.1, logits),
}
print(f"vocabulary {V}, {torch.cuda.get_device_name()}")
for name, fn in variants.items():
    print(f"{name:>50}: {graph_us(fn):8.1f} us", flush=True)
