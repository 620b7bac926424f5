// LayerNorm (per sample over H, W, C; per-channel affine) fused with the ReLU after it, forward
// and backward, as XLA FFI handlers for the CPU. lvseg_jax/cpu_kernels.py builds this file and
// lvseg_jax/norms.py calls it; the formulas are those of norms._normalize and its VJP.
//
// Why: XLA:CPU runs this layer as several fusions and YNNPACK reductions; these two handlers do
// it in two passes over the activation each way, on XLA's own intra-op thread pool
// (docs/BENCHMARKS.md, "Ninth run").

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Runs fn(0) ... fn(num_tasks - 1) on the calling thread and up to num_threads - 1 pool
// threads. The caller takes tasks too and only waits for tasks already started, so it never
// waits on a pool that is busy elsewhere.
struct ParallelState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t num_tasks = 0;
  const std::function<void(int64_t)>* fn = nullptr;
};

void RunTasks(ParallelState& state) {
  for (int64_t i = state.next.fetch_add(1); i < state.num_tasks; i = state.next.fetch_add(1)) {
    (*state.fn)(i);
    state.done.fetch_add(1, std::memory_order_release);
  }
}

void ParallelFor(ffi::ThreadPool& pool, int64_t num_tasks,
                 const std::function<void(int64_t)>& fn) {
  auto state = std::make_shared<ParallelState>();
  state->num_tasks = num_tasks;
  state->fn = &fn;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), num_tasks) - 1;
  for (int64_t h = 0; h < helpers; ++h) {
    pool.Schedule([state]() { RunTasks(*state); });
  }
  RunTasks(*state);
  while (state->done.load(std::memory_order_acquire) < num_tasks) std::this_thread::yield();
}

// Elements per task: a few hundred KB, so that 2-16 threads get work even at batch 1.
constexpr int64_t kTaskElements = 1 << 15;

// Per-(sample, channel) affine of the normalized input: z = x * a[c] + b[c].
inline void AffineCoefficients(float mean, float inv, const float* scale, const float* bias,
                               int64_t channels, float* a, float* b) {
  for (int64_t c = 0; c < channels; ++c) {
    a[c] = inv * scale[c];
    b[c] = bias[c] - mean * a[c];
  }
}

struct Geometry {
  int64_t samples, pixels, channels, per_sample, pixels_per_task, tasks_per_sample;
};

ffi::Error GetGeometry(ffi::Buffer<ffi::F32>& x, int64_t scale_size, Geometry& g) {
  auto dims = x.dimensions();
  if (dims.size() < 2) {
    return ffi::Error::InvalidArgument("LayerNorm+ReLU: x needs rank >= 2");
  }
  g.samples = dims[0];
  g.channels = dims[dims.size() - 1];
  g.pixels = 1;
  for (size_t i = 1; i + 1 < dims.size(); ++i) g.pixels *= dims[i];
  if (scale_size != g.channels) {
    return ffi::Error::InvalidArgument(
        "LayerNorm+ReLU: scale and bias need one value per channel");
  }
  g.per_sample = g.pixels * g.channels;
  g.pixels_per_task = std::max<int64_t>(1, kTaskElements / std::max<int64_t>(1, g.channels));
  g.tasks_per_sample = (g.pixels + g.pixels_per_task - 1) / g.pixels_per_task;
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                   ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                   ffi::ResultBuffer<ffi::F32> mean_out, ffi::ResultBuffer<ffi::F32> inv_out,
                   ffi::ResultBuffer<ffi::F32> var_raw_out, float epsilon) {
  Geometry g;
  if (ffi::Error error = GetGeometry(x, scale.element_count(), g); error.failure()) {
    return error;
  }
  const float* xs = x.typed_data();
  float* ys = y->typed_data();
  const int64_t num_tasks = g.samples * g.tasks_per_sample;
  // Pass 1: per-task partial sums of x and x^2 (float lanes, double across blocks).
  std::vector<double> partial(2 * num_tasks);
  ParallelFor(pool, num_tasks, [&](int64_t task) {
    const int64_t n = task / g.tasks_per_sample, t = task % g.tasks_per_sample;
    const int64_t begin = n * g.per_sample + t * g.pixels_per_task * g.channels;
    const int64_t end = n * g.per_sample + std::min(g.pixels, (t + 1) * g.pixels_per_task) *
                        g.channels;
    const float* __restrict xp = xs;
    double s1 = 0.0, s2 = 0.0;
    for (int64_t block = begin; block < end; block += 4096) {
      const int64_t stop = std::min(end, block + 4096);
      float a1 = 0.0f, a2 = 0.0f;
#pragma omp simd reduction(+ : a1, a2)
      for (int64_t i = block; i < stop; ++i) {
        const float v = xp[i];
        a1 += v;
        a2 += v * v;
      }
      s1 += a1;
      s2 += a2;
    }
    partial[2 * task] = s1;
    partial[2 * task + 1] = s2;
  });
  // The statistics of norms._normalize: mean, E[x^2] - mean^2, max(., 0), 1 / sqrt(. + eps).
  std::vector<float> a(g.samples * g.channels), b(g.samples * g.channels);
  for (int64_t n = 0; n < g.samples; ++n) {
    double s1 = 0.0, s2 = 0.0;
    for (int64_t t = 0; t < g.tasks_per_sample; ++t) {
      s1 += partial[2 * (n * g.tasks_per_sample + t)];
      s2 += partial[2 * (n * g.tasks_per_sample + t) + 1];
    }
    const float mean = static_cast<float>(s1 / g.per_sample);
    const float mean_sq = static_cast<float>(s2 / g.per_sample);
    const float var_raw = mean_sq - mean * mean;
    const float inv = 1.0f / std::sqrt(std::max(var_raw, 0.0f) + epsilon);
    mean_out->typed_data()[n] = mean;
    inv_out->typed_data()[n] = inv;
    var_raw_out->typed_data()[n] = var_raw;
    AffineCoefficients(mean, inv, scale.typed_data(), bias.typed_data(), g.channels,
                       &a[n * g.channels], &b[n * g.channels]);
  }
  // Pass 2: y = relu(x * a + b).
  ParallelFor(pool, num_tasks, [&](int64_t task) {
    const int64_t n = task / g.tasks_per_sample, t = task % g.tasks_per_sample;
    const int64_t C = g.channels;
    const float* __restrict an = &a[n * C];
    const float* __restrict bn = &b[n * C];
    const int64_t begin = n * g.per_sample + t * g.pixels_per_task * C;
    const int64_t pixels = std::min(g.pixels, (t + 1) * g.pixels_per_task) - t * g.pixels_per_task;
    const float* __restrict xp = xs + begin;
    float* __restrict yp = ys + begin;
    for (int64_t p = 0; p < pixels; ++p) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        yp[p * C + c] = std::max(std::fma(xp[p * C + c], an[c], bn[c]), 0.0f);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> x,
                    ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                    ffi::Buffer<ffi::F32> mean_in, ffi::Buffer<ffi::F32> inv_in,
                    ffi::Buffer<ffi::F32> var_raw_in, ffi::ResultBuffer<ffi::F32> dx,
                    ffi::ResultBuffer<ffi::F32> sum_dz_out,
                    ffi::ResultBuffer<ffi::F32> sum_dz_xc_out) {
  Geometry g;
  if (ffi::Error error = GetGeometry(x, scale.element_count(), g); error.failure()) {
    return error;
  }
  const int64_t C = g.channels;
  const float* xs = x.typed_data();
  const float* dys = dy.typed_data();
  float* dxs = dx->typed_data();
  const float* mean = mean_in.typed_data();
  const float* inv = inv_in.typed_data();
  const float* var_raw = var_raw_in.typed_data();
  std::vector<float> a(g.samples * C), b(g.samples * C);
  for (int64_t n = 0; n < g.samples; ++n) {
    AffineCoefficients(mean[n], inv[n], scale.typed_data(), bias.typed_data(), C, &a[n * C],
                       &b[n * C]);
  }
  const int64_t num_tasks = g.samples * g.tasks_per_sample;
  // Pass 1: per task and channel, sum(dz) and sum(dz * x), dz = dy * (z > 0): the gradient
  // through the ReLU, its mask recomputed from x with the forward pass's own arithmetic.
  std::vector<double> partial(2 * num_tasks * C);
  ParallelFor(pool, num_tasks, [&](int64_t task) {
    const int64_t n = task / g.tasks_per_sample, t = task % g.tasks_per_sample;
    const float* __restrict an = &a[n * C];
    const float* __restrict bn = &b[n * C];
    std::vector<float> f1(C, 0.0f), f2(C, 0.0f);
    std::vector<double> d1(C, 0.0), d2(C, 0.0);
    float* __restrict f1p = f1.data();
    float* __restrict f2p = f2.data();
    const int64_t p_begin = t * g.pixels_per_task;
    const int64_t p_end = std::min(g.pixels, (t + 1) * g.pixels_per_task);
    // Local restrict pointers: through the lambda's captures GCC does not vectorize the loop.
    const float* __restrict xp = xs + n * g.per_sample;
    const float* __restrict dyp = dys + n * g.per_sample;
    int64_t since_flush = 0;
    for (int64_t p = p_begin; p < p_end; ++p) {
      const float* __restrict xrow = xp + p * C;
      const float* __restrict dyrow = dyp + p * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const float xv = xrow[c];
        const float dz = std::fma(xv, an[c], bn[c]) > 0.0f ? dyrow[c] : 0.0f;
        f1p[c] += dz;
        f2p[c] += dz * xv;
      }
      if (++since_flush == 256) {
        for (int64_t c = 0; c < C; ++c) {
          d1[c] += f1[c];
          d2[c] += f2[c];
          f1[c] = f2[c] = 0.0f;
        }
        since_flush = 0;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      partial[2 * (task * C + c)] = d1[c] + f1[c];
      partial[2 * (task * C + c) + 1] = d2[c] + f2[c];
    }
  });
  // The chain rule of norms._normalize_bwd, per sample.
  std::vector<float> dz_coef(g.samples * C), x_coef(g.samples), offset(g.samples);
  const float count = static_cast<float>(g.per_sample);
  for (int64_t n = 0; n < g.samples; ++n) {
    float sum_dxhat = 0.0f, dinv = 0.0f;
    for (int64_t c = 0; c < C; ++c) {
      double s1 = 0.0, s2 = 0.0;
      for (int64_t t = 0; t < g.tasks_per_sample; ++t) {
        const int64_t task = n * g.tasks_per_sample + t;
        s1 += partial[2 * (task * C + c)];
        s2 += partial[2 * (task * C + c) + 1];
      }
      const float sum_dz = static_cast<float>(s1);
      const float sum_dz_xc = static_cast<float>(s2) - mean[n] * sum_dz;
      sum_dz_out->typed_data()[n * C + c] = sum_dz;
      sum_dz_xc_out->typed_data()[n * C + c] = sum_dz_xc;
      sum_dxhat += sum_dz * scale.typed_data()[c];
      dinv += sum_dz_xc * scale.typed_data()[c];
      dz_coef[n * C + c] = inv[n] * scale.typed_data()[c];
    }
    const float dvar = dinv * -0.5f * inv[n] * inv[n] * inv[n];
    // d max(v, 0) / dv as jax.numpy differentiates it: 1 above, 0 below, 1/2 at the tie.
    const float dvar_raw = dvar * (var_raw[n] > 0.0f ? 1.0f : (var_raw[n] == 0.0f ? 0.5f : 0.0f));
    const float dmean = -inv[n] * sum_dxhat;
    x_coef[n] = dvar_raw * (2.0f / count);
    offset[n] = dmean / count - x_coef[n] * mean[n];
  }
  // Pass 2: dx = dz * inv * scale + x * x_coef + offset.
  ParallelFor(pool, num_tasks, [&](int64_t task) {
    const int64_t n = task / g.tasks_per_sample, t = task % g.tasks_per_sample;
    const float* __restrict an = &a[n * C];
    const float* __restrict bn = &b[n * C];
    const float* __restrict kn = &dz_coef[n * C];
    const float xk = x_coef[n], off = offset[n];
    const int64_t begin = n * g.per_sample + t * g.pixels_per_task * C;
    const int64_t p_end = std::min(g.pixels, (t + 1) * g.pixels_per_task);
    const float* __restrict xp = xs + begin;
    const float* __restrict dyp = dys + begin;
    float* __restrict dxp = dxs + begin;
    for (int64_t p = 0; p < p_end - t * g.pixels_per_task; ++p) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const float xv = xp[p * C + c];
        const float dz = std::fma(xv, an[c], bn[c]) > 0.0f ? dyp[p * C + c] : 0.0f;
        dxp[p * C + c] = dz * kn[c] + xv * xk + off;
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LvsegLayerNormReluFwd, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mean
                                  .Ret<ffi::Buffer<ffi::F32>>()  // inv
                                  .Ret<ffi::Buffer<ffi::F32>>()  // var_raw
                                  .Attr<float>("epsilon"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LvsegLayerNormReluBwd, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // inv
                                  .Arg<ffi::Buffer<ffi::F32>>()  // var_raw
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // sum(dz) per (n, c)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // sum(dz (x - mean))
