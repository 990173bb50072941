"""The Swin V1 drop-in on a GPU: the compiled kernels (attention, bias gather, add + LayerNorm) in Swin-T/224
(window 7) and Swin-B/384 (window 12) shaped models against timm's SwinTransformer, the official file and the
official math, in float16, bfloat16 and float32; a broken kernel must fail; CUDA graphs replay what eager computes.

Skipped without CUDA (tests/test_swin_v1.py checks the same equivalences on the CPU, and the interpreted kernels in
a subprocess). Run: pytest tests/test_swin_v1_gpu.py tests/test_kernel.py"""
import os

import pytest
import torch

import flash_bias_triton as fb
from model_utils import images, rel_l2  # first: it puts scripts/ on the path
import swin_config
import swin_transformer as v1
from test_swin_v1 import OFFICIAL_FILE, make_model, official_model, timm_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CONFIGS = {name: dict(swin_config.SWIN_V1_CONFIGS[name], num_classes=1000)
           for name in ("swin_t_224", "swin_b_384")}
CONFIGS["tiny"] = swin_config.SWIN_V1_CONFIGS["test_v1_tiny"]
# the bound on the fused model's float16 logits against the official file under the same autocast
FP16_TARGET = 3e-3


def _logits(model, x, dtype):
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        return model(x).float()


class KernelLaunches:
    """Count launches of the compiled attention kernel (flash_bias_triton._launch) while in the block."""

    def __init__(self, monkeypatch):
        self.count = 0
        original = fb._launch

        def counting(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(fb, "_launch", counting)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fused_matches_timm_official_file_and_official_math(name, dtype, monkeypatch):
    config = CONFIGS[name]
    model = make_model(config).cuda()
    model.set_flash_bias(cuda_graphs=False)
    ref = timm_model(config, model.state_dict()).cuda()
    x = images(4, config["img_size"]).cuda()
    launches = KernelLaunches(monkeypatch)
    fused = _logits(model, x, dtype)
    assert launches.count == sum(config["depths"]), "the compiled kernel did not run in every block"
    model.set_flash_bias(fused=False)
    official, official32 = _logits(model, x, dtype), _logits(model, x, torch.float32)
    timm_out = _logits(ref, x, dtype)
    noise = max(rel_l2(official, official32), rel_l2(timm_out, official32), 1e-3)
    # the fused kernels at least as close to float32 as the official math in the same precision
    assert rel_l2(fused, official32) <= 1.5 * noise + 1e-3, (rel_l2(fused, official32), noise)
    assert rel_l2(fused, timm_out) <= 2 * noise + 1e-3
    if dtype == torch.float16:
        assert rel_l2(fused, official) <= FP16_TARGET, rel_l2(fused, official)
    if os.path.isfile(OFFICIAL_FILE):
        official_file = _logits(official_model(config, model.state_dict()).cuda(), x, dtype)
        assert rel_l2(fused, official_file) <= (FP16_TARGET if dtype == torch.float16 else 2 * noise + 1e-3)
    agreement = (fused.argmax(1) == official32.argmax(1)).float().mean().item()
    assert agreement >= (0.75 if dtype == torch.bfloat16 else 1.0), agreement


@pytest.mark.parametrize("name", ["tiny", "swin_b_384"])
@pytest.mark.parametrize("breakage", ["no bias", "no shift mask", "heads permuted"])
def test_broken_kernel_fails_on_gpu(name, breakage, monkeypatch):
    """The GPU comparison can fail: break the fused attention's inputs."""
    config = CONFIGS[name]
    model = make_model(config).cuda()
    model.set_flash_bias(fused=False)
    x = images(4, config["img_size"]).cuda()
    official = _logits(model, x, torch.float32)
    model.set_flash_bias(fused=True, cuda_graphs=False)
    original = v1.flash_bias_attention

    def broken(*args, **kwargs):
        if breakage == "no bias":
            kwargs["bias"] = None
        elif breakage == "heads permuted":
            kwargs["bias"] = kwargs["bias"].roll(1, dims=0)
        elif kwargs["region_ids"] is not None:
            kwargs["region_ids"] = torch.zeros_like(kwargs["region_ids"])
        return original(*args, **kwargs)
    monkeypatch.setattr(v1, "flash_bias_attention", broken)
    assert rel_l2(_logits(model, x, torch.float16), official) > 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_graph_replay_equals_eager(dtype):
    model = make_model(CONFIGS["tiny"]).cuda()
    x = images(4, 112).cuda()
    model.set_flash_bias(cuda_graphs=False)
    eager = _logits(model, x, dtype)
    model.set_flash_bias(cuda_graphs=True)
    outs = [_logits(model, x, dtype) for _ in range(4)]  # resolve, first sight, capture, replay
    assert len(model.flash_bias_settings.graphs.entries) == 1
    for out in outs:
        assert torch.equal(out, eager)
    other = make_model(CONFIGS["tiny"], seed=1).cuda()
    model.load_state_dict(other.state_dict())  # in place: the graph reads the new weights (the bias is derived in it)
    other.set_flash_bias(cuda_graphs=False)
    assert torch.equal(_logits(model, x, dtype), _logits(other, x, dtype))


def test_half_model_without_autocast():
    model = make_model(CONFIGS["tiny"]).cuda()
    model.set_flash_bias(fused=False)
    x = images(4, 112).cuda()
    official32 = _logits(model, x, torch.float32)
    model.set_flash_bias(fused=True)
    model.half()  # float16 weights and activations: the kernels read float16 directly
    out = _logits(model, x.half(), torch.float32)
    model.set_flash_bias(fused=False)
    official16 = _logits(model, x.half(), torch.float32)
    noise = max(rel_l2(official16, official32), 1e-3)
    assert rel_l2(out, official32) <= 1.5 * noise + 1e-3
