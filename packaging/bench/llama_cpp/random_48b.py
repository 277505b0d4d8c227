"""A random checkpoint at the Kimi-Linear-48B shapes, cut to a few layers, for checking that llama.cpp's
converter and llama-quantize handle the real tensor sizes (256 experts of 2304 x 1024, vocabulary
163 840, KDA with 32 heads of 128, MLA latent 512 + 64).

    python packaging/bench/llama_cpp/random_48b.py OUT_DIR [--layers 4] [--shard-gb 2]

The layers follow the real model: layer 0 dense, the others MoE; K K K M from the start (the 48B
model's first four layers) and MLA last (as the 48B model's layer 27), so --layers 4 has 3 KDA layers
and 1 MLA layer, --layers 2 is K M. Size in bf16: about 1.6 GB
(embedding, LM head) + 3.6 GB per MoE layer; the whole model is held in memory while it is written
(plus one shard), so --layers 4 needs about 14 GiB of RAM (13.9 measured), 5 about 17.3. No
tokenizer: convert.py writes a placeholder vocabulary.

--empty-experts leaves the routed experts as zeros in sparse files (random_checkpoint.py
`write_checkpoint_with_empty_experts`): all 27 layers take about 3 GB of disk and little memory to
write, for the memory test of packaging/bench/cpu/fits_in_ram.py, not for llama.cpp.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from kimi_desk.bench.random_checkpoint import (
    kimi_linear_48b_config,
    write_checkpoint_with_empty_experts,
    write_random_checkpoint,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--shard-gb", type=float, default=2.0, help="safetensors shard size (GB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--empty-experts", action="store_true", help="routed experts as holes (zeros) in sparse files")
    args = parser.parse_args(argv)
    if args.layers < 2:
        raise SystemExit("--layers must be at least 2 (a dense layer 0, then MoE layers)")

    full = kimi_linear_48b_config()
    # 1-based, as in config.json: every 4th layer is MLA, and so is the last (the real model's 27th). At
    # least one MLA layer: llama.cpp's Kimi Linear graph aborts without one (its attention input meets a
    # cache with no layers: ggml_backend_buffer_get_type on a null buffer in set_input_k_idxs).
    mla = sorted({n for n in range(4, args.layers + 1, 4)} | {args.layers})
    kda = [n for n in range(1, args.layers + 1) if n not in mla]
    config = dataclasses.replace(full, num_hidden_layers=args.layers, kda_layers=kda, full_attn_layers=mla)
    config.validate()
    start = time.perf_counter()
    write = write_checkpoint_with_empty_experts if args.empty_experts else write_random_checkpoint
    write(config, args.out, seed=args.seed, max_shard_bytes=int(args.shard_gb * 1e9))
    size = sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
    on_disk = sum(f.stat().st_blocks * 512 for f in args.out.glob("*.safetensors"))
    print(
        f"random_48b.py: {args.out}: {args.layers} layers (KDA {kda}, MLA {mla}), {size / 1e9:.2f} GB ({on_disk / 1e9:.2f} on disk), "
        f"{time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
