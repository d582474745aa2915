// FP8 quantize / dequantize: ONNX QuantizeLinear with saturate=1, i.e. x / scale (IEEE
// division) rounded to nearest even and saturated to the largest finite value.
#include <cuda_fp8.h>

// fmt 0 = E4M3 (FN), 1 = E5M2. x is a tensor in storage type (r: BF16, see sd_ld).
extern "C" __global__ void quantize_fp8(const void* __restrict__ x, unsigned char* __restrict__ q,
                                        unsigned long long n, float scale, int fmt, int r) {
    SD_GRID_STRIDE(i, n) {
        const float v = sd_ld(x, i, r) / scale;
        q[i] = (unsigned char)__nv_cvt_float_to_fp8(v, __NV_SATFINITE,
                                                    fmt == 0 ? __NV_E4M3 : __NV_E5M2);
    }
}

// Quantize with the scale read from device memory (the layer's own scale allocation).
extern "C" __global__ void quantize_fp8_dev(const void* __restrict__ x,
                                            unsigned char* __restrict__ q,
                                            unsigned long long n, const float* __restrict__ scale,
                                            int fmt, int r) {
    const float s = *scale;
    SD_GRID_STRIDE(i, n) {
        q[i] = (unsigned char)__nv_cvt_float_to_fp8(sd_ld(x, i, r) / s, __NV_SATFINITE,
                                                    fmt == 0 ? __NV_E4M3 : __NV_E5M2);
    }
}

// quantize_fp8_dev for BF16 storage, 8 values per thread (one 16-byte load, one 8-byte
// store): the same codes, at memory speed. n8 = n / 8 (n a multiple of 8).
extern "C" __global__ void quantize_fp8_dev_x8(const __nv_bfloat16* __restrict__ x,
                                               unsigned char* __restrict__ q,
                                               unsigned long long n8,
                                               const float* __restrict__ scale, int fmt) {
    const float s = *scale;
    SD_GRID_STRIDE(i, n8) {
        reinterpret_cast<uint2*>(q)[i] = sd_fp8x8(reinterpret_cast<const uint4*>(x)[i], s, fmt);
    }
}

// y is f32 (the input of an f32 GEMM: scaled FP8 values need not be BF16 values).
extern "C" __global__ void dequantize_fp8(const unsigned char* __restrict__ q, float* __restrict__ y,
                                          unsigned long long n, float scale, int fmt) {
    SD_GRID_STRIDE(i, n) {
        const __half_raw h = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)q[i],
                                                     fmt == 0 ? __NV_E4M3 : __NV_E5M2);
        y[i] = __half2float(__half(h)) * scale;
    }
}

// FP8 codes -> the bfloat16 of their unscaled value (exact: every E4M3 and E5M2 value is a
// bfloat16), for the exact FP8 path on BF16 tensor cores.
extern "C" __global__ void fp8_to_bf16(const unsigned char* __restrict__ q,
                                       __nv_bfloat16* __restrict__ y, unsigned long long n,
                                       int fmt) {
    SD_GRID_STRIDE(i, n) {
        const __half_raw h = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)q[i],
                                                     fmt == 0 ? __NV_E4M3 : __NV_E5M2);
        y[i] = __float2bfloat16_rn(__half2float(__half(h)));
    }
}

// Weight-only FP8 linear (W8A16) for few input rows (adaLN modulation: one row per batch
// entry): y[m, o] = (sum_k x[m, k] * code(w[o, k])) * wscale[o] + bias[o], BF16 in and
// out, f32 accumulation. The GEMV is bound by reading the weights, so it reads the E4M3
// codes (half the bytes of BF16) 16 at a time and never widens them in memory. One warp
// per output channel; blockIdx.y takes input rows W8_ROWS at a time. Needs k % 16 == 0
// (16-byte code loads; rows of a cudaMalloc'd [n, k] array then stay 16-byte aligned).
#define W8_ROWS 4
#define W8_STEPS 4
extern "C" __global__ void linear_w8a16(const unsigned char* __restrict__ w,
                                        const float* __restrict__ wscale,
                                        const float* __restrict__ bias,
                                        const __nv_bfloat16* __restrict__ x,
                                        __nv_bfloat16* __restrict__ y, int m, int k, int n) {
    const int o = (int)(((unsigned long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    const int lane = threadIdx.x & 31;
    if (o >= n) return;
    const int m0 = blockIdx.y * W8_ROWS;
    const unsigned char* wr = w + (unsigned long long)o * k;
    float acc[W8_ROWS];
#pragma unroll
    for (int r = 0; r < W8_ROWS; ++r) acc[r] = 0.f;
    // A warp step covers 512 bytes of the row; W8_STEPS steps' codes are loaded before
    // any is used, so each lane has that many 16-byte loads in flight (one at a time
    // left the GEMV at ~40% of the memory bandwidth). The products are summed in the
    // same order as one step at a time.
    for (int kb = 0; kb < k; kb += W8_STEPS * 32 * 16) {
        uint4 codes[W8_STEPS];
#pragma unroll
        for (int u = 0; u < W8_STEPS; ++u) {
            const int k0 = kb + u * 32 * 16 + lane * 16;
            codes[u] = k0 < k ? *reinterpret_cast<const uint4*>(wr + k0) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < W8_STEPS; ++u) {
            const int k0 = kb + u * 32 * 16 + lane * 16;
            if (k0 >= k) break;
            const unsigned short* pairs = reinterpret_cast<const unsigned short*>(&codes[u]);
            float wv[16];
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const __half2_raw h2 =
                    __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)pairs[i], __NV_E4M3);
                const float2 f = __half22float2(__half2(h2));
                wv[2 * i] = f.x;
                wv[2 * i + 1] = f.y;
            }
#pragma unroll
            for (int r = 0; r < W8_ROWS; ++r) {
                if (m0 + r >= m) break;
                const uint4* xr =
                    reinterpret_cast<const uint4*>(x + (unsigned long long)(m0 + r) * k + k0);
                const uint4 xa = xr[0], xb = xr[1];
                const __nv_bfloat162* p0 = reinterpret_cast<const __nv_bfloat162*>(&xa);
                const __nv_bfloat162* p1 = reinterpret_cast<const __nv_bfloat162*>(&xb);
                float a = acc[r];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float2 u2 = __bfloat1622float2(p0[i]);
                    const float2 v2 = __bfloat1622float2(p1[i]);
                    a = fmaf(u2.x, wv[2 * i], a);
                    a = fmaf(u2.y, wv[2 * i + 1], a);
                    a = fmaf(v2.x, wv[8 + 2 * i], a);
                    a = fmaf(v2.y, wv[8 + 2 * i + 1], a);
                }
                acc[r] = a;
            }
        }
    }
#pragma unroll
    for (int r = 0; r < W8_ROWS; ++r) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], off);
    }
    if (lane == 0) {
        const float s = wscale[o], b = bias ? bias[o] : 0.f;
#pragma unroll
        for (int r = 0; r < W8_ROWS; ++r) {
            if (m0 + r < m) y[(unsigned long long)(m0 + r) * n + o] = __float2bfloat16_rn(fmaf(acc[r], s, b));
        }
    }
}

// E4M3 codes [rows, cols] times a per-row scale, rounded to BF16: a weight-only layer's
// weights for a BF16 GEMM when it meets too many input rows for linear_w8a16.
extern "C" __global__ void fp8_rows_to_bf16(const unsigned char* __restrict__ q,
                                            const float* __restrict__ row_scale,
                                            __nv_bfloat16* __restrict__ y, unsigned long long n,
                                            int cols) {
    SD_GRID_STRIDE(i, n) {
        const __half_raw h = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)q[i], __NV_E4M3);
        y[i] = __float2bfloat16_rn(__half2float(__half(h)) * row_scale[i / cols]);
    }
}
