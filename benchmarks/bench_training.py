#!/usr/bin/env python3
"""One fine-tuning step, the official math against the drop-in's fused training path.

    python benchmarks/bench_training.py [--cases b384:16,t256:128] [--iters 20] [--out FILE.md] [--profile]

A step is what the official main.py's train_one_epoch does: forward under fp16 autocast, cross-entropy,
GradScaler backward, AdamW step, zero_grad; drop path 0.2; trained-like weights
(scripts/swin_config.trained_like_), seeded smooth images and labels. For every case, in one run:

* official: the official math (``set_flash_bias(fused=False)``);
* drop-in: the fused kernels, forward and backward (``set_flash_bias(fused=True)``).

Each row gives the median step time (synchronised, after warm-up), the peak memory of a step, and, from
one step of each from the same weights with drop path off, the loss and the relative L2 error of every
parameter's gradient against the official math in float32, for the official math and the drop-in under autocast
(the largest over parameters, and cpb_mlp's and logit_scale's).
``--profile`` instead prints each case's kernels by part of the model (torch.profiler over 3 steps), official
and drop-in.
Without CUDA it runs the tiny test config on the CPU to show the script works; the numbers mean nothing.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from swin_config import (UserError, import_dropin, load_config, model_kwargs, rel_l2,  # noqa: E402
                         run_main, smooth_images, trained_like_)
from bench_model import default_table_path, profile, script_run_meta, sync, write_table  # noqa: E402


def make_model(key, device, drop_path, seed=0):
    cfg = load_config(embedded=key)
    torch.manual_seed(seed)
    kwargs = dict(model_kwargs(cfg), drop_path_rate=drop_path)
    model = trained_like_(import_dropin().SwinTransformerV2(**kwargs), seed).to(device).train()
    return cfg, model


def train_step(model, opt, scaler, x, y, device):
    with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return loss


def step_ms(model, x, y, device, iters):
    """(median ms per step, peak GB of a step) of AdamW steps on a copy of the optimiser state."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.05)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    for _ in range(3):
        train_step(model, opt, scaler, x, y, device)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        train_step(model, opt, scaler, x, y, device)
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return statistics.median(times), peak


def profile_steps(key, batch, device, fused=True):
    """The kernels of a fine-tuning step (official math or drop-in) by part of the model (bench_model.profile)."""
    cfg, model = make_model(key, device, drop_path=0.2)
    model.set_flash_bias(fused=fused)
    x = smooth_images(batch, cfg.DATA.IMG_SIZE, seed=1).to(device)
    y = torch.randint(0, cfg.MODEL.NUM_CLASSES, (batch,), generator=torch.Generator().manual_seed(0)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.05)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    print(f"\nprofile of a training step, {'drop-in' if fused else 'official math'}, {key} batch {batch}:")
    return profile(model, x, device, None, step=lambda: train_step(model, opt, scaler, x, y, device))


def gradients(model, x, y, device, autocast=True):
    """(loss, {name: grad as float32}) of one forward/backward (under fp16 autocast), no optimiser step."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.float16, enabled=autocast and device.type == "cuda"):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def compare_gradients(key, batch, device, seed=0):
    """Official against drop-in gradients from the same weights and batch, drop path off (deterministic)."""
    cfg, model = make_model(key, device, drop_path=0.0, seed=seed)
    x = smooth_images(batch, cfg.DATA.IMG_SIZE, seed=seed + 1).to(device)
    y = torch.randint(0, cfg.MODEL.NUM_CLASSES, (batch,), generator=torch.Generator().manual_seed(seed)).to(device)
    model.set_flash_bias(fused=False)
    _, exact = gradients(model, x, y, device, autocast=False)
    loss_official, official = gradients(model, x, y, device)
    model.set_flash_bias(fused=True)
    loss_dropin, dropin = gradients(model, x, y, device)
    if official.keys() != dropin.keys():
        raise AssertionError(f"parameters with gradients differ: {sorted(official.keys() ^ dropin.keys())}")
    row = {"loss_official": loss_official, "loss_dropin": loss_dropin}
    for name, grads in (("official", official), ("dropin", dropin)):
        errors = {n: rel_l2(grads[n], g) for n, g in exact.items() if g.norm() > 0}
        worst = max(errors, key=errors.get)
        row.update({f"grad_worst_{name}": errors[worst], f"grad_worst_name_{name}": worst,
                    f"grad_cpb_mlp_{name}": max(e for n, e in errors.items() if "cpb_mlp" in n),
                    f"grad_logit_scale_{name}": max(e for n, e in errors.items() if "logit_scale" in n)})
    return row


def measure_case(key, batch, iters, device):
    row = {"model": key, "batch": batch}
    row.update(compare_gradients(key, batch, device))
    cfg, model = make_model(key, device, drop_path=0.2)
    x = smooth_images(batch, cfg.DATA.IMG_SIZE, seed=1).to(device)
    y = torch.randint(0, cfg.MODEL.NUM_CLASSES, (batch,), generator=torch.Generator().manual_seed(0)).to(device)
    for name, fused in (("official", False), ("dropin", True)):
        model.set_flash_bias(fused=fused)
        row[f"{name}_ms"], row[f"{name}_peak_gb"] = step_ms(model, x, y, device, iters)
    row["speedup"] = row["official_ms"] / row["dropin_ms"]
    return row


COLUMNS = [("model", "s"), ("batch", "d"), ("official_ms", ".1f"), ("dropin_ms", ".1f"), ("speedup", ".2f"),
           ("official_peak_gb", ".1f"), ("dropin_peak_gb", ".1f"), ("loss_official", ".5f"), ("loss_dropin", ".5f"),
           ("grad_worst_official", ".1e"), ("grad_worst_dropin", ".1e"), ("grad_worst_name_dropin", "s"),
           ("grad_cpb_mlp_official", ".1e"), ("grad_cpb_mlp_dropin", ".1e"), ("grad_logit_scale_official", ".1e"),
           ("grad_logit_scale_dropin", ".1e")]


def fmt(v, spec):
    return "—" if v is None else format(v, spec)


def write_report(path, meta, rows):
    """``path``: the markdown table of ``rows``, and its JSON twin (bench_model.write_table)."""
    notes = (f"torch {meta['torch']}; `{meta['command']}`. One step = forward (fp16 autocast), cross-entropy, "
             "GradScaler backward, AdamW, zero_grad; drop path 0.2; trained-like weights. ms = median of synchronised "
             "steps after warm-up; peak = max allocated during the timed steps. Gradient columns: one step from the "
             "same weights and batch with drop path off, relative L2 against the official math's float32 gradients "
             "(no autocast) of the official math and of the drop-in, both under fp16 autocast (the worst parameter, "
             "and the worst of cpb_mlp's and of logit_scale's).")
    cells = [[fmt(r.get(k), s) for k, s in COLUMNS] for r in rows]
    write_table(path, "Training step", meta, notes, [k for k, _ in COLUMNS], cells, rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="b384:16,t256:128", help="MODEL:BATCH,... (registered configs)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", help="markdown table (default benchmarks/training_<device>.md on a GPU)")
    p.add_argument("--profile", action="store_true", help="only profile one step of each case, official and drop-in")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    try:
        cases = [(k, int(b)) for k, b in (c.split(":") for c in args.cases.split(",") if c)] if cuda \
            else [("test_mini", 2)]
    except ValueError:
        raise UserError(f"--cases takes MODEL:BATCH pairs, e.g. b384:16,t256:128; got {args.cases!r}") from None
    if args.profile:
        for key, batch in cases:
            for fused in (False, True):
                profile_steps(key, batch, device, fused)
        return 0
    rows = []
    for key, batch in cases:
        rows.append(measure_case(key, batch, args.iters if cuda else 2, device))
        print(" | ".join(f"{k}={fmt(rows[-1].get(k), s)}" for k, s in COLUMNS), flush=True)
    meta = script_run_meta("bench_training.py", argv)
    write_report(args.out or default_table_path("training", meta), meta, rows)
    return 0


if __name__ == "__main__":
    run_main(main)
