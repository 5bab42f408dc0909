"""The kvpress anchor's query-aware machinery, without kvpress (CI does not install it): the
token cut of kvpress's `query_aware` evaluation, the shared prefill replaying a press's prefill
hook (against the press's own context manager, with stand-in presses of kvpress's interface),
the realised fraction, and the JSON layout of bench.quality."""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from bench import kvpress_anchor as ka
from headwise.prompt import build_segments
from tests.fixtures.models import random_ids, tiny_llama


class CharTokenizer:
    """One token per character, no chat template (headwise.prompt's plain rendering); `merge`
    makes "?\\n" one token, so the question's text and the template tail share a token."""

    chat_template = None

    def __init__(self, merge: bool = False):
        self.merge = merge

    def __call__(self, text: str, add_special_tokens: bool = False):
        ids, i = [], 0
        while i < len(text):
            if self.merge and text.startswith("?\n", i):
                ids.append(1000); i += 2
                continue
            ids.append(ord(text[i])); i += 1
        return SimpleNamespace(input_ids=ids)


@pytest.mark.parametrize("merge", [False, True])
def test_query_aware_split_is_headwise_tokens_cut_after_the_question(merge):
    tok = CharTokenizer(merge)
    doc, question, prefix = "The code of Oslo is 4417. Other text.", "What is the code of Oslo?", " The code is"
    ids, tail = ka.query_aware_split(tok, doc, question, prefix)
    s = build_segments(tok, doc, question, prefix)
    assert ids + tail == s.context + s.question  # the same token ids as headwise
    assert tail and tail[-len(prefix):] == [ord(c) for c in prefix]  # the answer prefix is asked, not compressed
    text = "".join(chr(i) if i < 1000 else "?\n" for i in ids)
    if merge:  # the merged token cannot be split: the question's last character goes to the tail
        assert text.endswith(question[:-1]) and tail[0] == 1000
    else:
        assert text.endswith(question) and text.startswith(doc)


def _cache_of(kwargs):
    return kwargs["cache" if "cache" in kwargs else "past_key_values"]


class StandInPress:
    """kvpress's press interface (post_init_from_model, forward_hook, a context manager hooking every
    attention layer): keeps the `kept` fraction of rows with the largest hidden-state norm (truncating),
    or masks the others per head in full-size tensors (`mask`, as AdaKV)."""

    def __init__(self, kept: float, mask: bool = False):
        self.kept, self.mask, self.inited = kept, mask, 0

    def post_init_from_model(self, model):
        self.inited += 1

    def forward_hook(self, module, args, kwargs, output):
        h = kwargs["hidden_states"]
        layer = _cache_of(kwargs).layers[module.layer_idx]
        n = layer.keys.shape[2]
        assert h.shape[1] == n  # prefill: this layer's hidden states, one per row
        score = h[0].norm(dim=-1) + layer.values[0].norm(dim=-1)  # [Hkv, n]: differs per head
        k = max(1, int(n * self.kept))
        keep = score.topk(k, dim=-1).indices.sort(dim=-1).values
        if self.mask:
            drop = torch.ones_like(score, dtype=torch.bool).scatter_(-1, keep, False)
            heads, seqs = drop.nonzero(as_tuple=True)
            module.masked_key_indices = (torch.zeros_like(heads), heads, seqs)
            return output
        idx = keep[None, :, :, None].expand(1, -1, -1, layer.keys.shape[-1])
        layer.keys, layer.values = layer.keys.gather(2, idx), layer.values.gather(2, idx)
        return output

    @contextmanager
    def __call__(self, model):
        self.post_init_from_model(model)
        hooks = [layer.self_attn.register_forward_hook(self.forward_hook, with_kwargs=True) for layer in model.model.layers]
        try:
            yield
        finally:
            for hk in hooks:
                hk.remove()


def _clear_masks(model):
    for layer in model.model.layers:
        layer.self_attn.masked_key_indices = None


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=3, heads=4, kv_heads=2)


def test_shared_prefill_replays_each_press_as_its_own_prefill(model):
    ids = random_ids(96, seed=3)
    presses = {"trunc@0.25": StandInPress(0.25), "trunc@0.5": StandInPress(0.5), "mask@0.25": StandInPress(0.25, mask=True)}
    caches, masks = ka.shared_prefill(model, ids, presses, full_key="full")
    assert set(caches) == set(masks) == {*presses, "full"}
    assert all(p.inited == 1 for p in presses.values())
    assert all(getattr(layer.self_attn, "masked_key_indices", None) is None for layer in model.model.layers)
    for key, press in presses.items():
        _clear_masks(model)
        cache, m = ka.direct_prefill(model, ids, StandInPress(press.kept, press.mask))
        assert ka.same_cache(caches[key], masks[key], cache, m), key
    _clear_masks(model)
    full, fm = ka.direct_prefill(model, ids, None)
    assert not ka.same_cache(caches["trunc@0.25"], masks["trunc@0.25"], full, fm)
    assert not ka.same_cache(caches["mask@0.25"], masks["mask@0.25"], full, fm)  # same rows, masks differ
    assert ka.same_cache(caches["mask@0.25"], {}, full, fm)
    assert ka.same_cache(caches["full"], masks["full"], full, fm)  # the shared prefill's own cache is the full one
    assert ka.realised_fraction(full, fm, len(ids)) == 1.0
    assert ka.realised_fraction(caches["trunc@0.25"], masks["trunc@0.25"], len(ids)) == pytest.approx(24 / 96)
    assert ka.realised_fraction(caches["trunc@0.5"], masks["trunc@0.5"], len(ids)) == pytest.approx(0.5)
    assert ka.realised_fraction(caches["mask@0.25"], masks["mask@0.25"], len(ids)) == pytest.approx(24 / 96)


def test_a_failing_press_is_reported_and_the_others_go_on(model):
    class Broken(StandInPress):
        def forward_hook(self, module, args, kwargs, output):
            raise RuntimeError("eager mode not supported")

    errors = {}
    caches, masks = ka.shared_prefill(model, random_ids(40, seed=4), {"ok": StandInPress(0.5), "broken": Broken(0.5)}, errors)
    assert set(caches) == set(masks) == {"ok"}
    assert errors == {"broken": "RuntimeError: eager mode not supported"}
    with pytest.raises(RuntimeError):
        ka.shared_prefill(model, random_ids(40, seed=4), {"broken": Broken(0.5)})


def test_summary_has_bench_quality_layout():
    rows = {(None, 1.0): {"correct": 2, "total": 2, "realised": [1.0, 1.0], "prefill_s": [1.0, 3.0]},
            ("snapkv", 0.25): {"correct": 1, "total": 2, "realised": [0.25, 0.2502], "prefill_s": [2.0, 2.0]},
            ("kvzip", 0.25): {"correct": 0, "total": 0, "realised": [], "prefill_s": []}}
    details = [{"case": "single@0.5", "tokens": 10, "policy": "snapkv", "kept": 0.25, "question": "q", "answer": "a",
                "output": "a", "correct": True}]
    res = ka.summarise(rows, {("kvzip", 0.25): "ValueError: x"}, details, {"snapkv": True})
    assert res["full"] == 1.0 and res["full_detail"]["prefill_s"] == 2.0
    e = res["policies"]["snapkv"]["0.25"]
    assert e["accuracy"] == 0.5 and e["realised"] == pytest.approx(0.2501) and (e["correct"], e["total"]) == (1, 2)
    assert "kvzip" not in res["policies"] and res["errors"] == {"kvzip@0.25": "ValueError: x"}
    assert res["regime"] == "query-aware" and res["replay_checked"] == {"snapkv": True}
    assert set(res["details"][0]) == {"case", "tokens", "policy", "kept", "question", "answer", "output", "correct"}


class StandInScorer(StandInPress):
    """kvpress's ScorerPress interface: `score` per (KV head, row), then the top int(n * (1 -
    compression_ratio)) rows of each head kept (truncating), as ScorerPress.compress."""

    def __init__(self, compression_ratio: float):
        super().__init__(1 - compression_ratio)
        self.compression_ratio = compression_ratio

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        return hidden_states.norm(dim=-1)[:, None, :] + values.norm(dim=-1)  # [1, Hkv, n]

    def forward_hook(self, module, args, kwargs, output):
        layer = _cache_of(kwargs).layers[module.layer_idx]
        s = self.score(module, kwargs["hidden_states"], layer.keys, layer.values, None, kwargs)
        keep = s.topk(max(1, int(layer.keys.shape[2] * (1 - self.compression_ratio))), dim=-1).indices
        idx = keep[..., None].expand(-1, -1, -1, layer.keys.shape[-1])
        layer.keys, layer.values = layer.keys.gather(2, idx), layer.values.gather(2, idx)
        return output


@pytest.mark.parametrize("kept", [0.5, 0.25, 0.1])
def test_exact_question_keeps_every_question_row_and_the_kept_fraction_of_the_document(model, kept):
    ids, n_doc = random_ids(150, seed=5), 131  # 131 document rows, 19 question rows
    press = ka.keep_question(StandInScorer(ka.press_ratio("snapkv", kept, n_doc, len(ids))), n_doc)
    caches, masks = ka.shared_prefill(model, ids, {"p": press}, full_key="full")
    full = caches["full"]
    want = round(kept * n_doc)
    for i, layer in enumerate(caches["p"].layers):
        assert layer.keys.shape[2] == want + len(ids) - n_doc
        for h in range(layer.keys.shape[1]):  # each question row is in the cache, as the prefill computed it
            got = layer.keys[0, h]
            for r in range(n_doc, len(ids)):
                assert (got == full.layers[i].keys[0, h, r]).all(-1).any()
    assert ka.realised_fraction(caches["p"], masks["p"], len(ids), n_doc) == pytest.approx(want / n_doc)
    # without keep_question the same press spends the budget on every row, question included
    plain, pm = ka.shared_prefill(model, ids, {"p": StandInScorer(ka.press_ratio("snapkv", kept))})
    assert plain["p"].layers[0].keys.shape[2] == int(len(ids) * (1 - ka.press_ratio("snapkv", kept)))  # kvpress's int()


def test_exact_question_ratio_of_a_model_wide_ranking():
    """KVzip prunes int(heads * n * ratio) rows over the whole model: that is (1 - kept) of the document's rows."""
    for kept in (0.5, 0.25, 0.1):
        for n_doc, n, heads in ((1540, 1563, 90), (931, 950, 90), (131, 150, 6)):
            r = ka.press_ratio("kvzip", kept, n_doc, n, heads)
            assert int(heads * n * r) == round((1 - kept) * n_doc * heads)
    assert ka.press_ratio("kvzip", 0.25) == ka.press_ratio("tova", 0.25) == 0.75  # kvpress's own protocol


def test_keep_question_refuses_a_press_without_a_score():
    with pytest.raises(ValueError, match="cannot be kept exactly"):
        ka.keep_question(StandInPress(0.5), 10)


def test_the_shared_prefill_gives_the_prefill_s_own_first_token(model):
    ids = random_ids(80, seed=6)
    first = []
    ka.shared_prefill(model, ids, {"p": StandInScorer(0.5)}, full_key="full", first=first)
    _, _, tok = ka.direct_prefill(model, ids, None, logits=True)
    assert first == [tok]


def test_masked_rows_of_the_document_count_as_evicted_with_an_exact_question(model):
    ids, n_doc = random_ids(60, seed=7), 50
    cache, _ = ka.direct_prefill(model, ids, None)
    heads = cache.layers[0].keys.shape[1]
    seqs = torch.tensor([3, 7, 11] * heads)  # three document rows masked in every head of layer 0
    masks = {0: (torch.zeros_like(seqs), torch.arange(heads).repeat_interleave(3), seqs)}
    layers = len(cache.layers)
    assert ka.realised_fraction(cache, masks, len(ids), n_doc) == pytest.approx(1 - 3 * heads / (layers * heads * n_doc))
