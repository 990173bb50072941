#!/usr/bin/env python3
"""Whole-model benchmark of the Swin V1 drop-in: the official file, torch.compile of it, timm, FlashBias.

    python benchmarks/bench_swin_v1.py [--models swin_b_384:64,swin_t_224:128] [--dtype fp16]
                                       [--warmup 5] [--iters 20] [--official-file PATH] [--no-compile]
                                       [--out-dir benchmarks] [--tiny]

Every model (``NAME:BATCH``, NAME from scripts/swin_config.SWIN_V1_CONFIGS) runs whole, in eval mode under
torch.no_grad() and ``torch.autocast("cuda", dtype)`` as the official main.py validates, on one batch of seeded
smooth random images, with seeded trained-like weights (swin_config.trained_like_: tables ~ 2 N(0, 1)). Methods:

* "official file": models/swin_transformer.py of microsoft/Swin-Transformer (``--official-file``, default
  third_party/Swin-Transformer/models/swin_transformer.py) imported standalone; when absent, the drop-in with
  FlashBias off (its official math), named so in the table;
* "official file + torch.compile": the same model through torch.compile (default mode; the first call, i.e. the
  compilation, is reported separately); ``--no-compile`` skips it;
* "timm SwinTransformer": timm's implementation with the same weights (checkpoint_filter_fn);
* "FlashBias eager": the drop-in, fused kernels, CUDA graphs off;
* "FlashBias + CUDA graphs": the drop-in as main.py runs it by default (the graph is captured in the warm-up).

Reported per method: ms / batch (median of ``--iters`` batches timed with CUDA events, after ``--warmup``),
images / s, peak GB, and the logits against the official file at the same precision (relative L2, max abs,
top-1 agreement) and against it in float32. The issue's targets are checked at the end: Swin-B/384 batch 64 fp16
<= 40 ms and faster than torch.compile of the official file, Swin-T/224 batch 128 <= 11 ms, logits within 3e-3
(relative L2) of the official file under the same autocast.

Writes ``<out-dir>/swin_v1_<device-slug>.md`` and ``.json``. Without CUDA (or with ``--tiny``) it runs the tests'
test_v1_tiny at batch 2 on the CPU in float32, without torch.compile: the numbers mean nothing, it shows the
script works (tests/test_swin_v1.py runs it).
"""
import argparse
import datetime
import gc
import importlib.util
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts")]
import swin_config  # noqa: E402
import swin_transformer as v1  # noqa: E402
from swin_config import SWIN_V1_CONFIGS, UserError, call_ms, rel_l2, run_main, smooth_images  # noqa: E402

DEFAULT_MODELS = "swin_b_384:64,swin_t_224:128"
DEFAULT_OFFICIAL = os.path.join(ROOT, "third_party", "Swin-Transformer", "models", "swin_transformer.py")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}
OFFICIAL, COMPILED, TIMM = "official file", "official file + torch.compile", "timm SwinTransformer"
EAGER, GRAPHS = "FlashBias eager", "FlashBias + CUDA graphs"
# the issue's targets: (model, batch) -> ms / batch of FlashBias in float16; logits' rel. L2 to the official file
MS_TARGETS = {("swin_b_384", 64): 40.0, ("swin_t_224", 128): 11.0}
LOGIT_TARGET = 3e-3


def log(*args):
    print(*args, flush=True)


def parse_models(text: str) -> List[tuple]:
    models = []
    for item in filter(None, text.split(",")):
        name, _, batch = item.partition(":")
        if name not in SWIN_V1_CONFIGS or (batch and not batch.isdigit()):
            raise UserError(f"--models {item}: give NAME:BATCH with NAME one of {', '.join(SWIN_V1_CONFIGS)}")
        models.append((name, int(batch or 64)))
    return models


def import_official(path: str):
    """The official models/swin_transformer.py imported standalone, or None when the file is absent."""
    if not os.path.isfile(path):
        return None
    spec = importlib.util.spec_from_file_location("official_swin_transformer_v1", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timm_model(config: dict, state_dict) -> torch.nn.Module:
    from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn
    model = SwinTransformer(img_size=config["img_size"], embed_dim=config["embed_dim"], depths=tuple(config["depths"]),
                            num_heads=tuple(config["num_heads"]), window_size=config["window_size"],
                            num_classes=config.get("num_classes", 1000), drop_path_rate=0.0)
    model.load_state_dict(checkpoint_filter_fn(dict(state_dict), model), strict=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def forward(model, x, dtype):
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        return model(x)


def measure(model, x, dtype, warmup: int, iters: int) -> dict:
    """Logits of the first call (float32) and the timings of one method."""
    device = x.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    logits = forward(model, x, dtype).float()
    sync(device)
    first_call_s = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        forward(model, x, dtype)
    sync(device)
    ms = call_ms(lambda: forward(model, x, dtype), device, iters, sync_each=True)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"logits": logits, "first_call_s": first_call_s, "ms": ms, "peak_bytes": peak}


def compare(row: dict, logits, official, official32) -> None:
    row["rel_l2"] = rel_l2(logits, official)
    row["max_abs"] = (logits - official).abs().max().item()
    row["top1"] = (logits.argmax(1) == official.argmax(1)).double().mean().item()
    row["rel_l2_fp32"] = rel_l2(logits, official32)


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# One model
# ----------------------------------------------------------------------------------------------
def methods(dropin, official_module, config, state_dict, compile_official: bool) -> Dict[str, Callable]:
    """{method name: builder of its model on the CPU}."""
    def official():
        if official_module is None:  # the drop-in's official math stands in
            model = dropin()
            model.set_flash_bias(fused=False)
            return model
        model = official_module.SwinTransformer(**dict(config, drop_path_rate=0.0)).eval()
        model.load_state_dict(state_dict, strict=True)
        return model

    def flash_bias(graphs):
        def build():
            model = dropin()
            model.set_flash_bias(cuda_graphs=graphs)
            return model
        return build

    built = {OFFICIAL: official}
    if compile_official:
        built[COMPILED] = lambda: torch.compile(official())
    built[TIMM] = lambda: timm_model(config, state_dict)
    built[EAGER] = flash_bias(False)
    built[GRAPHS] = flash_bias(True)
    return built


def bench_model(name: str, batch: int, dtype, device, args, official_module) -> List[dict]:
    config = dict(SWIN_V1_CONFIGS[name], drop_path_rate=0.0)

    def dropin():
        torch.manual_seed(args.seed)
        return swin_config.trained_like_(v1.SwinTransformer(**config), args.seed).eval()
    state_dict = dropin().state_dict()
    x = smooth_images(batch, config["img_size"], seed=args.seed).to(device)
    builders = methods(dropin, official_module, config, state_dict, args.compile and device.type == "cuda")
    official32 = forward(builders[OFFICIAL]().to(device), x, None).float()
    rows, official = [], None
    for method, build in builders.items():
        row = {"model": name, "batch": batch, "precision": args.dtype, "method": method, "status": "ok"}
        if method == OFFICIAL and official_module is None:
            row["method"] = "official math (drop-in, FlashBias off: no official file)"
        try:
            result = measure(build().to(device), x, dtype, args.warmup, args.iters)
        except Exception as e:  # one method failing (timm version, compile) is reported, not fatal
            if method == OFFICIAL:
                raise  # the reference of every other row
            row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            rows.append(row)
            log(f"  {method}: {row['status']}")
            continue
        free(device)
        logits = result.pop("logits")
        official = logits if method == OFFICIAL else official
        row.update(result, ms_median=statistics.median(result["ms"]))
        row["images_per_s"] = batch / (row["ms_median"] / 1e3)
        compare(row, logits, official, official32)
        row["finite"] = bool(torch.isfinite(logits).all())
        rows.append(row)
        log(f"  {method:<32} {row['ms_median']:9.2f} ms  rel.L2 {row['rel_l2']:.2e}  max|d| {row['max_abs']:.2e}  "
            f"top-1 {100 * row['top1']:.1f}%  first call {row['first_call_s']:.1f} s")
    base = next(r for r in rows if r["method"].startswith("official") and r["status"] == "ok")
    for r in rows:
        if r["status"] == "ok":
            r["speedup"] = base["ms_median"] / r["ms_median"]
    return rows


# ----------------------------------------------------------------------------------------------
# Targets and output
# ----------------------------------------------------------------------------------------------
def check_targets(rows: List[dict], dtype_name: str) -> List[str]:
    lines = []
    by = {(r["model"], r["batch"], r["method"]): r for r in rows if r["status"] == "ok"}
    for (name, batch, method), r in by.items():
        if method not in (EAGER, GRAPHS):
            continue
        target = MS_TARGETS.get((name, batch))
        if target is not None and dtype_name == "fp16":
            verdict = "met" if r["ms_median"] <= target else "MISSED"
            lines.append(f"{name} batch {batch} fp16, {method}: {r['ms_median']:.2f} ms <= {target} ms: {verdict}")
        compiled = by.get((name, batch, COMPILED))
        if compiled is not None:
            verdict = "met" if r["ms_median"] < compiled["ms_median"] else "MISSED"
            lines.append(f"{name} batch {batch}, {method}: {r['ms_median']:.2f} ms vs torch.compile of the official "
                         f"file {compiled['ms_median']:.2f} ms: {verdict}")
        verdict = "met" if r["rel_l2"] <= LOGIT_TARGET else "MISSED"
        lines.append(f"{name} batch {batch} {dtype_name}, {method}: logits rel. L2 {r['rel_l2']:.2e} to the "
                     f"official file <= {LOGIT_TARGET}: {verdict}")
    return lines


def write_outputs(out_dir: str, meta: dict, rows: List[dict], targets: List[str]) -> str:
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, "swin_v1_" + (re.sub(r"[^a-z0-9]+", "-", meta["device"].lower()).strip("-")))
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "targets": targets}, f, indent=1)
    lines = [f"# Swin V1 whole-model benchmark: {meta['device']}", "", f"- date: {meta['date']}",
             f"- torch {meta['torch']}, triton {meta['triton']}, timm {meta['timm']}",
             f"- command: `{meta['command']}`",
             f"- eval, torch.no_grad(), precision {meta['precision']} (torch.autocast; fp32: none); median of "
             f"{meta['iters']} batches after {meta['warmup']} warm-up; reference: {meta['official']}", "",
             "| Model | Batch | Method | ms / batch | Speed-up | Images / s | Peak GB | Rel. L2 vs official | Max abs "
             "| Top-1 | Rel. L2 vs fp32 official | First call s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['batch']} | {r['method']} | {r['status']} |||||||||")
            continue
        peak = "—" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 1e9:.2f}"
        lines.append(f"| {r['model']} | {r['batch']} | {r['method']} | {r['ms_median']:.2f} | {r['speedup']:.2f}× | "
                     f"{r['images_per_s']:.0f} | {peak} | {r['rel_l2']:.2e} | {r['max_abs']:.2e} | "
                     f"{100 * r['top1']:.1f}% | {r['rel_l2_fp32']:.2e} | {r['first_call_s']:.1f} |")
    lines += ["", "Targets:", ""] + [f"- {t}" for t in targets]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return stem


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help=f"comma list of NAME:BATCH (default {DEFAULT_MODELS})")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="autocast dtype (default fp16; fp32: none)")
    p.add_argument("--warmup", type=int, default=5,
                   help="untimed batches first (>= 3: the CUDA graph is captured at the third call)")
    p.add_argument("--iters", type=int, default=20, help="timed batches per method")
    p.add_argument("--official-file", default=DEFAULT_OFFICIAL, help="the official models/swin_transformer.py")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile of the official file")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the images")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks"))
    p.add_argument("--tiny", action="store_true", help="the tests' tiny model on the CPU (also without CUDA)")
    args = p.parse_args(argv)
    if args.warmup < 3 or args.iters < 1:
        raise UserError(f"--warmup must be >= 3 (CUDA graphs are captured at the third call) and --iters >= 1; got "
                        f"{args.warmup} and {args.iters}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cpu = args.tiny or not torch.cuda.is_available()
    device = torch.device("cpu" if cpu else "cuda")
    models = parse_models(args.models or ("test_v1_tiny:2" if cpu else DEFAULT_MODELS))
    args.dtype = args.dtype or ("fp32" if cpu else "fp16")
    official_module = import_official(args.official_file)
    official = args.official_file if official_module is not None else "the drop-in's official math (no official file)"
    import timm
    try:
        import triton
    except ImportError:  # the drop-in then runs its PyTorch paths
        triton = None
    meta = {"device": "cpu" if cpu else torch.cuda.get_device_name(device),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "triton": getattr(triton, "__version__", None), "timm": timm.__version__, "python": platform.python_version(),
            "command": shlex.join([sys.executable] + sys.argv), "precision": args.dtype, "warmup": args.warmup,
            "iters": args.iters, "official": official}
    rows = []
    for name, batch in models:
        log(f"{name} batch {batch} {args.dtype} on {meta['device']}")
        rows += bench_model(name, batch, DTYPES[args.dtype], device, args, official_module)
    targets = check_targets(rows, args.dtype)
    for line in targets:
        log(line)
    stem = write_outputs(args.out_dir, meta, rows, targets)
    log(f"wrote {stem}.md and {stem}.json")
    return 0


if __name__ == "__main__":
    run_main(main)
