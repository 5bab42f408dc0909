"""Services on top of the engine: kvstore (gRPC over Redis), prefill and decode (Ray Serve)."""
