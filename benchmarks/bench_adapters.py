#!/usr/bin/env python3
"""Whole-model benchmark of the timm and transformers adapters (flash_bias_adapters): each library's SwinV2 plain vs
patched.

    python benchmarks/bench_adapters.py [--libraries timm,transformers] [--timm-model swinv2_base_window12to24_192to384]
                                        [--hf-config large384] [--dtype fp16] [--batch 64] [--warmup 3] [--iters 10]
                                        [--no-graphs] [--no-qkv] [--seed 0] [--out-dir benchmarks] [--tiny]

Models are built from their configs with seeded trained-like random weights (no hub download): timm's
``timm.create_model(name, pretrained=False)`` randomised by swin_config.trained_like_, transformers'
Swinv2ForImageClassification(Swinv2Config(...)) by the same function (the same statistics, under transformers'
names). The
default transformers config is the largest published Swinv2 shape, swinv2-large-patch4-window12to24-192to384
(embed 192, depths 2-2-18-2, heads 6-12-24-48, window 24 at 384 px, pre-training windows 12-12-12-6).

Each model runs eval mode under torch.no_grad() and ``torch.autocast("cuda", dtype)`` (fp32: no autocast) on one
batch of seeded smooth random images, methods "plain" (the library), "patched" and "patched + CUDA graphs"
(patch_*(cuda_graphs=True); CUDA only, off with --no-graphs). Reported: ms/batch (median of --iters CUDA-event-timed
batches after --warmup), speed-up vs plain, peak GB (torch.cuda.max_memory_allocated over the timed batches), logit
rel. L2 and top-1 agreement vs plain at the same precision, and rel. L2 vs plain float32 for scale. Targets
(issue 13): patched >= 5x plain, logits within 3e-3.

--qkv (default on) also times transformers' q/k/v projection at each stage's shape three ways: the adapter's (three
matmuls into column slices of one output through out=), one matmul on weights concatenated per call, and the
library's three separate nn.Linear calls (the kernel cannot read those).

Writes ``<out-dir>/adapters_<device-slug>.md`` and ``.json``. Without CUDA (or with --tiny) it runs tiny configs of
both libraries on the CPU in float32 (wall-clock; the numbers mean nothing, it shows the script works: the tests
run it).
"""
import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from swin_config import (UserError, call_ms, rel_l2, run_main, smooth_images,  # noqa: E402  (ROOT on sys.path)
                         trained_like_)
import flash_bias_adapters as adapters  # noqa: E402

TIMM_MODEL = "swinv2_base_window12to24_192to384"
TIMM_TINY = dict(img_size=64, window_size=8, embed_dim=16, depths=(2, 2), num_heads=(1, 2), num_classes=10)
HF_CONFIGS = {
    "large384": dict(image_size=384, embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48], window_size=24,
                     pretrained_window_sizes=[12, 12, 12, 6], num_labels=1000),
    "base384": dict(image_size=384, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=24,
                    pretrained_window_sizes=[12, 12, 12, 6], num_labels=1000),
    "tiny": dict(image_size=64, embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=8, num_labels=10),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}


def log(*args):
    print(*args, flush=True)


# ----------------------------------------------------------------------------------------------
# Models (the tests build theirs here too)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def build_timm(spec, seed: int = 0) -> torch.nn.Module:
    """timm's SwinV2 in eval mode with trained-like weights: a registered name (pretrained=False: no download) or
    SwinTransformerV2 constructor kwargs."""
    import timm
    from timm.models.swin_transformer_v2 import SwinTransformerV2
    torch.manual_seed(seed)
    if isinstance(spec, str):
        model = timm.create_model(spec, pretrained=False, drop_path_rate=0.0)
    else:
        model = SwinTransformerV2(**{"drop_path_rate": 0.0, **spec})
    return trained_like_(model, seed).eval()


def build_transformers(config: dict, seed: int = 0, head: bool = True) -> torch.nn.Module:
    """transformers' Swinv2ForImageClassification (head=False: Swinv2Model) of Swinv2Config(**config) in eval mode
    with trained-like weights."""
    from transformers import Swinv2Config, Swinv2ForImageClassification, Swinv2Model
    torch.manual_seed(seed)
    cfg = Swinv2Config(**config)
    model = Swinv2ForImageClassification(cfg) if head else Swinv2Model(cfg)
    return trained_like_(model, seed).eval()


def image_size(library: str, model: torch.nn.Module) -> int:
    if library == "timm":
        size = model.patch_embed.img_size
        return size[0] if isinstance(size, (tuple, list)) else int(size)
    size = model.config.image_size
    return size[0] if isinstance(size, (tuple, list)) else int(size)


def logits_of(library: str) -> Callable:
    return (lambda out: out) if library == "timm" else (lambda out: out.logits)


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(run: Callable[[], torch.Tensor], device: torch.device, warmup: int, iters: int) -> dict:
    """{"logits" of a call after the timed ones (float32: a CUDA graph replays by then), "first_call_s", "ms" per
    timed call, "peak_bytes"}."""
    sync(device)
    start = time.perf_counter()
    run()
    sync(device)
    first = time.perf_counter() - start
    for _ in range(max(0, warmup - 1)):
        run()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms = call_ms(run, device, iters)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"logits": run().float(), "first_call_s": first, "ms": ms, "peak_bytes": peak}


def top1(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(-1) == b.argmax(-1)).double().mean().item()


# ----------------------------------------------------------------------------------------------
# One library: plain, patched, patched + CUDA graphs
# ----------------------------------------------------------------------------------------------
def bench_library(library: str, model: torch.nn.Module, name: str, args, device: torch.device) -> List[dict]:
    dtype = DTYPES[args.dtype]
    patch = adapters.patch_timm if library == "timm" else adapters.patch_transformers
    logits = logits_of(library)
    x = smooth_images(args.batch, image_size(library, model), seed=args.seed).to(device)

    def run():
        with autocast(device, dtype):
            return logits(model(x))

    with torch.no_grad():  # in slices of 16 images: the library's float32 attention scores are large
        reference_fp32 = None if dtype is None else torch.cat([logits(model(x[i:i + 16])).float()
                                                               for i in range(0, len(x), 16)])
    methods = [("plain", None), ("patched", dict(cuda_graphs=False))]
    if device.type == "cuda" and not args.no_graphs:
        methods.append(("patched + CUDA graphs", dict(cuda_graphs=True)))
    rows, plain = [], None
    for method, options in methods:
        adapters.unpatch(model)
        if options is not None:
            patch(model, **options)
        log(f"{library} {name} {args.dtype} batch {args.batch}: {method} ...")
        result = measure(run, device, args.warmup, args.iters)
        plain = plain or result
        rows.append(result_row(result, plain, reference_fp32, dict(library=library, model=name, method=method,
                                                                   precision=args.dtype, batch=args.batch)))
        log(f"  {rows[-1]['ms_median']:.2f} ms/batch, rel L2 {rows[-1]['rel_l2']:.2e}, "
            f"top-1 {100 * rows[-1]['top1']:.1f}%")
    adapters.unpatch(model)
    return rows


def result_row(result: dict, plain: dict, reference_fp32: Optional[torch.Tensor], row: dict) -> dict:
    ms, out = statistics.median(result["ms"]), result["logits"]
    return {**row, "ms": result["ms"], "ms_median": ms, "speedup": statistics.median(plain["ms"]) / ms,
            "images_per_s": row["batch"] / ms * 1e3, "peak_bytes": result["peak_bytes"],
            "first_call_s": result["first_call_s"], "rel_l2": rel_l2(out, plain["logits"]),
            "top1": top1(out, plain["logits"]),
            "rel_l2_fp32": None if reference_fp32 is None else rel_l2(out, reference_fp32),
            "finite": bool(torch.isfinite(out).all())}


# ----------------------------------------------------------------------------------------------
# transformers' q/k/v projection, three ways
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def bench_qkv(model: torch.nn.Module, args, device: torch.device) -> List[dict]:
    """ms of the first layer of each stage's q/k/v projection at the benchmark's batch (input: the float32
    residual stream, under autocast as in the model)."""
    from transformers.models.swinv2.modeling_swinv2 import Swinv2Stage
    dtype = DTYPES[args.dtype]
    size = image_size("transformers", model) // model.config.patch_size
    rows = []
    for i, stage in enumerate(m for m in model.modules() if isinstance(m, Swinv2Stage)):
        attn = stage.blocks[0].attention.self
        projections = (attn.query, attn.key, attn.value)
        tokens = (size // 2 ** i) ** 2
        x = torch.randn(args.batch, tokens, attn.query.in_features, device=device)
        k_zero = torch.zeros_like(attn.value.bias) if attn.value.bias is not None else None

        def concatenated():
            bias = None if k_zero is None else torch.cat((attn.query.bias, k_zero, attn.value.bias))
            return F.linear(x, torch.cat([p.weight for p in projections]), bias)

        variants = {"out= column slices (adapter)": lambda: adapters._project_qkv(x, projections),
                    "weights concatenated per call": concatenated,
                    "three nn.Linear (library)": lambda: [p(x) for p in projections]}
        for variant, fn in variants.items():
            def run(fn=fn):
                with autocast(device, dtype):
                    fn()
                return torch.zeros(1)
            result = measure(run, device, max(args.warmup, 2), max(args.iters, 5))
            rows.append({"stage": i, "tokens": args.batch * tokens, "channels": attn.query.in_features,
                         "variant": variant, "ms_median": statistics.median(result["ms"])})
    return rows


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def fmt(value, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown(meta: dict, rows: List[dict], qkv: List[dict]) -> str:
    lines = [f"# SwinV2 adapters benchmark: {meta['device']}", "",
             f"- date: {meta['date']}", f"- {meta['versions']}", f"- command: `{meta['command']}`",
             "- eval mode, torch.no_grad(), autocast at the precision shown (fp32: none); ms/batch: median of the "
             "timed batches (CUDA events); rel. L2 / top-1 against the plain library model at the same precision; "
             "weights: seeded trained-like random (no hub download)", "",
             "| Library | Model | Precision | Method | ms / batch | Speed-up vs plain | Peak GB | Images / s "
             "| Logit rel. L2 vs plain | Top-1 agreement | Rel. L2 vs fp32 plain |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        peak = None if r["peak_bytes"] is None else r["peak_bytes"] / 1e9
        lines.append(f"| {r['library']} | {r['model']} | {r['precision']} | {r['method']} | {r['ms_median']:.2f} | "
                     f"{r['speedup']:.2f}× | {fmt(peak, '.2f')} | {r['images_per_s']:.0f} | {r['rel_l2']:.2e} | "
                     f"{100 * r['top1']:.1f}% | {fmt(r['rel_l2_fp32'], '.2e')} |")
    if qkv:
        lines += ["", "transformers q/k/v projection (first layer of each stage, ms, median):", "",
                  "| Stage | Tokens | Channels | Variant | ms |", "|---:|---:|---:|---|---:|"]
        lines += [f"| {q['stage']} | {q['tokens']} | {q['channels']} | {q['variant']} | {q['ms_median']:.3f} |"
                  for q in qkv]
    return "\n".join(lines) + "\n"


def environment(device: torch.device) -> dict:
    import timm
    versions = f"torch {torch.__version__}, timm {timm.__version__}"
    try:
        import transformers
        versions += f", transformers {transformers.__version__}"
    except ImportError:
        pass
    if device.type == "cuda":
        import triton
        versions += f", triton {triton.__version__}, CUDA {torch.version.cuda}"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    return {"device": name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "versions": versions + f", python {platform.python_version()}",
            "command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])}


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--libraries", default="timm,transformers", help="comma list of timm, transformers")
    p.add_argument("--timm-model", default=TIMM_MODEL, help="a timm SwinV2 model name (built with pretrained=False)")
    p.add_argument("--hf-config", default="large384", choices=[k for k in HF_CONFIGS if k != "tiny"],
                   help="the transformers Swinv2 config shape")
    p.add_argument("--dtype", default="fp16", choices=list(DTYPES), help="autocast dtype (fp32: no autocast)")
    p.add_argument("--batch", type=int, default=None, help="images per batch (default 64; 2 on the CPU)")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches before timing (>= 1)")
    p.add_argument("--iters", type=int, default=10, help="timed batches per method")
    p.add_argument("--no-graphs", action="store_true", help="skip 'patched + CUDA graphs'")
    p.add_argument("--no-qkv", action="store_true", help="skip the q/k/v projection timings")
    p.add_argument("--seed", type=int, default=0, help="weights and images seed")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks"))
    p.add_argument("--tiny", action="store_true", help="the CPU smoke test: tiny configs, batch 2, fp32, CPU")
    args = p.parse_args(argv)
    args.libraries = [s.strip() for s in args.libraries.split(",") if s.strip()]
    unknown = set(args.libraries) - {"timm", "transformers"}
    if unknown or not args.libraries:
        raise UserError(f"--libraries: expected a comma list of timm, transformers; got {sorted(unknown) or 'none'}")
    if args.warmup < 1 or args.iters < 1:
        raise UserError("--warmup and --iters must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cpu = args.tiny or not torch.cuda.is_available()
    device = torch.device("cpu" if cpu else "cuda")
    if cpu:
        args.dtype, args.batch = "fp32", args.batch or 2
    args.batch = args.batch or 64
    meta = environment(device)
    log(f"device: {meta['device']}; {meta['versions']}")
    rows, qkv = [], []
    for library in args.libraries:
        if library == "timm":
            spec, name = (TIMM_TINY, "tiny w8") if cpu else (args.timm_model, args.timm_model)
            model = build_timm(spec, args.seed).to(device)
        else:
            key = "tiny" if cpu else args.hf_config
            name = f"Swinv2 {key} w{HF_CONFIGS[key]['window_size']}"
            model = build_transformers(HF_CONFIGS[key], args.seed).to(device)
        rows += bench_library(library, model, name, args, device)
        if library == "transformers" and not args.no_qkv:
            qkv = bench_qkv(model.swinv2, args, device)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    slug = "cpu" if cpu else re.sub(r"[^a-z0-9]+", "-", meta["device"].lower()).strip("-")
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, f"adapters_{slug}")
    with open(base + ".md", "w") as f:
        f.write(markdown(meta, rows, qkv))
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "qkv": qkv}, f, indent=1)
    log(markdown(meta, rows, qkv))
    log(f"wrote {base}.md and {base}.json")
    return 0


if __name__ == "__main__":
    run_main(main)
