// The routed experts of one MoE layer on the CPU, as an XLA FFI custom call (deepseek_jax/cpu_experts.py).
//
// y[x] = sum_k weights[x, k] * (silu(x @ w1[e]) * (x @ w3[e])) @ w2[e],  e = experts[x, k]
// (paper Eq. 12-16's routed sum; official inference/model.py `Expert` and `MoE.forward`).
//
// Why a kernel of our own: decoding is bound by the bytes of expert weights a step reads, and XLA:CPU has no
// grouped GEMM. Its batched matmul over the experts multiplies every token by every expert (E / K times the
// work) and streams weights at about 12 GB/s on 2 cores at any row count, and a per-row weight gather copies
// each routed copy's weight. Here the copies are grouped by expert (a counting sort), and each expert that
// has rows is read once, straight from the stack, by one thread: its rows times w1 and w3, SwiGLU, times
// w2, one weight row streamed at a time against a register block of up to kZB rows. Experts are claimed from
// an atomic counter by the calling thread and by tasks on XLA's intra-op thread pool (the caller never waits
// on a task that has not claimed work, so a busy or one-thread pool cannot deadlock it). Each copy's output
// goes to its own row, and the gate-weighted sum over k runs after, in k order: the result does not depend
// on the thread count or on which thread ran which expert.
//
// Letters: X tokens, K experts per token, M = X K copies, E experts, D model width, I expert width, Z the rows
// of one expert. Expert ids outside [0, E) are copies computed elsewhere (expert parallelism): no rows, and
// no contribution.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// A 64-byte vector of floats (GCC / Clang vector extension: one zmm with AVX-512, two ymm with AVX2).
typedef float v16 __attribute__((vector_size(64), aligned(4)));
constexpr int kLanes = 16;
#if defined(__AVX512F__)
constexpr int kZB = 3, kNV = 8;  // 24 of the 32 vector registers accumulate 3 rows x 128 outputs
#else
constexpr int kZB = 3, kNV = 2;  // AVX2: 6 accumulators of two ymm each, 12 of the 16 registers
#endif

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) {  // bfloat16 bits
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline v16 load(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline v16 load(const uint16_t* p) {
  v16 v;
  for (int i = 0; i < kLanes; ++i) v[i] = to_float(p[i]);
  return v;
}
inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }

// out[z, :] = x[z, :] @ w for z < zb <= kZB: x [zb, a] and out [zb, o] row-major, w [a, o] row-major. Each
// block of kNV vectors of outputs streams w's rows once for the zb rows (held in registers).
template <typename W>
void rows_times(int zb, const float* x, const W* w, int64_t a, int64_t o, float* out) {
  const int64_t vectors = o / kLanes * kLanes;
  for (int64_t o0 = 0; o0 < vectors; o0 += kNV * kLanes) {
    const int nv = static_cast<int>(std::min<int64_t>(kNV, (vectors - o0) / kLanes));
    v16 acc[kZB][kNV];
    for (int z = 0; z < kZB; ++z)
      for (int v = 0; v < kNV; ++v) acc[z][v] = v16{};
    for (int64_t i = 0; i < a; ++i) {
      const W* row = w + i * o + o0;
      float xs[kZB];
      for (int z = 0; z < kZB; ++z) xs[z] = z < zb ? x[z * a + i] : 0.0f;
      for (int v = 0; v < kNV; ++v) {
        if (v >= nv) break;
        const v16 wv = load(row + v * kLanes);
        for (int z = 0; z < kZB; ++z) acc[z][v] += xs[z] * wv;
      }
    }
    for (int z = 0; z < zb; ++z)
      for (int v = 0; v < nv; ++v) store(out + z * o + o0 + v * kLanes, acc[z][v]);
  }
  for (int z = 0; z < zb; ++z)  // the last o % 16 outputs (widths that are not a multiple of 16)
    for (int64_t j = vectors; j < o; ++j) {
      float sum = 0.0f;
      for (int64_t i = 0; i < a; ++i) sum += x[z * a + i] * to_float(w[i * o + j]);
      out[z * o + j] = sum;
    }
}

template <typename A, typename B>
bool same(const A& a, const B& b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

struct Problem {
  const float* x;          // [X, D]
  const void* w1;          // [E, D, I]
  const void* w2;          // [E, I, D]
  const void* w3;          // [E, D, I]
  float* copies;           // [M, D]: each copy's expert output, before its gate weight
  int64_t k, d, i;
  std::vector<int32_t> start;        // item j's copies: order[start[j] .. start[j + 1])
  std::vector<int32_t> order;        // copy indices m = x K + k, grouped by expert
  std::vector<int32_t> item_expert;  // the expert of item j
};

template <typename W>
void run_expert(const Problem& p, int item) {
  const int64_t e = p.item_expert[item], d = p.d, n = p.i;
  const W* w1 = static_cast<const W*>(p.w1) + e * d * n;
  const W* w2 = static_cast<const W*>(p.w2) + e * n * d;
  const W* w3 = static_cast<const W*>(p.w3) + e * d * n;
  std::vector<float> x(kZB * d), gate(kZB * n), up(kZB * n), out(kZB * d);
  for (int r0 = p.start[item]; r0 < p.start[item + 1]; r0 += kZB) {
    const int zb = std::min(kZB, p.start[item + 1] - r0);
    for (int z = 0; z < zb; ++z) std::memcpy(&x[z * d], p.x + p.order[r0 + z] / p.k * d, d * sizeof(float));
    rows_times(zb, x.data(), w1, d, n, gate.data());
    rows_times(zb, x.data(), w3, d, n, up.data());
    for (int64_t j = 0; j < zb * n; ++j) gate[j] = gate[j] / (1.0f + std::exp(-gate[j])) * up[j];  // SwiGLU
    rows_times(zb, gate.data(), w2, n, d, out.data());
    for (int z = 0; z < zb; ++z) std::memcpy(p.copies + p.order[r0 + z] * d, &out[z * d], d * sizeof(float));
  }
}

// Shared by the caller and the pool tasks; a task that starts after the work is gone only reads `next`.
struct Work {
  Problem problem;
  void (*run)(const Problem&, int);
  int items = 0;
  std::atomic<int> next{0}, done{0};

  void drain() {
    for (int j = next.fetch_add(1); j < items; j = next.fetch_add(1)) {
      run(problem, j);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error RoutedExperts(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x_XD, ffi::Buffer<ffi::S32> experts_XK,
                         ffi::Buffer<ffi::F32> weights_XK, ffi::AnyBuffer w1, ffi::AnyBuffer w2,
                         ffi::AnyBuffer w3, ffi::ResultBuffer<ffi::F32> y_XD) {
  const auto xd = x_XD.dimensions(), xk = experts_XK.dimensions(), w1_dims = w1.dimensions();
  if (xd.size() != 2 || xk.size() != 2 || w1_dims.size() != 3 || xk[0] != xd[0] ||
      !same(weights_XK.dimensions(), xk) || w1_dims[1] != xd[1] || !same(w3.dimensions(), w1_dims) ||
      w2.dimensions().size() != 3 || w2.dimensions()[0] != w1_dims[0] || w2.dimensions()[1] != w1_dims[2] ||
      w2.dimensions()[2] != w1_dims[1])
    return ffi::Error::InvalidArgument(
        "routed_experts_cpu: want x [X, D], experts and weights [X, K], w1 and w3 [E, D, I], w2 [E, I, D]");
  const ffi::DataType dtype = w1.element_type();
  if (w2.element_type() != dtype || w3.element_type() != dtype ||
      (dtype != ffi::DataType::F32 && dtype != ffi::DataType::BF16))
    return ffi::Error::InvalidArgument("routed_experts_cpu: w1, w2 and w3 must all be float32 or all bfloat16");
  const int64_t n_x = xd[0], d = xd[1], k = xk[1], n_e = w1_dims[0], n_i = w1_dims[2], m = n_x * k;

  auto work = std::make_shared<Work>();
  Problem& p = work->problem;
  p.x = x_XD.typed_data();
  p.w1 = w1.untyped_data();
  p.w2 = w2.untyped_data();
  p.w3 = w3.untyped_data();
  p.k = k, p.d = d, p.i = n_i;
  std::vector<float> copies(m * d);
  p.copies = copies.data();
  work->run = dtype == ffi::DataType::F32 ? run_expert<float> : run_expert<uint16_t>;

  // Counting sort of the copies by expert (stable: copy order inside an expert).
  const int32_t* experts = experts_XK.typed_data();
  std::vector<int32_t> count(n_e + 1, 0);
  for (int64_t c = 0; c < m; ++c)
    if (experts[c] >= 0 && experts[c] < n_e) ++count[experts[c] + 1];
  for (int64_t e = 0; e < n_e; ++e) count[e + 1] += count[e];
  p.order.resize(count[n_e]);
  std::vector<int32_t> fill(count.begin(), count.end() - 1);
  for (int64_t c = 0; c < m; ++c)
    if (experts[c] >= 0 && experts[c] < n_e) p.order[fill[experts[c]]++] = static_cast<int32_t>(c);
  for (int64_t e = 0; e < n_e; ++e) {
    if (count[e + 1] == count[e]) continue;
    p.item_expert.push_back(static_cast<int32_t>(e));
    p.start.push_back(count[e]);
  }
  p.start.push_back(count[n_e]);
  work->items = static_cast<int>(p.item_expert.size());

  const int helpers = static_cast<int>(std::min<int64_t>(pool.num_threads(), work->items - 1));
  for (int t = 0; t < helpers; ++t) pool.Schedule([work] { work->drain(); });
  work->drain();
  while (work->done.load(std::memory_order_acquire) < work->items) std::this_thread::yield();

  // y[x] = sum_k weights[x, k] copies[x K + k], k in order; copies sent elsewhere add nothing.
  const float* weights = weights_XK.typed_data();
  float* y = y_XD->typed_data();
  std::fill(y, y + n_x * d, 0.0f);
  for (int64_t c = 0; c < m; ++c) {
    if (experts[c] < 0 || experts[c] >= n_e) continue;
    const float g = weights[c];
    const float* row = p.copies + c * d;
    float* out = y + c / k * d;
    for (int64_t j = 0; j < d; ++j) out[j] += g * row[j];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(deepseek_routed_experts_cpu, RoutedExperts,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
