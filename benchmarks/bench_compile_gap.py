#!/usr/bin/env python3
"""torch.compile of the drop-in against its own eager forward (CUDA graphs off in both), alternating in one process.
With the graphs on (the default) a compiled model's inference replays them beside the compiler and nothing is traced
(flash_bias_runtime.FlashBiasSettings.replay; bench_batch_sweep.py --compile measures that); this script measures
the traced inference forward that ``cuda_graphs=False`` gets.

    python benchmarks/bench_compile_gap.py [--model b384] [--batch 64] [--modes default,freezing,reduce-overhead]
                                           [--rounds 3] [--iters 10] [--kernels 20] [--out FILE.md]

fp16 autocast as the official main.py evaluates, eval mode under torch.no_grad(), trained-like weights, seeded
smooth images. Each mode is compiled once (its compile time and its logits' relative L2 error against eager are
reported); then each round times every variant for ``--iters`` forwards (median of CUDA-event timings), and the
table gives each variant's median over the rounds, and the rounds. Modes: "default" (``torch.compile(model)``),
"reduce-overhead" (Inductor's CUDA graphs) and "freezing" (``options={"freezing": True}``: Inductor folds the
weights, and their casts, into constants, so a later change of the weights is not seen; measured, not
recommended). ``--kernels N``: torch.profiler of two forwards, eager against "default", and the N kernels whose
time per forward differs most. Needs CUDA.
"""
import argparse
import collections
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from swin_config import (UserError, build_model, call_ms, load_config, rel_l2, run_main,  # noqa: E402
                         smooth_images, trained_like_)
from bench_gelu_epilogue import print_table  # noqa: E402  (this script's folder is on sys.path)

MODES = {"default": {}, "reduce-overhead": {"mode": "reduce-overhead"}, "freezing": {"options": {"freezing": True}}}


def parse_modes(text):
    modes = [m for m in text.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise UserError(f"--modes: {text!r} is not a comma list of {', '.join(MODES)}")
    return modes


def forward(model, x):
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        return model(x)


def timed_ms(model, x, iters):
    return statistics.median(call_ms(lambda: forward(model, x), x.device, iters, sync_each=True))


def kernel_ms(model, x, forwards=2):
    """{kernel name: (ms per forward, launches per forward)} from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    forward(model, x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(forwards):
            forward(model, x)
        torch.cuda.synchronize()
    totals = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            totals[e.name[:100]][0] += e.device_time / 1e3 / forwards
            totals[e.name[:100]][1] += 1
    return {name: (ms, n // forwards) for name, (ms, n) in totals.items()}


def kernel_lines(eager, compiled, top):
    lines = ["", f"GPU time per forward (torch.profiler): eager {sum(v[0] for v in eager.values()):.3f} ms in "
                 f"{sum(v[1] for v in eager.values())} kernels, default {sum(v[0] for v in compiled.values()):.3f} ms "
                 f"in {sum(v[1] for v in compiled.values())} kernels; the {top} that differ most:", "",
             "| eager ms | launches | compiled ms | launches | kernel |", "|---:|---:|---:|---:|---|"]
    differ = sorted(set(eager) | set(compiled),
                    key=lambda n: -abs(compiled.get(n, (0, 0))[0] - eager.get(n, (0, 0))[0]))
    for name in differ[:top]:
        (a, na), (b, nb) = eager.get(name, (0.0, 0)), compiled.get(name, (0.0, 0))
        lines.append(f"| {a:.3f} | {na} | {b:.3f} | {nb} | `{name}` |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="b384", help="a registered config (scripts/swin_config.py)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--modes", default="default,freezing,reduce-overhead")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--kernels", type=int, default=0, help="also profile eager against default: the N kernels apart")
    p.add_argument("--out", help="markdown table to write")
    args = p.parse_args(argv)
    modes = parse_modes(args.modes)
    if not torch.cuda.is_available():
        raise UserError("this benchmark needs CUDA")
    cfg = load_config(embedded=args.model)
    torch.manual_seed(0)
    model = trained_like_(build_model(cfg), 0).eval().cuda().requires_grad_(False)
    model.set_flash_bias(cuda_graphs=False)
    x = smooth_images(args.batch, cfg.DATA.IMG_SIZE, seed=1).cuda()
    reference = forward(model, x).float()
    variants, notes = {"eager": model}, []
    for mode in modes:
        start = time.perf_counter()
        compiled = torch.compile(model, **MODES[mode])
        error = rel_l2(forward(compiled, x).float(), reference)
        for _ in range(2):
            forward(compiled, x)
        notes.append(f"{mode}: compiled in {time.perf_counter() - start:.0f} s, logits {error:.1e} from eager")
        variants[mode] = compiled
    rounds = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, variant in variants.items():
            rounds[name].append(timed_ms(variant, x, args.iters))
    eager_ms = statistics.median(rounds["eager"])
    lines = [f"torch.compile against eager, {args.model} batch {args.batch}, fp16 autocast, CUDA graphs off, "
             f"{torch.cuda.get_device_name()}, torch {torch.__version__}", "", "; ".join(notes), "",
             "| variant | ms (median of rounds) | against eager | rounds |", "|---|---:|---:|---|"]
    for name, times in rounds.items():
        ms = statistics.median(times)
        lines.append(f"| {name} | {ms:.2f} | {ms / eager_ms:.3f} | {', '.join(f'{t:.2f}' for t in times)} |")
    if args.kernels and "default" in variants:
        lines += kernel_lines(kernel_ms(model, x), kernel_ms(variants["default"], x), args.kernels)
    print_table(lines, args.out)
    return 0


if __name__ == "__main__":
    run_main(main)
