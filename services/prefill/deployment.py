"""The Prefill Ray Serve deployment: a thin shell around PrefillWorker (autoscaled on its own)."""

from __future__ import annotations

import logging

from ray import serve

from services.metrics import ray_metrics
from services.prefill.api import CacheHandle, PrefillRequest
from services.prefill.store import StoreClients
from services.prefill.worker import PrefillWorker
from services.settings import Settings


def make_settings(overrides: dict | None) -> Settings:
    """This process's settings: HEADWISE_* env, then the app's args (from the Serve config)."""
    return Settings(**(overrides or {}))


def load_runner(settings: Settings):
    import torch

    from headwise.models import ModelRunner, resolve_model_path

    if settings.torch_threads:  # else as Ray allocates: OMP_NUM_THREADS = the replica's num_cpus
        torch.set_num_threads(settings.torch_threads)
    dtype = getattr(torch, settings.dtype)
    return ModelRunner.from_pretrained(resolve_model_path(settings.model_path or None), settings.device, dtype)


def make_stores(settings: Settings) -> StoreClients:
    return StoreClients(settings.kvstore_addr, settings.service_token, settings.store_timeout_s)


@serve.deployment(name="Prefill", max_ongoing_requests=64, health_check_period_s=10)
class Prefill:
    def __init__(self, overrides: dict | None = None):
        logging.basicConfig(level=logging.INFO)
        settings = make_settings(overrides)
        self.worker = PrefillWorker(load_runner(settings), make_stores(settings), settings, metrics=ray_metrics())

    async def prefill(self, req: PrefillRequest) -> CacheHandle:
        return await self.worker.prefill(req)

    async def stats(self) -> dict:
        """This replica's compressions done after their handoff, and its single-flight waits."""
        return self.worker.stats()
