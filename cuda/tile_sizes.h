// Forward tile shapes per head dim for SM80-class tensor cores (mma.sync), one line of reason each.
// Shared memory per CTA is kBlockM·d (Q) + 2·kBlockN·d (K, V) elements.
#pragma once

namespace jax_flash {

template <int kHeadDim> struct FwdTileSize;

// d ≤ 64: scores are cheap per key, so wide key tiles amortize the softmax and the loop overhead.
template <> struct FwdTileSize<32>  { static constexpr int kBlockM = 128, kBlockN = 128, kNWarps = 4; };
template <> struct FwdTileSize<64>  { static constexpr int kBlockM = 128, kBlockN = 128, kNWarps = 4; };
// d 96-128: 128×64 keeps acc_o (32 rows × d per warp) plus the score tile within 255 registers.
template <> struct FwdTileSize<96>  { static constexpr int kBlockM = 128, kBlockN = 64,  kNWarps = 4; };
template <> struct FwdTileSize<128> { static constexpr int kBlockM = 128, kBlockN = 64,  kNWarps = 4; };
// d ≥ 160: 8 warps of 16 query rows halve each thread's share of acc_o, avoiding spills.
template <> struct FwdTileSize<160> { static constexpr int kBlockM = 128, kBlockN = 64,  kNWarps = 8; };
template <> struct FwdTileSize<192> { static constexpr int kBlockM = 128, kBlockN = 64,  kNWarps = 8; };
template <> struct FwdTileSize<224> { static constexpr int kBlockM = 128, kBlockN = 64,  kNWarps = 8; };
template <> struct FwdTileSize<256> { static constexpr int kBlockM = 128, kBlockN = 64,  kNWarps = 8; };

}  // namespace jax_flash
