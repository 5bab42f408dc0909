"""Services around the headwise engine: KV store, prefill and decode workers (Ray, gRPC, Redis live here)."""
