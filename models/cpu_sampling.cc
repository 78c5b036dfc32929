// Greedy sampling on CPU: each row's argmax over the vocabulary, an XLA FFI custom call
// (float32 logits). models/cpu_kernels.py builds and registers it; orca_jax/sampling.py
// `sample` calls it through `argmax` when the runner uses the CPU kernels.
//
// Legend: R rows, V vocabulary entries, NB banned ids per row.
//
// Why: on XLA:CPU the greedy sampling program copied the [R, V] logits (the masking
// scatter of the banned ids writes a copy of a parameter), copied them again into whole
// blocks for the two-stage argmax, then reduced them: ~4 ms at R = 64 for GPT-2's
// vocabulary. Here each row is read twice from its own memory (the second read from cache):
// once for its maximum, once for the first index that holds it; banned ids are looked at
// only where they could matter. Rows are spread over XLA's own intra-op threads.
#include <cmath>
#include <cstdint>

#include "cpu_kernels.h"

namespace ffi = xla::ffi;
using orca::ParallelFor;

namespace {

typedef float v16 __attribute__((vector_size(64), aligned(4)));  // may be unaligned
typedef int32_t i16 __attribute__((vector_size(64)));

bool Banned(int64_t i, const int32_t* banned, int64_t nb) {
  for (int64_t j = 0; j < nb; ++j)
    if (banned[j] == i) return true;
  return false;
}

// The first index i not banned with x[i] == m (NaN: with x[i] a NaN), or -1.
int64_t FirstAllowed(const float* x, int64_t V, float m, const int32_t* banned, int64_t nb) {
  const bool nan = std::isnan(m);
  int64_t i = 0;
  for (; i + 16 <= V; i += 16) {
    const v16 v = *reinterpret_cast<const v16*>(x + i);
    const i16 hit = nan ? (v != v) : (v == m);
    bool any = false;
    for (int l = 0; l < 16; ++l) any |= hit[l] != 0;
    if (!any) continue;
    for (int l = 0; l < 16; ++l)
      if (hit[l] && !Banned(i + l, banned, nb)) return i + l;
  }
  for (; i < V; ++i)
    if ((nan ? std::isnan(x[i]) : x[i] == m) && !Banned(i, banned, nb)) return i;
  return -1;
}

// What sampling.py `argmax_first` returns for the row with its banned ids at -inf: the
// first NaN if an allowed entry is NaN, else the first index of the allowed maximum, and 0
// when every allowed entry is -inf.
int32_t RowArgmax(const float* x, int64_t V, const int32_t* banned, int64_t nb) {
  v16 mv = v16{} - INFINITY;
  i16 nanv = i16{};
  int64_t i = 0;
  for (; i + 16 <= V; i += 16) {
    const v16 v = *reinterpret_cast<const v16*>(x + i);
    mv = v > mv ? v : mv;  // NaN never wins here; it is looked for apart
    nanv |= v != v;
  }
  float m = -INFINITY;
  bool nan = false;
  for (int l = 0; l < 16; ++l) {
    m = mv[l] > m ? mv[l] : m;
    nan |= nanv[l] != 0;
  }
  for (; i < V; ++i) {
    m = x[i] > m ? x[i] : m;
    nan |= std::isnan(x[i]);
  }
  if (nan) {
    const int64_t first = FirstAllowed(x, V, NAN, banned, nb);
    if (first >= 0) return static_cast<int32_t>(first);
  }
  if (m == -INFINITY) return 0;
  const int64_t first = FirstAllowed(x, V, m, banned, nb);
  if (first >= 0) return static_cast<int32_t>(first);
  // Every entry holding the maximum is banned: the allowed maximum, one entry at a time.
  float best = -INFINITY;
  int64_t at = 0;
  for (int64_t j = 0; j < V; ++j)
    if (x[j] > best && !Banned(j, banned, nb)) best = x[j], at = j;
  return static_cast<int32_t>(at);
}

ffi::Error ArgmaxRows(ffi::Buffer<ffi::F32> logits,  // [R, V]
                      ffi::Buffer<ffi::S32> banned,  // [R, NB] ids never picked (>= V: padding)
                      ffi::ThreadPool pool,
                      ffi::ResultBuffer<ffi::S32> out) {  // [R]
  const auto ld = logits.dimensions(), bd = banned.dimensions(), od = out->dimensions();
  if (ld.size() != 2 || bd.size() != 2 || od.size() != 1 || bd[0] != ld[0] || od[0] != ld[0])
    return ffi::Error::InvalidArgument("argmax rows: logits [R, V], banned [R, NB], out [R]");
  const int64_t R = ld[0], V = ld[1], NB = bd[1];
  const float* X = logits.typed_data();
  const int32_t* Bn = banned.typed_data();
  int32_t* Y = out->typed_data();
  ParallelFor(pool, R, [&](int64_t r) { Y[r] = RowArgmax(X + r * V, V, Bn + r * NB, NB); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OrcaArgmaxRowsF32, ArgmaxRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ctx<ffi::ThreadPool>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
