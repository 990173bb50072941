# --------------------------------------------------------
# Swin Transformer V2
# Copyright (c) 2022 Microsoft
# Licensed under The MIT License [see LICENSE for details]
# Written by Ze Liu
# --------------------------------------------------------
# FlashBias patch: at inference each block runs its window attention on a fused Triton kernel
# (flash_bias_triton.py, flash_bias_runtime.py and flash_bias_factors.py, copied next to this file); the official
# math stays in place for training and as the reference. Search "FlashBias".
# --------------------------------------------------------

import math

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
    from .flash_bias_triton import (autocast_dtype, bias_from_table, block_tail, cpb_table, flash_bias_attention,
                                    merge_patches, patch_embed_forward, residual_layer_norm, tracing_or_exporting)
    from .flash_bias_runtime import (FlashBiasSettings, LayerBias, configure, has_hooks, replay_model_call,
                                     replaying_call)
except ImportError:
    from flash_bias_triton import (autocast_dtype, bias_from_table, block_tail, cpb_table, flash_bias_attention,
                                   merge_patches, patch_embed_forward, residual_layer_norm, tracing_or_exporting)
    from flash_bias_runtime import (FlashBiasSettings, LayerBias, configure, has_hooks, replay_model_call,
                                    replaying_call)


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

    def forward_fused(self, x, image_size=None, shift_size=0, region_ids=None, bias=None, qkv_bias=None,
                      project=True):
        """FlashBias: this attention on the fused kernel.

        Args:
            x: (num_windows*B, N, C) windows, or (B, H*W, C) in image order with image_size=(H, W): the kernel then
                does the cyclic shift by shift_size and the window partition / reverse itself
            region_ids: (num_windows, Wh*Ww) regions of the shift mask, or None
            bias: this layer's exact bias as LayerBias.stage_biases derived it for this forward, or None
            qkv_bias: this layer's row of qkv_biases made for its stage in this forward, or None
            project: False: the output before the output projection, which the caller applies (deferred_proj)
        """
        qv_bias = None
        if qkv_bias is None and self.q_bias is not None:
            if self.training or torch.is_grad_enabled():
                qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias, requires_grad=False), self.v_bias))
            else:  # inference: the attention kernel adds them, and the matmul needs no bias epilogue
                qv_bias = (self.q_bias, self.v_bias)
        qkv = F.linear(input=x, weight=self.qkv.weight, bias=qkv_bias)
        x = flash_bias_attention(qkv, self.num_heads, self.logit_scale, region_ids=region_ids, image_size=image_size,
                                 window_size=self.window_size, shift_size=shift_size, qv_bias=qv_bias,
                                 **self.flash_bias.operands(self, qkv, bias))
        return self.proj_drop(self.proj(x)) if project else x

    def deferred_proj(self):
        """FlashBias: the output projection for the block's tail to apply (forward_fused's project=False), or None:
        forward_fused applies it. Deferred at inference, for a plain nn.Linear with a bias and without hooks: the tail
        adds its bias in a pass it makes anyway, or at stage 1 runs the whole projection in its kernel (block_tail)."""
        proj = self.proj
        if self.training or type(proj) is not nn.Linear or proj.bias is None or has_hooks(proj):
            return None
        return proj

    def use_fused_attn(self, x):
        """FlashBias: whether this attention runs fused for input x (see the class docstring). Tracing, scripting and
        exporting (torch.jit, torch.export, torch.onnx) take the official math, which every exporter understands."""
        if not self.fused_attn or tracing_or_exporting():
            return False
        if self.training or (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))):
            # training and gradients: the kernel and its backward on CUDA; attention dropout takes the official math
            return x.is_cuda and self.attn_drop.p == 0
        return True

    def derive_bias(self, center_rows=False, dtype=torch.float32, requires_grad=False):
        """FlashBias: the relative position bias 16 * sigmoid(cpb_mlp(relative_coords_table))[relative_position_index]
        of the current weights, (num_heads, Wh*Ww, Wh*Ww) in dtype, in two launches; no grad unless requires_grad (then
        the same math in PyTorch where grad mode is on, differentiable into cpb_mlp, for training). The MLP runs in float32
        from upcast weights (also under .half() or autocast). center_rows: minus 8, the middle of 16 * sigmoid's range
        (softmax ignores a row's constant; it halves float16 rounding)."""
        return self.derive_biases([self], center_rows, dtype, requires_grad)[0]

    @staticmethod
    def derive_biases(layers, center_rows=False, dtype=torch.float32, requires_grad=False):
        """FlashBias: derive_bias of several layers of one shape (a stage), (len(layers), num_heads, Wh*Ww, Wh*Ww): two
        launches for all of them at inference."""
        with torch.set_grad_enabled(requires_grad and torch.is_grad_enabled()):
            # iterated, not indexed: Sequential's indexing took ~160 of 490 us for SwinV2-B's 18-layer stage
            mlps = [tuple(a.cpb_mlp) for a in layers]
            # the training bias in PyTorch also without grad (checkpoint's first forward): the same bits as with it.
            # At inference the table takes its sigmoid once per entry, and the gather none (the same bits)
            sigmoid_in_table = 16.0 if not requires_grad else None
            tables = cpb_table([a.relative_coords_table.reshape(-1, 2) for a in layers],
                               [m[0].weight for m in mlps], [m[0].bias for m in mlps], [m[2].weight for m in mlps],
                               sigmoid_scale=sigmoid_in_table, center_rows=center_rows,
                               backend="torch" if requires_grad else None)  # L, (2*Wh-1)*(2*Ww-1), nH
            return bias_from_table(tables, [a.relative_position_index for a in layers],
                                   sigmoid_scale=None if sigmoid_in_table else 16.0,
                                   center_rows=center_rows and not sigmoid_in_table, out_dtype=dtype)

    @staticmethod
    def qkv_biases(layers):
        """FlashBias: the qkv matmul's bias cat(q_bias, 0, v_bias) of several layers of one shape, (len(layers), 3*dim)
        in the dtype the matmul casts it to, or None without q_bias: three launches for a stage where each layer takes
        three (zeros, cat, autocast's cast: 72 of a SwinV2-B forward's ~450 kernels)."""
        if layers[0].q_bias is None:
            return None
        q_bias = layers[0].q_bias
        zeros = torch.zeros_like(layers[0].v_bias, requires_grad=False)
        biases = torch.cat([t for a in layers for t in (a.q_bias, zeros, a.v_bias)]).view(len(layers), -1)
        return biases.to(autocast_dtype(q_bias.device.type) or q_bias.dtype)

    def bias_weights(self):
        """FlashBias: {name: tensor} derive_bias reads, in the order of the factor files' checksum."""
        return {"cpb_mlp.0.weight": self.cpb_mlp[0].weight, "cpb_mlp.0.bias": self.cpb_mlp[0].bias,
                "cpb_mlp.2.weight": self.cpb_mlp[2].weight, "relative_coords_table": self.relative_coords_table,
                "relative_position_index": self.relative_position_index}

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
            return self.forward_fused(x)[0]

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

    def forward_fused(self, x, x_low=None, bias=None, qkv_bias=None, merge=False):
        """FlashBias: the block on the fused kernels (training: see below). The attention kernel does the cyclic
        shift, the window partition / reverse and the shift mask itself; the rest, both residual + res-post-norm
        steps and the MLP (drop path is the identity at inference), is block_tail: two LayerNorm passes around the
        MLP (or one kernel for all, where enabled). Under autocast it also writes the half-precision copy of the
        output that the next matmul reads.

        Args:
            x: (B, H*W, C) the block's input; x_low: x in the autocast dtype when the previous block wrote it, else None
            bias, qkv_bias: the attention's exact bias and qkv bias, made with its stage (BasicLayer.forward_fused), or
                None
            merge: the last block before a patch merging: the half-precision copy in the merging's layout
                (merge_patches), and then no float32 output
        Returns:
            (output or None, output in the autocast dtype (merged with merge), or None)
        """
        proj = self.attn.deferred_proj()
        attn = self.attn.forward_fused(x if x_low is None else x_low, image_size=self.input_resolution,
                                       shift_size=self.shift_size, region_ids=self.region_ids, bias=bias,
                                       qkv_bias=qkv_bias, project=proj is None)
        if self.training:  # drop path is random in training: the official residual steps around the fused attention
            x = x + self.drop_path(self.norm1(attn))
            return x + self.drop_path(self.norm2(self.mlp(x))), None
        return block_tail(x, attn, self.norm1, self.mlp, self.norm2,
                          merge_size=self.input_resolution if merge else None, attn_proj=proj)

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

    def forward_fused(self, x, merged=False):
        """FlashBias: forward at inference, its norm one pass of the residual + LayerNorm kernel (no residual). Under
        CUDA's autocast self.norm is two: a cast of the reduction's half-precision output to float32, then a float32
        LayerNorm, ~1.3 ms of a SwinV2-B/384 batch-64 forward. x: (B, H*W, C) -> (B, H/2*W/2, 2C), as forward; merged:
        x is already gathered, (B, H/2*W/2, 4C) (the stage's last block wrote it so). Returns (out, out in the autocast
        dtype or None), as residual_layer_norm: the next stage's qkv matmul reads the latter."""
        H, W = self.input_resolution
        if merged:
            B, L, C4 = x.shape
            assert L * 4 == H * W and C4 == 4 * self.dim, "input feature has wrong size"
        else:
            B, L, C = x.shape
            assert L == H * W, "input feature has wrong size"
            assert H % 2 == 0 and W % 2 == 0, f"x size ({H}*{W}) are not even."
            x = merge_patches(x, (H, W))  # forward's cat of x0, x1, x2, x3 as one permuting copy
        x = self.reduction(x)
        return residual_layer_norm(None, x, self.norm)

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
        if self.forward_fuses(x):  # FlashBias: blocks chained
            return self.forward_fused(x)[0]
        for blk in self.blocks:
            if self.use_checkpoint:
                x = checkpoint.checkpoint(blk, x)
            else:
                x = blk(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x

    def forward_fuses(self, x):
        """FlashBias: whether forward runs forward_fused for input x: at inference, where every block's attention runs
        fused."""
        return not self.training and all(blk.attn.use_fused_attn(x) for blk in self.blocks)

    def forward_fused(self, x, x_low=None):
        """FlashBias: the blocks at inference, each handing the next the half-precision copy of its output that its last
        residual + LayerNorm pass wrote under autocast (the qkv matmul's input: no cast kernel), then the downsample,
        which reads that copy too (its matmul reads half precision under autocast anyway: same result), written by the
        last block already gathered in the merging's layout: no copy, and no float32 output (SwinV2-B/384 at batch 64
        on an H100: 27.36 against 27.95 ms a forward with the merging's own copy).

        x: (B, H*W, C); x_low: x in the autocast dtype as the previous stage wrote it, or None. Returns (out, out in
        the autocast dtype or None): the downsample's, else the last block's."""
        attns = [blk.attn for blk in self.blocks]
        biases = LayerBias.stage_biases(attns, x)  # two launches, not two per block
        # with gradients three launches, not three per block; without, the attention kernel adds q_bias and v_bias
        qkv_biases = WindowAttention.qkv_biases(attns) if torch.is_grad_enabled() else None
        for i, (blk, bias) in enumerate(zip(self.blocks, biases)):
            merge = self.downsample is not None and i == len(self.blocks) - 1
            x, x_low = blk.forward_fused(x, x_low, bias, None if qkv_biases is None else qkv_biases[i], merge)
        if self.downsample is not None:  # x is None where the last block wrote its half-precision copy merged
            return self.downsample.forward_fused(x if x_low is None else x_low, merged=x is None)
        return x, x_low

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

    def forward_fused(self, x):
        """FlashBias: forward at inference, under half-precision autocast one kernel for the patch gather, the conv,
        its bias and the norm (patch_embed_forward): ~2 ms less of a SwinV2-B/384 batch-64 forward on an H100. Returns
        (forward's output, that in the autocast dtype or None)."""
        B, C, H, W = x.shape
        assert H == self.img_size[0] and W == self.img_size[1], \
            f"Input image size ({H}*{W}) doesn't match model ({self.img_size[0]}*{self.img_size[1]})."
        return patch_embed_forward(self, x)

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

        self.flash_bias_settings = FlashBiasSettings()  # FlashBias: not in the state dict

    def set_flash_bias(self, rank_rule=None, factors_path=None, fused=None, cuda_graphs=None):
        """FlashBias settings, applied at the next fused forward (so a checkpoint can still be loaded first).

        Args:
            rank_rule: how a layer without factor files gets its bias: "exact" (dense, the default), "rank:R" (SVD,
                fixed rank), "energy:E" (the smallest rank keeping E of the spectral energy, the FlashBias paper's
                rule), "logit:L" (the smallest rank with max logit error <= L, else exact). None: $FLASHBIAS_RANK.
            factors_path: a factor folder or file (flash_bias_runtime.load_bias_factors); files take precedence over
                the rank rule. None: $FLASHBIAS_FACTORS_DIR, else ./decomposed_bias if it holds factor files; False:
                no files.
            fused: set every WindowAttention's fused_attn flag (None: leave them).
            cuda_graphs: replay the fused forward from CUDA graphs (flash_bias_runtime.ForwardGraphs). None:
                $FLASHBIAS_CUDA_GRAPHS ("0" off), else on.
        """
        configure(self, rank_rule, factors_path, fused, cuda_graphs)

    # FlashBias: model(x) in eval replays its CUDA graph before Module.__call__, and outside torch.compile
    __call__ = replaying_call(nn.Module.__call__, replay_model_call)

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
        self.flash_bias_settings.resolve_at_first_fused_forward(self, self.layers[0].blocks[0].attn, x)  # FlashBias
        # FlashBias: fused stages hand on x_low, x in the autocast dtype, which their LayerNorm kernels write anyway:
        # the next qkv matmul reads it instead of casting x (0.29 ms of a SwinV2-B/384 batch-64 forward on an H100)
        x, x_low = self.patch_embed.forward_fused(x) if self.layers[0].forward_fuses(x) else (self.patch_embed(x), None)
        if self.ape:
            x, x_low = x + self.absolute_pos_embed, None
        x = self.pos_drop(x)

        for layer in self.layers:
            fused = layer.forward_fuses(x) and not has_hooks(layer)  # FlashBias: hooks run where the layer is called
            x, x_low = layer.forward_fused(x, x_low) if fused else (layer(x), None)

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
