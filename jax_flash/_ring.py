"""Ring attention: attention over a sequence split across the devices of a mesh axis.

Inside shard_map, each of the n devices along `axis_name` holds one slice of the queries and the
matching slice of the keys and values. The key/value slices travel around the ring with
lax.ppermute, one hop per step, the next hop issued before the current step's attention so that
XLA can overlap the transfer with it; after n steps every query has met every key. Each step's
partial result joins the running one through its log-sum-exp (merge_attention_states), and the
backward pass is a ring too: k, v and the float32 dk, dv they have collected so far travel
together, each step adds its share computed by the backward primitive from the global out and
lse, and one last hop brings dk and dv home.

Causal attention needs the global positions of each slice. layout="contiguous" is the plain
split (device i holds the i-th slice), where a device sees only the slices of devices before it:
correct, but the last device does 2n-1 times the first one's work, and every step waits for it. layout="zigzag" is the balanced
one (see _zigzag): every step after the first is exactly half a slice pair of work on every
device, and the half that no query sees is skipped.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jax_flash._bwd_primitive import flash_bwd_p
from jax_flash._config import FlashConfig
from jax_flash._fwd_primitive import flash_fwd_p
from jax_flash._merge import merge_attention_states
from jax_flash._validation import (
    check_common_options,
    check_flag,
)

LAYOUTS = ("contiguous", "zigzag")


def ring_attention(q, k, v, *, axis_name, causal=False, softmax_scale=None, return_lse=False,
                   layout="contiguous", implementation=None, deterministic=False):
    """flash_attention over a sequence split along the mesh axis `axis_name`, inside shard_map.

    Args:
      q: [batch, seqlen_q, heads, head_dim], this device's slice of the queries.
      k, v: [batch, seqlen_k, kv_heads, head_dim], this device's slice of the keys and values
        (kv_heads divides heads; only kv heads travel).
      axis_name: the mesh axis (of shard_map, or pmap) the sequence is split over.
      causal: query i sees key j iff j <= i, in global positions; needs seqlen_q == seqlen_k.
      layout: how the global sequence lies on the devices when causal: "contiguous" (device i
        holds slice i) or "zigzag" (device i holds chunks i and 2n-1-i of 2n; see to_zigzag),
        which gives every device the same work. Non-causal attention ignores it.
      softmax_scale, return_lse, implementation, deterministic: as in flash_attention.

    Returns:
      out [batch, seqlen_q, heads, head_dim] for this device's queries, or (out, lse) with lse
      float32 [batch, heads, seqlen_q]. Differentiable with respect to q, k and v (reverse mode).
    """
    scale, return_lse = check_common_options(q, k, v, implementation, softmax_scale, return_lse)
    causal = check_flag("causal", causal)
    if layout not in LAYOUTS:
        raise ValueError(f"jax-flash: layout must be one of {LAYOUTS}; got {layout!r}")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(
            "jax-flash: causal ring attention needs q and k slices of one length (self-attention); "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if causal and layout == "zigzag" and q.shape[1] % 2:
        raise ValueError(
            "jax-flash: the zigzag layout gives each device two equal chunks, so the local "
            f"seqlen must be even; got q {tuple(q.shape)}")
    try:
        num_devices = lax.axis_size(axis_name)
    except NameError as e:
        raise NameError(
            f"jax-flash: ring_attention runs inside shard_map (or pmap) over axis_name="
            f"{axis_name!r}, which is not bound here") from e
    config = FlashConfig(
        causal=False,
        softmax_scale=1.0 / math.sqrt(q.shape[3]) if scale is None else scale,
        implementation=implementation,
        deterministic=check_flag("deterministic", deterministic),
    )
    ring = _Ring(axis_name, num_devices, causal, layout if causal else "contiguous", config)
    out, lse = _ring_attention(q, k, v, ring)
    return (out, lse) if return_lse else out


@dataclasses.dataclass(frozen=True)
class _Ring:
    """The static description of one ring: its axis, size, mask and layout, and the config of a
    step whose keys all precede its queries (non-causal)."""

    axis_name: object
    num_devices: int
    causal: bool
    layout: str
    config: FlashConfig

    def send(self, x):
        """x to the next device of the ring (device i sends to i + 1, the last to the first)."""
        n = self.num_devices
        return lax.ppermute(x, self.axis_name, [(i, (i + 1) % n) for i in range(n)])

    def source(self, step):
        """The device whose key/value slice this device holds at `step`."""
        return (lax.axis_index(self.axis_name) - step) % self.num_devices

    def is_earlier(self, step):
        return self.source(step) < lax.axis_index(self.axis_name)


# ---- forward ---------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ring_attention(q, k, v, ring: _Ring):
    return _forward(q, k, v, ring)


def _forward(q, k, v, ring: _Ring):
    out = jnp.zeros(q.shape, jnp.float32)
    lse = jnp.full((q.shape[0], q.shape[2], q.shape[1]), -jnp.inf, jnp.float32)
    for step in range(ring.num_devices):
        if step + 1 < ring.num_devices:
            next_k, next_v = ring.send(k), ring.send(v)
        part_out, part_lse = _step_forward(q, k, v, step, ring)
        out, lse = merge_attention_states([out, part_out.astype(jnp.float32)], [lse, part_lse])
        if step + 1 < ring.num_devices:
            k, v = next_k, next_v
    return out.astype(q.dtype), lse


def _attend(q, k, v, config: FlashConfig):
    return tuple(flash_fwd_p.bind(q, k, v, config=config))


def _nothing_seen(q):
    """The partial result of queries that see no key: out 0, lse -inf."""
    lse = jnp.full_like(q[..., 0], -jnp.inf, jnp.float32).transpose(0, 2, 1)
    return jnp.zeros_like(q), lse


def _step_forward(q, k, v, step: int, ring: _Ring):
    """This device's queries against the key/value slice it holds at `step`."""
    config = ring.config
    if not ring.causal:
        return _attend(q, k, v, config)
    if step == 0:  # its own slice: the causal mask in local positions is the global one
        return _attend(q, k, v, dataclasses.replace(config, causal=True))
    if ring.layout == "contiguous":  # an earlier slice is seen whole, a later one not at all
        return lax.cond(ring.is_earlier(step), lambda: _attend(q, k, v, config),
                        lambda: _nothing_seen(q))
    # zigzag: this device holds chunks (r, 2n-1-r), the visitor (s, 2n-1-s). From an earlier
    # device (s < r) all queries see chunk s and none sees 2n-1-s; from a later one only the
    # second query chunk sees anything, and it sees both key chunks.
    half = q.shape[1] // 2

    def from_earlier():
        return _attend(q, k[:, :half], v[:, :half], config)

    def from_later():
        out, lse = _attend(q[:, half:], k, v, config)
        empty_out, empty_lse = _nothing_seen(q[:, :half])
        return (jnp.concatenate([empty_out, out], axis=1),
                jnp.concatenate([empty_lse, lse], axis=2))

    return lax.cond(ring.is_earlier(step), from_earlier, from_later)


# ---- backward --------------------------------------------------------------------------------

def _ring_attention_fwd(q, k, v, ring: _Ring):
    out, lse = _forward(q, k, v, ring)
    return (out, lse), (q, k, v, out, lse)


def _ring_attention_bwd(ring: _Ring, residuals, cotangents):
    q, k, v, out, lse = residuals
    dout, dlse = cotangents
    dout = dout.astype(q.dtype)
    dq = jnp.zeros(q.shape, jnp.float32)
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for step in range(ring.num_devices):
        if step + 1 < ring.num_devices:
            next_k, next_v = ring.send(k), ring.send(v)
        parts = _step_backward(q, k, v, out, lse, dout, dlse, step, ring)
        dq, dk, dv = (total + part.astype(jnp.float32)
                      for total, part in zip((dq, dk, dv), parts))
        # dk and dv travel with the slice they belong to; the last hop takes them home.
        dk, dv = ring.send(dk), ring.send(dv)
        if step + 1 < ring.num_devices:
            k, v = next_k, next_v
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_ring_attention.defvjp(_ring_attention_fwd, _ring_attention_bwd)


def _gradients(q, k, v, out, lse, dout, dlse, config: FlashConfig):
    """(dq, dk, dv) of this pair of slices, from the global out and lse of the queries."""
    return tuple(flash_bwd_p.bind(q, k, v, out, lse, dout, dlse, config=config))


def _step_backward(q, k, v, out, lse, dout, dlse, step: int, ring: _Ring):
    """The forward step's gradient, skipping what the forward skipped."""
    config = ring.config
    operands = (q, k, v, out, lse, dout, dlse)
    if not ring.causal:
        return _gradients(*operands, config)
    if step == 0:
        return _gradients(*operands, dataclasses.replace(config, causal=True))

    def zeros():
        return tuple(jnp.zeros_like(x) for x in (q, k, v))

    if ring.layout == "contiguous":
        return lax.cond(ring.is_earlier(step), lambda: _gradients(*operands, config), zeros)
    half = q.shape[1] // 2

    def from_earlier():
        dq, dk, dv = _gradients(q, k[:, :half], v[:, :half], out, lse, dout, dlse, config)
        return dq, *(jnp.concatenate([d, jnp.zeros_like(d)], axis=1) for d in (dk, dv))

    def from_later():
        dq, dk, dv = _gradients(q[:, half:], k, v, out[:, half:], lse[..., half:],
                                dout[:, half:], dlse[..., half:], config)
        return jnp.concatenate([jnp.zeros_like(dq), dq], axis=1), dk, dv

    return lax.cond(ring.is_earlier(step), from_earlier, from_later)
