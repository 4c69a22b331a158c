"""Resolve a job spec's ``package.module:function`` factory references to callables.

Every failure becomes a :class:`FactoryError` whose message names the spec field and the
reference, so a user can tell a typo from a missing ``working_dir``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from gradhub.proto.contract.errors import FactoryError, GradhubError, SpecError


def resolve(ref: str, what: str) -> Callable[..., Any]:
    """Import ``ref`` (``"package.module:function"``) and return the callable it names.

    ``what`` is the spec field the reference came from (``"model.factory"``), used in messages.
    The part after the colon may be a dotted path (``"pkg.mod:Class.create"``).
    """
    prefix = f"{what} {ref!r}"
    if not isinstance(ref, str):
        raise FactoryError(f"{what}: expected a 'package.module:function' string, got {ref!r}")
    module_name, sep, attr_path = ref.partition(":")
    module_name, attr_path = module_name.strip(), attr_path.strip()
    if not sep or not module_name or not attr_path or ":" in attr_path:
        raise FactoryError(f"{prefix}: expected the form 'package.module:function'")

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise FactoryError(
                f"{prefix}: module {module_name!r} not found "
                "(is it on the workers' path / in working_dir?)"
            ) from e
        raise FactoryError(
            f"{prefix}: importing module {module_name!r} failed: {e} "
            "(a dependency it imports is not installed on the workers)"
        ) from e
    except Exception as e:
        raise FactoryError(
            f"{prefix}: importing module {module_name!r} raised {type(e).__name__}: {e}"
        ) from e

    obj: Any = module
    walked = module_name
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise FactoryError(f"{prefix}: {walked!r} has no attribute {part!r}") from e
        walked = f"{walked}:{part}" if walked == module_name else f"{walked}.{part}"
    if not callable(obj):
        raise FactoryError(f"{prefix}: {attr_path!r} is a {type(obj).__name__}, not a callable")
    return obj


def call_factory(
    fn: Callable[..., Any], args: Mapping[str, Any], *, label: str, args_field: str
) -> Any:
    """Call ``fn(**args)``; arguments that do not fit its signature are a ``FactoryError``.

    ``args_field`` (``"model.args"``) is named when the arguments do not bind; any other
    exception from the call, except gradhub's own errors, is wrapped with ``label``.
    """
    if not isinstance(args, Mapping):
        raise SpecError(args_field, f"must be a mapping of keyword arguments, got {args!r}")
    kwargs = dict(args)
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature; let the call decide
        signature = None
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as e:
            raise FactoryError(f"{args_field} do not fit {label}: {e}") from e
    try:
        return fn(**kwargs)
    except GradhubError:
        raise
    except TypeError as e:
        if signature is None:
            raise FactoryError(f"{args_field} do not fit {label}: {e}") from e
        raise FactoryError(f"{label} raised TypeError: {e}") from e
    except Exception as e:
        raise FactoryError(f"{label} raised {type(e).__name__}: {e}") from e


def resolve_component(kind: str, name: str | None, factory: str | None,
                      builtins: Mapping[str, Callable[..., Any]]) -> tuple[Callable[..., Any], str]:
    """The callable for a spec component (``model``, ``dataset``, ``loss``) named by exactly one
    of a built-in ``name`` or a ``factory`` reference, and a label for error messages."""
    if (name is None) == (factory is None):
        raise SpecError(kind, f"give exactly one of {kind}.name or {kind}.factory")
    if name is not None:
        fn = builtins.get(name)
        if fn is None:
            raise SpecError(f"{kind}.name", f"unknown {kind} {name!r}; built-ins: {', '.join(builtins)}")
        return fn, f"{kind} {name!r}"
    assert factory is not None
    return resolve(factory, f"{kind}.factory"), f"{kind}.factory {factory!r}"

