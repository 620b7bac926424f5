// 3x3 convolutions, stride 1, 'SAME' padding (one zero pixel on every side), of NHWC float32
// activations with HWIO kernels, as XLA FFI handlers for the CPU. lvseg_jax/cpu_kernels.py
// builds this file; lvseg_jax/models.py calls it for the U-Nets' 3x3 convolutions whose input
// and output channels are multiples of 16.
//
//   Conv3x3           y[n, h, w, o] = sum_{p, q, i} x[n, h + p - 1, w + q - 1, i] k[p, q, i, o]
//   Conv3x3KernelGrad dk[p, q, i, o] = sum_{n, h, w} x[n, h + p - 1, w + q - 1, i] dy[n, h, w, o]
//
// The input gradient is Conv3x3 of dy with the kernel flipped and transposed (done in JAX).
//
// Why: XLA:CPU runs these convolutions through Eigen's tensor contractions, with layout
// transposes around the kernel gradient; these register-tiled AVX-512 loops are faster at the
// narrow, full-resolution layers of a width-16/32 U-Net (docs/BENCHMARKS.md, "Eleventh run").
// Without AVX-512 the file still builds, and LvsegConv3x3Supported() returns 0 so that the
// library keeps XLA's convolutions.
//
// Work is split into tasks of a few output rows of one sample on XLA's intra-op thread pool.
// Each task copies the input rows it reads, with the zero padding, into a small buffer, so
// that the inner loops have no bounds checks.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "common.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

using lvseg::ParallelFor;

struct Shape {
  int64_t n = 0, h = 0, w = 0, c = 0;
};

ffi::Error GetNhwc(const ffi::Buffer<ffi::F32>& b, const char* what, Shape& s) {
  auto d = b.dimensions();
  if (d.size() != 4) {
    return ffi::Error::InvalidArgument(std::string("conv3x3 kernel: ") + what +
                                       " must be NHWC (4 axes)");
  }
  s = {d[0], d[1], d[2], d[3]};
  return ffi::Error::Success();
}

ffi::Error CheckKernel(const ffi::Buffer<ffi::F32>& k, int64_t in, int64_t out) {
  auto d = k.dimensions();
  if (d.size() != 4 || d[0] != 3 || d[1] != 3 || d[2] != in || d[3] != out) {
    return ffi::Error::InvalidArgument("conv3x3 kernel: the kernel must be (3, 3, in, out)");
  }
  return ffi::Error::Success();
}

constexpr int64_t kLanes = 16;

#ifdef __AVX512F__

// Copies rows [r0, r1) of one sample (x: H x W x C) into buf, (r1 - r0) x (W + 2) x C, with a
// zero column on each side and zero rows where r is outside [0, H).
void PadRows(const float* x, int64_t H, int64_t W, int64_t C, int64_t r0, int64_t r1,
             float* buf) {
  const int64_t row = (W + 2) * C;
  for (int64_t r = r0; r < r1; ++r) {
    float* b = buf + (r - r0) * row;
    if (r < 0 || r >= H) {
      std::fill(b, b + row, 0.0f);
      continue;
    }
    std::fill(b, b + C, 0.0f);
    std::memcpy(b + C, x + r * W * C, W * C * sizeof(float));
    std::fill(b + (W + 1) * C, b + row, 0.0f);
  }
}

// Output rows per task: about 64 KB of input or output rows, so that the task's padded copy
// (two rows more than it writes) stays small against its work, with many tasks per thread.
int64_t RowsPerTask(const Shape& s, int64_t out_channels) {
  const int64_t per_row = s.w * std::max(s.c, out_channels);
  return std::clamp<int64_t>((1 << 14) / std::max<int64_t>(1, per_row), 1, s.h);
}

// R output pixels of one row x J vectors of 16 output channels: sums over the 9 taps and all
// input channels in registers. `pad` is the padded input row above the output row, at the
// column of the first output pixel; `k` the kernel at the first output channel of the tile.
template <int R, int J>
inline void ConvTile(const float* __restrict pad, int64_t row_stride, int64_t C,
                     const float* __restrict k, int64_t O, float* __restrict y) {
  __m512 acc[R][J];
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  for (int p = 0; p < 3; ++p) {
    for (int q = 0; q < 3; ++q) {
      const float* __restrict xp = pad + p * row_stride + q * C;
      const float* __restrict kp = k + (p * 3 + q) * C * O;
      for (int64_t i = 0; i < C; ++i) {
        __m512 kv[J];
#pragma GCC unroll 4
        for (int j = 0; j < J; ++j) kv[j] = _mm512_loadu_ps(kp + i * O + kLanes * j);
#pragma GCC unroll 32
        for (int r = 0; r < R; ++r) {
          const __m512 xv = _mm512_set1_ps(xp[r * C + i]);
#pragma GCC unroll 4
          for (int j = 0; j < J; ++j) acc[r][j] = _mm512_fmadd_ps(xv, kv[j], acc[r][j]);
        }
      }
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) _mm512_storeu_ps(y + r * O + kLanes * j, acc[r][j]);
  }
}

// One output row: tiles of R pixels, then the remaining pixels in smaller tiles.
template <int J, int R>
void ConvRow(const float* pad, int64_t row_stride, int64_t C, const float* k, int64_t O,
             int64_t W, float* y) {
  int64_t w = 0;
  for (; w + R <= W; w += R) ConvTile<R, J>(pad + w * C, row_stride, C, k, O, y + w * O);
  if constexpr (R > 1) {
    if (w < W) ConvRow<J, R / 2>(pad + w * C, row_stride, C, k, O, W - w, y + w * O);
  }
}

template <int J, int R>
void ConvRows(const float* pad, int64_t row_stride, const Shape& s, const float* k, int64_t O,
              int64_t rows, float* y) {
  for (int64_t o = 0; o < O; o += J * kLanes) {
    for (int64_t r = 0; r < rows; ++r) {
      ConvRow<J, R>(pad + r * row_stride, row_stride, s.c, k + o, O, s.w,
                    y + r * s.w * O + o);
    }
  }
}

// Input channels per kernel-gradient tile: 16 accumulator registers.
constexpr int64_t kGradChannels = 16;

// dk for one tap and kGradChannels input channels x 16 output channels, summed over `rows`
// rows: adds to dk (at (i0, o0) of the tap, row stride O). `pad` is the padded row of the
// tap's offset.
inline void KernelGradTile(const float* __restrict pad, int64_t row_stride, int64_t C,
                           const float* __restrict dy, int64_t W, int64_t O, int64_t rows,
                           float* __restrict dk) {
  __m512 acc[kGradChannels];
#pragma GCC unroll 32
  for (int t = 0; t < kGradChannels; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict xr = pad + r * row_stride;
    const float* __restrict dr = dy + r * W * O;
    for (int64_t w = 0; w < W; ++w) {
      const __m512 d = _mm512_loadu_ps(dr + w * O);
#pragma GCC unroll 32
      for (int t = 0; t < kGradChannels; ++t) {
        acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(xr[w * C + t]), d, acc[t]);
      }
    }
  }
#pragma GCC unroll 32
  for (int t = 0; t < kGradChannels; ++t) {
    _mm512_storeu_ps(dk + t * O, _mm512_add_ps(_mm512_loadu_ps(dk + t * O), acc[t]));
  }
}

#endif  // __AVX512F__

ffi::Error Conv3x3(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                   ffi::ResultBuffer<ffi::F32> y) {
  Shape s;
  RETURN_IF_ERROR(GetNhwc(x, "x", s));
  const int64_t O = k.dimensions().size() == 4 ? k.dimensions()[3] : 0;
  RETURN_IF_ERROR(CheckKernel(k, s.c, O));
#ifdef __AVX512F__
  if (O % kLanes != 0) {
    return ffi::Error::InvalidArgument("conv3x3 kernel: output channels must be a multiple of 16");
  }
  if (s.n * s.h * s.w == 0) return ffi::Error::Success();
  const int64_t rows_per_task = RowsPerTask(s, O);
  const int64_t tasks_per_sample = (s.h + rows_per_task - 1) / rows_per_task;
  const int64_t row_stride = (s.w + 2) * s.c;
  const float* xs = x.typed_data();
  const float* ks = k.typed_data();
  float* ys = y->typed_data();
  ParallelFor(pool, s.n * tasks_per_sample, [&](int64_t task) {
    const int64_t n = task / tasks_per_sample;
    const int64_t h0 = task % tasks_per_sample * rows_per_task;
    const int64_t rows = std::min(s.h, h0 + rows_per_task) - h0;
    thread_local std::vector<float> pad;
    pad.resize((rows + 2) * row_stride);
    PadRows(xs + n * s.h * s.w * s.c, s.h, s.w, s.c, h0 - 1, h0 + rows + 1, pad.data());
    float* yp = ys + (n * s.h + h0) * s.w * O;
    if (O % (4 * kLanes) == 0) {
      ConvRows<4, 6>(pad.data(), row_stride, s, ks, O, rows, yp);
    } else if (O % (2 * kLanes) == 0) {
      ConvRows<2, 12>(pad.data(), row_stride, s, ks, O, rows, yp);
    } else {
      ConvRows<1, 16>(pad.data(), row_stride, s, ks, O, rows, yp);
    }
  });
  return ffi::Error::Success();
#else
  return ffi::Error::Internal("conv3x3 kernel: built without AVX-512");
#endif
}

ffi::Error Conv3x3KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dk) {
  Shape s, g;
  RETURN_IF_ERROR(GetNhwc(x, "x", s));
  RETURN_IF_ERROR(GetNhwc(dy, "dy", g));
  if (g.n != s.n || g.h != s.h || g.w != s.w) {
    return ffi::Error::InvalidArgument("conv3x3 kernel: dy must have the N, H, W of x");
  }
#ifdef __AVX512F__
  const int64_t C = s.c, O = g.c;
  if (O % kLanes != 0 || C % kGradChannels != 0) {
    return ffi::Error::InvalidArgument(
        "conv3x3 kernel: input and output channels must be multiples of 16");
  }
  const int64_t taps = 9 * C * O;
  if (s.n * s.h * s.w == 0) {
    std::fill(dk->typed_data(), dk->typed_data() + taps, 0.0f);
    return ffi::Error::Success();
  }
  // Row blocks whose padded input stays in the L2 cache over the 9 taps.
  const int64_t rows_per_block = std::clamp<int64_t>(
      (1 << 16) / std::max<int64_t>(1, (s.w + 2) * C), 1, s.h);
  const int64_t blocks_per_sample = (s.h + rows_per_block - 1) / rows_per_block;
  const int64_t blocks = s.n * blocks_per_sample;
  // One partial sum of the kernel gradient per chunk of blocks, added up at the end; at most
  // 64 MB of them (wide layers on many threads).
  const int64_t chunks = std::min({blocks, std::max<int64_t>(1, pool.num_threads()),
                                   std::max<int64_t>(1, (int64_t{1} << 24) / taps)});
  std::vector<float> partial(chunks * taps, 0.0f);
  const int64_t row_stride = (s.w + 2) * C;
  const float* xs = x.typed_data();
  const float* dys = dy.typed_data();
  ParallelFor(pool, chunks, [&](int64_t chunk) {
    float* part = &partial[chunk * taps];
    thread_local std::vector<float> pad;
    for (int64_t b = blocks * chunk / chunks; b < blocks * (chunk + 1) / chunks; ++b) {
      const int64_t n = b / blocks_per_sample;
      const int64_t h0 = b % blocks_per_sample * rows_per_block;
      const int64_t rows = std::min(s.h, h0 + rows_per_block) - h0;
      pad.resize((rows + 2) * row_stride);
      PadRows(xs + n * s.h * s.w * C, s.h, s.w, C, h0 - 1, h0 + rows + 1, pad.data());
      const float* dyp = dys + (n * s.h + h0) * s.w * O;
      for (int p = 0; p < 3; ++p) {
        for (int q = 0; q < 3; ++q) {
          for (int64_t i = 0; i < C; i += kGradChannels) {
            for (int64_t o = 0; o < O; o += kLanes) {
              KernelGradTile(pad.data() + p * row_stride + q * C + i, row_stride, C, dyp + o,
                             s.w, O, rows, part + ((p * 3 + q) * C + i) * O + o);
            }
          }
        }
      }
    }
  });
  float* out = dk->typed_data();
  for (int64_t e = 0; e < taps; ++e) {
    float total = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) total += partial[c * taps + e];
    out[e] = total;
  }
  return ffi::Error::Success();
#else
  return ffi::Error::Internal("conv3x3 kernel: built without AVX-512");
#endif
}

}  // namespace

// 1 when the convolution kernels were built with AVX-512 and can run, 0 otherwise.
extern "C" int LvsegConv3x3Supported() {
#ifdef __AVX512F__
  return 1;
#else
  return 0;
#endif
}

using F32 = ffi::Buffer<ffi::F32>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(LvsegConv3x3, Conv3x3,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()    // x (N, H, W, C)
                                  .Arg<F32>()    // kernel (3, 3, C, O)
                                  .Ret<F32>());  // y (N, H, W, O)

XLA_FFI_DEFINE_HANDLER_SYMBOL(LvsegConv3x3KernelGrad, Conv3x3KernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()    // x (N, H, W, C)
                                  .Arg<F32>()    // dy (N, H, W, O)
                                  .Ret<F32>());  // dkernel (3, 3, C, O)
