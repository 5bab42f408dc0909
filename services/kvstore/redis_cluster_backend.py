"""RedisClusterBackend: the store's Backend over a Redis Cluster (redis-py's cluster clients).

    rediscluster://10.0.0.5:7000,10.0.0.6:7000,10.0.0.7:7000   (startup nodes; the rest is discovered)

Same layout, scripts and behaviour as RedisBackend, with one change: the tenant's namespace is
a hash tag, `hw:{t}:`, so every key of a tenant (chunks, recall blobs, manifests, index, sizes,
LRU, counters, semaphores, records) hashes to one slot. That is what keeps each commit one
atomic Lua script: it checks the quota against the tenant's index, evicts the tenant's least
recently used segments and writes the manifest, keys a per-segment tag could not keep together.
Tenants spread over the slots (CRC16 of the tenant id mod 16384), so over the masters; one
tenant's data and load stay on one master (docs/kvstore.md).

A master that is down makes its tenants' calls fail (BackendUnavailable, UNAVAILABLE to the
services, which then compute and bypass the store); the other masters' tenants are unaffected.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import redis.asyncio.cluster as aiocluster
import redis.cluster as cluster
from redis.exceptions import ClusterError, RedisClusterException, ResponseError

from services.kvstore.backend import BackendUnavailable
from services.kvstore.redis_backend import (
    _ACQUIRE,
    _COMMIT,
    _DROP,
    _LOOKUP,
    _MANIFEST,
    _RECALL,
    _RELEASE,
    _USAGE,
    MAX_INFLIGHT,
    RedisBackend,
)

SCHEME = "rediscluster://"

# Delete of one segment as a script (the single-Redis backend uses WATCH/MULTI, which a cluster
# pipeline does not offer): KEYS idx, sz, lru, manifest; ARGV key, namespace. 1 = it existed.
_DELETE = _DROP + """
if redis.call('EXISTS', KEYS[4]) == 0 then return 0 end
drop(ARGV[2], KEYS[1], KEYS[2], KEYS[3], ARGV[1])
return 1
"""


def startup_nodes(url: str) -> list[tuple[str, int]]:
    """[(host, port)] of a rediscluster:// URL; ValueError saying what is wrong."""
    if not url.startswith(SCHEME):
        raise ValueError(f"a Redis Cluster URL starts with {SCHEME}: {url!r}")
    out = []
    for part in filter(None, (p.strip() for p in url[len(SCHEME):].split("/")[0].split(","))):
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"Redis Cluster node {part!r} in {url!r} is not host:port")
        out.append((host.strip("[]"), int(port)))
    if not out:
        raise ValueError(f"Redis Cluster URL {url!r} names no node")
    return out


class RedisClusterBackend(RedisBackend):
    name = "redis-cluster"

    def __init__(self, url: str, deadline_s: float = 2.0):  # not super's: that builds single-node clients
        self.url, self.deadline_s = url, deadline_s
        nodes = startup_nodes(url)
        common = dict(socket_timeout=deadline_s, socket_connect_timeout=deadline_s, decode_responses=False)
        # few retries, short backoff: a dead master should cost its tenants one deadline, not many
        self.r = aiocluster.RedisCluster(startup_nodes=[aiocluster.ClusterNode(h, p) for h, p in nodes],
                                         cluster_error_retry_attempts=1, **common)
        self.sync = cluster.RedisCluster(startup_nodes=[cluster.ClusterNode(h, p) for h, p in nodes],
                                         cluster_error_retry_attempts=1, **common)
        self._threads = ThreadPoolExecutor(MAX_INFLIGHT, thread_name_prefix="kvstore-rcluster-write")
        self._bulk = self._read_threads = None  # chunk reads through redis-py's MGET (one slot, one node)
        for attr, src in (("_usage", _USAGE), ("_commit", _COMMIT), ("_manifest", _MANIFEST), ("_lookup", _LOOKUP),
                          ("_recall", _RECALL), ("_acquire", _ACQUIRE), ("_release", _RELEASE),
                          ("_delete", _DELETE)):
            setattr(self, attr, self.r.register_script(src))

    @asynccontextmanager
    async def guard(self, what: str):
        """As RedisBackend's, and a slot whose master is down (CLUSTERDOWN, TRYAGAIN, no node for
        the slot) is BackendUnavailable too."""
        try:
            async with super().guard(what):
                yield
        except (ClusterError, RedisClusterException) as e:
            raise BackendUnavailable(f"redis cluster {self.where} failed {what}: {type(e).__name__}: {e}") from None
        except ResponseError as e:
            if not str(e).startswith(("CLUSTERDOWN", "TRYAGAIN", "MASTERDOWN")):
                raise
            raise BackendUnavailable(f"redis cluster {self.where} failed {what}: {e}") from None

    @property
    def where(self) -> str:
        return self.url[len(SCHEME):]

    @staticmethod
    def _ns(tenant: str) -> str:
        return f"hw:{{{tenant}}}"  # the hash tag: all of a tenant's keys in one slot

    async def delete(self, tenant, key):
        ns = self._ns(tenant)
        async with self.guard("a delete"):
            return bool(await self._delete(keys=[f"{ns}:idx", f"{ns}:sz", f"{ns}:lru", self._mkey(tenant, key)],
                                           args=[key, ns]))

    async def eviction_risk(self) -> str | None:
        return None  # each master's maxmemory policy is the deployment's to set (docs/deploy.md)
