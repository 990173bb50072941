#!/usr/bin/env python3
"""Where small batches spend their time: the host that issues the kernels, or the GPU.

    python benchmarks/bench_batch_sweep.py [--models t256,b256,b384] [--batches 1,8,64] [--compile b384]
                                           [--iters 20] [--out benchmarks/batch_sweep_<device>.md]

For every model and batch size, in one run, fp16 autocast as the official main.py evaluates, eval mode
under torch.no_grad(), trained-like weights (scripts/swin_config.trained_like_), seeded smooth images:

* official: the official math (``set_flash_bias(fused=False)``);
* eager: the drop-in's fused path, CUDA graphs off: wall ms per forward, the host ms it takes to issue
  one forward (the call returning, measured from an idle GPU) and the GPU ms (torch.profiler, the sum
  of its kernels' times, and their count);
* graphs: the same forward replayed from the drop-in's CUDA graphs (the default), and whether its logits
  equal eager's bit for bit;
* with ``--compile MODELS``: ``torch.compile(model)`` and ``torch.compile(model, mode="reduce-overhead")``
  of the drop-in with its default settings (its inference replays the drop-in's CUDA graphs outside the
  compiler), compile time and logits error against eager, host ms, and the ratio of its wall time to the
  graphs' measured alternately (``*_vs_graph``, the median of 7 rounds back to back), beside the same ratio of the
  graphs against themselves (``graph_vs_graph``: how far from 1 the host's drift alone moves such a ratio). With the
  graphs off Dynamo traces the fused forward instead: benchmarks/bench_compile_gap.py measures that.

Wall ms: the median of ``--iters`` forwards, each synchronised before and after (host time included).
Without CUDA it runs the tiny test config on the CPU to show the script works; the numbers mean nothing.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from swin_config import UserError, build_model, load_config, run_main, smooth_images, trained_like_  # noqa: E402
from bench_model import default_table_path, script_run_meta, sync, write_table  # noqa: E402


def wall_ms(fn, device, iters):
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def host_ms(fn, device, iters):
    """The time for the call to return, from an idle device: what the host spends issuing one forward."""
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        sync(device)
    return statistics.median(times)


def alternating_ratio(fn, baseline, device, iters, rounds=7):
    """The median over rounds of wall ms of fn / wall ms of baseline, measured back to back in each round: the host
    drifts by up to 2x within minutes on the benchmark machine, so separate medians cannot rank a few percent."""
    return statistics.median(wall_ms(fn, device, iters) / wall_ms(baseline, device, iters) for _ in range(rounds))


def gpu_ms(fn, device, calls=3):
    """(kernel ms per forward, kernels per forward) from torch.profiler."""
    if device.type != "cuda":
        return None, None
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.device_time for e in kernels) / 1e3 / calls, len(kernels) // calls


def measure_model(key, batches, compile_it, iters, device, seed=0):
    cfg = load_config(embedded=key)
    torch.manual_seed(seed)
    model = trained_like_(build_model(cfg), seed).eval().to(device)
    model.requires_grad_(False)
    rows = []
    for batch in batches:
        x = smooth_images(batch, cfg.DATA.IMG_SIZE, seed=seed + 1).to(device)
        rows.append(measure_batch(key, model, x, compile_it, iters, device))
        print(format_row(rows[-1]), flush=True)
    return rows


def run(model, x, device):
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        return model(x)


def measure_batch(key, model, x, compile_it, iters, device):
    row = {"model": key, "batch": x.shape[0]}
    official_iters = max(3, iters // 4)
    model.set_flash_bias(fused=False, cuda_graphs=False)
    run(model, x, device)
    row["official_ms"] = wall_ms(lambda: run(model, x, device), device, official_iters)
    model.set_flash_bias(fused=True, cuda_graphs=False)
    eager = run(model, x, device).float()
    row["eager_ms"] = wall_ms(lambda: run(model, x, device), device, iters)
    row["host_ms"] = host_ms(lambda: run(model, x, device), device, iters)
    row["gpu_ms"], row["kernels"] = gpu_ms(lambda: run(model, x, device), device)
    model.set_flash_bias(fused=True, cuda_graphs=True)
    for _ in range(3):  # resolve, first sight, capture
        run(model, x, device)
    replayed = run(model, x, device).float()
    row["graph_ms"] = wall_ms(lambda: run(model, x, device), device, iters)
    row["graph_host_ms"] = host_ms(lambda: run(model, x, device), device, iters)
    row["graph_equals_eager"] = bool(torch.equal(replayed, eager))
    if compile_it:
        model.set_flash_bias(fused=True)
        row["graph_vs_graph"] = alternating_ratio(lambda: run(model, x, device), lambda: run(model, x, device),
                                                  device, iters)
        for mode in ("default", "reduce-overhead"):
            torch._dynamo.reset()
            compiled = torch.compile(model, mode=None if mode == "default" else mode)
            t0 = time.perf_counter()
            out = run(compiled, x, device).float()
            row[f"compile_{mode}_s"] = time.perf_counter() - t0
            for _ in range(2):
                run(compiled, x, device)
            row[f"compile_{mode}_ms"] = wall_ms(lambda: run(compiled, x, device), device, iters)
            row[f"compile_{mode}_rel_err"] = ((out - eager).norm() / eager.norm()).item()
            if mode == "default":
                row["compile_default_host_ms"] = host_ms(lambda: run(compiled, x, device), device, iters)
            row[f"compile_{mode}_vs_graph"] = alternating_ratio(lambda: run(compiled, x, device),
                                                                 lambda: run(model, x, device), device, iters)
        torch._dynamo.reset()
    return row


def fmt(v, spec=".2f"):
    return "—" if v is None else format(v, spec)


COLUMNS = [("model", "s"), ("batch", "d"), ("official_ms", ".2f"), ("eager_ms", ".2f"), ("host_ms", ".2f"),
           ("gpu_ms", ".2f"), ("kernels", "d"), ("graph_ms", ".2f"), ("graph_host_ms", ".3f"),
           ("graph_equals_eager", ""), ("compile_default_ms", ".2f"), ("compile_reduce-overhead_ms", ".2f"),
           ("compile_default_host_ms", ".3f"), ("graph_vs_graph", ".3f"), ("compile_default_vs_graph", ".3f"),
           ("compile_reduce-overhead_vs_graph", ".3f"), ("compile_default_s", ".0f"),
           ("compile_reduce-overhead_s", ".0f"), ("compile_default_rel_err", ".1e")]


def format_row(row):
    return " | ".join(f"{k}={fmt(row.get(k), spec) if spec else row.get(k)}" for k, spec in COLUMNS if k in row)


def write_report(path, meta, rows):
    """``path``: the markdown table of ``rows`` with speed-ups, and its JSON twin (bench_model.write_table)."""
    head = [k for k, _ in COLUMNS if any(k in r for r in rows)]
    notes = (f"torch {meta['torch']}; `{meta['command']}`; fp16 autocast, eval, no_grad, trained-like weights. "
             "ms = median wall time per forward (synchronised); host ms = time to issue one forward from an idle "
             "GPU; GPU ms = the sum of the forward's kernel times (torch.profiler); graph = the drop-in's CUDA graph "
             "replay; vs graph = compiled wall time / graph wall time, alternating rounds (graph vs graph: the "
             "graphs against themselves the same way, the ratio's noise); speed-ups in the last columns are against "
             "the official file in this run.")
    cells = []
    for r in rows:
        cells.append([fmt(r.get(k), spec) if spec and r.get(k) is not None else str(r.get(k, "—"))
                      for k, spec in COLUMNS if k in head]
                     + [f"{r['official_ms'] / r['eager_ms']:.1f}x", f"{r['official_ms'] / r['graph_ms']:.1f}x"])
    write_table(path, "Batch-size sweep", meta, notes, head + ["eager speed-up", "graph speed-up"], cells, rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="t256,b256,b384")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--compile", default="", help="models to also run under torch.compile (slow: ~1 min each)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", help="markdown table (default benchmarks/batch_sweep_<device>.md on a GPU)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    try:
        batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        raise UserError(f"--batches takes whole numbers, e.g. 1,8,64; got {args.batches!r}") from None
    models = [m for m in args.models.split(",") if m]
    if not cuda:
        models, batches = ["test_mini"], [1, 2]
    compiled = set(m for m in args.compile.split(",") if m)
    rows = []
    for key in models:
        rows += measure_model(key, batches, key in compiled, args.iters if cuda else 2, device)
    meta = script_run_meta("bench_batch_sweep.py", argv)
    write_report(args.out or default_table_path("batch_sweep", meta), meta, rows)
    return 0


if __name__ == "__main__":
    run_main(main)
