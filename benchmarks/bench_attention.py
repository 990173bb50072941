#!/usr/bin/env python3
"""Time one SwinV2 window-attention call, every way we know, at real SwinV2 shapes.

    python benchmarks/bench_attention.py [--out benchmarks/attention_<device>.md] [--shapes b384-s1,b384-s3,...]

For each shape: time (median, CUDA events via triton.testing.do_bench), TFLOP/s (4·N²·d per window and
head, the two matrix products), peak memory above the inputs, and error against a float32 reference,
for: the official math, SDPA with the dense bias+mask as attn_mask, SDPA on concatenated
[q, q_bias] / [k, k_bias] (the FlashBias README recipe, mask as one-hot columns), FlexAttention with a
score_mod, SDPA with no bias (a wrong answer: the speed floor), and this kernel (exact, low-rank;
window layout, and image layout which also does the cyclic shift and window partition).

Inputs are random q/k/v and the relative-position bias of a trained-like SwinV2 attention layer
(scripts/swin_config.trained_like_bias, the weights the model benchmark and the tests use): never
zeros. Without a GPU it runs every variant but FlexAttention once on one small shape in float32, to
show they work. Exits 1 if a variant failed.
"""
import argparse
import datetime
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from swin_config import UserError, run_main, trained_like_bias  # noqa: E402  (puts ROOT on sys.path)
import flash_bias_factors as fbf  # noqa: E402
import flash_bias_triton as fb  # noqa: E402

# name: (batch, image side in tokens, window, heads, head_dim, shifted, pretrained window)
SHAPES = {
    "b384-s1": (64, 96, 24, 4, 32, True, 12),     # SwinV2-B/384 stage 1, shifted: B*nW=1024, N=576
    "b384-s3": (64, 24, 24, 16, 32, False, 12),   # SwinV2-B/384 stage 3 (window = resolution): B*nW=64
    "t256-s1": (64, 64, 8, 3, 32, True, 0),       # SwinV2-T/256 window 8, stage 1 shifted: B*nW=4096, N=64
    "t256-s3": (64, 16, 8, 12, 32, True, 0),      # SwinV2-T/256 stage 3 shifted: B*nW=256
    "cpu": (2, 16, 8, 2, 32, True, 0),
}
GPU_SHAPES = "b384-s1,b384-s3,t256-s1,t256-s3"
Variant = Tuple[str, Callable[[], torch.Tensor]]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=GPU_SHAPES, help=f"comma list of {', '.join(SHAPES)} (a GPU; the CPU "
                                                        f"runs 'cpu')")
    p.add_argument("--rank", type=int, default=16, help="low-rank mode's rank")
    p.add_argument("--out", help="write the markdown table here")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs and the trained-like bias")
    args = p.parse_args(argv)
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        raise UserError(f"--shapes: unknown {unknown}; have {', '.join(SHAPES)}")
    return args


# ----------------------------------------------------------------------------------------------
# One shape's inputs
# ----------------------------------------------------------------------------------------------
@dataclass
class Case:
    """The inputs of one shape, in the window layout (win_qkv and q/k/v) and the image layout (img_qkv)."""
    B: int
    side: int
    window: int
    H: int
    d: int
    shift: int
    img_qkv: torch.Tensor
    win_qkv: torch.Tensor
    logit_scale: torch.Tensor
    bias: torch.Tensor
    region_ids: Optional[torch.Tensor]
    factors: Tuple[torch.Tensor, torch.Tensor]
    factor_error: float

    @property
    def N(self) -> int:
        return self.window * self.window

    @property
    def nW(self) -> int:
        return (self.side // self.window) ** 2

    @property
    def Bw(self) -> int:
        return self.B * self.nW

    @property
    def C(self) -> int:
        return self.H * self.d

    def qkv(self):
        return self.win_qkv.view(self.Bw, self.N, 3, self.H, self.d).permute(2, 0, 3, 1, 4)

    def normalized_qk(self):
        """q scaled by exp(logit_scale) and k, both L2-normalised: SDPA's inputs with scale=1."""
        q, k, _ = self.qkv()
        scale = self.logit_scale.clamp(max=fb.MAX_LOGIT_SCALE).exp()
        return (F.normalize(q.float(), dim=-1) * scale).to(q.dtype), F.normalize(k.float(), dim=-1).to(k.dtype)


def make_case(shape: str, rank: int, seed: int, dev: str, dtype: torch.dtype) -> Case:
    B, side, window, H, d, shifted, pretrained = SHAPES[shape]
    gen = torch.Generator().manual_seed(seed)
    shift = window // 2 if shifted and side > window else 0
    img_qkv = torch.randn(B, side * side, 3 * H * d, generator=gen).to(dev, dtype)
    logit_scale = torch.empty(H, 1, 1).uniform_(math.log(5), math.log(40), generator=gen).to(dev)
    bias = trained_like_bias(H, window, pretrained, seed=seed).to(dev)
    region_ids = fb.shifted_window_region_ids(side, window, shift).to(dev) if shift else None
    # the window layout the official code feeds attention: roll, partition
    win_qkv = fb._to_windows(img_qkv, (side, side), (window, window), shift).contiguous()
    q_f, k_f, info = fbf.low_rank_bias_factors(bias, rank=min(rank, window * window))
    return Case(B, side, window, H, d, shift, img_qkv, win_qkv, logit_scale, bias, region_ids,
                (q_f.to(dev), k_f.to(dev)), info["max_logit_error"])


@torch.no_grad()
def reference(c: Case) -> torch.Tensor:
    """float32 attention_reference in chunks of 64 windows (memory)."""
    return torch.cat([fb.attention_reference(c.win_qkv[i:i + 64].float(), c.H, c.logit_scale, c.bias,
                                             region_ids=c.region_ids) for i in range(0, c.Bw, 64)])


# ----------------------------------------------------------------------------------------------
# The variants
# ----------------------------------------------------------------------------------------------
def official_variant(c: Case, cuda: bool) -> Variant:
    q, k, v = c.qkv()
    scale = c.logit_scale.clamp(max=fb.MAX_LOGIT_SCALE).exp()
    mask = fb.region_mask(c.region_ids) if c.region_ids is not None else None     # (nW, N, N) float32

    def official():
        with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            attn = attn * scale + c.bias.unsqueeze(0)
            if mask is not None:
                attn = attn.view(c.B, c.nW, c.H, c.N, c.N) + mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, c.H, c.N, c.N)
            return (attn.softmax(-1) @ v).transpose(1, 2).reshape(c.Bw, c.N, c.C)
    return "official math", official


def sdpa_variants(c: Case) -> List[Variant]:
    """SDPA with the dense bias+mask, on the FlashBias README's concatenated q/k, and with no bias."""
    q, k, v = c.qkv()
    qn, kn = c.normalized_qk()
    B, nW, H, N, d, Bw = c.B, c.nW, c.H, c.N, c.d, c.Bw
    mask = fb.region_mask(c.region_ids)[:, None] if c.region_ids is not None else 0
    # windows and heads share one batch axis so that the (nW*H, N, N) mask broadcasts over images; the
    # mask in q's dtype (SDPA wants one dtype)
    dense_mask = (c.bias[None] + mask).to(q.dtype).expand(nW, H, N, N).reshape(1, nW * H, N, N)

    def dense():
        o = F.scaled_dot_product_attention(qn.reshape(B, nW * H, N, d), kn.reshape(B, nW * H, N, d),
                                           v.reshape(B, nW * H, N, d), attn_mask=dense_mask, scale=1.0)
        return o.view(Bw, H, N, d).transpose(1, 2).reshape(Bw, N, c.C)

    # the bias as extra q/k columns; the mask folded in exactly as one-hot columns of the region ids
    q_f, k_f = (f.to(q.dtype).expand(Bw, H, N, f.shape[-1]) for f in c.factors)
    extra_q, extra_k = [q_f], [k_f]
    if c.region_ids is not None:
        onehot = F.one_hot(c.region_ids.long(), 9).to(q.dtype)                    # (nW, N, 9)
        onehot = onehot[None, :, None].expand(B, nW, H, N, 9).reshape(Bw, H, N, 9)
        extra_q.append(100 * onehot)
        extra_k.append(onehot)
    qa, ka = torch.cat([qn] + extra_q, -1), torch.cat([kn] + extra_k, -1)
    pad = (-qa.shape[-1]) % 16
    qa, ka = F.pad(qa, (0, pad)), F.pad(ka, (0, pad))
    va = F.pad(v, (0, qa.shape[-1] - d))

    def concat():
        return F.scaled_dot_product_attention(qa, ka, va, scale=1.0)[..., :d].transpose(1, 2).reshape(Bw, N, c.C)

    def floor():
        return F.scaled_dot_product_attention(qn, kn, v, scale=1.0).transpose(1, 2).reshape(Bw, N, c.C)
    rank = c.factors[0].shape[-1]
    return [("SDPA, dense bias+mask as attn_mask", dense),
            (f"SDPA on [q,q_bias]/[k,k_bias], R={rank}, mask as one-hot columns", concat),
            ("SDPA with no bias and no mask (wrong answer; the floor)", floor)]


def flex_variant(c: Case) -> Optional[Variant]:
    """FlexAttention with a score_mod reading the bias and the region ids (GPU; None where unavailable)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as e:  # older torch
        print("FlexAttention unavailable:", e)
        return None
    _, _, v = c.qkv()
    qn, kn = c.normalized_qk()
    rid = c.region_ids if c.region_ids is not None else torch.zeros(c.nW, c.N, dtype=torch.int32,
                                                                     device=c.bias.device)
    bias, nW = c.bias, c.nW

    def score_mod(score, b, h, qi, ki):
        w = b % nW
        return score + bias[h, qi, ki] + torch.where(rid[w, qi] == rid[w, ki], 0.0, fb.MASK_VALUE)
    flex = torch.compile(flex_attention)
    return ("FlexAttention, score_mod reading bias + region ids",
            lambda: flex(qn, kn, v, score_mod=score_mod, scale=1.0).transpose(1, 2).reshape(c.Bw, c.N, c.C))


IMAGE_LAYOUT = "FlashBias exact, float32 bias, image layout (shift+partition inside)"


def flash_bias_variants(c: Case) -> List[Variant]:
    common = dict(qkv=c.win_qkv, num_heads=c.H, logit_scale=c.logit_scale, region_ids=c.region_ids)
    bias16 = c.bias.half()
    return [("FlashBias exact, float32 bias (window layout)", lambda: fb.flash_bias_attention(**common, bias=c.bias)),
            ("FlashBias exact, float16 bias (window layout)", lambda: fb.flash_bias_attention(**common, bias=bias16)),
            (f"FlashBias low-rank R={c.factors[0].shape[-1]} (window layout)",
             lambda: fb.flash_bias_attention(**common, bias_factors=c.factors)),
            (IMAGE_LAYOUT,
             lambda: fb.flash_bias_attention(c.img_qkv, c.H, c.logit_scale, bias=c.bias, region_ids=c.region_ids,
                                             image_size=(c.side, c.side), window_size=(c.window, c.window),
                                             shift_size=c.shift))]


def all_variants(c: Case, cuda: bool) -> List[Variant]:
    sdpa = sdpa_variants(c)
    flex = flex_variant(c) if cuda else None
    return [official_variant(c, cuda)] + sdpa[:2] + ([flex] if flex else []) + sdpa[2:] + flash_bias_variants(c)


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def time_variant(fn: Callable[[], torch.Tensor], cuda: bool) -> Tuple[float, float]:
    """(median ms, peak MiB above what was allocated before; NaN on the CPU)."""
    if not cuda:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3, float("nan")
    import triton
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
    return ms, (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def measure_shape(shape: str, args, dev: str, cuda: bool) -> Tuple[list, int]:
    """([(shape, label, ms, TFLOP/s, peak MiB, rel. error)], failed variants) of one shape, printed as it goes."""
    c = make_case(shape, args.rank, args.seed, dev, torch.float16 if cuda else torch.float32)
    ref = reference(c)
    flops = 4 * c.Bw * c.H * c.N * c.N * c.d
    print(f"\n{shape}: B*nW={c.Bw} H={c.H} N={c.N} d={c.d} shift={c.shift} (low-rank R={c.factors[0].shape[-1]}: "
          f"bias max logit error {c.factor_error:.3f})", flush=True)
    rows, failed = [], 0
    for label, fn in all_variants(c, cuda):
        try:
            with torch.no_grad():
                out = fn()
            if label == IMAGE_LAYOUT:   # back to the window order of the reference
                out = fb._to_windows(out, (c.side, c.side), (c.window, c.window), c.shift)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            del out
            ms, peak = time_variant(fn, cuda)
        except Exception as e:  # one variant's failure (an old torch, a missing backend) is reported, not fatal
            print(f"  {label}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
            failed += 1
            continue
        rows.append((shape, label, ms, flops / ms / 1e9, peak, err))
        print(f"  {label:72s} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s {peak:9.1f} MiB  err {err:.1e}", flush=True)
    return rows, failed


def write_markdown(path: str, device: str, shapes: List[str], rows: list, cuda: bool) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    timing = ("Median of do_bench (warm-up 50 ms, 300 ms of repeats), fp16 inputs" if cuda
              else "One call each, wall clock, float32 inputs (a check that every variant runs, not a timing)")
    lines = [f"# One attention call, {device}, {datetime.date.today()}", "",
             f"`python benchmarks/bench_attention.py --shapes {','.join(shapes)}`; torch {torch.__version__}. "
             f"{timing}. Error: relative L2 against a float32 reference. Memory: peak above the inputs.", ""]
    for shape in shapes:
        B, side, window, H, d, shifted, _ = SHAPES[shape]
        lines += ["", f"## {shape}: batch {B}, {side}x{side} tokens, window {window}, {H} heads, d={d}"
                      f"{', shifted' if shifted and side > window else ''}", "",
                  "| variant | ms | TFLOP/s | peak MiB | rel. error |", "|---|---|---|---|---|"]
        lines += [f"| {label} | {ms:.3f} | {tf:.1f} | {peak:.0f} | {err:.1e} |"
                  for s, label, ms, tf, peak, err in rows if s == shape]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    shapes = args.shapes.split(",") if cuda else ["cpu"]
    if cuda:
        import triton
        device = torch.cuda.get_device_name()
        print(f"device {device}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    else:
        device = "CPU (PyTorch path only: no GPU here)"
        print(device, flush=True)
    rows, failed = [], 0
    for shape in shapes:
        shape_rows, shape_failed = measure_shape(shape, args, "cuda" if cuda else "cpu", cuda)
        rows += shape_rows
        failed += shape_failed
    if args.out:
        write_markdown(args.out, device, shapes, rows, cuda)
        print("wrote", args.out)
    if failed:
        print(f"{failed} variant(s) FAILED", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    run_main(main)
