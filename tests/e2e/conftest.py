"""One local cluster (Redis, kvstore, Ray Serve with prefill, decode and the gRPC proxy) for all e2e tests."""

from __future__ import annotations

import pytest

TENANTS = {"acme": "acme-key", "globex": "globex-key", "solo": "solo-key", "small": "small-key"}
LIMITS = {"solo": {"max_streams": 1}, "small": {"quota_bytes": 1000}}


@pytest.fixture(scope="module")
def cluster(default_model_path):
    from cluster.local import LocalCluster
    from services.settings import Settings

    settings = Settings(default_policy="streaming", default_kept=0.5, max_prompt_tokens=1500, store_timeout_s=2.0,
                        recall_threshold=0.02)  # low, so the merging-policy test sees recalls
    with LocalCluster(settings, tenants=TENANTS, tenant_limits=LIMITS, log=lambda s: None) as c:
        yield c


@pytest.fixture(scope="module")
def document(default_model_path) -> str:
    from transformers import AutoTokenizer

    from cluster.engine_demo import FACT, insert_fact
    from headwise.documents import document_tokens

    tok = AutoTokenizer.from_pretrained(default_model_path)
    return insert_fact(document_tokens(tok, 300), FACT, 0.5)
