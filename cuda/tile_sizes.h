// Tile shapes per head dim for the SM80-class (mma.sync) kernels, forward and backward.
// Forward, one line of reason each.
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


// Backward tile shapes: kBlockN keys per CTA (dK and dV stay in registers), kBlockM queries per
// step, and how the 8 warps split each MMA (rows of S/dP, rows of dK/dV, rows of dQ).
// Accumulators per thread: 2·kBlockN·d/256 for dK and dV, which bounds kBlockN·d. Each MMA's
// warp tile must divide its shape: d 160 and 224 are multiples of 32, not 64, so 4 warps go along
// the rows of dK/dV and dQ there, leaving 32 columns of d per warp tile. Measured on an H200
// (SM90 variant, backward alone, bf16, 2026-11-30): d64 4k 4/4/4 274 TFLOP/s vs 4/2/2 251 and
// 64×128 tiles 211; d128 16k 2/4/2 311 vs 2/4/4 303, 4/4/2 296, 128×64 232; d256 4k all four
// grids within 213-215 except those with 4 warps along dK/dV rows (201).
template <int kHeadDim> struct BwdTileSize;
template <> struct BwdTileSize<32>  { static constexpr int kBlockM = 128, kBlockN = 128, kNWarps = 8, kWarpsMSdP = 4, kWarpsNdKV = 4, kWarpsMdQ = 4; };
template <> struct BwdTileSize<64>  { static constexpr int kBlockM = 128, kBlockN = 128, kNWarps = 8, kWarpsMSdP = 4, kWarpsNdKV = 4, kWarpsMdQ = 4; };
template <> struct BwdTileSize<96>  { static constexpr int kBlockM = 64,  kBlockN = 128, kNWarps = 8, kWarpsMSdP = 2, kWarpsNdKV = 4, kWarpsMdQ = 4; };
template <> struct BwdTileSize<128> { static constexpr int kBlockM = 64,  kBlockN = 128, kNWarps = 8, kWarpsMSdP = 2, kWarpsNdKV = 4, kWarpsMdQ = 2; };
template <> struct BwdTileSize<160> { static constexpr int kBlockM = 64,  kBlockN = 64,  kNWarps = 8, kWarpsMSdP = 4, kWarpsNdKV = 4, kWarpsMdQ = 4; };
template <> struct BwdTileSize<192> { static constexpr int kBlockM = 64,  kBlockN = 64,  kNWarps = 8, kWarpsMSdP = 4, kWarpsNdKV = 2, kWarpsMdQ = 2; };
template <> struct BwdTileSize<224> { static constexpr int kBlockM = 64,  kBlockN = 64,  kNWarps = 8, kWarpsMSdP = 4, kWarpsNdKV = 4, kWarpsMdQ = 4; };
template <> struct BwdTileSize<256> { static constexpr int kBlockM = 64,  kBlockN = 64,  kNWarps = 8, kWarpsMSdP = 4, kWarpsNdKV = 2, kWarpsMdQ = 2; };

}  // namespace jax_flash
