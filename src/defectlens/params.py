"""Checking parameters: one small vocabulary every object uses in its constructor.

A model's parameters arrive from three places: Python calls, the command line, and a saved
config.json that a user (or an attacker) may have edited. Each object checks its own parameters
once, in its constructor, with these helpers, so the same rule holds for all three: right type
(a bool is not an int, a string is not a number), finite, inside the documented range. A value
that passes can never turn into a silent wrong answer later (`n_channels=0` scoring every image
0, `sigma=-1` silently switching smoothing off, a NaN threshold that compares as "good").
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from defectlens.errors import ParameterError


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """An integer (not a bool, not a float; numpy's integers count) in [low, high]."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)  # a numpy integer becomes a plain one, as JSON will store it
    if isinstance(value, bool) or not isinstance(value, int):
        # JSON and YAML users write 256.0 for 256: accept integral floats, nothing else.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ParameterError(f"{name} must be an integer, not {_describe(value)}")
    if low is not None and value < low:
        raise ParameterError(f"{name} must be at least {low}, not {value}")
    if high is not None and value > high:
        raise ParameterError(f"{name} must be at most {high}, not {value}")
    return value


MAX_IMAGE_SIZE = 2048  # the models' input side; larger would need tens of GB for PaDiM
MAX_BATCH_SIZE = 4096  # images scored at once (the command line's --batch-size takes the same)
MAX_SIGMA = 64.0  # map smoothing: radius 4 sigma = 256 px of the S x S map at most


def check_image_size(value: Any) -> int:
    """A side the backbones take: a multiple of 32 (their coarsest stride) from 32 to
    MAX_IMAGE_SIZE. One rule for a detector, a registration and the command line."""
    size = check_int("image_size", value, 32, MAX_IMAGE_SIZE)
    if size % 32:
        raise ParameterError(f"image size must be a positive multiple of 32, not {value}")
    return size


def check_float(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number (numpy's count) in the interval; `low_open`/`high_open` exclude
    the ends."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ParameterError(f"{name} must be a number, not {_describe(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ParameterError(f"{name} must be a finite number, not {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ParameterError(f"{name} must be {'>' if low_open else '>='} {low}, not {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ParameterError(f"{name} must be {'<' if high_open else '<='} {high}, not {value}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ParameterError(
            f"{name} must be one of {', '.join(map(str, choices))}, not {_describe(value)}"
        )
    return value


def check_int_list(
    name: str, value: Any, low: int | None = None, high: int | None = None, min_len: int = 1
) -> tuple[int, ...]:
    """A non-empty list or tuple of integers (JSON gives lists, Python callers tuples)."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ParameterError(f"{name} must be a list of integers, not {_describe(value)}")
    if len(value) < min_len:
        raise ParameterError(f"{name} needs at least {min_len} value(s)")
    items = tuple(check_int(f"{name}[{i}]", v, low, high) for i, v in enumerate(value))
    if len(set(items)) != len(items):
        raise ParameterError(f"{name} has repeated values: {list(items)}")
    return items


def check_optional(check, name: str, value: Any, *args, **kwargs):
    """`check(name, value, ...)` unless value is None."""
    return None if value is None else check(name, value, *args, **kwargs)


def check_seed(name: str, value: Any) -> int:
    """A seed numpy and torch both accept."""
    return check_int(name, value, 0, 2**32 - 1)


def check_bool(name: str, value: Any) -> bool:
    """True or False, nothing else (not 0/1, not "yes")."""
    if not isinstance(value, bool):
        raise ParameterError(f"{name} must be true or false, not {_describe(value)}")
    return value
