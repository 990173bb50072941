"""The drop-in on a GPU: the fused kernel path against timm's independent SwinV2 and the official math.

Runs where CUDA is present (skipped on CPU-only machines, where tests/test_model.py checks the same
equivalences through the PyTorch path and, in a subprocess, the interpreted kernel)."""
import pytest
import torch

import flash_bias_runtime as runtime
from model_utils import B384, TINY, TracedOps, images, make_model, make_timm_model, rel_l2, swin

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

def _logits(model, x, dtype):
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        return model(x).float()


@pytest.mark.parametrize("config,size", [(TINY, 64), (B384, 384)], ids=["tiny", "b384"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fused_matches_timm_and_official_math(config, size, dtype):
    model = make_model(config).cuda()
    ref = make_timm_model(config, model.state_dict()).cuda().eval()
    x = images(4, size).cuda()
    calls = []
    original = swin.flash_bias_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    swin.flash_bias_attention = counting
    try:
        fused = _logits(model, x, dtype)
    finally:
        swin.flash_bias_attention = original
    assert calls, "the fused path did not run"
    model.set_flash_bias(fused=False)
    official = _logits(model, x, dtype)
    official32 = _logits(model, x, torch.float32)
    timm_out = _logits(ref, x, dtype)
    err_official = rel_l2(fused, official32)
    # the fused kernel must be at least as close to float32 as the official math in the same precision
    noise = max(rel_l2(official, official32), rel_l2(timm_out, official32), 1e-3)
    assert err_official <= 1.5 * noise + 1e-3, (err_official, noise)
    assert torch.equal(fused.argmax(1), official32.argmax(1))
    assert rel_l2(fused, timm_out) <= 2 * noise + 1e-3


def test_broken_kernel_fails_on_gpu():
    """The GPU comparison can fail: drop the bias inside the fused path."""
    model = make_model(TINY).cuda()
    x = images(4, 64).cuda()
    model.set_flash_bias(fused=False)
    official = _logits(model, x, torch.float32)
    model.set_flash_bias(fused=True)
    original = swin.flash_bias_attention

    def no_bias(*args, **kwargs):
        kwargs.pop("bias", None)
        kwargs.pop("bias_factors", None)
        return original(*args, **kwargs)
    swin.flash_bias_attention = no_bias
    try:
        broken = _logits(model, x, torch.float16)
    finally:
        swin.flash_bias_attention = original
    assert rel_l2(broken, official) > 1e-2


def test_low_rank_rule_and_cache_on_gpu():
    model = make_model(TINY).cuda()
    x = images(4, 64).cuda()
    exact = _logits(model, x, torch.float16)
    model.set_flash_bias(rank_rule="logit:0.05")
    low = _logits(model, x, torch.float16)
    assert 0 < rel_l2(low, exact) < 5e-2
    model.set_flash_bias(rank_rule="exact")
    model.half()
    assert rel_l2(_logits(model, x.half(), torch.float32), exact) < 1e-2


# ------------------------------------------------------------------------------------------------
# CUDA graphs: replay equals eager bit for bit, follows new weights, several shapes
# ------------------------------------------------------------------------------------------------
def _eager_reference(model, x, dtype):
    model.set_flash_bias(cuda_graphs=False)
    out = _logits(model, x, dtype)
    model.set_flash_bias(cuda_graphs=True)
    return out


@pytest.mark.parametrize("switch", [None, "READ_INPUT_IN_PLACE", "REFRESH_BESIDE"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_graph_replay_equals_eager(dtype, switch, monkeypatch):
    """A replay gives eager's bits, also with the switches that are off by default: reading its input where it lies
    (runtime.READ_INPUT_IN_PLACE: under half-precision autocast, where the patch-embedding kernel reads it) and the
    later stages' weight copies refreshed on a second stream (REFRESH_BESIDE); and never overwrites an earlier
    result."""
    in_place = switch == "READ_INPUT_IN_PLACE"
    if switch is not None:
        monkeypatch.setattr(runtime, switch, True)
    model = make_model(TINY).cuda()
    x, y = images(4, 64).cuda(), images(4, 64, seed=9).cuda()
    eager, eager_y = _eager_reference(model, x, dtype), _eager_reference(model, y, dtype)
    outs = [_logits(model, x, dtype) for _ in range(4)]  # resolve, first sight, capture, replay
    graphs = model.flash_bias_settings.graphs
    assert len(graphs.entries) == 1
    (graph,) = graphs.entries.values()
    assert graph.in_place == (in_place and dtype == torch.float16)
    for out in outs:
        assert torch.equal(out, eager)
    kept = outs[-1].clone()
    assert torch.equal(_logits(model, y, dtype), eager_y)
    assert torch.equal(outs[-1], kept)  # a replay never overwrites a result the caller holds
    assert torch.isnan(graph.graph_input.tensor).all() == graph.in_place   # in place: nothing copied in


def test_cuda_graph_follows_new_weights():
    model, other = make_model(TINY, seed=0).cuda(), make_model(TINY, seed=1).cuda()
    x = images(4, 64).cuda()
    for _ in range(3):
        _logits(model, x, torch.float16)
    graphs = model.flash_bias_settings.graphs
    (entry,) = graphs.entries.values()
    model.load_state_dict(other.state_dict())  # in place, after the capture
    assert torch.equal(_logits(model, x, torch.float16), _eager_reference(other, x, torch.float16))
    assert list(graphs.entries.values()) == [entry]  # same storage: the same graph, reading the new weights
    for p in model.parameters():
        p.data.mul_(1.0001)  # through .data: no version counter
    assert torch.equal(_logits(model, x, torch.float16), _eager_reference(model, x, torch.float16))
    model.half()  # new storage: the graphs are dropped, and the output follows
    for _ in range(3):
        out = _logits(model, x.half(), torch.float32)
    assert torch.equal(out, _eager_reference(model, x.half(), torch.float32))


@pytest.mark.parametrize("beside", [False, True], ids=["refreshed first", "refreshed beside"])
def test_eager_forward_on_the_weight_copies_equals_autocast(beside, monkeypatch):
    """Graphs off: after the first forward, the fused eager forward reads the half-precision weight copies, with the
    same bits as autocast's own casts, and follows new weights; also with the later stages' copies refreshed on a
    second stream (REFRESH_BESIDE)."""
    monkeypatch.setattr(runtime, "REFRESH_BESIDE", beside)
    model, other = make_model(TINY, seed=0).cuda(), make_model(TINY, seed=1).cuda()
    x = images(4, 64).cuda()
    expected = _eager_reference(model, x, torch.float16)   # the first forward of new settings: plain autocast
    model.set_flash_bias(cuda_graphs=False)
    outs = [_logits(model, x, torch.float16) for _ in range(3)]
    graphs = model.flash_bias_settings.graphs
    assert not graphs.entries and torch.float16 in graphs.weight_copies
    assert all(torch.equal(out, expected) for out in outs)
    model.load_state_dict(other.state_dict())
    assert torch.equal(_logits(model, x, torch.float16), _eager_reference(other, x, torch.float16))


def test_cuda_graph_shapes_alternate_and_partial_batch():
    model = make_model(TINY).cuda()
    batches = [images(n, 64, seed=n).cuda() for n in (4, 2)]
    last = images(3, 64, seed=3).cuda()  # an eval loop's partial last batch: seen once, run eagerly
    expected = [_eager_reference(model, x, torch.float16) for x in batches + [last]]
    for _ in range(4):
        for x, e in zip(batches, expected):
            assert torch.equal(_logits(model, x, torch.float16), e)
    assert len(model.flash_bias_settings.graphs.entries) == 2
    assert torch.equal(_logits(model, last, torch.float16), expected[-1])
    assert len(model.flash_bias_settings.graphs.entries) == 2


def test_no_graphs_for_training_gradients_or_low_rank():
    model = make_model(TINY).cuda()
    x = images(2, 64).cuda()
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.float16):
            model(x)  # eval, but parameters need gradients and grad mode is on: official math, no graph
    model.set_flash_bias(rank_rule="rank:4")
    for _ in range(3):
        _logits(model, x, torch.float16)
    assert not model.flash_bias_settings.graphs.entries


def test_torch_compile_keeps_the_fused_kernels():
    """Under torch.compile with the drop-in's CUDA graphs off, the graph holds FlashBias's custom ops, not the
    PyTorch attention (whose batched matmuls would make the compiled model slower than eager)."""
    model = make_model(TINY).cuda()
    model.requires_grad_(False)
    model.set_flash_bias(cuda_graphs=False)
    x = images(4, 64).cuda()
    traced = TracedOps()
    eager = _logits(model, x, torch.float16)
    compiled = torch.compile(model, backend=traced)
    out = _logits(compiled, x, torch.float16)
    targets = traced.targets()
    assert any("flash_bias.window_attention" in t for t in targets), sorted(targets)
    assert not any("bmm" in t or "matmul" in t for t in targets), sorted(targets)
    assert rel_l2(out, eager) < 1e-3


def test_torch_compile_replays_the_drop_in_graphs():
    """With the CUDA graphs on (the default), a compiled model's no-grad inference replays them beside the compiler:
    nothing of it traced, the eager graph's bits, one capture; a model compiled before its first forward resolves
    its settings in that replay. In training mode Dynamo traces the forward."""
    model = make_model(TINY).cuda()
    x = images(4, 64).cuda()
    traced = TracedOps()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=traced)
    outs = [_logits(compiled, x, torch.float16) for _ in range(4)]
    assert model.flash_bias_settings.resolved and len(model.flash_bias_settings.graphs.entries) == 1
    assert not traced.targets(), traced.graphs
    eager = _logits(model, x, torch.float16)
    assert all(torch.equal(out, eager) for out in outs)
    model.train()
    with torch.autocast("cuda", dtype=torch.float16):
        compiled(x)
    assert traced.targets()
    torch._dynamo.reset()


def _loss_and_grads(model, x, y, dtype):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_training_runs_the_backward_kernel_with_the_official_gradients(monkeypatch, dtype, use_checkpoint):
    """Training on the fused kernel: every parameter's gradient (cpb_mlp and logit_scale included) within
    autocast noise of the official math's, from the same weights and batch (drop path 0: deterministic)."""
    import flash_bias_triton as fb
    model = make_model(TINY, use_checkpoint=use_checkpoint).cuda().train()
    x, y = images(4, 64).cuda(), torch.arange(4).cuda()
    model.set_flash_bias(fused=False)
    _, exact = _loss_and_grads(model, x, y, torch.float32)
    loss_official, official = _loss_and_grads(model, x, y, dtype)
    model.set_flash_bias(fused=True)
    launches = []
    original = fb._launch_backward
    monkeypatch.setattr(fb, "_launch_backward", lambda *a, **k: launches.append(1) or original(*a, **k))
    loss_fused, fused = _loss_and_grads(model, x, y, dtype)
    assert len(launches) == sum(TINY["depths"]), "the backward kernel did not run in every block"
    assert abs(loss_fused - loss_official) < 2e-2 * abs(loss_official)
    assert official.keys() == fused.keys()
    # autocast noise: each gradient as close to the float32 official math's as twice the official math's own in the
    # same dtype (plus a floor for gradients the official math happens to get right to rounding)
    floor = 1e-2 if dtype == torch.float16 else 5e-2
    errors = {n: (rel_l2(fused[n], g), rel_l2(official[n], g)) for n, g in exact.items() if g.norm() > 0}
    worse = {n: e for n, e in errors.items() if e[0] > 2 * e[1] + floor}
    assert not worse, sorted(worse.items(), key=lambda kv: -kv[1][0])[:5]
    assert any("cpb_mlp" in n for n in errors) and any("logit_scale" in n for n in errors)


def test_training_with_attention_dropout_takes_the_official_math():
    model = make_model(TINY, attn_drop_rate=0.1).cuda().train()
    assert not model.layers[0].blocks[0].attn.use_fused_attn(images(1, 64).cuda())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mlp_gelu_epilogue_within_the_official_precision(dtype):
    """fc1's GELU epilogue (tanh approximation) is as close to float32 erf GELU as the official Mlp under autocast,
    at a SwinV2-B/384 stage-1 shape; a missing GELU fails the same check."""
    import flash_bias_triton as fb
    torch.manual_seed(0)
    mlp = swin.Mlp(128, 512).cuda().eval()
    x = torch.randn(64 * 48, 128, device="cuda")
    with torch.no_grad():
        reference = mlp(x)   # float32, erf GELU
        with torch.autocast("cuda", dtype=dtype):
            official, fused = mlp(x).float(), fb.mlp_forward(mlp, x).float()
            original = torch._addmm_activation
            torch._addmm_activation = lambda *a, **k: original(*a, **dict(k, use_gelu=False))
            try:
                broken = fb.mlp_forward(mlp, x).float()
            finally:
                torch._addmm_activation = original
    noise = rel_l2(official, reference)
    assert rel_l2(fused, reference) <= 1.5 * noise, (rel_l2(fused, reference), noise)
    assert rel_l2(broken, reference) > 10 * noise


def test_model_runs_the_fused_tail_and_the_gelu_epilogue(monkeypatch):
    """Blocks of C <= BLOCK_TAIL_MAX_C run their tail as one kernel; wider blocks hand the MLP (GELU epilogue) their
    half-precision input."""
    import flash_bias_triton as fb
    tails, mlps = [], []
    launch, mlp_forward = fb._block_tail_launch, fb.mlp_forward
    monkeypatch.setattr(fb, "_block_tail_launch", lambda x, *a, **k: tails.append(x.shape[-1]) or launch(x, *a, **k))
    monkeypatch.setattr(fb, "mlp_forward", lambda mlp, x: mlps.append((x.shape[-1], x.dtype)) or mlp_forward(mlp, x))
    model = make_model(TINY).cuda()
    widths = sorted({blk.dim for stage in model.layers for blk in stage.blocks})
    monkeypatch.setattr(fb, "BLOCK_TAIL_MAX_C", widths[0])
    monkeypatch.setattr(fb, "BLOCK_TAIL_WIDE_ROWS", 0)
    _logits(model, images(2, 64).cuda(), torch.float16)
    assert tails and set(tails) == {widths[0]}
    assert {c for c, _ in mlps} == set(widths[1:]) and {d for _, d in mlps} == {torch.float16}, \
        "the blocks did not hand the MLP its half-precision input"
