"""Offline per-model head profiles, cached as JSON on disk keyed by a hash of the weights.

A HeadProfile holds what head-wise policies need beyond one prefill:
  * RazorAttention echo / induction scores per (layer, KV head) from the random
    repeated-token probe (ALGORITHMS.md 1.2), max over each GQA group;
  * PoD layer blocks per KV head (ALGORITHMS.md 4.3): base_of[l][h], the first layer of
    the block that (l, h) belongs to, grouped greedily by 1 - JSD of distant attention.

Probe scaled down: the paper uses 1 prefix + 4 x 2500 random tokens (10,001); the default
model's context is 8,192 and CPU time is scarce, so the default probe is 1 + 4 x 1000
(PROBE_SEGMENT). PoD blocks come from one ~2,000-token pydoc document (last 64 queries)
instead of 32 samples of 8-16K tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from headwise.errors import InvalidInput

PROFILE_VERSION = 1
PROBE_SEGMENT, PROBE_REPEATS, PROBE_SEED, PROBE_LOW = 1000, 4, 42, 10000
POD_TOKENS, POD_QUERIES, POD_SINKS, POD_RECENT, POD_DELTA = 2048, 64, 16, 256, 0.5

Progress = Callable[[str, float], None]


@dataclass
class HeadProfile:
    """Per-model head statistics. echo/induction: [L][Hkv] floats; base_of: [L][Hkv] ints."""

    model_id: str
    num_layers: int
    num_kv_heads: int
    echo: list[list[float]]
    induction: list[list[float]]
    base_of: list[list[int]]
    probe: dict = field(default_factory=dict)
    version: int = PROFILE_VERSION

    def check(self, num_layers: int, num_kv_heads: int) -> "HeadProfile":
        if (self.num_layers, self.num_kv_heads) != (num_layers, num_kv_heads):
            raise InvalidInput(
                f"head profile of model {self.model_id[:16]} has {self.num_layers} layers x {self.num_kv_heads} KV heads, "
                f"the model has {num_layers} x {num_kv_heads}; run `headwise profile --model PATH` for this model"
            )
        return self

    def retrieval_order(self, induction: float = 0.14, echo: float = 0.01) -> list[tuple[int, int]]:
        """RazorAttention's protected heads, most important first (ALGORITHMS.md 1.2).

        Top round(echo * L*Hkv) heads by echo score, then top round(induction * L*Hkv) by
        induction score; the union keeps that order (so a smaller budget can cut its tail).
        """
        n = self.num_layers * self.num_kv_heads
        order: list[tuple[int, int]] = []
        for scores, ratio in ((self.echo, echo), (self.induction, induction)):
            flat = torch.tensor(scores, dtype=torch.float64).flatten()
            top = flat.argsort(descending=True, stable=True)[: round(ratio * n)].tolist()
            for i in top:
                lh = (i // self.num_kv_heads, i % self.num_kv_heads)
                if lh not in order:
                    order.append(lh)
        return order

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def fingerprint(self) -> str:
        """Names this profile's content (its format version, then a digest): part of the segment key of
        a cache compressed under it, so a recomputed or replaced profile never reuses the old caches."""
        body = json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()
        return f"v{self.version}-{hashlib.blake2b(body, digest_size=8).hexdigest()}"

    @classmethod
    def from_json(cls, text: str) -> "HeadProfile":
        d = json.loads(text)
        if d.get("version") != PROFILE_VERSION:
            raise InvalidInput(f"head profile version {d.get('version')!r} is not {PROFILE_VERSION}; recompute it")
        return cls(**d)


# ---- identity and storage ---------------------------------------------------------------
def profile_dir() -> Path:
    env = os.environ.get("HEADWISE_PROFILE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "headwise" / "profiles"


def weights_key(runner) -> str:
    """The runner's model id when it is a weight hash, else a sha256 of the parameters."""
    if re.fullmatch(r"[0-9a-f]{64}", runner.name or ""):
        return runner.name
    h = hashlib.sha256()
    for name, p in sorted(runner.model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def profile_path(key: str) -> Path:
    return profile_dir() / f"{key}-v{PROFILE_VERSION}.json"


def load_profile(path: str | os.PathLike) -> HeadProfile:
    p = Path(path).expanduser()
    if not p.is_file():
        raise InvalidInput(f"no head profile at {str(p)!r}; run `headwise profile --model PATH` first")
    return HeadProfile.from_json(p.read_text())


def save_profile(profile: HeadProfile, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(profile.to_json())
    tmp.replace(path)  # atomic: a reader never sees half a profile
    return path


def profile_for(runner, compute: bool = True, progress: Progress | None = None) -> HeadProfile | None:
    """The runner's profile: memoised, else from disk, else computed and cached (when `compute`)."""
    cached = getattr(runner, "_head_profile", None)
    if cached is not None:
        return cached
    key = weights_key(runner)
    path = profile_path(key)
    if path.is_file():
        prof = load_profile(path).check(runner.num_layers, runner.num_kv_heads)
    elif compute:
        prof = compute_profile(runner, progress=progress or _rich_progress())
        save_profile(prof, path)
    else:
        return None
    runner._head_profile = prof
    return prof


def _rich_progress() -> Progress:
    from rich.progress import Progress as RichProgress

    bar = RichProgress(transient=True)
    task = bar.add_task("head profile", total=1.0)
    bar.start()

    def update(stage: str, frac: float) -> None:
        bar.update(task, description=f"head profile: {stage}", completed=frac)
        if frac >= 1.0:
            bar.stop()

    return update


# ---- computation ------------------------------------------------------------------------
def probe_ids(vocab: int, segment: int, repeats: int, seed: int, prefix: int) -> list[int]:
    """1 prefix token + `repeats` copies of one random segment (ids from [10000, 10000+segment))."""
    lo = PROBE_LOW if vocab > PROBE_LOW + segment else max(3, vocab // 4)
    hi = min(vocab, lo + segment)
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(lo, hi, (segment,), generator=g).tolist()
    return [prefix] + seg * repeats


def echo_induction(q: Tensor, k: Tensor, scaling: float, segment: int, repeats: int, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Per query head echo and induction scores of one layer on the probe.

    q: [Hq, 1+T, d], k: [Hkv, 1+T, d] post-RoPE (prefix first). Returns two [Hq] tensors:
    mean attention (prefix row/col dropped) to earlier copies of the same token (echo)
    and to the token after them (induction).
    """
    Hq, n, _ = q.shape
    G = Hq // k.shape[0]
    kr = k.repeat_interleave(G, 0).float()
    T = segment * repeats
    dev = q.device
    acc = {0: torch.zeros(Hq, device=dev), 1: torch.zeros(Hq, device=dev)}
    count = 0
    cols = torch.arange(n, device=dev)
    for a in range(1 + segment, n, chunk):  # rows of the first copy have no earlier copy
        b = min(n, a + chunk)
        logits = (q[:, a:b].float() @ kr.transpose(1, 2)) * scaling  # [Hq, b-a, n]
        logits.masked_fill_(cols[None, None, :] > torch.arange(a, b, device=dev)[None, :, None], float("-inf"))
        A = torch.softmax(logits, -1)
        rows = torch.arange(a, b, device=dev) - 1  # index in the probe without the prefix
        for off in (0, 1):
            s = torch.zeros(Hq, b - a, device=dev)
            for m in range(1, repeats):
                ok = rows >= m * segment
                c = rows - m * segment + off + 1  # back to indices with the prefix
                s[:, ok] += A[:, ok.nonzero().flatten(), c[ok]]
            acc[off] += s.sum(1)
        count += b - a
    assert count == T - segment
    return acc[0] / count, acc[1] / count


def jsd2(p: Tensor, q: Tensor) -> Tensor:
    """Base-2 Jensen-Shannon divergence over the last axis, in [0, 1]."""
    m = 0.5 * (p + q)

    def kl(a, b):
        return torch.where(a > 0, a * (a.clamp_min(1e-30).log2() - b.clamp_min(1e-30).log2()), torch.zeros_like(a)).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def pod_blocks(distant: list[Tensor], delta: float = POD_DELTA) -> list[list[int]]:
    """Greedy bottom-up layer blocks per KV head (ALGORITHMS.md 4.3).

    distant[l]: [Hkv, G, W, D] attention rows renormalised over distant positions.
    A layer joins the current block while 1 - JSD2 to the block's base layer >= delta.
    """
    L, Hkv = len(distant), distant[0].shape[0]
    base_of = [[0] * Hkv for _ in range(L)]
    for h in range(Hkv):
        base = 0
        for layer in range(1, L):
            sim = 1.0 - float(jsd2(distant[layer][h], distant[base][h]).mean())
            if sim < delta:
                base = layer
            base_of[layer][h] = base
    return base_of


def _distant_rows(state, queries: int, sinks: int, recent: int) -> Tensor:
    from headwise.attention import window_probs

    N = state.num_tokens
    P = window_probs(state.window_queries[:, -queries:], state.keys, state.scaling)  # [Hq, W, N]
    lo, hi = min(sinks, N - 1), max(min(sinks, N - 1) + 1, N - recent)
    D = P[..., lo:hi]
    D = D / D.sum(-1, keepdim=True).clamp_min(1e-30)
    Hkv = state.num_kv_heads
    return D.view(Hkv, -1, *D.shape[1:])  # [Hkv, G, W, D]


def compute_profile(
    runner, segment: int = PROBE_SEGMENT, repeats: int = PROBE_REPEATS, seed: int = PROBE_SEED,
    pod_text: list[int] | None = None, progress: Progress | None = None,
) -> HeadProfile:
    """Run the probe and the PoD sample on `runner`'s model. Minutes on CPU for the default model."""
    from headwise.policies.base import Capture

    progress = progress or (lambda s, f: None)
    tok = runner.tokenizer
    bos = getattr(tok, "bos_token_id", None)  # a tokenizer may have no BOS (the tests' byte tokenizer)
    prefix = bos if bos is not None else 1
    segment = min(segment, (runner.max_positions - 1) // repeats)
    ids = probe_ids(runner.vocab_size, segment, repeats, seed, prefix)
    progress("probe prefill", 0.0)
    out = runner.prefill(ids, capture=Capture(window=len(ids)))
    echo, ind = [], []
    for i, st in enumerate(out.states):
        e, n = echo_induction(st.window_queries, st.keys, st.scaling, segment, repeats)
        Hkv = st.num_kv_heads
        echo.append(e.view(Hkv, -1).amax(1).tolist())  # GQA: max over the group [F: msmodelslim]
        ind.append(n.view(Hkv, -1).amax(1).tolist())
        progress(f"echo/induction layer {i + 1}/{len(out.states)}", 0.1 + 0.6 * (i + 1) / len(out.states))
        st.window_queries = None
    del out
    pod_ids = pod_text if pod_text is not None else _pod_sample(runner)
    progress("PoD sample prefill", 0.75)
    out = runner.prefill(pod_ids, capture=Capture(window=POD_QUERIES))
    distant = [_distant_rows(st, POD_QUERIES, POD_SINKS, POD_RECENT) for st in out.states]
    base_of = pod_blocks(distant)
    progress("done", 1.0)
    return HeadProfile(
        model_id=weights_key(runner), num_layers=runner.num_layers, num_kv_heads=runner.num_kv_heads,
        echo=echo, induction=ind, base_of=base_of,
        probe={"segment": segment, "repeats": repeats, "seed": seed, "prefix": prefix,
               "pod_tokens": len(pod_ids), "pod_queries": POD_QUERIES, "pod_delta": POD_DELTA},
    )


def _pod_sample(runner) -> list[int]:
    n = min(POD_TOKENS, runner.max_positions // 2)
    if runner.tokenizer is None:
        g = torch.Generator().manual_seed(PROBE_SEED + 1)
        return torch.randint(3, runner.vocab_size, (n,), generator=g).tolist()
    from headwise.documents import document_tokens

    return runner.tokenizer(document_tokens(runner.tokenizer, n), add_special_tokens=False).input_ids[:n]


__all__ = ["HeadProfile", "compute_profile", "load_profile", "profile_dir", "profile_for", "profile_path", "save_profile"]
