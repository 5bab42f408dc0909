"""The Serve application over a Ray head host and two worker hosts (custom resources place replicas)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from cluster.client import HeadwiseClient
from services.protos.headwise.v1 import generate_pb2 as pb
from tests.multihost.conftest import TENANT, TENANT_KEY, WORKERS, app_settings, serve_config_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

WORDS = ("harbour lantern copper meadow silver quarry orchard falcon ember willow granite tide "
         "beacon cedar marble thistle").split()
QUESTIONS = ["What is the document about?", "Name one metal in it.", "Which bird appears?"]
GREEDY = dict(max_new_tokens=16, temperature=0.0)
# Prefill on one worker host, Decode on the other: every cache crosses hosts through the store
SPLIT = {"Prefill": {"replicas": 1, "resources": {"hw_w1": 0.01}},
         "Decode": {"replicas": 1, "resources": {"hw_w2": 0.01}}}


def document(seed: int, words: int = 240) -> str:
    return " ".join(WORDS[(i * 7 + seed * 3 + i // 5) % len(WORDS)] for i in range(words)) + "."


async def ask_all(addr: str, pairs: list[tuple[str, str]]) -> list:
    async with HeadwiseClient(addr, TENANT_KEY) as c:
        return [await asyncio.wait_for(c.ask(q, doc, **GREEDY), 120) for doc, q in pairs]


PAIRS = [(document(0), QUESTIONS[0]), (document(0), QUESTIONS[1]), (document(1), QUESTIONS[2])]


@pytest.fixture(scope="session")  # session: made before the multi-host Ray cluster, not beside it
def reference(tiny_model_dir):
    """The single-host local cluster's answers to PAIRS (the same settings and model)."""
    from cluster.local import LocalCluster

    settings = app_settings(tiny_model_dir, "unused:0")
    with LocalCluster(settings, tenants={TENANT: TENANT_KEY}, num_cpus=2, log=lambda s: None) as c:
        return asyncio.run(ask_all(c.endpoints.grpc, PAIRS))


@pytest.fixture(scope="module")
def split(reference, ray_cluster, kvstores, tiny_model_dir):
    ray_cluster.deploy(serve_config_for(app_settings(tiny_model_dir, kvstores), SPLIT))
    return ray_cluster


def test_answers_equal_the_single_host_cluster(split, reference, net) -> None:
    assert split.replicas() == {"Prefill": [net["w1"].addr], "Decode": [net["w2"].addr]}
    got = asyncio.run(ask_all(split.grpc_addr, PAIRS))
    for (_doc, q), ref, ans in zip(PAIRS, reference, got, strict=True):
        assert ans.token_ids and ans.token_ids == ref.token_ids, q
        assert ans.figures["prompt_tokens"] == ref.figures["prompt_tokens"]


def test_document_stored_by_one_host_is_reused_by_the_others_decode(split) -> None:
    doc = document(5)
    cold, warm = asyncio.run(ask_all(split.grpc_addr, [(doc, QUESTIONS[0]), (doc, QUESTIONS[1])]))
    assert cold.figures["store_status"] == "stored" and cold.figures["reused_tokens"] == 0
    assert warm.figures["store_status"] == "reused" and warm.figures["reused_tokens"] > 200
    assert warm.figures["wire_bytes"] > 0  # Decode on w2 fetched what Prefill on w1 put


# Prefill autoscaled between 1 and 2 replicas, at most one per worker host (so the second goes to the
# other host), with delays and look-back of seconds instead of Serve's 30 s / 600 s; one Decode per host.
# Placement is SPREAD's, so the next test's deploy only reconfigures and adds a Prefill replica.
AUTOSCALE = {"Prefill": {"replicas": 1, "min": 1, "max": 2, "resources": {"hw_worker": 0.01}, "per_node": 1,
                         "autoscaling": {"target_ongoing_requests": 1, "upscale_delay_s": 1.0, "downscale_delay_s": 6.0,
                                         "look_back_period_s": 2.0, "metrics_interval_s": 0.5}},
             "Decode": {"replicas": 2, "resources": {"hw_worker": 0.01}, "per_node": 1}}
COLD = dict(max_new_tokens=2, temperature=0.0)  # prefill-bound requests: a new document each time


async def cold_requests(addr: str, stop: asyncio.Event, clients: int) -> list[dict]:
    """`clients` concurrent loops of cold requests until `stop`: each request's outcome and times."""
    out: list[dict] = []
    counter = iter(range(10**6))

    async def loop(c: HeadwiseClient) -> None:
        while not stop.is_set():
            i = next(counter)
            doc, t0 = f"Report {i}. " + document(i, words=500), time.time()
            try:
                ans = await asyncio.wait_for(c.ask(QUESTIONS[0], doc, **COLD), 90)
                out.append({"t0": t0, "t1": time.time(), "ok": bool(ans.token_ids), "status": ans.figures["store_status"]})
            except (grpc.aio.AioRpcError, asyncio.TimeoutError) as e:
                out.append({"t0": t0, "t1": time.time(), "ok": False, "status": getattr(e, "code", lambda: "timeout")()})

    async with HeadwiseClient(addr, TENANT_KEY) as c:
        await asyncio.gather(*(loop(c) for _ in range(clients)))
    return out


def test_prefill_scales_out_to_the_other_host_and_back(ray_cluster, kvstores, tiny_model_dir, net) -> None:
    ray_cluster.deploy(serve_config_for(app_settings(tiny_model_dir, kvstores), AUTOSCALE))
    watch = ray_cluster.watch(400)

    async def scenario():
        await watch.until(lambda line: line["states"].get("Prefill") == {"RUNNING": 1}, 60, "Prefill at 1 replica")
        stop, t_load = asyncio.Event(), time.time()
        load = asyncio.create_task(cold_requests(ray_cluster.grpc_addr, stop, clients=6))
        try:
            decided = await watch.until(lambda line: sum(line["states"].get("Prefill", {}).values()) >= 2, 150,
                                        "a second Prefill replica under load")
            up = await watch.until(lambda line: watch.running("Prefill", line) == 2, 120, "2 RUNNING Prefill replicas")
            await asyncio.sleep(8)  # the load goes on over both replicas
        finally:
            stop.set()
            results = await asyncio.wait_for(load, 120)
        t_stop = time.time()
        down = await watch.until(lambda line: line["states"].get("Prefill") == {"RUNNING": 1}, 120,
                                 "Prefill back at 1 replica after the load")
        return t_load, decided, up, t_stop, down, results

    try:
        t_load, decided, up, t_stop, down, results = asyncio.run(scenario())
    finally:
        watch.stop()
    during = [r for r in results if r["t1"] >= up["t"]]
    print(f"autoscaling: load of 6 clients at 0 s; second Prefill replica started {decided['t'] - t_load:.1f} s, "
          f"RUNNING {up['t'] - t_load:.1f} s (on {up['nodes'].get('Prefill')}); load stopped {t_stop - t_load:.1f} s; "
          f"back at 1 replica {down['t'] - t_load:.1f} s ({down['t'] - t_stop:.1f} s after); "
          f"{len(results)} requests, {len(during)} ending while 2 ran, failed: {[r for r in results if not r['ok']][:3]}")
    assert sorted(up["nodes"]["Prefill"]) == sorted([net["w1"].addr, net["w2"].addr])  # one on each worker host
    assert results and all(r["ok"] and r["status"] == "stored" for r in results)  # every request, all cold, completed
    assert during, "no request completed while two Prefill replicas ran"


# Both deployments on both worker hosts, one replica of each per host
SPREAD = {name: {"replicas": 2, "resources": {"hw_worker": 0.01}, "per_node": 1} for name in ("Prefill", "Decode")}
LONG = dict(max_new_tokens=900, temperature=0.0)
DECODE_PROCESS = "ServeReplica:headwise:Decode"


async def busiest_worker(net) -> str:
    """The worker host whose Decode replica burns the most CPU now: the one serving the streams."""
    before = {w: net[w].cpu_seconds(DECODE_PROCESS) for w in WORKERS}
    await asyncio.sleep(1.0)
    used = {w: net[w].cpu_seconds(DECODE_PROCESS) - before[w] for w in WORKERS}
    return max(used, key=used.get)


async def stream_until_end(c: HeadwiseClient, doc: str, q: str, started: asyncio.Event, deadline_s: float) -> dict:
    """Read a stream to its end: the tokens it sent and its final status (OK or the error code)."""
    tokens: list[int] = []
    t0 = asyncio.get_running_loop().time()
    try:
        call = c.stub.Generate(pb.GenerateRequest(context=doc, prompt=q, **LONG), metadata=c.metadata,
                               timeout=deadline_s)
        async for msg in call:
            if msg.HasField("delta"):
                tokens += list(msg.delta.token_ids)
                if len(tokens) >= 20:
                    started.set()
        code = grpc.StatusCode.OK
        details = ""
    except grpc.aio.AioRpcError as e:
        code, details = e.code(), e.details() or ""
    return {"tokens": tokens, "code": code, "details": details, "end": asyncio.get_running_loop().time(),
            "s": asyncio.get_running_loop().time() - t0}


async def first_success_after(addr: str, doc: str, t_fault: float, limit_s: float) -> tuple[float, int, object]:
    """Ask until an answer comes back: (seconds since the fault, failed attempts, the answer)."""
    failures = 0
    loop = asyncio.get_running_loop()
    async with HeadwiseClient(addr, TENANT_KEY) as c:
        while loop.time() - t_fault < limit_s:
            try:
                ans = await asyncio.wait_for(c.ask(QUESTIONS[2], doc, **GREEDY), 20)
                return loop.time() - t_fault, failures, ans
            except (grpc.aio.AioRpcError, asyncio.TimeoutError):
                failures += 1
                await asyncio.sleep(0.5)
    raise AssertionError(f"no request succeeded within {limit_s} s of the fault ({failures} failed)")


def test_worker_host_dies_mid_stream(ray_cluster, kvstores, tiny_model_dir, net) -> None:
    ray_cluster.deploy(serve_config_for(app_settings(tiny_model_dir, kvstores), SPREAD))
    assert ray_cluster.replicas() == {d: sorted([net["w1"].addr, net["w2"].addr]) for d in ("Prefill", "Decode")}
    doc, q = document(9), "Tell the whole story."

    async def scenario():
        async with HeadwiseClient(ray_cluster.grpc_addr, TENANT_KEY) as c:
            full = await asyncio.wait_for(c.ask(q, doc, **LONG), 180)  # stores doc; the expected tokens
            assert full.figures["store_status"] == "stored" and len(full.token_ids) > 60
            started = [asyncio.Event() for _ in range(4)]
            streams = [asyncio.create_task(stream_until_end(c, doc, q, ev, 120)) for ev in started]
            await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in started)), 120)
            victim = await busiest_worker(net)
            t_fault = asyncio.get_running_loop().time()
            killed = net[victim].die()  # every Ray process of the worker host: raylet, replicas, its proxy
            recovery = asyncio.create_task(first_success_after(ray_cluster.grpc_addr, document(0), t_fault, 60))
            results = await asyncio.wait_for(asyncio.gather(*streams), 150)
            for r in results:
                r["after_fault_s"] = r["end"] - t_fault
            recovery = await recovery
            after = await asyncio.wait_for(c.ask(QUESTIONS[1], doc, **GREEDY), 60)
        return victim, full, killed, results, recovery, after

    victim, full, killed, results, (recovered_s, failed, _), after = asyncio.run(scenario())
    summary = [(r["code"].name, len(r["tokens"]), round(r["after_fault_s"], 1), r["details"][:120]) for r in results]
    print(f"worker host {victim} killed ({killed} processes): streams {summary}; first new request ok after "
          f"{recovered_s:.1f} s ({failed} failed before)")
    assert killed > 0
    for r in results:  # never a wrong token: each stream is a prefix of the answer, or all of it
        assert r["tokens"] == full.token_ids[: len(r["tokens"])]
        assert r["code"] in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE), (r["code"], r["details"])
        assert "Error" not in r["details"]  # one line for a client, no Ray exception text
        assert r["code"] != grpc.StatusCode.OK or r["tokens"] == full.token_ids
    assert any(r["code"] != grpc.StatusCode.OK for r in results), "no stream was on the killed host"
    assert recovered_s < 30.0
    assert after.figures["store_status"] == "reused"  # stored before the fault, reused after it
    # Ray's GCS marks the host's actors dead once its health checks of that raylet fail
    survivor, t0 = next(w for w in WORKERS if w != victim), time.monotonic()
    while ray_cluster.replicas().get("Decode") != [net[survivor].addr]:
        assert time.monotonic() - t0 < 120, f"Ray still lists a Decode replica on {victim} after 120 s"
        time.sleep(2)
    print(f"Ray listed {victim}'s replicas dead {time.monotonic() - t0 + recovered_s:.0f} s after the kill (at most)")
