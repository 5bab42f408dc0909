"""The KV store service: a grpc.aio server over Redis (or memory) that keeps compact caches.

    from services.kvstore import KVStoreClient, create_server, start_redis
"""

from services.kvstore.client import KVStoreClient
from services.kvstore.errors import QuotaExceeded, StoreError, StoreUnavailable
from services.kvstore.redis_proc import RedisProcess, redis_server_binary, start_redis
from services.kvstore.server import close_server, create_server, start_server
from services.kvstore.settings import KVStoreSettings

__all__ = [
    "KVStoreClient", "KVStoreSettings", "QuotaExceeded", "RedisProcess", "StoreError", "StoreUnavailable",
    "close_server", "create_server", "redis_server_binary", "start_redis", "start_server",
]
