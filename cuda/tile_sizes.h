// Forward tile shapes per head dim for SM80-class tensor cores (mma.sync), one line of reason each.
// Shared memory per CTA is kBlockM·d (Q) + 2·kBlockN·d (K, V) elements.
#pragma once

namespace jax_flash {

template <int kHeadDim> struct FwdTileSize;

// d ≤ 128: 128×64 with 4 warps of 32 query rows. Wider key tiles (128) spill the score tile at
// d 32-64 (measured 7% slower at d 64 on an H200); 8 warps double the shared-memory reads of K and V
// per MMA (measured 20% slower at d 64, 7% at d 128).
template <> struct FwdTileSize<32>  { static constexpr int kBlockM = 128, kBlockN = 64,  kNWarps = 4; };
template <> struct FwdTileSize<64>  { static constexpr int kBlockM = 128, kBlockN = 64,  kNWarps = 4; };
template <> struct FwdTileSize<96>  { static constexpr int kBlockM = 128, kBlockN = 64,  kNWarps = 4; };
template <> struct FwdTileSize<128> { static constexpr int kBlockM = 128, kBlockN = 64,  kNWarps = 4; };
// d ≥ 160: 8 warps of 16 query rows halve each thread's share of acc_o, avoiding spills.
template <> struct FwdTileSize<160> { static constexpr int kBlockM = 128, kBlockN = 64,  kNWarps = 8; };
template <> struct FwdTileSize<192> { static constexpr int kBlockM = 128, kBlockN = 64,  kNWarps = 8; };
template <> struct FwdTileSize<224> { static constexpr int kBlockM = 128, kBlockN = 64,  kNWarps = 8; };
template <> struct FwdTileSize<256> { static constexpr int kBlockM = 128, kBlockN = 64,  kNWarps = 8; };

}  // namespace jax_flash
