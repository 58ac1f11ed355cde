// The warpgroups of the Hopper kernels: the first, the producer, issues the TMA loads (one thread)
// and gives its registers to the others with setmaxnreg; the two consumers run wgmma and the
// softmax.
#pragma once

namespace jax_flash {

struct Sm90WarpRoles {
  static constexpr int kMmaWarpGroups = 2;
  static constexpr int kNThreads = 128 * (kMmaWarpGroups + 1);
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
  static_assert(128 * (kMmaWarpGroups * kConsumerRegs + kProducerRegs) <= 64 * 1024, "more registers than an SM has");
};

}  // namespace jax_flash
