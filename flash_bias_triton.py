"""FlashBias for Swin Transformer (V2 and V1): fused window attention with a relative-position bias.

For every window g and head h of Swin's window attention this computes

    out = softmax(S_h + B_h + M_g) @ v

with the scores S_h in one of two forms, picked by ``logit_scale``:

* SwinV2 cosine attention (``logit_scale`` given, one value per head):
      S_h = s_h * norm(q) @ norm(k)^T,    s_h = exp(min(logit_scale_h, ln 100));
* Swin V1 scaled dot product (``logit_scale=None``):
      S_h = (q * scale) @ k^T,            scale a float, default head_dim ** -0.5 (V1's qk_scale);
  the kernel rounds q * scale to q's dtype, as the official V1 code's ``q = q * self.scale`` does.

The form is a compile-time branch of one kernel: neither form does the other's work. The kernel
reads q, k and v straight from the qkv projection output and writes the output in the layout the
output projection reads. SwinV2's qkv bias (q_bias, 0, v_bias) may be left out of the projection and
given as ``qv_bias``: the kernel adds q_bias to the queries and v_bias to the output (each row of the
softmax sums to 1, so P (v + v_bias) = P v + v_bias). The bias B_h is given in one of three forms:

* exact:     ``bias`` (H, N, N), the dense per-head bias, shared by every window and never expanded;
* low-rank:  ``bias_factors = (q_bias, k_bias)``, each (H, N, R), q_bias @ k_bias^T ~ B_h, folded into
             the score dot as R extra head-dimension columns (the FlashBias paper's decomposition);
* none.

The shift mask M_g (-100 between tokens of different regions of a shifted window, as the official
code) comes from a per-window ``region_ids`` table (nW, N): no (windows, N, N) mask exists anywhere.
A window of one region skips the mask. A window whose ids lie within 16 of its smallest id (Swin's
shifted windows: ids 0..8) gets the mask as one more score dot of 16 columns, one-hot ids scaled by 100
against one-hot ids: it adds 100 within a region instead of -100 across regions, a constant per row
that softmax ignores (the log-sum-exp stored for the backward subtracts it again). Other ids (any
integer dtype, any spread) are compared as given.

Two token layouts:

* window layout (``image_size=None``): qkv is (B*nW, N, 3C), the official ``window_partition`` output
  after the qkv projection; window g uses region row g % nW.
* image layout (``image_size=(H, W)``, ``window_size=(wh, ww)``, ``shift_size``): qkv is (B, H*W, 3C) in
  image order. The kernel finds each window's tokens by index arithmetic, cyclic shift included, and
  writes each output token back where it came from, so ``torch.roll``, ``window_partition`` and
  ``window_reverse`` (four copies of the activations per block) disappear.

The dense bias itself is cheap to derive in every forward: :func:`bias_from_table` gathers a
relative-position table (T, H) through an index (N, N) into B (H, N, N) in one kernel,

    B[h, i, j] = s * sigmoid(table[index[i, j], h])    (SwinV2: s = 16, table = cpb_mlp's output)
    B[h, i, j] = table[index[i, j], h]                  (Swin V1: the raw relative_position_bias_table)

optionally centred: minus a constant per row, which softmax ignores and which halves the rounding of a
float16 bias: s / 2, the sigmoid's midpoint, or (Swin V1) each row's midpoint (max_j + min_j) / 2.
:func:`shifted_window_region_ids` builds the ``region_ids`` of
Swin's shifted windows (the official 9 regions, in ``window_partition`` order; V1 and V2 alike).

Constants: ``MASK_VALUE`` (-100), ``MAX_LOGIT_SCALE`` (ln 100), ``NORM_EPS`` (F.normalize's eps) are
the kernel's values too (it takes them as compile-time arguments); ``MAX_RANK`` (128) caps the factors'
rank and ``MAX_HEAD_DIM`` (128) the head dim the kernel takes.

The backward (exact bias or none; any mask, either layout, either score form). With P = softmax(S + B + M)
of a window and head and dO the output's gradient, FlashAttention-2's recurrence recomputes P tile by tile
from the per-row log-sum-exp that the forward stores (float32, (B, L, heads); never the N x N scores):

    delta_i = rowsum(dO * O)_i,   dV = P^T dO,   dS = P * (dO V^T - delta),
    cosine:  d q_hat = s_h dS k_hat,  d k_hat = s_h dS^T q_hat,  then through F.normalize (eps = NORM_EPS):
             dq = (d q_hat - q_hat <q_hat, d q_hat>) / max(|q|, eps), the radial term only where |q| >= eps;
             d logit_scale_h = s_h * d s_h = sum over windows and rows of rowsum(dS * S_h), zero where
             logit_scale_h > MAX_LOGIT_SCALE (compared in float64: torch.clamp(max=ln 100)'s gradient);
             each row's sum is taken as rowsum(dS * (S - rowsum(P S))), which is the same number but
             cancels the delta's rounding (O is stored in qkv's dtype) instead of multiplying it by S;
    dot:     dq = scale * dS k,  dk = dS^T (q * scale);
    d bias_h = sum over every window (and image) of dS, in float32, returned in the bias's dtype.

dqkv comes back in qkv's layout (the image layout's tokens where they came from). One kernel computes,
per token block of a window and head, dk and dv over every query block and then dq over every key block,
so no atomics touch dqkv. The sum over windows for d bias has two designs, env FLASHBIAS_BIAS_GRAD:
"partial" (default), a second kernel where each program owns a (head, query block, key block) tile and a
chunk of windows, recomputes P and dS for each window, and stores one float32 partial sum per chunk (then
summed: deterministic); "atomic", a float32 atomic add of each dS tile from the main kernel (no second
kernel; the order of the adds varies). The low-rank factors have no backward.

Two small kernels fuse the residual adds around the attention with their LayerNorm:
:func:`residual_layer_norm`, SwinV2's res-post-norm ``shortcut + LayerNorm(branch)`` (:func:`residual_steps`: a
block's two such steps, the first sum recomputed by the second pass instead of stored in float32), and
:func:`add_layer_norm`, Swin V1's pre-norm step ``s = x + branch`` with ``LayerNorm(s)`` for the next
sub-block (V1 blocks are ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``). Each reads its inputs
once and, under autocast, writes the normalised result in the autocast dtype (what the next matmul
reads), saving the separate add, norm and cast passes of the PyTorch expression; before a patch merging,
in the merging's layout (:func:`merge_patches`), which saves its gathering copy too.

Entry points: :func:`flash_bias_attention` (kernel on CUDA, with its backward; PyTorch elsewhere or when
a gradient is needed that the kernel cannot give), :func:`attention_reference` (the readable PyTorch
definition), :func:`residual_layer_norm`, :func:`add_layer_norm`, :func:`bias_from_table`,
:func:`shifted_window_region_ids`. Every entry point
with a ``backend`` argument picks between kernel and PyTorch the same way: "auto" (default; env
FLASHBIAS_BACKEND) runs the kernel on CUDA when the inputs suit it and no gradient is needed that the
kernel cannot give (forward-mode AD never; a backward only flash_bias_attention's, not with low-rank
factors nor under torch.compile), "triton" the kernel or an error, "torch" PyTorch. The low-rank factors
themselves (rank rules, SVD, factor files) live in ``flash_bias_factors.py``.
"""
import collections
import contextlib
import functools
import math
import numbers
import os
import re
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad as _forward_ad

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only machine without Triton still gets the PyTorch path
    triton = None
try:  # Triton >= 3.3: its launch hooks live here (see _BoundLaunches)
    from triton import knobs as _triton_knobs
except ImportError:
    _triton_knobs = None

__all__ = ["flash_bias_attention", "attention_reference", "residual_layer_norm", "residual_steps", "block_tail",
           "add_layer_norm", "merge_patches",
           "cpb_table", "tracing_or_exporting", "autocast_dtype", "mlp_forward", "patch_embed_forward",
           "bias_from_table", "shifted_window_region_ids", "region_mask", "kernel_available", "MASK_VALUE",
           "MAX_LOGIT_SCALE", "NORM_EPS", "MAX_RANK", "MAX_HEAD_DIM", "BACKENDS"]

MASK_VALUE = -100.0                 # the official SwinV2 shift-mask value (not -inf)
MAX_LOGIT_SCALE = math.log(100.0)   # logit_scale is clamped to ln(1 / 0.01)
NORM_EPS = 1e-12                    # F.normalize's default eps, the official cosine attention's
MAX_RANK = 128                      # low-rank factors are extra dot columns: at most this many
MAX_HEAD_DIM = 128                  # the kernel keeps a (BLOCK_M, head_dim) accumulator in registers
BACKENDS = ("auto", "triton", "torch")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _wait_for_previous_grid(DEPENDENT: tl.constexpr):
        """A program's first step when launched dependent on the grid before it (_dependent_launch): wait until that
        grid has finished and its writes are visible, then let the next grid's programs be scheduled as this one's
        retire. Every load and store comes after the wait, so a grid may start before its predecessor ends."""
        if DEPENDENT:
            tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
            tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32,
                                      is_pure=False, pack=1)

    @triton.jit
    def _token_index(t, row0, col0, IMG_H: tl.constexpr, IMG_W: tl.constexpr, WIN_W: tl.constexpr,
                     SHIFT: tl.constexpr):
        """Image position (row * IMG_W + col) of local token t of the window whose top-left corner
        in the cyclically shifted image is (row0, col0); shifting by -SHIFT means reading +SHIFT."""
        r = row0 + t // WIN_W + SHIFT
        c = col0 + t % WIN_W + SHIFT
        if SHIFT > 0:
            r = tl.where(r >= IMG_H, r - IMG_H, r)
            c = tl.where(c >= IMG_W, c - IMG_W, c)
        return r * IMG_W + c

    @triton.jit
    def _f32(x):
        # a float argument as float32, as Triton's own launcher types a Python float: torch.compile's launcher
        # types it float64, which turned the LayerNorm's statistics into float64 math (different bits, and
        # 0.367 against 0.306 ms at SwinV2-B/384 stage 1 on an H100). tl.cast: the interpreter passes a Python float
        return tl.cast(x, tl.float32)

    @triton.jit
    def _operand(x, WIDEN: tl.constexpr):
        # Triton's CPU interpreter computes bfloat16 tl.dot wrongly (seen with triton 3.6 and 3.8):
        # there the already-rounded operands are widened to float32, which gives the same products.
        if WIDEN:
            return x.to(tl.float32)
        return x

    @triton.jit
    def _window_origin(g, IMG_H: tl.constexpr, IMG_W: tl.constexpr, WIN_H: tl.constexpr, WIN_W: tl.constexpr):
        """(image b, top-left row, top-left col) of window g of the batch (windows of an image row-major)."""
        WINDOWS_W: tl.constexpr = IMG_W // WIN_W
        WINDOWS: tl.constexpr = (IMG_H // WIN_H) * WINDOWS_W
        w = g % WINDOWS
        return g // WINDOWS, (w // WINDOWS_W) * WIN_H, (w % WINDOWS_W) * WIN_W

    @triton.jit
    def _head_scale(logit_scale_ptr, h, stride_scale_h, MAX_LOGIT_SCALE: tl.constexpr):
        """s_h = exp(min(logit_scale_h, MAX_LOGIT_SCALE)), float32. A where, not tl.minimum, clamps:
        tl.minimum drops a NaN, torch.clamp (the reference) keeps it."""
        log_scale = tl.load(logit_scale_ptr + h * stride_scale_h).to(tl.float32)
        return tl.exp(tl.where(log_scale > MAX_LOGIT_SCALE, MAX_LOGIT_SCALE, log_scale))

    @triton.jit
    def _inv_norm(x32, NORM_EPS: tl.constexpr):
        """1 / max(|x_i|, eps) per row of a float32 (rows, head_dim) tile: F.normalize's denominator."""
        return 1.0 / tl.maximum(tl.sqrt(tl.sum(x32 * x32, 1)), NORM_EPS)

    @triton.jit
    def _query_operand(q, scale, COSINE: tl.constexpr, NORM_EPS: tl.constexpr, WIDEN_DOTS: tl.constexpr):
        """The score dot's query operand in q's dtype: scale * norm(q) (cosine; scale = s_h), else
        q * scale, rounded to q's dtype as the official V1's ``q = q * self.scale``."""
        q32 = q.to(tl.float32)
        if COSINE:
            return _operand((q32 * (scale * _inv_norm(q32, NORM_EPS))[:, None]).to(q.dtype), WIDEN_DOTS)
        return _operand((q32 * scale).to(q.dtype), WIDEN_DOTS)

    @triton.jit
    def _mixed_regions(region_base, N: tl.constexpr, N_PAD: tl.constexpr, REGION_COLS: tl.constexpr):
        """(lo, mixed, onehot) of a window's N region ids: the smallest id; whether the ids differ (a window of one
        region, 9 of 16 at SwinV2-B/384 stage 1, takes no mask, which would add 0 everywhere); whether they differ
        and all lie in [lo, lo + REGION_COLS), so that the mask can be a one-hot dot (see _region_onehot)."""
        offs = tl.arange(0, N_PAD)
        ids = tl.load(region_base + offs, mask=offs < N, other=tl.load(region_base))
        lo = tl.min(ids, 0)
        spread = tl.max(ids, 0).to(tl.int64) - lo.to(tl.int64)   # negative where int64 ids wrapped: not one-hot
        return lo, spread != 0, (spread > 0) & (spread < REGION_COLS)

    @triton.jit
    def _region_onehot(ids, lo, value, dtype: tl.constexpr, REGION_COLS: tl.constexpr, WIDEN_DOTS: tl.constexpr):
        """(len(ids), REGION_COLS) dot operand in dtype: value in column ids - lo, else 0. The queries' operand with
        value -MASK_VALUE dotted with the keys' with value 1 adds -MASK_VALUE to the scores of same-region pairs: one
        K = REGION_COLS dot instead of 3 elementwise operations a score (1 and -MASK_VALUE = 100 are exact in every dot
        dtype, tf32 included)."""
        cols = tl.arange(0, REGION_COLS)
        return _operand(tl.where((ids - lo)[:, None] == cols[None, :], value, 0.0).to(dtype), WIDEN_DOTS)

    @triton.jit
    def _attn_inner(acc, l_i, m_i, q, q_fac, region_q, onehot_q, region_lo, mixed, onehot, offs_m, m_valid,
                    k_base, v_base, stride_l, bias_base, stride_bias_m, qf_base, kf_base, stride_fac_n,
                    region_base, row0, col0,
                    N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                    RANK, RANK_PAD: tl.constexpr,
                    IMG_H: tl.constexpr, IMG_W: tl.constexpr, WIN_W: tl.constexpr, SHIFT: tl.constexpr,
                    BIAS_MODE: tl.constexpr, HAS_MASK: tl.constexpr, COSINE: tl.constexpr,
                    WIDEN_DOTS: tl.constexpr, MASK_VALUE: tl.constexpr, NORM_EPS: tl.constexpr,
                    REGION_COLS: tl.constexpr, SCALE_COLUMNS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
        """The key blocks of one window for BLOCK_M queries: (acc, l_i, m_i) of the online softmax, m_i in log2
        units. mixed: whether the window holds more than one region (only those get the mask); onehot: whether its
        mask is the one-hot dot with onehot_q (region ids from region_lo), which adds -MASK_VALUE within a region
        instead of MASK_VALUE across regions (a row's constant: see _flash_bias_fwd for the LSE). SCALE_COLUMNS
        (cosine): the keys enter the dot as loaded and each score column is scaled by its key's 1 / max(|k|, eps),
        instead of each key being normalised and rounded first."""
        LOG2E: tl.constexpr = 1.4426950408889634
        EVEN_N: tl.constexpr = N % BLOCK_N == 0
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        d_valid = offs_d < HEAD_DIM
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_valid = offs_n < N
            tok_n = _token_index(offs_n, row0, col0, IMG_H, IMG_W, WIN_W, SHIFT).to(tl.int64) * stride_l
            kv_mask = n_valid[:, None] & d_valid[None, :]
            k = tl.load(k_base + tok_n[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            if COSINE and not SCALE_COLUMNS:
                k32 = k.to(tl.float32)
                k = (k32 * _inv_norm(k32, NORM_EPS)[:, None]).to(k.dtype)
            qk = tl.dot(q, tl.trans(_operand(k, WIDEN_DOTS)))
            if SCALE_COLUMNS:
                qk = qk * _inv_norm(k.to(tl.float32), NORM_EPS)[None, :]
            if HAS_MASK:
                if onehot:
                    region_k = tl.load(region_base + offs_n, mask=n_valid, other=0)
                    onehot_k = _region_onehot(region_k, region_lo, 1.0, k.dtype, REGION_COLS, WIDEN_DOTS)
                    qk = tl.dot(onehot_q, tl.trans(onehot_k), qk)
            if BIAS_MODE == 2:
                if RANK_PAD <= HEAD_DIM_PAD:
                    offs_r = tl.arange(0, RANK_PAD)
                    kf = tl.load(kf_base + offs_n[:, None] * stride_fac_n + offs_r[None, :],
                                 mask=n_valid[:, None] & (offs_r[None, :] < RANK), other=0.0)
                    qk = tl.dot(q_fac, tl.trans(_operand(kf, WIDEN_DOTS)), qk)
                else:
                    # in chunks no wider than the head dim: chaining a factor dot wider than the q.k dot
                    # into one accumulator gave wrong results (or an illegal address) on an H100 with
                    # triton 3.6 (d=32 with 64 factor columns, d=16 with 32)
                    for r0 in tl.static_range(0, RANK_PAD, HEAD_DIM_PAD):
                        offs_r = r0 + tl.arange(0, HEAD_DIM_PAD)
                        r_valid = offs_r[None, :] < RANK
                        qf = tl.load(qf_base + offs_m[:, None] * stride_fac_n + offs_r[None, :],
                                     mask=m_valid[:, None] & r_valid, other=0.0)
                        kf = tl.load(kf_base + offs_n[:, None] * stride_fac_n + offs_r[None, :],
                                     mask=n_valid[:, None] & r_valid, other=0.0)
                        qk = tl.dot(_operand(qf, WIDEN_DOTS), tl.trans(_operand(kf, WIDEN_DOTS)), qk)
            if BIAS_MODE == 1:
                b_mask = m_valid[:, None] & n_valid[None, :]
                qk += tl.load(bias_base + offs_m[:, None] * stride_bias_m + offs_n[None, :],
                              mask=b_mask, other=0.0).to(tl.float32)
            if HAS_MASK:
                if mixed and not onehot:   # ids spread over REGION_COLS or more: compared as given
                    region_k = tl.load(region_base + offs_n, mask=n_valid, other=0)
                    qk += tl.where(region_q[:, None] == region_k[None, :], 0.0, MASK_VALUE)
            if not EVEN_N:
                qk = tl.where(n_valid[None, :], qk, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * LOG2E)
            p = tl.math.exp2(qk * LOG2E - m_ij[:, None])
            alpha = tl.math.exp2(m_i - m_ij)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + tok_n[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            acc = tl.dot(_operand(p.to(v.dtype), WIDEN_DOTS), _operand(v, WIDEN_DOTS), acc * alpha[:, None])
            m_i = m_ij
        return acc, l_i, m_i

    @triton.jit
    def _flash_bias_fwd(qkv_ptr, out_ptr, lse_ptr, logit_scale_ptr, bias_ptr, q_fac_ptr, k_fac_ptr, region_ptr,
                        query_bias_ptr, value_bias_ptr, stride_qkv_b, stride_qkv_l, stride_out_b, stride_out_l,
                        stride_scale_h,
                        stride_bias_h, stride_bias_m, stride_fac_h, stride_fac_n, stride_region_w,
                        num_heads, num_region_windows, qk_scale,
                        N: tl.constexpr, N_PAD: tl.constexpr, C: tl.constexpr, HEAD_DIM: tl.constexpr,
                        HEAD_DIM_PAD: tl.constexpr, RANK, RANK_PAD: tl.constexpr,
                        IMG_H: tl.constexpr, IMG_W: tl.constexpr, WIN_H: tl.constexpr, WIN_W: tl.constexpr,
                        SHIFT: tl.constexpr, BIAS_MODE: tl.constexpr, HAS_MASK: tl.constexpr,
                        COSINE: tl.constexpr, STORE_LSE: tl.constexpr, NORMALIZE_KEYS: tl.constexpr,
                        HAS_QV_BIAS: tl.constexpr, WIDEN_DOTS: tl.constexpr, MASK_VALUE: tl.constexpr,
                        MAX_LOGIT_SCALE: tl.constexpr, NORM_EPS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, DEPENDENT: tl.constexpr):
        """One program: BLOCK_M queries of one window and one head.

        A flat grid with the query block fastest, then the head, then the window: programs that run
        together share K/V tiles and the bias of a head in L2, and no grid axis limits the batch.
        STORE_LSE: also each row's log-sum-exp, float32 (B, H*W, H) in token order, for the backward.

        Cosine scores scale each key's column of scores by its inverse norm (_attn_inner's SCALE_COLUMNS)
        rather than normalise the key tile first, unless NORMALIZE_KEYS: on an H100 at SwinV2-B/384 batch 64, 1.288
        against 1.314 ms at stage 1 shifted and 0.276 against 0.309 ms at stage 3 (SDPA without a bias: 1.114 and 0.286),
        and nearer float64 (relative L2 5.8e-4 against 7.8e-4), the normalised keys no longer being rounded.
        NORMALIZE_KEYS rounds the normalised keys as the backward does: set with STORE_LSE, so that the backward's
        recomputed P sums to 1 against the LSE (with raw keys scaled in the forward, a bfloat16 backward test's d qkv
        error rose from under its 0.08 limit to 0.086), and for a forward whose bits must equal a differentiated
        one (flash_bias_attention's normalize_keys).

        HAS_QV_BIAS: the qkv projection's q and v biases (C,) each, left out of its matmul (SwinV2 has no k bias),
        are added here: q's to each query row, rounded to qkv's dtype as the matmul's epilogue rounds it; v's to the
        output, since each row of P sums to 1 (P (v + b) = P v + b)."""
        _wait_for_previous_grid(DEPENDENT)
        SCALE_COLUMNS: tl.constexpr = COSINE and not NORMALIZE_KEYS
        # the one-hot mask's columns: tl.dot's smallest K; Swin's shifted windows hold ids 0..8
        REGION_COLS: tl.constexpr = 16
        NUM_M: tl.constexpr = (N + BLOCK_M - 1) // BLOCK_M
        pid = tl.program_id(0)
        m_block = pid % NUM_M
        gh = pid // NUM_M
        h = gh % num_heads
        g = gh // num_heads                      # window index in the batch
        b, row0, col0 = _window_origin(g, IMG_H, IMG_W, WIN_H, WIN_W)

        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        m_valid = offs_m < N
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        d_valid = offs_d < HEAD_DIM
        tok_m = _token_index(offs_m, row0, col0, IMG_H, IMG_W, WIN_W, SHIFT).to(tl.int64)

        qkv_base = qkv_ptr + b.to(tl.int64) * stride_qkv_b + h * HEAD_DIM
        q = tl.load(qkv_base + tok_m[:, None] * stride_qkv_l + offs_d[None, :],
                    mask=m_valid[:, None] & d_valid[None, :], other=0.0)
        if HAS_QV_BIAS:
            q_add = tl.load(query_bias_ptr + h * HEAD_DIM + offs_d, mask=d_valid, other=0.0).to(tl.float32)
            q = (q.to(tl.float32) + q_add[None, :]).to(q.dtype)
        # cosine attention: q normalised with the clamped per-head logit scale folded in
        scale = _head_scale(logit_scale_ptr, h, stride_scale_h, MAX_LOGIT_SCALE) if COSINE else _f32(qk_scale)
        q = _query_operand(q, scale, COSINE, NORM_EPS, WIDEN_DOTS)

        q_fac = q
        qf_base = q_fac_ptr + h * stride_fac_h
        kf_base = k_fac_ptr + h * stride_fac_h
        if BIAS_MODE == 2 and RANK_PAD <= HEAD_DIM_PAD:   # one chunk: query factors stay in registers
            offs_r = tl.arange(0, RANK_PAD)
            q_fac = tl.load(qf_base + offs_m[:, None] * stride_fac_n + offs_r[None, :],
                            mask=m_valid[:, None] & (offs_r[None, :] < RANK), other=0.0)
            q_fac = _operand(q_fac, WIDEN_DOTS)
        region_q = offs_m
        region_base = region_ptr
        region_lo = 0
        mixed = False
        onehot = False
        onehot_q = q   # without a mask never read
        if HAS_MASK:
            region_base = region_ptr + (g % num_region_windows) * stride_region_w
            region_q = tl.load(region_base + offs_m, mask=m_valid, other=0)
            region_lo, mixed, onehot = _mixed_regions(region_base, N, N_PAD, REGION_COLS)
            onehot_q = _region_onehot(region_q, region_lo, -MASK_VALUE, qkv_ptr.dtype.element_ty, REGION_COLS,
                                      WIDEN_DOTS)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
        acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, q_fac, region_q, onehot_q, region_lo, mixed, onehot,
                               offs_m, m_valid, qkv_base + C, qkv_base + 2 * C, stride_qkv_l,
                               bias_ptr + h * stride_bias_h, stride_bias_m, qf_base, kf_base, stride_fac_n,
                               region_base, row0, col0,
                               N, HEAD_DIM, HEAD_DIM_PAD, RANK, RANK_PAD, IMG_H, IMG_W, WIN_W, SHIFT,
                               BIAS_MODE, HAS_MASK, COSINE, WIDEN_DOTS, MASK_VALUE, NORM_EPS,
                               REGION_COLS, SCALE_COLUMNS, BLOCK_M, BLOCK_N)
        acc = acc / l_i[:, None]
        if HAS_QV_BIAS:
            acc += tl.load(value_bias_ptr + h * HEAD_DIM + offs_d, mask=d_valid, other=0.0).to(tl.float32)[None, :]
        out_ptrs = (out_ptr + b.to(tl.int64) * stride_out_b + tok_m[:, None] * stride_out_l
                    + h * HEAD_DIM + offs_d[None, :])
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
        if STORE_LSE:   # m_i is in log2 units
            lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
            if onehot:   # the one-hot mask's rows sit -MASK_VALUE above the official ones, which the backward uses
                lse += MASK_VALUE
            tl.store(lse_ptr + (b.to(tl.int64) * (IMG_H * IMG_W) + tok_m) * num_heads + h, lse, mask=m_valid)

    def _prune_configs(configs, named_args, **kwargs):
        n_pad = triton.next_power_of_2(named_args["N"] if "N" in named_args else kwargs["N"])
        kept = [c for c in configs
                if c.kwargs["BLOCK_M"] <= max(n_pad, 16) and c.kwargs["BLOCK_N"] <= max(n_pad, 16)]
        return kept or configs[:1]

    _AUTOTUNE_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(128, 64, 8, 2), (128, 64, 4, 2), (64, 64, 4, 2), (128, 32, 4, 2),
                             (64, 32, 4, 3), (128, 128, 8, 2), (32, 32, 4, 2), (16, 16, 2, 1)]
    ]
    _flash_bias_fwd_tuned = triton.autotune(
        configs=_AUTOTUNE_CONFIGS,
        key=["N", "C", "HEAD_DIM", "RANK_PAD", "IMG_H", "IMG_W", "SHIFT", "BIAS_MODE", "HAS_MASK", "COSINE",
             "STORE_LSE", "NORMALIZE_KEYS", "WIDEN_DOTS"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(_flash_bias_fwd)

    # ------------------------------------------------------------------------------------------
    # The backward (exact bias or none): FlashAttention-2's structure, P recomputed from the LSE
    # ------------------------------------------------------------------------------------------
    @triton.jit
    def _rows(base, tok, stride_l, valid, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
        """The (rows, HEAD_DIM_PAD) tile of tokens tok (int64 positions): base + tok * stride_l."""
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        return tl.load(base + tok[:, None] * stride_l + offs_d[None, :],
                       mask=valid[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)

    @triton.jit
    def _store_rows(base, tok, stride_l, valid, x, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        tl.store(base + tok[:, None] * stride_l + offs_d[None, :], x.to(base.dtype.element_ty),
                 mask=valid[:, None] & (offs_d < HEAD_DIM)[None, :])

    @triton.jit
    def _key_operand(k, COSINE: tl.constexpr, NORM_EPS: tl.constexpr):
        """The score dot's key operand in k's dtype: norm(k) (cosine), else k; as the forward rounds it."""
        if COSINE:
            k32 = k.to(tl.float32)
            return (k32 * _inv_norm(k32, NORM_EPS)[:, None]).to(k.dtype)
        return k

    @triton.jit
    def _normalize_backward(dx_hat, x32, NORM_EPS: tl.constexpr):
        """Through x_hat = x / max(|x|, eps) per row: dx = (dx_hat - x_hat <x_hat, dx_hat>) / max(|x|, eps),
        the radial term only where |x| >= eps (torch.clamp_min's gradient)."""
        norm = tl.sqrt(tl.sum(x32 * x32, 1))
        inv = 1.0 / tl.maximum(norm, NORM_EPS)
        x_hat = x32 * inv[:, None]
        radial = tl.where(norm >= NORM_EPS, tl.sum(x_hat * dx_hat, 1), 0.0)
        return (dx_hat - x_hat * radial[:, None]) * inv[:, None]

    @triton.jit
    def _logits(qs, kh, bias_base, stride_bias_m, offs_m, offs_n, valid, region_q, region_k,
                HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, MASK_VALUE: tl.constexpr, WIDEN_DOTS: tl.constexpr):
        """(S, S + B + M): the (BLOCK_M, BLOCK_N) tiles of the scores and the logits, float32, as the forward
        forms them."""
        scores = tl.dot(qs, tl.trans(_operand(kh, WIDEN_DOTS)))
        logits = scores
        if HAS_BIAS:
            logits += tl.load(bias_base + offs_m[:, None] * stride_bias_m + offs_n[None, :], mask=valid,
                              other=0.0).to(tl.float32)
        if HAS_MASK:
            logits += tl.where(region_q[:, None] == region_k[None, :], 0.0, MASK_VALUE)
        return scores, logits

    @triton.jit
    def _probs_and_dscores(logits, lse, delta, do, v, valid, WIDEN_DOTS: tl.constexpr):
        """P = exp(logits - lse), dP = dO v^T and dS = P * (dP - delta) of a tile, float32, P zero outside the
        window."""
        LOG2E: tl.constexpr = 1.4426950408889634
        p = tl.where(valid, tl.math.exp2((logits - lse[:, None]) * LOG2E), 0.0)
        dp = tl.dot(do, tl.trans(_operand(v, WIDEN_DOTS)))
        return p, dp, p * (dp - delta[:, None])

    @triton.jit
    def _bwd_dkdv_inner(dk, dv, kh, v, offs_n, n_valid, region_k, q_base, do_base, stride_qkv_l, stride_do_l,
                        lse_base, delta_base, num_heads, scale, bias_base, stride_bias_m, region_base, dbias_base,
                        row0, col0,
                        N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                        IMG_H: tl.constexpr, IMG_W: tl.constexpr, WIN_W: tl.constexpr, SHIFT: tl.constexpr,
                        HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, COSINE: tl.constexpr,
                        DBIAS_ATOMIC: tl.constexpr, WIDEN_DOTS: tl.constexpr, MASK_VALUE: tl.constexpr,
                        NORM_EPS: tl.constexpr, BLOCK_M: tl.constexpr):
        """dk (w.r.t. the key operand) and dv, float32, of one key block over all query blocks of the
        window: dv += P^T dO, dk += dS^T q_s; DBIAS_ATOMIC: each dS tile also added into d bias."""
        for start_m in range(0, N, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_valid = offs_m < N
            tok_m = _token_index(offs_m, row0, col0, IMG_H, IMG_W, WIN_W, SHIFT).to(tl.int64)
            valid = m_valid[:, None] & n_valid[None, :]
            qs = _query_operand(_rows(q_base, tok_m, stride_qkv_l, m_valid, HEAD_DIM, HEAD_DIM_PAD), scale,
                                COSINE, NORM_EPS, WIDEN_DOTS)
            region_q = offs_m
            if HAS_MASK:
                region_q = tl.load(region_base + offs_m, mask=m_valid, other=0)
            _, logits = _logits(qs, kh, bias_base, stride_bias_m, offs_m, offs_n, valid, region_q, region_k,
                                HAS_BIAS, HAS_MASK, MASK_VALUE, WIDEN_DOTS)
            do = _operand(_rows(do_base, tok_m, stride_do_l, m_valid, HEAD_DIM, HEAD_DIM_PAD), WIDEN_DOTS)
            lse = tl.load(lse_base + tok_m * num_heads, mask=m_valid, other=0.0)
            delta = tl.load(delta_base + tok_m * num_heads, mask=m_valid, other=0.0)
            p, _, ds = _probs_and_dscores(logits, lse, delta, do, v, valid, WIDEN_DOTS)
            dv = tl.dot(tl.trans(_operand(p.to(v.dtype), WIDEN_DOTS)), do, dv)
            dk = tl.dot(tl.trans(_operand(ds.to(v.dtype), WIDEN_DOTS)), qs, dk)
            if DBIAS_ATOMIC:
                tl.atomic_add(dbias_base + offs_m[:, None] * N + offs_n[None, :], ds, mask=valid)
        return dk, dv

    @triton.jit
    def _bwd_dq_inner(dq, ds_s, ds_sum, p_s, qs, do, lse, delta, offs_m, m_valid, region_q, k_base, v_base,
                      stride_qkv_l,
                      bias_base, stride_bias_m, region_base, row0, col0,
                      N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                      IMG_H: tl.constexpr, IMG_W: tl.constexpr, WIN_W: tl.constexpr, SHIFT: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, COSINE: tl.constexpr,
                      WIDEN_DOTS: tl.constexpr, MASK_VALUE: tl.constexpr, NORM_EPS: tl.constexpr,
                      BLOCK_N: tl.constexpr):
        """dq (w.r.t. the query operand q_s) = dS @ k_op of one query block over all key blocks, float32.

        Cosine: also the row sums of dS S, dS and P S, whose a - b * e is rowsum(dS * (S - rowsum(P S))) =
        rowsum(dS * S), the row's d s_h * s_h. Subtracting the expected score matters: delta from the rounded
        output breaks the rows' zero sum, an error that the scores (up to 100) multiply (measured in float16:
        5e-2 relative error of d logit_scale from rowsum(dS * S) alone, 7e-3 for the autocast PyTorch math)."""
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_valid = offs_n < N
            tok_n = _token_index(offs_n, row0, col0, IMG_H, IMG_W, WIN_W, SHIFT).to(tl.int64)
            valid = m_valid[:, None] & n_valid[None, :]
            kh = _key_operand(_rows(k_base, tok_n, stride_qkv_l, n_valid, HEAD_DIM, HEAD_DIM_PAD), COSINE, NORM_EPS)
            v = _rows(v_base, tok_n, stride_qkv_l, n_valid, HEAD_DIM, HEAD_DIM_PAD)
            region_k = offs_n
            if HAS_MASK:
                region_k = tl.load(region_base + offs_n, mask=n_valid, other=0)
            scores, logits = _logits(qs, kh, bias_base, stride_bias_m, offs_m, offs_n, valid, region_q, region_k,
                                     HAS_BIAS, HAS_MASK, MASK_VALUE, WIDEN_DOTS)
            p, dp, ds = _probs_and_dscores(logits, lse, delta, do, v, valid, WIDEN_DOTS)
            if COSINE:
                ds_s += tl.sum(ds * scores, 1)
                ds_sum += tl.sum(ds, 1)
                p_s += tl.sum(p * scores, 1)
            dq = tl.dot(_operand(ds.to(kh.dtype), WIDEN_DOTS), _operand(kh, WIDEN_DOTS), dq)
        return dq, ds_s, ds_sum, p_s

    @triton.jit
    def _flash_bias_bwd(qkv_ptr, do_ptr, lse_ptr, delta_ptr, dqkv_ptr, dscale_ptr, dbias_ptr, logit_scale_ptr,
                        bias_ptr, region_ptr, stride_qkv_b, stride_qkv_l, stride_do_b, stride_do_l,
                        stride_dqkv_b, stride_dqkv_l, stride_scale_h, stride_bias_h, stride_bias_m, stride_region_w,
                        num_heads, num_region_windows, qk_scale,
                        N: tl.constexpr, C: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                        IMG_H: tl.constexpr, IMG_W: tl.constexpr, WIN_H: tl.constexpr, WIN_W: tl.constexpr,
                        SHIFT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, COSINE: tl.constexpr,
                        DBIAS_ATOMIC: tl.constexpr, WIDEN_DOTS: tl.constexpr, MASK_VALUE: tl.constexpr,
                        MAX_LOGIT_SCALE: tl.constexpr, NORM_EPS: tl.constexpr,
                        BLOCK: tl.constexpr, BLOCK_ITER: tl.constexpr):
        """One program: token block j (BLOCK tokens) of one window and one head, grid ordered as the
        forward's. First dk, dv of keys j over every query block, then dq of queries j over every key
        block (steps of BLOCK_ITER), each recomputing P from the forward's LSE; no atomics on dqkv.
        Cosine: also rowsum(dS * S) per query row into dscale (its sum over rows is d s_h * s_h)."""
        NUM_BLOCKS: tl.constexpr = (N + BLOCK - 1) // BLOCK
        pid = tl.program_id(0)
        gh = pid // NUM_BLOCKS
        h = gh % num_heads
        g = gh // num_heads
        b, row0, col0 = _window_origin(g, IMG_H, IMG_W, WIN_H, WIN_W)
        scale = _head_scale(logit_scale_ptr, h, stride_scale_h, MAX_LOGIT_SCALE) if COSINE else _f32(qk_scale)
        q_base = qkv_ptr + b.to(tl.int64) * stride_qkv_b + h * HEAD_DIM
        do_base = do_ptr + b.to(tl.int64) * stride_do_b + h * HEAD_DIM
        dq_base = dqkv_ptr + b.to(tl.int64) * stride_dqkv_b + h * HEAD_DIM
        stats = b.to(tl.int64) * (IMG_H * IMG_W) * num_heads + h    # per-row float32 (B, H*W, heads)
        bias_base = bias_ptr + h * stride_bias_h
        region_base = region_ptr
        offs = (pid % NUM_BLOCKS) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < N
        tok = _token_index(offs, row0, col0, IMG_H, IMG_W, WIN_W, SHIFT).to(tl.int64)
        region = offs
        if HAS_MASK:
            region_base = region_ptr + (g % num_region_windows) * stride_region_w
            region = tl.load(region_base + offs, mask=valid, other=0)

        k = _rows(q_base + C, tok, stride_qkv_l, valid, HEAD_DIM, HEAD_DIM_PAD)
        v = _rows(q_base + 2 * C, tok, stride_qkv_l, valid, HEAD_DIM, HEAD_DIM_PAD)
        dk = tl.zeros([BLOCK, HEAD_DIM_PAD], dtype=tl.float32)
        dv = tl.zeros([BLOCK, HEAD_DIM_PAD], dtype=tl.float32)
        dk, dv = _bwd_dkdv_inner(dk, dv, _key_operand(k, COSINE, NORM_EPS), v, offs, valid, region, q_base, do_base,
                                 stride_qkv_l, stride_do_l, lse_ptr + stats, delta_ptr + stats, num_heads, scale,
                                 bias_base, stride_bias_m, region_base, dbias_ptr + h * N * N, row0, col0,
                                 N, HEAD_DIM, HEAD_DIM_PAD, IMG_H, IMG_W, WIN_W, SHIFT, HAS_BIAS, HAS_MASK, COSINE,
                                 DBIAS_ATOMIC, WIDEN_DOTS, MASK_VALUE, NORM_EPS, BLOCK_ITER)
        if COSINE:
            dk = _normalize_backward(dk, k.to(tl.float32), NORM_EPS)
        _store_rows(dq_base + C, tok, stride_dqkv_l, valid, dk, HEAD_DIM, HEAD_DIM_PAD)
        _store_rows(dq_base + 2 * C, tok, stride_dqkv_l, valid, dv, HEAD_DIM, HEAD_DIM_PAD)

        q = _rows(q_base, tok, stride_qkv_l, valid, HEAD_DIM, HEAD_DIM_PAD)
        do = _operand(_rows(do_base, tok, stride_do_l, valid, HEAD_DIM, HEAD_DIM_PAD), WIDEN_DOTS)
        lse = tl.load(lse_ptr + stats + tok * num_heads, mask=valid, other=0.0)
        delta = tl.load(delta_ptr + stats + tok * num_heads, mask=valid, other=0.0)
        dq = tl.zeros([BLOCK, HEAD_DIM_PAD], dtype=tl.float32)
        zero = tl.zeros([BLOCK], dtype=tl.float32)
        dq, ds_s, ds_sum, p_s = _bwd_dq_inner(
            dq, zero, zero, zero, _query_operand(q, scale, COSINE, NORM_EPS, WIDEN_DOTS), do, lse, delta, offs, valid,
            region, q_base + C, q_base + 2 * C, stride_qkv_l, bias_base, stride_bias_m, region_base, row0, col0,
            N, HEAD_DIM, HEAD_DIM_PAD, IMG_H, IMG_W, WIN_W, SHIFT, HAS_BIAS, HAS_MASK, COSINE, WIDEN_DOTS, MASK_VALUE,
            NORM_EPS, BLOCK_ITER)
        dq = dq * scale     # cosine: d q_hat (q_s = s * q_hat); scaled dot product: dq
        if COSINE:
            dq = _normalize_backward(dq, q.to(tl.float32), NORM_EPS)
            tl.store(dscale_ptr + stats + tok * num_heads, ds_s - ds_sum * p_s, mask=valid)
        _store_rows(dq_base, tok, stride_dqkv_l, valid, dq, HEAD_DIM, HEAD_DIM_PAD)

    @triton.jit
    def _window_dscores(g, offs_m, offs_n, valid, qkv_ptr, do_ptr, lse_ptr, delta_ptr, region_ptr, bias_base,
                        stride_qkv_b, stride_qkv_l, stride_do_b, stride_do_l, stride_bias_m, stride_region_w,
                        h, num_heads, num_region_windows, scale,
                        N: tl.constexpr, C: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                        IMG_H: tl.constexpr, IMG_W: tl.constexpr, WIN_H: tl.constexpr, WIN_W: tl.constexpr,
                        SHIFT: tl.constexpr, HAS_MASK: tl.constexpr, COSINE: tl.constexpr,
                        WIDEN_DOTS: tl.constexpr, MASK_VALUE: tl.constexpr, NORM_EPS: tl.constexpr):
        """The dS tile (float32) of window g and head h, recomputed from q, k, v, dO and the row stats."""
        b, row0, col0 = _window_origin(g, IMG_H, IMG_W, WIN_H, WIN_W)
        m_valid = offs_m < N
        n_valid = offs_n < N
        tok_m = _token_index(offs_m, row0, col0, IMG_H, IMG_W, WIN_W, SHIFT).to(tl.int64)
        tok_n = _token_index(offs_n, row0, col0, IMG_H, IMG_W, WIN_W, SHIFT).to(tl.int64)
        q_base = qkv_ptr + b.to(tl.int64) * stride_qkv_b + h * HEAD_DIM
        qs = _query_operand(_rows(q_base, tok_m, stride_qkv_l, m_valid, HEAD_DIM, HEAD_DIM_PAD), scale, COSINE,
                            NORM_EPS, WIDEN_DOTS)
        kh = _key_operand(_rows(q_base + C, tok_n, stride_qkv_l, n_valid, HEAD_DIM, HEAD_DIM_PAD), COSINE, NORM_EPS)
        v = _rows(q_base + 2 * C, tok_n, stride_qkv_l, n_valid, HEAD_DIM, HEAD_DIM_PAD)
        do = _operand(_rows(do_ptr + b.to(tl.int64) * stride_do_b + h * HEAD_DIM, tok_m, stride_do_l, m_valid,
                            HEAD_DIM, HEAD_DIM_PAD), WIDEN_DOTS)
        region_q = offs_m
        region_k = offs_n
        if HAS_MASK:
            region_base = region_ptr + (g % num_region_windows) * stride_region_w
            region_q = tl.load(region_base + offs_m, mask=m_valid, other=0)
            region_k = tl.load(region_base + offs_n, mask=n_valid, other=0)
        _, logits = _logits(qs, kh, bias_base, stride_bias_m, offs_m, offs_n, valid, region_q, region_k,
                            True, HAS_MASK, MASK_VALUE, WIDEN_DOTS)
        stats = (b.to(tl.int64) * (IMG_H * IMG_W) + tok_m) * num_heads + h
        lse = tl.load(lse_ptr + stats, mask=m_valid, other=0.0)
        delta = tl.load(delta_ptr + stats, mask=m_valid, other=0.0)
        _, _, ds = _probs_and_dscores(logits, lse, delta, do, v, valid, WIDEN_DOTS)
        return ds

    @triton.jit
    def _flash_bias_dbias_partial(qkv_ptr, do_ptr, lse_ptr, delta_ptr, partial_ptr, logit_scale_ptr, bias_ptr,
                                  region_ptr, stride_qkv_b, stride_qkv_l, stride_do_b, stride_do_l, stride_scale_h,
                                  stride_bias_h, stride_bias_m, stride_region_w, num_heads, num_region_windows,
                                  num_windows, windows_per_chunk, qk_scale,
                                  N: tl.constexpr, C: tl.constexpr, HEAD_DIM: tl.constexpr,
                                  HEAD_DIM_PAD: tl.constexpr, IMG_H: tl.constexpr, IMG_W: tl.constexpr,
                                  WIN_H: tl.constexpr, WIN_W: tl.constexpr, SHIFT: tl.constexpr,
                                  HAS_MASK: tl.constexpr, COSINE: tl.constexpr, WIDEN_DOTS: tl.constexpr,
                                  MASK_VALUE: tl.constexpr, MAX_LOGIT_SCALE: tl.constexpr, NORM_EPS: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One program: the (BLOCK_M, BLOCK_N) tile of d bias of one head, dS summed in registers over one
        chunk of windows (P and dS recomputed per window), stored once into partial (chunks, heads, N, N)."""
        NUM_M: tl.constexpr = (N + BLOCK_M - 1) // BLOCK_M
        NUM_N: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
        pid = tl.program_id(0)
        offs_n = (pid % NUM_N) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = (pid // NUM_N % NUM_M) * BLOCK_M + tl.arange(0, BLOCK_M)
        h = pid // (NUM_N * NUM_M) % num_heads
        chunk = pid // (NUM_N * NUM_M * num_heads)
        valid = (offs_m < N)[:, None] & (offs_n < N)[None, :]
        scale = _head_scale(logit_scale_ptr, h, stride_scale_h, MAX_LOGIT_SCALE) if COSINE else _f32(qk_scale)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        g_end = tl.minimum(chunk * windows_per_chunk + windows_per_chunk, num_windows)
        for g in range(chunk * windows_per_chunk, g_end):
            # the loop index is a plain int in the interpreter: cast, so the window arithmetic has a dtype
            acc += _window_dscores(tl.cast(g, tl.int64), offs_m, offs_n, valid, qkv_ptr, do_ptr, lse_ptr, delta_ptr,
                                   region_ptr,
                                   bias_ptr + h * stride_bias_h, stride_qkv_b, stride_qkv_l, stride_do_b, stride_do_l,
                                   stride_bias_m, stride_region_w, h, num_heads, num_region_windows, scale,
                                   N, C, HEAD_DIM, HEAD_DIM_PAD, IMG_H, IMG_W, WIN_H, WIN_W, SHIFT, HAS_MASK, COSINE,
                                   WIDEN_DOTS, MASK_VALUE, NORM_EPS)
        out = partial_ptr + (chunk * num_heads + h).to(tl.int64) * N * N
        tl.store(out + offs_m[:, None] * N + offs_n[None, :], acc, mask=valid)

    @triton.jit
    def _flash_bias_bwd_delta(out_ptr, do_ptr, delta_ptr, rows, stride_out_b, stride_out_l, stride_do_b,
                              stride_do_l, num_heads, L: tl.constexpr, HEAD_DIM: tl.constexpr,
                              HEAD_DIM_PAD: tl.constexpr, ROWS: tl.constexpr):
        """delta = rowsum(dO * O) of ROWS tokens and one head (FlashAttention-2's preprocessing), float32
        (B, L, heads) in token order."""
        h = tl.program_id(0) % num_heads
        offs_r = (tl.program_id(0) // num_heads) * ROWS + tl.arange(0, ROWS)
        valid = offs_r < rows
        b = (offs_r // L).to(tl.int64)
        tok = (offs_r % L).to(tl.int64)
        o = _rows(out_ptr + b[:, None] * stride_out_b + h * HEAD_DIM, tok, stride_out_l, valid, HEAD_DIM,
                  HEAD_DIM_PAD)
        do = _rows(do_ptr + b[:, None] * stride_do_b + h * HEAD_DIM, tok, stride_do_l, valid, HEAD_DIM, HEAD_DIM_PAD)
        tl.store(delta_ptr + offs_r.to(tl.int64) * num_heads + h,
                 tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=valid)

@functools.lru_cache(maxsize=None)   # one Config per shape, not a new one per launch (host time)
def _default_config(N: int, head_dim: int):
    """Block shapes without autotuning (FLASHBIAS_AUTOTUNE=1 searches instead): the first call of a
    new shape then costs one compilation, not one per candidate."""
    # measured at SwinV2-B/384 stage 1 (N=576) on an H100: 64x64, 4 warps, 3 stages was the fastest of
    # ten configurations, 1.39 ms against 1.67 ms for 128x64
    if N >= 128:
        return triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8 if head_dim > 64 else 4, num_stages=3)
    if N >= 64:
        return triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2)
    return triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2)


def _default_bwd_configs(N: int, head_dim: int):
    """Block shapes of the backward (not tuned on a GPU yet): ``_flash_bias_bwd`` (BLOCK tokens owned,
    BLOCK_ITER the inner loop's step) and ``_flash_bias_dbias_partial`` (its d bias tile)."""
    warps = 8 if head_dim > 64 else 4
    if N >= 64:
        return (triton.Config({"BLOCK": 64, "BLOCK_ITER": 32}, num_warps=warps, num_stages=2),
                triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=warps, num_stages=2))
    return (triton.Config({"BLOCK": 32, "BLOCK_ITER": 16}, num_warps=4, num_stages=2),
            triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2))


# The interpreter runs one fixed, small configuration (autotuning there would only cost time);
# tests may set it to exercise other block shapes.
INTERPRET_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 16}
INTERPRET_BWD_BLOCKS = ({"BLOCK": 32, "BLOCK_ITER": 16}, {"BLOCK_M": 32, "BLOCK_N": 16})
# How the backward sums d bias over the windows (env FLASHBIAS_BIAS_GRAD, read at each forward that
# records a backward): "partial", a separate kernel per (head, tile, chunk of windows) that recomputes dS
# and stores one float32 partial sum per chunk (deterministic), or "atomic", a float32 atomic add of
# every dS tile from the main backward kernel (no recomputation; the order of the adds varies).
BIAS_GRAD_DESIGNS = ("partial", "atomic")
# Programs the partial d bias kernel aims for: enough to fill a GPU; each more chunk costs (heads, N, N) float32.
DBIAS_PROGRAMS = 1024
# Tests set this so that an output element the kernel fails to write shows up as NaN.
POISON_OUTPUT = False


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the grids: triton.cdiv is a constexpr function whose host call cost ~2 us (an import and
    argument unwrapping per call), ~80 times per forward."""
    return -(-a // b)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


# ----------------------------------------------------------------------------------------------
# Input checking
# ----------------------------------------------------------------------------------------------
def _layout(qkv: torch.Tensor, num_heads: int, image_size, window_size, shift_size):
    """Validate the token layout; return (N, C, head_dim, (img_h, img_w), (win_h, win_w), shift, windows)."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 3:
        raise ValueError(f"qkv must be a 3-D tensor (B*nW, N, 3C) or (B, H*W, 3C); got "
                         f"{tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv)}")
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int; got {num_heads!r}")
    if qkv.shape[-1] % (3 * num_heads) != 0:
        raise ValueError(f"qkv's last dimension {qkv.shape[-1]} is not 3 * num_heads ({num_heads}) * head_dim")
    C = qkv.shape[-1] // 3
    head_dim = C // num_heads
    L = qkv.shape[1]
    if image_size is None:
        if shift_size:
            raise ValueError("shift_size is for the image layout: give image_size too")
        if window_size is None:   # a 1 x N window: any N
            return L, C, head_dim, (1, L), (1, L), 0, 1
        win_h, win_w = (int(s) for s in window_size)
        if win_h * win_w != L:
            raise ValueError(f"window_size {win_h}x{win_w} has {win_h * win_w} tokens but qkv has N={L}")
        return L, C, head_dim, (win_h, win_w), (win_h, win_w), 0, 1
    img_h, img_w = (int(s) for s in image_size)
    if window_size is None:
        raise ValueError("image layout needs window_size=(wh, ww)")
    win_h, win_w = (int(s) for s in window_size)
    if img_h * img_w != L:
        raise ValueError(f"qkv has {L} tokens but image_size {img_h}x{img_w} has {img_h * img_w}")
    if win_h < 1 or win_w < 1 or img_h % win_h or img_w % win_w:
        raise ValueError(f"window_size {win_h}x{win_w} does not tile image_size {img_h}x{img_w}")
    if not 0 <= int(shift_size) < min(win_h, win_w):
        raise ValueError(f"shift_size must be in [0, {min(win_h, win_w)}); got {shift_size}")
    windows = (img_h // win_h) * (img_w // win_w)
    return win_h * win_w, C, head_dim, (img_h, img_w), (win_h, win_w), int(shift_size), windows


def _check_inputs(qkv, num_heads, logit_scale, bias, bias_factors, region_ids, N, windows, shift_size):
    if qkv.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"qkv must be float16, bfloat16, float32 or float64; got {qkv.dtype}")
    dev = qkv.device
    if logit_scale is not None:
        if not isinstance(logit_scale, torch.Tensor) or logit_scale.numel() != num_heads:
            raise ValueError(f"logit_scale must hold num_heads={num_heads} values (shape (H,) or (H, 1, 1)); got "
                             f"{tuple(logit_scale.shape) if isinstance(logit_scale, torch.Tensor) else logit_scale!r}")
        if logit_scale.device != dev:
            raise ValueError(f"logit_scale is on {logit_scale.device} but qkv on {dev}")
    if bias is not None and bias_factors is not None:
        raise ValueError("give either bias (exact) or bias_factors (low-rank), not both")
    if bias is not None:
        if bias.shape != (num_heads, N, N):
            raise ValueError(f"bias must be (num_heads, N, N) = ({num_heads}, {N}, {N}); got {tuple(bias.shape)}")
        if not bias.is_floating_point():
            raise TypeError(f"bias must be a floating tensor; got {bias.dtype}")
        if bias.device != dev:
            raise ValueError(f"bias is on {bias.device} but qkv on {dev}")
    if bias_factors is not None:
        if not isinstance(bias_factors, (tuple, list)) or len(bias_factors) != 2:
            raise ValueError("bias_factors must be a pair (q_bias, k_bias), each (num_heads, N, R)")
        q_bias, k_bias = bias_factors
        for name, f in (("q_bias", q_bias), ("k_bias", k_bias)):
            if f.dim() != 3 or f.shape[:2] != (num_heads, N):
                raise ValueError(f"bias_factors {name} must be (num_heads, N, R) = ({num_heads}, {N}, R); "
                                 f"got {tuple(f.shape)}")
            if not f.is_floating_point():
                raise TypeError(f"bias_factors {name} must be floating; got {f.dtype}")
            if f.device != dev:
                raise ValueError(f"bias_factors {name} is on {f.device} but qkv on {dev}")
        if q_bias.shape != k_bias.shape:
            raise ValueError(f"bias_factors q_bias {tuple(q_bias.shape)} and k_bias {tuple(k_bias.shape)} differ")
        if not 1 <= q_bias.shape[2] <= MAX_RANK:
            raise ValueError(f"bias_factors rank must be 1..{MAX_RANK}; got {q_bias.shape[2]}")
    if region_ids is not None:
        if region_ids.dim() != 2 or region_ids.shape[1] != N:
            raise ValueError(f"region_ids must be (nW, N) with N={N}; got {tuple(region_ids.shape)}")
        if region_ids.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8):
            raise TypeError(f"region_ids must be an integer tensor; got {region_ids.dtype}")
        if region_ids.device != dev:
            raise ValueError(f"region_ids is on {region_ids.device} but qkv on {dev}")
        nW = region_ids.shape[0]
        total_windows = qkv.shape[0] * windows
        if windows > 1 and nW != windows:
            raise ValueError(f"region_ids has {nW} windows but the image has {windows}")
        if total_windows % nW:
            raise ValueError(f"region_ids has {nW} windows, which does not divide the {total_windows} windows "
                             f"of qkv (window layout: qkv's first dimension is B * nW)")
    elif shift_size:
        raise ValueError("a shifted window (shift_size > 0) needs region_ids for its mask")


def _check_qv_bias(qv_bias, C: int, device: torch.device) -> None:
    """qv_bias of flash_bias_attention: None or (q_bias, v_bias), floating (C,) tensors on qkv's device."""
    if qv_bias is None:
        return
    if not (isinstance(qv_bias, (tuple, list)) and len(qv_bias) == 2
            and all(isinstance(t, torch.Tensor) for t in qv_bias)):
        raise ValueError(f"qv_bias must be a pair (q_bias, v_bias) of tensors; got {type(qv_bias).__name__}")
    for name, t in zip(("q_bias", "v_bias"), qv_bias):
        if tuple(t.shape) != (C,) or not t.is_floating_point() or t.device != device:
            raise ValueError(f"qv_bias: {name} must be a floating ({C},) tensor on {device}, one value per channel "
                             f"of C = {C}; got {t.dtype} {tuple(t.shape)} on {t.device}")


def _qk_scale(logit_scale: Optional[torch.Tensor], scale: Optional[float], head_dim: int) -> Optional[float]:
    """The scaled dot product's scale: None for cosine attention (logit_scale given), else ``scale`` or
    head_dim ** -0.5."""
    if logit_scale is not None:
        if scale is not None:
            raise ValueError("give logit_scale (SwinV2 cosine attention) or scale (scaled dot-product attention), "
                             "not both")
        return None
    if scale is None:
        return head_dim ** -0.5
    # a Python number only: a tensor's value would have to be read back from the GPU (a host sync per call)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite Python float (the official qk_scale or head_dim ** -0.5); got "
                         f"{scale!r}")
    return float(scale)


# ----------------------------------------------------------------------------------------------
# The PyTorch definition
# ----------------------------------------------------------------------------------------------
def _to_windows(x: torch.Tensor, image_size, window_size, shift_size) -> torch.Tensor:
    """(B, H*W, D) image tokens -> (B*nW, wh*ww, D) window tokens, after the cyclic shift."""
    B, _, D = x.shape
    (H, W), (wh, ww) = image_size, window_size
    x = x.view(B, H, W, D)
    if shift_size:
        x = torch.roll(x, shifts=(-shift_size, -shift_size), dims=(1, 2))
    x = x.view(B, H // wh, wh, W // ww, ww, D).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, D)


def _from_windows(x: torch.Tensor, image_size, window_size, shift_size) -> torch.Tensor:
    """Inverse of :func:`_to_windows`."""
    (H, W), (wh, ww) = image_size, window_size
    D = x.shape[-1]
    x = x.view(-1, H // wh, W // ww, wh, ww, D).permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, D)
    if shift_size:
        x = torch.roll(x, shifts=(shift_size, shift_size), dims=(1, 2))
    return x.reshape(-1, H * W, D)


def region_mask(region_ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(nW, N) region ids -> (nW, N, N) additive mask: MASK_VALUE between different regions, else 0."""
    different = region_ids[:, :, None] != region_ids[:, None, :]
    return torch.zeros(different.shape, dtype=dtype, device=region_ids.device).masked_fill(different, MASK_VALUE)


def attention_reference(qkv: torch.Tensor, num_heads: int, logit_scale: Optional[torch.Tensor] = None,
                        bias: Optional[torch.Tensor] = None,
                        bias_factors: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                        region_ids: Optional[torch.Tensor] = None,
                        image_size: Optional[Sequence[int]] = None,
                        window_size: Optional[Sequence[int]] = None,
                        shift_size: int = 0, scale: Optional[float] = None) -> torch.Tensor:
    """The same function as :func:`flash_bias_attention`, written out in PyTorch (differentiable).

    Computes in float32 (float64 for float64 input) and returns qkv's dtype."""
    N, C, head_dim, img, win, shift, windows = _layout(qkv, num_heads, image_size, window_size, shift_size)
    _check_inputs(qkv, num_heads, logit_scale, bias, bias_factors, region_ids, N, windows, shift)
    qk_scale = _qk_scale(logit_scale, scale, head_dim)
    compute = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    x = qkv.to(compute)
    if image_size is not None:
        x = _to_windows(x, img, win, shift)
    else:
        x = x.reshape(-1, N, 3 * C)
    Bw = x.shape[0]
    q, k, v = x.view(Bw, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)   # (Bw, H, N, d)
    if qk_scale is None:
        s = torch.clamp(logit_scale.to(compute).view(num_heads, 1, 1), max=MAX_LOGIT_SCALE).exp()
        attn = (F.normalize(q, dim=-1, eps=NORM_EPS) @ F.normalize(k, dim=-1, eps=NORM_EPS).transpose(-2, -1)) * s
    else:
        attn = (q * qk_scale) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias.to(compute)
    elif bias_factors is not None:
        attn = attn + bias_factors[0].to(compute) @ bias_factors[1].to(compute).transpose(-2, -1)
    if region_ids is not None:
        mask = region_mask(region_ids, compute)
        nW = mask.shape[0]
        attn = (attn.view(Bw // nW, nW, num_heads, N, N) + mask[None, :, None]).view(Bw, num_heads, N, N)
    out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(Bw, N, C)
    if image_size is not None:
        out = _from_windows(out, img, win, shift)
    return out.to(qkv.dtype)


# ----------------------------------------------------------------------------------------------
# The kernel's entry point, as a custom op so that torch.compile keeps it
# ----------------------------------------------------------------------------------------------
def _launch(qkv: torch.Tensor, logit_scale: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            q_bias: Optional[torch.Tensor], k_bias: Optional[torch.Tensor], region_ids: Optional[torch.Tensor],
            num_heads: int, image_size: List[int], window_size: List[int], shift_size: int,
            qk_scale: Optional[float], normalize_keys: bool = False, lse: Optional[torch.Tensor] = None,
            query_bias: Optional[torch.Tensor] = None, value_bias: Optional[torch.Tensor] = None,
            wrap=None) -> torch.Tensor:
    """The forward's launch; normalize_keys: see flash_bias_attention (a launch that stores the LSE always does);
    lse: float32 (B, H*W, num_heads) to receive each row's log-sum-exp, or None; query_bias, value_bias: qv_bias of
    flash_bias_attention, contiguous, or None; wrap: see _launcher."""
    B, L, three_c = qkv.shape
    C = three_c // 3
    head_dim = C // num_heads
    img_h, img_w = image_size
    win_h, win_w = window_size
    N = win_h * win_w
    windows = (img_h // win_h) * (img_w // win_w)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    out = torch.empty((B, L, C), device=qkv.device, dtype=qkv.dtype)
    if POISON_OUTPUT:
        out.fill_(float("nan"))
    if logit_scale is not None:
        logit_scale = logit_scale.reshape(num_heads)
    bias_mode = 1 if bias is not None else 2 if q_bias is not None else 0
    rank = q_bias.shape[2] if q_bias is not None else 0
    if bias is not None and bias.stride(-1) != 1:
        bias = bias.contiguous()
    if q_bias is not None:
        # the factors are dot operands: same dtype as q and k, unit stride along the rank
        q_bias = q_bias.to(qkv.dtype).contiguous()
        k_bias = k_bias.to(qkv.dtype).contiguous()
    if region_ids is not None and region_ids.stride(-1) != 1:
        # any integer dtype as it is: a cast to int32 would merge ids that differ beyond 32 bits
        region_ids = region_ids.contiguous()
    dummy = out  # never read: its branch is compiled out
    interpreting = _interpreting()
    args = (qkv, out, lse if lse is not None else dummy, logit_scale if logit_scale is not None else dummy,
            bias if bias is not None else dummy,
            q_bias if q_bias is not None else dummy,
            k_bias if k_bias is not None else dummy,
            region_ids if region_ids is not None else dummy,
            query_bias if query_bias is not None else dummy, value_bias if value_bias is not None else dummy,
            qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
            logit_scale.stride(0) if logit_scale is not None else 0,
            bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
            q_bias.stride(0) if q_bias is not None else 0, q_bias.stride(1) if q_bias is not None else 0,
            region_ids.stride(0) if region_ids is not None else 0,
            num_heads, region_ids.shape[0] if region_ids is not None else 1,
            qk_scale if qk_scale is not None else 1.0)
    meta = dict(N=N, N_PAD=_next_pow2(N), C=C, HEAD_DIM=head_dim, HEAD_DIM_PAD=max(16, _next_pow2(head_dim)),
                RANK=rank, RANK_PAD=max(16, _next_pow2(rank)) if rank else 16,
                IMG_H=img_h, IMG_W=img_w, WIN_H=win_h, WIN_W=win_w, SHIFT=shift_size,
                BIAS_MODE=bias_mode, HAS_MASK=region_ids is not None, COSINE=logit_scale is not None,
                STORE_LSE=lse is not None, NORMALIZE_KEYS=normalize_keys or lse is not None,
                HAS_QV_BIAS=query_bias is not None, WIDEN_DOTS=interpreting and qkv.dtype == torch.bfloat16,
                MASK_VALUE=MASK_VALUE, MAX_LOGIT_SCALE=MAX_LOGIT_SCALE, NORM_EPS=NORM_EPS)
    meta.update(_dependent_launch(qkv.device, wrap))
    programs = B * windows * num_heads

    if interpreting:
        blocks = INTERPRET_BLOCKS
        grid = (_cdiv(N, blocks["BLOCK_M"]) * programs,)
        _launcher(_flash_bias_fwd, wrap)[grid](*args, **meta, **blocks)
    elif os.environ.get("FLASHBIAS_AUTOTUNE", "0") == "1":
        def grid(cfg):
            return (_cdiv(N, cfg["BLOCK_M"]) * programs,)
        _launcher(_flash_bias_fwd_tuned, wrap)[grid](*args, **meta)
    else:
        cfg = _default_config(N, head_dim)
        grid = (_cdiv(N, cfg.kwargs["BLOCK_M"]) * programs,)
        _launcher(_flash_bias_fwd, wrap)[grid](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps,
                                               num_stages=cfg.num_stages)
    return out


def _bias_grad_design() -> str:
    """The d bias design of the backward, env FLASHBIAS_BIAS_GRAD (see BIAS_GRAD_DESIGNS)."""
    design = os.environ.get("FLASHBIAS_BIAS_GRAD", BIAS_GRAD_DESIGNS[0])
    if design not in BIAS_GRAD_DESIGNS:
        raise ValueError(f"flash_bias_attention: FLASHBIAS_BIAS_GRAD must be one of "
                         f"{', '.join(map(repr, BIAS_GRAD_DESIGNS))}; got {design!r}")
    return design


def _launch_backward(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                     logit_scale: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     region_ids: Optional[torch.Tensor], num_heads: int, image_size: List[int],
                     window_size: List[int], shift_size: int, qk_scale: Optional[float], bias_grad: Optional[str]):
    """The backward's launches: delta = rowsum(dO * O), then dqkv (and the d bias atomics), then the partial
    d bias kernel. grad_out, out: (B, L, C); lse: float32 (B, L, num_heads); bias_grad: the d bias design, or
    None for no d bias. Returns (dqkv (B, L, 3C) in qkv's dtype, d s_h * s_h summed over every window and
    row as float32 (num_heads,) or None, d bias float32 (num_heads, N, N) or None)."""
    B, L, three_c = qkv.shape
    C = three_c // 3
    head_dim = C // num_heads
    (img_h, img_w), (win_h, win_w) = image_size, window_size
    N = win_h * win_w
    windows = B * (img_h // win_h) * (img_w // win_w)
    qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    f32 = dict(device=qkv.device, dtype=torch.float32)
    delta = torch.empty((B, L, num_heads), **f32)
    dqkv = torch.empty((B, L, three_c), device=qkv.device, dtype=qkv.dtype)
    dscale = torch.empty((B, L, num_heads), **f32) if logit_scale is not None else None
    dbias = torch.zeros((num_heads, N, N), **f32) if bias_grad == "atomic" else None
    if POISON_OUTPUT:
        for t in (delta, dqkv, dscale):
            if t is not None:
                t.fill_(float("nan"))
    if logit_scale is not None:
        logit_scale = logit_scale.reshape(num_heads)
    if bias is not None and bias.stride(-1) != 1:
        bias = bias.contiguous()
    if region_ids is not None and region_ids.stride(-1) != 1:
        region_ids = region_ids.contiguous()
    head_dim_pad = max(16, _next_pow2(head_dim))
    rows = B * L
    _flash_bias_bwd_delta[(_cdiv(rows, 32) * num_heads,)](
        out, grad_out, delta, rows, out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1), num_heads,
        L=L, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, ROWS=32)

    dummy = delta  # never read: its branch is compiled out
    scale_arg = logit_scale if logit_scale is not None else dummy
    bias_arg = bias if bias is not None else dummy
    region_arg = region_ids if region_ids is not None else dummy
    strides = (logit_scale.stride(0) if logit_scale is not None else 0,
               bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
               region_ids.stride(0) if region_ids is not None else 0,
               num_heads, region_ids.shape[0] if region_ids is not None else 1)
    meta = dict(N=N, C=C, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, IMG_H=img_h, IMG_W=img_w, WIN_H=win_h,
                WIN_W=win_w, SHIFT=shift_size, HAS_MASK=region_ids is not None, COSINE=logit_scale is not None,
                WIDEN_DOTS=_interpreting() and qkv.dtype == torch.bfloat16, MASK_VALUE=MASK_VALUE,
                MAX_LOGIT_SCALE=MAX_LOGIT_SCALE, NORM_EPS=NORM_EPS)
    qk_scale = qk_scale if qk_scale is not None else 1.0
    if _interpreting():
        (blocks, tile), launch_opts = INTERPRET_BWD_BLOCKS, ({}, {})
    else:
        cfgs = _default_bwd_configs(N, head_dim)
        (blocks, tile) = cfgs[0].kwargs, cfgs[1].kwargs
        launch_opts = tuple(dict(num_warps=c.num_warps, num_stages=c.num_stages) for c in cfgs)
    _flash_bias_bwd[(_cdiv(N, blocks["BLOCK"]) * windows * num_heads,)](
        qkv, grad_out, lse, delta, dqkv, dscale if dscale is not None else dummy,
        dbias if dbias is not None else dummy, scale_arg, bias_arg, region_arg,
        qkv.stride(0), qkv.stride(1), grad_out.stride(0), grad_out.stride(1), dqkv.stride(0), dqkv.stride(1),
        *strides, qk_scale, HAS_BIAS=bias is not None, DBIAS_ATOMIC=bias_grad == "atomic", **meta, **blocks,
        **launch_opts[0])

    if bias_grad == "partial":
        tiles = num_heads * _cdiv(N, tile["BLOCK_M"]) * _cdiv(N, tile["BLOCK_N"])
        per_chunk = _cdiv(windows, min(windows, _cdiv(DBIAS_PROGRAMS, tiles)))
        chunks = _cdiv(windows, per_chunk)
        partial = torch.empty((chunks, num_heads, N, N), **f32)
        if POISON_OUTPUT:
            partial.fill_(float("nan"))
        _flash_bias_dbias_partial[(chunks * tiles,)](
            qkv, grad_out, lse, delta, partial, scale_arg, bias_arg, region_arg,
            qkv.stride(0), qkv.stride(1), grad_out.stride(0), grad_out.stride(1), *strides, windows, per_chunk,
            qk_scale, **meta, **tile, **launch_opts[1])
        dbias = partial.sum(0) if chunks > 1 else partial[0]
    return dqkv, (dscale.sum((0, 1)) if dscale is not None else None), dbias


class _FlashBiasAttentionFunction(torch.autograd.Function):
    """The kernel with its backward (exact bias or none): the forward also stores each row's log-sum-exp
    (float32 (B, L, num_heads)), which is all the backward keeps besides its inputs and the output."""

    @staticmethod
    def forward(qkv, logit_scale, bias, region_ids, num_heads, image_size, window_size, shift_size, qk_scale,
                bias_grad):
        lse = torch.empty((*qkv.shape[:2], num_heads), device=qkv.device, dtype=torch.float32)
        if POISON_OUTPUT:
            lse.fill_(float("nan"))
        out = _launch(qkv, logit_scale, bias, None, None, region_ids, num_heads, image_size, window_size,
                      shift_size, qk_scale, lse=lse)
        return out, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        qkv, logit_scale, bias, region_ids, *ctx.static = inputs
        ctx.save_for_backward(qkv, logit_scale, bias, region_ids, *output)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    @torch.autograd.function.once_differentiable   # a second derivative raises instead of coming out wrong
    def backward(ctx, grad_out, _grad_lse):
        qkv, logit_scale, bias, region_ids, out, lse = ctx.saved_tensors
        num_heads, image_size, window_size, shift_size, qk_scale, bias_grad = ctx.static
        need_dbias = bias is not None and ctx.needs_input_grad[2]
        dqkv, dscale, dbias = _launch_backward(grad_out, qkv, out, lse, logit_scale, bias, region_ids, num_heads,
                                               image_size, window_size, shift_size, qk_scale,
                                               bias_grad if need_dbias else None)
        dlogit = None
        if logit_scale is not None and ctx.needs_input_grad[1]:
            # d logit_scale = d s * s through exp, and zero where the clamp at MAX_LOGIT_SCALE holds s. torch.clamp's
            # gradient passes where logit_scale <= max, compared in float64 for the Python float max (float32(ln 100)
            # lies above ln 100 and gets none); NaN gets none
            unclamped = logit_scale.reshape(num_heads).double() <= MAX_LOGIT_SCALE
            dlogit = torch.where(unclamped, dscale, 0.0).reshape(logit_scale.shape).to(logit_scale.dtype)
        return (dqkv, dlogit, dbias.to(bias.dtype) if dbias is not None else None) + (None,) * 7


# One op per copy of this module: the drop-in's models/flash_bias_triton.py and a top-level
# flash_bias_triton can both be imported in one process, and an op name can be registered only once.
def _op_name(name: str) -> str:
    suffix = "" if __name__ == "flash_bias_triton" else "_" + "".join(c if c.isalnum() else "_" for c in __name__)
    return f"flash_bias::{name}{suffix}"


# The ops are triton_ops: torch.compile traces into them and Inductor launches the Triton kernel from its own
# generated code. Opaque custom_ops went through the dispatcher and the Python launcher on every call, ~0.15 ms of
# host time each on an H100 host, which made the compiled SwinV2-B/384 slower than eager (44.5 against 28.9 ms at
# batch 8). Inside an op's body the kernels are launched through wrap_triton (see each _launch's ``wrap``).
def _triton_op(name: str):
    if not _interpreting():
        return torch.library.triton_op(_op_name(name), mutates_args=())

    # Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) runs kernels on real tensors only, and wrap_triton
    # cannot record them: there the op stays opaque, with its own body (launches skipped) as the fake
    def register(fn):
        op = torch.library.custom_op(_op_name(name), mutates_args=())(fn)
        op.register_fake(fn)
        return op
    return register


class _InterpretedLaunch:
    """An interpreted kernel's launch that skips fake tensors (the fake op's body only allocates the outputs)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            from torch._subclasses.fake_tensor import is_fake
            if not any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
                self.kernel[grid](*args, **kwargs)
        return launch


def _launcher(kernel, wrap):
    """kernel's eager launcher (_BoundLaunches where it applies, else kernel itself), or wrap_triton(kernel) inside
    a triton_op's body."""
    if wrap is None:
        bound = _BOUND.get(id(kernel))
        if bound is None and BIND_LAUNCHES and _DIRECT_LAUNCH and isinstance(kernel, triton.JITFunction) \
                and not _interpreting():
            bound = _BOUND[id(kernel)] = _BoundLaunches(kernel)
        return bound if bound is not None and BIND_LAUNCHES else kernel
    return _InterpretedLaunch(kernel) if _interpreting() else wrap(kernel)


# Eager launches skip Triton's per-call argument binding once a key has been seen (_BoundLaunches); False: every
# launch through kernel[grid] (tests compare the two)
BIND_LAUNCHES = True
_BOUND = {}   # id(kernel) -> _BoundLaunches
# Triton >= 3.3 (which has triton.knobs) hands its compiled launcher every parameter, constexprs included, in order
_DIRECT_LAUNCH = _triton_knobs is not None


class _BoundLaunches:
    """``kernel[grid](*args, **constexprs)`` for eager calls, launching the compiled kernel directly once the call's
    key has been seen. Triton's ``kernel[grid]`` binds and specialises every argument on every call: on an H100
    host a lone residual + LayerNorm launch took 29 us of host time that way against 11 us launched directly, an
    attention launch 54 against 9 us; an eager SwinV2-B/384 batch-1 forward (~80 launches) took 21.3 against 23.6 ms
    (every other forward bound, one process).

    The key holds everything Triton specialises on: each tensor's dtype and address modulo 16, each other argument's
    type and value (ints: the value, so also their 1 / multiple-of-16 specialisation), the keyword arguments (the
    constexprs and launch options) and the current device. The first call of a key goes through ``kernel[grid]``,
    which compiles if need be and returns the compiled kernel. Launch hooks (a profiler's) send every call through
    Triton. Keys are kept least recently used first, at most MAX_KEYS per kernel (a batch size is one more key)."""
    MAX_KEYS = 64

    def __init__(self, kernel):
        self.kernel = kernel
        self.constexprs = {p.name for p in kernel.params if p.is_constexpr}
        self.launches = collections.OrderedDict()   # key -> (run, function, packed metadata, keyword values)

    def __getitem__(self, grid):
        return functools.partial(self.launch, grid)

    def launch(self, grid, *args, **kwargs):
        runtime = _triton_knobs.runtime
        if _hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook) or callable(grid) \
                or getattr(self.kernel, "pre_run_hooks", None):
            return self.kernel[grid](*args, **kwargs)
        device = torch.cuda.current_device()
        key = (device, _launch_key(args), tuple(kwargs.items()))
        bound = self.launches.get(key)
        if bound is None:
            return self._bind(key, grid, args, kwargs)
        self.launches.move_to_end(key)
        run, function, metadata, by_name = bound
        run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
            torch._C._cuda_getCurrentRawStream(device), function, metadata, None, None, None, *args, *by_name)

    def _bind(self, key, grid, args, kwargs):
        compiled = self.kernel[grid](*args, **kwargs)
        rest = self.kernel.arg_names[len(args):]
        # the direct launch passes every parameter in order: the positional ones, then those given by name, which
        # the key holds by value: constexprs, or plain numbers (the attention's RANK)
        if all(name in kwargs and (name in self.constexprs or type(kwargs[name]) in (int, float)) for name in rest) \
                and hasattr(compiled, "packed_metadata"):
            self.launches[key] = (compiled.run, compiled.function, compiled.packed_metadata,
                                  tuple(kwargs[name] for name in rest))
            while len(self.launches) > self.MAX_KEYS:
                self.launches.popitem(last=False)
        return compiled


# True: eager launches (and so the CUDA graphs captured from them) are dependent on the grid before them
# (Programmatic Dependent Launch, compute capability 9 and up): the GPU sets a grid up while its predecessor drains,
# instead of after it has ended; each kernel starts with _wait_for_previous_grid. On an H100 at SwinV2-B/384 batch 64
# it took 0.8% off a graph replay (26.03 -> 25.82 ms, logits equal bit for bit) and the model tests pass with it; off
# until one kernel test that failed with it on (tests/test_kernel.py, isolated tokens) has run with it off too
# (benchmarks/dependent_launch_nvidia-h100-80gb-hbm3.md).
DEPENDENT_LAUNCH = False


def _dependent_launch(device: torch.device, wrap) -> dict:
    """The launch options of a kernel that starts with _wait_for_previous_grid: its DEPENDENT constexpr, and
    Triton's launch_pdl where the launch is dependent. Only eager launches on a GPU that has it are: torch.compile's
    launcher (wrap) and the interpreter launch as usual."""
    if DEPENDENT_LAUNCH and wrap is None and device.type == "cuda" and not _interpreting() \
            and _has_dependent_launch(device.index if device.index is not None else torch.cuda.current_device()):
        return {"DEPENDENT": True, "launch_pdl": True}
    return {"DEPENDENT": False}


@functools.lru_cache(maxsize=None)
def _has_dependent_launch(device_index: int) -> bool:
    """Whether the GPU (compute capability >= 9) and Triton (its launch_pdl option) support dependent launches."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device_index) >= (9, 0) \
        and "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


def _hooked(hook) -> bool:
    """Whether a Triton launch hook is set: a function, or a HookChain (Triton >= 3.5's default, empty) with calls."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _launch_key(args):
    """What Triton specialises a launch's positional arguments on (see _BoundLaunches); tuples: each element's."""
    return tuple((a.dtype, a.data_ptr() % 16) if isinstance(a, torch.Tensor) else _launch_key(a)
                 if isinstance(a, tuple) else (a.__class__, a) for a in args)


@_triton_op("window_attention")
def _window_attention_op(qkv: torch.Tensor, logit_scale: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                         q_bias: Optional[torch.Tensor], k_bias: Optional[torch.Tensor],
                         region_ids: Optional[torch.Tensor], num_heads: int, image_size: List[int],
                         window_size: List[int], shift_size: int, qk_scale: Optional[float],
                         normalize_keys: bool, query_bias: Optional[torch.Tensor],
                         value_bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _launch(qkv, logit_scale, bias, q_bias, k_bias, region_ids, num_heads, image_size, window_size,
                   shift_size, qk_scale, normalize_keys, None, query_bias, value_bias, wrap=torch.library.wrap_triton)


def _through_op(op, launch):
    """The custom op while torch.compile traces (it keeps the kernel in the graph); the plain launch
    otherwise: eagerly, the op's per-call checks cost ~0.15 ms of host time, more than the launch itself,
    and made SwinV2-B/256 at batch 64 launch-bound on an H100."""
    return op if _compiling() else launch


def kernel_available(device: torch.device) -> bool:
    """Whether the Triton kernel can run on tensors of this device (CUDA, or any device when
    TRITON_INTERPRET=1 runs Triton's interpreter)."""
    return triton is not None and (torch.device(device).type == "cuda" or _interpreting())


# ----------------------------------------------------------------------------------------------
# Kernel or PyTorch: one decision for every entry point
# ----------------------------------------------------------------------------------------------
# Inside a Dynamo trace torch 2.11 answers torch.compiler.is_exporting() with True for torch.compile too (measured;
# 2.14 answers False), which sent compiled models to the plain math: there it is believed only from 2.14 on.
# Non-strict export, the default of torch.export and torch.onnx.export, traces outside Dynamo and is always seen.
_DYNAMO_REPORTS_EXPORT = tuple(int(v) for v in re.match(r"(\d+)\.(\d+)", torch.__version__).groups()) >= (2, 14)


def tracing_or_exporting() -> bool:
    """Whether torch.jit (trace, script), torch.fx, torch.export or torch.onnx is recording the model: they need
    the plain PyTorch math, which they all understand, not the kernels (torch.compile keeps the kernels)."""
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export():
        return True
    symbolic_trace = getattr(torch.fx, "_symbolic_trace", None)
    # is_fx_tracing warns on every call in newer torch, which added is_fx_symbolic_tracing for this question
    fx_tracing = getattr(symbolic_trace, "is_fx_symbolic_tracing", getattr(symbolic_trace, "is_fx_tracing", None))
    if fx_tracing is not None and fx_tracing():
        return True
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.6
    if is_exporting is None or not is_exporting():
        return False
    in_dynamo = getattr(torch.compiler, "is_dynamo_compiling", None)
    return _DYNAMO_REPORTS_EXPORT or in_dynamo is None or not in_dynamo()


def _needs_grad(tensors: Sequence[Optional[torch.Tensor]]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _compiling() -> bool:
    """Whether torch.compile is tracing this call (the kernels' backward is not traced: it stays eager)."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return is_compiling is not None and is_compiling()


def _has_tangent(tensors: Sequence[Optional[torch.Tensor]]) -> bool:
    """Whether a tensor is a forward-mode AD dual (tangent at the current level, torch.func.jvp too)."""
    # no dual level is active almost always: one attribute read, no unpacking (host time per layer)
    if getattr(_forward_ad, "_current_level", 0) < 0:
        return False
    return any(t is not None and _forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _pick_backend(backend: Optional[str], device: torch.device, tensors: Sequence[Optional[torch.Tensor]],
                  unsupported: Optional[Exception] = None, caller: str = "flash_bias",
                  no_backward: Optional[str] = "has no backward pass") -> str:
    """"triton" or "torch" for a call of ``caller`` on these tensors.

    backend None reads env FLASHBIAS_BACKEND (default "auto"). "auto" takes the kernel only on CUDA,
    when no tensor carries a forward-mode tangent (no kernel has that pass), no tensor needs a gradient
    unless the kernel has a backward for these inputs (``no_backward`` None; else the reason it has
    none, completing "the Triton kernel ..."), and ``unsupported`` is None (the caller's reason why the
    kernel cannot take these inputs); "triton" raises where "auto" would fall back."""
    source = "backend"
    if backend is None:
        backend, source = os.environ.get("FLASHBIAS_BACKEND", "auto"), "FLASHBIAS_BACKEND"
    if backend not in BACKENDS:
        raise ValueError(f"{caller}: {source} must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        # the interpreter is for tests: "auto" runs the kernel on CUDA only
        if triton is None or device.type != "cuda" or unsupported is not None:
            return "torch"
        return "torch" if (no_backward is not None and _needs_grad(tensors)) or _has_tangent(tensors) else "triton"
    if not kernel_available(device):
        raise RuntimeError(f"{caller}: the Triton kernel cannot run on {device}: it needs CUDA and Triton "
                           f"(or TRITON_INTERPRET=1 on the CPU); use backend='torch'")
    if no_backward is not None and _needs_grad(tensors):
        raise RuntimeError(f"{caller}: the Triton kernel {no_backward} and inputs require grad. Use "
                           f"backend='auto' or 'torch' (the differentiable PyTorch path), or torch.no_grad()")
    if _has_tangent(tensors):
        raise RuntimeError(f"{caller}: the Triton kernel has no forward-mode AD and inputs are dual tensors "
                           f"(torch.autograd.forward_ad / torch.func.jvp). Use backend='auto' or 'torch'")
    if unsupported is not None:
        raise unsupported
    return "triton"


def flash_bias_attention(qkv: torch.Tensor, num_heads: int, logit_scale: Optional[torch.Tensor] = None,
                         bias: Optional[torch.Tensor] = None,
                         bias_factors: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                         region_ids: Optional[torch.Tensor] = None,
                         image_size: Optional[Sequence[int]] = None,
                         window_size: Optional[Sequence[int]] = None,
                         shift_size: int = 0,
                         backend: Optional[str] = None,
                         scale: Optional[float] = None,
                         normalize_keys: bool = False,
                         qv_bias: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Swin window attention with a relative-position bias, fused: SwinV2's cosine attention when
    ``logit_scale`` is given, Swin V1's scaled dot product when it is None.

    Args:
        qkv: window layout (B*nW, N, 3C), or image layout (B, H*W, 3C) with ``image_size``; the qkv
            projection's output (channels ordered q | k | v, heads within each), any row stride.
        num_heads: H; head_dim = C / H.
        logit_scale: (H,) or (H, 1, 1), the raw SwinV2 parameter: s_h = exp(min(logit_scale_h, ln 100)),
            cosine attention. None: scaled dot product (Swin V1), scores q @ k^T * scale.
        scale: the scaled dot product's scale, a Python float (Swin V1's qk_scale); default
            head_dim ** -0.5. Only without logit_scale (both: ValueError).
        bias: (H, N, N) dense bias, exact mode, any float dtype. float16 halves the kernel's bias
            reads (they come from L2; measured 1.39 vs 1.75 ms at SwinV2-B/384 stage 1 on an H100);
            centre each row first (softmax ignores a row's constant) to halve its rounding error.
        bias_factors: (q_bias, k_bias), each (H, N, R) with R <= MAX_RANK (128), low-rank mode.
        region_ids: (nW, N) integers; tokens of different regions get MASK_VALUE. Window g of the
            batch (image layout: window g of each image) uses row g % nW.
        image_size, window_size, shift_size: the image layout, see the module docstring; in the
            window layout window_size only names the window's shape.
        backend: "auto" (the kernel on CUDA when the inputs suit it and no tensor carries a forward-mode
            tangent; else PyTorch), "triton" (the kernel or an error; on the CPU through
            TRITON_INTERPRET=1) or "torch" (:func:`attention_reference`). None reads env
            FLASHBIAS_BACKEND, default "auto"; another value raises ValueError.
        normalize_keys: cosine attention in the kernel: the normalised keys rounded to qkv's dtype enter the score
            dot, as the backward rounds them (a call that needs a gradient always does this). False: the keys enter
            as given and each score column is scaled by its key's inverse norm (faster, and nearer float64). A
            forward without grad whose bits must equal a differentiated one sets it: the first forward of the
            reentrant torch.utils.checkpoint, which the drop-in's training mode passes.
        qv_bias: (q_bias, v_bias), each (C,): SwinV2's qkv bias (k has none), for a qkv computed without it. The
            kernel adds them itself at inference, which spares the qkv matmul its bias epilogue (at SwinV2-B/384
            stage 1 on an H100, 0.255 against 0.224 ms a call); elsewhere they are added to qkv first.

    Gradients: with the exact bias or none, a call that needs a gradient runs the kernel with its
    backward (see the module docstring): d qkv, d logit_scale, d bias (env FLASHBIAS_BIAS_GRAD picks
    how d bias is summed over the windows). Low-rank ``bias_factors`` have no backward, nor does the
    kernel under torch.compile: such a call takes the PyTorch path under "auto" and raises under
    "triton". Calls without gradients launch the forward alone.

    Returns:
        (B*nW, N, C) or (B, H*W, C) in qkv's dtype. The kernel computes in qkv's dtype with float32
        accumulation (float32 input: tf32 dots; float64 input is only for the PyTorch path).
    """
    N, C, head_dim, img, win, shift, windows = _layout(qkv, num_heads, image_size, window_size, shift_size)
    _check_inputs(qkv, num_heads, logit_scale, bias, bias_factors, region_ids, N, windows, shift)
    _check_qv_bias(qv_bias, C, qkv.device)
    qk_scale = _qk_scale(logit_scale, scale, head_dim)
    unsupported = None
    if qkv.dtype == torch.float64:
        unsupported = TypeError("flash_bias_attention: the Triton kernel takes float16, bfloat16 or float32 "
                                "qkv; float64 is for backend='torch'")
    elif not 1 <= head_dim <= MAX_HEAD_DIM:
        unsupported = ValueError(f"flash_bias_attention: the Triton kernel takes head_dim 1..{MAX_HEAD_DIM}; "
                                 f"got {head_dim}")
    tensors = (qkv, logit_scale, bias, region_ids, *(bias_factors or ()), *(qv_bias or ()))
    no_backward = None
    if bias_factors is not None:
        no_backward = "has no backward pass for low-rank bias_factors"
    elif _compiling():
        no_backward = "has no backward pass under torch.compile"
    kernel = _pick_backend(backend, qkv.device, tensors, unsupported, "flash_bias_attention", no_backward) != "torch"
    if qv_bias is not None and not (kernel and not _needs_grad(tensors)):   # the inference kernel adds them itself
        qkv, qv_bias = qkv + torch.cat((qv_bias[0], torch.zeros_like(qv_bias[0]), qv_bias[1])).to(qkv.dtype), None
    if not kernel:
        return attention_reference(qkv, num_heads, logit_scale, bias, bias_factors, region_ids,
                                   image_size, window_size, shift_size, scale)
    if _needs_grad(tensors):
        return _FlashBiasAttentionFunction.apply(qkv, logit_scale, bias, region_ids, num_heads, list(img), list(win),
                                                 shift, qk_scale, _bias_grad_design())[0]
    q_bias, k_bias = bias_factors if bias_factors is not None else (None, None)
    query_bias, value_bias = (t.contiguous() for t in qv_bias) if qv_bias is not None else (None, None)
    return _through_op(_window_attention_op, _launch)(qkv, logit_scale, bias, q_bias, k_bias, region_ids,
                                                      num_heads, list(img), list(win), shift, qk_scale,
                                                      bool(normalize_keys), query_bias=query_bias,
                                                      value_bias=value_bias)


# ----------------------------------------------------------------------------------------------
# The block's residual + post-norm, fused (SwinV2: x = shortcut + LayerNorm(branch))
# ----------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _post_norm(res, x_ptr, w_ptr, b_ptr, eps, offs, mask, offs_c, c_valid, C: tl.constexpr,
                   HAS_RESIDUAL: tl.constexpr, xb_ptr, HAS_X_BIAS: tl.constexpr):
        """_post_norm_tile of the (rows, BLOCK_C) tile of x at x_ptr + offs; HAS_X_BIAS: x + xb (C,) first, the bias
        its matmul left out."""
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_X_BIAS:
            x += tl.load(xb_ptr + offs_c, mask=c_valid, other=0.0).to(tl.float32)[None, :]
        return _post_norm_tile(res, x, w_ptr, b_ptr, eps, offs_c, c_valid, C, HAS_RESIDUAL)

    @triton.jit
    def _post_norm_tile(res, x, w_ptr, b_ptr, eps, offs_c, c_valid, C: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
        """res + LayerNorm(x) * w + b of a float32 (rows, BLOCK_C) tile, statistics in float32 (HAS_RESIDUAL
        False: without res). Summed (res + normed) + b in every kernel that takes the step: a sum recomputed by
        the next step has the bits of the one a step stores."""
        mean = tl.sum(x, 1) / C
        centred = tl.where(c_valid[None, :], x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / C + _f32(eps))
        w = tl.load(w_ptr + offs_c, mask=c_valid, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs_c, mask=c_valid, other=0.0).to(tl.float32)
        out = centred * rstd[:, None] * w
        if HAS_RESIDUAL:
            out = res + out
        return out + b

    @triton.jit
    def _low_offsets(offs_r, offs_c, C: tl.constexpr, MERGE_H: tl.constexpr, MERGE_W: tl.constexpr):
        """Where a (rows, BLOCK_C) tile of rows offs_r goes in the half-precision copy: in place, or with MERGE_W (each
        MERGE_H * MERGE_W rows one image) in the patch merging's layout (B, H/2 * W/2, 4C), see merge_patches."""
        r = offs_r.to(tl.int64)
        if MERGE_W == 0:
            return r[:, None] * C + offs_c[None, :]
        t = r % (MERGE_H * MERGE_W)
        h = t // MERGE_W
        w = t % MERGE_W
        row = ((r // (MERGE_H * MERGE_W)) * (MERGE_H // 2) + h // 2) * (MERGE_W // 2) + w // 2
        return row[:, None] * (4 * C) + ((w % 2) * 2 + h % 2)[:, None] * C + offs_c[None, :]

    @triton.jit
    def _residual_layer_norm_fwd(res_ptr, x_ptr, w_ptr, b_ptr, out_ptr, low_ptr,
                                 earlier_ptr, earlier_w_ptr, earlier_b_ptr, x_bias_ptr, earlier_bias_ptr,
                                 rows, eps, earlier_eps,
                                 C: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
                                 HAS_RESIDUAL: tl.constexpr, HAS_EARLIER: tl.constexpr, STORE_OUT: tl.constexpr,
                                 HAS_LOW: tl.constexpr, MERGE_H: tl.constexpr, MERGE_W: tl.constexpr,
                                 HAS_X_BIAS: tl.constexpr, HAS_EARLIER_BIAS: tl.constexpr, DEPENDENT: tl.constexpr):
        """ROWS rows of out = res + LayerNorm(x) * w + b (without HAS_RESIDUAL: LayerNorm(x) * w + b, res_ptr
        unread); HAS_EARLIER: res is first replaced by the earlier step's res + LayerNorm(earlier) * w' + b',
        recomputed. HAS_X_BIAS, HAS_EARLIER_BIAS: x, earlier plus a (C,) bias that their matmul left out. Stores
        out (STORE_OUT) and out in the next matmul's dtype (HAS_LOW), which saves autocast a separate cast; with
        MERGE_W, in the patch merging's layout (_low_offsets). Inputs and out (rows, C) contiguous."""
        _wait_for_previous_grid(DEPENDENT)
        offs_r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        offs_c = tl.arange(0, BLOCK_C)
        c_valid = offs_c < C
        mask = (offs_r < rows)[:, None] & c_valid[None, :]
        offs = offs_r.to(tl.int64)[:, None] * C + offs_c[None, :]
        res = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
        if HAS_RESIDUAL:
            res = tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_EARLIER:
            res = _post_norm(res, earlier_ptr, earlier_w_ptr, earlier_b_ptr, earlier_eps, offs, mask, offs_c,
                             c_valid, C, HAS_RESIDUAL, earlier_bias_ptr, HAS_EARLIER_BIAS)
        out = _post_norm(res, x_ptr, w_ptr, b_ptr, eps, offs, mask, offs_c, c_valid, C, HAS_RESIDUAL or HAS_EARLIER,
                         x_bias_ptr, HAS_X_BIAS)
        if STORE_OUT:
            tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
        if HAS_LOW:
            tl.store(low_ptr + _low_offsets(offs_r, offs_c, C, MERGE_H, MERGE_W), out.to(low_ptr.dtype.element_ty),
                     mask=mask)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype in force for this device type, or None."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except TypeError:   # PyTorch < 2.4
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return None


def _residual_layer_norm_launch(residual: Optional[torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
                                bias: torch.Tensor, eps: float, out_dtype: torch.dtype,
                                low_dtype: Optional[torch.dtype], earlier: Optional[torch.Tensor] = None,
                                earlier_weight: Optional[torch.Tensor] = None,
                                earlier_bias: Optional[torch.Tensor] = None, earlier_eps: float = 0.0,
                                store_out: bool = True, merge_h: int = 0, merge_w: int = 0,
                                branch_bias: Optional[torch.Tensor] = None,
                                earlier_branch_bias: Optional[torch.Tensor] = None, wrap=None
                                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The kernel's launch: (out, low), each (0,) where it is not stored; merge_h, merge_w: see merge_patches (0:
    low in x's layout); branch_bias, earlier_branch_bias: (C,) added to x, earlier before their norms, or None."""
    C = x.shape[-1]
    rows = x.numel() // C
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    earlier = earlier.contiguous() if earlier is not None else None
    out = torch.empty(x.shape if store_out else (0,), device=x.device, dtype=out_dtype)
    low = torch.empty(_low_shape(x.shape, merge_h, merge_w) if low_dtype is not None else (0,), device=x.device,
                      dtype=low_dtype or out_dtype)
    if POISON_OUTPUT:
        out.fill_(float("nan"))
        low.fill_(float("nan"))
    block_c = _next_pow2(C)
    rows_per_program = max(1, min(64, 4096 // block_c))
    grid = (_cdiv(rows, rows_per_program),)
    _launcher(_residual_layer_norm_fwd, wrap)[grid](
        residual if residual is not None else x, x, weight, bias, out if store_out else low,
        low if low_dtype is not None else out, earlier if earlier is not None else x,
        earlier_weight if earlier is not None else weight, earlier_bias if earlier is not None else bias,
        branch_bias if branch_bias is not None else bias,
        earlier_branch_bias if earlier_branch_bias is not None else bias,
        rows, eps, earlier_eps, C=C, BLOCK_C=block_c, ROWS=rows_per_program, HAS_RESIDUAL=residual is not None,
        HAS_EARLIER=earlier is not None, STORE_OUT=store_out, HAS_LOW=low_dtype is not None, MERGE_H=merge_h,
        MERGE_W=merge_w, HAS_X_BIAS=branch_bias is not None, HAS_EARLIER_BIAS=earlier_branch_bias is not None,
        num_warps=4 if block_c <= 512 else 8, **_dependent_launch(x.device, wrap))
    return out, low


def _low_shape(shape, merge_h: int, merge_w: int) -> Tuple[int, ...]:
    """The half-precision copy's shape: x's, or (B, H/2 * W/2, 4C) in the patch merging's layout."""
    if not merge_w:
        return tuple(shape)
    rows, C = math.prod(shape[:-1]), shape[-1]
    return rows // (merge_h * merge_w), merge_h * merge_w // 4, 4 * C


@_triton_op("residual_layer_norm")
def _residual_layer_norm_op(residual: Optional[torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor, eps: float, out_dtype: torch.dtype, low_dtype: Optional[torch.dtype],
                            earlier: Optional[torch.Tensor], earlier_weight: Optional[torch.Tensor],
                            earlier_bias: Optional[torch.Tensor], earlier_eps: float, store_out: bool,
                            merge_h: int, merge_w: int, branch_bias: Optional[torch.Tensor],
                            earlier_branch_bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    return _residual_layer_norm_launch(residual, x, weight, bias, eps, out_dtype, low_dtype, earlier, earlier_weight,
                                       earlier_bias, earlier_eps, store_out, merge_h, merge_w, branch_bias,
                                       earlier_branch_bias, torch.library.wrap_triton)


def residual_layer_norm(residual: Optional[torch.Tensor], x: torch.Tensor, norm: torch.nn.LayerNorm,
                        backend: Optional[str] = None, branch_bias: Optional[torch.Tensor] = None
                        ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``residual + norm(x)``, SwinV2's res-post-norm step, in one pass (``residual`` None: ``norm(x)``, the
    patch merging's norm); under autocast also the result in the autocast dtype (what the next matmul reads;
    None without autocast).

    Args:
        residual: (..., C) as x, or None; x: (..., C); norm: a LayerNorm over C with weight and bias.
        backend: as in :func:`flash_bias_attention` ("auto": the kernel on CUDA without gradients).
        branch_bias: (C,) or None: the bias of the Linear that made x, left out of its matmul; the pass adds it to
            x first (``residual + norm(x + branch_bias)``).
    Returns:
        (out, out_low): out in the dtype PyTorch's own expression gives (float32 under CUDA's autocast,
        which runs layer_norm in float32; else x's dtype, promoted with the residual's); out_low = out in
        the autocast dtype, or None.
    """
    return _residual_layer_norm(residual, x, norm, backend, branch_bias=branch_bias)


def residual_steps(x: torch.Tensor, attn_out: torch.Tensor, norm1: torch.nn.LayerNorm, mlp,
                   norm2: torch.nn.LayerNorm, backend: Optional[str] = None,
                   merge_size: Optional[Sequence[int]] = None, attn_bias: Optional[torch.Tensor] = None
                   ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """A SwinV2 block's two res-post-norm steps at inference, ``x1 = x + norm1(attn_out)`` and
    ``x2 = x1 + norm2(mlp(x1))``, mlp reading x1 in the autocast dtype where there is one.

    Under autocast on the kernel, the first pass stores only that half-precision x1 and the second recomputes x1
    from x and attn_out with the same code, so bit for bit; x1 in float32 is never written nor read back. At
    SwinV2-B/384 batch 64 on an H100 the block's two passes took 0.554 against 0.611 ms at stage 1 and 0.150
    against 0.161 ms at stage 3.

    Args:
        x: (..., C), the block's input; attn_out: (..., C); norm1, norm2: LayerNorms over C; mlp: a callable
            (..., C) -> (..., C); backend: as in :func:`residual_layer_norm`.
        merge_size: (H, W) of the images x's rows hold, for the block before a patch merging (see
            :func:`merge_patches`), or None.
        attn_bias: (C,) the output projection's bias where its matmul left it out (the first step adds it to
            attn_out, as residual_layer_norm's branch_bias), or None.
    Returns:
        (x2, x2_low), as :func:`residual_layer_norm` returns them. With merge_size, where x2_low is not None it is in
        the merging's layout and x2 is None: the kernel writes neither x2 nor a second copy.
    """
    x1, x1_low = _residual_layer_norm(x, attn_out, norm1, backend, store_out=False, branch_bias=attn_bias)
    if x1 is not None:   # PyTorch, or no autocast (the MLP reads the float sum): stored
        return _residual_layer_norm(x1, mlp(x1 if x1_low is None else x1_low), norm2, backend, merge_size=merge_size)
    return _residual_layer_norm(x, mlp(x1_low), norm2, backend, earlier=(attn_out, norm1, attn_bias),
                                merge_size=merge_size)


def merge_patches(x: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
    """Swin's patch merging gather, (B, H*W, C) -> (B, H/2 * W/2, 4C) in one permuting copy: token (h, w) goes to
    row (h // 2, w // 2), column slice 2 * (w % 2) + h % 2, the order of the official cat of x0, x1, x2, x3. At
    SwinV2-B/384 stage 1, batch 64, on an H100: 0.21 against 0.28 ms for the cat."""
    H, W = image_size
    B, L, C = x.shape
    return x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, L // 4, 4 * C)


def _check_merge_size(x: torch.Tensor, merge_size, caller: str) -> Tuple[int, int]:
    """(H, W) of merge_size, or (0, 0) for None; x must hold whole (H, W) images of even sides."""
    if merge_size is None:
        return 0, 0
    H, W = (int(v) for v in merge_size)
    if x.dim() != 3 or x.shape[1] != H * W or H % 2 or W % 2:
        raise ValueError(f"{caller}: merge_size {(H, W)} needs x of shape (B, H*W, C) with H and W even; "
                         f"got {tuple(x.shape)}")
    return H, W


def _non_affine(norm: torch.nn.LayerNorm, caller: str) -> Optional[ValueError]:
    """The error for the LayerNorm kernels' torch fallback where ``norm`` has no weight or bias, else None."""
    if norm.weight is None or norm.bias is None:
        return ValueError(f"{caller}: the Triton kernel needs an affine LayerNorm (weight and bias); "
                          "use backend='torch'")
    return None


def _residual_layer_norm(residual, x, norm, backend, earlier=None, store_out=True, merge_size=None,
                         branch_bias=None):
    """residual_layer_norm; earlier = (branch, norm', branch's bias or None): the step before this one, whose sum
    residual + norm'(branch + bias) was not stored, taken first. store_out=False: the kernel under autocast stores
    only out_low and returns (None, out_low); elsewhere it is ignored. merge_size: as in residual_steps."""
    if (residual is not None and x.shape != residual.shape) or tuple(norm.normalized_shape) != (x.shape[-1],):
        raise ValueError(f"residual_layer_norm: residual {None if residual is None else tuple(residual.shape)}, "
                         f"x {tuple(x.shape)} and the norm's shape {tuple(norm.normalized_shape)} do not fit")
    low_dtype = autocast_dtype(x.device.type)
    unsupported = _non_affine(norm, "residual_layer_norm")
    tensors = (residual, x, norm.weight, norm.bias, branch_bias) + (
        (earlier[0], earlier[1].weight, earlier[1].bias, earlier[2]) if earlier is not None else ())
    merge_h, merge_w = _check_merge_size(x, merge_size, "residual_layer_norm")
    if _pick_backend(backend, x.device, tensors, unsupported, "residual_layer_norm") == "torch":
        if earlier is not None:
            residual, _ = _residual_layer_norm(residual, earlier[0], earlier[1], "torch", branch_bias=earlier[2])
        if branch_bias is not None:
            x = x + branch_bias
        out = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        out = out if residual is None else residual + out
        if low_dtype is None:
            return out, None
        return (None, merge_patches(out.to(low_dtype), merge_size)) if merge_w else (out, out.to(low_dtype))
    # F.layer_norm's dtype: CUDA's autocast lists it as a float32 op; CPU's autocast does not, and without
    # autocast half-precision x with float32 weights gives x's dtype (measured, torch 2.14)
    ln_dtype = torch.float32 if low_dtype is not None and x.device.type == "cuda" else x.dtype
    out_dtype = ln_dtype if residual is None else torch.promote_types(residual.dtype, ln_dtype)
    store_out = low_dtype is None or (store_out and not merge_w)
    merge_h, merge_w = (merge_h, merge_w) if low_dtype is not None else (0, 0)
    e_branch, e_norm, e_bias = earlier if earlier is not None else (None, None, None)
    out, low = _through_op(_residual_layer_norm_op, _residual_layer_norm_launch)(
        residual, x, norm.weight, norm.bias, float(norm.eps), out_dtype, low_dtype, e_branch,
        None if e_norm is None else e_norm.weight, None if e_norm is None else e_norm.bias,
        0.0 if e_norm is None else float(e_norm.eps), store_out, merge_h, merge_w, branch_bias, e_bias)
    return (out if store_out else None), (low if low_dtype is not None else None)


# ----------------------------------------------------------------------------------------------
# Swin V1's residual add and the next pre-norm, fused (s = x + branch; LayerNorm(s) feeds the next matmul)
# ----------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _add_layer_norm_fwd(x_ptr, branch_ptr, w_ptr, b_ptr, sum_ptr, normed_ptr, rows, eps,
                            C: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr, DEPENDENT: tl.constexpr):
        """ROWS rows of s = x + branch and LayerNorm(s) * w + b, statistics in float32. All tensors (rows, C)
        contiguous."""
        _wait_for_previous_grid(DEPENDENT)
        offs_r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        offs_c = tl.arange(0, BLOCK_C)
        c_valid = offs_c < C
        mask = (offs_r < rows)[:, None] & c_valid[None, :]
        offs = offs_r.to(tl.int64)[:, None] * C + offs_c[None, :]
        s = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
             + tl.load(branch_ptr + offs, mask=mask, other=0.0).to(tl.float32))
        s = s.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + offs, s, mask=mask)
        # the norm reads the sum as stored (rounded to its dtype), as PyTorch's separate LayerNorm would
        s = s.to(tl.float32)
        mean = tl.sum(s, 1) / C
        centred = tl.where(c_valid[None, :], s - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / C + _f32(eps))
        w = tl.load(w_ptr + offs_c, mask=c_valid, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs_c, mask=c_valid, other=0.0).to(tl.float32)
        normed = centred * rstd[:, None] * w + b
        tl.store(normed_ptr + offs, normed.to(normed_ptr.dtype.element_ty), mask=mask)


def _add_layer_norm_launch(x: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           eps: float, sum_dtype: torch.dtype, normed_dtype: torch.dtype, wrap=None
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    C = x.shape[-1]
    rows = x.numel() // C
    x, branch = x.contiguous(), branch.contiguous()
    total = torch.empty(x.shape, device=x.device, dtype=sum_dtype)
    normed = torch.empty(x.shape, device=x.device, dtype=normed_dtype)
    if POISON_OUTPUT:
        total.fill_(float("nan"))
        normed.fill_(float("nan"))
    block_c = _next_pow2(C)
    rows_per_program = max(1, min(64, 4096 // block_c))
    grid = (_cdiv(rows, rows_per_program),)
    _launcher(_add_layer_norm_fwd, wrap)[grid](x, branch, weight, bias, total, normed, rows, eps, C=C, BLOCK_C=block_c,
                              ROWS=rows_per_program, num_warps=4 if block_c <= 512 else 8,
                              **_dependent_launch(x.device, wrap))
    return total, normed


@_triton_op("add_layer_norm")
def _add_layer_norm_op(x: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                       sum_dtype: torch.dtype, normed_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    return _add_layer_norm_launch(x, branch, weight, bias, eps, sum_dtype, normed_dtype, torch.library.wrap_triton)


def add_layer_norm(x: torch.Tensor, branch: torch.Tensor, norm: torch.nn.LayerNorm,
                   backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``s = x + branch`` and ``norm(s)`` in one pass: Swin V1's residual add and the pre-norm of the
    sub-block that follows it (``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``).

    Args:
        x, branch: (..., C), same shape (the residual stream and the sub-block's output).
        norm: a LayerNorm over C with weight and bias.
        backend: as in :func:`flash_bias_attention` ("auto": the kernel on CUDA without gradients).
    Returns:
        (s, normed): s in the dtype of PyTorch's ``x + branch``; normed = norm(s) in the autocast dtype
        under autocast (what the next matmul reads: the cast PyTorch would add is done in the same pass),
        else in s's dtype (as ``norm(s)``). The kernel normalises s as stored, rounded to its dtype.
    """
    if x.shape != branch.shape or tuple(norm.normalized_shape) != (x.shape[-1],):
        raise ValueError(f"add_layer_norm: x {tuple(x.shape)}, branch {tuple(branch.shape)} and the norm's shape "
                         f"{tuple(norm.normalized_shape)} do not fit")
    low_dtype = autocast_dtype(x.device.type)
    unsupported = _non_affine(norm, "add_layer_norm")
    if unsupported is None and torch.float64 in (x.dtype, branch.dtype):
        unsupported = TypeError("add_layer_norm: the Triton kernel computes in float32; float64 is for "
                                "backend='torch'")
    tensors = (x, branch, norm.weight, norm.bias)
    if _pick_backend(backend, x.device, tensors, unsupported, "add_layer_norm") == "torch":
        total = x + branch
        normed = F.layer_norm(total, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        return total, (normed.to(low_dtype) if low_dtype is not None else normed)
    sum_dtype = torch.promote_types(x.dtype, branch.dtype)
    return _through_op(_add_layer_norm_op, _add_layer_norm_launch)(
        x, branch, norm.weight, norm.bias, float(norm.eps), sum_dtype, low_dtype or sum_dtype)


# ----------------------------------------------------------------------------------------------
# Swin's Mlp at inference: GELU in the fc1 GEMM's epilogue
# ----------------------------------------------------------------------------------------------
def mlp_forward(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``mlp(x)`` for Swin's ``Mlp`` (fc1, nn.GELU, drop, fc2, drop), with the GELU done by cuBLASLt in fc1's GEMM
    epilogue (``torch._addmm_activation``): one kernel instead of a GEMM and an elementwise pass over the 4C hidden
    features. The epilogue's GELU is the tanh approximation; in float16 its error against float32 erf GELU equals
    the official fc1 + nn.GELU's own (relative L2 2.9e-4 vs 3.2e-4, largest 2.0e-3 vs 2.1e-3), and at SwinV2-B/384
    batch 64 it takes 0.39 / 0.28 / 0.20 / 0.16 ms per stage against 0.79 / 0.45 / 0.29 / 0.22 ms
    (benchmarks/gelu_epilogue_nvidia-h100-80gb-hbm3.md).

    Args:
        mlp: with fc1 and fc2 (nn.Linear, fc1 with a bias) and act (nn.GELU), as the official files' Mlp.
        x: (..., C), under fp16/bf16 autocast or in fp16/bf16.
    Returns:
        (..., out_features). Runs ``mlp(x)`` itself where the epilogue does not apply: not CUDA, float32
        computation, gradients, training, another activation. torch.compile traces the same call, so compiled
        and eager logits agree.
    """
    dtype = autocast_dtype(x.device.type) or x.dtype
    act, fc1 = getattr(mlp, "act", None), getattr(mlp, "fc1", None)
    if (x.device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or mlp.training
            or not isinstance(act, torch.nn.GELU) or act.approximate != "none"
            or not isinstance(fc1, torch.nn.Linear) or fc1.bias is None or _needs_grad((x, fc1.weight, fc1.bias))):
        return mlp(x)
    hidden = torch._addmm_activation(fc1.bias.to(dtype), x.reshape(-1, x.shape[-1]).to(dtype),
                                     fc1.weight.to(dtype).t(), use_gelu=True)
    return mlp.fc2(hidden.view(*x.shape[:-1], hidden.shape[-1]))   # dropout is the identity in eval


# ----------------------------------------------------------------------------------------------
# A SwinV2 block's tail at inference: both res-post-norm steps and the MLP in one kernel
# ----------------------------------------------------------------------------------------------
# The widest C the fused tail takes at any row count; 0: none. At SwinV2-B/384 batch 64 on an H100
# (benchmarks/block_tail_nvidia-h100-80gb-hbm3.md) the kernel beat the separate fc1 / fc2 / LayerNorm passes at stage 1
# (C = 128: 0.893 against 1.162 ms) and lost from stage 2 on (C = 256: 0.899 against 0.640 ms at best), where the
# GEMMs' own speed outweighs the hidden features' traffic.
BLOCK_TAIL_MAX_C = 128
# Wider blocks take the fused tail when they have at most this many rows (tokens of the batch); 0: none. Few rows mean
# a small batch, whose eager forward the host bounds: one launch instead of four saved host time (576 rows, C = 512:
# 0.105 against 0.305 ms by do_bench; SwinV2-B/384 batch 1, eager: 8.62 against 11.35 ms a forward). But on the GPU
# it is slower at those rows (batch 1: 3.13 against 1.66 ms of kernels a forward, CUDA graph replay 3.35 against 2.23
# ms, two runs of 2026-12-07 on an H100), and a graph replays what eager runs, bit for bit, so one choice serves both:
# the GPU's.
BLOCK_TAIL_WIDE_ROWS = 0
# The widest C the kernel takes at all: at C = 1024 fc2's (BLOCK_M, C) accumulator leaves too few registers (out of
# resources with 16 or 32 rows and 64 hidden features a step; 6.8 against 0.26 ms with 32 and 32, at 144 rows)
BLOCK_TAIL_WIDEST_C = 512
# The tail's GELU through the GPU's tanh.approx.f32 (one instruction) rather than exp2 and a division: at SwinV2-B/384
# stage 1, batch 64, on an H100 the tail with the projection took 0.698 against 0.740 ms, its error against float64
# unchanged (7.2e-5; benchmarks/stage_one_fusions_nvidia-h100-80gb-hbm3.md). The interpreter has no inline assembly:
# there the exp2 form runs, so the CPU tests check that form and the GPU tests this one.
BLOCK_TAIL_TANH_APPROX = True

if triton is not None:

    @triton.jit
    def _round_half(v, HALF: tl.constexpr, WIDEN: tl.constexpr):
        """float32 v rounded to HALF. WIDEN (the interpreter with bfloat16, whose float32 -> bfloat16 cast truncates,
        triton 3.8): round to nearest even by hand first, so that the cast is exact."""
        if WIDEN:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)
        return v.to(HALF)

    @triton.jit
    def _gelu_tanh(x, TANH_APPROX: tl.constexpr):
        """GELU's tanh form, the one cuBLASLt's epilogue computes for the wider blocks (mlp_forward), as
        x * sigmoid(2u) = x / (1 + exp(-2u)), u = sqrt(2 / pi) * (x + 0.044715 x^3): one exponential and one
        division, where erf cost the block tail 0.24 of its 0.90 ms at SwinV2-B/384 stage 1 on an H100.
        TANH_APPROX: x / 2 * (1 + tanh(u)) with the GPU's tanh.approx.f32 (no interpreter)."""
        if TANH_APPROX:
            u = x * (0.7978845608028654 + 0.0356774081363001 * x * x)
            t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [u], dtype=tl.float32, is_pure=True,
                                          pack=1)
            return 0.5 * x * (1.0 + t)
        two_u = x * (1.5957691216057308 + 0.0713548162726009 * x * x)
        return x / (1.0 + tl.math.exp2(two_u * -1.4426950408889634))

    @triton.jit
    def _block_tail_fwd(x_ptr, attn_ptr, wp_ptr, bp_ptr, w1n_ptr, b1n_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w2n_ptr,
                        b2n_ptr, out_ptr, low_ptr, rows, eps1, eps2,
                        C: tl.constexpr, HID: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_H: tl.constexpr, WIDEN: tl.constexpr, STORE_OUT: tl.constexpr,
                        MERGE_H: tl.constexpr, MERGE_W: tl.constexpr, HAS_PROJ: tl.constexpr,
                        TANH_APPROX: tl.constexpr, DEPENDENT: tl.constexpr):
        """BLOCK_M rows of x2 = x1 + norm2(fc2(gelu(fc1(half(x1))))), x1 = x + norm1(attn), rounded where the
        official block under autocast rounds: fc1's output, GELU's (the tanh form in float32, _gelu_tanh), fc2's. The
        (BLOCK_M, HID) hidden features stay on chip: fc2's (BLOCK_M, C) accumulator lives in registers while HID is
        walked in BLOCK_H chunks. x, out: (rows, C) float32; attn, low: (rows, C) half; w1 (HID, C), b1 (HID,),
        w2 (C, HID), b2 (C,): half; w1n, b1n, w2n, b2n: (C,) float32. WIDEN: see _operand and _round_half.
        STORE_OUT: out stored (else only low); MERGE_H, MERGE_W: low in the patch merging's layout (_low_offsets).
        HAS_PROJ: attn is the attention's output before its projection, which the kernel applies first (wp (C, C),
        bp (C,): half), rounded as the official proj's output."""
        _wait_for_previous_grid(DEPENDENT)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_c = tl.arange(0, BLOCK_C)
        c_valid = offs_c < C
        mask = (offs_m < rows)[:, None] & c_valid[None, :]
        offs = offs_m.to(tl.int64)[:, None] * C + offs_c[None, :]
        HALF: tl.constexpr = w1_ptr.dtype.element_ty
        branch = tl.load(attn_ptr + offs, mask=mask, other=0.0)
        if HAS_PROJ:
            wp = tl.load(wp_ptr + offs_c[:, None] * C + offs_c[None, :], mask=c_valid[:, None] & c_valid[None, :],
                         other=0.0)
            branch = tl.dot(_operand(branch, WIDEN), tl.trans(_operand(wp, WIDEN)))
            branch = _round_half(branch + tl.load(bp_ptr + offs_c, mask=c_valid, other=0.0).to(tl.float32), HALF,
                                 WIDEN)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        x1 = _post_norm_tile(x, branch.to(tl.float32), w1n_ptr, b1n_ptr, eps1, offs_c, c_valid, C, True)
        a = _operand(_round_half(x1, HALF, WIDEN), WIDEN)
        acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        for h0 in range(0, HID, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            h_valid = offs_h < HID
            w1 = tl.load(w1_ptr + offs_h[:, None] * C + offs_c[None, :], mask=h_valid[:, None] & c_valid[None, :],
                         other=0.0)
            hidden = tl.dot(a, tl.trans(_operand(w1, WIDEN)))
            hidden = _round_half(hidden + tl.load(b1_ptr + offs_h, mask=h_valid, other=0.0).to(tl.float32), HALF,
                                 WIDEN).to(tl.float32)
            hidden = _round_half(_gelu_tanh(hidden, TANH_APPROX), HALF, WIDEN)
            w2 = tl.load(w2_ptr + offs_c[:, None] * HID + offs_h[None, :], mask=c_valid[:, None] & h_valid[None, :],
                         other=0.0)
            acc = tl.dot(_operand(hidden, WIDEN), tl.trans(_operand(w2, WIDEN)), acc)
        y = _round_half(acc + tl.load(b2_ptr + offs_c, mask=c_valid, other=0.0).to(tl.float32), HALF, WIDEN)
        # x1 recomputed from the half branch and x (in L2 by now) rather than held in float32 beside the accumulator
        x1 = _post_norm_tile(tl.load(x_ptr + offs, mask=mask, other=0.0), branch.to(tl.float32), w1n_ptr, b1n_ptr,
                             eps1, offs_c, c_valid, C, True)
        out = _post_norm_tile(x1, y.to(tl.float32), w2n_ptr, b2n_ptr, eps2, offs_c, c_valid, C, True)
        if STORE_OUT:
            tl.store(out_ptr + offs, out, mask=mask)
        tl.store(low_ptr + _low_offsets(offs_m, offs_c, C, MERGE_H, MERGE_W), _round_half(out, HALF, WIDEN), mask=mask)


@functools.lru_cache(maxsize=None)
def _block_tail_config(C: int) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_H, num_warps, num_stages): fc2's (BLOCK_M, C) float32 accumulator sits in registers beside
    fc1's operand, so a wider C takes fewer rows. The fastest of six on an H100 at each width (C = 128 at 589824 rows:
    0.893 ms against 1.250 for 128 x 64 with 8 warps; C = 512 at 576 rows: 0.105 against 0.147 for 32 rows). With the
    output projection in the kernel, C = 128 gained from a third stage: 0.698 against 0.725 ms (H100,
    benchmarks/stage_one_fusions_nvidia-h100-80gb-hbm3.md)."""
    return (64, 64, 4, 3) if C <= 128 else (32, 64, 4, 2) if C <= 256 else (16, 64, 4, 2)


def _block_tail_launch(x: torch.Tensor, attn: torch.Tensor, norm1_weight: torch.Tensor, norm1_bias: torch.Tensor,
                       eps1: float, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor, fc2_weight: torch.Tensor,
                       fc2_bias: torch.Tensor, norm2_weight: torch.Tensor, norm2_bias: torch.Tensor, eps2: float,
                       merge_h: int = 0, merge_w: int = 0, proj_weight: Optional[torch.Tensor] = None,
                       proj_bias: Optional[torch.Tensor] = None, wrap=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The kernel's launch: (x2 float32, x2 in attn's dtype), both x's shape; merge_h, merge_w: see merge_patches (then
    x2 is not stored: (0,)); proj_weight (C, C), proj_bias (C,): the attention's output projection in attn's dtype,
    not yet applied to attn, or None."""
    C, HID = x.shape[-1], fc1_weight.shape[0]
    rows = x.numel() // C
    x, attn = x.contiguous(), attn.contiguous()
    out = torch.empty((0,) if merge_w else x.shape, device=x.device, dtype=torch.float32)
    low = torch.empty(_low_shape(x.shape, merge_h, merge_w), device=x.device, dtype=attn.dtype)
    if POISON_OUTPUT:
        out.fill_(float("nan"))
        low.fill_(float("nan"))
    # the interpreter: small blocks (its time grows with them); asked at each launch, not cached with the GPU's
    block_m, block_h, warps, stages = (16, 32, 4, 1) if _interpreting() else _block_tail_config(C)
    has_proj = proj_weight is not None
    _launcher(_block_tail_fwd, wrap)[(_cdiv(rows, block_m),)](
        x, attn, proj_weight.contiguous() if has_proj else fc1_weight, proj_bias if has_proj else fc1_bias,
        norm1_weight, norm1_bias, fc1_weight.contiguous(), fc1_bias, fc2_weight.contiguous(), fc2_bias,
        norm2_weight, norm2_bias, out, low, rows, eps1, eps2, C=C, HID=HID, BLOCK_C=_next_pow2(C), BLOCK_M=block_m,
        BLOCK_H=block_h, WIDEN=_interpreting() and attn.dtype == torch.bfloat16, STORE_OUT=not merge_w,
        MERGE_H=merge_h, MERGE_W=merge_w, HAS_PROJ=has_proj, TANH_APPROX=BLOCK_TAIL_TANH_APPROX and not _interpreting(),
        num_warps=warps, num_stages=stages, **_dependent_launch(x.device, wrap))
    return out, low


@_triton_op("block_tail")
def _block_tail_op(x: torch.Tensor, attn: torch.Tensor, norm1_weight: torch.Tensor, norm1_bias: torch.Tensor,
                   eps1: float, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor, fc2_weight: torch.Tensor,
                   fc2_bias: torch.Tensor, norm2_weight: torch.Tensor, norm2_bias: torch.Tensor, eps2: float,
                   merge_h: int, merge_w: int, proj_weight: Optional[torch.Tensor],
                   proj_bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    return _block_tail_launch(x, attn, norm1_weight, norm1_bias, eps1, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                              norm2_weight, norm2_bias, eps2, merge_h, merge_w, proj_weight, proj_bias,
                              torch.library.wrap_triton)


def _block_tail_fusable(x: torch.Tensor, attn_out: torch.Tensor, norm1, mlp, norm2, half) -> bool:
    """Whether the official Mlp and LayerNorms fit the fused tail: autocast to a half dtype around a float32
    residual, eval, an erf GELU between two biased Linears, affine float32 norms over C."""
    fc1, fc2, act = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None), getattr(mlp, "act", None)
    C = x.shape[-1]
    return (half in (torch.float16, torch.bfloat16) and x.dtype == torch.float32 and attn_out.dtype == half
            and attn_out.shape == x.shape and not mlp.training
            and isinstance(act, torch.nn.GELU) and act.approximate == "none"
            and isinstance(getattr(mlp, "norm", None), (type(None), torch.nn.Identity))
            and all(isinstance(fc, torch.nn.Linear) and fc.bias is not None for fc in (fc1, fc2))
            and fc1.in_features == C and fc2.out_features == C
            and all(isinstance(n, torch.nn.LayerNorm) and tuple(n.normalized_shape) == (C,) and n.weight is not None
                    and n.bias is not None and n.weight.dtype == torch.float32 for n in (norm1, norm2)))


def block_tail(x: torch.Tensor, attn_out: torch.Tensor, norm1: torch.nn.LayerNorm, mlp: torch.nn.Module,
               norm2: torch.nn.LayerNorm, backend: Optional[str] = None,
               merge_size: Optional[Sequence[int]] = None, attn_proj: Optional[torch.nn.Linear] = None
               ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """A SwinV2 block after its attention at inference: ``x1 = x + norm1(attn_out)``, ``x2 = x1 + norm2(mlp(x1))``;
    with ``attn_proj``, ``x1 = x + norm1(attn_proj(attn_out))``.

    Under CUDA's autocast to float16 / bfloat16, with a float32 residual, the official ``Mlp`` (fc1, erf GELU, fc2)
    and C <= BLOCK_TAIL_MAX_C, or C <= BLOCK_TAIL_WIDEST_C with at most BLOCK_TAIL_WIDE_ROWS rows, it is one kernel
    (:func:`_block_tail_fwd`) that rounds where the official block under autocast rounds, its GELU the tanh form
    as in :func:`mlp_forward`; the kernel applies attn_proj too. Elsewhere it is :func:`residual_steps` around
    :func:`mlp_forward`, after attn_proj's matmul without its bias, which the first LayerNorm pass adds: the bias
    epilogue cost that matmul 0.149 against 0.112 ms a call at SwinV2-B/384 stage 1, batch 64, on an H100.

    Args:
        x: (..., C) the block's input; attn_out: (..., C) the attention's output, projected unless attn_proj is
            given; norm1, norm2: LayerNorms over C; mlp: the official files' Mlp; backend: as in
            :func:`residual_layer_norm`.
        merge_size: (H, W) for the block before a patch merging, as in :func:`residual_steps`.
        attn_proj: the attention's output projection (an nn.Linear from C to C with a bias, without hooks), not yet
            applied to attn_out, or None.
    Returns:
        (x2, x2 in the autocast dtype or None), as :func:`residual_steps` returns them.
    """
    C = x.shape[-1]
    if attn_proj is not None and not (isinstance(attn_proj, torch.nn.Linear) and attn_proj.bias is not None
                                      and attn_proj.weight.shape == (C, C)):
        raise ValueError(f"block_tail: attn_proj must be an nn.Linear from C = {C} to C with a bias; got {attn_proj}")
    wanted = C <= BLOCK_TAIL_WIDEST_C and (C <= BLOCK_TAIL_MAX_C or x.numel() <= BLOCK_TAIL_WIDE_ROWS * C)
    half = autocast_dtype(x.device.type) if wanted else None   # off: no more host time
    if half is not None and _block_tail_fusable(x, attn_out, norm1, mlp, norm2, half):
        fc1, fc2 = mlp.fc1, mlp.fc2
        weights = (fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        proj = (attn_proj.weight, attn_proj.bias) if attn_proj is not None else (None, None)
        if _pick_backend(backend, x.device, (x, attn_out, norm1.weight, norm1.bias, norm2.weight, norm2.bias)
                         + weights + proj, None, "block_tail") == "triton":
            merge_h, merge_w = _check_merge_size(x, merge_size, "block_tail")
            # no copies where they are the half weight copies
            w1, b1, w2, b2 = (w.to(half) for w in weights)
            wp, bp = (None if w is None else w.to(half) for w in proj)
            out, low = _through_op(_block_tail_op, _block_tail_launch)(
                x, attn_out, norm1.weight, norm1.bias, float(norm1.eps), w1, b1, w2, b2, norm2.weight, norm2.bias,
                float(norm2.eps), merge_h, merge_w, wp, bp)
            return (None if merge_w else out), low
    attn_bias = None
    if attn_proj is not None:
        half = autocast_dtype(x.device.type)
        attn_bias = attn_proj.bias if half is None else attn_proj.bias.to(half)
        attn_out = F.linear(attn_out, attn_proj.weight)
    return residual_steps(x, attn_out, norm1, lambda x1: mlp_forward(mlp, x1), norm2, backend, merge_size, attn_bias)


# ----------------------------------------------------------------------------------------------
# Swin's PatchEmbed at inference: the patch conv, its bias and its norm in one kernel
# ----------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _patch_embed_fwd(img_ptr, w_ptr, b_ptr, nw_ptr, nb_ptr, out_ptr, low_ptr, rows, eps,
                         stride_b, stride_c, stride_h, stride_w,
                         GRID_H: tl.constexpr, GRID_W: tl.constexpr, PATCH_H: tl.constexpr, PATCH_W: tl.constexpr,
                         K: tl.constexpr, BLOCK_K: tl.constexpr, C: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_M: tl.constexpr, WIDEN: tl.constexpr, STORE_OUT: tl.constexpr,
                         IMG_AT_ADDRESS: tl.constexpr, IMG_DTYPE: tl.constexpr, DEPENDENT: tl.constexpr):
        """BLOCK_M patches of out = LayerNorm(half(half(patch) @ w^T + b)) * nw + nb, rounded where the official
        PatchEmbed under autocast rounds: the pixels as autocast casts the conv's input, the conv's output. img:
        (B, in_chans, GRID_H * PATCH_H, GRID_W * PATCH_W) with any strides, or with IMG_AT_ADDRESS a one-element
        int64 tensor holding the address of such an IMG_DTYPE image (a CUDA graph's input, see GraphInput); w:
        (C, K) half, the conv weight as (C, in_chans * PATCH_H * PATCH_W); b: (C,) half; nw, nb: (C,) float32.
        Stores out (rows, C) float32 (STORE_OUT) and low, out in w's dtype. Patch t is (image t // (GRID_H *
        GRID_W), row, col) row-major, as the official flatten(2).transpose(1, 2) orders them."""
        _wait_for_previous_grid(DEPENDENT)
        if IMG_AT_ADDRESS:
            img_ptr = tl.load(img_ptr).to(tl.pointer_type(IMG_DTYPE))
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_valid = offs_m < rows
        t = offs_m.to(tl.int64)
        image, row, col = t // (GRID_H * GRID_W), (t // GRID_W) % GRID_H, t % GRID_W
        offs_k = tl.arange(0, BLOCK_K)
        k_valid = offs_k < K
        chan, i, j = offs_k // (PATCH_H * PATCH_W), (offs_k // PATCH_W) % PATCH_H, offs_k % PATCH_W
        pixel = (image[:, None] * stride_b + chan[None, :] * stride_c
                 + (row[:, None] * PATCH_H + i[None, :]) * stride_h + (col[:, None] * PATCH_W + j[None, :]) * stride_w)
        HALF: tl.constexpr = w_ptr.dtype.element_ty
        a = tl.load(img_ptr + pixel, mask=m_valid[:, None] & k_valid[None, :], other=0.0).to(tl.float32)
        a = _operand(_round_half(a, HALF, WIDEN), WIDEN)
        offs_c = tl.arange(0, BLOCK_C)
        c_valid = offs_c < C
        w = tl.load(w_ptr + offs_c[:, None] * K + offs_k[None, :], mask=c_valid[:, None] & k_valid[None, :],
                    other=0.0)
        y = tl.dot(a, tl.trans(_operand(w, WIDEN))) + tl.load(b_ptr + offs_c, mask=c_valid, other=0.0).to(tl.float32)
        y = _round_half(y, HALF, WIDEN).to(tl.float32)
        out = _post_norm_tile(y, y, nw_ptr, nb_ptr, eps, offs_c, c_valid, C, False)   # no residual: res unread
        mask = m_valid[:, None] & c_valid[None, :]
        offs = t[:, None] * C + offs_c[None, :]
        if STORE_OUT:
            tl.store(out_ptr + offs, out, mask=mask)
        tl.store(low_ptr + offs, _round_half(out, HALF, WIDEN), mask=mask)


def _patch_embed_launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, norm_weight: torch.Tensor,
                        norm_bias: torch.Tensor, eps: float, patch_h: int, patch_w: int, wrap=None
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The kernel's launch: x (B, in_chans, H, W); weight (C, in_chans, patch_h, patch_w) half; returns (out float32,
    out in weight's dtype), each (B, H/patch_h * W/patch_w, C); on the CPU (the interpreter) out is the half copy: CPU
    autocast's LayerNorm returns its input's dtype, which the conv's is (measured, torch 2.14)."""
    B, _, H, W = x.shape
    C, K = weight.shape[0], weight[0].numel()
    grid_h, grid_w = H // patch_h, W // patch_w
    rows = B * grid_h * grid_w
    store_out = x.device.type == "cuda"
    out = torch.empty((B, grid_h * grid_w, C) if store_out else (0,), device=x.device, dtype=torch.float32)
    low = torch.empty((B, grid_h * grid_w, C), device=x.device, dtype=weight.dtype)
    if POISON_OUTPUT:
        out.fill_(float("nan"))
        low.fill_(float("nan"))
    block_m, warps = (16, 4) if _interpreting() else PATCH_EMBED_CONFIG
    image = x
    if wrap is None and _graph_input[0] is not None and _graph_input[0].takes(x):
        image = _graph_input[0].address
    _launcher(_patch_embed_fwd, wrap)[(_cdiv(rows, block_m),)](
        image, weight.contiguous(), bias, norm_weight, norm_bias, out, low, rows, eps, *x.stride(),
        GRID_H=grid_h, GRID_W=grid_w, PATCH_H=patch_h, PATCH_W=patch_w, K=K, BLOCK_K=max(16, _next_pow2(K)), C=C,
        BLOCK_C=max(16, _next_pow2(C)), BLOCK_M=block_m, WIDEN=_interpreting() and weight.dtype == torch.bfloat16,
        STORE_OUT=store_out, IMG_AT_ADDRESS=image is not x, IMG_DTYPE=_TL_DTYPES[x.dtype] if image is not x else None,
        num_warps=warps, **_dependent_launch(x.device, wrap))
    return (out if store_out else low), low


class GraphInput:
    """FlashBias: a CUDA graph's input buffer (``tensor``) that the graph reads through its address, held in device
    memory (``address``, one int64), so that a replay can read the caller's tensor where it lies (``point_at``)
    instead of copying it into the buffer: at SwinV2-B/384 batch 64 that copy moved 2 x 113 MB, 0.08 ms of a 26 ms
    forward on an H100 (benchmarks/dependent_launch_nvidia-h100-80gb-hbm3.md). While a capture runs inside
    ``reading_at_address()``, the patch-embedding kernel reads the buffer so (it is the drop-ins' first reader of
    their input) and sets ``read_at_address``; the graph's other readers, if any, still read the buffer, which is
    why flash_bias_runtime.ForwardGraphs checks a graph once before it reads its input in place."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.address = torch.tensor([tensor.data_ptr()], dtype=torch.int64, device=tensor.device)
        self.read_at_address = False

    def fits(self, x: torch.Tensor) -> bool:
        """Whether the graph can read x at its address: the buffer's dtype, shape and strides, 16-byte aligned
        (as Triton assumes of a tensor argument)."""
        t = self.tensor
        return (x.dtype, x.shape, x.stride(), x.device) == (t.dtype, t.shape, t.stride(), t.device) \
            and x.data_ptr() % 16 == 0

    def takes(self, x: torch.Tensor) -> bool:
        """Whether a kernel about to read x reads it at the address instead (and so notes that it does)."""
        if x is not self.tensor or not self.fits(x):
            return False
        self.read_at_address = True
        return True

    def point_at(self, x: torch.Tensor) -> None:
        """Point the address at x (which fits), ordered on the current stream before the replay that reads it."""
        self.address.fill_(x.data_ptr())

    @contextlib.contextmanager
    def reading_at_address(self):
        _graph_input[0] = self
        try:
            yield self
        finally:
            _graph_input[0] = None


_graph_input = [None]   # the GraphInput of the capture under way, if any
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16} if triton else {}


# (BLOCK_M, num_warps) of the patch-embedding kernel: at SwinV2-B/384 batch 64 on an H100, 0.240 ms against 0.247
# (64 rows), 0.263 (16 rows), 0.241 (32 rows, 2 warps) (benchmarks/stage_one_fusions_nvidia-h100-80gb-hbm3.md)
PATCH_EMBED_CONFIG = (32, 4)


@_triton_op("patch_embed")
def _patch_embed_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, norm_weight: torch.Tensor,
                    norm_bias: torch.Tensor, eps: float, patch_h: int, patch_w: int
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    return _patch_embed_launch(x, weight, bias, norm_weight, norm_bias, eps, patch_h, patch_w,
                               torch.library.wrap_triton)


def _patch_embed_fusable(embed: torch.nn.Module, x: torch.Tensor, half: Optional[torch.dtype]) -> bool:
    """Whether the official PatchEmbed fits the one-kernel path: autocast to a half dtype, a float image, a biased
    conv (kernel = stride = patch, no padding, dilation or groups) and an affine float32 LayerNorm over embed_dim."""
    conv, norm = embed.proj, embed.norm
    return (half in (torch.float16, torch.bfloat16) and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and isinstance(conv, torch.nn.Conv2d) and conv.bias is not None and conv.groups == 1
            and tuple(conv.kernel_size) == tuple(conv.stride) == tuple(embed.patch_size)
            and tuple(conv.padding) == (0, 0) and tuple(conv.dilation) == (1, 1) and conv.padding_mode == "zeros"
            and isinstance(norm, torch.nn.LayerNorm) and tuple(norm.normalized_shape) == (embed.embed_dim,)
            and norm.weight is not None and norm.bias is not None and norm.weight.dtype == torch.float32
            and embed.embed_dim <= PATCH_EMBED_MAX_C and conv.weight[0].numel() <= PATCH_EMBED_MAX_K)


PATCH_EMBED_MAX_C = 512   # the kernel holds a (BLOCK_M, C) float32 tile for the LayerNorm
PATCH_EMBED_MAX_K = 256   # and the (BLOCK_M, in_chans * patch_h * patch_w) pixels


def patch_embed_forward(embed: torch.nn.Module, x: torch.Tensor, backend: Optional[str] = None
                        ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``embed(x)`` for the official files' ``PatchEmbed`` (a conv with kernel = stride = patch, flatten, transpose,
    optional LayerNorm) at inference.

    Under autocast to float16 / bfloat16 with the LayerNorm, it is one kernel (:func:`_patch_embed_fwd`): each
    program gathers its patches' pixels from the image (any strides), casts them as autocast casts the conv's input,
    multiplies by the conv weight, adds the bias, rounds as the conv's output is rounded and normalises, writing the
    float32 output and its half-precision copy. At SwinV2-B/384 batch 64 on an H100 the gathering copy, cuBLAS matmul
    and LayerNorm pass it replaces took 0.10 + 0.14 + 0.21 ms. Elsewhere it is that gathering copy (cast as autocast
    casts the conv's input), one matmul and the residual + LayerNorm kernel (no residual) or none. Under CUDA's
    autocast the official module took ~2 ms of that forward: an input cast, cuDNN's implicit GEMM, a separate bias
    add, the transposing copy, and a float32 LayerNorm of that copy.

    Args:
        embed: with proj (nn.Conv2d, kernel_size = stride = patch_size, no padding), patch_size, patches_resolution,
            embed_dim and norm (nn.LayerNorm or None), as the official PatchEmbed.
        x: (B, in_chans, H, W), H and W the model's image size.
        backend: as in :func:`residual_layer_norm`.
    Returns:
        (out, out_low): out (B, Ph*Pw, embed_dim) in the dtype the official module gives; out_low the same in the
        autocast dtype where a kernel wrote it (the first qkv matmul's input), else None.
    """
    B, C, H, W = x.shape
    (ph, pw), (rows, cols) = embed.patch_size, embed.patches_resolution
    half = autocast_dtype(x.device.type)
    if _patch_embed_fusable(embed, x, half):
        conv, norm = embed.proj, embed.norm
        if _pick_backend(backend, x.device, (x, conv.weight, conv.bias, norm.weight, norm.bias), None,
                         "patch_embed_forward") == "triton":
            return _through_op(_patch_embed_op, _patch_embed_launch)(
                x, conv.weight.to(half), conv.bias.to(half), norm.weight, norm.bias, float(norm.eps), ph, pw)
    patches = torch.empty((B, rows, cols, C, ph, pw), device=x.device, dtype=half or x.dtype)
    patches.copy_(x.view(B, C, rows, ph, cols, pw).permute(0, 2, 4, 1, 3, 5))
    x = F.linear(patches.view(B, rows * cols, -1), embed.proj.weight.view(embed.embed_dim, -1), embed.proj.bias)
    return (x, None) if embed.norm is None else residual_layer_norm(None, x, embed.norm, backend)


# ----------------------------------------------------------------------------------------------
# The dense bias from a relative-position table, fused (SwinV2: 16 * sigmoid(cpb_mlp(...))[index])
# ----------------------------------------------------------------------------------------------
MAX_LAYERS_PER_LAUNCH = 32   # the layers one launch of the table kernels serves (a tuple of pointers each)

if triton is not None:

    @triton.jit
    def _layer_ptr(ptrs, layer, LAYERS: tl.constexpr):
        """Layer ``layer``'s pointer: ptrs itself (LAYERS == 1) or ptrs[layer] of a tuple of LAYERS pointers.

        One launch serves the layers of a stage. The pointers travel as kernel arguments, so a CUDA graph keeps
        them by value and nothing outlives the call; the pick is a few scalar compares per program."""
        if LAYERS == 1:
            return ptrs
        else:
            picked = ptrs[0]
            for i in tl.static_range(1, LAYERS):
                if layer == i:
                    picked = ptrs[i]
            return picked

    @triton.jit
    def _scaled_sigmoid(b, sigmoid_scale, CENTER: tl.constexpr):
        """s * sigmoid(b), minus s / 2 (the sigmoid's midpoint) with CENTER, float32: SwinV2's bias from its table
        entry, the one expression of the gather and of cpb_table (which then give the same bits)."""
        if CENTER:
            return _f32(sigmoid_scale) * (tl.sigmoid(b) - 0.5)
        return _f32(sigmoid_scale) * tl.sigmoid(b)

    @triton.jit
    def _table_tile(table_ptr, index_ptr, row, offs_c, offs_h, stride_table_t, stride_table_h, stride_index_n,
                    stride_index_m, cols, table_rows, HEADS: tl.constexpr):
        """(columns offs_c of one index row, every head): the table entries, float32, and which columns exist. An
        index outside the table reads nothing and gives NaN (checking its range would sync the host)."""
        c_valid = offs_c < cols
        idx = tl.load(index_ptr + row * stride_index_n + offs_c * stride_index_m, mask=c_valid, other=0).to(tl.int64)
        in_table = (c_valid & (idx >= 0) & (idx < table_rows))[:, None] & (offs_h < HEADS)[None, :]
        b = tl.load(table_ptr + idx[:, None] * stride_table_t + offs_h[None, :] * stride_table_h, mask=in_table,
                    other=float("nan"))
        return b.to(tl.float32), c_valid

    @triton.jit
    def _bias_from_table_fwd(table_ptrs, index_ptrs, out_ptr, stride_table_t, stride_table_h,
                             stride_index_n, stride_index_m, stride_out_l, stride_out_h, stride_out_n,
                             table_rows, sigmoid_scale, COLS: tl.constexpr, HEADS: tl.constexpr,
                             HEADS_PAD: tl.constexpr, LAYERS: tl.constexpr, SIGMOID: tl.constexpr,
                             CENTER: tl.constexpr, BLOCK_COLS: tl.constexpr, DEPENDENT: tl.constexpr):
        """One row of every head's bias of one layer, BLOCK_COLS columns at a time. A column's table entry is read
        for all heads at once (the table row's heads are contiguous), then stored head by head: read head by head,
        each entry cost a memory transaction of its own (SwinV2-B/384 stage 3 on an H100: 215 us for 191 MB).
        Swin V1's centring (CENTER without SIGMOID) takes a first pass over the row for each head's midpoint. COLS: a
        constexpr loop bound, as Triton 3.6's interpreter cannot loop to a runtime int."""
        _wait_for_previous_grid(DEPENDENT)
        layer = tl.program_id(1)
        row = tl.program_id(0)
        table_ptr = _layer_ptr(table_ptrs, layer, LAYERS)
        index_ptr = _layer_ptr(index_ptrs, layer, LAYERS)
        offs_h = tl.arange(0, HEADS_PAD)
        mid = tl.zeros([HEADS_PAD], dtype=tl.float32)
        if CENTER and not SIGMOID:   # each head's row midpoint (max + min) / 2
            hi = tl.full([HEADS_PAD], float("-inf"), dtype=tl.float32)
            lo = tl.full([HEADS_PAD], float("inf"), dtype=tl.float32)
            for c0 in range(0, COLS, BLOCK_COLS):
                offs_c = c0 + tl.arange(0, BLOCK_COLS)
                b, c_valid = _table_tile(table_ptr, index_ptr, row, offs_c, offs_h, stride_table_t, stride_table_h,
                                         stride_index_n, stride_index_m, COLS, table_rows, HEADS)
                hi = tl.maximum(hi, tl.max(tl.where(c_valid[:, None], b, float("-inf")), 0))
                lo = tl.minimum(lo, tl.min(tl.where(c_valid[:, None], b, float("inf")), 0))
            mid = (hi + lo) * 0.5
        out_base = out_ptr + layer.to(tl.int64) * stride_out_l + row.to(tl.int64) * stride_out_n
        for c0 in range(0, COLS, BLOCK_COLS):
            offs_c = c0 + tl.arange(0, BLOCK_COLS)
            b, c_valid = _table_tile(table_ptr, index_ptr, row, offs_c, offs_h, stride_table_t, stride_table_h,
                                     stride_index_n, stride_index_m, COLS, table_rows, HEADS)
            if SIGMOID:
                # centred: minus the sigmoid's midpoint, known without the row's max and min (their reductions
                # took a third of the kernel's time: 335 against 220 us at SwinV2-B/384 stage 3, H100)
                b = _scaled_sigmoid(b, sigmoid_scale, CENTER)
            elif CENTER:
                b = b - mid[None, :]
            tl.store(out_base + offs_h[None, :].to(tl.int64) * stride_out_h + offs_c[:, None],
                     b.to(out_ptr.dtype.element_ty), mask=c_valid[:, None] & (offs_h < HEADS)[None, :])


def _check_layers(layers: List[tuple], check) -> None:
    """check(i, *layers[i]) for layer 0 and for each layer whose tensors differ from layer 0's in shape, dtype or
    device (the others pass as layer 0 did): checked one by one, SwinV2-B's 18-layer stage took ~110 us of checks."""
    def signature(layer):
        # get_device(), not .device: a torch.device object per tensor cost as much as the checks it saves
        return tuple((t.shape, t.dtype, t.get_device()) if isinstance(t, torch.Tensor) else id(t) for t in layer)
    first = signature(layers[0])
    for i, layer in enumerate(layers):
        if i == 0 or signature(layer) != first:
            check(i, *layer)


def _one_layout(tensors: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """The layers' tensors with one set of strides, which one launch passes for all: made contiguous where they
    differ. Read the strides from the result."""
    tensors = tuple(tensors)
    if any(t.stride() != tensors[0].stride() for t in tensors):
        tensors = tuple(t.contiguous() for t in tensors)
    return tensors


def _stacked(tensors: Sequence[torch.Tensor]):
    """The layers' tensors (of one layout) as one launch's pointers: a tuple (several layers) or the tensor itself."""
    return tuple(tensors) if len(tensors) > 1 else tensors[0]


def _stack_layers(results: List[torch.Tensor]) -> torch.Tensor:
    """Per-layer results as (L, ...); one layer (training, layer by layer) as a view, with no copy kernel."""
    return results[0].unsqueeze(0) if len(results) == 1 else torch.stack(results)


def _in_launches(launch, *per_layer: list) -> torch.Tensor:
    """launch(*lists) -> (L, ...) over MAX_LAYERS_PER_LAUNCH layers at a time, concatenated."""
    parts = [launch(*(ts[s:s + MAX_LAYERS_PER_LAUNCH] for ts in per_layer))
             for s in range(0, len(per_layer[0]), MAX_LAYERS_PER_LAUNCH)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _bias_from_table_launch(tables: Sequence[torch.Tensor], indices: Sequence[torch.Tensor],
                            sigmoid_scale: Optional[float], center_rows: bool, out_dtype: torch.dtype,
                            wrap=None) -> torch.Tensor:
    """(L, H, rows, cols): one launch for L <= MAX_LAYERS_PER_LAUNCH layers' (T, H) tables and (rows, cols) indices."""
    tables, indices = _one_layout(tables), _one_layout(indices)
    table, index = tables[0], indices[0]
    num_heads = table.shape[1]
    rows, cols = index.shape
    out = torch.empty((len(tables), num_heads, rows, cols), device=table.device, dtype=out_dtype)
    if POISON_OUTPUT:
        out.fill_(float("nan"))
    heads_pad = max(2, _next_pow2(num_heads))
    # a (columns, heads) tile of ~2048 entries, 4 warps
    block_cols = max(16, min(_next_pow2(cols), 2048 // heads_pad))
    _launcher(_bias_from_table_fwd, wrap)[(rows, len(tables))](
        _stacked(tables), _stacked(indices), out, table.stride(0), table.stride(1), index.stride(0), index.stride(1),
        out.stride(0), out.stride(1), out.stride(2), table.shape[0],
        float(sigmoid_scale if sigmoid_scale is not None else 1.0), COLS=cols, HEADS=num_heads, HEADS_PAD=heads_pad,
        LAYERS=len(tables), SIGMOID=sigmoid_scale is not None, CENTER=center_rows, BLOCK_COLS=block_cols,
        num_warps=4, **_dependent_launch(out.device, wrap))
    return out


@_triton_op("bias_from_table")
def _bias_from_table_op(table: torch.Tensor, index: torch.Tensor, sigmoid_scale: Optional[float],
                        center_rows: bool, out_dtype: torch.dtype) -> torch.Tensor:
    return _bias_from_table_launch([table], [index], sigmoid_scale, center_rows, out_dtype,
                                   torch.library.wrap_triton)[0]


def _bias_from_table_one(table: torch.Tensor, index: torch.Tensor, sigmoid_scale: Optional[float],
                         center_rows: bool, out_dtype: torch.dtype) -> torch.Tensor:
    return _bias_from_table_launch([table], [index], sigmoid_scale, center_rows, out_dtype)[0]



def _bias_from_table_torch(table: torch.Tensor, index: torch.Tensor, sigmoid_scale: Optional[float],
                           center_rows: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """The readable definition of :func:`bias_from_table` (differentiable w.r.t. table)."""
    compute = torch.promote_types(table.dtype, torch.float32)
    # rows of the (T, H) table, then heads first: the gradient scatters whole rows. Gathering columns of its transpose
    # made autograd's scatter 4x slower (686 against 166 us per SwinV2-B/384 layer, H100).
    bias = table.to(compute)[index.reshape(-1)].view(*index.shape, table.shape[1]).permute(2, 0, 1).contiguous()
    if sigmoid_scale is not None:
        bias = sigmoid_scale * (torch.sigmoid(bias) - 0.5 if center_rows else torch.sigmoid(bias))
    elif center_rows:
        bias = bias - (bias.amax(-1, keepdim=True) + bias.amin(-1, keepdim=True)) / 2
    return bias.to(out_dtype)


class _BiasFromTableFunction(torch.autograd.Function):
    """The kernel's bias with a backward, for training: d table[t, h] = sum over index[i, j] == t of
    d B[h, i, j] * dB/dtable, with dB/dtable = B * (1 - B / sigmoid_scale) from the saved bias. The sum is PyTorch's
    index_add_ (its deterministic path under torch.use_deterministic_algorithms). SwinV2-B/384, H100: 0.48 ms per
    fine-tuning step for all 24 layers, where _bias_from_table_torch's gather and autograd's scatter took 352 us
    a layer."""

    @staticmethod
    def forward(ctx, table, index, sigmoid_scale, out_dtype):
        bias = _through_op(_bias_from_table_op, _bias_from_table_one)(table, index, sigmoid_scale, False,
                                                                      torch.float32)
        ctx.save_for_backward(index, bias)
        ctx.sigmoid_scale, ctx.table_shape, ctx.table_dtype = sigmoid_scale, table.shape, table.dtype
        return bias.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_bias):
        index, bias = ctx.saved_tensors
        grad = grad_bias.float()
        if ctx.sigmoid_scale is not None:
            grad = grad * bias * (1 - bias / ctx.sigmoid_scale)
        num_heads = ctx.table_shape[1]
        grad_table = torch.zeros(ctx.table_shape, device=grad.device, dtype=torch.float32)
        grad_table.index_add_(0, index.reshape(-1).long(), grad.permute(1, 2, 0).reshape(-1, num_heads))
        return grad_table.to(ctx.table_dtype), None, None, None


def _check_table_inputs(table: torch.Tensor, index: torch.Tensor, out_dtype: torch.dtype) -> None:
    if not isinstance(table, torch.Tensor) or table.dim() != 2:
        raise ValueError(f"bias_from_table: table must be 2-D (T, num_heads); got "
                         f"{tuple(table.shape) if isinstance(table, torch.Tensor) else type(table)}")
    if not table.is_floating_point():
        raise TypeError(f"bias_from_table: table must be floating; got {table.dtype}")
    if not isinstance(index, torch.Tensor) or index.dim() != 2:
        raise ValueError(f"bias_from_table: index must be 2-D (N, N) (or (N, M)); got "
                         f"{tuple(index.shape) if isinstance(index, torch.Tensor) else type(index)}")
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"bias_from_table: index must be an integer tensor; got {index.dtype}")
    if index.device != table.device:
        raise ValueError(f"bias_from_table: index is on {index.device} but table on {table.device}")
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        raise TypeError(f"bias_from_table: out_dtype must be a floating dtype; got {out_dtype!r}")


def bias_from_table(table: torch.Tensor, index: torch.Tensor, *, sigmoid_scale: Optional[float] = 16.0,
                    center_rows: bool = False, out_dtype: Optional[torch.dtype] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    """The dense relative-position bias B (H, N, N) of a window, derived from a table in one pass.

    ``B[h, i, j] = sigmoid_scale * sigmoid(table[index[i, j], h])`` (``table[index[i, j], h]`` when
    sigmoid_scale is None), computed in float32 (float64 for a float64 table, PyTorch path only).

    Args:
        table: (T, H) floating, any strides. SwinV2: ``cpb_mlp(relative_coords_table).view(-1, H)``,
            raw (before the sigmoid); Swin V1: ``relative_position_bias_table`` with sigmoid_scale=None.
        index: (N, N) integers in [0, T), any integer dtype (SwinV2's ``relative_position_index``); a
            rectangular (N, M) index gives (H, N, M). The kernel path does not check the range (that
            would sync the host): an entry outside the table gives NaN there (with center_rows, maybe
            in its whole row); the PyTorch path raises an indexing error.
        sigmoid_scale: SwinV2's 16, or None for no sigmoid.
        center_rows: subtract a constant from each row, which softmax ignores: sigmoid_scale / 2 (the middle of
            the sigmoid's range), or without the sigmoid the row's midpoint (max_j + min_j) / 2. The values then
            have half the magnitude, so half the rounding error in float16.
        out_dtype: the result's dtype; default the table's.
        backend: as in :func:`flash_bias_attention`; "auto" takes the kernel on CUDA, with a backward when the
            table needs a gradient (PyTorch with center_rows or under torch.compile; both paths are differentiable).

    Several layers (a stage) at once: index a list of L indices of one shape, table a list of L tables of one
    shape and dtype, or one (L, T, H) tensor. The result is (L, H, N, N), from one launch per
    MAX_LAYERS_PER_LAUNCH layers where the kernel runs without gradients, else layer by layer.

    Returns:
        (H, N, N) contiguous, in out_dtype, on the table's device.
    """
    if isinstance(index, (list, tuple)):
        return _bias_from_tables(table, index, sigmoid_scale, center_rows, out_dtype, backend)
    out_dtype = table.dtype if out_dtype is None and isinstance(table, torch.Tensor) else out_dtype
    _check_table_inputs(table, index, out_dtype)
    sigmoid_scale = float(sigmoid_scale) if sigmoid_scale is not None else None   # the op's schema: float
    no_backward = None
    if center_rows:
        no_backward = "has no backward pass with center_rows"
    elif _compiling():
        no_backward = "has no backward pass under torch.compile"
    if _pick_backend(backend, table.device, (table,), _table_unsupported(table), "bias_from_table",
                     no_backward) == "torch":
        return _bias_from_table_torch(table, index, sigmoid_scale, center_rows, out_dtype)
    if _needs_grad((table,)):
        return _BiasFromTableFunction.apply(table, index, sigmoid_scale, out_dtype)
    return _through_op(_bias_from_table_op, _bias_from_table_one)(table, index, sigmoid_scale, center_rows,
                                                                   out_dtype)


def _table_unsupported(table: torch.Tensor) -> Optional[Exception]:
    if table.dtype == torch.float64:
        return TypeError("bias_from_table: the Triton kernel computes in float32; a float64 table is for "
                         "backend='torch'")
    return None


class _NoLaunch:
    """``wrap`` for a stage op's fake: the launch wrapper allocates the outputs, with the shapes and strides the real
    op returns, and launches nothing."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _bias_from_tables_launches(tables: Sequence[torch.Tensor], indices: Sequence[torch.Tensor],
                               sigmoid_scale: Optional[float], center_rows: bool, out_dtype: torch.dtype,
                               wrap=None) -> torch.Tensor:
    """(L, H, rows, cols): _bias_from_table_launch over MAX_LAYERS_PER_LAUNCH layers at a time."""
    return _in_launches(lambda t, i: _bias_from_table_launch(t, i, sigmoid_scale, center_rows, out_dtype, wrap),
                        tables, indices)


# The stage ops are opaque custom_ops: their kernels take a tuple of pointers, which wrap_triton cannot trace. Under
# torch.compile the per-layer triton_ops took 48 launches per SwinV2-B forward where these take 8 (+0.45 ms of GPU
# time at SwinV2-B/384 batch 64, H100); an opaque op's ~0.15 ms of host time is paid twice a stage, not per layer.
@torch.library.custom_op(_op_name("bias_from_tables"), mutates_args=())
def _bias_from_tables_op(tables: List[torch.Tensor], indices: List[torch.Tensor], sigmoid_scale: Optional[float],
                         center_rows: bool, out_dtype: torch.dtype) -> torch.Tensor:
    return _bias_from_tables_launches(tables, indices, sigmoid_scale, center_rows, out_dtype)


_bias_from_tables_op.register_fake(functools.partial(_bias_from_tables_launches, wrap=_NoLaunch))


def _bias_from_tables(tables, indices, sigmoid_scale, center_rows, out_dtype, backend) -> torch.Tensor:
    """bias_from_table of L layers: (L, H, N, N)."""
    tables, indices = list(tables), list(indices)
    if not indices or len(tables) != len(indices):
        raise ValueError(f"bias_from_table: {len(tables)} tables for {len(indices)} indices; give one table per "
                         f"index (at least one)")

    def check(i, table, index):
        _check_table_inputs(table, index, table.dtype if out_dtype is None else out_dtype)
        if (table.shape, table.dtype, index.shape) != (tables[0].shape, tables[0].dtype, indices[0].shape):
            raise ValueError(f"bias_from_table: layer {i} has a {tuple(table.shape)} {table.dtype} table and a "
                             f"{tuple(index.shape)} index, layer 0 {tuple(tables[0].shape)} {tables[0].dtype} and "
                             f"{tuple(indices[0].shape)}: several layers at once need one shape")
    _check_layers(list(zip(tables, indices)), check)
    out_dtype = tables[0].dtype if out_dtype is None else out_dtype
    sigmoid_scale = float(sigmoid_scale) if sigmoid_scale is not None else None
    # under torch.compile one layer keeps the per-layer triton_op, which Inductor launches without the dispatcher
    one_launch = not (_needs_grad(tables) or (_compiling() and len(tables) == 1)) and _pick_backend(
        backend, tables[0].device, tables, _table_unsupported(tables[0]), "bias_from_table") == "triton"
    if not one_launch:
        return _stack_layers([bias_from_table(t, i, sigmoid_scale=sigmoid_scale, center_rows=center_rows,
                                              out_dtype=out_dtype, backend=backend) for t, i in zip(tables, indices)])
    return _through_op(_bias_from_tables_op, _bias_from_tables_launches)(tables, indices, sigmoid_scale, center_rows,
                                                                         out_dtype)


# ----------------------------------------------------------------------------------------------
# SwinV2's continuous position bias table: the cpb MLP in one launch
# ----------------------------------------------------------------------------------------------
CPB_BLOCK_K = 32   # hidden units per step of the table kernel; SwinV2's 512 is a multiple

if triton is not None:

    @triton.jit
    def _cpb_table_fwd(coords_ptrs, w0_ptrs, b0_ptrs, w2_ptrs, out_ptr, rows, num_heads,
                       stride_coords, stride_w0, stride_w2, stride_out_l, stride_out_h, sigmoid_scale,
                       LAYERS: tl.constexpr, HIDDEN: tl.constexpr, HEADS_PAD: tl.constexpr, HAS_B0: tl.constexpr,
                       SIGMOID: tl.constexpr, CENTER: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                       DEPENDENT: tl.constexpr):
        """BLOCK_T rows of one layer's relu(coords @ w0^T + b0) @ w2^T; the hidden layer never leaves registers.
        SIGMOID: then each entry's _scaled_sigmoid, which the gather would otherwise take once per bias element
        (95.6M at SwinV2-B/384's stage 3 for 636K entries). Stored heads first, (H, T) per layer: the bias kernel
        then gathers one head's entries from 4*T contiguous bytes."""
        _wait_for_previous_grid(DEPENDENT)
        layer = tl.program_id(1)
        coords_ptr = _layer_ptr(coords_ptrs, layer, LAYERS)
        w0_ptr = _layer_ptr(w0_ptrs, layer, LAYERS)
        w2_ptr = _layer_ptr(w2_ptrs, layer, LAYERS)
        offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_valid = offs_t < rows
        c0 = tl.load(coords_ptr + offs_t * stride_coords, mask=t_valid, other=0.0).to(tl.float32)
        c1 = tl.load(coords_ptr + offs_t * stride_coords + 1, mask=t_valid, other=0.0).to(tl.float32)
        offs_h = tl.arange(0, HEADS_PAD)
        h_valid = offs_h < num_heads
        acc = tl.zeros([BLOCK_T, HEADS_PAD], dtype=tl.float32)
        for k0 in range(0, HIDDEN, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            hidden = (c0[:, None] * tl.load(w0_ptr + offs_k * stride_w0).to(tl.float32)[None, :]
                      + c1[:, None] * tl.load(w0_ptr + offs_k * stride_w0 + 1).to(tl.float32)[None, :])
            if HAS_B0:
                hidden += tl.load(_layer_ptr(b0_ptrs, layer, LAYERS) + offs_k).to(tl.float32)[None, :]
            w2 = tl.load(w2_ptr + offs_h[None, :] * stride_w2 + offs_k[:, None], mask=h_valid[None, :], other=0.0)
            # tf32x3: float32 accuracy (the table feeds a sigmoid scaled by 16; plain tf32 costs ~1e-3 logits) from
            # tensor cores; the ieee dot's FMAs took 77 us per stage at SwinV2-B/384 (H100)
            acc = tl.dot(tl.maximum(hidden, 0.0), w2.to(tl.float32), acc, input_precision="tf32x3")
        if SIGMOID:
            acc = _scaled_sigmoid(acc, sigmoid_scale, CENTER)
        out_ptrs = out_ptr + layer.to(tl.int64) * stride_out_l + offs_h[None, :] * stride_out_h + offs_t[:, None]
        tl.store(out_ptrs, acc, mask=t_valid[:, None] & h_valid[None, :])


def _cpb_table_launch(coords: Sequence[torch.Tensor], w0: Sequence[torch.Tensor],
                      b0: Sequence[Optional[torch.Tensor]], w2: Sequence[torch.Tensor],
                      sigmoid_scale: Optional[float] = None, center_rows: bool = False, wrap=None) -> torch.Tensor:
    """(L, T, H) float32 (stored as (L, H, T)): one launch for L <= MAX_LAYERS_PER_LAUNCH layers of one shape."""
    coords, w0, w2 = ([t.contiguous() for t in ts] for ts in (coords, w0, w2))
    has_b0 = b0[0] is not None
    b0 = [t.contiguous() for t in b0] if has_b0 else w0
    rows, num_heads = coords[0].shape[0], w2[0].shape[0]
    out = torch.empty((len(coords), num_heads, rows), device=coords[0].device, dtype=torch.float32)
    if POISON_OUTPUT:
        out.fill_(float("nan"))
    block_t = 32
    _launcher(_cpb_table_fwd, wrap)[(_cdiv(rows, block_t), len(coords))](
        _stacked(coords), _stacked(w0), _stacked(b0), _stacked(w2), out, rows, num_heads,
        coords[0].stride(0), w0[0].stride(0), w2[0].stride(0), out.stride(0), out.stride(1),
        float(sigmoid_scale if sigmoid_scale is not None else 1.0), LAYERS=len(coords), HIDDEN=w0[0].shape[0],
        HEADS_PAD=max(16, _next_pow2(num_heads)), HAS_B0=has_b0, SIGMOID=sigmoid_scale is not None,
        CENTER=center_rows, BLOCK_T=block_t, BLOCK_K=CPB_BLOCK_K, **_dependent_launch(out.device, wrap))
    return out.transpose(1, 2)


@_triton_op("cpb_table")
def _cpb_table_op(coords: torch.Tensor, w0: torch.Tensor, b0: Optional[torch.Tensor], w2: torch.Tensor,
                  sigmoid_scale: Optional[float], center_rows: bool) -> torch.Tensor:
    return _cpb_table_launch([coords], [w0], [b0], [w2], sigmoid_scale, center_rows, torch.library.wrap_triton)[0]


def _cpb_table_one(coords: torch.Tensor, w0: torch.Tensor, b0: Optional[torch.Tensor], w2: torch.Tensor,
                   sigmoid_scale: Optional[float], center_rows: bool) -> torch.Tensor:
    return _cpb_table_launch([coords], [w0], [b0], [w2], sigmoid_scale, center_rows)[0]


def _cpb_table_torch(coords: torch.Tensor, w0: torch.Tensor, b0: Optional[torch.Tensor], w2: torch.Tensor,
                     sigmoid_scale: Optional[float] = None, center_rows: bool = False) -> torch.Tensor:
    """The readable definition of :func:`cpb_table`: SwinV2's ``cpb_mlp`` in float32 (differentiable)."""
    compute = torch.promote_types(coords.dtype, torch.float32)
    hidden = F.relu(F.linear(coords.to(compute), w0.to(compute), None if b0 is None else b0.to(compute)))
    table = F.linear(hidden, w2.to(compute))
    if sigmoid_scale is None:
        return table
    return sigmoid_scale * (torch.sigmoid(table) - 0.5 if center_rows else torch.sigmoid(table))


def cpb_table(coords: torch.Tensor, w0: torch.Tensor, b0: Optional[torch.Tensor], w2: torch.Tensor, *,
              sigmoid_scale: Optional[float] = None, center_rows: bool = False,
              backend: Optional[str] = None) -> torch.Tensor:
    """SwinV2's continuous-position-bias table ``relu(coords @ w0^T + b0) @ w2^T`` (T, H) in float32, computed
    from upcast weights (also for a .half() model, and with autocast off) in one kernel launch: the three
    launches of the MLP in PyTorch were ~120 of a SwinV2-B forward's ~600 kernels.

    Args:
        coords: (T, 2), the flattened ``relative_coords_table``; w0: (hidden, 2), b0: (hidden,) or None,
            w2: (H, hidden): ``cpb_mlp[0].weight``, ``cpb_mlp[0].bias``, ``cpb_mlp[2].weight``.
        sigmoid_scale, center_rows: then each entry as :func:`bias_from_table` would take it (``s * sigmoid``,
            minus s / 2 with center_rows), in the same float32 expression on the kernel path (the same bits); a
            gather of this table with ``sigmoid_scale=None`` then gives bias_from_table's bias of the raw table,
            with one sigmoid per table entry instead of one per bias element.
        backend: as in :func:`flash_bias_attention` ("auto": the kernel on CUDA without gradients).
    Several layers (a stage) at once: each argument a list of L tensors of one shape (b0 a list of Nones, or
    None), giving (L, T, H) from one launch per MAX_LAYERS_PER_LAUNCH layers where the kernel runs, else layer by
    layer.
    Returns:
        (T, H) float32 (float64 for float64 inputs, PyTorch path), heads-first strides on the kernel path; feed it
        to :func:`bias_from_table`.
    """
    sigmoid_scale = float(sigmoid_scale) if sigmoid_scale is not None else None   # the op's schema: float
    if isinstance(coords, (list, tuple)):
        return _cpb_tables(coords, w0, b0, w2, sigmoid_scale, center_rows, backend)
    _check_cpb_inputs(coords, w0, b0, w2)
    tensors = (coords, w0, b0, w2)
    if _pick_backend(backend, coords.device, tensors, _cpb_unsupported(coords, w0, w2), "cpb_table") == "torch":
        return _cpb_table_torch(coords, w0, b0, w2, sigmoid_scale, center_rows)
    return _through_op(_cpb_table_op, _cpb_table_one)(coords, w0, b0, w2, sigmoid_scale, center_rows)


def _check_cpb_inputs(coords, w0, b0, w2, layer=""):
    if coords.dim() != 2 or coords.shape[1] != 2 or w0.dim() != 2 or w0.shape[1] != 2 or w2.dim() != 2 \
            or w2.shape[1] != w0.shape[0] or (b0 is not None and tuple(b0.shape) != (w0.shape[0],)):
        raise ValueError(f"cpb_table: expected coords (T, 2), w0 (hidden, 2), b0 (hidden,), w2 (H, hidden); got "
                         f"{tuple(coords.shape)}, {tuple(w0.shape)}, {None if b0 is None else tuple(b0.shape)}, "
                         f"{tuple(w2.shape)}{layer}")


def _cpb_unsupported(coords, w0, w2) -> Optional[Exception]:
    if torch.float64 in (coords.dtype, w0.dtype, w2.dtype) or w0.shape[0] % CPB_BLOCK_K:
        return ValueError(f"cpb_table: the kernel takes float16/bfloat16/float32 weights with a hidden "
                          f"width that is a multiple of {CPB_BLOCK_K}; got {w0.dtype}, {w0.shape[0]}")
    return None


def _cpb_tables_launches(coords: Sequence[torch.Tensor], w0: Sequence[torch.Tensor],
                         b0: Sequence[Optional[torch.Tensor]], w2: Sequence[torch.Tensor],
                         sigmoid_scale: Optional[float], center_rows: bool, wrap=None) -> torch.Tensor:
    """(L, T, H) float32 (stored as (L, H, T)): _cpb_table_launch over MAX_LAYERS_PER_LAUNCH layers at a time."""
    return _in_launches(functools.partial(_cpb_table_launch, sigmoid_scale=sigmoid_scale, center_rows=center_rows,
                                          wrap=wrap), coords, w0, b0, w2)


@torch.library.custom_op(_op_name("cpb_tables"), mutates_args=())   # opaque: see _bias_from_tables_op
def _cpb_tables_op(coords: List[torch.Tensor], w0: List[torch.Tensor], b0: List[Optional[torch.Tensor]],
                   w2: List[torch.Tensor], sigmoid_scale: Optional[float], center_rows: bool) -> torch.Tensor:
    return _cpb_tables_launches(coords, w0, b0, w2, sigmoid_scale, center_rows)


_cpb_tables_op.register_fake(functools.partial(_cpb_tables_launches, wrap=_NoLaunch))


def _cpb_tables(coords, w0, b0, w2, sigmoid_scale, center_rows, backend) -> torch.Tensor:
    """cpb_table of L layers: (L, T, H)."""
    coords, w0, w2 = list(coords), list(w0), list(w2)
    b0 = [None] * len(coords) if b0 is None else list(b0)
    if not coords or not len(coords) == len(w0) == len(b0) == len(w2):
        raise ValueError(f"cpb_table: {len(coords)} coords, {len(w0)} w0, {len(b0)} b0 and {len(w2)} w2: give one "
                         f"of each per layer (at least one layer)")
    first = [(t.shape, t.dtype) if t is not None else None for t in (coords[0], w0[0], b0[0], w2[0])]

    def check(i, *layer):
        _check_cpb_inputs(*layer, layer=f" (layer {i})")
        if [(t.shape, t.dtype) if t is not None else None for t in layer] != first:
            raise ValueError(f"cpb_table: layer {i}'s weights differ in shape or dtype from layer 0's: several layers "
                             f"at once need one shape")
    _check_layers(list(zip(coords, w0, b0, w2)), check)
    tensors = [t for layer in zip(coords, w0, b0, w2) for t in layer]
    # under torch.compile one layer keeps the per-layer triton_op (see _bias_from_tables)
    one_launch = not (_compiling() and len(coords) == 1) and _pick_backend(
        backend, coords[0].device, tensors, _cpb_unsupported(coords[0], w0[0], w2[0]), "cpb_table") == "triton"
    if not one_launch:
        return _stack_layers([cpb_table(*layer, sigmoid_scale=sigmoid_scale, center_rows=center_rows, backend=backend)
                              for layer in zip(coords, w0, b0, w2)])
    return _through_op(_cpb_tables_op, _cpb_tables_launches)(coords, w0, b0, w2, sigmoid_scale, center_rows)


# ----------------------------------------------------------------------------------------------
# The shift mask's regions
# ----------------------------------------------------------------------------------------------
def _shift_regions(length: int, window: int, shift: int) -> torch.Tensor:
    """Region (0, 1, 2) of each position along one axis: the official slices (0, -window),
    (-window, -shift), (-shift, None)."""
    pos = torch.arange(length)
    return (pos >= length - window).to(torch.int32) + (pos >= length - shift).to(torch.int32)


def shifted_window_region_ids(image_size, window_size, shift_size: int) -> torch.Tensor:
    """The ``region_ids`` (nW, N) int32 of SwinV2's shifted-window attention, on the CPU.

    Region ``3 * row_region + col_region`` of every token of the (cyclically shifted) image, the
    official ``img_mask`` (9 regions from the slices (0, -window), (-window, -shift), (-shift, None) on
    each axis), partitioned like the official ``window_partition``: windows row-major, tokens
    row-major within a window. ``region_mask`` of the result is the official attn_mask.

    Args:
        image_size: H or (H, W); window_size: w or (wh, ww), tiling the image;
        shift_size: in [0, min(wh, ww)). 0 gives all zeros (one region: no mask, as the official code).
    """
    img_h, img_w = (int(image_size),) * 2 if isinstance(image_size, int) else (int(s) for s in image_size)
    win_h, win_w = (int(window_size),) * 2 if isinstance(window_size, int) else (int(s) for s in window_size)
    if win_h < 1 or win_w < 1 or img_h % win_h or img_w % win_w:
        raise ValueError(f"window_size {win_h}x{win_w} does not tile image_size {img_h}x{img_w}")
    if not 0 <= int(shift_size) < min(win_h, win_w):
        raise ValueError(f"shift_size must be in [0, {min(win_h, win_w)}); got {shift_size}")
    if shift_size == 0:
        return torch.zeros(((img_h // win_h) * (img_w // win_w), win_h * win_w), dtype=torch.int32)
    regions = (3 * _shift_regions(img_h, win_h, shift_size)[:, None]
               + _shift_regions(img_w, win_w, shift_size)[None, :])
    windows = regions.view(img_h // win_h, win_h, img_w // win_w, win_w).permute(0, 2, 1, 3)
    return windows.reshape(-1, win_h * win_w).contiguous()
