#!/usr/bin/env python3
"""The drop-in's speed switches on and off, the whole model in one process.

    python benchmarks/bench_switches.py [--switches dependent_launch,input_in_place,refresh_beside] [--model b384]
                                        [--batch 64] [--dtype fp16] [--rounds 7] [--iters 8] [--out FILE.md]

A switch is a module constant read at launch or capture time (SWITCHES): ``dependent_launch`` is
``flash_bias_triton.DEPENDENT_LAUNCH`` (Programmatic Dependent Launch), ``input_in_place`` is
``flash_bias_runtime.READ_INPUT_IN_PLACE`` (a CUDA graph reads its input where the caller's tensor lies instead of a
copy), ``refresh_beside`` is ``flash_bias_runtime.REFRESH_BESIDE`` (the later stages' weight copies refreshed on a
second stream during the first stage). The settings compared: all off, each switch alone on, and (with two or more)
all on. One copy of the model per setting, with the same trained-like weights (scripts/swin_config.trained_like_),
each warmed up, so each captures its CUDA graph, under its setting; then rounds alternating between them,
``--iters`` forwards a round between CUDA events (medians over the rounds). Reported: ms per forward with each, the
ratio to all off, whether the logits equal all off's bit for bit (the switches change no arithmetic), and, from
torch.profiler over 3 replayed forwards, the GPU's busy and idle time; then where a forward's time goes: taking the
input (pointing the graph at it, or copying it into the graph's buffer), the replay alone, the output clone. Needs
CUDA.
"""
import argparse
import contextlib
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from swin_config import (UserError, build_model, call_ms, config_names, load_config, rel_l2,  # noqa: E402
                         run_main, smooth_images, trained_like_)
import flash_bias_runtime as runtime  # noqa: E402  (swin_config puts the repository root on sys.path)
import flash_bias_triton as fb  # noqa: E402
from bench_gelu_epilogue import print_table  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
SWITCHES = {"dependent_launch": (fb, "DEPENDENT_LAUNCH"), "input_in_place": (runtime, "READ_INPUT_IN_PLACE"),
            "refresh_beside": (runtime, "REFRESH_BESIDE")}
ALL_OFF = "all off"


def settings_of(switches):
    """{setting name: {switch: on}}: all off, each switch alone on, and all on where there are two or more."""
    settings = {ALL_OFF: {s: False for s in switches}}
    settings.update({s: {t: t == s for t in switches} for s in switches})
    if len(switches) > 1:
        settings["all on"] = {s: True for s in switches}
    return settings


@contextlib.contextmanager
def switched(setting):
    """The switches set as setting says, and put back as they were afterwards."""
    before = {s: getattr(*SWITCHES[s]) for s in setting}
    try:
        for s, on in setting.items():
            setattr(*SWITCHES[s], on)
        yield
    finally:
        for s, value in before.items():
            setattr(*SWITCHES[s], value)


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


def forward(model, x, dtype):
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        return model(x)


def build_models(key, batch, dtype, settings):
    """({setting: model}, {setting: logits}, images): one model per setting, its graph captured under it."""
    cfg = load_config(embedded=key)
    x = smooth_images(batch, cfg.DATA.IMG_SIZE, seed=1).cuda()
    models, logits = {}, {}
    for name, setting in settings.items():
        torch.manual_seed(0)
        models[name] = trained_like_(build_model(cfg), 0).eval().cuda().requires_grad_(False)
        models[name].set_flash_bias(cuda_graphs=True)   # whatever $FLASHBIAS_CUDA_GRAPHS says: the replay is timed
        with switched(setting):
            for _ in range(4):   # the graph is captured at the second call of a shape
                logits[name] = forward(models[name], x, dtype)
        torch.cuda.synchronize()
    return models, logits, x


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--switches", default=",".join(SWITCHES), help=f"comma-separated, of {', '.join(SWITCHES)}")
    p.add_argument("--model", default="b384", help=f"a registered config ({', '.join(config_names('swinv2'))})")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", default="fp16", help="fp16 or bf16 (autocast)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=8, help="forwards per round")
    p.add_argument("--out", help="markdown table to write")
    args = p.parse_args(argv)
    args.switches = [s for s in args.switches.split(",") if s]
    unknown = [s for s in args.switches if s not in SWITCHES]
    if unknown or not args.switches:
        raise UserError(f"unknown or missing --switches {unknown}; switches: {', '.join(SWITCHES)}")
    if args.model not in config_names("swinv2"):
        raise UserError(f"unknown --model {args.model!r}; SwinV2 configs: {', '.join(config_names('swinv2'))}")
    if args.dtype not in DTYPES:
        raise UserError(f"unknown --dtype {args.dtype!r}; dtypes: {', '.join(DTYPES)}")
    if min(args.batch, args.rounds, args.iters) < 1:
        raise UserError("--batch, --rounds and --iters must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise UserError("this benchmark needs CUDA")
    dtype, settings = DTYPES[args.dtype], settings_of(args.switches)
    models, logits, x = build_models(args.model, args.batch, dtype, settings)
    ms = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, model in models.items():
            with switched(settings[name]):   # eager launches read them at each call
                ms[name].append(ms_per_call(lambda: forward(model, x, dtype), rounds=1, iters=args.iters))
    lines = [f"{args.model} batch {args.batch} {args.dtype}, {torch.cuda.get_device_name()}, torch "
             f"{torch.__version__}: switches {', '.join(args.switches)}, medians of {args.rounds} alternating rounds "
             f"of {args.iters} forwards", "",
             "| on | ms / forward | all off / this | logits vs all off | GPU busy ms | GPU span ms | "
             "events / forward | input ms | replay ms | output clone ms |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for name, model in models.items():
        with switched(settings[name]):
            busy, span, events = timeline(lambda: forward(model, x, dtype))
            graph = next(iter(model.flash_bias_settings.graphs.entries.values()))
            parts = [ms_per_call(fn) for fn in (lambda: graph.take_input(x), graph.replay, graph.static_output.clone)]
        same = "equal" if torch.equal(logits[name], logits[ALL_OFF]) else \
            f"rel. L2 {rel_l2(logits[name].float(), logits[ALL_OFF].float()):.1e}"
        median = statistics.median(ms[name])
        lines.append(f"| {name} | {median:.3f} | {statistics.median(ms[ALL_OFF]) / median:.4f} | {same} | "
                     f"{busy:.3f} | {span:.3f} | {events:.0f} | " + " | ".join(f"{t:.3f}" for t in parts) + " |")
        print(lines[-1], flush=True)
    print_table(lines, args.out)
    return 0


if __name__ == "__main__":
    run_main(main)
