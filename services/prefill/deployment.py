"""The Prefill Ray Serve deployment: a thin shell around PrefillWorker (autoscaled on its own)."""

from __future__ import annotations

import logging

from ray import serve

from services.handoff import CacheHandle, PrefillRequest
from services.metrics import ray_metrics
from services.prefill.worker import PrefillWorker
from services.replica import load_runner, make_settings, make_stores


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
