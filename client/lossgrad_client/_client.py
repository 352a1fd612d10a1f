"""LossClient: the typed, blocking client of lossgrad.v1.LossService."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc

from ._channel import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_RETRIES,
    METHOD_PREFIX,
    channel_settings,
)
from ._proto.lossgrad.v1 import lossgrad_pb2 as pb
from ._requests import (
    LIST_LOSSES_REQUEST,
    compute_request,
    gradient_result,
    loss_infos,
    loss_result,
)
from ._types import GradientResult, LossInfo, LossResult
from ._wire import serialize_request
from .errors import from_rpc_error

_Client = TypeVar("_Client", bound="LossClient")

CLIENT_ARGUMENTS_DOC = """
    ``target`` is ``"host:port"`` (any gRPC target string, e.g. ``"dns:///name:port"``
    for every address a name resolves to) or a list of ``"ip:port"`` addresses;
    ``load_balancing`` ("round_robin", or "pick_first") spreads the calls over them,
    each call to the next server. ``timeout`` is the default deadline of every call in
    seconds (None: no deadline); each method's ``timeout`` overrides it. A call that
    fails with UNAVAILABLE (no server reachable, a server shutting down) is retried up
    to ``retries`` times (0 to 4) with exponential backoff, within the deadline.
    ``max_message_bytes`` bounds requests and responses and should match the server's.
    ``root_certificates`` (PEM; None with a key and chain: the system's roots) makes a
    TLS channel, mutual TLS with ``private_key`` and ``certificate_chain``; ``credentials``
    gives gRPC channel credentials instead. ``token`` is sent with every call as
    ``authorization: Bearer <token>``. ``options`` are extra gRPC channel arguments
    (they override the ones these arguments set).
"""


class LossClient:
    """Blocking client of a lossgrad server; safe to share between threads.

    Use it as a context manager or call :meth:`close`. Arrays in results are read-only
    views of the response bytes; copy one to modify it. Every error is a
    :class:`lossgrad_client.LossgradError`.
    """

    __doc__ = (__doc__ or "") + CLIENT_ARGUMENTS_DOC

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float | None = None,
        retries: int = DEFAULT_RETRIES,
        load_balancing: str = "round_robin",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] | None = None,
    ) -> None:
        settings = channel_settings(
            target, max_message_bytes=max_message_bytes, retries=retries,
            load_balancing=load_balancing, options=options, credentials=credentials,
            root_certificates=root_certificates, private_key=private_key,
            certificate_chain=certificate_chain, token=token)
        self._settings = settings
        self._timeout = timeout
        if settings.credentials is None:
            self._channel = grpc.insecure_channel(settings.target, options=settings.options)
        else:
            self._channel = grpc.secure_channel(settings.target, settings.credentials,
                                                options=settings.options)
        # The Compute* methods use the hand-written codec (see _wire): the request is
        # built from the arrays with one copy, and the response comes back as bytes that
        # the results view.
        self._compute_loss = self._channel.unary_unary(
            METHOD_PREFIX + "ComputeLoss", request_serializer=serialize_request,
            _registered_method=True)
        self._compute_gradient = self._channel.unary_unary(
            METHOD_PREFIX + "ComputeGradient", request_serializer=serialize_request,
            _registered_method=True)
        self._list_losses = self._channel.unary_unary(
            METHOD_PREFIX + "ListLosses",
            request_serializer=pb.ListLossesRequest.SerializeToString,
            response_deserializer=pb.ListLossesResponse.FromString, _registered_method=True)

    def __enter__(self: _Client) -> _Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._settings.target!r})"

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def compute_loss(
        self,
        loss: str,
        predictions: Any,
        targets: Any,
        *,
        reduction: str = "mean",
        sample_weight: Any = None,
        allow_nonfinite: bool = False,
        timeout: float | None = None,
        **params: Any,
    ) -> LossResult:
        """Compute a loss on the server.

        ``loss`` is a name or alias from :meth:`list_losses`. ``predictions``,
        ``targets`` and ``sample_weight`` are anything ``np.asarray`` takes:
        float32/float64 (int32/int64 for class indices and labels); Python lists of
        floats are sent as float64. ``reduction`` is "none", "sum" or "mean".
        ``params`` are the loss's parameters (``delta=0.5``, ``from_logits=True``,
        ``class_weight=[...]``); None leaves one unset. With ``allow_nonfinite`` the
        server accepts NaN and Inf instead of rejecting them. ``timeout`` (seconds)
        overrides the client's for this call.
        """
        request = compute_request(loss, predictions, targets, reduction, sample_weight,
                                  allow_nonfinite, params)
        return loss_result(self._call(self._compute_loss, request, timeout), request)

    def compute_gradient(
        self,
        loss: str,
        predictions: Any,
        targets: Any,
        *,
        reduction: str = "mean",
        sample_weight: Any = None,
        allow_nonfinite: bool = False,
        timeout: float | None = None,
        **params: Any,
    ) -> GradientResult:
        """Compute a loss and its gradient w.r.t. ``predictions`` on the server.

        Takes the arguments of :meth:`compute_loss`. The gradient is of exactly the
        returned value (of the sum of the per-position values for "none") and has the
        predictions' shape and dtype.
        """
        request = compute_request(loss, predictions, targets, reduction, sample_weight,
                                  allow_nonfinite, params)
        return gradient_result(self._call(self._compute_gradient, request, timeout), request)

    def list_losses(self, *, timeout: float | None = None) -> list[LossInfo]:
        """Return the server's catalog: every loss, its inputs and its parameters."""
        return loss_infos(self._call(self._list_losses, LIST_LOSSES_REQUEST, timeout))

    def _call(self, method: grpc.UnaryUnaryMultiCallable, request: Any,
              timeout: float | None) -> Any:
        try:
            return method(request, timeout=self._timeout if timeout is None else timeout,
                          metadata=self._settings.metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
