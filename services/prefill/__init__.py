"""Prefill: tokenize, reuse what the store holds, run the model over the rest, compress, store.

`api` is what decode sends and receives (picklable dataclasses, no tensors but the first
token's logits); `worker` is the Ray-free logic; `deployment` wraps it as a Ray Serve deployment.
"""
