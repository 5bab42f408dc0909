"""The demo's figures read a deferred first answer right: it is cold, and its bytes are the exact ones."""

from cluster.demo import FACTS, PLAN, figures_table, store_note, summary


def _row(session, tenant, fact, status, ttft, held, kept, answer="pier 12"):
    return {"session": session, "tenant": tenant, "question": FACTS[fact].question, "answer": answer, "ok": True,
            "store_status": status, "ttft_s": ttft, "held_kv_bytes": held, "full_kv_bytes": 100_000_000,
            "realised_kept": kept, "policy": "kvzip(kept=0.25)", "reused_tokens": 0, "prompt_tokens": 10,
            "decode_tok_s": 5.0}


def test_a_compressing_first_answer_counts_as_cold_and_the_table_shows_the_compressed_cache() -> None:
    rows = [_row(s, t, i, "compressing" if n == 0 else "reused", 10.0 if n == 0 else 0.5,
                 100_000_000 if n == 0 else 25_000_000, 1.0 if n == 0 else 0.25) for n, (s, t, i) in enumerate(PLAN)]
    text = summary(rows)
    assert "cold TTFT 10.00 s vs reused 0.50 s (20x faster)" in text
    assert "KV cache held 25.0MB of 100.0MB" in text
    assert "first from the exact cache, then from the compressed one: identical answers" in text
    assert "kept 0.25 realised" in figures_table(rows).title
    assert "compressed cache is computed now" in store_note(rows[0])
