"""The real default model (SmolLM2-135M-Instruct, installed offline). Marked slow."""

from __future__ import annotations

import pytest
import torch

from headwise.documents import document_tokens
from headwise.models import SamplingParams
from headwise.models.loader import CHECKSUM_FILE, install_default_model, weights_checksum
from headwise.prompt import build_segments

pytestmark = pytest.mark.slow


def test_install_is_idempotent_and_verified(default_model_path):
    again = install_default_model()
    assert again.path == default_model_path and not again.converted
    assert (default_model_path / CHECKSUM_FILE).read_text().split()[0] == weights_checksum(default_model_path)


def test_full_logits_match_transformers_on_real_text(real_runner):
    tok = real_runner.tokenizer
    ids = tok(document_tokens(tok, 600), add_special_tokens=False).input_ids
    a = real_runner.prefill_segment(ids[:400])
    b = real_runner.prefill_segment(ids[400:], a.cache)
    with torch.inference_mode():
        ref = real_runner.model(torch.tensor([ids])).logits[0, -1].float()
    assert torch.allclose(b.logits, ref, atol=1e-4)


def test_greedy_32_tokens_equal_model_generate(real_runner):
    tok = real_runner.tokenizer
    seg = build_segments(tok, document_tokens(tok, 300), "Summarize the text above in one sentence.")
    ids = seg.context + seg.question
    res = real_runner.prefill_segment(ids)
    mine = list(real_runner.generate(res.cache, res.logits, SamplingParams(max_new_tokens=32, ignore_eos=True)))
    x = torch.tensor([ids])
    ref = real_runner.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False,
                                     eos_token_id=None, pad_token_id=tok.pad_token_id)
    assert mine == ref[0, len(ids):].tolist()


def test_segments_render_the_chat_template(real_runner):
    tok = real_runner.tokenizer
    seg = build_segments(tok, "DOC", "Q?", answer_prefix="A:")
    whole = tok.apply_chat_template([{"role": "user", "content": "DOC\n\nQ?"}], tokenize=False, add_generation_prompt=True)
    assert tok.decode(seg.context) + tok.decode(seg.question) == whole + "A:"
