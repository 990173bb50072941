"""timm's CosineLRScheduler and StepLRScheduler under the keyword names of timm 0.4.12, on any timm.

Why: the official microsoft/Swin-Transformer ``lr_scheduler.py`` was written for timm 0.4.12. timm 0.5
renamed CosineLRScheduler's ``t_mul`` -> ``cycle_mul`` and ``decay_rate`` -> ``cycle_decay``, so on timm
1.x ``build_scheduler`` stops with "TypeError: ... unexpected keyword argument 't_mul'", and ``main.py``
builds the scheduler even for ``--eval``. It also changed two defaults that alter the schedule: the
cosine ``cycle_limit`` (0 -> 1) and StepLRScheduler's new ``warmup_prefix`` (True: the step count starts
after the warm-up; 0.4.12 counted from 0).

These subclasses take either name and pass what the installed timm's signature has, with 0.4.12's
value for a changed default the caller did not give, so the official code gets the schedule it got on
timm 0.4.12. ``scripts/install.sh --fix-official`` copies this file next to the official
``lr_scheduler.py`` and points its two timm imports here.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Mapping, Optional, Tuple

from timm.scheduler.cosine_lr import CosineLRScheduler as _TimmCosineLRScheduler
from timm.scheduler.step_lr import StepLRScheduler as _TimmStepLRScheduler

__all__ = ["CosineLRScheduler", "StepLRScheduler", "timm_kwargs"]

# (timm 0.4.12 name, timm >= 0.5 name)
_COSINE_RENAMES = (("t_mul", "cycle_mul"), ("decay_rate", "cycle_decay"))
# timm 0.4.12's value of a default that later timm changed (applied only if the keyword exists)
_COSINE_OLD_DEFAULTS = {"cycle_limit": 0}
_STEP_OLD_DEFAULTS = {"warmup_prefix": False}


def timm_kwargs(cls: type, kwargs: Mapping[str, Any], renames: Tuple[Tuple[str, str], ...] = (),
                old_defaults: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """``kwargs`` renamed to what ``cls.__init__`` of the installed timm accepts (old or new names)."""
    params = inspect.signature(cls.__init__).parameters
    out: Dict[str, Any] = {}
    for key, value in kwargs.items():
        for old, new in renames:
            other = new if key == old else old if key == new else None
            if key not in params and other in params:
                key = other
                break
        if key in out:
            raise TypeError(f"{cls.__name__}: {key!r} given twice (under its old and its new name)")
        out[key] = value
    for key, value in (old_defaults or {}).items():
        if key in params and key not in out:
            out[key] = value
    return out


class CosineLRScheduler(_TimmCosineLRScheduler):
    """timm's CosineLRScheduler, taking the timm 0.4.12 keywords (t_mul, decay_rate) on any timm."""

    def __init__(self, optimizer: Any, **kwargs: Any) -> None:
        super().__init__(optimizer, **timm_kwargs(_TimmCosineLRScheduler, kwargs, _COSINE_RENAMES,
                                                  _COSINE_OLD_DEFAULTS))


class StepLRScheduler(_TimmStepLRScheduler):
    """timm's StepLRScheduler with timm 0.4.12's schedule (no warm-up prefix) on any timm."""

    def __init__(self, optimizer: Any, **kwargs: Any) -> None:
        super().__init__(optimizer, **timm_kwargs(_TimmStepLRScheduler, kwargs, (), _STEP_OLD_DEFAULTS))
