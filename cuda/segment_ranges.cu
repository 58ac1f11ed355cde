// See segment_ranges.h. Three launches over the tokens: reset the hash tables; record each run
// of equal ids (its first token inserts the segment, lowers `first` and counts the run; its last
// raises `last`), so a long segment costs a few atomics, not one per token; then one thread per
// query row and per key reads its segment's entry and cuts it by the band.
#include <algorithm>
#include <climits>

#include "segment_ranges.h"

namespace jax_flash {
namespace {

constexpr int kEmpty = -1;  // no key in this slot; segment ids >= 0 are the only keys
constexpr int kThreads = 256;

// Open-addressing table per batch row, capacity a power of two at least twice the tokens, so a
// free slot always exists. Arrays [batch][capacity] of key, first index, last index, and the
// number of runs of the segment's tokens (1: contiguous).
struct SegmentTable {
  int* keys;
  int* first;
  int* last;
  int* runs;
  int capacity;

  static __host__ __device__ int capacity_for(int seqlen) {
    int capacity = 2;
    while (capacity < 2 * seqlen) capacity *= 2;
    return capacity;
  }

  __host__ __device__ static SegmentTable at(int* base, int batch, int seqlen) {
    const int capacity = capacity_for(seqlen);
    const int64_t n = int64_t(batch) * capacity;
    return {base, base + n, base + 2 * n, base + 3 * n, capacity};
  }

  // Slots of batch row `batch` are [batch·capacity, (batch + 1)·capacity); probing is linear.
  __device__ int64_t home(int batch, int segment) const {
    const unsigned h = unsigned(segment) * 2654435761u;
    return int64_t(batch) * capacity + ((h ^ (h >> 15)) & unsigned(capacity - 1));
  }
  __device__ int64_t next(int batch, int64_t slot) const {
    const int64_t row = int64_t(batch) * capacity;
    return row + ((slot - row + 1) & (capacity - 1));
  }

  __device__ int64_t find_or_insert(int batch, int segment) {
    for (int64_t slot = home(batch, segment);; slot = next(batch, slot)) {
      const int previous = atomicCAS(keys + slot, kEmpty, segment);
      if (previous == kEmpty || previous == segment) return slot;
    }
  }
  // -1 when the segment has no token on this side. Runs after every insertion finished.
  __device__ int64_t find(int batch, int segment) const {
    for (int64_t slot = home(batch, segment);; slot = next(batch, slot)) {
      if (keys[slot] == segment) return slot;
      if (keys[slot] == kEmpty) return -1;
    }
  }
};

__global__ void reset_tables(SegmentTable kv, SegmentTable q, int batch) {
  const int64_t kv_slots = int64_t(batch) * kv.capacity, slots = kv_slots + int64_t(batch) * q.capacity;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < slots; t += int64_t(gridDim.x) * blockDim.x) {
    const bool is_key = t < kv_slots;
    const int64_t slot = is_key ? t : t - kv_slots;
    (is_key ? kv.keys : q.keys)[slot] = kEmpty;
    (is_key ? kv.first : q.first)[slot] = INT_MAX;
    (is_key ? kv.last : q.last)[slot] = -1;
    (is_key ? kv.runs : q.runs)[slot] = 0;
  }
}

__global__ void insert_runs(SegmentRangesParams p, SegmentTable kv, SegmentTable q) {
  const int64_t kv_tokens = int64_t(p.batch) * p.seqlen_k, tokens = kv_tokens + int64_t(p.batch) * p.seqlen_q;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < tokens; t += int64_t(gridDim.x) * blockDim.x) {
    const bool is_key = t < kv_tokens;
    const int seqlen = is_key ? p.seqlen_k : p.seqlen_q;
    const int64_t flat = is_key ? t : t - kv_tokens;
    const int batch = int(flat / seqlen), index = int(flat % seqlen);
    const int* ids = is_key ? p.kv_ids : p.q_ids;
    const int segment = ids[flat];
    const bool run_begins = index == 0 || ids[flat - 1] != segment;
    const bool run_ends = index == seqlen - 1 || ids[flat + 1] != segment;
    if (segment < 0 || !(run_begins || run_ends)) continue;
    SegmentTable table = is_key ? kv : q;
    const int64_t slot = table.find_or_insert(batch, segment);
    if (run_begins) {
      atomicMin(table.first + slot, index);
      atomicAdd(table.runs + slot, 1);
    }
    if (run_ends) atomicMax(table.last + slot, index);
  }
}

// First k in [begin, end) with values[k] >= target (strict: > target), end if none; values
// non-decreasing on [begin, end).
__device__ int bisect(const int* values, int begin, int end, long long target, bool strict) {
  while (begin < end) {
    const int mid = begin + (end - begin) / 2;
    const bool below = strict ? values[mid] <= target : values[mid] < target;
    if (below) begin = mid + 1; else end = mid;
  }
  return begin;
}

// The tokens [lo, hi) of a segment's run [first, last_plus) whose coordinate lies within
// [center − before, center + after] (before, after < 0: unbounded): by index arithmetic, or by
// bisecting the positions `pos` when given.
__device__ int2 cut(int first, int last_plus, const int* pos, long long center, int before, int after) {
  long long lo = first, hi = last_plus;
  if (pos == nullptr) {
    if (before >= 0) lo = max(lo, center - before);
    if (after >= 0) hi = min(hi, center + after + 1);
  } else {
    if (before >= 0) lo = bisect(pos, first, last_plus, center - before, false);
    if (after >= 0) hi = bisect(pos, first, last_plus, center + after, true);
  }
  return lo < hi ? make_int2(int(lo), int(hi)) : make_int2(0, 0);
}

__global__ void build_ranges(SegmentRangesParams p, SegmentTable kv, SegmentTable q) {
  const int64_t rows = int64_t(p.batch) * p.seqlen_q, tokens = rows + int64_t(p.batch) * p.seqlen_k;
  const int shift = p.seqlen_k - p.seqlen_q;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < tokens; t += int64_t(gridDim.x) * blockDim.x) {
    if (t < rows) {  // query row i sees keys j with pos_j − pos_i ∈ [−left, right]
      const int batch = int(t / p.seqlen_q), i = int(t % p.seqlen_q);
      const int segment = p.q_ids[t];
      int4 range = make_int4(0, 0, 1, segment);
      const int64_t slot = segment < 0 ? -1 : kv.find(batch, segment);
      if (slot >= 0) {
        const int first = kv.first[slot], last_plus = kv.last[slot] + 1;
        const int* pos = p.kv_pos == nullptr ? nullptr : p.kv_pos + int64_t(batch) * p.seqlen_k;
        const long long center = p.q_pos == nullptr ? (long long)i + shift : p.q_pos[t];
        const int2 keys = cut(first, last_plus, pos, center, p.window_left, p.window_right);
        const bool contiguous = kv.runs[slot] == 1;
        if (keys.x < keys.y) range = make_int4(keys.x, keys.y, contiguous ? 1 : 0, segment);
      }
      p.row_ranges[t] = range;
    } else {  // key j is seen by queries i with pos_i − pos_j ∈ [−right, left]
      const int64_t flat = t - rows;
      const int batch = int(flat / p.seqlen_k), j = int(flat % p.seqlen_k);
      const int segment = p.kv_ids[flat];
      int2 range = make_int2(0, 0);
      const int64_t slot = segment < 0 ? -1 : q.find(batch, segment);
      if (slot >= 0) {
        const int* pos = p.q_pos == nullptr ? nullptr : p.q_pos + int64_t(batch) * p.seqlen_q;
        const long long center = p.kv_pos == nullptr ? (long long)j - shift : p.kv_pos[flat];
        range = cut(q.first[slot], q.last[slot] + 1, pos, center, p.window_right, p.window_left);
      }
      p.key_ranges[flat] = range;
    }
  }
}

int blocks_for(int64_t items) {
  return int(std::min<int64_t>((items + kThreads - 1) / kThreads, 65535));
}

}  // namespace

int64_t segment_ranges_workspace_ints(int batch, int seqlen_q, int seqlen_k) {
  return 4 * int64_t(batch) * (SegmentTable::capacity_for(seqlen_k) + SegmentTable::capacity_for(seqlen_q));
}

cudaError_t run_segment_ranges(const SegmentRangesParams& params, cudaStream_t stream) {
  const SegmentTable kv = SegmentTable::at(params.workspace, params.batch, params.seqlen_k);
  const SegmentTable q = SegmentTable::at(params.workspace + 4 * int64_t(params.batch) * kv.capacity,
                                          params.batch, params.seqlen_q);
  const int64_t slots = int64_t(params.batch) * (kv.capacity + q.capacity);
  const int64_t tokens = int64_t(params.batch) * (params.seqlen_q + params.seqlen_k);
  reset_tables<<<blocks_for(slots), kThreads, 0, stream>>>(kv, q, params.batch);
  insert_runs<<<blocks_for(tokens), kThreads, 0, stream>>>(params, kv, q);
  build_ranges<<<blocks_for(tokens), kThreads, 0, stream>>>(params, kv, q);
  return cudaGetLastError();
}

}  // namespace jax_flash
