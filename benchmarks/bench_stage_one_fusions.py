#!/usr/bin/env python3
"""Two fusions at SwinV2-B/384 batch 64, fp16 autocast, each against the launches it replaces.

    python benchmarks/bench_stage_one_fusions.py [--embed-configs 64x4,128x8] [--tail-configs 64x64x4x2]
                                                 [--out FILE.md]

Part 1, the patch embedding (``patch_embed_forward``): the gathering copy, cuBLAS matmul and LayerNorm pass
(the kernel off: ``PATCH_EMBED_MAX_C = 0``) against the one kernel with each ``--embed-configs`` entry
(BLOCK_M x warps). Part 2, a stage-1 block's tail: the output projection's matmul (without its bias, which the tail
then adds) followed by ``block_tail``'s kernel, against the kernel applying the projection itself (``attn_proj``),
each ``--tail-configs`` entry (BLOCK_M x BLOCK_H x warps x stages), its GELU by exp2 and by tanh.approx
(``BLOCK_TAIL_TANH_APPROX``). Medians of ``triton.testing.do_bench`` on seeded
random inputs; the relative L2 error of each path against float64 (no rounding, erf GELU) on the first images /
4096 rows. Needs CUDA.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from swin_config import UserError, rel_l2, run_main  # noqa: E402
import flash_bias_triton as fb  # noqa: E402  (swin_config puts the repository root on sys.path)
from bench_block_tail import parse_configs, reference64, tail_inputs  # noqa: E402
from bench_gelu_epilogue import print_table  # noqa: E402

BATCH, IMAGE, PATCH, EMBED = 64, 384, 4, 128   # SwinV2-B/384: 96 x 96 patches of 128 features
REFERENCE_ROWS = 4096


def timed(fn):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")


def embed_case():
    from swin_transformer_v2 import PatchEmbed
    g = torch.Generator().manual_seed(1)
    embed = PatchEmbed(IMAGE, PATCH, 3, EMBED, norm_layer=torch.nn.LayerNorm)
    with torch.no_grad():
        embed.proj.weight.copy_(torch.randn(embed.proj.weight.shape, generator=g) / 48 ** 0.5)
        embed.proj.bias.copy_(0.1 * torch.randn(EMBED, generator=g))
        embed.norm.weight.copy_(0.5 + 0.1 * torch.randn(EMBED, generator=g))
        embed.norm.bias.copy_(0.1 * torch.randn(EMBED, generator=g))
    return embed.cuda().eval(), torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g).cuda()


def bench_patch_embed(configs, lines):
    embed, x = embed_case()
    with torch.no_grad():
        conv, norm = embed.proj, embed.norm
        ref = F.layer_norm(F.conv2d(x[:2].double(), conv.weight.double(), conv.bias.double(), conv.stride)
                           .flatten(2).transpose(1, 2), (EMBED,), norm.weight.double(), norm.bias.double(), norm.eps)

    def run():
        with torch.no_grad(), torch.autocast("cuda", torch.float16):
            return fb.patch_embed_forward(embed, x)[0]
    lines += ["| patch embedding (64, 3, 384, 384) -> (64, 9216, 128) | ms | vs separate | rel. L2 to float64 |",
              "|---|---:|---:|---:|"]
    defaults = fb.PATCH_EMBED_MAX_C, fb.PATCH_EMBED_CONFIG
    try:
        fb.PATCH_EMBED_MAX_C = 0
        base = timed(run)
        lines.append(f"| gathering copy, matmul, LayerNorm pass | {base:.3f} | 1.00 | {rel_l2(run()[:2], ref):.1e} |")
        fb.PATCH_EMBED_MAX_C = defaults[0]
        for config in configs:
            fb.PATCH_EMBED_CONFIG = config
            ms = timed(run)
            lines.append(f"| one kernel, {config[0]} rows, {config[1]} warps | {ms:.3f} | {base / ms:.2f} "
                         f"| {rel_l2(run()[:2], ref):.1e} |")
            print(lines[-1], flush=True)
    finally:
        fb.PATCH_EMBED_MAX_C, fb.PATCH_EMBED_CONFIG = defaults
    del embed, x


def projection(C: int):
    g = torch.Generator().manual_seed(2)
    proj = torch.nn.Linear(C, C)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(C, C, generator=g) / C ** 0.5)
        proj.bias.copy_(0.2 * torch.randn(C, generator=g))
    return proj.half().cuda()


def bench_tail(configs, lines, M=BATCH * (IMAGE // PATCH) ** 2, C=EMBED):
    x, attn_in, norm1, mlp, norm2 = tail_inputs(M, C)
    proj = projection(C)
    rows = slice(0, REFERENCE_ROWS)
    with torch.no_grad():
        projected = F.linear(attn_in[rows].double(), proj.weight.double(), proj.bias.double())
        ref = reference64(x[rows], projected, norm1, mlp, norm2)
    with torch.no_grad(), torch.autocast("cuda", torch.float16):
        projected_in = proj(attn_in)

    def separate():
        """The launches the block made before: the projection's matmul without its bias (its output unused here), then
        the tail kernel on the projected output (which added that bias: one (C,) load a program, left out here)."""
        with torch.no_grad(), torch.autocast("cuda", torch.float16):
            F.linear(attn_in, proj.weight)
            return fb.block_tail(x, projected_in, norm1, mlp, norm2)[0]

    def fused():
        with torch.no_grad(), torch.autocast("cuda", torch.float16):
            return fb.block_tail(x, attn_in, norm1, mlp, norm2, attn_proj=proj)[0]
    lines += ["", f"| stage-1 block tail ({M} rows, C = {C}) | ms | vs separate | rel. L2 to float64 |",
              "|---|---:|---:|---:|"]
    base = timed(separate)
    lines.append(f"| projection matmul, then the tail kernel | {base:.3f} | 1.00 "
                 f"| {rel_l2(separate()[rows], ref):.1e} |")
    default_config, default_gelu = fb._block_tail_config, fb.BLOCK_TAIL_TANH_APPROX
    try:
        for tanh_approx in (False, True):
            fb.BLOCK_TAIL_TANH_APPROX = tanh_approx
            for config in configs:
                fb._block_tail_config = lambda C, config=config: config
                ms = timed(fused)
                lines.append(f"| the tail kernel with the projection, {'x'.join(map(str, config))}, GELU by "
                             f"{'tanh.approx' if tanh_approx else 'exp2'} | {ms:.3f} | {base / ms:.2f} "
                             f"| {rel_l2(fused()[rows], ref):.1e} |")
                print(lines[-1], flush=True)
    finally:
        fb._block_tail_config, fb.BLOCK_TAIL_TANH_APPROX = default_config, default_gelu


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embed-configs", default="32x4,64x4,16x4,32x2,16x2",
                   help="the patch-embedding kernel's BLOCK_MxWARPS to time, comma separated")
    p.add_argument("--tail-configs", default="64x64x4x3,64x64x4x2,128x64x8x3",
                   help="the tail kernel's BLOCK_MxBLOCK_HxWARPSxSTAGES to time, comma separated")
    p.add_argument("--out", help="markdown table to write")
    args = p.parse_args(argv)
    embed_configs = parse_configs(args.embed_configs, "--embed-configs", "BLOCK_MxWARPS")
    tail_configs = parse_configs(args.tail_configs, "--tail-configs")
    if not torch.cuda.is_available():
        raise UserError("this benchmark needs CUDA")
    lines = [f"SwinV2-B/384 batch 64 fusions, fp16 autocast, {torch.cuda.get_device_name()}, torch {torch.__version__}",
             ""]
    bench_patch_embed(embed_configs, lines)
    bench_tail(tail_configs, lines)
    print_table(lines, args.out)
    return 0


if __name__ == "__main__":
    run_main(main)
