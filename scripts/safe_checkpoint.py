"""Load Swin-Transformer checkpoints, trainer checkpoints included, without running code from the file.

Why: PyTorch >= 2.6 loads with ``weights_only=True`` by default. The official trainer
(``utils.save_checkpoint``) stores its yacs ``config`` (a ``CfgNode``) in every checkpoint, so the official
``main.py --resume`` stops with "Unsupported global: GLOBAL yacs.config.CfgNode". Allowing the class with
``torch.serialization.safe_globals([CfgNode])`` is not enough: torch's weights-only unpickler refuses to
fill a dict subclass ("Can only SETITEMS for dict, ..."). ``weights_only=False`` would work, but it runs
whatever the pickle names.

This module's unpickler admits only tensors, storages, plain containers (dict, OrderedDict, list, tuple,
set, frozenset, str, bytes, numbers, None, bool), torch dtypes/devices/sizes and yacs's CfgNode, and
refuses every other global before anything is called. ``torch.load`` still does the rest (the zip format,
storages, ``map_location``) through its ``pickle_module=`` argument.

    from safe_checkpoint import load_checkpoint, CheckpointError, UnsafeCheckpointError
    ckpt = load_checkpoint("ckpt_epoch_0.pth", map_location="cpu")

    python safe_checkpoint.py CKPT...     # checks files, prints their top-level keys

One file, torch and the standard library only (yacs only when a checkpoint holds a CfgNode): it is
copied into a microsoft/Swin-Transformer checkout by ``scripts/install.sh --fix-official``.
"""
from __future__ import annotations

import _compat_pickle
import builtins
import collections
import io
import os
import pickle
import sys
import types
from typing import Any, List, Optional

import torch

__all__ = ["CheckpointError", "UnsafeCheckpointError", "load_checkpoint", "allowed_global"]


class CheckpointError(RuntimeError):
    """The file cannot be loaded as a PyTorch checkpoint (unreadable, not a checkpoint, or unsafe)."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint's pickle names a global outside the allowlist; nothing from it was called."""

    def __init__(self, global_name: str, path: Optional[str] = None):
        self.global_name = global_name
        self.path = path
        where = f"{path}: " if path else ""
        super().__init__(
            f"{where}refused to load: the pickle names the global '{global_name}', which is not a tensor, "
            "storage, plain container or yacs CfgNode, and loading it would run code from the file. "
            "If you trust the file, load it with torch.load(path, weights_only=False).")


_BUILTINS = frozenset({"dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray",
                       "int", "float", "complex", "bool"})
# how torch.save writes tensors and parameters (torch._utils)
_TORCH_REBUILD = frozenset({"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
                            "_rebuild_parameter", "_rebuild_parameter_with_state"})


def _latin1_encode(text: Any, encoding: str = "latin1") -> bytes:
    # Protocol-2 pickles store bytes as _codecs.encode(str, "latin1"): admit only that use, not
    # the codec machinery (any codec name would be looked up and imported).
    if not isinstance(text, str) or encoding.lower().replace("-", "").replace("_", "") != "latin1":
        raise UnsafeCheckpointError(f"_codecs.encode(..., {encoding!r})")
    return text.encode("latin1")


def _cfgnode() -> type:
    try:
        from yacs.config import CfgNode
    except ImportError as e:
        raise CheckpointError("the checkpoint holds a yacs CfgNode (a training config): pip install yacs") from e
    return CfgNode


def allowed_global(module: str, name: str) -> Optional[Any]:
    """The object a checkpoint's pickle may name as ``module.name``, or None if it is refused."""
    if module == "builtins" and name in _BUILTINS:
        return getattr(builtins, name)
    if (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict
    if (module, name) == ("_codecs", "encode"):
        return _latin1_encode
    if (module, name) == ("yacs.config", "CfgNode"):
        return _cfgnode()
    if module == "torch._utils" and name in _TORCH_REBUILD:
        return getattr(torch._utils, name)
    if module == "torch":
        obj = getattr(torch, name, None)
        if name in ("Size", "device") or isinstance(obj, torch.dtype):
            return obj
        if isinstance(obj, type) and name.endswith("Storage"):  # UntypedStorage, FloatStorage, ...
            return obj
    return None


class SafeUnpickler(pickle.Unpickler):
    """An Unpickler whose every global goes through allowed_global (torch.load subclasses it)."""

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles use Python 2 names (__builtin__.set); map them as pickle itself would.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        obj = allowed_global(module, name)
        if obj is None:
            raise UnsafeCheckpointError(f"{module}.{name}")
        return obj


def _safe_load(file: io.IOBase, **kwargs: Any) -> Any:
    return SafeUnpickler(file, **kwargs).load()


# What torch.load needs of a pickle_module: Unpickler (subclassed for find_class / persistent_load) and
# load (the legacy format's header records).
_PICKLE_MODULE = types.ModuleType("safe_checkpoint_pickle")
_PICKLE_MODULE.Unpickler = SafeUnpickler
_PICKLE_MODULE.load = _safe_load


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, map_location)`` that admits only tensors, containers and yacs CfgNodes.

    Raises UnsafeCheckpointError (naming the refused global) if the pickle names anything else, and
    CheckpointError for a file that cannot be read or is not a PyTorch checkpoint.
    """
    path = os.fspath(path)
    if os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true"):
        # torch.load then refuses any pickle_module, ours included
        raise CheckpointError(f"{path}: TORCH_FORCE_WEIGHTS_ONLY_LOAD is set, which makes torch.load refuse "
                              "this module's restricted unpickler; unset it (this loader is restricted itself)")
    try:
        return torch.load(path, map_location=map_location, pickle_module=_PICKLE_MODULE, weights_only=False)
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(e.global_name, path) from None
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it: {e.strerror or e}") from e
    except Exception as e:  # torch/pickle report a non-checkpoint file in many ways
        raise CheckpointError(f"{path}: cannot load it as a PyTorch checkpoint ({type(e).__name__}: {e})") from e


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        return f"{type(obj).__name__} with keys: {', '.join(map(str, obj.keys()))}"
    return type(obj).__name__


def main(argv: Optional[List[str]] = None) -> int:
    """Command line: load each file given, print its top-level keys; exit 2 at the first refusal."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if not args:
        print("error: give one or more checkpoint files (see --help)", file=sys.stderr)
        return 2
    for path in args:
        try:
            print(f"{path}: {_describe(load_checkpoint(path))}")
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
