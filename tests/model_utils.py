"""Shared helpers for the drop-in model tests: trained-like SwinV2 models and timm's independent copy."""
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import swin_transformer_v2 as swin  # noqa: E402

# SwinV2-T-like: 64 px, window 8 -> stage resolutions 16, 8, 4, 2: shifted windows in stages 0-1, window
# clipped to the resolution (no shift) in stages 2-3
TINY = dict(img_size=64, window_size=8, embed_dim=32, depths=[2, 2, 2, 2], num_heads=[2, 2, 4, 4],
            num_classes=10)
# B-shaped (fine-tuned from smaller pre-training windows): pretrained_window_sizes rescale the coordinates
B_SHAPED = dict(img_size=64, window_size=8, embed_dim=32, depths=[2, 2, 2, 2], num_heads=[2, 4, 4, 8],
                num_classes=10, pretrained_window_sizes=[6, 6, 6, 4])
# smallest thing with a shifted window and a clipped window, for slow paths (Triton interpreter, DDP)
MINI = dict(img_size=32, window_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], num_classes=5)


@torch.no_grad()
def randomize(model, seed=0):
    """Trained-like weights: SwinV2 zero-inits the res-post-norm scales (hiding attention entirely) and its
    cpb_mlp / logit_scale inits give a nearly flat bias, so draw them the way trained models look."""
    g = torch.Generator().manual_seed(seed)

    def normal(t, std=1.0, mean=0.0):
        t.copy_(torch.randn(t.shape, generator=g) * std + mean)

    for name, p in model.named_parameters():
        if p.dim() >= 2 and ("qkv" in name or "proj" in name or "fc" in name or "reduction" in name
                             or "head" in name):
            normal(p, 0.02 if p.dim() == 2 else 0.05)
        elif name.endswith("q_bias") or name.endswith("v_bias"):
            normal(p, 0.02)
    for _, attn in swin.window_attention_layers(model):
        normal(attn.cpb_mlp[0].weight, 1.0)
        normal(attn.cpb_mlp[0].bias, 0.5)
        normal(attn.cpb_mlp[2].weight, 0.05)
        attn.logit_scale.copy_(torch.rand(attn.logit_scale.shape, generator=g)
                               * (math.log(40) - math.log(5)) + math.log(5))
    for layer in model.layers:
        for blk in layer.blocks:
            for norm in (blk.norm1, blk.norm2):
                normal(norm.weight, 0.1, 0.5)
                normal(norm.bias, 0.02)
    return model


def make_model(config=None, seed=0, **overrides):
    """The drop-in SwinTransformerV2 with trained-like random weights (eval mode, no dropout / drop path)."""
    kwargs = dict(TINY if config is None else config)
    kwargs.setdefault("drop_path_rate", 0.0)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return randomize(swin.SwinTransformerV2(**kwargs), seed).eval()


def make_timm_model(config, state_dict):
    """timm's independent SwinTransformerV2 with the same weights, through timm's checkpoint_filter_fn."""
    from timm.models.swin_transformer_v2 import SwinTransformerV2, checkpoint_filter_fn
    kw = dict(config)
    model = SwinTransformerV2(img_size=kw["img_size"], window_size=kw["window_size"], embed_dim=kw["embed_dim"],
                              depths=tuple(kw["depths"]), num_heads=tuple(kw["num_heads"]),
                              num_classes=kw["num_classes"],
                              pretrained_window_sizes=tuple(kw.get("pretrained_window_sizes", [0] * len(kw["depths"]))),
                              drop_rate=0.0, drop_path_rate=0.0)
    missing, unexpected = model.load_state_dict(checkpoint_filter_fn(dict(state_dict), model), strict=False)
    missing = [k for k in missing if not k.endswith(("k_bias", "relative_coords_table", "relative_position_index",
                                                       "attn_mask"))]
    assert not missing and not unexpected, (missing, unexpected)
    return model.eval()


def rel_l2(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def images(n=4, size=64, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
