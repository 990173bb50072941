"""FlashBias at run time, for the drop-ins (swin_transformer_v2.py, swin_transformer.py) and flash_bias_adapters.py:
each attention layer's bias state (:class:`LayerBias`), a model's settings (:class:`FlashBiasSettings`), the whole
forward replayed from CUDA graphs (:class:`ForwardGraphs`), factor files matched to a model's layers, and the one
log line that says which bias a model runs.

Nothing here knows how a bias is computed. A drop-in's ``WindowAttention`` takes part through

    flash_bias                          its LayerBias (not in the state dict)
    bias_weights()                      {name: tensor} its relative-position bias is derived from, in a fixed order;
                                        the factor files' checksum covers these values in this order, and the names
                                        say which model family the bias is of (flash_bias_factors.BIAS_WEIGHTS)
    derive_bias(center_rows, dtype)     the exact bias (num_heads, N, N) of the current weights
    num_heads, window_size, fused_attn, use_fused_attn(x)

and its model through ``flash_bias_settings`` (a FlashBiasSettings), replaced by :func:`configure`.
"""
import collections
import contextlib
import itertools
import logging
import os
import sys
from typing import NamedTuple

import torch
import torch.nn as nn

try:  # inside the official `models` package, or as top-level modules
    from .flash_bias_triton import GraphInput, autocast_dtype, tracing_or_exporting
    from . import flash_bias_factors as factor_files
except ImportError:
    from flash_bias_triton import GraphInput, autocast_dtype, tracing_or_exporting
    import flash_bias_factors as factor_files

__all__ = ["LayerBias", "FlashBiasSettings", "ForwardGraphs", "WeightStamp", "bias_checksum", "configure",
           "window_attention_layers", "has_hooks", "flash_bias_summary", "load_bias_factors", "save_bias_factors"]

_logger = logging.getLogger("flash_bias")


def _log(message, level=logging.INFO):
    """Rank 0 only. Shown by default, as the official main.py shows its own messages (on stdout, unless the
    application configured logging itself); silence with logging.getLogger("flash_bias").setLevel(logging.WARNING)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    if not _logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[%(asctime)s flash_bias] %(levelname)s %(message)s"))
        _logger.addHandler(handler)
        _logger.propagate = False
    if _logger.level == logging.NOTSET:
        _logger.setLevel(logging.INFO)
    _logger.log(level, message)


def bias_checksum(attn):
    """sha256 hex of attn.bias_weights() as float32 bytes, in order: the weights a layer's bias is derived from
    (SwinV2: cpb_mlp[0].weight, cpb_mlp[0].bias, cpb_mlp[2].weight, relative_coords_table, relative_position_index;
    Swin V1: relative_position_bias_table, relative_position_index)."""
    return factor_files.weights_checksum(attn.bias_weights().values())


class WeightStamp(NamedTuple):
    """The weights a layer's low-rank factors were made for: device, dtypes and values (compared by value, so
    in-place writes that bypass the version counter, e.g. through .data or in inference mode, are seen)."""
    device: torch.device
    dtypes: tuple
    values: torch.Tensor  # every weight flattened into one float32 vector

    @classmethod
    def of(cls, attn):
        weights = list(attn.bias_weights().values())
        values = torch.cat([t.detach().reshape(-1).float() for t in weights])
        return cls(weights[0].device, tuple(t.dtype for t in weights), values)

    def matches(self, attn):
        now = WeightStamp.of(attn)
        return (now.device, now.dtypes) == (self.device, self.dtypes) and torch.equal(now.values, self.values)


class LayerBias:
    """FlashBias: how one WindowAttention gives its relative position bias to the kernel (not in the state dict).

    exact (the default): derived from the current weights in every fused forward (derive_bias), so no route new
        weights take -- load_state_dict, writes through .data, inference mode, .half() -- can leave it stale;
    low-rank: factors (q_bias, k_bias), each (H, N, R), from a rank rule (``rule``) or a factor-file record
        (``record``), made for the weights in ``stamp``. Every fused forward compares the weights with the stamp
        (one small comparison and a host sync per layer); when they differ, a rule decomposes again and a file's
        record is checked again: its checksum must still match, else ValueError naming the layer.
    """

    def __init__(self, name="WindowAttention", rule=None, record=None, source=None):
        self.name = name  # qualified name in the model, for messages
        self.rule = rule  # keyword arguments of low_rank_bias_factors, or None
        self.record = record  # flash_bias_factors.LayerFactors with factors, or None
        self.source = source  # the rule's text or the factor file, for messages
        self.accepted_checksums = {record.checksum} if record is not None and record.checksum else set()
        self.stamp = None
        self.factors = None  # (q_bias, k_bias) float32 on the weights' device; None: exact
        self.factors_by_dtype = {}  # the same as kernel operands, per dtype
        self.max_logit_error = None  # of the factors, against the bias of the stamped weights

    @property
    def low_rank(self):
        return self.rule is not None or self.record is not None

    def operands(self, attn, qkv, derived=None):
        """The bias keyword arguments of flash_bias_attention for attn and this qkv; derived: this layer's exact bias
        as stage_biases derived it in this forward, or None."""
        if derived is not None:
            return {"bias": derived}
        kernel = qkv.is_cuda and qkv.dtype != torch.float64
        if self.wants_training_bias(attn):
            # training: the exact bias in float32 (its gradient reaches the bias weights as the official math's
            # does); low-rank factors carry no gradient. Keys rounded as the backward rounds them, also without
            # grad: the reentrant checkpoint's first forward must give the bits its recomputation differentiates
            # (with scaled score columns there, a SwinV2-T logit_scale gradient moved from 0.0226 to 0.0310)
            return {"bias": attn.derive_bias(dtype=torch.float32, requires_grad=True), "normalize_keys": True}
        if self.low_rank:
            if self.stamp is None or not self.stamp.matches(attn):
                self.prepare(attn)
            if self.factors is not None:
                dtype = qkv.dtype if kernel else torch.float32
                if dtype not in self.factors_by_dtype:
                    self.factors_by_dtype[dtype] = tuple(f.to(dtype).contiguous() for f in self.factors)
                return {"bias_factors": self.factors_by_dtype[dtype]}
        # for the kernel float16 with centred rows: half the bias reads, half the rounding
        return {"bias": attn.derive_bias(center_rows=kernel, dtype=torch.float16 if kernel else torch.float32)}

    @staticmethod
    def wants_training_bias(attn):
        """Whether attn takes the float32, differentiable training bias: its bias weights need a gradient and grad mode
        is on, or the layer is in training mode. The latter covers the reentrant torch.utils.checkpoint (the official
        use_checkpoint): its first forward runs without grad, and must give the bits the recomputation differentiates
        (with the float16 inference bias there, one SwinV2-T logit_scale gradient moved from 0.0226 to 0.0288)."""
        # grad mode and training first: at inference they answer without building the weights' dict per layer
        return (torch.is_grad_enabled() or attn.training) and any(t.requires_grad for t in attn.bias_weights().values())

    @staticmethod
    def stage_biases(layers, x):
        """FlashBias: [each layer's exact bias as its operands would derive it, or None] for the attention layers of
        a stage (one shape) about to run fused at inference on x, derived together by the layers' derive_biases: on
        the kernel two launches for all where each layer would take two. None for layers that derive their own in
        operands: low-rank factors, gradients. Under torch.compile the two launches are two opaque ops (their kernels
        take a tuple of pointers, which Inductor cannot launch itself)."""
        if layers:
            stage_begins(layers[0])   # the weight copies of a stage refreshed beside the forward: wait for them
        exact = [a for a in layers if not a.flash_bias.low_rank and not LayerBias.wants_training_bias(a)]
        if len(exact) < 2 or not hasattr(type(exact[0]), "derive_biases"):
            return [None] * len(layers)
        dtype = autocast_dtype(x.device.type) or x.dtype
        kernel = x.is_cuda and dtype != torch.float64   # as operands: float16 with centred rows for the kernel
        biases = type(exact[0]).derive_biases(exact, center_rows=kernel,
                                              dtype=torch.float16 if kernel else torch.float32)
        derived = dict(zip(map(id, exact), biases))
        return [derived.get(id(a)) for a in layers]

    def prepare(self, attn):
        """Make the low-rank factors for attn's current weights (a rule), or check the file's (a record)."""
        stamp, bias = WeightStamp.of(attn), attn.derive_bias()
        if self.record is not None:
            q_bias, k_bias = self.record.q_bias, self.record.k_bias
            error = factor_files.logit_error(bias, q_bias.to(bias) @ k_bias.to(bias).transpose(-2, -1))[0]
            self._check_record(attn, error)
        else:
            q_bias, k_bias, info = factor_files.low_rank_bias_factors(bias, **self.rule)
            error = info["max_logit_error"]
        self.factors = None if q_bias is None else (q_bias.to(bias.device), k_bias.to(bias.device))
        self.factors_by_dtype = {}
        self.max_logit_error = None if q_bias is None else error
        self.stamp = stamp

    def _check_record(self, attn, error):
        checksum, weights = bias_checksum(attn), list(attn.bias_weights().values())
        if checksum in self.accepted_checksums:
            if checksum == self.record.checksum:  # the same weights rounded by .half() / .bfloat16() later: accepted
                self.accepted_checksums |= {
                    factor_files.weights_checksum([t.to(dt) if t.is_floating_point() else t for t in weights])
                    for dt in (torch.float16, torch.bfloat16)}
            return
        rounded = any(t.dtype in (torch.float16, torch.bfloat16) for t in weights)
        if self.record.checksum is not None and not rounded:
            raise ValueError(
                f"FlashBias: layer {self.name}: the bias factors from {self.source} were computed for other weights "
                f"(checksum {self.record.checksum[:12]}..., weights now {checksum[:12]}...). Decompose the bias of "
                f"these weights again, or remove the factor files.")
        # no checksum (the published code's files), or weights rounded to half precision: judged by the error
        if not error <= factor_files.PUBLISHED_MAX_LOGIT_ERROR:
            raise ValueError(
                f"FlashBias: layer {self.name}: the bias factors from {self.source} do not match this layer's weights "
                f"(max logit error {error:.3g} > {factor_files.PUBLISHED_MAX_LOGIT_ERROR}); they come from other "
                f"weights. Decompose the bias of these weights again, or remove the factor files.")

    def describe(self):
        return {"name": self.name, "mode": "exact" if self.factors is None else "low-rank",
                "rank": None if self.factors is None else int(self.factors[0].shape[-1]),
                "source": self.source if self.factors is not None else None, "max_logit_error": self.max_logit_error}


class FlashBiasSettings:
    """FlashBias: a model's settings (``set_flash_bias``, else the environment), resolved once at the first fused
    forward: nothing is read from disk or the environment at import or construction, so a checkpoint can be loaded
    first, as the official main.py does.

    rank_rule: "exact" | "rank:R" | "energy:E" | "logit:L" (flash_bias_factors.parse_rank_rule); None:
        $FLASHBIAS_RANK, else exact.
    factors_path: a factor file or folder; its factors take precedence over the rank rule. None:
        $FLASHBIAS_FACTORS_DIR (which must then hold factor files), else ./decomposed_bias of the working directory
        if it holds factor files; False: no factor files.
    cuda_graphs: replay the fused forward from CUDA graphs (ForwardGraphs). None: $FLASHBIAS_CUDA_GRAPHS ("0" off),
        else on. With graphs or without, a fused forward under CUDA's autocast that no graph replays reads
        half-precision copies of the Linear weights (ForwardGraphs.run_eagerly).
    """

    def __init__(self, rank_rule=None, factors_path=None, cuda_graphs=None):
        if rank_rule is not None:
            factor_files.parse_rank_rule(rank_rule)
        self.rank_rule = rank_rule
        self.factors_path = factors_path
        self.cuda_graphs = cuda_graphs
        self.resolved = False
        self.layers = []  # the WindowAttention layers, once resolved
        self.graphs = ForwardGraphs()

    def replay(self, model, x):
        """The model's output for x replayed from a CUDA graph, else run eagerly on the weight copies under autocast,
        or None to run the plain forward. Only where x is on CUDA, the settings are resolved (the first forward runs
        plainly), every layer runs fused with the exact bias (a low-rank layer's weight check needs the host), and
        nothing trains, needs a gradient or traces.

        A drop-in's __call__ asks first (replaying_call), before Module.__call__ and outside torch.compile; its
        forward asks again where that lane is closed (hooks on the model, forward called by name). Under
        torch.compile that is a graph break: no-grad inference replays outside the compiled graph unless the graphs
        are off. Training, gradients, graphs off and export are traced."""
        if self.graphs.in_forward:   # a capture, or an eager run on the weight copies: its forward runs plainly
            return None
        if torch.compiler.is_compiling():
            if (x.device.type not in ForwardGraphs.device_types or model.training or torch.is_grad_enabled()
                    or self.cuda_graphs is False or tracing_or_exporting()):
                return None
            return _replay_outside_the_compiler(model, x)
        return self.replay_eagerly(model, x)

    def replay_eagerly(self, model, x):
        """replay outside torch.compile."""
        if not (x.device.type in ForwardGraphs.device_types and self.resolved):
            return None
        if not self.layers[0].use_fused_attn(x) or model.training:   # use_fused_attn: False where anything traces
            return None
        if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
            return None
        if any(attn.flash_bias.low_rank or not attn.fused_attn for attn in self.layers):
            return None
        replayed = self.graphs.run(model, x) if self.cuda_graphs else None
        return replayed if replayed is not None else self.graphs.run_eagerly(model, x)

    def resolve_at_first_fused_forward(self, model, first_attn, x):
        """resolve, once: at the model's first forward whose attention (first_attn, its first WindowAttention) runs
        fused for x."""
        if not self.resolved and first_attn.use_fused_attn(x):
            self.resolve(model)

    def resolve(self, model):
        """Give every WindowAttention of the model its bias state, all checked before any is installed, and say
        once which bias the model runs."""
        layers = window_attention_layers(model)
        rule_text = self.rank_rule if self.rank_rule is not None else os.environ.get("FLASHBIAS_RANK", "exact")
        rule = factor_files.parse_rank_rule(rule_text)
        found = self._read_factor_file()
        if found is not None:
            records = _match_records(found, layers)
            states = [LayerBias(name, record=records.get(i), source=found.path if i in records else None)
                      for i, (name, _) in enumerate(layers)]
        else:
            states = [LayerBias(name, rule=rule, source=None if rule is None else f"rank rule {rule_text}")
                      for name, _ in layers]
        for state, (_, attn) in zip(states, layers):
            if state.low_rank:
                state.prepare(attn)
        for state, (_, attn) in zip(states, layers):
            attn.flash_bias = state
        if self.cuda_graphs is None:
            self.cuda_graphs = os.environ.get("FLASHBIAS_CUDA_GRAPHS", "1") != "0"
        self.layers = [attn for _, attn in layers]
        self.resolved = True
        _log_bias_modes(states)

    def _read_factor_file(self):
        path = self.factors_path
        if path is False:
            return None
        if path is None:
            path = os.environ.get("FLASHBIAS_FACTORS_DIR")  # when set, it must hold factor files
            if not path:
                default = os.path.abspath("decomposed_bias")
                if not os.path.isdir(default) or factor_files.find_factor_files(default) is None:
                    return None
                path = default
        return factor_files.read_factor_file(os.fspath(path))


def _replay_with_graphs_on(model, x):
    """FlashBiasSettings.replay_eagerly for inference where Dynamo does not trace: the settings resolved first, as
    the forward would at its first call, and None (the call goes on as usual) where the graphs are off."""
    settings = model.flash_bias_settings
    if not settings.resolved:   # walking the module tree costs ~1.7 ms at SwinV2-B: only before the first resolve
        settings.resolve_at_first_fused_forward(model, window_attention_layers(model)[0][1], x)
    return settings.replay_eagerly(model, x) if settings.cuda_graphs else None


_replay_outside_the_compiler = torch.compiler.disable(_replay_with_graphs_on)


# PyTorch's own question before a compiled module's call; where a torch lacks it, the lane stays closed
_any_global_hook = getattr(nn.modules.module, "_has_any_global_hook", lambda: True)


def has_hooks(module):
    """Whether calling module runs hooks (its own or global ones): then it must be called, not its forward."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or _any_global_hook())


def replay_model_call(model, *args, **kwargs):
    """A drop-in's model(*args, **kwargs) from its CUDA graphs, or None: the call goes on through Module.__call__.
    Only model(x) in eval, with the graphs not off and no hook on the model (hooks run in Module.__call__, which
    a replay skips; there the forward replays)."""
    settings = model.flash_bias_settings
    if (len(args) != 1 or kwargs or model.training or settings.cuda_graphs is False or settings.graphs.in_forward
            or has_hooks(model)):
        return None
    return _replay_with_graphs_on(model, args[0])


try:  # Dynamo runs a frame whose code it is told to skip as plain Python, and still evaluates the frames it calls
    from torch._dynamo.eval_frame import skip_code as _skip_frame
except ImportError:
    _skip_frame = None


def replaying_call(call, replay):
    """FlashBias: a __call__ (or forward) that first asks replay(*args, **kwargs) for the output from CUDA graphs,
    and makes the call as usual when it answers None.

    replay runs outside torch.compile (torch.compiler.disable), and Dynamo skips this lane's own frame: a compiled
    model's inference reaches the graphs with no guard evaluated and no graph break, and only torch.compile's
    wrapper adds host time. Before, the replay sat at the top of the compiled forward (guards, one graph break and
    a resumed frame). Host time of a call, SwinV2-B/384 with a no-op replay on a CPU (torch 2.11, the two versions
    alternating): 65 us eagerly and 84 us compiled before, 61 and 67 us with this lane. On an H100 (2026-12-07,
    SwinV2-T/256, B/256, B/384 at batches 1-64) compiled inference took 1.003-1.070x the graphs' wall time (3-13%
    more before), the graphs timed against themselves 0.990-1.007x: the rest is torch.compile's wrapper. Training
    and the other calls replay declines are compiled as before. Inside a function Dynamo traces (a model that holds
    this one), the lane is inlined and the replay is a graph break."""
    replay = torch.compiler.disable(replay)

    def call_replaying_first(*args, **kwargs):
        replayed = replay(*args, **kwargs)
        return call(*args, **kwargs) if replayed is None else replayed

    if _skip_frame is not None:
        _skip_frame(call_replaying_first.__code__)
    return call_replaying_first


def configure(model, rank_rule=None, factors_path=None, fused=None, cuda_graphs=None):
    """The body of a drop-in model's ``set_flash_bias`` (see there): new FlashBiasSettings, resolved at the next
    fused forward, and every layer exact until then."""
    model.flash_bias_settings = FlashBiasSettings(rank_rule, factors_path, cuda_graphs)
    for name, attn in window_attention_layers(model):
        attn.flash_bias = LayerBias(name)
        if fused is not None:
            attn.fused_attn = bool(fused)


# True: a graph reads its input where the caller's tensor lies, where it can (_Graph.check_input_in_place), instead of
# a copy into its buffer before each replay. Off until it has run on a GPU (built in a session without one); the
# copy it saves took 0.08 ms of a 26 ms SwinV2-B/384 batch-64 forward on an H100
# (benchmarks/dependent_launch_nvidia-h100-80gb-hbm3.md, "input copy").
READ_INPUT_IN_PLACE = False


class ForwardGraphs:
    """FlashBias: a model's fused forward captured in CUDA graphs and replayed: one launch instead of ~500 whose
    host time, not the GPU, bounded small batches.

    One graph per (input shape, dtype, device, autocast state), captured the second time that key is seen (a
    one-off shape, such as an eval loop's partial last batch, runs eagerly and costs no graph memory); at most
    MAX_GRAPHS, the least recently used dropped. All share one memory pool. The input is read where it lies where
    the graph allows (_Graph.check_input_in_place: the drop-ins' patch embedding reads it at an address in device
    memory, see flash_bias_triton.GraphInput), else copied into the graph's buffer; the output is cloned out, so a
    result the caller keeps is never overwritten by a later replay.

    The graphs read every parameter and buffer where it was at capture: when any gets new storage (.to(),
    .half(), a reassigned Parameter, load_state_dict(assign=True)) all graphs are dropped. In-place updates need
    nothing: the exact bias is derived inside the graph, and the half-precision weight copies made
    (_LinearWeightCopies), from the weights as they are at each replay. The graphs of one autocast dtype share
    one set of copies (replays run one at a time, as their shared memory pool requires).
    """
    MAX_GRAPHS = 4
    device_types = ("cuda",)  # where forwards are replayed (tests set ("cpu",) with a fake capture)

    def __init__(self, capture=None):
        self.capture = capture or _capture_cuda_graph  # tests give a fake
        self.entries = collections.OrderedDict()  # key -> _Graph
        self.seen = collections.OrderedDict()  # keys seen once, not captured yet
        self.tensors, self.tensors_version = [], None  # the model's parameters and buffers, gathered once
        self.storage = None
        self.pool = None
        self.weight_copies = {}  # autocast dtype -> _LinearWeightCopies, one set for the graphs and eager runs of it
        self.in_forward = False  # a capture or an eager run on the copies is under way (its forward runs plainly)

    def run(self, model, x):
        """model(x) from a graph, or None: run eagerly (a key seen the first time)."""
        self._check_storage(model)
        key = (tuple(x.shape), tuple(x.stride()), x.dtype, x.device, _autocast_state())
        entry = self.entries.get(key)
        if entry is None:
            if key not in self.seen:
                self.seen[key] = True
                while len(self.seen) > 4 * self.MAX_GRAPHS:
                    self.seen.popitem(last=False)
                return None
            entry = self._capture(model, x, key)
        self.entries.move_to_end(key)
        entry.take_input(x)
        self.in_forward = True   # a graph runs no Python; a test's fake replay runs the forward again, plainly
        try:
            entry.replay()
        finally:
            self.in_forward = False
        return entry.static_output.clone()

    def run_eagerly(self, model, x):
        """model(x) run eagerly with its Linear layers holding the weight copies of the autocast dtype (refreshed from
        the parameters first, in one launch), or None without CUDA's autocast or for a graph target that is no
        nn.Module. Against autocast's ~150 casts one by one, an eager SwinV2-B/384 forward at batch 1 took 5-9 ms less
        host time (H100 host, alternating runs; F.linear took 58 us a call), and at batch 64 the casts' 0.41 ms of GPU
        time became one 0.20 ms copy."""
        enabled, dtype, _ = _autocast_state()
        if not enabled or not isinstance(model, nn.Module):
            return None
        self._check_storage(model)
        weights = self._weight_copies(model, dtype)
        self.in_forward = True   # the forward below comes back through replay: there it runs plainly
        try:
            with weights.held():
                return model.forward(x)   # not model(x): the model's hooks run once, around the call that replays
        finally:
            self.in_forward = False

    def _check_storage(self, model):
        """Drop the graphs and weight copies when any parameter or buffer of the model has new storage."""
        # walking the module tree costs ~1.7 ms at SwinV2-B (0.08 ms for the list): gather it again only when a
        # parameter, buffer or submodule was (re)assigned anywhere; new storage of the same objects shows in data_ptr
        if self.tensors_version != _registrations[0]:
            self.tensors = list(itertools.chain(model.parameters(), model.buffers()))
            self.tensors_version = _registrations[0]
        # addresses alone: a new dtype (.half()) is new storage, made while the old is still held, so at a new address
        storage = list(map(torch.Tensor.data_ptr, self.tensors))   # 27 us for 477 tensors (a comprehension: 34)
        if storage != self.storage:
            self.entries.clear()
            self.weight_copies.clear()
            self.storage, self.pool = storage, None

    def _weight_copies(self, model, dtype):
        if dtype not in self.weight_copies:
            self.weight_copies[dtype] = _LinearWeightCopies(model, dtype)
        return self.weight_copies[dtype]

    def _capture(self, model, x, key):
        while len(self.entries) >= self.MAX_GRAPHS:
            self.entries.popitem(last=False)
        graph_input = GraphInput(x.clone())
        enabled, dtype, _ = key[-1]
        weights = None
        if enabled and isinstance(model, nn.Module):   # a drop-in (the adapters' targets keep autocast's casts)
            weights = self._weight_copies(model, dtype)

        def forward():   # the weight copies refreshed in every replay; not model(x): hooks run around the replay
            with graph_input.reading_at_address() if READ_INPUT_IN_PLACE else contextlib.nullcontext(), \
                    weights.held() if weights is not None else contextlib.nullcontext():
                return model.forward(graph_input.tensor)
        self.in_forward = True
        try:
            # autocast's weight-cast cache would hand the graph casts made outside it: cast inside, every replay
            with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
                replay, static_output, self.pool = self.capture(forward, self.pool)
            entry = _Graph(replay, graph_input, static_output, weights)
            entry.check_input_in_place(x)
        finally:
            self.in_forward = False
        self.entries[key] = entry
        self.seen.pop(key, None)
        return entry


class _Graph:
    """FlashBias: one forward captured by ForwardGraphs: its replay, its input (a GraphInput: the graph's buffer, and
    the address a kernel of the graph may read it at), its output, and the weight copies it reads (kept alive with
    it). in_place: whether replays read the caller's tensor where it lies (check_input_in_place decides, once)."""

    def __init__(self, replay, graph_input, static_output, weights):
        self.replay, self.graph_input, self.static_output, self.weights = replay, graph_input, static_output, weights
        self.in_place = False

    def check_input_in_place(self, x):
        """Let replays read their input where it lies only if the capture's patch embedding read the buffer at the
        address and a replay doing so, with the buffer poisoned with NaN, gives the bits of a replay of the buffer
        (which still holds x): then no other node of the graph reads the buffer. Two replays, once per graph."""
        graph_input = self.graph_input
        if not (graph_input.read_at_address and x.is_floating_point() and graph_input.fits(x)):
            return
        self.replay()
        expected = self.static_output.clone()
        graph_input.tensor.fill_(float("nan"))
        graph_input.point_at(x)
        self.replay()
        self.in_place = torch.equal(self.static_output, expected)
        if not self.in_place:
            graph_input.tensor.copy_(x)
            graph_input.point_at(graph_input.tensor)

    def take_input(self, x):
        """Make the next replay read x: at its address where the graph may, else copied into the graph's buffer."""
        graph_input = self.graph_input
        if self.in_place and graph_input.fits(x):
            graph_input.point_at(x)
            return
        graph_input.tensor.copy_(x)
        if self.in_place:
            graph_input.point_at(graph_input.tensor)


class _LinearWeightCopies:
    """FlashBias: a model's nn.Linear weights and biases in the autocast dtype, for its CUDA graphs and eager
    forwards. Each forward first copies every parameter into them in one multi-tensor launch, replacing the ~150 casts
    autocast makes one by one (SwinV2-B/384); during the forward the layers hold the copies in place of their
    parameters (held), so autocast finds nothing to cast. Made from the parameters inside every replay, they are
    never stale. The weights the relative-position bias is derived from (bias_weights) keep float32.

    REFRESH_BESIDE: the later stages' copies (of model.layers[1:]) are refreshed on a second stream while the first
    stage runs; each stage waits for its own at its start (stage_begins, from LayerBias.stage_biases, the first call
    of every fused stage) and only then do its layers hold them. A stage that never reports its start (not fused)
    keeps its parameters, and autocast's casts."""

    def __init__(self, model, dtype):
        keep = {id(t) for _, attn in window_attention_layers(model) for t in attn.bias_weights().values()}
        self.slots = [(m, name, p) for m in _unwrap(model).modules() if isinstance(m, nn.Linear)
                      for name, p in m.named_parameters(recurse=False)
                      if p.dtype == torch.float32 and id(p) not in keep]
        self.copies = [torch.empty_like(p, dtype=dtype) for _, _, p in self.slots]
        self.stage_of_slot, self.stage_of_attn = _stages(_unwrap(model), [m for m, _, _ in self.slots])
        self.side_stream = None
        self.pending = {}   # during a forward refreshed beside: {stage: (its slots, the event its refresh records)}

    def refresh(self, slots=None):
        """Copy the parameters of the given slots (default all) into their copies, in one multi-tensor launch."""
        if slots is None:
            if self.copies:
                torch._foreach_copy_(self.copies, [p for _, _, p in self.slots])
        elif slots:
            torch._foreach_copy_([self.copies[i] for i in slots], [self.slots[i][2] for i in slots])

    @contextlib.contextmanager
    def held(self):
        """The layers hold the copies, refreshed first, for one forward; their parameters, untouched, are put back
        after it."""
        beside = REFRESH_BESIDE and any(self.stage_of_slot)
        now = [i for i, stage in enumerate(self.stage_of_slot) if stage == 0] if beside else None
        try:
            self._hold(now)
            self.refresh(now)
            if beside:
                self._refresh_later_stages()
                _held_beside[0] = self
            yield
        finally:
            if beside:
                _held_beside[0] = None
                self.pending = {}
                if self.side_stream is not None:   # a capture needs its streams joined; eager, later writes wait
                    torch.cuda.current_stream().wait_stream(self.side_stream)
            for module, name, param in self.slots:
                module._parameters[name] = param

    def _hold(self, slots=None):
        for i in range(len(self.slots)) if slots is None else slots:
            module, name, _ = self.slots[i]
            module._parameters[name] = self.copies[i]

    def _refresh_later_stages(self):
        """Each later stage's copies refreshed on the side stream, an event recorded after each (CPU: in order)."""
        cuda = self.copies[0].is_cuda
        if cuda:
            if self.side_stream is None:
                self.side_stream = torch.cuda.Stream(self.copies[0].device)
            self.side_stream.wait_stream(torch.cuda.current_stream())
        for stage in sorted(set(self.stage_of_slot) - {0}):
            slots = [i for i, s in enumerate(self.stage_of_slot) if s == stage]
            event = torch.cuda.Event() if cuda else None
            with torch.cuda.stream(self.side_stream) if cuda else contextlib.nullcontext():
                self.refresh(slots)
                if cuda:
                    event.record()
            self.pending[stage] = (slots, event)

    def stage_begins(self, first_attn):
        """The stage of first_attn (its first attention layer) is about to run: wait for its copies, then hold them."""
        slots, event = self.pending.pop(self.stage_of_attn.get(id(first_attn)), ((), None))
        if event is not None:
            torch.cuda.current_stream().wait_event(event)
        self._hold(slots)


def _stages(model, modules):
    """([the stage of each module: i where it is in model.layers[i] (a ModuleList), else 0], {id(first attention layer
    of stage i): i})."""
    stages = getattr(model, "layers", None)
    if not isinstance(stages, nn.ModuleList):
        return [0] * len(modules), {}
    stage_of = {id(m): i for i, stage in enumerate(stages) for m in stage.modules()}
    first_attn = {}
    for _, attn in window_attention_layers(model):
        first_attn.setdefault(stage_of.get(id(attn)), attn)
    return [stage_of.get(id(m), 0) for m in modules], {id(a): i for i, a in first_attn.items() if i is not None}


# True: the weight copies of a model's later stages are refreshed on a second stream beside its first stage (see
# _LinearWeightCopies). Off until measured on a GPU (built in a session without one): the refresh took 0.20 ms of a
# SwinV2-B/384 batch-64 forward on an H100, nearly all of it the later stages' weights (benchmarks/bench_probes.py
# prices it beside stage-1 attention).
REFRESH_BESIDE = False
_held_beside = [None]   # the _LinearWeightCopies of the forward under way whose later stages refresh beside it


def stage_begins(first_attn):
    """FlashBias: a fused stage whose first attention layer is first_attn is about to run (LayerBias.stage_biases):
    with the weight copies refreshed beside the forward, its layers take theirs."""
    if _held_beside[0] is not None:
        _held_beside[0].stage_begins(first_attn)


def _capture_cuda_graph(fn, pool):
    """(replay, output, pool) of fn captured in a torch.cuda.CUDAGraph, after one warm-up call on a side stream (Triton
    compiles, cuBLAS allocates its workspace) as capture requires."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # thread-local: a data loader's pin-memory thread may use CUDA while the main thread captures
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        output = fn()
    return graph.replay, output, graph.pool()


# How many parameters, buffers and submodules were assigned to any module of the process: the CUDA graphs gather
# a model's tensors again when it moves. Process-wide hooks, as torch offers them; each costs one increment.
_registrations = [0]


def _count_registration(*args):
    _registrations[0] += 1


for _register in ("register_module_parameter_registration_hook", "register_module_buffer_registration_hook",
                  "register_module_module_registration_hook"):
    getattr(torch.nn.modules.module, _register)(_count_registration)


def _autocast_state():
    return (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
            torch.backends.cuda.matmul.allow_tf32)


def _match_records(found, layers):
    """{layer index: record with factors} of a factor file, after checking that it fits the model's layers: their
    count, names, the weights their bias is derived from (a Swin V1 file does not fit a SwinV2 model), shapes."""
    if found.num_layers is not None and found.num_layers != len(layers):
        raise factor_files.FactorFileError(f"FlashBias: {found.path} has {found.num_layers} layers, the model "
                                           f"{len(layers)}")
    matched = {}
    for i, record in found.layers.items():
        if i >= len(layers):
            raise factor_files.FactorFileError(f"FlashBias: {found.path}: factors for layer {i}, but the model has "
                                               f"{len(layers)} layers")
        name, attn = layers[i]
        if record.name is not None and record.name != name:
            raise factor_files.FactorFileError(f"FlashBias: {found.path}: layer {i} is {record.name!r}, the model's "
                                               f"is {name!r}")
        own = tuple(attn.bias_weights())
        if record.bias_weights != own:
            raise factor_files.FactorFileError(
                f"FlashBias: {found.path}: layer {i} ({name}): the factors are of a "
                f"{factor_files.describe_bias_weights(record.bias_weights)}, this layer's bias is a "
                f"{factor_files.describe_bias_weights(own)}: factors of one model family do not fit the other")
        if record.q_bias is None:
            continue
        heads, tokens = attn.num_heads, attn.window_size[0] * attn.window_size[1]
        if tuple(record.q_bias.shape[:2]) != (heads, tokens):
            raise factor_files.FactorFileError(
                f"FlashBias: {found.path}: layer {i} ({name}): q_bias has shape {tuple(record.q_bias.shape)}, "
                f"expected ({heads}, {tokens}, R)")
        matched[i] = record
    return matched


def _log_bias_modes(states):
    low = [s for s in states if s.factors is not None]
    if not low:
        _log(f"FlashBias: exact bias in all {len(states)} attention layers")
        return
    ranks = [s.factors[0].shape[-1] for s in low]
    worst = max(low, key=lambda s: s.max_logit_error)
    message = (f"FlashBias: low-rank bias factors from {worst.source} in {len(low)} of {len(states)} attention "
               f"layers (rank {min(ranks)}-{max(ranks)})"
               + (f", the exact bias in the other {len(states) - len(low)}" if len(low) < len(states) else "")
               + f"; worst logit error {worst.max_logit_error:.3g} in {worst.name}")
    if worst.max_logit_error > factor_files.LARGE_LOGIT_ERROR:
        _log(message + f" (above {factor_files.LARGE_LOGIT_ERROR}: outputs will differ visibly from the exact "
             f"model; decompose with scripts/decompose_bias.py --max-logit-error, or run exact: FLASHBIAS_RANK=exact "
             f"and no factor files)", logging.WARNING)
    else:
        _log(message)


def _unwrap(model):
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def window_attention_layers(model):
    """[(qualified name, WindowAttention)] of a drop-in model in construction order (DDP / torch.compile wrappers
    removed): the modules with a bias state (flash_bias) and bias_weights()."""
    return [(name, m) for name, m in _unwrap(model).named_modules()
            if hasattr(m, "flash_bias") and callable(getattr(m, "bias_weights", None))]


def flash_bias_summary(model):
    """Per attention layer: {"name", "mode": "exact" | "low-rank", "rank", "source", "max_logit_error"}
    (the model's settings are resolved first if no fused forward has done it yet)."""
    inner = _unwrap(model)
    settings = getattr(inner, "flash_bias_settings", None)
    if settings is not None and not settings.resolved:
        settings.resolve(inner)
    return [attn.flash_bias.describe() for _, attn in window_attention_layers(inner)]


def load_bias_factors(model, path=None):
    """Load FlashBias factor files into the model's WindowAttention layers and use them from now on.

    path: a bias_factors.npz file or a folder holding it (or the published FlashBias code's
    swin_v2_*_{q,k}_bias_<i>.npy files); None: $FLASHBIAS_FACTORS_DIR, else ./decomposed_bias. Everything is checked
    against the model's current weights (format, layer count, names, model family, shapes, values, checksums; the
    published naming by its logit error) before anything is installed: a mismatch raises ValueError naming the file
    and the layer. Layers without factors use the exact bias. Returns {layer_index: (q_bias, k_bias)}."""
    inner = _unwrap(model)
    if path is None:
        path = os.environ.get("FLASHBIAS_FACTORS_DIR") or os.path.abspath("decomposed_bias")
    settings = FlashBiasSettings("exact", os.fspath(path))
    settings.resolve(inner)
    if hasattr(inner, "flash_bias_settings"):
        inner.flash_bias_settings = settings
    layers = window_attention_layers(inner)
    return {i: attn.flash_bias.factors for i, (_, attn) in enumerate(layers) if attn.flash_bias.factors is not None}


def save_bias_factors(path, model, factors, meta=None):
    """Write a FlashBias factor file (flash_bias_factors.write_factor_file) for the model's current weights.

    path: a .npz file, or a folder (created) that gets bias_factors.npz. factors: {layer_index: (q_bias, k_bias)},
    each (H, N, R), indices as in window_attention_layers(model); absent layers stay exact. Returns the file."""
    layers = window_attention_layers(model)
    unknown = set(factors) - set(range(len(layers)))
    if unknown:
        raise ValueError(f"FlashBias: factors for layers {sorted(unknown)}, the model has {len(layers)}")
    records = []
    for i, (name, attn) in enumerate(layers):
        q_bias, k_bias = factors.get(i, (None, None))
        expected = (attn.num_heads, attn.window_size[0] * attn.window_size[1])
        if q_bias is not None and tuple(q_bias.shape[:2]) != expected:
            raise ValueError(f"FlashBias: layer {i} ({name}): q_bias has shape {tuple(q_bias.shape)}, expected "
                             f"({expected[0]}, {expected[1]}, R)")
        records.append(factor_files.LayerFactors(i, name, bias_checksum(attn), q_bias, k_bias,
                                                 bias_weights=tuple(attn.bias_weights())))
    return factor_files.write_factor_file(path, records, meta)
