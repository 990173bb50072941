"""The strongest peer of the drop-in (issue 11): the official SwinV2 math with each window attention's
softmax(q k^T + bias + mask) v handed to ``F.scaled_dot_product_attention``, the dense relative-position bias and
the shift mask as its ``attn_mask``, as a user would patch the official file by hand; bench_model.py runs it eagerly
and under ``torch.compile``.

Everything but the attention core is the official code: the qkv projection with its q and v biases, the cosine
normalisation, the clamped logit scale, the bias from the cpb MLP (16 * sigmoid), the output projection. Shifted
windows put the window next to the head in SDPA's head axis, (B, nW * heads, N, d), so that the bias plus mask, one
(nW * heads, N, N) tensor, broadcasts over the images instead of being repeated for each of them.
"""
import contextlib
import math

import torch
import torch.nn.functional as F


def sdpa_window_attention(attn, x, mask=None):
    """The official SwinV2 WindowAttention.forward(x, mask) of module attn, its attention core by SDPA.

    x: (B * nW, N, C); mask: (nW, N, N) with 0 / -100, or None. Returns (B * nW, N, C)."""
    B_, N, C = x.shape
    heads = attn.num_heads
    qkv_bias = None
    if attn.q_bias is not None:
        qkv_bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias))
    qkv = F.linear(x, attn.qkv.weight, qkv_bias).reshape(B_, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logit_scale = torch.clamp(attn.logit_scale, max=math.log(1. / 0.01)).exp()   # (heads, 1, 1)
    q = F.normalize(q, dim=-1) * logit_scale
    k = F.normalize(k, dim=-1)
    table = attn.cpb_mlp(attn.relative_coords_table).view(-1, heads)
    bias = table[attn.relative_position_index.view(-1)].view(N, N, heads).permute(2, 0, 1)
    bias = 16 * torch.sigmoid(bias)   # (heads, N, N)
    if mask is not None:
        windows = mask.shape[0]
        bias = (bias.unsqueeze(0) + mask.unsqueeze(1)).reshape(1, windows * heads, N, N)
        q, k, v = (t.reshape(B_ // windows, windows * heads, N, -1) for t in (q, k, v))
    else:
        bias = bias.unsqueeze(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(_compute_dtype(q)).contiguous(), scale=1.0)
    out = out.reshape(B_, heads, N, -1).transpose(1, 2).reshape(B_, N, C)
    return attn.proj_drop(attn.proj(out))


def _compute_dtype(q):
    """The dtype SDPA computes in: autocast's where it is on, else q's.

    The mask goes in that dtype, contiguous. Under float16 autocast F.normalize hands back float32 q and k (its norm
    runs in float32), and the bias was float32 with the permuted (heads, N, N) strides of the table lookup; given
    so, SDPA ran at its math path's speed and memory on an H100: the eager peer at SwinV2-B/384 batch 64 took 256
    against 84 ms a batch, 16.0 against 3.7 GB, and compiled 154 against 40 ms (2026-12-07,
    benchmarks/model_peers_nvidia-h100-80gb-hbm3.md; which of the two, dtype or strides, caused it was not
    separated)."""
    device = q.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype


@contextlib.contextmanager
def sdpa_attention(model, window_attention_cls):
    """Within the block, every window_attention_cls module of model runs sdpa_window_attention as its forward."""
    layers = [m for m in model.modules() if isinstance(m, window_attention_cls)]
    for layer in layers:
        layer.forward = sdpa_window_attention.__get__(layer)
    try:
        yield model
    finally:
        for layer in layers:
            del layer.forward
