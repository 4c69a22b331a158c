"""Field checks for the job spec: each returns the canonical value or raises SpecError naming the path.

Paths are dotted (``optimizer.lr``); a nested spec validates with its own local names and the
parent re-roots them with :func:`prefixed`, so ``cpus`` becomes ``resources.cpus``.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from gradhub.proto.contract.errors import SpecError


def join(prefix: str, field: str) -> str:
    """Join two path parts: ``join("model", "args")`` is ``model.args``; ``[0]`` needs no dot."""
    if not prefix:
        return field
    if not field:
        return prefix
    return f"{prefix}{field}" if field.startswith("[") else f"{prefix}.{field}"


@contextmanager
def prefixed(prefix: str) -> Iterator[None]:
    """Re-raise any SpecError from the block with ``prefix`` in front of its field."""
    try:
        yield
    except SpecError as e:
        err = SpecError(join(prefix, e.field), e.problem)
        raise err.with_traceback(e.__traceback__) from None


def suggest(word: object, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` when one of ``choices`` is close to ``word``, else ``""``."""
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def type_name(value: object) -> str:
    """A short name for the type of ``value`` for messages (``None`` for None)."""
    return "None" if value is None else type(value).__name__


def _bounds(
    lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False
) -> str:
    if lo is not None and hi is not None:
        if not lo_open and not hi_open:
            return f" between {lo} and {hi}"
        return f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {hi}"
    return ""


def check_int(path: str, value: Any, *, lo: int | None = None, hi: int | None = None) -> int:
    """An integer (never a bool) within ``[lo, hi]``, and within 64 bits."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok:
        _check_int64(path, int(value))
    if ok and not ((lo is None or value >= lo) and (hi is None or value <= hi)):
        ok = False
    if not ok:
        raise SpecError(path, f"must be an integer{_bounds(lo, hi)}, got {value!r}")
    return int(value)


INT64 = (-(2**63), 2**63 - 1)
MAX_DEPTH = 30  # nesting of free-form values (a factory's args), so that a whole spec nests <= 32 levels


def _check_int64(path: str, value: int) -> None:
    if not INT64[0] <= value <= INT64[1]:
        raise SpecError(path, f"must fit in 64 bits, got an integer of {value.bit_length()} bits")


def check_optional_int(path: str, value: Any, *, lo: int | None = None) -> int | None:
    """None, or an integer ``>= lo``."""
    return None if value is None else check_int(path, value, lo=lo)


def check_number(
    path: str,
    value: Any,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """A finite real number (an int is fine, a bool or string is not) within the bounds."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        try:
            x = float(value)
        except OverflowError:  # an integer beyond any float
            raise SpecError(path, f"must be a finite number{_bounds(lo, hi, lo_open, hi_open)}, "
                                  f"got an integer of {int(value).bit_length()} bits") from None
        ok = math.isfinite(x)
        if ok and lo is not None:
            ok = x > lo if lo_open else x >= lo
        if ok and hi is not None:
            ok = x < hi if hi_open else x <= hi
    if not ok:
        where = _bounds(lo, hi, lo_open, hi_open)
        raise SpecError(path, f"must be a finite number{where}, got {value!r}")
    return float(value)


def check_bool(path: str, value: Any) -> bool:
    """Exactly ``True`` or ``False`` (not 0/1, not ``"yes"``)."""
    if not isinstance(value, bool):
        raise SpecError(path, f"must be true or false, got {value!r}")
    return value


MAX_STR = 4096  # characters of any string in a spec


def check_str(path: str, value: Any) -> str:
    """A non-empty string of at most ``MAX_STR`` characters."""
    if not isinstance(value, str) or not value:
        raise SpecError(path, f"must be a non-empty string, got {value!r}")
    if len(value) > MAX_STR:
        raise SpecError(path, f"is {len(value)} characters long; the limit is {MAX_STR}")
    return value


def check_choice(path: str, value: Any, choices: Iterable[str], what: str = "") -> str:
    """One of ``choices``, with a did-you-mean hint for near misses."""
    options = sorted(choices)
    if isinstance(value, str) and value in options:
        return value
    label = f"{what} " if what else ""
    raise SpecError(
        path,
        f"unknown {label}{value!r}{suggest(value, options)} (choose one of {', '.join(options)})",
    )


def check_mapping(path: str, value: Any) -> Mapping[Any, Any]:
    """A mapping (a dict, or a YAML/JSON object)."""
    if not isinstance(value, Mapping):
        raise SpecError(path, f"must be a mapping, got {type_name(value)} {value!r}")
    return value


def check_keys(path: str, mapping: Mapping[Any, Any], allowed: Iterable[str], what: str) -> None:
    """Every key is a string in ``allowed``; otherwise name the first stray key and suggest one."""
    options = sorted(allowed)
    for key in mapping:
        if not isinstance(key, str):
            raise SpecError(path or "spec", f"keys must be strings, got {key!r}")
        if key not in options:
            hint = suggest(key, options) or f" (valid: {', '.join(options)})"
            raise SpecError(join(path, key), f"unknown {what}{hint}")


def json_value(path: str, value: Any, depth: int = 0) -> Any:
    """A deep copy of ``value`` as plain JSON data (dicts with str keys, lists, finite numbers,
    64-bit integers), nested at most ``MAX_DEPTH`` levels."""
    if depth > MAX_DEPTH:
        raise SpecError(path, f"is nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        if len(value) > MAX_STR:
            raise SpecError(path, f"is {len(value)} characters long; the limit is {MAX_STR}")
        return value
    if isinstance(value, numbers.Integral):
        _check_int64(path, int(value))
        return int(value)
    if isinstance(value, numbers.Real):
        if not math.isfinite(float(value)):
            raise SpecError(path, f"must be JSON-serializable; {value!r} is not finite")
        return float(value)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise SpecError(path, f"keys must be strings, got {key!r}")
            out[key] = json_value(join(path, key), item, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [json_value(f"{path}[{i}]", item, depth + 1) for i, item in enumerate(value)]
    raise SpecError(path, f"must be JSON-serializable, got {type_name(value)} {value!r}")


def _nonneg(path: str, value: Any) -> float:
    return check_number(path, value, lo=0)


def _betas(path: str, value: Any) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise SpecError(path, f"must be a pair of numbers in [0, 1), got {value!r}")
    b1, b2 = (
        check_number(f"{path}[{i}]", b, lo=0, hi=1, hi_open=True) for i, b in enumerate(value)
    )
    return (b1, b2)


def _unit(path: str, value: Any) -> float:
    return check_number(path, value, lo=0, hi=1)


# the check for each torch.optim keyword the spec accepts, returning its canonical value
HYPER_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "momentum": _nonneg,
    "dampening": _nonneg,
    "weight_decay": _nonneg,
    "eps": _nonneg,
    "lr_decay": _nonneg,
    "initial_accumulator_value": _nonneg,
    "alpha": _nonneg,
    "rho": _unit,
    "nesterov": check_bool,
    "amsgrad": check_bool,
    "centered": check_bool,
    "betas": _betas,
}
