"""The CUDA-graph cache of the drop-ins (flash_bias_runtime.ForwardGraphs) on the CPU, with a fake capture that
records each capture and replays by running the captured function again: the key, when a key is captured,
invalidation on new weight storage, the cap on cached shapes, and outputs never aliased between calls. The real
graphs run in tests/test_model_gpu.py."""
import pytest
import torch

import flash_bias_runtime as runtime
from model_utils import MINI, FakeCapture, TracedOps, assert_no_graph_replay_without_cuda, images, make_model


def make(seed=0):
    model = make_model(MINI, seed=seed)
    fake = FakeCapture()
    model.flash_bias_settings.graphs = runtime.ForwardGraphs(capture=fake)
    return model, model.flash_bias_settings.graphs, fake


def test_no_graphs_without_cuda():
    assert_no_graph_replay_without_cuda(make_model(MINI), images(2, 32))


def test_capture_on_second_sight_then_replay():
    model, graphs, fake = make()
    x = images(2, 32)
    with torch.no_grad():
        expected = model(x)
        assert graphs.run(model, x) is None and fake.captures == 0  # first sight: eager
        out = graphs.run(model, x)
        assert fake.captures == 1 and torch.equal(out, expected)
        out2 = graphs.run(model, images(2, 32, seed=7))
        assert fake.captures == 1  # replayed, not captured again
        assert torch.equal(out2, model(images(2, 32, seed=7)))
        assert torch.equal(out, expected)  # the earlier result was not overwritten by the replay


def test_key_has_shape_dtype_and_autocast():
    model, graphs, fake = make()
    with torch.no_grad():
        for x in (images(2, 32), images(3, 32), images(2, 32).double()):
            model.double() if x.dtype == torch.float64 else None
            graphs.run(model, x)
            graphs.run(model, x)
    assert fake.captures == 3
    keys = list(graphs.entries)
    assert {k[0] for k in keys} == {(2, 3, 32, 32)}  # the float64 model dropped the float32 graphs
    assert keys[0][2] == torch.float64


def test_new_weight_storage_drops_the_graphs_in_place_updates_do_not():
    model, graphs, fake = make()
    x = images(2, 32)
    with torch.no_grad():
        graphs.run(model, x)
        graphs.run(model, x)
        model.load_state_dict(make_model(MINI, seed=1).state_dict())  # in place: same storage
        graphs.run(model, x)
        assert fake.captures == 1 and len(graphs.entries) == 1
        attn = model.layers[0].blocks[0].attn
        attn.logit_scale = torch.nn.Parameter(attn.logit_scale.detach().clone())  # new storage
        assert graphs.run(model, x) is None and not graphs.entries  # dropped; the key starts over
        assert torch.equal(graphs.run(model, x), model(x)) and fake.captures == 2
        model.head.weight.data = model.head.weight.data.clone()  # new storage, no registration
        assert graphs.run(model, x) is None and not graphs.entries


def test_at_most_max_graphs():
    model, graphs, fake = make()
    with torch.no_grad():
        for batch in range(1, runtime.ForwardGraphs.MAX_GRAPHS + 3):
            x = images(batch, 32)
            graphs.run(model, x)
            graphs.run(model, x)
    assert fake.captures == runtime.ForwardGraphs.MAX_GRAPHS + 2
    assert len(graphs.entries) == runtime.ForwardGraphs.MAX_GRAPHS
    assert [k[0][0] for k in graphs.entries] == list(range(3, runtime.ForwardGraphs.MAX_GRAPHS + 3))


def test_graph_switch(monkeypatch):
    model = make_model(MINI)
    assert model.flash_bias_settings.cuda_graphs is None  # read at the first fused forward
    monkeypatch.setenv("FLASHBIAS_CUDA_GRAPHS", "0")
    with torch.no_grad():
        model(images(1, 32))
    assert model.flash_bias_settings.cuda_graphs is False
    model.set_flash_bias(cuda_graphs=True)
    with torch.no_grad():
        model(images(1, 32))
    assert model.flash_bias_settings.cuda_graphs is True


def test_linear_weight_copies_for_the_graphs():
    """The graphs' half-precision copies: every nn.Linear's weight and bias except the cpb MLP's (the bias is derived
    in float32), refreshed from the parameters, and held by the layers only during a forward (held)."""
    model = make_model(MINI)
    copies = runtime._LinearWeightCopies(model, torch.bfloat16)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    cpb = {id(p) for m in model.modules() if hasattr(m, "cpb_mlp") for p in m.cpb_mlp.parameters()}
    expected = {id(p) for m in linears for p in m.parameters(recurse=False)} - cpb
    assert cpb and {id(p) for _, _, p in copies.slots} == expected
    with torch.no_grad():
        for p in model.parameters():
            p.data.mul_(1.5)   # through .data: the next refresh reads the parameters as they are
    qkv = model.layers[0].blocks[0].attn.qkv
    weight = qkv.weight
    with pytest.raises(RuntimeError, match="capture failed"):
        with copies.held():
            assert qkv.weight.dtype == torch.bfloat16 and qkv.weight is not weight
            assert model.layers[0].blocks[0].attn.cpb_mlp[0].weight.dtype == torch.float32
            raise RuntimeError("capture failed")
    for (_, _, p), c in zip(copies.slots, copies.copies):
        assert c.dtype == torch.bfloat16 and torch.equal(c, p.to(torch.bfloat16))
    assert qkv.weight is weight and isinstance(qkv.weight, torch.nn.Parameter)


def test_later_stages_take_their_weight_copies_at_their_start(monkeypatch):
    """REFRESH_BESIDE: the first stage's layers hold their copies from the forward's start, a later stage's from its
    start (LayerBias.stage_biases), each refreshed; a stage that never reports its start keeps its parameters (and
    autocast's casts); all are put back after. (CPU: the same order on one stream.)"""
    monkeypatch.setattr(runtime, "REFRESH_BESIDE", True)
    model = make_model(MINI)
    copies = runtime._LinearWeightCopies(model, torch.bfloat16)
    first, later = (model.layers[i].blocks[0].attn for i in (0, 1))
    assert sorted(set(copies.stage_of_slot)) == [0, 1] and copies.stage_of_slot[-2:] == [0, 0]   # the head's
    with torch.no_grad():
        for p in model.parameters():
            p.data.mul_(1.5)
    merging = model.layers[0].downsample.reduction   # used at the end of the first stage: held from the start
    later_fc2 = model.layers[1].blocks[-1].mlp.fc2
    with copies.held():
        assert {first.qkv.weight.dtype, merging.weight.dtype, model.head.weight.dtype} == {torch.bfloat16}
        assert later.qkv.weight.dtype == later_fc2.weight.dtype == torch.float32
        runtime.LayerBias.stage_biases([blk.attn for blk in model.layers[1].blocks], images(1, 8))
        assert later.qkv.weight.dtype == later_fc2.weight.dtype == torch.bfloat16
    with copies.held():
        assert later.qkv.weight.dtype == torch.float32   # never started: its parameters
    for (module, name, p), c in zip(copies.slots, copies.copies):
        assert torch.equal(c, p.to(torch.bfloat16)) and getattr(module, name) is p
    assert runtime._held_beside[0] is None


@pytest.mark.parametrize("capture", [False, True], ids=["eager", "graph"])
def test_refresh_beside_gives_the_same_bits(replays_on_cpu, monkeypatch, capture):
    """A forward on the weight copies, eager or captured, with the later stage's copies refreshed beside it (and held
    from the stage's start) gives the bits of one with all refreshed first. (CPU: one stream, the fake capture.)"""
    x = images(2, 32)
    outs, begun = {}, []
    begins = runtime._LinearWeightCopies.stage_begins
    monkeypatch.setattr(runtime._LinearWeightCopies, "stage_begins",
                        lambda self, attn: begun.append(attn) or begins(self, attn))
    for beside in (False, True):
        monkeypatch.setattr(runtime, "REFRESH_BESIDE", beside)
        model, graphs, _ = make()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outs[beside] = [graphs.run(model, x) for _ in range(3)][-1] if capture else graphs.run_eagerly(model, x)
    assert torch.equal(outs[True], outs[False])
    assert model.layers[1].blocks[0].attn in begun


def test_eager_run_on_the_weight_copies(monkeypatch):
    """Without a graph (graphs off, or a key seen the first time), a fused forward under CUDA's autocast runs eagerly
    with the layers holding the weight copies, refreshed first: the output autocast's own casts give, following
    in-place weight updates, the parameters back afterwards. (CPU: CUDA's autocast state faked, CPU autocast on;
    each step in its own autocast region, as autocast caches its casts until the region ends.)"""
    model = make_model(MINI)
    graphs = model.flash_bias_settings.graphs
    seen = []
    model.head.register_forward_hook(lambda m, i, o: seen.append(m.weight.dtype))
    head_weight = model.head.weight
    x = images(2, 32)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    with torch.no_grad():
        with autocast():
            assert graphs.run_eagerly(model, x) is None   # CUDA's autocast off: nothing to replace
            expected = model(x)
        monkeypatch.setattr(runtime, "_autocast_state", lambda: (True, torch.bfloat16, False))
        with autocast():
            out = graphs.run_eagerly(model, x)
        assert seen == [torch.float32, torch.bfloat16] and torch.equal(out, expected)
        assert model.head.weight is head_weight and not graphs.in_forward
        for p in model.parameters():
            p.data.mul_(1.1)
        with autocast():
            out = graphs.run_eagerly(model, x)
        with autocast():
            assert torch.equal(out, model(x)) and not torch.equal(out, expected)
        model.head.weight = torch.nn.Parameter(head_weight.detach().clone())   # new storage: new copies
        with autocast():
            graphs.run_eagerly(model, x)
        assert id(model.head.weight) in {id(p) for _, _, p in graphs.weight_copies[torch.bfloat16].slots}


@pytest.fixture
def replays_on_cpu(monkeypatch):
    """Replays allowed on the CPU, with CUDA's autocast state faked (bfloat16 on)."""
    monkeypatch.setattr(runtime.ForwardGraphs, "device_types", ("cpu",))
    monkeypatch.setattr(runtime, "_autocast_state", lambda: (True, torch.bfloat16, False))


def test_compiled_inference_replays_beside_the_compiler(replays_on_cpu):
    """Under torch.compile, no-grad inference runs the graphs' replay outside the compiled graph: nothing of the
    forward is traced, the settings resolve at the first compiled call, and a key is captured at its second sight
    as in eager; training and graphs off are traced. (CPU: replays allowed on the CPU, a fake capture, CUDA's
    autocast state faked, CPU autocast on.)"""
    model, _, fake = make()
    x = images(2, 32)
    traced = TracedOps()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=traced)
    torch._dynamo.utils.counters.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [compiled(x) for _ in range(3)]
        assert model.flash_bias_settings.resolved and fake.captures == 1
        expected = model(x)
    # the model's __call__ replays before Dynamo sees a frame: no guards, no graph break, nothing traced
    assert not traced.graphs and not torch._dynamo.utils.counters["frames"], dict(torch._dynamo.utils.counters)
    assert all(torch.equal(out, expected) for out in outs)
    model.set_flash_bias(cuda_graphs=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        compiled(x)
    assert traced.targets()
    traced.graphs.clear()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compiled(x)
    assert traced.targets() and fake.captures == 1
    torch._dynamo.reset()


def test_graph_reads_its_input_where_it_lies(replays_on_cpu, monkeypatch):
    """The drop-in's graph reads the caller's tensor at its address (flash_bias_triton.GraphInput) once a replay doing
    so, with the graph's buffer poisoned with NaN, gave a plain replay's bits: later replays copy nothing into the
    buffer and give the eager bits. An input 4 bytes off 16-byte alignment is copied into the buffer and read there.
    (CPU: the kernels in Triton's interpreter, the fake capture replaying by running the captured forward again.)"""
    monkeypatch.setenv("FLASHBIAS_BACKEND", "triton")
    monkeypatch.setattr(runtime, "READ_INPUT_IN_PLACE", True)
    model, graphs, fake = make()
    x, y = images(2, 32), images(2, 32, seed=5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = graphs.run_eagerly(model, y)
        graphs.run(model, x)
        assert torch.equal(graphs.run(model, x), graphs.run_eagerly(model, x)) and fake.captures == 1
        (graph,) = graphs.entries.values()
        buffer = graph.graph_input.tensor
        assert graph.in_place and torch.isnan(buffer).all()
        assert torch.equal(graphs.run(model, y), expected) and torch.isnan(buffer).all()   # nothing copied in
        misaligned = torch.empty(y.numel() + 1)[1:].view(y.shape).copy_(y)
        assert torch.equal(graphs.run(model, misaligned), expected) and torch.equal(buffer, y)
        assert torch.equal(graphs.run(model, x), graphs.run_eagerly(model, x)) and torch.equal(buffer, y)


def test_graph_copies_its_input_with_the_switch_off(replays_on_cpu, monkeypatch):
    """READ_INPUT_IN_PLACE off (the default until it has run on a GPU): no kernel reads the input at an address and
    every replay copies it into the graph's buffer."""
    monkeypatch.setenv("FLASHBIAS_BACKEND", "triton")
    model, graphs, fake = make()
    x, y = images(2, 32), images(2, 32, seed=5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        graphs.run(model, x)
        graphs.run(model, x)
        (graph,) = graphs.entries.values()
        assert not graph.graph_input.read_at_address and not graph.in_place
        assert torch.equal(graphs.run(model, y), graphs.run_eagerly(model, y))
        assert torch.equal(graph.graph_input.tensor, y)


def test_graph_that_reads_its_input_twice_copies_it(replays_on_cpu, monkeypatch):
    """Where another node of the graph reads the input as well, the check's poisoned replay differs: every replay
    copies the input into the graph's buffer, and the results stay right."""
    monkeypatch.setenv("FLASHBIAS_BACKEND", "triton")
    monkeypatch.setattr(runtime, "READ_INPUT_IN_PLACE", True)
    model, graphs, fake = make()
    features = model.forward_features
    monkeypatch.setattr(model, "forward_features", lambda x: features(x) + 0 * x.mean())
    x, y = images(2, 32), images(2, 32, seed=5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        graphs.run(model, x)
        graphs.run(model, x)
        (graph,) = graphs.entries.values()
        assert graph.graph_input.read_at_address and not graph.in_place
        assert torch.equal(graphs.run(model, y), graphs.run_eagerly(model, y))
        assert torch.equal(graph.graph_input.tensor, y)


def test_hooks_run_around_a_replay(replays_on_cpu):
    """With a forward hook on the model, model(x) goes through Module.__call__ (which runs the hooks) and the
    forward replays; without one, __call__ replays before it."""
    model, _, fake = make()
    x = images(2, 32)
    seen = []
    handle = model.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [model(x) for _ in range(3)]
        assert fake.captures == 1 and len(seen) == 3 and all(a is b for a, b in zip(seen, outs))
        handle.remove()
        assert torch.equal(model(x), outs[0]) and len(seen) == 3 and fake.captures == 1
