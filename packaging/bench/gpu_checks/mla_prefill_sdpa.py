"""GPU check: which fused attention runs MLA's expanded prefill fastest on an H100, and whether each
backend's log-sum-exp can merge key blocks (kernels/mla/torch_attention.py, mla_prefill_sdpa).

The expanded form: per head, keys [k_nope (128) | k_rope (64)] = 192 wide, values 128 wide; Tq = 8192
queries (a prefill chunk) after a long cache. The cached keys are all visible to every query of the
chunk (no mask); the chunk's own keys are causal. Each backend is timed on the unmasked cached part,
values padded to 192 (what flash attention wants) and, where the backend takes it, unpadded.

Run from the repo root on the device: source packaging/source_shim.sh && python3 packaging/bench/gpu_checks/mla_prefill_sdpa.py
"""

import torch
import torch.nn.functional as F
import triton

aten = torch.ops.aten
dev = "cuda"
H, DQK, DV, Tq = 32, 192, 128, 8192
scale = DQK**-0.5


def flash(q, k, v, causal):
    out = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return out[0], out[1]


def cudnn(q, k, v, causal):
    out = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    return out[0], out[1]


def efficient(q, k, v, causal):
    out = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)
    return out[0], out[1]


BACKENDS = {"flash": flash, "cudnn": cudnn, "efficient": efficient}


def reference(q, k, v, causal):
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=dev).triu(1), float("-inf"))
    lse = s.logsumexp(-1)
    return (s.softmax(-1) @ v.float()), lse


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cudnn {torch.backends.cudnn.version()}")
a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
t = triton.testing.do_bench(lambda: a @ a, warmup=5, rep=50, return_mode="median")
print(f"bf16 matmul 8192^3: {2 * 8192**3 / t / 1e9:.0f} TFLOP/s")

# Semantics at a small size: outputs and log-sum-exp (natural log, [B, H, Tq]) against fp32 math.
q = torch.randn(1, H, 300, DQK, device=dev, dtype=torch.bfloat16)
k = torch.randn(1, H, 700, DQK, device=dev, dtype=torch.bfloat16)
v = torch.randn(1, H, 700, DV, device=dev, dtype=torch.bfloat16)
vp = F.pad(v, (0, DQK - DV))
for causal, kk, vv, vvp in ((False, k, v, vp), (True, k[:, :, :300], v[:, :, :300], vp[:, :, :300])):
    o_ref, lse_ref = reference(q, kk, vv, causal)
    for name, fn in BACKENDS.items():
        for label, values in (("padded", vvp), ("dv=128", vv)):
            try:
                o, lse = fn(q, kk, values, causal)
                lse = lse.reshape(lse_ref.shape) if lse.numel() == lse_ref.numel() else lse
                print(
                    f"small causal={causal} {name:9s} {label}: out err {rel(o[..., :DV], o_ref):.1e}, "
                    f"lse shape {tuple(lse.shape)} err {rel(lse, lse_ref):.1e}"
                )
            except Exception as exc:
                print(
                    f"small causal={causal} {name:9s} {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:150]}"
                )

# Timing: the unmasked cached part, and the causal chunk itself.
print(
    f"\n{'part':>22} {'backend':>9} {'values':>7} {'ms':>9} {'TFLOP/s':>8}  (FLOPs: 2 Tq Tk H (192 + 128), causal half)"
)
for Tk in (8192, 32768, 131072):
    q = torch.randn(1, H, Tq, DQK, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, H, Tk, DQK, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, H, Tk, DV, device=dev, dtype=torch.bfloat16)
    vp = F.pad(v, (0, DQK - DV))
    for causal in (False, True) if Tk == Tq else (False,):
        flops = 2 * Tq * Tk * H * (DQK + DV) / (2 if causal else 1)
        for name, fn in BACKENDS.items():
            for label, values in (("192", vp), ("128", v)):
                try:
                    fn(q, k, values, causal)
                    ms = triton.testing.do_bench(
                        lambda: fn(q, k, values, causal), warmup=3, rep=30, return_mode="median"
                    )
                    print(f"{f'Tk={Tk} causal={causal}':>22} {name:>9} {label:>7} {ms:9.2f} {flops / ms / 1e9:8.0f}")
                except Exception as exc:
                    print(
                        f"{f'Tk={Tk} causal={causal}':>22} {name:>9} {label:>7} {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
                    )
    # The path the model takes today: the whole cache with a lower-right causal mask, values padded.
    if Tk == 131072:
        from torch.nn.attention.bias import causal_lower_right

        Tall = Tk + Tq
        k2 = torch.randn(1, H, Tall, DQK, device=dev, dtype=torch.bfloat16)
        v2 = torch.randn(1, H, Tall, DQK, device=dev, dtype=torch.bfloat16)
        fn = lambda: F.scaled_dot_product_attention(q, k2, v2, attn_mask=causal_lower_right(Tq, Tall), scale=scale)
        ms = triton.testing.do_bench(fn, warmup=3, rep=30, return_mode="median")
        flops = 2 * Tq * (Tk + Tq / 2) * H * (DQK + DV)
        print(f"{'today: lower-right':>22} {'auto':>9} {'192':>7} {ms:9.2f} {flops / ms / 1e9:8.0f}")
print("OK")
