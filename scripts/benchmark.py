#!/usr/bin/env python3
"""Whole-model benchmark of the drop-in SwinV2: official math vs timm vs FlashBias (issue #5 item 1).

    python scripts/benchmark.py [--models t256,b256,b384] [--dtypes fp16,bf16] [--batch 64]
                                [--warmup 3] [--iters 10] [--rules logit:0.05]
                                [--compile] [--profile] [--out-dir benchmarks] [--tiny]

For every model config and precision, each method runs the WHOLE model (eval mode, torch.no_grad(),
``torch.autocast("cuda", dtype)`` as the official main.py validates) on one batch of seeded smooth
random images and reports:

* ms/batch: median over ``--iters`` timed batches (CUDA events around each batch) after ``--warmup``
  untimed ones; speed-up = official ms / method ms; images/s = batch / median;
* peak GB: torch.cuda.max_memory_allocated over the timed batches (reset per method; it includes the
  model's weights and the input);
* logit rel. L2 and top-1 agreement against the official math at the same precision, and the rel. L2
  against the official math in float32 (no autocast), for scale.

Methods: "official math" (the drop-in with FlashBias off: set_flash_bias(fused=False), the reference),
"timm SwinTransformerV2" (timm's independent implementation with the same weights, via timm's
checkpoint_filter_fn; skipped with the reason if it cannot be built), "FlashBias exact" (rank rule
exact, no factor files), "FlashBias low-rank <rule>" per ``--rules``, and with ``--compile``
"FlashBias exact + torch.compile" (compile time, i.e. the first call, reported separately). One
drop-in model per config; its modes are switched with set_flash_bias, not rebuilt.

Weights: seeded random weights made trained-like by scripts/swin_config.trained_like_ (cpb_mlp and
logit_scale randomised, res-post-norm scales ~0.5: SwinV2's zero init would hide attention).

Writes ``<out-dir>/model_<device-slug>.md`` (table), ``.json`` (raw numbers, every batch time) and
``.png`` (ms/batch bar chart; skipped with a message without matplotlib). ``--profile`` runs
torch.profiler over 3 batches of FlashBias exact on the last model and prints the top 25 kernels.

Without CUDA (or with ``--tiny``) it runs a tiny config on the CPU in float32 with wall-clock timing:
the numbers mean nothing, it shows the script works (the tests run it).
"""
import argparse
import datetime
import gc
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
import traceback

import torch

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, SCRIPTS)
from swin_config import (REPO_ROOT, UserError, build_model, default_config, import_dropin,  # noqa: E402
                         run_main, smooth_images, trained_like_)
from yacs.config import CfgNode  # noqa: E402

# key: (display name, DATA/MODEL overrides of the official defaults)
CONFIGS = {
    "t256": ("SwinV2-T/256 w8", {"DATA": {"IMG_SIZE": 256},
                                 "MODEL": {"NAME": "swinv2_tiny_patch4_window8_256",
                                           "SWINV2": {"EMBED_DIM": 96, "DEPTHS": [2, 2, 6, 2],
                                                      "NUM_HEADS": [3, 6, 12, 24], "WINDOW_SIZE": 8}}}),
    "b256": ("SwinV2-B/256 w16", {"DATA": {"IMG_SIZE": 256},
                                  "MODEL": {"NAME": "swinv2_base_patch4_window16_256",
                                            "SWINV2": {"EMBED_DIM": 128, "DEPTHS": [2, 2, 18, 2],
                                                       "NUM_HEADS": [4, 8, 16, 32], "WINDOW_SIZE": 16}}}),
    "b384": ("SwinV2-B/384 w24", {"DATA": {"IMG_SIZE": 384},
                                  "MODEL": {"NAME": "swinv2_base_patch4_window12to24_192to384_22kto1k_ft",
                                            "SWINV2": {"EMBED_DIM": 128, "DEPTHS": [2, 2, 18, 2],
                                                       "NUM_HEADS": [4, 8, 16, 32], "WINDOW_SIZE": 24,
                                                       "PRETRAINED_WINDOW_SIZES": [12, 12, 12, 6]}}}),
    # CPU smoke test (--tiny / no CUDA): stages 16, 8, 4, 2 tokens: shifted and clipped windows
    "tiny": ("tiny-64 w8 (CPU)", {"DATA": {"IMG_SIZE": 64},
                                  "MODEL": {"NAME": "swinv2_tiny_cpu_benchmark", "NUM_CLASSES": 10,
                                            "SWINV2": {"EMBED_DIM": 32, "DEPTHS": [2, 2, 2, 2],
                                                       "NUM_HEADS": [2, 4, 8, 16], "WINDOW_SIZE": 8}}}),
}
GPU_MODELS = ("t256", "b256", "b384")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}

OFFICIAL = "official math"
TIMM = "timm SwinTransformerV2"
EXACT = "FlashBias exact"
COMPILED = "FlashBias exact + torch.compile"


def log(*args):
    print(*args, flush=True)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
def make_config(key):
    cfg = default_config()
    cfg.merge_from_other_cfg(CfgNode(CONFIGS[key][1]))
    cfg.MODEL.DROP_PATH_RATE = 0.0
    cfg.SOURCE = f"benchmark:{key}"
    cfg.freeze()
    return cfg


def build_dropin(cfg, seed):
    torch.manual_seed(seed)
    return trained_like_(build_model(cfg), seed).eval()


def build_timm(cfg, state_dict):
    """timm's independent SwinTransformerV2 with the drop-in's weights, through timm's checkpoint_filter_fn
    (as tests/model_utils.make_timm_model)."""
    from timm.models.swin_transformer_v2 import SwinTransformerV2, checkpoint_filter_fn
    s = cfg.MODEL.SWINV2
    model = SwinTransformerV2(img_size=cfg.DATA.IMG_SIZE, patch_size=s.PATCH_SIZE, in_chans=s.IN_CHANS,
                              num_classes=cfg.MODEL.NUM_CLASSES, embed_dim=s.EMBED_DIM, depths=tuple(s.DEPTHS),
                              num_heads=tuple(s.NUM_HEADS), window_size=s.WINDOW_SIZE, mlp_ratio=s.MLP_RATIO,
                              qkv_bias=s.QKV_BIAS, pretrained_window_sizes=tuple(s.PRETRAINED_WINDOW_SIZES),
                              drop_rate=0.0, drop_path_rate=0.0)
    missing, unexpected = model.load_state_dict(checkpoint_filter_fn(dict(state_dict), model), strict=False)
    missing = [k for k in missing if not k.endswith(("k_bias", "relative_coords_table", "relative_position_index",
                                                       "attn_mask"))]
    if missing or unexpected:
        raise RuntimeError(f"weights do not map onto timm's model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model.eval()


def flash_ranks(model, dropin):
    """A short description of the biases the FlashBias layers use after a forward: low-rank ranks or exact."""
    ranks, exact = [], 0
    for _, attn in dropin.window_attention_layers(model):
        with torch.no_grad():
            operands = attn.flash_bias_operands()   # cached by the forward that ran
        if "bias_factors" in operands:
            ranks.append(int(operands["bias_factors"][0].shape[-1]))
        else:
            exact += 1
    if not ranks:
        return f"all {exact} layers exact"
    return (f"{len(ranks)}/{len(ranks) + exact} layers low-rank, R {min(ranks)}-{max(ranks)} "
            f"(mean {sum(ranks) / len(ranks):.0f})")


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------
def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def autocast(device, dtype):
    if dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def forward(model, x, device, dtype):
    with autocast(device, dtype):
        return model(x)


@torch.no_grad()
def measure(model, x, device, dtype, warmup, iters):
    """(logits of the first call as float32, {first_call_s, ms: [per batch], peak_bytes})."""
    sync(device)
    t0 = time.perf_counter()
    logits = forward(model, x, device, dtype).float()
    sync(device)
    first_call_s = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        forward(model, x, device, dtype)
    sync(device)
    ms = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            forward(model, x, device, dtype)
            end.record()
        sync(device)
        ms = [start.elapsed_time(end) for start, end in events]
        peak = torch.cuda.max_memory_allocated(device)
    else:
        for _ in range(iters):
            t = time.perf_counter()
            forward(model, x, device, dtype)
            ms.append((time.perf_counter() - t) * 1e3)
        peak = None
    return logits, {"first_call_s": first_call_s, "ms": ms, "peak_bytes": peak}


def rel_l2(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def top1(a, b):
    return (a.argmax(-1) == b.argmax(-1)).double().mean().item()


def fmt(v, spec, none="—"):
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


# ----------------------------------------------------------------------------------------------
# Profiling
# ----------------------------------------------------------------------------------------------
def _evt_time(evt, kind):
    """Total time (us) of a key_averages entry: device time under either attribute name, or CPU time."""
    if kind == "cpu":
        return float(getattr(evt, "cpu_time_total", 0.0) or 0.0)
    for name in ("device_time_total", "cuda_time_total"):
        try:
            value = getattr(evt, name)
        except Exception:  # deprecated/removed attribute names raise in some versions
            continue
        if value is not None:
            return float(value)
    return 0.0


@torch.no_grad()
def profile(model, x, device, dtype, batches=3, top=25):
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    forward(model, x, device, dtype)
    sync(device)
    with torch_profile(activities=activities) as prof:
        for _ in range(batches):
            forward(model, x, device, dtype)
        sync(device)
    averages = prof.key_averages()
    if device.type == "cuda":
        # kernels only: the device-side events (CPU ops would count their kernels' time again)
        cuda_type = getattr(torch.autograd, "DeviceType", None)
        kernels = [e for e in averages
                   if cuda_type is not None and getattr(e, "device_type", None) == cuda_type.CUDA]
        if not kernels:  # older profilers: self device time marks the kernels
            kernels = [e for e in averages if float(getattr(e, "self_device_time_total",
                                                            getattr(e, "self_cuda_time_total", 0)) or 0) > 0]
        kind = "cuda"
    else:
        kernels = list(averages)
        kind = "cpu"
    kernels.sort(key=lambda e: _evt_time(e, kind), reverse=True)
    total = sum(_evt_time(e, kind) for e in kernels) or 1.0
    log(f"\nprofile: {EXACT}, {batches} batches, top {top} {'CUDA kernels' if kind == 'cuda' else 'CPU ops'} "
        f"by total {'device' if kind == 'cuda' else 'CPU'} time (all kernels: {total / 1e3:.1f} ms)")
    log(f"{'total ms':>10} {'%':>6} {'calls':>7} {'us/call':>9}  name")
    lines = []
    for e in kernels[:top]:
        t = _evt_time(e, kind)
        name = e.key if len(e.key) <= 110 else e.key[:107] + "..."
        line = f"{t / 1e3:10.2f} {100 * t / total:6.1f} {e.count:7d} {t / max(e.count, 1):9.1f}  {name}"
        lines.append(line)
        log(line)
    # the profiler's own table as well, sorted under whichever name this torch version uses
    for sort_by in (("device_time_total", "cuda_time_total") if kind == "cuda" else ("cpu_time_total",)):
        try:
            table = averages.table(sort_by=sort_by, row_limit=top)
        except Exception:
            continue
        log(f"\ntorch.profiler key_averages (sort_by={sort_by}):\n{table}")
        break
    return lines


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def device_slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


TABLE_HEAD = ("| Model | Precision | Method | ms / batch | Speed-up vs official | Peak GB | Images / s "
              "| Logit rel. L2 vs official | Top-1 agreement | Rel. L2 vs fp32 official | Notes |\n"
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|")


def table_row(r):
    if r["status"] != "ok":
        return (f"| {r['model']} | {r['precision']} | {r['method']} | — | — | — | — | — | — | — "
                f"| {r['status']} |")
    peak = None if r["peak_bytes"] is None else r["peak_bytes"] / 1e9
    notes = []
    if r.get("compile_s") is not None:
        notes.append(f"compile {r['compile_s']:.1f} s")
    if r.get("ranks"):
        notes.append(r["ranks"])
    return (f"| {r['model']} | {r['precision']} | {r['method']} | {r['ms_median']:.2f} | "
            f"{fmt(r['speedup'], '.2f')}× | {fmt(peak, '.2f')} | {r['images_per_s']:.0f} | "
            f"{fmt(r['rel_l2'], '.2e')} | {fmt(None if r['top1'] is None else 100 * r['top1'], '.1f')}% | "
            f"{fmt(r['rel_l2_fp32'], '.2e')} | {'; '.join(notes)} |")


def write_markdown(path, meta, rows, profile_lines):
    timing = ("CUDA events around each batch" if meta["device_type"] == "cuda" else "wall clock (CPU)")
    lines = [
        f"# SwinV2 whole-model benchmark: {meta['device']}",
        "",
        f"- date: {meta['date']}",
        f"- torch {meta['torch']}, triton {meta['triton']}, timm {meta['timm']}, CUDA {meta['cuda']}, "
        f"python {meta['python']}",
        f"- command: `{meta['command']}`",
        f"- batch {meta['batch']}, eval mode under torch.no_grad(); precision: torch.autocast (as the official "
        f"main.py), fp32 = no autocast",
        f"- ms / batch: median of {meta['iters']} timed batches after {meta['warmup']} warm-up batches, "
        f"{timing}; peak GB: torch.cuda.max_memory_allocated over the timed batches (weights and input included); "
        f"first-call times (Triton JIT, bias derivation, torch.compile) and every batch's time are in the JSON",
        f"- inputs: seeded smooth random images (seed {meta['seed']}); weights: seeded trained-like random "
        f"(cpb_mlp, logit_scale, res-post-norm scales ~0.5; scripts/swin_config.trained_like_)",
        "- reference: the drop-in's official math (FlashBias off) at the same precision; the last error column "
        "compares with the official math in float32",
        "",
        "Models:",
        "",
    ]
    for key, desc in meta["models"].items():
        lines.append(f"- {CONFIGS[key][0]}: {desc}")
    lines += ["", TABLE_HEAD] + [table_row(r) for r in rows]
    if profile_lines:
        what = "CUDA kernels" if meta["device_type"] == "cuda" else "CPU ops"
        lines += ["", f"Top {what} of {EXACT} ({meta.get('profile_model')}, 3 batches, torch.profiler):", "", "```",
                  f"{'total ms':>10} {'%':>6} {'calls':>7} {'us/call':>9}  name"] + profile_lines + ["```"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plot(path, rows):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    ok = [r for r in rows if r["status"] == "ok"]
    models = list(dict.fromkeys(r["model"] for r in ok))
    precisions = list(dict.fromkeys(r["precision"] for r in ok))
    methods = list(dict.fromkeys(r["method"] for r in ok))
    if not ok:
        return False
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(len(precisions), len(models), squeeze=False,
                             figsize=(4.2 * len(models), 0.45 * len(methods) * len(precisions) + 1.2))
    for i, prec in enumerate(precisions):
        for j, model in enumerate(models):
            ax = axes[i][j]
            sel = [r for r in ok if r["model"] == model and r["precision"] == prec]
            names = [r["method"] for r in sel]
            values = [r["ms_median"] for r in sel]
            ax.barh(range(len(sel)), values, color=[colors[n] for n in names])
            ax.set_yticks(range(len(sel)))
            ax.set_yticklabels(names if j == 0 else [""] * len(sel), fontsize=8)
            ax.invert_yaxis()
            for k, (v, r) in enumerate(zip(values, sel)):
                label = f"{v:.1f}" + (f" ({r['speedup']:.2f}×)" if r.get("speedup") else "")
                ax.text(v, k, " " + label, va="center", fontsize=7)
            ax.set_xlim(0, max(values) * 1.45 if values else 1)
            ax.set_title(f"{model}, {prec}", fontsize=9)
            if i == len(precisions) - 1:
                ax.set_xlabel("ms / batch (lower is better)", fontsize=8)
            ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(GPU_MODELS), help=f"comma list of {', '.join(GPU_MODELS)}")
    p.add_argument("--dtypes", default="fp16,bf16", help="comma list of fp16, bf16, fp32 (no autocast)")
    p.add_argument("--batch", type=int, default=None, help="images per batch (default 64; 2 on the CPU)")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches before timing (>= 1)")
    p.add_argument("--iters", type=int, default=10, help="timed batches per method")
    p.add_argument("--rules", default="logit:0.05",
                   help="FlashBias low-rank rank rules to run, comma list ('' for none), e.g. "
                        "logit:0.05,energy:0.995 (the seed's rule). Each distinct rank compiles its own "
                        "kernel: the first run of a rule on a machine spends a minute or more in Triton")
    p.add_argument("--no-timm", action="store_true", help="skip timm's SwinTransformerV2")
    p.add_argument("--compile", action="store_true", help="also run FlashBias exact under torch.compile")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler over 3 batches of FlashBias exact on the last model: top 25 kernels")
    p.add_argument("--seed", type=int, default=0, help="weights and images seed")
    p.add_argument("--out-dir", default=os.path.join(REPO_ROOT, "benchmarks"))
    p.add_argument("--tiny", action="store_true", help="the CPU smoke test: tiny config, batch 2, fp32, CPU")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    dropin = import_dropin()
    cpu = args.tiny or not torch.cuda.is_available()
    device = torch.device("cpu" if cpu else "cuda")
    if cpu:
        if not args.tiny:
            log("no CUDA device: running the tiny CPU config (fp32, wall-clock timing)")
        models, dtypes = ["tiny"], ["fp32"]
        batch = args.batch or 2
        # a smoke test, often on a busy CI machine: one thread avoids OpenMP spin contention (100x slower)
        torch.set_num_threads(1)
    else:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        batch = args.batch or 64
        bad = [m for m in models if m not in GPU_MODELS] + [d for d in dtypes if d not in DTYPES]
        if bad or not models or not dtypes:
            raise UserError(f"unknown or missing --models/--dtypes {bad}; models: {', '.join(GPU_MODELS)}, "
                            f"dtypes: {', '.join(DTYPES)}")
        torch.backends.cudnn.benchmark = True  # as the official main.py
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    for rule in rules:
        try:
            dropin.parse_rank_rule(rule)
        except ValueError as e:
            raise UserError(str(e)) from None
    if args.warmup < 1 or args.iters < 1 or batch < 1:
        raise UserError("--warmup, --iters and --batch must be >= 1")

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    try:
        import timm
        timm_version = timm.__version__
    except ImportError:
        timm_version = "not installed"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    slug = device_slug(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu"
    meta = {"device": device_name, "device_type": device.type, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "triton": triton_version, "timm": timm_version,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO_ROOT)
                                                        if os.path.isabs(sys.argv[0]) else sys.argv[0]]
                                + (sys.argv[1:] if argv is None else list(argv))),
            "batch": batch, "warmup": args.warmup, "iters": args.iters, "seed": args.seed, "models": {}}
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, f"model_{slug}")
    log(f"device: {device_name}; torch {torch.__version__}, triton {triton_version}, timm {timm_version}; "
        f"batch {batch}, {args.warmup} warm-up + {args.iters} timed batches")

    rows, failures, profile_lines = [], 0, []
    header = (f"{'model':<18} {'prec':<5} {'method':<34} {'ms/batch':>9} {'speed-up':>8} {'peak GB':>8} "
              f"{'img/s':>8} {'rel.L2':>9} {'top-1':>7} {'vs fp32':>9} {'1st s':>6}")
    wall0 = time.perf_counter()
    for mi, key in enumerate(models):
        name = CONFIGS[key][0]
        cfg = make_config(key)
        s = cfg.MODEL.SWINV2
        meta["models"][key] = (f"img {cfg.DATA.IMG_SIZE}, embed {s.EMBED_DIM}, depths {list(s.DEPTHS)}, heads "
                               f"{list(s.NUM_HEADS)}, window {s.WINDOW_SIZE}, pretrained windows "
                               f"{list(s.PRETRAINED_WINDOW_SIZES)}, {cfg.MODEL.NUM_CLASSES} classes")
        log(f"\n== {name}: {meta['models'][key]}")
        t0 = time.perf_counter()
        model = build_dropin(cfg, args.seed)
        n_params = sum(p.numel() for p in model.parameters())
        timm_model, timm_error = None, None
        if not args.no_timm:
            try:
                timm_model = build_timm(cfg, model.state_dict())
            except Exception as e:  # an old/new timm, or a config it cannot express
                timm_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                log(f"timm SwinTransformerV2 skipped: {timm_error}")
        model.to(device)
        for p in model.parameters():
            p.requires_grad_(False)
        x = smooth_images(batch, cfg.DATA.IMG_SIZE, seed=args.seed + 1).to(device)
        log(f"built in {time.perf_counter() - t0:.1f} s ({n_params / 1e6:.1f} M parameters)")

        # the float32 official math, for scale
        model.set_flash_bias(factors_path=False, fused=False)
        ref32 = forward(model, x, device, None).float()
        sync(device)
        free_memory()

        for prec in dtypes:
            dtype = DTYPES[prec]
            log(header)
            ref = None
            official_ms = None
            plan = [OFFICIAL] + ([TIMM] if not args.no_timm else []) + [EXACT] + \
                   [f"FlashBias low-rank {r}" for r in rules] + ([COMPILED] if args.compile else [])
            for method in plan:
                row = {"model": name, "model_key": key, "precision": prec, "method": method, "batch": batch,
                       "status": "ok", "rel_l2": None, "top1": None, "rel_l2_fp32": None, "top1_fp32": None,
                       "speedup": None, "compile_s": None, "ranks": None}
                runner = model
                try:
                    if method == TIMM:
                        if timm_model is None:
                            raise RuntimeError(f"not built: {timm_error}")
                        model.to("cpu")  # only the measured model's weights on the GPU (peak memory)
                        runner = timm_model.to(device)
                    elif method == OFFICIAL:
                        model.set_flash_bias(factors_path=False, fused=False)
                    elif method in (EXACT, COMPILED):
                        model.set_flash_bias(rank_rule="exact", factors_path=False, fused=True)
                        if method == COMPILED:
                            torch._dynamo.reset()
                            runner = torch.compile(model)
                    else:
                        model.set_flash_bias(rank_rule=method.rsplit(" ", 1)[-1], factors_path=False, fused=True)
                    free_memory()
                    logits, m = measure(runner, x, device, dtype, args.warmup, args.iters)
                    if method == COMPILED:
                        row["compile_s"] = m["first_call_s"]
                    if method.startswith("FlashBias"):
                        row["ranks"] = flash_ranks(model, dropin)
                    if method == OFFICIAL:
                        ref = logits
                        official_ms = statistics.median(m["ms"])
                    row.update(ms=m["ms"], ms_median=statistics.median(m["ms"]), ms_min=min(m["ms"]),
                               first_call_s=m["first_call_s"], peak_bytes=m["peak_bytes"],
                               images_per_s=batch / (statistics.median(m["ms"]) / 1e3),
                               rel_l2_fp32=rel_l2(logits, ref32), top1_fp32=top1(logits, ref32),
                               finite=bool(torch.isfinite(logits).all()))
                    if ref is not None:
                        row["rel_l2"], row["top1"] = rel_l2(logits, ref), top1(logits, ref)
                    if official_ms is not None:
                        row["speedup"] = official_ms / row["ms_median"]
                    del logits
                except Exception as e:
                    reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                    optional = method in (TIMM, COMPILED)
                    row["status"] = f"skipped: {reason}" if optional else f"FAILED: {reason}"
                    if not optional:
                        failures += 1
                        traceback.print_exc()
                finally:
                    if method == TIMM:
                        if timm_model is not None:
                            timm_model.to("cpu")
                        model.to(device)
                    runner = None
                    if method == COMPILED:
                        torch._dynamo.reset()
                    free_memory()
                rows.append(row)
                if row["status"] == "ok":
                    peak = None if row["peak_bytes"] is None else row["peak_bytes"] / 1e9
                    extra = f"  compile {row['compile_s']:.1f} s" if row["compile_s"] is not None else ""
                    extra += f"  [{row['ranks']}]" if row["ranks"] and "low-rank" in method else ""
                    log(f"{name:<18} {prec:<5} {method:<34} {row['ms_median']:9.2f} "
                        f"{fmt(row['speedup'], '7.2f')}x {fmt(peak, '8.2f'):>8} {row['images_per_s']:8.0f} "
                        f"{fmt(row['rel_l2'], '9.2e'):>9} {fmt(None if row['top1'] is None else 100 * row['top1'], '6.1f'):>6}% "
                        f"{fmt(row['rel_l2_fp32'], '9.2e'):>9} {row['first_call_s']:6.1f}{extra}")
                else:
                    log(f"{name:<18} {prec:<5} {method:<34} {row['status']}")
            del ref

        if args.profile and mi == len(models) - 1:
            model.set_flash_bias(rank_rule="exact", factors_path=False, fused=True)
            meta["profile_model"] = f"{name}, {dtypes[0]}"
            try:
                profile_lines = profile(model, x, device, DTYPES[dtypes[0]])
            except Exception as e:
                log(f"profile failed: {type(e).__name__}: {e}")
        del model, timm_model, x, ref32
        free_memory()

    meta["wall_s"] = time.perf_counter() - wall0
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "profile": profile_lines}, f, indent=1)
    write_markdown(base + ".md", meta, rows, profile_lines)
    plotted = write_plot(base + ".png", rows)
    log(f"\nwrote {base}.md, {base}.json" + (f", {base}.png" if plotted else "")
        + f" ({meta['wall_s']:.0f} s in all)")
    return 1 if failures else 0


if __name__ == "__main__":
    run_main(main)
