"""Client cancels reach the replica whatever Ray Serve's gRPC proxy was awaiting (services/decode/grpc_proxy.py).

A real grpc.aio server and client: the handler holds a response the way the proxy does and is
cancelled while it awaits something else (the case Ray Serve 2.60 misses). The Ray response is a
recorder; the whole path through the real proxy is tests/e2e::test_cancellation_stops_decoding.
"""

from __future__ import annotations

import asyncio

import grpc

from services.decode import grpc_proxy

METHOD = "/headwise.test.Probe/Stream"


class Response:
    """Records what the proxy would do to a DeploymentResponseGenerator."""

    def __init__(self):
        self.cancels = 0

    def cancel(self):
        self.cancels += 1

    def cancelled(self) -> bool:
        return self.cancels > 0


class Handle:
    def __init__(self):
        self.responses: list[Response] = []
        self.deployment_id = "Decode"

    def remote(self, *args):
        self.responses.append(Response())
        return self.responses[-1]


async def serve(handler):
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("headwise.test.Probe", {
        "Stream": grpc.unary_stream_rpc_method_handler(handler)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def test_cancel_while_the_proxy_awaits_something_else_cancels_the_response():
    handle, started = Handle(), asyncio.Event()

    async def handler(request, context):
        grpc_proxy._CancelOnDisconnect(handle, context).remote(request)
        yield b"first token"
        started.set()
        await asyncio.Event().wait()  # e.g. writing to the client: not the response's __anext__

    server, port = await serve(handler)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_stream(METHOD)(b"")
            assert await call.read() == b"first token"
            await started.wait()
            call.cancel()
            for _ in range(100):
                if handle.responses[0].cancels:
                    break
                await asyncio.sleep(0.02)
    finally:
        await server.stop(None)
    assert handle.responses[0].cancels == 1


async def test_a_finished_rpc_cancels_nothing_and_attributes_pass_through():
    handle = Handle()

    async def handler(request, context):
        wrapped = grpc_proxy._CancelOnDisconnect(handle, context)
        assert wrapped.deployment_id == "Decode"
        wrapped.remote(request)
        for i in range(3):
            yield bytes([i])
        wrapped.finished = True  # what the patched send_request_to_replica does after the last message

    server, port = await serve(handler)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            got = [m async for m in ch.unary_stream(METHOD)(b"")]
        await asyncio.sleep(0.1)  # the done-callback has run
    finally:
        await server.stop(None)
    assert got == [b"\x00", b"\x01", b"\x02"] and handle.responses[0].cancels == 0


async def test_the_patch_wraps_only_unary_request_streams_and_installs_once(monkeypatch):
    from ray.serve._private import proxy
    from ray.serve._private.proxy_request_response import gRPCProxyRequest, gRPCStreamingType

    seen = []

    async def original(self, request_id, internal_request_id, handle, proxy_request, *args, **kwargs):
        seen.append(handle)
        yield "status"

    monkeypatch.setattr(proxy.gRPCProxy, "send_request_to_replica", original)
    assert grpc_proxy.install_cancel_propagation() and grpc_proxy.install_cancel_propagation()
    patched = proxy.gRPCProxy.send_request_to_replica
    assert patched.__wrapped__ is original

    handle = Handle()
    for kind in (gRPCStreamingType.UNARY_STREAM, gRPCStreamingType.STREAM_STREAM):
        req = object.__new__(gRPCProxyRequest)  # its constructor reads a live server context
        req.streaming_type, req.context = kind, None
        assert [m async for m in patched(None, "rid", "iid", handle, req)] == ["status"]
    assert isinstance(seen[0], grpc_proxy._CancelOnDisconnect) and seen[0].finished and seen[1] is handle


def test_an_unknown_serve_shape_is_reported_not_fatal(monkeypatch):
    from ray.serve._private import proxy

    monkeypatch.delattr(proxy.gRPCProxy, "send_request_to_replica")
    assert grpc_proxy.install_cancel_propagation() is False
