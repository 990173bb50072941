"""The drop-in on a GPU: the fused kernel path against timm's independent SwinV2 and the official math.

Runs where CUDA is present (skipped on CPU-only machines, where tests/test_model.py checks the same
equivalences through the PyTorch path and, in a subprocess, the interpreted kernel)."""
import pytest
import torch

from model_utils import TINY, images, make_model, make_timm_model, rel_l2, swin

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# SwinV2-B/384-shaped: window 24 at 384 (stage 4 runs one 12x12 window), pretrained windows 12-12-12-6
B384 = dict(img_size=384, window_size=24, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32],
            pretrained_window_sizes=[12, 12, 12, 6], num_classes=1000)


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
