"""GPU check: where generate()'s time over the replayed step goes. One process, one random model at the
48B shapes, one state per cached length; each form of the step timed over the same number of tokens:

    plain              the recorded greedy step chained on the GPU (`bench model`'s "replayed step")
    ahead, chained     the step recorded looking ahead, replayed by step_own_choice back to back
    ahead, read        as generate() runs it: replay the next step, then read the one before's choice
    ahead, in place    "ahead, read" with the KDA states updated in place instead of alternating between
                       two sets of buffers (which is what lets `undo` take a step back): its cost
    generate()         the engine's own loop (engine/generate.py), median step

each greedy and with bench's sampled rule (temperature 0.7, top-k 50, top-p 0.9, repetition penalty
1.1) inside the step. The differences say what the look-ahead's alternating buffers, the host's reads
and the sampled choice each cost.

    source packaging/source_shim.sh && python3 packaging/bench/gpu_checks/lookahead_cost.py \
        [--layers 27] [--contexts 8192,131072] [--quantize fp8] [--tokens 60]
"""

import argparse
import dataclasses
import gc
import statistics
import time

import torch

from kimi_desk.bench.model import random_state, slice_config
from kimi_desk.bench.random_checkpoint import random_model
from kimi_desk.engine.cuda_graph import GraphDecoder
from kimi_desk.engine.fuse import fuse_projections
from kimi_desk.engine.generate import GREEDY, Sampling, generate

SAMPLED = Sampling(temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.1)


def ms_per_token(run, tokens: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    run(tokens)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / tokens * 1e3


def forms(model, state, sampling, tokens: int) -> dict:
    seen = torch.zeros(model.config.vocab_size, dtype=torch.bool, device="cuda")
    uniform = None if sampling.greedy else 0.37
    results = {}

    plain = GraphDecoder(model, state)
    plain.use_sampling(sampling, seen)

    def chained(n):
        token = plain.next_token if plain.next_token is not None else torch.ones(1, dtype=torch.long, device="cuda")
        for _ in range(n):
            plain.step(token, uniform)
            token = plain.next_token

    chained(3)
    results["plain"] = ms_per_token(chained, tokens)

    ahead = GraphDecoder(model, state)
    ahead.use_sampling(sampling, seen)
    ahead.use_lookahead(True)
    ahead.step(1, uniform)
    ahead.choice(ahead.last_step)

    def ahead_chained(n):
        for _ in range(n):
            ahead.step_own_choice(uniform)

    def ahead_read(n):
        last = ahead.last_step
        for _ in range(n):
            following = ahead.step_own_choice(uniform)
            ahead.choice(last)
            last = following

    ahead_chained(3)
    results["ahead, chained"] = ms_per_token(ahead_chained, tokens)
    results["ahead, read"] = ms_per_token(ahead_read, tokens)
    # Recorded again with no KDA layers to alternate (nor to put back after the warm-up: timing only).
    ahead._kda_layers = lambda state: []
    ahead._prepared_for = ()
    ahead_read(3)
    results["ahead, in place"] = ms_per_token(ahead_read, tokens)
    return results


def generate_median(model, context: int, sampling, tokens: int) -> float:
    prompt = torch.randint(0, model.config.vocab_size, (context,), device="cuda")
    options = {} if sampling.greedy else {"sampling": dataclasses.replace(SAMPLED, seed=1)}
    result = generate(model, prompt, model.new_state(1), max_new_tokens=tokens, stop_token_ids=[], **options)
    return statistics.median(step.seconds for step in result.steps[1:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=27)
    parser.add_argument("--contexts", default="8192,131072", help="cached tokens, comma-separated")
    parser.add_argument("--quantize", default="fp8")
    parser.add_argument("--tokens", type=int, default=60)
    args = parser.parse_args()
    config = slice_config(args.layers)
    model = fuse_projections(random_model(config, seed=0, dtype=torch.bfloat16, device="cuda", quantize=args.quantize))
    gen = torch.Generator(device="cuda").manual_seed(2)
    print(f"{torch.cuda.get_device_name()}, {args.layers} layers, {args.quantize}")
    print("| cached tokens | form | greedy ms/token | sampled ms/token |")
    print("|---:|---|---:|---:|")
    for context in (int(c) for c in args.contexts.split(",")):
        rows = {}
        for name, sampling in (("greedy", GREEDY), ("sampled", SAMPLED)):
            state = random_state(model, context, gen)
            rows[name] = forms(model, state, sampling, args.tokens)
            del state
            gc.collect()
            rows[name]["generate()"] = generate_median(model, context, sampling, args.tokens)
        for form in rows["greedy"]:
            print(f"| {context:,} | {form} | {rows['greedy'][form]:.3f} | {rows['sampled'][form]:.3f} |")


if __name__ == "__main__":
    main()
