# --------------------------------------------------------
# Swin Transformer V2
# Copyright (c) 2022 Microsoft
# Licensed under The MIT License [see LICENSE for details]
# Written by Ze Liu
# --------------------------------------------------------
# FlashBias patch: at inference each block runs its window attention on a fused Triton kernel
# (flash_bias_triton.py and flash_bias_factors.py, copied next to this file); the official math stays in place
# for training and as the reference. Search "FlashBias".
# --------------------------------------------------------

import collections
import itertools
import logging
import math
import os
import sys
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint
try:
    from timm.layers import DropPath, to_2tuple, trunc_normal_
except ImportError:  # timm 0.4.12, as the official main.py uses
    from timm.models.layers import DropPath, to_2tuple, trunc_normal_
import numpy as np

try:  # FlashBias: inside the official `models` package, or as top-level modules
    from .flash_bias_triton import (bias_from_table, cpb_table, flash_bias_attention, residual_layer_norm,
                                    tracing_or_exporting)
    from . import flash_bias_factors as factor_files
except ImportError:
    from flash_bias_triton import (bias_from_table, cpb_table, flash_bias_attention, residual_layer_norm,
                                   tracing_or_exporting)
    import flash_bias_factors as factor_files


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

    FlashBias: ``forward_fused`` runs this attention through ``flash_bias_attention`` (the fused Triton kernel on
    CUDA, its PyTorch reference elsewhere), with the bias given by ``self.flash_bias`` (a LayerBias). It is taken iff
    ``use_fused_attn(x)``: ``fused_attn`` is set, the module is in eval mode and nothing needs a gradient -- e.g.
    main.py's validate() (model.eval() under torch.no_grad()). Training, fine-tuning and anything that needs
    gradients run the official math in ``forward``, unchanged.
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

        # FlashBias: the fused path's switch (as timm's fused_attn) and this layer's bias state; not in the state dict
        self.fused_attn = True
        self.flash_bias = LayerBias()

    def forward(self, x, mask=None):
        """
        Args:
            x: input features with shape of (num_windows*B, N, C)
            mask: (0/-inf) mask with shape of (num_windows, Wh*Ww, Wh*Ww) or None
        """
        if mask is None and self.use_fused_attn(x):  # FlashBias: the fused kernel (a mask tensor: official math)
            return self.forward_fused(x)
        B_, N, C = x.shape
        qkv_bias = None
        if self.q_bias is not None:
            qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias, requires_grad=False), self.v_bias))
        qkv = F.linear(input=x, weight=self.qkv.weight, bias=qkv_bias)
        qkv = qkv.reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # make torchscript happy (cannot use tensor as tuple)

        # cosine attention
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1))
        logit_scale = torch.clamp(self.logit_scale, max=math.log(1. / 0.01)).exp()  # FlashBias: math.log (see README)
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

    def forward_fused(self, x, image_size=None, shift_size=0, region_ids=None):
        """FlashBias: this attention on the fused kernel.

        Args:
            x: (num_windows*B, N, C) windows, or (B, H*W, C) in image order with image_size=(H, W): the kernel then
                does the cyclic shift by shift_size and the window partition / reverse itself
            region_ids: (num_windows, Wh*Ww) regions of the shift mask, or None
        """
        qkv_bias = None
        if self.q_bias is not None:
            qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias, requires_grad=False), self.v_bias))
        qkv = F.linear(input=x, weight=self.qkv.weight, bias=qkv_bias)
        x = flash_bias_attention(qkv, self.num_heads, self.logit_scale, region_ids=region_ids, image_size=image_size,
                                 window_size=self.window_size, shift_size=shift_size,
                                 **self.flash_bias.operands(self, qkv))
        return self.proj_drop(self.proj(x))

    def use_fused_attn(self, x):
        """FlashBias: whether this attention runs fused for input x (see the class docstring). Tracing, scripting and
        exporting (torch.jit, torch.export, torch.onnx) take the official math, which every exporter understands."""
        if not self.fused_attn or self.training or tracing_or_exporting():
            return False
        return not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())))

    @torch.no_grad()
    def derive_bias(self, center_rows=False, dtype=torch.float32):
        """FlashBias: the relative position bias 16 * sigmoid(cpb_mlp(relative_coords_table))[relative_position_index]
        of the current weights, (num_heads, Wh*Ww, Wh*Ww) in dtype, no grad, in two launches. The MLP runs in float32
        from upcast weights (also under .half() or autocast). center_rows: each row minus its midpoint (softmax ignores a row's
        constant; it halves float16 rounding)."""
        table = cpb_table(self.relative_coords_table.reshape(-1, 2), self.cpb_mlp[0].weight, self.cpb_mlp[0].bias,
                          self.cpb_mlp[2].weight)  # (2*Wh-1)*(2*Ww-1), nH
        return bias_from_table(table, self.relative_position_index, center_rows=center_rows, out_dtype=dtype)

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

        if self.attn.use_fused_attn(x):  # FlashBias: inference on the fused kernels
            return self.forward_fused(x)

        shortcut = x
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

    def forward_fused(self, x):
        """FlashBias: the block at inference. The attention kernel does the cyclic shift, the window partition /
        reverse and the shift mask itself; each residual + res-post-norm is one pass (drop path is the identity at
        inference), which under autocast also writes the half-precision copy the next matmul reads."""
        attn = self.attn.forward_fused(x, image_size=self.input_resolution, shift_size=self.shift_size,
                                       region_ids=self.region_ids)
        x, x_low = residual_layer_norm(x, attn, self.norm1)
        return residual_layer_norm(x, self.mlp(x if x_low is None else x_low), self.norm2)[0]

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

    FlashBias: see WindowAttention for the fused path, and ``set_flash_bias`` / FlashBiasSettings for how each
    layer's bias is given to the kernel (exact, a rank rule, or factor files).
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

        # FlashBias: the settings object (not in the state dict); each layer's bias state knows its name for messages
        self.flash_bias_settings = FlashBiasSettings()
        for name, attn in window_attention_layers(self):
            attn.flash_bias.name = name

    def set_flash_bias(self, rank_rule=None, factors_path=None, fused=None, cuda_graphs=None):
        """FlashBias settings, applied at the next fused forward (so a checkpoint can still be loaded first).

        Args:
            rank_rule: how a layer without factor files gets its bias: "exact" (dense, the default), "rank:R" (SVD,
                fixed rank), "energy:E" (the smallest rank keeping E of the spectral energy, the FlashBias paper's
                rule), "logit:L" (the smallest rank with max logit error <= L, else exact). None: $FLASHBIAS_RANK.
            factors_path: a factor folder or file (see load_bias_factors); files take precedence over the rank rule.
                None: $FLASHBIAS_FACTORS_DIR, else ./decomposed_bias if it holds factor files; False: no files.
            fused: set every WindowAttention's fused_attn flag (None: leave them).
            cuda_graphs: replay the fused forward from CUDA graphs (see ForwardGraphs). None: $FLASHBIAS_CUDA_GRAPHS
                ("0" off), else on.
        """
        self.flash_bias_settings = FlashBiasSettings(rank_rule, factors_path, cuda_graphs)
        for _, attn in window_attention_layers(self):
            attn.flash_bias = LayerBias(attn.flash_bias.name)  # exact until the settings are resolved
            if fused is not None:
                attn.fused_attn = bool(fused)

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
        if not self.flash_bias_settings.resolved and self.layers[0].blocks[0].attn.use_fused_attn(x):
            self.flash_bias_settings.resolve(window_attention_layers(self))  # FlashBias: once, at the first fused forward
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
        replayed = self.flash_bias_settings.replay(self, x)  # FlashBias: this forward from a CUDA graph, or None
        if replayed is not None:
            return replayed
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
# FlashBias: each layer's bias state, the model's settings, factor files
# --------------------------------------------------------
_logger = logging.getLogger("flash_bias")


def _log(message, level=logging.INFO):
    """Rank 0 only. Shown by default, as the official main.py shows its own messages (on stdout, unless the
    application configured logging itself); silence with logging.getLogger("flash_bias").setLevel(logging.WARNING)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    if not _logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[%(asctime)s flash_bias] %(levelname)s %(message)s"))
        _logger.addHandler(handler)
        _logger.propagate = False
    if _logger.level == logging.NOTSET:
        _logger.setLevel(logging.INFO)
    _logger.log(level, message)


def _cpb_weights(attn):
    """What a layer's bias is derived from."""
    return (attn.cpb_mlp[0].weight, attn.cpb_mlp[0].bias, attn.cpb_mlp[2].weight, attn.relative_coords_table,
            attn.relative_position_index)


def cpb_checksum(attn):
    """sha256 hex of cpb_mlp[0].weight, cpb_mlp[0].bias, cpb_mlp[2].weight, relative_coords_table and
    relative_position_index as float32 bytes: the weights a layer's bias is derived from."""
    return factor_files.weights_checksum(_cpb_weights(attn))


class WeightStamp(NamedTuple):
    """The weights a layer's low-rank factors were made for: device, dtypes and values (compared by value, so
    in-place writes that bypass the version counter, e.g. through .data or in inference mode, are seen)."""
    device: torch.device
    dtypes: tuple
    values: torch.Tensor  # every weight flattened into one float32 vector

    @classmethod
    def of(cls, attn):
        weights = _cpb_weights(attn)
        values = torch.cat([t.detach().reshape(-1).float() for t in weights])
        return cls(weights[0].device, tuple(t.dtype for t in weights), values)

    def matches(self, attn):
        now = WeightStamp.of(attn)
        return (now.device, now.dtypes) == (self.device, self.dtypes) and torch.equal(now.values, self.values)


class LayerBias:
    """FlashBias: how one WindowAttention gives its relative position bias to the kernel (not in the state dict).

    exact (the default): derived from the current weights in every fused forward (three small launches per
        layer), so no route new weights take -- load_state_dict, writes through .data, inference mode, .half() --
        can leave it stale;
    low-rank: factors (q_bias, k_bias), each (H, N, R), from a rank rule (``rule``) or a factor-file record
        (``record``), made for the weights in ``stamp``. Every fused forward compares the weights with the stamp
        (one small comparison and a host sync per layer); when they differ, a rule decomposes again and a file's
        record is checked again: its checksum must still match, else ValueError naming the layer.
    """

    def __init__(self, name="WindowAttention", rule=None, record=None, source=None):
        self.name = name  # qualified name in the model, for messages
        self.rule = rule  # keyword arguments of low_rank_bias_factors, or None
        self.record = record  # flash_bias_factors.LayerFactors with factors, or None
        self.source = source  # the rule's text or the factor file, for messages
        self.accepted_checksums = {record.checksum} if record is not None and record.checksum else set()
        self.stamp = None
        self.factors = None  # (q_bias, k_bias) float32 on the weights' device; None: exact
        self.factors_by_dtype = {}  # the same as kernel operands, per dtype
        self.max_logit_error = None  # of the factors, against the bias of the stamped weights

    @property
    def low_rank(self):
        return self.rule is not None or self.record is not None

    def operands(self, attn, qkv):
        """The bias keyword arguments of flash_bias_attention for attn and this qkv."""
        kernel = qkv.is_cuda and qkv.dtype != torch.float64
        if self.low_rank:
            if self.stamp is None or not self.stamp.matches(attn):
                self.prepare(attn)
            if self.factors is not None:
                dtype = qkv.dtype if kernel else torch.float32
                if dtype not in self.factors_by_dtype:
                    self.factors_by_dtype[dtype] = tuple(f.to(dtype).contiguous() for f in self.factors)
                return {"bias_factors": self.factors_by_dtype[dtype]}
        # for the kernel float16 with centred rows: half the bias reads, half the rounding
        return {"bias": attn.derive_bias(center_rows=kernel, dtype=torch.float16 if kernel else torch.float32)}

    def prepare(self, attn):
        """Make the low-rank factors for attn's current weights (a rule), or check the file's (a record)."""
        stamp, bias = WeightStamp.of(attn), attn.derive_bias()
        if self.record is not None:
            q_bias, k_bias = self.record.q_bias, self.record.k_bias
            error = factor_files.logit_error(bias, q_bias.to(bias) @ k_bias.to(bias).transpose(-2, -1))[0]
            self._check_record(attn, error)
        else:
            q_bias, k_bias, info = factor_files.low_rank_bias_factors(bias, **self.rule)
            error = info["max_logit_error"]
        self.factors = None if q_bias is None else (q_bias.to(bias.device), k_bias.to(bias.device))
        self.factors_by_dtype = {}
        self.max_logit_error = None if q_bias is None else error
        self.stamp = stamp

    def _check_record(self, attn, error):
        checksum = cpb_checksum(attn)
        if checksum in self.accepted_checksums:
            if checksum == self.record.checksum:  # the same weights rounded by .half() / .bfloat16() later: accepted
                self.accepted_checksums |= {factor_files.weights_checksum(
                    [t.to(dt) if t.is_floating_point() else t for t in _cpb_weights(attn)])
                    for dt in (torch.float16, torch.bfloat16)}
            return
        rounded = any(t.dtype in (torch.float16, torch.bfloat16) for t in _cpb_weights(attn))
        if self.record.checksum is not None and not rounded:
            raise ValueError(
                f"FlashBias: layer {self.name}: the bias factors from {self.source} were computed for other weights "
                f"(checksum {self.record.checksum[:12]}..., weights now {checksum[:12]}...). Decompose the bias of "
                f"these weights again, or remove the factor files.")
        # no checksum (the published code's files), or weights rounded to half precision: judged by the error
        if not error <= factor_files.PUBLISHED_MAX_LOGIT_ERROR:
            raise ValueError(
                f"FlashBias: layer {self.name}: the bias factors from {self.source} do not match this layer's weights "
                f"(max logit error {error:.3g} > {factor_files.PUBLISHED_MAX_LOGIT_ERROR}); they come from other "
                f"weights. Decompose the bias of these weights again, or remove the factor files.")

    def describe(self):
        return {"name": self.name, "mode": "exact" if self.factors is None else "low-rank",
                "rank": None if self.factors is None else int(self.factors[0].shape[-1]),
                "source": self.source if self.factors is not None else None, "max_logit_error": self.max_logit_error}


class FlashBiasSettings:
    """FlashBias: a model's settings (``set_flash_bias``, else the environment), resolved once at the first fused
    forward: nothing is read from disk or the environment at import or construction, so a checkpoint can be loaded
    first, as the official main.py does.

    rank_rule: "exact" | "rank:R" | "energy:E" | "logit:L" (flash_bias_factors.parse_rank_rule); None:
        $FLASHBIAS_RANK, else exact.
    factors_path: a factor file or folder; its factors take precedence over the rank rule. None:
        $FLASHBIAS_FACTORS_DIR (which must then hold factor files), else ./decomposed_bias of the working directory
        if it holds factor files; False: no factor files.
    """

    def __init__(self, rank_rule=None, factors_path=None, cuda_graphs=None):
        if rank_rule is not None:
            factor_files.parse_rank_rule(rank_rule)
        self.rank_rule = rank_rule
        self.factors_path = factors_path
        self.cuda_graphs = cuda_graphs
        self.resolved = False
        self.layers = []  # the WindowAttention layers, once resolved
        self.graphs = ForwardGraphs()

    def replay(self, model, x):
        """The model's output for x replayed from a CUDA graph, or None to run eagerly: graphs are on, x is on CUDA,
        the settings are resolved (the first forward runs eagerly), every layer runs fused with the exact bias (a
        low-rank layer's weight check needs the host), and nothing trains, needs a gradient, traces or compiles."""
        if not (self.cuda_graphs and x.is_cuda and self.resolved) or self.graphs.capturing:
            return None
        if not self.layers[0].use_fused_attn(x) or tracing_or_exporting():
            return None
        if torch.compiler.is_compiling() or any(attn.flash_bias.low_rank or not attn.fused_attn for attn in self.layers):
            return None
        return self.graphs.run(model, x)

    def resolve(self, layers):
        """Give every layer of [(name, WindowAttention)] its bias state, all checked before any is installed,
        and say once which bias the model runs."""
        rule_text = self.rank_rule if self.rank_rule is not None else os.environ.get("FLASHBIAS_RANK", "exact")
        rule = factor_files.parse_rank_rule(rule_text)
        found = self._read_factor_file()
        if found is not None:
            records = _match_records(found, layers)
            states = [LayerBias(name, record=records.get(i), source=found.path if i in records else None)
                      for i, (name, _) in enumerate(layers)]
        else:
            states = [LayerBias(name, rule=rule, source=None if rule is None else f"rank rule {rule_text}")
                      for name, _ in layers]
        for state, (_, attn) in zip(states, layers):
            if state.low_rank:
                state.prepare(attn)
        for state, (_, attn) in zip(states, layers):
            attn.flash_bias = state
        if self.cuda_graphs is None:
            self.cuda_graphs = os.environ.get("FLASHBIAS_CUDA_GRAPHS", "1") != "0"
        self.layers = [attn for _, attn in layers]
        self.resolved = True
        _log_bias_modes(states)

    def _read_factor_file(self):
        path = self.factors_path
        if path is False:
            return None
        if path is None:
            path = os.environ.get("FLASHBIAS_FACTORS_DIR")  # when set, it must hold factor files
            if not path:
                default = os.path.abspath("decomposed_bias")
                if not os.path.isdir(default) or factor_files.find_factor_files(default) is None:
                    return None
                path = default
        return factor_files.read_factor_file(os.fspath(path))


class ForwardGraphs:
    """FlashBias: a model's fused forward captured in CUDA graphs and replayed: one launch instead of ~500 whose
    host time, not the GPU, bounded small batches.

    One graph per (input shape, dtype, device, autocast state), captured the second time that key is seen (a
    one-off shape, such as an eval loop's partial last batch, runs eagerly and costs no graph memory); at most
    MAX_GRAPHS, the least recently used dropped. All share one memory pool. The input is copied into the graph's
    buffer and the output cloned out, so a result the caller keeps is never overwritten by a later replay.

    The graphs read every parameter and buffer where it was at capture: when any gets new storage (.to(),
    .half(), a reassigned Parameter, load_state_dict(assign=True)) all graphs are dropped. In-place updates need
    nothing: the exact bias is derived inside the graph, from the weights as they are at each replay.
    """
    MAX_GRAPHS = 4

    def __init__(self, capture=None):
        self.capture = capture or _capture_cuda_graph  # tests give a fake
        self.entries = collections.OrderedDict()  # key -> (replay, static input, static output)
        self.seen = collections.OrderedDict()  # keys seen once, not captured yet
        self.tensors, self.tensors_version = [], None  # the model's parameters and buffers, gathered once
        self.storage = None
        self.pool = None
        self.capturing = False

    def run(self, model, x):
        """model(x) from a graph, or None: run eagerly (a key seen the first time)."""
        # walking the module tree costs ~1.7 ms at SwinV2-B (0.08 ms for the list): gather it again only when a
        # parameter, buffer or submodule was (re)assigned anywhere; new storage of the same objects shows in data_ptr
        if self.tensors_version != _registrations[0]:
            self.tensors = list(itertools.chain(model.parameters(), model.buffers()))
            self.tensors_version = _registrations[0]
        storage = tuple((t.data_ptr(), t.dtype) for t in self.tensors)
        if storage != self.storage:
            self.entries.clear()
            self.storage, self.pool = storage, None
        key = (tuple(x.shape), tuple(x.stride()), x.dtype, x.device, _autocast_state())
        entry = self.entries.get(key)
        if entry is None:
            if key not in self.seen:
                self.seen[key] = True
                while len(self.seen) > 4 * self.MAX_GRAPHS:
                    self.seen.popitem(last=False)
                return None
            entry = self._capture(model, x, key)
        self.entries.move_to_end(key)
        replay, static_input, static_output = entry
        static_input.copy_(x)
        replay()
        return static_output.clone()

    def _capture(self, model, x, key):
        while len(self.entries) >= self.MAX_GRAPHS:
            self.entries.popitem(last=False)
        static_input = x.clone()
        enabled, dtype, _ = key[-1]
        self.capturing = True
        try:
            # autocast's weight-cast cache would hand the graph casts made outside it: cast inside, every replay
            with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
                replay, static_output, self.pool = self.capture(lambda: model(static_input), self.pool)
        finally:
            self.capturing = False
        self.entries[key] = (replay, static_input, static_output)
        self.seen.pop(key, None)
        return self.entries[key]


def _capture_cuda_graph(fn, pool):
    """(replay, output, pool) of fn captured in a torch.cuda.CUDAGraph, after one warm-up call on a side stream (Triton
    compiles, cuBLAS allocates its workspace) as capture requires."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # thread-local: a data loader's pin-memory thread may use CUDA while the main thread captures
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        output = fn()
    return graph.replay, output, graph.pool()


# How many parameters, buffers and submodules were assigned to any module of the process: the CUDA graphs gather
# a model's tensors again when it moves. Process-wide hooks, as torch offers them; each costs one increment.
_registrations = [0]


def _count_registration(*args):
    _registrations[0] += 1


for _register in ("register_module_parameter_registration_hook", "register_module_buffer_registration_hook",
                  "register_module_module_registration_hook"):
    getattr(torch.nn.modules.module, _register)(_count_registration)


def _autocast_state():
    return (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
            torch.backends.cuda.matmul.allow_tf32)


def _match_records(found, layers):
    """{layer index: record with factors} of a factor file, after checking that it fits the model's layers."""
    if found.num_layers is not None and found.num_layers != len(layers):
        raise factor_files.FactorFileError(f"FlashBias: {found.path} has {found.num_layers} layers, the model "
                                           f"{len(layers)}")
    matched = {}
    for i, record in found.layers.items():
        if i >= len(layers):
            raise factor_files.FactorFileError(f"FlashBias: {found.path}: factors for layer {i}, but the model has "
                                               f"{len(layers)} layers")
        name, attn = layers[i]
        if record.name is not None and record.name != name:
            raise factor_files.FactorFileError(f"FlashBias: {found.path}: layer {i} is {record.name!r}, the model's "
                                               f"is {name!r}")
        if record.q_bias is None:
            continue
        heads, tokens = attn.num_heads, attn.window_size[0] * attn.window_size[1]
        if tuple(record.q_bias.shape[:2]) != (heads, tokens):
            raise factor_files.FactorFileError(
                f"FlashBias: {found.path}: layer {i} ({name}): q_bias has shape {tuple(record.q_bias.shape)}, "
                f"expected ({heads}, {tokens}, R)")
        matched[i] = record
    return matched


def _log_bias_modes(states):
    low = [s for s in states if s.factors is not None]
    if not low:
        _log(f"FlashBias: exact bias in all {len(states)} attention layers")
        return
    ranks = [s.factors[0].shape[-1] for s in low]
    worst = max(low, key=lambda s: s.max_logit_error)
    message = (f"FlashBias: low-rank bias factors from {worst.source} in {len(low)} of {len(states)} attention "
               f"layers (rank {min(ranks)}-{max(ranks)})"
               + (f", the exact bias in the other {len(states) - len(low)}" if len(low) < len(states) else "")
               + f"; worst logit error {worst.max_logit_error:.3g} in {worst.name}")
    if worst.max_logit_error > factor_files.LARGE_LOGIT_ERROR:
        _log(message + f" (above {factor_files.LARGE_LOGIT_ERROR}: outputs will differ visibly from the exact "
             f"model; decompose with scripts/decompose_bias.py --max-logit-error, or run exact: FLASHBIAS_RANK=exact "
             f"and no factor files)", logging.WARNING)
    else:
        _log(message)


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


def flash_bias_summary(model):
    """Per attention layer: {"name", "mode": "exact" | "low-rank", "rank", "source", "max_logit_error"}
    (the model's settings are resolved first if no fused forward has done it yet)."""
    inner = _unwrap(model)
    layers = window_attention_layers(inner)
    settings = getattr(inner, "flash_bias_settings", None)
    if settings is not None and not settings.resolved:
        settings.resolve(layers)
    return [attn.flash_bias.describe() for _, attn in layers]


def load_bias_factors(model, path=None):
    """Load FlashBias factor files into the model's WindowAttention layers and use them from now on.

    path: a bias_factors.npz file or a folder holding it (or the published FlashBias code's
    swin_v2_*_{q,k}_bias_<i>.npy files); None: $FLASHBIAS_FACTORS_DIR, else ./decomposed_bias. Everything is checked
    against the model's current weights (format, layer count, names, shapes, values, checksums; the published
    naming by its logit error) before anything is installed: a mismatch raises ValueError naming the file and the
    layer. Layers without factors use the exact bias. Returns {layer_index: (q_bias, k_bias)}."""
    inner = _unwrap(model)
    if path is None:
        path = os.environ.get("FLASHBIAS_FACTORS_DIR") or os.path.abspath("decomposed_bias")
    settings = FlashBiasSettings("exact", os.fspath(path))
    layers = window_attention_layers(inner)
    settings.resolve(layers)
    if isinstance(inner, SwinTransformerV2):
        inner.flash_bias_settings = settings
    return {i: attn.flash_bias.factors for i, (_, attn) in enumerate(layers) if attn.flash_bias.factors is not None}


def save_bias_factors(path, model, factors, meta=None):
    """Write a FlashBias factor file (flash_bias_factors.write_factor_file) for the model's current weights.

    path: a .npz file, or a folder (created) that gets bias_factors.npz. factors: {layer_index: (q_bias, k_bias)},
    each (H, N, R), indices as in window_attention_layers(model); absent layers stay exact. Returns the file."""
    layers = window_attention_layers(model)
    unknown = set(factors) - set(range(len(layers)))
    if unknown:
        raise ValueError(f"FlashBias: factors for layers {sorted(unknown)}, the model has {len(layers)}")
    records = []
    for i, (name, attn) in enumerate(layers):
        q_bias, k_bias = factors.get(i, (None, None))
        expected = (attn.num_heads, attn.window_size[0] * attn.window_size[1])
        if q_bias is not None and tuple(q_bias.shape[:2]) != expected:
            raise ValueError(f"FlashBias: layer {i} ({name}): q_bias has shape {tuple(q_bias.shape)}, expected "
                             f"({expected[0]}, {expected[1]}, R)")
        records.append(factor_files.LayerFactors(i, name, cpb_checksum(attn), q_bias, k_bias))
    return factor_files.write_factor_file(path, records, meta)
