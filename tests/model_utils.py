"""Test helpers over scripts/swin_config.py: the registered test configs as SwinTransformerV2 kwargs,
trained-like drop-in models, timm's independent copy, images."""
import os
import sys
from typing import Union

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "scripts")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import swin_config  # noqa: E402
import swin_transformer_v2 as swin  # noqa: E402


def config_kwargs(name: str) -> dict:
    """The SwinTransformerV2 constructor kwargs of a registered config (scripts/swin_config.py)."""
    return swin_config.model_kwargs(swin_config.load_config(embedded=name))


# SwinV2-T-like, 64 px, window 8: shifted windows in stages 0-1, window clipped to the map in stages 2-3
TINY = config_kwargs("test_tiny")
# B-shaped (fine-tuned from smaller pre-training windows): pretrained_window_sizes rescale the coordinates
B_SHAPED = config_kwargs("test_b_shaped")
# smallest thing with a shifted window and a clipped window, for slow paths (Triton interpreter, DDP)
MINI = config_kwargs("test_mini")
# SwinV2-B/384: window 24 at 384 (stage 4 runs one 12x12 window), pretrained windows 12-12-12-6
B384 = config_kwargs("swinv2_b_384")


def make_model(config: Union[dict, str, None] = None, seed: int = 0, **overrides) -> torch.nn.Module:
    """The drop-in SwinTransformerV2 with trained-like weights (swin_config.trained_like_), eval mode,
    drop path 0 unless ``overrides`` say otherwise. config: kwargs (TINY, ...) or a registered name."""
    kwargs = config_kwargs(config) if isinstance(config, str) else dict(TINY if config is None else config)
    kwargs.update(drop_path_rate=0.0)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return swin_config.trained_like_(swin.SwinTransformerV2(**kwargs), seed).eval()


def make_timm_model(config: dict, state_dict) -> torch.nn.Module:
    """timm's independent SwinTransformerV2 with the same weights (swin_config.build_timm_model)."""
    return swin_config.build_timm_model(config, state_dict)


rel_l2 = swin_config.rel_l2


def images(n: int = 4, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_no_graph_replay_without_cuda(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Without CUDA a drop-in model's graph replay declines every call (the eager forward runs, same result each time)
    and keeps no graph."""
    with torch.no_grad():
        expected = model(x)
        for _ in range(3):
            assert model.flash_bias_settings.replay(model, x) is None
            assert torch.equal(model(x), expected)
    assert not model.flash_bias_settings.graphs.entries


class TracedOps:
    """A torch.compile backend that keeps, for each graph Dynamo hands it, the targets of its calls (as strings), and
    runs the graph as traced."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return gm

    def targets(self):
        return {t for graph in self.graphs for t in graph}


class FakeCapture:
    """Stands for flash_bias_runtime._capture_cuda_graph on the CPU: counts captures; a replay runs the captured
    function again into the same output tensor, as a graph replay writes its static output."""

    def __init__(self):
        self.captures = 0

    def __call__(self, fn, pool):
        self.captures += 1
        output = fn()
        return (lambda: output.copy_(fn())), output, pool
