"""The Decode Ray Serve deployment: the ingress of both front doors, on the same worker.

gRPC `Generate` is served by Ray Serve's gRPC proxy; the OpenAI-compatible HTTP API
(`/v1/chat/completions`, `/v1/models`) by its HTTP proxy, through `__call__`
(services/openai_api/ingress.py).

Errors become gRPC statuses: the code is set on the Serve gRPC context before raising, so
the proxy sends that code and message (never a traceback) to the client, also mid-stream.
"""

from __future__ import annotations

import logging

import grpc
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from headwise.policies import policy_names
from services.decode.worker import DecodeWorker
from services.errors import ServiceError
from services.handoff import CacheHandle, PrefillRequest
from services.metrics import ray_metrics
from services.openai_api.ingress import OpenAIIngress
from services.openai_api.protocol import served_model
from services.replica import load_runner, make_settings, make_stores
from services.tenancy import TenantRegistry

log = logging.getLogger("headwise.decode")
# what Ray raises when no prefill replica can take a call (RayActorError: a replica died under it)
NO_REPLICA = (BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError, RayActorError)


def unwrap(e: BaseException) -> ServiceError | None:
    """The ServiceError behind an exception that crossed Ray (RayTaskError keeps it as .cause)."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, ServiceError):
            return ServiceError(e.code, e.message)
        e = getattr(e, "cause", None) or e.__cause__
        seen += 1
    return None


# What a client reads when something unexpected failed: the error itself goes to the replica's log,
# never to the client (internal exception names and messages are not an API).
INTERNAL_PREFILL = "prefill failed unexpectedly; the error is in the decode replica's log"
INTERNAL_DECODE = "decode failed unexpectedly; the error is in the decode replica's log"


def prefill_error(e: BaseException) -> ServiceError:
    """The status of a failed prefill call: prefill's own ServiceError; UNAVAILABLE when no prefill
    replica could take it (queue full, none running, replica died), so a client knows to retry
    (HTTP 503); INTERNAL otherwise, in one fixed line (the error goes to the log)."""
    err = unwrap(e)
    if err is not None:
        return err
    cause = getattr(e, "cause", None) or e
    if isinstance(e, NO_REPLICA) or isinstance(cause, NO_REPLICA):
        return ServiceError("UNAVAILABLE", "no prefill replica could take the request; retry shortly")
    log.exception("prefill failed")
    return ServiceError("INTERNAL", INTERNAL_PREFILL)


@serve.deployment(name="Decode", max_ongoing_requests=64, health_check_period_s=10)
class Decode:
    def __init__(self, prefill: DeploymentHandle, overrides: dict | None = None):
        logging.basicConfig(level=logging.INFO)
        settings = make_settings(overrides)
        self._prefill = prefill
        self.worker = DecodeWorker(load_runner(settings), make_stores(settings), self._call_prefill,
                                   TenantRegistry.from_settings(settings), settings, metrics=ray_metrics())
        self.openai = OpenAIIngress(self.worker, served_model(settings), tuple(policy_names()))

    async def _call_prefill(self, req: PrefillRequest) -> CacheHandle:
        try:
            return await self._prefill.prefill.remote(req)
        except Exception as e:  # noqa: BLE001 - every prefill failure becomes a status, never a hang
            raise prefill_error(e) from None

    async def Generate(self, request, grpc_context):  # noqa: N802 - the gRPC method name
        metadata = dict(grpc_context.invocation_metadata())
        try:
            async for msg in self.worker.generate(request, metadata):
                yield msg
        except ServiceError as e:
            grpc_context.set_code(getattr(grpc.StatusCode, e.code))
            grpc_context.set_details(e.message)
            raise
        except Exception:  # noqa: BLE001
            log.exception("Generate failed")
            grpc_context.set_code(grpc.StatusCode.INTERNAL)
            grpc_context.set_details(INTERNAL_DECODE)
            raise

    async def __call__(self, request):  # the Serve HTTP port: the OpenAI-compatible API
        return await self.openai(request)

    async def stats(self) -> dict:
        return self.worker.stats()
