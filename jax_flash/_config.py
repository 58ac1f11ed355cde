"""Static options of one attention call, held together so primitives carry a single hashable param."""

import dataclasses

# None picks the kernel when it can run and the XLA path otherwise.
IMPLEMENTATIONS = (None, "cuda", "xla")


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """What flash_attention was asked for, after defaults are resolved.

    causal: key j is visible to query i iff j <= i + seqlen_k - seqlen_q (bottom-right aligned).
    softmax_scale: multiplies q·k before the softmax; resolved from the original head_dim.
    implementation: one of IMPLEMENTATIONS.
    deterministic: the backward must be bitwise reproducible (the CUDA backward kernel then
      reduces dq in a fixed order instead of with atomics); the forward ignores it.
    window_size: (left, right); key j is visible to query i iff
      i + sk - sq - left <= j <= i + sk - sq + right, -1 leaving that side unbounded.
    softcap: > 0 turns the scaled scores s into softcap · tanh(s / softcap); 0 leaves them.
    dropout_rate: the probability of dropping each attention probability; 0 draws nothing.
    has_alibi_slopes, has_mask, has_bias: whether these extra operands follow q, k, v (see
      extra_operand_names); a dropout_seed operand follows them iff dropout_rate > 0.
    has_segment_ids: q_segment_ids and kv_segment_ids follow (see _segments): a query sees only
      keys of its own segment, and negative ids are padding.
    bias_grad: the backward returns dbias (with a bias). The backward primitive's DCE rule turns
      it off when nothing uses dbias, so that a bias that is not differentiated costs the
      backward no gradient work; the forward ignores it.
    has_positions: q_positions and kv_positions follow: per-token positions that replace
      i + seqlen_k - seqlen_q and j in causal, window_size and ALiBi (flash_attention_varlen's
      per-sequence alignment, ring attention's global positions). The kernels' ranges
      (_kernel_ranges) then need positions non-decreasing over each segment's extent, which
      both guarantee.
    """

    causal: bool
    softmax_scale: float
    implementation: str | None
    deterministic: bool = False
    window_size: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    dropout_rate: float = 0.0
    has_alibi_slopes: bool = False
    has_mask: bool = False
    has_bias: bool = False
    has_segment_ids: bool = False
    has_positions: bool = False
    bias_grad: bool = True

    def extra_operand_names(self) -> tuple[str, ...]:
        """The primitives' operands after q, k, v (and the backward's out, lse, dout, dlse), in
        their fixed order: alibi_slopes, mask, bias, q_segment_ids, kv_segment_ids, q_positions,
        kv_positions, dropout_seed, each only when in use."""
        present = (self.has_alibi_slopes, self.has_mask, self.has_bias, self.has_segment_ids,
                   self.has_segment_ids, self.has_positions, self.has_positions,
                   self.dropout_rate > 0)
        names = ("alibi_slopes", "mask", "bias", "q_segment_ids", "kv_segment_ids",
                 "q_positions", "kv_positions", "dropout_seed")
        return tuple(name for name, used in zip(names, present) if used)

    def features(self) -> tuple[str, ...]:
        """The options beyond plain and causal attention this call uses, by argument name."""
        used = [name for name in ("alibi_slopes", "mask", "bias") if getattr(self, "has_" + name)]
        if self.has_positions:  # varlen's positions, or ring attention's: the kernels run both
            used.append("flash_attention_varlen")
        elif self.has_segment_ids:
            used.append("segment_ids")
        if self.window_size != (-1, -1):
            used.append("window_size")
        if self.softcap:
            used.append("softcap")
        if self.dropout_rate:
            used.append("dropout_rate")
        return tuple(used)
