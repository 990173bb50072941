#!/usr/bin/env python3
"""Probes of where a SwinV2-B/384 forward (batch 64, fp16) could still lose time: each prices one candidate change
before it is built, on the real shapes.

    python benchmarks/bench_probes.py [--out FILE.md]

- **The bias gather** (``_bias_from_table_fwd``, 215 us for 191 MB at stage 3 on an H100, 0.9 TB/s, when it took
  each element's sigmoid): that gather against the committed one, of a table whose sigmoid (and centring) cpb_table
  took (``sigmoid_scale``), and against gathers of a float16 table, other tile widths and warps, and the write floor
  (a fill of the same bytes). The last column says whether a variant's bias equals the per-element sigmoid's.
- **The weight refresh beside attention:** the half-precision weight copies' refresh (one multi-tensor copy, 0.20 ms
  a forward) alone, a stage-1 shifted attention call alone, the two on one stream, and the refresh on a second
  stream beside the attention: what refreshing the later stages' weights during the first stages could save.
- **cuBLAS's memsets:** how many memsets torch.profiler sees around a stage-3 fc1 (with its GELU epilogue and plain),
  with fp16 reduced-precision reductions allowed and not, and the two matmuls' times.

Medians of 25 samples of 10 back-to-back calls between CUDA events, after warm-up. Needs CUDA.
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from swin_config import UserError, build_model, call_ms, load_config, run_main, trained_like_  # noqa: E402
import flash_bias_runtime as runtime  # noqa: E402  (swin_config puts the repository root on sys.path)
import flash_bias_triton as fb  # noqa: E402
from bench_gelu_epilogue import print_table  # noqa: E402

DEVICE = torch.device("cuda")


def median_ms(fn, samples=25, calls=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    return statistics.median(call_ms(fn, DEVICE, samples, calls))


def gather(tables, indices, sigmoid_scale, center, block_cols=None, warps=4):
    """_bias_from_table_launch's launch with the tile width and warps given: (L, H, N, N) float16."""
    tables, indices = fb._one_layout(tables), fb._one_layout(indices)
    table, index = tables[0], indices[0]
    heads, (rows, cols) = table.shape[1], index.shape
    out = torch.empty((len(tables), heads, rows, cols), device=DEVICE, dtype=torch.float16)
    heads_pad = max(2, fb._next_pow2(heads))
    block_cols = block_cols or max(16, min(fb._next_pow2(cols), 2048 // heads_pad))
    fb._bias_from_table_fwd[(rows, len(tables))](
        fb._stacked(tables), fb._stacked(indices), out, table.stride(0), table.stride(1), index.stride(0),
        index.stride(1), out.stride(0), out.stride(1), out.stride(2), table.shape[0], float(sigmoid_scale or 1.0),
        COLS=cols, HEADS=heads, HEADS_PAD=heads_pad, LAYERS=len(tables), SIGMOID=sigmoid_scale is not None,
        CENTER=center, BLOCK_COLS=block_cols, DEPENDENT=False, num_warps=warps)
    return out


def bias_gather_rows(model):
    """One row per stage and variant: (probe, variant, us, TB/s, bits)."""
    rows = []
    for s, layer in enumerate(model.layers):
        attns = [blk.attn for blk in layer.blocks]
        mlps = [tuple(a.cpb_mlp) for a in attns]
        mlp_args = ([a.relative_coords_table.reshape(-1, 2) for a in attns], [m[0].weight for m in mlps],
                    [m[0].bias for m in mlps], [m[2].weight for m in mlps])
        tables = list(fb.cpb_table(*mlp_args, backend="triton"))
        indices = [a.relative_position_index for a in attns]
        per_element = gather(tables, indices, 16.0, True)
        sigmoid32 = list(fb.cpb_table(*mlp_args, sigmoid_scale=16.0, center_rows=True, backend="triton"))
        sigmoid16 = [t.half() for t in sigmoid32]
        variants = [("derive_biases (cpb_table + gather, committed)",
                     lambda: attns[0].derive_biases(attns, center_rows=True, dtype=torch.float16)),
                    ("gather, sigmoid per element (before)", lambda: gather(tables, indices, 16.0, True)),
                    ("gather of the sigmoid'd float32 table (committed)",
                     lambda: gather(sigmoid32, indices, None, False)),
                    ("gather of a sigmoid'd float16 table", lambda: gather(sigmoid16, indices, None, False)),
                    ("sigmoid per element, 8 warps", lambda: gather(tables, indices, 16.0, True, warps=8)),
                    ("float16 table, 8 warps", lambda: gather(sigmoid16, indices, None, False, warps=8)),
                    ("float16 table, 256 columns", lambda: gather(sigmoid16, indices, None, False, block_cols=256)),
                    ("float16 table, 64 columns", lambda: gather(sigmoid16, indices, None, False, block_cols=64)),
                    ("write floor: a fill of the bytes", lambda: per_element.fill_(1.0))]
        megabytes = per_element.numel() * 2 / 1e6
        for name, fn in variants:
            ms = median_ms(fn)
            out = None if "floor" in name or "derive" in name else fn()
            bits = "" if out is None else "equal" if torch.equal(out, per_element) else \
                f"differ (max {(out.float() - per_element.float()).abs().max().item():.2g})"
            rows.append((f"bias gather, stage {s + 1}", name, f"{ms * 1e3:.1f}", f"{megabytes / ms / 1e3:.2f}", bits))
    return rows


def refresh_rows(model):
    """The weight refresh alone, stage-1 shifted attention alone, both on one stream, and side by side."""
    copies = runtime._LinearWeightCopies(model, torch.float16)
    block = model.layers[0].blocks[1]
    attn = block.attn
    (height, width), heads, dim = block.input_resolution, attn.num_heads, attn.dim
    g = torch.Generator(device=DEVICE).manual_seed(0)
    qkv = torch.randn(64, height * width, 3 * dim, device=DEVICE, generator=g).half()
    bias = attn.derive_bias(center_rows=True, dtype=torch.float16)

    def attention():
        fb.flash_bias_attention(qkv, heads, attn.logit_scale, bias=bias, region_ids=block.region_ids,
                                image_size=(height, width), window_size=tuple(attn.window_size),
                                shift_size=block.shift_size)
    side = torch.cuda.Stream()

    def beside():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            copies.refresh()
        attention()
        torch.cuda.current_stream().wait_stream(side)
    times = {name: median_ms(fn) for name, fn in (("refresh alone", copies.refresh), ("attention alone", attention),
                                                  ("refresh, then attention", lambda: (copies.refresh(), attention())),
                                                  ("refresh beside attention (2 streams)", beside))}
    saved = times["refresh, then attention"] - times["refresh beside attention (2 streams)"]
    return [("weight refresh", name, f"{ms * 1e3:.1f}", "", f"saves {saved * 1e3:.1f} us" if "beside" in name else "")
            for name, ms in times.items()]


def memset_rows():
    """Memsets torch.profiler sees around a stage-3 fc1 with and without fp16 reduced-precision reductions."""
    from torch.profiler import ProfilerActivity, profile
    h = torch.randn(36864, 512, device=DEVICE).half()
    weight, bias = torch.randn(2048, 512, device=DEVICE).half(), torch.randn(2048, device=DEVICE).half()
    matmuls = (("fc1 + GELU epilogue", lambda: torch._addmm_activation(bias, h, weight.t(), use_gelu=True)),
               ("fc1 plain", lambda: torch.nn.functional.linear(h, weight)))
    rows, default = [], torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
    try:
        for allowed in (True, False):
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = allowed
            for name, fn in matmuls:
                ms = median_ms(fn)
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    fn()
                    torch.cuda.synchronize()
                names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
                memsets = sum("memset" in n.lower() for n in names)
                rows.append(("cuBLAS memsets", f"{name}, reduced-precision reductions {allowed}", f"{ms * 1e3:.1f}",
                             "", f"{memsets} memsets in {len(names)} GPU events"))
    finally:
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = default
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="markdown table to write")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise UserError("this benchmark needs CUDA")
    model = trained_like_(build_model(load_config(embedded="b384")), 0).eval().to(DEVICE).requires_grad_(False)
    lines = [f"SwinV2-B/384 probes, {torch.cuda.get_device_name()}, torch {torch.__version__}", "",
             "| probe | variant | us | TB/s | |", "|---|---|---:|---:|---|"]
    with torch.no_grad():
        for rows in (bias_gather_rows, refresh_rows, lambda _: memset_rows()):
            for row in rows(model):
                lines.append("| " + " | ".join(row) + " |")
                print(lines[-1], flush=True)
    print_table(lines, args.out)
    return 0


if __name__ == "__main__":
    run_main(main)
