"""The FlashBias kernel against a float64 reference.

On a CUDA machine the compiled kernel runs; on a CPU-only machine the same kernel runs through
Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), on smaller shapes. Every check
draws fresh random inputs and poisons the output with NaN first, so an unwritten element fails.
"""
import copy
import math

import pytest
import torch

import flash_bias_factors as fbf
import flash_bias_triton as fb
import model_utils  # noqa: F401  (puts scripts/ on sys.path)
import swin_config

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


def trained_like_bias(H, N, window=None):
    """A trained-like SwinV2 bias (H, N, N) from the one definition (scripts/swin_config.trained_like_bias), for a
    window of N tokens: ``window`` (wh, ww), else a square one."""
    side = math.isqrt(N)
    assert window is not None or side * side == N, f"give the window of {N} tokens"
    SEED[0] += 1
    return swin_config.trained_like_bias(H, window or side, seed=1000 + SEED[0])


def make_case(B, N, H, d, dtype, bias_mode, mask, rank=8, image=None, window=None, shift=0, nW=4, cosine=True):
    """Random inputs for one call; returns (args dict for flash_bias_attention). cosine=False: Swin V1's
    scaled dot product (no logit_scale; the bias a V1 table's N(0, 2) entries, not 16 * sigmoid)."""
    g = fresh_generator()
    C = H * d
    L = N if image is None else image[0] * image[1]
    qkv = torch.randn(B, L, 3 * C, generator=g)
    # a non-unit row stride, as when qkv is a view of a wider projection output
    wide = torch.randn(B, L, 3 * C + 8, generator=g)
    wide[..., :3 * C] = qkv
    qkv = wide[..., :3 * C].to(DEVICE, dtype)
    logit_scale = torch.empty(H, 1, 1).uniform_(math.log(5), math.log(120), generator=g).to(DEVICE)
    args = dict(qkv=qkv, num_heads=H, logit_scale=logit_scale) if cosine else dict(qkv=qkv, num_heads=H)
    if bias_mode == "dense":
        bias = trained_like_bias(H, N, window) if cosine else 2 * torch.randn(H, N, N, generator=g)
        args["bias"] = bias.to(DEVICE)
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


def with_qv_bias(args):
    """args with SwinV2's q and v biases (C,), of the size a trained qkv bias has against its q and v (~0.5)."""
    g = fresh_generator()
    C = args["qkv"].shape[-1] // 3
    return dict(args, qv_bias=tuple((0.5 * torch.randn(C, generator=g)).to(DEVICE) for _ in range(2)))


def reference64(args):
    a = dict(args)
    a["qkv"] = args["qkv"].double()
    if "qv_bias" in a:   # the official math: the qkv matmul's bias, k's part zero
        q_bias, v_bias = (t.double() for t in a.pop("qv_bias"))
        a["qkv"] = a["qkv"] + torch.cat((q_bias, torch.zeros_like(q_bias), v_bias))
    if "logit_scale" in a:
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


@pytest.mark.parametrize("B,image,bias_mode,dtype", [
    (3, (16, 16), "dense", torch.float16),      # 12 windows, one of each four of a single region
    (1, (24, 24), "lowrank", torch.bfloat16),   # 9 windows, one of a single region
    (1, (24, 24), "none", torch.float16),
])
def test_single_region_windows_skip_the_mask(B, image, bias_mode, dtype):
    """A window of one region skips the mask (which adds 0 there), the others take it: Swin's own shifted regions,
    the output stats for the backward too."""
    args = make_case(B, 64, 2, 32, dtype, bias_mode, True, image=image, window=(8, 8), shift=4)
    args["region_ids"] = fb.shifted_window_region_ids(image, 8, 4).to(DEVICE)
    single = args["region_ids"].amin(1) == args["region_ids"].amax(1)
    assert single.any() and not single.all()
    check(args)
    if bias_mode != "lowrank":
        qkv = args.pop("qkv").float().requires_grad_(True)
        fb.flash_bias_attention(qkv, **args, backend="triton").square().sum().backward()
        expected = torch.autograd.grad(fb.attention_reference(qkv.double(), **{
            k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in args.items()}).square()
            .sum(), qkv)[0]
        assert rel_err(qkv.grad, expected) < TOL[torch.float32] * 5


@pytest.mark.skipif(CUDA, reason="the GPU runs the real block sizes; this covers them in the interpreter")
@pytest.mark.parametrize("blocks", [{"BLOCK_M": 64, "BLOCK_N": 64}, {"BLOCK_M": 16, "BLOCK_N": 32}])
def test_interpreter_other_blocks(monkeypatch, blocks):
    monkeypatch.setattr(fb, "INTERPRET_BLOCKS", blocks)
    check(make_case(2, 144, 1, 32, torch.float16, "dense", True, nW=2))
    check(make_case(1, 576, 1, 32, torch.float16, "lowrank", True, rank=16, nW=1))


@pytest.mark.parametrize("N", SIZES)
@pytest.mark.parametrize("bias_mode", ["dense", "none"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_qv_bias_added_in_the_kernel(monkeypatch, N, bias_mode, dtype):
    """SwinV2's q and v biases, left out of the qkv matmul, added by the inference kernel (not by PyTorch first)."""
    given = []
    launch = fb._launch
    monkeypatch.setattr(fb, "_launch", lambda *a, **k: given.append(k.get("query_bias") is not None) or launch(*a, **k))
    check(with_qv_bias(make_case(4, N, 2, 32, dtype, bias_mode, True)))
    assert given == [True]


@pytest.mark.parametrize("image,window,shift,dtype,bias_mode", [
    ((16, 16), (8, 8), 4, torch.float16, "dense"),
    ((12, 8), (6, 4), 2, torch.bfloat16, "lowrank"),
])
def test_qv_bias_in_the_image_layout(image, window, shift, dtype, bias_mode):
    check(with_qv_bias(make_case(2, window[0] * window[1], 2, 32, dtype, bias_mode, True, image=image,
                                 window=window, shift=shift)))


def test_qv_bias_gradients_and_checks():
    """With a gradient the biases are added to qkv first (the kernel's backward then sees the official qkv), and
    their gradients are the official math's; a bias of the wrong size is named."""
    args = with_qv_bias(make_case(2, 49, 2, 32, torch.float32, "dense", True, nW=2))
    leaves = [args.pop("qkv").clone().requires_grad_(True)] + [t.clone().requires_grad_(True) for t in args["qv_bias"]]
    fb.flash_bias_attention(leaves[0], **dict(args, qv_bias=tuple(leaves[1:]))).square().sum().backward()
    doubles = [t.detach().double().requires_grad_(True) for t in leaves]
    reference64(dict(args, qkv=doubles[0], qv_bias=tuple(doubles[1:]))).square().sum().backward()
    for got, expected in zip(leaves, doubles):
        assert rel_err(got.grad, expected.grad) < TOL[torch.float32] * 5
    with pytest.raises(ValueError, match=r"qv_bias: v_bias must be a floating \(64,\) tensor"):
        fb.flash_bias_attention(leaves[0].detach(), **dict(args, qv_bias=(leaves[1], leaves[2][:10])))


def test_fully_masked_row_blocks_and_zero_vectors():
    """A zero q or k row (F.normalize gives 0, not NaN) and regions that isolate single tokens."""
    args = make_case(4, 49, 2, 32, torch.float16, "dense", True)
    args["qkv"][:, 3, :] = 0
    args["region_ids"] = torch.arange(49, dtype=torch.int32, device=DEVICE).repeat(4, 1)
    check(args)


def test_gradients_of_low_rank_factors_take_the_pytorch_path():
    """The kernel's backward takes the exact bias or none (tests/test_kernel_backward.py); with low-rank
    factors a gradient needs the PyTorch path."""
    args = make_case(2, 49, 2, 32, torch.float32, "dense", True, nW=2)
    args["bias_factors"] = fbf.low_rank_bias_factors(args.pop("bias"), rank=8)[:2]
    qkv = args.pop("qkv").clone().requires_grad_(True)
    out = fb.flash_bias_attention(qkv, **args)          # "auto": differentiable PyTorch path
    out.sum().backward()
    assert qkv.grad is not None and torch.isfinite(qkv.grad).all()
    with pytest.raises(RuntimeError, match="has no backward pass for low-rank bias_factors"):
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
    bias = trained_like_bias(3, 64).double()
    q, k, info = fbf.low_rank_bias_factors(bias, rank=8)
    assert q.shape == (3, 64, 8) and info["rank"] == 8
    assert abs(fbf.logit_error(bias, q.double() @ k.double().transpose(1, 2))[0] - info["max_logit_error"]) < 1e-4
    q, k, info = fbf.low_rank_bias_factors(bias, max_logit_error=0.05)
    assert info["max_logit_error"] <= 0.05
    if info["rank"] > 1:
        _, _, below = fbf.low_rank_bias_factors(bias, rank=info["rank"] - 1)
        assert below["max_logit_error"] > 0.05
    _, _, seed_rule = fbf.low_rank_bias_factors(bias, energy=0.995)
    assert seed_rule["energy"] >= 0.995
    q, k, info = fbf.low_rank_bias_factors(bias, max_logit_error=1e-9, max_rank=4)
    assert q is None and info["rank"] is None
    # centring rows is a heuristic (softmax ignores the row constant an uncentred SVD spends rank on), not a
    # guarantee: at a fixed rank it can lose a little (measured 1.52 against 1.48 logits on this bias at rank 4)
    _, _, raw = fbf.low_rank_bias_factors(bias, rank=4, center_rows=False)
    _, _, centred = fbf.low_rank_bias_factors(bias, rank=4)
    assert centred["max_logit_error"] <= 1.1 * raw["max_logit_error"]


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


@pytest.mark.parametrize("C", [96, 200])
@pytest.mark.parametrize("dtype,autocast", [(torch.float16, True), (torch.bfloat16, True), (torch.float32, False)])
def test_residual_steps(C, dtype, autocast):
    """A block's two res-post-norm steps: where the kernel recomputes the first sum (autocast) it gives the bits of
    two separate passes, the MLP reads the same half copy, and both agree with float64."""
    g = fresh_generator()
    residual = (3 * torch.randn(2, 37, C, generator=g)).to(DEVICE, torch.float32 if autocast else dtype)
    attn_out = (2 * torch.randn(2, 37, C, generator=g) + 0.5).to(DEVICE, dtype)
    shift = torch.randn(2, 37, C, generator=g).to(DEVICE)
    norms = [torch.nn.LayerNorm(C).to(DEVICE, residual.dtype) for _ in range(2)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(0.5 + 0.1 * torch.randn(C, generator=g))
            norm.bias.copy_(0.1 * torch.randn(C, generator=g))
    seen = []

    def mlp(x1):   # depends on its input, so a wrong first sum shows in the second step
        seen.append(x1)
        return (torch.tanh(x1.float()) + shift).to(x1.dtype)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=dtype, enabled=autocast):
        out, low = fb.residual_steps(residual, attn_out, norms[0], mlp, norms[1], backend="triton")
        x1, x1_low = fb.residual_layer_norm(residual, attn_out, norms[0], backend="triton")
        two, two_low = fb.residual_layer_norm(x1, mlp(x1 if x1_low is None else x1_low), norms[1], backend="triton")
        ref, _ = fb.residual_steps(residual, attn_out, norms[0], mlp, norms[1], backend="torch")
    assert torch.equal(seen[0], seen[1]) and torch.equal(out, two)
    assert (low is None) == (two_low is None) == (not autocast) and (low is None or torch.equal(low, two_low))

    def post_norm(r, x, norm):
        return r + torch.nn.functional.layer_norm(x.double(), (C,), norm.weight.double(), norm.bias.double(), norm.eps)
    with torch.no_grad():
        exact = post_norm(post_norm(residual.double(), attn_out, norms[0]), mlp(seen[0]), norms[1])
    tol = 2e-3 if autocast else 1e-6    # PyTorch's own path rounds the norms to the autocast dtype on the CPU
    assert rel_err(out, exact) < (1e-6 if out.dtype == torch.float32 else 2e-3) and rel_err(ref, exact) < tol
    mismatch = r"residual \(2, 37, %d\), x \(2, 5, %d\) and the norm" % (C, C)
    with torch.no_grad(), pytest.raises(ValueError, match=mismatch):
        fb.residual_steps(residual, attn_out[:, :5], norms[0], mlp, norms[1], backend="triton")
    with torch.no_grad(), pytest.raises(ValueError, match=r"residual \(2, 37, %d\), x \(2, 37, 3\) and the norm" % C):
        fb.residual_steps(residual, attn_out, norms[0], lambda x1: x1[..., :3], norms[1], backend="triton")


@pytest.mark.parametrize("C", [96, 200])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_residual_steps_add_the_projection_bias(C, dtype):
    """attn_bias, the output projection's bias left out of its matmul: both passes add it to attn_out before norm1
    (the second recomputes the first sum with it), as residual_layer_norm's branch_bias does, against float64."""
    g = fresh_generator()
    residual = (3 * torch.randn(2, 37, C, generator=g)).to(DEVICE)
    attn_out = (2 * torch.randn(2, 37, C, generator=g)).to(DEVICE, dtype)
    attn_bias = torch.randn(C, generator=g).to(DEVICE, dtype)
    norms = [torch.nn.LayerNorm(C).to(DEVICE) for _ in range(2)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(0.5 + 0.1 * torch.randn(C, generator=g))
            norm.bias.copy_(0.1 * torch.randn(C, generator=g))

    def mlp(x1):
        return torch.tanh(x1.float()).to(x1.dtype)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=dtype):
        out, _ = fb.residual_steps(residual, attn_out, norms[0], mlp, norms[1], backend="triton", attn_bias=attn_bias)
        x1, x1_low = fb.residual_layer_norm(residual, attn_out, norms[0], backend="triton", branch_bias=attn_bias)
        two, _ = fb.residual_layer_norm(x1, mlp(x1_low), norms[1], backend="triton")
        ref, _ = fb.residual_steps(residual, attn_out, norms[0], mlp, norms[1], backend="torch", attn_bias=attn_bias)

    def post_norm(r, x, norm):
        return r + torch.nn.functional.layer_norm(x.double(), (C,), norm.weight.double(), norm.bias.double(), norm.eps)
    with torch.no_grad():
        x1_exact = post_norm(residual.double(), attn_out.double() + attn_bias.double(), norms[0])
        exact = post_norm(x1_exact, mlp(x1_low), norms[1])
    assert torch.equal(out, two)
    assert rel_err(x1, x1_exact) < 1e-6 and rel_err(out, exact) < 1e-6 and rel_err(ref, exact) < 2e-3


@pytest.mark.parametrize("C", [96, 200])
@pytest.mark.parametrize("dtype,norm_dtype,autocast", [
    (torch.float32, torch.float32, None), (torch.float16, torch.float16, None), (torch.bfloat16, torch.bfloat16, None),
    (torch.float16, torch.float32, None),                   # half-precision x, float32 weights: PyTorch keeps x's dtype
    (torch.float16, torch.float32, torch.float16), (torch.bfloat16, torch.float32, torch.bfloat16),
    (torch.float32, torch.float32, torch.float16)])
def test_layer_norm_without_residual(C, dtype, norm_dtype, autocast):
    """residual None: LayerNorm(x) alone (the patch merging's norm) in one pass, against float64, in the dtype
    PyTorch's own F.layer_norm gives under the same autocast."""
    g = fresh_generator()
    x = (2 * torch.randn(2, 37, C, generator=g) + 0.5).to(DEVICE, dtype)
    norm = torch.nn.LayerNorm(C).to(DEVICE, norm_dtype)
    with torch.no_grad():
        norm.weight.copy_(0.5 + 0.1 * torch.randn(C, generator=g))
        norm.bias.copy_(0.1 * torch.randn(C, generator=g))
    with torch.no_grad(), torch.autocast(DEVICE, dtype=autocast or torch.float16, enabled=autocast is not None):
        out, low = fb.residual_layer_norm(None, x, norm, backend="triton")
        try:
            ref, ref_low = fb.residual_layer_norm(None, x, norm, backend="torch")
        except RuntimeError:   # CUDA's LayerNorm refuses half-precision x with float32 weights; the kernel gives x's
            assert DEVICE == "cuda" and dtype != norm_dtype and autocast is None   # dtype, as PyTorch's CPU one
            ref, ref_low = out, low
    assert out.dtype == ref.dtype and out.shape == x.shape
    assert out.dtype == (torch.float32 if autocast is not None and DEVICE == "cuda" else dtype)
    assert (low is None) == (ref_low is None) == (autocast is None)
    exact = torch.nn.functional.layer_norm(x.double(), (C,), norm.weight.double(), norm.bias.double(), norm.eps)
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
    assert rel_err(out, exact) < tol[out.dtype]
    if low is not None:
        assert low.dtype == ref_low.dtype == autocast and rel_err(low, exact) < tol[autocast]
    with pytest.raises(ValueError, match=r"residual_layer_norm: residual None, x \(2, 37, 95\) and the norm's shape "
                                         rf"\({C},\) do not fit"):
        fb.residual_layer_norm(None, x[..., :95], norm)


def test_layer_norm_without_residual_traces_in_torch_compile():
    _, x, norm = layer_norm_case(C=200)
    norm.requires_grad_(False)
    norm.bias.copy_(0.1 * torch.randn(200, generator=fresh_generator()))   # a zero bias would hide a dropped one
    compiled = torch.compile(lambda a: fb.residual_layer_norm(None, a, norm, backend="triton"), backend="aot_eager",
                             fullgraph=True)
    out, low = compiled(x)
    exact = torch.nn.functional.layer_norm(x.double(), (200,), norm.weight.double(), norm.bias.double(), norm.eps)
    assert low is None and rel_err(out, exact) < 1e-6


# ----------------------------------------------------------------------------------------------
# One backend decision for every entry point
# ----------------------------------------------------------------------------------------------
def layer_norm_case(C=96):
    g = fresh_generator()
    residual = torch.randn(2, 7, C, generator=g).to(DEVICE)
    x = torch.randn(2, 7, C, generator=g).to(DEVICE)
    return residual, x, torch.nn.LayerNorm(C).to(DEVICE)


def table_case(T=169, H=3, N=49):
    g = fresh_generator()
    return (2 * torch.randn(T, H, generator=g)).to(DEVICE), torch.randint(0, T, (N, N), generator=g).to(DEVICE)


def call_each_entry_point(backend):
    """Call flash_bias_attention, residual_layer_norm and bias_from_table with this backend."""
    args = make_case(2, 49, 2, 32, torch.float32, "dense", True, nW=2)
    yield lambda: fb.flash_bias_attention(**args, backend=backend)
    residual, x, norm = layer_norm_case()
    yield lambda: fb.residual_layer_norm(residual, x, norm, backend=backend)
    table, index = table_case()
    yield lambda: fb.bias_from_table(table, index, backend=backend)


def test_misspelt_backend_raises_in_every_entry_point(monkeypatch):
    for call in call_each_entry_point("trition"):
        with pytest.raises(ValueError, match="backend must be one of 'auto', 'triton', 'torch'; got 'trition'"):
            call()
    monkeypatch.setenv("FLASHBIAS_BACKEND", "Torch")
    for call in call_each_entry_point(None):
        with pytest.raises(ValueError, match="FLASHBIAS_BACKEND must be one of .*; got 'Torch'"):
            call()
    monkeypatch.setenv("FLASHBIAS_BACKEND", "triton")   # a valid environment value is obeyed
    with torch.no_grad():
        check(make_case(2, 49, 2, 32, torch.float16, "dense", True, nW=2))


def test_triton_backend_refuses_inputs_that_need_grad():
    residual, x, norm = layer_norm_case()
    with pytest.raises(RuntimeError, match="residual_layer_norm: the Triton kernel has no backward pass"):
        fb.residual_layer_norm(residual, x, norm, backend="triton")   # norm.weight requires grad
    table, index = table_case()
    with pytest.raises(RuntimeError, match="bias_from_table: the Triton kernel has no backward pass with center_rows"):
        fb.bias_from_table(table.requires_grad_(True), index, center_rows=True, backend="triton")
    affine_free = torch.nn.LayerNorm(96, elementwise_affine=False).to(DEVICE)
    with pytest.raises(ValueError, match="needs an affine LayerNorm"):
        fb.residual_layer_norm(residual, x, affine_free, backend="triton")
    fb.residual_layer_norm(residual, x, affine_free)                 # "auto" falls back to PyTorch


def test_auto_backend_decision():
    """What "auto" picks on CUDA (checked without one: the decision only reads the device type)."""
    cuda = torch.device("cuda")
    plain, trained = torch.zeros(3), torch.zeros(3, requires_grad=True)
    assert fb._pick_backend("auto", cuda, (plain, None)) == "triton"
    assert fb._pick_backend("auto", torch.device("cpu"), (plain,)) == "torch"
    assert fb._pick_backend("auto", cuda, (plain, trained)) == "torch"
    with torch.no_grad():
        assert fb._pick_backend("auto", cuda, (plain, trained)) == "triton"
    assert fb._pick_backend("auto", cuda, (plain,), unsupported=TypeError("float64")) == "torch"
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(plain, torch.ones(3))
        assert fb._pick_backend("auto", cuda, (dual,)) == "torch"
        assert fb._pick_backend("auto", cuda, (plain,)) == "triton"
    with pytest.raises(TypeError, match="float64"):
        fb._pick_backend("triton", torch.device(DEVICE), (plain,), unsupported=TypeError("float64"))


# ----------------------------------------------------------------------------------------------
# Forward-mode AD: the PyTorch path carries tangents, the kernel says it cannot
# ----------------------------------------------------------------------------------------------
def test_forward_ad_auto_gives_the_tangent():
    import torch.autograd.forward_ad as fwAD
    args = make_case(2, 49, 2, 32, torch.float64, "dense", True, nW=2)
    qkv, bias = args.pop("qkv"), args.pop("bias")
    g = fresh_generator()
    qkv_dot = torch.randn(qkv.shape, generator=g, dtype=torch.float64).to(DEVICE)
    bias_dot = torch.randn(bias.shape, generator=g, dtype=torch.float64).to(DEVICE)
    with fwAD.dual_level():
        out = fb.flash_bias_attention(fwAD.make_dual(qkv, qkv_dot), bias=fwAD.make_dual(bias.double(), bias_dot),
                                      **args)
        tangent = fwAD.unpack_dual(out).tangent
    assert tangent is not None

    def reference(q, b):
        return fb.attention_reference(q, bias=b, **args)
    _, jvp = torch.func.jvp(reference, (qkv, bias.double()), (qkv_dot, bias_dot))
    assert rel_err(tangent, jvp) < 1e-12
    eps = 1e-6
    finite_difference = (reference(qkv + eps * qkv_dot, bias + eps * bias_dot)
                         - reference(qkv - eps * qkv_dot, bias - eps * bias_dot)) / (2 * eps)
    assert rel_err(tangent, finite_difference) < 1e-6


def test_forward_ad_triton_raises():
    import torch.autograd.forward_ad as fwAD
    args = make_case(2, 49, 2, 32, torch.float16, "dense", True, nW=2)
    qkv = args.pop("qkv")
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="flash_bias_attention: .*no forward-mode AD"):
        fb.flash_bias_attention(fwAD.make_dual(qkv, torch.ones_like(qkv)), **args, backend="triton")
    with pytest.raises(RuntimeError, match="no forward-mode AD"):
        torch.func.jvp(lambda q: fb.flash_bias_attention(q, **args, backend="triton"), (qkv,),
                       (torch.ones_like(qkv),))
    table, index = table_case()
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="bias_from_table: .*no forward-mode AD"):
        fb.bias_from_table(fwAD.make_dual(table, torch.ones_like(table)), index, backend="triton")
    with torch.no_grad():   # the same calls without a tangent still run the kernel
        check(dict(args, qkv=qkv))


# ----------------------------------------------------------------------------------------------
# Kernel inputs the kernel used to read differently from the reference
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["(H,1,1) of stride 2", "(H,) of stride 2"])
def test_non_contiguous_logit_scale(layout):
    args = make_case(2, 49, 4, 32, torch.float16, "dense", True, nW=2)
    g = fresh_generator()
    if layout == "(H,1,1) of stride 2":
        wide = torch.empty(4, 1, 2).uniform_(math.log(5), math.log(120), generator=g)
        args["logit_scale"] = wide.to(DEVICE)[..., :1]
    else:
        args["logit_scale"] = torch.empty(8).uniform_(math.log(5), math.log(120), generator=g).to(DEVICE)[::2]
    assert not args["logit_scale"].is_contiguous()
    check(args)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int16, torch.uint8])
def test_region_ids_of_any_integer_dtype(dtype):
    """Ids are compared as given: 2**32 + r and r are different regions (an int32 cast made them equal)."""
    args = make_case(2, 49, 2, 32, torch.float16, "dense", True, nW=2)
    ids = args["region_ids"].long()
    if dtype == torch.int64:
        ids = ids + (2 ** 32) * (torch.arange(49, device=DEVICE) % 2)   # half of each window far away
        assert (ids.to(torch.int32) == args["region_ids"]).all()
    else:
        ids = ids + 200 if dtype == torch.uint8 else ids - 30000
    args["region_ids"] = ids.to(dtype)
    check(args)


@pytest.mark.filterwarnings("ignore:.*(NaN|invalid value).*:RuntimeWarning")   # NaN is the point
def test_nan_logit_scale_gives_nan_like_the_reference():
    args = make_case(2, 49, 2, 32, torch.float32, "dense", True, nW=2)
    args["logit_scale"] = args["logit_scale"].clone()
    args["logit_scale"][0] = float("nan")
    out = fb.flash_bias_attention(**args, backend="triton")
    ref = reference64(args)
    assert torch.isnan(ref[..., :32]).all() and not torch.isnan(ref[..., 32:]).any()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert rel_err(out[..., 32:], ref[..., 32:]) < TOL[torch.float32]


def test_kernel_reads_the_named_constants(monkeypatch):
    """The kernel's mask value, logit-scale cap and normalisation eps are the module's constants."""
    monkeypatch.setattr(fb, "MASK_VALUE", -3.0)
    monkeypatch.setattr(fb, "MAX_LOGIT_SCALE", math.log(10.0))
    monkeypatch.setattr(fb, "NORM_EPS", 0.5)
    args = make_case(2, 49, 2, 32, torch.float32, "dense", True, nW=2)
    qkv = args["qkv"].clone()
    qkv[:, ::3] *= 0.02                     # rows shorter than NORM_EPS: the eps decides their scale
    args["qkv"] = qkv
    check(args)


# ----------------------------------------------------------------------------------------------
# bias_from_table
# ----------------------------------------------------------------------------------------------
def relative_position_index(wh, ww):
    """SwinV2's relative_position_index of a wh x ww window, as the official code builds it."""
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    relative[:, :, 0] += wh - 1
    relative[:, :, 1] += ww - 1
    relative[:, :, 0] *= 2 * ww - 1
    return relative.sum(-1), (2 * wh - 1) * (2 * ww - 1)


def bias_from_table64(table, index, sigmoid_scale, center_rows):
    bias = table.double()[index.long()].permute(2, 0, 1)
    if sigmoid_scale is not None:
        bias = sigmoid_scale * torch.sigmoid(bias)
        return bias - sigmoid_scale / 2 if center_rows else bias   # centred on the sigmoid's midpoint
    if center_rows:
        bias = bias - (bias.max(-1, keepdim=True).values + bias.min(-1, keepdim=True).values) / 2
    return bias


BIAS_TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def shaped_table_case(shape, g, H=3):
    """(table (T, H), index) on DEVICE: SwinV2's index of a window shape, or a random rectangular one."""
    if shape == "rectangular":
        T = 100
        index = torch.randint(0, T, (40, 72), generator=g, dtype=torch.int32)
    else:
        index, T = relative_position_index(*shape)
    # a column slice of a wider tensor: the table's strides are not (H, 1)
    table = (2 * torch.randn(T, H + 2, generator=g))[:, 1:H + 1].to(DEVICE)
    return table, index.to(DEVICE)


@pytest.mark.parametrize("shape", [(7, 7), (8, 8), (12, 12), "rectangular"])
@pytest.mark.parametrize("center_rows", [False, True])
@pytest.mark.parametrize("sigmoid_scale", [16.0, None])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_bias_from_table(shape, center_rows, sigmoid_scale, out_dtype):
    g = fresh_generator()
    H = 3
    table, index = shaped_table_case(shape, g, H)
    ref = bias_from_table64(table, index, sigmoid_scale, center_rows)
    for backend in ("triton", "torch"):
        out = fb.bias_from_table(table, index, sigmoid_scale=sigmoid_scale, center_rows=center_rows,
                                 out_dtype=out_dtype, backend=backend)
        assert out.shape == (H, *index.shape) and out.dtype == out_dtype and out.is_contiguous()
        assert not torch.isnan(out).any(), f"{backend}: NaN in the output: an element was not written"
        err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
        assert err < BIAS_TOL[out_dtype], (backend, err)


def test_bias_from_table_defaults_and_16_bit_table():
    """Default out_dtype is the table's; a float16 table is read as float16 and computed in float32."""
    table, index = table_case()
    table = table.half()
    out = fb.bias_from_table(table, index, backend="triton")
    assert out.dtype == torch.float16
    assert rel_err(out, bias_from_table64(table, index, 16.0, False)) < 1e-3


def test_bias_from_table_gradient_reaches_the_table():
    table, index = table_case()
    table64 = table.double().requires_grad_(True)
    table.requires_grad_(True)
    g = fresh_generator()
    weight = torch.randn(3, 49, 49, generator=g).to(DEVICE)
    (fb.bias_from_table(table, index, center_rows=True) * weight).sum().backward()   # "auto": PyTorch
    (bias_from_table64(table64, index, 16.0, True) * weight.double()).sum().backward()
    assert table.grad is not None and rel_err(table.grad, table64.grad) < 1e-5


@pytest.mark.parametrize("shape", [(7, 7), (12, 12), "rectangular"])
@pytest.mark.parametrize("sigmoid_scale", [16.0, None])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32])
def test_bias_from_table_kernel_backward(shape, sigmoid_scale, out_dtype):
    """The kernel path's backward (training): d table against float64 autograd of the definition."""
    g = fresh_generator()
    H = 3
    table, index = shaped_table_case(shape, g, H)
    table.requires_grad_(True)
    table64 = table.detach().double().requires_grad_(True)
    weight = torch.randn(H, *index.shape, generator=g).to(DEVICE)
    out = fb.bias_from_table(table, index, sigmoid_scale=sigmoid_scale, out_dtype=out_dtype, backend="triton")
    assert out.grad_fn is not None and "BiasFromTable" in type(out.grad_fn).__name__
    (out.float() * weight).sum().backward()
    (bias_from_table64(table64, index, sigmoid_scale, False) * weight.double()).sum().backward()
    assert rel_err(table.grad, table64.grad) < (2e-3 if out_dtype == torch.float16 else 1e-5)


def test_bias_from_table_out_of_range_index_gives_nan_on_the_kernel_path():
    table, index = table_case()
    index = index.clone()
    index[3, 5], index[10, 0] = table.shape[0], -1
    out = fb.bias_from_table(table, index, backend="triton")
    bad = torch.zeros(index.shape, dtype=torch.bool, device=DEVICE)
    bad[3, 5] = bad[10, 0] = True
    assert torch.isnan(out[:, bad]).all() and not torch.isnan(out[:, ~bad]).any()


@pytest.mark.parametrize("change,match", [
    (dict(table=torch.zeros(169)), "table must be 2-D"),
    (dict(table=torch.zeros(169, 3, dtype=torch.int32)), "table must be floating"),
    (dict(index=torch.zeros(49, dtype=torch.int64)), "index must be 2-D"),
    (dict(index=torch.zeros(49, 49)), "index must be an integer tensor"),
    (dict(index=torch.zeros(49, 49, dtype=torch.int64, device="meta")), "index is on meta"),
    (dict(out_dtype=torch.int32), "out_dtype must be a floating dtype"),
])
def test_bias_from_table_bad_inputs_name_the_problem(change, match):
    table, index = table_case()
    args = dict(table=table, index=index)
    args.update({k: (v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v)
                 for k, v in change.items()})
    with pytest.raises((ValueError, TypeError), match=match):
        fb.bias_from_table(args.pop("table"), args.pop("index"), **args, backend="triton")


def test_bias_from_table_traces_in_torch_compile():
    table, index = table_case()
    compiled = torch.compile(lambda t: fb.bias_from_table(t, index, center_rows=True, out_dtype=torch.float16,
                                                          backend="triton") * 2, backend="aot_eager",
                             fullgraph=True)
    out = compiled(table)
    assert rel_err(out, 2 * bias_from_table64(table, index, 16.0, True)) < 1e-3


def test_centred_16_bit_bias_from_table_gives_the_same_attention():
    """Centring rows changes B by a row constant, which softmax ignores."""
    index, T = relative_position_index(7, 7)
    g = fresh_generator()
    table = (2 * torch.randn(T, 2, generator=g)).to(DEVICE)
    args = make_case(4, 49, 2, 32, torch.float16, "none", True)
    exact = reference64(dict(args, bias=bias_from_table64(table, index.to(DEVICE), 16.0, False)))
    args["bias"] = fb.bias_from_table(table, index.to(DEVICE), center_rows=True, out_dtype=torch.float16,
                                      backend="triton")
    out = fb.flash_bias_attention(**args, backend="triton")
    assert rel_err(out, exact) < TOL[torch.float16]


# ----------------------------------------------------------------------------------------------
# shifted_window_region_ids
# ----------------------------------------------------------------------------------------------
def official_attn_mask(image, window, shift):
    """SwinTransformerBlock's attn_mask as the official code computes it (window_partition inlined)."""
    (H, W), (wh, ww) = image, window
    img_mask = torch.zeros((1, H, W, 1))
    cnt = 0
    for h in (slice(0, -wh), slice(-wh, -shift), slice(-shift, None)):
        for w in (slice(0, -ww), slice(-ww, -shift), slice(-shift, None)):
            img_mask[:, h, w, :] = cnt
            cnt += 1
    mask_windows = img_mask.view(1, H // wh, wh, W // ww, ww, 1).permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww)
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))


@pytest.mark.parametrize("image,window,shift", [
    ((8, 8), (4, 4), 2), ((12, 8), (4, 4), 2), ((16, 24), (8, 8), 4), ((14, 21), (7, 7), 3),
    ((12, 8), (6, 4), 2), ((8, 8), (4, 4), 1), ((12, 12), (12, 12), 6),
])
def test_shifted_window_region_ids_match_official_mask(image, window, shift):
    region_ids = fb.shifted_window_region_ids(image, window, shift)
    nW = (image[0] // window[0]) * (image[1] // window[1])
    assert region_ids.shape == (nW, window[0] * window[1]) and region_ids.dtype == torch.int32
    assert torch.equal(fb.region_mask(region_ids), official_attn_mask(image, window, shift))


def test_shifted_window_region_ids_arguments():
    assert torch.equal(fb.shifted_window_region_ids(8, 4, 0), torch.zeros(4, 16, dtype=torch.int32))
    assert torch.equal(fb.shifted_window_region_ids(8, 4, 2), fb.shifted_window_region_ids((8, 8), (4, 4), 2))
    with pytest.raises(ValueError, match="shift_size must be in \\[0, 4\\); got 4"):
        fb.shifted_window_region_ids((8, 8), (4, 4), 4)
    with pytest.raises(ValueError, match="window_size 3x3 does not tile image_size 8x8"):
        fb.shifted_window_region_ids((8, 8), 3, 1)


@pytest.mark.parametrize("image,window,shift", [((8, 8), (4, 4), 2), ((12, 8), (6, 4), 2)])
def test_shifted_windows_in_the_kernel(image, window, shift):
    """The image layout's in-kernel shift with the official regions, against the reference."""
    args = make_case(3, window[0] * window[1], 2, 32, torch.float16, "dense", False, image=image,
                     window=window, shift=shift)
    args["region_ids"] = fb.shifted_window_region_ids(image, window, shift).to(DEVICE)
    check(args)


# ----------------------------------------------------------------------------------------------
# Swin V1: scaled dot-product attention (logit_scale=None), the same kernel's other score form
# ----------------------------------------------------------------------------------------------
def scaled_dot_product64(args, scale):
    """Swin V1's window attention written out in float64 the official way (window layout, nW = 2)."""
    qkv = args["qkv"].double()
    H, (Bw, N, three_c) = args["num_heads"], qkv.shape
    q, k, v = qkv.view(Bw, N, 3, H, three_c // (3 * H)).permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q * scale) @ k.transpose(-2, -1) + args["bias"].double()
    attn = attn.view(Bw // 2, 2, H, N, N) + fb.region_mask(args["region_ids"], torch.float64)[None, :, None]
    return (attn.view(Bw, H, N, N).softmax(-1) @ v).transpose(1, 2).reshape(Bw, N, three_c // 3)


@pytest.mark.parametrize("N", SIZES)
@pytest.mark.parametrize("bias_mode", ["dense", "lowrank", "none"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_scaled_dot_product_window_layout(N, bias_mode, dtype):
    check(make_case(2, N, 2, 32, dtype, bias_mode, True, nW=2, cosine=False))


def test_scaled_dot_product_is_the_official_v1_math():
    """The reference's V1 form against the official expression, and the kernel against both."""
    args = make_case(4, 49, 2, 32, torch.float32, "dense", True, nW=2, cosine=False)
    official = scaled_dot_product64(args, 32 ** -0.5)
    assert rel_err(reference64(args), official) < 1e-12
    assert rel_err(fb.flash_bias_attention(**args, backend="triton"), official) < TOL[torch.float32]
    cosine = reference64(dict(args, logit_scale=torch.zeros(2, device=DEVICE)))
    assert rel_err(cosine, official) > 1e-2     # the two forms differ: the branch is taken


@pytest.mark.parametrize("scale", [0.3, 32 ** -0.5 / 4])
def test_scaled_dot_product_custom_scale(scale):
    """An explicit scale (the official qk_scale) reaches the kernel."""
    args = make_case(4, 49, 2, 32, torch.float16, "dense", True, nW=2, cosine=False)
    out = fb.flash_bias_attention(**args, scale=scale, backend="triton")
    assert rel_err(out, scaled_dot_product64(args, scale)) < TOL[torch.float16]
    assert rel_err(out, scaled_dot_product64(args, 32 ** -0.5)) > 1e-2


@pytest.mark.parametrize("head_dim", [16, 24, 64])
def test_scaled_dot_product_head_dims(head_dim):
    check(make_case(2, 49, 2, head_dim, torch.float16, "dense", True, nW=2, cosine=False))


@pytest.mark.parametrize("image,window,shift,dtype,bias_mode", [
    ((14, 14), (7, 7), 3, torch.float16, "dense"),
    ((8, 8), (4, 4), 2, torch.bfloat16, "lowrank"),
    ((12, 12), (12, 12), 0, torch.float32, "dense"),
])
def test_scaled_dot_product_image_layout(image, window, shift, dtype, bias_mode):
    """V1 windows (7x7, 12x12) with the in-kernel cyclic shift and the official regions."""
    args = make_case(2, window[0] * window[1], 2, 32, dtype, bias_mode, False, image=image, window=window,
                     shift=shift, cosine=False)
    if shift:
        args["region_ids"] = fb.shifted_window_region_ids(image, window, shift).to(DEVICE)
    check(args)


def test_scaled_dot_product_zero_rows_and_isolated_tokens():
    """A zero q row gives uniform scores (no normalisation to divide by zero), one-token regions."""
    args = make_case(2, 49, 2, 32, torch.float16, "dense", True, nW=2, cosine=False)
    args["qkv"][:, 3, :] = 0
    args["region_ids"] = torch.arange(49, dtype=torch.int32, device=DEVICE).repeat(2, 1)
    check(args)


def test_scaled_dot_product_traces_in_torch_compile():
    args = make_case(2, 49, 2, 32, torch.float16, "dense", True, nW=2, cosine=False)

    def f(qkv, bias, region_ids):
        return fb.flash_bias_attention(qkv, 2, bias=bias, region_ids=region_ids, scale=0.2, backend="triton") * 2
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(args["qkv"], args["bias"], args["region_ids"])
    assert rel_err(out, 2 * scaled_dot_product64(args, 0.2)) < TOL[torch.float16]


@pytest.mark.parametrize("change,match", [
    (dict(scale=0.1, logit_scale=torch.zeros(2)), "give logit_scale .* or scale .*, not both"),
    (dict(scale=torch.tensor(0.1)), "scale must be a finite Python float"),
    (dict(scale=float("inf")), "scale must be a finite Python float .*; got inf"),
    (dict(scale="0.1"), "scale must be a finite Python float"),
])
def test_scale_arguments_name_the_problem(change, match):
    args = make_case(2, 49, 2, 32, torch.float16, "dense", True, nW=2, cosine=False)
    args.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.items()})
    for backend in ("triton", "torch"):
        with pytest.raises(ValueError, match=match):
            fb.flash_bias_attention(**args, backend=backend)


# ----------------------------------------------------------------------------------------------
# add_layer_norm: Swin V1's residual add and the next pre-norm in one pass
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("C", [96, 128, 200])
@pytest.mark.parametrize("dtype,autocast", [(torch.float16, True), (torch.bfloat16, True), (torch.float32, False),
                                            (torch.float16, False)])
def test_add_layer_norm(C, dtype, autocast):
    """s = x + branch and LayerNorm(s), against float64 and PyTorch's own expression."""
    g = fresh_generator()
    stream_dtype = torch.float32 if autocast else dtype     # under autocast the residual stream stays float32
    x = (3 * torch.randn(2, 37, C, generator=g)).to(DEVICE, stream_dtype)
    branch = (2 * torch.randn(2, 37, C, generator=g) + 0.5).to(DEVICE, dtype)
    norm = torch.nn.LayerNorm(C).to(DEVICE, stream_dtype)
    with torch.no_grad():
        norm.weight.copy_(0.5 + 0.1 * torch.randn(C, generator=g))
        norm.bias.copy_(0.02 * torch.randn(C, generator=g))
    with torch.no_grad(), torch.autocast("cuda" if CUDA else "cpu", dtype=dtype, enabled=autocast):
        total, normed = fb.add_layer_norm(x, branch, norm, backend="triton")
        ref_total, ref_normed = fb.add_layer_norm(x, branch, norm, backend="torch")
    assert (total.dtype, normed.dtype) == (ref_total.dtype, ref_normed.dtype) == (stream_dtype, dtype)
    assert total.shape == normed.shape == x.shape
    exact_total = x.double() + branch.double()
    assert rel_err(total, exact_total) < (1e-7 if stream_dtype == torch.float32 else 1e-3)
    # the norm of the sum as stored (rounded to its dtype), as PyTorch's separate LayerNorm reads it
    exact_normed = torch.nn.functional.layer_norm(total.double(), (C,), norm.weight.double(), norm.bias.double(),
                                                  norm.eps)
    assert rel_err(normed, exact_normed) < (1e-6 if dtype == torch.float32 else 1e-2)
    assert rel_err(normed, ref_normed.double()) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_add_layer_norm_arguments():
    residual, x, norm = layer_norm_case()
    with pytest.raises(ValueError, match=r"add_layer_norm: x \(2, 5, 96\), branch \(2, 7, 96\) .* do not fit"):
        fb.add_layer_norm(residual[:, :5], x, norm)
    with pytest.raises(RuntimeError, match="add_layer_norm: the Triton kernel has no backward pass"):
        fb.add_layer_norm(residual, x, norm, backend="triton")      # norm.weight requires grad
    with torch.no_grad():
        with pytest.raises(TypeError, match="add_layer_norm: the Triton kernel computes in float32"):
            fb.add_layer_norm(residual.double(), x.double(), norm.double(), backend="triton")
        affine_free = torch.nn.LayerNorm(96, elementwise_affine=False).to(DEVICE)
        with pytest.raises(ValueError, match="add_layer_norm: the Triton kernel needs an affine LayerNorm"):
            fb.add_layer_norm(residual, x, affine_free, backend="triton")
        total, normed = fb.add_layer_norm(residual, x, affine_free)  # "auto" falls back to PyTorch
        assert torch.allclose(normed, torch.nn.functional.layer_norm(residual + x, (96,)))
    with pytest.raises(ValueError, match="add_layer_norm: backend must be one of"):
        fb.add_layer_norm(residual, x, norm, backend="trition")


def test_add_layer_norm_traces_in_torch_compile():
    residual, x, norm = layer_norm_case(C=200)
    norm.requires_grad_(False)
    compiled = torch.compile(lambda a, b: fb.add_layer_norm(a, b, norm, backend="triton"), backend="aot_eager",
                             fullgraph=True)
    total, normed = compiled(residual, x)
    exact = torch.nn.functional.layer_norm(residual.double() + x.double(), (200,), norm.weight.double(),
                                           norm.bias.double(), norm.eps)
    assert rel_err(total, residual.double() + x.double()) < 1e-7 and rel_err(normed, exact) < 1e-6


# ----------------------------------------------------------------------------------------------
# cpb_table: SwinV2's continuous-position-bias MLP in one launch
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("window,heads", [(7, 3), (12, 16), (3, 32)])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_b0", [True, False])
def test_cpb_table(window, heads, weight_dtype, with_b0):
    g = fresh_generator()
    rows = (2 * window - 1) ** 2
    coords = (torch.rand(rows, 2, generator=g) * 2 - 1).to(DEVICE)
    w0 = torch.randn(512, 2, generator=g).to(DEVICE, weight_dtype)
    b0 = (0.5 * torch.randn(512, generator=g)).to(DEVICE, weight_dtype) if with_b0 else None
    w2 = (0.05 * torch.randn(heads, 512, generator=g)).to(DEVICE, weight_dtype)
    out = fb.cpb_table(coords, w0, b0, w2, backend="triton")
    hidden = torch.relu(coords.double() @ w0.double().T + (b0.double() if with_b0 else 0))
    ref = hidden @ w2.double().T
    assert out.shape == (rows, heads) and out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-6
    assert torch.allclose(fb.cpb_table(coords, w0, b0, w2, backend="torch").double(), ref, rtol=1e-5, atol=1e-5)


def test_cpb_table_bad_shapes_and_fallback():
    coords, w0, w2 = (torch.zeros(shape, device=DEVICE) for shape in ((9, 2), (512, 2), (4, 512)))
    with pytest.raises(ValueError, match=r"cpb_table: expected coords \(T, 2\).*\(512, 3\)"):
        fb.cpb_table(coords, torch.zeros(512, 3, device=DEVICE), None, w2)
    with pytest.raises(ValueError, match="multiple of 32"):
        fb.cpb_table(coords, torch.zeros(100, 2, device=DEVICE), None, torch.zeros(4, 100, device=DEVICE),
                     backend="triton")
    table = fb.cpb_table(coords.double(), w0.double(), None, w2.double())  # "auto": float64 on PyTorch
    assert table.dtype == torch.float64


def several_layers_case(layers, heads=4, window=(7, 7), g=None):
    """Per layer: coords (T, 2), w0, b0, w2 of the cpb MLP and an index (N, N) of its own (permuted, so a kernel
    that reads layer 0's index for every layer gives wrong values)."""
    g = g or fresh_generator()
    index, T = relative_position_index(*window)
    cases = []
    for _ in range(layers):
        perm = torch.randperm(index.numel(), generator=g)
        cases.append(dict(coords=(torch.rand(T, 2, generator=g) * 2 - 1).to(DEVICE),
                          w0=torch.randn(64, 2, generator=g).to(DEVICE),
                          b0=(0.5 * torch.randn(64, generator=g)).to(DEVICE),
                          w2=(0.3 * torch.randn(heads, 64, generator=g)).to(DEVICE),
                          index=index.view(-1)[perm].view(index.shape).to(DEVICE)))
    return cases


def layer_bias64(case, center_rows):
    table = torch.relu(case["coords"].double() @ case["w0"].double().T + case["b0"].double()) @ case["w2"].double().T
    return bias_from_table64(table, case["index"], 16.0, center_rows)


@pytest.mark.parametrize("layers,per_launch", [(3, 32), (5, 2)])
@pytest.mark.parametrize("center_rows,out_dtype", [(True, torch.float16), (False, torch.float32)])
def test_several_layers_in_one_launch(layers, per_launch, center_rows, out_dtype, monkeypatch):
    """cpb_table and bias_from_table of a stage's layers: one launch each (per MAX_LAYERS_PER_LAUNCH layers), every
    layer's own weights and index, against float64."""
    monkeypatch.setattr(fb, "MAX_LAYERS_PER_LAUNCH", per_launch)
    launches = []
    for name in ("_cpb_table_launch", "_bias_from_table_launch"):
        original = getattr(fb, name)
        monkeypatch.setattr(fb, name, lambda *a, _o=original, _n=name, **k: (launches.append((_n, len(a[0]))),
                                                                             _o(*a, **k))[1])
    cases = several_layers_case(layers)
    with torch.no_grad():
        tables = fb.cpb_table(*([c[k] for c in cases] for k in ("coords", "w0", "b0", "w2")), backend="triton")
        biases = fb.bias_from_table(tables, [c["index"] for c in cases], center_rows=center_rows,
                                    out_dtype=out_dtype, backend="triton")
    N = cases[0]["index"].shape[0]
    assert tables.shape == (layers, cases[0]["coords"].shape[0], 4)
    assert biases.shape == (layers, 4, N, N) and biases.dtype == out_dtype
    sizes = [min(per_launch, layers - s) for s in range(0, layers, per_launch)]
    assert launches == [("_cpb_table_launch", n) for n in sizes] + [("_bias_from_table_launch", n) for n in sizes]
    for i, case in enumerate(cases):
        ref = layer_bias64(case, center_rows)
        err = ((biases[i].double() - ref).abs().max() / ref.abs().max()).item()
        assert err < BIAS_TOL[out_dtype], (i, err)


def test_several_layers_with_tables_of_different_strides():
    """Each layer's table is read with its own layout: a heads-first table, a (T, H) one and a column slice of a
    wider one in one call give each layer's own bias."""
    g = fresh_generator()
    T, H, N = 15, 3, 9
    index = torch.randint(0, T, (N, N), generator=g).to(DEVICE)
    dense = torch.randn(T, H, generator=g).to(DEVICE)
    tables = [torch.randn(H, T, generator=g).to(DEVICE).t(), dense, torch.randn(T, H + 2, generator=g).to(DEVICE)[:, :H]]
    biases = fb.bias_from_table(tables, [index] * 3, out_dtype=torch.float32, backend="triton")
    for table, bias in zip(tables, biases):
        assert torch.allclose(bias, fb.bias_from_table(table, index, backend="torch"), atol=1e-6)


def test_several_layers_bad_inputs_name_the_layer():
    cases = several_layers_case(3)
    cases[2]["w2"] = cases[2]["w2"][:3]
    with pytest.raises(ValueError, match="cpb_table: layer 2's weights differ in shape or dtype from layer 0's"):
        fb.cpb_table(*([c[k] for c in cases] for k in ("coords", "w0", "b0", "w2")))
    table = torch.zeros(cases[0]["coords"].shape[0], 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"bias_from_table: layer 1 has a \(5, 4\) .* several layers at once need"):
        fb.bias_from_table([table, table[:5]], [cases[0]["index"]] * 2)
    with pytest.raises(ValueError, match="bias_from_table: 1 tables for 2 indices"):
        fb.bias_from_table([table], [cases[0]["index"]] * 2)


def test_several_layers_with_gradients_go_layer_by_layer():
    """Weights that need a gradient: each layer on its own differentiable path, the same values and gradients."""
    cases = several_layers_case(2)
    for c in cases:
        c["w2"].requires_grad_(True)
    tables = fb.cpb_table(*([c[k] for c in cases] for k in ("coords", "w0", "b0", "w2")))
    biases = fb.bias_from_table(tables, [c["index"] for c in cases])
    biases.pow(2).sum().backward()
    for i, c in enumerate(cases):
        grad = c["w2"].grad.clone()
        c["w2"].grad = None
        alone = fb.bias_from_table(fb.cpb_table(c["coords"], c["w0"], c["b0"], c["w2"]), c["index"])
        assert torch.allclose(biases[i], alone)
        alone.pow(2).sum().backward()
        assert torch.allclose(grad, c["w2"].grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("center_rows,out_dtype", [(True, torch.float16), (False, torch.float32)])
@pytest.mark.parametrize("layers", [1, 3])
def test_sigmoid_in_the_table_gives_the_gathers_bits(center_rows, out_dtype, layers):
    """cpb_table with sigmoid_scale takes each entry's sigmoid (and centring) in the kernel, as bias_from_table would
    take it entry by entry: gathered with no sigmoid, the bias has the bits of the raw table gathered with it (one
    expression in both kernels, _scaled_sigmoid), on one layer and on several in one launch; the PyTorch path agrees
    within a rounding, and against float64."""
    cases = several_layers_case(layers)
    mlps = [[c[k] for c in cases] for k in ("coords", "w0", "b0", "w2")]
    indices = [c["index"] for c in cases]
    if layers == 1:
        mlps, indices = [m[0] for m in mlps], indices[0]
    with torch.no_grad():
        raw = fb.cpb_table(*mlps, backend="triton")
        expected = fb.bias_from_table(raw, indices, center_rows=center_rows, out_dtype=out_dtype, backend="triton")
        for backend in ("triton", "torch"):
            table = fb.cpb_table(*mlps, sigmoid_scale=16, center_rows=center_rows, backend=backend)
            bias = fb.bias_from_table(table, indices, sigmoid_scale=None, out_dtype=out_dtype, backend=backend)
            if backend == "triton":
                assert torch.equal(bias, expected)
            assert (bias.double() - expected.double()).abs().max() <= (1e-2 if out_dtype == torch.float16 else 1e-5)
    ref = torch.stack([layer_bias64(c, center_rows) for c in cases])
    assert ((expected.double().view(ref.shape) - ref).abs().max() / ref.abs().max()).item() < BIAS_TOL[out_dtype]


def test_model_bias_through_cpb_table_and_bias_from_table_kernels():
    """The drop-in's derive_bias on the kernel path equals the official expression in float64."""
    import model_utils as mu
    attn = mu.make_model(mu.TINY).layers[0].blocks[1].attn.to(DEVICE)
    with torch.no_grad():
        mlp64 = copy.deepcopy(attn.cpb_mlp).double()
        table = mlp64(attn.relative_coords_table.double()).view(-1, attn.num_heads)
        N = attn.window_size[0] * attn.window_size[1]
        official = 16 * torch.sigmoid(table[attn.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1))
        got = fb.bias_from_table(fb.cpb_table(attn.relative_coords_table.reshape(-1, 2), attn.cpb_mlp[0].weight,
                                              attn.cpb_mlp[0].bias, attn.cpb_mlp[2].weight, backend="triton"),
                                 attn.relative_position_index, backend="triton")
    assert rel_err(got, official) < 1e-6


# ----------------------------------------------------------------------------------------------
# The shift mask as a one-hot dot (ids within 16 of a window's smallest), else compared as given
# ----------------------------------------------------------------------------------------------
def region_rows(kinds, N, g):
    """(len(kinds), N) int64 region ids, one window per kind: "single" (one region), "onehot" (ids lo..lo+15
    with both ends present, lo far from 0), "spread" (ids 16 apart: the compared path)."""
    rows = []
    for kind in kinds:
        ids = torch.randint(0, 16, (N,), generator=g, dtype=torch.int64)
        ids[:2] = torch.tensor([0, 15])
        rows.append({"single": torch.full((N,), 7, dtype=torch.int64), "onehot": ids + 1000, "spread": ids * 16}[kind])
    return torch.stack(rows).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("image,window,shift", [((14, 14), (7, 7), 3), ((24, 24), (12, 12), 6)])
def test_official_shift_mask_as_one_hot_dot(image, window, shift, dtype):
    """Swin's shifted windows (ids 0..8: the one-hot dot) at N = 49 and 144, every dot dtype."""
    args = make_case(2, window[0] * window[1], 2, 32, dtype, "dense", False, image=image, window=window, shift=shift)
    args["region_ids"] = fb.shifted_window_region_ids(image, window, shift).to(DEVICE)
    check(args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_one_hot_and_compared_masks_in_one_launch(dtype):
    """Each window picks its own mask: one region, ids within 16 (offset from 0, int64), ids spread over 16."""
    args = make_case(8, 49, 2, 32, dtype, "dense", False, nW=4)
    args["region_ids"] = region_rows(["onehot", "spread", "single", "onehot"], 49, fresh_generator())
    check(args)


@pytest.mark.parametrize("ids", [
    [0, 15], [0, 16], [-30000, -29985], [250, 255, 0],
    [2 ** 40, 2 ** 40 + 3], [-2 ** 62, 2 ** 62], [-2 ** 63, 2 ** 63 - 1], [2 ** 63 - 1, 2 ** 63 - 16],
], ids=lambda ids: "/".join(map(str, ids)))
def test_region_id_spreads_at_the_edges(ids):
    """Spreads 15 (one-hot) and 16 (compared); int16 and uint8 ids; int64 ids far from 0, and spreads that wrap
    around in int64 (which must not pass for small ones)."""
    dtype = (torch.int16 if min(ids) < -128 and max(ids) < 2 ** 15 else torch.uint8 if 0 in ids and max(ids) < 256
             else torch.int64)
    args = make_case(2, 49, 2, 32, torch.float16, "dense", False, nW=2)
    g = fresh_generator()
    pick = torch.randint(0, len(ids), (2, 49), generator=g)
    pick[:, :len(ids)] = torch.arange(len(ids))
    args["region_ids"] = torch.tensor(ids, dtype=torch.int64)[pick].to(DEVICE, dtype)
    check(args)


def reference_lse64(args):
    """Float64 log-sum-exp (Bw, N, H) of each row's logits, window layout, cosine scores."""
    qkv, H = args["qkv"].double(), args["num_heads"]
    Bw, N, three_c = qkv.shape
    q, k, _ = qkv.view(Bw, N, 3, H, three_c // (3 * H)).permute(2, 0, 3, 1, 4).unbind(0)
    s = torch.clamp(args["logit_scale"].double().view(H, 1, 1), max=fb.MAX_LOGIT_SCALE).exp()
    logits = s * (torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).mT)
    logits = logits + args["bias"].double()
    mask = fb.region_mask(args["region_ids"], torch.float64)
    nW = mask.shape[0]
    logits = (logits.view(Bw // nW, nW, H, N, N) + mask[None, :, None]).view(Bw, H, N, N)
    return logits.logsumexp(-1).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_stored_lse_is_the_official_masks(dtype):
    """The log-sum-exp that the forward stores for the backward is that of the official logits (-100 across
    regions) in every kind of window, though the one-hot dot adds 100 within a region instead."""
    args = make_case(8, 49, 2, 32, dtype, "dense", False, nW=4)
    args["region_ids"] = region_rows(["onehot", "spread", "single", "onehot"], 49, fresh_generator())
    qkv = args["qkv"].detach().requires_grad_(True)
    out, lse = fb._FlashBiasAttentionFunction.apply(qkv, args["logit_scale"], args["bias"], args["region_ids"], 2,
                                                    [7, 7], [7, 7], 0, None, None)
    ref = reference_lse64(args)
    assert not torch.isnan(lse).any()
    err = (lse.double() - ref).abs().max().item()
    # the dots round their operands to 11 bits (float16; TF32 for float32 on a GPU), which scores of up to
    # s_h = 120 carry as ~120 * 2**-11 = 0.06 (float32 on an H100: 0.052)
    assert err < (1e-4 if dtype == torch.float32 and not CUDA else 1e-1), err
    from test_kernel_backward import check_backward
    check_backward(args)


# ----------------------------------------------------------------------------------------------
# A SwinV2 block's tail in one kernel: both res-post-norm steps around the Mlp (fc1, GELU, fc2)
# ----------------------------------------------------------------------------------------------
class OfficialMlp(torch.nn.Module):
    """The official files' Mlp: fc1, nn.GELU (erf), fc2, dropout 0."""

    def __init__(self, C, hidden):
        super().__init__()
        self.fc1, self.act = torch.nn.Linear(C, hidden), torch.nn.GELU()
        self.fc2, self.drop = torch.nn.Linear(hidden, C), torch.nn.Dropout(0.0)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def block_tail_case(M, C, half, hidden=None):
    """(x (M, C) float32, attn_out (M, C) half, norm1, mlp with half Linear weights, norm2), trained-like scales."""
    g = fresh_generator()
    x = (3 * torch.randn(M, C, generator=g)).to(DEVICE)
    attn_out = (2 * torch.randn(M, C, generator=g) + 0.5).to(DEVICE, half)
    norms, mlp = [torch.nn.LayerNorm(C) for _ in range(2)], OfficialMlp(C, hidden or 4 * C)
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(0.5 + 0.1 * torch.randn(C, generator=g))
            norm.bias.copy_(0.1 * torch.randn(C, generator=g))
        for fc in (mlp.fc1, mlp.fc2):
            fc.weight.copy_(torch.randn(fc.weight.shape, generator=g) / fc.in_features ** 0.5)
            fc.bias.copy_(0.1 * torch.randn(fc.out_features, generator=g))
    mlp = mlp.to(DEVICE, half).eval()
    return x, attn_out, norms[0].to(DEVICE), mlp, norms[1].to(DEVICE)


def block_tail_reference(x, attn_out, norm1, mlp, norm2, rounded, gelu_form="tanh"):
    """float64 math; rounded: rounded to the Linear weights' dtype where the official block under autocast rounds
    (fc1's input, fc1's and GELU's and fc2's outputs); gelu_form: "tanh", the kernel's, or "none", the official
    nn.GELU's erf."""
    half = mlp.fc1.weight.dtype
    rnd = (lambda t: t.to(half).double()) if rounded else (lambda t: t)

    def post_norm(residual, branch, norm):
        return residual + torch.nn.functional.layer_norm(branch.double(), norm.normalized_shape,
                                                         norm.weight.double(), norm.bias.double(), norm.eps)
    linear, gelu = torch.nn.functional.linear, torch.nn.functional.gelu
    x1 = post_norm(x.double(), attn_out, norm1)
    hidden = rnd(gelu(rnd(linear(rnd(x1), mlp.fc1.weight.double(), mlp.fc1.bias.double())), approximate=gelu_form))
    return post_norm(x1, rnd(linear(hidden, mlp.fc2.weight.double(), mlp.fc2.bias.double())), norm2)


@pytest.mark.parametrize("M,C,hidden", [(37, 32, 128), (64, 48, 192), (40, 32, 80)])   # 80: hidden not a block
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_block_tail_kernel_against_float64(M, C, hidden, half, monkeypatch):
    monkeypatch.setattr(fb, "BLOCK_TAIL_MAX_C", 256)
    launches = []
    launch = fb._block_tail_launch
    monkeypatch.setattr(fb, "_block_tail_launch", lambda *a, **k: launches.append(1) or launch(*a, **k))
    args = block_tail_case(M, C, half, hidden)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=half):
        out, low = fb.block_tail(*args, backend="triton")
    assert launches == [1] and out.dtype == torch.float32 and low.dtype == half and out.shape == (M, C)
    assert torch.equal(low, out.to(half)) or (half == torch.bfloat16 and not CUDA)   # interpreter: see _round_half
    exact, rounded = (block_tail_reference(*args, rounded=r) for r in (False, True))
    # measured on the interpreter: out against float64 6.5e-5 (fp16) / 5.2e-4 (bf16), the rounding reference's own
    assert rel_err(out, exact) < {torch.float16: 2e-4, torch.bfloat16: 1.5e-3}[half]
    assert rel_err(out, rounded) < {torch.float16: 2e-5, torch.bfloat16: 1e-4}[half]


def projection_case(C, half):
    """An output projection nn.Linear(C, C) with trained-like weights and bias, in half."""
    g = fresh_generator()
    proj = torch.nn.Linear(C, C)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(C, C, generator=g) / C ** 0.5)
        proj.bias.copy_(0.2 * torch.randn(C, generator=g))
    return proj.to(DEVICE, half)


@pytest.mark.parametrize("M,C", [(37, 32), (40, 48)])   # 48: C not a block
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False])
def test_block_tail_applies_the_output_projection(M, C, half, fused, monkeypatch):
    """attn_proj: the fused kernel runs the attention's output projection first, its output rounded as the official
    proj's; unfused, its matmul runs without the bias, which the LayerNorm pass adds. Both against float64."""
    monkeypatch.setattr(fb, "BLOCK_TAIL_MAX_C", 256 if fused else 0)
    launches = []
    launch = fb._block_tail_launch
    monkeypatch.setattr(fb, "_block_tail_launch", lambda *a, **k: launches.append(1) or launch(*a, **k))
    x, attn_in, norm1, mlp, norm2 = block_tail_case(M, C, half)
    proj = projection_case(C, half)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=half):
        out, low = fb.block_tail(x, attn_in, norm1, mlp, norm2, backend="triton", attn_proj=proj)
        projected = torch.nn.functional.linear(attn_in.double(), proj.weight.double(), proj.bias.double())
    assert launches == ([1] if fused else [])
    exact, rounded = (block_tail_reference(x, projected.to(half) if r else projected, norm1, mlp, norm2, rounded=r)
                      for r in (False, True))
    # measured on the interpreter, fused: 7.3e-5 (fp16) / 5.7e-4 (bf16) against float64; the official block's own:
    # 9.0e-5 / 7.0e-4
    assert rel_err(out, exact) < {torch.float16: 2e-4, torch.bfloat16: 1.5e-3}[half]
    if fused:
        assert rel_err(out, rounded) < {torch.float16: 2e-5, torch.bfloat16: 1e-4}[half]


def test_block_tail_refuses_a_projection_of_another_shape():
    x, attn_in, norm1, mlp, norm2 = block_tail_case(8, 32, torch.float16)
    with pytest.raises(ValueError, match=r"attn_proj must be an nn.Linear from C = 32 to C with a bias"):
        fb.block_tail(x, attn_in, norm1, mlp, norm2, attn_proj=torch.nn.Linear(32, 16))


@pytest.mark.skipif(not CUDA, reason="real widths: the interpreter covers the kernel in the test above")
@pytest.mark.parametrize("M,C", [(9216, 128), (2304, 256), (576, 512)])   # SwinV2-B/384 batch 1, stages 1-3
def test_block_tail_kernel_at_batch_one_widths(M, C, monkeypatch):
    monkeypatch.setattr(fb, "BLOCK_TAIL_MAX_C", C)
    args = block_tail_case(M, C, torch.float16, 4 * C)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.float16):
        out, _ = fb.block_tail(*args, backend="triton")
    assert rel_err(out, block_tail_reference(*args, rounded=False)) < 2e-4
    assert rel_err(out, block_tail_reference(*args, rounded=True)) < 1e-4   # tensor cores sum in another order


def test_block_tail_takes_wide_blocks_of_few_rows(monkeypatch):
    """C above BLOCK_TAIL_MAX_C fuses where the rows are at most BLOCK_TAIL_WIDE_ROWS and C at most
    BLOCK_TAIL_WIDEST_C."""
    launches = []
    launch = fb._block_tail_launch
    monkeypatch.setattr(fb, "_block_tail_launch", lambda *a, **k: launches.append(a[0].shape) or launch(*a, **k))
    monkeypatch.setattr(fb, "BLOCK_TAIL_MAX_C", 16)
    args = block_tail_case(21, 32, torch.float16)
    for wide_rows, widest, fused in [(21, 1024, True), (20, 1024, False), (21, 16, False), (0, 1024, False)]:
        monkeypatch.setattr(fb, "BLOCK_TAIL_WIDE_ROWS", wide_rows)
        monkeypatch.setattr(fb, "BLOCK_TAIL_WIDEST_C", widest)
        launches.clear()
        with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.float16):
            fb.block_tail(*args, backend="triton")
        assert launches == ([(21, 32)] if fused else []), (wide_rows, widest)


def test_block_tail_kernel_sums_as_the_layer_norm_kernel(monkeypatch):
    """With fc2's weight zero, fc2's output is its bias exactly: the kernel's two steps then give what the LayerNorm
    kernel's two passes give. Bit for bit in the interpreter. On a GPU the two kernels are compiled apart, and their
    bits differed in one H100 run of three (fresh inputs each run; presumably a multiply-add contracted differently,
    not isolated): there within a rounding."""
    monkeypatch.setattr(fb, "BLOCK_TAIL_MAX_C", 256)
    x, attn_out, norm1, mlp, norm2 = block_tail_case(37, 48, torch.float16)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.float16):
        mlp.fc2.weight.zero_()
        out, low = fb.block_tail(x, attn_out, norm1, mlp, norm2, backend="triton")
        steps, steps_low = fb.residual_steps(x, attn_out, norm1, lambda x1: mlp.fc2.bias.expand(37, 48), norm2,
                                             backend="triton")
    if CUDA:
        assert rel_err(out, steps) < 1e-6 and rel_err(low, steps_low) < 1e-3   # a float16 step: 4.9e-4
    else:
        assert torch.equal(out, steps) and torch.equal(low, steps_low)


def test_block_tail_is_residual_steps_where_it_does_not_fuse(monkeypatch):
    """Off, wider than BLOCK_TAIL_MAX_C, a tanh GELU, training mode, no autocast: residual_steps around mlp_forward,
    bit for bit, and the fused kernel is never launched."""
    monkeypatch.setattr(fb, "_block_tail_launch", lambda *a, **k: pytest.fail("the fused tail was launched"))
    monkeypatch.setattr(fb, "BLOCK_TAIL_MAX_C", 0)
    monkeypatch.setattr(fb, "BLOCK_TAIL_WIDE_ROWS", 0)
    x, attn_out, norm1, mlp, norm2 = block_tail_case(21, 32, torch.float16)

    def both():
        got = fb.block_tail(x, attn_out, norm1, mlp, norm2, backend="triton")
        want = fb.residual_steps(x, attn_out, norm1, lambda x1: fb.mlp_forward(mlp, x1), norm2, backend="triton")
        assert all(torch.equal(a, b) if a is not None else b is None for a, b in zip(got, want))
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.float16):
        both()
        monkeypatch.setattr(fb, "BLOCK_TAIL_MAX_C", 16)
        both()
        monkeypatch.setattr(fb, "BLOCK_TAIL_MAX_C", 256)
        mlp.act.approximate = "tanh"
        both()
        mlp.act.approximate = "none"
        mlp.train()
        both()
        mlp.eval()
    with torch.no_grad():
        mlp.float()
        both()


def patch_embed_case(image, patch, C, in_chans=3, channels_last=False):
    """(the official PatchEmbed with a LayerNorm, trained-like values, image (2, in_chans, *image))."""
    from swin_transformer_v2 import PatchEmbed
    g = fresh_generator()
    embed = PatchEmbed(image, patch, in_chans, C, norm_layer=torch.nn.LayerNorm)
    with torch.no_grad():   # a norm at weight 1, bias 0 and a zero conv bias would hide a lost term
        fan_in = embed.proj.weight[0].numel()
        embed.proj.weight.copy_(torch.randn(embed.proj.weight.shape, generator=g) / fan_in ** 0.5)
        embed.proj.bias.copy_(0.1 * torch.randn(C, generator=g))
        embed.norm.weight.copy_(0.5 + 0.1 * torch.randn(C, generator=g))
        embed.norm.bias.copy_(0.1 * torch.randn(C, generator=g))
    x = (torch.randn(2, in_chans, image, image, generator=g) + 0.3).to(DEVICE)
    return embed.to(DEVICE).eval(), x.to(memory_format=torch.channels_last) if channels_last else x


def patch_embed_reference(embed, x, half, rounded):
    """float64 math; rounded: the pixels and the conv's output rounded to half, where autocast rounds them."""
    rnd = (lambda t: t.to(half).double()) if rounded else (lambda t: t.double())
    conv, norm = embed.proj, embed.norm
    y = rnd(torch.nn.functional.conv2d(rnd(x), rnd(conv.weight), conv.bias.to(half).double(), conv.stride))
    return torch.nn.functional.layer_norm(y.flatten(2).transpose(1, 2), norm.normalized_shape, norm.weight.double(),
                                          norm.bias.double(), norm.eps)


@pytest.mark.parametrize("image,patch,C", [(16, 4, 32), (12, 4, 40), (10, 2, 24)])   # 40, 24: C not a block; K = 12
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_patch_embed_kernel_against_float64(image, patch, C, half, channels_last, monkeypatch):
    """FlashBias: the patch embedding in one kernel (gather, conv as a dot, bias, LayerNorm) against float64, the
    pixels and the conv's output rounded where autocast rounds them; the half copy is the output cast."""
    launches = []
    launch = fb._patch_embed_launch
    monkeypatch.setattr(fb, "_patch_embed_launch", lambda *a, **k: launches.append(1) or launch(*a, **k))
    embed, x = patch_embed_case(image, patch, C, channels_last=channels_last)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=half):
        out, low = fb.patch_embed_forward(embed, x, backend="triton")
    assert launches == [1] and out.shape == low.shape == (2, (image // patch) ** 2, C) and low.dtype == half
    with torch.no_grad(), torch.autocast(DEVICE, dtype=half):
        assert out.dtype == embed(x).dtype   # float32 on CUDA; CPU autocast's LayerNorm keeps its input's dtype
    assert torch.equal(low, out.to(half))
    exact, rounded = (patch_embed_reference(embed, x, half, r) for r in (False, True))
    # measured on the interpreter (float32 out): against the rounding reference below 1e-7, 1.6e-5 where one rounding
    # of the conv's output went the other way; against float64 3.6e-4 (fp16) / 2.9e-3 (bf16), the official module's
    # 4.0e-4 / 3.3e-3. CPU: out in the half dtype, a few elements one unit in the last place off the rounded reference
    tolerance = {torch.float32: 5e-5, torch.float16: 5e-4, torch.bfloat16: 2e-3}[out.dtype]
    assert rel_err(out, rounded.to(out.dtype)) < tolerance
    assert rel_err(out, exact) < {torch.float16: 1e-3, torch.bfloat16: 6e-3}[half]


@pytest.mark.skipif(not CUDA, reason="the real shape: the interpreter covers the kernel in the test above")
def test_patch_embed_kernel_at_the_swinv2_shape():
    embed, x = patch_embed_case(384, 4, 128)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.float16):
        out, low = fb.patch_embed_forward(embed, x, backend="triton")
        official = embed(x)
    assert torch.equal(low, out.to(torch.float16))
    assert rel_err(out, patch_embed_reference(embed, x, torch.float16, rounded=True)) < 2e-5
    assert rel_err(out, official) < 2e-3


@pytest.mark.parametrize("channels_last", [False, True])
def test_patch_embed_reads_a_graph_input_at_its_address(channels_last):
    """While a capture reads a GraphInput at its address, the kernel reads the image the address points to, not the
    tensor it is handed (the graph's buffer): pointed at another image it gives that image's embedding, bit for bit.
    An image of another layout, or 4 bytes off 16-byte alignment, is read as handed."""
    embed, buffer = patch_embed_case(16, 4, 32, channels_last=channels_last)
    other = torch.empty_like(buffer).copy_(torch.randn(buffer.shape, generator=fresh_generator()))
    graph_input = fb.GraphInput(buffer)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.float16):
        expected = fb.patch_embed_forward(embed, other, backend="triton")
        graph_input.point_at(other)
        with graph_input.reading_at_address():
            out = fb.patch_embed_forward(embed, buffer, backend="triton")
            assert graph_input.read_at_address
            assert all(torch.equal(a, b) for a, b in zip(out, expected))
            graph_input.point_at(buffer)
            assert torch.equal(fb.patch_embed_forward(embed, buffer, backend="triton")[1],
                               fb.patch_embed_forward(embed, buffer.clone(), backend="triton")[1])
    wide = torch.empty(buffer.numel() + 4, device=DEVICE)
    assert not graph_input.fits(wide[1:1 + buffer.numel()].view(buffer.shape))   # 4 bytes past the alignment
    assert graph_input.fits(wide[4:4 + buffer.numel()].view(buffer.shape)) is not channels_last   # strides
    assert not graph_input.fits(buffer.half())


def test_patch_embed_takes_the_matmul_path_where_the_kernel_does_not_fit(monkeypatch):
    """No autocast, gradients, no norm: the gathering copy and matmul, and the kernel is never launched."""
    monkeypatch.setattr(fb, "_patch_embed_launch", lambda *a, **k: pytest.fail("the patch-embedding kernel ran"))
    embed, x = patch_embed_case(8, 4, 16)
    with torch.no_grad():
        out, low = fb.patch_embed_forward(embed, x, backend="triton")
        assert low is None and rel_err(out, embed(x)) < 1e-5
    with torch.autocast(DEVICE, dtype=torch.float16):
        x.requires_grad_(True)
        out, _ = fb.patch_embed_forward(embed, x)
        out.sum().backward()
    assert x.grad is not None
    embed.norm = None
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.float16):
        out, low = fb.patch_embed_forward(embed, x.detach(), backend="triton")
    assert low is None and out.dtype == torch.float16


def official_merge(x, H, W):
    """The official PatchMerging's gather: cat of the four parity slices."""
    x = x.view(x.shape[0], H, W, -1)
    parts = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]
    return torch.cat(parts, -1).view(x.shape[0], -1, 4 * x.shape[-1])


def test_merge_patches_is_the_official_gather():
    x = torch.randn(2, 6 * 4, 5, generator=fresh_generator())
    assert torch.equal(fb.merge_patches(x, (6, 4)), official_merge(x, 6, 4))


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fused_tail", [True, False])
def test_block_tail_writes_the_patch_merging_layout(half, fused_tail, monkeypatch):
    """merge_size (the block before a patch merging): the half-precision copy comes back gathered as the official
    merging gathers it, bit for bit, and the float32 output is not stored; on the fused tail, on the residual steps'
    kernel and on PyTorch. 16 rows a program against 24 an image: blocks straddle images."""
    monkeypatch.setattr(fb, "BLOCK_TAIL_MAX_C", 256 if fused_tail else 0)
    monkeypatch.setattr(fb, "BLOCK_TAIL_WIDE_ROWS", 0)
    launches = []
    launch = fb._block_tail_launch
    monkeypatch.setattr(fb, "_block_tail_launch", lambda *a, **k: launches.append(1) or launch(*a, **k))
    B, H, W, C = 2, 6, 4, 32
    x, attn_out, norm1, mlp, norm2 = block_tail_case(B * H * W, C, half)
    x, attn_out = x.view(B, H * W, C), attn_out.view(B, H * W, C)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=half):
        for backend in ("triton", "torch"):
            full, low = fb.block_tail(x, attn_out, norm1, mlp, norm2, backend=backend)
            none, merged = fb.block_tail(x, attn_out, norm1, mlp, norm2, backend=backend, merge_size=(H, W))
            assert none is None and full.shape == (B, H * W, C) and merged.shape == (B, H * W // 4, 4 * C)
            assert torch.equal(merged, official_merge(low, H, W)), backend
        with pytest.raises(ValueError, match=r"merge_size \(5, 4\) needs x of shape \(B, H\*W, C\) with H and W "
                                             r"even; got \(2, 24, 32\)"):
            fb.block_tail(x, attn_out, norm1, mlp, norm2, backend="triton", merge_size=(5, 4))
    assert len(launches) == (2 if fused_tail else 0)
    with torch.no_grad():
        without_autocast = fb.block_tail(x, attn_out.float(), norm1, mlp.float(), norm2, backend="triton",
                                         merge_size=(H, W))
    assert without_autocast[1] is None and without_autocast[0].shape == (B, H * W, C)   # the merging gathers it
