"""headwise: LLM inference whose KV cache is compressed per attention head.

The engine (this package) depends on torch and transformers only; services/ add Ray
Serve, gRPC and Redis on top of it.
"""

__version__ = "0.1.0"
