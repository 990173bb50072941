"""The Swin V1 drop-in swin_transformer.py: equivalence with the official file (imported standalone from
third_party/Swin-Transformer when present), with timm's SwinTransformer and with its own official path; the
fused / official switch; state-dict compatibility; the diff against the official file; the real Triton kernels
through the interpreter. CPU only (the fused path runs the PyTorch references there); tests/test_swin_v1_gpu.py
runs the compiled kernels."""
import difflib
import functools
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from model_utils import ROOT, assert_no_graph_replay_without_cuda, images, rel_l2
import flash_bias_factors as fbf
import flash_bias_runtime as runtime
import flash_bias_triton as fb
import swin_config
import swin_transformer as v1

TINY = swin_config.SWIN_V1_CONFIGS["test_v1_tiny"]    # 112 px, window 7: shifted 7x7 windows, then one window
MINI = swin_config.SWIN_V1_CONFIGS["test_v1_mini"]    # 32 px, window 4: for the Triton interpreter
OFFICIAL_FILE = os.path.join(ROOT, "third_party", "Swin-Transformer", "models", "swin_transformer.py")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for name in ("FLASHBIAS_RANK", "FLASHBIAS_FACTORS_DIR", "FLASHBIAS_CUDA_GRAPHS", "FLASHBIAS_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def make_model(config=TINY, seed=0, module=v1, **overrides):
    """A V1 model of ``module`` (the drop-in, or the official file) with trained-like weights, eval mode."""
    kwargs = dict(config, drop_path_rate=0.0, **overrides)
    torch.manual_seed(seed)
    return swin_config.trained_like_(module.SwinTransformer(**kwargs), seed).eval()


@functools.lru_cache(maxsize=None)
def _official_module():
    spec = importlib.util.spec_from_file_location("official_swin_transformer_v1", OFFICIAL_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def official_module():
    """The official models/swin_transformer.py imported standalone, or a skip saying why not."""
    if not os.path.isfile(OFFICIAL_FILE):
        pytest.skip(f"the official file is absent ({OFFICIAL_FILE}: third_party/Swin-Transformer is a git-ignored "
                    f"checkout of microsoft/Swin-Transformer)")
    return _official_module()


def official_model(config, state_dict):
    model = official_module().SwinTransformer(**dict(config, drop_path_rate=0.0)).eval()
    model.load_state_dict(state_dict, strict=True)
    return model


def timm_model(config, state_dict):
    """timm's independent SwinTransformer (V1) with these weights, through its checkpoint_filter_fn."""
    from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn
    model = SwinTransformer(img_size=config["img_size"], embed_dim=config["embed_dim"], depths=tuple(config["depths"]),
                            num_heads=tuple(config["num_heads"]), window_size=config["window_size"],
                            num_classes=config["num_classes"], drop_path_rate=0.0)
    model.load_state_dict(checkpoint_filter_fn(dict(state_dict), model), strict=True)
    return model.eval()


class CountCalls:
    """Wrap the drop-in's flash_bias_attention, counting calls (optionally changing its inputs)."""

    def __init__(self, monkeypatch, change=None, name="flash_bias_attention"):
        self.calls = 0
        original = getattr(v1, name)

        def wrapped(*args, **kwargs):
            self.calls += 1
            if change is not None:
                args, kwargs = change(args, kwargs)
            return original(*args, **kwargs)

        monkeypatch.setattr(v1, name, wrapped)


def references(model, config):
    """{name: model} of the independent implementations with the drop-in's weights."""
    refs = {"timm": timm_model(config, model.state_dict())}
    if os.path.isfile(OFFICIAL_FILE):
        refs["official file"] = official_model(config, model.state_dict())
    return refs


# ------------------------------------------------------------------------------------------------
# equivalence: the official file, timm, the drop-in's own official path
# ------------------------------------------------------------------------------------------------
def test_equivalence_eval_fp32(monkeypatch):
    model = make_model()
    refs = references(model, TINY)
    x = images(2, 112)
    counter = CountCalls(monkeypatch)
    with torch.no_grad():
        out = model(x)
        assert counter.calls == sum(TINY["depths"])  # every block took the fused path
        model.set_flash_bias(fused=False)
        own_official = model(x)
        assert counter.calls == sum(TINY["depths"])
        outputs = {name: ref(x) for name, ref in refs.items()}
    outputs["drop-in official path"] = own_official
    for name, expected in outputs.items():
        assert rel_l2(out, expected) < 1e-5, name
        assert torch.equal(out.argmax(1), expected.argmax(1)), name


def test_the_official_file_takes_part():
    """The equivalence tests compare with the official file when it is there: say so when it is not."""
    assert hasattr(official_module(), "SwinTransformer")


def test_train_mode_takes_the_official_math(monkeypatch):
    model = make_model().train()
    refs = {name: ref.train() for name, ref in references(model, TINY).items()}
    x = images(1, 112)
    counter = CountCalls(monkeypatch)
    out = model(x)
    assert counter.calls == 0
    out.square().mean().backward()
    table = model.layers[0].blocks[1].attn.relative_position_bias_table
    for name, ref in refs.items():
        expected = ref(x)
        assert rel_l2(out, expected) < 1e-5, name
        expected.square().mean().backward()
        ref_table = ref.layers[0].blocks[1].attn.relative_position_bias_table  # timm's names are the official ones
        assert rel_l2(table.grad, ref_table.grad) < 1e-4, name


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_equivalence_autocast_bf16(mode):
    model = make_model()
    refs = references(model, TINY)
    model.train(mode == "train")
    x = images(2, 112)
    with torch.no_grad():
        exact = refs["timm"](x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            expected = {name: ref.train(mode == "train")(x) for name, ref in refs.items()}
    assert out.dtype == torch.bfloat16
    for name, ref_out in expected.items():
        assert rel_l2(out, ref_out) < 0.02, name  # measured 0 (eval: the same PyTorch ops on the CPU)
    assert rel_l2(out, exact) < 0.02  # measured 5e-3
    assert (out.argmax(1) == exact.argmax(1)).float().mean() >= 0.5


def _zero_bias(args, kwargs):
    return args, dict(kwargs, bias=torch.zeros_like(kwargs["bias"]))


def _permute_heads(args, kwargs):
    return args, dict(kwargs, bias=kwargs["bias"].roll(1, dims=0))


def _drop_shift_mask(args, kwargs):
    region_ids = kwargs.get("region_ids")
    return args, dict(kwargs, region_ids=None if region_ids is None else torch.zeros_like(region_ids))


def _unscaled(args, kwargs):
    return args, dict(kwargs, scale=1.0)


@pytest.mark.parametrize("breakage", [_zero_bias, _permute_heads, _drop_shift_mask, _unscaled])
def test_broken_attention_fails_the_equivalence_check(breakage, monkeypatch):
    model = make_model()
    ref = timm_model(TINY, model.state_dict())
    counter = CountCalls(monkeypatch, change=breakage)
    x = images(2, 112)
    with torch.no_grad():
        out, expected = model(x), ref(x)
    assert counter.calls > 0
    assert rel_l2(out, expected) > 1e-2  # the check of the equivalence tests would catch it


def test_window_attention_direct_call_window_layout():
    model = make_model()
    blk = model.layers[0].blocks[1]
    assert blk.shift_size > 0
    x = torch.randn(2 * blk.attn_mask.shape[0], blk.window_size ** 2, blk.dim)
    with torch.no_grad():
        official = blk.attn(x, mask=blk.attn_mask)  # a mask tensor: official math
        fused = blk.attn.forward_fused(x, region_ids=blk.region_ids)  # window layout, fused
        unshifted = model.layers[0].blocks[0].attn
        plain = unshifted(x)  # no mask: fused
        unshifted.fused_attn = False
        assert rel_l2(plain, unshifted(x)) < 1e-6
    assert rel_l2(fused, official) < 1e-6


def test_custom_qk_scale_reaches_the_kernel(monkeypatch):
    model = make_model(qk_scale=0.05)
    ref = timm_model(TINY, model.state_dict())
    seen = []
    CountCalls(monkeypatch, change=lambda a, k: (seen.append(k["scale"]), (a, k))[1])
    x = images(2, 112)
    with torch.no_grad():
        out = model(x)
        model.set_flash_bias(fused=False)
        assert rel_l2(out, model(x)) < 1e-5
        assert rel_l2(out, ref(x)) > 1e-2  # timm uses head_dim ** -0.5: the scale matters here
    assert seen and all(s == 0.05 for s in seen)


# ------------------------------------------------------------------------------------------------
# the fused block chain: where the add + LayerNorm fusion starts and ends
# ------------------------------------------------------------------------------------------------
def test_fused_blocks_chain_add_and_norm(monkeypatch):
    model = make_model()
    adds = CountCalls(monkeypatch, name="add_layer_norm")
    norm1_calls = []
    for i, layer in enumerate(model.layers):
        for j, blk in enumerate(layer.blocks):
            blk.norm1.register_forward_hook(lambda *a, where=(i, j): norm1_calls.append(where))
    with torch.no_grad():
        model(images(1, 112))
    # per stage of depth d: d adds fused with norm2, d - 1 with the next block's norm1; the last add runs alone
    assert adds.calls == sum(2 * d - 1 for d in TINY["depths"])
    assert norm1_calls == [(i, 0) for i in range(len(TINY["depths"]))]  # only each stage's first norm1 runs alone


def test_fused_path_does_not_partition_or_roll(monkeypatch):
    model = make_model(MINI)
    seen = []

    def kernel_stub(qkv, num_heads, **kwargs):  # stands for the kernel: image layout in, out
        seen.append((tuple(qkv.shape), kwargs["image_size"], kwargs["window_size"], kwargs["shift_size"],
                     None if kwargs["region_ids"] is None else tuple(kwargs["region_ids"].shape), kwargs["scale"]))
        return qkv[..., :qkv.shape[-1] // 3]

    monkeypatch.setattr(v1, "flash_bias_attention", kernel_stub)
    for fn in ("window_partition", "window_reverse"):
        monkeypatch.setattr(v1, fn, lambda *a, **k: pytest.fail("official partition used on the fused path"))
    monkeypatch.setattr(torch, "roll", lambda *a, **k: pytest.fail("torch.roll used on the fused path"))
    with torch.no_grad():
        model(images(2, 32))
    assert seen[0] == ((2, 64, 96), (8, 8), (4, 4), 0, None, 32 ** -0.5)
    assert seen[1] == ((2, 64, 96), (8, 8), (4, 4), 2, (4, 16), 32 ** -0.5)
    assert seen[2][1:4] == ((4, 4), (4, 4), 0)  # window clipped to the resolution: no shift


class FakeWindowProcess:
    """Stands for the official CUDA extension kernels.window_process: roll + partition, reverse + roll."""
    calls = 0

    @classmethod
    def apply(cls, x, B, H, W, C, shift, window_size):
        cls.calls += 1
        if shift < 0:
            return v1.window_partition(torch.roll(x, shifts=(shift, shift), dims=(1, 2)), window_size)
        return torch.roll(v1.window_reverse(x, window_size, H, W), shifts=(shift, shift), dims=(1, 2))


def test_fused_window_process_is_ignored_on_the_fused_path(monkeypatch):
    """fused_window_process (the official CUDA extension, absent here) is accepted; the fused path never uses it,
    the official path still does."""
    model = make_model(fused_window_process=True)
    plain = make_model()
    x = images(2, 112)
    monkeypatch.setattr(v1, "WindowProcess", FakeWindowProcess)
    monkeypatch.setattr(v1, "WindowProcessReverse", FakeWindowProcess)
    monkeypatch.setattr(FakeWindowProcess, "calls", 0)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
        assert FakeWindowProcess.calls == 0
        model.set_flash_bias(fused=False)
        official = model(x)
    assert FakeWindowProcess.calls > 0
    assert rel_l2(official, plain(x)) < 1e-5


def test_switch_rule(monkeypatch):
    model = make_model(MINI)
    blocks = sum(MINI["depths"])
    x = images(2, 32)
    counter = CountCalls(monkeypatch)
    model(x)  # eval, grad enabled, parameters require grad: official math
    assert counter.calls == 0
    model.requires_grad_(False)
    model(x)  # frozen model: nothing needs gradients
    assert counter.calls == blocks
    model(x.requires_grad_())  # the input needs gradients: official math
    assert counter.calls == blocks
    model.requires_grad_(True).train()
    with torch.no_grad():
        model(x)  # training mode: official math
        assert counter.calls == blocks
        model.eval().set_flash_bias(fused=False)
        model(x)
        assert counter.calls == blocks
        model.set_flash_bias(fused=True)
        model(x)
    assert counter.calls == 2 * blocks


def test_weights_loaded_after_first_forward_are_picked_up():
    a, b = make_model(MINI, seed=0), make_model(MINI, seed=1)
    x = images(2, 32)
    with torch.no_grad():
        out_a, out_b = a(x), b(x)
        assert rel_l2(out_a, out_b) > 1e-2
        a.load_state_dict(b.state_dict())  # in place, after the first forward: the bias is derived every time
        assert torch.allclose(a(x), out_b, rtol=1e-5, atol=1e-6)
        for p in a.parameters():
            p.data.mul_(1.01)  # through .data: no version counter
        a.set_flash_bias(fused=False)
        official = a(x)
        a.set_flash_bias(fused=True)
        assert rel_l2(a(x), official) < 1e-6


# ------------------------------------------------------------------------------------------------
# the bias: exact, rank rules and factor files, as in the V2 drop-in (flash_bias_runtime)
# ------------------------------------------------------------------------------------------------
def official_bias(attn):
    """(H, N, N) float64: the official forward's relative_position_bias_table[relative_position_index] (no MLP, no
    16 * sigmoid), written out independently of derive_bias."""
    table = attn.relative_position_bias_table.detach().double()
    tokens = attn.window_size[0] * attn.window_size[1]
    return table[attn.relative_position_index.view(-1)].view(tokens, tokens, -1).permute(2, 0, 1)


def test_bias_weights_are_the_state_dict_names_of_the_v1_bias():
    attn = make_model(MINI).layers[0].blocks[0].attn
    weights = attn.bias_weights()
    assert tuple(weights) == fbf.BIAS_WEIGHTS["Swin V1"]
    state = attn.state_dict(keep_vars=True)
    assert all(weights[name] is state[name] for name in weights)
    assert torch.equal(attn.derive_bias().double(), official_bias(attn))


def test_rank_rules(monkeypatch, caplog):
    """A rank rule gives every layer SVD factors of its table's bias; the kernel gets them instead of the bias."""
    model = make_model(MINI)
    x = images(2, 32)
    seen = []
    CountCalls(monkeypatch, change=lambda a, k: (seen.append(sorted(set(k) & {"bias", "bias_factors"})), (a, k))[1])
    caplog.set_level(logging.INFO, logger="flash_bias")
    with torch.no_grad():
        exact = model(x)
        assert seen == [["bias"]] * 4
        for rule, rank in (("rank:3", 3), ("logit:0.05", None), ("energy:0.9", None)):
            model.set_flash_bias(rank_rule=rule)
            low_rank = model(x)
            assert seen[-4:] == [["bias_factors"]] * 4, rule
            for (_, attn), summary in zip(runtime.window_attention_layers(model), runtime.flash_bias_summary(model)):
                q_bias, k_bias = attn.flash_bias.factors
                error = fbf.logit_error(official_bias(attn), q_bias.double() @ k_bias.double().transpose(1, 2))[0]
                assert summary["mode"] == "low-rank" and summary["source"] == f"rank rule {rule}"
                assert summary["max_logit_error"] == pytest.approx(error, rel=1e-4, abs=1e-6)
                assert rank is None or summary["rank"] == rank
                if rule.startswith("logit"):
                    assert error <= 0.05
            assert 0 < rel_l2(low_rank, exact) < (0.05 if rule.startswith("logit") else 0.5), rule
    messages = [r.getMessage() for r in caplog.records if r.name == "flash_bias"]
    assert messages[0] == "FlashBias: exact bias in all 4 attention layers"
    assert re.match(r"FlashBias: low-rank bias factors from rank rule rank:3 in 4 of 4 attention layers \(rank 3-3\)",
                    messages[1]), messages[1]


def test_rank_rule_from_the_environment_and_new_weights(monkeypatch):
    a, b = make_model(MINI, seed=0), make_model(MINI, seed=1)
    x = images(2, 32)
    monkeypatch.setenv("FLASHBIAS_RANK", "rank:16")  # full rank (N = 16): the exact bias up to rounding
    with torch.no_grad():
        expected_b = b(x)
        a(x)
        assert all(s["mode"] == "low-rank" for s in runtime.flash_bias_summary(a))
        a.load_state_dict(b.state_dict())  # new tables after the first forward: the factors are made again
        assert rel_l2(a(x), expected_b) < 1e-5
        monkeypatch.setenv("FLASHBIAS_RANK", "bad")
        with pytest.raises(ValueError, match="bad rank rule 'bad'"):
            a.set_flash_bias()  # the environment is read at the first fused forward of the new settings
            a(x)
    with pytest.raises(ValueError, match="bad rank rule 'rank:0'"):
        a.set_flash_bias(rank_rule="rank:0")


def _v1_factors(model, rank=3):
    return {i: fbf.low_rank_bias_factors(attn.derive_bias(), rank=rank)[:2]
            for i, (_, attn) in enumerate(runtime.window_attention_layers(model))}


def test_factor_files(tmp_path, monkeypatch):
    a = make_model(MINI)
    x = images(2, 32)
    path = runtime.save_bias_factors(tmp_path / "decomposed_bias", a, _v1_factors(a))
    with np.load(path) as z:
        assert str(z["layer0_bias_weights"]) == "relative_position_bias_table,relative_position_index"
        assert str(z["layer0_checksum"]) == runtime.bias_checksum(a.layers[0].blocks[0].attn)
    with torch.no_grad():
        a.set_flash_bias(rank_rule="rank:3", factors_path=False)
        by_rule = a(x)
        a.set_flash_bias(factors_path=tmp_path / "decomposed_bias")
        assert torch.allclose(a(x), by_rule, atol=1e-6)  # the same SVD, from the file
        assert {s["source"] for s in runtime.flash_bias_summary(a)} == {path}
        monkeypatch.setenv("FLASHBIAS_FACTORS_DIR", str(tmp_path / "decomposed_bias"))
        a.set_flash_bias()
        assert torch.allclose(a(x), by_rule, atol=1e-6)
        monkeypatch.delenv("FLASHBIAS_FACTORS_DIR")
        monkeypatch.chdir(tmp_path)  # ./decomposed_bias of the working directory
        a.set_flash_bias()
        assert torch.allclose(a(x), by_rule, atol=1e-6)
        other = make_model(MINI, seed=1)  # the factors of other weights: refused, naming the layer
        with pytest.raises(ValueError, match=r"layer layers\.0\.blocks\.0\.attn: the bias factors from .* were "
                                             r"computed for other weights"):
            other(x)


def _same_shaped_pair():
    """A SwinV2 and a Swin V1 model whose attention layers have the same names, heads and windows."""
    v2 = swin_config.trained_like_(swin_config.import_dropin().SwinTransformerV2(
        **dict(swin_config.model_kwargs(swin_config.load_config(embedded="test_mini")), drop_path_rate=0.0)), 0)
    return v2.eval(), make_model(MINI, num_heads=[2, 2])


def test_factor_files_of_the_other_model_family_are_refused(tmp_path):
    v2, v1_model = _same_shaped_pair()
    assert [(n, a.num_heads, a.window_size) for n, a in runtime.window_attention_layers(v2)] == \
           [(n, a.num_heads, a.window_size) for n, a in runtime.window_attention_layers(v1_model)]
    runtime.save_bias_factors(tmp_path / "v1", v1_model, _v1_factors(v1_model))
    runtime.save_bias_factors(tmp_path / "v2", v2, _v1_factors(v2))
    with pytest.raises(fbf.FactorFileError, match=r"v1/bias_factors\.npz: layer 0 \(layers\.0\.blocks\.0\.attn\): the "
                                                  r"factors are of a Swin V1 bias \(from relative_position_bias_table, "
                                                  r"relative_position_index\), this layer's bias is a SwinV2 bias"):
        runtime.load_bias_factors(v2, tmp_path / "v1")
    with pytest.raises(fbf.FactorFileError, match=r"layer 0 \(layers\.0\.blocks\.0\.attn\): the factors are of a "
                                                  r"SwinV2 bias \(from cpb_mlp\.0\.weight, .*this layer's bias is a "
                                                  r"Swin V1 bias"):
        runtime.load_bias_factors(v1_model, tmp_path / "v2")
    # a file written before the names were recorded (only the SwinV2 drop-in wrote them) is SwinV2's
    with np.load(tmp_path / "v2" / "bias_factors.npz") as z:
        old = {k: z[k] for k in z.files if not k.endswith("_bias_weights")}
    np.savez(tmp_path / "old.npz", **old)
    assert sorted(runtime.load_bias_factors(v2, tmp_path / "old.npz")) == [0, 1, 2, 3]
    with pytest.raises(fbf.FactorFileError, match=r"old\.npz: layer 0 .*the factors are of a SwinV2 bias"):
        runtime.load_bias_factors(v1_model, tmp_path / "old.npz")
    # the published code's naming says swin_v2: SwinV2 factors only, written and read
    records = [fbf.LayerFactors(i, n, "x", q, k, bias_weights=tuple(a.bias_weights()))
               for (i, (q, k)), (n, a) in zip(_v1_factors(v1_model).items(), runtime.window_attention_layers(v1_model))]
    with pytest.raises(ValueError, match=r"published FlashBias code's naming \(swin_v2_\*\) holds SwinV2 factors; "
                                         r"layer 0 \(layers\.0\.blocks\.0\.attn\) is a Swin V1 bias"):
        fbf.write_published_factors(str(tmp_path / "published"), "B", records)
    fbf.write_published_factors(str(tmp_path / "published"), "B", [
        fbf.LayerFactors(r.index, r.name, None, r.q_bias, r.k_bias, bias_weights=fbf.BIAS_WEIGHTS["SwinV2"])
        for r in records])
    with pytest.raises(fbf.FactorFileError, match=r"published: layer 0 .*SwinV2 bias .*Swin V1 bias"):
        runtime.load_bias_factors(v1_model, tmp_path / "published")


def test_cuda_graphs_need_cuda():
    model = make_model(MINI)
    assert_no_graph_replay_without_cuda(model, images(2, 32))
    assert model.flash_bias_settings.resolved and model.flash_bias_settings.cuda_graphs


def test_cuda_graph_cache_with_a_fake_capture():
    """The drop-ins' ForwardGraphs drives a V1 model too (capture on second sight, then replay)."""
    model = make_model(MINI)
    captures = []

    def fake_capture(fn, pool):
        captures.append(1)
        output = fn()
        return (lambda: output.copy_(fn())), output, pool

    graphs = model.flash_bias_settings.graphs = runtime.ForwardGraphs(capture=fake_capture)
    x = images(2, 32)
    with torch.no_grad():
        expected = model(x)
        assert graphs.run(model, x) is None and not captures
        assert torch.equal(graphs.run(model, x), expected) and len(captures) == 1


# ------------------------------------------------------------------------------------------------
# the state dict and the diff against the official file
# ------------------------------------------------------------------------------------------------
def test_state_dict_has_the_official_keys_only():
    model = make_model()
    sd = model.state_dict()
    expected = {name for name, _ in model.named_parameters()}
    for i, layer in enumerate(model.layers):
        for j, blk in enumerate(layer.blocks):
            expected.add(f"layers.{i}.blocks.{j}.attn.relative_position_index")
            if blk.shift_size > 0:
                expected.add(f"layers.{i}.blocks.{j}.attn_mask")
                assert torch.equal(fb.region_mask(blk.region_ids), blk.attn_mask)  # the regions are the mask's
            else:
                assert blk.attn_mask is None and blk.region_ids is None
    assert set(sd) == expected
    with torch.no_grad():
        model(images(1, 112))
    assert set(model.state_dict()) == expected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_strict_state_dict_roundtrip_with_the_official_file(dtype):
    official = official_module().SwinTransformer(**dict(TINY, drop_path_rate=0.0)).to(dtype).eval()
    swin_config.trained_like_(official, 3)
    dropin = v1.SwinTransformer(**dict(TINY, drop_path_rate=0.0)).to(dtype).eval()
    loaded = dropin.load_state_dict(official.state_dict(), strict=True)  # official -> drop-in
    assert not loaded.missing_keys and not loaded.unexpected_keys
    back = official_module().SwinTransformer(**dict(TINY, drop_path_rate=0.0)).to(dtype).eval()
    back.load_state_dict(dropin.state_dict(), strict=True)  # drop-in -> official
    for key, value in official.state_dict().items():
        assert back.state_dict()[key].dtype == value.dtype and torch.equal(back.state_dict()[key], value), key
    x = images(2, 112).to(dtype)
    with torch.no_grad():
        out, expected = dropin(x), official(x)
    assert out.dtype == dtype
    assert rel_l2(out, expected) < (1e-5 if dtype == torch.float32 else 0.05)


def test_diff_against_the_official_file_is_marked_additions_only():
    """Every official line is kept, in order; each added stretch belongs to a FlashBias addition."""
    if not os.path.isfile(OFFICIAL_FILE):
        pytest.skip(f"the official file is absent ({OFFICIAL_FILE})")
    official = open(OFFICIAL_FILE).read().splitlines()
    dropin = open(os.path.join(ROOT, "swin_transformer.py")).read().splitlines()
    opcodes = difflib.SequenceMatcher(None, official, dropin, autojunk=False).get_opcodes()
    assert [op for op in opcodes if op[0] not in ("equal", "insert")] == []
    inserted = [dropin[j1:j2] for op, _, _, j1, j2 in opcodes if op == "insert"]
    for block in inserted:
        text = "\n".join(block)
        # a stretch is marked, or only continues a marked statement (a method of a marked class, blank lines)
        assert "FlashBias" in text or not text.strip(), text


# ------------------------------------------------------------------------------------------------
# the real Triton kernels, through the interpreter, in a subprocess
# ------------------------------------------------------------------------------------------------
TRITON_SCRIPT = textwrap.dedent("""
    import os, sys
    assert os.environ["TRITON_INTERPRET"] == "1" and os.environ["FLASHBIAS_BACKEND"] == "triton"
    sys.path[:0] = [{root!r}, {tests!r}, {scripts!r}]
    import torch
    import flash_bias_triton as fbt
    import swin_config, swin_transformer as v1
    from model_utils import images, rel_l2
    launches = []
    for name in ("_launch", "_add_layer_norm_launch", "_bias_from_table_launch"):
        original = getattr(fbt, name)
        setattr(fbt, name, lambda *a, _o=original, _n=name, **k: (launches.append(_n), _o(*a, **k))[1])
    config = dict(swin_config.SWIN_V1_CONFIGS["test_v1_mini"], drop_path_rate=0.0)
    torch.manual_seed(0)
    model = swin_config.trained_like_(v1.SwinTransformer(**config), 0).eval()
    x = images(2, 32)
    with torch.no_grad():
        kernel = model(x)
        # the bias: one launch per stage of two blocks (LayerBias.stage_biases)
        assert launches.count("_launch") == 4 and launches.count("_bias_from_table_launch") == 2, launches
        assert launches.count("_add_layer_norm_launch") == 6, launches
        with torch.autocast("cpu", dtype=torch.bfloat16):
            kernel_bf16 = model(x)
            model.set_flash_bias(fused=False)
            official_bf16 = model(x)
        official = model(x)
    err, err_bf16, noise = rel_l2(kernel, official), rel_l2(kernel_bf16, official), rel_l2(official_bf16, official)
    print("REL", err, err_bf16, noise)
    assert err < 1e-5, err
    assert err_bf16 < 2 * noise + 1e-3, (err_bf16, noise)
    assert torch.equal(kernel.argmax(1), official.argmax(1))
    # low-rank: the kernel takes bias_factors in the scaled dot-product form (no logit_scale)
    import flash_bias_runtime as runtime
    model.set_flash_bias(rank_rule="rank:5", fused=True)
    launches.clear()
    with torch.no_grad():
        low_rank = model(x)
        assert launches.count("_launch") == 4, launches
        assert [s["rank"] for s in runtime.flash_bias_summary(model)] == [5] * 4
        os.environ["FLASHBIAS_BACKEND"] = "torch"  # the same factors through the PyTorch reference
        low_rank_reference = model(x)
    err_low_rank, moved = rel_l2(low_rank, low_rank_reference), rel_l2(low_rank, official)
    print("LOW_RANK", err_low_rank, moved)
    assert err_low_rank < 1e-5, err_low_rank
    assert moved > 100 * err_low_rank, moved  # rank 5 of N = 16: not the exact bias, so the factors were used
""")


def test_fused_path_through_triton_interpreter():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHBIAS_")}
    env.update(TRITON_INTERPRET="1", FLASHBIAS_BACKEND="triton")
    script = TRITON_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"), scripts=os.path.join(ROOT, "scripts"))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "REL" in proc.stdout and "LOW_RANK" in proc.stdout


def test_import_as_official_models_package(tmp_path):
    """Inside the official `models` package (models/build.py: from .swin_transformer import SwinTransformer)."""
    pkg = tmp_path / "models"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .swin_transformer import SwinTransformer\n")
    for f in ("swin_transformer.py", "flash_bias_triton.py", "flash_bias_runtime.py", "flash_bias_factors.py"):
        (pkg / f).write_text(open(os.path.join(ROOT, f)).read())  # the V1 drop-in needs no swin_transformer_v2.py
    script = textwrap.dedent("""
        import sys, torch
        import models.swin_transformer as m
        assert m.flash_bias_attention.__module__ == "models.flash_bias_triton", m.flash_bias_attention.__module__
        assert m.LayerBias.__module__ == "models.flash_bias_runtime", m.LayerBias.__module__
        assert not {"flash_bias_triton", "flash_bias_runtime", "swin_transformer_v2"} & set(sys.modules)
        model = m.SwinTransformer(img_size=32, window_size=4, embed_dim=32, depths=[2, 2], num_heads=[1, 2],
                                  num_classes=5, fused_window_process=True).eval()
        with torch.no_grad():
            print(model(torch.randn(1, 3, 32, 32)).shape)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHBIAS_") and k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.Size([1, 5])" in proc.stdout


# ------------------------------------------------------------------------------------------------
# benchmarks/bench_swin_v1.py on the CPU
# ------------------------------------------------------------------------------------------------
def run_benchmark(*args, expect=0):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FLASHBIAS_") and k not in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_swin_v1.py")] + [str(a) for a in args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, f"{cmd} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout, proc.stderr


def test_benchmark_runs_on_cpu(tmp_path):
    stdout, _ = run_benchmark("--tiny", "--models", "test_v1_mini:2", "--iters", 1, "--warmup", 3,
                              "--out-dir", tmp_path)
    data = json.loads((tmp_path / "swin_v1_cpu.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    official = next(m for m in rows if m.startswith("official"))
    assert list(rows) == [official, "timm SwinTransformer", "FlashBias eager", "FlashBias + CUDA graphs"]
    for r in data["rows"]:
        assert r["status"] == "ok" and r["precision"] == "fp32" and len(r["ms"]) == 1 and r["finite"], r
        assert r["rel_l2"] < 1e-5 and r["top1"] == 1.0, r  # the CPU paths are the official math up to rounding
    assert rows[official]["speedup"] == pytest.approx(1.0)
    assert "logits rel. L2" in stdout and (tmp_path / "swin_v1_cpu.md").is_file()
    _, stderr = run_benchmark("--models", "swin_x:2", "--tiny", expect=2)
    assert "error: --models swin_x:2: give NAME:BATCH with NAME one of swin_t_224" in stderr


def test_official_build_model_builds_the_dropin(tmp_path):
    """The official models/build.py with an official MODEL.TYPE: swin yaml (as main.py --eval) builds the drop-in,
    whose eval forward runs fused; fused_window_process (--fused_window_process) is accepted."""
    checkout = os.path.dirname(os.path.dirname(OFFICIAL_FILE))
    if not os.path.isfile(os.path.join(checkout, "models", "build.py")):
        pytest.skip(f"no official checkout at {checkout}")
    script = textwrap.dedent(f"""
        import os, shutil, sys
        shutil.copytree({checkout!r}, "checkout", ignore=shutil.ignore_patterns(".git", "figures"))
        for f in ("swin_transformer.py", "swin_transformer_v2.py", "flash_bias_triton.py", "flash_bias_runtime.py",
                  "flash_bias_factors.py"):
            shutil.copy(os.path.join({ROOT!r}, f), os.path.join("checkout", "models", f))
        os.chdir("checkout")
        sys.path.insert(0, os.getcwd())
        import torch, config, models
        cfg = config._C.clone()
        config._update_config_from_file(cfg, "configs/swin/swin_tiny_patch4_window7_224.yaml")
        cfg.defrost()
        cfg.FUSED_WINDOW_PROCESS = True
        cfg.freeze()
        model = models.build_model(cfg).eval()
        assert type(model).__module__ == "models.swin_transformer" and hasattr(model, "set_flash_bias")
        calls = []
        original = model.layers[0].blocks[0].attn.forward_fused
        model.layers[0].blocks[0].attn.forward_fused = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
        with torch.no_grad():
            fused = model(torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
        assert calls and fused.shape == (1, 1000)
        print("BUILT", type(model).__name__)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHBIAS_") and k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "BUILT SwinTransformer" in proc.stdout


def test_eager_run_on_the_weight_copies(monkeypatch):
    """V1 shares the runtime's eager run on the half-precision weight copies: the layers hold the copies during the
    forward, the output is autocast's own, and the parameters are back afterwards. (CPU: CUDA's autocast state
    faked, CPU autocast on; a fresh autocast region per step, as autocast caches its casts until the region ends.)"""
    model = make_model(MINI)
    graphs = model.flash_bias_settings.graphs
    seen = []
    model.head.register_forward_hook(lambda m, i, o: seen.append(m.weight.dtype))
    x = images(2, MINI["img_size"])
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = model(x)
        monkeypatch.setattr(runtime, "_autocast_state", lambda: (True, torch.bfloat16, False))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = graphs.run_eagerly(model, x)
    assert seen == [torch.float32, torch.bfloat16] and torch.equal(out, expected)
    assert isinstance(model.head.weight, torch.nn.Parameter) and model.head.weight.dtype == torch.float32
