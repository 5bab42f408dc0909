"""What Ray Serve's gRPC proxy registers for headwise, plus client-cancel propagation.

Ray Serve 2.60's proxy (`ray/serve/_private/proxy.py`, `gRPCProxy.send_request_to_replica`)
cancels the replica's `DeploymentResponseGenerator` only when the client's cancel happens to
land while the proxy awaits the next message (`ProxyResponseGenerator.__anext__`). When it
lands anywhere else (most often while gRPC writes the previous token to the client), the proxy
drops its generator and the replica decodes on to `max_new_tokens` for nobody.

The proxy imports and calls the functions listed in `grpc_options.grpc_servicer_functions`
inside its own process before it serves, so the function below is where we can fix that:
it wraps the deployment handle the proxy uses for unary-request streams so that the response
it returns is cancelled from the RPC's done-callback when the RPC ends before the proxy has
relayed the replica's stream to its end (client cancel, deadline, disconnect). grpc.aio runs
that callback once, whatever the proxy was awaiting (`context.cancelled()` is still False at
that point, so "finished" is tracked here), the replica's generator gets `CancelledError`, and
the decode worker stops at the next token. An RPC that ran to its end cancels nothing.

The same wrapper gives a stream whose replica died under it (its host went down, the process was
killed) UNAVAILABLE with a one-line message: Serve's proxy would send INTERNAL with the Ray
exception's text. The tokens sent before are a prefix of the answer; the client retries.
"""

from __future__ import annotations

import logging

import grpc

from services.protos.headwise.v1 import generate_pb2_grpc

log = logging.getLogger("ray.serve.headwise")  # a child of Serve's logger: lands in the proxy's log file
_PATCHED = "_headwise_cancel_on_disconnect"


class _CancelOnDisconnect:
    """A DeploymentHandle stand-in: `.remote()` registers the response for cancellation."""

    def __init__(self, handle, context):
        self._handle, self._context = handle, context
        self.finished = False  # set once the proxy has relayed the whole stream

    def remote(self, *args, **kwargs):
        response = _unavailable_on_replica_death(self._handle.remote(*args, **kwargs))
        context = self._context

        def on_done(_ctx) -> None:
            if not self.finished and not response.cancelled():
                response.cancel()

        if context.done():
            on_done(context)
        else:
            context.add_done_callback(on_done)
        return response

    def __getattr__(self, name):
        return getattr(self._handle, name)


REPLICA_GONE = "the decode replica serving this stream went away (its host or process died); retry the request"


def _unavailable_on_replica_death(response):
    """`response` (a DeploymentResponseGenerator) whose next message raises Serve's gRPCStatusError
    (UNAVAILABLE) where Ray would raise RayActorError: the proxy sends that code, not INTERNAL.
    Set on the instance: the proxy calls `response.__anext__()` explicitly."""
    try:
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import gRPCStatusError
    except ImportError:
        return response
    anext_ = getattr(response, "__anext__", None)
    if anext_ is None:
        return response

    async def __anext__():
        try:
            return await anext_()
        except RayActorError as e:
            log.warning("a Generate stream's replica died: %s", str(e).splitlines()[0][:200])
            raise gRPCStatusError(e, grpc.StatusCode.UNAVAILABLE, REPLICA_GONE) from None

    response.__anext__ = __anext__
    return response


def install_cancel_propagation() -> bool:
    """Patch `gRPCProxy.send_request_to_replica` once per process; False if Serve's shape changed."""
    try:
        from ray.serve._private import proxy
        from ray.serve._private.proxy_request_response import gRPCProxyRequest
    except ImportError:  # not inside Ray Serve: nothing to do
        return False
    cls = getattr(proxy, "gRPCProxy", None)
    original = vars(cls).get("send_request_to_replica") if cls is not None else None
    if original is None:
        log.warning("Ray Serve's gRPCProxy has no send_request_to_replica: client cancels may not stop decoding")
        return False
    if getattr(original, _PATCHED, False):
        return True

    async def send_request_to_replica(self, request_id, internal_request_id, handle, proxy_request, *args, **kwargs):
        wrapped = None
        if isinstance(proxy_request, gRPCProxyRequest) and not proxy_request.has_input_stream:
            handle = wrapped = _CancelOnDisconnect(handle, proxy_request.context)
        async for message in original(self, request_id, internal_request_id, handle, proxy_request, *args, **kwargs):
            yield message
        if wrapped is not None:
            wrapped.finished = True

    setattr(send_request_to_replica, _PATCHED, True)
    send_request_to_replica.__wrapped__ = original
    cls.send_request_to_replica = send_request_to_replica
    log.info("headwise: client cancels through the gRPC proxy now cancel the replica's stream")
    return True


def add_GenerateServicer_to_server(servicer, server) -> None:  # noqa: N802 (gRPC's naming)
    """The entry in `grpc_servicer_functions`: install the patch, then register the service."""
    install_cancel_propagation()
    generate_pb2_grpc.add_GenerateServicer_to_server(servicer, server)
