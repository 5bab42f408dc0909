"""bench.quality's precision dimension: each policy point once per precision, the reference fp32."""

from bench.quality import precision_variants


def test_each_point_once_per_precision_and_full_stays_fp32() -> None:
    v = precision_variants([("full", 1.0), ("kvzip", 0.25)], ["fp32", "int8"])
    assert v[("full", 1.0)] == [(("full", 1.0), "fp32")]
    assert v[("kvzip", 0.25)] == [(("kvzip", 0.25), "fp32"), (("kvzip+int8", 0.25), "int8")]
    assert precision_variants([("kvzip", 0.1)], ["int8"]) == {("kvzip", 0.1): [(("kvzip+int8", 0.1), "int8")]}
