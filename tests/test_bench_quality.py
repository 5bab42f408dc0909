"""bench.quality's bookkeeping: a policy spec whose setting holds a '+' (signal=window+kvzip) is its
own row, not a precision variant."""

from bench.quality import _summarise, make_policy


def test_a_spec_with_a_plus_is_its_own_row() -> None:
    specs = [("full", 1.0), ("snapkv:signal=window+kvzip", 0.25), ("kvzip+int8", 0.25)]
    built = {(p, k): make_policy(p.split("+int8")[0], k) for p, k in specs}
    built = {c: p for c, p in built.items() if c[0] != "kvzip+int8"} | {("kvzip", 0.25): make_policy("kvzip", 0.25)}
    rows = {c: {"correct": 1, "total": 2, "realised": [k], "compress_s": [0.1]} for c in specs for k in [c[1]]}
    res = _summarise(rows, built, {"window": 1.0}, [])
    got = res["policies"]["snapkv:signal=window+kvzip"]["0.25"]
    assert got["accuracy"] == 0.5 and got["realised"] == 0.25
    assert make_policy("snapkv:signal=window+kvzip", 0.25).signal == "window+kvzip"
    assert res["policies"]["kvzip+int8"]["0.25"]["correct"] == 1
