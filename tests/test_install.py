"""scripts/install.sh (the drop-in install and --fix-official), scripts/safe_checkpoint.py and the
timm shim scripts/official_fix/flashbias_timm_compat.py. CPU only.

Tests that patch the real official code need a copy of microsoft/Swin-Transformer in
third_party/Swin-Transformer (git-ignored) and skip without it; the rest run anywhere.
"""
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
INSTALL = os.path.join(SCRIPTS, "install.sh")
OFFICIAL = os.path.join(ROOT, "third_party", "Swin-Transformer")
TIMM_0412 = os.path.join(ROOT, "third_party", "timm-0.4.12")
# the one list of drop-in files is install.sh's
DROPIN = tuple(re.search(r"^DROPIN_FILES=\((.*)\)$", open(os.path.join(ROOT, "scripts", "install.sh")).read(),
                         re.M).group(1).split())
assert DROPIN[0] == "swin_transformer_v2.py" and {"flash_bias_runtime.py", "flash_bias_factors.py"} <= set(DROPIN)
PATCHED = ("lr_scheduler.py", "utils.py", "utils_simmim.py", "utils_moe.py")
HELPERS = {"safe_checkpoint.py": os.path.join(SCRIPTS, "safe_checkpoint.py"),
           "flashbias_timm_compat.py": os.path.join(SCRIPTS, "official_fix", "flashbias_timm_compat.py")}
for p in (SCRIPTS, os.path.join(SCRIPTS, "official_fix")):
    if p not in sys.path:
        sys.path.insert(0, p)

import safe_checkpoint  # noqa: E402

needs_official = pytest.mark.skipif(
    not os.path.isfile(os.path.join(OFFICIAL, "main.py")),
    reason="needs the official code in third_party/Swin-Transformer: git clone "
           "https://github.com/microsoft/Swin-Transformer third_party/Swin-Transformer")


def env_for_scripts():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLASHBIAS_", "TORCH_FORCE"))}
    env.update(PYTHON=sys.executable, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="", PYTHONDONTWRITEBYTECODE="1")
    return env


def run(cmd, expect=0, cwd=None):
    """Run a command; returns (stdout, stderr); asserts the exit status, and no traceback on exit 2."""
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env_for_scripts(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == expect, f"{cmd} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    if expect == 2:
        assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: "), proc.stderr
    return proc.stdout, proc.stderr


def install(*args, expect=0):
    return run(["bash", INSTALL, *args], expect=expect)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def ours(name):
    return read(os.path.join(ROOT, name))


def snapshot(folder):
    """{relative path: bytes or ('link', target)} of every file under folder."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for n in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, folder)
            out[rel] = ("link", os.readlink(p)) if os.path.islink(p) else read(p)
    return out


def fake_checkout(tmp_path, name="Swin-Transformer"):
    checkout = tmp_path / name
    (checkout / "models").mkdir(parents=True)
    (checkout / "models" / "swin_transformer_v2.py").write_text("# official\n")
    (checkout / "main.py").write_text("")
    (checkout / "config.py").write_text("")
    return checkout


def backups(folder, name):
    return sorted(n for n in os.listdir(folder) if n.startswith(name + ".bak-"))


# ---------------------------------------------------------------- install.sh: the drop-in (Task A)

def test_install_and_reinstall(tmp_path):
    checkout = fake_checkout(tmp_path)
    models = checkout / "models"
    out, _ = install(checkout)
    assert "backed up the official models/swin_transformer_v2.py -> models/swin_transformer_v2.py.orig" in out
    for name in DROPIN:
        assert f"installed {name}" in out
        assert read(models / name) == ours(name)
    assert (models / "swin_transformer_v2.py.orig").read_text() == "# official\n"
    before = snapshot(checkout)
    out, _ = install(checkout)  # again: nothing to do, the backup stays the official file
    for name in DROPIN:
        assert f"models/{name} is already this FlashBias version; nothing to do" in out
    assert "nothing to do" in out.splitlines()[-1]
    assert snapshot(checkout) == before


def test_install_backs_up_edited_and_older_files(tmp_path):
    checkout = fake_checkout(tmp_path)
    models = checkout / "models"
    (models / "flash_bias_triton.py").write_text("# an older FlashBias kernel file\n")
    out, _ = install(checkout)
    [old_kernel] = backups(models, "flash_bias_triton.py")
    assert f"backed up -> models/{old_kernel}" in out
    assert (models / old_kernel).read_text() == "# an older FlashBias kernel file\n"
    # the user edits our installed copy, twice: each edit is kept, no backup is overwritten
    for k in range(2):
        (models / "swin_transformer_v2.py").write_text(f"# my edit {k}\n")
        out, _ = install(checkout)
        assert "models/swin_transformer_v2.py differs from this FlashBias version" in out
        assert read(models / "swin_transformer_v2.py") == ours("swin_transformer_v2.py")
    kept = backups(models, "swin_transformer_v2.py")
    assert sorted((models / n).read_text() for n in kept) == ["# my edit 0\n", "# my edit 1\n"]
    assert (models / "swin_transformer_v2.py.orig").read_text() == "# official\n"
    assert backups(models, "flash_bias_triton.py") == [old_kernel]


def test_install_older_copy_is_not_taken_for_the_official_file(tmp_path):
    checkout = fake_checkout(tmp_path)
    models = checkout / "models"
    (models / "swin_transformer_v2.py").write_text("# FlashBias patch, an older version copied by hand\n")
    out, _ = install(checkout)
    [kept] = backups(models, "swin_transformer_v2.py")
    assert f"backed up -> models/{kept}" in out and "backed up the official" not in out
    assert not (models / "swin_transformer_v2.py.orig").exists()
    assert read(models / "swin_transformer_v2.py") == ours("swin_transformer_v2.py")


def test_install_official_file_already_backed_up(tmp_path):
    checkout = fake_checkout(tmp_path)
    models = checkout / "models"
    install(checkout)
    shutil.copy(models / "swin_transformer_v2.py.orig", models / "swin_transformer_v2.py")  # user went back
    out, _ = install(checkout)
    assert "is the official file, already backed up as models/swin_transformer_v2.py.orig" in out
    assert backups(models, "swin_transformer_v2.py") == []
    assert read(models / "swin_transformer_v2.py") == ours("swin_transformer_v2.py")


def test_install_keeps_a_symlink_as_the_backup(tmp_path):
    checkout = fake_checkout(tmp_path)
    models = checkout / "models"
    elsewhere = tmp_path / "my_kernel.py"
    elsewhere.write_text("# mine\n")
    os.symlink(elsewhere, models / "flash_bias_triton.py")
    install(checkout)
    [kept] = backups(models, "flash_bias_triton.py")
    assert os.readlink(models / kept) == str(elsewhere)
    assert elsewhere.read_text() == "# mine\n"  # not written through the link
    assert not os.path.islink(models / "flash_bias_triton.py")
    assert read(models / "flash_bias_triton.py") == ours("flash_bias_triton.py")


def test_install_errors(tmp_path):
    checkout = fake_checkout(tmp_path)
    (checkout / "models" / "flash_bias_factors.py").mkdir()
    before = snapshot(checkout)
    _, err = install(checkout, expect=2)
    assert "models/flash_bias_factors.py exists and is not a file" in err
    assert snapshot(checkout) == before  # checked before changing anything
    not_checkout = tmp_path / "elsewhere"
    (not_checkout / "models").mkdir(parents=True)
    _, err = install(not_checkout, expect=2)
    assert "not a microsoft/Swin-Transformer checkout" in err and "main.py" in err
    assert os.listdir(not_checkout / "models") == []
    _, err = install(tmp_path / "no_such_dir", expect=2)
    assert "no_such_dir is not a directory" in err
    _, err = install(expect=2)
    assert "no checkout given" in err
    _, err = install("--bogus", checkout, expect=2)
    assert "unknown option --bogus" in err
    _, err = install(checkout, not_checkout, expect=2)
    assert "give one checkout" in err
    _, err = install("--undo", checkout, expect=2)
    assert "--undo undoes --fix-official" in err


def test_install_help():
    out, _ = install("--help")
    for word in ("--fix-official", "--undo", "flash_bias_runtime.py", "flash_bias_factors.py", ".orig", ".bak-",
                 ".flashbias-orig", "safe_checkpoint", "lr_scheduler.py", "PYTHON"):
        assert word in out, word


def test_fix_official_refuses_unknown_files(tmp_path):
    checkout = fake_checkout(tmp_path)  # official-looking, but its files are not the official ones
    for name in PATCHED:
        (checkout / name).write_text("# someone's version\n")
    before = snapshot(checkout)
    _, err = install("--fix-official", checkout, expect=2)
    for name in PATCHED:
        assert f"{name} is neither the official version" in err
    assert "Nothing was changed" in err
    assert snapshot(checkout) == before
    (checkout / "utils_moe.py").unlink()
    _, err = install("--fix-official", checkout, expect=2)
    assert "utils_moe.py is missing" in err


# ---------------------------------------------------------------- safe_checkpoint.py

def trainer_checkpoint():
    from yacs.config import CfgNode
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    config = CfgNode({"MODEL": CfgNode({"NAME": "tiny", "DROP": 0.1, "DEPTHS": [2, 2]}),
                      "TRAIN": CfgNode({"EPOCHS": 30, "BETAS": (0.9, 0.999), "RESUME": None, "AMP": True})})
    config.freeze()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "config": config, "epoch": 3,
            "max_accuracy": 81.25, "scaler": {"scale": 65536.0, "_growth_tracker": 0},
            "extra": {"half": torch.arange(4, dtype=torch.bfloat16), "ids": {1, 2}, "raw": b"\x00\xff"}}


def assert_same(a, b):
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("zip_format", [True, False])
def test_safe_loader_round_trip(tmp_path, zip_format):
    pytest.importorskip("yacs")
    ckpt = trainer_checkpoint()
    path = tmp_path / "ckpt_epoch_3.pth"
    torch.save(ckpt, path, _use_new_zipfile_serialization=zip_format)
    loaded = safe_checkpoint.load_checkpoint(path, map_location="cpu")
    assert_same(ckpt, loaded)
    assert loaded["config"].is_frozen() and loaded["config"].TRAIN.BETAS == (0.9, 0.999)


def test_plain_torch_load_refuses_trainer_checkpoints(tmp_path):
    """Why the safe loader exists: PyTorch >= 2.6 loads weights-only by default."""
    pytest.importorskip("yacs")
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 6):
        pytest.skip("torch.load is weights-only by default from PyTorch 2.6")
    torch.save(trainer_checkpoint(), tmp_path / "c.pth")
    with pytest.raises(Exception, match="CfgNode"):
        torch.load(tmp_path / "c.pth")


class Payload:
    """A pickle that runs a command when loaded (what a malicious checkpoint does)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_safe_loader_refuses_code(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "x": Payload(marker)}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(safe_checkpoint.UnsafeCheckpointError) as e:
        safe_checkpoint.load_checkpoint(path)
    assert e.value.global_name in ("posix.system", "nt.system")
    assert str(path) in str(e.value) and "refused to load" in str(e.value)
    assert not marker.exists()  # nothing ran
    assert safe_checkpoint.allowed_global("builtins", "eval") is None
    assert safe_checkpoint.allowed_global("torch", "load") is None


def test_safe_loader_bad_files(tmp_path):
    cases = {"garbage.pth": os.urandom(4096), "empty.pth": b"", "text.pth": b"not a checkpoint\n"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(safe_checkpoint.CheckpointError, match="cannot load it as a PyTorch checkpoint") as e:
            safe_checkpoint.load_checkpoint(tmp_path / name)
        assert name in str(e.value)
    with pytest.raises(safe_checkpoint.CheckpointError, match="cannot read it"):
        safe_checkpoint.load_checkpoint(tmp_path / "missing.pth")


def test_safe_loader_command_line(tmp_path):
    pytest.importorskip("yacs")
    torch.save(trainer_checkpoint(), tmp_path / "good.pth")
    torch.save({"x": Payload(tmp_path / "pwned")}, tmp_path / "evil.pth")
    (tmp_path / "bad.pth").write_bytes(b"\x80\x02garbage")
    script = os.path.join(SCRIPTS, "safe_checkpoint.py")
    out, _ = run([sys.executable, script, tmp_path / "good.pth"])
    assert "keys: model, optimizer, config, epoch" in out
    for name, words in (("evil.pth", "posix.system"), ("bad.pth", "cannot load it as a PyTorch checkpoint")):
        _, err = run([sys.executable, script, tmp_path / name], expect=2)
        assert name in err and (words in err or "nt.system" in err)
    assert not (tmp_path / "pwned").exists()
    _, err = run([sys.executable, script], expect=2)
    assert "give one or more checkpoint files" in err
    out, _ = run([sys.executable, script, "--help"])
    assert "load_checkpoint" in out


def test_safe_loader_with_forced_weights_only(tmp_path, monkeypatch):
    torch.save({"w": torch.ones(2)}, tmp_path / "w.pth")
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")  # torch.load then refuses any pickle_module
    with pytest.raises(safe_checkpoint.CheckpointError, match="TORCH_FORCE_WEIGHTS_ONLY_LOAD is set"):
        safe_checkpoint.load_checkpoint(tmp_path / "w.pth")


# ---------------------------------------------------------------- the timm shim

def test_timm_shim_on_installed_timm():
    pytest.importorskip("timm")
    import flashbias_timm_compat as compat
    from timm.scheduler.cosine_lr import CosineLRScheduler as TimmCosine
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    s = compat.CosineLRScheduler(opt, t_initial=100, t_mul=1., lr_min=1e-5, warmup_lr_init=1e-6, warmup_t=10,
                                 cycle_limit=1, t_in_epochs=False, warmup_prefix=True)
    assert isinstance(s, TimmCosine)
    for old, new in (("t_mul", "cycle_mul"), ("decay_rate", "cycle_decay")):
        got = compat.timm_kwargs(TimmCosine, {old: 2.0}, compat._COSINE_RENAMES)
        assert list(got) in ([old], [new])  # whichever the installed timm takes
        assert compat.timm_kwargs(TimmCosine, {new: 2.0}, compat._COSINE_RENAMES) == got
    with pytest.raises(TypeError, match="given twice"):
        compat.timm_kwargs(TimmCosine, {"t_mul": 1.0, "cycle_mul": 1.0}, compat._COSINE_RENAMES)
    # timm 0.4.12's StepLR has no warm-up prefix: the decay counts from step 0
    s = compat.StepLRScheduler(opt, decay_t=30, decay_rate=0.1, warmup_lr_init=1e-6, warmup_t=10,
                               t_in_epochs=False)
    s.step_update(35)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)


# ---------------------------------------------------------------- --fix-official on the real code

@pytest.fixture
def official(tmp_path):
    copy = tmp_path / "Swin-Transformer"
    shutil.copytree(OFFICIAL, copy, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.flashbias-*",
                                                                  "safe_checkpoint.py", "flashbias_timm_compat.py"))
    return copy


@needs_official
def test_fix_official_round_trip(official):
    original = snapshot(official)
    out, _ = install("--fix-official", official)
    for name in PATCHED:
        assert f"patched {name}, lines " in out
        assert read(official / (name + ".flashbias-orig")) == original[name]
        assert "FlashBias --fix-official" in (official / name).read_text()
    assert "torch.load(" not in (official / "utils.py").read_text()
    assert "torch.load(" not in (official / "utils_moe.py").read_text()
    assert "timm.scheduler.cosine_lr" not in (official / "lr_scheduler.py").read_text()
    for name, source in HELPERS.items():
        assert f"copied {name}" in out and read(official / name) == read(source)
    fixed = snapshot(official)
    out, _ = install("--fix-official", official)  # idempotent
    assert out.strip() == f"nothing to do: {official} is already fixed (--fix-official)"
    assert snapshot(official) == fixed
    out, _ = install("--fix-official", "--undo", official)
    for name in PATCHED:
        assert f"restored the official {name}" in out
    assert snapshot(official) == original  # byte-identical, no leftovers
    out, _ = install("--fix-official", "--undo", official)
    assert "nothing to do" in out and snapshot(official) == original


@needs_official
def test_fix_official_undo_without_backups(official):
    original = snapshot(official)
    install("--fix-official", official)
    for name in PATCHED:
        (official / (name + ".flashbias-orig")).unlink()
    install("--fix-official", official)  # recognises its own patched files without the backups
    install("--fix-official", "--undo", official)  # the official text comes back from the patch
    assert snapshot(official) == original


@needs_official
def test_fix_official_refuses_edited_files(official):
    (official / "utils.py").write_text((official / "utils.py").read_text() + "# my change\n")
    before = snapshot(official)
    _, err = install("--fix-official", official, expect=2)
    assert "utils.py is neither the official version" in err and "lr_scheduler.py" not in err
    assert snapshot(official) == before  # not even the other files
    (official / "utils.py").write_bytes(before["utils.py"][: -len(b"# my change\n")])
    install("--fix-official", official)
    patched = (official / "utils_moe.py").read_text()
    (official / "utils_moe.py").write_text(patched.replace("map_location='cpu'", "map_location='cuda'", 1))
    before = snapshot(official)
    for args in (("--fix-official",), ("--fix-official", "--undo")):
        _, err = install(*args, official, expect=2)
        assert "utils_moe.py is neither" in err and "utils_moe.py.flashbias-orig" in err
        assert snapshot(official) == before
    (official / "utils_moe.py").write_text(patched)
    (official / "lr_scheduler.py.flashbias-orig").write_text("# not the official file\n")
    _, err = install("--fix-official", "--undo", official, expect=2)
    assert "lr_scheduler.py.flashbias-orig exists and is not the official lr_scheduler.py" in err


@needs_official
def test_fix_official_and_dropin_together(official):
    original = snapshot(official)
    install(official)
    install("--fix-official", official)
    install(official)  # the drop-in install leaves the fix alone and vice versa
    install("--fix-official", "--undo", official)
    now = snapshot(official)
    for name in DROPIN:
        assert now.pop(f"models/{name}") == ours(name)
    for name in ("swin_transformer_v2.py", "swin_transformer.py"):  # the official model files, kept as .orig
        assert now.pop(f"models/{name}.orig") == original.pop(f"models/{name}")
    assert now == original


SCHEDULES = textwrap.dedent("""
    import json, sys, warnings
    warnings.simplefilter("ignore")
    import torch
    from yacs.config import CfgNode as CN
    sys.path.insert(0, ".")
    import lr_scheduler
    out = {}
    for name, prefix in (("cosine", True), ("cosine", False), ("step", True), ("linear", True), ("multistep", True)):
        c = CN(dict(TRAIN=CN(dict(EPOCHS=10, WARMUP_EPOCHS=2, MIN_LR=5e-6, WARMUP_LR=5e-7, LR_SCHEDULER=CN(dict(
            NAME=name, DECAY_EPOCHS=3, DECAY_RATE=0.1, GAMMA=0.1, MULTISTEPS=[4, 7], WARMUP_PREFIX=prefix))))))
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=5e-4)
        s = lr_scheduler.build_scheduler(c, opt, 4)
        lrs = []
        for i in range(44):
            s.step_update(i)
            lrs.append(opt.param_groups[0]["lr"])
        out[f"{name}-{prefix}"] = lrs
    print(json.dumps(out))
""")


def schedules(checkout, pythonpath=None):
    import json
    env = env_for_scripts()
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run([sys.executable, "-c", SCHEDULES], cwd=checkout, env=env, capture_output=True, text=True,
                          timeout=300)
    return (json.loads(proc.stdout) if proc.returncode == 0 else None), proc.stderr


@needs_official
def test_patched_scheduler_on_installed_timm(official):
    timm = pytest.importorskip("timm")
    pytest.importorskip("yacs")
    if int(timm.__version__.split(".")[0]) == 0 and int(timm.__version__.split(".")[1]) < 5:
        pytest.skip("the official code runs unpatched on timm < 0.5")
    got, err = schedules(official)
    assert got is None and "t_mul" in err  # the bug: the official build_scheduler on timm >= 0.5
    install("--fix-official", official)
    got, err = schedules(official)
    assert got is not None, err
    step = got["step-True"]  # 0.4.12: warm-up over 8 steps from 5e-7, then x0.1 every 12 steps from step 0
    assert step[0] == pytest.approx(5e-7) and step[8] == pytest.approx(5e-4)
    assert step[12] == pytest.approx(5e-5) and step[24] == pytest.approx(5e-6)
    cos = got["cosine-True"]
    assert cos[8] == pytest.approx(5e-4) and min(cos) >= 5e-7 and cos[-1] == pytest.approx(5e-6, rel=0.2)


@needs_official
@pytest.mark.skipif(not os.path.isdir(os.path.join(TIMM_0412, "timm")),
                    reason="needs timm 0.4.12 unpacked in third_party/timm-0.4.12: pip download timm==0.4.12 "
                           "--no-deps -d /tmp/t && unzip -q /tmp/t/timm-0.4.12-*.whl -d third_party/timm-0.4.12")
def test_patched_schedules_match_timm_0412(official, tmp_path):
    pytest.importorskip("yacs")
    reference, err = schedules(OFFICIAL, pythonpath=TIMM_0412)  # the official code on its own timm
    assert reference is not None, err
    install("--fix-official", official)
    for pythonpath in (None, TIMM_0412):  # patched: on the installed timm, and on 0.4.12
        got, err = schedules(official, pythonpath)
        assert got is not None, err
        for key, lrs in reference.items():
            assert got[key] == pytest.approx(lrs, rel=1e-12, abs=0), (pythonpath, key)


RESUME = textwrap.dedent("""
    import logging, os, sys, warnings
    warnings.simplefilter("ignore")
    import torch
    sys.path.insert(0, ".")
    import config as C
    from lr_scheduler import build_scheduler
    from utils import load_checkpoint, save_checkpoint, NativeScalerWithGradNormCount
    cfg = C._C.clone(); cfg.defrost()
    cfg.OUTPUT = sys.argv[1]; cfg.TRAIN.EPOCHS = 4; cfg.TRAIN.WARMUP_EPOCHS = 1; cfg.freeze()
    log = logging.getLogger("test")

    def build():
        model = torch.nn.Linear(4, 3)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return model, opt, build_scheduler(cfg, opt, 5)

    torch.manual_seed(0)
    model, opt, sched = build()
    model(torch.randn(2, 4)).sum().backward(); opt.step(); sched.step_update(7)
    save_checkpoint(cfg, 2, model, 61.5, opt, sched, NativeScalerWithGradNormCount(), log)  # the official trainer's
    model2, opt2, sched2 = build()
    cfg.defrost(); cfg.MODEL.RESUME = os.path.join(sys.argv[1], "ckpt_epoch_2.pth"); cfg.freeze()
    acc = load_checkpoint(cfg, model2, opt2, sched2, NativeScalerWithGradNormCount(), log)
    assert torch.equal(model.weight, model2.weight) and acc == 61.5 and cfg.TRAIN.START_EPOCH == 3
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert sched2.state_dict() == sched.state_dict()
    print("resumed at epoch", cfg.TRAIN.START_EPOCH)
""")


@needs_official
def test_patched_resume_of_a_trainer_checkpoint(official, tmp_path):
    """The official save_checkpoint -> the patched load_checkpoint: model, optimizer, scheduler, epoch."""
    pytest.importorskip("timm")
    pytest.importorskip("yacs")
    pytest.importorskip("yaml")
    install("--fix-official", official)
    (tmp_path / "out").mkdir()
    out, _ = run([sys.executable, "-c", RESUME, tmp_path / "out"], cwd=official)
    assert "resumed at epoch 3" in out
