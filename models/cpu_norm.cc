// LayerNorm and RMSNorm on CPU: an XLA FFI custom call (float32) over rows x [T, n].
// models/layers.py `layer_norm` / `rms_norm` call it for a norm whose weights
// step.runtime_params made NormWeights (with --matmul-backend cpu).
//
// Why: XLA:CPU ran a LayerNorm as five thunks (two reductions through its fusion library,
// the centring, the rsqrt, the scaling), ~100 us for [64, 768]: ~2.6 ms of GPT-2 small's
// 64-row decode step for its 25 norms. Here one call: per row a pass for the mean (LayerNorm),
// one for the variance (or mean square), one to scale.
#include <cmath>
#include <cstdint>

#include "cpu_kernels.h"

namespace ffi = xla::ffi;

namespace {

// rms == 0: y = (x - mean) * rsqrt(var + eps) * scale (+ bias), HF's LayerNorm in float32.
// rms != 0: y = x * rsqrt(mean(x^2) + eps) * scale, HF's LlamaRMSNorm (bias ignored).
// The products in that order, as models/layers.py computes them.
ffi::Error Norm(ffi::Buffer<ffi::F32> x,      // [T, n]
                ffi::Buffer<ffi::F32> scale,  // [n]
                ffi::Buffer<ffi::F32> bias,   // [n], or [0]: none
                float eps, int32_t rms,
                ffi::ResultBuffer<ffi::F32> out) {  // [T, n]
  const auto xd = x.dimensions();
  if (xd.size() != 2 || scale.element_count() != xd[1] ||
      (bias.element_count() != 0 && bias.element_count() != xd[1]) ||
      out->element_count() != x.element_count())
    return ffi::Error::InvalidArgument("norm: x [T, n], scale [n], bias [n] or [0], out [T, n]");
  const int64_t T = xd[0], n = xd[1];
  const float* S = scale.typed_data();
  const float* B = bias.element_count() && !rms ? bias.typed_data() : nullptr;
  for (int64_t t = 0; t < T; ++t) {
    const float* xr = x.typed_data() + t * n;
    float* yr = out->typed_data() + t * n;
    float mean = 0.0f, sq = 0.0f;
    if (!rms) {
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < n; ++i) sum += xr[i];
      mean = sum / n;
    }
#pragma omp simd reduction(+ : sq)
    for (int64_t i = 0; i < n; ++i) sq += (xr[i] - mean) * (xr[i] - mean);
    const float inv = 1.0f / std::sqrt(sq / n + eps);
    if (B) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) yr[i] = (xr[i] - mean) * inv * S[i] + B[i];
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) yr[i] = (xr[i] - mean) * inv * S[i];
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OrcaNormF32, Norm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps")
                                  .Attr<int32_t>("rms")
                                  .Ret<ffi::Buffer<ffi::F32>>());
