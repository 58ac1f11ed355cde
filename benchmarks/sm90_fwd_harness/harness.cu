// Standalone check of the SM90 forward against the SM80 forward: same random inputs, compare out
// and lse, time both. usage: harness D SEQ_Q SEQ_K BATCH HEADS HEADS_K CAUSAL(0/1) WINDOW_LEFT
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <cmath>
#include <cuda_runtime.h>
#include <cutlass/numeric_types.h>
#include "flash_fwd_launch_template.h"
#include "flash_fwd_sm90_launch_template.h"
using namespace jax_flash;
using T = cutlass::bfloat16_t;
#define CK(...) do { cudaError_t e = (__VA_ARGS__); if (e != cudaSuccess) { printf("CUDA %s at %d\n", cudaGetErrorString(e), __LINE__); exit(1);} } while (0)

template <int D> int run(int sq, int sk, int b, int h, int hk, int causal, int wl) {
  size_t nq = size_t(b) * sq * h * D, nk = size_t(b) * sk * hk * D;
  std::vector<T> hq(nq), hk_(nk), hv(nk);
  srand(1);
  auto rnd = [] { return T(float(rand()) / RAND_MAX * 2.f - 1.f); };
  for (auto& x : hq) x = rnd(); for (auto& x : hk_) x = rnd(); for (auto& x : hv) x = rnd();
  T *q, *k, *v, *o1, *o2; float *l1, *l2;
  CK(cudaMalloc(&q, nq * 2)); CK(cudaMalloc(&k, nk * 2)); CK(cudaMalloc(&v, nk * 2));
  CK(cudaMalloc(&o1, nq * 2)); CK(cudaMalloc(&o2, nq * 2));
  CK(cudaMalloc(&l1, size_t(b) * h * sq * 4)); CK(cudaMalloc(&l2, size_t(b) * h * sq * 4));
  CK(cudaMemcpy(q, hq.data(), nq * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(k, hk_.data(), nk * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(v, hv.data(), nk * 2, cudaMemcpyHostToDevice));
  CK(cudaMemset(o1, 0xff, nq * 2)); CK(cudaMemset(o2, 0xff, nq * 2));  // NaN poison
  CK(cudaMemset(l1, 0xff, size_t(b) * h * sq * 4)); CK(cudaMemset(l2, 0xff, size_t(b) * h * sq * 4));
  FlashFwdParams p{};
  p.q = q; p.k = k; p.v = v; p.lse = l1; p.out = o1;
  p.q_row_stride = h * D; p.q_head_stride = D; p.q_batch_stride = int64_t(sq) * h * D;
  p.k_row_stride = hk * D; p.k_head_stride = D; p.k_batch_stride = int64_t(sk) * hk * D;
  p.v_row_stride = hk * D; p.v_head_stride = D; p.v_batch_stride = int64_t(sk) * hk * D;
  p.out_row_stride = h * D; p.out_head_stride = D; p.out_batch_stride = int64_t(sq) * h * D;
  p.batch = b; p.seqlen_q = sq; p.seqlen_k = sk; p.num_heads = h; p.num_heads_k = hk; p.head_dim = D;
  p.softmax_scale = 1.f / sqrtf(D); p.logit_scale = p.softmax_scale; p.softcap = 0;
  p.window_left = wl; p.window_right = causal ? 0 : -1; p.dtype = DType::kBFloat16;
  FlashFwdParams p2 = p; p2.out = o2; p2.lse = l2;
  CK(run_flash_fwd_hdim<D, T>(p, 0));
  CK(run_flash_fwd_sm90_hdim<D, T>(p2, 0));
  CK(cudaDeviceSynchronize());
  std::vector<T> r1(nq), r2(nq); std::vector<float> s1(size_t(b) * h * sq), s2(s1.size());
  CK(cudaMemcpy(r1.data(), o1, nq * 2, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(r2.data(), o2, nq * 2, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(s1.data(), l1, s1.size() * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(s2.data(), l2, s2.size() * 4, cudaMemcpyDeviceToHost));
  double dmax = 0, lmax = 0; size_t bad = 0;
  for (size_t i = 0; i < nq; ++i) { float a = float(r1[i]), c = float(r2[i]); if (!(std::fabs(a - c) <= 1e30)) ++bad; else dmax = std::max(dmax, double(std::fabs(a - c))); }
  for (size_t i = 0; i < s1.size(); ++i) { float a = s1[i], c = s2[i]; if (a == c) continue; if (!(std::fabs(a - c) <= 1e30)) ++bad; else lmax = std::max(lmax, double(std::fabs(a - c))); }
  double flops = 4.0 * b * h * double(sq) * sk * D;
  if (causal) flops /= 2;  // approximate for square
  auto time = [&](auto fn) {
    cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
    for (int i = 0; i < 3; ++i) fn();
    std::vector<float> ms;
    for (int i = 0; i < 15; ++i) { cudaEventRecord(e0); for (int j = 0; j < 5; ++j) fn(); cudaEventRecord(e1); cudaEventSynchronize(e1); float t; cudaEventElapsedTime(&t, e0, e1); ms.push_back(t / 5); }
    std::sort(ms.begin(), ms.end()); return ms[ms.size() / 2];
  };
  float t1 = time([&] { run_flash_fwd_hdim<D, T>(p, 0); });
  float t2 = time([&] { run_flash_fwd_sm90_hdim<D, T>(p2, 0); });
  CK(cudaDeviceSynchronize());
  printf("d%d sq%d sk%d b%d h%d/%d causal%d wl%d | max|dO| %.3g max|dlse| %.3g nonfinite %zu | sm80 %.3f ms %.1f TF | sm90 %.3f ms %.1f TF\n",
         D, sq, sk, b, h, hk, causal, wl, dmax, lmax, bad, t1, flops / t1 / 1e9, t2, flops / t2 / 1e9);
  cudaFree(q); cudaFree(k); cudaFree(v); cudaFree(o1); cudaFree(o2); cudaFree(l1); cudaFree(l2);
  return 0;
}

int main(int argc, char** argv) {
  int d = atoi(argv[1]), sq = atoi(argv[2]), sk = atoi(argv[3]), b = atoi(argv[4]), h = atoi(argv[5]), hk = atoi(argv[6]),
      causal = atoi(argv[7]), wl = argc > 8 ? atoi(argv[8]) : -1;
  if (d != HARNESS_D) return 1;
  return run<HARNESS_D>(sq, sk, b, h, hk, causal, wl);
}
