#!/usr/bin/env python3
"""Whole-model benchmark of the drop-in SwinV2: official math vs timm vs FlashBias.

    python benchmarks/bench_model.py [--models t256,b256,b384] [--dtypes fp16,bf16] [--batch 64]
                                     [--warmup 3] [--iters 10] [--rules logit:0.05]
                                     [--compile] [--peers] [--profile] [--out-dir benchmarks] [--tiny]

For every model config (scripts/swin_config.py's registry) and precision, each method runs the WHOLE
model (eval mode, torch.no_grad(), ``torch.autocast("cuda", dtype)`` as the official main.py
validates) on one batch of seeded smooth random images and reports:

* ms/batch: median over ``--iters`` timed batches (CUDA events around each batch) after ``--warmup``
  untimed ones; speed-up = official ms / method ms; images/s = batch / median;
* peak GB: torch.cuda.max_memory_allocated from the first call of a method to its last timed batch
  (reset per method; it includes the model's weights, the input, and a CUDA graph's memory pool);
* logit rel. L2 and top-1 agreement against the official math at the same precision, and the rel. L2
  against the official math in float32 (no autocast), for scale.

Methods: "official math" (the drop-in with FlashBias off: set_flash_bias(fused=False), the reference),
"timm SwinTransformerV2" (timm's independent implementation with the same weights,
swin_config.build_timm_model; skipped with the reason if it cannot be built), "FlashBias exact" (rank
rule exact, no factor files), "FlashBias low-rank <rule>" per ``--rules``, and with ``--compile``
"FlashBias exact + torch.compile" (compile time, i.e. the first call, reported separately), and with ``--peers``
"official + SDPA" and "official + SDPA + torch.compile": the official math with its attention core by
F.scaled_dot_product_attention (benchmarks/sdpa_peer.py), the strongest peer, whose time over FlashBias exact's the
markdown gives. One drop-in model per config; its modes are switched with set_flash_bias, not rebuilt.

Weights: seeded trained-like random weights (swin_config.trained_like_, as the tests' models:
cpb_mlp and logit_scale randomised, res-post-norm scales ~0.5, where SwinV2's zero init would hide
attention).

Writes ``<out-dir>/model_<device-slug>.md`` (table), ``.json`` (raw numbers, every batch time) and
``.png`` (ms/batch bar chart; skipped with a message without matplotlib). ``--profile`` runs
torch.profiler over 3 batches of FlashBias exact on the last model and prints the top 25 kernels.

Without CUDA (or with ``--tiny``) it runs the tests' small config (test_tiny) on the CPU in float32
with wall-clock timing: the numbers mean nothing, it shows the script works (the tests run it).
"""
import argparse
import contextlib
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
from dataclasses import dataclass
from typing import List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))   # sdpa_peer, also when this file is loaded as a module
from swin_config import (UserError, build_from_args, build_timm_model, call_ms, config_names,  # noqa: E402
                         cpu_threads, describe_config, pyplot, rank_rule_option, registered_config, rel_l2,
                         run_main, smooth_images)
import flash_bias_runtime  # noqa: E402  (swin_config puts the repository root on sys.path)
from sdpa_peer import sdpa_attention  # noqa: E402

GPU_MODELS = ("t256", "b256", "b384")
CPU_MODEL = "test_tiny"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}

OFFICIAL = "official math"
TIMM = "timm SwinTransformerV2"
EXACT = "FlashBias exact"
COMPILED = "FlashBias exact + torch.compile"
SDPA = "official + SDPA"
SDPA_COMPILED = "official + SDPA + torch.compile"
OPTIONAL = (TIMM, COMPILED, SDPA, SDPA_COMPILED)   # a method that fails here is reported skipped, not failed
LOW_RANK = "FlashBias low-rank "


def log(*args):
    print(*args, flush=True)


def flash_ranks(dropin, model) -> str:
    """A short description of the biases the FlashBias layers use (flash_bias_summary): ranks or exact."""
    summary = dropin.flash_bias_summary(model)
    ranks = [s["rank"] for s in summary if s["mode"] == "low-rank"]
    if not ranks:
        return f"all {len(summary)} layers exact"
    return (f"{len(ranks)}/{len(summary)} layers low-rank, R {min(ranks)}-{max(ranks)} "
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
    """(logits of the first call as float32, {first_call_s, ms: [per batch], peak_bytes}). The peak covers every
    call from the first: a CUDA graph's memory is taken when it is captured, during the warm-up."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    logits = forward(model, x, device, dtype).float()
    sync(device)
    first_call_s = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        forward(model, x, device, dtype)
    sync(device)
    ms = call_ms(lambda: forward(model, x, device, dtype), device, iters)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return logits, {"first_call_s": first_call_s, "ms": ms, "peak_bytes": peak}


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


# Where GPU time goes, by part of the model: (part, pattern on the kernel name); the first match wins.
KERNEL_PARTS = (
    ("attention backward", r"_flash_bias_bwd|_flash_bias_dbias|attention_backward|fmha.*bwd"),
    ("attention", r"_flash_bias_fwd|fmha|flash_fwd|attention|softmax"),
    ("bias derivation", r"_bias_from_table|_cpb_table|sigmoid"),
    ("GEMM", r"gemm|nvjet|cutlass|xmma|sm90_|sm80_|ampere_|cublas"),
    ("residual + LayerNorm", r"layer_norm|layernorm"),
    ("GELU", r"gelu"),
    ("optimizer", r"adam|multi_tensor|foreach|amp_update|unscale"),
    ("casts and copies", r"copy|cast|convert|to_copy|cat_|CatArray"),
    ("reductions", r"reduce|norm_kernel|sum_"),
)


def kernel_parts(kernels, time_of):
    """[(part, total us, share, kernels)] of profiler kernel events, grouped by KERNEL_PARTS (rest: "other")."""
    totals = {}
    for e in kernels:
        part = next((p for p, pattern in KERNEL_PARTS if re.search(pattern, e.key, re.IGNORECASE)), "other")
        t, n = totals.get(part, (0.0, 0))
        totals[part] = (t + time_of(e), n + e.count)
    whole = sum(t for t, _ in totals.values()) or 1.0
    return sorted(((p, t, t / whole, n) for p, (t, n) in totals.items()), key=lambda r: -r[1])


def profile(model, x, device, dtype, batches=3, top=25, step=None):
    """Print and return the top kernels of ``batches`` calls of step() (default: an eval forward of x), and a table
    of their time by part of the model (KERNEL_PARTS), per call."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step = step or (lambda: forward(model, x, device, dtype))
    # three calls first: the drop-in captures its CUDA graph at the second call of a shape, and a capture inside the
    # window would add its warm-up forward's kernels (4 forwards' kernels in 3 calls, as the 2026-11 tables show)
    for _ in range(3):
        step()
    sync(device)
    with torch_profile(activities=activities) as prof:
        for _ in range(batches):
            step()
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
        # user annotations on the GPU timeline ("Optimizer.step#AdamW.step") span kernels already counted
        kernels = [e for e in kernels if not e.key.startswith(("Optimizer.", "ProfilerStep"))]
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
    lines.append(f"| part | ms per call | share | kernels per call |")
    lines.append("|---|---:|---:|---:|")
    for part, t, share, n in kernel_parts(kernels, lambda e: _evt_time(e, kind)):
        lines.append(f"| {part} | {t / 1e3 / batches:.2f} | {100 * share:.0f}% | {n / batches:.0f} |")
    log("\n".join(lines[-(len(lines) - top):]) if len(lines) > top else "")
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


def script_run_meta(script, argv):
    """{device, date, torch, command} of one run of ``benchmarks/<script>`` (bench_training, bench_batch_sweep)."""
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
            "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "command": f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])}


def default_table_path(prefix, meta):
    """``benchmarks/<prefix>_<device>.md`` on a GPU; None on the CPU, whose smoke-test numbers mean nothing."""
    if not torch.cuda.is_available():
        return None
    return os.path.join(ROOT, "benchmarks", f"{prefix}_{device_slug(meta['device'])}.md")


def write_table(path, title, meta, notes, head, cells, rows):
    """Write ``path`` (markdown: "# title: device, date", the ``notes`` paragraph, a table of ``head`` column
    names over ``cells``, one list of strings a row) and its ``.json`` twin {"meta": meta, "rows": rows}.
    ``path`` None (the CPU smoke test without --out): nothing is written."""
    if path is None:
        return
    lines = [f"# {title}: {meta['device']}, {meta['date']}", "", notes, "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print("wrote", path)


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


def peer_ratios(rows) -> List[str]:
    """One line per model and precision where both FlashBias exact and the compiled SDPA peer ran: their ms and
    the peer's time over FlashBias's."""
    ok = {(r["model"], r["precision"], r["method"]): r for r in rows if r["status"] == "ok"}
    lines = []
    for (model, prec, method), r in ok.items():
        peer = ok.get((model, prec, SDPA_COMPILED))
        if method == EXACT and peer is not None:
            lines.append(f"- {model}, {prec}: {peer['ms_median']:.2f} / {r['ms_median']:.2f} ms = "
                         f"{peer['ms_median'] / r['ms_median']:.2f}×")
    return lines


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
        f"{timing}; peak GB: torch.cuda.max_memory_allocated from each method's first call (weights, input and CUDA graph pool included); "
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
        lines.append(f"- {registered_config(key).title}: {desc}")
    lines += ["", TABLE_HEAD] + [table_row(r) for r in rows]
    peer_lines = peer_ratios(rows)
    if peer_lines:
        lines += ["", f"{EXACT} against {SDPA_COMPILED}, the strongest peer, in this run:", ""] + peer_lines
    if profile_lines:
        what = "CUDA kernels" if meta["device_type"] == "cuda" else "CPU ops"
        lines += ["", f"Top {what} of {EXACT} ({meta.get('profile_model')}, 3 batches, torch.profiler):", "", "```",
                  f"{'total ms':>10} {'%':>6} {'calls':>7} {'us/call':>9}  name"] + profile_lines + ["```"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plot(path, rows):
    plt = pyplot()
    if plt is None:
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
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(GPU_MODELS),
                   help=f"comma list of registered configs (default {','.join(GPU_MODELS)}; any of "
                        f"{', '.join(config_names('swinv2'))})")
    p.add_argument("--dtypes", default="fp16,bf16", help="comma list of fp16, bf16, fp32 (no autocast)")
    p.add_argument("--batch", type=int, default=None, help="images per batch (default 64; 2 on the CPU)")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches before timing (>= 1)")
    p.add_argument("--iters", type=int, default=10, help="timed batches per method")
    p.add_argument("--rules", default="logit:0.05",
                   help="FlashBias low-rank rank rules to run, comma list ('' for none), e.g. "
                        "logit:0.05,energy:0.995 (energy: the FlashBias paper's rule). Each distinct rank "
                        "compiles its own kernel: the first run of a rule on a machine spends a minute or "
                        "more in Triton")
    p.add_argument("--no-timm", action="store_true", help="skip timm's SwinTransformerV2")
    p.add_argument("--compile", action="store_true", help="also run FlashBias exact under torch.compile")
    p.add_argument("--peers", action="store_true",
                   help="also run the official math with its attention core by F.scaled_dot_product_attention "
                        "(benchmarks/sdpa_peer.py), eagerly and under torch.compile (a minute or more to compile)")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler over 3 batches of FlashBias exact on the last model: top 25 kernels")
    p.add_argument("--seed", type=int, default=0, help="weights and images seed")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks"))
    p.add_argument("--tiny", action="store_true", help=f"the CPU smoke test: {CPU_MODEL}, batch 2, fp32, CPU")
    return p.parse_args(argv)


@dataclass
class Plan:
    """What to run: where, which models and precisions, the batch and the methods."""
    device: torch.device
    models: List[str]
    dtypes: List[str]
    batch: int
    methods: List[str]


def make_plan(args) -> Plan:
    """The run's plan from the arguments; :class:`UserError` for unknown names or counts below 1."""
    cpu = args.tiny or not torch.cuda.is_available()
    if cpu and not args.tiny:
        log("no CUDA device: running the CPU smoke test (fp32, wall-clock timing)")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    # checked also where the CPU smoke test replaces them, so that a misspelt name is never silently ignored
    bad = [m for m in models if m not in config_names("swinv2")] + [d for d in dtypes if d not in DTYPES]
    if bad or not models or not dtypes:
        raise UserError(f"unknown or missing --models/--dtypes {bad}; models: {', '.join(config_names('swinv2'))}, "
                        f"dtypes: {', '.join(DTYPES)}")
    if cpu:
        models, dtypes = [CPU_MODEL], ["fp32"]
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    for rule in rules:
        rank_rule_option("--rules", rule)
    batch = args.batch or (2 if cpu else 64)
    if args.warmup < 1 or args.iters < 1 or batch < 1:
        raise UserError("--warmup, --iters and --batch must be >= 1")
    methods = ([OFFICIAL] + ([] if args.no_timm else [TIMM]) + ([SDPA, SDPA_COMPILED] if args.peers else [])
               + [EXACT] + [LOW_RANK + r for r in rules]
               + ([COMPILED] if args.compile else []))
    return Plan(torch.device("cpu" if cpu else "cuda"), models, dtypes, batch, methods)


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def run_meta(args, argv, plan: Plan) -> dict:
    """Machine, versions, command and settings, for the JSON and the markdown."""
    cuda = plan.device.type == "cuda"
    script = os.path.relpath(sys.argv[0], ROOT) if os.path.isabs(sys.argv[0]) else sys.argv[0]
    return {"device": torch.cuda.get_device_name(plan.device) if cuda
            else f"CPU ({platform.processor() or platform.machine()})",
            "device_type": plan.device.type, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "triton": _version("triton"), "timm": _version("timm"),
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "command": " ".join(shlex.quote(a) for a in [script] + (sys.argv[1:] if argv is None else list(argv))),
            "batch": plan.batch, "warmup": args.warmup, "iters": args.iters, "seed": args.seed, "models": {}}


def new_row(name: str, key: str, prec: str, method: str, batch: int) -> dict:
    return {"model": name, "model_key": key, "precision": prec, "method": method, "batch": batch, "status": "ok",
            "rel_l2": None, "top1": None, "rel_l2_fp32": None, "top1_fp32": None, "speedup": None,
            "compile_s": None, "ranks": None}


class ModelUnderTest:
    """One config's drop-in model (and timm's copy), its input and float32 reference logits."""

    def __init__(self, key: str, args, plan: Plan):
        self.key, self.device = key, plan.device
        self.name = registered_config(key).title
        cfg, self.model = build_from_args(None, None, embedded=key, seed=args.seed, verbose=False)
        self.description = describe_config(cfg)
        self.patch = contextlib.ExitStack()   # the SDPA peer's attention while it runs (runner, restore)
        self.timm_model, self.timm_error = None, None
        if not args.no_timm:
            try:
                self.timm_model = build_timm_model(cfg, self.model.state_dict())
            except Exception as e:  # an old/new timm, or a config it cannot express
                self.timm_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                log(f"timm SwinTransformerV2 skipped: {self.timm_error}")
        self.model.to(self.device).requires_grad_(False)
        self.x = smooth_images(plan.batch, cfg.DATA.IMG_SIZE, seed=args.seed + 1).to(self.device)
        self.model.set_flash_bias(factors_path=False, fused=False)
        self.ref32 = forward(self.model, self.x, self.device, None).float()   # the float32 official math, for scale
        sync(self.device)

    def runner(self, method: str):
        """The module that runs ``method``, with the drop-in's FlashBias settings for it."""
        if method == TIMM:
            if self.timm_model is None:
                raise RuntimeError(f"not built: {self.timm_error}")
            self.model.to("cpu")  # only the measured model's weights on the GPU (peak memory)
            return self.timm_model.to(self.device)
        if method in (OFFICIAL, SDPA, SDPA_COMPILED):
            self.model.set_flash_bias(factors_path=False, fused=False)
            if method == OFFICIAL:
                return self.model
            attention = sys.modules[type(self.model).__module__].WindowAttention
            self.patch.enter_context(sdpa_attention(self.model, attention))
            if method == SDPA:
                return self.model
            torch._dynamo.reset()
            return torch.compile(self.model)
        rule = method[len(LOW_RANK):] if method.startswith(LOW_RANK) else "exact"
        self.model.set_flash_bias(rank_rule=rule, factors_path=False, fused=True)
        if method == COMPILED:
            torch._dynamo.reset()
            return torch.compile(self.model)
        return self.model

    def restore(self, method: str) -> None:
        """Undo what :meth:`runner` moved or compiled for ``method``."""
        if method == TIMM:
            if self.timm_model is not None:
                self.timm_model.to("cpu")
            self.model.to(self.device)
        self.patch.close()
        if method in (COMPILED, SDPA_COMPILED):
            torch._dynamo.reset()
        free_memory()


def measure_method(mut: ModelUnderTest, method: str, prec: str, args, plan: Plan, ref: Optional[dict]) -> dict:
    """One row; ``ref``: the official row at this precision with its logits (None while measuring it)."""
    row = new_row(mut.name, mut.key, prec, method, plan.batch)
    try:
        runner = mut.runner(method)
        free_memory()
        logits, m = measure(runner, mut.x, plan.device, DTYPES[prec], args.warmup, args.iters)
        median = statistics.median(m["ms"])
        row.update(ms=m["ms"], ms_median=median, ms_min=min(m["ms"]), first_call_s=m["first_call_s"],
                   peak_bytes=m["peak_bytes"], images_per_s=plan.batch / (median / 1e3),
                   rel_l2_fp32=rel_l2(logits, mut.ref32), top1_fp32=top1(logits, mut.ref32),
                   finite=bool(torch.isfinite(logits).all()), logits=logits)
        if method in (COMPILED, SDPA_COMPILED):
            row["compile_s"] = m["first_call_s"]
        if method.startswith("FlashBias"):
            row["ranks"] = flash_ranks(flash_bias_runtime, mut.model)
        if method == OFFICIAL or ref is not None:   # no reference when the official math failed
            reference = logits if method == OFFICIAL else ref["logits"]
            row["rel_l2"], row["top1"] = rel_l2(logits, reference), top1(logits, reference)
            row["speedup"] = (median if method == OFFICIAL else ref["ms_median"]) / median
    except Exception as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        optional = method in OPTIONAL
        row["status"] = f"skipped: {reason}" if optional else f"FAILED: {reason}"
        if not optional:
            traceback.print_exc()
    finally:
        mut.restore(method)
    return row


def log_row(row: dict) -> None:
    head = f"{row['model']:<18} {row['precision']:<5} {row['method']:<34}"
    if row["status"] != "ok":
        log(f"{head} {row['status']}")
        return
    peak = None if row["peak_bytes"] is None else row["peak_bytes"] / 1e9
    extra = f"  compile {row['compile_s']:.1f} s" if row["compile_s"] is not None else ""
    extra += f"  [{row['ranks']}]" if row["ranks"] and "low-rank" in row["method"] else ""
    log(f"{head} {row['ms_median']:9.2f} {fmt(row['speedup'], '7.2f')}x {fmt(peak, '8.2f'):>8} "
        f"{row['images_per_s']:8.0f} {fmt(row['rel_l2'], '9.2e'):>9} "
        f"{fmt(None if row['top1'] is None else 100 * row['top1'], '6.1f'):>6}% "
        f"{fmt(row['rel_l2_fp32'], '9.2e'):>9} {row['first_call_s']:6.1f}{extra}")


HEADER = (f"{'model':<18} {'prec':<5} {'method':<34} {'ms/batch':>9} {'speed-up':>8} {'peak GB':>8} "
          f"{'img/s':>8} {'rel.L2':>9} {'top-1':>7} {'vs fp32':>9} {'1st s':>6}")


def bench_model(mut: ModelUnderTest, args, plan: Plan) -> List[dict]:
    """Every method at every precision of one model; rows without logits."""
    rows = []
    for prec in plan.dtypes:
        log(HEADER)
        ref = None
        for method in plan.methods:
            row = measure_method(mut, method, prec, args, plan, ref)
            if method == OFFICIAL and row["status"] == "ok":
                ref = row
            log_row(row)
            rows.append(row)
        for row in rows:
            row.pop("logits", None)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    meta = run_meta(args, argv, plan)
    slug = device_slug(meta["device"]) if plan.device.type == "cuda" else "cpu"
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, f"model_{slug}")
    log(f"device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, timm {meta['timm']}; "
        f"batch {plan.batch}, {args.warmup} warm-up + {args.iters} timed batches")
    if plan.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the official main.py
    rows, profile_lines, wall0 = [], [], time.perf_counter()
    # the CPU smoke test often runs on a busy CI machine: one thread avoids OpenMP spin contention (100x slower)
    with cpu_threads(1) if plan.device.type == "cpu" else contextlib.nullcontext():
        for i, key in enumerate(plan.models):
            t0 = time.perf_counter()
            mut = ModelUnderTest(key, args, plan)
            meta["models"][key] = f"{mut.description}, {mut.model.num_classes} classes"
            log(f"\n== {mut.name}: {meta['models'][key]} (built in {time.perf_counter() - t0:.1f} s)")
            rows += bench_model(mut, args, plan)
            if args.profile and i == len(plan.models) - 1:
                meta["profile_model"] = f"{mut.name}, {plan.dtypes[0]}"
                profile_lines = run_profile(mut, plan)
            del mut
            free_memory()
    meta["wall_s"] = time.perf_counter() - wall0
    write_outputs(base, meta, rows, profile_lines)
    return 1 if any(r["status"].startswith("FAILED") for r in rows) else 0


def run_profile(mut: ModelUnderTest, plan: Plan) -> List[str]:
    mut.model.set_flash_bias(rank_rule="exact", factors_path=False, fused=True)
    try:
        return profile(mut.model, mut.x, plan.device, DTYPES[plan.dtypes[0]])
    except Exception as e:
        log(f"profile failed: {type(e).__name__}: {e}")
        return []


def write_outputs(base: str, meta: dict, rows: List[dict], profile_lines: List[str]) -> None:
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "profile": profile_lines}, f, indent=1)
    write_markdown(base + ".md", meta, rows, profile_lines)
    plotted = write_plot(base + ".png", rows)
    log(f"\nwrote {base}.md, {base}.json" + (f", {base}.png" if plotted else "")
        + f" ({meta['wall_s']:.0f} s in all)")


if __name__ == "__main__":
    run_main(main)
