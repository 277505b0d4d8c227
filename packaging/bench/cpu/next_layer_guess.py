"""How well a MoE layer's router, applied to the previous MoE layer's input, guesses the experts it will
choose: the guess engine/offload.py's InPlaceDecode gathers ahead. For each MoE layer of a checkpoint (the
embedded demo model by default), over the tokens of a text file: the share of the layer's chosen experts
that the guess names, and the share the token before chose in the same layer (what a cache of recently
used experts would hold), against chance (k of E).

    python packaging/bench/cpu/next_layer_guess.py                           # the demo model on README.md
    python packaging/bench/cpu/next_layer_guess.py --model PATH --text FILE --tokens 4096
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from kimi_desk.engine import load_model
from kimi_desk.engine.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[3]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REPO / "assets" / "model"))
    ap.add_argument("--text", default=str(REPO / "README.md"))
    ap.add_argument("--tokens", type=int, default=3000)
    args = ap.parse_args()
    model = load_model(args.model, dtype=torch.float32)
    ids = torch.tensor([load_tokenizer(args.model).encode(Path(args.text).read_text())[: args.tokens]])
    moes = [layer.block_sparse_moe for layer in model.model.layers if hasattr(layer, "block_sparse_moe")]
    inputs = {}
    for i, moe in enumerate(moes):
        moe.register_forward_hook(
            lambda module, args, out, i=i: inputs.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]))
        )
    with torch.inference_mode():
        model(ids, model.new_state(1))
        k, E = moes[0].gate.top_k, moes[0].gate.weight.shape[0]
        print(f"{ids.shape[1]} tokens of {args.text}; k = {k} of E = {E} experts (chance {k / E:.0%})")
        print("| layer | guessed from the layer before | chosen by the token before |\n|---|---:|---:|")
        for i in range(len(moes)):
            chosen = moes[i].gate(inputs[i])[0][:, :k].tolist()
            # The token before's choice in the same layer: what a cache of recently used experts would hold.
            repeated = sum(len(set(a) & set(b)) for a, b in zip(chosen[:-1], chosen[1:])) / (k * (len(chosen) - 1))
            guess = "-"
            if i:
                guessed = moes[i].gate(inputs[i - 1])[0][:, :k].tolist()
                guess = f"{sum(len(set(g) & set(c)) for g, c in zip(guessed, chosen)) / (k * len(chosen)):.0%}"
            print(f"| MoE {i} | {guess} | {repeated:.0%} |")


if __name__ == "__main__":
    main()
