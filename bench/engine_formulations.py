"""Candidate formulations of one-stream ragged decode attention, timed over a real compressed cache.

    python -m bench.engine_formulations --policy kvzip --json bench/results/engine_formulations.json

The default model, a 2,000-token document compressed by the policy at kept 0.25, four decode
tokens in the tail; one query per layer, all 30 layers per timed step, each candidate checked
equal to the per-head reference (1e-5) first, then all timed in turn, 15 rounds (3 dropped).
Then `--streams` copies of the cache decoding together: the padded `LayerView` block against
pages (`headwise/attention_paged.py`) with keys row-major or transposed per page, each checked
equal to the padded one (1e-5), 10 rounds (2 dropped).
"""
import argparse
import dataclasses
import json
import statistics
import time

import torch

from headwise.attention import build_view, layer_view, view_decode
from headwise.attention_paged import PAGE, build_paged, paged_decode
from headwise.attention_reference import ragged_decode_attention
from headwise.documents import document_tokens
from headwise.models import ModelRunner, resolve_model_path
from headwise.policies import get_policy

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--policy", default="kvzip")
ap.add_argument("--json", default=None)
ap.add_argument("--streams", type=int, default=16, help="streams of the batched comparison (padded views vs pages)")
a = ap.parse_args()
torch.set_num_threads(1)
r = ModelRunner.from_pretrained(resolve_model_path(None))
tok = r.tokenizer
ids = tok(document_tokens(tok, 2050), add_special_tokens=False).input_ids[:2000]
pol = get_policy(a.policy, kept=0.25)
res = r.prefill_segment(ids, policy=pol, ctx=r.context(pol))
cache = res.cache
for t in [5, 6, 7, 8]:
    r.decode_step(t, cache)
L = cache.layers
Hq, Hkv, d = r.num_heads, r.num_kv_heads, r.head_dim
G = Hq // Hkv
sc = 0.125
g = torch.Generator().manual_seed(0)
qs = [torch.randn(Hq, 1, d, generator=g) for _ in L]
torch.set_grad_enabled(False)
lens = [lc.head_lengths() for lc in L]
print("rows per head, layers 0-4:", [x.tolist() for x in lens[:5]])

def prep_masked(lc):
    lc.keys.shape[0]
    head = torch.repeat_interleave(torch.arange(Hkv), lc.head_lengths())  # [R]
    own = head[:, None] == (torch.arange(Hq) // G)[None]  # [R, Hq]
    bias = torch.where(own, lc.log_weights[:, None], torch.tensor(float("-inf")))
    return bias.T.contiguous()  # [Hq, R]

def masked(q, lc, bias):
    qq = q[:, 0]  # [Hq, d]
    lr = torch.addmm(bias, qq, lc.keys.T, alpha=sc)  # [Hq, R]
    tk, tv = lc.tail()
    lt = torch.bmm(qq.view(Hkv, G, d), tk.transpose(1, 2)).mul_(sc).view(Hq, -1)  # [Hq, T]
    p = torch.softmax(torch.cat([lr, lt], 1), -1)
    R = lr.shape[1]
    o = p[:, :R] @ lc.values
    o += torch.bmm(p[:, R:].view(Hkv, G, -1), tv).view(Hq, d)
    return o[:, None]

def prep_padded(lc):
    n = lc.head_lengths(); Lm = int(n.max())
    K = lc.keys.new_zeros(Hkv, Lm, d); V = torch.zeros_like(K); B = torch.full((Hkv, 1, Lm), float("-inf"))
    for h in range(Hkv):
        k, v, w = lc.head(h); K[h, :len(v)] = k; V[h, :len(v)] = v; B[h, 0, :len(v)] = w
    return K, V, B

def padded(q, lc, prep):
    K, V, B = prep
    qg = q.view(Hkv, G, d)
    tk, tv = lc.tail()
    lr = torch.baddbmm(B, qg, K.transpose(1, 2), alpha=sc)  # [Hkv, G, L]
    lt = torch.bmm(qg, tk.transpose(1, 2)).mul_(sc)
    p = torch.softmax(torch.cat([lr, lt], 2), -1)
    Lm = K.shape[1]
    o = torch.bmm(p[..., :Lm], V) + torch.bmm(p[..., Lm:], tv)
    return o.reshape(Hq, 1, d)

def prep_flat(lc):
    head = torch.repeat_interleave(torch.arange(Hkv), lc.head_lengths())
    return head

def flat(q, lc, head):
    # gather the group's queries per row, segment softmax with scatter reductions, index_add_ of weighted values
    qg = q.view(Hkv, G, d)
    qr = qg[head]  # [R, G, d]
    lr = torch.einsum("rgd,rd->rg", qr, lc.keys).mul_(sc).add_(lc.log_weights[:, None])  # [R, G]
    tk, tv = lc.tail()
    lt = torch.bmm(qg, tk.transpose(1, 2)).mul_(sc)  # [Hkv, G, T]
    m = torch.full((Hkv, G), float("-inf")).scatter_reduce(0, head[:, None].expand(-1, G), lr, "amax")
    m = torch.maximum(m, lt.amax(-1))
    e = (lr - m[head]).exp_()
    et = (lt - m[..., None]).exp_()
    z = torch.zeros(Hkv, G).index_add_(0, head, e) + et.sum(-1)
    o = torch.zeros(Hkv, G, d).index_add_(0, head, e[:, :, None] * lc.values[:, None, :])
    o += torch.bmm(et, tv)
    return (o / z[..., None]).reshape(Hq, 1, d)

def ref(q, lc, _):
    return ragged_decode_attention(q, lc, sc)[0]


def views(q, lc, view):
    return view_decode(q.view(Hkv, G, d), view, sc)[0].view(Hq, 1, d)

cands = {"per-head (today)": (ref, lambda lc: None), "flat + segment softmax": (flat, prep_flat),
         "padded per head + bias": (padded, prep_padded), "block-diagonal bias over flat rows": (masked, prep_masked),
         "LayerView (padded, tail in the slots: the prefill view)": (views, layer_view)}
preps = {k: [p(lc) for lc in L] for k, (f, p) in cands.items()}
for k, (f, _) in cands.items():
    for i, lc in enumerate(L):
        assert torch.allclose(f(qs[i], lc, preps[k][i]), ref(qs[i], lc, None), atol=1e-5), k
times = {k: [] for k in cands}
with torch.inference_mode():
    for _rep in range(15):
        for k, (f, _) in cands.items():
            t = time.perf_counter()
            for i, lc in enumerate(L):
                f(qs[i], lc, preps[k][i])
            times[k].append((time.perf_counter() - t) * 1e3)
out = {}
for k, v in times.items():
    v = v[3:]
    out[k] = {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)}
    print(f"{k:46s} ms per step (30 layers): median {statistics.median(v):.2f} range {min(v):.2f}-{max(v):.2f}")
pl = preps["padded per head + bias"]
pad = sum(p[0].shape[0] * p[0].shape[1] for p in pl) / sum(lc.keys.shape[0] for lc in L)
print(f"padded slots / ragged rows: {pad:.2f}")

# ---- B streams decoding together: the padded block of every (stream, head) vs pages ----------
B, cap, T = a.streams, 64, 4
qb = [torch.randn(B * Hkv, G, d, generator=g) for _ in L]
padded_views = [build_view([lc] * B, cap) for lc in L]  # lc carries T tail rows already
pages = [build_paged([lc] * B, cap, G) for lc in L]
row_major = [dataclasses.replace(v, keys=v.keys.transpose(1, 2).contiguous().transpose(1, 2)) for v in pages]
n_act = [v.active(0) for v in pages]
for i in range(len(L)):
    want = view_decode(qb[i], padded_views[i], sc)[0]
    for vs in (pages, row_major):
        assert torch.allclose(paged_decode(qb[i], vs[i], n_act[i], sc)[0], want, atol=1e-5)
batched = {"padded block per layer (LayerView, tail slots first)": lambda i: view_decode(qb[i], padded_views[i], sc),
           f"pages of {PAGE}, keys row-major (q @ K^T)": lambda i: paged_decode(qb[i], row_major[i], n_act[i], sc),
           f"pages of {PAGE}, keys transposed per page (q @ K: chosen)": lambda i: paged_decode(qb[i], pages[i], n_act[i], sc)}
bt = {k: [] for k in batched}
with torch.inference_mode():
    for _rep in range(10):
        for k, f in batched.items():
            t = time.perf_counter()
            for i in range(len(L)):
                f(i)
            bt[k].append((time.perf_counter() - t) * 1e3)
held = B * sum(lc.values.shape[0] + T * Hkv for lc in L)
slots = {"padded": sum(v.keys.shape[0] * v.keys.shape[1] for v in padded_views) / held,
         "pages": sum(n * PAGE for n in n_act) / held}
print(f"{B} streams: slots read per held row: padded {slots['padded']:.2f}, pages {slots['pages']:.2f}")
batched_out = {}
for k, v in bt.items():
    v = v[2:]
    batched_out[k] = {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)}
    print(f"{k:62s} ms per step (30 layers, {B} streams): median {statistics.median(v):.2f} range {min(v):.2f}-{max(v):.2f}")
if a.json:
    with open(a.json, "w") as f:
        json.dump({"policy": a.policy, "candidates": out, "padded_over_ragged": pad, "streams": B,
                   "batched": batched_out, "slots_per_held_row": slots}, f, indent=2)
