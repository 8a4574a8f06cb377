"""``normref bench``'s harness (issue 18, "a benchmark people can trust"): structure, never timings.

What is checked: the interleaving order and the warm-up policy of the timer (on callables that log
their calls, not on clocks), the spread statistics on hand-computed samples, the JSON's fields
(environment, allocator phases, every section's rows, noisy flags), the options (``--sections``,
``--max-bytes``, ``--allocator``, ``--first-call``), ``--compare`` (ratios on a report whose medians
are scaled by a known factor) and the whitening bench's JSON. No assertion depends on how fast
anything ran: these are the tiny ``--smoke`` shapes on a shared machine.
"""

from __future__ import annotations

import copy
import json
import statistics

import pytest

from normref.conformance import bench_timing as bt

pytest.importorskip("numba")


# --------------------------------------------------------------------------------------------------
# the timer


def test_interleaved_rotates_the_order_and_warms_up_untimed():
    log = []
    fns = {k: (lambda k=k: log.append(k)) for k in "abc"}
    res = bt.interleaved(fns, repeat=4, warmup=2, repeats={"c": 2}, inner={"b": 3})
    # warm-up: every function twice, in order, before any timed call
    assert log[:6] == list("abcabc")
    timed = log[6:]
    # repetition i starts at function i mod 3; "b" runs 3 times per sample; "c" only in the first 2
    assert timed == list("abbbc") + list("bbbca") + list("abbb") + list("abbb")
    assert {k: v["n"] for k, v in res.items()} == {"a": 4, "b": 4, "c": 2}
    assert all(len(v["samples"]) == v["n"] for v in res.values())


def test_spread_on_known_samples():
    s = bt.spread([4.0, 1.0, 3.0, 2.0])
    # sorted 1, 2, 3, 4; linear interpolation at positions 0.75, 1.5, 2.25 of 0..3
    assert (s["min"], s["q1"], s["median"], s["q3"], s["max"]) == (1.0, 1.75, 2.5, 3.25, 4.0)
    assert s["iqr"] == 1.5 and s["rel_iqr"] == 1.5 / 2.5
    assert s["samples"] == [4.0, 1.0, 3.0, 2.0]  # in the order taken (the pairing needs it)
    assert bt.is_noisy(s) and not bt.is_noisy(bt.spread([1.0, 1.0, 1.0]))


def test_paired_ratio_is_the_median_of_per_repetition_ratios():
    a = bt.spread([2.0, 10.0, 3.0])
    b = bt.spread([1.0, 5.0, 1.0])
    assert bt.paired_ratio(a, b) == 2.0  # ratios 2, 2, 3 -> 2; the ratio of medians would be 3/1


def test_paired_ratio_needs_samples():
    assert bt.paired_ratio({"samples": []}, {"samples": [1.0]}) is None
    assert bt.paired_difference({"samples": []}, {"samples": [1.0]}) is None


def test_decide_needs_the_whole_interquartile_range():
    # per-repetition ratios 0.8, 0.9, 1.0, 1.1, 1.2: quartiles 0.9, 1.0, 1.1
    a = bt.spread([0.8, 0.9, 1.0, 1.1, 1.2])
    b = bt.spread([1.0] * 5)
    q = bt.paired_quartiles(a, b)
    assert q == pytest.approx((0.9, 1.0, 1.1))
    assert bt.decide(q, 1.2) is True and bt.decide(q, 0.85) is False and bt.decide(q, 1.0) is None
    assert bt.paired_quartiles(a, bt.spread([0.5] * 5), "difference") == pytest.approx((0.4, 0.5, 0.6))
    assert bt.paired_quartiles(a, None) == pytest.approx((0.9, 1.0, 1.1)) and bt.decide(None, 1.0) is None


def test_paired_difference():
    a = bt.spread([3.0, 12.0, 5.0])
    b = bt.spread([1.0, 10.0, 4.0])
    assert bt.paired_difference(a, b) == 2.0  # differences 2, 2, 1 -> 2; medians' difference would be 1


# --------------------------------------------------------------------------------------------------
# one smoke run, shared by the structure tests


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    pytest.importorskip("torch")
    from normref.conformance import bench

    out = tmp_path_factory.mktemp("bench")
    rc = bench.main(["--smoke", "--repeat", "3", "--threads", "1", "--max-bytes", "128k", "--inner", "5",
                     "--allocator", "both", "--no-plot", "--out", str(out)])
    assert rc == 0
    return out, json.loads((out / "bench.json").read_text())


def test_json_has_the_environment_and_the_policy(smoke):
    _, rep = smoke
    env = rep["environment"]
    for key in ("timestamp_utc", "cpu_model", "cpu_count", "numba_threads", "torch_threads", "thread_env",
                "load_average_1min", "versions"):
        assert key in env
    assert env["torch_threads"] == 1 and env["versions"]["torch"] and env["versions"]["numba"]
    assert rep["interleaved"] is True and rep["warmup"] == 1 and rep["repeat"] == 3 and rep["complete"] is True
    assert rep["noisy_threshold"] == 0.10
    assert set(rep["sections"]) == {"kernels", "adapter", "network", "scaling", "under-load", "overhead"}  # smoke:
    # no first-call
    assert rep["stream"]["copy"] > 0
    if "reuse" in rep["allocators"]:  # glibc: both policies, the defaults first
        assert list(rep["allocators"]) == ["default", "reuse"] and rep["allocator_rows"] == "reuse"
        assert len(rep["rows_default_allocator"]) == len(rep["rows"])


def _check_spread(s, n):
    assert s["n"] == n == len(s["samples"])
    assert 0 < s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]
    assert s["rel_iqr"] == pytest.approx(s["iqr"] / s["median"])


def test_json_rows_of_every_section(smoke):
    _, rep = smoke
    phases = list(rep["allocators"])
    for r in rep["rows"]:
        for lib in ("numba", "numba_1t", "array_api", "torch"):
            _check_spread(r[lib + "_spread"], 3)
        assert isinstance(r["noisy"], bool) and r["allocator"] == rep["allocator_rows"]
        assert r["noisy"] == (r["rel_spread"] > 0.10) and r["ratio_paired"] > 0
    fb = rep["kernel_fwd_bwd"][rep["allocator_rows"]]
    assert len(fb) == len(rep["rows"]) // 2  # one per case
    for c in fb:
        f, b = (next(r for r in rep["rows"] if (r["method"], r["shape"], r["layout"], r["pass"]) ==
                     (c["method"], c["shape"], c["layout"], p)) for p in ("forward", "backward"))
        assert c["ratio"] == pytest.approx((f["numba"] + b["numba"]) / (f["torch"] + b["torch"]))
        assert c["target"] in (0.6, 1.0) and c["target_met"] is None  # smoke: not judged
    ad = rep["adapter"]
    assert {(r["layer"], r["layout"], r["allocator"]) for r in ad} == {
        (name, lay, ph) for ph in phases for name, lay in
        (("BatchNorm2d", "NCHW"), ("BatchNorm2d", "channels-last"), ("LayerNorm", "rows"))}
    for r in ad:
        assert set(r["timings"]) == {"normref_forward", "torch_forward", "normref_step", "torch_step"}
        for s in r["timings"].values():
            _check_spread(s, 3)
        assert r["ratio_step"] > 0 and r["normref_fraction"] > 0 and r["target_met"] is None  # smoke: not judged
    assert {(r["layout"], r["allocator"]) for r in rep["network"]} == {
        (lay, ph) for ph in phases for lay in ("NCHW", "channels-last")}
    sc = rep["scaling"]
    assert {r["method"] for r in sc} == {"layer_norm", "batch_norm"}
    assert all(r["bytes"] <= 128 << 10 and r["ratio"] > 0 and r["normref_fraction"] > 0 for r in sc)
    ul = rep["under_load"]
    assert [(r["method"], r["shape"], r["layout"]) for r in ul] == [
        (r["method"], r["shape"], r["layout"]) for r in rep["rows"] if r["pass"] == "forward"]
    for r in ul:
        assert set(r["timings"]) == {"2t_forward", "1t_forward", "2t_backward", "1t_backward"}
        assert r["busy_processes"] == 1 and r["ratio_forward"] > 0 and r["ratio_backward"] > 0
    ov = {r["id"]: r for r in rep["overhead"]}
    assert set(ov["layer_norm 8x16 numpy"]["timings"]) == {"normref_numpy", "numpy_formula"}
    assert {"adapter_forward", "torch_forward", "adapter_fwd_bwd", "torch_fwd_bwd", "plain_normref_on_torch"} == set(
        ov["layer_norm 8x16 torch"]["timings"])
    t = ov["layer_norm 8x16 torch"]["timings"]
    # the overhead is the median of the per-repetition differences (paired), not of the medians
    diffs = [a - b for a, b in zip(t["adapter_fwd_bwd"]["samples"], t["torch_fwd_bwd"]["samples"])]
    assert ov["layer_norm 8x16 torch"]["adapter_overhead_fwd_bwd_s"] == pytest.approx(statistics.median(diffs))
    assert rep["latency"]["tiny_layer_norm_per_call_s"] == ov["layer_norm 8x16 numpy"]["timings"]["normref_numpy"][
        "median"]
    # every noisy row is listed, and only those
    flagged = sum(bool(r.get("noisy")) for k in ("rows", "rows_default_allocator", "adapter", "network", "scaling",
                                                 "under_load", "overhead") for r in rep.get(k) or ())
    assert len(rep["noisy_rows"]) == flagged


def test_compare_against_a_scaled_report(smoke, tmp_path, capsys):
    out, rep = smoke
    old = copy.deepcopy(rep)
    for k, s in bt.flatten(old).items():  # flatten returns the report's own dicts: scale them in place
        if not k.startswith("first_call"):
            s["median"] *= 2.0
    cmp = bt.compare(old, rep)
    assert cmp["rows"] and not cmp["only_old"] and not cmp["only_new"]
    assert all(r["ratio"] == pytest.approx(0.5) for r in cmp["rows"])
    ids = {r["id"] for r in cmp["rows"]}
    for section in ("kernels[reuse]" if "reuse" in rep["allocators"] else "kernels[default]", "adapter[",
                    "network[", "scaling[", "under_load ", "overhead "):
        assert any(i.startswith(section) for i in ids), section
    (tmp_path / "old.json").write_text(json.dumps(old))
    from normref.conformance.cli import main

    assert main(["bench", "--compare", str(tmp_path / "old.json"), "--against", str(out / "bench.json")]) == 0
    text = capsys.readouterr().out
    assert f"{len(cmp['rows'])} timings in common, geometric mean new/old 0.500" in text
    verdicts = [line.split()[-1] for line in text.splitlines() if line.endswith(("faster", "slower", "same"))]
    assert len(verdicts) == len(cmp["rows"]) and {v.lstrip("~") for v in verdicts} == {"faster"}


def test_compare_during_a_run_is_written_to_the_json(smoke, tmp_path, capsys):
    out, _ = smoke
    from normref.conformance import bench

    assert bench.main(["--smoke", "--repeat", "3", "--threads", "1", "--sections", "overhead", "--inner", "2", "--no-plot",
                       "--compare", str(out), "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "bench.json").read_text())
    assert rep["sections"] == ["overhead"] and rep["rows"] == [] and rep["adapter"] == []
    assert rep["compare"]["old"] == str(out)
    assert {r["id"] for r in rep["compare"]["rows"]} == {k for k in bt.flatten(rep)}
    assert "timings in common" in capsys.readouterr().out


def test_an_interrupted_run_keeps_the_sections_it_measured(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    from normref.conformance import bench, bench_torch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # the user's Ctrl-C (or a CI timeout) during the network section

    monkeypatch.setattr(bench_torch, "measure_network", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--smoke", "--repeat", "3", "--threads", "1", "--sections", "kernels,adapter,network",
                    "--no-plot", "--out", str(tmp_path)])
    rep = json.loads((tmp_path / "bench.json").read_text())
    assert rep["complete"] is False and rep["rows"] and rep["adapter"] and rep["network"] == []
    capsys.readouterr()
    # and its tables can be printed from the file
    assert bench.main(["--show", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "torch adapter's layers" in out and "numba ms" in out and "an incomplete report" in out
    assert "training step" not in out


def test_only_selects_rows_by_name(tmp_path):
    pytest.importorskip("torch")
    from normref.conformance import bench

    assert bench.main(["--smoke", "--repeat", "3", "--threads", "1", "--sections",
                       "kernels,adapter,network,under-load", "--only", "2x8x4x4 NCHW,net", "--no-plot",
                       "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "bench.json").read_text())
    assert rep["only"] == ["2x8x4x4 NCHW", "net"]
    assert {(r["method"], r["layout"]) for r in rep["rows"]} == {(m, "NCHW") for m in ("batch", "instance", "group")}
    assert [r["id"] for r in rep["adapter"]] == ["BatchNorm2d(8) 2x8x4x4 NCHW"]
    assert len(rep["network"]) == 2 and len(rep["under_load"]) == 3


# --------------------------------------------------------------------------------------------------
# options


def test_sizes_and_option_parsing(capsys):
    from normref.conformance import bench

    assert bench.scaling_sizes(512 << 20) == [(1 << 20) << k for k in range(10)]  # 1 MiB ... 512 MiB
    assert bench.scaling_sizes(3 << 20) == [1 << 20, 2 << 20]
    assert bench.scaling_sizes(64 << 10) == [64 << 10]
    assert bench._bytes("512M") == 512 << 20 and bench._bytes("1G") == 1 << 30 and bench._bytes("64k") == 64 << 10
    assert bench._bytes("2MiB") == 2 << 20 and bench._bytes("4096") == 4096
    for shape_of in (("layer", 4 << 20), ("batch", 4 << 20), ("layer", 64 << 10), ("batch", 64 << 10)):
        shape = bench._scaling_shape(*shape_of)
        n = 1
        for s in shape:
            n *= s
        assert 4 * n == shape_of[1]  # the input is the size asked for
    from normref.conformance.cli import main

    for bad in (["--max-bytes", "lots"], ["--sections", "kernels,nope"], ["--allocator", "jemalloc"],
                ["--against", "x.json"], ["--compare", "/nonexistent/bench.json"], ["--numba-threads", "4096"]):
        assert main(["bench", *bad]) == 2, bad
        assert "normref bench" in capsys.readouterr().err


def test_first_call_tiny_in_fresh_processes():
    from normref.conformance.bench_latency import first_call

    fc = first_call("tiny", timeout=300)
    for cache in ("cold", "warm"):
        r = fc[cache]
        assert "error" not in r, r
        assert r["import_normref_s"] > 0 and r["tiny_layer_norm_first_call_s"] > 0
        assert isinstance(r["numba_imported_by_tiny_call"], bool) and r["numba_imported_by_import"] is False
    with pytest.raises(ValueError, match="first-call"):
        first_call("some")


def test_whitening_bench_writes_json(tmp_path, capsys):
    pytest.importorskip("torch")
    from normref.conformance.cli import main

    assert main(["bench", "whitening", "--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "bench_whitening.json").read_text())
    assert doc["environment"]["cpu_model"] and doc["quick"] is True and doc["repeat"] == 2
    res = doc["results"]
    assert res["shape"] == [4, 16, 8, 8] and res["group_size"] == 8
    assert res["forward_ms"] > 0 and set(res["verdict"]) >= {"covariance >= 60% of matmul"}
    for name in ("covariance", "apply", "forward", "forward_backward", "torch_zca_forward"):
        s = doc["spreads"][name]
        assert s["n"] == 2 and s["min"] * 1e3 == pytest.approx(res[{"covariance": "cov_ms", "apply": "apply_ms"}.get(
            name, name + "_ms")])
    assert "wrote" in capsys.readouterr().out


def test_sync_bench_writes_json_when_asked(tmp_path, capsys):
    pytest.importorskip("torch")
    from normref.conformance.cli import main

    assert main(["bench", "sync", "--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "bench_sync.json").read_text())
    assert doc["environment"]["cpu_model"] and doc["world_size"] == 2 and doc["shape"] == [8, 16, 4, 4]
    assert [r["layer"].split("(")[0] for r in doc["rows"]] == ["BatchNorm2d", "IterNorm2d"]
    assert all(r["local_s"] > 0 and r["sync_s"] > 0 and r["collectives_per_step"] == 2 for r in doc["rows"])
