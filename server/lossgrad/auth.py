"""Bearer-token authentication: a server interceptor that checks ``authorization`` metadata.

Health checks (grpc.health.v1) and reflection stay reachable without a token, so that
probes and tools work; every other method needs ``authorization: Bearer <token>``.
The token is compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

import grpc

AUTHORIZATION_KEY = "authorization"
_SCHEME = b"bearer "
# Methods under these prefixes need no token.
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


class TokenAuthInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Refuse calls without the right bearer token with UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the token must not be empty")
        self._token = token.encode("utf-8")

        def refuse(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing or invalid bearer token (metadata 'authorization')")

        self._refuse = grpc.unary_unary_rpc_method_handler(refuse)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method.startswith(OPEN_PREFIXES):
            return continuation(handler_call_details)
        if self._authorized(handler_call_details.invocation_metadata or ()):
            return continuation(handler_call_details)
        return self._refuse

    def _authorized(self, metadata: Any) -> bool:
        for key, value in metadata:
            if key != AUTHORIZATION_KEY:
                continue
            raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            if raw[:len(_SCHEME)].lower() != _SCHEME:
                return False
            return hmac.compare_digest(raw[len(_SCHEME):].strip(), self._token)
        return False


def read_token_file(path: str) -> str:
    """The token in ``path``, without surrounding whitespace; ValueError when empty."""
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"{path}: the token file is empty")
    return token
