// The full-size passes of a normalization followed by a ReLU, as XLA FFI handlers for the CPU.
// lvseg_jax/cpu_kernels.py builds this file; lvseg_jax/norms.py calls it for BatchNorm,
// InstanceNorm and LayerNorm and keeps all the arithmetic on statistics (means, variances,
// the chain rule, cross-device sums) in JAX.
//
// x is viewed as (N, P, C): samples, pixels, channels (NHWC with H * W = P). Every
// per-statistic quantity comes as one value per (sample, channel), shape (N, C):
//   NormMoments      s1 = sum_p x, s2 = sum_p x^2
//   NormAffineRelu   y = relu(x * a + b)
//   NormReluGradSums with dz = dy * (x * a + b > 0): sum_p dz, sum_p dz * x
//   NormReluGradApply dx = dz * k + x * xk + off
// The ReLU mask is recomputed from x with the forward pass's own fma, so it is the same mask.
//
// Why: XLA:CPU runs these passes as several fusions and YNNPACK reductions, 1.2-2.9x slower
// per layer at U-Net shapes, batch 8, except at the smallest (docs/BENCHMARKS.md, "Tenth run").
// Work is split into (sample, pixel range) tasks on XLA's intra-op thread pool.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "common.h"

namespace ffi = xla::ffi;

namespace {

using lvseg::ParallelFor;

// Elements per task: 128 KB, so that 2-16 threads get work even at batch 1.
constexpr int64_t kTaskElements = 1 << 15;
// Pixels summed in float lanes before they are added to the double totals.
constexpr int64_t kFlushPixels = 256;

struct Geometry {
  int64_t samples = 0, pixels = 0, channels = 0, pixels_per_task = 1, tasks_per_sample = 0;
  int64_t tasks() const { return samples * tasks_per_sample; }
  // Pixel range [begin, end) of a task, and the offset of its first element.
  int64_t sample(int64_t task) const { return task / tasks_per_sample; }
  int64_t pixel_begin(int64_t task) const { return task % tasks_per_sample * pixels_per_task; }
  int64_t pixel_end(int64_t task) const {
    return std::min(pixels, pixel_begin(task) + pixels_per_task);
  }
  int64_t offset(int64_t task) const {
    return (sample(task) * pixels + pixel_begin(task)) * channels;
  }
};

using F32Buffer = ffi::Buffer<ffi::F32>;

// The (N, P, C) view of x; every coefficient must hold one value per (sample, channel).
ffi::Error GetGeometry(const F32Buffer& x, std::initializer_list<const F32Buffer*> coefficients,
                       Geometry& g) {
  auto dims = x.dimensions();
  if (dims.size() < 2) {
    return ffi::Error::InvalidArgument("norm kernel: x needs a sample and a channel axis");
  }
  g.samples = dims[0];
  g.channels = dims[dims.size() - 1];
  g.pixels = 1;
  for (size_t i = 1; i + 1 < dims.size(); ++i) g.pixels *= dims[i];
  g.pixels_per_task = std::max<int64_t>(1, kTaskElements / std::max<int64_t>(1, g.channels));
  g.tasks_per_sample = (g.pixels + g.pixels_per_task - 1) / g.pixels_per_task;
  for (const F32Buffer* v : coefficients) {
    if (v->element_count() != static_cast<size_t>(g.samples * g.channels)) {
      return ffi::Error::InvalidArgument(
          "norm kernel: every coefficient needs one value per (sample, channel)");
    }
  }
  return ffi::Error::Success();
}

ffi::Error CheckSameShape(const F32Buffer& dy, const F32Buffer& x) {
  if (dy.dimensions().size() != x.dimensions().size() ||
      !std::equal(dy.dimensions().begin(), dy.dimensions().end(), x.dimensions().begin())) {
    return ffi::Error::InvalidArgument("norm kernel: dy must have the shape of x");
  }
  return ffi::Error::Success();
}

// The gradient at the ReLU's input: dy where x * a + b > 0, else 0. The same fma as
// AffineRelu's, so the backward kernels recompute exactly the forward pass's mask.
inline float ReluGrad(float dy, float x, float a, float b) {
  return std::fma(x, a, b) > 0.0f ? dy : 0.0f;
}

// Per (sample, channel) sums over a task's pixels of two terms, term(p, c, s1, s2) adding to
// s1 and s2, written to the task's slot of `partial` (2 * C doubles). Channels go in chunks of
// one 16-float vector whose two sums stay in registers over a block of pixels.
constexpr int64_t kLanes = 16;

template <typename Term>
void ChannelSums(const Geometry& g, int64_t task, Term term, double* partial) {
  const int64_t C = g.channels;
  const int64_t pixels = g.pixel_end(task) - g.pixel_begin(task);
  for (int64_t c0 = 0; c0 < C; c0 += kLanes) {
    const int64_t lanes = std::min(kLanes, C - c0);
    double total1[kLanes] = {}, total2[kLanes] = {};
    for (int64_t p0 = 0; p0 < pixels; p0 += kFlushPixels) {
      const int64_t p1 = std::min(pixels, p0 + kFlushPixels);
      float f1[kLanes] = {}, f2[kLanes] = {};
      if (lanes == kLanes) {
        for (int64_t p = p0; p < p1; ++p) {
#pragma omp simd
          for (int64_t l = 0; l < kLanes; ++l) term(p, c0 + l, f1[l], f2[l]);
        }
      } else {
        for (int64_t p = p0; p < p1; ++p) {
          for (int64_t l = 0; l < lanes; ++l) term(p, c0 + l, f1[l], f2[l]);
        }
      }
      for (int64_t l = 0; l < kLanes; ++l) {
        total1[l] += f1[l];
        total2[l] += f2[l];
      }
    }
    for (int64_t l = 0; l < lanes; ++l) {
      partial[c0 + l] = total1[l];
      partial[C + c0 + l] = total2[l];
    }
  }
}

// Adds the task partials of each sample into the (N, C) outputs.
void ReducePartials(const Geometry& g, const std::vector<double>& partial, float* out1,
                    float* out2) {
  const int64_t C = g.channels;
  for (int64_t n = 0; n < g.samples; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      double s1 = 0.0, s2 = 0.0;
      for (int64_t t = 0; t < g.tasks_per_sample; ++t) {
        const double* part = &partial[2 * C * (n * g.tasks_per_sample + t)];
        s1 += part[c];
        s2 += part[C + c];
      }
      out1[n * C + c] = static_cast<float>(s1);
      out2[n * C + c] = static_cast<float>(s2);
    }
  }
}

ffi::Error Moments(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> s1,
                   ffi::ResultBuffer<ffi::F32> s2) {
  Geometry g;
  RETURN_IF_ERROR(GetGeometry(x, {}, g));
  const int64_t C = g.channels;
  const float* xs = x.typed_data();
  std::vector<double> partial(2 * C * g.tasks());
  ParallelFor(pool, g.tasks(), [&](int64_t task) {
    // Local restrict pointers: through the lambda's captures GCC does not vectorize.
    const float* __restrict xp = xs + g.offset(task);
    ChannelSums(g, task, [&](int64_t p, int64_t c, float& s1, float& s2) {
      const float v = xp[p * C + c];
      s1 += v;
      s2 += v * v;
    }, &partial[2 * C * task]);
  });
  ReducePartials(g, partial, s1->typed_data(), s2->typed_data());
  return ffi::Error::Success();
}

ffi::Error AffineRelu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> a,
                      ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> y) {
  Geometry g;
  RETURN_IF_ERROR(GetGeometry(x, {&a, &b}, g));
  const int64_t C = g.channels;
  const float* xs = x.typed_data();
  float* ys = y->typed_data();
  ParallelFor(pool, g.tasks(), [&](int64_t task) {
    const float* __restrict an = a.typed_data() + g.sample(task) * C;
    const float* __restrict bn = b.typed_data() + g.sample(task) * C;
    const float* __restrict xp = xs + g.offset(task);
    float* __restrict yp = ys + g.offset(task);
    const int64_t pixels = g.pixel_end(task) - g.pixel_begin(task);
    for (int64_t p = 0; p < pixels; ++p) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        yp[p * C + c] = std::max(std::fma(xp[p * C + c], an[c], bn[c]), 0.0f);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error ReluGradSums(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                        ffi::ResultBuffer<ffi::F32> sum_dz, ffi::ResultBuffer<ffi::F32> sum_dz_x) {
  Geometry g;
  RETURN_IF_ERROR(GetGeometry(x, {&a, &b}, g));
  RETURN_IF_ERROR(CheckSameShape(dy, x));
  const int64_t C = g.channels;
  const float* xs = x.typed_data();
  const float* dys = dy.typed_data();
  std::vector<double> partial(2 * C * g.tasks());
  ParallelFor(pool, g.tasks(), [&](int64_t task) {
    const float* __restrict an = a.typed_data() + g.sample(task) * C;
    const float* __restrict bn = b.typed_data() + g.sample(task) * C;
    const float* __restrict xp = xs + g.offset(task);
    const float* __restrict dyp = dys + g.offset(task);
    ChannelSums(g, task, [&](int64_t p, int64_t c, float& s1, float& s2) {
      const float xv = xp[p * C + c];
      const float dz = ReluGrad(dyp[p * C + c], xv, an[c], bn[c]);
      s1 += dz;
      s2 += dz * xv;
    }, &partial[2 * C * task]);
  });
  ReducePartials(g, partial, sum_dz->typed_data(), sum_dz_x->typed_data());
  return ffi::Error::Success();
}

ffi::Error ReluGradApply(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> x,
                         ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                         ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> xk,
                         ffi::Buffer<ffi::F32> off, ffi::ResultBuffer<ffi::F32> dx) {
  Geometry g;
  RETURN_IF_ERROR(GetGeometry(x, {&a, &b, &k, &xk, &off}, g));
  RETURN_IF_ERROR(CheckSameShape(dy, x));
  const int64_t C = g.channels;
  const float* xs = x.typed_data();
  const float* dys = dy.typed_data();
  float* dxs = dx->typed_data();
  ParallelFor(pool, g.tasks(), [&](int64_t task) {
    const int64_t row = g.sample(task) * C;
    const float* __restrict an = a.typed_data() + row;
    const float* __restrict bn = b.typed_data() + row;
    const float* __restrict kn = k.typed_data() + row;
    const float* __restrict xkn = xk.typed_data() + row;
    const float* __restrict offn = off.typed_data() + row;
    const float* __restrict xp = xs + g.offset(task);
    const float* __restrict dyp = dys + g.offset(task);
    float* __restrict dxp = dxs + g.offset(task);
    const int64_t pixels = g.pixel_end(task) - g.pixel_begin(task);
    for (int64_t p = 0; p < pixels; ++p) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const float xv = xp[p * C + c];
        const float dz = ReluGrad(dyp[p * C + c], xv, an[c], bn[c]);
        dxp[p * C + c] = dz * kn[c] + xv * xkn[c] + offn[c];
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

using F32 = ffi::Buffer<ffi::F32>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(LvsegNormMoments, Moments,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()    // x
                                  .Ret<F32>()    // sum x per (n, c)
                                  .Ret<F32>());  // sum x^2

XLA_FFI_DEFINE_HANDLER_SYMBOL(LvsegNormAffineRelu, AffineRelu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()    // x
                                  .Arg<F32>()    // a (N, C)
                                  .Arg<F32>()    // b (N, C)
                                  .Ret<F32>());  // y

XLA_FFI_DEFINE_HANDLER_SYMBOL(LvsegNormReluGradSums, ReluGradSums,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()    // dy
                                  .Arg<F32>()    // x
                                  .Arg<F32>()    // a
                                  .Arg<F32>()    // b
                                  .Ret<F32>()    // sum dz per (n, c)
                                  .Ret<F32>());  // sum dz * x

XLA_FFI_DEFINE_HANDLER_SYMBOL(LvsegNormReluGradApply, ReluGradApply,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()    // dy
                                  .Arg<F32>()    // x
                                  .Arg<F32>()    // a
                                  .Arg<F32>()    // b
                                  .Arg<F32>()    // k (N, C)
                                  .Arg<F32>()    // xk
                                  .Arg<F32>()    // off
                                  .Ret<F32>());  // dx
