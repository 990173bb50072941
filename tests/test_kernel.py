"""The FlashBias kernel against a float64 reference.

On a CUDA machine the compiled kernel runs; on a CPU-only machine the same kernel runs through
Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), on smaller shapes. Every check
draws fresh random inputs and poisons the output with NaN first, so an unwritten element fails.
"""
import math

import pytest
import torch

import flash_bias_triton as fb

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2, torch.float32: 2e-3 if CUDA else 1e-5}
SEED = [0]


@pytest.fixture(autouse=True)
def poison_output(monkeypatch):
    monkeypatch.setattr(fb, "POISON_OUTPUT", True)


def fresh_generator():
    SEED[0] += 1
    return torch.Generator().manual_seed(1000 + SEED[0])


def trained_like_bias(H, N, g):
    """16*sigmoid(.) of a smooth random field plus a sharp diagonal peak: values in (0, 16) shaped like
    a trained SwinV2 relative-position bias (its diagonal peak is what low-rank factors miss)."""
    side = int(math.isqrt(N))
    if side * side == N:
        pos = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).view(N, 2)
        dist = (pos[:, None, :] - pos[None, :, :]).float().norm(dim=-1)
    else:
        idx = torch.arange(N)
        dist = (idx[:, None] - idx[None, :]).abs().float()
    amp = torch.randn(H, 1, 1, generator=g)
    logits = amp * torch.exp(-dist / 2) + 0.3 * torch.randn(H, N, N, generator=g) - 1.0
    return 16 * torch.sigmoid(logits)


def make_case(B, N, H, d, dtype, bias_mode, mask, rank=8, image=None, window=None, shift=0, nW=4):
    """Random inputs for one call; returns (args dict for flash_bias_attention)."""
    g = fresh_generator()
    C = H * d
    L = N if image is None else image[0] * image[1]
    qkv = torch.randn(B, L, 3 * C, generator=g)
    # a non-unit row stride, as when qkv is a view of a wider projection output
    wide = torch.randn(B, L, 3 * C + 8, generator=g)
    wide[..., :3 * C] = qkv
    qkv = wide[..., :3 * C].to(DEVICE, dtype)
    logit_scale = torch.empty(H, 1, 1).uniform_(math.log(5), math.log(120), generator=g).to(DEVICE)
    args = dict(qkv=qkv, num_heads=H, logit_scale=logit_scale)
    if bias_mode == "dense":
        args["bias"] = trained_like_bias(H, N, g).to(DEVICE)
    elif bias_mode == "lowrank":
        args["bias_factors"] = tuple(torch.randn(H, N, rank, generator=g).to(DEVICE) / math.sqrt(rank)
                                     for _ in range(2))
    if mask:
        if image is not None:
            nW = (image[0] // window[0]) * (image[1] // window[1])
        args["region_ids"] = torch.randint(0, 4, (nW, N), generator=g, dtype=torch.int32).to(DEVICE)
    if image is not None:
        args.update(image_size=image, window_size=window, shift_size=shift)
    return args


def reference64(args):
    a = dict(args)
    a["qkv"] = args["qkv"].double()
    a["logit_scale"] = args["logit_scale"].double()
    if "bias" in a:
        a["bias"] = a["bias"].double()
    if "bias_factors" in a:
        a["bias_factors"] = tuple(f.double() for f in a["bias_factors"])
    return fb.attention_reference(**a)


def rel_err(out, ref):
    assert not torch.isnan(out).any(), "NaN in the output: an element was not written"
    return ((out.double() - ref).norm() / ref.norm()).item()


def check(args, tol=None):
    out = fb.flash_bias_attention(**args, backend="triton")
    assert out.dtype == args["qkv"].dtype and out.device == args["qkv"].device
    err = rel_err(out, reference64(args))
    assert err < (tol or TOL[args["qkv"].dtype]), err
    return err


SIZES = [49, 64, 144, 256, 576] if CUDA else [49, 64, 144]


@pytest.mark.parametrize("N", SIZES)
@pytest.mark.parametrize("bias_mode", ["dense", "lowrank", "none"])
@pytest.mark.parametrize("mask", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_window_layout(N, bias_mode, mask, dtype):
    B = 8 if CUDA else 4
    check(make_case(B, N, 2, 32, dtype, bias_mode, mask))


@pytest.mark.parametrize("head_dim", [16, 24, 64, 128])
def test_head_dims(head_dim):
    check(make_case(4, 49, 2, head_dim, torch.float16, "dense", True))


@pytest.mark.parametrize("rank", [1, 5, 16, 17, 64, 128])
def test_ranks(rank):
    check(make_case(4, 64, 2, 32, torch.float16, "lowrank", True, rank=rank))


@pytest.mark.parametrize("head_dim,rank", [(16, 20), (16, 51), (24, 40), (64, 100), (128, 33)])
def test_ranks_wider_than_the_head(head_dim, rank):
    """Factor columns beyond the head dim go in chunks (a wider chained dot miscompiled on an H100)."""
    check(make_case(2, 64, 2, head_dim, torch.float16, "lowrank", True, rank=rank, image=(16, 16),
                    window=(8, 8), shift=4))


def test_float32_input_returns_float32():
    check(make_case(4, 49, 2, 32, torch.float32, "dense", True))


@pytest.mark.parametrize("bias_dtype", [torch.float16, torch.bfloat16])
def test_bias_in_16_bits(bias_dtype):
    args = make_case(4, 49, 2, 32, torch.float16, "dense", True)
    args["bias"] = args["bias"].to(bias_dtype)
    check(args)


@pytest.mark.parametrize("image,window,shift,dtype,bias_mode", [
    ((8, 8), (4, 4), 2, torch.float16, "dense"),
    ((8, 8), (4, 4), 0, torch.bfloat16, "lowrank"),
    ((12, 8), (6, 4), 2, torch.float16, "lowrank"),
    ((7, 7), (7, 7), 0, torch.float16, "dense"),
    ((16, 16), (8, 8), 4, torch.bfloat16, "dense"),
])
def test_image_layout(image, window, shift, dtype, bias_mode):
    """Cyclic shift, window partition and reverse done by index arithmetic inside the kernel."""
    check(make_case(2, window[0] * window[1], 2, 32, dtype, bias_mode, shift > 0 or bias_mode == "lowrank",
                    image=image, window=window, shift=shift))


def test_swin_shifted_mask_matches_official_mask():
    """Region ids built like SwinV2's img_mask give the official -100 attn_mask's result."""
    H_img, ws, shift, heads = 8, 4, 2, 2
    img_mask = torch.zeros(H_img, H_img)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img_mask[hs, wsl] = cnt
            cnt += 1
    region_ids = img_mask.view(2, ws, 2, ws).permute(0, 2, 1, 3).reshape(4, ws * ws).to(torch.int32)
    official = region_ids.float()[:, None, :] - region_ids.float()[:, :, None]
    official = official.masked_fill(official != 0, -100.0)
    assert torch.equal(fb.region_mask(region_ids), official)
    args = make_case(3, ws * ws, heads, 32, torch.float16, "dense", False, image=(H_img, H_img),
                     window=(ws, ws), shift=shift)
    args["region_ids"] = region_ids.to(DEVICE)
    check(args)


@pytest.mark.skipif(CUDA, reason="the GPU runs the real block sizes; this covers them in the interpreter")
@pytest.mark.parametrize("blocks", [{"BLOCK_M": 64, "BLOCK_N": 64}, {"BLOCK_M": 16, "BLOCK_N": 32}])
def test_interpreter_other_blocks(monkeypatch, blocks):
    monkeypatch.setattr(fb, "INTERPRET_BLOCKS", blocks)
    check(make_case(2, 144, 1, 32, torch.float16, "dense", True, nW=2))
    check(make_case(1, 576, 1, 32, torch.float16, "lowrank", True, rank=16, nW=1))


def test_fully_masked_row_blocks_and_zero_vectors():
    """A zero q or k row (F.normalize gives 0, not NaN) and regions that isolate single tokens."""
    args = make_case(4, 49, 2, 32, torch.float16, "dense", True)
    args["qkv"][:, 3, :] = 0
    args["region_ids"] = torch.arange(49, dtype=torch.int32, device=DEVICE).repeat(4, 1)
    check(args)


def test_gradients_take_the_pytorch_path():
    args = make_case(2, 49, 2, 32, torch.float32, "dense", True, nW=2)
    qkv = args.pop("qkv").clone().requires_grad_(True)
    out = fb.flash_bias_attention(qkv, **args)          # "auto": differentiable PyTorch path
    out.sum().backward()
    assert qkv.grad is not None and torch.isfinite(qkv.grad).all()
    with pytest.raises(RuntimeError, match="no backward"):
        fb.flash_bias_attention(qkv, **args, backend="triton")
    with torch.no_grad():
        check(dict(args, qkv=qkv.detach()))


def test_custom_op_traces_in_torch_compile():
    args = make_case(2, 49, 2, 32, torch.float16, "dense", True, nW=2)

    def f(qkv, bias, region_ids):
        return fb.flash_bias_attention(qkv, 2, args["logit_scale"], bias=bias, region_ids=region_ids,
                                       backend="triton") * 2
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(args["qkv"], args["bias"], args["region_ids"])
    ref = reference64(args) * 2
    assert rel_err(out, ref) < TOL[torch.float16]


@pytest.mark.parametrize("change,match", [
    (dict(bias=torch.zeros(2, 49, 48)), "bias must be"),
    (dict(window_size=(7, 6)), "has 42 tokens"),
    (dict(bias_factors=(torch.zeros(2, 49, 4), torch.zeros(2, 49, 5))), "differ"),
    (dict(bias_factors=(torch.zeros(2, 49, 200), torch.zeros(2, 49, 200))), "rank"),
    (dict(bias_factors=(torch.zeros(3, 49, 4), torch.zeros(3, 49, 4))), "q_bias must be"),
    (dict(region_ids=torch.zeros(4, 48, dtype=torch.int32)), "region_ids must be"),
    (dict(region_ids=torch.zeros(3, 49, dtype=torch.int32)), "does not divide"),
    (dict(region_ids=torch.zeros(4, 49)), "integer"),
    (dict(logit_scale=torch.zeros(3)), "logit_scale"),
    (dict(num_heads=5), "3 \\* num_heads"),
    (dict(image_size=(7, 8), window_size=(7, 7)), "tokens"),
    (dict(shift_size=2), "image layout"),
])
def test_bad_inputs_name_the_problem(change, match):
    args = make_case(4, 49, 2, 32, torch.float16, "dense", False)
    args.update({k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else
                     tuple(t.to(DEVICE) for t in v) if isinstance(v, tuple) and isinstance(v[0], torch.Tensor)
                     else v) for k, v in change.items()})
    if "bias_factors" in change:
        args.pop("bias")
    with pytest.raises((ValueError, TypeError), match=match):
        fb.flash_bias_attention(**args, backend="triton")


def test_bad_dtypes():
    args = make_case(4, 49, 2, 32, torch.float16, "dense", False)
    with pytest.raises(TypeError, match="qkv must be"):
        fb.flash_bias_attention(**dict(args, qkv=args["qkv"].to(torch.int32)))
    with pytest.raises(TypeError, match="float64"):
        fb.flash_bias_attention(**dict(args, qkv=args["qkv"].double()), backend="triton")
    with pytest.raises(ValueError, match="not both"):
        fb.flash_bias_attention(**args, bias_factors=(args["bias"][..., :4], args["bias"][..., :4]))


def test_low_rank_rules():
    g = fresh_generator()
    bias = trained_like_bias(3, 64, g).double()
    q, k, info = fb.low_rank_bias_factors(bias, rank=8)
    assert q.shape == (3, 64, 8) and info["rank"] == 8
    assert abs(fb.logit_error(bias, q.double() @ k.double().transpose(1, 2))[0] - info["max_logit_error"]) < 1e-4
    q, k, info = fb.low_rank_bias_factors(bias, max_logit_error=0.05)
    assert info["max_logit_error"] <= 0.05
    if info["rank"] > 1:
        _, _, below = fb.low_rank_bias_factors(bias, rank=info["rank"] - 1)
        assert below["max_logit_error"] > 0.05
    _, _, seed_rule = fb.low_rank_bias_factors(bias, energy=0.995)
    assert seed_rule["energy"] >= 0.995
    q, k, info = fb.low_rank_bias_factors(bias, max_logit_error=1e-9, max_rank=4)
    assert q is None and info["rank"] is None
    # centring rows never hurts: softmax ignores the row mean the uncentred SVD spends rank on
    _, _, raw = fb.low_rank_bias_factors(bias, rank=4, center_rows=False)
    _, _, centred = fb.low_rank_bias_factors(bias, rank=4)
    assert centred["max_logit_error"] <= raw["max_logit_error"] + 1e-9


@pytest.mark.skipif(not CUDA, reason="the interpreter covers block shapes in test_interpreter_other_blocks")
@pytest.mark.parametrize("cfg_index", range(8))
def test_every_autotune_config_on_gpu(monkeypatch, cfg_index):
    cfg = fb._AUTOTUNE_CONFIGS[cfg_index]
    monkeypatch.setattr(fb, "_default_config", lambda N, head_dim: cfg)
    check(make_case(4, 144, 2, 32, torch.float16, "dense", True))
    check(make_case(4, 49, 2, 32, torch.bfloat16, "lowrank", True, rank=17))


@pytest.mark.parametrize("C", [96, 128, 200])
@pytest.mark.parametrize("dtype,autocast", [(torch.float16, True), (torch.bfloat16, True), (torch.float32, False),
                                            (torch.float16, False)])
def test_residual_layer_norm(C, dtype, autocast):
    """shortcut + LayerNorm(x) in one pass, against PyTorch's own expression in float64."""
    g = fresh_generator()
    rows = 37
    residual_dtype = torch.float32 if autocast else dtype
    residual = (3 * torch.randn(2, rows, C, generator=g)).to(DEVICE, residual_dtype)
    x = (2 * torch.randn(2, rows, C, generator=g) + 0.5).to(DEVICE, dtype)
    norm = torch.nn.LayerNorm(C).to(DEVICE, residual_dtype)
    with torch.no_grad():
        norm.weight.copy_(0.5 + 0.1 * torch.randn(C, generator=g))
        norm.bias.copy_(0.02 * torch.randn(C, generator=g))
    device_type = "cuda" if CUDA else "cpu"
    with torch.no_grad(), torch.autocast(device_type, dtype=dtype, enabled=autocast):
        out, low = fb.residual_layer_norm(residual, x, norm, backend="triton")
        ref, ref_low = fb.residual_layer_norm(residual, x, norm, backend="torch")
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert (low is None) == (ref_low is None) and (low is None or low.dtype == ref_low.dtype == dtype)
    exact = residual.double() + torch.nn.functional.layer_norm(x.double(), (C,), norm.weight.double(),
                                                                norm.bias.double(), norm.eps)
    assert rel_err(out, exact) < (1e-6 if out.dtype == torch.float32 else 2e-3)
    if low is not None:
        assert rel_err(low, exact) < 1e-2
    with pytest.raises(ValueError, match="do not fit"):
        fb.residual_layer_norm(residual[:, :5], x, norm)
