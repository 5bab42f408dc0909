"""The kvpress anchor: the same cases as bench.quality through NVIDIA's kvpress presses.

kvpress 0.5.5 needs transformers < 5.3, the engine runs transformers 5.x, so the anchor
lives in its own virtualenv and never enters the runtime dependencies:

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.13.0 "kvpress==0.5.5" "transformers>=4.56,<5.3" rich matplotlib
    .venv-bench/bin/pip install --no-deps -e .
    .venv-bench/bin/python -m bench.kvpress_anchor --json bench/results/kvpress.json

(`make bench-quality` does all of it, then merges the result into bench.quality's table.)
Same token ids as headwise: the context segment and the question segment come from
headwise.prompt.build_segments; the context is prefilled under the press (context-only
compression, as kvpress's pipeline does), every question is asked on that one compressed
cache with explicit positions, and the answer rows are cut off again after each question.
kvpress's head-wise presses (AdaKV, KVzip) mask evicted keys in full-size tensors: the kept
fraction they report saves no bytes.

`--regime query-aware` is kvpress's evaluation with `query_aware: true` (evaluation/evaluate.py:
context + question is the compressed context, the question asked is empty): per question, the
template head + document + question are prefilled under the press, so the question's rows are
compressed too, and the template tail + answer prefix are then asked on the compressed cache, the
first token coming from that pass (KVPressTextGenerationPipeline.generate_answer). Same token ids
as bench.quality's query-aware regime, cut where the question's text ends (query_aware_split).
`realised` is the kept fraction of the compressed input's rows (document + question), masked rows
counted as evicted. `--question exact` is headwise's query-aware protocol on kvpress's presses (the
like-for-like comparison): the whole request (document + question + template tail + answer prefix)
is prefilled under the press, the question's rows are kept exactly (the press's scores there raised
above every document row's: `keep_question`), the press's ratio is set so that `kept` is the fraction
of the document's rows it keeps (`press_ratio`), and the first token comes from the prefill's logits
(the full cache's, as in headwise); `realised` is then the document's kept fraction.
Presses whose whole effect is BasePress's prefill hook share one prefill per
question (shared_prefill: each press's own forward_hook on a cache of its own); the first question
also runs each on its own prefill and checks the caches are identical (`replay_checked`). KVzip and
ObservedAttention (eager) run on prefills of their own; `prefill_s` of a shared press is that one
shared prefill.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rich.console import Console

from bench import write_json
from bench.quality import DEFAULT_KEPT, build_cases, is_correct, print_table, select_cases

DEFAULT_PRESSES = ("streaming_llm", "snapkv", "knorm", "expected_attention", "tova", "observed_attention",
                   "adakv_expected_attention", "kvzip")


def make_press(name: str, ratio: float):
    import kvpress as kp

    return {
        "streaming_llm": lambda: kp.StreamingLLMPress(compression_ratio=ratio),
        "snapkv": lambda: kp.SnapKVPress(compression_ratio=ratio),
        "knorm": lambda: kp.KnormPress(compression_ratio=ratio),
        "expected_attention": lambda: kp.ExpectedAttentionPress(compression_ratio=ratio),
        "tova": lambda: kp.TOVAPress(compression_ratio=ratio),
        "observed_attention": lambda: kp.ObservedAttentionPress(compression_ratio=ratio),
        "adakv_expected_attention": lambda: kp.AdaKVPress(kp.ExpectedAttentionPress(compression_ratio=ratio)),
        "kvzip": lambda: kp.KVzipPress(compression_ratio=ratio),
    }[name]()


def press_ratio(name: str, kept: float, n_doc: int | None = None, n: int | None = None, heads: int = 1) -> float:
    """kvpress's compression_ratio for a press that is to keep the `kept` fraction: of every row
    (n_doc None), or (`--question exact`) of the first n_doc rows of n, the other n - n_doc (the
    question's) being kept besides. A ScorerPress keeps int(n * (1 - ratio)) rows of each head, KVzip
    prunes int(heads * n * ratio) rows over the model's `heads` (layer, KV head) pairs: the half row
    makes both the nearest whole count."""
    if n_doc is None:
        return round(1 - kept, 6)
    if name == "kvzip":
        return ((1 - kept) * n_doc * heads + 0.5) / (heads * n)
    return 1 - (kept * n_doc + (n - n_doc) + 0.5) / n


def keep_question(press, n_doc: int):
    """The press with every row from n_doc on (the question's) kept: its scores there raised to +inf
    before its own top-k (ScorerPress.score; AdaKV's inner scorer). KVzip is kvzip_shared's
    `n_doc`. Returns the press."""
    inner = getattr(press, "press", press)  # AdaKVPress wraps a ScorerPress
    if not hasattr(inner, "score") or type(inner).__name__ == "KVzipPress":
        raise ValueError(f"{type(press).__name__}: the question's rows cannot be kept exactly (no ScorerPress.score)")
    score = inner.score

    def forced(module, hidden_states, keys, values, attentions, kwargs):
        s = score(module, hidden_states, keys, values, attentions, kwargs).clone()
        s[..., n_doc:] = torch.inf
        return s

    inner.score = forced
    return press


def cache_kwarg(module, cache) -> dict:
    """The cache argument under the name this transformers takes: `cache` (5.24 on; its old name
    `past_key_values` is deprecated, to be removed in 5.40), or `past_key_values` (the older
    transformers kvpress needs, in .venv-bench)."""
    import inspect

    return {"cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values": cache}


@torch.inference_mode()
def ask(model, tokenizer, cache, q_ids: list[int], context_length: int, max_new_tokens: int = 10) -> str:
    """Greedy answer on top of the compressed cache; stops like headwise (EOS, '.' or newline)."""
    lengths = [cache.get_seq_length(i) for i in range(len(cache))]
    ids = torch.tensor([q_ids])
    pos = torch.arange(context_length, context_length + len(q_ids))[None]
    out = model(input_ids=ids, position_ids=pos, logits_to_keep=1, **cache_kwarg(model, cache))
    text = greedy(model, tokenizer, cache, int(out.logits[0, -1].argmax()), context_length + len(q_ids), max_new_tokens)
    for i, n in enumerate(lengths):  # drop the question and answer rows: the next question starts clean
        cache.layers[i].keys = cache.layers[i].keys[:, :, :n]
        cache.layers[i].values = cache.layers[i].values[:, :, :n]
    return text


def greedy(model, tokenizer, cache, first: int, next_pos: int, max_new_tokens: int = 10) -> str:
    """Greedy decoding from the first token on; stops like headwise (EOS, '.' or newline)."""
    toks = [first]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for i in range(max_new_tokens - 1):
        text = tokenizer.decode(toks, skip_special_tokens=True)
        if toks[-1] in eos or "." in text or "\n" in text:
            break
        out = model(input_ids=torch.tensor([[toks[-1]]]), position_ids=torch.tensor([[next_pos + i]]), **cache_kwarg(model, cache))
        toks.append(int(out.logits[0, -1].argmax()))
    return tokenizer.decode(toks, skip_special_tokens=True).strip()


def query_aware_split(tokenizer, context: str, question: str, answer_prefix: str) -> tuple[list[int], list[int]]:
    """The tokens of one query-aware request cut as kvpress's evaluation cuts them (`query_aware:
    true`: context + question is the compressed context, the chat template's tail and the answer
    prefix are the question asked on the compressed cache). Same token ids as headwise:
    compressed + tail == build_segments(...).context + .question; the cut is where the question's
    text ends, at a token boundary (falls back to the longest common prefix if the tokenizer merges
    across it)."""
    from headwise.prompt import CONTEXT_MARK, QUESTION_MARK, _cut, _ids, build_segments

    s = build_segments(tokenizer, context, question, answer_prefix)
    msgs = [{"role": "user", "content": f"{CONTEXT_MARK}\n\n{QUESTION_MARK}"}]
    _, between, _ = _cut(tokenizer, msgs, CONTEXT_MARK, QUESTION_MARK)
    head = _ids(tokenizer, between + question)
    n = 0
    while n < min(len(head), len(s.question)) and head[n] == s.question[n]:
        n += 1
    return s.context + s.question[:n], s.question[n:]


def _cache_key(kwargs: dict) -> str:
    return "cache" if "cache" in kwargs else "past_key_values"


def _replayable(press) -> bool:
    """A press whose whole effect is BasePress's prefill hook (compress() on the layer's hidden
    states, keys and values, after attention): it can be replayed on a copy of one shared prefill
    (ObservedAttention's on the eager model's, whose attention matrix it reads). KVzip (its own
    reconstruction passes after the prefill) is kvzip_shared's."""
    import kvpress as kp

    cls = type(press)
    return cls.__call__ is kp.BasePress.__call__ and cls.forward_hook is kp.BasePress.forward_hook


@torch.inference_mode()
def kvzip_shared(model, ids: list[int], ratios: dict, full_key=None, n_doc: int | None = None,
                 first: list | None = None) -> dict:
    """KVzipPress run once (prefill, then its reconstruction passes) for every compression ratio in
    `ratios` (key -> ratio): its scores do not depend on the ratio, so its own compress_post is run
    per ratio on a copy of them. Returns key -> (cache, masks); the caches share the rows (KVzip
    masks, it evicts nothing), which decoding never writes in place (each step concatenates). With
    `full_key`, those rows unmasked (the uncompressed prefill's) are in the result under that key.
    With `n_doc`, every row from n_doc on (the question's) scores above all others (kept exactly).
    With `first` (a list), the prefill's greedy next token is appended to it."""
    import kvpress as kp
    from transformers import DynamicCache

    got: dict = {}

    class Multi(kp.KVzipPress):
        def compress_post(self, model):
            scores = self.score_val.clone()
            if n_doc is not None:
                scores[..., n_doc:] = scores.amax() + 2.0  # above the sinks (amax + 1) too
            for k, r in ratios.items():
                self.score_val, self.compression_ratio = scores.clone(), r
                super().compress_post(model)
                got[k] = {layer.self_attn.layer_idx: layer.self_attn.masked_key_indices for layer in model.model.layers}
                for layer in model.model.layers:
                    layer.self_attn.masked_key_indices = None

    if first is None:
        cache, _ = direct_prefill(model, ids, Multi(compression_ratio=max(ratios.values())))
    else:
        cache, _, tok = direct_prefill(model, ids, Multi(compression_ratio=max(ratios.values())), logits=True)
        first.append(tok)
    out = {}
    for k, m in [*got.items(), *([(full_key, {})] if full_key is not None else [])]:
        c = DynamicCache()
        for i, layer in enumerate(cache.layers):
            c.update(layer.keys[..., :0, :], layer.values[..., :0, :], i)
            c.layers[i].keys, c.layers[i].values = layer.keys, layer.values
        out[k] = (c, m)
    return out


@torch.inference_mode()
def shared_prefill(model, ids: list[int], presses: dict, errors: dict | None = None, full_key=None,
                   first: list | None = None) -> tuple[dict, dict]:
    """One prefill of `ids` (no lm head, as kvpress's pipeline) whose attention layers hand each of
    `presses` (key -> press) a cache of its own holding that layer's full keys and values, and call
    the press's own forward_hook on it with the layer's real kwargs and output: exactly what the
    press does inside its context manager (the compression runs after the layer's attention, so the
    hidden states every later layer sees are those of the uncompressed prefill, whatever the press).
    Returns key -> compressed DynamicCache and key -> {layer: masked_key_indices} (AdaKV's head-wise
    masks live on the attention module; they are saved per press and restored for its decode). A
    press that raises is left out of the result, its error in `errors` (key -> message). With
    `full_key`, the prefill's own uncompressed cache is in the result under that key. With `first` (a
    list), the prefill's greedy next token (the lm head on the last position) is appended to it."""
    from transformers import DynamicCache

    caches = {k: DynamicCache() for k in presses}
    masks: dict = {k: {} for k in presses}
    lm = model.model
    for press in presses.values():
        press.post_init_from_model(model)
    for layer in lm.layers:
        layer.self_attn.rotary_emb = lm.rotary_emb

    def hook(module, args, kwargs, output):
        idx, key = module.layer_idx, _cache_key(kwargs)
        full = kwargs[key].layers[idx]
        for k, press in presses.items():
            if k not in caches:
                continue
            c = caches[k]
            c.update(full.keys[..., :0, :], full.values[..., :0, :], idx)  # creates the layer
            c.layers[idx].keys, c.layers[idx].values = full.keys, full.values
            module.masked_key_indices = None
            try:
                press.forward_hook(module, args, {**kwargs, key: c}, output)
            except Exception as e:  # noqa: BLE001 - one press's failure is reported, the others go on
                if errors is None:
                    raise
                errors[k] = f"{type(e).__name__}: {e}"[:300]
                del caches[k], masks[k]
                continue
            masks[k][idx] = getattr(module, "masked_key_indices", None)
        module.masked_key_indices = None
        return output

    hooks = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in lm.layers]
    base = DynamicCache()
    try:
        hidden = lm(input_ids=torch.tensor([ids]), **cache_kwarg(lm, base)).last_hidden_state
        if first is not None:
            first.append(int(model.lm_head(hidden[:, -1:])[0, -1].argmax()))
    finally:
        for h in hooks:
            h.remove()
    if full_key is not None:
        caches[full_key], masks[full_key] = base, {}
    return caches, masks


@torch.inference_mode()
def direct_prefill(model, ids: list[int], press, logits: bool = False):
    """kvpress's own path (KVPressTextGenerationPipeline._forward): the prefill under the press's
    context manager, no lm head. Returns the cache and the head-wise masks the press left (and, with
    `logits`, the prefill's greedy next token, through the lm head)."""
    import contextlib

    from transformers import DynamicCache

    cache = DynamicCache()
    with press(model) if press is not None else contextlib.nullcontext():
        if logits:
            out = model(input_ids=torch.tensor([ids]), logits_to_keep=1, **cache_kwarg(model, cache))
        else:
            model.model(input_ids=torch.tensor([ids]), **cache_kwarg(model.model, cache))
    masks = {layer.self_attn.layer_idx: getattr(layer.self_attn, "masked_key_indices", None) for layer in model.model.layers}
    if logits:
        return cache, masks, int(out.logits[0, -1].argmax())
    return cache, masks


def realised_fraction(cache, masks: dict, n: int, n_doc: int | None = None) -> float:
    """Rows kept / rows of the compressed input, over every layer and KV head: evicted rows are gone
    (truncating presses) or masked in full-size tensors (AdaKV, KVzip: masked_key_indices). With
    `n_doc` (the question's n - n_doc rows kept exactly), of the document's first n_doc rows only."""
    kept = total = 0
    for i, layer in enumerate(cache.layers):
        _, h, rows, _ = layer.keys.shape
        m = masks.get(i)
        if n_doc is None:
            kept += h * rows - (len(m[0]) if m is not None else 0)
            total += h * n
        else:
            kept += h * (rows - (n - n_doc)) - (int((m[2] < n_doc).sum()) if m is not None else 0)
            total += h * n_doc
    return kept / total


@torch.inference_mode()
def answer_on(model, tokenizer, cache, masks: dict, tail: list[int], context_length: int, first: int | None = None) -> str:
    """kvpress's generate_answer on a compressed cache: the tail (template end + answer prefix) at
    positions after the whole compressed input, the first token from that pass, then greedy. With
    an empty tail, greedy from `first` (the prefill's own next token)."""
    for layer in model.model.layers:
        layer.self_attn.masked_key_indices = masks.get(layer.self_attn.layer_idx)
    try:
        if not tail:
            return greedy(model, tokenizer, cache, first, context_length)
        pos = torch.arange(context_length, context_length + len(tail))[None]
        out = model(input_ids=torch.tensor([tail]), position_ids=pos, logits_to_keep=1, **cache_kwarg(model, cache))
        return greedy(model, tokenizer, cache, int(out.logits[0, -1].argmax()), context_length + len(tail))
    finally:
        for layer in model.model.layers:
            layer.self_attn.masked_key_indices = None


def same_cache(a, ma: dict, b, mb: dict) -> bool:
    """Two compressed caches hold the same rows and the same head-wise masks."""
    if len(a.layers) != len(b.layers):
        return False
    for i, (x, y) in enumerate(zip(a.layers, b.layers, strict=True)):
        if not (torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)):
            return False
        m, n = ma.get(i), mb.get(i)
        if (m is None) != (n is None) or (m is not None and not all(torch.equal(p, q) for p, q in zip(m, n, strict=True))):
            return False
    return True


@torch.inference_mode()
def run_query_aware(models: dict, tokenizer, cases, presses: list[str], kept: list[float], console, check=None,
                    save=None, first_token: str = "tail", question: str = "compressed") -> dict:
    """Query-aware regime, as kvpress's evaluation with `query_aware: true`: per question, document
    + question is the compressed context (the question's rows are compressed too), the template tail
    and answer prefix are asked on the compressed cache (the first token comes from that pass).
    Replayable presses share one prefill per question (shared_prefill, kvzip_shared); on the first
    question each press in `check` (True: all) is also run on its own prefill (direct_prefill) and
    the two caches must be identical (`replay_checked`).
    `first_token` "prefill" is a variant (not kvpress's evaluation): the tail is compressed with the
    rest and the first token comes from the prefill's logits, which no press changes (every press
    compresses a layer's cache after its attention ran), so it is the full cache's first token.
    `question` "exact" (with "prefill") is headwise's protocol: the question's rows (headwise's
    question segment: question, template tail, answer prefix) are kept exactly and `kept` is the
    fraction of the document's rows (press_ratio, keep_question)."""
    if question == "exact" and first_token != "prefill":
        raise ValueError("question='exact' is headwise's protocol: the first token from the prefill (first_token='prefill')")
    configs = [(None, 1.0)] + [(p, k) for p in presses for k in kept]
    rows = {c: {"correct": 0, "total": 0, "realised": [], "prefill_s": []} for c in configs}
    details, errors, checked = [], {}, {}
    heads = None  # (layer, KV head) pairs of the model: KVzip's ratio over the whole model
    for case in cases:
        for q in case.questions:
            ids, tail = query_aware_split(tokenizer, case.context, q.text, " " + q.prefix)
            n_doc = None
            if first_token == "prefill":
                ids, tail = ids + tail, []
            if question == "exact":
                from headwise.prompt import build_segments

                n_doc = len(build_segments(tokenizer, case.context, q.text, " " + q.prefix).context)
                cfg = models["sdpa"].config
                heads = cfg.num_hidden_layers * cfg.num_key_value_heads

            def build(c, n_doc=n_doc, n=len(ids), heads=heads or 1):
                press = make_press(c[0], press_ratio(c[0], c[1], n_doc, n, heads))
                return keep_question(press, n_doc) if n_doc is not None and c[0] != "kvzip" else press

            built = {}
            for c in configs:
                if c[0] is None or c in errors:
                    continue
                try:
                    built[c] = build(c)
                except Exception as e:  # noqa: BLE001 - a press that cannot be built is reported
                    errors[c] = f"{type(e).__name__}: {e}"[:300]
            impl = {c: "eager" if c[0] == "observed_attention" else "sdpa" for c in configs}
            out, own = {}, {}  # key -> (cache, masks, seconds); the shared caches' press names -> a key
            first: list = []  # the prefill's own next token ("prefill" variant only)
            want_first = first if first_token == "prefill" else None
            for group in ("sdpa", "eager"):
                shared = {c: p for c, p in built.items() if impl[c] == group and _replayable(p)}
                if shared:
                    t = time.perf_counter()
                    fk = (None, 1.0) if group == "sdpa" else None  # the full cache: this prefill's
                    caches, masks = shared_prefill(models[group], ids, shared, errors, fk, want_first if fk else None)
                    secs = time.perf_counter() - t
                    out.update({c: (caches[c], masks[c], secs) for c in caches})
                    own.update({c[0]: c for c in reversed(list(caches)) if c[0] is not None})
            zips = {c: press_ratio("kvzip", c[1], n_doc, len(ids), heads or 1) for c in built if c[0] == "kvzip"}
            if zips:
                t = time.perf_counter()
                try:
                    fk = (None, 1.0) if (None, 1.0) not in out else None
                    got = kvzip_shared(models["sdpa"], ids, zips, fk, n_doc, want_first if fk else None)
                    secs = time.perf_counter() - t
                    out.update({c: (*v, secs) for c, v in got.items()})
                    own["kvzip"] = next(iter(zips))
                except Exception as e:  # noqa: BLE001 - reported per press, not fatal
                    errors.update({c: f"{type(e).__name__}: {e}"[:300] for c in zips})
            for c in [c for c in [(None, 1.0), *built] if c not in out and c not in errors]:
                t = time.perf_counter()
                try:
                    if c[0] is None and first_token == "prefill":
                        cache, m, tok = direct_prefill(models["sdpa"], ids, None, logits=True)
                        first.append(tok)
                    else:
                        cache, m = direct_prefill(models[impl[c]], ids, built.get(c))
                except Exception as e:  # noqa: BLE001 - reported per press, not fatal
                    errors[c] = f"{type(e).__name__}: {e}"[:300]
                    console.print(f"[red]{c[0]} at kept {c[1]} failed: {errors[c]}[/red]")
                    continue
                out[c] = (cache, m, time.perf_counter() - t)
            if check:  # each shared press once, against its own prefill under its own context manager
                for name, c in own.items():
                    if name in checked or (check is not True and name not in check):
                        continue
                    if name == "kvzip" and n_doc is not None:
                        continue  # the forced question rows live in kvzip_shared's compress_post only
                    cache, m = direct_prefill(models[impl[c]], ids, build(c))
                    checked[name] = same_cache(out[c][0], out[c][1], cache, m)
                    if not checked[name]:
                        console.print(f"[red]{name}: the shared prefill's cache differs from the press's own[/red]")
            for c, (cache, m, secs) in sorted(out.items(), key=lambda x: x[0][0] is not None):
                model = models[impl[c]]
                realised = realised_fraction(cache, m, len(ids), n_doc)  # before the tail and answer rows are appended
                try:
                    text = answer_on(model, tokenizer, cache, m, tail, len(ids), first[0] if first else None)
                except Exception as e:  # noqa: BLE001
                    errors[c] = f"{type(e).__name__}: {e}"[:300]
                    continue
                ok = is_correct(text, q.answer)
                r = rows[c]
                r["correct"] += ok; r["total"] += 1
                r["realised"].append(realised); r["prefill_s"].append(secs)
                details.append({"case": case.name, "tokens": len(ids), "policy": c[0] or "full", "kept": c[1],
                                "question": q.text, "answer": q.answer, "output": text, "correct": ok})
            del out
        done = ", ".join(f"{p or 'full'}@{k}:{r['correct']}/{r['total']}" for (p, k), r in rows.items() if r["total"])
        console.print(f"[dim]{case.name} done: {done}[/dim]")
        if save is not None:  # partial results survive an interrupted run
            save(summarise(rows, errors, details, checked))
    return summarise(rows, errors, details, checked)


def summarise(rows: dict, errors: dict, details: list, checked: dict) -> dict:
    """bench.quality's layout: full, full_detail, policies[press][kept] = {accuracy, realised,
    prefill_s, correct, total}, details (case, tokens, policy, kept, question, answer, output,
    correct); plus the presses' errors (press@kept -> message) and the replay check."""
    res = {"full": None, "policies": {}, "details": details, "regime": "query-aware", "replay_checked": checked,
           "errors": {f"{p}@{k}": e for (p, k), e in errors.items()}}
    for (p, k), r in rows.items():
        if (p, k) in errors or not r["total"]:
            continue
        entry = {"accuracy": r["correct"] / r["total"], "realised": sum(r["realised"]) / len(r["realised"]),
                 "prefill_s": sum(r["prefill_s"]) / len(r["prefill_s"]), "correct": r["correct"], "total": r["total"],
                 "bytes_saved": p not in ("adakv_expected_attention", "kvzip")}
        if p is None:
            res["full"], res["full_detail"] = entry["accuracy"], entry
        else:
            res["policies"].setdefault(p, {})[str(k)] = entry
    return res


@torch.inference_mode()
def run_case(models: dict, tokenizer, case, press_name: str | None, ratio: float) -> tuple[list[bool], float, list[dict]]:
    import contextlib

    from transformers import DynamicCache

    from headwise.prompt import build_segments

    segs = [build_segments(tokenizer, case.context, q.text, " " + q.prefix) for q in case.questions]
    ctx_ids = torch.tensor([segs[0].context])
    model = models["eager" if press_name == "observed_attention" else "sdpa"]
    press = make_press(press_name, ratio) if press_name else None
    cache = DynamicCache()
    t = time.perf_counter()
    with press(model) if press is not None else contextlib.nullcontext():
        model.model(input_ids=ctx_ids, **cache_kwarg(model.model, cache))
    dt = time.perf_counter() - t
    oks, det = [], []
    for q, s in zip(case.questions, segs, strict=True):
        text = ask(model, tokenizer, cache, s.question, ctx_ids.shape[1])
        oks.append(is_correct(text, q.answer))
        det.append({"case": case.name, "tokens": ctx_ids.shape[1], "policy": press_name or "full", "kept": round(1 - ratio, 6),
                    "question": q.text, "answer": q.answer, "output": text, "correct": oks[-1]})
    return oks, dt, det


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path("bench/results/kvpress.json"))
    ap.add_argument("--presses", default=",".join(DEFAULT_PRESSES))
    ap.add_argument("--kept", default=",".join(map(str, DEFAULT_KEPT)))
    ap.add_argument("--suite", choices=("default", "full"), default="default")
    ap.add_argument("--regime", choices=("reuse", "query-aware"), default="reuse",
                    help="query-aware: each question prefilled with its document under the press (one-shot)")
    ap.add_argument("--length", type=int, default=1500)
    ap.add_argument("--keyed-length", type=int, default=900)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (1 is much faster on a shared, busy CPU)")
    ap.add_argument("--check", default=None,
                    help="query-aware: the shared presses checked against their own prefill on the first question "
                         "(comma-separated; default all)")
    ap.add_argument("--first-token", choices=("tail", "prefill"), default=None,
                    help="query-aware: tail (default) = kvpress's evaluation (template tail + answer prefix asked on the "
                         "compressed cache); prefill = a variant: everything compressed, first token from the prefill's logits")
    ap.add_argument("--question", choices=("compressed", "exact"), default="compressed",
                    help="query-aware: exact = headwise's protocol (the question's rows kept exactly, kept = the "
                         "document's fraction, first token from the prefill: implies --first-token prefill)")
    ap.add_argument("--cases", default=None, help="only these case names (comma-separated, e.g. single@0.1,keyed#0): "
                    "one suite split over several runs")
    args = ap.parse_args(argv)
    if args.question == "exact" and args.first_token == "tail":
        ap.error("--question exact takes the first token from the prefill (--first-token prefill)")
    args.first_token = args.first_token or ("prefill" if args.question == "exact" else "tail")
    if args.threads:
        torch.set_num_threads(args.threads)
    import kvpress
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from headwise.models.loader import resolve_model_path

    console = Console()
    path = str(resolve_model_path(args.model))
    tokenizer = AutoTokenizer.from_pretrained(path)
    presses = [p for p in args.presses.split(",") if p]
    impls = ("sdpa", "eager") if "observed_attention" in presses else ("sdpa",)  # eager only where needed (memory)
    models = {impl: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=impl).eval()
              for impl in impls}
    torch.manual_seed(0)
    kept = [float(x) for x in args.kept.split(",")]
    cases = build_cases(tokenizer, args.suite, args.length, args.keyed_length)
    cases = select_cases(cases, args.cases)
    version = getattr(kvpress, "__version__", "0.5.5")
    t0 = time.perf_counter()
    if args.regime == "query-aware":
        def save(r):
            write_json(args.json, {"kvpress_version": version, "suite": args.suite, "first_token": args.first_token,
                                   "question": args.question, "cases": [c.name for c in cases], **r,
                                   "seconds": time.perf_counter() - t0}, indent=1)

        res = {"kvpress_version": version, "suite": args.suite,
               **run_query_aware(models, tokenizer, cases, presses, kept, console, save=save, first_token=args.first_token,
                                   check=True if args.check is None else [x for x in args.check.split(",") if x],
                                   question=args.question),
               "first_token": args.first_token, "question": args.question, "cases": [c.name for c in cases]}
        res["seconds"] = time.perf_counter() - t0
        for key, err in res["errors"].items():
            console.print(f"[red]{key} failed: {err}[/red]")
        print_table(console, res, f"kvpress anchor, query-aware regime (full cache accuracy {res['full']:.2f})", kept)
        write_json(args.json, res, indent=1)
        console.print(f"wrote {args.json} in {res['seconds']:.0f} s")
        return res
    res = {"kvpress_version": version, "suite": args.suite,
           "cases": [c.name for c in cases], "full": None, "policies": {}, "details": [], "errors": {}, "regime": args.regime}
    for name in presses + [None]:  # the full cache last: every press's figure is written as soon as it exists
        for k in ([1.0] if name is None else kept):
            oks, secs = [], []
            try:
                for case in cases:
                    o, dt, det = run_case(models, tokenizer, case, name, round(1 - k, 6))
                    oks += o; secs.append(dt); res["details"] += det
            except Exception as e:  # a press that cannot run here is reported, not fatal
                res["errors"][f"{name}@{k}"] = f"{type(e).__name__}: {e}"[:300]
                console.print(f"[red]{name} at kept {k} failed: {e}[/red]")
                continue
            entry = {"accuracy": sum(oks) / len(oks), "realised": k, "prefill_s": sum(secs) / len(secs),
                     "correct": sum(oks), "total": len(oks), "bytes_saved": name not in ("adakv_expected_attention", "kvzip")}
            if name is None:
                res["full"], res["full_detail"] = entry["accuracy"], entry
            else:
                res["policies"].setdefault(name, {})[str(k)] = entry
            console.print(f"[dim]{name or 'full'} kept {k}: {sum(oks)}/{len(oks)}[/dim]")
            write_json(args.json, res, indent=1)  # partial results survive an interrupted run
    res["seconds"] = time.perf_counter() - t0
    print_table(console, res, f"kvpress anchor, {args.regime} regime (full cache accuracy {res['full']:.2f})", kept)
    write_json(args.json, res, indent=1)
    console.print(f"wrote {args.json} in {res['seconds']:.0f} s")
    return res


if __name__ == "__main__":
    main()
