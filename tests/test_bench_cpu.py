"""The benchmark's own arithmetic, oracle, charts and command line, on a tiny grid."""

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash
from jax_flash import bench
from jax_flash._bench_chart import write_charts
from jax_flash._dropout import dense_keep_mask, dropout_seed, quantize_rate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _shape(causal):
    return bench.Shape(batch=2, seqlen=1024, num_heads=16, head_dim=128, causal=causal,
                       dtype="bf16")


def test_flops():
    forward = 4 * 2 * 16 * 1024**2 * 128
    assert bench.forward_flops(_shape(False)) == forward
    assert bench.pass_flops(_shape(False), "fwd") == forward
    assert bench.pass_flops(_shape(False), "fwd_bwd") == 3.5 * forward
    assert bench.pass_flops(_shape(True), "fwd") == forward / 2
    assert bench.pass_flops(_shape(True), "fwd_bwd") == 3.5 * forward / 2


def test_window_flops_count_the_visible_pairs():
    # Counted against a dense mask on an odd size: the window's edges clip at both ends.
    seqlen, window = 37, 5
    i, j = np.arange(seqlen)[:, None], np.arange(seqlen)[None, :]
    for causal in (False, True):
        visible = (j >= i - window) & (j <= (i if causal else i + window))
        shape = bench.Shape(batch=3, seqlen=seqlen, num_heads=2, head_dim=16, causal=causal,
                            dtype="bf16", window=window)
        assert bench.visible_pairs(shape) == visible.sum()
        assert bench.forward_flops(shape) == 4 * 3 * 2 * 16 * visible.sum()


@pytest.mark.parametrize("causal,window_size,alibi", [
    (True, (-1, -1), False), (False, (9, 5), False), (True, (9, -1), False), (False, (-1, -1), True),
    (True, (9, -1), True)])
def test_chunked_oracle_gradients_match_whole(make_qkv, monkeypatch, causal, window_size, alibi):
    # Causal, so that each chunk sees a different prefix of the keys, and windows and ALiBi,
    # which must stay on the whole problem's diagonal; 40 rows in chunks of 32 leave a partial
    # last chunk.
    q, k, v = make_qkv(1, 40, 40, 2, 24)
    dout = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)
    options = dict(causal=causal, softmax_scale=0.3, window_size=window_size,
                   alibi_slopes=jnp.asarray([0.5, 0.0625]) if alibi else None)

    @jax.jit
    def whole(q, k, v):
        def loss(q, k, v):
            out, _ = jax_flash.attention_reference(q, k, v, **options)
            return jnp.sum(out * dout)
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    monkeypatch.setattr(bench, "REFERENCE_CHUNK", 32)
    chunked = bench.reference_outputs("fwd_bwd", q, k, v, dout, **options)
    for got, want in zip(chunked, whole(q, k, v), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("causal", [False, True])
def test_chunked_oracle_dropout_matches_whole(make_qkv, monkeypatch, pass_, causal):
    # Each chunk must draw its part of the whole problem's mask: its queries' rows, its keys'
    # columns and the mask's dependence on the whole seqlen. 2 heads, so that heads differ too.
    q, k, v = make_qkv(2, 40, 40, 2, 24)
    dout = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)
    rng, rate = jax.random.key(7), 0.3
    keep = dense_keep_mask(rng, rate, batch=2, heads=2, seqlen_q=40, seqlen_k=40)
    options = dict(causal=causal, softmax_scale=0.3)

    @jax.jit
    def whole(q, k, v):
        def fwd(q, k, v):
            # The rate the mask draws, as flash_attention scales by.
            out, _ = jax_flash.attention_reference(q, k, v, dropout_rate=quantize_rate(rate),
                                                   dropout_keep=keep, **options)
            return out
        if pass_ == "fwd":
            return (fwd(q, k, v),)
        return jax.grad(lambda *qkv: jnp.sum(fwd(*qkv) * dout), argnums=(0, 1, 2))(q, k, v)

    monkeypatch.setattr(bench, "REFERENCE_CHUNK", 32)
    chunked = bench.reference_outputs(pass_, q, k, v, dout, dropout_rate=rate,
                                      dropout_seed=dropout_seed(rng, 2), **options)
    for got, want in zip(chunked, whole(q, k, v), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def _row(impl, pass_, head_dim, seqlen, causal, tflops=None, status="ok"):
    row = {"impl": impl, "pass": pass_, "batch": 16384 // seqlen, "seqlen": seqlen,
           "num_heads": 2048 // head_dim, "head_dim": head_dim, "causal": causal,
           "dtype": "bf16", "status": status}
    return {**row, "tflops": tflops} if status == "ok" else row


def _synthetic_report():
    """Both passes, two head dims, and rows that did not run: flash has no gradient, XLA stops
    short of 16k."""
    rows = []
    for pass_ in ("fwd", "fwd_bwd"):
        for head_dim in (64, 128):
            for seqlen in (512, 1024, 16384):
                for causal in (False, True):
                    cell = (pass_, head_dim, seqlen, causal)
                    rows.append(_row("cudnn", *cell, tflops=400.0 + seqlen / 100))
                    rows.append(_row("flash", *cell, tflops=300.0) if pass_ == "fwd" else
                                _row("flash", *cell, status="error: NotImplementedError: no grad"))
                    rows.append(_row("xla", *cell, tflops=9.5) if seqlen < 16384 else
                                _row("xla", *cell, status="skipped: seqlen > --xla-max-seqlen"))
    return {"device": "NVIDIA H200", "dtype": "bf16", "date": "2026-11-22T03:09:44+00:00",
            "rows": rows}


def test_charts_one_png_per_pass_and_head_dim(tmp_path):
    paths = write_charts(_synthetic_report(), str(tmp_path / "bench_results.json"))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(f"bench_results_{pass_}_d{d}.png"
                           for pass_ in ("fwd", "fwd_bwd") for d in (64, 128))
    assert sorted(str(tmp_path / name) for name in names) == sorted(paths)
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == PNG_MAGIC


def test_charts_from_json(tmp_path):
    report = _synthetic_report()
    report["rows"] = [row for row in report["rows"] if row["head_dim"] == 64]
    for row in report["rows"]:
        del row["pass"]  # reports written before fwd_bwd existed
    json_path = tmp_path / "old.json"
    json_path.write_text(json.dumps(report))
    bench.main(["--charts-from", str(json_path)])
    assert (tmp_path / "old_fwd_d64.png").stat().st_size > 0


TINY = ["--seqlens", "64", "--head-dims", "32", "--causal", "false", "--quick"]


def test_tiny_run_both_passes_survives_a_raising_gradient(tmp_path, monkeypatch):
    real = jax_flash.flash_attention

    @jax.custom_vjp
    def no_gradient(q, k, v):
        return real(q, k, v)

    def backward(residuals, dout):
        raise NotImplementedError("no gradients here")

    no_gradient.defvjp(lambda q, k, v: (no_gradient(q, k, v), None), backward)
    # causal is off and the bench's scale is flash_attention's default, so dropping them is exact.
    monkeypatch.setattr(jax_flash, "flash_attention", lambda q, k, v, **_: no_gradient(q, k, v))
    monkeypatch.setattr(bench, "QUICK_TIMING", bench.TimingSettings(1, 1, 0.0))
    out = tmp_path / "tiny.json"
    bench.main(["--out", str(out), *TINY])

    rows = json.loads(out.read_text())["rows"]
    status = {(row["pass"], row["impl"]): row["status"] for row in rows}
    assert set(status) == {(p, i) for p in bench.PASSES for i in bench.DEFAULT_IMPLS}
    assert status["fwd", "flash"] == "ok"
    assert status["fwd_bwd", "flash"].startswith("error: NotImplementedError: no gradients here")
    for row in rows:
        if row["impl"] == "xla":
            assert row["status"] == "ok" and 0 < row["rel_err"] < 2e-2 and row["tflops"] > 0
    for pass_ in bench.PASSES:
        assert (tmp_path / f"tiny_{pass_}_d32.png").stat().st_size > 0


def test_grouped_query_and_window_rows(tmp_path, monkeypatch):
    # k and v with half the heads, a window of 8 keys: every row runs and meets the oracle,
    # whose slice must then take a whole group of query heads with its kv head.
    monkeypatch.setattr(bench, "QUICK_TIMING", bench.TimingSettings(1, 1, 0.0))
    out = tmp_path / "gqa.json"
    bench.main(["--out", str(out), "--no-charts", "--passes", "fwd_bwd", "--impls",
                "flash,xla", "--kv-group", "2", "--window", "8", *TINY])
    rows = json.loads(out.read_text())["rows"]
    assert {(row["kv_group"], row["window"]) for row in rows} == {(2, 8)}
    for row in rows:
        assert row["status"] == "ok" and 0 < row["rel_err"] < 2e-2, row


def test_alibi_rows(tmp_path, monkeypatch):
    # ALiBi on flash's rows, held to the oracle with the same slopes; XLA's row is skipped.
    monkeypatch.setattr(bench, "QUICK_TIMING", bench.TimingSettings(1, 1, 0.0))
    out = tmp_path / "alibi.json"
    bench.main(["--out", str(out), "--no-charts", "--impls", "flash,xla", "--alibi", *TINY])
    rows = json.loads(out.read_text())["rows"]
    for row in rows:
        assert row["alibi"]
        if row["impl"] == "xla":
            assert row["status"] == "skipped: jax.nn.dot_product_attention takes no ALiBi slopes"
        else:
            assert row["status"] == "ok" and 0 < row["rel_err"] < 2e-2, row


def test_deterministic_rows(tmp_path, monkeypatch):
    # --deterministic reaches flash_attention on flash's rows; XLA's rows run as they are.
    monkeypatch.setattr(bench, "QUICK_TIMING", bench.TimingSettings(1, 1, 0.0))
    seen = []
    original = bench.jax_flash.flash_attention

    def spy(*args, **kwargs):
        seen.append(kwargs["deterministic"])
        return original(*args, **kwargs)

    monkeypatch.setattr(bench.jax_flash, "flash_attention", spy)
    out = tmp_path / "deterministic.json"
    bench.main(["--out", str(out), "--no-charts", "--impls", "flash,xla", "--deterministic",
                *TINY])
    rows = json.loads(out.read_text())["rows"]
    assert seen and all(seen)
    assert {row["impl"] for row in rows} == {"flash", "xla"}
    for row in rows:
        assert row["deterministic"] and row["status"] == "ok" and 0 < row["rel_err"] < 2e-2, row


def test_dropout_rows(tmp_path, monkeypatch):
    # Dropout on flash's rows, held to the oracle with the very mask flash draws (a different
    # mask leaves a rel_err of about 0.6); XLA's row is skipped.
    monkeypatch.setattr(bench, "QUICK_TIMING", bench.TimingSettings(1, 1, 0.0))
    out = tmp_path / "dropout.json"
    bench.main(["--out", str(out), "--no-charts", "--impls", "flash,xla", "--dropout", "0.2",
                *TINY])
    rows = json.loads(out.read_text())["rows"]
    for row in rows:
        assert row["dropout"] == 0.2
        if row["impl"] == "xla":
            assert row["status"] == "skipped: jax.nn.dot_product_attention takes no dropout"
        else:
            assert row["status"] == "ok" and 0 < row["rel_err"] < 2e-2, row


@pytest.mark.parametrize("rate", ["1.0", "-0.1"])
def test_bad_dropout_exits_clearly(tmp_path, rate):
    with pytest.raises(SystemExit, match=re.escape(f"--dropout must be in [0, 1) (0: off), "
                                                   f"not {float(rate)}")):
        bench.main(["--out", str(tmp_path / "bad.json"), "--dropout", rate, *TINY])
    assert not (tmp_path / "bad.json").exists()


def test_key_padding_flops_count_the_visible_pairs():
    # 37 keys, 0.3 of them padding: the first 26 visible; causal rows see min(i + 1, 26) keys.
    seqlen = 37
    i, j = np.arange(seqlen)[:, None], np.arange(seqlen)[None, :]
    for causal in (False, True):
        visible = (j < 26) & ((j <= i) if causal else (i >= 0))
        shape = bench.Shape(batch=3, seqlen=seqlen, num_heads=2, head_dim=16, causal=causal,
                            dtype="bf16", key_padding=0.3)
        assert shape.visible_keys == 26
        assert bench.visible_pairs(shape) == visible.sum()
        assert bench.forward_flops(shape) == 4 * 3 * 2 * 16 * visible.sum()
        assert np.array_equal(np.asarray(bench.padding_mask(shape))[2, 0], np.broadcast_to(
            j < 26, (seqlen, seqlen)))


def test_key_padding_rows(tmp_path, monkeypatch):
    # Every implementation takes the mask; each row meets the oracle with the keys hidden.
    monkeypatch.setattr(bench, "QUICK_TIMING", bench.TimingSettings(1, 1, 0.0))
    out = tmp_path / "padding.json"
    bench.main(["--out", str(out), "--no-charts", "--impls", "flash,xla", "--key-padding", "0.25",
                *TINY])
    rows = json.loads(out.read_text())["rows"]
    assert {row["impl"] for row in rows} == {"flash", "xla"}
    for row in rows:
        assert row["key_padding"] == 0.25
        assert row["status"] == "ok" and 0 < row["rel_err"] < 2e-2, row


def test_bias_rows(tmp_path, monkeypatch):
    # Every implementation takes the bias, and meets the oracle given it; with --alibi too,
    # flash's row meets the oracle given both.
    monkeypatch.setattr(bench, "QUICK_TIMING", bench.TimingSettings(1, 1, 0.0))
    for extra in ([], ["--alibi"]):
        out = tmp_path / "bias.json"
        bench.main(["--out", str(out), "--no-charts", "--impls", "flash,xla", "--bias", *extra,
                    *TINY])
        rows = json.loads(out.read_text())["rows"]
        for row in rows:
            assert row["bias"]
            if row["impl"] == "xla" and extra:
                assert row["status"].startswith("skipped")
            else:
                assert row["status"] == "ok" and 0 < row["rel_err"] < 2e-2, row


@pytest.mark.parametrize("alibi", [False, True])
def test_chunked_oracle_bias_matches_whole(make_qkv, monkeypatch, alibi):
    # Chunks of 8 query rows take their rows of the bias (plus ALiBi's); their gradients add up
    # to the whole's.
    monkeypatch.setattr(bench, "REFERENCE_CHUNK", 8)
    q, k, v = make_qkv(1, 20, 20, 2, 24)
    dout = jax.random.normal(jax.random.key(7), q.shape, jnp.float32)
    bias = jax.random.normal(jax.random.key(8), (1, 2, 20, 20), jnp.float32)
    options = dict(causal=True, softmax_scale=0.3,
                   alibi_slopes=jnp.asarray([0.5, 0.0625]) if alibi else None)

    def loss(q, k, v):
        out, _ = jax_flash.attention_reference(q, k, v, bias=bias, **options)
        return jnp.sum(out * dout)

    whole = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    chunked = bench.reference_outputs("fwd_bwd", q, k, v, dout, bias=bias, **options)
    for got, want in zip(chunked, whole):
        np.testing.assert_allclose(got, np.asarray(want), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("args,message", [
    (["--key-padding", "1.0"], "--key-padding must be in [0, 1) (0: off), not 1.0"),
    (["--key-padding", "0.5", "--segments", "2"], "--key-padding and --segments do not combine")])
def test_bad_key_padding_exits_clearly(tmp_path, args, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        bench.main(["--out", str(tmp_path / "bad.json"), *args, *TINY])


def test_max_seconds_skips_what_is_left(tmp_path):
    out = tmp_path / "late.json"
    bench.main(["--out", str(out), "--max-seconds", "0", "--no-charts", *TINY])
    statuses = {row["status"] for row in json.loads(out.read_text())["rows"]}
    assert statuses <= {"skipped: --max-seconds spent", "skipped: cuDNN needs an NVIDIA GPU"}
    assert not list(tmp_path.glob("*.png"))


def test_segment_flops_count_each_documents_pairs():
    # Against a dense mask: pairs in the same document, and causal / window within it.
    seqlen, segments, window = 48, 4, 5
    i, j = np.arange(seqlen)[:, None], np.arange(seqlen)[None, :]
    same = i // (seqlen // segments) == j // (seqlen // segments)
    for causal in (False, True):
        for w in (-1, window):
            visible = same & (j <= i if causal else True)
            if w >= 0:
                visible &= (j >= i - w) & (j <= i + w)
            shape = bench.Shape(batch=3, seqlen=seqlen, num_heads=2, head_dim=16, causal=causal,
                                dtype="bf16", window=w, segments=segments)
            assert bench.visible_pairs(shape) == visible.sum()
            assert bench.forward_flops(shape) == 4 * 3 * 2 * 16 * visible.sum()


def test_segments_time_packed_rows_next_to_their_dense_equivalent(tmp_path, monkeypatch):
    # flash alone, fwd_bwd alone (it runs the forward too) and causal: compiles are most of it.
    monkeypatch.setattr(bench, "QUICK_TIMING", bench.TimingSettings(1, 1, 0.0))
    out = tmp_path / "packed.json"
    bench.main(["--out", str(out), "--segments", "2", "--impls", "flash", "--passes", "fwd_bwd",
                *TINY[:-3], "--causal", "true", "--quick"])
    packed, dense = json.loads(out.read_text())["rows"]
    assert (packed["segments"], packed["batch"], packed["seqlen"]) == (2, 2, 64)
    assert (dense["segments"], dense["batch"], dense["seqlen"]) == (1, 4, 32)
    for row in (packed, dense):
        assert row["status"] == "ok" and 0 < row["rel_err"] < 2e-2, row
    # 2 documents of 32 tokens, causal: 2 · 32·33/2 visible pairs per (batch, head).
    useful = 3.5 * 4 * 2 * packed["num_heads"] * 32 * 33 * packed["head_dim"]
    assert math.isclose(packed["tflops"] * packed["ms"] * 1e9, useful, rel_tol=1e-9)
    assert math.isclose(packed["vs_dense"], packed["tflops"] / dense["tflops"])
    assert "vs_dense" not in dense
    # The chart draws the packed series beside the dense one at the documents' length.
    assert (tmp_path / "packed_fwd_bwd_d32.png").stat().st_size > 0
    # jax.nn.dot_product_attention's impls skip the packed shape, and only it.
    for impl in ("cudnn", "xla"):
        reason = bench.skip_reason(impl, bench.Shape(**{k: packed[k] for k in (
            "batch", "seqlen", "num_heads", "head_dim", "causal", "dtype", "segments")}),
            "gpu", 10**6, math.inf)
        assert reason == "jax.nn.dot_product_attention takes no segment ids"
        assert bench.skip_reason(impl, bench.Shape(**{k: dense[k] for k in (
            "batch", "seqlen", "num_heads", "head_dim", "causal", "dtype")}),
            "gpu", 10**6, math.inf) is None


def test_bad_segments_exit_clearly(tmp_path):
    for segments, message in (("3", "--segments 3 does not divide seqlen 64"),
                              ("0", "--segments must be 1 (off) or more")):
        with pytest.raises(SystemExit, match=re.escape(message)):
            bench.main(["--out", str(tmp_path / "bad.json"), "--segments", segments, *TINY])
    assert not (tmp_path / "bad.json").exists()
