"""The embedded Ray a server starts when it is given no cluster: a one-machine Ray whose every
listener is on loopback and which takes calls only with a token of this server's own.

Ray (2.52+) has token authentication; since 2.59 a local ``ray.init()`` turns it on with the
user's ``~/.ray/auth_token`` (one token for all their clusters, world-readable, kept across
runs), and an inherited ``RAY_AUTH_MODE=disabled`` turns it off. So the server sets the mode and
a fresh token itself, then checks that the GCS refuses a call without it. Ray binds its
listeners to loopback only when its node address is 127.0.0.1, which it picks only for a
machine it treats as "no cluster" (the switch it uses on Windows and macOS): set here, as
nothing outside this machine ever needs to reach a single-node Ray. The switch and the token
loader are Ray internals, checked for before use (verified with Ray 2.60).
"""

from __future__ import annotations

import importlib
import logging
import os
import secrets
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)
NEEDED = ("AuthenticationMode", "AuthenticationTokenLoader", "Config", "get_authentication_mode")


def token_auth_missing() -> str | None:
    """Why the installed Ray cannot enforce token authentication as the server needs; None if it can."""
    import ray

    raylet = _raylet()
    if not all(hasattr(raylet, name) for name in NEEDED):
        return f"ray {ray.__version__} has no token authentication; gradhub needs ray >= 2.52"
    if not (hasattr(raylet.AuthenticationMode, "TOKEN")
            and hasattr(raylet.AuthenticationTokenLoader.instance(), "reset_cache")
            and hasattr(raylet.Config, "initialize")):
        return f"ray {ray.__version__}: its token authentication is not the one gradhub knows (verified: 2.60)"
    return None


def start(num_cpus: int | None, system_config: Mapping[str, Any]) -> None:
    """``ray.init`` a local Ray on loopback with token authentication, and check that it is on.
    RuntimeError (the Ray is shut down again) when it cannot be."""
    import ray
    from ray._private import ray_constants

    why = token_auth_missing()
    if why is not None:
        raise RuntimeError(f"ray: {why}")
    raylet = _raylet()

    # Ray reads these from the environment (its own processes inherit them): the only way in
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # for Ray's child processes
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process imported ray already: read at call time
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # before RAY_AUTH_TOKEN_PATH and ~/.ray/auth_token
    raylet.Config.initialize("")  # Ray read RAY_AUTH_MODE when it was imported: again, now
    raylet.AuthenticationTokenLoader.instance().reset_cache()  # a token of an earlier ray.init in this process
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             _system_config=dict(system_config))
    try:
        if raylet.get_authentication_mode() != raylet.AuthenticationMode.TOKEN:
            raise RuntimeError("ray: token authentication did not turn on")
        refuses_strangers(ray.get_runtime_context().gcs_address)
    except BaseException:
        ray.shutdown()
        raise
    log.info("embedded Ray on loopback with token authentication (node %s)", ray.util.get_node_ip_address())


def refuses_strangers(gcs_address: str) -> None:
    """RuntimeError unless Ray's GCS at ``gcs_address`` refuses a call that carries no token."""
    import grpc

    pb: Any = importlib.import_module("ray.core.generated.gcs_service_pb2")

    with grpc.insecure_channel(gcs_address) as channel:
        call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId",
                                   request_serializer=pb.GetClusterIdRequest.SerializeToString,
                                   response_deserializer=pb.GetClusterIdReply.FromString)
        try:
            call(pb.GetClusterIdRequest(), timeout=10)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                return
            raise RuntimeError(f"ray: its GCS did not answer the authentication check ({e.code().name})") from e
    raise RuntimeError("ray: its GCS answered a call without the token: authentication is not enforced")


def cluster_has_token_auth() -> bool:
    """Whether the Ray cluster this process is connected to asks for a token."""
    raylet = _raylet()
    if not all(hasattr(raylet, name) for name in NEEDED):
        return False
    return bool(raylet.get_authentication_mode() == raylet.AuthenticationMode.TOKEN)


def _raylet() -> Any:
    return importlib.import_module("ray._raylet")  # Ray's internals: untyped, looked up by name
