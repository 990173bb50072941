"""Eager launches bound once per key (flash_bias_triton._BoundLaunches).

On the CPU a fake kernel stands in for Triton's (the interpreter never takes the direct launch): which calls go
through ``kernel[grid]`` and what the direct launch is handed. On the GPU the real kernels, launched directly and
through Triton, must agree bit for bit.
"""
import types

import pytest
import torch

import flash_bias_triton as fb
import model_utils  # noqa: F401  (puts scripts/ on sys.path)

CUDA = torch.cuda.is_available()
triton = pytest.importorskip("triton")


def test_launch_key_holds_what_triton_specialises_on():
    buf = torch.zeros(64)
    key = fb._launch_key
    assert key((buf[:8], 3, 1.5)) == key((buf[4:12], 3, 1.5))    # 16 bytes further: the same alignment
    assert key((buf[:8],)) != key((buf[1:9],))                      # 4 bytes further: not 16-byte aligned
    assert key((buf[:8],)) != key((buf[:8].half(),))
    assert key((16,)) != key((17,)) and key((1,)) != key((True,)) and key((1,)) != key((1.0,))
    assert key(((buf[:8], buf[:8]),)) != key(((buf[:8], buf[1:9]),))   # the layers' pointer tuples, element-wise


class FakeCompiled:
    packed_metadata = "metadata"
    function = "function"

    def __init__(self):
        self.direct = []

    def run(self, *args):
        self.direct.append(args)


class FakeKernel:
    """Triton's JITFunction as _BoundLaunches sees it: parameters (x, n, BLOCK constexpr), kernel[grid](...)."""

    def __init__(self):
        self.arg_names = ["x", "n", "BLOCK"]
        self.params = [types.SimpleNamespace(name=n, is_constexpr=n == "BLOCK") for n in self.arg_names]
        self.compiled = FakeCompiled()
        self.through_triton = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.through_triton.append((grid, args, kwargs))
            return self.compiled
        return launch


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA device 0 and stream 77; Triton's launch hooks left at their defaults (None, or an empty HookChain),
    which must count as no hooks."""
    if fb._triton_knobs is None:
        pytest.skip("Triton < 3.3: every eager launch goes through kernel[grid]")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 77, raising=False)


def test_first_call_of_a_key_goes_through_triton_then_directly(fake_cuda):
    kernel, x = FakeKernel(), torch.zeros(32)
    bound = fb._BoundLaunches(kernel)
    bound[(4,)](x, 10, BLOCK=32, num_warps=4)
    assert len(kernel.through_triton) == 1 and kernel.compiled.direct == []
    y = torch.zeros(32)   # another tensor of the same dtype and alignment: the same key
    bound[(5, 2)](y, 10, BLOCK=32, num_warps=4)
    assert len(kernel.through_triton) == 1
    (args,) = kernel.compiled.direct
    assert args[:9] == (5, 2, 1, 77, "function", "metadata", None, None, None)
    assert args[9] is y and args[10:] == (10, 32)   # every parameter in order, the constexpr last


@pytest.mark.parametrize("change", ["misaligned", "dtype", "int value", "constexpr", "launch option", "device"])
def test_a_new_key_goes_through_triton_again(fake_cuda, monkeypatch, change):
    kernel, x = FakeKernel(), torch.zeros(32)
    bound = fb._BoundLaunches(kernel)
    bound[(1,)](x, 10, BLOCK=32, num_warps=4)
    args, kwargs = [x, 10], dict(BLOCK=32, num_warps=4)
    if change == "misaligned":
        args[0] = x[1:]
    elif change == "dtype":
        args[0] = x.half()
    elif change == "int value":
        args[1] = 16
    elif change == "constexpr":
        kwargs["BLOCK"] = 64
    elif change == "launch option":
        kwargs["num_warps"] = 8
    else:
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    bound[(1,)](*args, **kwargs)
    assert len(kernel.through_triton) == 2 and kernel.compiled.direct == []


@pytest.mark.parametrize("hook", ["launch_enter_hook", "launch_exit_hook"])
def test_launch_hooks_send_every_call_through_triton(fake_cuda, monkeypatch, hook):
    kernel, x = FakeKernel(), torch.zeros(32)
    bound = fb._BoundLaunches(kernel)
    bound[(1,)](x, 10, BLOCK=32)
    chain = getattr(fb._triton_knobs.runtime, hook)
    if chain is None:   # Triton < 3.5: a hook is one function
        monkeypatch.setattr(fb._triton_knobs.runtime, hook, lambda metadata: None)
    else:               # a HookChain: a profiler adds its call
        monkeypatch.setattr(chain, "calls", [lambda metadata: None])
    bound[(1,)](x, 10, BLOCK=32)
    assert len(kernel.through_triton) == 2 and kernel.compiled.direct == []


def test_a_constexpr_passed_positionally_or_left_to_its_default_is_never_bound(fake_cuda):
    kernel, x = FakeKernel(), torch.zeros(32)
    bound = fb._BoundLaunches(kernel)
    for _ in range(2):
        bound[(1,)](x, 10)   # BLOCK left to a default: the direct launch could not pass it
    assert len(kernel.through_triton) == 2 and not bound.launches


def test_a_number_by_name_is_bound_a_tensor_by_name_never(fake_cuda):
    kernel, x = FakeKernel(), torch.zeros(32)
    bound = fb._BoundLaunches(kernel)
    for _ in range(2):
        bound[(1,)](x, n=10, BLOCK=32)   # the attention passes its runtime RANK so
    assert len(kernel.through_triton) == 1 and kernel.compiled.direct[0][9:] == (x, 10, 32)
    for _ in range(2):
        bound[(1,)](x=x, n=10, BLOCK=32)
    assert len(kernel.through_triton) == 3


def test_keys_are_capped(fake_cuda, monkeypatch):
    monkeypatch.setattr(fb._BoundLaunches, "MAX_KEYS", 3)
    kernel, x = FakeKernel(), torch.zeros(32)
    bound = fb._BoundLaunches(kernel)
    for n in range(5):
        bound[(1,)](x, n, BLOCK=32)
    assert [k[1][1] for k in bound.launches] == [(int, 2), (int, 3), (int, 4)]
    bound[(1,)](x, 2, BLOCK=32)   # used: now the most recent
    bound[(1,)](x, 5, BLOCK=32)
    assert [k[1][1] for k in bound.launches] == [(int, 4), (int, 2), (int, 5)]


def test_the_interpreter_launches_through_triton():
    if not fb._interpreting():
        pytest.skip("the interpreter runs on the CPU machines")
    assert fb._launcher(fb._residual_layer_norm_fwd, None) is fb._residual_layer_norm_fwd


def kernel_calls():
    """A function that launches the attention (two keys, and windows whose tokens are each their own region), bias,
    cpb-table and residual + LayerNorm kernels once each on fixed random CUDA inputs and returns their outputs."""
    g = torch.Generator().manual_seed(5)
    H, C, img, win = 4, 128, (48, 48), (24, 24)
    L = img[0] * img[1]
    # one aligned and one 2-byte misaligned qkv (odd row stride too): two keys of one kernel
    wide = torch.randn(2, L, 3 * C + 1, generator=g).cuda().half()
    qkvs = (wide[..., :3 * C].contiguous(), wide[..., 1:])
    logit_scale = torch.randn(H, 1, 1, generator=g).cuda() * 0.3 + 2.5
    tables = [torch.randn(47 * 47, H, generator=g).cuda() for _ in range(3)]
    index = torch.randint(0, 47 * 47, (576, 576), generator=g).cuda()
    coords = torch.randn(47 * 47, 2, generator=g).cuda()
    w0, b0, w2 = (torch.randn(*s, generator=g).cuda() for s in ((512, 2), (512,), (H, 512)))
    norm = torch.nn.LayerNorm(C).cuda()
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 300, C, generator=g).cuda()
    branches = (torch.randn(2, 300, C, generator=g).cuda(),
                torch.randn(1 + 2 * 300 * C, generator=g).cuda()[1:].view(2, 300, C))   # 4-byte misaligned
    region_ids = fb.shifted_window_region_ids(img, win, 12).cuda()
    # windows of 49 tokens, each its own region (ids spread wider than the one-hot mask's columns), one token zero
    isolated = torch.randn(4, 49, 3 * 64, generator=g).cuda().half()
    isolated[:, 3] = 0
    token_regions = torch.arange(49, dtype=torch.int32).repeat(4, 1).cuda()
    small_bias = torch.randn(2, 49, 49, generator=g).cuda()

    def calls():
        bias = fb.bias_from_table(tables, [index] * 3)
        table = fb.cpb_table([coords] * 2, [w0] * 2, [b0] * 2, [w2] * 2)
        outs = [fb.flash_bias_attention(qkv, H, logit_scale, bias=bias[1].half(), region_ids=region_ids,
                                        image_size=img, window_size=win, shift_size=12) for qkv in qkvs]
        outs.append(fb.flash_bias_attention(isolated, 2, logit_scale[:2], bias=small_bias, region_ids=token_regions))
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):   # the norm's weights need no grad
            normed = [t for branch in branches for t in fb.residual_layer_norm(x, branch, norm)]
        return [bias, table, *outs, *normed]
    return calls


@pytest.mark.skipif(not CUDA, reason="the direct launch runs compiled kernels on CUDA")
def test_direct_launches_equal_triton_launches_bit_for_bit(monkeypatch):
    calls = kernel_calls()

    if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 3):
        pytest.skip("Triton < 3.3: every eager launch goes through kernel[grid]")
    assert fb._DIRECT_LAUNCH, f"Triton {triton.__version__} has no triton.knobs: every launch goes through kernel[grid]"
    monkeypatch.setattr(fb, "BIND_LAUNCHES", False)
    through_triton = calls()
    monkeypatch.setattr(fb, "BIND_LAUNCHES", True)
    calls()   # binds each key
    kernels = (fb._flash_bias_fwd, fb._residual_layer_norm_fwd, fb._bias_from_table_fwd, fb._cpb_table_fwd)
    bound = {id(b.kernel): b for b in fb._BOUND.values()}
    assert all(id(k) in bound for k in kernels), (
        f"not launched directly: {[k.fn.__name__ for k in kernels if id(k) not in bound]}; "
        f"bound: {[b.kernel.fn.__name__ for b in fb._BOUND.values()]}")
    keys = [len(bound[id(k)].launches) for k in kernels]
    direct = calls()
    assert keys[0] >= 2 and keys[1] >= 2 and min(keys) >= 1
    for a, b in zip(through_triton, direct):
        assert torch.equal(a, b)


def test_dependent_launch_only_for_eager_gpu_launches(monkeypatch):
    """Eager launches on a GPU that has Programmatic Dependent Launch are dependent; torch.compile's (wrap), the
    interpreter's, a CPU tensor's and every launch with DEPENDENT_LAUNCH off are not."""
    monkeypatch.setattr(fb, "_has_dependent_launch", lambda index: True)
    monkeypatch.setattr(fb, "DEPENDENT_LAUNCH", True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    gpu = torch.device("cuda", 0)
    assert fb._dependent_launch(gpu, None) == {"DEPENDENT": True, "launch_pdl": True}
    assert fb._dependent_launch(gpu, torch.library.wrap_triton) == {"DEPENDENT": False}
    assert fb._dependent_launch(torch.device("cpu"), None) == {"DEPENDENT": False}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fb._dependent_launch(gpu, None) == {"DEPENDENT": False}
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(fb, "DEPENDENT_LAUNCH", False)
    assert fb._dependent_launch(gpu, None) == {"DEPENDENT": False}


def test_the_test_session_can_run_with_dependent_launches(monkeypatch):
    """FLASHBIAS_TEST_DEPENDENT_LAUNCH=1 turns the flag on for a test session (benchmarks/gpu_checks.sh
    dependent_on); any other value leaves the default."""
    import conftest
    monkeypatch.setattr(fb, "DEPENDENT_LAUNCH", False)
    conftest.apply_test_settings({"FLASHBIAS_TEST_DEPENDENT_LAUNCH": "0"})
    assert fb.DEPENDENT_LAUNCH is False
    conftest.apply_test_settings({"FLASHBIAS_TEST_DEPENDENT_LAUNCH": "1"})
    assert fb.DEPENDENT_LAUNCH is True


@pytest.mark.skipif(not CUDA, reason="dependent launches run on CUDA")
def test_dependent_launches_equal_ordinary_launches_bit_for_bit(monkeypatch):
    """On a GPU of compute capability 9 or more the kernels launch dependent (each waits for its predecessor inside);
    their results are those of ordinary launches, bit for bit."""
    if torch.cuda.get_device_capability() >= (9, 0):
        assert fb._has_dependent_launch(torch.cuda.current_device()), (
            f"Triton {triton.__version__} has no launch_pdl option: no dependent launches on this GPU")
    calls = kernel_calls()
    monkeypatch.setattr(fb, "DEPENDENT_LAUNCH", False)
    ordinary = calls()
    monkeypatch.setattr(fb, "DEPENDENT_LAUNCH", True)
    dependent = calls()
    for a, b in zip(ordinary, dependent):
        assert torch.equal(a, b)
