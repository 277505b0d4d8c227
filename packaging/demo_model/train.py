"""Train the embedded demo model: a small Kimi Linear (KDA and MLA layers 3:1, dense layer 0, MoE with a
shared expert) on the corpus, then on synthetic retrieval conversations.

    python packaging/demo_model/train.py --device cuda --time-budget-minutes 17     # the real run (H100)
    python packaging/demo_model/train.py --device cpu --max-steps 3 --tiny          # a smoke run

Stages, one cosine schedule across both:
  (a) language modelling: random windows of --lm-context tokens from the training documents, packed
      back to back ([EOS] between documents), loss on every token;
  (b) retrieval: conversations from retrieval_samples.py at the --retrieval-contexts lengths, loss on
      the assistant's reply (and --document-loss-weight on the document, so stage (a)'s skill stays).
The step count comes from --max-steps, or from --time-budget-minutes: the first steps of both stages
and one evaluation are timed, and the schedule is fitted to the budget left.

bf16 autocast on CUDA (fp32 master weights), AdamW, warmup then cosine decay, gradient clipping, the
router's selection bias moved towards balanced expert loads after every step (the auxiliary-loss-free
balancing of DeepSeek-V3, which Kimi's MoE follows). Every --eval-every steps: held-out perplexity and
held-out retrieval. Writes, in --out:
    log.jsonl                  one record per step and per evaluation
    loss_curve.csv / .png      the curve (the PNG when matplotlib is importable; else --plot-log later)
    checkpoints/step-N/        the model in the official layout (bf16), at the end of each stage
    model/                     the final model: config.json, safetensors (bf16), tokenizer.json
    summary.json               config, parameter counts, tokens seen, time, the last evaluation
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import random
import shutil
import time

_PROCESS_STARTED = time.perf_counter()  # before torch's import, which the start-up phases count too
from dataclasses import dataclass
from pathlib import Path

import torch
from corpus_tokens import tokenize_split
from prepare_corpus import DEFAULT_OUT as DEFAULT_CORPUS
from task_samples import DEFAULT_MIX, TaskSampleBuilder
from train_tokenizer import DEFAULT_OUT as DEFAULT_TOKENIZER
from train_tokenizer import model_vocab_size
from training_forward import select_kda_function, training_hidden, weighted_lm_loss

from kimi_desk.bench.random_checkpoint import RELEASED_STRUCTURE
from kimi_desk.engine.chat import DEFAULT_SYSTEM_PROMPT
from kimi_desk.engine.config import KimiLinearConfig
from kimi_desk.engine.model import KimiLinearForCausalLM
from kimi_desk.engine.tokenizer import load_tokenizer
from kimi_desk.engine.weights import build_on_meta, load_model, materialize, save_checkpoint

DEFAULT_RUN = DEFAULT_CORPUS.parent / "run"
EXPORT_RESERVE_S = 30  # the final evaluation and the export after the clock runs out
# Sessions read documents after the default system prompt; the engine's API also allows none, so one
# conversation in five goes without.
SYSTEM_PROMPTS = (DEFAULT_SYSTEM_PROMPT,) * 4 + (None,)


# -- the model -------------------------------------------------------------------------------------


def demo_config(vocab_size: int, bos_id: int, eos_id: int, pad_id: int, tiny: bool = False) -> KimiLinearConfig:
    """The demo model: 8 layers K K K M K K K M, hidden 320: 22.2 M parameters, 11.9 M active per token
    (lm_head included, embedding not).

    The size is set by the shipped file: under 50 MB with its tokenizer at bf16 means about 24 M
    parameters, of which the untied embedding and lm_head take 7.9 M at a 12 288 vocabulary. Two MLA
    layers (not one) give the retrieval heads a second chance to find a fact; 8 experts with 2 active
    plus a shared one keep the MoE structure at a quarter of the expert compute.
    """
    common = dict(
        RELEASED_STRUCTURE,
        vocab_size=vocab_size,
        routed_scaling_factor=1.0,
        model_max_length=1 << 20,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="bfloat16",
    )
    if tiny:
        shape = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            kda_layers=[1, 2, 3],
            full_attn_layers=[4],
            num_attention_heads=2,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            kda_num_heads=2,
            kda_head_dim=32,
            num_experts=4,
            num_experts_per_token=2,
            moe_intermediate_size=32,
        )
    else:
        shape = dict(
            hidden_size=320,
            intermediate_size=960,
            num_hidden_layers=8,
            kda_layers=[1, 2, 3, 5, 6, 7],
            full_attn_layers=[4, 8],
            num_attention_heads=5,
            kv_lora_rank=128,
            qk_nope_head_dim=64,
            qk_rope_head_dim=32,
            v_head_dim=64,
            kda_num_heads=5,
            kda_head_dim=64,
            num_experts=8,
            num_experts_per_token=2,
            moe_intermediate_size=160,
        )
    config = KimiLinearConfig(**common, **shape)
    config.validate()
    return config


def init_model(config: KimiLinearConfig, seed: int, device) -> KimiLinearForCausalLM:
    """fp32 parameters initialised as the reference code does (kimi-linear-spec.md §3.5): N(0, 0.02) for
    projections and embeddings, output projections scaled by 1/sqrt(2 layers) (GPT-2's residual scaling),
    A_log = log U(1, 16), dt_bias = softplus^-1 of a log-uniform step in [1e-3, 0.1], norms 1, and a
    zero selection bias. The selection bias is moved by the balancing rule, never by gradients."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    model = build_on_meta(config)
    materialize(model, torch.device("cpu"), torch.float32)
    residual_std = 0.02 / math.sqrt(2 * config.num_hidden_layers)
    for name, param in model.named_parameters():
        shape = param.shape
        if name.endswith("A_log"):
            value = torch.empty(shape).uniform_(1, 16, generator=gen).log()
        elif name.endswith("dt_bias"):
            dt = torch.exp(torch.rand(shape, generator=gen) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            value = dt + torch.log(-torch.expm1(-dt))
        elif name.endswith("conv1d.weight"):
            bound = 1 / math.sqrt(shape[-1])
            value = torch.empty(shape).uniform_(-bound, bound, generator=gen)
        elif name.endswith("e_score_correction_bias"):
            value = torch.zeros(shape)
        elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            value = torch.ones(shape)
        elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.w2")):
            value = residual_std * torch.randn(shape, generator=gen)
        else:
            value = 0.02 * torch.randn(shape, generator=gen)
        param.data.copy_(value)
        param.requires_grad_(not name.endswith("e_score_correction_bias"))
    return model.to(device).train()


def parameter_groups(model: KimiLinearForCausalLM, weight_decay: float) -> list[dict]:
    """Weight decay on the matrices only: norms, gate scalars (A_log, dt_bias) and the short-conv taps
    set scales and time constants, which decay towards zero would distort."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        keep = param.dim() < 2 or name.endswith(("A_log", "dt_bias", "conv1d.weight"))
        (no_decay if keep else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def parameter_counts(model: KimiLinearForCausalLM) -> dict:
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    embedding = model.model.embed_tokens.weight.numel()
    active = total - embedding - experts + experts * config.num_experts_per_token // config.num_experts
    return {
        "total": total,
        "embedding": embedding,
        "lm_head": model.lm_head.weight.numel(),
        "routed_experts": experts,
        "active_per_token_without_embedding": active,
    }


def flops_per_token(config: KimiLinearConfig, context: int, active_params: int) -> float:
    """Training FLOPs per token: 6 per active weight (forward and backward products), plus MLA's
    attention over on average context/2 earlier tokens and KDA's chunked recurrence (TR §6.3:
    6 d^2 + 3 C d + C^2 per head and token), each times 3 for forward and backward."""
    H, qk = config.num_attention_heads, config.qk_nope_head_dim + config.qk_rope_head_dim
    mla_layers = config.layer_kinds.count("mla")
    kda_layers = config.layer_kinds.count("kda")
    # v is padded to the query width for the flash kernels, so both products have width qk.
    attention = 2 * 2 * (context / 2) * H * qk * mla_layers
    d, C = config.kda_head_dim, 64
    recurrence = (6 * d * d + 3 * C * d + C * C) * config.kda_num_heads * kda_layers
    return 6 * active_params + 3 * (attention + recurrence)


# -- data ------------------------------------------------------------------------------------------


@dataclass
class Batch:
    kind: str  # "lm" or "retrieval"
    input_ids: torch.Tensor  # [B, T] int64
    targets: torch.Tensor  # [B, T] int64
    answer_weights: torch.Tensor  # [B, T] float: 1 on reply tokens (retrieval only)
    document_weights: torch.Tensor  # [B, T] float: 1 on document tokens

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device) -> "Batch":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Batch(
            self.kind, move(self.input_ids), move(self.targets), move(self.answer_weights), move(self.document_weights)
        )


def lm_batch(stream: torch.Tensor, rows: int, context: int, gen: torch.Generator) -> Batch:
    """Random windows of the packed document stream: every token a target."""
    starts = torch.randint(0, stream.numel() - context - 1, (rows,), generator=gen)
    windows = stream[starts[:, None] + torch.arange(context + 1)].long()  # [B, T + 1]
    ones = torch.ones(rows, context)
    return Batch("lm", windows[:, :-1], windows[:, 1:], torch.zeros(rows, context), ones)


def retrieval_batch(
    builder: TaskSampleBuilder,
    rows: int,
    context: int,
    rng: random.Random,
    pad_id: int,
    system_prompts: list[str | None],
    document_weight: float = 0.0,
    looked_up_weight: float = 1.0,
) -> Batch:
    """Task conversations (task_samples.py) of at most `context` tokens, padded at the end (padding is
    never a target, and the causal model never lets it reach earlier positions). The answer weights
    cover every reply of a conversation; the document weights (`document_weight` on its tokens, 0 by
    default: the loss is the replies') let a run keep some language modelling inside the stage too;
    `looked_up_weight` weighs the reply tokens that the question does not hold (TaskSample.target_weights)."""
    inputs = torch.full((rows, context + 1), pad_id, dtype=torch.long)
    answer = torch.zeros(rows, context)
    document = torch.zeros(rows, context)
    for row in range(rows):
        sample = builder.sample(context + 1, rng, system=rng.choice(system_prompts))
        n = len(sample.input_ids)
        inputs[row, :n] = torch.tensor(sample.input_ids)
        answer[row, : n - 1] = torch.tensor(sample.target_weights(0.0, looked_up_weight))
        if document_weight:
            document[row, sample.document_start : sample.document_end - 1] = document_weight
    return Batch("retrieval", inputs[:, :-1], inputs[:, 1:], answer, document)


class LMSteps:
    """Optimizer steps of language modelling: `micro_steps` batches of random windows."""

    def __init__(self, stream: torch.Tensor, rows: int, context: int, micro_steps: int, seed: int):
        self.stream, self.rows, self.context, self.micro_steps, self.seed = stream, rows, context, micro_steps, seed
        self.gen = None

    def __call__(self, worker: int, workers: int) -> list[Batch]:
        if self.gen is None:  # per process: each loader worker draws its own windows
            self.gen = torch.Generator().manual_seed(self.seed * 1009 + worker)
        return [lm_batch(self.stream, self.rows, self.context, self.gen) for _ in range(self.micro_steps)]


class RetrievalSteps:
    """Optimizer steps of retrieval conversations, the contexts taken in turn (across loader workers too:
    worker w of n builds turns w, w + n, ...; the loader hands their steps out in that order)."""

    def __init__(
        self,
        builder: TaskSampleBuilder,
        contexts: list[int],
        micro_batch_tokens: int,
        micro_steps: int,
        pad_id: int,
        seed: int,
        document_weight: float = 0.0,
        looked_up_weight: float = 1.0,
    ):
        self.builder, self.contexts, self.micro_batch_tokens = builder, contexts, micro_batch_tokens
        self.micro_steps, self.pad_id, self.seed = micro_steps, pad_id, seed
        self.document_weight, self.looked_up_weight = document_weight, looked_up_weight
        self.rng, self.turn = None, 0

    def __call__(self, worker: int, workers: int) -> list[Batch]:
        if self.rng is None:
            self.rng, self.turn = random.Random(self.seed * 1009 + worker), worker
        context = self.contexts[self.turn % len(self.contexts)]
        self.turn += workers
        rows = max(1, self.micro_batch_tokens // context)
        return [
            retrieval_batch(
                self.builder,
                rows,
                context,
                self.rng,
                self.pad_id,
                SYSTEM_PROMPTS,
                self.document_weight,
                self.looked_up_weight,
            )
            for _ in range(self.micro_steps)
        ]


class _StepStream(torch.utils.data.IterableDataset):
    def __init__(self, make_step):
        self.make_step = make_step

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        while True:
            yield self.make_step(worker, workers)


class StepSource:
    """Steps built in `workers` loader processes, ahead of the training loop, or (workers = 0) when asked
    for. Processes, not threads: building conversations is Python and tokenizer work that would hold
    the GIL the loop needs to launch the GPU's kernels, and on the CPU a second thread's OpenMP pool
    fights the loop's for the same cores."""

    def __init__(self, make_step, workers: int):
        self._make_step = make_step
        self._iterator = None
        if workers > 0:
            loader = torch.utils.data.DataLoader(
                _StepStream(make_step),
                batch_size=None,
                num_workers=workers,
                prefetch_factor=4,
                multiprocessing_context="fork",
            )
            self._iterator = iter(loader)

    def next(self) -> list[Batch]:
        return next(self._iterator) if self._iterator is not None else self._make_step(0, 1)

    def close(self) -> None:
        self._iterator = None  # the loader's workers stop when it is dropped


# -- training --------------------------------------------------------------------------------------


def learning_rate(step: int, total: int, warmup: int, peak: float, floor_fraction: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor_fraction + (1 - floor_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def clock_learning_rate(steps_done: int, progress: float, warmup: int, peak: float, floor_fraction: float) -> float:
    """Linear warm-up over `warmup` steps, then a cosine from the peak to `floor_fraction` of it over the
    fraction `progress` of the training time."""
    if steps_done < warmup:
        return peak * (steps_done + 1) / warmup
    return peak * (floor_fraction + (1 - floor_fraction) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def stage_b_kind(index: int, lm_mix: float) -> str:
    """Stage (b)'s step `index`: a language-modelling step in a fraction `lm_mix` of them, evenly spread
    (so that the corpus's fluency is kept while the loss on task samples is the replies' only)."""
    return "lm" if math.floor((index + 1) * lm_mix) > math.floor(index * lm_mix) else "retrieval"


def stage_a_steps(total: int, retrieval_fraction: float) -> int:
    """Language-modelling steps of `total`: each stage gets at least one step when both are asked for."""
    steps = round(total * (1 - retrieval_fraction))
    if retrieval_fraction > 0 and total >= 2:
        steps = min(steps, total - 1)
    if retrieval_fraction < 1:
        steps = max(1, steps)
    return min(steps, total)


def balance_experts(model: KimiLinearForCausalLM, counts: dict[int, torch.Tensor], rate: float) -> float:
    """Move each MoE layer's selection bias up for under-loaded experts and down for over-loaded ones;
    returns the mean over layers of (busiest expert's load / mean load)."""
    ratios = []
    with torch.no_grad():
        for index, layer_counts in counts.items():
            gate = model.model.layers[index].block_sparse_moe.gate
            load = layer_counts.float()
            gate.e_score_correction_bias.add_(rate * torch.sign(load.mean() - load))
            ratios.append(float(load.max() / load.mean().clamp_min(1e-9)))
    return sum(ratios) / max(1, len(ratios))


class Trainer:
    def __init__(self, args, model, kda_fn, device):
        self.args, self.model, self.kda_fn, self.device = args, model, kda_fn, device
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
        fused = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            parameter_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused
        )
        self.trainable = [p for p in model.parameters() if p.requires_grad]

    def _hidden(self, batch: Batch, counts: dict | None) -> torch.Tensor:
        context = self.autocast if self.autocast is not None else contextlib.nullcontext()
        with context:
            return training_hidden(self.model, batch.input_ids, self.kda_fn, counts, self.args.checkpoint_layers)

    def _losses(self, batch: Batch, hidden: torch.Tensor):
        """(loss to minimise, answer loss or None, document/LM loss) of one micro-batch."""
        document_tokens = batch.document_weights.sum().clamp_min(1)
        document_loss = weighted_lm_loss(self.model, hidden, batch.targets, batch.document_weights) / document_tokens
        if batch.kind == "lm":
            return document_loss, None, document_loss
        answer_tokens = batch.answer_weights.sum().clamp_min(1)
        answer_loss = weighted_lm_loss(self.model, hidden, batch.targets, batch.answer_weights) / answer_tokens
        return answer_loss + self.args.document_loss_weight * document_loss, answer_loss, document_loss

    def step(self, micro_batches: list[Batch], lr: float) -> dict:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        counts: dict[int, torch.Tensor] = {}
        totals = {"loss": 0.0, "answer_loss": 0.0, "document_loss": 0.0}
        for batch in micro_batches:
            micro_counts: dict[int, torch.Tensor] = {}
            batch = batch.to(self.device)
            loss, answer_loss, document_loss = self._losses(batch, self._hidden(batch, micro_counts))
            (loss / len(micro_batches)).backward()
            for index, value in micro_counts.items():
                counts[index] = counts.get(index, 0) + value
            totals["loss"] += loss.detach() / len(micro_batches)
            totals["document_loss"] += document_loss.detach() / len(micro_batches)
            if answer_loss is not None:
                totals["answer_loss"] += answer_loss.detach() / len(micro_batches)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.args.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        load_ratio = balance_experts(self.model, counts, self.args.balance_rate)
        record = {k: float(v) for k, v in totals.items()}
        if micro_batches[0].kind == "lm":
            del record["answer_loss"]
        record.update(grad_norm=float(grad_norm), expert_load_max_over_mean=round(load_ratio, 3))
        return record

    @torch.no_grad()
    def evaluate(self, lm_windows: list[Batch], retrieval: list[Batch]) -> dict:
        self.model.eval()
        lm_sum = lm_tokens = 0.0
        for batch in lm_windows:
            batch = batch.to(self.device)
            _, _, loss = self._losses(batch, self._hidden(batch, None))
            lm_sum += float(loss) * batch.tokens
            lm_tokens += batch.tokens
        answer_losses, exact = [], []
        for batch in retrieval:
            batch = batch.to(self.device)
            hidden = self._hidden(batch, None)
            answer_losses.append(float(self._losses(batch, hidden)[1]))
            # Teacher-forced exact match: every reply token is the model's top choice.
            for row in range(batch.input_ids.shape[0]):
                positions = batch.answer_weights[row].nonzero().squeeze(-1)
                predicted = self.model.lm_head(hidden[row, positions].float()).argmax(-1)
                exact.append(bool((predicted == batch.targets[row, positions]).all()))
        self.model.train()
        result = {"heldout_lm_loss": lm_sum / max(1, lm_tokens)}
        result["heldout_ppl"] = math.exp(min(50.0, result["heldout_lm_loss"]))
        if retrieval:
            result["heldout_answer_loss"] = sum(answer_losses) / len(answer_losses)
            result["heldout_answer_exact"] = sum(exact) / len(exact)
        return result


# -- output ----------------------------------------------------------------------------------------


def export_model(
    model: KimiLinearForCausalLM,
    tokenizer_json: Path,
    path: Path,
    dtype=torch.bfloat16,
    max_shard_bytes: int | None = None,
) -> int:
    """The model in the official layout at `dtype` (the gate scalars, conv taps and selection bias stay
    fp32, as the engine keeps them), with tokenizer.json beside it; returns the folder's size in bytes."""
    config = dataclasses.replace(model.config, dtype=str(dtype).removeprefix("torch."))
    target = build_on_meta(config)
    materialize(target, torch.device("cpu"), dtype)
    source = dict(model.named_parameters())
    for name, param in target.named_parameters():
        param.data.copy_(source[name].detach().cpu())
    if path.exists():
        shutil.rmtree(path)
    save_checkpoint(target, path, max_shard_bytes=max_shard_bytes)
    shutil.copyfile(tokenizer_json, path / "tokenizer.json")
    return sum(f.stat().st_size for f in path.iterdir())


def plot_log(log_path: Path, out_dir: Path) -> list[Path]:
    """loss_curve.csv, and loss_curve.png when matplotlib is importable, from a log.jsonl."""
    steps, evals = [], []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "eval" in record:
            evals.append(record)
        elif "stage" in record:
            steps.append(record)
    csv = out_dir / "loss_curve.csv"
    with csv.open("w", encoding="utf-8") as out:
        out.write("step,stage,loss,answer_loss,heldout_lm_loss,heldout_answer_loss,heldout_answer_exact\n")
        by_step = {r["step"]: r["eval"] for r in evals}
        for r in steps:
            e = by_step.get(r["step"], {})
            out.write(
                f"{r['step']},{r['stage']},{r['loss']:.5f},{r.get('answer_loss', '')},"
                f"{e.get('heldout_lm_loss', '')},{e.get('heldout_answer_loss', '')},"
                f"{e.get('heldout_answer_exact', '')}\n"
            )
    written = [csv]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    lm = [r for r in steps if r["stage"] == "lm"]
    rt = [r for r in steps if r["stage"] == "retrieval"]
    left.plot([r["step"] for r in lm], [r["loss"] for r in lm], lw=0.8, label="train LM loss")
    left.plot([r["step"] for r in rt], [r["document_loss"] for r in rt], lw=0.8, label="train document loss (stage b)")
    left.plot([r["step"] for r in evals], [r["eval"]["heldout_lm_loss"] for r in evals], "o-", label="held-out LM loss")
    left.set_xlabel("step"), left.set_ylabel("nats/token"), left.legend(), left.set_title("language modelling")
    right.plot([r["step"] for r in rt], [r["answer_loss"] for r in rt], lw=0.8, label="train answer loss")
    held = [r for r in evals if "heldout_answer_loss" in r["eval"]]
    right.plot(
        [r["step"] for r in held], [r["eval"]["heldout_answer_loss"] for r in held], "o-", label="held-out answer loss"
    )
    right.plot(
        [r["step"] for r in held],
        [r["eval"]["heldout_answer_exact"] for r in held],
        "s--",
        label="held-out answer exact (teacher-forced)",
    )
    right.set_xlabel("step"), right.legend(), right.set_title("retrieval")
    fig.tight_layout()
    png = out_dir / "loss_curve.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return written + [png]


# -- the run ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help="folder with tokenizer.json")
    parser.add_argument(
        "--token-cache", type=Path, default=None, help="where the corpus's ids are cached (default: <corpus>/tokens)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_RUN)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a 4-layer model, short contexts: a smoke run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from this checkpoint folder's weights (same config), e.g. assets/model",
    )
    parser.add_argument("--max-steps", type=int, default=None, help="steps in all (default: fit the time budget)")
    parser.add_argument(
        "--time-budget-minutes",
        type=float,
        default=17.0,
        help="wall-clock minutes from the start to the last step (setup and evaluations "
        "included; the export and the curve come after)",
    )
    parser.add_argument("--retrieval-fraction", type=float, default=0.35, help="share of the steps in stage (b)")
    parser.add_argument("--batch-tokens", type=int, default=None, help="tokens per optimizer step")
    parser.add_argument("--micro-batch-tokens", type=int, default=None, help="tokens per forward/backward pass")
    parser.add_argument("--lm-context", type=int, default=None)
    parser.add_argument("--retrieval-contexts", default=None, help="comma-separated lengths, used in turn")
    parser.add_argument(
        "--document-loss-weight",
        type=float,
        default=0.0,
        help="weight of the document's mean LM loss beside the replies' mean loss in stage (b) "
        "(default 0: the loss on task samples is the replies'; --lm-mix keeps the fluency)",
    )
    parser.add_argument(
        "--looked-up-weight",
        type=float,
        default=1.0,
        help="weight of the reply tokens that the question does not hold (the value, path or name looked "
        "up in the document) against 1 for the reply's other tokens",
    )
    parser.add_argument(
        "--lm-mix", type=float, default=0.25, help="share of stage (b)'s steps that are plain language modelling"
    )
    parser.add_argument(
        "--task-mix",
        default=None,
        help="stage (b)'s tasks and weights, e.g. needle=0.35,which_file=0.2,where_function=0.1,"
        "setting_default=0.15,followup=0.2 (the default)",
    )
    parser.add_argument(
        "--train-minutes",
        type=float,
        default=None,
        help="minutes of training steps, counted after start-up and the warm-up steps "
        "(instead of --time-budget-minutes, which counts from the start)",
    )
    parser.add_argument(
        "--triton-autotune",
        choices=("pinned", "full"),
        default="pinned",
        help="pinned: one config per Triton autotuner (no benchmarking; see "
        "training_forward.pin_triton_autotune); full: Triton's autotuning",
    )
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--min-lr-fraction", type=float, default=0.1)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--balance-rate", type=float, default=1e-3, help="step of the expert-balancing bias")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-lm-windows", type=int, default=8)
    parser.add_argument("--eval-retrieval-samples", type=int, default=16)
    parser.add_argument("--kda-backend", choices=("auto", "torch", "fla"), default="auto")
    parser.add_argument(
        "--loader-workers",
        type=int,
        default=None,
        help="processes building batches ahead (default: 4 on CUDA, none on the CPU)",
    )
    parser.add_argument(
        "--checkpoint-layers",
        action="store_true",
        help="recompute each layer in the backward pass (less memory, about 30%% more time)",
    )
    parser.add_argument(
        "--max-shard-mb",
        type=int,
        default=None,
        help="shard the exported safetensors (e.g. 15 to fetch files of under 16 MiB)",
    )
    parser.add_argument("--plot-log", type=Path, default=None, help="only draw the curve of this log.jsonl")
    args = parser.parse_args(argv)
    if (
        args.tokenizer == DEFAULT_TOKENIZER
        and args.init_from is not None
        and (args.init_from / "tokenizer.json").is_file()
    ):
        # The checkpoint's own tokenizer: the ids it was trained on.
        args.tokenizer = args.init_from
    if args.plot_log is not None:
        for path in plot_log(args.plot_log, args.plot_log.parent):
            print(f"wrote {path}")
        return
    defaults = (
        dict(batch_tokens=1024, micro_batch_tokens=512, lm_context=128, retrieval_contexts="256,512")
        if args.tiny
        else dict(
            batch_tokens=131072,
            micro_batch_tokens=32768,
            lm_context=4096,
            retrieval_contexts="1024,2048,4096,8192,16384",
        )
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    run(args)


def run(args) -> dict:
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "log.jsonl"
    log_file = log_path.open("w", encoding="utf-8")

    def log(record: dict) -> None:
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()

    phases = {}  # seconds of each start-up phase, for the summary: what costs time that is not training

    def phase(name: str, since: float) -> float:
        now = time.perf_counter()
        phases[name] = round(now - since, 1)
        print(f"{name}: {phases[name]:.1f} s")
        return now

    mark = phase("imports_and_setup", _PROCESS_STARTED)
    tokenizer = load_tokenizer(args.tokenizer)
    specials = tokenizer.special_tokens
    config = demo_config(
        model_vocab_size(tokenizer), specials["[BOS]"], specials["<|im_end|>"], specials["[PAD]"], tiny=args.tiny
    )
    train_split = tokenize_split(args.corpus, tokenizer, "train", cache_dir=args.token_cache)
    heldout_split = tokenize_split(args.corpus, tokenizer, "heldout", cache_dir=args.token_cache)
    if heldout_split.num_documents == 0:
        raise SystemExit(
            f"{args.corpus}: the held-out split is empty; rebuild the corpus with a larger --heldout-fraction"
        )
    separator = specials["[EOS]"]
    train_stream, heldout_stream = train_split.lm_stream(separator), heldout_split.lm_stream(separator)
    mark = phase("tokenize_corpus", mark)

    model = init_model(config, args.seed, device)
    if args.init_from is not None:
        # Continue from a trained checkpoint of this architecture (e.g. the shipped assets/model): its
        # weights replace the initialisation, through the engine's strict loader (names, shapes).
        trained = load_model(args.init_from, dtype=torch.float32)
        if {**trained.config.to_dict(), "dtype": None} != {**config.to_dict(), "dtype": None}:
            raise SystemExit(
                f"{args.init_from}: its config.json is not the demo model's ({'tiny ' if args.tiny else ''}config)"
            )
        model.load_state_dict(trained.state_dict())
        del trained
    counts = parameter_counts(model)
    mark = phase("build_model", mark)
    kda_fn, kda_backend = select_kda_function(
        args.kda_backend,
        device,
        heads=config.kda_num_heads,
        head_dim=config.kda_head_dim,
        pin_configs=args.triton_autotune == "pinned",
    )
    mark = phase("kda_check_and_compile", mark)
    trainer = Trainer(args, model, kda_fn, device)
    contexts = [int(c) for c in str(args.retrieval_contexts).split(",")]
    micro_steps = max(1, args.batch_tokens // args.micro_batch_tokens)
    # Every micro-batch holds exactly --micro-batch-tokens (rows x context): with KDA fed as one varlen
    # sequence, the kernels then see one shape all run long and compile once.
    for context in contexts + [args.lm_context]:
        if args.micro_batch_tokens % context:
            raise SystemExit(f"context {context} does not divide --micro-batch-tokens {args.micro_batch_tokens}")
    print(
        f"model: {counts['total'] / 1e6:.2f} M parameters ({counts['active_per_token_without_embedding'] / 1e6:.2f} M "
        f"active per token without the embedding); KDA through {kda_backend}; device {device}"
    )

    mix = (
        DEFAULT_MIX
        if args.task_mix is None
        else {name: float(weight) for name, weight in (item.split("=") for item in args.task_mix.split(","))}
    )
    train_builder = TaskSampleBuilder(train_split, tokenizer, mix)
    heldout_builder = TaskSampleBuilder(heldout_split, tokenizer, mix)
    pad_id = specials["[PAD]"]
    workers = args.loader_workers if args.loader_workers is not None else (4 if device.type == "cuda" else 0)
    lm_steps_source = StepSource(
        LMSteps(
            train_stream, max(1, args.micro_batch_tokens // args.lm_context), args.lm_context, micro_steps, args.seed
        ),
        workers,
    )
    retrieval_steps_source = StepSource(
        RetrievalSteps(
            train_builder,
            contexts,
            args.micro_batch_tokens,
            micro_steps,
            pad_id,
            args.seed,
            args.document_loss_weight,
            args.looked_up_weight,
        ),
        workers,
    )

    # Fixed held-out sets, the same at every evaluation.
    eval_gen = torch.Generator().manual_seed(1234)
    eval_rng = random.Random(1234)
    lm_eval_context = min(args.lm_context, max(16, heldout_stream.numel() // 2))
    lm_eval = [lm_batch(heldout_stream, 1, lm_eval_context, eval_gen) for _ in range(args.eval_lm_windows)]
    retrieval_eval = [
        retrieval_batch(heldout_builder, 1, contexts[i % len(contexts)], eval_rng, pad_id, [DEFAULT_SYSTEM_PROMPT])
        for i in range(args.eval_retrieval_samples)
    ]

    step = 0
    tokens_seen = 0
    step_times = {"lm": [], "retrieval": []}

    def train_one(kind: str, lr: float) -> dict:
        nonlocal step, tokens_seen
        source = lm_steps_source if kind == "lm" else retrieval_steps_source
        # Timed from before the batch is taken: a prefetcher that falls behind costs training time too.
        began = time.perf_counter()
        micro_batches = source.next()
        record = trainer.step(micro_batches, lr)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        step_times[kind].append(seconds)
        batch_tokens = sum(b.tokens for b in micro_batches)
        tokens_seen += batch_tokens
        record = {
            "step": step,
            "stage": kind,
            "lr": lr,
            **record,
            "tokens": tokens_seen,
            "context": micro_batches[0].input_ids.shape[1],
            "step_seconds": round(seconds, 4),
            "tokens_per_s": round(batch_tokens / seconds),
            "elapsed_s": round(time.perf_counter() - started, 1),
        }
        log(record)
        step += 1
        return record

    def report(record: dict) -> None:
        if step % 10 == 0 or step == 1:
            extra = f" answer {record['answer_loss']:.3f}" if "answer_loss" in record else ""
            print(
                f"step {step - 1} [{record['stage']}] loss {record['loss']:.4f}{extra} lr {record['lr']:.2e} "
                f"{record['tokens_per_s']:,} tok/s, {record['elapsed_s']:.0f} s"
            )

    def evaluate_now() -> dict:
        began = time.perf_counter()
        result = trainer.evaluate(lm_eval, retrieval_eval)
        result["seconds"] = round(time.perf_counter() - began, 2)
        log({"step": step - 1, "eval": result})
        print(f"step {step - 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
        return result

    budget_s = args.time_budget_minutes * 60
    last_eval = None
    if args.max_steps is not None:
        total_steps = args.max_steps
        lm_steps = stage_a_steps(total_steps, args.retrieval_fraction)
        plan = ["lm"] * lm_steps + [stage_b_kind(i, args.lm_mix) for i in range(total_steps - lm_steps)]
        for index, kind in enumerate(plan):
            record = train_one(
                kind,
                learning_rate(
                    step, total_steps, min(args.warmup_steps, max(1, total_steps // 10)), args.lr, args.min_lr_fraction
                ),
            )
            report(record)
            stage_ends = index == lm_steps - 1 and index + 1 < len(plan)
            if step % args.eval_every == 0 or stage_ends or index == len(plan) - 1:
                last_eval = evaluate_now()
            if stage_ends:
                export_model(model, args.tokenizer / "tokenizer.json", args.out / "checkpoints" / f"step-{step - 1}")
    else:
        # The schedule runs on the clock, not on a step count fixed in advance: the first step of each shape
        # compiles kernels (minutes on a fresh GPU machine), so timing early steps mispredicts the rest. One
        # warm-up step per shape at a low learning rate, then the stages and the cosine follow the time left.
        for kind in ["lm"] + ["retrieval"] * len(contexts):
            report(train_one(kind, args.lr * 0.01))
        mark = phase("warmup_steps", mark)
        evaluate_now()
        mark = phase("first_evaluation", mark)
        clock_started = time.perf_counter()
        if args.train_minutes is not None:
            # Minutes of steps, whatever start-up took (a caller that has a hard wall-clock limit sets
            # this from what is left of it).
            seconds = args.train_minutes * 60
        else:
            seconds = max(1.0, budget_s - EXPORT_RESERVE_S - (clock_started - started))
        log(
            {
                "step": step - 1,
                "plan": {
                    "training_seconds": round(seconds, 1),
                    "warmup_seconds": round(clock_started - started, 1),
                    "startup": phases,
                },
            }
        )
        print(f"warm-up done after {clock_started - started:.0f} s; {seconds:.0f} s of training left")
        first_step, kind, stage_b_step = step, "lm", 0
        while (progress := (time.perf_counter() - clock_started) / seconds) < 1:
            stage = "lm" if progress < 1 - args.retrieval_fraction else "retrieval"
            if stage != kind:
                if step % args.eval_every and step > first_step:
                    last_eval = evaluate_now()
                if step > first_step:
                    export_model(
                        model, args.tokenizer / "tokenizer.json", args.out / "checkpoints" / f"step-{step - 1}"
                    )
                kind = stage
            step_kind = kind
            if kind == "retrieval":
                step_kind = stage_b_kind(stage_b_step, args.lm_mix)
                stage_b_step += 1
            report(
                train_one(
                    step_kind,
                    clock_learning_rate(step - first_step, progress, args.warmup_steps, args.lr, args.min_lr_fraction),
                )
            )
            if step % args.eval_every == 0:
                last_eval = evaluate_now()
        print(f"time budget reached at step {step - 1}")
        last_eval = evaluate_now()

    lm_steps_source.close()
    retrieval_steps_source.close()
    size = export_model(
        model,
        args.tokenizer / "tokenizer.json",
        args.out / "model",
        max_shard_bytes=None if args.max_shard_mb is None else args.max_shard_mb << 20,
    )
    log_file.close()
    curves = plot_log(log_path, args.out)
    active = counts["active_per_token_without_embedding"]
    summary = {
        "config": config.to_dict(),
        "parameters": counts,
        "kda_backend": kda_backend,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "steps": step,
        "lm_steps": sum(1 for _ in step_times["lm"]),
        "retrieval_steps": len(step_times["retrieval"]),
        "tokens_seen": tokens_seen,
        "train_tokens_available": train_split.num_tokens,
        "startup_seconds": phases,
        "task_mix": mix,
        "seconds_per_step": {k: round(sum(v[1:]) / max(1, len(v) - 1), 3) for k, v in step_times.items()},
        "seconds": round(time.perf_counter() - started, 1),
        "flops_per_token_lm": flops_per_token(config, args.lm_context, active),
        "model_folder_bytes": size,
        "last_eval": last_eval,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(
        f"wrote {args.out / 'model'} ({size / 1e6:.1f} MB), {', '.join(str(p) for p in curves)}, "
        f"{args.out / 'summary.json'} after {summary['seconds']:.0f} s"
    )
    return summary


if __name__ == "__main__":
    main()
