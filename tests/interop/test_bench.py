"""`ann bench attention`: FLOPs from FlopCounterMode, peak memory from a child process, JSON output."""

import json

import pytest
from conftest import run_ann

from anncli.interop.bench import count_flops, parse_sizes, run_attention_bench
from anncli.errors import UserError

CK = CV = 256


def conv_flops(c: int, n: int) -> int:
    # f_key (c -> Ck), f_value (c -> Cv) and W (Cv -> c), 1x1 convs over n positions, 2 FLOPs per multiply-add
    return 2 * n * (c * CK + c * CV + CV * c)


@pytest.mark.parametrize("h,w", [(8, 12), (16, 16)])
def test_flops_follow_the_layer_shapes(h, w):
    c, n, s = 16, h * w, 110
    assert count_flops("nonlocal", c, (h, w)) == conv_flops(c, n) + 2 * n * n * (CK + CV)
    # APNB pools before its value projection and maps the s anchor values to the output (W) before
    # attending: f_value and W run on the s anchors, the attention averages c-wide values; pooling is two
    # matmuls: (W, 18) column-bin means, then (s, H) row-bin means per level
    pool = lambda ch: 2 * ch * (n * 18 + h * s)  # noqa: E731
    assert count_flops("apnb", c, (h, w)) == (2 * n * c * CK + 2 * s * c * CV + 2 * s * CV * c
                                              + 2 * n * s * (CK + c) + pool(CK) + pool(c))


def test_paper_sizes_give_the_expected_flop_ratio():
    ratio = count_flops("nonlocal", 2048, (128, 256)) / count_flops("apnb", 2048, (128, 256))
    assert ratio > 8.8  # query/key computed once, so above the reference's 8.8 (which counts it twice)
    assert ratio > 15  # and the value path projects 110 anchors instead of 32768 positions
    assert ratio > 22  # and W maps those 110 anchors, not the 32768 attended vectors


def test_bad_options_are_user_errors():
    assert parse_sizes("96x96, 128X256") == [(96, 96), (128, 256)]
    for sizes in ("96", "0x4", "96x96,"):
        with pytest.raises(UserError, match="--sizes"):
            parse_sizes(sizes)
    with pytest.raises(UserError, match="--device"):
        run_attention_bench("8x8", "tpu", "float32", 16, 1, None)
    with pytest.raises(UserError, match="--dtype"):
        run_attention_bench("8x8", "cpu", "float64", 16, 1, None)


def test_bench_cli_writes_json_with_measured_memory(tmp_path):
    out = tmp_path / "attention.json"
    res = run_ann("bench", "attention", "--sizes", "64x64", "--channels", "16", "--repeats", "1", "--json", out)
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert {"device", "dtype", "channels", "key_channels", "value_channels", "anchor_sizes", "results"} <= set(report)
    (entry,) = report["results"]
    assert entry["size"] == "64x64" and entry["n"] == 4096
    nl, ap = entry["nonlocal"], entry["apnb"]
    for block in (nl, ap):
        assert block["repeats"] == 1 and len(block["times_ms"]) == 1 and block["time_ms"] > 0
    assert nl["flops"] == count_flops("nonlocal", 16, (64, 64))
    sim_bytes = 4096 * 4096 * 4  # one fp32 N x N map: 64 MiB; the similarity and its softmax coexist
    assert nl["peak_mem_bytes"] >= 2 * sim_bytes
    # APNB holds N x 256 maps (query, key, value, context: 4 MiB each) and an N x 110 similarity
    assert ap["peak_mem_bytes"] < sim_bytes // 2
    assert entry["ratios"]["flops"] == pytest.approx(nl["flops"] / ap["flops"])
    assert entry["ratios"]["memory"] == pytest.approx(nl["peak_mem_bytes"] / ap["peak_mem_bytes"])
    assert "64x64" in res.stdout
