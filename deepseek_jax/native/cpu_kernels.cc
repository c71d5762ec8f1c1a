// Decode-sized matmuls on the CPU as XLA FFI custom calls (deepseek_jax/cpu_kernels.py): a projection
// x @ w, and the routed experts of one MoE layer,
//   y[x] = sum_k weights[x, k] * (silu(x @ w1[e]) * (x @ w3[e])) @ w2[e],  e = experts[x, k]
// (paper Eq. 12-16's routed sum; official inference/model.py `Expert` and `MoE.forward`).
//
// Why kernels of our own: a decode step is bound by the bytes of weights it reads, and XLA:CPU's matmuls
// with a few rows run far below the memory's speed (its dots stream a weight at 6-14 GB/s on 2 cores with
// 2-16 rows, where one core reads memory at about 20 GB/s and its L2 at 100), and it has no grouped GEMM:
// its batched matmul over the experts multiplies every token by every expert (E / K times the work), a
// per-row weight gather copies a weight per routed copy. Here each weight row is loaded once into vector
// registers and multiplied into up to kMaxZB token rows held as accumulators (more rows: another pass over
// the same block of columns, from L2); the routed copies are grouped by expert (a counting sort) and each
// expert with rows is read once, straight from its stack.
//
// Work (column blocks, or experts) is claimed from an atomic counter by the calling thread and by tasks on
// XLA's intra-op thread pool; the caller waits only for work a thread has claimed, so a busy or one-thread
// pool cannot deadlock it. Every output element is computed by one thread in a fixed order (the experts'
// gate-weighted sum runs after, in k order), so the bits never depend on the threads.
//
// Letters: X rows (tokens), A / O a weight's input / output features, K experts per token, M = X K routed
// copies, E experts, D model width, I expert width, Z the rows of one expert. Expert ids outside [0, E) are
// copies computed elsewhere (expert parallelism): no rows, and no contribution.

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
constexpr int kAccumulators = 24, kMaxZB = 6;  // 24 of the 32 zmm registers hold sums
#else
constexpr int kAccumulators = 6, kMaxZB = 3;  // 6 vectors = 12 of the 16 ymm registers
#endif
constexpr int64_t kColumnBlock = 128;  // a projection's unit of work: its weight's columns in blocks of 128

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) {  // bfloat16 bits
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
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

// out[z, c] = sum_i x[z, i] w[i, c] for z < ZB, c < cols: x [ZB, a] row-major, w rows ldw apart, out rows
// ldo apart. Each pass streams w's rows once for all ZB rows, NV vectors of columns at a time.
template <int ZB, typename W>
void block(const float* x, int64_t a, const W* w, int64_t ldw, int64_t cols, float* out, int64_t ldo) {
  constexpr int NV = std::max(1, std::min(8, kAccumulators / ZB));
  const int64_t vectors = cols / kLanes * kLanes;
  for (int64_t c0 = 0; c0 < vectors; c0 += NV * kLanes) {
    const int nv = static_cast<int>(std::min<int64_t>(NV, (vectors - c0) / kLanes));
    v16 acc[ZB][NV];
    for (int z = 0; z < ZB; ++z)
      for (int v = 0; v < NV; ++v) acc[z][v] = v16{};
    for (int64_t i = 0; i < a; ++i) {
      const W* row = w + i * ldw + c0;
      float xs[ZB];
      for (int z = 0; z < ZB; ++z) xs[z] = x[z * a + i];
      for (int v = 0; v < NV; ++v) {
        if (v >= nv) break;
        const v16 wv = load(row + v * kLanes);
        for (int z = 0; z < ZB; ++z) acc[z][v] += xs[z] * wv;
      }
    }
    for (int z = 0; z < ZB; ++z)
      for (int v = 0; v < nv; ++v) store(out + z * ldo + c0 + v * kLanes, acc[z][v]);
  }
  for (int z = 0; z < ZB; ++z)  // the last cols % 16 columns (widths that are not a multiple of 16)
    for (int64_t c = vectors; c < cols; ++c) {
      float sum = 0.0f;
      for (int64_t i = 0; i < a; ++i) sum += x[z * a + i] * to_float(w[i * ldw + c]);
      out[z * ldo + c] = sum;
    }
}

// `block` over any number of rows, kMaxZB at a time.
template <typename W>
void rows_times(int64_t rows, const float* x, int64_t a, const W* w, int64_t ldw, int64_t cols, float* out,
                int64_t ldo) {
  for (int64_t z0 = 0; z0 < rows; z0 += kMaxZB) {
    const float* xz = x + z0 * a;
    float* oz = out + z0 * ldo;
    switch (std::min<int64_t>(kMaxZB, rows - z0)) {
      case 1: block<1>(xz, a, w, ldw, cols, oz, ldo); break;
      case 2: block<2>(xz, a, w, ldw, cols, oz, ldo); break;
      case 3: block<3>(xz, a, w, ldw, cols, oz, ldo); break;
      case 4: block<4>(xz, a, w, ldw, cols, oz, ldo); break;
      case 5: block<5>(xz, a, w, ldw, cols, oz, ldo); break;
      default: block<6>(xz, a, w, ldw, cols, oz, ldo); break;
    }
  }
}

// fn(j) for j in [0, n), each once, on the calling thread and on tasks of XLA's intra-op pool. A task that
// starts after every j is claimed only reads the shared counter (kept alive by its shared_ptr).
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int n, F fn) {
  struct Shared {
    Shared(int n, F fn) : n(n), fn(std::move(fn)) {}
    std::atomic<int> next{0}, done{0};
    const int n;
    F fn;
    void drain() {
      for (int j = next.fetch_add(1); j < n; j = next.fetch_add(1)) {
        fn(j);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto shared = std::make_shared<Shared>(n, std::move(fn));
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([shared] { shared->drain(); });
  shared->drain();
  while (shared->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

template <typename A, typename B>
bool same(const A& a, const B& b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

bool float_or_bf16(ffi::DataType t) { return t == ffi::DataType::F32 || t == ffi::DataType::BF16; }

// ---- x @ w ----------------------------------------------------------------------------------------------

template <typename W>
void linear(ffi::ThreadPool& pool, const float* x, int64_t n_x, int64_t a, const W* w, int64_t o, float* y) {
  const int blocks = static_cast<int>((o + kColumnBlock - 1) / kColumnBlock);
  parallel_for(pool, blocks, [=](int j) {
    const int64_t c0 = j * kColumnBlock;
    rows_times(n_x, x, a, w + c0, o, std::min(kColumnBlock, o - c0), y + c0, o);
  });
}

ffi::Error Linear(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x_XA, ffi::AnyBuffer w_AO,
                  ffi::ResultBuffer<ffi::F32> y_XO) {
  const auto xa = x_XA.dimensions(), ao = w_AO.dimensions();
  if (xa.size() != 2 || ao.size() != 2 || xa[1] != ao[0] || !float_or_bf16(w_AO.element_type()))
    return ffi::Error::InvalidArgument("cpu_kernels.linear: want x [X, A] float32 and w [A, O] float32 or bfloat16");
  if (w_AO.element_type() == ffi::DataType::F32)
    linear(pool, x_XA.typed_data(), xa[0], xa[1], static_cast<const float*>(w_AO.untyped_data()), ao[1],
           y_XO->typed_data());
  else
    linear(pool, x_XA.typed_data(), xa[0], xa[1], static_cast<const uint16_t*>(w_AO.untyped_data()), ao[1],
           y_XO->typed_data());
  return ffi::Error::Success();
}

// ---- the routed experts -----------------------------------------------------------------------------------

struct Experts {
  const float* x;  // [X, D]
  const void* w1;  // [E, D, I]
  const void* w2;  // [E, I, D]
  const void* w3;  // [E, D, I]
  float* copies;   // [M, D]: each copy's expert output, before its gate weight
  int64_t k, d, i;
  std::vector<int32_t> start;        // expert j's copies (of those with any): order[start[j] .. start[j + 1])
  std::vector<int32_t> order;        // copy indices m = x K + k, grouped by expert
  std::vector<int32_t> item_expert;  // the expert id of item j
};

template <typename W>
void run_expert(const Experts& p, int item) {
  const int64_t e = p.item_expert[item], d = p.d, n = p.i, rows = p.start[item + 1] - p.start[item];
  const W* w1 = static_cast<const W*>(p.w1) + e * d * n;
  const W* w2 = static_cast<const W*>(p.w2) + e * n * d;
  const W* w3 = static_cast<const W*>(p.w3) + e * d * n;
  const int32_t* copies = p.order.data() + p.start[item];
  std::vector<float> x(rows * d), gate(rows * n), up(rows * n), out(rows * d);
  for (int64_t z = 0; z < rows; ++z) std::memcpy(&x[z * d], p.x + copies[z] / p.k * d, d * sizeof(float));
  rows_times(rows, x.data(), d, w1, n, n, gate.data(), n);
  rows_times(rows, x.data(), d, w3, n, n, up.data(), n);
  for (int64_t j = 0; j < rows * n; ++j) gate[j] = gate[j] / (1.0f + std::exp(-gate[j])) * up[j];  // SwiGLU
  rows_times(rows, gate.data(), n, w2, d, d, out.data(), d);
  for (int64_t z = 0; z < rows; ++z) std::memcpy(p.copies + copies[z] * d, &out[z * d], d * sizeof(float));
}

ffi::Error RoutedExperts(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x_XD, ffi::Buffer<ffi::S32> experts_XK,
                         ffi::Buffer<ffi::F32> weights_XK, ffi::AnyBuffer w1, ffi::AnyBuffer w2,
                         ffi::AnyBuffer w3, ffi::ResultBuffer<ffi::F32> y_XD) {
  const auto xd = x_XD.dimensions(), xk = experts_XK.dimensions(), w1_dims = w1.dimensions();
  if (xd.size() != 2 || xk.size() != 2 || w1_dims.size() != 3 || xk[0] != xd[0] ||
      !same(weights_XK.dimensions(), xk) || w1_dims[1] != xd[1] || !same(w3.dimensions(), w1_dims) ||
      w2.dimensions().size() != 3 || w2.dimensions()[0] != w1_dims[0] || w2.dimensions()[1] != w1_dims[2] ||
      w2.dimensions()[2] != w1_dims[1])
    return ffi::Error::InvalidArgument(
        "cpu_kernels.routed_swiglu: want x [X, D], experts and weights [X, K], w1 and w3 [E, D, I], w2 [E, I, D]");
  const ffi::DataType dtype = w1.element_type();
  if (w2.element_type() != dtype || w3.element_type() != dtype || !float_or_bf16(dtype))
    return ffi::Error::InvalidArgument("cpu_kernels.routed_swiglu: w1, w2, w3 must be all float32 or all bfloat16");
  const int64_t n_x = xd[0], d = xd[1], k = xk[1], n_e = w1_dims[0], m = n_x * k;

  Experts p;
  p.x = x_XD.typed_data();
  p.w1 = w1.untyped_data();
  p.w2 = w2.untyped_data();
  p.w3 = w3.untyped_data();
  p.k = k, p.d = d, p.i = w1_dims[2];
  std::vector<float> copies(m * d);
  p.copies = copies.data();

  // Counting sort of the copies by expert (stable: copy order inside an expert).
  const int32_t* experts = experts_XK.typed_data();
  auto mine = [&](int64_t c) { return experts[c] >= 0 && experts[c] < n_e; };
  std::vector<int32_t> count(n_e + 1, 0);
  for (int64_t c = 0; c < m; ++c)
    if (mine(c)) ++count[experts[c] + 1];
  for (int64_t e = 0; e < n_e; ++e) count[e + 1] += count[e];
  p.order.resize(count[n_e]);
  std::vector<int32_t> fill(count.begin(), count.end() - 1);
  for (int64_t c = 0; c < m; ++c)
    if (mine(c)) p.order[fill[experts[c]]++] = static_cast<int32_t>(c);
  for (int64_t e = 0; e < n_e; ++e) {
    if (count[e + 1] == count[e]) continue;
    p.item_expert.push_back(static_cast<int32_t>(e));
    p.start.push_back(count[e]);
  }
  p.start.push_back(count[n_e]);
  auto run = dtype == ffi::DataType::F32 ? run_expert<float> : run_expert<uint16_t>;
  parallel_for(pool, static_cast<int>(p.item_expert.size()), [&p, run](int j) { run(p, j); });

  // y[x] = sum_k weights[x, k] copies[x K + k], k in order; copies sent elsewhere add nothing.
  const float* weights = weights_XK.typed_data();
  float* y = y_XD->typed_data();
  std::fill(y, y + n_x * d, 0.0f);
  for (int64_t c = 0; c < m; ++c) {
    if (!mine(c)) continue;
    const float* row = p.copies + c * d;
    float* out = y + c / k * d;
    for (int64_t j = 0; j < d; ++j) out[j] += weights[c] * row[j];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(deepseek_jax_linear_cpu, Linear,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(deepseek_jax_routed_experts_cpu, RoutedExperts,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
