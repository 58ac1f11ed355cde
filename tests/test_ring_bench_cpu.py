"""The benchmark's multi-device mode (--ring) on 2 host CPU devices (see conftest): rows, JSON and
per-device arithmetic, on a tiny grid."""

import json

from jax_flash import bench

# The forward pass only: compiling the ring's backward takes CPU time the CI cannot spare, and
# both passes share the plumbing.
TINY_RING = ["--ring", "--devices", "2", "--seqlens", "32,6", "--head-dims", "256", "--quick",
             "--passes", "fwd"]


def test_ring_mode_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "QUICK_TIMING", bench.TimingSettings(1, 1, 0.0))
    out = tmp_path / "ring.json"
    bench.main(["--out", str(out), *TINY_RING])

    report = json.loads(out.read_text())
    assert report["devices"] == 2
    rows = {(r["impl"], r["pass"], r["seqlen"]): r for r in report["rows"]}
    assert set(rows) == {("ring", "fwd", 32), ("flash", "fwd", 16), ("ring", "fwd", 6)}
    for pass_ in ("fwd",):
        ring, single = rows["ring", pass_, 32], rows["flash", pass_, 16]
        assert ring["status"] == single["status"] == "ok"
        assert ring["devices"] == 2 and single["devices"] == 1 and ring["causal"]
        # TFLOP/s per device: the whole sequence's FLOPs shared by the two devices.
        shape = bench.Shape(**{f: ring[f] for f in
                               ("batch", "seqlen", "num_heads", "head_dim", "causal", "dtype")})
        per_device = bench.pass_flops(shape, pass_) / 2 / (ring["ms"] / 1e3) / 1e12
        assert abs(ring["tflops"] - per_device) <= 1e-9 * per_device
        # 6 tokens do not split into 2 × 2 zigzag chunks.
        assert rows["ring", pass_, 6]["status"].startswith("skipped: seqlen is not a multiple")
