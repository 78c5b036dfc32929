// Attention over the paged KV cache on CPU: an XLA FFI custom call (float32).
// models/cpu_kernels.py builds and registers it; models/attention.py `write_attend` calls it
// once per layer with --attention-backend cpu: it writes the step's keys and values into the
// pages, then attends every row of the step (one query token each, decode or prefill).
//
// Legend: T rows, Hkv KV heads, G query heads per KV head, K head dim, P pages in the
// pool, B positions per page, W pages in a block table.
//
// Each (row, KV head) pair reads the positions [lo, hi) of its row's context once, straight
// from the pool (page = table[row, position / B]): scores of its G query heads against a
// page's keys, an online softmax (flash-decoding) across pages, the page's values weighted
// into the running output. Pairs are spread over the threads (cpu_kernels.h ParallelFor).
// q, k and v are read where the projection left them (GPT-2's c_attn: one [T, 3H, K] array),
// and the write and the attention are one call: XLA:CPU copied each slice out (37 copies,
// ~1.9 ms of a 64-row GPT-2 small step) and ran the writes as two more kernels per layer.
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

// Where a step's rows of q, k or v lie: row t's head h at data + (t * C + first + h) * K, for a
// source [T, C, K] (one projection's output holding several tensors' heads side by side, read
// where it lies: no sliced copy).
struct Heads {
  const float* data;
  int64_t C, first;
  const float* at(int64_t t, int64_t h, int64_t K) const { return data + (t * C + first + h) * K; }
};

// This step's keys and values into one layer's pages (in place): row t goes to position
// idx[t] (page idx / B, offset idx % B) of every KV head; a row whose position is outside the
// pool (padding rows point past the last page) is dropped. What `pages.at[:, idx // B, idx % B]
// .set(new)` does, without XLA:CPU's element-wise scatter loop (0.2-0.8 ms per layer at 64
// rows) or the [T, Hkv, K] -> [Hkv, T, K] copy before it.
void WriteRows(ffi::ThreadPool& pool, Heads k, Heads v, const int32_t* I, int64_t T, int64_t H,
               int64_t P, int64_t B, int64_t K, float* Kp, float* Vp) {
  auto offset = [&](int64_t t, int64_t h) { return ((h * P + I[t] / B) * B + I[t] % B) * K; };
  // Rows over the threads; each first asks for the lines it will write two rows on (a
  // written line is read from memory first, and the pages lie far apart: one row at a time
  // the 64-row write waited on ~750 such reads in turn).
  ParallelFor(pool, T, [&](int64_t t) {
    if (t + 2 < T && I[t + 2] >= 0 && I[t + 2] < P * B)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t k = 0; k < K; k += 16) {
          __builtin_prefetch(Kp + offset(t + 2, h) + k, 1, 3);
          __builtin_prefetch(Vp + offset(t + 2, h) + k, 1, 3);
        }
    if (I[t] < 0 || I[t] >= P * B) return;
    for (int64_t h = 0; h < H; ++h) {
      std::memcpy(Kp + offset(t, h), k.at(t, h, K), K * sizeof(float));
      std::memcpy(Vp + offset(t, h), v.at(t, h, K), K * sizeof(float));
    }
  });
}

// One layer's attention for a step: writes the rows' keys and values into the pages (the
// outputs alias k_pages and v_pages), then each row attends over positions [lo, hi) of its
// sequence. q, k, v are each [T, C, K] with their heads from attribute q_head / k_head /
// v_head on (the same buffer three times when one projection made all three: GPT-2's c_attn).
ffi::Error Attend(ffi::Buffer<ffi::F32> q_src,    // [T, Cq, K]: q heads q_head .. q_head + H - 1
                  ffi::Buffer<ffi::F32> k_src,    // [T, Ck, K]: k heads k_head .. k_head + Hkv - 1
                  ffi::Buffer<ffi::F32> v_src,    // [T, Cv, K]: v heads v_head .. v_head + Hkv - 1
                  ffi::Buffer<ffi::F32> k_pages,  // [Hkv, P, B, K]
                  ffi::Buffer<ffi::F32> v_pages,  // [Hkv, P, B, K]
                  ffi::Buffer<ffi::S32> idx,      // [T] the rows' positions in the pool
                  ffi::Buffer<ffi::S32> table,    // [T, W]
                  ffi::Buffer<ffi::S32> lo,       // [T] first position attended
                  ffi::Buffer<ffi::S32> hi,       // [T] one past the last
                  int64_t heads, int64_t q_head, int64_t k_head, int64_t v_head, float scale,
                  ffi::ThreadPool pool,
                  ffi::ResultBuffer<ffi::F32> out,        // [T, H, K]
                  ffi::ResultBuffer<ffi::F32> k_out,      // aliases k_pages
                  ffi::ResultBuffer<ffi::F32> v_out) {    // aliases v_pages
  const auto qd = q_src.dimensions(), kd = k_src.dimensions(), vd = v_src.dimensions();
  const auto pd = k_pages.dimensions(), td = table.dimensions();
  const bool ok = qd.size() == 3 && kd.size() == 3 && vd.size() == 3 && pd.size() == 4 && td.size() == 2 &&
                  std::equal(pd.begin(), pd.end(), v_pages.dimensions().begin()) && heads > 0 &&
                  heads % pd[0] == 0 && qd[2] == pd[3] && kd[2] == pd[3] && vd[2] == pd[3] &&
                  kd[0] == qd[0] && vd[0] == qd[0] && td[0] == qd[0] && idx.element_count() == qd[0] &&
                  q_head >= 0 && q_head + heads <= qd[1] && k_head >= 0 && k_head + pd[0] <= kd[1] &&
                  v_head >= 0 && v_head + pd[0] <= vd[1];
  if (!ok)
    return ffi::Error::InvalidArgument(
        "attend: q/k/v [T, C, K] holding H / Hkv / Hkv heads from q_head / k_head / v_head, "
        "pages [Hkv, P, B, K], idx [T], table [T, W], H a multiple of Hkv");
  const int64_t T = qd[0], H = pd[0], G = heads / H, K = pd[3], P = pd[1], B = pd[2], W = td[1];
  float* Kp = k_out->typed_data();
  float* Vp = v_out->typed_data();
  if (Kp != k_pages.typed_data()) std::memcpy(Kp, k_pages.typed_data(), k_pages.size_bytes());
  if (Vp != v_pages.typed_data()) std::memcpy(Vp, v_pages.typed_data(), v_pages.size_bytes());  // not aliased
  const Heads Q{q_src.typed_data(), qd[1], q_head};
  WriteRows(pool, {k_src.typed_data(), kd[1], k_head}, {v_src.typed_data(), vd[1], v_head}, idx.typed_data(),
            T, H, P, B, K, Kp, Vp);
  const int32_t* Tb = table.typed_data();
  const int32_t* LO = lo.typed_data();
  const int32_t* HI = hi.typed_data();
  float* O = out->typed_data();
  const PageFn page_fn = PageFor(K);
  // Each (row, KV head) pair: its G query heads over the row's positions, page by page.
  ParallelFor(pool, T * H, [&](int64_t nh) {
    thread_local std::vector<float> s, acc, m, d;
    s.resize(G * B), acc.assign(G * K, 0.0f), m.assign(G, kNoScore), d.assign(G, 0.0f);
    const int64_t n = nh / H, h = nh % H;
    const float* qn = Q.at(n, h * G, K);
    const int64_t first = std::max<int64_t>(LO[n], 0), last = std::min<int64_t>(HI[n], W * B);
    for (int64_t start = first / B * B; start < last; start += B) {
      const int64_t page = Tb[n * W + start / B];
      if (page < 0 || page >= P) continue;  // never for a valid plan: skip, don't read past
      const float* kb = Kp + (h * P + page) * B * K;
      const float* vb = Vp + (h * P + page) * B * K;
      const int64_t i0 = std::max<int64_t>(first - start, 0), i1 = std::min<int64_t>(last - start, B);
      for (int64_t g = 0; g < G; ++g)
        page_fn(qn + g * K, kb, vb, i0, i1, K, scale, s.data() + g * B, m[g], d[g], acc.data() + g * K);
    }
    float* on = O + nh * G * K;  // [T, H, K]: row n, query heads h*G ..
    for (int64_t g = 0; g < G; ++g) {
      const float inv = d[g] > 0.0f ? 1.0f / d[g] : 0.0f;  // no position (padding row): 0
      for (int64_t k = 0; k < K; ++k) on[g * K + k] = acc[g * K + k] * inv;
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OrcaAttendF32, Attend,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("heads")
                                  .Attr<int64_t>("q_head")
                                  .Attr<int64_t>("k_head")
                                  .Attr<int64_t>("v_head")
                                  .Attr<float>("scale")
                                  .Ctx<ffi::ThreadPool>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
