"""How much each weight format changes the model, against its unquantized weights, on the CPU.

    python packaging/bench/quantization_quality.py demo          # the embedded model, held-out text
    python packaging/bench/quantization_quality.py random-48b    # a slice of a random model at the 48B shapes

For each of fp8, int8 and int4 (engine/quantize.py's rule), loaded through the engine as a user's
`--quantize` loads it, fused and prepared for the CPU:
- demo: held-out perplexity of the embedded model (packaging/demo_model's held-out split, in
  4096-token sequences read 1024 tokens a call, as its model card measures it) and its ratio to the
  unquantized model's;
- both: the logits' relative error against the unquantized model (float32 compute) on the same ids,
  and greedy agreement (the share of positions whose argmax is unchanged).
Prints one JSON object and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "packaging" / "demo_model"))

FORMATS = (None, "fp8", "int8", "int4")


def load(path: Path, method: str | None):
    from kimi_desk.engine.fuse import fuse_projections
    from kimi_desk.engine.quantize import prepare_for_cpu
    from kimi_desk.engine.weights import load_model

    model = fuse_projections(load_model(path, dtype=torch.float32, quantize=method))
    prepare_for_cpu(model)
    return model


@torch.no_grad()
def logits_of(model, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    state = model.new_state(ids.shape[0])
    return torch.cat([model(ids[:, s : s + chunk], state) for s in range(0, ids.shape[1], chunk)], dim=1)


def compare(reference: torch.Tensor, got: torch.Tensor) -> dict:
    return {
        "logits_rel_error": float((got - reference).norm() / reference.norm()),
        "greedy_agreement": float((got.argmax(-1) == reference.argmax(-1)).float().mean()),
    }


def demo(args) -> dict:
    from corpus_tokens import tokenize_split
    from evaluate import heldout_perplexity

    from kimi_desk.engine.loading import DEMO_MODEL
    from kimi_desk.engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(DEMO_MODEL)
    stream = tokenize_split(args.corpus, tokenizer, "heldout", log=lambda *_: None).lm_stream(
        tokenizer.special_tokens["[EOS]"]
    )
    ids = stream[: args.logit_tokens][None]
    rows, reference = [], None
    for method in FORMATS:
        began = time.perf_counter()
        model = load(DEMO_MODEL, method)
        ppl = heldout_perplexity(model, stream, args.ppl_tokens, 4096, 1024, token_by_token=64)
        logits = logits_of(model, ids, 1024)
        reference = logits if reference is None else reference
        rows.append(
            {
                "format": method or "none",
                "perplexity": ppl["ppl_chunked_prefill"],
                "tokens": ppl["tokens"],
                **compare(reference, logits),
                "seconds": round(time.perf_counter() - began, 1),
            }
        )
    base = rows[0]["perplexity"]
    for row in rows:
        row["perplexity_ratio"] = row["perplexity"] / base
    return {"model": "embedded demo model (assets/model)", "rows": rows}


def random_48b(args) -> dict:
    from kimi_desk.bench.random_checkpoint import kimi_linear_48b_config, write_random_checkpoint

    config = kimi_linear_48b_config()
    # The real model's first layers: the dense layer 0, then MoE layers; KDA, KDA, MLA.
    config.num_hidden_layers, config.kda_layers, config.full_attn_layers = 3, [1, 2], [3]
    ids = torch.randint(0, config.vocab_size, (1, args.logit_tokens), generator=torch.Generator().manual_seed(0))
    rows, reference = [], None
    with tempfile.TemporaryDirectory(dir=args.scratch) as folder:
        path = write_random_checkpoint(config, Path(folder) / "model", seed=0)
        for method in FORMATS:
            model = load(path, method)
            logits = logits_of(model, ids, 256)
            del model
            reference = logits if reference is None else reference
            rows.append({"format": method or "none", **compare(reference, logits)})
    return {"model": "random weights at the 48B shapes, layers 0-2 (dense KDA, MoE KDA, MoE MLA)", "rows": rows}


def markdown(result: dict) -> str:
    lines = [
        f"{result['model']}:",
        "",
        "| format | perplexity | vs none | logits rel. error | greedy agreement |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        ppl = f"{row['perplexity']:.3f}" if "perplexity" in row else "-"
        ratio = f"{(row['perplexity_ratio'] - 1) * 100:+.2f}%" if "perplexity_ratio" in row else "-"
        lines.append(
            f"| {row['format']} | {ppl} | {ratio} | {row['logits_rel_error']:.2e} | {row['greedy_agreement']:.1%} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=("demo", "random-48b"))
    parser.add_argument("--corpus", type=Path, default=REPO / "build" / "demo_model" / "corpus")
    parser.add_argument("--ppl-tokens", type=int, default=65536)
    parser.add_argument("--logit-tokens", type=int, default=1024)
    parser.add_argument("--scratch", default=None, help="a folder for the random checkpoint (default: /tmp)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    result = demo(args) if args.model == "demo" else random_48b(args)
    result["torch"] = torch.__version__
    print(json.dumps(result, indent=1))
    print(markdown(result))


if __name__ == "__main__":
    main()
