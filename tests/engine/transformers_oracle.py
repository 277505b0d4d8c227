"""Run transformers' native KimiLinearForCausalLM (pure-PyTorch path) on a checkpoint: the oracle.

Run as a separate process: transformers binds fla's Triton kernels whenever fla is importable, and the
tests import fla themselves, so fla is blocked here, in a process of its own.

    python transformers_oracle.py CHECKPOINT INPUTS.safetensors OUTPUT.safetensors NEW_TOKENS

INPUTS holds `input_ids` [B, T]; OUTPUT receives `logits` [B, T, vocab] (float32) and `greedy`
[B, NEW_TOKENS], the greedy continuation from transformers' own generate() with its cache.
"""

import sys

sys.modules["fla"] = None

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def main(checkpoint: str, inputs: str, output: str, new_tokens: str) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    input_ids = load_file(inputs)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids).logits.float()
        generated = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=int(new_tokens),
            do_sample=False,
            pad_token_id=model.config.pad_token_id,
            eos_token_id=None,
        )
    save_file({"logits": logits.contiguous(), "greedy": generated[:, input_ids.shape[1] :].contiguous()}, output)


if __name__ == "__main__":
    main(*sys.argv[1:])
