#!/usr/bin/env python3
"""Make the official microsoft/Swin-Transformer main.py run on timm 1.x and PyTorch >= 2.6 (issue 14).

  fix_official.py CHECKOUT            patch the official files (scripts/install.sh --fix-official)
  fix_official.py --undo CHECKOUT     restore them (scripts/install.sh --fix-official --undo)

What it changes, as exact "this official line -> our line" edits (each of our lines says
"FlashBias --fix-official"):
  lr_scheduler.py   its two timm scheduler imports -> flashbias_timm_compat (timm >= 0.5 renamed
                    CosineLRScheduler's t_mul; main.py builds the scheduler even for --eval)
  utils.py, utils_simmim.py, utils_moe.py
                    every torch.load of a checkpoint -> safe_checkpoint.load_checkpoint (PyTorch >= 2.6
                    loads weights-only by default and refuses the yacs config in trainer checkpoints)
and it copies safe_checkpoint.py and flashbias_timm_compat.py into the checkout's root. Left as is: the
https:// branch of load_checkpoint (torch.hub.load_state_dict_from_url passes weights_only=False itself,
so it loads on every PyTorch; it trusts the URL the user gave).

Safety: a file is patched only if it is byte for byte the official version this script knows (its
sha256 below, microsoft/Swin-Transformer at OFFICIAL_COMMIT) and is left alone if it already is our patched
version; anything else stops the run before any change (exit 2). The official file is kept once as
FILE.flashbias-orig; --undo puts it back and removes the two helper files. Running twice changes nothing.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import shutil
import sys
from dataclasses import dataclass
from typing import List, Optional, Tuple

OFFICIAL_COMMIT = "f82860bfb5225915aca09c3227159ee9e1df874d"
BACKUP_SUFFIX = ".flashbias-orig"
MARK = "FlashBias --fix-official"
HERE = os.path.dirname(os.path.abspath(__file__))
# helper files copied into the checkout's root: name there -> our source
HELPERS = (("safe_checkpoint.py", os.path.join(os.path.dirname(HERE), "safe_checkpoint.py")),
           ("flashbias_timm_compat.py", os.path.join(HERE, "flashbias_timm_compat.py")))


class FixError(Exception):
    """A user error: reported as 'error: ...' with exit status 2, nothing changed."""


@dataclass(frozen=True)
class Edit:
    old: str  # whole official lines, found exactly `count` times, each at a line start
    new: str
    count: int = 1


@dataclass(frozen=True)
class FilePatch:
    path: str  # relative to the checkout
    official_sha256: str
    what: str  # what the edits do, for the report
    edits: Tuple[Edit, ...]


_IMPORT = Edit("import torch.distributed as dist\n",
               "import torch.distributed as dist\n"
               f"import safe_checkpoint  # {MARK}: loads trainer checkpoints (yacs config) on PyTorch >= 2.6\n")


def _via_safe_loader(line: str, count: int = 1) -> Edit:
    """One official line with `torch.load(` -> the same line through safe_checkpoint.load_checkpoint."""
    assert line.count("torch.load(") == 1 and line.endswith("\n"), line
    return Edit(line, line.replace("torch.load(", "safe_checkpoint.load_checkpoint(")[:-1] + f"  # {MARK}\n", count)


_TO_SAFE = "import safe_checkpoint; torch.load -> safe_checkpoint.load_checkpoint"
PATCHES = (
    FilePatch("lr_scheduler.py", "b596ef5a7eea11a4766f6f8b9fd58962d70c3f1bc159e6f9b9faf7841e021316",
              "timm scheduler imports -> flashbias_timm_compat", (
        Edit("from timm.scheduler.cosine_lr import CosineLRScheduler\n",
             f"from flashbias_timm_compat import CosineLRScheduler  # {MARK}: t_mul on timm 1.x\n"),
        Edit("from timm.scheduler.step_lr import StepLRScheduler\n",
             f"from flashbias_timm_compat import StepLRScheduler  # {MARK}: timm 0.4.12's schedule\n"),
    )),
    FilePatch("utils.py", "b38939365135e87f9225bde4d32f9867c55aeb7108e8b7d741e8ceff914b2e4a", _TO_SAFE, (
        _IMPORT,
        _via_safe_loader("        checkpoint = torch.load(config.MODEL.RESUME, map_location='cpu')\n"),
        _via_safe_loader("    checkpoint = torch.load(config.MODEL.PRETRAINED, map_location='cpu')\n"),
    )),
    FilePatch("utils_simmim.py", "043829242de2c38b1944c21bbc5be453c02fb8d50893b052a9d0b5867037d0db", _TO_SAFE, (
        _IMPORT,
        _via_safe_loader("        checkpoint = torch.load(config.MODEL.RESUME, map_location='cpu')\n"),
        _via_safe_loader("    checkpoint = torch.load(config.MODEL.PRETRAINED, map_location='cpu')\n"),
    )),
    FilePatch("utils_moe.py", "899393ad99c594605754e89a09f6a63857a5e30718943d7e890c97a10232d2fe", _TO_SAFE, (
        _IMPORT,
        _via_safe_loader("    checkpoint = torch.load(resume_path, map_location='cpu')\n"),
        _via_safe_loader("        checkpoint = torch.load(pretrained_path, map_location='cpu')\n", count=2),
        _via_safe_loader("            checkpoint_master = torch.load("
                         "pretrained_path.replace(f'.rank{global_rank}', f'.master'),\n"),
    )),
)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _line_starts(text: str, block: str) -> List[int]:
    """Offsets where `block` occurs starting at a line start (so an indented line is not found inside a
    more indented one)."""
    found, pos = [], text.find(block)
    while pos >= 0:
        if pos == 0 or text[pos - 1] == "\n":
            found.append(pos)
        pos = text.find(block, pos + 1)
    return found


def _replace(text: str, old: str, new: str, count: int, what: str) -> str:
    spots = _line_starts(text, old)
    if len(spots) != count:
        # the sha256 matched, so this is a bug in this script's tables: fail loudly
        raise RuntimeError(f"{what}: expected {count} x {old!r}, found {len(spots)}")
    for pos in reversed(spots):
        text = text[:pos] + new + text[pos + len(old):]
    return text


def apply_edits(patch: FilePatch, text: str) -> str:
    """The official text of patch.path -> our patched text."""
    for e in patch.edits:
        text = _replace(text, e.old, e.new, e.count, patch.path)
    return text


def revert_edits(patch: FilePatch, text: str) -> Optional[str]:
    """Our patched text -> the official text, or None if `text` is not exactly our patched version."""
    official = text
    for e in reversed(patch.edits):
        spots = _line_starts(official, e.new)
        if len(spots) != e.count:
            return None
        for pos in reversed(spots):
            official = official[:pos] + e.old + official[pos + len(e.new):]
    if sha256(_bytes(official)) != patch.official_sha256 or apply_edits(patch, official) != text:
        return None
    return official


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogateescape")  # byte for byte what _read read


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="surrogateescape")


def _write(path: str, text: str) -> None:
    """Replace `path` in one step (a temporary file then os.replace), keeping its permissions."""
    tmp = path + ".flashbias-tmp"
    with open(tmp, "wb") as f:
        f.write(_bytes(text))
    if os.path.exists(path):
        shutil.copymode(path, tmp)
    os.replace(tmp, path)


def _lines_of(patch: FilePatch, patched: str) -> str:
    """The line numbers our edits wrote (an edit's leading unchanged lines are skipped)."""
    lines = []
    for e in patch.edits:
        same = len(os.path.commonprefix([e.old.splitlines(), e.new.splitlines()]))
        lines += [patched.count("\n", 0, pos) + 1 + same for pos in _line_starts(patched, e.new)]
    return ", ".join(map(str, sorted(lines)))


def state(root: str, patch: FilePatch) -> str:
    """'official', 'patched' (exactly our version), 'other' (edited or another version) or 'missing'."""
    path = os.path.join(root, patch.path)
    if not os.path.isfile(path):
        return "missing"
    text = _read(path)
    if sha256(_bytes(text)) == patch.official_sha256:
        return "official"
    return "patched" if revert_edits(patch, text) is not None else "other"


def _backup_ok(root: str, patch: FilePatch) -> bool:
    """No backup yet, or one that is the official file (a backup is never overwritten)."""
    backup = os.path.join(root, patch.path + BACKUP_SUFFIX)
    if not os.path.lexists(backup):
        return True
    if os.path.islink(backup) or not os.path.isfile(backup):
        return False
    with open(backup, "rb") as f:
        return sha256(f.read()) == patch.official_sha256


def check_all(root: str, undo: bool) -> List[Tuple[FilePatch, str]]:
    """Every file's state; raises FixError naming each file this run must not touch (before any change)."""
    states, problems = [], []
    for patch in PATCHES:
        st = state(root, patch)
        states.append((patch, st))
        if st == "missing":
            problems.append(f"{patch.path} is missing")
        elif st == "other":
            kept = os.path.lexists(os.path.join(root, patch.path + BACKUP_SUFFIX))
            problems.append(f"{patch.path} is neither the official version this fix knows (microsoft/Swin-Transformer "
                            f"at {OFFICIAL_COMMIT[:7]}) nor the version --fix-official makes of it"
                            + (f" (edited after the fix? the official copy is {patch.path}{BACKUP_SUFFIX})"
                               if kept else ""))
        elif not _backup_ok(root, patch):
            problems.append(f"{patch.path}{BACKUP_SUFFIX} exists and is not the official {patch.path}")
    if problems:
        action = "restored" if undo else "changed"
        raise FixError(f"in {root}: " + "; ".join(problems) + f". Nothing was {action}: move those edits "
                       "away (or update the checkout with git pull) and run this again, or make the change by hand.")
    return states


def _free_name(path: str) -> str:
    base = f"{path}.bak-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    name, k = base, 0
    while os.path.lexists(name):
        k += 1
        name = f"{base}-{k}"
    return name


def install_helper(root: str, name: str, source: str) -> Optional[str]:
    """Copy one helper file into the checkout; an older or edited copy is kept as NAME.bak-<time>."""
    dest = os.path.join(root, name)
    new = _read(source)
    if os.path.isfile(dest) and not os.path.islink(dest) and _read(dest) == new:
        return None
    note = ""
    if os.path.lexists(dest):
        backup = _free_name(dest)
        os.replace(dest, backup)
        note = f" (the {name} there differed from ours: kept as {os.path.basename(backup)})"
    _write(dest, new)
    return f"copied {name}{note}"


def fix(root: str) -> List[str]:
    """Patch every official file (all checked first); returns what changed."""
    states = check_all(root, undo=False)
    done = []
    for name, source in HELPERS:  # first: the patched files import them
        msg = install_helper(root, name, source)
        if msg:
            done.append(msg)
    for patch, st in states:
        if st == "patched":
            continue
        path = os.path.join(root, patch.path)
        backup = path + BACKUP_SUFFIX
        if not os.path.lexists(backup):
            shutil.copy2(path, backup)
        patched = apply_edits(patch, _read(path))
        _write(path, patched)
        done.append(f"patched {patch.path}, lines {_lines_of(patch, patched)}: {patch.what} "
                    f"(official copy: {patch.path}{BACKUP_SUFFIX})")
    return done


def undo(root: str) -> List[str]:
    """Restore every official file (all checked first) and remove our helper files; returns what changed."""
    done = []
    for patch, st in check_all(root, undo=True):
        path = os.path.join(root, patch.path)
        backup = path + BACKUP_SUFFIX
        if st == "patched":
            if os.path.lexists(backup):  # checked: it is the official file
                os.replace(backup, path)
            else:
                _write(path, revert_edits(patch, _read(path)))
            done.append(f"restored the official {patch.path}")
        elif os.path.lexists(backup):  # official already; the backup is the same file
            os.remove(backup)
            done.append(f"removed {patch.path}{BACKUP_SUFFIX} (same as the official {patch.path})")
    for name, source in HELPERS:
        dest = os.path.join(root, name)
        if not os.path.lexists(dest):
            continue
        if os.path.isfile(dest) and _read(dest) == _read(source):
            os.remove(dest)
            done.append(f"removed {name}")
        else:
            done.append(f"left {name}: it differs from this FlashBias version's copy (remove it by hand)")
    return done


def check_checkout(root: str) -> str:
    if not os.path.isdir(root):
        raise FixError(f"{root} is not a directory; give the root of a microsoft/Swin-Transformer checkout")
    missing = [f for f in ("main.py", "config.py", "models/swin_transformer_v2.py")
               if not os.path.isfile(os.path.join(root, f))]
    if missing:
        raise FixError(f"{root} is not a microsoft/Swin-Transformer checkout: missing {' '.join(missing)}")
    for name, source in HELPERS:
        if not os.path.isfile(source):
            raise FixError(f"{source} is missing: run this from a complete FlashBias checkout")
    return os.path.abspath(root)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkout", help="root of a microsoft/Swin-Transformer checkout")
    p.add_argument("--undo", action="store_true", help="restore the official files, remove the helpers")
    a = p.parse_args(argv)
    try:
        root = check_checkout(a.checkout)
        done = undo(root) if a.undo else fix(root)
    except FixError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    for line in done:
        print(line)
    if not done:
        print(f"nothing to do: {root} is already " + ("official" if a.undo else "fixed (--fix-official)"))
    elif not a.undo:
        print(f"fixed {root}: main.py now runs on timm 0.4.12 or 1.x and loads checkpoints through "
              "safe_checkpoint.py (undo: scripts/install.sh --fix-official --undo)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
