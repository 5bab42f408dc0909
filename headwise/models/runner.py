"""ModelRunner: prefill segments and decode steps of a Llama-family model over a CompactCache.

The forward pass is written out (gpt-fast style) over the HF model's own modules, so the
attention can run over ragged per-head rows and record what policies ask for, while
every weight, norm, RoPE and MLP is transformers' own. With the `full` policy the logits
equal transformers' forward within 1e-4 in fp32.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from headwise.attention import (
    BaseQueries,
    MergedShare,
    _base_rows,
    column_sums,
    prefill_attention_scores,
    ragged_prefill_attention,
)
from headwise.attention_paged import DecodeViews, paged_decode, paged_shares
from headwise.attention_varlen import select_decode_attention, select_prefill_attention, use_varlen
from headwise.cache.compact import CompactCache, LayerCache
from headwise.errors import InvalidInput
from headwise.models.loader import check_model_dir, load_model, model_id
from headwise.models.sampling import SamplingParams, TokenPicker
from headwise.policies.base import Capture, CompressContext, LayerState, Policy


@dataclass
class PrefillOutput:
    logits: Tensor  # [V] fp32, last position of the segment
    states: list[LayerState]  # per layer, for the policy
    start: int  # original position of the segment's first token


@dataclass
class SegmentResult:
    logits: Tensor  # [V] logits after the segment
    segment: CompactCache  # this segment's rows only (compressed by the policy)
    cache: CompactCache  # the whole cache: previous rows + segment rows


@dataclass
class DecodeStats:
    recalls: list[tuple[int, MergedShare]] = field(default_factory=list)  # (layer, share)


@dataclass
class _Fused:
    """One layer's fused weights (views of them are the modules' own) and its norms."""

    qkv: Tensor  # [Dq + 2 Dkv, D]
    gate_up: Tensor  # [2 I, D]
    inter: int  # I
    act: Callable[[Tensor], Tensor]
    ln1: torch.nn.Module
    ln2: torch.nn.Module


def _signed_sin(sin: Tensor) -> Tensor:
    """RoPE's sin [1, S, d] -> [S, d] with its first half negated: rotate_half(x) * sin ==
    roll(x, d/2) * this (the same products, bit for bit)."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[0, :, :half], sin[0, :, half:]], -1)


_RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"}  # weight * x / rms(x), eps in variance_epsilon


def _rms(h: Tensor, norm) -> Tensor:
    """transformers' LlamaRMSNorm (same ops, same order), without the module call."""
    x = h if h.dtype == torch.float32 else h.float()
    x = x * x.pow(2).sum(-1, keepdim=True).div_(float(x.shape[-1])).add_(norm.variance_epsilon).rsqrt_()  # mean = sum / D
    return norm.weight * (x if h.dtype == torch.float32 else x.to(h.dtype))


class ModelRunner:
    """Owns one model on one device. Not thread-safe; one runner per worker."""

    def __init__(self, model, tokenizer, device: str | torch.device = "cpu", name: str = "model"):
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        cfg = model.config
        self.config = cfg
        self.name = name
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.max_positions = cfg.max_position_embeddings
        self.vocab_size = cfg.vocab_size
        self.dtype = next(model.parameters()).dtype
        self._inner = model.model
        eos = cfg.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = frozenset(e for e in eos if e is not None)
        self._views: DecodeViews | None = None  # decode views of the last decode_batch's caches
        # the attention strategy: attention_varlen on CUDA with fp16/bf16 weights, else None (this module's paged path)
        varlen = use_varlen(self.device, self.dtype)
        self._decode_attention = select_decode_attention(self.device, self.dtype) if varlen else None  # (views class, decode)
        self._prefill_attention = select_prefill_attention(self.device, self.dtype) if varlen else None
        self._fuse()

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        check_model_dir(path)
        model, tok = load_model(path, device, dtype)
        return cls(model, tok, device, name=model_id(path))

    # ---- validation ---------------------------------------------------------------
    def check_tokens(self, token_ids: Sequence[int], start: int = 0) -> Tensor:
        if len(token_ids) == 0:
            raise InvalidInput("the prompt is empty; give at least one token")
        ids = torch.as_tensor(list(token_ids), dtype=torch.long)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise InvalidInput(f"token id {bad} is out of the vocabulary; allowed range [0, {self.vocab_size - 1}]")
        if start + len(ids) > self.max_positions:
            raise InvalidInput(
                f"prompt of {start + len(ids)} tokens exceeds the model's context of {self.max_positions} tokens"
            )
        return ids.to(self.device)

    # ---- forward pieces -----------------------------------------------------------
    def _fuse(self) -> None:
        """Fused weights per layer: q/k/v in one matrix, gate/up in one (the modules' weights become
        views of them, so nothing is held twice). A decode step is dispatch-bound on a CPU: one
        matmul instead of three (and two) and no per-module Python per call. Layers with
        biases or another MLP shape keep the modules' own forward."""
        self._fused: dict[int, _Fused] = {}
        for layer in self._inner.layers:
            a, m = layer.self_attn, layer.mlp
            projs = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, getattr(m, "gate_proj", None), getattr(m, "up_proj", None),
                     getattr(m, "down_proj", None))
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            if (any(p is None or getattr(p, "bias", None) is not None for p in projs) or hasattr(a, "q_norm")
                    or not hasattr(m, "act_fn") or not all(type(n).__name__ in _RMS_NORMS for n in norms)):
                continue
            with torch.no_grad():
                qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])  # [Dq + 2 Dkv, D]
                gu = torch.cat([m.gate_proj.weight, m.up_proj.weight])  # [2 I, D]
                nq, nk, ni = a.q_proj.weight.shape[0], a.k_proj.weight.shape[0], m.gate_proj.weight.shape[0]
                a.q_proj.weight = torch.nn.Parameter(qkv[:nq], requires_grad=False)
                a.k_proj.weight = torch.nn.Parameter(qkv[nq : nq + nk], requires_grad=False)
                a.v_proj.weight = torch.nn.Parameter(qkv[nq + nk :], requires_grad=False)
                m.gate_proj.weight = torch.nn.Parameter(gu[:ni], requires_grad=False)
                m.up_proj.weight = torch.nn.Parameter(gu[ni:], requires_grad=False)
            self._fused[id(layer)] = _Fused(qkv, gu, ni, m.act_fn, layer.input_layernorm, layer.post_attention_layernorm)

    def _norm_qkv(self, layer, h: Tensor, cos: Tensor, sin: Tensor, signed: Tensor | None = None
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """h [1, S, D] -> the normed input x [1, S, D] and post-RoPE q [Hq, S, d], k, v [Hkv, S, d]."""
        f = self._fused.get(id(layer))
        if f is None:
            x = layer.input_layernorm(h)
            return (x, *self._qkv(layer, x, cos, sin))
        x = _rms(h, f.ln1)
        return (x, *self._fused_qkv(f, x, cos, sin, signed))

    def _fused_qkv(self, f: "_Fused", x: Tensor, cos: Tensor, sin: Tensor, signed: Tensor | None = None
                   ) -> tuple[Tensor, Tensor, Tensor]:
        S, d, Hq, Hkv = x.shape[1], self.head_dim, self.num_heads, self.num_kv_heads
        y = (x[0] @ f.qkv.t()).view(S, Hq + 2 * Hkv, d).transpose(0, 1)  # [Hq + 2 Hkv, S, d]
        qk = y[: Hq + Hkv]
        # RoPE on q and k at once: x*cos + rotate_half(x)*sin, as x*cos + roll(x)*signed (_signed_sin)
        qk = qk * cos[0] + torch.roll(qk, d // 2, -1) * (_signed_sin(sin) if signed is None else signed)
        return qk[:Hq], qk[Hq:], y[Hq + Hkv :]

    def _qkv(self, layer, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """h [1, S, D] (normed) -> post-RoPE q [Hq, S, d], k [Hkv, S, d], v [Hkv, S, d]."""
        f = self._fused.get(id(layer))
        if f is not None:
            return self._fused_qkv(f, h, cos, sin)
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        attn = layer.self_attn
        S = h.shape[1]
        q = attn.q_proj(h).view(1, S, -1, self.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(1, S, -1, self.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(1, S, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q[0], k[0], v[0]

    def _finish_layer(self, layer, h: Tensor, attn_out: Tensor) -> Tensor:
        """Residual, o_proj and MLP. attn_out: [Hq, S, d]."""
        S = attn_out.shape[1]
        f = self._fused.get(id(layer))
        if f is None:
            h = h + layer.self_attn.o_proj(attn_out.transpose(0, 1).reshape(1, S, -1))
            return h + layer.mlp(layer.post_attention_layernorm(h))
        h = h + attn_out.transpose(0, 1).reshape(1, S, -1) @ layer.self_attn.o_proj.weight.t()
        gu = _rms(h, f.ln2)[0] @ f.gate_up.t()  # [S, 2 I]
        a = f.act(gu[:, : f.inter]).mul_(gu[:, f.inter :])
        return h + (a @ layer.mlp.down_proj.weight.t())[None]

    def _logits(self, h_last: Tensor) -> Tensor:
        return self.model.lm_head(self._inner.norm(h_last)).float().reshape(-1)

    Attend = Callable[[int, float, Tensor, Tensor, Tensor, Tensor], Tensor]

    def _embed(self, ids: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """ids, pos [S] -> hidden [1, S, D] and RoPE cos/sin for those positions."""
        h = self._inner.embed_tokens(ids)[None]
        cos, sin = self._inner.rotary_emb(h, pos[None])
        return h, cos, sin

    def _layers(self, h: Tensor, cos: Tensor, sin: Tensor, attend: Attend, finish_last: bool = True) -> Tensor:
        """The one layer loop: norm, QKV + RoPE, `attend(i, scaling, x, q, k, v) -> [Hq, S, d]`, then
        o_proj and MLP. x is the normed input [1, S, D]; q [Hq, S, d], k, v [Hkv, S, d]. Every
        forward (prefill, KVzip's scoring pass, decode) differs only in `attend`."""
        out = h
        for out in self._layer_steps(h, cos, sin, attend, finish_last):  # noqa: B007 - the last one is the output
            pass
        return out

    def _layer_steps(self, h: Tensor, cos: Tensor, sin: Tensor, attend: Attend, finish_last: bool = True) -> Iterator[Tensor]:
        """`_layers` one layer per `next`: yields the hidden states after each layer."""
        n = len(self._inner.layers)
        signed = _signed_sin(sin) if self._fused else None  # once per forward, not per layer
        for i, layer in enumerate(self._inner.layers):
            x, q, k, v = self._norm_qkv(layer, h, cos, sin, signed)
            o = attend(i, layer.self_attn.scaling, x, q, k, v)
            if finish_last or i + 1 < n:
                h = self._finish_layer(layer, h, o)
            yield h

    # ---- prefill ------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, token_ids: Sequence[int], cache: CompactCache | None = None, capture: Capture = Capture()) -> PrefillOutput:
        """Run a segment on top of `cache` (not modified); return last logits and per-layer state."""
        start = cache.seq_len if cache is not None else 0
        ids = self.check_tokens(token_ids, start)
        S = ids.numel()
        pos = torch.arange(start, start + S, device=self.device)
        h, cos, sin = self._embed(ids, pos)
        states: list[LayerState] = []
        shared = BaseQueries.for_cache(cache)  # PoD: base layers' queries for later layers
        W = min(capture.window, S)

        def attend(i: int, scaling: float, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            shared.hold(i, q)
            attention = self._prefill_attention or ragged_prefill_attention
            o = attention(q, cache.layers[i] if cache is not None else None, k, v, scaling, shared)
            shared.release(i)
            states.append(LayerState(
                layer=i, keys=k, values=v, positions=pos, scaling=scaling,
                window_queries=q[:, S - W :].clone() if W else None,
                column_sums=column_sums(q, k, scaling) if capture.column_sums else None,
                hidden=x[0] if capture.hidden else None,
            ))
            return o

        h = self._layers(h, cos, sin, attend)
        if capture.reconstruction:
            scored = self.reconstruction_scores(ids.tolist(), cache, states, start, capture.reconstruction_span,
                                                capture.reconstruction_precision)
            for state, score in zip(states, scored, strict=True):
                state.reconstruction = score
        return PrefillOutput(self._logits(h[:, -1]), states, start)

    RECONSTRUCT_QUESTION = "Repeat the text above exactly."
    RECONSTRUCT_CHUNK = 512
    RECONSTRUCT_WINDOWED_CHUNK = 128  # the windowed pass's chunks (reconstruction.py) [P]

    def _repeat_prefix(self) -> list[int]:
        """Tokens that ask the model to repeat the segment (chat-template aware)."""
        if self.tokenizer is None:
            return []
        from headwise.prompt import build_segments

        return build_segments(self.tokenizer, "", self.RECONSTRUCT_QUESTION).question

    def reconstruction_scores(
        self, token_ids: list[int], cache: CompactCache | None, states: list[LayerState], start: int, span: int = 0,
        precision: str = "fp32",
    ) -> list[Tensor]:
        """KVzip's query-agnostic score: per layer [Hkv, S], the max attention each segment row
        receives while the model re-reads the segment, chunk by chunk, after a repeat request.
        `states` are the segment's prefill states (their keys and values are the cached rows the
        chunks read), `cache` what the segment was prefilled on. `prefill` calls it when the capture
        asks for `reconstruction`; the service calls it later, over a plain prefill's states. `span`
        0 is exact KVzip; N > 0 the windowed pass (headwise/models/reconstruction.py: each chunk
        attends to the sinks and the segment rows within N tokens of its own span). `precision`
        "bf16": the pass's projections and attention products in bfloat16 (reconstruction.py)."""
        steps = self.reconstruction_steps(token_ids, cache, states, start, span, precision)
        while (scores := next(steps)) is None:
            pass
        return scores

    @torch.inference_mode()
    def reconstruction_steps(
        self, token_ids: list[int], cache: CompactCache | None, states: list[LayerState], start: int, span: int = 0,
        precision: str = "fp32",
    ) -> Iterator[list[Tensor] | None]:
        """`reconstruction_scores` one layer of one chunk per `next`: None after each, then the scores.
        A caller that owns the model thread can run other work between steps (the service's deferred
        compression does, so a request arriving meanwhile waits for one layer, not for the pass).

        Every chunk runs on top of the whole (uncompressed) cache and is then thrown away, so
        positions never go past start + S + prefix + chunk. `span` > 0 or `precision` "bf16" (on a
        segment prefilled on no cache; on a cache the pass is this exact one): the pass of
        headwise/models/reconstruction.py (its repeat request run once, then the chunks; span 0
        there: chunks of RECONSTRUCT_CHUNK over the whole segment, KVzip's scores in bfloat16).
        """
        if (span > 0 or precision != "fp32") and (cache is None or cache.seq_len == 0):
            from headwise.models.reconstruction import windowed_steps

            chunk = self.RECONSTRUCT_WINDOWED_CHUNK if span > 0 else self.RECONSTRUCT_CHUNK
            yield from windowed_steps(self, token_ids, states, start, span or len(token_ids), chunk, precision == "bf16")
            return
        S = len(token_ids)
        seg = CompactCache([LayerCache.from_dense(s.keys, s.values, s.positions) for s in states], start + S, start)
        full = cache.extended(seg) if cache is not None else seg
        prefix = self._repeat_prefix()
        room = self.max_positions - (start + S) - len(prefix)
        chunk = min(self.RECONSTRUCT_CHUNK, room)
        if chunk < 16:
            raise InvalidInput(
                f"a segment of {S} tokens at position {start} leaves no room to score it by reconstruction "
                f"(context {self.max_positions}); use at most {self.max_positions - start - len(prefix) - 16} tokens"
            )
        scores = [torch.zeros(self.num_kv_heads, S, dtype=torch.float32, device=self.device) for _ in states]
        for a in range(0, S, chunk):
            ids = torch.tensor(prefix + token_ids[a : a + chunk], dtype=torch.long, device=self.device)
            h, cos, sin = self._embed(ids, torch.arange(start + S, start + S + ids.numel(), device=self.device))
            shared = BaseQueries.for_cache(full)

            def attend(i: int, scaling: float, x: Tensor, q: Tensor, k: Tensor, v: Tensor,
                       shared: BaseQueries = shared) -> Tensor:
                shared.hold(i, q)
                o, sc = prefill_attention_scores(q, full.layers[i], k, v, scaling, S, len(prefix), base=shared)
                shared.release(i)
                torch.maximum(scores[i], sc, out=scores[i])
                return o

            for _ in self._layer_steps(h, cos, sin, attend, finish_last=False):  # the last layer's output is never read
                yield None
        yield scores

    def context(self, policy: Policy | None = None) -> CompressContext:
        """Whole-model facts; carries the head profile (from disk, else computed once) when the policy needs one."""
        profile = None
        if getattr(policy, "needs_profile", False):
            from headwise.profiles import profile_for

            profile = profile_for(self)
        return CompressContext(num_layers=self.num_layers, model_id=self.name, profile=profile)

    def prefill_segment(
        self, token_ids: Sequence[int], cache: CompactCache | None = None, policy: Policy | None = None,
        ctx: CompressContext | None = None,
    ) -> SegmentResult:
        """Prefill a segment, compress it with `policy` (full when None), extend the cache."""
        from headwise.policies.full import FullPolicy

        policy = policy or FullPolicy()
        out = self.prefill(token_ids, cache, policy.capture)
        segment = policy.compress(out.states, out.start, ctx or self.context(policy))
        if cache is not None:
            whole = cache.extended(segment)
        else:  # same tensors, own LayerCache objects: decode appends to `whole`, never to `segment`
            whole = CompactCache([dataclasses.replace(lc) for lc in segment.layers], segment.seq_len, segment.start, dict(segment.meta))
        return SegmentResult(out.logits, segment, whole)

    def prefill_query_aware(self, document_ids: Sequence[int], question_ids: Sequence[int], policy: Policy,
                            ctx: CompressContext | None = None):
        """One-shot query-aware prefill (headwise/models/query_aware.py): the question's queries are
        the policy's window; only the document is compressed. The result must not be stored."""
        from headwise.models.query_aware import prefill_query_aware

        return prefill_query_aware(self, document_ids, question_ids, policy, ctx)

    # ---- decode -------------------------------------------------------------------
    @torch.inference_mode()
    def decode_step(
        self, token: int, cache: CompactCache, recall_threshold: float | None = None, stats: DecodeStats | None = None
    ) -> Tensor:
        """Append one token to every head of every layer and return the next logits [V]."""
        return self.decode_batch([token], [cache], [recall_threshold], [stats])[0]

    @torch.inference_mode()
    def decode_batch(
        self, tokens: Sequence[int], caches: Sequence[CompactCache], recall_thresholds: Sequence[float | None] | None = None,
        stats: Sequence[DecodeStats | None] | None = None,
    ) -> Tensor:
        """One decode step for B independent sequences at once; returns logits [B, V].

        Equal to B `decode_step` calls (each cache grows by its token), but the projections and
        MLPs run once over the B tokens, laid out as one sequence of B rows with their own
        positions: those are row-wise, so rows do not mix. Attention is one call per layer for
        all B sequences and heads, over the `DecodeViews` of the caches (kept across steps while
        the same caches come back). On a CPU the weights are read once per step instead of B times.
        """
        B = len(tokens)
        if B != len(caches) or B == 0:
            raise InvalidInput(f"decode_batch needs one cache per token, got {B} tokens and {len(caches)} caches")
        if len({id(c) for c in caches}) != B:
            raise InvalidInput("decode_batch got the same cache twice; each sequence needs its own")
        thresholds = list(recall_thresholds) if recall_thresholds is not None else [None] * B
        stats = list(stats) if stats is not None else [None] * B
        for c in caches:
            if c.seq_len + 1 > self.max_positions:
                raise InvalidInput(f"sequence of {c.seq_len + 1} tokens exceeds the model's context of {self.max_positions} tokens")
        ids = torch.tensor(list(tokens), dtype=torch.long, device=self.device)
        pos = torch.tensor([c.seq_len for c in caches], dtype=torch.long, device=self.device)
        h, cos, sin = self._embed(ids, pos)  # [1, B, D]: B rows, each its own sequence
        views = self._decode_views(caches)
        decode = (self._decode_attention or (DecodeViews, paged_decode))[1]
        idx = views.step_index()
        H, G, d = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        thr = None
        if any(t is not None for t in thresholds):
            t = torch.tensor([float("inf") if x is None else x for x in thresholds], dtype=self.dtype, device=self.device)
            thr = t.repeat_interleave(H)[:, None]  # [BH, 1]
        held: dict[int, Tensor] = {}  # PoD: base layer -> its queries [BH, G, d] of this step

        def attend(i: int, scaling: float, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            # q [Hq, B, d] -> [B*Hkv, G, d]: sequence-major, then KV head, then the head's group
            qb = q.transpose(0, 1).reshape(B * H, G, d)
            view, n = views.write(i, idx, k.transpose(0, 1).reshape(B * H, d), v.transpose(0, 1).reshape(B * H, d))
            if i in views.last_use:
                held[i] = qb
            o, hits = decode(qb, view, n, scaling, _base_rows(view, held) if view.bases else None, thr)
            for b in [b for b, last in views.last_use.items() if last == i]:
                held.pop(b, None)
            for b, share in paged_shares(hits, H):
                if stats[b] is not None:
                    stats[b].recalls.append((i, share))
            return o.view(B, H * G, d).transpose(0, 1)  # [Hq, B, d]

        h = self._layers(h, cos, sin, attend)
        views.advance(caches, pos)
        for c in caches:
            c.advance(1)
        return self.model.lm_head(self._inner.norm(h[0])).float()  # [B, V]

    def _decode_views(self, caches: Sequence[CompactCache]) -> DecodeViews:
        """The decode views of these caches: kept from the last step when the same caches come
        back (layers replaced by recall rebuilt alone), else built anew with room for the tails."""
        views = self._views
        if views is not None and views.fits(caches):
            views.refresh(caches)
            return views
        self._views = None  # the old views' memory goes before the new ones are built
        cap = max(64, 2 * (max(c.layers[0].tail_len for c in caches) + 1))
        views_cls = (self._decode_attention or (DecodeViews, paged_decode))[0]
        self._views = views_cls(caches, cap, self.num_heads // self.num_kv_heads)
        return self._views

    def generate(
        self, cache: CompactCache, logits: Tensor, params: SamplingParams = SamplingParams(),
        recall_threshold: float | None = None, stats: DecodeStats | None = None,
    ) -> Iterator[int]:
        """Yield tokens: the first from `logits` (the prefill's), then one decode step each.

        The one-sequence reference of decoding (services/decode's batcher steps many sequences
        together and must give the same tokens). Stops at EOS (unless ignore_eos), after
        max_new_tokens, or once the text ends with a stop string (the token that completed it is
        still yielded). `cache` grows in place; the next step runs only when the next token is
        asked for, so a caller may change `cache` (recall) between tokens.
        """
        picker = TokenPicker(params, self.eos_ids, self.tokenizer)
        while True:
            tok = picker.pick(logits)
            yield tok
            if picker.done:
                return
            logits = self.decode_step(tok, cache, recall_threshold, stats)
