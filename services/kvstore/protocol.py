"""What the kvstore's server and its clients agree on besides the proto: call metadata, message caps,
the service and health names. A client imports this, never the server."""

from __future__ import annotations

from headwise.cache.codec import FRAME_OVERHEAD, MAX_CHUNK_BYTES
from services.protos.headwise.v1 import kvstore_pb2 as pb

TOKEN_HEADER = "x-headwise-service-token"
TENANT_HEADER = "x-headwise-tenant"
MAX_FRAME = MAX_CHUNK_BYTES + FRAME_OVERHEAD
MAX_MESSAGE = 8 << 20  # gRPC cap, above MAX_FRAME so an oversize chunk gets the server's precise message
GRPC_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
SERVICE = pb.DESCRIPTOR.services_by_name["KVStore"].full_name
# gRPC health names. "" and SERVICE are readiness: SERVING only while Redis answers. LIVENESS is
# SERVING as long as the server's event loop runs (the health servicer answers from that loop,
# and the Redis watcher's death turns it NOT_SERVING): a Redis outage must not restart the store.
LIVENESS = "liveness"
