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
