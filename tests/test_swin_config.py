"""scripts/swin_config.py, the shared module: the config registry, trained-like weights, timm's copy,
the model arguments and all-or-nothing output folders. In process, small models only."""
import argparse
import math
import os

import pytest
import torch

import flash_bias_runtime as runtime
import model_utils as mu
import swin_config


def test_every_registered_config_loads():
    for name in swin_config.config_names():
        cfg = swin_config.load_config(embedded=name)
        kwargs = swin_config.model_kwargs(cfg)
        stages = kwargs.get("pretrained_window_sizes", kwargs["depths"])  # SwinV2 only
        assert len(kwargs["depths"]) == len(kwargs["num_heads"]) == len(stages)
        assert cfg.SOURCE == f"embedded:{name}" and swin_config.registered_config(name).title
        assert name in swin_config.config_names(swin_config.model_type(cfg))
    assert (swin_config.model_kwargs(swin_config.load_config(embedded="b384"))
            == swin_config.model_kwargs(swin_config.load_config(embedded="swinv2_b_384")))
    with pytest.raises(swin_config.UserError, match="give a config file .* or a registered config name"):
        swin_config.load_config()


def test_the_model_type_comes_from_the_config():
    """One registry for SwinV2 and Swin V1: MODEL.TYPE picks the drop-in, as the official models/build.py does."""
    assert swin_config.config_names("swin") == ["swin_t_224", "swin_b_384", "test_v1_tiny", "test_v1_mini"]
    assert set(swin_config.config_names("swinv2")) | set(swin_config.config_names("swin")) == set(
        swin_config.config_names())
    assert set(swin_config.SWIN_V1_CONFIGS) == set(swin_config.config_names("swin"))
    for name, kwargs in swin_config.SWIN_V1_CONFIGS.items():
        cfg = swin_config.load_config(embedded=name)
        assert kwargs == swin_config.model_kwargs(cfg) and "qk_scale" in kwargs
        assert f"({cfg.SOURCE}): Swin V1, img {kwargs['img_size']}" in swin_config.describe_config(cfg)
    assert swin_config.SWIN_V1_CONFIGS["test_v1_mini"]["window_size"] == 4
    v1 = swin_config.build_model(swin_config.load_config(embedded="test_v1_mini"))
    v2 = swin_config.build_model(swin_config.load_config(embedded="test_mini"))
    assert type(v1).__module__ == "swin_transformer" and type(v1).__name__ == "SwinTransformer"
    assert type(v2).__module__ == "swin_transformer_v2" and type(v2).__name__ == "SwinTransformerV2"
    cfg, model = swin_config.model_from_args(parse_model_args(["--embedded", "test_v1_mini", "--opts",
                                                               "MODEL.SWIN.WINDOW_SIZE", "2"]), verbose=False)
    assert swin_config.model_type(cfg) == "swin" and model.layers[0].blocks[0].attn.window_size == (2, 2)


def test_test_configs_come_from_the_registry():
    assert mu.TINY == swin_config.model_kwargs(swin_config.load_config(embedded="test_tiny"))
    assert mu.B384["window_size"] == 24 and mu.B384["pretrained_window_sizes"] == [12, 12, 12, 6]
    assert (mu.TINY["img_size"], mu.TINY["window_size"], mu.TINY["num_heads"]) == (64, 8, [2, 2, 4, 4])
    assert mu.B_SHAPED["pretrained_window_sizes"] == [6, 6, 6, 4] and mu.MINI["depths"] == [2, 2]
    model = mu.make_model("test_mini", seed=3)
    assert not model.training and all(getattr(m, "drop_prob", 0.0) == 0.0 for m in model.modules())
    same = mu.make_model(mu.MINI, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))


def test_trained_like_weights():
    model = mu.make_model(mu.MINI, seed=0)
    blocks = [m for m in model.modules() if hasattr(m, "attn")]
    norm_weights = torch.cat([torch.cat([b.norm1.weight, b.norm2.weight]) for b in blocks])
    assert norm_weights.mean().item() == pytest.approx(0.5, abs=0.03) and norm_weights.std().item() > 0.05
    for _, attn in runtime.window_attention_layers(model):
        scale = attn.logit_scale.detach()
        assert math.log(5) <= scale.min() and scale.max() <= math.log(40)
        assert attn.cpb_mlp[0].weight.std().item() == pytest.approx(1.0, rel=0.15)
        assert attn.q_bias.abs().max() > 0
    other = mu.make_model(mu.MINI, seed=1)
    assert not torch.equal(model.layers[0].blocks[0].attn.cpb_mlp[0].weight,
                           other.layers[0].blocks[0].attn.cpb_mlp[0].weight)


def test_trained_like_bias():
    bias = swin_config.trained_like_bias(3, 8, seed=4)
    assert bias.shape == (3, 64, 64) and bias.dtype == torch.float32
    assert 0 < bias.min() and bias.max() < 16 and bias.std() > 0.3        # 16 * sigmoid(.), not flat
    assert torch.equal(bias, swin_config.trained_like_bias(3, (8, 8), 0, 4))
    assert not torch.equal(bias, swin_config.trained_like_bias(3, 8, seed=5))
    assert swin_config.trained_like_bias(2, (4, 6), pretrained_window_size=3).shape == (2, 24, 24)


def test_build_timm_model_matches_the_dropin():
    model = mu.make_model(mu.MINI)
    model.set_flash_bias(fused=False, factors_path=False)
    timm_model = mu.make_timm_model(mu.MINI, model.state_dict())
    x = mu.images(2, 32)
    with torch.no_grad():
        assert mu.rel_l2(timm_model(x), model(x)) < 1e-5
    with pytest.raises(RuntimeError, match="absolute position embedding"):
        swin_config.build_timm_model(dict(mu.MINI, ape=True), model.state_dict())


def parse_model_args(argv):
    p = argparse.ArgumentParser()
    swin_config.add_model_args(p)
    return p.parse_args(argv)


def test_model_from_args():
    cfg, model = swin_config.model_from_args(parse_model_args(["--embedded", "test_mini", "--seed", "2",
                                                               "--opts", "MODEL.NUM_CLASSES", "7"]), verbose=False)
    assert cfg.MODEL.NUM_CLASSES == 7 and model.head.out_features == 7 and not model.training
    cfg, _ = swin_config.model_from_args(parse_model_args([]), default_embedded="test_mini", verbose=False)
    assert cfg.SOURCE == "embedded:test_mini"
    with pytest.raises(swin_config.UserError, match="give --cfg CONFIG.yaml --resume CHECKPOINT.pth"):
        swin_config.model_from_args(parse_model_args([]))


def test_replaced_folder(tmp_path, capsys):
    out = str(tmp_path / "out")
    with swin_config.replaced_folder(out, "marker") as folder:
        assert os.path.dirname(folder) == str(tmp_path) and ".partial-" in folder
        open(os.path.join(folder, "marker"), "w").write("1")
    assert open(os.path.join(out, "marker")).read() == "1" and "exists" not in capsys.readouterr().out
    with pytest.raises(RuntimeError):
        with swin_config.replaced_folder(out, "marker", describe=lambda f: "run one") as folder:
            open(os.path.join(folder, "marker"), "w").write("2")
            raise RuntimeError("stopped half-way")
    assert f"--out {out} exists (run one)" in capsys.readouterr().out
    assert open(os.path.join(out, "marker")).read() == "1" and sorted(os.listdir(tmp_path)) == ["out"]
    with swin_config.replaced_folder(out, "marker") as folder:
        open(os.path.join(folder, "marker"), "w").write("3")
    assert open(os.path.join(out, "marker")).read() == "3"
    assert open(os.path.join(out + ".previous", "marker")).read() == "1"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("")
    with pytest.raises(swin_config.UserError, match=r"--dest .*other is a folder with other files \(no marker\)"):
        with swin_config.replaced_folder(str(tmp_path / "other"), "marker", option="--dest"):
            pass


class _FakeClock:
    """A clock that only the timed function moves: each call advances it by ``step``."""

    def __init__(self, step):
        self.now, self.step, self.event_syncs, self.device_syncs = 0.0, step, 0, 0

    def tick(self):
        self.now += self.step
        return self.now


@pytest.mark.parametrize("sync_each", [False, True])
def test_call_ms_divides_each_sample_by_its_calls_with_cuda_events(monkeypatch, sync_each):
    """call_ms on CUDA (events faked): one value per sample, the sample's elapsed time over its calls; the host waits
    for each sample only with sync_each, and synchronises once at the end."""
    clock = _FakeClock(step=2.5)

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.t = None

        def record(self):
            self.t = clock.now

        def synchronize(self):
            clock.event_syncs += 1

        def elapsed_time(self, end):
            return end.t - self.t

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: setattr(clock, "device_syncs", clock.device_syncs + 1))
    ms = swin_config.call_ms(clock.tick, torch.device("cuda"), samples=3, calls=4, sync_each=sync_each)
    assert ms == [2.5, 2.5, 2.5]
    assert clock.now == 3 * 4 * 2.5
    assert clock.event_syncs == (3 if sync_each else 0) and clock.device_syncs == 1


def test_call_ms_and_timed_call_on_the_cpu(monkeypatch):
    """On the CPU the wall clock brackets each sample (perf_counter in seconds, results in ms); timed_call gives
    the function's result with its time."""
    clock = _FakeClock(step=0.002)
    monkeypatch.setattr(swin_config.time, "perf_counter", lambda: clock.now)
    assert swin_config.call_ms(clock.tick, torch.device("cpu"), samples=2, calls=5) == pytest.approx([2.0, 2.0])
    result, ms = swin_config.timed_call(lambda: (clock.tick(), "logits")[1], torch.device("cpu"))
    assert result == "logits" and ms == pytest.approx(2.0)
