"""The one home of what the scripts, benchmarks and tests share about building a Swin model (SwinV2 or V1).

* Configs: :func:`load_config` reads an official ``configs/swinv2/*.yaml`` or ``configs/swin/*.yaml``
  (yacs, ``BASE: [...]`` / ``_BASE_`` files resolved relative to the yaml file) or a registered config
  (:data:`MODEL_CONFIGS`: the names users know, the benchmarks' and the tests'), then ``--opts KEY VALUE
  ...`` overrides as the official main.py does. ``MODEL.TYPE`` says which model it is: ``swinv2`` or
  ``swin`` (V1), as in the official code (:func:`model_type`); :data:`SWIN_V1_CONFIGS` is the V1
  registered configs' constructor arguments.
* The command line: :func:`add_model_args` declares ``--cfg/--resume/--embedded/--seed/--opts``,
  :func:`model_from_args` checks them and builds the model; :func:`rank_rule_option` checks a rank
  rule given with an option.
* Models: :func:`model_kwargs` (the official ``models/build.py`` arguments), :func:`build_model` (the
  drop-in of the config's type at this repository's root: ``swin_transformer_v2.SwinTransformerV2`` or
  ``swin_transformer.SwinTransformer``), :func:`build_timm_model` (timm's independent SwinV2 with the same
  weights), :func:`load_checkpoint`.
* Trained-like weights: :func:`trained_like_` gives a randomly initialised model the weight statistics
  of a trained one (SwinV2 zero-initialises the post-norm scales, which would hide attention entirely);
  :func:`trained_like_bias` is one such layer's relative-position bias.
* Measuring: :func:`smooth_images`, :func:`rel_l2`, :func:`cpu_threads`, :func:`pyplot`; :func:`call_ms`
  and :func:`timed_call`, the benchmarks' and the demo's one way of timing calls (CUDA events on a GPU).
* Output folders: :func:`replaced_folder` writes a whole folder or nothing.

User errors raise :class:`UserError`; scripts print its message and exit with status 2 (:func:`run_main`).
"""
import argparse
import contextlib
import importlib
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import yaml
from yacs.config import CfgNode

import safe_checkpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # the drop-in and flash_bias_factors live at the repository root
    sys.path.insert(0, REPO_ROOT)
import flash_bias_factors  # noqa: E402


class UserError(Exception):
    """A mistake in the user's input (file, option, checkpoint): reported without a traceback."""


def run_main(main: Callable[[], Optional[int]]) -> None:
    """Run ``main()``; a :class:`UserError` prints ``error: message`` to stderr and exits 2."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
def _backbone_defaults(**own) -> CfgNode:
    """The official defaults of MODEL.SWINV2 or MODEL.SWIN: the keys both share, plus ``own`` (a fresh node
    and fresh lists each call, so that editing one config's lists leaves the other's alone)."""
    node = CfgNode()
    node.PATCH_SIZE = 4
    node.IN_CHANS = 3
    node.EMBED_DIM = 96
    node.DEPTHS = [2, 2, 6, 2]
    node.NUM_HEADS = [3, 6, 12, 24]
    node.WINDOW_SIZE = 7
    node.MLP_RATIO = 4.0
    node.QKV_BIAS = True
    node.APE = False
    node.PATCH_NORM = True
    for key, value in own.items():
        setattr(node, key, value)
    return node


def default_config() -> CfgNode:
    """The official defaults of the keys that building a SwinV2 or a Swin V1 (and evaluating it) reads.
    Other keys of a yaml file (TRAIN, AUG, ...) are accepted and ignored."""
    cfg = CfgNode()
    cfg.DATA = CfgNode()
    cfg.DATA.IMG_SIZE = 224
    cfg.DATA.DATASET = "imagenet"
    cfg.MODEL = CfgNode()
    cfg.MODEL.TYPE = "swin"
    cfg.MODEL.NAME = "swin_tiny_patch4_window7_224"
    cfg.MODEL.NUM_CLASSES = 1000
    cfg.MODEL.DROP_RATE = 0.0
    cfg.MODEL.DROP_PATH_RATE = 0.1
    cfg.MODEL.SWINV2 = _backbone_defaults(PRETRAINED_WINDOW_SIZES=[0, 0, 0, 0])
    cfg.MODEL.SWIN = _backbone_defaults(QK_SCALE=None)
    cfg.TEST = CfgNode()
    cfg.TEST.CROP = True
    cfg.set_new_allowed(True)
    return cfg


@dataclass(frozen=True)
class RegisteredConfig:
    """A named config: a short display ``title`` and ``overrides`` of :func:`default_config`, in the yaml
    files' layout (``MODEL.TYPE`` says which model)."""
    title: str
    overrides: dict


def _swinv2(img: int, embed: int, depths, heads, window: int, name: str, pretrained=None,
            classes: Optional[int] = None) -> dict:
    model = {"TYPE": "swinv2", "NAME": name,
             "SWINV2": {"EMBED_DIM": embed, "DEPTHS": list(depths), "NUM_HEADS": list(heads), "WINDOW_SIZE": window,
                        "PRETRAINED_WINDOW_SIZES": list(pretrained or [0] * len(depths))}}
    if classes is not None:
        model["NUM_CLASSES"] = classes
    return {"DATA": {"IMG_SIZE": img}, "MODEL": model}


def _swin(img: int, embed: int, depths, heads, window: int, name: str, classes: Optional[int] = None) -> dict:
    model = {"TYPE": "swin", "NAME": name,
             "SWIN": {"EMBED_DIM": embed, "DEPTHS": list(depths), "NUM_HEADS": list(heads), "WINDOW_SIZE": window}}
    if classes is not None:
        model["NUM_CLASSES"] = classes
    return {"DATA": {"IMG_SIZE": img}, "MODEL": model}


MODEL_CONFIGS: Dict[str, RegisteredConfig] = {
    # the FlashBias paper's model: configs/swinv2/swinv2_base_patch4_window12to24_192to384_22kto1k_ft.yaml
    "swinv2_b_384": RegisteredConfig(
        "SwinV2-B/384 w24", _swinv2(384, 128, [2, 2, 18, 2], [4, 8, 16, 32], 24,
                                    "swinv2_base_patch4_window12to24_192to384_22kto1k_ft", pretrained=[12, 12, 12, 6])),
    # configs/swinv2/swinv2_base_patch4_window16_256.yaml and swinv2_tiny_patch4_window8_256.yaml
    "b256": RegisteredConfig("SwinV2-B/256 w16", _swinv2(256, 128, [2, 2, 18, 2], [4, 8, 16, 32], 16,
                                                         "swinv2_base_patch4_window16_256")),
    "t256": RegisteredConfig("SwinV2-T/256 w8", _swinv2(256, 96, [2, 2, 6, 2], [3, 6, 12, 24], 8,
                                                        "swinv2_tiny_patch4_window8_256")),
    # window 8 (N = 64): seconds per batch on a laptop CPU
    "small": RegisteredConfig("small-256 w8", _swinv2(256, 64, [2, 2, 4, 2], [2, 4, 8, 16], 8, "swinv2_small_cpu_demo")),
    # quick checks: the last stage's 4x4 map clips its window to 4
    "tiny": RegisteredConfig("tiny-128 w8", _swinv2(128, 24, [2, 2, 2, 2], [1, 2, 4, 8], 8, "swinv2_tiny_test",
                                                    classes=10)),
    # tests and the CPU benchmark: stage maps 16, 8, 4, 2, so shifted windows in stages 0-1 and windows
    # clipped to the map (no shift) in stages 2-3
    "test_tiny": RegisteredConfig("test-tiny-64 w8", _swinv2(64, 32, [2, 2, 2, 2], [2, 2, 4, 4], 8,
                                                             "swinv2_test_tiny", classes=10)),
    # tests: SwinV2-B-shaped, fine-tuned from smaller pre-training windows (they rescale the coordinates)
    "test_b_shaped": RegisteredConfig("test-b-shaped-64 w8", _swinv2(64, 32, [2, 2, 2, 2], [2, 4, 4, 8], 8,
                                                                     "swinv2_test_b_shaped", pretrained=[6, 6, 6, 4],
                                                                     classes=10)),
    # tests of slow paths (Triton interpreter, DDP): the smallest model with a shifted and a clipped window
    "test_mini": RegisteredConfig("test-mini-32 w4", _swinv2(32, 16, [2, 2], [2, 2], 4, "swinv2_test_mini",
                                                             classes=5)),
    # Swin V1 (MODEL.TYPE: swin): configs/swin/swin_tiny_patch4_window7_224.yaml and
    # swin_base_patch4_window12_384_finetune.yaml
    "swin_t_224": RegisteredConfig("Swin-T/224 w7", _swin(224, 96, [2, 2, 6, 2], [3, 6, 12, 24], 7,
                                                           "swin_tiny_patch4_window7_224")),
    "swin_b_384": RegisteredConfig("Swin-B/384 w12", _swin(384, 128, [2, 2, 18, 2], [4, 8, 16, 32], 12,
                                                            "swin_base_patch4_window12_384_finetune")),
    # V1 tests: maps 28, 14, 7, so shifted 7x7 windows in stages 0-1 and one unshifted window in stage 2; head dim 32
    "test_v1_tiny": RegisteredConfig("test-v1-tiny-112 w7", _swin(112, 32, [2, 2, 2], [1, 2, 4], 7,
                                                                  "swin_test_v1_tiny", classes=10)),
    # V1 slow paths (the Triton interpreter): maps 8, 4: a shifted 4x4 window, then one window clipped to the map
    "test_v1_mini": RegisteredConfig("test-v1-mini-32 w4", _swin(32, 32, [2, 2], [1, 2], 4, "swin_test_v1_mini",
                                                                 classes=5)),
}
# other names of registered configs
CONFIG_ALIASES = {"b384": "swinv2_b_384"}
IMAGENET22K_CLASSES = 21841

# The drop-in of each MODEL.TYPE: (module at the repository root, model class), as the official models/build.py
DROPINS = {"swinv2": ("swin_transformer_v2", "SwinTransformerV2"), "swin": ("swin_transformer", "SwinTransformer")}


def config_names(model_type: Optional[str] = None) -> List[str]:
    """Every name :func:`load_config` accepts as ``embedded`` (of one MODEL.TYPE, if given): registered
    configs, then aliases."""
    names = list(MODEL_CONFIGS) + list(CONFIG_ALIASES)
    if model_type is None:
        return names
    return [n for n in names if registered_config(n).overrides["MODEL"]["TYPE"] == model_type]


def registered_config(name: str) -> RegisteredConfig:
    """The registered config called ``name`` (or an alias of it); :class:`UserError` naming the known ones."""
    key = CONFIG_ALIASES.get(name, name)
    if key not in MODEL_CONFIGS:
        raise UserError(f"unknown config name {name!r}; registered: {', '.join(config_names())}")
    return MODEL_CONFIGS[key]


def _read_yaml_with_bases(path: str, seen: Tuple[str, ...] = ()) -> List[dict]:
    """The dicts to merge for ``path``, base files first. Base files come from ``_BASE_`` (a path
    or a list) or the official ``BASE`` list, relative to the directory of the file naming them."""
    path = os.path.abspath(path)
    if path in seen:
        raise UserError(f"config {path}: _BASE_ files include each other in a cycle")
    if not os.path.isfile(path):
        where = f" (a base of {seen[-1]})" if seen else ""
        raise UserError(f"config file not found: {path}{where}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise UserError(f"config {path} is not valid yaml: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config {path} must be a yaml mapping; got {type(data).__name__}")
    bases = []
    for key in ("_BASE_", "BASE"):
        value = data.pop(key, None)
        if value is None:
            continue
        bases += [value] if isinstance(value, str) else list(value)
    merged = []
    for base in bases:
        if base:
            merged += _read_yaml_with_bases(os.path.join(os.path.dirname(path), base), seen + (path,))
    merged.append(data)
    return merged


def _has_key(cfg: CfgNode, key: str) -> bool:
    node = cfg
    for part in key.split("."):
        if not isinstance(node, CfgNode) or part not in node:
            return False
        node = node[part]
    return True


def apply_opts(cfg: CfgNode, opts: Sequence[str]) -> None:
    """``--opts KEY VALUE ...`` over ``cfg`` (yacs merge_from_list, as the official main.py); a key
    the config does not have, an odd count or a value of the wrong type raise :class:`UserError`."""
    opts = list(opts)
    if len(opts) % 2:
        raise UserError(f"--opts takes KEY VALUE pairs; got {len(opts)} items: {' '.join(opts)}")
    for key, value in zip(opts[0::2], opts[1::2]):
        if not _has_key(cfg, key):
            raise UserError(f"--opts: unknown config key {key!r} (keys look like DATA.IMG_SIZE or "
                            f"MODEL.SWINV2.WINDOW_SIZE)")
        try:
            cfg.merge_from_list([key, value])
        except (ValueError, KeyError, AssertionError, SyntaxError) as e:
            raise UserError(f"--opts {key} {value}: {e}") from None


def model_type(cfg: CfgNode) -> str:
    """``"swinv2"`` or ``"swin"`` (V1): the config's MODEL.TYPE, as the official models/build.py reads it."""
    return str(cfg.MODEL.TYPE)


def _check_config(cfg: CfgNode, source: str) -> None:
    if model_type(cfg) not in DROPINS:
        raise UserError(f"config {source} describes MODEL.TYPE={cfg.MODEL.TYPE!r}; these scripts handle "
                        f"SwinV2 (MODEL.TYPE: swinv2) and Swin V1 (MODEL.TYPE: swin)")
    if model_type(cfg) == "swin":
        s = cfg.MODEL.SWIN
        if len(s.DEPTHS) != len(s.NUM_HEADS):
            raise UserError(f"config {source}: MODEL.SWIN.DEPTHS and NUM_HEADS need one entry per stage; got "
                            f"{list(s.DEPTHS)}, {list(s.NUM_HEADS)}")
        return
    s = cfg.MODEL.SWINV2
    if not (len(s.DEPTHS) == len(s.NUM_HEADS) == len(s.PRETRAINED_WINDOW_SIZES)):
        raise UserError(f"config {source}: DEPTHS, NUM_HEADS and PRETRAINED_WINDOW_SIZES need one entry "
                        f"per stage; got {list(s.DEPTHS)}, {list(s.NUM_HEADS)}, {list(s.PRETRAINED_WINDOW_SIZES)}")


def load_config(cfg_path: Optional[str] = None, embedded: Optional[str] = None,
                opts: Optional[Sequence[str]] = None) -> CfgNode:
    """The (frozen) config of an official yaml file or of a registered one (``embedded``, see
    :data:`MODEL_CONFIGS`), then ``opts`` (``KEY VALUE ...``). ``cfg.SOURCE`` says where it came from.

    Raises :class:`UserError` for a missing/invalid file, an unknown name or key, a value of the wrong
    type, or a model type other than swinv2 and swin."""
    if (cfg_path is None) == (embedded is None):
        raise UserError("give a config file (--cfg) or a registered config name (--embedded), one of them")
    cfg = default_config()
    if embedded is not None:
        layers, source = [registered_config(embedded).overrides], f"embedded:{embedded}"
    else:
        layers, source = _read_yaml_with_bases(cfg_path), cfg_path
    for data in layers:
        try:
            cfg.merge_from_other_cfg(CfgNode(data))
        except (ValueError, KeyError, AssertionError) as e:
            raise UserError(f"config {source}: {e}") from None
    # the official data/build.py sets the class count from the dataset: a 22k config's head has 21841
    if str(cfg.DATA.DATASET) == "imagenet22K":
        cfg.MODEL.NUM_CLASSES = IMAGENET22K_CLASSES
    if opts:
        apply_opts(cfg, opts)
        source += " --opts " + " ".join(opts)
    _check_config(cfg, source)
    cfg.SOURCE = source
    cfg.freeze()
    return cfg


def describe_config(cfg: CfgNode) -> str:
    """One line: name, model, image size, embed dim, depths, heads, window."""
    s = cfg.MODEL.SWIN if model_type(cfg) == "swin" else cfg.MODEL.SWINV2
    text = (f"{cfg.MODEL.NAME} ({cfg.SOURCE}): {'Swin V1' if model_type(cfg) == 'swin' else 'SwinV2'}, img "
            f"{cfg.DATA.IMG_SIZE}, embed {s.EMBED_DIM}, depths {list(s.DEPTHS)}, heads {list(s.NUM_HEADS)}, window "
            f"{s.WINDOW_SIZE}")
    return text if model_type(cfg) == "swin" else f"{text}, pretrained windows {list(s.PRETRAINED_WINDOW_SIZES)}"


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------
def add_model_args(parser: argparse.ArgumentParser, embedded_default: Optional[str] = None
                   ) -> argparse._ArgumentGroup:
    """Declare ``--cfg/--resume/--embedded/--seed/--opts`` (checked by :func:`model_from_args`).
    ``embedded_default`` only documents what the script uses when no model is named."""
    g = parser.add_argument_group("model: --cfg with --resume, or --embedded NAME")
    g.add_argument("--cfg", metavar="CONFIG.yaml",
                   help="official yaml config: SwinV2 (configs/swinv2/...) or Swin V1 (configs/swin/...)")
    g.add_argument("--resume", metavar="CHECKPOINT.pth", help="checkpoint of that model")
    g.add_argument("--embedded", metavar="NAME",
                   help=f"instead of --cfg: a registered config ({', '.join(config_names())}); without "
                        f"--resume it gets seeded trained-like weights"
                        + (f" (default {embedded_default})" if embedded_default else ""))
    g.add_argument("--seed", type=int, default=0, help="seed of the trained-like weights (default 0)")
    g.add_argument("--opts", nargs="+", metavar="KEY VALUE",
                   help="config overrides applied after the yaml, as the official main.py, e.g. "
                        "--opts DATA.IMG_SIZE 256 MODEL.SWINV2.WINDOW_SIZE 16")
    return g


def rank_rule_option(option: str, rule: str) -> Optional[dict]:
    """``flash_bias_factors.parse_rank_rule`` of a rule given with ``option``; :class:`UserError` naming both."""
    try:
        return flash_bias_factors.parse_rank_rule(rule)
    except ValueError as e:
        raise UserError(f"{option} {rule}: {e}") from None


def names_a_model(args: argparse.Namespace) -> bool:
    """Whether the user named a model (``--cfg`` or ``--embedded``)."""
    return args.cfg is not None or args.embedded is not None


def check_model_args(args: argparse.Namespace) -> None:
    """The combinations of ``--cfg/--resume/--embedded`` that make no sense: :class:`UserError`."""
    if args.cfg is not None and args.embedded is not None:
        raise UserError(f"give --cfg {args.cfg} or --embedded {args.embedded}, not both")
    if args.cfg is not None and args.resume is None:
        raise UserError("--cfg needs --resume CHECKPOINT.pth: these scripts work on trained weights "
                        "(--embedded NAME alone gives trained-like random ones)")
    if args.resume is not None and not names_a_model(args):
        raise UserError(f"--resume {args.resume} needs --cfg CONFIG.yaml (or --embedded NAME): a checkpoint "
                        f"does not say which model it is")


def model_from_args(args: argparse.Namespace, default_embedded: Optional[str] = None,
                    verbose: bool = True) -> Tuple[CfgNode, torch.nn.Module]:
    """(cfg, model in eval mode) from the arguments of :func:`add_model_args`; ``default_embedded``
    when none names a model (else :class:`UserError`)."""
    check_model_args(args)
    embedded = args.embedded if names_a_model(args) else default_embedded
    if args.cfg is None and embedded is None:
        raise UserError("give --cfg CONFIG.yaml --resume CHECKPOINT.pth (or --embedded NAME to try it out)")
    return build_from_args(args.cfg, args.resume, embedded=embedded, seed=args.seed, verbose=verbose,
                           opts=args.opts)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
def import_dropin(model_type: str = "swinv2"):
    """The drop-in module of a MODEL.TYPE at this repository's root: ``swin_transformer_v2`` (swinv2) or
    ``swin_transformer`` (swin)."""
    module = DROPINS[model_type][0]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"cannot import the drop-in {module}.py from {REPO_ROOT}: {e}") from None


def model_kwargs(cfg: CfgNode) -> dict:
    """The constructor arguments the official models/build.py passes for ``cfg`` (SwinTransformerV2's, or
    SwinTransformer's for MODEL.TYPE swin; the official fused_window_process, a command-line switch, is left out)."""
    common = dict(img_size=cfg.DATA.IMG_SIZE, num_classes=cfg.MODEL.NUM_CLASSES, drop_rate=cfg.MODEL.DROP_RATE,
                  drop_path_rate=cfg.MODEL.DROP_PATH_RATE)
    s = cfg.MODEL.SWIN if model_type(cfg) == "swin" else cfg.MODEL.SWINV2
    kw = dict(common, patch_size=s.PATCH_SIZE, in_chans=s.IN_CHANS, embed_dim=s.EMBED_DIM, depths=list(s.DEPTHS),
              num_heads=list(s.NUM_HEADS), window_size=s.WINDOW_SIZE, mlp_ratio=s.MLP_RATIO, qkv_bias=s.QKV_BIAS,
              ape=s.APE, patch_norm=s.PATCH_NORM)
    if model_type(cfg) == "swin":
        return dict(kw, qk_scale=s.QK_SCALE)
    return dict(kw, pretrained_window_sizes=list(s.PRETRAINED_WINDOW_SIZES))


def build_model(cfg: CfgNode) -> torch.nn.Module:
    """The drop-in model of ``cfg``'s MODEL.TYPE (freshly initialised, train mode)."""
    model_class = DROPINS[model_type(cfg)][1]
    return getattr(import_dropin(model_type(cfg)), model_class)(**model_kwargs(cfg))


# Swin V1's registered configs (MODEL.TYPE: swin) as swin_transformer.SwinTransformer constructor arguments
SWIN_V1_CONFIGS: Dict[str, dict] = {name: model_kwargs(load_config(embedded=name)) for name in config_names("swin")}


# Buffers the official model rebuilds from the config; a checkpoint may lack them or shape them differently
_REBUILT_BUFFERS = ("relative_position_index", "relative_coords_table", "attn_mask")


def build_timm_model(cfg: Union[CfgNode, dict], state_dict: Dict[str, torch.Tensor]) -> torch.nn.Module:
    """timm's independent SwinTransformerV2 (eval mode, no dropout) with the weights of ``state_dict``
    (a drop-in model's), mapped through timm's checkpoint_filter_fn. ``cfg``: a config or the
    :func:`model_kwargs` of one. Raises RuntimeError when timm cannot express the model or the weights
    do not map."""
    from timm.models.swin_transformer_v2 import SwinTransformerV2, checkpoint_filter_fn
    kw = model_kwargs(cfg) if isinstance(cfg, CfgNode) else dict(cfg)
    if kw.get("ape") or not kw.get("patch_norm", True):
        raise RuntimeError("timm's SwinTransformerV2 has no absolute position embedding and always "
                           "normalises patches (APE / PATCH_NORM)")
    depths = tuple(kw["depths"])
    model = SwinTransformerV2(
        img_size=kw["img_size"], patch_size=kw.get("patch_size", 4), in_chans=kw.get("in_chans", 3),
        num_classes=kw["num_classes"], embed_dim=kw["embed_dim"], depths=depths, num_heads=tuple(kw["num_heads"]),
        window_size=kw["window_size"], mlp_ratio=kw.get("mlp_ratio", 4.0), qkv_bias=kw.get("qkv_bias", True),
        pretrained_window_sizes=tuple(kw.get("pretrained_window_sizes") or [0] * len(depths)),
        drop_rate=0.0, drop_path_rate=0.0)
    missing, unexpected = model.load_state_dict(checkpoint_filter_fn(dict(state_dict), model), strict=False)
    missing = [k for k in missing if not k.endswith(("k_bias",) + _REBUILT_BUFFERS)]
    if missing or unexpected:
        raise RuntimeError(f"weights do not map onto timm's model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def read_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """The state dict of a checkpoint file: ``ckpt["model"]`` if present, else the file itself."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:  # the official trainer's checkpoints hold a yacs config: a plain weights_only load refuses them
        ckpt = safe_checkpoint.load_checkpoint(path, map_location="cpu")
    except safe_checkpoint.CheckpointError as e:
        raise UserError(f"cannot read checkpoint {e}") from None
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint {path} holds no model state dict (expected a dict of tensors or "
                        f"{{'model': state_dict}})")
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def checkpoint_mismatches(model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> List[str]:
    """Human-readable reasons why ``state`` is not a checkpoint of ``model`` (empty: it fits)."""
    own = model.state_dict()
    rebuilt = lambda k: k.rsplit(".", 1)[-1] in _REBUILT_BUFFERS
    problems = []
    for k, v in own.items():
        if k not in state:
            if not rebuilt(k):
                problems.append(f"{k}: missing from the checkpoint (model has {tuple(v.shape)})")
        elif tuple(state[k].shape) != tuple(v.shape) and not rebuilt(k):
            problems.append(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}")
    for k, v in state.items():
        if k not in own and not rebuilt(k):
            problems.append(f"{k}: in the checkpoint {tuple(v.shape)}, not in the model")
    return problems


def load_checkpoint(model: torch.nn.Module, path: str, cfg_name: str = "the config") -> None:
    """Load a checkpoint into ``model``; :class:`UserError` naming mismatched keys if it is a
    checkpoint of another model. Rebuilt buffers (relative_coords_table, ...) are taken from the
    checkpoint only where their shapes agree."""
    state = read_checkpoint(path)
    problems = checkpoint_mismatches(model, state)
    if problems:
        shown = "\n  ".join(problems[:6])
        more = f"\n  ... and {len(problems) - 6} more" if len(problems) > 6 else ""
        raise UserError(f"{path} is a checkpoint of another model: {len(problems)} keys do not fit "
                        f"{cfg_name}:\n  {shown}{more}")
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    model.load_state_dict(usable, strict=False)


def build_from_args(cfg_path: Optional[str], resume: Optional[str], embedded: Optional[str] = None,
                    seed: int = 0, verbose: bool = True, opts: Optional[Sequence[str]] = None
                    ) -> Tuple[CfgNode, torch.nn.Module]:
    """(cfg, model in eval mode) of a yaml file or a registered config (one of them), with the
    checkpoint ``resume`` or, when that is None, seeded trained-like weights."""
    cfg = load_config(cfg_path, embedded=embedded, opts=opts)
    torch.manual_seed(seed)
    model = build_model(cfg)
    if resume:
        load_checkpoint(model, resume, cfg_name=cfg.SOURCE)
        weights = f"checkpoint {resume}"
    else:
        trained_like_(model, seed)
        weights = f"trained-like random weights (seed {seed})"
    if verbose:
        print(f"model: {describe_config(cfg)}; {weights}", flush=True)
    return cfg, model.eval()


# ----------------------------------------------------------------------------------------------
# Trained-like random weights
# ----------------------------------------------------------------------------------------------
# SwinV2's names in the official code and timm, then in transformers
_CPB_MLP_NAMES = ("cpb_mlp", "continuous_position_bias_mlp")
_POST_NORMS = (("attn", ("norm1", "norm2")), ("attention", ("layernorm_before", "layernorm_after")))


def _cpb_mlp(module: torch.nn.Module) -> Optional[torch.nn.Sequential]:
    for name in _CPB_MLP_NAMES:
        mlp = getattr(module, name, None)
        if isinstance(mlp, torch.nn.Sequential):
            return mlp
    return None


@torch.no_grad()
def trained_like_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give ``model`` (in place; a SwinV2 or any part of one) weight statistics like a trained SwinV2:

    * linear weights ~ 0.02 N(0, 1), the patch-embedding convolution ~ 0.05 N(0, 1), q_bias / v_bias
      ~ 0.02 N(0, 1);
    * every attention's continuous-position-bias MLP: cpb_mlp[0].weight ~ N(0, 1),
      cpb_mlp[0].bias ~ 0.5 N(0, 1), cpb_mlp[2].weight ~ 0.05 N(0, 1) (a bias of several logits,
      smooth over relative positions, of some but not full rank), and logit_scale ~ U(ln 5, ln 40);
    * res-post-norm norm1/norm2 of every block: weight ~ 0.5 + 0.1 N(0, 1), bias ~ 0.02 N(0, 1)
      (SwinV2 zero-initialises them, which hides attention from the output);
    * Swin V1 attentions (a ``relative_position_bias_table``, no cpb_mlp): the table ~ 2 N(0, 1) (its
      0.02 trunc-normal init hides the bias), qkv.weight ~ 2 N(0, 1) / sqrt(C) (q.k * head_dim ** -0.5
      then has logits of order 1; 0.02 N(0, 1) gives ~0.01, which no test could see) and qkv.bias
      ~ 0.02 N(0, 1), as SwinV2's q_bias / v_bias. V1 blocks' norm1/norm2 are drawn as above.

    * every other linear bias (qkv's in Swin V1 and the query/value biases aside) ~ 0.02 N(0, 1): the official
      init zeroes them, which would hide a bias that a fused path drops (the output projection's, added by the
      LayerNorm pass after it). Drawn last, so the draws above stay as they were before.

    transformers' Swinv2 gets the same under its names (continuous_position_bias_mlp, query/value biases,
    layernorm_before/layernorm_after as the post-norms). Drawn in that order from one generator seeded with
    ``seed``; other parameters keep their initialisation."""
    gen = torch.Generator().manual_seed(seed)

    def draw(t: torch.Tensor, std: float = 1.0, mean: float = 0.0) -> None:
        t.copy_((torch.randn(t.shape, generator=gen) * std + mean).to(t))

    attentions = [m for m in model.modules() if _cpb_mlp(m) is not None]
    cpb_layers = {id(layer) for attn in attentions for layer in _cpb_mlp(attn)}
    drawn_biases = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module) not in cpb_layers:
            draw(module.weight, 0.02)
        elif isinstance(module, torch.nn.Conv2d):
            draw(module.weight, 0.05)
        for name in ("q_bias", "v_bias"):
            if isinstance(getattr(module, name, None), torch.Tensor):
                draw(getattr(module, name), 0.02)
    for attn in attentions:
        for projection in (getattr(attn, "query", None), getattr(attn, "value", None)):  # transformers' q/v biases
            if isinstance(projection, torch.nn.Linear) and projection.bias is not None:
                draw(projection.bias, 0.02)
                drawn_biases.add(id(projection.bias))
        cpb = _cpb_mlp(attn)
        draw(cpb[0].weight)
        if cpb[0].bias is not None:
            draw(cpb[0].bias, 0.5)
        draw(cpb[2].weight, 0.05)
        u = torch.rand(attn.logit_scale.shape, generator=gen)
        attn.logit_scale.copy_((u * (math.log(40) - math.log(5)) + math.log(5)).to(attn.logit_scale))
    for module in model.modules():
        for attention, norms in _POST_NORMS:
            if hasattr(module, attention):
                for norm in (getattr(module, name, None) for name in norms):
                    if isinstance(norm, torch.nn.LayerNorm):
                        draw(norm.weight, 0.1, 0.5)
                        draw(norm.bias, 0.02)
    for module in model.modules():  # Swin V1, after every SwinV2 draw: SwinV2 models draw what they drew before
        table = getattr(module, "relative_position_bias_table", None)
        if isinstance(table, torch.Tensor) and not hasattr(module, "cpb_mlp"):
            draw(table, 2.0)
            qkv = getattr(module, "qkv", None)
            if isinstance(qkv, torch.nn.Linear):
                draw(qkv.weight, 2.0 / math.sqrt(qkv.in_features))
                if qkv.bias is not None:
                    draw(qkv.bias, 0.02)
                    drawn_biases.add(id(qkv.bias))
    for module in model.modules():
        if (isinstance(module, torch.nn.Linear) and id(module) not in cpb_layers and module.bias is not None
                and id(module.bias) not in drawn_biases):
            draw(module.bias, 0.02)
    return model


def _pair(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


@torch.no_grad()
def trained_like_bias(num_heads: int, window_size: Union[int, Sequence[int]],
                      pretrained_window_size: Union[int, Sequence[int]] = 0, seed: int = 0) -> torch.Tensor:
    """(H, N, N) float32: the relative-position bias of the drop-in's WindowAttention with
    :func:`trained_like_` weights, N = window height * width, written out as the official forward computes it (no
    kernel, so FLASHBIAS_BACKEND does not matter and the kernels' tests have an independent input)."""
    attn = import_dropin().WindowAttention(dim=num_heads, window_size=_pair(window_size), num_heads=num_heads,
                                           pretrained_window_size=_pair(pretrained_window_size))
    trained_like_(attn, seed)
    with torch.no_grad():
        table = attn.cpb_mlp(attn.relative_coords_table).view(-1, num_heads)
        tokens = attn.relative_position_index.shape[0]
        bias = table[attn.relative_position_index.view(-1)].view(tokens, tokens, num_heads).permute(2, 0, 1)
        return (16 * torch.sigmoid(bias)).contiguous().float()


@contextlib.contextmanager
def cpu_threads(count: int) -> Iterator[None]:
    """torch's CPU thread count set to ``count`` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against the reference ``b``, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def smooth_images(batch: int, img_size: int, seed: int = 0, channels: int = 3) -> torch.Tensor:
    """(batch, channels, img_size, img_size) float32 seeded smooth random images, roughly ImageNet-
    normalised: bicubic upsampling of an 8x8 noise grid plus a little fine noise."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, channels, 8, 8, generator=gen)
    x = torch.nn.functional.interpolate(coarse, size=(img_size, img_size), mode="bicubic", align_corners=False)
    return x + 0.1 * torch.randn(x.shape, generator=gen)


def call_ms(fn: Callable[[], object], device: torch.device, samples: int, calls: int = 1,
            sync_each: bool = False) -> List[float]:
    """Milliseconds per call of ``fn``, one value for each of ``samples`` samples of ``calls`` back-to-back calls.

    On CUDA an event pair brackets each sample. ``sync_each``: the host waits for each sample's end before starting
    the next, so each starts on an idle GPU; otherwise the samples are queued back to back and one synchronisation
    follows (the host does not wait between samples). On the CPU: the wall clock around each sample. No
    warm-up: the caller runs that first."""
    cuda = torch.device(device).type == "cuda"
    if not cuda:
        times = []
        for _ in range(samples):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - start) * 1e3 / calls)
        return times
    events = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        if sync_each:
            end.synchronize()
        events.append((start, end))
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / calls for start, end in events]


def timed_call(fn: Callable[[], object], device: torch.device) -> Tuple[object, float]:
    """(fn's result, its milliseconds): CUDA events and a synchronisation on a GPU, the wall clock on the CPU."""
    result = []
    ms = call_ms(lambda: result.append(fn()), device, 1, sync_each=True)[0]
    return result[0], ms


def pyplot():
    """matplotlib.pyplot drawing to files (the Agg backend: no display needed), or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


# ----------------------------------------------------------------------------------------------
# Output folders: all or nothing
# ----------------------------------------------------------------------------------------------
PREVIOUS_SUFFIX = ".previous"


@contextlib.contextmanager
def replaced_folder(out: str, marker: str, describe: Optional[Callable[[str], str]] = None,
                    option: str = "--out") -> Iterator[str]:
    """Yield a new temporary folder beside ``out`` to write into; when the block ends without an
    exception it becomes ``out`` in two renames, so ``out`` holds one run's files, never a mix of two.

    An existing ``out`` must hold ``marker`` (the file this kind of output always has) or be empty:
    anything else is refused (:class:`UserError`), never moved. It is kept as ``out.previous`` (an
    older ``.previous`` is removed); ``describe(out)`` says what it held, printed before the work
    starts. An exception (or Ctrl-C) removes the temporary folder and leaves ``out`` as it was."""
    out = os.path.normpath(out)
    previous = out + PREVIOUS_SUFFIX
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise UserError(f"{option} {out} is a file, not a folder")
        if os.listdir(out) and not os.path.exists(os.path.join(out, marker)):
            raise UserError(f"{option} {out} is a folder with other files (no {marker}); give a new or "
                            f"empty folder, or one this script wrote")
        what = describe(out) if describe else "an earlier run's output"
        print(f"{option} {out} exists ({what}): it is replaced when this run completes; the old folder "
              f"is kept as {previous}", flush=True)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".partial-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(out):
        if os.path.exists(previous):
            shutil.rmtree(previous)
        os.rename(out, previous)
    os.rename(tmp, out)
