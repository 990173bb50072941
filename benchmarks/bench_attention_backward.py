#!/usr/bin/env python3
"""Time forward + backward of one SwinV2 window-attention call at SwinV2-B/384 training shapes (CUDA only).

    python benchmarks/bench_attention_backward.py [--shapes train-s1-shift,train-s1,train-s3] [--out FILE.md]

Variants, each the forward and the backward of sum(out * g), gradients to qkv, logit_scale and the bias:

* reference: ``attention_reference`` (float32 math, the official SwinV2's), autograd;
* SDPA: ``F.scaled_dot_product_attention`` on normalised q and k, the bias + shift mask as a dense float
  attn_mask that requires grad (so PyTorch must compute d bias too);
* kernel partial / kernel atomic: ``flash_bias_attention`` in the image layout (the cyclic shift and the
  window partition inside the kernel), d bias by FLASHBIAS_BIAS_GRAD=partial or atomic.

The reference and SDPA take the window layout, already shifted and partitioned (untimed). Inputs are
random q/k/v (float16) and a trained-like SwinV2 bias (bench_attention.make_case), never zeros. Times are
medians of triton.testing.do_bench (CUDA events) after its warm-up. Each kernel's d qkv and d bias are also
compared with the reference's (relative L2 error). Without CUDA: ``error: ...``, exit 2.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_attention as ba  # noqa: E402  (puts scripts/ and the repository root on sys.path)
from swin_config import UserError, run_main  # noqa: E402
import flash_bias_triton as fb  # noqa: E402

# name: (batch, image side in tokens, window, heads, head_dim, shifted, pretrained window), as ba.SHAPES
TRAIN_SHAPES = {
    "train-s1-shift": (16, 96, 24, 4, 32, True, 12),   # SwinV2-B/384 stage 1, shift 12: 256 windows of N=576
    "train-s1": (16, 96, 24, 4, 32, False, 12),        # the same, unshifted
    "train-s3": (16, 24, 24, 16, 32, False, 12),       # stage 3: one window per image, 16 heads
}


def leaves(c: ba.Case, qkv: torch.Tensor):
    return (qkv.detach().clone().requires_grad_(True), c.logit_scale.detach().clone().requires_grad_(True),
            c.bias.detach().clone().requires_grad_(True))


def reference_variant(c: ba.Case):
    qkv, logit_scale, bias = inputs = leaves(c, c.win_qkv)
    return inputs, lambda: fb.attention_reference(qkv, c.H, logit_scale, bias, region_ids=c.region_ids)


def sdpa_variant(c: ba.Case):
    qkv, logit_scale, bias = inputs = leaves(c, c.win_qkv)
    B, nW, H, N, d = c.B, c.nW, c.H, c.N, c.d
    mask = fb.region_mask(c.region_ids)[:, None] if c.region_ids is not None else 0

    def run():
        q, k, v = qkv.view(c.Bw, N, 3, H, d).permute(2, 0, 3, 1, 4)
        scale = logit_scale.clamp(max=fb.MAX_LOGIT_SCALE).exp()
        q = (F.normalize(q.float(), dim=-1) * scale).to(v.dtype)
        k = F.normalize(k.float(), dim=-1).to(v.dtype)
        # windows and heads share one batch axis so that the (nW*H, N, N) mask broadcasts over images
        attn_mask = (bias[None] + mask).to(v.dtype).expand(nW, H, N, N).reshape(1, nW * H, N, N)
        o = F.scaled_dot_product_attention(q.reshape(B, nW * H, N, d), k.reshape(B, nW * H, N, d),
                                           v.reshape(B, nW * H, N, d), attn_mask=attn_mask, scale=1.0)
        return o.reshape(c.Bw, H, N, d).transpose(1, 2).reshape(c.Bw, N, c.C)
    return inputs, run


def kernel_variant(c: ba.Case, design: str):
    qkv, logit_scale, bias = inputs = leaves(c, c.img_qkv)

    def run():
        os.environ["FLASHBIAS_BIAS_GRAD"] = design     # read at the forward that records the backward
        return fb.flash_bias_attention(qkv, c.H, logit_scale, bias, region_ids=c.region_ids,
                                       image_size=(c.side, c.side), window_size=(c.window, c.window),
                                       shift_size=c.shift, backend="triton")
    return inputs, run


def do_bench(step, inputs) -> float:
    import triton
    return triton.testing.do_bench(step, warmup=25, rep=200, grad_to_none=list(inputs), return_mode="median")


def measure(shape: str, seed: int, dev: str = "cuda", timer=do_bench):
    """[(variant, ms, d qkv error, d bias error)] of one shape, printed as it goes."""
    ba.SHAPES[shape] = TRAIN_SHAPES[shape]
    c = ba.make_case(shape, 1, seed, dev, torch.float16)
    gen = torch.Generator(device=dev).manual_seed(seed + 1)
    g_win = torch.randn(c.Bw, c.N, c.C, device=dev, generator=gen, dtype=torch.float16)
    g_img = fb._from_windows(g_win, (c.side, c.side), (c.window, c.window), c.shift).contiguous()
    variants = [("reference", reference_variant(c), g_win), ("SDPA dense mask", sdpa_variant(c), g_win),
                ("kernel partial", kernel_variant(c, "partial"), g_img),
                ("kernel atomic", kernel_variant(c, "atomic"), g_img)]
    rows, ref_grads = [], None
    for label, (inputs, run), grad_out in variants:
        def step():
            run().backward(grad_out)
        step()
        grads = [t.grad.detach().float().clone() for t in inputs]
        if label.startswith("kernel"):    # back to the window layout to compare d qkv
            grads[0] = fb._to_windows(grads[0], (c.side, c.side), (c.window, c.window), c.shift)
        ref_grads = ref_grads or grads
        errors = [((g - r).norm() / r.norm()).item() for g, r in zip(grads, ref_grads)]
        ms = timer(step, inputs)
        rows.append((label, ms, errors[0], errors[2]))
        print(f"{shape:15s} {label:16s} {ms:8.3f} ms   d qkv err {errors[0]:.1e}   d bias err {errors[2]:.1e}",
              flush=True)
        del inputs, run, step
        if dev == "cuda":
            torch.cuda.empty_cache()
    return rows


def table(results) -> str:
    lines = ["| shape | variant | fwd+bwd ms | x reference | x SDPA | d qkv err | d bias err |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for shape, rows in results:
        ref_ms, sdpa_ms = rows[0][1], rows[1][1]
        for label, ms, e_qkv, e_bias in rows:
            lines.append(f"| {shape} | {label} | {ms:.3f} | {ref_ms / ms:.2f}x | {sdpa_ms / ms:.2f}x | "
                         f"{e_qkv:.1e} | {e_bias:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(TRAIN_SHAPES), help=f"comma list of {', '.join(TRAIN_SHAPES)}")
    p.add_argument("--out", help="also write the markdown table here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise UserError("bench_attention_backward.py times CUDA kernels and needs a GPU; none is visible")
    unknown = [s for s in args.shapes.split(",") if s not in TRAIN_SHAPES]
    if unknown:
        raise UserError(f"--shapes: unknown {unknown}; have {', '.join(TRAIN_SHAPES)}")
    device = torch.cuda.get_device_name()
    print(f"device {device}, torch {torch.__version__}; float16; ratios: reference (or SDPA) ms / variant ms")
    results = [(shape, measure(shape, args.seed)) for shape in args.shapes.split(",")]
    md = table(results)
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# Attention forward + backward, {device}\n\n{md}\n")
        print("wrote", args.out)
    return 0


if __name__ == "__main__":
    run_main(main)
