"""Compile kernels for an H100 (sm_90a) on a machine without a GPU: registers, spills and shared memory
per launch setting, from Triton's own compiler and the ptxas it ships. It answers "does this setting
spill, does it fit the 227 KiB of shared memory" before any device time is spent; speed still needs
the GPU. The local Triton may differ from the GPU machine's (check `triton.__version__` on both).

    python packaging/bench/gpu_checks/compile_sm90.py [fp8_gemv] [kda_intra] [kda_prepare] [quant_formats] [model]

`model` compiles every kernel the model itself launches, through its own code and launchers: a 4-layer
model at the 48B shapes (K K K M, the dense first layer, MoE after it) on PyTorch's meta device, in each
weight format, runs a decode step, a recorded decode step and its sampled choice, a question and a
prefill chunk with Triton's launches turned into compile-only warm-ups for an sm_90a target (no GPU,
no memory).
"""

import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, not for the interpreter

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
PTXAS = next(os.path.join(BIN, n) for n in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(BIN, n)))


def compile_sm90(
    fn, pointers: dict, scalars: dict, constexprs: dict, num_warps: int, num_stages: int = 3, maxnreg: int | None = None
):
    """(registers, (spill store, spill load) bytes, shared memory bytes) of `fn` compiled for sm_90a.
    Pointers are assumed 16-byte aligned, as PyTorch's allocations are."""
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in pointers:
            signature[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in scalars:
            signature[name] = scalars[name]
        else:
            signature[name] = "constexpr"
    source = ASTSource(
        fn, signature, constexprs={k: v for k, v in constexprs.items() if signature.get(k) == "constexpr"}, attrs=attrs
    )
    kernel = triton.compile(
        source,
        target=GPUTarget("cuda", 90, 128),
        options=dict(num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg),
    )
    return (*ptxas_usage(kernel.asm["ptx"]), kernel.metadata.shared)


def ptxas_usage(ptx: str) -> tuple[int, tuple[int, int]]:
    """(registers, (spill store, spill load) bytes) that ptxas reports for sm_90a."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    info = subprocess.run(
        [PTXAS, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull], capture_output=True, text=True
    ).stderr
    os.unlink(f.name)
    found = re.search(r"Used (\d+) registers", info)
    if found is None:
        raise RuntimeError(f"ptxas: {info.strip()[:300]}")
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return int(found.group(1)), (int(spills.group(1)), int(spills.group(2)))


def report(name, result):
    regs, (stores, loads), shared = result
    flag = "  SPILLS" if stores or loads else ""
    flag += "  OVER 227 KiB" if shared > 227 * 1024 else ""
    print(f"{name:58s} regs {regs:3d}  spill {stores:5d}/{loads:5d} B  smem {shared / 1024:6.1f} KiB{flag}", flush=True)


def fp8_gemv():
    from kimi_desk.kernels.quant.gemv import row_scaled_gemv_fwd_kernel

    for O, D, bo, bd, warps, splits in [
        (4096, 2304, 64, 128, 4, 1),
        (4096, 2304, 64, 128, 4, 4),
        (2304, 2304, 16, 128, 4, 4),
        (163840, 2304, 64, 128, 4, 1),
    ]:
        const = dict(
            D=D,
            O=O,
            CHUNK=bd * 2,
            SPLITS=splits,
            BN=16,
            BO=bo,
            BD=bd,
            PRECISION="tf32",
            PDL=True,
            SCALED=True,
            INT4=False,
            GROUP=1,
            OP_DT=tl.float32,
            CORES=False,
        )
        result = compile_sm90(
            row_scaled_gemv_fwd_kernel,
            dict(x="*bf16", q="*fp8e4nv", scale="*fp32", zero="*fp32", out="*fp32", y="*bf16", counter="*i32"),
            dict(N="i32", stride_x="i32"),
            const,
            warps,
        )
        report(f"fp8 gemv O={O} D={D} BO={bo} BD={bd} warps={warps} splits={splits}", result)


def quant_formats():
    """The fp8, int8 and int4 variants of the decode GEMV (one token: the CUDA-core form for fp8 and int8),
    the MoE GEMV and the grouped GEMM, at the 48B shapes, each at its launcher's settings."""
    from kimi_desk.kernels.moe import gemv as moe_gemv
    from kimi_desk.kernels.moe import grouped
    from kimi_desk.kernels.quant import gemv
    from kimi_desk.kernels.quant.int4_tiles import int4_block, int4_pieces

    D, I, O = 2304, 1024, 4096
    for fmt, code, scale in (("fp8", "*fp8e4nv", "*fp32"), ("int8", "*i8", "*fp32"), ("int4", "*u8", "*bf16")):
        int4 = fmt == "int4"
        group = dict(INT4=int4, GROUP=128 if int4 else 1, SCALED=not int4)
        config = {**gemv.CONFIG, **(gemv.INT4_CONFIG if int4 else gemv.ONE_TOKEN_CONFIG)}
        const = dict(
            D=D,
            O=O,
            CHUNK=4 * config["block_d"],
            SPLITS=2,
            BN=gemv.BLOCK_N,
            BO=config["block_o"],
            BD=int4_block(config["block_d"], 128) if int4 else config["block_d"],
            PRECISION="tf32",
            PDL=True,
            OP_DT=tl.bfloat16 if int4 else tl.float32,
            CORES=config["cores"] and not int4,
            **group,
        )
        report(
            f"{fmt} gemv O={O} D={D}, one token",
            compile_sm90(
                gemv.row_scaled_gemv_fwd_kernel,
                dict(x="*bf16", q=code, scale=scale, zero="*bf16", out="*fp32", y="*bf16", counter="*i32"),
                dict(N="i32", stride_x="i32"),
                const,
                config["num_warps"],
                config["num_stages"],
            ),
        )
        up, down = (
            (moe_gemv.INT4_GATE_UP_CONFIG, moe_gemv.INT4_DOWN_CONFIG)
            if int4
            else (moe_gemv.GATE_UP_CONFIG, moe_gemv.DOWN_CONFIG)
        )
        block_d, pieces = int4_pieces(up["block_d"], 128) if int4 else (up["block_d"], 1)
        pointers = dict(x="*bf16", ids="*i64", w1=code, w3=code, s1=scale, s3=scale, z1="*bf16", z3="*bf16", h="*fp32")
        const = dict(D=D, I=I, BI=up["block_i"], BD=block_d, PIECES=pieces, PDL=True, **group)
        report(
            f"{fmt} moe gate/up gemv",
            compile_sm90(
                moe_gemv.moe_gate_up_fwd_kernel, pointers, dict(n_chosen="i32", stride_we="i64"), const, up["num_warps"]
            ),
        )
        block_i, pieces = int4_pieces(down["block_i"], 128) if int4 else (down["block_i"], 1)
        pointers = dict(
            h="*fp32",
            ids="*i64",
            weights="*fp32",
            w2=code,
            s2=scale,
            z2="*bf16",
            partial="*fp32",
            out="*bf16",
            counter="*i32",
        )
        const = dict(D=D, I=I, BD=down["block_d"], BI=block_i, PIECES=pieces, PDL=True, **group)
        report(
            f"{fmt} moe down gemv",
            compile_sm90(
                moe_gemv.moe_down_fwd_kernel, pointers, dict(n_chosen="i32", stride_we="i64"), const, down["num_warps"]
            ),
        )
        config = grouped.INT4_CONFIG if int4 else grouped.DEFAULT_CONFIG
        route = dict(order="*i64", block_expert="*i64", block_start="*i64", pair_start="*i64", counts="*i64")
        common = dict(
            BM=config["block_m"],
            BN=config["block_n"],
            BK=config["block_k"],
            OP_DT=tl.bfloat16,
            DOT_PRECISION="tf32",
            **group,
        )
        pointers = dict(x="*bf16", w1=code, w3=code, s1=scale, s3=scale, z1="*bf16", z3="*bf16", h="*bf16", **route)
        report(
            f"{fmt} grouped gate/up",
            compile_sm90(
                grouped.moe_grouped_gate_up_fwd_kernel,
                pointers,
                dict(n_chosen="i32", n_experts="i32"),
                dict(D=D, I=I, **common),
                config["num_warps"],
                config["num_stages"],
            ),
        )
        pointers = dict(h="*bf16", w2=code, s2=scale, z2="*bf16", weights="*fp32", y="*fp32", **route)
        report(
            f"{fmt} grouped down",
            compile_sm90(
                grouped.moe_grouped_down_fwd_kernel,
                pointers,
                dict(n_experts="i32"),
                dict(D=D, I=I, **common),
                config["num_warps"],
                config["num_stages"],
            ),
        )


def kda_intra():
    """The prefill's first two kernels at the 48B shapes (K = V = 128, bf16 inputs): the pairs inside the
    sub-chunks (chunk_kda_diag_blocks_fwd_kernel), then the rest of the state-free work per chunk."""
    from kimi_desk.kernels.kda.chunk import chunk_kda_diag_blocks_fwd_kernel, chunk_kda_intra_fwd_kernel

    bf = "*bf16"
    pointers = dict(q=bf, k=bf, g="*fp32", beta=bf, Aqk_diag="*fp32", Akk_diag="*fp32")
    # rows: the block of rows that meets its sub-chunk's columns one a step (chunk_kda_intra's `diag_rows`,
    # `diag_warps`; the default first). With more than one warp, Triton splits the channels between warps.
    for rows, warps in [(4, 1), (2, 1), (8, 1), (16, 1), (4, 4), (8, 2), (16, 4)]:
        const = dict(H=32, K=128, BC=16, BR=rows, KF=128)
        result = compile_sm90(chunk_kda_diag_blocks_fwd_kernel, pointers, dict(scale="fp32", T="i32"), const, warps)
        report(f"kda diag blocks rows={rows} warps={warps}", result)

    pointers = dict(
        q=bf,
        k=bf,
        v=bf,
        g="*fp32",
        beta=bf,
        qg=bf,
        kg=bf,
        w=bf,
        u=bf,
        gl="*fp32",
        Aqk=bf,
        Aqk_diag="*fp32",
        Akk_diag="*fp32",
    )
    # maxnreg caps the registers (ptxas spills the rest): 168 at 4 warps lets three programs share an SM.
    # The settings `kimi-desk bench kernels` tunes.
    for bk, warps, maxnreg in [(32, 4, None), (64, 4, None), (64, 8, None), (32, 8, None), (32, 4, 168)]:
        const = dict(
            H=32,
            K=128,
            V=128,
            BT=64,
            BC=16,
            BK=bk,
            KF=128,
            VF=128,
            SOLVE_PRECISION="tf32",
            OP_DT=tl.bfloat16,
        )
        result = compile_sm90(
            chunk_kda_intra_fwd_kernel, pointers, dict(scale="fp32", T="i32", NT="i32"), const, warps, 3, maxnreg
        )
        report(f"kda intra BK={bk} warps={warps} maxnreg={maxnreg}", result)


def kda_prepare():
    """The prefill's prepass (kernels/kda/prepare.py) at the 48B shapes: K = 128, bf16 projections."""
    from kimi_desk.kernels.kda.prepare import TILE_ELEMENTS, prepare_kda_fwd_kernel

    bf = "*bf16"
    pointers = dict(
        q=bf, k=bf, x=bf, beta=bf, A_log="*fp32", dt_bias="*fp32", q_out=bf, k_out=bf, g_out="*fp32", beta_out="*fp32"
    )
    strides = [f"stride_{t}_{d}" for t in ("q", "k", "x", "beta") for d in "bth"]
    scalars = dict(R="i32", T="i32", **{name: "i32" for name in strides})
    for rows, warps in [(TILE_ELEMENTS // 128, 4), (16, 4), (64, 8)]:
        const = dict(H=32, K=128, BR=rows, BK=128, PDL=True)
        report(
            f"kda prepare BR={rows} warps={warps}",
            compile_sm90(prepare_kda_fwd_kernel, pointers, scalars, const, warps),
        )


class _CompileOnlyDriver:
    """Triton's active driver while `model` runs: an sm_90a target, device 0, no stream; nothing is loaded
    or launched (every launch is a warm-up, which compiles and returns)."""

    def is_active(self):
        return True

    def get_current_target(self):
        return GPUTarget("cuda", 90, 128)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("meta")


def model(formats=("none", "fp8", "int8", "int4")):
    """Every kernel a 48B-shaped model launches, per weight format (see the module doc)."""
    import torch
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    os.environ["KIMI_DESK_KERNELS"] = "triton"  # meta tensors take the Triton paths, as CUDA ones do
    import kimi_desk.kernels
    from kimi_desk.bench.random_checkpoint import kimi_linear_48b_config
    from kimi_desk.engine.fuse import fuse_projections
    from kimi_desk.engine.generate import Sampling, choose_token
    from kimi_desk.engine.quantize import quantize_structure
    from kimi_desk.engine.state import MLACache
    from kimi_desk.engine.weights import build_on_meta, materialize

    driver.set_active(_CompileOnlyDriver())
    kimi_desk.kernels.pdl = lambda tensor: True  # launched as on an H100: with programmatic dependent launch
    compiled = {}  # (kernel, format) -> {compiled kernel's hash: kernel}

    def warm_up(self, grid):
        def launch(*args, **kwargs):
            kernel = self.run(*args, grid=grid, warmup=True, **kwargs)
            compiled.setdefault((self.fn.__name__, fmt), {})[kernel.hash] = kernel
            return kernel

        return launch

    JITFunction.__getitem__ = warm_up
    config = kimi_linear_48b_config()
    config.num_hidden_layers = 4
    for fmt in formats:
        built = build_on_meta(config)
        if fmt != "none":
            quantize_structure(built, fmt)
        materialize(built, torch.device("meta"), torch.bfloat16)
        built = fuse_projections(built)
        ids = torch.zeros(1, 300, dtype=torch.long, device="meta")
        state = built.new_state(1)
        built(ids, state)  # a prefill chunk (300 tokens: every chunked kernel, several chunks)
        built(ids[:, :16], state)  # a question after it
        built(ids[:, :1], state)  # a decode step
        for layer in state.layers:  # a recorded decode step: the cache's length on the device
            if isinstance(layer, MLACache):
                layer.device_length = torch.zeros(1, dtype=torch.long, device="meta")
        logits = built(ids[:, :1], state)[0, -1]
        uniform = torch.zeros(1, dtype=torch.float64, device="meta")
        seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device="meta")
        for rule in (Sampling(0.7, top_k=50, top_p=0.9, repetition_penalty=1.1), Sampling(0.7, top_p=0.9)):
            choose_token(logits, rule, uniform, seen)  # the sampled choice, with top-k and without
    for (name, fmt), kernels in sorted(compiled.items()):
        for kernel in kernels.values():
            regs, spills = ptxas_usage(kernel.asm["ptx"])
            report(f"{name} ({fmt}, {kernel.metadata.num_warps} warps)", (regs, spills, kernel.metadata.shared))
    print(f"{len(compiled)} kernels, {sum(map(len, compiled.values()))} compiled forms", flush=True)


if __name__ == "__main__":
    wanted = sys.argv[1:] or ["fp8_gemv", "kda_intra"]
    print(f"triton {triton.__version__}, {os.path.basename(PTXAS)}, target sm_90a")
    for name in wanted:
        globals()[name]()
