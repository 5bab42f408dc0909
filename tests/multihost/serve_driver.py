"""Deploy / inspect the Serve application on the multi-host Ray cluster, run inside the head host.

    python -m tests.multihost.serve_driver deploy CONFIG.json   # the serve config dict, JSON
    python -m tests.multihost.serve_driver replicas             # JSON: deployment -> [node ip of each RUNNING replica]
    python -m tests.multihost.serve_driver watch SECONDS        # a JSON line every 0.5 s: replica states and nodes

A driver process connects to the head's GCS (10.213.0.10:6379 by default, $HWMH_RAY_ADDRESS),
does one thing and exits; Serve's controller and replicas live on in the cluster (detached).
"""

from __future__ import annotations

import json
import os
import sys
import time


def connect():
    import ray

    ray.init(address=os.environ.get("HWMH_RAY_ADDRESS", "10.213.0.10:6379"), log_to_driver=False,
             configure_logging=False)
    return ray


def deploy(config_path: str, timeout_s: float = 240.0) -> None:
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    connect()
    schema = ServeDeploySchema.model_validate(json.loads(open(config_path).read()))
    client = serve_api.serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location,
                                   grpc_options=gRPCOptions(**schema.grpc_options.model_dump()))
    client.deploy_apps(schema, _blocking=False)
    name = schema.applications[0].name
    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(name)
        state = str(app.status) if app else "NOT_STARTED"
        if state.endswith("RUNNING"):
            break
        if state.endswith("DEPLOY_FAILED") or time.monotonic() > deadline:
            raise SystemExit(f"the serve application is {state}: {app.message if app else ''}")
        time.sleep(0.5)
    print(json.dumps({"status": state}))


def alive_replicas() -> dict[str, list[str]]:
    from ray._private import state  # the GCS's actor table: no dashboard needed

    out: dict[str, list[str]] = {}
    for a in state.actors().values():
        cls = a.get("ActorClassName") or ""
        if a.get("State") == "ALIVE" and cls.startswith("ServeReplica:"):
            out.setdefault(cls.split(":")[-1], []).append(a["Address"]["IPAddress"])
    return {k: sorted(v) for k, v in out.items()}


def replicas() -> None:
    connect()
    print(json.dumps(alive_replicas()))


def watch(seconds: float, app_name: str = "headwise") -> None:
    """Serve's replica states per deployment ({"RUNNING": 2, "STARTING": 1}) and the nodes of the
    live replica actors, as one JSON line every 0.5 s with the wall clock (the test's clock too)."""
    from ray import serve

    connect()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.time()
        try:
            app = serve.status().applications.get(app_name)
            states = {n: {str(k).split(".")[-1]: v for k, v in d.replica_states.items()}
                      for n, d in (app.deployments.items() if app else [])}
            line = {"t": t, "states": states, "nodes": alive_replicas()}
        except Exception as e:  # noqa: BLE001 - one failed look is a gap in the timeline, not the end of it
            line = {"t": t, "error": str(e)[:200]}
        print(json.dumps(line), flush=True)
        time.sleep(max(0.0, 0.5 - (time.time() - t)))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "deploy":
        deploy(sys.argv[2])
    elif cmd == "replicas":
        replicas()
    elif cmd == "watch":
        watch(float(sys.argv[2]))
    else:
        raise SystemExit(f"unknown command {cmd!r}: deploy CONFIG.json | replicas | watch SECONDS")
