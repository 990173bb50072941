"""FlashBias for SwinV2 models built by timm or Hugging Face transformers.

    model = timm.create_model("swinv2_base_window12to24_192to384", pretrained=True).eval().cuda()
    patch_timm(model)                       # in place; returns the model
    ...
    model = Swinv2ForImageClassification.from_pretrained(...).eval().cuda()
    patch_transformers(model)
    unpatch(model)                          # the library's model again, bit for bit

What a patch changes: every SwinV2 block (timm ``SwinTransformerV2Block``, transformers ``Swinv2Layer``) gets an
instance ``forward`` (the class's own stays untouched) and its attention module a ``fused_attn`` flag, as timm's
attention modules have. Nothing else: the module tree, parameters, buffers and the state dict stay the library's,
so checkpoints load and save as before; ``unpatch`` deletes the two attributes again.

A block runs fused when its attention's ``fused_attn`` is set, it is in eval mode, nothing needs a gradient (the
kernel has no backward), nothing traces, scripts or exports it (torch.jit, torch.fx, torch.export, torch.onnx get
the library's math, which every exporter understands), timm is not in exportable mode (``timm.layers.
set_exportable``; ``TIMM_FUSED_ATTN=0`` clears the flag at patch time through ``timm.layers.use_fused_attn()``),
transformers is not asked for attention weights or a head mask, and no forward hook sits on its attention modules
(the fused path does not call them). Otherwise the library's own forward runs, unchanged.

The fused block is the drop-in's (``swin_transformer_v2.SwinTransformerBlock.forward_fused``): one qkv projection,
the kernel in image layout (it does the cyclic shift, the window partition / reverse and the shift mask itself),
the output projection, and the block's two residual + post-norm steps in two passes (``residual_steps``). The bias
``16 * sigmoid(cpb_mlp(relative_coords_table))[relative_position_index]`` is derived from the current weights in
every fused forward (``bias_from_table``; float16 with centred rows for the kernel), so it is never stale.

Where the libraries differ:

* timm pads the map to a multiple of the window *after* the cyclic shift (``dynamic_img_size``,
  ``always_partition``) and may shift one axis only (a map narrower than the window on the other): then the kernel
  runs in window layout on the library's roll / pad / partition. The shift mask's region ids are derived once from
  timm's own mask (its ``attn_mask`` buffer, or ``get_attn_mask`` per padded size with ``dynamic_mask``) and checked
  against it.
* transformers pads *before* the shift, so the padded map goes through the kernel in image layout; the region ids
  are ``shifted_window_region_ids`` of the padded size. Its separate query / key / value projections write into
  column slices of one (B, L, 3C) tensor through ``out=`` (no weight is copied; see :func:`_project_qkv`).
  transformers adds its -100 shift mask twice (-200); the kernel adds -100 once, as the official code and timm do:
  a masked weight is below exp(-100) of the row's largest either way.

``cuda_graphs=True`` replays the model's fused forward (timm: the model's ``forward``; transformers: the encoder's,
so every model class shares it) from CUDA graphs through the drop-ins' ``flash_bias_runtime.ForwardGraphs``: one
launch instead of hundreds, for small batches whose host time bounds them.
"""
import collections
import warnings
from typing import Callable, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from flash_bias_runtime import ForwardGraphs, replaying_call
from flash_bias_triton import (BACKENDS, autocast_dtype, bias_from_table, flash_bias_attention, region_mask,
                               residual_steps, shifted_window_region_ids, tracing_or_exporting)

__all__ = ["patch_timm", "patch_transformers", "unpatch", "is_patched"]

_ABSENT = object()  # an attribute the module did not have before the patch


# ----------------------------------------------------------------------------------------------
# When the library's own math runs
# ----------------------------------------------------------------------------------------------
def _needs_grad(module: nn.Module, x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def _hooked(modules: Iterable[nn.Module]) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _only_defaults(args: tuple, kwargs: dict) -> bool:
    """Whether every optional argument is off: None or False (output_attentions=False, head_mask=None)."""
    return all(value is None or value is False for value in (*args, *kwargs.values()))


# ----------------------------------------------------------------------------------------------
# Pieces both libraries share
# ----------------------------------------------------------------------------------------------
def _relative_position_bias(mlp: nn.Sequential, coords_table: torch.Tensor, index: torch.Tensor,
                            for_kernel: bool, backend: Optional[str]) -> torch.Tensor:
    """SwinV2's continuous position bias (H, N, N) of the current weights. The MLP runs in float32 from upcast
    weights (also under .half() or autocast), as the drop-in's derive_bias; for the kernel float16 with centred
    rows (half the bias reads; softmax ignores a row's constant, centring halves the rounding)."""
    first, last = mlp[0], mlp[2]
    with torch.autocast(coords_table.device.type, enabled=False):
        hidden = F.relu(F.linear(coords_table.reshape(-1, 2).float(), first.weight.float(),
                                 None if first.bias is None else first.bias.float()))
        table = F.linear(hidden, last.weight.float(), None if last.bias is None else last.bias.float())
    return bias_from_table(table, index, center_rows=for_kernel,
                           out_dtype=torch.float16 if for_kernel else torch.float32, backend=backend)


def _check_cpb_mlp(mlp: nn.Module, where: str) -> None:
    if not (isinstance(mlp, nn.Sequential) and len(mlp) == 3 and isinstance(mlp[0], nn.Linear)
            and isinstance(mlp[1], nn.ReLU) and isinstance(mlp[2], nn.Linear) and mlp[0].in_features == 2):
        raise TypeError(f"FlashBias: {where}'s continuous position bias MLP is not SwinV2's "
                        f"Sequential(Linear(2, hidden), ReLU, Linear(hidden, heads)): {mlp!r}")


def _check_layer_norm(norm: nn.Module, where: str) -> None:
    if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
        raise TypeError(f"FlashBias: {where} is not a LayerNorm over the channels (the fused residual + post-norm "
                        f"needs one): {norm!r}")


def _project_qkv(x: torch.Tensor, projections: Sequence[nn.Linear]) -> torch.Tensor:
    """(..., sum of out_features): the projections' outputs side by side, each written by one matmul into its
    column slice of a single output through ``out=``, so the kernel reads q | k | v from one tensor without the
    weights being concatenated (copied) on each call.

    What PyTorch's addmm does with a column slice (aten/src/ATen/native/cuda/Blas.cpp, read for torch 2.x): the
    slice (row stride 3C, column stride 1) goes to cuBLAS as it is (leading dimension 3C): no copy of the output.
    But cuBLASLt's fused-bias epilogue needs a contiguous output, so a projection with a bias first writes the bias
    into its slice and the GEMM adds onto it (beta = 1): one extra write and read of that slice, no weight copy.
    (The CPU path does the same.) The dtype is the input's, or autocast's, as nn.Linear would give."""
    rows = x.reshape(-1, x.shape[-1])
    dtype = autocast_dtype(x.device.type) if x.is_floating_point() else None
    dtype = dtype or x.dtype
    widths = [p.out_features for p in projections]
    out = rows.new_empty((rows.shape[0], sum(widths)), dtype=dtype)
    with torch.autocast(x.device.type, enabled=False):  # out= variants have no autocast: cast as it would
        rows = rows.to(dtype)
        start = 0
        for projection, width in zip(projections, widths):
            weight, bias = projection.weight.to(dtype), projection.bias
            target = out[:, start:start + width]
            if bias is None:
                torch.mm(rows, weight.t(), out=target)
            else:
                torch.addmm(bias.to(dtype), rows, weight.t(), out=target)
            start += width
    return out.view(*x.shape[:-1], sum(widths))


def _regions_of_mask(mask: torch.Tensor) -> Optional[torch.Tensor]:
    """Region ids (nW, N) int32 whose ``region_mask`` is the library's shift mask (nW, N, N) (0 within a region,
    -100 across), or None when the mask is not of that form. Each token is labelled with the first token it may
    attend to, the smallest member of its region; the check costs a host sync, so this runs once per mask."""
    with torch.no_grad():
        ids = (mask == 0).to(torch.int32).argmax(-1).to(torch.int32)
        if mask.dim() == 3 and torch.equal(region_mask(ids, mask.dtype), mask):
            return ids.contiguous()
    return None


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference-mode tensor has no version counter (and cannot be written outside it)
        return -1


def _round_up(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def _windows(x: torch.Tensor, window: Tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, wh * ww, C), windows row-major, tokens row-major within a window."""
    B, H, W, C = x.shape
    wh, ww = window
    x = x.view(B, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, C)


def _merge_windows(x: torch.Tensor, window: Tuple[int, int], size: Tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`_windows`: (B * nW, wh * ww, C) -> (B, H, W, C)."""
    (wh, ww), (H, W) = window, size
    C = x.shape[-1]
    x = x.view(-1, H // wh, W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


# ----------------------------------------------------------------------------------------------
# Patched forwards: instance attributes, so the class's forward stays the library's
# ----------------------------------------------------------------------------------------------
class _PatchedForward:
    """Base of every forward a patch installs; ``restore`` undoes what the patch set besides the forward."""

    def restore(self) -> None:
        pass


class _BlockForward(_PatchedForward):
    """A patched block's forward: fused when it can, else the class's own. Holds the block and the flag it set on
    the block's attention (restored by unpatch), and the shift mask's region ids per geometry."""

    def __init__(self, block: nn.Module, attention: nn.Module, backend: Optional[str], fused: bool):
        self.block, self.attention, self.backend = block, attention, backend
        self.previous_flag = attention.__dict__.get("fused_attn", _ABSENT)
        attention.fused_attn = fused
        self.regions = {}

    def restore(self) -> None:
        if self.previous_flag is _ABSENT:
            self.attention.__dict__.pop("fused_attn", None)
        else:
            self.attention.fused_attn = self.previous_flag

    def enabled(self) -> bool:
        """The conditions that do not depend on the input (CUDA-graph replay checks them for every block)."""
        return bool(getattr(self.attention, "fused_attn", False)) and not self.block.training

    def fused(self, x: torch.Tensor) -> bool:
        return (self.enabled() and not tracing_or_exporting() and not _needs_grad(self.block, x)
                and not _hooked(self.hooked_modules()))

    def hooked_modules(self) -> Sequence[nn.Module]:
        return (self.attention,)

    def attention_bias(self, qkv: torch.Tensor, attention: nn.Module, mlp: nn.Sequential) -> torch.Tensor:
        for_kernel = qkv.is_cuda and qkv.dtype != torch.float64
        return _relative_position_bias(mlp, attention.relative_coords_table, attention.relative_position_index,
                                       for_kernel, self.backend)


class _TimmBlockForward(_BlockForward):
    """timm SwinTransformerV2Block.forward(x), x (B, H, W, C)."""
    NOT_A_REGION_MASK = "not a region mask"

    def __init__(self, block: nn.Module, backend: Optional[str], fused: bool, is_exportable: Callable[[], bool]):
        super().__init__(block, block.attn, backend, fused)
        self.is_exportable = is_exportable

    def enabled(self) -> bool:
        return super().enabled() and not self.is_exportable()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and self.fused(x):
            B, H, W, C = x.shape
            wh, ww = self.block.window_size
            regions = self.region_ids(_round_up(H, wh), _round_up(W, ww), x.device)
            if regions is not self.NOT_A_REGION_MASK:
                return self.forward_fused(x, regions)
        return type(self.block).forward(self.block, x)

    def region_ids(self, height: int, width: int, device: torch.device):
        """The region ids of timm's shift mask for the padded map (height, width), derived once per mask: the
        attn_mask buffer (a new one after set_input_size or .to()), or with dynamic_mask one per padded size."""
        block = self.block
        if not any(block.shift_size):
            return None
        if getattr(block, "dynamic_mask", False):
            key = (height, width, tuple(block.window_size), tuple(block.shift_size), device)
            if key not in self.regions:
                probe = torch.zeros((1, height, width, 1), device=device)  # get_attn_mask reads its size
                self.regions[key] = self.derive(block.get_attn_mask(probe))
            return self.regions[key]
        mask = block.attn_mask
        # the cache holds the buffer it was derived from, so an id in the key cannot be reused by another tensor
        key = (id(mask), _version(mask))
        if key not in self.regions:
            self.regions = {key: self.derive(mask), "mask": mask}
        return self.regions[key]

    def derive(self, mask: torch.Tensor):
        ids = _regions_of_mask(mask)
        if ids is None:
            warnings.warn("FlashBias: a timm SwinV2 block's shift mask is not a region mask (0 within a region, "
                          "-100 across); the block runs timm's own attention", RuntimeWarning)
            return self.NOT_A_REGION_MASK
        return ids

    def forward_fused(self, x: torch.Tensor, regions: Optional[torch.Tensor]) -> torch.Tensor:
        block = self.block
        B, H, W, C = x.shape
        (wh, ww), (sh, sw) = block.window_size, block.shift_size
        if H % wh == 0 and W % ww == 0 and sh == sw:
            qkv = self.project_qkv(x.reshape(B, H * W, C))
            attended = self.attend(qkv, regions, image_size=(H, W), shift_size=sh)
        else:
            attended = self.attend_windows(x, regions)
        x, _ = residual_steps(x.reshape(B, H * W, C), attended, block.norm1, block.mlp, block.norm2,
                              backend=self.backend)
        return x.reshape(B, H, W, C)

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attention
        if attn.q_bias is None:
            return attn.qkv(x)
        k_bias = getattr(attn, "k_bias", None)
        k_bias = torch.zeros_like(attn.v_bias) if k_bias is None else k_bias
        return F.linear(x, attn.qkv.weight, torch.cat((attn.q_bias, k_bias, attn.v_bias)))

    def attend(self, qkv: torch.Tensor, regions: Optional[torch.Tensor], image_size: Optional[Tuple[int, int]],
               shift_size: int) -> torch.Tensor:
        attn = self.attention
        out = flash_bias_attention(qkv, attn.num_heads, logit_scale=attn.logit_scale,
                                   bias=self.attention_bias(qkv, attn, attn.cpb_mlp), region_ids=regions,
                                   image_size=image_size, window_size=tuple(self.block.window_size),
                                   shift_size=shift_size, backend=self.backend)
        return attn.proj(out)

    def attend_windows(self, x: torch.Tensor, regions: Optional[torch.Tensor]) -> torch.Tensor:
        """timm's order for a padded map or a one-axis shift: roll, pad, partition; the kernel in window layout;
        merge, crop, roll back. (B, H * W, C)."""
        B, H, W, C = x.shape
        window, (sh, sw) = tuple(self.block.window_size), tuple(self.block.shift_size)
        padded = (_round_up(H, window[0]), _round_up(W, window[1]))
        shifted = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2)) if sh or sw else x
        shifted = F.pad(shifted, (0, 0, 0, padded[1] - W, 0, padded[0] - H))
        out = self.attend(self.project_qkv(_windows(shifted, window)), regions, image_size=None, shift_size=0)
        shifted = _merge_windows(out, window, padded)[:, :H, :W]
        out = torch.roll(shifted, shifts=(sh, sw), dims=(1, 2)) if sh or sw else shifted
        return out.reshape(B, H * W, C)


class _TransformersLayerForward(_BlockForward):
    """transformers Swinv2Layer.forward(hidden_states, input_dimensions, ...), hidden_states (B, H * W, C); returns
    the library's tuple (layer_output,)."""

    def __init__(self, layer: nn.Module, backend: Optional[str], fused: bool):
        super().__init__(layer, layer.attention.self, backend, fused)

    def hooked_modules(self) -> Sequence[nn.Module]:
        return (self.block.attention, self.attention, self.block.attention.output)

    def __call__(self, hidden_states: torch.Tensor, input_dimensions, *args, **kwargs):
        if _only_defaults(args, kwargs) and hidden_states.dim() == 3 and self.fused(hidden_states):
            return (self.forward_fused(hidden_states, tuple(int(s) for s in input_dimensions)),)
        return type(self.block).forward(self.block, hidden_states, input_dimensions, *args, **kwargs)

    def region_ids(self, height: int, width: int, device: torch.device) -> Optional[torch.Tensor]:
        layer = self.block
        if layer.shift_size <= 0:
            return None
        key = (height, width, layer.window_size, layer.shift_size, device)
        if key not in self.regions:
            self.regions[key] = shifted_window_region_ids((height, width), layer.window_size,
                                                          layer.shift_size).to(device)
        return self.regions[key]

    def forward_fused(self, hidden_states: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        layer, attn = self.block, self.attention
        (H, W), B, C = size, hidden_states.shape[0], hidden_states.shape[-1]
        window, shift = layer.window_size, layer.shift_size
        padded = (_round_up(H, window), _round_up(W, window))
        x = hidden_states
        if padded != (H, W):  # the library pads before the cyclic shift: the padded map is the image
            x = F.pad(x.reshape(B, H, W, C), (0, 0, 0, padded[1] - W, 0, padded[0] - H)).reshape(B, -1, C)
        qkv = _project_qkv(x, (attn.query, attn.key, attn.value))
        out = flash_bias_attention(qkv, attn.num_attention_heads, logit_scale=attn.logit_scale,
                                   bias=self.attention_bias(qkv, attn, attn.continuous_position_bias_mlp),
                                   region_ids=self.region_ids(*padded, x.device), image_size=padded,
                                   window_size=(window, window), shift_size=shift, backend=self.backend)
        out = layer.attention.output.dense(out)
        if padded != (H, W):
            out = out.reshape(B, padded[0], padded[1], C)[:, :H, :W].reshape(B, H * W, C)
        return residual_steps(hidden_states, out, layer.layernorm_before,
                              lambda x1: layer.output(layer.intermediate(x1)), layer.layernorm_after,
                              backend=self.backend)[0]


# ----------------------------------------------------------------------------------------------
# CUDA graphs: the drop-in's ForwardGraphs around a model's (or an encoder's) fused forward
# ----------------------------------------------------------------------------------------------
def _forward_graphs():
    return ForwardGraphs()


class _GraphTarget:
    """What ForwardGraphs captures: a function of the input, with the parameters and buffers of the module it
    reads (ForwardGraphs drops its graphs when any of them gets new storage)."""

    def __init__(self, module: nn.Module, function: Callable[[torch.Tensor], torch.Tensor]):
        self.module, self.function = module, function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x)

    def parameters(self):
        return self.module.parameters()

    def buffers(self):
        return self.module.buffers()


class _GraphedForward(_PatchedForward):
    """A module's forward replayed from CUDA graphs while every patched block under it runs fused; else the
    class's own forward. Copies and pickles start with no graphs."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.graphs = collections.OrderedDict()  # extra key (e.g. the map size) -> ForwardGraphs
        self.blocks = None

    def __getstate__(self):
        return {**self.__dict__, "graphs": collections.OrderedDict(), "blocks": None}

    def replayable(self, x: torch.Tensor) -> bool:
        if x.device.type not in ForwardGraphs.device_types or self.module.training or tracing_or_exporting():
            return False
        if any(g.in_forward for g in self.graphs.values()):
            return False
        if self.blocks is None:
            self.blocks = [m.__dict__["forward"] for m in self.module.modules()
                           if isinstance(m.__dict__.get("forward"), _BlockForward)]
        return (bool(self.blocks) and all(b.enabled() and b.block.__dict__.get("forward") is b for b in self.blocks)
                and not _needs_grad(self.module, x))

    def replay(self, key, function: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
        """The output for x from the graphs of ``key`` (at most 4 keys kept), or None: run eagerly."""
        if key not in self.graphs:
            while len(self.graphs) >= 4:
                self.graphs.popitem(last=False)
            self.graphs[key] = _forward_graphs()
        self.graphs.move_to_end(key)
        return self.graphs[key].run(_GraphTarget(self.module, function), x)


class _TimmGraphedForward(_GraphedForward):
    """timm SwinTransformerV2.forward(x); replayed outside torch.compile (replaying_call)."""

    def replayed(self, x: torch.Tensor, *args, **kwargs):
        module = self.module
        if args or kwargs or not self.replayable(x):
            return None
        return self.replay(None, lambda inp: type(module).forward(module, inp), x)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        return type(self.module).forward(self.module, x, *args, **kwargs)

    __call__ = replaying_call(forward, replayed)


class _TransformersGraphedForward(_GraphedForward):
    """transformers Swinv2Encoder.forward(hidden_states, input_dimensions, ..., return_dict=True): replayed when
    only the last hidden state is asked for, outside torch.compile (replaying_call)."""

    def __init__(self, module: nn.Module, output_type: type):
        super().__init__(module)
        self.output_type = output_type

    def replayed(self, hidden_states: torch.Tensor, input_dimensions, *args, **kwargs):
        encoder = self.module
        options = dict(kwargs)
        return_dict = options.pop("return_dict", True)
        if args or not _only_defaults((), options) or not self.replayable(hidden_states):
            return None
        size = tuple(int(s) for s in input_dimensions)
        last = lambda inp: type(encoder).forward(encoder, inp, size, return_dict=False)[0]  # noqa: E731
        out = self.replay(size, last, hidden_states)
        if out is None:
            return None
        return self.output_type(last_hidden_state=out) if return_dict else (out,)

    def forward(self, hidden_states: torch.Tensor, input_dimensions, *args, **kwargs):
        return type(self.module).forward(self.module, hidden_states, input_dimensions, *args, **kwargs)

    __call__ = replaying_call(forward, replayed)


# ----------------------------------------------------------------------------------------------
# The public functions
# ----------------------------------------------------------------------------------------------
def _check_backend(backend: Optional[str]) -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"FlashBias: backend must be None or one of {', '.join(map(repr, BACKENDS))}; "
                         f"got {backend!r}")


def _check_timm_block(block: nn.Module, name: str) -> None:
    attn = block.attn
    for owner, attrs in ((block, ("norm1", "norm2", "mlp", "window_size", "shift_size")),
                         (attn, ("qkv", "q_bias", "v_bias", "proj", "num_heads", "logit_scale", "cpb_mlp",
                                 "relative_coords_table", "relative_position_index"))):
        missing = [a for a in attrs if not hasattr(owner, a)]
        if missing:
            raise TypeError(f"FlashBias: {name} ({type(owner).__name__}) lacks {missing}: not the timm SwinV2 "
                            f"this adapter knows (timm >= 0.9)")
    _check_cpb_mlp(attn.cpb_mlp, f"{name}.attn")
    _check_layer_norm(block.norm1, f"{name}.norm1")
    _check_layer_norm(block.norm2, f"{name}.norm2")


def patch_timm(model: nn.Module, *, cuda_graphs: bool = False, backend: Optional[str] = None) -> nn.Module:
    """Switch the SwinV2 blocks of a timm model (``timm.models.swin_transformer_v2``) to the fused kernel at
    inference, in place (see the module docstring); returns the model. A model patched before is re-patched.

    Args:
        model: a timm SwinTransformerV2, or any module containing its blocks.
        cuda_graphs: replay each SwinTransformerV2's forward from CUDA graphs when it runs fused on CUDA (the
            first call of an input shape runs eagerly, the second captures; see flash_bias_runtime.ForwardGraphs).
        backend: the kernel-or-PyTorch choice of flash_bias_triton ("auto", "triton", "torch"); None reads
            FLASHBIAS_BACKEND, default "auto": the kernel on CUDA.

    The attention modules' ``fused_attn`` is set from ``timm.layers.use_fused_attn()``: off under
    ``TIMM_FUSED_ATTN=0``, ``timm.layers.set_fused_attn(False)`` or exportable mode; set it per module to choose.
    """
    from timm.layers import is_exportable, use_fused_attn
    from timm.models.swin_transformer_v2 import SwinTransformerV2, SwinTransformerV2Block
    _check_backend(backend)
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, SwinTransformerV2Block)]
    if not blocks:
        raise TypeError(f"FlashBias: patch_timm found no timm SwinTransformerV2Block in {type(model).__name__}; "
                        f"for transformers' Swinv2 use patch_transformers")
    for name, block in blocks:
        _check_timm_block(block, name or type(model).__name__)
    unpatch(model)
    fused = use_fused_attn()
    for _, block in blocks:
        block.forward = _TimmBlockForward(block, backend, fused, is_exportable)
    if cuda_graphs:
        for module in model.modules():
            if isinstance(module, SwinTransformerV2):
                module.forward = _TimmGraphedForward(module)
    return model


def _check_transformers_layer(layer: nn.Module, name: str) -> None:
    attn = getattr(getattr(layer, "attention", None), "self", None)
    expected = {layer: ("attention", "layernorm_before", "layernorm_after", "intermediate", "output",
                        "window_size", "shift_size"),
                attn: ("query", "key", "value", "num_attention_heads", "logit_scale", "continuous_position_bias_mlp",
                       "relative_coords_table", "relative_position_index")}
    for owner, attrs in expected.items():
        missing = [a for a in attrs if not hasattr(owner, a)]
        if owner is None or missing:
            raise TypeError(f"FlashBias: {name} lacks {missing or ['attention.self']}: not the transformers Swinv2 "
                            f"this adapter knows")
    if not isinstance(layer.window_size, int) or not isinstance(layer.shift_size, int):
        raise TypeError(f"FlashBias: {name}: window_size and shift_size should be ints (one square window), got "
                        f"{layer.window_size!r} and {layer.shift_size!r}")
    if not all(isinstance(p, nn.Linear) for p in (attn.query, attn.key, attn.value)):
        raise TypeError(f"FlashBias: {name}.attention.self: query, key and value should be nn.Linear")
    _check_cpb_mlp(attn.continuous_position_bias_mlp, f"{name}.attention.self")
    _check_layer_norm(layer.layernorm_before, f"{name}.layernorm_before")
    _check_layer_norm(layer.layernorm_after, f"{name}.layernorm_after")


def patch_transformers(model: nn.Module, *, cuda_graphs: bool = False, backend: Optional[str] = None) -> nn.Module:
    """Switch the Swinv2 layers of a Hugging Face transformers model (Swinv2Model, Swinv2ForImageClassification,
    Swinv2ForMaskedImageModeling, Swinv2Backbone, or any module containing Swinv2Layer) to the fused kernel at
    inference, in place (see the module docstring); returns the model. A model patched before is re-patched.

    Args:
        model: the transformers model.
        cuda_graphs: replay each Swinv2Encoder's forward from CUDA graphs when it runs fused on CUDA and only the
            last hidden state is asked for (no output_attentions / output_hidden_states).
        backend: as in :func:`patch_timm`.

    ``output_attentions=True``, gradients, training mode and exporting run the library's own forward. Each
    attention module gets ``fused_attn = True``; set it to False to run that layer's own math.
    """
    from transformers.models.swinv2 import modeling_swinv2 as hf
    _check_backend(backend)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, hf.Swinv2Layer)]
    if not layers:
        raise TypeError(f"FlashBias: patch_transformers found no transformers Swinv2Layer in "
                        f"{type(model).__name__}; for timm's SwinV2 use patch_timm")
    for name, layer in layers:
        _check_transformers_layer(layer, name or type(model).__name__)
    unpatch(model)
    for _, layer in layers:
        layer.forward = _TransformersLayerForward(layer, backend, True)
    if cuda_graphs:
        for module in model.modules():
            if isinstance(module, hf.Swinv2Encoder):
                module.forward = _TransformersGraphedForward(module, hf.Swinv2EncoderOutput)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_timm` / :func:`patch_transformers` in place: every patched forward is deleted (the
    class's own is the forward again) and each attention's ``fused_attn`` is what it was before the patch.
    Returns the model; a model that was never patched is returned unchanged."""
    for module in model.modules():
        patched = module.__dict__.get("forward")
        if isinstance(patched, _PatchedForward):
            patched.restore()
            del module.forward
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether any module of ``model`` runs a forward installed by patch_timm / patch_transformers."""
    return any(isinstance(m.__dict__.get("forward"), _PatchedForward) for m in model.modules())
