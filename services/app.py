"""The Ray Serve application: Decode (the gRPC ingress) bound to a Prefill handle.

`build_app(args)` is the import path of cluster/serve_config.py (`services.app:build_app`),
used alike by `headwise up` and the KubeRay RayService. `args` are Settings overrides
(field names of services.settings.Settings) that every replica applies over its HEADWISE_* env.
"""

from __future__ import annotations

from typing import Any

from services.decode.deployment import Decode
from services.prefill.deployment import Prefill


def build_app(args: dict[str, Any] | None = None):
    overrides = dict(args or {})
    return Decode.bind(Prefill.bind(overrides), overrides)
