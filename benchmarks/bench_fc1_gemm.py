#!/usr/bin/env python3
"""fc1 + GELU at SwinV2-B's MLP shapes: cuBLAS (the official fc1 then nn.GELU; fc1 alone; cuBLASLt's GELU epilogue,
what the drop-in runs) against a Triton GEMM with the GELU in its epilogue, to decide issue 11's "GELU into fc1".

    python benchmarks/bench_fc1_gemm.py [--seconds 150] [--out FILE.md]

The Triton kernel: TMA tensor descriptors for x (M, K), W (N, K) (nn.Linear's layout) and the output, a
(BLOCK_M, BLOCK_N) float32 tile accumulated over K, then bias, the GELU and one store. Persistent (one program per
SM, tiles in grouped order, the tile loop flattened into the K loop so the next tile's loads overlap this tile's
epilogue) or one program per tile; the epilogue optionally in two column halves. GELU modes: erf (nn.GELU's), the
tanh form through the hardware tanh (``tanh.approx.f32``), or none (the GEMM alone). fc1's output is rounded to
fp16 before the GELU, as the official fc1 + nn.GELU under autocast rounds.

fp16, inputs x ~ N(0, 0.25), W ~ N(0, 1/K), b ~ N(0, 0.01); ms: median of 40 calls after 5, CUDA events around each
call; error: relative L2 against float64 fc1 + erf GELU on the first 4096 rows. Configs run until ``--seconds``.
Needs CUDA (Hopper, for the TMA descriptors).
"""
import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from swin_config import UserError, run_main  # noqa: E402
from bench_gelu_epilogue import median_ms  # noqa: E402  (this script's folder is on sys.path)

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # the CPU-only check of the arguments needs none of it
    triton = None

# (name, M tokens of the batch, K = C, N = 4C): SwinV2-B/384 batch 64, stages 2-4, and SwinV2-B/256 stage 3
SHAPES = [("B/384 stage 2", 147456, 256, 1024), ("B/384 stage 3", 36864, 512, 2048),
          ("B/384 stage 4", 9216, 1024, 4096), ("B/256 stage 3", 16384, 512, 2048)]
GELU_MODES = {0: "erf", 1: "tanh.approx", 2: "none"}
# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, programs per SM (0: one per tile), split epilogue, flattened loop)
CONFIGS = ([(128, bn, bk, s, 8, 1, bn == 256, True) for bn, bk in [(256, 64), (128, 64), (256, 32)] for s in (3, 4)]
           + [(128, 256, 64, 3, 8, 1, False, True), (128, 256, 64, 3, 8, 1, True, False),
              (128, 256, 64, 3, 8, 2, True, True), (128, 128, 64, 4, 4, 2, False, True),
              (128, 256, 64, 3, 8, 0, False, False), (128, 128, 64, 4, 4, 0, False, False),
              (64, 256, 64, 4, 4, 1, True, True)])

if triton is not None:

    @triton.jit
    def _tanh_approx(x):
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)

    @triton.jit
    def _gelu(h, MODE: tl.constexpr):
        if MODE == 0:
            return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
        elif MODE == 1:
            return 0.5 * h * (1.0 + _tanh_approx(0.7978845608028654 * (h + 0.044715 * h * h * h)))
        else:
            return h

    @triton.jit
    def _tile_of(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
        """(row block, column block) of a tile number, GROUP_M row blocks at a time (W's columns stay in L2)."""
        per_group = GROUP_M * num_pid_n
        first_m = (tile // per_group) * GROUP_M
        size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
        return first_m + (tile % per_group) % size_m, (tile % per_group) // size_m

    @triton.jit
    def _epilogue(acc, bias_ptr, c_desc, off_m, off_n, BLOCK_N: tl.constexpr, MODE: tl.constexpr):
        h = acc + tl.load(bias_ptr + off_n + tl.arange(0, BLOCK_N)).to(tl.float32)[None, :]
        h = h.to(c_desc.dtype).to(tl.float32)   # fc1's output rounded, as under autocast
        c_desc.store([off_m, off_n], _gelu(h, MODE).to(c_desc.dtype))

    @triton.jit
    def _fc1_persistent(a_desc, w_desc, c_desc, bias_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, NUM_PROGS: tl.constexpr, MODE: tl.constexpr, SPLIT: tl.constexpr,
                        FLATTEN: tl.constexpr):
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        tile_done = tl.program_id(0) - NUM_PROGS   # the epilogue's own count: a flattened loop reorders the body
        for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGS, flatten=FLATTEN):
            pid_m, pid_n = _tile_of(tile, num_pid_m, num_pid_n, 8)
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for kk in range(k_tiles):
                a = a_desc.load([pid_m * BLOCK_M, kk * BLOCK_K])
                w = w_desc.load([pid_n * BLOCK_N, kk * BLOCK_K])
                acc = tl.dot(a, w.T, acc)
            tile_done += NUM_PROGS
            pid_m, pid_n = _tile_of(tile_done, num_pid_m, num_pid_n, 8)
            if SPLIT:
                left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
                _epilogue(left, bias_ptr, c_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, BLOCK_N // 2, MODE)
                _epilogue(right, bias_ptr, c_desc, pid_m * BLOCK_M, pid_n * BLOCK_N + BLOCK_N // 2, BLOCK_N // 2,
                          MODE)
            else:
                _epilogue(acc, bias_ptr, c_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, BLOCK_N, MODE)

    @triton.jit
    def _fc1_tiles(a_desc, w_desc, c_desc, bias_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, MODE: tl.constexpr):
        pid_m, pid_n = _tile_of(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), 8)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kk in range(tl.cdiv(K, BLOCK_K)):
            a = a_desc.load([pid_m * BLOCK_M, kk * BLOCK_K])
            w = w_desc.load([pid_n * BLOCK_N, kk * BLOCK_K])
            acc = tl.dot(a, w.T, acc)
        _epilogue(acc, bias_ptr, c_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, BLOCK_N, MODE)


def triton_fc1(x, weight, bias, config, mode):
    """GELU(x @ weight.T + bias) (mode: GELU_MODES) by the Triton kernel of ``config`` (CONFIGS); x (M, K),
    weight (N, K), bias (N,), fp16 on CUDA; N a multiple of BLOCK_N."""
    block_m, block_n, block_k, stages, warps, per_sm, split, flatten = config
    (M, K), N = x.shape, weight.shape[0]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    a_desc = TensorDescriptor.from_tensor(x, [block_m, block_k])
    w_desc = TensorDescriptor.from_tensor(weight, [block_n, block_k])
    c_desc = TensorDescriptor.from_tensor(out, [block_m, block_n // 2 if split else block_n])
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    if per_sm:
        programs = min(torch.cuda.get_device_properties(x.device).multi_processor_count * per_sm, tiles)
        _fc1_persistent[(programs,)](a_desc, w_desc, c_desc, bias, M, N, K, block_m, block_n, block_k, programs,
                                     mode, split, flatten, num_stages=stages, num_warps=warps)
    else:
        _fc1_tiles[(tiles,)](a_desc, w_desc, c_desc, bias, M, N, K, block_m, block_n, block_k, mode,
                             num_stages=stages, num_warps=warps)
    return out


def measure(seconds):
    """Rows (shape, path, ms, TFLOP/s, error) until ``seconds`` have passed."""
    rows, deadline = [], time.time() + seconds
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, M, K, N in SHAPES:
        x = (torch.randn(M, K, device="cuda", generator=gen) * 0.5).half()
        weight = (torch.randn(N, K, device="cuda", generator=gen) / math.sqrt(K)).half()
        bias = (torch.randn(N, device="cuda", generator=gen) * 0.1).half()
        reference = torch.nn.functional.gelu(x[:4096].double() @ weight.double().t() + bias.double())

        def row(path, fn, gelu=True):
            out = fn()
            err = (out[:4096].double() - reference).norm() / reference.norm() if gelu else float("nan")
            ms = median_ms(fn, iters=40)
            rows.append((name, path, ms, 2 * M * N * K / ms / 1e9, float(err)))
            print("| " + " | ".join(format_row(rows[-1])) + " |", flush=True)
        linear = torch.nn.functional.linear
        row("cuBLAS fc1, then nn.GELU (the official)", lambda: torch.nn.functional.gelu(linear(x, weight, bias)))
        row("cuBLAS fc1 alone", lambda: linear(x, weight, bias), gelu=False)
        row("cuBLASLt GELU epilogue (the drop-in)", lambda: torch._addmm_activation(bias, x, weight.t(),
                                                                                      use_gelu=True))
        for config in CONFIGS:
            if time.time() > deadline:
                print(f"stopped at --seconds {seconds}", flush=True)
                return rows
            for mode, gelu in GELU_MODES.items():
                row(f"Triton {config}, GELU {gelu}", lambda: triton_fc1(x, weight, bias, config, mode),
                    gelu=mode != 2)
    return rows


def format_row(row):
    name, path, ms, tflops, err = row
    return [name, path, f"{ms:.4f}", f"{tflops:.0f}", "—" if math.isnan(err) else f"{err:.2e}"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=150.0, help="stop starting new configs after this long")
    p.add_argument("--out", help="markdown table")
    args = p.parse_args(argv)
    if args.seconds <= 0:
        raise UserError(f"--seconds must be > 0; got {args.seconds}")
    if not torch.cuda.is_available() or triton is None:
        raise UserError("this benchmark needs CUDA and Triton (a Hopper GPU, for the TMA descriptors)")
    head = ["| shape | path | ms | TFLOP/s | rel. L2 vs float64 erf GELU |", "|---|---|---:|---:|---:|"]
    print("\n".join(head))
    rows = measure(args.seconds)
    if args.out:
        title = f"# fc1 + GELU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"
        with open(args.out, "w") as f:
            f.write("\n".join([title, ""] + head + ["| " + " | ".join(format_row(r)) + " |" for r in rows]) + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)
