"""Ring attention: attention over a sequence split across the devices of a mesh axis.

Inside shard_map, each of the n devices along `axis_name` holds one slice of the queries and the
matching slice of the keys and values. The key/value slices travel around the ring with
lax.ppermute, the next hop issued before the current step's attention so that XLA can overlap
the transfer with it; after the last step every query has met every key it can see. Each step's
partial result joins the running one through its log-sum-exp (merge_attention_states), and the
backward pass is a ring too: k, v and the float32 dk, dv they have collected so far travel
together, each step adds its share computed by the backward primitive from the global out and
lse, and one last hop brings dk and dv home.

Causal attention needs the global positions of each slice. layout="contiguous" is the plain
split (device i holds the i-th slice), where a device sees only the slices of devices before it:
correct, but the last device does 2n-1 times the first one's work, and every step waits for it.
layout="zigzag" is the balanced one (see _zigzag): every step after the first is exactly half a
slice pair of work on every device, and the half that no query sees is skipped.

A window or segment ids take another path through the same ring: every step's attention call
gets the global positions of this device's queries and of the visiting keys (the primitives'
positions operands, computed from lax.axis_index, so one program serves every device) and the
segment ids (all zero when none are given; the kv ids travel with k and v). The kernels turn
ids, positions and band into per-row key ranges and skip the tiles no query sees; a device that
sees nothing of a step's slice gets lse -inf rows, which the merge ignores. There is no
conditional anywhere on that path: only the number of steps is static. A step at which no
device's queries can see the visiting slice (a window reaching only the nearest slices) is left
out, the slices hopping straight to the next step that runs.

The same ring runs, without shard_map, under plain jax.jit when q, k and v come sharded along
their sequence: the primitives' partition rule (_sharding) calls partitioned_ring.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_flash._bwd_primitive import flash_bwd_p
from jax_flash._config import FlashConfig
from jax_flash._fwd_primitive import flash_fwd_p
from jax_flash._merge import merge_attention_states
from jax_flash._segments import segment_operands
from jax_flash._validation import (
    check_common_options,
    check_flag,
    check_window_size,
)

LAYOUTS = ("contiguous", "zigzag")


def ring_attention(q, k, v, *, axis_name, causal=False, softmax_scale=None, return_lse=False,
                   layout="contiguous", implementation=None, deterministic=False,
                   window_size=(-1, -1), q_segment_ids=None, kv_segment_ids=None):
    """flash_attention over a sequence split along the mesh axis `axis_name`, inside shard_map.

    Args:
      q: [batch, seqlen_q, heads, head_dim], this device's slice of the queries.
      k, v: [batch, seqlen_k, kv_heads, head_dim], this device's slice of the keys and values
        (kv_heads divides heads; only kv heads travel).
      axis_name: the mesh axis (of shard_map, or pmap) the sequence is split over, or a tuple of
        mesh axes (the slices then lie in the order a PartitionSpec entry of that tuple gives).
      causal: query i sees key j iff j <= i, in global positions; needs seqlen_q == seqlen_k.
      window_size: (left, right), in global positions: query i sees key j iff
        i - left <= j <= i + right, -1 leaving a side unbounded; combines with causal. Needs
        seqlen_q == seqlen_k. Ring steps whose keys no device's queries can see are skipped.
      layout: how the global sequence lies on the devices when causal or window_size masks it:
        "contiguous" (device i holds slice i) or "zigzag" (device i holds chunks i and 2n-1-i of
        2n, so the local seqlen must be even; see to_zigzag), which gives every device the same
        causal work. Unmasked attention ignores it.
      q_segment_ids: integer [batch, seqlen_q], this device's slice of the query segment ids, in
        the layout of q: query i sees key j only when their ids are equal; a negative id is
        padding (out 0, lse -inf, gradient 0), as in flash_attention.
      kv_segment_ids: integer [batch, seqlen_k], this device's slice, which travels with k and
        v; defaults to q_segment_ids when seqlen_q == seqlen_k.
      softmax_scale, return_lse, implementation, deterministic: as in flash_attention.

    Returns:
      out [batch, seqlen_q, heads, head_dim] for this device's queries, or (out, lse) with lse
      float32 [batch, heads, seqlen_q]. Differentiable with respect to q, k and v (reverse mode).

    Plain and causal attention run the ring measured on GPUs. window_size and segment ids give
    every step's attention call global positions instead (see the module docstring); that
    path is checked on CPU, in its CUDA lowering and on 2 GPUs (tests/test_sharding_gpu.py);
    its speed is not measured yet.
    """
    scale, return_lse = check_common_options(q, k, v, implementation, softmax_scale, return_lse)
    causal = check_flag("causal", causal)
    window = check_window_size(window_size)
    if layout not in LAYOUTS:
        raise ValueError(f"jax-flash: layout must be one of {LAYOUTS}; got {layout!r}")
    banded = causal or window != (-1, -1)
    if banded and q.shape[1] != k.shape[1]:
        what = "causal" if causal else f"window_size={window}"
        raise ValueError(
            f"jax-flash: {what} ring attention needs q and k slices of one length "
            f"(self-attention); got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if banded and layout == "zigzag" and q.shape[1] % 2:
        raise ValueError(
            "jax-flash: the zigzag layout gives each device two equal chunks, so the local "
            f"seqlen must be even; got q {tuple(q.shape)}")
    segments = segment_operands(*(None if x is None else jnp.asarray(x)
                                  for x in (q_segment_ids, kv_segment_ids)),
                                q.shape[0], q.shape[1], k.shape[1])
    axes = _as_tuple(axis_name)
    axis_name = axes[0] if len(axes) == 1 else axes  # hashable: the ring is a static argument
    try:
        sizes = tuple(lax.axis_size(a) for a in axes)
    except NameError as e:
        raise NameError(
            f"jax-flash: ring_attention runs inside shard_map (or pmap) over axis_name="
            f"{axis_name!r}, which is not bound here") from e
    config = FlashConfig(
        causal=causal,
        softmax_scale=1.0 / math.sqrt(q.shape[3]) if scale is None else scale,
        implementation=implementation,
        deterministic=check_flag("deterministic", deterministic),
        window_size=window,
        has_segment_ids=bool(segments),
    )
    ring = _Ring.of(config, axis_name, sizes, _mesh_axis_names(),
                    layout if banded else "contiguous", q.shape[1])
    q_ext, kv_ext = _segment_ids(q, k, ring, tuple(segments.values()))
    out, lse = _ring_attention(q, k, v, q_ext, kv_ext, ring)
    return (out, lse) if return_lse else out


# ---- the static description ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Ring:
    """The static description of one ring: its axis, size, mask and layout, the steps that run,
    and the config of the steps' attention calls."""

    axis_name: object
    num_devices: int
    causal: bool
    layout: str
    # With positions (window_size or segment ids): every step's config, causal and window in
    # global positions. Without: the config of a step whose keys all precede its queries.
    config: FlashConfig
    steps: tuple[int, ...]  # the steps at which some device sees some key, from 0
    mesh_index: tuple[int, ...] | None  # ppermute's index of each ring position; None: the same

    @classmethod
    def of(cls, config: FlashConfig, axis_name, sizes, mesh_axis_names, layout: str,
           length: int):
        """config: the attention asked for (causal, window_size, has_segment_ids as given).
        sizes: the size of each mesh axis of axis_name; length: the local seqlen of q."""
        num_devices = math.prod(sizes)
        if config.window_size != (-1, -1) or config.has_segment_ids:
            step_config = dataclasses.replace(config, has_segment_ids=True, has_positions=True)
        else:
            step_config = dataclasses.replace(config, causal=False)
        band = _band(config.causal, config.window_size)
        steps = tuple(step for step in range(num_devices)
                      if _step_runs(band, layout, num_devices, length, step))
        return cls(axis_name, num_devices, config.causal, layout, step_config, steps,
                   _mesh_index(_as_tuple(axis_name), sizes, mesh_axis_names))

    def hops(self):
        """(step, how far the slices hop to the next step that runs, 0 after the last)."""
        return zip(self.steps, [b - a for a, b in zip(self.steps, self.steps[1:])] + [0])

    def send(self, x, shift=1):
        """x to the device `shift` places on along the ring (device i sends to i + shift)."""
        n = self.num_devices
        if shift % n == 0:
            return x
        index = self.mesh_index or range(n)
        return lax.ppermute(x, self.axis_name,
                            [(index[i], index[(i + shift) % n]) for i in range(n)])

    def source(self, step):
        """The device whose key/value slice this device holds at `step`."""
        return (lax.axis_index(self.axis_name) - step) % self.num_devices

    def is_earlier(self, step):
        return self.source(step) < lax.axis_index(self.axis_name)

    def positions(self, device, x):
        """int32 [batch, seqlen] of x (a q or k slice): the global positions of the tokens
        `device` holds, in local order (non-decreasing in both layouts)."""
        batch, length = x.shape[:2]
        index = jnp.concatenate([start + jnp.arange(size, dtype=jnp.int32) for start, size in
                                 _chunks(self.layout, self.num_devices, device, length)])
        return jnp.broadcast_to(index, (batch, length))


def _as_tuple(axis_name) -> tuple:
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def _mesh_axis_names() -> tuple:
    """The axis names of the mesh being traced in (shard_map's), in its order; () under pmap."""
    return tuple(jax.sharding.get_abstract_mesh().axis_names)


def _mesh_index(axes: tuple, sizes: tuple, mesh_axis_names: tuple):
    """For each ring position (a PartitionSpec entry's order: the first of `axes` outermost),
    the device's index as ppermute counts it (the same axes in the mesh's order); None when the
    two agree."""
    order = sorted(range(len(axes)), key=lambda i: (
        mesh_axis_names.index(axes[i]) if axes[i] in mesh_axis_names else i))
    if order == list(range(len(axes))):
        return None
    coords = np.unravel_index(np.arange(math.prod(sizes)), sizes)
    index = np.ravel_multi_index([coords[i] for i in order], [sizes[i] for i in order])
    return tuple(int(i) for i in index)


def _chunks(layout: str, num_devices: int, device, length: int):
    """((global start, size), ...) of the chunks of `device`'s slice of `length` tokens, in
    local order; `device` may be traced."""
    if layout == "contiguous":
        return ((device * length, length),)
    half = length // 2
    return ((device * half, half), ((2 * num_devices - 1 - device) * half, half))


def _band(causal: bool, window_size):
    """(lowest, highest) key position minus query position that a query sees; None: unbounded."""
    left, right = window_size
    return (None if left == -1 else -left), (0 if causal else None if right == -1 else right)


def _step_runs(band, layout: str, num_devices: int, length: int, step: int) -> bool:
    """Whether some device's queries see some key of the slice it holds at `step`."""
    low, high = band
    for device in range(num_devices):
        source = (device - step) % num_devices
        for q_start, q_size in _chunks(layout, num_devices, device, length):
            for k_start, k_size in _chunks(layout, num_devices, source, length):
                # key - query takes every value from k_start - q_last to k_last - q_start.
                if ((high is None or k_start - (q_start + q_size - 1) <= high)
                        and (low is None or k_start + k_size - 1 - q_start >= low)):
                    return True
    return False


def _segment_ids(q, k, ring: _Ring, ids):
    """((q ids,), (kv ids,)) for a ring with positions, the kernels' ranges needing ids (all
    zero when none are given); ((), ()) for one without."""
    if not ring.config.has_positions:
        return (), ()
    if not ids:
        ids = tuple(jnp.zeros_like(x[:, :, 0, 0], jnp.int32) for x in (q, k))
    return (ids[0],), (ids[1],)


def _step_extras(q, k, q_ext, kv_ext, step: int, ring: _Ring):
    """The operands after q, k, v of a step with positions: segment ids, then the global
    positions of this device's queries and of the keys it holds at `step`."""
    here = lax.axis_index(ring.axis_name)
    return (*q_ext, *kv_ext, ring.positions(here, q), ring.positions(ring.source(step), k))


# ---- forward ---------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ring_attention(q, k, v, q_ext, kv_ext, ring: _Ring):
    return _forward(q, k, v, q_ext, kv_ext, ring)


def _forward(q, k, v, q_ext, kv_ext, ring: _Ring):
    """(out, lse) of this device's queries. q_ext: the query side's segment ids, (q_ids,) or ();
    kv_ext the key side's, which travel with k and v."""
    out = jnp.zeros(q.shape, jnp.float32)
    lse = jnp.full((q.shape[0], q.shape[2], q.shape[1]), -jnp.inf, jnp.float32)
    for step, hop in ring.hops():
        if hop:
            upcoming = [ring.send(x, hop) for x in (k, v, *kv_ext)]
        part_out, part_lse = _step_forward(q, k, v, q_ext, kv_ext, step, ring)
        out, lse = merge_attention_states([out, part_out.astype(jnp.float32)], [lse, part_lse])
        if hop:
            k, v, *kv_ext = upcoming
    return out.astype(q.dtype), lse


def _attend(q, k, v, config: FlashConfig, extras=()):
    return tuple(flash_fwd_p.bind(q, k, v, *extras, config=config))


def _nothing_seen(q):
    """The partial result of queries that see no key: out 0, lse -inf."""
    lse = jnp.full_like(q[..., 0], -jnp.inf, jnp.float32).transpose(0, 2, 1)
    return jnp.zeros_like(q), lse


def _step_forward(q, k, v, q_ext, kv_ext, step: int, ring: _Ring):
    """This device's queries against the key/value slice it holds at `step`."""
    config = ring.config
    if config.has_positions:  # the positions and ids mask it; rows that see nothing get -inf
        return _attend(q, k, v, config, _step_extras(q, k, q_ext, kv_ext, step, ring))
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

def _ring_attention_fwd(q, k, v, q_ext, kv_ext, ring: _Ring):
    out, lse = _forward(q, k, v, q_ext, kv_ext, ring)
    return (out, lse), (q, k, v, q_ext, kv_ext, out, lse)


def _ring_attention_bwd(ring: _Ring, residuals, cotangents):
    q, k, v, q_ext, kv_ext, out, lse = residuals
    dout, dlse = cotangents
    grads = _backward(q, k, v, q_ext, kv_ext, out, lse, dout, dlse, ring)
    # Segment ids are not differentiable: float0 zeros.
    no_grads = tuple(tuple(np.zeros(x.shape, jax.dtypes.float0) for x in ext)
                     for ext in (q_ext, kv_ext))
    return (*grads, *no_grads)


_ring_attention.defvjp(_ring_attention_fwd, _ring_attention_bwd)


def _backward(q, k, v, q_ext, kv_ext, out, lse, dout, dlse, ring: _Ring):
    """(dq, dk, dv) of this device's slices, from the global out and lse of its queries."""
    dout = dout.astype(q.dtype)
    dq = jnp.zeros(q.shape, jnp.float32)
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for step, hop in ring.hops():
        if hop:
            upcoming = [ring.send(x, hop) for x in (k, v, *kv_ext)]
        parts = _step_backward(q, k, v, q_ext, kv_ext, out, lse, dout, dlse, step, ring)
        dq, dk, dv = (total + part.astype(jnp.float32)
                      for total, part in zip((dq, dk, dv), parts))
        # dk and dv travel with the slice they belong to; after the last step, `step` hops
        # back take them home.
        dk, dv = ring.send(dk, hop or -step), ring.send(dv, hop or -step)
        if hop:
            k, v, *kv_ext = upcoming
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _gradients(q, k, v, out, lse, dout, dlse, config: FlashConfig, extras=()):
    """(dq, dk, dv) of this pair of slices, from the global out and lse of the queries."""
    return tuple(flash_bwd_p.bind(q, k, v, out, lse, dout, dlse, *extras, config=config))


def _step_backward(q, k, v, q_ext, kv_ext, out, lse, dout, dlse, step: int, ring: _Ring):
    """The forward step's gradient, skipping what the forward skipped."""
    config = ring.config
    operands = (q, k, v, out, lse, dout, dlse)
    if config.has_positions:
        return _gradients(*operands, config, _step_extras(q, k, q_ext, kv_ext, step, ring))
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


# ---- the partition rule's entry point --------------------------------------------------------

def ring_takes(config: FlashConfig) -> bool:
    """Whether the ring computes `config` exactly: ALiBi, mask, bias, dropout and varlen's
    positions depend on where a token lies in its call, which the ring does not carry."""
    return not (config.has_alibi_slopes or config.has_mask or config.has_bias
                or config.has_positions or config.dropout_rate)


def partitioned_ring(config: FlashConfig, mesh, axes: tuple, backward: bool):
    """The per-device function of a primitive whose sequence is split contiguously over the mesh
    axes `axes` (in PartitionSpec order): forward (q, k, v, *ids) -> (out, lse), backward
    (q, k, v, out, lse, dout, dlse, *ids) -> (dq, dk, dv); ids: the segment ids when config
    has them."""
    axis_name = axes[0] if len(axes) == 1 else tuple(axes)
    sizes = tuple(mesh.shape[a] for a in axes)

    def ring_for(q, k, ids):
        ring = _Ring.of(config, axis_name, sizes, tuple(mesh.axis_names), "contiguous",
                        q.shape[1])
        return ring, _segment_ids(q, k, ring, ids)

    if backward:
        def run(q, k, v, out, lse, dout, dlse, *ids):
            ring, (q_ext, kv_ext) = ring_for(q, k, ids)
            return _backward(q, k, v, q_ext, kv_ext, out, lse, dout, dlse, ring)
    else:
        def run(q, k, v, *ids):
            ring, (q_ext, kv_ext) = ring_for(q, k, ids)
            return _forward(q, k, v, q_ext, kv_ext, ring)
    return run
