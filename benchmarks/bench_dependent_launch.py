#!/usr/bin/env python3
"""Dependent launches (``flash_bias_triton.DEPENDENT_LAUNCH``) on and off, the whole drop-in model in one process.

    python benchmarks/bench_dependent_launch.py [--model b384] [--batch 64] [--dtype fp16] [--rounds 7]
                                                [--iters 8] [--out FILE.md]

Two copies of the model with the same trained-like weights (scripts/swin_config.trained_like_), each warmed up, so
each captures its CUDA graph, under one setting; then rounds alternating between them, ``--iters`` forwards a round
between CUDA events (medians over the rounds). Reported: ms per forward with each, their ratio, whether the logits
are equal bit for bit (the kernels compute the same either way), and, from torch.profiler over 3 replayed forwards,
the GPU's busy and idle time; then where a forward's time goes: the input copy into the graph, the replay alone, the
output clone, the whole call. Needs CUDA.
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from swin_config import (UserError, build_model, call_ms, config_names, load_config, rel_l2,  # noqa: E402
                         run_main, smooth_images, trained_like_)
import flash_bias_triton as fb  # noqa: E402  (swin_config puts the repository root on sys.path)
from bench_gelu_epilogue import print_table  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
SETTINGS = {"off": False, "on": True}


def ms_per_call(fn, rounds=5, iters=10):
    """Median over rounds of the mean ms of ``iters`` back-to-back calls between CUDA events."""
    return statistics.median(call_ms(fn, torch.device("cuda"), rounds, calls=iters, sync_each=True))


def timeline(fn, calls=3):
    """(busy ms, span ms, GPU events) per call of fn over ``calls`` calls, from torch.profiler's GPU events."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    busy = sum(e.time_range.end - e.time_range.start for e in events)
    span = events[-1].time_range.end - events[0].time_range.start
    return busy / calls / 1e3, span / calls / 1e3, len(events) / calls


def build_pair(key, batch, dtype):
    """({setting: model}, {setting: logits}, images): one model per setting, its graph captured under it."""
    cfg = load_config(embedded=key)
    x = smooth_images(batch, cfg.DATA.IMG_SIZE, seed=1).cuda()
    models, logits = {}, {}
    for name, on in SETTINGS.items():
        torch.manual_seed(0)
        models[name] = trained_like_(build_model(cfg), 0).eval().cuda().requires_grad_(False)
        models[name].set_flash_bias(cuda_graphs=True)   # whatever $FLASHBIAS_CUDA_GRAPHS says: the replay is timed
        fb.DEPENDENT_LAUNCH = on
        for _ in range(4):   # the graph is captured at the second call of a shape
            logits[name] = forward(models[name], x, dtype)
        torch.cuda.synchronize()
    return models, logits, x


def forward(model, x, dtype):
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        return model(x)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="b384", help=f"a registered config ({', '.join(config_names('swinv2'))})")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", default="fp16", help="fp16 or bf16 (autocast)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=8, help="forwards per round")
    p.add_argument("--out", help="markdown table to write")
    args = p.parse_args(argv)
    if args.model not in config_names("swinv2"):
        raise UserError(f"unknown --model {args.model!r}; SwinV2 configs: {', '.join(config_names('swinv2'))}")
    if args.dtype not in DTYPES:
        raise UserError(f"unknown --dtype {args.dtype!r}; dtypes: {', '.join(DTYPES)}")
    if min(args.batch, args.rounds, args.iters) < 1:
        raise UserError("--batch, --rounds and --iters must be >= 1")
    if not torch.cuda.is_available():
        raise UserError("this benchmark needs CUDA")
    dtype, default = DTYPES[args.dtype], fb.DEPENDENT_LAUNCH
    try:
        models, logits, x = build_pair(args.model, args.batch, dtype)
        ms = {name: [] for name in SETTINGS}
        for _ in range(args.rounds):
            for name, model in models.items():
                fb.DEPENDENT_LAUNCH = SETTINGS[name]   # eager launches read it at each call
                ms[name].append(ms_per_call(lambda: forward(model, x, dtype), rounds=1, iters=args.iters))
        lines = [f"{args.model} batch {args.batch} {args.dtype}, {torch.cuda.get_device_name()}, torch "
                 f"{torch.__version__}: dependent launches off / on, medians of {args.rounds} alternating rounds "
                 f"of {args.iters} forwards", "",
                 "| dependent launches | ms / forward | off / on | logits vs off | GPU busy ms | GPU span ms | "
                 "events / forward | input copy ms | replay ms | output clone ms |",
                 "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
        for name, model in models.items():
            fb.DEPENDENT_LAUNCH = SETTINGS[name]
            busy, span, events = timeline(lambda: forward(model, x, dtype))
            replay, static_input, static_output, _ = next(iter(model.flash_bias_settings.graphs.entries.values()))
            parts = [ms_per_call(fn) for fn in (lambda: static_input.copy_(x), replay, static_output.clone)]
            same = "equal" if torch.equal(logits[name], logits["off"]) else \
                f"rel. L2 {rel_l2(logits[name].float(), logits['off'].float()):.1e}"
            median = statistics.median(ms[name])
            lines.append(f"| {name} | {median:.3f} | {statistics.median(ms['off']) / median:.4f} | {same} | "
                         f"{busy:.3f} | {span:.3f} | {events:.0f} | " + " | ".join(f"{t:.3f}" for t in parts) + " |")
            print(lines[-1], flush=True)
    finally:
        fb.DEPENDENT_LAUNCH = default
    print_table(lines, args.out)
    return 0


if __name__ == "__main__":
    run_main(main)
