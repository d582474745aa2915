// Shared helpers for every kernel source (prepended by the Rust side; no include).
#include <cuda_fp8.h>
#define SD_GRID_STRIDE(i, n) \
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; \
         i < (n); i += (unsigned long long)blockDim.x * gridDim.x)

// Rounds to the nearest bfloat16 (ties to even) when r != 0: what the CPU backend's
// BF16 mode does to every operation's output.
__device__ __forceinline__ float sd_round(float x, int r) {
    return r ? __bfloat162float(__float2bfloat16_rn(x)) : x;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float sd_block_sum(float v, float* shared32) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared32[warp] = v;
    __syncthreads();
    const int warps = blockDim.x >> 5;
    float t = lane < warps ? shared32[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    return t;
}

// Double-precision block sum (the CPU backend's norms accumulate in f64).
__device__ __forceinline__ double sd_block_sum_d(double v, double* shared32) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared32[warp] = v;
    __syncthreads();
    const int warps = blockDim.x >> 5;
    double t = lane < warps ? shared32[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    return t;
}

// Tensor storage. In BF16/FP8 precision (r != 0) every tensor value is BF16-rounded, so
// tensors are stored as bfloat16 bits: nothing is lost and every memory-bound kernel moves
// half the bytes. In F32 precision (r == 0) they are f32. The branch is uniform per launch.
__device__ __forceinline__ float sd_ld(const void* p, unsigned long long i, int r) {
    return r ? __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p)[i])
             : reinterpret_cast<const float*>(p)[i];
}

// Stores v (rounded to nearest even BF16 when r != 0: the CPU backend's BF16 rounding).
__device__ __forceinline__ void sd_st(void* p, unsigned long long i, float v, int r) {
    if (r) {
        reinterpret_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
    } else {
        reinterpret_cast<float*>(p)[i] = v;
    }
}

// Copies one stored element (2 or 4 bytes) without converting it.
__device__ __forceinline__ void sd_cp(void* d, unsigned long long di, const void* s,
                                      unsigned long long si, int r) {
    if (r) {
        reinterpret_cast<unsigned short*>(d)[di] = reinterpret_cast<const unsigned short*>(s)[si];
    } else {
        reinterpret_cast<unsigned*>(d)[di] = reinterpret_cast<const unsigned*>(s)[si];
    }
}

// Eight BF16 values (one 16-byte vector) -> their FP8 codes (8 bytes): x / s (IEEE
// division) rounded to nearest even and saturated to the largest finite value (ONNX
// QuantizeLinear, saturate=1); fmt 0 = E4M3 (FN), 1 = E5M2. The quantize kernel and the
// norms that also write their output's codes both use it, so their codes are the same.
__device__ __forceinline__ uint2 sd_fp8x8(const uint4& v, float s, int fmt) {
    const __nv_fp8_interpretation_t f = fmt == 0 ? __NV_E4M3 : __NV_E5M2;
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
    unsigned short pairs[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float2 a = __bfloat1622float2(h[j]);
        pairs[j] = __nv_cvt_float2_to_fp8x2(make_float2(a.x / s, a.y / s), __NV_SATFINITE, f);
    }
    uint2 out;
    out.x = (unsigned)pairs[0] | ((unsigned)pairs[1] << 16);
    out.y = (unsigned)pairs[2] | ((unsigned)pairs[3] << 16);
    return out;
}
