"""A small gRPC client of the Generate API (async, with a sync wrapper)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import grpc

from services.protos.headwise.v1 import generate_pb2 as pb
from services.protos.headwise.v1 import generate_pb2_grpc as pb_grpc


@dataclass
class Answer:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    figures: dict = field(default_factory=dict)
    first_delta_s: float = 0.0  # client-side time to the first delta
    deltas: int = 0
    completed_before_figures: bool = False


class HeadwiseClient:
    """One connection (channel) to the service; `tenant_key` goes in the `authorization` metadata."""

    def __init__(self, addr: str, key: str, tenant: str | None = None):
        self.addr = addr
        self.channel = grpc.aio.insecure_channel(addr, options=[("grpc.max_receive_message_length", 64 << 20)])
        self.stub = pb_grpc.GenerateStub(self.channel)
        self.metadata = [("authorization", f"Bearer {key}")] + ([("x-headwise-tenant", tenant)] if tenant else [])

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "HeadwiseClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def stream(self, prompt: str, context: str = "", **opts):
        """The raw call: iterate it for GenerateResponse messages; `.cancel()` stops it."""
        req = pb.GenerateRequest(context=context, prompt=prompt, **opts)
        return self.stub.Generate(req, metadata=self.metadata)

    async def generate(self, prompt: str, context: str = "", **opts) -> AsyncIterator[pb.GenerateResponse]:
        async for msg in self.stream(prompt, context, **opts):
            yield msg

    async def ask(self, prompt: str, context: str = "", on_text: Callable[[str], None] | None = None, **opts) -> Answer:
        t0 = time.perf_counter()
        ans = Answer()
        async for msg in self.stream(prompt, context, **opts):
            if msg.HasField("delta"):
                if not ans.deltas:
                    ans.first_delta_s = time.perf_counter() - t0
                ans.deltas += 1
                ans.text += msg.delta.text
                ans.token_ids += list(msg.delta.token_ids)
                if on_text and msg.delta.text:
                    on_text(msg.delta.text)
            else:
                ans.figures = figures_dict(msg.figures)
        return ans


def figures_dict(f: pb.Figures) -> dict:
    return {d.name: getattr(f, d.name) for d in pb.Figures.DESCRIPTOR.fields}


def ask(addr: str, key: str, prompt: str, context: str = "", **opts) -> Answer:
    """Synchronous one-shot question (a fresh connection)."""

    async def run() -> Answer:
        async with HeadwiseClient(addr, key) as c:
            return await c.ask(prompt, context, **opts)

    return asyncio.run(run())
