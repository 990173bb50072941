#!/usr/bin/env python3
"""Where a SwinV2 forward's GPU time goes, part by part and stage by stage, against the compute floor; and each
matmul of the forward against cuBLAS alone at the same shape.

    python benchmarks/bench_profile.py [--embedded b384] [--batch 64] [--dtype fp16] [--out FILE.md]

The drop-in with trained-like weights runs eagerly (CUDA graphs off: a graph replays the same kernels, and eagerly
torch.profiler can tell which stage and which matmul launched each) under autocast, three forwards after three
warm-ups. Each stage's and each matmul's kernels are those inside its ``record_function`` range on the GPU timeline.

* Parts: kernel time per forward by part of the model (``bench_model.KERNEL_PARTS``) and stage ("embed": the patch
  embedding; "head": the final norm, pooling and classifier), with each part's share of the compute floor: the
  forward's matmul FLOPs, attention's included, at ``FLOOR_TFLOPS``.
* Matmuls: per shape (M, K, N) and epilogue (bias, GELU + bias, none), the calls per forward, their kernel time
  and TFLOP/s in the model, and the same call alone from cuBLAS (random inputs of that shape, median of
  ``ROUNDS`` rounds of ``REPS`` calls between CUDA events: wall time per call, launch gaps and cuBLAS's memsets
  included, so "model / alone" below 1 is partly that difference).

Needs CUDA.
"""
import argparse
import collections
import math
import os
import re
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "scripts"), HERE]
from swin_config import (UserError, build_model, call_ms, config_names, load_config, run_main,  # noqa: E402
                         smooth_images, trained_like_)
from bench_model import KERNEL_PARTS  # noqa: E402

FLOOR_TFLOPS = 700.0   # dense float16 matmuls at cuBLAS's best on an H100 (fc2 of SwinV2-B/384 stage 3: ~670)
ROUNDS, REPS = 7, 20
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
GEMM_TAG = "matmul"


class _TagMatmuls(TorchFunctionMode):
    """Each F.linear / torch._addmm_activation of the forward inside a record_function range named after its shape
    and epilogue: "matmul M K N epilogue"."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            named = dict(zip(("input", "weight", "bias"), args), **kwargs)
            x, weight, bias = named["input"], named["weight"], named.get("bias")
            shape = (x.numel() // x.shape[-1], weight.shape[1], weight.shape[0])
            epilogue = "bias" if bias is not None else "none"
        elif func is torch._addmm_activation:
            mat1, mat2 = args[1], args[2]
            shape = (mat1.shape[0], mat1.shape[1], mat2.shape[1])
            epilogue = "gelu+bias" if kwargs.get("use_gelu") else "relu+bias"   # use_gelu is keyword-only
        else:
            return func(*args, **kwargs)
        with torch.profiler.record_function(f"{GEMM_TAG} {shape[0]} {shape[1]} {shape[2]} {epilogue}"):
            return func(*args, **kwargs)


def _tag_stages(model):
    """Wrap the patch embedding and each stage (the callables the drop-in's forward_features calls) in
    record_function ranges "stage embed", "stage 1", ...; the rest of the forward is "head"."""
    def ranged(name, fn):
        def call(*args, **kwargs):
            with torch.profiler.record_function(f"stage {name}"):
                return fn(*args, **kwargs)
        return call
    model.patch_embed.forward_fused = ranged("embed", model.patch_embed.forward_fused)
    for i, layer in enumerate(model.layers):
        layer.forward_fused = ranged(str(i + 1), layer.forward_fused)


def _gpu_ranges(events, prefix):
    """[(name, start, end)] of the record_function ranges named prefix... as the GPU timeline shows them."""
    return [(e.name, e.time_range.start, e.time_range.end) for e in events
            if e.device_type == torch.autograd.DeviceType.CUDA and e.name.startswith(prefix)]


def _kernels(events):
    return [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
            and not e.name.startswith(("stage ", GEMM_TAG, "ProfilerStep"))]


def _within(ranges, start):
    """The name of the range holding a kernel that starts at start, or None."""
    return next((name for name, lo, hi in ranges if lo <= start < hi), None)


def _part(name):
    return next((p for p, pattern in KERNEL_PARTS if re.search(pattern, name, re.IGNORECASE)), "other")


def profile_forward(model, x, dtype, forwards=3):
    """(kernel us per forward by (stage, part), kernel us and calls per forward by matmul range name)."""
    from torch.profiler import ProfilerActivity, profile

    def forward():
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
            return model(x)
    for _ in range(3):
        forward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof, _TagMatmuls():
        for _ in range(forwards):
            forward()
        torch.cuda.synchronize()
    events = prof.events()
    stages, matmuls = _gpu_ranges(events, "stage "), _gpu_ranges(events, GEMM_TAG)
    if not stages or not matmuls:
        raise UserError("torch.profiler gave no record_function ranges on the GPU timeline: this torch's profiler "
                        "cannot attribute kernels to stages")
    parts, gemms = collections.defaultdict(float), collections.defaultdict(lambda: [0.0, 0])
    for k in _kernels(events):
        us = (k.time_range.end - k.time_range.start) / forwards
        stage = _within(stages, k.time_range.start) or "head"
        parts[(stage[len("stage "):] if stage != "head" else stage, _part(k.name))] += us
        gemm = _within(matmuls, k.time_range.start)
        if gemm is not None and not k.name.startswith("Memset"):
            gemms[gemm][0] += us
    for name, _, _ in matmuls:
        gemms[name][1] += 1 / forwards
    return parts, gemms


def cublas_alone(M, K, N, epilogue, dtype):
    """Median us of one call of the matmul alone (random inputs of the shape), as the drop-in calls it: CUDA events
    around REPS back-to-back calls, so each call's launch gap and cuBLAS's memset count too, where the model's column
    is kernel time only."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=dtype, generator=g)
    w = torch.randn(N, K, device="cuda", dtype=dtype, generator=g) / math.sqrt(K)
    b = torch.randn(N, device="cuda", dtype=dtype, generator=g) * 0.1
    if epilogue.endswith("+bias"):
        def call():
            return torch._addmm_activation(b, x, w.t(), use_gelu=epilogue.startswith("gelu"))
    else:
        def call():
            return F.linear(x, w, b if epilogue == "bias" else None)
    for _ in range(3):
        call()
    return statistics.median(call_ms(call, x.device, ROUNDS, calls=REPS, sync_each=True)) * 1000


def attention_flops(cfg, batch):
    """Matmul FLOPs of one forward's attention (QK^T and PV of every window and head) under the config."""
    m = cfg.MODEL.SWINV2
    side = cfg.DATA.IMG_SIZE // m.PATCH_SIZE
    total = 0
    for i, depth in enumerate(m.DEPTHS):
        res = side // 2 ** i
        win = min(cfg.MODEL.SWINV2.WINDOW_SIZE, res)
        tokens = batch * res * res
        total += depth * 4 * tokens * win * win * m.EMBED_DIM * 2 ** i
    return total


def report(parts, gemms, alone, floor_ms, label):
    lines = [f"# Where a forward's GPU time goes: {label}", ""]
    stages = sorted({s for s, _ in parts}, key=lambda s: (s == "head", s != "embed", s))
    names = sorted({p for _, p in parts}, key=lambda p: -sum(v for (_, q), v in parts.items() if q == p))
    total = sum(parts.values())
    lines += [f"Kernel time per forward {total / 1000:.2f} ms; compute floor {floor_ms:.2f} ms "
              f"(matmul FLOPs at {FLOOR_TFLOPS:.0f} TFLOP/s).", "",
              "| part | " + " | ".join(f"stage {s}" for s in stages) + " | all, ms | share | x floor |",
              "|---|" + "---:|" * (len(stages) + 3)]
    for p in names:
        row = [parts.get((s, p), 0.0) / 1000 for s in stages]
        lines.append(f"| {p} | " + " | ".join(f"{v:.3f}" if v else "" for v in row)
                     + f" | {sum(row):.3f} | {100 * sum(row) * 1000 / total:.0f}% | {sum(row) / floor_ms:.2f} |")
    lines += ["", "| matmul (M, K, N) | epilogue | calls | in the model, us a call | TFLOP/s | cuBLAS alone, us | "
              "TFLOP/s | model / alone |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, (us, calls) in sorted(gemms.items(), key=lambda kv: -kv[1][0]):
        _, M, K, N, epilogue = name.split()
        flop = 2 * int(M) * int(K) * int(N)
        per_call = us / max(calls, 1e-9)
        a = alone[name]
        lines.append(f"| ({M}, {K}, {N}) | {epilogue} | {calls:.0f} | {per_call:.1f} | {flop / per_call / 1e6:.0f} | "
                     f"{a:.1f} | {flop / a / 1e6:.0f} | {per_call / a:.2f} |")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--embedded", default="b384", help=f"a registered config: {', '.join(config_names('swinv2'))}")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", default="fp16", help="fp16 or bf16 autocast")
    p.add_argument("--out", help="write the tables to this markdown file too")
    args = p.parse_args(argv)
    if args.dtype not in DTYPES:
        raise UserError(f"--dtype {args.dtype!r}: fp16 or bf16")
    if args.batch < 1:
        raise UserError("--batch must be >= 1")
    cfg = load_config(embedded=args.embedded)
    if cfg.MODEL.TYPE != "swinv2":
        raise UserError(f"--embedded {args.embedded}: a SwinV2 config (this profile follows the SwinV2 drop-in)")
    return args, cfg


def main(argv=None):
    args, cfg = parse_args(argv)
    if not torch.cuda.is_available():
        raise UserError("this benchmark needs CUDA")
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    model = trained_like_(build_model(cfg), 0).eval().cuda().requires_grad_(False)
    model.set_flash_bias(cuda_graphs=False)
    _tag_stages(model)
    x = smooth_images(args.batch, cfg.DATA.IMG_SIZE, seed=1).cuda()
    parts, gemms = profile_forward(model, x, dtype)
    alone = {name: cublas_alone(*(int(v) for v in name.split()[1:4]), name.split()[4], dtype) for name in gemms}
    gemm_flops = sum(2 * math.prod(int(v) for v in name.split()[1:4]) * calls for name, (_, calls) in gemms.items())
    floor_ms = (gemm_flops + attention_flops(cfg, args.batch)) / FLOOR_TFLOPS / 1e9
    label = (f"{args.embedded}, batch {args.batch}, {args.dtype} autocast, {torch.cuda.get_device_name()}, "
             f"torch {torch.__version__}")
    lines = report(parts, gemms, alone, floor_ms, label)
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)
