"""bench.service's reused TTFT by precision: arguments, the interleaving and the JSON, without a cluster."""

import json

import pytest

from bench.service import brief, parse_args, parse_precisions, parser, precision_figures, precision_orders


def args(*argv: str):
    return parse_args(parser(), list(argv))


def test_precisions_parse_in_order_once_and_reject_unknown() -> None:
    assert parse_precisions("fp32,int8") == ["fp32", "int8"]
    assert parse_precisions(" int8 , fp32,int8,") == ["int8", "fp32"]
    assert parse_precisions("") == []
    with pytest.raises(ValueError, match="int3"):
        parse_precisions("fp32,int3")


def test_default_measures_no_precision_and_every_other_figure() -> None:
    a = args()
    assert a.precisions == [] and a.only == "all" and a.cold_repeats == 3


def test_precision_options() -> None:
    a = args("--precisions", "fp32,int8", "--only", "reused-precision", "--reused-repeats", "4", "--cold-repeats", "1")
    assert (a.precisions, a.only, a.reused_repeats, a.cold_repeats) == (["fp32", "int8"], "reused-precision", 4, 1)
    for bad in (["--precisions", "fp32,fp8"], ["--only", "decode"], ["--reused-repeats", "0"]):
        with pytest.raises(SystemExit):
            args(*bad)


def test_order_alternates_so_no_precision_is_always_first() -> None:
    orders = precision_orders(["fp32", "int8"], 4)
    assert orders == [["fp32", "int8"], ["int8", "fp32"], ["fp32", "int8"], ["int8", "fp32"]]
    assert precision_orders(["fp32", "int8", "int4"], 2) == [["fp32", "int8", "int4"], ["int4", "int8", "fp32"]]
    assert precision_orders(["int8"], 3) == [["int8"]] * 3


def test_json_shape_medians_ranges_bytes_and_answer_agreement() -> None:
    precisions = ["fp32", "int8"]
    runs = {"fp32": [0.4, 0.2, 0.3], "int8": [0.2, 0.4, 0.15]}
    answers = {"fp32": [[1, 2], [3], [4]], "int8": [[1, 2], [3], [5]]}
    figures = {"fp32": {"stored_kv_bytes": 400, "held_kv_bytes": 90, "store_status": "reused", "kv_precision": "fp32"},
               "int8": {"stored_kv_bytes": 100, "held_kv_bytes": 90, "store_status": "reused", "kv_precision": "int8"}}
    server = {"fp32": [0.3, 0.1, 0.2], "int8": [0.1, 0.3, 0.05]}
    out = precision_figures(precisions, precision_orders(precisions, 3), runs, answers, figures, server)
    assert out["ttft_reused_s_by_precision"] == {"fp32": 0.3, "int8": 0.2}
    assert out["ttft_reused_runs_s_by_precision"] == runs
    assert out["ttft_reused_range_s_by_precision"] == {"fp32": [0.2, 0.4], "int8": [0.15, 0.4]}
    assert out["ttft_reused_over_first"]["int8"] == pytest.approx(0.2 / 0.3)
    assert out["ttft_reused_over_first_range"]["int8"] == pytest.approx([0.5, 2.0])
    assert out["ttft_reused_over_first_round_median"]["int8"] == pytest.approx(0.5)
    assert out["ttft_reused_server_s_by_precision"] == {"fp32": 0.2, "int8": 0.1}
    assert out["ttft_reused_server_runs_s_by_precision"] == server
    assert out["stored_kv_bytes_by_precision"] == {"fp32": 400, "int8": 100}
    assert out["kv_precision_reported"] == {"fp32": "fp32", "int8": "int8"}
    assert out["answers_identical_by_precision"] == {"fp32": True, "int8": False}
    assert out["answers_differ_rounds"] == [2]
    json.dumps(out)  # what write_json writes
    assert "fp32 0.300" in brief(out["ttft_reused_s_by_precision"])


def test_same_answers_in_every_round_are_identical() -> None:
    out = precision_figures(["fp32", "int8"], precision_orders(["fp32", "int8"], 2), {"fp32": [1.0, 1.0], "int8": [1.0, 1.0]},
                            {"fp32": [[7], [8]], "int8": [[7], [8]]}, {"fp32": {}, "int8": {}})
    assert out["answers_identical_by_precision"] == {"fp32": True, "int8": True} and out["answers_differ_rounds"] == []


def test_cold_figures_give_the_default_over_full_of_medians_and_per_copy() -> None:
    from bench.service import cold_figures

    runs = {"runs": {"full": [10.0, 12.0, 11.0], "kvzap": [10.5, 12.0, 11.0], "kvzip": [30.0, 31.0, 29.0]},
            "stored": {"kvzip": [40.0, 42.0, 41.0]}, "handoff": {"kvzip": [29.0, 30.0, 31.0]}}
    f = cold_figures(runs, "kvzap")
    assert f["ttft_cold_s_by_policy"] == {"full": 11.0, "kvzap": 11.0, "kvzip": 30.0}
    assert f["ttft_cold_default_over_full"] == 1.0
    assert f["ttft_cold_default_over_full_range"] == [1.0, 1.05]
    assert f["compressed_stored_after_s"] == {"kvzip": 41.0} and f["compressed_stored_after_handoff_s"] == {"kvzip": 30.0}
    assert cold_figures({"runs": {"kvzap": [1.0]}, "stored": {}, "handoff": {}}, "kvzap")["ttft_cold_default_over_full"] == 0.0
