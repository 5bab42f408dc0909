"""The Serve application config: the one source of truth for `headwise up` and the KubeRay RayService.

`serve_config(settings)` returns the dict of Ray Serve's config file schema (what
`serve deploy` and RayService.spec.serveConfigV2 take). k8s/ is generated from / checked
against it by tests, so the local cluster and Kubernetes cannot drift.
"""

from __future__ import annotations

from typing import Any

from services.settings import Settings

APP_NAME = "headwise"
APP_IMPORT_PATH = "services.app:build_app"
PREFILL_DEPLOYMENT = "Prefill"
DECODE_DEPLOYMENT = "Decode"
# The servicer function Ray Serve's gRPC proxy calls in its own process: registers Generate and makes
# client cancels reach the replica (see services/decode/grpc_proxy.py).
GRPC_SERVICER_FUNCTIONS = ["services.decode.grpc_proxy.add_GenerateServicer_to_server"]
# The HTTP proxy (http_options.port) sends every request under the app's route prefix "/" to the
# ingress, Decode, whose __call__ serves the OpenAI-compatible API under /v1 (services/openai_api).
OPENAI_ROUTE = "/v1"


def serve_config(settings: Settings) -> dict[str, Any]:
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": settings.http_port},
        "grpc_options": {"port": settings.grpc_port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": APP_IMPORT_PATH,
                "args": {},
                "deployments": [
                    {
                        "name": PREFILL_DEPLOYMENT,
                        "autoscaling_config": {
                            "min_replicas": settings.prefill_min_replicas,
                            "max_replicas": settings.prefill_max_replicas,
                            "target_ongoing_requests": settings.prefill_target_ongoing_requests,
                        },
                        "ray_actor_options": _actor_options(settings.prefill_num_cpus, settings.prefill_num_gpus),
                    },
                    {
                        "name": DECODE_DEPLOYMENT,
                        "autoscaling_config": {
                            "min_replicas": settings.decode_min_replicas,
                            "max_replicas": settings.decode_max_replicas,
                            "target_ongoing_requests": settings.decode_target_ongoing_requests,
                        },
                        "ray_actor_options": _actor_options(settings.decode_num_cpus, settings.decode_num_gpus),
                    },
                ],
            }
        ],
    }


def _actor_options(num_cpus: float, num_gpus: float) -> dict[str, float]:
    # num_gpus only when asked for, so the CPU config stays exactly what it was
    return {"num_cpus": num_cpus, "num_gpus": num_gpus} if num_gpus > 0 else {"num_cpus": num_cpus}
