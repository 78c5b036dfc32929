// Dense layers on CPU: y = act(x @ W (+ bias)) (+ residual), an XLA FFI custom call (float32)
// over weights packed once at start-up into panels of 32 output columns (models/cpu_kernels.py
// `pack`); act is none or GELU's tanh form. The epilogue saves XLA's separate passes over y
// (GPT-2 small's 64-row step: ~1.2 ms for the GELUs and the residual adds).
// models/layers.py `linear` calls it for every packed weight (--matmul-backend cpu).
//
// Legend: M rows, K input features, N output features, P = ceil(N / 32) panels.
//
// Why: XLA:CPU's GEMMs read the weights of a decode step (2-16 rows) at a third to a half of
// the machine's bandwidth, and reach ~2/3 of its matmul ceiling at 64 rows. Here each panel
// W[:, 32p : 32p+32] is one contiguous [K, 32] block: a tile of MR rows keeps its MR x 32
// outputs in registers (two 16-float vectors per row) while it streams the panel once, so
// one row reads the weights at memory speed and MR rows reuse every weight MR times. The
// tiles of a panel run back to back (the panel stays in L2) and each also prefetches its
// share of the next panel, so that panel arrives from memory while this one computes; panels
// are spread over XLA's own intra-op threads.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu_kernels.h"

namespace ffi = xla::ffi;
using orca::exp_nonpositive;
using orca::ParallelFor;

namespace {

typedef float v16 __attribute__((vector_size(64), aligned(4)));  // may be unaligned
constexpr int64_t NR = 32;  // columns per panel (the packed layout: cpu_kernels.py PANEL)
#if defined(__AVX512F__)
constexpr int MR = 8;  // rows per tile: 16 accumulators of 32 vector registers
#else
constexpr int MR = 2;  // AVX2 / NEON: a 16-float vector is 2-4 registers
#endif

inline v16 load(const float* p) { return *reinterpret_cast<const v16*>(p); }

enum Activation : int32_t { kNone = 0, kGeluTanh = 1 };

// 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))): jax.nn.gelu(approximate=True), HF's
// "gelu_new"; tanh(u) = sign(u) (1 - e) / (1 + e) with e = exp(-2 |u|).
inline float GeluTanh(float x) {
  const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  const float e = exp_nonpositive(-2.0f * std::fabs(u));
  return 0.5f * x * (1.0f + std::copysign((1.0f - e) / (1.0f + e), u));
}

// What the tile adds after its sums: bias [cols] (or null), the activation, residual rows
// (row stride ldy, or null).
struct Epilogue {
  const float* bias;
  int32_t act;
  const float* residual;
};

// Rows x[0:R] (row stride K) times one panel w [K, 32] into y[0:R, 0:cols] (row stride ldy),
// through the epilogue `ep` (its bias and residual at this panel's columns and rows);
// prefetches pf_rows rows of the panel at pf.
template <int R>
void Tile(const float* x, int64_t K, const float* w, Epilogue ep, float* y, int64_t ldy,
          int64_t cols, const float* pf, int64_t pf_rows) {
  v16 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = v16{};
  // This tile's output lines, for writing, while the loop runs: rows of y lie N floats apart
  // (a new page each), and a store that misses stalls the next tile (the LM head: ~10%).
  for (int r = 0; r < R; ++r) {
    __builtin_prefetch(y + r * ldy, 1, 3);
    __builtin_prefetch(y + r * ldy + 16, 1, 3);
    __builtin_prefetch(y + r * ldy + cols - 1, 1, 3);
  }
  // The prefetches spread evenly over the loop (a burst would fill the line buffers that
  // this tile's own loads need): one 64-byte line every `every` k, or two per k.
  const float* pf_end = pf + pf_rows * NR;
  const int64_t lines = pf_rows * NR / 16, every = std::max<int64_t>(1, lines ? K / lines : 1);
  const int64_t per = lines > K ? 32 : 16;  // floats per prefetch step
  for (int64_t k = 0, next = 0; k < K; ++k) {
    const v16 b0 = load(w + k * NR), b1 = load(w + k * NR + 16);
    if (k == next && pf < pf_end) {
      __builtin_prefetch(pf, 0, 1);  // into L2
      if (per == 32) __builtin_prefetch(pf + 16, 0, 1);
      pf += per;
      next += every;
    }
    for (int r = 0; r < R; ++r) {
      const float a = x[r * K + k];
      acc[r][0] += a * b0;
      acc[r][1] += a * b1;
    }
  }
  float b[NR] = {};
  if (ep.bias) std::memcpy(b, ep.bias, cols * sizeof(float));
  for (int r = 0; r < R; ++r) {
    float out[NR], res[NR] = {};
    std::memcpy(out, &acc[r][0], sizeof(v16));
    std::memcpy(out + 16, &acc[r][1], sizeof(v16));
    if (ep.residual) std::memcpy(res, ep.residual + r * ldy, cols * sizeof(float));
#pragma omp simd
    for (int64_t c = 0; c < NR; ++c) out[c] += b[c];
    if (ep.act == kGeluTanh) {
#pragma omp simd
      for (int64_t c = 0; c < NR; ++c) out[c] = GeluTanh(out[c]);
    }
#pragma omp simd
    for (int64_t c = 0; c < NR; ++c) out[c] += res[c];
    std::memcpy(y + r * ldy, out, cols * sizeof(float));
  }
}

// All `rows` rows against one panel: tiles of MR rows, then one of the remainder.
void Panel(const float* x, int64_t rows, int64_t K, const float* w, Epilogue ep, float* y,
           int64_t ldy, int64_t cols, const float* next) {
  const int64_t tiles = (rows + MR - 1) / MR, share = (K + tiles - 1) / tiles;
  for (int64_t t = 0, r = 0; r < rows; ++t, r += MR) {
    const float* pf = next ? next + std::min(t * share, K) * NR : nullptr;
    const int64_t pf_rows = next ? std::max<int64_t>(0, std::min(share, K - t * share)) : 0;
    const float* xr = x + r * K;
    float* yr = y + r * ldy;
    const Epilogue er{ep.bias, ep.act, ep.residual ? ep.residual + r * ldy : nullptr};
    switch (std::min<int64_t>(MR, rows - r)) {
#define ORCA_TILE(n) \
  case n:            \
    Tile<n>(xr, K, w, er, yr, ldy, cols, pf, pf_rows); break;
      ORCA_TILE(1) ORCA_TILE(2)
#if defined(__AVX512F__)
      ORCA_TILE(3) ORCA_TILE(4) ORCA_TILE(5) ORCA_TILE(6) ORCA_TILE(7) ORCA_TILE(8)
#endif
#undef ORCA_TILE
    }
  }
}

ffi::Error PackedMatmul(ffi::Buffer<ffi::F32> x,      // [M, K]
                        ffi::Buffer<ffi::F32> w,      // [P, K, 32]
                        ffi::Buffer<ffi::F32> bias,   // [N], or [0]: none
                        ffi::Buffer<ffi::F32> residual,  // [M, N], or [0]: none
                        int32_t act,                  // Activation
                        ffi::ThreadPool pool,
                        ffi::ResultBuffer<ffi::F32> out) {  // [M, N]
  const auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || od.size() != 2 || wd[1] != xd[1] || wd[2] != NR ||
      od[0] != xd[0] || od[1] > wd[0] * NR || od[1] <= (wd[0] - 1) * NR ||
      (bias.element_count() != 0 && bias.element_count() != od[1]) ||
      (residual.element_count() != 0 && residual.element_count() != od[0] * od[1]) ||
      (act != kNone && act != kGeluTanh))
    return ffi::Error::InvalidArgument(
        "packed matmul: x [M, K], w [ceil(N/32), K, 32], bias [N] or [0], residual [M, N] or [0], "
        "out [M, N], act 0 (none) or 1 (GELU, tanh form)");
  const int64_t M = xd[0], K = xd[1], P = wd[0], N = od[1];
  const float* X = x.typed_data();
  const float* W = w.typed_data();
  const float* B = bias.element_count() ? bias.typed_data() : nullptr;
  const float* Res = residual.element_count() ? residual.typed_data() : nullptr;
  float* Y = out->typed_data();
  ParallelFor(pool, P, [&](int64_t p) {  // each thread a run of panels
    const int64_t cols = std::min<int64_t>(NR, N - p * NR);
    const float* next = p + 1 < P && M > 1 ? W + (p + 1) * K * NR : nullptr;  // 1 row: hardware prefetch
    const Epilogue ep{B ? B + p * NR : nullptr, act, Res ? Res + p * NR : nullptr};
    Panel(X, M, K, W + p * K * NR, ep, Y + p * NR, N, cols, next);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OrcaPackedMatmulF32, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("act")
                                  .Ctx<ffi::ThreadPool>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
