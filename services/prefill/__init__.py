"""Prefill: tokenize, reuse what the store holds, run the model over the rest, compress, store.

`worker` is the Ray-free logic; `deployment` wraps it as a Ray Serve deployment. What it is sent
and answers (services/handoff.py), the store it uses (services/store.py) and the policy resolution
(services/policy.py) are shared with decode, so they live in services/.
"""
