"""Sharding rules of the primitives: inputs sharded over batch and heads run where they lie.

Under jax.jit with sharded inputs, each primitive's lowering wraps its single-device computation
(the kernel call or the blockwise XLA path) in jax.experimental.custom_partitioning. Both of
JAX's partitioners get the same answer from one policy here: Shardy through an einsum-like
`sharding_rule`, GSPMD through `infer_sharding_from_operands`; both then call `partition`, which
fixes every operand's and result's sharding and runs the single-device computation on each shard.

The policy, read off one table of which dimension of each operand and result is what:
  - batch is split over whichever mesh axes split it;
  - heads are split only over mesh axes whose total size divides the number of kv heads, so
    every device holds whole groups of query heads together with the kv head they read (query
    head i reads kv head i // (heads // kv_heads)); otherwise heads are gathered;
  - a sequence split over mesh axes that batch and heads leave free runs as ring attention
    over those axes (see _ring.partitioned_ring): each device keeps its contiguous slice of q
    and k, the key/value slices travel with collective-permutes, and masks are taken in global
    positions. The ring takes plain, causal, window_size, segment ids and softcap, and needs
    both seqlens divisible by the axes' size (and equal under causal or window_size); any other
    sequence split (ALiBi, mask, bias, dropout, varlen) is gathered, as each query needs every
    key;
  - head_dim is gathered;
  - a gradient of an operand broadcast along a split dimension (a bias shared by the batch) is
    summed over the devices that split it, as broadcasting's gradient is;
  - with dropout, heads are gathered (its mask depends on the head index).
Batch- and head-sharded inputs thus compile to a program with no collectives at all, a
sequence split to collective-permutes only, and any other sharding is gathered explicitly by
the partitioner: slower, never wrong.

Inside shard_map (all axes manual), pmap and on one device, there is nothing to partition:
lower_partitioned lowers the single-device computation directly.
"""

import math

from jax._src import dispatch, sharding_impls
import jax
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.interpreters import mlir
from jax.sharding import NamedSharding, PartitionSpec

from jax_flash._config import FlashConfig

BATCH = "batch"
SEQLEN_Q = "seqlen_q"
SEQLEN_K = "seqlen_k"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
SEED = "seed"  # the two uint32 words of a dropout seed
SEQLEN = "seqlen"  # the role of SEQLEN_Q and SEQLEN_K together when the ring splits them

# The dimensions of every operand and result of the primitives, by name. An operand added to a
# primitive gets a line here, and its lowering passes the name (see lower_partitioned). Operands
# that broadcast (mask, bias) drop leading dimensions or have size 1 in some: those are matched
# from the right, as in NumPy, and a dimension of size 1 is never split.
DIMS = {
    "q": (BATCH, SEQLEN_Q, HEADS, HEAD_DIM),
    "k": (BATCH, SEQLEN_K, KV_HEADS, HEAD_DIM),
    "v": (BATCH, SEQLEN_K, KV_HEADS, HEAD_DIM),
    "out": (BATCH, SEQLEN_Q, HEADS, HEAD_DIM),
    "lse": (BATCH, HEADS, SEQLEN_Q),
    "dout": (BATCH, SEQLEN_Q, HEADS, HEAD_DIM),
    "dlse": (BATCH, HEADS, SEQLEN_Q),
    "dq": (BATCH, SEQLEN_Q, HEADS, HEAD_DIM),
    "dk": (BATCH, SEQLEN_K, KV_HEADS, HEAD_DIM),
    "dv": (BATCH, SEQLEN_K, KV_HEADS, HEAD_DIM),
    "alibi_slopes": (BATCH, HEADS),
    "mask": (BATCH, HEADS, SEQLEN_Q, SEQLEN_K),
    "bias": (BATCH, HEADS, SEQLEN_Q, SEQLEN_K),
    "q_segment_ids": (BATCH, SEQLEN_Q),
    "kv_segment_ids": (BATCH, SEQLEN_K),
    "q_positions": (BATCH, SEQLEN_Q),
    "kv_positions": (BATCH, SEQLEN_K),
    "dropout_seed": (BATCH, SEED),
    "dbias": (BATCH, HEADS, SEQLEN_Q, SEQLEN_K),
    "dalibi_slopes": (BATCH, HEADS),
}

# Dimensions every device holds whole (the seqlens unless the ring takes them).
_GATHERED = (SEQLEN_Q, SEQLEN_K, HEAD_DIM, SEED)

# Shardy factor names. With grouped-query attention, query heads and kv heads are two factors:
# Shardy may propose any split of either, and partition() keeps the groups together. (A compound
# factor, query head = (kv head, index in group), would let Shardy cut a mesh axis into sub-axes
# that no PartitionSpec can name.)
_FACTORS = {BATCH: "b", SEQLEN_Q: "sq", SEQLEN_K: "sk", HEAD_DIM: "d", HEADS: "h",
            KV_HEADS: "hk", SEED: "seed"}


def needs_devices_when_lowering(primitive) -> None:
    """custom_partitioning needs the device assignment while lowering; JAX passes it only for
    primitives registered here (a private registry, the one custom_partitioning itself uses)."""
    dispatch.prim_requires_devices_during_lowering.add(primitive)


def lower_partitioned(ctx, local_fn, operands, *, operand_names, result_names,
                      config: FlashConfig):
    """Lowers `local_fn(*operands)`, the single-device computation, with the sharding rules.

    operand_names and result_names name each operand and result as in DIMS; the lowering
    context's abstract values give their shapes. config: the primitive's, which a sequence
    split runs as a ring.
    """
    # local_fn is traced afresh here, on shapes and dtypes alone: how its operands vary over
    # shard_map's manual axes was checked when the primitive was bound, and its own scans start
    # from constants that do not vary.
    ctx = ctx.replace(avals_in=[jax.core.ShapedArray(a.shape, a.dtype) for a in ctx.avals_in])
    if not _partitioned_context(ctx):
        return mlir.lower_fun(local_fn, multiple_results=True)(ctx, *operands)
    layouts = _Layouts(ctx.avals_in, operand_names, ctx.avals_out, result_names, config)
    # custom_partitioning reads the signature; local_fn may be a partial with keyword arguments.
    partitioned = custom_partitioning(lambda *xs: tuple(local_fn(*xs)))
    partitioned.def_partition(
        partition=lambda mesh, arg_shapes, result_shape: _partition(
            local_fn, layouts, mesh, arg_shapes),
        infer_sharding_from_operands=lambda mesh, arg_shapes, result_shape: (
            _result_shardings(layouts, mesh, arg_shapes)),
        sharding_rule=layouts.shardy_rule(),
        need_replication_factors=layouts.shardy_gathered_factors(),
    )
    return mlir.lower_fun(partitioned, multiple_results=True)(ctx, *operands)


def result_aval(operand, operand_name: str, result_name: str, dtype):
    """The abstract value of a result shaped after `operand` dimension by dimension, as DIMS
    names them (lse after q, dk after k): with the operand's explicit sharding and its variation
    over shard_map's manual axes, which shard_map checks."""
    spec = tuple(operand.sharding.spec) + (None,) * (operand.ndim - len(operand.sharding.spec))
    operand_dims = _dims_of(operand_name, operand)
    # A gradient keeps its operand's dimensions, broadcast ones included.
    result_dims = operand_dims if DIMS[result_name] == DIMS[operand_name] else DIMS[result_name]
    by_dim = dict(zip(operand_dims, zip(operand.shape, spec)))
    shape, spec = zip(*(by_dim[dim] for dim in result_dims)) if result_dims else ((), ())
    sharding = NamedSharding(operand.sharding.mesh, PartitionSpec(*spec))
    return operand.update(shape=shape, dtype=dtype, weak_type=False, sharding=sharding)


def _partitioned_context(ctx) -> bool:
    """Whether XLA will partition this computation over several devices: jit over a mesh, or a
    shard_map that leaves some mesh axes to the partitioner. One device, pmap and a fully manual
    shard_map run the computation as it is."""
    context = ctx.module_context.axis_context
    if isinstance(context, sharding_impls.ShardingContext):
        return context.num_devices > 1
    if isinstance(context, sharding_impls.SPMDAxisContext):
        return set(context.manual_axes) != set(context.mesh.axis_names)
    return False


def _dims_of(name, aval) -> tuple[str, ...]:
    """The names of `aval`'s dimensions, matched to DIMS[name] from the right."""
    if name not in DIMS:
        raise NotImplementedError(
            f"jax-flash: no sharding rule knows the operand {name!r}; name its dimensions in "
            "jax_flash/_sharding.py DIMS")
    return DIMS[name][len(DIMS[name]) - len(aval.shape):]


class _Layouts:
    """Each operand's and result's dimensions as DIMS names them (None: a broadcast dimension of
    size 1), and the size of each named dimension."""

    def __init__(self, avals_in, operand_names, avals_out, result_names, config: FlashConfig):
        named_in = [(_dims_of(name, aval), aval.shape) for name, aval in
                    zip(operand_names, avals_in, strict=True)]
        self.sizes = {}
        for dims, shape in named_in:
            for dim, size in zip(dims, shape):
                self.sizes[dim] = max(self.sizes.get(dim, 1), size)
        self.operands = tuple(self._broadcast(dims, shape) for dims, shape in named_in)
        named_out = [(_dims_of(name, aval), aval.shape) for name, aval in
                     zip(result_names, avals_out, strict=True)]
        self.results = tuple(self._broadcast(dims, shape) for dims, shape in named_out)
        # The gradient of an operand broadcast along a split dimension (a bias shared by the
        # batch) is a sum over that dimension: each device holds a part of it.
        self.results_summed_over = tuple(
            {HEADS if dim == KV_HEADS else dim for dim, kept in zip(dims, layout) if kept is None}
            for (dims, _), layout in zip(named_out, self.results))
        self.group_size = self.sizes[HEADS] // self.sizes[KV_HEADS]
        # Dropout draws its mask from the seed and the head index, which a device holding a
        # slice of the heads would count from 0: every slice would drop the same entries.
        self.heads_splittable = SEED not in self.sizes
        self.backward = "dq" in result_names
        # The config a sequence split runs as a ring, or None: the sequence is gathered.
        self.ring_config = config if self._ring_can_run(config) else None

    def _ring_can_run(self, config: FlashConfig) -> bool:
        from jax_flash._ring import ring_takes  # _ring imports the primitives, which import us

        if not ring_takes(config):
            return False
        # Causal and window masks in global positions need one length on both sides.
        banded = config.causal or config.window_size != (-1, -1)
        return not banded or self.sizes[SEQLEN_Q] == self.sizes[SEQLEN_K]

    def _broadcast(self, dims, shape):
        return tuple(None if size == 1 < self.sizes[dim] else dim
                     for dim, size in zip(dims, shape))

    # -- Shardy --

    def shardy_rule(self) -> str:
        """E.g. "b sq h d, b sk h d, b sk h d -> b sq h d, b h sq" for the plain forward."""
        factors = {**_FACTORS, KV_HEADS: "hk" if self.group_size > 1 else "h"}
        fresh = iter(f"one{i}" for i in range(1000))  # a size-1 dimension is its own factor

        def mapping(layouts):
            return ", ".join(" ".join(factors[dim] if dim else next(fresh) for dim in dims)
                             for dims in layouts)

        return f"{mapping(self.operands)} -> {mapping(self.results)}"

    def shardy_gathered_factors(self) -> tuple[str, ...]:
        # Shardy wants these in the order the rule first names them.
        gathered = {_FACTORS[dim] for dim in _GATHERED
                    if self.ring_config is None or dim not in (SEQLEN_Q, SEQLEN_K)}
        if not self.heads_splittable:
            gathered |= {_FACTORS[HEADS], _FACTORS[KV_HEADS]}
        tokens = self.shardy_rule().replace("(", " ").replace(")", " ").replace(",", " ").split()
        return tuple(dict.fromkeys(token for token in tokens if token in gathered))


# ---- the policy, for GSPMD and for partition --------------------------------------------------

def _normalized(entry) -> tuple:
    """A PartitionSpec entry as a tuple of mesh axis names."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _role(dim) -> str:
    """What a dimension is split as: kv heads with the query heads, both seqlens by the ring."""
    return HEADS if dim == KV_HEADS else SEQLEN if dim in (SEQLEN_Q, SEQLEN_K) else dim


# The dimensions whose sizes the mesh axes splitting each role must divide.
_COUNTED = {BATCH: (BATCH,), HEADS: (KV_HEADS,), SEQLEN: (SEQLEN_Q, SEQLEN_K)}


def _split_axes(layouts, mesh, arg_shapes) -> dict | None:
    """The mesh axes that split batch, heads and (through the ring) the sequence, {BATCH: axes,
    HEADS: axes, SEQLEN: axes}, each taken from the first operand that splits that dimension in
    a way the policy allows; None where shardings carry no mesh axis names."""
    if not all(isinstance(a.sharding, NamedSharding) for a in arg_shapes):
        return None
    split = {BATCH: (), HEADS: (), SEQLEN: ()}
    used = set()
    for dims, arg in zip(layouts.operands, arg_shapes):
        spec = tuple(arg.sharding.spec) + (None,) * (arg.ndim - len(arg.sharding.spec))
        for dim, entry in zip(dims, spec):
            role = _role(dim)
            axes = _normalized(entry)
            if role not in split or split[role] or not axes or used & set(axes):
                continue
            if role == HEADS and not layouts.heads_splittable:
                continue
            if role == SEQLEN and layouts.ring_config is None:
                continue
            # Whole batch rows, whole kv head groups and equal slices of both seqlens on each
            # device: the split must be even.
            size = math.prod(mesh.shape[axis] for axis in axes)
            if role == SEQLEN and size == 1:  # nothing to pass around
                continue
            if all(layouts.sizes[dim] % size == 0 for dim in _COUNTED[role]):
                split[role] = axes
                used |= set(axes)
    return split


def _sharding(mesh, dims, split) -> NamedSharding:
    spec = []
    for dim in dims:
        axes = split.get(_role(dim), ())
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return NamedSharding(mesh, PartitionSpec(*spec))


def _result_shardings(layouts, mesh, arg_shapes):
    split = _split_axes(layouts, mesh, arg_shapes)
    if split is None:
        return tuple(_replicated(arg_shapes) for _ in layouts.results)
    return tuple(_sharding(mesh, dims, split) for dims in layouts.results)


def _partition(local_fn, layouts, mesh, arg_shapes):
    split = _split_axes(layouts, mesh, arg_shapes)
    if split is None:
        return (mesh, local_fn, tuple(_replicated(arg_shapes) for _ in layouts.results),
                tuple(_replicated(arg_shapes) for _ in layouts.operands))
    sum_axes = [tuple(axis for dim in dims for axis in split.get(dim, ()))
                for dims in layouts.results_summed_over]
    if split[SEQLEN]:
        from jax_flash._ring import partitioned_ring  # see _Layouts._ring_can_run

        local_fn = partitioned_ring(layouts.ring_config, mesh, split[SEQLEN], layouts.backward)

    def per_device(*operands):
        results = local_fn(*operands)
        return tuple(lax.psum(x, axes) if axes else x for x, axes in zip(results, sum_axes))

    return (mesh, per_device if any(sum_axes) else local_fn,
            tuple(_sharding(mesh, dims, split) for dims in layouts.results),
            tuple(_sharding(mesh, dims, split) for dims in layouts.operands))


def _replicated(arg_shapes):
    """Shardings without a mesh (GSPMD's own, when no NamedSharding was given): the
    computation runs whole on every device."""
    sharding = arg_shapes[0].sharding
    return sharding.get_replicated(sharding._device_assignment)
