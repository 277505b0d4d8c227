"""GPU check: decode with routed experts in RAM replayed as pieces of CUDA graphs (engine/cuda_graph.py,
engine/offload.py), against the whole model on the GPU and against the eager split model.

1. Correctness on a small random checkpoint (7 layers, 8 experts, the offload tests' placement: layers
   with no, some, one, most and all experts on the GPU), float32 and int4: the same greedy tokens fed to
   the whole model eagerly, the split model eagerly and the split model's recorded pieces; the recording
   is made again halfway (the MLA caches moved, as a grown cache moves them). generate() with the graphs
   against KIMI_DESK_CUDA_GRAPH=0.
2. Speed at the 48B shapes (`--layers`, int4, random weights, 149 of 256 experts per MoE layer on the GPU
   as at 24 GiB with 27 layers): ms/token eager against the graph at `--context` cached tokens (the RAM
   experts read by the GPU in place, engine/offload.py's InPlaceDecode), then the same steps with the CPU
   computing them (graph pieces with the host's steps between).

Run from the repo root on the device:
    source packaging/source_shim.sh && python3 packaging/bench/gpu_checks/offload_graphs.py [--layers 27] [--context 8192]
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from kimi_desk.bench.random_checkpoint import tail7_config, write_random_checkpoint
from kimi_desk.engine.cuda_graph import GraphDecoder
from kimi_desk.engine.generate import generate
from kimi_desk.engine.placement import Placement
from kimi_desk.engine.state import MLACache
from kimi_desk.engine.weights import load_model

GPU_EXPERTS = {1: (), 2: (0, 1, 2, 3), 3: (1, 4, 6), 4: (5,), 5: (0, 1, 2, 3, 4, 6, 7), 6: tuple(range(8))}


def rel(a, b) -> float:
    return float(((a.double() - b.double()).norm() / b.double().norm()).item())


def placement(gpu_experts, num_experts) -> Placement:
    return Placement(num_experts=num_experts, gpu_experts=gpu_experts, fixed_bytes=0, expert_bytes=1, staging_bytes=0)


def check(path: Path, name: str, dtype, quantize, prompt: int = 40, steps: int = 24) -> dict:
    whole = load_model(path, device="cuda", dtype=dtype, quantize=quantize)
    split = load_model(path, device="cuda", dtype=dtype, quantize=quantize, placement=placement(GPU_EXPERTS, 8))
    ids = torch.randint(0, 512, (1, prompt), generator=torch.Generator().manual_seed(7)).cuda()
    states = {}
    for key, model in (("whole", whole), ("eager", split), ("graph", split)):
        states[key] = model.new_state(1)
        logits = model(ids, states[key], last_only=True)
        if key == "whole":
            first = logits[:, -1].argmax(-1, keepdim=True)
    decoder = GraphDecoder(split, states["graph"])
    token, worst_whole, worst_eager, worst_abs, agree = first, 0.0, 0.0, 0.0, 0
    for i in range(steps):
        if i == steps // 2:
            for cache in states["graph"].layers:
                if isinstance(cache, MLACache):
                    cache.reserve(cache.capacity + 1)
        want = whole(token, states["whole"], last_only=True)[0, -1]
        eager = split(token, states["eager"], last_only=True)[0, -1]
        got = decoder.step(token).clone()
        worst_whole, worst_eager = max(worst_whole, rel(got, want)), max(worst_eager, rel(got, eager))
        worst_abs = max(worst_abs, float((got.double() - want.double()).abs().max()))
        agree += int(got.argmax() == want.argmax())
        token = want.argmax().view(1, 1)  # every model is fed the whole model's greedy token
    runs = {}
    for graphs in ("1", "0"):
        os.environ["KIMI_DESK_CUDA_GRAPH"] = graphs
        runs[graphs] = generate(
            split, ids[0].tolist(), split.new_state(1), max_new_tokens=16, stop_token_ids=[]
        ).token_ids
    os.environ.pop("KIMI_DESK_CUDA_GRAPH")
    result = {
        "graph_vs_whole_max_rel_err": worst_whole,
        "graph_vs_whole_max_abs_err": worst_abs,
        "graph_vs_eager_split_max_rel_err": worst_eager,
        "greedy_agree_with_whole": f"{agree}/{steps}",
        "recordings": decoder.recordings,
        "pieces": len(decoder.pieces),
        "generate_graph_equals_eager": runs["1"] == runs["0"],
    }
    print(f"{name}: {result}", flush=True)
    return result


def timing(layers: int, context: int, steps: int = 30) -> None:
    from kimi_desk.bench.model import chained_ms_per_token, chained_replays, slice_config, warm_state
    from kimi_desk.bench.random_checkpoint import random_model
    from kimi_desk.engine.fuse import fuse_projections

    config = slice_config(layers)
    moe = config.moe_layers
    plan = placement({i: tuple(range(149)) for i in moe}, config.num_experts)
    model = fuse_projections(
        random_model(config, seed=0, dtype=torch.bfloat16, device="cuda", quantize="int4", placement=plan)
    )
    gen = torch.Generator(device="cuda").manual_seed(1)
    token = torch.tensor([[5]], device="cuda")
    stats = model.offload.stats
    state, token = warm_state(model, context, token, gen)
    stats.reset()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        token = model(token, state, last_only=True)[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    eager_ms = (time.perf_counter() - start) / steps * 1e3
    eager_cpu = stats.cpu_seconds / steps * 1e3
    decoder = GraphDecoder(model, state)
    token = chained_replays(decoder, token, 3)
    stats.reset()
    in_place = model.offload.in_place
    if in_place is not None:
        in_place.take_counts()
    graph_ms, token = chained_ms_per_token(decoder, token, steps)
    graph_cpu = stats.cpu_seconds / steps * 1e3
    print(
        f"{layers} layers int4, {context:,} cached tokens, {len(decoder.pieces)} pieces: "
        f"eager {eager_ms:.2f} ms/token (CPU experts {eager_cpu:.2f}), graphs {graph_ms:.2f} ms/token (CPU experts {graph_cpu:.2f}, host wait "
        f"{stats.wait_seconds / steps * 1e3:.2f}); {torch.get_num_threads()} CPU threads",
        flush=True,
    )
    if in_place is not None:
        counts = in_place.take_counts()
        print(f"  RAM experts a token: { ({k: v / steps for k, v in counts.items()}) }", flush=True)
        # The same steps with the CPU computing the RAM experts (host round trips, graph pieces).
        model.offload.in_place = None
        decoder = GraphDecoder(model, state)
        token = chained_replays(decoder, token, 3)
        stats.reset()
        ms, token = chained_ms_per_token(decoder, token, steps)
        print(
            f"  CPU experts instead: {len(decoder.pieces)} pieces, {ms:.2f} ms/token (CPU experts "
            f"{stats.cpu_seconds / steps * 1e3:.2f}, host wait {stats.wait_seconds / steps * 1e3:.2f})",
            flush=True,
        )
        model.offload.in_place = in_place


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=27)
    parser.add_argument("--context", type=int, default=8192)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(tail7_config(moe_intermediate_size=64), Path(tmp) / "m", seed=4)
        check(path, "fp32", torch.float32, None)
        check(path, "int4", torch.bfloat16, "int4")
    timing(args.layers, args.context)


if __name__ == "__main__":
    main()
