import numpy as np


def test_oracle_runs_nncodec_2_1_3_and_round_trips_arrays(oracle):
    v = oracle.call("ping", "versions")
    assert v["numpy"].startswith("1.")
    x = {"a": np.arange(5, dtype=np.int32), "b": b"\x00\xff", "c": [1.5, None]}
    y = oracle.call("ping", "echo", x)
    np.testing.assert_array_equal(y["a"], x["a"])
    assert y["b"] == x["b"] and y["c"] == [1.5, None]
