"""Decode: the gRPC ingress (`Generate`), fetch the cache chain, recall merged rows, stream tokens.

`request` validates a GenerateRequest, `worker` is the Ray-free logic, `deployment` wraps it
as the Ray Serve deployment behind the gRPC proxy.
"""
