#!/usr/bin/env python3
"""Time one SwinV2 window-attention call, every way we know, at real SwinV2 shapes.

    python scripts/bench_attention.py [--out benchmarks/attention_<device>.md] [--shapes b384-s1,b384-s3,...]

For each shape: time (median, CUDA events via triton.testing.do_bench), TFLOP/s (4·N²·d per window and
head, the two matrix products), peak memory above the inputs, and error against a float32 reference,
for: the official math, SDPA with the dense bias+mask as attn_mask, SDPA on concatenated
[q, q_bias] / [k, k_bias] (the FlashBias README recipe, mask as one-hot columns), FlexAttention with a
score_mod, SDPA with no bias (a wrong answer: the speed floor), and this kernel (exact, low-rank;
window layout, and image layout which also does the cyclic shift and window partition).

Inputs are random q/k/v and a trained-like continuous position bias (cpb_mlp with trained-like
weights): never zeros. Without a GPU it runs the PyTorch path on one small shape, to show it works.
"""
import argparse
import datetime
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flash_bias_triton as fb  # noqa: E402

# name: (batch, image side in tokens, window, heads, head_dim, shifted, pretrained window)
SHAPES = {
    "b384-s1": (64, 96, 24, 4, 32, True, 12),     # SwinV2-B/384 stage 1, shifted: B*nW=1024, N=576
    "b384-s3": (64, 24, 24, 16, 32, False, 12),   # SwinV2-B/384 stage 3 (window = resolution): B*nW=64
    "t256-s1": (64, 64, 8, 3, 32, True, 0),       # SwinV2-T/256 window 8, stage 1 shifted: B*nW=4096, N=64
    "t256-s3": (64, 16, 8, 12, 32, True, 0),      # SwinV2-T/256 stage 3 shifted: B*nW=256
    "cpu": (2, 16, 8, 2, 32, True, 0),
}


def trained_like_bias(heads, window, pretrained_window, gen):
    """(H, N, N) = 16*sigmoid(cpb_mlp(relative_coords_table))[relative_position_index], SwinV2's
    continuous position bias, with cpb_mlp weights drawn like trained ones."""
    w = window
    coords = torch.arange(-(w - 1), w, dtype=torch.float64)
    table = torch.stack(torch.meshgrid(coords, coords, indexing="ij"), -1)        # (2w-1, 2w-1, 2)
    table = table / ((pretrained_window if pretrained_window > 0 else w) - 1) * 8
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
    w1 = torch.randn(512, 2, generator=gen, dtype=torch.float64)
    b1 = 0.5 * torch.randn(512, generator=gen, dtype=torch.float64)
    w2 = 0.05 * torch.randn(heads, 512, generator=gen, dtype=torch.float64)
    per_offset = torch.relu(table.view(-1, 2) @ w1.T + b1) @ w2.T                 # ((2w-1)^2, H)
    pos = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij"), -1).view(-1, 2)
    rel = pos[:, None, :] - pos[None, :, :] + (w - 1)
    index = rel[..., 0] * (2 * w - 1) + rel[..., 1]                               # (N, N)
    return (16 * torch.sigmoid(per_offset[index.view(-1)])).view(w * w, w * w, heads).permute(2, 0, 1).float()


def swin_region_ids(side, window, shift):
    """(nW, N) region ids of SwinV2's shifted-window mask."""
    img = torch.zeros(side, side, dtype=torch.int32)
    cnt = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            img[hs, ws] = cnt
            cnt += 1
    n = side // window
    return img.view(n, window, n, window).permute(0, 2, 1, 3).reshape(n * n, window * window)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="b384-s1,b384-s3,t256-s1,t256-s3")
    p.add_argument("--rank", type=int, default=16, help="low-rank mode's rank")
    p.add_argument("--out", help="write the markdown table here")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    shapes = a.shapes.split(",") if cuda else ["cpu"]
    gen = torch.Generator().manual_seed(a.seed)
    if cuda:
        import triton
        name = torch.cuda.get_device_name()
        print(f"device {name}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    else:
        name = "CPU (PyTorch path only: no GPU here)"
        print(name, flush=True)
    rows = []
    for shape in shapes:
        B, side, window, H, d, shifted, pre = SHAPES[shape]
        N, nW = window * window, (side // window) ** 2
        shift = window // 2 if shifted and side > window else 0
        Bw, C = B * nW, H * d
        img_qkv = torch.randn(B, side * side, 3 * C, generator=gen).to(dev, torch.float16 if cuda else torch.float32)
        logit_scale = torch.empty(H, 1, 1).uniform_(math.log(5), math.log(40), generator=gen).to(dev)
        bias = trained_like_bias(H, window, pre, gen).to(dev)
        region_ids = swin_region_ids(side, window, shift).to(dev) if shift else None
        # the window layout the official code feeds attention: roll, partition
        win_qkv = fb._to_windows(img_qkv, (side, side), (window, window), shift).contiguous()
        q_f, k_f, info = fb.low_rank_bias_factors(bias, rank=min(a.rank, N))
        q_f, k_f = q_f.to(dev), k_f.to(dev)

        q, k, v = win_qkv.view(Bw, N, 3, H, d).permute(2, 0, 3, 1, 4)
        scale = logit_scale.clamp(max=fb.MAX_LOGIT_SCALE).exp()
        mask = fb.region_mask(region_ids) if shift else None                   # (nW, N, N) float32

        with torch.no_grad():
            ref = torch.cat([fb.attention_reference(win_qkv[i:i + 64].float(), H, logit_scale, bias,
                                                    region_ids=region_ids) for i in range(0, Bw, 64)])
        qn = (F.normalize(q.float(), dim=-1) * scale).to(q.dtype)
        kn = F.normalize(k.float(), dim=-1).to(k.dtype)

        def official():
            with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
                attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
                attn = attn * scale + bias.unsqueeze(0)
                if mask is not None:
                    attn = attn.view(B, nW, H, N, N) + mask.unsqueeze(1).unsqueeze(0)
                    attn = attn.view(-1, H, N, N)
                attn = attn.softmax(-1)
                return (attn @ v).transpose(1, 2).reshape(Bw, N, C)

        dense_mask = (bias[None] + (mask[:, None] if mask is not None else 0)).half()   # (nW or 1, H, N, N)

        # windows and heads share one batch axis so that the (nW*H, N, N) mask broadcasts over images
        dense_mask = dense_mask.expand(nW, H, N, N).reshape(1, nW * H, N, N)

        def sdpa_dense():
            o = F.scaled_dot_product_attention(qn.reshape(B, nW * H, N, d), kn.reshape(B, nW * H, N, d),
                                               v.reshape(B, nW * H, N, d), attn_mask=dense_mask, scale=1.0)
            return o.view(Bw, H, N, d).transpose(1, 2).reshape(Bw, N, C)

        # FlashBias README recipe: bias as extra q/k columns; the mask folded exactly as one-hot columns
        extra = [q_f.half().expand(Bw, H, N, q_f.shape[-1])], [k_f.half().expand(Bw, H, N, k_f.shape[-1])]
        if shift:
            onehot = F.one_hot(region_ids.long(), 9).half()                     # (nW, N, 9)
            oh = onehot[None, :, None].expand(B, nW, H, N, 9).reshape(Bw, H, N, 9)
            extra[0].append(100 * oh)
            extra[1].append(oh)
        qa, ka = torch.cat([qn] + extra[0], -1), torch.cat([kn] + extra[1], -1)
        pad = (-qa.shape[-1]) % 16
        qa, ka = F.pad(qa, (0, pad)), F.pad(ka, (0, pad))
        va = F.pad(v, (0, qa.shape[-1] - d))

        def sdpa_concat():
            o = F.scaled_dot_product_attention(qa, ka, va, scale=1.0)[..., :d]
            return o.transpose(1, 2).reshape(Bw, N, C)

        def sdpa_floor():
            return F.scaled_dot_product_attention(qn, kn, v, scale=1.0).transpose(1, 2).reshape(Bw, N, C)

        bias16 = bias.half()
        variants = [("official math", official), ("SDPA, dense bias+mask as attn_mask", sdpa_dense),
                    (f"SDPA on [q,q_bias]/[k,k_bias], R={q_f.shape[-1]}, mask as one-hot columns", sdpa_concat)]
        if cuda:
            try:
                from torch.nn.attention.flex_attention import flex_attention
                rid = region_ids if shift else torch.zeros(nW, N, dtype=torch.int32, device=dev)

                def score_mod(score, b, h, qi, ki):
                    w = b % nW
                    return (score + bias[h, qi, ki]
                            + torch.where(rid[w, qi] == rid[w, ki], 0.0, fb.MASK_VALUE))
                flex = torch.compile(flex_attention)

                def flex_call():
                    return flex(qn, kn, v, score_mod=score_mod, scale=1.0).transpose(1, 2).reshape(Bw, N, C)
                variants.append(("FlexAttention, score_mod reading bias + region ids", flex_call))
            except Exception as e:  # older torch
                print("FlexAttention unavailable:", e)
        variants += [
            ("SDPA with no bias and no mask (wrong answer; the floor)", sdpa_floor),
            ("FlashBias exact, float32 bias (window layout)",
             lambda: fb.flash_bias_attention(win_qkv, H, logit_scale, bias=bias, region_ids=region_ids)),
            ("FlashBias exact, float16 bias (window layout)",
             lambda: fb.flash_bias_attention(win_qkv, H, logit_scale, bias=bias16, region_ids=region_ids)),
            (f"FlashBias low-rank R={q_f.shape[-1]} (window layout)",
             lambda: fb.flash_bias_attention(win_qkv, H, logit_scale, bias_factors=(q_f, k_f),
                                             region_ids=region_ids)),
            ("FlashBias exact, float32 bias, image layout (shift+partition inside)",
             lambda: fb.flash_bias_attention(img_qkv, H, logit_scale, bias=bias, region_ids=region_ids,
                                             image_size=(side, side), window_size=(window, window),
                                             shift_size=shift)),
        ]
        image_layout = variants[-1][0]
        flops = 4 * Bw * H * N * N * d
        print(f"\n{shape}: B*nW={Bw} H={H} N={N} d={d} shift={shift} "
              f"(low-rank R={q_f.shape[-1]}: bias max logit error {info['max_logit_error']:.3f})", flush=True)
        for label, fn in variants:
            with torch.no_grad():
                try:
                    out = fn()
                except Exception as e:
                    print(f"  {label}: FAILED {type(e).__name__}: {str(e)[:200]}")
                    continue
                if label == image_layout:   # back to the window order of the reference
                    out = fb._to_windows(out, (side, side), (window, window), shift)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                if cuda:
                    import triton
                    del out
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
                    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
                else:
                    import time
                    t = time.perf_counter()
                    fn()
                    ms, peak = (time.perf_counter() - t) * 1e3, float("nan")
            tflops = flops / ms / 1e9
            rows.append((shape, label, ms, tflops, peak, err))
            print(f"  {label:72s} {ms:8.3f} ms {tflops:7.1f} TFLOP/s {peak:9.1f} MiB  err {err:.1e}", flush=True)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            f.write(f"# One attention call, {name}, {datetime.date.today()}\n\n")
            f.write(f"`python scripts/bench_attention.py --shapes {','.join(shapes)}`; torch {torch.__version__}. "
                    "Median of do_bench (warm-up 50 ms, 300 ms of repeats), fp16 inputs. Error: relative L2 "
                    "against a float32 reference. Memory: peak above the inputs.\n\n")
            for shape in shapes:
                B, side, window, H, d, shifted, pre = SHAPES[shape]
                f.write(f"\n## {shape}: batch {B}, {side}x{side} tokens, window {window}, {H} heads, d={d}"
                        f"{', shifted' if shifted and side > window else ''}\n\n")
                f.write("| variant | ms | TFLOP/s | peak MiB | rel. error |\n|---|---|---|---|---|\n")
                for s, label, ms, tf, peak, err in rows:
                    if s == shape:
                        f.write(f"| {label} | {ms:.3f} | {tf:.1f} | {peak:.0f} | {err:.1e} |\n")
        print("wrote", a.out)


if __name__ == "__main__":
    main()
