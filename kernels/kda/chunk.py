"""Kimi Delta Attention prefill: the chunked form (kimi-linear-spec.md §3.3) in three Triton kernels.

With chunks of C = 64 tokens and, per chunk, G = cumsum(g) (per channel, reset every chunk):
    Aqk[i, j] = scale * sum_d q_id k_jd exp(G_id - G_jd)        j <= i
    Akk[i, j] = beta_i * sum_d k_id k_jd exp(G_id - G_jd)        j <  i
    W = (I + Akk)^-1 (beta k exp(G)),  U = (I + Akk)^-1 (beta v)
and then, chunk after chunk, with the state S [K, V]:
    V_new = U - W S;  O = (scale q exp(G)) S + Aqk V_new;  S <- exp(G_last) S + (k exp(G_last - G))^T V_new

1. `chunk_kda_diag_blocks_fwd_kernel`, one program (one warp) per (16-token sub-chunk, head): the pairs
   inside the sub-chunks, Aqk's and Akk's diagonal [16, 16] blocks, written to fp32 scratch
   [B, T, H, 16]. They need nothing outside their sub-chunk: apart, they run token-parallel in a small
   kernel instead of beside everything the next one holds in registers.
2. `chunk_kda_intra_fwd_kernel`, one program per (chunk, head), the rest of what does not need S: the
   pairs between sub-chunks, joined with those blocks into Aqk and Akk, (I + Akk)^-1, W, U, q exp(G),
   k exp(G_last - G) and exp(G_last), written to scratch buffers.
3. `chunk_kda_scan_fwd_kernel`, one program per (V block, head), walks the chunks in order with S in
   fp32 registers and writes the output directly: neither the per-chunk states nor V_new ever reach memory.

Kimi Linear's gate has no lower bound, so no factor above 1 may ever be formed from the chunk's G:
exp(G_i) * exp(-G_j) overflows fp32 once G_j < -88, which one token with log-decay -90 reaches. Nor may a
small decay be the difference of two sums that hold a large gate: fp32 keeps a sum of -1000 to 6e-5, more
than a gentle decay is worth. So every decay exp(G_i - G_j), j < i, is formed from sums of gates (all
<= 0) that hold only gates between j and i:
  - inside the 16-token sub-chunks (kernel 1), pair by pair: a block of rows i walks the columns j of its
    sub-chunk from its last row down, adding row j + 1's gate to each row's running sum
    R_i = G_i - G_j, the sum of the gates of rows j + 1 .. i alone; exp(R_i) <= 1 scales k_j for the
    fp32 dots with q_i and k_i over the channels. One exponential per pair and channel; Aqk's own
    diagonal, R = 0, is q_i . k_i;
  - between sub-chunks (kernel 2), the decay goes through r, the end of j's sub-chunk, as
    exp(G_i - G_r) * exp(G_r - G_j), both factors <= 1 whatever the gate (at worst one underflows to zero
    where the product is below 1e-38), so that each column sub-chunk is one matrix product. With Gs the
    cumulative sum inside each sub-chunk b, Cs_i the sum of the gates after i to b's end (taken as the
    reverse sum through i less i's own gate: off by that gate times fp32's epsilon) and P_b the sum of
    the sub-chunks before: E_i = exp(Gs_i), C_i = exp(Cs_i) (two exponentials per element) and
    per-sub-chunk factors over whole sub-chunks, exp(G_i - G_j') = E_i exp(P_b - P_(j+1)) C_j' for i in
    b > j, j' in j; one dot of [64, BK] x [BK, 64] per column sub-chunk;
  - q exp(G) = q E exp(P), k exp(G_last - G) = k C exp(G_last - G_end(b)), exp(G_last) and
    beta k exp(G) have exponents <= 0 by construction.
Nothing branches on the data: every gate, however fast it decays, costs the same work.
(I + Akk)^-1: in registers, as a product of block inverses over blocks of 4, 16 and 64 rows (ten TF32
products of [64, 64], `_join_blocks`). W and U take TF32 dots on beta k exp(G) rounded to the input dtype
and beta v.

The kernels read prepared inputs: unit q and k, the log decay g and beta itself. The layer computes them
from its raw projections in a pass of its own (prepare.py): taken inside these kernels, the gate, the
norms and the sigmoid made the intra kernel spill registers heavily, and the whole call was 1.7x slower
than the prepass and these kernels (H200, T = 32k).

Dots of the other products take the input dtype (bf16 on the real model) with fp32 accumulation; the
state, the cumulative gates, the diagonal blocks and the inverse stay fp32; the scratch buffers between
kernels 2 and 3 are in the input dtype. Timings and errors against fla's chunk_kda: BENCHMARKS.md
(`kimi-desk bench kernels`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_desk.kernels import dot_operand_dtype
from kimi_desk.kernels.kda.fused_recurrent import state_tile

CHUNK_SIZE = 64
SUB_CHUNK = 16

# The triangular inverse's products in one TF32 pass, as fla's KDA kernel takes them: faster than 3xTF32,
# with the same errors against float64 to two digits in every case of the GPU check (figures in
# BENCHMARKS-log.md, Kernels). The interpreter computes every dot in numpy fp32.
_SOLVE_PRECISION = "tf32"


@triton.jit
def _join_blocks(b_Dinv, b_L, b_I, o_i, SIZE: tl.constexpr, FIRST: tl.constexpr, PRECISION: tl.constexpr):
    """(I + L)^-1 restricted to blocks of SIZE, from b_Dinv, the inverse restricted to blocks of SIZE / 4
    (the identity when FIRST: blocks of one): (I - N)(I + N^2) Dinv with N = Dinv L_between."""
    PART: tl.constexpr = SIZE // 4
    m_between = ((o_i // SIZE)[:, None] == (o_i // SIZE)[None, :]) & ((o_i // PART)[:, None] > (o_i // PART)[None, :])
    if FIRST:
        b_N = tl.where(m_between, b_L, 0.0)
    else:
        b_N = tl.dot(b_Dinv, tl.where(m_between, b_L, 0.0), input_precision=PRECISION)
    b_N2 = tl.dot(b_N, b_N, input_precision=PRECISION)
    b_X = tl.dot(b_I - b_N, b_I + b_N2, input_precision=PRECISION)
    if FIRST:
        return b_X
    return tl.dot(b_X, b_Dinv, input_precision=PRECISION)


@triton.jit
def _load_tiles(
    q,
    k,
    g,
    p_in,
    o_row3,
    m_t3,
    i_k,
    H: tl.constexpr,
    K: tl.constexpr,
    BK: tl.constexpr,
):
    """Block i_k of BK channels of the chunk's q, k (fp32) and log2 gates, as [NB, BC, BK] tiles; p_in is
    the chunk's first element. Rows past T read zeros: g = 0 carries the chunk's last G unchanged."""
    o_k = i_k * BK + tl.arange(0, BK)
    m_tk3 = m_t3 & (o_k < K)[None, None, :]
    o_in3 = o_row3 * (H * K) + o_k[None, None, :]
    b_q = tl.load(q + p_in + o_in3, mask=m_tk3, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_in + o_in3, mask=m_tk3, other=0.0).to(tl.float32)
    b_a = tl.load(g + p_in + o_in3, mask=m_tk3, other=0.0).to(tl.float32)
    # log2 units: exp2 is the native instruction.
    return b_q, b_k, b_a * 1.4426950408889634


@triton.jit
def _diag_column(b_R, b_Aqk, b_Akk, b_q, b_k, k_j, g_next, o_k2, m_k2, m_col, m_past, MASKED: tl.constexpr):
    """Column j against a block of rows i: R_i, the sum of the gates of rows j + 1 .. i (log2 units), takes
    row j + 1's gate, and column j of b_Aqk, b_Akk [BR, BC] (where m_col) gets q_i . (k_j exp(R_i)) and
    k_i . (k_j exp(R_i)). k_j and g_next point at rows j and j + 1 (channel 0), read as [1, KF] tiles
    broadcast over the block's rows. MASKED when some rows of the block are not past j (m_past): they
    keep R = 0."""
    b_a = tl.load(g_next + o_k2, mask=m_k2, other=0.0).to(tl.float32) * 1.4426950408889634
    if MASKED:
        b_a = tl.where(m_past, b_a, 0.0)
    b_R += b_a
    b_kd = tl.load(k_j + o_k2, mask=m_k2, other=0.0).to(tl.float32) * tl.exp2(b_R)
    b_Aqk = tl.where(m_col, tl.sum(b_q * b_kd, 1)[:, None], b_Aqk)
    b_Akk = tl.where(m_col, tl.sum(b_k * b_kd, 1)[:, None], b_Akk)
    return b_R, b_Aqk, b_Akk


@triton.jit(do_not_specialize=["T"])
def chunk_kda_diag_blocks_fwd_kernel(
    q,
    k,
    g,
    beta,
    Aqk_diag,
    Akk_diag,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    BC: tl.constexpr,
    BR: tl.constexpr,
    KF: tl.constexpr,
):
    """The pairs inside one BC-row sub-chunk of one head, Aqk's and Akk's diagonal blocks: for row t and
    j = the sub-chunk's first row + c, Aqk_diag[b, t, h, c] = scale q_t . k_j exp(G_t - G_j) (j <= t) and
    Akk_diag[b, t, h, c] = beta_t k_t . k_j exp(G_t - G_j) (j < t), zero above; fp32 [B, T, H, BC].

    Blocks of BR rows i, each against the columns j of its sub-chunk from its own last row down to the
    sub-chunk's first, one column a step. A running sum R_i of the gates of rows j + 1 .. i (the gate of
    row j + 1 joins every row past j) is each pair's own log decay: exp(R_i) <= 1 for every element,
    whatever the gate, and a large decay elsewhere in the sub-chunk costs it no precision (no difference
    of two longer sums, no gate subtracted from a sum that holds it; the sums are of terms of one sign).
    Then one fp32 dot over the channels per row and column. A block of rows never meets the columns past
    its own last row, so the work is about the triangle of pairs, not the square.

    Rows past T are never stored; in its own columns a block reads row T - 1 for rows j, j + 1 past T (only
    rows past them, past T themselves, take them), and a block wholly past T skips the columns before it."""
    i_s, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_k2 = tl.arange(0, KF)[None, :]
    m_k2 = o_k2 < K
    o_c2 = tl.arange(0, BC)[None, :]
    # Row t0 (the sub-chunk's first) of the token-major [B, T, H, *] tensors, head i_h, in int64; the
    # sub-chunk's rows are H rows apart.
    t0 = i_s * BC
    r0 = (i_b.to(tl.int64) * T + t0) * H + i_h
    for i_rb in tl.static_range(BC // BR):
        o_i = i_rb * BR + tl.arange(0, BR)
        m_i = t0 + o_i < T
        o_in = (o_i * (H * K))[:, None] + o_k2
        b_q = tl.load(q + r0 * K + o_in, mask=m_i[:, None] & m_k2, other=0.0).to(tl.float32)
        b_k = tl.load(k + r0 * K + o_in, mask=m_i[:, None] & m_k2, other=0.0).to(tl.float32)
        b_R = tl.zeros([BR, KF], dtype=tl.float32)
        b_Aqk = tl.zeros([BR, BC], dtype=tl.float32)
        b_Akk = tl.zeros([BR, BC], dtype=tl.float32)
        # The block's own columns, from its last row down: rows not yet past j keep R = 0.
        for i_j in tl.static_range(BR):
            j = i_rb * BR + BR - 1 - i_j
            k_j = k + (r0 + (tl.minimum(t0 + j, T - 1) - t0) * H) * K
            g_next = g + (r0 + (tl.minimum(t0 + j + 1, T - 1) - t0) * H) * K
            b_R, b_Aqk, b_Akk = _diag_column(
                b_R, b_Aqk, b_Akk, b_q, b_k, k_j, g_next, o_k2, m_k2, o_c2 == j, o_i[:, None] > j, True
            )
        # The columns before the block: every row of it is past j, and rows j + 1 <= the block's first row.
        p_j = (r0 + i_rb * BR * H) * K
        for i_j in range(0, tl.where(t0 + i_rb * BR < T, i_rb * BR, 0)):
            j = i_rb * BR - 1 - i_j
            p_next = p_j
            p_j -= H * K
            b_R, b_Aqk, b_Akk = _diag_column(
                b_R, b_Aqk, b_Akk, b_q, b_k, k + p_j, g + p_next, o_k2, m_k2, o_c2 == j, None, False
            )
        b_beta = tl.load(beta + r0 + o_i * H, mask=m_i, other=0.0).to(tl.float32)
        b_Aqk = tl.where(o_c2 <= o_i[:, None], b_Aqk * scale, 0.0)
        b_Akk = tl.where(o_c2 < o_i[:, None], b_Akk * b_beta[:, None], 0.0)
        o_out = (o_i * (H * BC))[:, None] + o_c2
        tl.store(Aqk_diag + r0 * BC + o_out, b_Aqk, mask=m_i[:, None])
        tl.store(Akk_diag + r0 * BC + o_out, b_Akk, mask=m_i[:, None])


@triton.jit(do_not_specialize=["T", "NT"])
def chunk_kda_intra_fwd_kernel(
    q,
    k,
    v,
    g,
    beta,
    qg,
    kg,
    w,
    u,
    gl,
    Aqk,
    Aqk_diag,
    Akk_diag,
    scale,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    KF: tl.constexpr,
    VF: tl.constexpr,
    SOLVE_PRECISION: tl.constexpr,
    OP_DT: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    DT = qg.dtype.element_ty

    o_i = tl.arange(0, BT)
    o_t = i_t * BT + o_i
    m_t = o_t < T
    # Rows of the token-major inputs [B, T, H, *] and of the head-major scratch [B * H, T, *], in int64.
    r_in = (i_b.to(tl.int64) * T + o_t) * H + i_h
    r_mid = i_bh.to(tl.int64) * T + o_t

    # ---- Aqk, Akk between the sub-chunks, and the per-token factors that need the whole chunk's G ----
    # The pairs inside the BC-row sub-chunks, the diagonal [BC, BC] blocks, come from
    # chunk_kda_diag_blocks_fwd_kernel (launched before this one) and join the tiles below. A pair i in
    # sub-chunk b, j in an earlier sub-chunk decays through the end of j's sub-chunk, r:
    # exp(G_i - G_j) = exp(G_i - G_r) exp(G_r - G_j), both factors <= 1 whatever the gate; one dot of
    # [BT, BK] x [BK, BT] per column sub-chunk gives all of them.
    b_Aqk = tl.zeros([BT, BT], dtype=tl.float32)
    b_Akk = tl.zeros([BT, BT], dtype=tl.float32)
    # The chunk as [NB, BC, BK] tiles, NB sub-chunks of BC rows: the per-sub-chunk sums and cumulative
    # sums are then reductions inside each sub-chunk's rows.
    NB: tl.constexpr = BT // BC
    tl.static_assert(BT == 64 and BC == 16, "the pairs below are written out for 64-row chunks of 16-row sub-chunks")
    o_b = tl.arange(0, NB)
    o_row3 = (o_b[:, None] * BC + tl.arange(0, BC)[None, :])[:, :, None]
    m_t3 = i_t * BT + o_row3 < T
    b_beta3 = tl.load(beta + (i_b.to(tl.int64) * T + i_t * BT + o_row3) * H + i_h, mask=m_t3, other=0.0).to(tl.float32)
    b_beta = tl.reshape(b_beta3, [BT])
    # Element offsets from the chunk's first row, in int32 and the same for every block of channels (the
    # base pointers move instead of six int64 pointer tiles).
    p_in = (i_b.to(tl.int64) * T + i_t * BT) * H * K + i_h * K
    p_mid = (i_bh.to(tl.int64) * T + i_t * BT) * K
    o_mid3 = o_row3 * K + tl.arange(0, BK)[None, None, :]
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk3 = m_t3 & (o_k < K)[None, None, :]
        b_q, b_k, b_a = _load_tiles(q, k, g, p_in, o_row3, m_t3, i_k, H, K, BK)
        # With Gs the cumulative sum inside each sub-chunk and Cs the sum after each row to its end (a sum
        # of its own, not tot - Gs: exactly 0 on the last row, small near the end however large the
        # total): E = exp(Gs) (decay from the sub-chunk's start) and C = exp(Cs) (to its end), both <= 1,
        # serve the pairs between sub-chunks and the stored factors below.
        b_Gs = tl.cumsum(b_a, 1)
        b_tot = tl.sum(b_a, 1)
        b_P = tl.cumsum(b_tot, 0) - b_tot
        b_qE = b_q * tl.exp2(b_Gs)
        b_kE = b_k * tl.exp2(b_Gs)
        b_kC = b_k * tl.exp2(tl.cumsum(b_a, 1, reverse=True) - b_a)
        # Sub-chunk j's columns against the rows of every later sub-chunk b, through the end of j:
        # exp(G_i - G_j') = E_i exp(P_b - P_(j+1)) C_j', every factor <= 1; one dot each. P_b - P_(j+1) is
        # summed over the sub-chunks between (not a difference of two sums over the chunk).
        for j in tl.static_range(NB - 1):
            b_tj = tl.where(o_b[:, None] > j, b_tot, 0.0)
            b_S = tl.where(o_b[:, None] > j, tl.exp2(tl.cumsum(b_tj, 0) - b_tj), 0.0)[:, None, :]
            b_R = tl.trans(tl.reshape(tl.where(o_row3 // BC == j, b_kC, 0.0), [BT, BK]).to(OP_DT))
            b_Aqk += tl.dot(tl.reshape(b_qE * b_S, [BT, BK]).to(OP_DT), b_R)
            b_Akk += tl.dot(tl.reshape(b_kE * b_S, [BT, BK]).to(OP_DT), b_R)
        b_Gl = tl.sum(b_tot, 0)
        # exp(G_i) = E_i exp(P_b) and exp(G_last - G_i) = C_i exp(G_last - G_end(b)), both factors <= 1.
        b_eP = tl.exp2(b_P)[:, None, :]
        # beta k exp(G), W's right factor, parked in w's rows (overwritten by W below): W then reads one
        # bf16 tile instead of k and g again (fla also rounds this factor to bf16).
        tl.store(w + p_mid + i_k * BK + o_mid3, (b_kE * b_eP * b_beta3).to(DT), mask=m_tk3)
        tl.store(qg + p_mid + i_k * BK + o_mid3, (b_qE * b_eP * scale).to(DT), mask=m_tk3)
        b_eL = tl.exp2(tl.cumsum(b_tot, 0, reverse=True) - b_tot)[:, None, :]
        tl.store(kg + p_mid + i_k * BK + o_mid3, (b_kC * b_eL).to(DT), mask=m_tk3)
        tl.store(gl + (i_bh.to(tl.int64) * NT + i_t) * K + o_k, tl.exp2(b_Gl), mask=o_k < K)

    # The dots above fill only the entries between sub-chunks (zeros elsewhere). The diagonal blocks come
    # scaled and masked (zeros above the diagonal), read as [NB, BC, BC] tiles and placed on the chunk's
    # diagonal (fewer live registers here than a masked [BT, BT] load: 28 bytes of spills against 36 at the
    # default, compile_sm90.py). The whole Aqk tile, zeros above the diagonal included, is stored so that
    # the scan loads it without a causal mask (a plain load is one Triton pipelines ahead of the loop's
    # dots; a masked one waited in every step).
    p_diag = (i_b.to(tl.int64) * T + i_t * BT) * H * BC + i_h * BC
    o_diag3 = o_row3 * (H * BC) + tl.arange(0, BC)[None, None, :]
    m_blocks = o_b[:, None, None, None] == o_b[None, None, :, None]
    b_D = tl.load(Aqk_diag + p_diag + o_diag3, mask=m_t3, other=0.0)
    b_Aqk = b_Aqk * scale + tl.reshape(tl.where(m_blocks, b_D[:, :, None, :], 0.0), [BT, BT])
    tl.store(Aqk + r_mid[:, None] * BT + o_i[None, :], b_Aqk.to(DT), mask=m_t[:, None])
    b_D = tl.load(Akk_diag + p_diag + o_diag3, mask=m_t3, other=0.0)
    b_Akk = b_Akk * b_beta[:, None] + tl.reshape(tl.where(m_blocks, b_D[:, :, None, :], 0.0), [BT, BT])

    # ---- (I + L)^-1 for L = Akk, strictly lower triangular, in registers, by blocks of 4, 16, 64 ----
    # With Dinv the inverse of I plus L's diagonal blocks and N = Dinv L_off (L_off: L's entries between
    # the blocks), I + L = (I + L_diag)(I + N), so (I + L)^-1 = (I + N)^-1 Dinv; four blocks make N^4 = 0
    # and (I + N)^-1 = (I - N)(I + N^2). Applied three times: 4 x 4 blocks (whose own diagonal blocks
    # are zero: Dinv = I), then 16 x 16 from those, then the chunk: ten products of [64, 64], and no trip
    # through memory. Forward substitution's 64 dependent row steps and the scratch round trip took 2.15
    # of this kernel's 5.09 ms (H100, T = 32k); a Neumann product over whole 16 x 16 blocks, (I - D)(I + D^2)
    # (I + D^4)(I + D^8), lost all accuracy on correlated keys (powers of D grow). Here no power above
    # the second of any N is formed.
    b_I = tl.where(o_i[:, None] == o_i[None, :], 1.0, 0.0)
    b_Ai = _join_blocks(b_I, b_Akk, b_I, o_i, 4, True, SOLVE_PRECISION)
    b_Ai = _join_blocks(b_Ai, b_Akk, b_I, o_i, 16, False, SOLVE_PRECISION)
    b_Ai = _join_blocks(b_Ai, b_Akk, b_I, o_i, 64, False, SOLVE_PRECISION)

    # ---- W = Ai (beta k exp(G)), U = Ai (beta v) ----
    # One dot over all channels each, in the input dtype with Ai and beta v split into a high and a low
    # part (x = hi + lo, both in bf16): hi hi + lo hi (+ hi lo for U) keeps about 16 bits of each factor,
    # the TF32 products' errors against float64 to two digits on an H100, 7% faster than TF32 dots there
    # (2026-11-27, BENCHMARKS.md); Ai in plain bf16 (fla's choice) lost 7% of the accuracy. beta k exp(G)
    # is already rounded to the input dtype (as in fla). With fp32 inputs the low parts are zero.
    o_kf = tl.arange(0, KF)
    o_vf = tl.arange(0, VF)
    m_tkf = m_t[:, None] & (o_kf < K)[None, :]
    m_tvf = m_t[:, None] & (o_vf < V)[None, :]
    b_Ai_hi = b_Ai.to(OP_DT)
    b_Ai_lo = (b_Ai - b_Ai_hi.to(tl.float32)).to(OP_DT)
    # Other threads wrote the rows this one reads; all have read them before W overwrites them.
    tl.debug_barrier()
    b_kb = tl.load(w + r_mid[:, None] * K + o_kf[None, :], mask=m_tkf, other=0.0).to(OP_DT)
    tl.debug_barrier()
    b_w = tl.dot(b_Ai_lo, b_kb, tl.dot(b_Ai_hi, b_kb))
    tl.store(w + r_mid[:, None] * K + o_kf[None, :], b_w.to(DT), mask=m_tkf)
    b_bv = tl.load(v + r_in[:, None] * V + o_vf[None, :], mask=m_tvf, other=0.0).to(tl.float32) * b_beta[:, None]
    b_bv_hi = b_bv.to(OP_DT)
    b_bv_lo = (b_bv - b_bv_hi.to(tl.float32)).to(OP_DT)
    b_u = tl.dot(b_Ai_hi, b_bv_lo, tl.dot(b_Ai_lo, b_bv_hi, tl.dot(b_Ai_hi, b_bv_hi)))
    tl.store(u + r_mid[:, None] * V + o_vf[None, :], b_u.to(DT), mask=m_tvf)


# T and NT are not specialised: NT == 1 (prompts under one chunk) compiled to a kernel that made out-of-range
# shared-memory accesses on an H100 (compute-sanitizer; Triton 3.6), and one kernel for every length is what
# a session wants anyway.
@triton.jit(do_not_specialize=["T", "NT"])
def chunk_kda_scan_fwd_kernel(
    qg,
    kg,
    w,
    u,
    gl,
    Aqk,
    o,
    h0,
    ht,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    OP_DT: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H

    o_i = tl.arange(0, BT)
    o_k, o_v, m_k, m_v, o_h, m_h, b_h = state_tile(h0, i_bh, i_v, K, V, BK, BV, USE_INITIAL_STATE)

    b_gl_next = tl.load(gl + i_bh.to(tl.int64) * NT * K + o_k, mask=m_k, other=0.0)
    for i_t in range(0, NT):
        o_t = i_t * BT + o_i
        m_t = o_t < T
        r_mid = i_bh.to(tl.int64) * T + o_t
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_w = tl.load(w + r_mid[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(OP_DT)
        b_qg = tl.load(qg + r_mid[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(OP_DT)
        b_kg = tl.load(kg + r_mid[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(OP_DT)
        b_u = tl.load(u + r_mid[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        b_A = tl.load(Aqk + r_mid[:, None] * BT + o_i[None, :], mask=m_t[:, None], other=0.0).to(OP_DT)
        b_gl = b_gl_next
        # The next chunk's decay, loaded a step ahead: Triton pipelines the dots' operands, not this. After
        # the last chunk this reads the next head's first row, or the spare row at the end of `gl`.
        b_gl_next = tl.load(gl + (i_bh.to(tl.int64) * NT + i_t + 1) * K + o_k, mask=m_k, other=0.0)

        b_hd = b_h.to(OP_DT)
        b_vn = b_u - tl.dot(b_w, b_hd)
        b_vnd = b_vn.to(OP_DT)
        b_o = tl.dot(b_qg, b_hd) + tl.dot(b_A, b_vnd)
        r_out = (i_b.to(tl.int64) * T + o_t) * H + i_h
        tl.store(o + r_out[:, None] * V + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_tv)
        b_h = b_h * b_gl[:, None] + tl.dot(tl.trans(b_kg), b_vnd)

    if STORE_FINAL_STATE:
        tl.store(ht + o_h, b_h.to(ht.dtype.element_ty), mask=m_h)


def chunk_kda_triton(
    q,
    k,
    v,
    g,
    beta,
    scale=None,
    initial_state=None,
    output_final_state=False,
    *,
    out=None,
    intra_config=None,
    scan_config=None,
):
    """o [B, T, H, V] in q's dtype and the final state [B, H, K, V] fp32 (or None); see the module doc.

    `out` may name a preallocated output; `intra_config` / `scan_config` override the launch settings
    (block sizes, warps, stages), for benchmarks.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    assert k.shape == q.shape and g.shape == q.shape and v.shape[:3] == (B, T, H) and beta.shape == (B, T, H)
    assert K <= 256 and V <= 256
    scale = K**-0.5 if scale is None else float(scale)
    if initial_state is not None:
        assert initial_state.shape == (B, H, K, V)
        initial_state = initial_state.float().contiguous()
    final_state = q.new_empty(B, H, K, V, dtype=torch.float32) if output_final_state else None
    if out is None:
        out = q.new_empty(B, T, H, V)
    if T == 0:
        if final_state is not None:
            final_state.copy_(initial_state) if initial_state is not None else final_state.zero_()
        return out, final_state
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    bufs = chunk_kda_intra(q, k, v, g, beta, scale, **(intra_config or {}))
    chunk_kda_scan(bufs, out, initial_state, final_state, **(scan_config or {}))
    return out, final_state


def chunk_kda_diag_blocks(q, k, g, beta, scale, rows=4, num_warps=1):
    """Launch 1: the pairs inside the SUB_CHUNK-row sub-chunks, (Aqk_diag, Akk_diag), fp32
    [B, T, H, SUB_CHUNK] each, and the compiled kernel (see chunk_kda_diag_blocks_fwd_kernel). `rows`:
    the block of rows that meets the sub-chunk's columns one a step (a power of two up to SUB_CHUNK).

    One warp a program: a block's [rows, K] tiles, each row spread over the warp's 32 threads, and every
    reduction over the channels stays inside the warp (with more warps Triton splits the channels
    between warps, and each column's dots go through shared memory; packaging/bench/gpu_checks/
    compile_sm90.py compiles the settings)."""
    B, T, H, K = q.shape
    BC = SUB_CHUNK
    aqk_diag = torch.empty(B, T, H, BC, dtype=torch.float32, device=q.device)
    akk_diag = torch.empty(B, T, H, BC, dtype=torch.float32, device=q.device)
    compiled = chunk_kda_diag_blocks_fwd_kernel[(triton.cdiv(T, BC), B * H)](
        q,
        k,
        g,
        beta,
        aqk_diag,
        akk_diag,
        scale,
        T,
        H=H,
        K=K,
        BC=BC,
        BR=rows,
        KF=triton.next_power_of_2(K),
        num_warps=num_warps,
    )
    return aqk_diag, akk_diag, compiled


def chunk_kda_intra(
    q,
    k,
    v,
    g,
    beta,
    scale,
    BK=None,
    num_warps=4,
    num_stages=None,
    solve_precision=_SOLVE_PRECISION,
    diag_rows=4,
    diag_warps=1,
):
    """Launches 1 and 2: the state-free per-chunk work, the pairs inside the sub-chunks first
    (`diag_rows`, `diag_warps`: chunk_kda_diag_blocks' settings). Returns the scratch buffers the scan
    reads."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dev = q.device
    # The dots take q's dtype (bf16 on the model); fp32 inputs keep fp32 intermediates.
    dt = q.dtype if q.dtype in (torch.bfloat16, torch.float16) else torch.float32
    BT, BC = CHUNK_SIZE, SUB_CHUNK
    NT = triton.cdiv(T, BT)
    BH = B * H
    bufs = dict(
        qg=torch.empty(BH, T, K, dtype=dt, device=dev),
        kg=torch.empty(BH, T, K, dtype=dt, device=dev),
        w=torch.empty(BH, T, K, dtype=dt, device=dev),
        u=torch.empty(BH, T, V, dtype=dt, device=dev),
        # [B * H * NT + 1, K]: the scan reads one row past each head's chunks (see there).
        gl=torch.empty(BH * NT + 1, K, dtype=torch.float32, device=dev),
        aqk=torch.empty(BH, T, BT, dtype=dt, device=dev),
        shape=(B, T, H, K, V, NT),
    )
    # The diagonal blocks, B * T * H * SUB_CHUNK fp32 each, live until the intra kernel has read them.
    aqk_diag, akk_diag, compiled_diag = chunk_kda_diag_blocks(q, k, g, beta, scale, diag_rows, diag_warps)
    extra = {} if num_stages is None else {"num_stages": num_stages}
    compiled = chunk_kda_intra_fwd_kernel[(NT, BH)](
        q,
        k,
        v,
        g,
        beta,
        bufs["qg"],
        bufs["kg"],
        bufs["w"],
        bufs["u"],
        bufs["gl"],
        bufs["aqk"],
        aqk_diag,
        akk_diag,
        scale,
        T,
        NT,
        H=H,
        K=K,
        V=V,
        BT=BT,
        BC=BC,
        # 32 channels a step: compiled for sm_90a with Triton 3.6, 28 bytes of spills at 4 warps, against 426
        # with BK = 64 (packaging/bench/gpu_checks/compile_sm90.py). `kimi-desk bench kernels` times others.
        BK=BK or min(32, triton.next_power_of_2(K)),
        KF=triton.next_power_of_2(K),
        VF=triton.next_power_of_2(V),
        SOLVE_PRECISION=solve_precision,
        OP_DT=dot_operand_dtype(dt),
        num_warps=num_warps,
        **extra,
    )
    # Registers and spills of the compiled kernels, for the benchmark's report (absent when interpreting).
    bufs["compiled"] = (getattr(compiled, "n_regs", None), getattr(compiled, "n_spills", None))
    bufs["compiled_diag"] = (getattr(compiled_diag, "n_regs", None), getattr(compiled_diag, "n_spills", None))
    return bufs


def chunk_kda_scan(bufs, out, initial_state, final_state, BV=None, num_warps=4, num_stages=None):
    """Launch 3: the sequential pass over chunks, writing `out` and, if given, `final_state`."""
    B, T, H, K, V, NT = bufs["shape"]
    BH = B * H
    if BV is None:
        # Fewer V columns per program when there are few heads, so that more SMs take part.
        BV = 64 if BH * triton.cdiv(V, 64) >= 264 else 32
        BV = min(BV, max(16, triton.next_power_of_2(V)))
    extra = {} if num_stages is None else {"num_stages": num_stages}
    chunk_kda_scan_fwd_kernel[(triton.cdiv(V, BV), BH)](
        bufs["qg"],
        bufs["kg"],
        bufs["w"],
        bufs["u"],
        bufs["gl"],
        bufs["aqk"],
        out,
        initial_state if initial_state is not None else out,
        final_state if final_state is not None else out,
        T,
        NT,
        H=H,
        K=K,
        V=V,
        BT=CHUNK_SIZE,
        BK=max(16, triton.next_power_of_2(K)),
        BV=BV,
        USE_INITIAL_STATE=initial_state is not None,
        STORE_FINAL_STATE=final_state is not None,
        OP_DT=dot_operand_dtype(bufs["w"].dtype),
        num_warps=num_warps,
        **extra,
    )
