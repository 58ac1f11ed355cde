"""The benchmark's multi-device mode (python -m jax_flash.bench --ring): causal ring attention
with the sequence split over the visible devices, timed next to flash_attention on one device.

For each configuration it times, per pass (fwd, fwd_bwd):
  - "ring": ring_attention (zigzag layout) inside shard_map over n devices, seqlen tokens in all,
    seqlen / n per device; TFLOP/s is per device, the pass's FLOPs over n over the time;
  - "flash": flash_attention on one device at seqlen / n tokens, the single-device figure the
    ring's per-device TFLOP/s is measured against ("vs 1 dev" = ring's TFLOP/s over flash's).
The inputs are random, so they are simply laid out in the zigzag order already; the time of
to_zigzag is not counted. No oracle check here: ring attention's numbers are the CPU and GPU
tests' concern.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_flash

GPU_RING_SEQLENS = (65536,)
GPU_RING_HEAD_DIMS = (128,)
CPU_RING_SEQLENS = (256,)
CPU_RING_HEAD_DIMS = (32,)
RING_HIDDEN = 2048
RING_BATCH = 1


def ring_shapes(seqlens, head_dims, dtype, shape_type):
    """Batch 1, hidden 2048 (heads = 2048 / head_dim), causal: the long-context setup."""
    return [shape_type(batch=RING_BATCH, seqlen=seqlen, num_heads=max(1, RING_HIDDEN // head_dim),
                       head_dim=head_dim, causal=True, dtype=dtype)
            for head_dim in head_dims for seqlen in seqlens]


def ring_pass_fn(pass_: str, devices, implementation: str, pass_fn):
    """The jitted pass over ring attention on `devices`, and the sharding of its inputs."""
    mesh = jax.make_mesh((len(devices),), ("seq",), axis_types=(AxisType.Auto,),
                         devices=devices)
    attention = functools.partial(jax_flash.ring_attention, axis_name="seq", causal=True,
                                  layout="zigzag", implementation=implementation)
    inner = pass_fn(pass_, attention)
    if pass_ == "fwd":
        fn = jax.shard_map(inner, mesh=mesh, in_specs=(P(None, "seq"),) * 3,
                           out_specs=(P(None, "seq"),))
    else:
        # Each device differentiates its share of the loss; the ring's backward routes every
        # share's dk and dv home, so the gradients are the whole loss's. The returned loss is
        # this device's share, hence no check that it is the same everywhere.
        fn = jax.shard_map(inner, mesh=mesh, in_specs=(P(None, "seq"),) * 4,
                           out_specs=(P(None, "seq"),) * 3 + (P(),), check_vma=False)
    return jax.jit(fn), NamedSharding(mesh, P(None, "seq"))


def bench_ring_shape(shape, passes, settings, devices, backend: str, bench) -> list[dict]:
    """Rows "ring" (n devices) and "flash" (one device, seqlen / n) per pass."""
    num_devices = len(devices)
    if shape.seqlen % (2 * num_devices):
        return [{"impl": "ring", "pass": pass_, "devices": num_devices,
                 **dataclasses.asdict(shape),
                 "status": f"skipped: seqlen is not a multiple of 2 × {num_devices} devices"}
                for pass_ in passes]
    implementation = "cuda" if backend == "gpu" else "xla"
    local = dataclasses.replace(shape, seqlen=shape.seqlen // num_devices)
    key = jax.random.key(0)
    rows = []
    for pass_ in passes:
        qkv = bench.random_inputs(shape, key)
        dout = bench.random_cotangent(shape, jax.random.fold_in(key, 1))
        ring, sharding = ring_pass_fn(pass_, devices, implementation, bench.pass_fn)
        inputs = [jax.device_put(x, sharding) for x in (qkv if pass_ == "fwd" else (*qkv, dout))]
        seconds, calls = bench.time_per_call(ring, [inputs], settings)
        rows.append({"impl": "ring", "pass": pass_, "devices": num_devices,
                     **dataclasses.asdict(shape), "status": "ok", "ms": seconds * 1e3,
                     "tflops": bench.pass_flops(shape, pass_) / num_devices / seconds / 1e12,
                     "calls_per_repeat": calls})

        one = functools.partial(jax_flash.flash_attention, causal=True,
                                implementation=implementation)
        with jax.default_device(devices[0]):
            qkv = bench.random_inputs(local, key)
            dout = bench.random_cotangent(local, jax.random.fold_in(key, 1))
            single = jax.jit(bench.pass_fn(pass_, one))
            inputs = qkv if pass_ == "fwd" else (*qkv, dout)
            seconds, calls = bench.time_per_call(single, [inputs], settings)
        rows.append({"impl": "flash", "pass": pass_, "devices": 1,
                     **dataclasses.asdict(local), "status": "ok", "ms": seconds * 1e3,
                     "tflops": bench.pass_flops(local, pass_) / seconds / 1e12,
                     "calls_per_repeat": calls})
    return rows


RING_HEADER = (f"{'impl':<6} {'pass':<7} {'devs':>4} {'d':>4} {'seqlen':>7} {'b×h':>7} "
               f"{'ms':>9} {'TFLOP/s/dev':>11} {'vs 1 dev':>8}  note")


def format_ring_rows(rows: list[dict]) -> list[str]:
    single = {r["pass"]: r["tflops"] for r in rows if r["impl"] == "flash"}
    lines = []
    for row in rows:
        head = (f"{row['impl']:<6} {row['pass']:<7} {row['devices']:>4} {row['head_dim']:>4} "
                f"{row['seqlen']:>7} {row['batch']:>3}×{row['num_heads']:<3}")
        if row["status"] != "ok":
            lines.append(f"{head} {'':>9} {'':>11} {'':>8}  {row['status']}")
            continue
        ratio = (f"{row['tflops'] / single[row['pass']]:.2f}"
                 if row["impl"] == "ring" and math.isfinite(single.get(row["pass"], math.nan))
                 else "")
        lines.append(f"{head} {row['ms']:>9.3f} {row['tflops']:>11.4g} {ratio:>8}")
    return lines
