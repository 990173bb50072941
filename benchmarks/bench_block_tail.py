#!/usr/bin/env python3
"""A SwinV2 block's tail (both res-post-norm steps and the MLP) as one kernel against today's three launches.

    python benchmarks/bench_block_tail.py [--configs 128x64x8x2,64x64x8x2] [--no-model] [--out FILE.md]

Part 1, at the SwinV2-B/384 batch-64 shapes of each stage (tokens, C, 4C), fp16 autocast: the current tail
(``residual_steps`` around ``mlp_forward``: a LayerNorm pass, fc1 with cuBLASLt's GELU, fc2, a LayerNorm pass)
against ``block_tail``'s kernel with each ``--configs`` entry (BLOCK_M x BLOCK_H x warps x stages), with the
relative L2 error of each against float64 (erf GELU, no rounding) on the first 4096 rows. Part 2: the whole
SwinV2-B/384 at batch 64 (eager, no CUDA graphs, trained-like weights), the fused tail on (the defaults:
``BLOCK_TAIL_MAX_C``, ``BLOCK_TAIL_WIDE_ROWS``) against off (both 0), alternating in one process, and the official
math; logits against the official math's. Medians of ``triton.testing.do_bench`` (part 1) and of CUDA-event
timings (part 2), on seeded random inputs. Needs CUDA.
"""
import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from swin_config import UserError, rel_l2, run_main, trained_like_  # noqa: E402
import flash_bias_triton as fb  # noqa: E402  (swin_config puts the repository root on sys.path)
from bench_gelu_epilogue import median_ms, print_table  # noqa: E402  (this script's folder is on sys.path)

# (tokens, C) per stage of SwinV2-B/384 at batch 64: 96x96, 48x48, 24x24, 12x12 tokens per image
STAGES = ((589824, 128), (147456, 256), (36864, 512), (9216, 1024))
REFERENCE_ROWS = 4096


def parse_configs(text: str, option: str = "--configs", fields: str = "BLOCK_MxBLOCK_HxWARPSxSTAGES"):
    """[(BLOCK_M, BLOCK_H, num_warps, num_stages)] of "128x64x8x2,64x64x8x2": tuples of as many ints as fields
    names."""
    try:
        configs = [tuple(int(v) for v in item.split("x")) for item in text.split(",")]
    except ValueError:
        configs = []
    if not configs or any(len(c) != len(fields.split("x")) for c in configs):
        raise UserError(f"{option}: {text!r} is not a comma list of {fields}")
    return configs


class OfficialMlp(torch.nn.Module):
    """The official files' Mlp (fc1, erf GELU, fc2) in float16, seeded weights of trained-like scale."""

    def __init__(self, C: int, g: torch.Generator):
        super().__init__()
        self.fc1, self.act, self.fc2 = torch.nn.Linear(C, 4 * C), torch.nn.GELU(), torch.nn.Linear(4 * C, C)
        with torch.no_grad():
            for fc in (self.fc1, self.fc2):
                fc.weight.copy_(torch.randn(fc.weight.shape, generator=g) / fc.in_features ** 0.5)
                fc.bias.copy_(0.1 * torch.randn(fc.out_features, generator=g))
        self.half().cuda().eval()

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def tail_inputs(M: int, C: int):
    g = torch.Generator().manual_seed(C)
    norms = [torch.nn.LayerNorm(C) for _ in range(2)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(0.5 + 0.1 * torch.randn(C, generator=g))
            norm.bias.copy_(0.1 * torch.randn(C, generator=g))
    x = (3 * torch.randn(M, C, generator=g)).cuda()
    attn_out = (2 * torch.randn(M, C, generator=g) + 0.5).half().cuda()
    return x, attn_out, norms[0].cuda(), OfficialMlp(C, g), norms[1].cuda()


def reference64(x, attn_out, norm1, mlp, norm2):
    """The tail in float64 with the erf GELU, no rounding."""
    def post_norm(residual, branch, norm):
        return residual + F.layer_norm(branch.double(), (x.shape[-1],), norm.weight.double(), norm.bias.double(),
                                       norm.eps)
    x1 = post_norm(x.double(), attn_out, norm1)
    hidden = F.gelu(F.linear(x1, mlp.fc1.weight.double(), mlp.fc1.bias.double()))
    return post_norm(x1, F.linear(hidden, mlp.fc2.weight.double(), mlp.fc2.bias.double()), norm2)


def bench_stages(configs, lines):
    import triton.testing
    lines += ["| tokens, C | path | ms | vs current | TFLOP/s | rel. L2 to float64 |", "|---|---|---:|---:|---:|---:|"]
    default_config = fb._block_tail_config
    for M, C in STAGES:
        args = tail_inputs(M, C)
        rows = slice(0, REFERENCE_ROWS)
        with torch.no_grad():
            ref = reference64(*(a[rows] if isinstance(a, torch.Tensor) else a for a in args))

        def run(fused):
            with torch.no_grad(), torch.autocast("cuda", torch.float16):
                return fb.block_tail(*args) if fused else fb.residual_steps(
                    args[0], args[1], args[2], lambda x1: fb.mlp_forward(args[3], x1), args[4])
        fb.BLOCK_TAIL_MAX_C = fb.BLOCK_TAIL_WIDEST_C = C   # every width, the widest the defaults refuse included
        paths = [("current", None)] + [("fused " + "x".join(map(str, c)), c) for c in configs]
        base_ms = None
        for name, config in paths:
            fb._block_tail_config = default_config if config is None else (lambda C, config=config: config)
            try:
                out = run(config is not None)[0]
                ms = triton.testing.do_bench(lambda: run(config is not None), warmup=10, rep=60)
            except Exception as e:  # noqa: BLE001 -- a config over the shared memory or registers: say so, go on
                lines.append(f"| {M}, {C} | {name} | failed: {type(e).__name__} | | | |")
                continue
            base_ms = base_ms or ms
            lines.append(f"| {M}, {C} | {name} | {ms:.3f} | {base_ms / ms:.2f} | {4 * M * C * 4 * C / ms / 1e9:.0f} "
                         f"| {rel_l2(out[rows], ref):.1e} |")
            print(lines[-1], flush=True)
        del args, ref
        torch.cuda.empty_cache()
    fb._block_tail_config = default_config


def bench_model(lines, rounds=3, iters=10):
    import swin_transformer_v2 as swin
    from swin_config import load_config, model_kwargs
    torch.manual_seed(0)
    model = trained_like_(swin.SwinTransformerV2(**model_kwargs(load_config(embedded="swinv2_b_384")))).cuda().eval()
    model.set_flash_bias(cuda_graphs=False)
    x = torch.randn(64, 3, 384, 384, device="cuda")

    def forward():
        with torch.no_grad(), torch.autocast("cuda", torch.float16):
            return model(x)
    settings = {"on": (fb.BLOCK_TAIL_MAX_C, fb.BLOCK_TAIL_WIDE_ROWS), "off": (0, 0)}
    times, logits = {"on": [], "off": []}, {}
    for _ in range(rounds):
        for setting in times:
            fb.BLOCK_TAIL_MAX_C, fb.BLOCK_TAIL_WIDE_ROWS = settings[setting]
            logits[setting] = forward().float()
            times[setting].append(median_ms(forward, iters))   # after its own 5 warm-ups
    model.set_flash_bias(fused=False)
    official = forward().float()
    official_ms = median_ms(forward, max(3, iters // 2))
    lines += ["", "| SwinV2-B/384, batch 64, eager | ms (per round) | vs official | logits rel. L2 to official "
              "| top-1 |", "|---|---|---:|---:|---:|"]
    for setting, name in (("on", f"fused tail (C <= {settings['on'][0]})"), ("off", "separate passes")):
        ms = statistics.median(times[setting])
        agree = (logits[setting].argmax(1) == official.argmax(1)).float().mean().item()
        rounds = ", ".join(f"{t:.2f}" for t in times[setting])
        lines.append(f"| {name} | {ms:.2f} ({rounds}) | {official_ms / ms:.2f} "
                     f"| {rel_l2(logits[setting], official):.1e} | {agree:.3f} |")
    lines.append(f"| official math | {official_ms:.2f} | 1.00 | | |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="64x64x4x2,32x64x4x2,16x64x4x2,128x64x8x2",
                   help="the fused kernel's BLOCK_MxBLOCK_HxWARPSxSTAGES to time, comma separated")
    p.add_argument("--no-model", action="store_true", help="skip the whole-model part")
    p.add_argument("--out", help="markdown table to write")
    args = p.parse_args(argv)
    configs = parse_configs(args.configs)
    if not torch.cuda.is_available():
        raise UserError("this benchmark needs CUDA")
    lines = [f"Block tail, fp16 autocast, {torch.cuda.get_device_name()}, torch {torch.__version__}", ""]
    defaults = fb.BLOCK_TAIL_MAX_C, fb.BLOCK_TAIL_WIDE_ROWS, fb.BLOCK_TAIL_WIDEST_C
    try:
        bench_stages(configs, lines)
        if not args.no_model:
            bench_model(lines)
    finally:
        fb.BLOCK_TAIL_MAX_C, fb.BLOCK_TAIL_WIDE_ROWS, fb.BLOCK_TAIL_WIDEST_C = defaults
    print_table(lines, args.out)
    return 0


if __name__ == "__main__":
    run_main(main)
