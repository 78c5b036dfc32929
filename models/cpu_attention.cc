// Attention over the paged KV cache on CPU: an XLA FFI custom call (float32).
// models/cpu_kernels.py builds and registers it; models/attention.py `attend` calls it for
// every row of a step (one query token each) with --attention-backend cpu, and `write_kv`
// calls WritePages (below) to put the step's keys and values into the pages first.
//
// Legend: N rows, Hkv KV heads, G query heads per KV head, K head dim, P pages in the
// pool, B positions per page, W pages in a block table.
//
// Each (row, KV head) pair reads the positions [lo, hi) of its row's context once, straight
// from the pool (page = table[row, position / B]): scores of its G query heads against a
// page's keys, an online softmax (flash-decoding) across pages, the page's values weighted
// into the running output. Pairs are spread over XLA's own intra-op threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_kernels.h"

namespace ffi = xla::ffi;
using orca::exp_nonpositive;
using orca::ParallelFor;

namespace {

constexpr float kNoScore = -3.0e38f;  // the running max before any position (finite)

typedef float v16 __attribute__((vector_size(64), aligned(4)));  // may be unaligned
inline v16 load(const float* p) { return *reinterpret_cast<const v16*>(p); }

inline float hsum(v16 x) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(x);
#else
  float s = 0.0f;
  for (int j = 0; j < 16; ++j) s += x[j];
  return s;
#endif
}

// One page of one query head: scores s[i] of q against keys kb[i] (rows [i0, i1) of the
// page, row stride K), the online softmax's running max m and sum d, the weighted values
// added into acc [K]. KV > 0: K = 16 * KV, q and the output kept in vector registers (two
// chains of accumulators over alternate rows); KV == 0: any K, scalar loops.
template <int KV>
void Page(const float* q, const float* kb, const float* vb, int64_t i0, int64_t i1, int64_t K,
          float scale, float* s, float& m, float& d, float* acc) {
  float mx = m;
  if constexpr (KV > 0) {
    v16 qv[KV];
    for (int j = 0; j < KV; ++j) qv[j] = load(q + 16 * j);
    for (int64_t i = i0; i < i1; ++i) {
      const float* kr = kb + i * K;
      v16 p = qv[0] * load(kr);
      for (int j = 1; j < KV; ++j) p += qv[j] * load(kr + 16 * j);
      s[i] = hsum(p) * scale;
      mx = std::max(mx, s[i]);
    }
  } else {
    for (int64_t i = i0; i < i1; ++i) {
      const float* kr = kb + i * K;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t k = 0; k < K; ++k) dot += q[k] * kr[k];
      s[i] = dot * scale;
      mx = std::max(mx, s[i]);
    }
  }
  const float corr = exp_nonpositive(m - mx);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = i0; i < i1; ++i) {
    s[i] = exp_nonpositive(s[i] - mx);
    sum += s[i];
  }
  d = d * corr + sum;
  m = mx;
  if constexpr (KV > 0) {
    v16 a[KV], b[KV];
    for (int j = 0; j < KV; ++j) a[j] = load(acc + 16 * j) * corr, b[j] = v16{};
    int64_t i = i0;
    for (; i + 1 < i1; i += 2) {
      const float p0 = s[i], p1 = s[i + 1];
      const float* v0 = vb + i * K;
      for (int j = 0; j < KV; ++j) a[j] += p0 * load(v0 + 16 * j), b[j] += p1 * load(v0 + K + 16 * j);
    }
    if (i < i1)
      for (int j = 0; j < KV; ++j) a[j] += s[i] * load(vb + i * K + 16 * j);
    for (int j = 0; j < KV; ++j) {
      const v16 sum_ab = a[j] + b[j];
      std::memcpy(acc + 16 * j, &sum_ab, sizeof sum_ab);
    }
  } else {
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) acc[k] *= corr;
    for (int64_t i = i0; i < i1; ++i) {
      const float p = s[i];
      const float* vr = vb + i * K;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) acc[k] += p * vr[k];
    }
  }
}

using PageFn = void (*)(const float*, const float*, const float*, int64_t, int64_t, int64_t, float,
                        float*, float&, float&, float*);

// The page function for head dim K: registers for K = 16, 32, ..., 128, else the scalar loops.
PageFn PageFor(int64_t K) {
  switch (K % 16 ? 0 : K / 16) {
    case 1: return Page<1>;
    case 2: return Page<2>;
    case 3: return Page<3>;
    case 4: return Page<4>;
    case 5: return Page<5>;
    case 6: return Page<6>;
    case 7: return Page<7>;
    case 8: return Page<8>;
    default: return Page<0>;
  }
}

ffi::Error PagedAttention(ffi::Buffer<ffi::F32> q,        // [N, Hkv, G, K]
                          ffi::Buffer<ffi::F32> k_pages,  // [Hkv, P, B, K]
                          ffi::Buffer<ffi::F32> v_pages,  // [Hkv, P, B, K]
                          ffi::Buffer<ffi::S32> table,    // [N, W]
                          ffi::Buffer<ffi::S32> lo,       // [N] first position attended
                          ffi::Buffer<ffi::S32> hi,       // [N] one past the last
                          float scale, ffi::ThreadPool pool,
                          ffi::ResultBuffer<ffi::F32> out) {  // [N, Hkv, G, K]
  const auto qd = q.dimensions(), kd = k_pages.dimensions(), vd = v_pages.dimensions();
  const auto td = table.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || td.size() != 2 || kd[0] != qd[1] ||
      kd[3] != qd[3] || td[0] != qd[0] || !std::equal(kd.begin(), kd.end(), vd.begin()))
    return ffi::Error::InvalidArgument(
        "paged attention: q [N, Hkv, G, K], pages [Hkv, P, B, K], table [N, W]");
  const int64_t N = qd[0], H = qd[1], G = qd[2], K = qd[3], P = kd[1], B = kd[2], W = td[1];
  const float* Q = q.typed_data();
  const float* Kp = k_pages.typed_data();
  const float* Vp = v_pages.typed_data();
  const int32_t* T = table.typed_data();
  const int32_t* LO = lo.typed_data();
  const int32_t* HI = hi.typed_data();
  float* O = out->typed_data();
  const PageFn page_fn = PageFor(K);
  ParallelFor(pool, N * H, [&](int64_t nh) {
    thread_local std::vector<float> s, acc, m, d;
    s.resize(G * B), acc.assign(G * K, 0.0f), m.assign(G, kNoScore), d.assign(G, 0.0f);
    const int64_t n = nh / H, h = nh % H;
    const float* qn = Q + nh * G * K;
    const int64_t first = std::max<int64_t>(LO[n], 0), last = std::min<int64_t>(HI[n], W * B);
    for (int64_t start = first / B * B; start < last; start += B) {
      const int64_t page = T[n * W + start / B];
      if (page < 0 || page >= P) continue;  // never for a valid plan: skip, don't read past
      const float* kb = Kp + (h * P + page) * B * K;
      const float* vb = Vp + (h * P + page) * B * K;
      const int64_t i0 = std::max<int64_t>(first - start, 0), i1 = std::min<int64_t>(last - start, B);
      for (int64_t g = 0; g < G; ++g)
        page_fn(qn + g * K, kb, vb, i0, i1, K, scale, s.data() + g * B, m[g], d[g], acc.data() + g * K);
    }
    float* on = O + nh * G * K;
    for (int64_t g = 0; g < G; ++g) {
      const float inv = d[g] > 0.0f ? 1.0f / d[g] : 0.0f;  // no position (padding row): 0
      for (int64_t k = 0; k < K; ++k) on[g * K + k] = acc[g * K + k] * inv;
    }
  });
  return ffi::Error::Success();
}

// This step's keys (or values) into one layer's pages, in place (the output aliases `pages`):
// row t goes to position idx[t] (page idx / B, offset idx % B) of every KV head; a row whose
// position is outside the pool (padding rows point past the last page) is dropped. What
// `pages.at[:, idx // B, idx % B].set(new)` does, without XLA:CPU's element-wise scatter
// loop (0.2-0.8 ms per layer at 64 rows) or the [T, Hkv, K] -> [Hkv, T, K] copy before it.
ffi::Error WritePages(ffi::Buffer<ffi::F32> pages,   // [Hkv, P, B, K]
                      ffi::Buffer<ffi::F32> rows,    // [T, Hkv, K]
                      ffi::Buffer<ffi::S32> idx,     // [T]
                      ffi::ThreadPool pool,
                      ffi::ResultBuffer<ffi::F32> out) {  // [Hkv, P, B, K], aliases pages
  const auto pd = pages.dimensions(), rd = rows.dimensions(), id = idx.dimensions();
  if (pd.size() != 4 || rd.size() != 3 || id.size() != 1 || rd[0] != id[0] || rd[1] != pd[0] ||
      rd[2] != pd[3] || !std::equal(pd.begin(), pd.end(), out->dimensions().begin()))
    return ffi::Error::InvalidArgument("write pages: pages [Hkv, P, B, K], rows [T, Hkv, K], idx [T]");
  const int64_t H = pd[0], P = pd[1], B = pd[2], K = pd[3], T = rd[0];
  float* dst = out->typed_data();
  if (dst != pages.typed_data())  // not aliased (XLA chose to copy): start from the input
    std::memcpy(dst, pages.typed_data(), pages.size_bytes());
  const float* src = rows.typed_data();
  const int32_t* I = idx.typed_data();
  auto dst_of = [&](int64_t t, int64_t h) { return dst + ((h * P + I[t] / B) * B + I[t] % B) * K; };
  // Rows over the pool's threads; each first asks for the lines it will write two rows on
  // (a written line is read from memory first, and the pages lie far apart: one row at a time
  // the 64-row write waited on ~750 such reads in turn).
  ParallelFor(pool, T, [&](int64_t t) {
    if (t + 2 < T && I[t + 2] >= 0 && I[t + 2] < P * B)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t k = 0; k < K; k += 16) __builtin_prefetch(dst_of(t + 2, h) + k, 1, 3);
    if (I[t] < 0 || I[t] >= P * B) return;
    for (int64_t h = 0; h < H; ++h) std::memcpy(dst_of(t, h), src + (t * H + h) * K, K * sizeof(float));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OrcaWritePagesF32, WritePages,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ctx<ffi::ThreadPool>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(OrcaPagedAttentionF32, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Ctx<ffi::ThreadPool>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
