# --------------------------------------------------------
# Swin Transformer V2
# Copyright (c) 2022 Microsoft
# Licensed under The MIT License [see LICENSE for details]
# Written by Ze Liu
# --------------------------------------------------------
# FlashBias patch: WindowAttention runs on a fused Triton kernel (flash_bias_triton.py, copied next to this
# file) at inference; the official math stays in place for training and as the reference. Search "FlashBias".
# --------------------------------------------------------

import hashlib
import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint
try:
    from timm.layers import DropPath, to_2tuple, trunc_normal_
except ImportError:  # timm 0.4.12, as the official main.py uses
    from timm.models.layers import DropPath, to_2tuple, trunc_normal_
import numpy as np

try:  # FlashBias: inside the official `models` package, or as a top-level module
    from .flash_bias_triton import flash_bias_attention, logit_error, low_rank_bias_factors, residual_layer_norm
except ImportError:
    from flash_bias_triton import flash_bias_attention, logit_error, low_rank_bias_factors, residual_layer_norm


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        x = self.drop(x)
        return x


def window_partition(x, window_size):
    """
    Args:
        x: (B, H, W, C)
        window_size (int): window size

    Returns:
        windows: (num_windows*B, window_size, window_size, C)
    """
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    windows = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, C)
    return windows


def window_reverse(windows, window_size, H, W):
    """
    Args:
        windows: (num_windows*B, window_size, window_size, C)
        window_size (int): Window size
        H (int): Height of image
        W (int): Width of image

    Returns:
        x: (B, H, W, C)
    """
    B = int(windows.shape[0] / (H * W / window_size / window_size))
    x = windows.view(B, H // window_size, W // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, -1)
    return x


class WindowAttention(nn.Module):
    r""" Window based multi-head self attention (W-MSA) module with relative position bias.
    It supports both of shifted and non-shifted window.

    Args:
        dim (int): Number of input channels.
        window_size (tuple[int]): The height and width of the window.
        num_heads (int): Number of attention heads.
        qkv_bias (bool, optional):  If True, add a learnable bias to query, key, value. Default: True
        attn_drop (float, optional): Dropout ratio of attention weight. Default: 0.0
        proj_drop (float, optional): Dropout ratio of output. Default: 0.0
        pretrained_window_size (tuple[int]): The height and width of the window in pre-training.

    FlashBias: with ``self.fused_attn`` (default True) the attention runs through ``flash_bias_attention``
    (the fused Triton kernel on CUDA, its PyTorch reference elsewhere) with the relative position bias
    derived once and cached (``flash_bias_operands``). The fused path is taken iff ``use_fused_attn(x)``:
    ``fused_attn and not self.training and not (torch.is_grad_enabled() and (x or a parameter of this
    module requires grad))`` -- e.g. main.py's validate() (model.eval() under torch.no_grad()). Training,
    fine-tuning and anything that needs gradients run the official math below, unchanged.
    """

    def __init__(self, dim, window_size, num_heads, qkv_bias=True, attn_drop=0., proj_drop=0.,
                 pretrained_window_size=[0, 0]):

        super().__init__()
        self.dim = dim
        self.window_size = window_size  # Wh, Ww
        self.pretrained_window_size = pretrained_window_size
        self.num_heads = num_heads

        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1))), requires_grad=True)

        # mlp to generate continuous relative position bias
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True),
                                     nn.ReLU(inplace=True),
                                     nn.Linear(512, num_heads, bias=False))

        # get relative_coords_table
        relative_coords_h = torch.arange(-(self.window_size[0] - 1), self.window_size[0], dtype=torch.float32)
        relative_coords_w = torch.arange(-(self.window_size[1] - 1), self.window_size[1], dtype=torch.float32)
        relative_coords_table = torch.stack(
            torch.meshgrid([relative_coords_h,
                            relative_coords_w])).permute(1, 2, 0).contiguous().unsqueeze(0)  # 1, 2*Wh-1, 2*Ww-1, 2
        if pretrained_window_size[0] > 0:
            relative_coords_table[:, :, :, 0] /= (pretrained_window_size[0] - 1)
            relative_coords_table[:, :, :, 1] /= (pretrained_window_size[1] - 1)
        else:
            relative_coords_table[:, :, :, 0] /= (self.window_size[0] - 1)
            relative_coords_table[:, :, :, 1] /= (self.window_size[1] - 1)
        relative_coords_table *= 8  # normalize to -8, 8
        relative_coords_table = torch.sign(relative_coords_table) * torch.log2(
            torch.abs(relative_coords_table) + 1.0) / np.log2(8)

        self.register_buffer("relative_coords_table", relative_coords_table)

        # get pair-wise relative position index for each token inside the window
        coords_h = torch.arange(self.window_size[0])
        coords_w = torch.arange(self.window_size[1])
        coords = torch.stack(torch.meshgrid([coords_h, coords_w]))  # 2, Wh, Ww
        coords_flatten = torch.flatten(coords, 1)  # 2, Wh*Ww
        relative_coords = coords_flatten[:, :, None] - coords_flatten[:, None, :]  # 2, Wh*Ww, Wh*Ww
        relative_coords = relative_coords.permute(1, 2, 0).contiguous()  # Wh*Ww, Wh*Ww, 2
        relative_coords[:, :, 0] += self.window_size[0] - 1  # shift to start from 0
        relative_coords[:, :, 1] += self.window_size[1] - 1
        relative_coords[:, :, 0] *= 2 * self.window_size[1] - 1
        relative_position_index = relative_coords.sum(-1)  # Wh*Ww, Wh*Ww
        self.register_buffer("relative_position_index", relative_position_index)

        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = None
            self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.softmax = nn.Softmax(dim=-1)

        # FlashBias: plain attributes, not in the state dict
        self.fused_attn = True
        self.flash_bias_rank_rule = None  # "exact" | "rank:R" | "energy:E" | "logit:L"; None: $FLASHBIAS_RANK
        self.flash_bias_name = None  # qualified name in the model (set by SwinTransformerV2), for messages
        self._flash_file_factors = None  # factors from a factor file (see load_bias_factors)
        self._flash_cache = None  # derived bias / factors and the weights they came from

    def forward(self, x, mask=None, image_size=None, shift_size=0, region_ids=None):
        """
        Args:
            x: input features with shape of (num_windows*B, N, C), or (B, H*W, C) in image order with image_size
            mask: (0/-inf) mask with shape of (num_windows, Wh*Ww, Wh*Ww) or None
            image_size, shift_size, region_ids: FlashBias image layout, fused path only: the kernel does the
                cyclic shift, window partition / reverse and the shift mask (region_ids (nW, Wh*Ww)) itself.
        """
        B_, N, C = x.shape
        qkv_bias = None
        if self.q_bias is not None:
            qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias, requires_grad=False), self.v_bias))
        qkv = F.linear(input=x, weight=self.qkv.weight, bias=qkv_bias)

        if image_size is not None or ((mask is None or region_ids is not None) and self.use_fused_attn(x)):
            # FlashBias: fused cosine attention + cached bias (+ shift mask from region ids)
            x = flash_bias_attention(qkv, self.num_heads, self.logit_scale, region_ids=region_ids,
                                     image_size=image_size, window_size=self.window_size, shift_size=shift_size,
                                     **self.flash_bias_operands())
        else:
            qkv = qkv.reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]  # make torchscript happy (cannot use tensor as tuple)

            # cosine attention
            attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1))
            logit_scale = torch.clamp(self.logit_scale, max=math.log(1. / 0.01)).exp()
            attn = attn * logit_scale

            relative_position_bias_table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
            relative_position_bias = relative_position_bias_table[self.relative_position_index.view(-1)].view(
                self.window_size[0] * self.window_size[1], self.window_size[0] * self.window_size[1], -1)  # Wh*Ww,Wh*Ww,nH
            relative_position_bias = relative_position_bias.permute(2, 0, 1).contiguous()  # nH, Wh*Ww, Wh*Ww
            relative_position_bias = 16 * torch.sigmoid(relative_position_bias)
            attn = attn + relative_position_bias.unsqueeze(0)

            if mask is not None:
                nW = mask.shape[0]
                attn = attn.view(B_ // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, self.num_heads, N, N)
                attn = self.softmax(attn)
            else:
                attn = self.softmax(attn)

            attn = self.attn_drop(attn)

            x = (attn @ v).transpose(1, 2).reshape(B_, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x

    def use_fused_attn(self, x):
        """FlashBias switch: whether forward takes the fused path for input x (see the class docstring)."""
        if not self.fused_attn or self.training:
            return False
        return not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())))

    def _flash_weights(self):
        return (self.cpb_mlp[0].weight, self.cpb_mlp[0].bias, self.cpb_mlp[2].weight,
                self.relative_coords_table, self.relative_position_index)

    def _flash_key(self):
        # changes with .to() / .half() / .cuda() (new storage, dtype, device) and in-place writes such as
        # load_state_dict (version counter)
        key = [self.relative_coords_table.device]
        for t in self._flash_weights():
            try:
                version = t._version
            except RuntimeError:  # inference tensors have no version counter
                version = -1
            key.append((t.data_ptr(), version, t.dtype))
        return tuple(key)

    @torch.no_grad()
    def derive_bias_table(self):
        """FlashBias: 16 * sigmoid(cpb_mlp(relative_coords_table)), the bias of each relative offset,
        (num_heads, (2*Wh-1)*(2*Ww-1)) float32 on the buffers' device, no grad. Computed in float32 from upcast
        weights (also under .half() or autocast)."""
        w0, b0, w2 = self.cpb_mlp[0].weight, self.cpb_mlp[0].bias, self.cpb_mlp[2].weight
        table = self.relative_coords_table
        with torch.autocast(device_type=table.device.type, enabled=False):
            hidden = F.relu(F.linear(table.float(), w0.float(), None if b0 is None else b0.float()))
            table = F.linear(hidden, w2.float()).view(-1, self.num_heads)
        return (16 * torch.sigmoid(table)).t().contiguous()

    @torch.no_grad()
    def derive_bias(self):
        """FlashBias: the relative position bias, derive_bias_table() gathered by relative_position_index,
        (num_heads, N, N) float32, no grad."""
        N = self.window_size[0] * self.window_size[1]
        return self.derive_bias_table()[:, self.relative_position_index.view(-1)].view(self.num_heads, N, N)

    def flash_bias_operands(self):
        """FlashBias: the bias keyword arguments of flash_bias_attention. Exact mode: {"bias": (H, N, N)}, on
        CUDA float16 with each row centred (softmax ignores a row's constant; centring halves the rounding, and
        float16 halves the kernel's bias reads), elsewhere float32 as derived; low-rank mode: {"bias_factors":
        (q_bias, k_bias)} from a factor file or the rank rule. Cached in plain attributes and derived again
        (factor files re-validated) when the weights, their dtype or device change."""
        key = self._flash_key()
        cache = self._flash_cache
        if cache is not None and cache["key"] == key:
            return cache["operands"]
        with torch.no_grad():
            weights = [t.detach() for t in self._flash_weights()[:4]]  # the (large) index: by key only
            if (cache is not None and cache["key"][0] == key[0] and cache["key"][-1] == key[-1]
                    and all(a[2] == b[2] for a, b in zip(cache["key"][1:], key[1:]))
                    and all(torch.equal(a, b) for a, b in zip(cache["weights"], weights))):
                cache["key"] = key  # rewritten with the same values (e.g. reloaded, a buffer broadcast)
                return cache["operands"]
            device = self.relative_position_index.device
            operands = None
            if self._flash_file_factors is not None:
                q_bias, k_bias = _check_file_factors(self, self.derive_bias())
                operands = {"bias_factors": (q_bias.to(device), k_bias.to(device))}
            else:
                if self.flash_bias_rank_rule is None:
                    self.flash_bias_rank_rule = os.environ.get("FLASHBIAS_RANK", "exact")
                rule = parse_rank_rule(self.flash_bias_rank_rule)
                if rule is not None:
                    q_bias, k_bias, _ = low_rank_bias_factors(self.derive_bias(), **rule)
                    if q_bias is not None:
                        operands = {"bias_factors": (q_bias, k_bias)}
            if operands is None:
                bias = self.derive_bias()
                if device.type == "cuda":
                    bias = (bias - (bias.amax(-1, keepdim=True) + bias.amin(-1, keepdim=True)) / 2).half()
                operands = {"bias": bias}
            self._flash_cache = {"key": key, "weights": [t.clone() for t in weights], "operands": operands}
        return operands

    def extra_repr(self) -> str:
        return f'dim={self.dim}, window_size={self.window_size}, ' \
               f'pretrained_window_size={self.pretrained_window_size}, num_heads={self.num_heads}'

    def flops(self, N):
        # calculate flops for 1 window with token length of N
        flops = 0
        # qkv = self.qkv(x)
        flops += N * self.dim * 3 * self.dim
        # attn = (q @ k.transpose(-2, -1))
        flops += self.num_heads * N * (self.dim // self.num_heads) * N
        #  x = (attn @ v)
        flops += self.num_heads * N * N * (self.dim // self.num_heads)
        # x = self.proj(x)
        flops += N * self.dim * self.dim
        return flops


class SwinTransformerBlock(nn.Module):
    r""" Swin Transformer Block.

    Args:
        dim (int): Number of input channels.
        input_resolution (tuple[int]): Input resulotion.
        num_heads (int): Number of attention heads.
        window_size (int): Window size.
        shift_size (int): Shift size for SW-MSA.
        mlp_ratio (float): Ratio of mlp hidden dim to embedding dim.
        qkv_bias (bool, optional): If True, add a learnable bias to query, key, value. Default: True
        drop (float, optional): Dropout rate. Default: 0.0
        attn_drop (float, optional): Attention dropout rate. Default: 0.0
        drop_path (float, optional): Stochastic depth rate. Default: 0.0
        act_layer (nn.Module, optional): Activation layer. Default: nn.GELU
        norm_layer (nn.Module, optional): Normalization layer.  Default: nn.LayerNorm
        pretrained_window_size (int): Window size in pre-training.
    """

    def __init__(self, dim, input_resolution, num_heads, window_size=7, shift_size=0,
                 mlp_ratio=4., qkv_bias=True, drop=0., attn_drop=0., drop_path=0.,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm, pretrained_window_size=0):
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = shift_size
        self.mlp_ratio = mlp_ratio
        if min(self.input_resolution) <= self.window_size:
            # if window size is larger than input resolution, we don't partition windows
            self.shift_size = 0
            self.window_size = min(self.input_resolution)
        assert 0 <= self.shift_size < self.window_size, "shift_size must in 0-window_size"

        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(
            dim, window_size=to_2tuple(self.window_size), num_heads=num_heads,
            qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop,
            pretrained_window_size=to_2tuple(pretrained_window_size))

        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        mlp_hidden_dim = int(dim * mlp_ratio)
        self.mlp = Mlp(in_features=dim, hidden_features=mlp_hidden_dim, act_layer=act_layer, drop=drop)

        if self.shift_size > 0:
            # calculate attention mask for SW-MSA
            H, W = self.input_resolution
            img_mask = torch.zeros((1, H, W, 1))  # 1 H W 1
            h_slices = (slice(0, -self.window_size),
                        slice(-self.window_size, -self.shift_size),
                        slice(-self.shift_size, None))
            w_slices = (slice(0, -self.window_size),
                        slice(-self.window_size, -self.shift_size),
                        slice(-self.shift_size, None))
            cnt = 0
            for h in h_slices:
                for w in w_slices:
                    img_mask[:, h, w, :] = cnt
                    cnt += 1

            mask_windows = window_partition(img_mask, self.window_size)  # nW, window_size, window_size, 1
            mask_windows = mask_windows.view(-1, self.window_size * self.window_size)
            attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
            attn_mask = attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))
            region_ids = mask_windows.to(torch.int32)  # FlashBias: nW, window_size*window_size
        else:
            attn_mask = None
            region_ids = None

        self.register_buffer("attn_mask", attn_mask)
        self.register_buffer("region_ids", region_ids, persistent=False)  # FlashBias: the shift mask's regions

    def forward(self, x):
        H, W = self.input_resolution
        B, L, C = x.shape
        assert L == H * W, "input feature has wrong size"

        shortcut = x
        if self.attn.use_fused_attn(x):
            # FlashBias: the kernel does the cyclic shift, window partition / reverse and the mask itself
            x = self.attn(x, image_size=self.input_resolution, shift_size=self.shift_size,
                          region_ids=self.region_ids)
            # FlashBias: each residual + res-post-norm in one pass (drop path is the identity at inference);
            # under autocast it also writes the half-precision copy the MLP's first matmul reads
            x, x_low = residual_layer_norm(shortcut, x, self.norm1)
            return residual_layer_norm(x, self.mlp(x if x_low is None else x_low), self.norm2)[0]
        else:
            x = x.view(B, H, W, C)

            # cyclic shift
            if self.shift_size > 0:
                shifted_x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
            else:
                shifted_x = x

            # partition windows
            x_windows = window_partition(shifted_x, self.window_size)  # nW*B, window_size, window_size, C
            x_windows = x_windows.view(-1, self.window_size * self.window_size, C)  # nW*B, window_size*window_size, C

            # W-MSA/SW-MSA
            attn_windows = self.attn(x_windows, mask=self.attn_mask)  # nW*B, window_size*window_size, C

            # merge windows
            attn_windows = attn_windows.view(-1, self.window_size, self.window_size, C)
            shifted_x = window_reverse(attn_windows, self.window_size, H, W)  # B H' W' C

            # reverse cyclic shift
            if self.shift_size > 0:
                x = torch.roll(shifted_x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
            else:
                x = shifted_x
            x = x.view(B, H * W, C)
        x = shortcut + self.drop_path(self.norm1(x))

        # FFN
        x = x + self.drop_path(self.norm2(self.mlp(x)))

        return x

    def extra_repr(self) -> str:
        return f"dim={self.dim}, input_resolution={self.input_resolution}, num_heads={self.num_heads}, " \
               f"window_size={self.window_size}, shift_size={self.shift_size}, mlp_ratio={self.mlp_ratio}"

    def flops(self):
        flops = 0
        H, W = self.input_resolution
        # norm1
        flops += self.dim * H * W
        # W-MSA/SW-MSA
        nW = H * W / self.window_size / self.window_size
        flops += nW * self.attn.flops(self.window_size * self.window_size)
        # mlp
        flops += 2 * H * W * self.dim * self.dim * self.mlp_ratio
        # norm2
        flops += self.dim * H * W
        return flops


class PatchMerging(nn.Module):
    r""" Patch Merging Layer.

    Args:
        input_resolution (tuple[int]): Resolution of input feature.
        dim (int): Number of input channels.
        norm_layer (nn.Module, optional): Normalization layer.  Default: nn.LayerNorm
    """

    def __init__(self, input_resolution, dim, norm_layer=nn.LayerNorm):
        super().__init__()
        self.input_resolution = input_resolution
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(2 * dim)

    def forward(self, x):
        """
        x: B, H*W, C
        """
        H, W = self.input_resolution
        B, L, C = x.shape
        assert L == H * W, "input feature has wrong size"
        assert H % 2 == 0 and W % 2 == 0, f"x size ({H}*{W}) are not even."

        x = x.view(B, H, W, C)

        x0 = x[:, 0::2, 0::2, :]  # B H/2 W/2 C
        x1 = x[:, 1::2, 0::2, :]  # B H/2 W/2 C
        x2 = x[:, 0::2, 1::2, :]  # B H/2 W/2 C
        x3 = x[:, 1::2, 1::2, :]  # B H/2 W/2 C
        x = torch.cat([x0, x1, x2, x3], -1)  # B H/2 W/2 4*C
        x = x.view(B, -1, 4 * C)  # B H/2*W/2 4*C

        x = self.reduction(x)
        x = self.norm(x)

        return x

    def extra_repr(self) -> str:
        return f"input_resolution={self.input_resolution}, dim={self.dim}"

    def flops(self):
        H, W = self.input_resolution
        flops = (H // 2) * (W // 2) * 4 * self.dim * 2 * self.dim
        flops += H * W * self.dim // 2
        return flops


class BasicLayer(nn.Module):
    """ A basic Swin Transformer layer for one stage.

    Args:
        dim (int): Number of input channels.
        input_resolution (tuple[int]): Input resolution.
        depth (int): Number of blocks.
        num_heads (int): Number of attention heads.
        window_size (int): Local window size.
        mlp_ratio (float): Ratio of mlp hidden dim to embedding dim.
        qkv_bias (bool, optional): If True, add a learnable bias to query, key, value. Default: True
        drop (float, optional): Dropout rate. Default: 0.0
        attn_drop (float, optional): Attention dropout rate. Default: 0.0
        drop_path (float | tuple[float], optional): Stochastic depth rate. Default: 0.0
        norm_layer (nn.Module, optional): Normalization layer. Default: nn.LayerNorm
        downsample (nn.Module | None, optional): Downsample layer at the end of the layer. Default: None
        use_checkpoint (bool): Whether to use checkpointing to save memory. Default: False.
        pretrained_window_size (int): Local window size in pre-training.
    """

    def __init__(self, dim, input_resolution, depth, num_heads, window_size,
                 mlp_ratio=4., qkv_bias=True, drop=0., attn_drop=0.,
                 drop_path=0., norm_layer=nn.LayerNorm, downsample=None, use_checkpoint=False,
                 pretrained_window_size=0):

        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.depth = depth
        self.use_checkpoint = use_checkpoint

        # build blocks
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(dim=dim, input_resolution=input_resolution,
                                 num_heads=num_heads, window_size=window_size,
                                 shift_size=0 if (i % 2 == 0) else window_size // 2,
                                 mlp_ratio=mlp_ratio,
                                 qkv_bias=qkv_bias,
                                 drop=drop, attn_drop=attn_drop,
                                 drop_path=drop_path[i] if isinstance(drop_path, list) else drop_path,
                                 norm_layer=norm_layer,
                                 pretrained_window_size=pretrained_window_size)
            for i in range(depth)])

        # patch merging layer
        if downsample is not None:
            self.downsample = downsample(input_resolution, dim=dim, norm_layer=norm_layer)
        else:
            self.downsample = None

    def forward(self, x):
        for blk in self.blocks:
            if self.use_checkpoint:
                x = checkpoint.checkpoint(blk, x)
            else:
                x = blk(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x

    def extra_repr(self) -> str:
        return f"dim={self.dim}, input_resolution={self.input_resolution}, depth={self.depth}"

    def flops(self):
        flops = 0
        for blk in self.blocks:
            flops += blk.flops()
        if self.downsample is not None:
            flops += self.downsample.flops()
        return flops

    def _init_respostnorm(self):
        for blk in self.blocks:
            nn.init.constant_(blk.norm1.bias, 0)
            nn.init.constant_(blk.norm1.weight, 0)
            nn.init.constant_(blk.norm2.bias, 0)
            nn.init.constant_(blk.norm2.weight, 0)


class PatchEmbed(nn.Module):
    r""" Image to Patch Embedding

    Args:
        img_size (int): Image size.  Default: 224.
        patch_size (int): Patch token size. Default: 4.
        in_chans (int): Number of input image channels. Default: 3.
        embed_dim (int): Number of linear projection output channels. Default: 96.
        norm_layer (nn.Module, optional): Normalization layer. Default: None
    """

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None):
        super().__init__()
        img_size = to_2tuple(img_size)
        patch_size = to_2tuple(patch_size)
        patches_resolution = [img_size[0] // patch_size[0], img_size[1] // patch_size[1]]
        self.img_size = img_size
        self.patch_size = patch_size
        self.patches_resolution = patches_resolution
        self.num_patches = patches_resolution[0] * patches_resolution[1]

        self.in_chans = in_chans
        self.embed_dim = embed_dim

        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        if norm_layer is not None:
            self.norm = norm_layer(embed_dim)
        else:
            self.norm = None

    def forward(self, x):
        B, C, H, W = x.shape
        # FIXME look at relaxing size constraints
        assert H == self.img_size[0] and W == self.img_size[1], \
            f"Input image size ({H}*{W}) doesn't match model ({self.img_size[0]}*{self.img_size[1]})."
        x = self.proj(x).flatten(2).transpose(1, 2)  # B Ph*Pw C
        if self.norm is not None:
            x = self.norm(x)
        return x

    def flops(self):
        Ho, Wo = self.patches_resolution
        flops = Ho * Wo * self.embed_dim * self.in_chans * (self.patch_size[0] * self.patch_size[1])
        if self.norm is not None:
            flops += Ho * Wo * self.embed_dim
        return flops


class SwinTransformerV2(nn.Module):
    r""" Swin Transformer
        A PyTorch impl of : `Swin Transformer: Hierarchical Vision Transformer using Shifted Windows`  -
          https://arxiv.org/pdf/2103.14030

    Args:
        img_size (int | tuple(int)): Input image size. Default 224
        patch_size (int | tuple(int)): Patch size. Default: 4
        in_chans (int): Number of input image channels. Default: 3
        num_classes (int): Number of classes for classification head. Default: 1000
        embed_dim (int): Patch embedding dimension. Default: 96
        depths (tuple(int)): Depth of each Swin Transformer layer.
        num_heads (tuple(int)): Number of attention heads in different layers.
        window_size (int): Window size. Default: 7
        mlp_ratio (float): Ratio of mlp hidden dim to embedding dim. Default: 4
        qkv_bias (bool): If True, add a learnable bias to query, key, value. Default: True
        drop_rate (float): Dropout rate. Default: 0
        attn_drop_rate (float): Attention dropout rate. Default: 0
        drop_path_rate (float): Stochastic depth rate. Default: 0.1
        norm_layer (nn.Module): Normalization layer. Default: nn.LayerNorm.
        ape (bool): If True, add absolute position embedding to the patch embedding. Default: False
        patch_norm (bool): If True, add normalization after patch embedding. Default: True
        use_checkpoint (bool): Whether to use checkpointing to save memory. Default: False
        pretrained_window_sizes (tuple(int)): Pretrained window sizes of each layer.

    FlashBias: see WindowAttention for the fused path and ``set_flash_bias`` for how each layer's bias is
    given to the kernel (exact, a rank rule, or factor files). Nothing is read from disk or the environment
    before the first forward in eval mode.
    """

    def __init__(self, img_size=224, patch_size=4, in_chans=3, num_classes=1000,
                 embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                 window_size=7, mlp_ratio=4., qkv_bias=True,
                 drop_rate=0., attn_drop_rate=0., drop_path_rate=0.1,
                 norm_layer=nn.LayerNorm, ape=False, patch_norm=True,
                 use_checkpoint=False, pretrained_window_sizes=[0, 0, 0, 0], **kwargs):
        super().__init__()

        self.num_classes = num_classes
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.ape = ape
        self.patch_norm = patch_norm
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        self.mlp_ratio = mlp_ratio

        # split image into non-overlapping patches
        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            norm_layer=norm_layer if self.patch_norm else None)
        num_patches = self.patch_embed.num_patches
        patches_resolution = self.patch_embed.patches_resolution
        self.patches_resolution = patches_resolution

        # absolute position embedding
        if self.ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=.02)

        self.pos_drop = nn.Dropout(p=drop_rate)

        # stochastic depth
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]  # stochastic depth decay rule

        # build layers
        self.layers = nn.ModuleList()
        for i_layer in range(self.num_layers):
            layer = BasicLayer(dim=int(embed_dim * 2 ** i_layer),
                               input_resolution=(patches_resolution[0] // (2 ** i_layer),
                                                 patches_resolution[1] // (2 ** i_layer)),
                               depth=depths[i_layer],
                               num_heads=num_heads[i_layer],
                               window_size=window_size,
                               mlp_ratio=self.mlp_ratio,
                               qkv_bias=qkv_bias,
                               drop=drop_rate, attn_drop=attn_drop_rate,
                               drop_path=dpr[sum(depths[:i_layer]):sum(depths[:i_layer + 1])],
                               norm_layer=norm_layer,
                               downsample=PatchMerging if (i_layer < self.num_layers - 1) else None,
                               use_checkpoint=use_checkpoint,
                               pretrained_window_size=pretrained_window_sizes[i_layer])
            self.layers.append(layer)

        self.norm = norm_layer(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)
        for bly in self.layers:
            bly._init_respostnorm()

        # FlashBias: plain attributes, not in the state dict
        self.flash_bias_rank_rule = None  # None: $FLASHBIAS_RANK at first use, else "exact"
        self.flash_bias_factors_path = None  # None: $FLASHBIAS_FACTORS_DIR or ./decomposed_bias at first use
        self._flash_bias_resolved = False
        for name, attn in window_attention_layers(self):
            attn.flash_bias_name = name

    def set_flash_bias(self, rank_rule=None, factors_path=None, fused=None):
        """FlashBias settings; applied lazily at the next eval forward (weights may still be loaded).

        Args:
            rank_rule: how a layer without factor files gets its bias: "exact" (dense, the default),
                "rank:R" (SVD, fixed rank), "energy:E" (smallest rank keeping E of the energy, the seed's rule),
                "logit:L" (smallest rank with max logit error <= L, else exact). None: $FLASHBIAS_RANK or "exact".
            factors_path: a factor folder or file (see load_bias_factors); files take precedence over the rank
                rule. None: $FLASHBIAS_FACTORS_DIR or ./decomposed_bias if present; False: ignore factor files.
            fused: set every WindowAttention's fused_attn flag (None: leave them).
        """
        if rank_rule is not None:
            parse_rank_rule(rank_rule)
        self.flash_bias_rank_rule = rank_rule
        self.flash_bias_factors_path = factors_path
        self._flash_bias_resolved = False
        for _, attn in window_attention_layers(self):
            attn.flash_bias_rank_rule = rank_rule
            attn._flash_file_factors = None
            attn._flash_cache = None
            if fused is not None:
                attn.fused_attn = bool(fused)

    def _resolve_flash_bias(self):
        # factor files and the rank rule, read at first use (never at import or construction). A layer's own
        # rule (WindowAttention.flash_bias_rank_rule) is kept unless set_flash_bias gave one; None there means
        # $FLASHBIAS_RANK, read by the layer when it first derives its bias.
        layers = window_attention_layers(self)
        rule = self.flash_bias_rank_rule
        if rule is not None:
            parse_rank_rule(rule)
        path = self.flash_bias_factors_path
        found = None
        if path is not False:
            found = _find_factor_files(default_factors_dir() if path is None else path)
            if found is None and path is not None:
                raise FileNotFoundError(f"FlashBias: no factor files (bias_factors.npz or "
                                        f"swin_v2_*_q_bias_<i>.npy) at {path}")
        if found is not None:
            load_bias_factors(self, found[0])
        else:
            for _, attn in layers:
                if attn._flash_file_factors is not None:
                    attn._flash_file_factors = None
                    attn._flash_cache = None
                if rule is not None and attn.flash_bias_rank_rule != rule:
                    attn.flash_bias_rank_rule = rule
                    attn._flash_cache = None
        self.flash_bias_factors_path = path
        self._flash_bias_resolved = True

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'absolute_pos_embed'}

    @torch.jit.ignore
    def no_weight_decay_keywords(self):
        return {"cpb_mlp", "logit_scale", 'relative_position_bias_table'}

    def forward_features(self, x):
        if not self._flash_bias_resolved and not self.training and not (
                torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())):
            self._resolve_flash_bias()  # FlashBias: rank rule and factor files, once
        x = self.patch_embed(x)
        if self.ape:
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)

        for layer in self.layers:
            x = layer(x)

        x = self.norm(x)  # B L C
        x = self.avgpool(x.transpose(1, 2))  # B C 1
        x = torch.flatten(x, 1)
        return x

    def forward(self, x):
        x = self.forward_features(x)
        x = self.head(x)
        return x

    def flops(self):
        flops = 0
        flops += self.patch_embed.flops()
        for i, layer in enumerate(self.layers):
            flops += layer.flops()
        flops += self.num_features * self.patches_resolution[0] * self.patches_resolution[1] // (2 ** self.num_layers)
        flops += self.num_features * self.num_classes
        return flops


# --------------------------------------------------------
# FlashBias: rank rules and bias factor files
# --------------------------------------------------------
FACTORS_FORMAT = "flashbias-swinv2-factors-v1"
FACTORS_FILE = "bias_factors.npz"
# seed-named factors carry no checksum: they are checked against the bias derived from the current weights
SEED_FACTORS_MAX_LOGIT_ERROR = 2.0
_SEED_NAME = re.compile(r"^swin_v2_(\w+?)_q_bias_(\d+)\.npy$")


def parse_rank_rule(rule):
    """"exact" -> None; "rank:16" / "energy:0.995" / "logit:0.05" -> keyword arguments of
    low_rank_bias_factors. Raises ValueError for anything else."""
    text = str(rule).strip().lower()
    if text == "exact":
        return None
    kind, _, value = text.partition(":")
    try:
        if kind == "rank":
            return {"rank": int(value)}
        if kind == "energy":
            return {"energy": float(value)}
        if kind == "logit":
            return {"max_logit_error": float(value)}
    except ValueError:
        pass
    raise ValueError(f"FlashBias: bad rank rule {rule!r}; use 'exact', 'rank:R', 'energy:E' or 'logit:L' "
                     f"(e.g. FLASHBIAS_RANK=logit:0.05)")


def default_factors_dir():
    """$FLASHBIAS_FACTORS_DIR, else ./decomposed_bias of the current directory (read when called)."""
    return os.environ.get("FLASHBIAS_FACTORS_DIR") or os.path.abspath("decomposed_bias")


def _unwrap(model):
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def window_attention_layers(model):
    """[(qualified name, WindowAttention)] in construction order (DDP / torch.compile wrappers removed)."""
    return [(name, m) for name, m in _unwrap(model).named_modules() if isinstance(m, WindowAttention)]


def _checksum(tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cpb_checksum(attn):
    """sha256 hex of cpb_mlp[0].weight, cpb_mlp[0].bias, cpb_mlp[2].weight, relative_coords_table,
    relative_position_index, each as float32 bytes: what a layer's bias is derived from."""
    return _checksum(attn._flash_weights())


def _rounded_checksums(attn):
    # the same weights after .half() / .bfloat16() (and back): accepted as matching
    return {_checksum([t.to(dt) if t.is_floating_point() else t for t in attn._flash_weights()])
            for dt in (torch.float16, torch.bfloat16)}


def _layer_name(attn):
    return attn.flash_bias_name or "WindowAttention"


def _factor_error(attn, bias, q_bias, k_bias):
    approx = q_bias.to(bias.device, torch.float32) @ k_bias.to(bias.device, torch.float32).transpose(-2, -1)
    return logit_error(bias, approx)[0]


def _check_file_factors(attn, bias):
    """Factors of a factor file still belong to attn's current weights? Returns them or raises ValueError."""
    ff = attn._flash_file_factors
    if ff["checksums"] is not None:
        checksum = cpb_checksum(attn)
        if checksum in ff["checksums"]:
            return ff["q_bias"], ff["k_bias"]
        low_precision = any(t.dtype in (torch.float16, torch.bfloat16) for t in attn._flash_weights())
        if not low_precision:
            raise ValueError(
                f"FlashBias: layer {_layer_name(attn)}: the bias factors from {ff['source']} were computed for "
                f"other weights (checksum {ff['checksums_file'][:12]}..., weights now {checksum[:12]}...). "
                f"Decompose the bias of these weights again, or remove the factor files.")
    # no checksum (seed naming), or weights rounded to half precision: compare with the derived bias
    error = _factor_error(attn, bias, ff["q_bias"], ff["k_bias"])
    if not error <= SEED_FACTORS_MAX_LOGIT_ERROR:
        raise ValueError(
            f"FlashBias: layer {_layer_name(attn)}: the bias factors from {ff['source']} do not match this "
            f"layer's weights (max logit error {error:.3g} > {SEED_FACTORS_MAX_LOGIT_ERROR}); they come from "
            f"other weights. Decompose the bias of these weights again, or remove the factor files.")
    return ff["q_bias"], ff["k_bias"]


def _find_factor_files(path):
    """(file or folder, "npz" | "seed") for the factor files at path, or None when there are none."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return (path, "npz") if path.endswith(".npz") else (path, "seed")
    if os.path.isfile(os.path.join(path, FACTORS_FILE)):
        return os.path.join(path, FACTORS_FILE), "npz"
    if os.path.isdir(path) and any(_SEED_NAME.match(f) for f in os.listdir(path)):
        return path, "seed"
    return None


def _check_shape(name, i, attn, q_bias, k_bias):
    H, N = attn.num_heads, attn.window_size[0] * attn.window_size[1]
    for what, f in (("q_bias", q_bias), ("k_bias", k_bias)):
        if f.ndim != 3 or tuple(f.shape[:2]) != (H, N) or not 1 <= f.shape[2] <= 128:
            raise ValueError(f"FlashBias: layer {i} ({name}): {what} has shape {tuple(f.shape)}, expected "
                             f"({H}, {N}, R) with 1 <= R <= 128")
    if q_bias.shape != k_bias.shape:
        raise ValueError(f"FlashBias: layer {i} ({name}): q_bias {tuple(q_bias.shape)} and k_bias "
                         f"{tuple(k_bias.shape)} differ")


def _read_npz(file, layers):
    entries = {}
    with np.load(file, allow_pickle=False) as z:
        keys = set(z.files)
        fmt = str(z["format"]) if "format" in keys else None
        if fmt != FACTORS_FORMAT:
            raise ValueError(f"FlashBias: {file}: format {fmt!r}, expected {FACTORS_FORMAT!r}")
        if "num_layers" not in keys:
            raise ValueError(f"FlashBias: {file}: no num_layers")
        num_layers = int(z["num_layers"])
        if num_layers != len(layers):
            raise ValueError(f"FlashBias: {file} has {num_layers} layers, the model {len(layers)}")
        for i, (name, attn) in enumerate(layers):
            file_name = str(z[f"layer{i}_name"]) if f"layer{i}_name" in keys else None
            if file_name != name:
                raise ValueError(f"FlashBias: {file}: layer {i} is {file_name!r}, the model's is {name!r}")
            has_q, has_k = f"layer{i}_q_bias" in keys, f"layer{i}_k_bias" in keys
            if has_q != has_k:
                raise ValueError(f"FlashBias: {file}: layer {i} ({name}) has only one of q_bias / k_bias")
            if not has_q:
                continue  # exact mode for this layer
            if f"layer{i}_checksum" not in keys:
                raise ValueError(f"FlashBias: {file}: layer {i} ({name}) has no checksum")
            q_bias, k_bias = z[f"layer{i}_q_bias"], z[f"layer{i}_k_bias"]
            _check_shape(name, i, attn, q_bias, k_bias)
            entries[i] = (torch.from_numpy(np.ascontiguousarray(q_bias, np.float32)),
                          torch.from_numpy(np.ascontiguousarray(k_bias, np.float32)),
                          str(z[f"layer{i}_checksum"]))
    return entries


def _read_seed(folder, layers):
    found = {}
    for f in sorted(os.listdir(folder)):
        m = _SEED_NAME.match(f)
        if m:
            i = int(m.group(2))
            if i in found:
                raise ValueError(f"FlashBias: {folder}: several swin_v2_*_q_bias_{i}.npy files")
            found[i] = os.path.join(folder, f)
    entries = {}
    for i, q_file in sorted(found.items()):
        if i >= len(layers):
            raise ValueError(f"FlashBias: {q_file}: layer {i}, but the model has {len(layers)} layers")
        name, attn = layers[i]
        k_file = q_file[:-len(f"_q_bias_{i}.npy")] + f"_k_bias_{i}.npy"
        if not os.path.isfile(k_file):
            raise ValueError(f"FlashBias: layer {i} ({name}): {q_file} has no {os.path.basename(k_file)}")
        q_bias, k_bias = np.load(q_file, allow_pickle=False), np.load(k_file, allow_pickle=False)
        _check_shape(name, i, attn, q_bias, k_bias)
        entries[i] = (torch.from_numpy(np.ascontiguousarray(q_bias, np.float32)),
                      torch.from_numpy(np.ascontiguousarray(k_bias, np.float32)), None)
    return entries


def load_bias_factors(model, path=None):
    """Load FlashBias factor files into the model's WindowAttention layers and use them from now on.

    path: a bias_factors.npz file or a folder holding it (or the seed's swin_v2_*_{q,k}_bias_<i>.npy files);
    None: default_factors_dir(). Everything is validated against the model's current weights (format, layer
    count, names, shapes, checksums; seed-named files by their logit error) before anything is installed:
    any mismatch raises ValueError naming the layer. Layers without factors use the exact bias.
    Returns {layer_index: (q_bias, k_bias)}."""
    target = default_factors_dir() if path is None else path
    found = _find_factor_files(target)
    if found is None:
        raise FileNotFoundError(f"FlashBias: no factor files ({FACTORS_FILE} or swin_v2_*_q_bias_<i>.npy) at {target}")
    source, kind = found
    layers = window_attention_layers(model)
    entries = _read_npz(source, layers) if kind == "npz" else _read_seed(source, layers)
    installs = {}
    for i, (q_bias, k_bias, checksum) in entries.items():
        name, attn = layers[i]
        ff = {"q_bias": q_bias, "k_bias": k_bias, "source": source, "checksums": None, "checksums_file": checksum}
        if checksum is not None:
            ff["checksums"] = {checksum}
        saved, attn._flash_file_factors = attn._flash_file_factors, ff
        try:
            _check_file_factors(attn, attn.derive_bias())
        finally:
            attn._flash_file_factors = saved
        if checksum is not None and cpb_checksum(attn) == checksum:
            ff["checksums"] |= _rounded_checksums(attn)
        installs[i] = ff
    for i, (_, attn) in enumerate(layers):
        attn._flash_file_factors = installs.get(i)
        attn.flash_bias_rank_rule = "exact"
        attn._flash_cache = None
    inner = _unwrap(model)
    if hasattr(inner, "_flash_bias_resolved"):
        inner.flash_bias_factors_path = source
        inner._flash_bias_resolved = True
    return {i: (ff["q_bias"], ff["k_bias"]) for i, ff in installs.items()}


def save_bias_factors(path, model, factors, meta=None):
    """Write a FlashBias factor file (format flashbias-swinv2-factors-v1) for the model's current weights.

    path: a .npz file, or a folder (created) that gets bias_factors.npz. factors: {layer_index: (q_bias,
    k_bias)}, each (H, N, R), layer indices as in window_attention_layers(model); absent layers stay exact.
    meta: a JSON-serialisable object or a string. Returns the file written."""
    path = os.fspath(path)
    if not path.endswith(".npz"):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, FACTORS_FILE)
    layers = window_attention_layers(model)
    unknown = set(factors) - set(range(len(layers)))
    if unknown:
        raise ValueError(f"FlashBias: factors for layers {sorted(unknown)}, the model has {len(layers)}")
    arrays = {"format": np.array(FACTORS_FORMAT), "num_layers": np.array(len(layers)),
              "meta": np.array(meta if isinstance(meta, str) else json.dumps(meta))}
    for i, (name, attn) in enumerate(layers):
        arrays[f"layer{i}_name"] = np.array(name)
        arrays[f"layer{i}_checksum"] = np.array(cpb_checksum(attn))
        if i in factors:
            q_bias, k_bias = (torch.as_tensor(f).detach().float().cpu().contiguous().numpy() for f in factors[i])
            _check_shape(name, i, attn, q_bias, k_bias)
            arrays[f"layer{i}_q_bias"], arrays[f"layer{i}_k_bias"] = q_bias, k_bias
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path
