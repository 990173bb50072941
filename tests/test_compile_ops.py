"""torch.compile keeps a stage's bias derivation batched: the cpb MLP of all its layers in one opaque op
(flash_bias::cpb_tables) and their gather + sigmoid in another (flash_bias::bias_from_tables), each running the eager
batched launches; one layer keeps the per-layer triton_ops. On a CPU-only machine the kernels run through Triton's
interpreter (tests/conftest.py), with FLASHBIAS_BACKEND=triton."""
import collections

import pytest
import torch

import flash_bias_triton as fb
from model_utils import TINY, make_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STAGE_OPS = ("cpb_tables", "bias_from_tables")
LAYER_OPS = ("cpb_table", "bias_from_table")


@pytest.fixture(autouse=True)
def kernel_backend(monkeypatch):
    monkeypatch.setenv("FLASHBIAS_BACKEND", "triton")
    monkeypatch.setattr(fb, "POISON_OUTPUT", True)   # an element the kernels leave unwritten is NaN
    torch._dynamo.reset()


def _op(name):
    namespace, op = fb._op_name(name).split("::")
    return getattr(getattr(torch.ops, namespace), op).default


def _compiled_op_calls(fn, *args):
    """(fn(*args) compiled in one graph, {op name: calls in the graph} for the stage and per-layer ops)."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    out = torch.compile(fn, backend=record, fullgraph=True)(*args)
    targets = collections.Counter(node.target for gm in graphs for node in gm.graph.nodes)
    return out, {name: targets[_op(name)] for name in STAGE_OPS + LAYER_OPS}


def _stages():
    """The attention layers of each stage of a TINY model (two each) on DEVICE, bias weights frozen."""
    model = make_model(TINY).to(DEVICE).requires_grad_(False)
    return [[blk.attn for blk in stage.blocks] for stage in model.layers]


def _derive_all(stages, center_rows):
    """Every stage's biases as LayerBias.stage_biases derives them (float16 with centred rows for the kernel)."""
    dtype = torch.float16 if center_rows else torch.float32
    return [type(layers[0]).derive_biases(layers, center_rows=center_rows, dtype=dtype) for layers in stages]


@pytest.mark.parametrize("layers_per_launch", [fb.MAX_LAYERS_PER_LAUNCH, 1])
@pytest.mark.parametrize("center_rows", [True, False])
def test_compiled_stage_biases_take_one_op_each_per_stage(center_rows, layers_per_launch, monkeypatch):
    monkeypatch.setattr(fb, "MAX_LAYERS_PER_LAUNCH", layers_per_launch)   # 1: a launch per layer, concatenated
    stages = _stages()
    with torch.no_grad():
        eager = _derive_all(stages, center_rows)
        compiled, calls = _compiled_op_calls(_derive_all, stages, center_rows)
        reference = _derive_all(stages, center_rows=False) if center_rows else None
    assert calls == {"cpb_tables": len(stages), "bias_from_tables": len(stages), "cpb_table": 0,
                     "bias_from_table": 0}
    for got, want, layers in zip(compiled, eager, stages):
        H, N = layers[0].num_heads, layers[0].window_size[0] * layers[0].window_size[1]
        assert got.shape == (len(layers), H, N, N) and got.stride() == want.stride() and got.dtype == want.dtype
        assert torch.equal(got, want)   # bit for bit: the same launches
    if center_rows:   # and the right values: centred 16 * sigmoid is the plain one minus 8
        for got, plain in zip(compiled, reference):
            assert torch.allclose(got.float(), plain - 8, atol=1e-2)


def test_compiled_single_layer_keeps_the_per_layer_triton_ops():
    """One layer (low-rank neighbours, derive_bias): the per-layer triton_ops, which Inductor launches itself."""
    attn = _stages()[0][0]
    with torch.no_grad():
        eager = attn.derive_bias(center_rows=True, dtype=torch.float16)
        compiled, calls = _compiled_op_calls(lambda: attn.derive_bias(center_rows=True, dtype=torch.float16))
    assert calls == {"cpb_tables": 0, "bias_from_tables": 0, "cpb_table": 1, "bias_from_table": 1}
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("fallback", ["torch backend", "gradient"])
def test_compiled_stage_biases_fall_back_as_eager(fallback, monkeypatch):
    """The PyTorch backend, and the training bias (weights that need a gradient), take the per-layer PyTorch math
    under compile too."""
    stages = _stages()[:1]
    training = fallback == "gradient"
    monkeypatch.setenv("FLASHBIAS_BACKEND", "auto" if training else "torch")
    for attn in stages[0]:
        attn.requires_grad_(training)

    def derive(layers):
        return type(layers[0]).derive_biases(layers, requires_grad=training)
    with torch.set_grad_enabled(training):
        compiled, calls = _compiled_op_calls(derive, stages[0])
    assert calls == dict.fromkeys(STAGE_OPS + LAYER_OPS, 0)
    assert compiled.requires_grad == training
    if training:
        compiled.sum().backward()
        assert all(attn.cpb_mlp[2].weight.grad is not None for attn in stages[0])
    monkeypatch.setenv("FLASHBIAS_BACKEND", "torch")
    with torch.no_grad():
        assert torch.equal(compiled.detach(), derive(stages[0]))


@pytest.mark.parametrize("layers_per_launch", [fb.MAX_LAYERS_PER_LAUNCH, 1])
@pytest.mark.parametrize("has_b0", [True, False])
def test_stage_ops_fakes_match_the_real_ops(has_b0, layers_per_launch, monkeypatch):
    """torch.library.opcheck: the fakes give the real ops' shapes, dtypes and strides ((L, T, H) stored heads first
    for the tables), also over several launches; schemas and dispatch are consistent."""
    monkeypatch.setattr(fb, "POISON_OUTPUT", False)   # opcheck compares repeated calls' outputs
    monkeypatch.setattr(fb, "MAX_LAYERS_PER_LAUNCH", layers_per_launch)
    layers = _stages()[1]
    mlps = [tuple(a.cpb_mlp) for a in layers]
    cpb_args = ([a.relative_coords_table.reshape(-1, 2) for a in layers], [m[0].weight for m in mlps],
                [m[0].bias if has_b0 else None for m in mlps], [m[2].weight for m in mlps], None, False)
    tables = _op("cpb_tables")(*cpb_args)
    assert tables.shape == (2, cpb_args[0][0].shape[0], layers[0].num_heads)
    assert tables.stride()[1] == 1 or layers_per_launch == 1   # heads first, in one launch
    torch.library.opcheck(_op("cpb_tables"), cpb_args)
    torch.library.opcheck(_op("cpb_tables"), cpb_args[:4] + (16.0, True))   # with the sigmoid taken in the table
    for center_rows, sigmoid_scale, dtype in ((True, 16.0, torch.float16), (False, None, torch.float32)):
        torch.library.opcheck(_op("bias_from_tables"), (list(tables), [a.relative_position_index for a in layers],
                                                        sigmoid_scale, center_rows, dtype))


def test_compiled_block_tail_is_one_op_with_the_eager_bits(monkeypatch):
    """torch.compile keeps a block's fused tail as its op (flash_bias::block_tail), which gives eager's bits."""
    from test_kernel import block_tail_case
    monkeypatch.setattr(fb, "BLOCK_TAIL_MAX_C", 256)
    args = block_tail_case(21, 32, torch.float16)

    def tail(*args):
        with torch.autocast(DEVICE, dtype=torch.float16):
            return fb.block_tail(*args)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    with torch.no_grad():
        eager = tail(*args)
        compiled = torch.compile(tail, backend=record, fullgraph=True)(*args)
    targets = collections.Counter(node.target for gm in graphs for node in gm.graph.nodes)
    assert targets[_op("block_tail")] == 1
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager))
