"""PoD: the gate form equals the single-softmax form; the layout budget."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from headwise.policies.pod import PoDPlan, pod_gate_attention, pod_single_attention, proximal


@settings(max_examples=30, deadline=None)
@given(g=st.integers(1, 4), n_p=st.integers(1, 20), n_d=st.integers(1, 40), scale=st.floats(0.1, 8.0), seed=st.integers(0, 999))
def test_gate_form_equals_single_softmax(g, n_p, n_d, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    a_p, a_d = torch.randn(g, n_p, generator=gen, dtype=torch.float64) * scale, torch.randn(g, n_d, generator=gen, dtype=torch.float64) * scale
    v_p, v_d = torch.randn(n_p, 8, generator=gen, dtype=torch.float64), torch.randn(n_d, 8, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(pod_gate_attention(a_p, a_d, v_p, v_d), pod_single_attention(a_p, a_d, v_p, v_d))


def test_gate_is_not_a_plain_average():
    a_p, a_d = torch.tensor([[5.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.0]])
    v_p, v_d = torch.eye(2, 4), torch.ones(3, 4)
    avg = 0.5 * (torch.softmax(a_p, -1) @ v_p + torch.softmax(a_d, -1) @ v_d)
    assert not torch.allclose(pod_gate_attention(a_p, a_d, v_p, v_d), avg)


def test_recent_window_hits_the_kept_fraction():
    base_of = [[0, 0], [0, 1], [0, 1], [3, 3]]  # 3 non-base (layer, head) pairs of 8
    S = 1000
    plan = PoDPlan(kept=0.85, sinks=16)
    r = plan.recent_for(S, base_of)
    k_rows = 5 * S + 3 * proximal(S, 16, r).sum().item()
    assert abs((k_rows + 8 * S) / (2 * 8 * S) - 0.85) < 0.01
