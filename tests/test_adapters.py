"""flash_bias_adapters: patch_timm / patch_transformers / unpatch against the unpatched library models, CPU only.

On the CPU the fused path runs flash_bias_triton's PyTorch reference ("auto"); the tests marked kernel run the real
Triton kernel through TRITON_INTERPRET=1 (backend="triton"). Models: tiny configs with trained-like weights and
randomised post-norms (benchmarks/bench_adapters.py builds them; SwinV2's zero-initialised post-norms would hide
attention), windows 8, 16 and 12->24 (pre-training windows), shifted and not, and the libraries' padding paths.
CUDA-only checks (fp16 autocast, real CUDA graphs, no weight copies on CUDA) run where a GPU is."""
import copy
import importlib.util
import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
timm = pytest.importorskip("timm")

import bench_adapters as ba  # noqa: E402
import flash_bias_adapters as fa  # noqa: E402
import flash_bias_runtime as runtime  # noqa: E402
from model_utils import FakeCapture  # noqa: E402
import flash_bias_triton as fbt  # noqa: E402
from swin_config import rel_l2  # noqa: E402  (bench_adapters put scripts/ on sys.path)

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

TIMM = {  # timm SwinTransformerV2 kwargs; every config has a shifted and an unshifted (clipped-window) stage
    "w8": dict(img_size=64, window_size=8, embed_dim=16, depths=(2, 2), num_heads=(1, 2), num_classes=10),
    "w16": dict(img_size=128, window_size=16, embed_dim=16, depths=(2, 2), num_heads=(1, 2), num_classes=10),
    "w12to24": dict(img_size=192, window_size=24, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                    pretrained_window_sizes=(12, 12, 12, 6), num_classes=10),
    # an 8 x 24 map, window 16: timm clips the window to 8 x 16, shifts only the width and pads it to 32
    "one_axis_shift": dict(img_size=(32, 96), window_size=16, embed_dim=16, depths=(2,), num_heads=(2,),
                           num_classes=10),
    # any input size: the mask per padded size (dynamic_mask), padding after the shift
    "dynamic": dict(img_size=64, window_size=8, embed_dim=16, depths=(2, 2), num_heads=(1, 2), num_classes=10,
                    strict_img_size=False, dynamic_img_size=True),
}
TIMM_INPUT = {"one_axis_shift": (32, 96), "dynamic": (80, 72)}


def _timm_version():
    import timm
    return tuple(int(v) for v in re.findall(r"\d+", timm.__version__)[:3])


# timm 1.0.29's own SwinV2 cannot run a clipped, one-axis-shifted window or change its input size (its
# window_partition raises a shape error: seen on the GPU machine); 1.0.31 can
needs_timm_1_0_31 = pytest.mark.skipif(_timm_version() < (1, 0, 31), reason="timm < 1.0.31 cannot run this config "
                                       "in its own code (window_partition shape error with 1.0.29)")


def _timm_names(*names):
    return [pytest.param(n, marks=needs_timm_1_0_31) if n == "one_axis_shift" else n for n in names]
HF = {  # transformers Swinv2Config kwargs
    "w8": ba.HF_CONFIGS["tiny"],
    "w16": dict(image_size=128, window_size=16, embed_dim=16, depths=[2, 2], num_heads=[1, 2], num_labels=10),
    "w12to24": dict(image_size=192, window_size=24, embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8],
                    pretrained_window_sizes=[12, 12, 12, 6], num_labels=10),
}
HF_INPUT = {"w8": 64, "w16": 128, "w12to24": 192, "w8_padded": 80}  # 80 px: 20 x 20 map, padded to 24 (window 8)
TOLERANCE = 1e-5  # CPU, float32: the reference path is the library's math up to rounding
# the kernel runs on the GPU where there is one (float32 qkv: tf32 dots, a float16 bias), else in Triton's interpreter
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_TOLERANCE = 3e-3 if KERNEL_DEVICE == "cuda" else 1e-4


def images(size, batch=2, seed=1):
    height, width = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def timm_model(name, seed=0):
    return ba.build_timm(TIMM[name], seed)


def hf_model(name, seed=0, head=True):
    pytest.importorskip("transformers")
    return ba.build_transformers(HF[name.replace("_padded", "")], seed, head=head)


def hf_input(name):
    return images(HF_INPUT[name])


class KernelCalls:
    """Counts flash_bias_attention calls made by the adapters (optionally changing their keyword arguments)."""

    def __init__(self, monkeypatch, change=None):
        self.calls = 0
        original = fa.flash_bias_attention

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **(change(kwargs) if change else kwargs))

        monkeypatch.setattr(fa, "flash_bias_attention", counted)


def timm_outputs(model, x):
    with torch.no_grad():
        return model.forward_features(x), model(x)


def hf_outputs(model, x):
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    return out.hidden_states[-1], out.logits


def assert_close(got, expected, tolerance):
    for g, e in zip(got, expected):
        assert g.shape == e.shape and rel_l2(g, e) < tolerance, rel_l2(g, e)


# ------------------------------------------------------------------------------------------------
# each adapter against the unpatched library model
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", _timm_names(*TIMM))
def test_timm_matches_the_library(name, monkeypatch):
    model = timm_model(name)
    x = images(TIMM_INPUT.get(name, TIMM[name]["img_size"]))
    expected = timm_outputs(model, x)
    calls = KernelCalls(monkeypatch)
    fa.patch_timm(model)
    assert_close(timm_outputs(model, x), expected, TOLERANCE)
    assert calls.calls == 2 * sum(TIMM[name]["depths"])  # every block fused, in both calls


@pytest.mark.parametrize("name", ["w8", "w16", "w12to24", "w8_padded"])
def test_transformers_matches_the_library(name, monkeypatch):
    model = hf_model(name)
    x = hf_input(name)
    expected = hf_outputs(model, x)
    calls = KernelCalls(monkeypatch)
    fa.patch_transformers(model)
    assert_close(hf_outputs(model, x), expected, TOLERANCE)
    assert calls.calls == sum(HF[name.replace("_padded", "")]["depths"])


@pytest.mark.parametrize("name", _timm_names("w8", "one_axis_shift", "dynamic"))
def test_timm_kernel(name):
    """The Triton kernel: image layout with a shift, and window layout (one-axis shift, padding)."""
    model = timm_model(name).to(KERNEL_DEVICE)
    x = images(TIMM_INPUT.get(name, TIMM[name]["img_size"]), batch=1).to(KERNEL_DEVICE)
    expected = timm_outputs(model, x)
    fa.patch_timm(model, backend="triton")
    assert_close(timm_outputs(model, x), expected, KERNEL_TOLERANCE)


@pytest.mark.parametrize("name", ["w8", "w8_padded"])
def test_transformers_kernel(name):
    model = hf_model(name).to(KERNEL_DEVICE)
    x = images(HF_INPUT[name], batch=1).to(KERNEL_DEVICE)
    expected = hf_outputs(model, x)
    fa.patch_transformers(model, backend="triton")
    assert_close(hf_outputs(model, x), expected, KERNEL_TOLERANCE)


def test_comparisons_see_a_broken_adapter(monkeypatch):
    """The configs above would catch a dropped bias or a dropped shift mask: the error is far above tolerance."""
    cases = [(timm_model("w8"), images(64), timm_outputs, fa.patch_timm)]
    if HAS_TRANSFORMERS:
        cases.append((hf_model("w8_padded"), hf_input("w8_padded"), hf_outputs, fa.patch_transformers))
    breaks = {"bias dropped": lambda kw: {**kw, "bias": torch.zeros_like(kw["bias"])},
              "mask dropped": lambda kw: {**kw, "region_ids": None if kw["region_ids"] is None
                                          else torch.zeros_like(kw["region_ids"])}}
    for model, x, outputs, patch in cases:
        expected = outputs(model, x)
        for name, change in breaks.items():
            with monkeypatch.context() as m:
                KernelCalls(m, change)
                patch(model)
                error = rel_l2(outputs(model, x)[0], expected[0])
                fa.unpatch(model)
            assert error > 100 * TOLERANCE, (type(model).__name__, name, error)


def test_bias_is_never_stale():
    model = fa.patch_timm(timm_model("w8"))
    x = images(64)
    timm_outputs(model, x)
    with torch.no_grad():
        for block in model.layers[0].blocks:
            block.attn.cpb_mlp[2].weight.mul_(-2.0)
            block.attn.logit_scale.add_(0.5)
    patched = timm_outputs(model, x)
    assert_close(patched, timm_outputs(fa.unpatch(model), x), TOLERANCE)


@needs_timm_1_0_31
def test_timm_set_input_size_after_patching():
    """timm re-registers the mask and the position tables: the patched model follows (no stale region ids)."""
    model = fa.patch_timm(timm_model("w8"))
    timm_outputs(model, images(64))
    model.set_input_size(img_size=(96, 128), window_size=8)
    x = images((96, 128))
    assert_close(timm_outputs(model, x), timm_outputs(fa.unpatch(model), x), TOLERANCE)


# ------------------------------------------------------------------------------------------------
# shift masks: region ids against the library's own mask
# ------------------------------------------------------------------------------------------------
@needs_timm_1_0_31
def test_timm_region_ids_match_timms_masks():
    for name in ("w8", "one_axis_shift", "dynamic"):
        model = fa.patch_timm(timm_model(name))
        for block in (m for m in model.modules() if isinstance(m.__dict__.get("forward"), fa._TimmBlockForward)):
            if not any(block.shift_size):
                continue
            for height, width in ((24, 24), (16, 32)) if name == "dynamic" else ((None, None),):
                if height is None:
                    mask = block.attn_mask
                    height, width = [fa._round_up(r, w) for r, w in zip(block.input_resolution, block.window_size)]
                else:
                    mask = block.get_attn_mask(torch.zeros(1, height, width, 1))
                ids = block.forward.region_ids(height, width, torch.device("cpu"))
                assert torch.equal(fbt.region_mask(ids), mask), (name, height, width)


def test_transformers_region_ids_match_the_librarys_mask_on_the_padded_map():
    model = fa.patch_transformers(hf_model("w8"))
    shifted = [m for m in model.modules() if isinstance(m.__dict__.get("forward"), fa._TransformersLayerForward)
               and m.shift_size > 0]
    assert shifted
    for layer in shifted:
        for height, width in ((16, 16), (24, 24), (24, 32)):  # (24, 24): the 80 px input's padded 20 x 20 map
            ids = layer.forward.region_ids(height, width, torch.device("cpu"))
            assert torch.equal(fbt.region_mask(ids), layer.get_attn_mask(height, width, dtype=torch.float32))


def test_timm_mask_that_is_not_a_region_mask_runs_timms_attention(monkeypatch):
    model = timm_model("w8")
    block = model.layers[0].blocks[1]
    block.attn_mask = torch.randn_like(block.attn_mask)
    x = images(64)
    expected = timm_outputs(model, x)
    calls = KernelCalls(monkeypatch)
    fa.patch_timm(model)
    with pytest.warns(RuntimeWarning, match="not a region mask"):
        got = timm_outputs(model, x)
    assert torch.equal(got[1], expected[1]) and calls.calls == 2 * (4 - 1)


# ------------------------------------------------------------------------------------------------
# the library's own path: gradients, training, attentions, flags, hooks, exportable
# ------------------------------------------------------------------------------------------------
def test_gradients_and_training_fall_back(monkeypatch):
    plain, patched = timm_model("w8"), fa.patch_timm(timm_model("w8"))
    x = images(64)
    calls = KernelCalls(monkeypatch)
    out, expected = patched(x), plain(x)  # grad enabled, parameters require grad
    assert torch.equal(out, expected)
    out.sum().backward()
    expected.sum().backward()
    for (name, p), q in zip(patched.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), name
    patched.requires_grad_(False)
    assert torch.equal(patched(x.clone().requires_grad_()), plain(x))  # the input needs a gradient
    patched.train()
    with torch.no_grad():
        assert torch.equal(patched(x), plain.train()(x))
    assert calls.calls == 0


def test_transformers_attentions_and_gradients_fall_back(monkeypatch):
    plain, patched = hf_model("w8_padded"), fa.patch_transformers(hf_model("w8_padded"))
    x = hf_input("w8_padded")
    calls = KernelCalls(monkeypatch)
    with torch.no_grad():
        got, expected = patched(x, output_attentions=True), plain(x, output_attentions=True)
    assert calls.calls == 0 and len(got.attentions) == len(expected.attentions) == 2
    assert torch.equal(got.logits, expected.logits)
    assert all(torch.equal(a, b) for a, b in zip(got.attentions, expected.attentions))
    out = patched(x).logits
    assert calls.calls == 0 and torch.equal(out, plain(x).logits)
    out.sum().backward()
    assert all(p.grad is not None for p in patched.parameters() if p.requires_grad)


def test_timm_flags(monkeypatch):
    x = images(64)
    expected = timm_outputs(timm_model("w8"), x)
    calls = KernelCalls(monkeypatch)
    model = fa.patch_timm(timm_model("w8"))
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    assert torch.equal(timm_outputs(model, x)[1], expected[1]) and calls.calls == 0
    fa.patch_timm(model)
    timm.layers.set_exportable(True)
    try:
        assert torch.equal(timm_outputs(model, x)[1], expected[1]) and calls.calls == 0
        fa.patch_timm(model)  # exportable at patch time: use_fused_attn() is False
        assert not any(getattr(m, "fused_attn", False) for m in model.modules())
    finally:
        timm.layers.set_exportable(False)
    monkeypatch.setattr(timm.layers.config, "_USE_FUSED_ATTN", 0)  # what TIMM_FUSED_ATTN=0 sets at import
    fa.patch_timm(model)
    assert torch.equal(timm_outputs(model, x)[1], expected[1]) and calls.calls == 0


def test_timm_fused_attn_env_off():
    code = ("import sys; sys.path[:0] = [{root!r}, {bench!r}]; import bench_adapters as ba, flash_bias_adapters as fa; "
            "m = fa.patch_timm(ba.build_timm(ba.TIMM_TINY)); "
            "print(sorted({{getattr(a, 'fused_attn', None) for a in m.modules() if hasattr(a, 'cpb_mlp')}}))")
    code = code.format(root=ROOT, bench=os.path.join(ROOT, "benchmarks"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHBIAS_")}
    for value, expected in (("0", "[False]"), ("1", "[True]")):
        proc = subprocess.run([sys.executable, "-c", code], env={**env, "TIMM_FUSED_ATTN": value},
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == expected


def test_hooks_on_the_attention_run_the_librarys_path(monkeypatch):
    model = fa.patch_timm(timm_model("w8"))
    seen = []
    model.layers[0].blocks[0].attn.register_forward_hook(lambda *args: seen.append(1))
    calls = KernelCalls(monkeypatch)
    timm_outputs(model, images(64))
    assert len(seen) == 2 and calls.calls == 2 * (4 - 1)  # only the hooked block left the kernel


# ------------------------------------------------------------------------------------------------
# patch / unpatch: structure, state dict, bit-for-bit restore, copies
# ------------------------------------------------------------------------------------------------
def module_snapshot(model):
    return [(name, type(m), sorted(vars(m))) for name, m in model.named_modules()]


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("library", ["timm", "transformers"])
def test_patch_keeps_structure_and_state_dict_unpatch_restores_bit_for_bit(library):
    if library == "timm":
        model, x, outputs, patch = timm_model("w8"), images(64), timm_outputs, fa.patch_timm
    else:
        model, x, outputs, patch = hf_model("w8"), hf_input("w8"), hf_outputs, fa.patch_transformers
    before, weights, expected = module_snapshot(model), state(model), outputs(model, x)
    patch(model, cuda_graphs=True)
    assert fa.is_patched(model)
    assert [(n, t) for n, t, _ in module_snapshot(model)] == [(n, t) for n, t, _ in before]
    assert state(model).keys() == weights.keys() and all(torch.equal(state(model)[k], v) for k, v in weights.items())
    model.load_state_dict(weights)  # a checkpoint of the library's model loads into the patched one
    outputs(model, x)
    fa.unpatch(model)
    assert not fa.is_patched(model) and module_snapshot(model) == before
    assert all(type(m).forward is m.forward.__func__ for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(outputs(model, x), expected))


def test_repatch_copy_and_pickle():
    model = fa.patch_timm(timm_model("w8"), backend="torch")
    fa.patch_timm(model)  # re-patching replaces the settings, it does not stack
    assert all(m.forward.backend is None for m in model.modules() if isinstance(m.__dict__.get("forward"),
                                                                                 fa._TimmBlockForward))
    x = images(64)
    expected = timm_outputs(model, x)
    twin = copy.deepcopy(model)
    blocks = [m for m in twin.modules() if isinstance(m.__dict__.get("forward"), fa._TimmBlockForward)]
    assert blocks and all(b.forward.block is b for b in blocks)  # bound to the copy's blocks
    assert all(torch.equal(a, b) for a, b in zip(timm_outputs(twin, x), expected))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert fa.is_patched(loaded) and all(torch.equal(a, b) for a, b in zip(timm_outputs(loaded, x), expected))


def test_wrong_models_and_arguments():
    with pytest.raises(TypeError, match="no timm SwinTransformerV2Block"):
        fa.patch_timm(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend"):
        fa.patch_timm(timm_model("w8"), backend="cuda")
    model = timm_model("w8")
    model.layers[0].blocks[0].norm1 = torch.nn.Identity()
    with pytest.raises(TypeError, match="norm1"):
        fa.patch_timm(model)
    assert not fa.is_patched(model)  # nothing patched when one block is refused
    if HAS_TRANSFORMERS:
        with pytest.raises(TypeError, match="no transformers Swinv2Layer"):
            fa.patch_transformers(timm_model("w8"))
        with pytest.raises(TypeError, match="no timm"):
            fa.patch_timm(hf_model("w8"))


# ------------------------------------------------------------------------------------------------
# the q/k/v projection of transformers
# ------------------------------------------------------------------------------------------------
def projections(bias=True, dim=24):
    torch.manual_seed(0)
    return [torch.nn.Linear(dim, dim, bias=bias and i != 1) for i in range(3)]


@pytest.mark.parametrize("bias", [True, False])
def test_project_qkv_matches_three_linears(bias):
    layers = projections(bias)
    x = torch.randn(2, 10, 24)
    with torch.no_grad():
        expected = torch.cat([p(x) for p in layers], -1)
        assert torch.allclose(fa._project_qkv(x, layers), expected, rtol=1e-5, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, expected_low = fa._project_qkv(x, layers), torch.cat([p(x) for p in layers], -1)
    assert low.dtype == expected_low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), expected_low.float(), rtol=2e-2, atol=2e-3)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_project_qkv_copies_no_weight(device):
    """No op copies, concatenates or casts a weight: each matmul writes its column slice (the bias of the
    projections that have one is broadcast into their slice, PyTorch's addmm for a strided output)."""
    from torch.profiler import profile, ProfilerActivity
    layers = [p.to(device) for p in projections(dim=64)]
    x = torch.randn(4, 32, 64, device=device)
    with torch.no_grad():
        fa._project_qkv(x, layers)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            fa._project_qkv(x, layers)
    names = [event.name for event in prof.events()]
    assert "aten::cat" not in names and "aten::stack" not in names  # (their input shapes are not recorded)
    for event in prof.events():
        if event.name in ("aten::copy_", "aten::clone", "aten::_to_copy", "aten::contiguous"):
            assert [64, 64] not in [list(s) for s in event.input_shapes], (event.name, event.input_shapes)


# ------------------------------------------------------------------------------------------------
# CUDA graphs, with a fake capture on the CPU (the real ones: test_cuda_graphs_on_cuda)
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_graphs(monkeypatch):
    fake = FakeCapture()
    monkeypatch.setattr(runtime.ForwardGraphs, "device_types", ("cpu",))
    monkeypatch.setattr(fa, "_forward_graphs", lambda: runtime.ForwardGraphs(capture=fake))
    return fake


def test_timm_cuda_graphs_replay(fake_graphs, monkeypatch):
    model = fa.patch_timm(timm_model("w8"), cuda_graphs=True)
    x, other = images(64), images(64, seed=5)
    with torch.no_grad():
        first = model(x)  # first sight: eager
        second = model(x)  # captured
        third = model(other)  # replayed
        assert fake_graphs.captures == 1
        assert torch.equal(first, second) and torch.equal(third, fa.unpatch(model)(other))
    fa.patch_timm(model, cuda_graphs=True)
    calls = KernelCalls(monkeypatch)
    model(x)  # gradients: the library's forward, no graph
    assert calls.calls == 0 and fake_graphs.captures == 1


@pytest.mark.parametrize("library", ["timm", "transformers"])
def test_compiled_adapters_replay_outside_the_compiler(fake_graphs, library):
    """torch.compile of a patched model: no-grad inference replays the graphs outside the compiled code (timm: no
    frame compiled at all; transformers: one graph break at the encoder), training is compiled as before."""
    from model_utils import TracedOps
    if library == "timm":
        model, x = fa.patch_timm(timm_model("w8"), cuda_graphs=True), images(64)
        logits = lambda m: m(x)  # noqa: E731
    else:
        model, x = fa.patch_transformers(hf_model("w8"), cuda_graphs=True), hf_input("w8")
        logits = lambda m: m(x).logits  # noqa: E731
    traced = TracedOps()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend=traced)
    with torch.no_grad():
        expected = logits(model)
        outs = [logits(compiled) for _ in range(3)]
    assert fake_graphs.captures == 1 and all(torch.equal(out, expected) for out in outs)
    linears = lambda: sum("linear" in t for graph in traced.graphs for t in graph)  # noqa: E731
    if library == "timm":  # not a frame evaluated
        assert not traced.graphs and not torch._dynamo.utils.counters["frames"], dict(torch._dynamo.utils.counters)
    else:  # the embeddings and the classifier around the encoder: one Linear
        assert linears() == 1, traced.graphs
    traced.graphs.clear()
    model.train()
    logits(compiled)
    assert linears() > 8 and fake_graphs.captures == 1
    torch._dynamo.reset()


def test_transformers_cuda_graphs_replay_the_encoder(fake_graphs):
    model = fa.patch_transformers(hf_model("w8"), cuda_graphs=True)
    x = hf_input("w8")
    with torch.no_grad():
        expected = model(x).logits
        for _ in range(3):
            assert torch.equal(model(x).logits, expected)
            assert torch.equal(model(x, return_dict=False)[0], expected)
        assert fake_graphs.captures == 1
        hidden = model(x, output_hidden_states=True)  # asks for more than the last state: eager
        assert len(hidden.hidden_states) == 3 and fake_graphs.captures == 1


# ------------------------------------------------------------------------------------------------
# on CUDA (skipped elsewhere)
# ------------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("library", ["timm", "transformers"])
@pytest.mark.parametrize("graphs", [False, True])
def test_fp16_on_cuda(library, graphs):
    """The kernel under fp16 autocast against the library at the same precision: within 3e-3 (issue 13)."""
    if library == "timm":
        model, x, patch = timm_model("w16").cuda(), images(128, batch=4).cuda(), fa.patch_timm
        logits = lambda m: m(x)  # noqa: E731
    else:
        model, x, patch = hf_model("w16").cuda(), images(128, batch=4).cuda(), fa.patch_transformers
        logits = lambda m: m(x).logits  # noqa: E731
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        expected = logits(model).float()
        patch(model, cuda_graphs=graphs)
        got = [logits(model).float() for _ in range(3)]
    assert all(rel_l2(g, expected) < 3e-3 for g in got), [rel_l2(g, expected) for g in got]


# ------------------------------------------------------------------------------------------------
# the benchmark runs (CPU smoke test; the numbers mean nothing here)
# ------------------------------------------------------------------------------------------------
def test_benchmark_tiny(tmp_path):
    libraries = "timm,transformers" if HAS_TRANSFORMERS else "timm"
    assert ba.main(["--tiny", "--libraries", libraries, "--iters", "1", "--warmup", "1", "--out-dir",
                    str(tmp_path)]) == 0
    data = json.loads((tmp_path / "adapters_cpu.json").read_text())
    methods = [(r["library"], r["method"]) for r in data["rows"]]
    assert methods == [(lib, m) for lib in libraries.split(",") for m in ("plain", "patched")]
    for r in data["rows"]:
        assert r["finite"] and r["top1"] == 1.0 and r["rel_l2"] < TOLERANCE and r["ms_median"] > 0
    assert len(data["qkv"]) == (6 if HAS_TRANSFORMERS else 0)  # 2 stages x 3 variants
    assert "| timm | tiny w8 | fp32 | patched |" in (tmp_path / "adapters_cpu.md").read_text()
