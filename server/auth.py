"""Who may do what: the users a server knows (from its token, or a tokens file), their roles and
their quotas, and the rules that decide whether a user may act on a job. Plain classes: the
gRPC side (``gradhub.server.rpc.AuthInterceptor``) only finds the caller's ``Principal``.

A tokens file (``gradhub server --tokens-file``) is YAML::

    users:
      - name: alice
        token: "…"                  # or token_sha256: "<hex>", so that the file holds no secret
        role: user                  # admin | user | viewer
        quota: {cpus: 8, gpus: 1}   # concurrent, over alice's running jobs (default: none)
      - name: ops
        token_sha256: "9f86d0…"
        role: admin

Users see every job but cancel, delete and pull checkpoints of their own only; admins act on
every job; viewers only read. Without a tokens file, whoever holds the server's one token (or,
on loopback without a token, anyone) is an admin.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gradhub.proto.contract.errors import AuthError, PermissionDeniedError

MIN_TOKEN_CHARS = 16
MAX_USERS = 10_000
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class Role(enum.StrEnum):
    ADMIN = "admin"
    USER = "user"
    VIEWER = "viewer"


class Action(enum.StrEnum):
    """What a call does to a job, as the permission rules see it."""

    READ = "read"        # get, list, watch, logs, list checkpoints
    SUBMIT = "submit"
    CANCEL = "cancel"
    SCALE = "scale"      # change an elastic job's size
    DELETE = "delete"
    PULL = "pull"        # download a checkpoint (the trained weights)


@dataclass(frozen=True)
class Quota:
    """The most a user's running jobs may hold at once (None: no limit)."""

    cpus: float | None = None
    gpus: float | None = None

    def over(self, used: Mapping[str, float], need: Mapping[str, float]) -> str | None:
        """Why ``need`` on top of ``used`` (Ray resources: CPU, GPU) is over this quota, or None."""
        for key, limit in (("CPU", self.cpus), ("GPU", self.gpus)):
            if limit is None or need.get(key, 0.0) <= 0:
                continue
            if used.get(key, 0.0) + need[key] > limit + 1e-9:
                return (f"{key}s {used.get(key, 0.0):g} of {limit:g} in use by running jobs, "
                        f"this job needs {need[key]:g}")
        return None

    def never(self, need: Mapping[str, float]) -> str | None:
        """Why ``need`` can never run under this quota, even with nothing else running, or None."""
        for key, limit in (("CPU", self.cpus), ("GPU", self.gpus)):
            if limit is not None and need.get(key, 0.0) > limit + 1e-9:
                return f"the job needs {need[key]:g} {key}s, over the quota of {limit:g}"
        return None


@dataclass(frozen=True)
class Principal:
    """The caller of an RPC: a user of the tokens file, or the holder of the server's token."""

    name: str
    role: Role
    quota: Quota = Quota()

    def __str__(self) -> str:
        return f"{self.name or 'anonymous'} ({self.role})"

    def check(self, action: Action, owner: str | None = None) -> None:
        """PermissionDeniedError unless this principal may ``action`` a job owned by ``owner``."""
        if self.role is Role.ADMIN or action is Action.READ:
            return
        if self.role is Role.VIEWER:
            raise PermissionDeniedError(f"permission: {self} is a viewer and may only read jobs, not {action} them")
        if action is Action.SUBMIT or owner == self.name:
            return
        raise PermissionDeniedError(f"permission: {self} may {action} only their own jobs; this one belongs to "
                                    f"{owner or 'no user (submitted before the tokens file)'}: ask its owner or "
                                    "an admin")


ADMIN = Principal("", Role.ADMIN)  # the server's one token, or no token on loopback


class Users:
    """The tokens a server accepts, each a Principal. ``open()``: no token asked, everyone admin;
    ``single(token)``: one shared token, an admin; ``from_file(path)``: a tokens file."""

    def __init__(self, by_hash: Mapping[bytes, Principal], required: bool = True) -> None:
        self._by_hash = dict(by_hash)
        self._by_name = {p.name: p for p in by_hash.values()}
        self.required = required  # False: calls need no token at all

    @classmethod
    def open(cls) -> Users:
        return cls({}, required=False)

    @classmethod
    def single(cls, token: str) -> Users:
        return cls({_digest(token): ADMIN})

    @classmethod
    def from_file(cls, path: Path) -> Users:
        """The users of a tokens file; ValueError naming the entry and the field when it is wrong."""
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"tokens_file: cannot read {path}: {e}") from e
        entries = data.get("users") if isinstance(data, dict) else None
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"tokens_file: {path} must hold `users:`, a list of {{name, token, role}}")
        if len(entries) > MAX_USERS:
            raise ValueError(f"tokens_file: more than {MAX_USERS} users")
        by_hash: dict[bytes, Principal] = {}
        names: set[str] = set()
        for i, entry in enumerate(entries):
            where = f"tokens_file: users[{i}]"
            digest, principal = _entry(entry, where)
            if principal.name in names:
                raise ValueError(f"{where}.name: {principal.name!r} appears twice")
            if digest in by_hash:
                raise ValueError(f"{where}: the same token as {by_hash[digest].name!r}; every user needs their own")
            names.add(principal.name)
            by_hash[digest] = principal
        return cls(by_hash)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._by_name)

    def authenticate(self, authorization: str) -> Principal:
        """The principal of an ``authorization`` header (``Bearer <token>``); AuthError if none."""
        if not self.required:
            return ADMIN
        scheme, _, token = authorization.partition(" ")
        principal = self._by_hash.get(_digest(token)) if scheme == "Bearer" and token else None
        if principal is None:
            raise AuthError("missing or wrong bearer token")
        return principal

    def quota(self, name: str) -> Quota:
        """``name``'s quota (none for a user the tokens file no longer lists, or without one)."""
        principal = self._by_name.get(name)
        return principal.quota if principal is not None else Quota()


def _digest(token: str) -> bytes:
    # looked up by hash: the time a lookup takes tells nothing about the tokens
    return hashlib.sha256(token.encode()).digest()


def _entry(entry: Any, where: str) -> tuple[bytes, Principal]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: must be a mapping with name, token (or token_sha256) and role")  # noqa: TRY004 - a config error, named as such
    unknown = set(entry) - {"name", "token", "token_sha256", "role", "quota"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    name = entry.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"{where}.name: must be 1-64 letters, digits or ._@- (got {name!r})")
    try:
        role = Role(str(entry.get("role")))
    except ValueError:
        raise ValueError(f"{where}.role: must be one of {', '.join(Role)} (got {entry.get('role')!r})") from None
    token, hashed = entry.get("token"), entry.get("token_sha256")
    if (token is None) == (hashed is None):
        raise ValueError(f"{where}: give exactly one of token and token_sha256")
    if token is not None:
        if not isinstance(token, str) or len(token.strip()) < MIN_TOKEN_CHARS:
            raise ValueError(f"{where}.token: must be a string of at least {MIN_TOKEN_CHARS} characters")
        digest = _digest(token.strip())
    else:
        if not isinstance(hashed, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", hashed):
            raise ValueError(f"{where}.token_sha256: must be 64 hex digits (sha256 of the token)")
        digest = bytes.fromhex(hashed)
    return digest, Principal(name, role, _quota(entry.get("quota"), f"{where}.quota"))


def _quota(raw: Any, where: str) -> Quota:
    if raw is None:
        return Quota()
    if not isinstance(raw, dict) or set(raw) - {"cpus", "gpus"}:
        raise ValueError(f"{where}: must be a mapping of cpus and/or gpus")
    values: dict[str, float] = {}
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1e6:
            raise ValueError(f"{where}.{key}: must be a number from 0 to 1e6 (got {value!r})")
        values[key] = float(value)
    return Quota(**values)
