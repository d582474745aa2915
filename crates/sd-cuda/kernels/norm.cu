// Row normalizations, one block per row (layer norm, RMS norm) or per (entry, group)
// (group norm). Statistics in f64 and the final arithmetic in the CPU backend's order, so
// that both round to the same f32 (and BF16) values almost always. Tensors (x, y, and the
// affine parameters g, b) are in storage type (sd_ld / sd_st).
#include <cuda_bf16.h>

extern "C" __global__ void layer_norm_f32(const void* __restrict__ x, const void* __restrict__ g,
                                          const void* __restrict__ b, void* __restrict__ y,
                                          int c, float eps, int r) {
    __shared__ double red[32];
    const unsigned long long row = (unsigned long long)blockIdx.x * c;
    double s = 0.0;
    for (int i = threadIdx.x; i < c; i += blockDim.x) s += (double)sd_ld(x, row + i, r);
    const double mean = sd_block_sum_d(s, red) / c;
    double v = 0.0;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        const double d = (double)sd_ld(x, row + i, r) - mean;
        v += d * d;
    }
    const double inv = 1.0 / sqrt(sd_block_sum_d(v, red) / c + (double)eps);
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        float o = (float)(((double)sd_ld(x, row + i, r) - mean) * inv);
        if (g) o *= sd_ld(g, i, r);
        if (b) o += sd_ld(b, i, r);
        sd_st(y, row + i, o, r);
    }
}

// LayerNorm without affine parameters fused with the adaLN modulation that follows it
// in every MMDiT block: one read of x, one write of y, the normalized row never stored.
// Each value is rounded where the two separate kernels round it (the norm's output to
// the storage type, then the modulated value), so y is bit-identical to layer_norm_f32
// followed by modulate_f32. shift/scale are [B, C]; rows_per_batch = S of x [B, S, C].
extern "C" __global__ void layer_norm_modulate_f32(const void* __restrict__ x,
                                                   const void* __restrict__ shift,
                                                   const void* __restrict__ scale,
                                                   void* __restrict__ y, int c, float eps,
                                                   unsigned long long rows_per_batch, int r) {
    __shared__ double red[32];
    const unsigned long long row = (unsigned long long)blockIdx.x * c;
    const unsigned long long mod = (blockIdx.x / rows_per_batch) * c;
    double s = 0.0;
    for (int i = threadIdx.x; i < c; i += blockDim.x) s += (double)sd_ld(x, row + i, r);
    const double mean = sd_block_sum_d(s, red) / c;
    double v = 0.0;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        const double d = (double)sd_ld(x, row + i, r) - mean;
        v += d * d;
    }
    const double inv = 1.0 / sqrt(sd_block_sum_d(v, red) / c + (double)eps);
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        const float o = sd_round((float)(((double)sd_ld(x, row + i, r) - mean) * inv), r);
        sd_st(y, row + i, o * (1.0f + sd_ld(scale, mod + i, r)) + sd_ld(shift, mod + i, r), r);
    }
}

// layer_norm_modulate_f32 for BF16 storage and rows of c % 8 == 0, c <= 16 * blockDim.x
// values (every SD3 width): each thread holds at most two 16-byte chunks of the row in
// registers, so x is read once; the same f64 statistics and final arithmetic.
extern "C" __global__ void layer_norm_modulate_bf16x8(const __nv_bfloat16* __restrict__ x,
                                                      const __nv_bfloat16* __restrict__ shift,
                                                      const __nv_bfloat16* __restrict__ scale,
                                                      __nv_bfloat16* __restrict__ y, int c,
                                                      float eps,
                                                      unsigned long long rows_per_batch) {
    __shared__ double red[32];
    const unsigned long long row = (unsigned long long)blockIdx.x * c;
    const unsigned long long mod = (blockIdx.x / rows_per_batch) * c;
    const int chunks = c / 8;
    float f[2][8];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
        const int ch = threadIdx.x + k * blockDim.x;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (ch < chunks) v = reinterpret_cast<const uint4*>(x + row)[ch];
        const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float2 a = __bfloat1622float2(h[j]);
            f[k][2 * j] = a.x;
            f[k][2 * j + 1] = a.y;
        }
    }
    double s = 0.0;
#pragma unroll
    for (int k = 0; k < 2; ++k)
#pragma unroll
        for (int j = 0; j < 8; ++j) s += (double)f[k][j];
    const double mean = sd_block_sum_d(s, red) / c;
    double v = 0.0;
#pragma unroll
    for (int k = 0; k < 2; ++k) {
        if ((int)threadIdx.x + k * (int)blockDim.x >= chunks) continue;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const double d = (double)f[k][j] - mean;
            v += d * d;
        }
    }
    const double inv = 1.0 / sqrt(sd_block_sum_d(v, red) / c + (double)eps);
#pragma unroll
    for (int k = 0; k < 2; ++k) {
        const int ch = threadIdx.x + k * blockDim.x;
        if (ch >= chunks) continue;
        const uint4 sa = reinterpret_cast<const uint4*>(scale + mod)[ch];
        const uint4 ha = reinterpret_cast<const uint4*>(shift + mod)[ch];
        const __nv_bfloat162* sh = reinterpret_cast<const __nv_bfloat162*>(&sa);
        const __nv_bfloat162* hh = reinterpret_cast<const __nv_bfloat162*>(&ha);
        uint4 o;
        unsigned* op = reinterpret_cast<unsigned*>(&o);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float2 sc = __bfloat1622float2(sh[j]), sf = __bfloat1622float2(hh[j]);
            const float n0 = sd_round((float)(((double)f[k][2 * j] - mean) * inv), 1);
            const float n1 = sd_round((float)(((double)f[k][2 * j + 1] - mean) * inv), 1);
            const __nv_bfloat162 r2 =
                __floats2bfloat162_rn(n0 * (1.0f + sc.x) + sf.x, n1 * (1.0f + sc.y) + sf.y);
            op[j] = *reinterpret_cast<const unsigned*>(&r2);
        }
        reinterpret_cast<uint4*>(y + row)[ch] = o;
    }
}

// The same for one warp per row (no block barriers: SD3's rows are short, and a block
// per row spent its time in the two block reductions). Each lane holds up to LN_CPL
// 16-byte chunks: c <= 256 * LN_CPL.
#define LN_CPL 10
// q (optional, may be null): the output's FP8 codes too, y / *qscale in format qfmt
// (the next linear layer's input quantization, the same codes as quantize_fp8_dev_x8
// would make from y).
extern "C" __global__ void __launch_bounds__(256, 2) layer_norm_modulate_warp_bf16x8(
    const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ shift,
    const __nv_bfloat16* __restrict__ scale, __nv_bfloat16* __restrict__ y,
    unsigned long long rows, int c, float eps, unsigned long long rows_per_batch,
    unsigned char* __restrict__ q, const float* __restrict__ qscale, int qfmt) {
    const unsigned long long rix = ((unsigned long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (rix >= rows) return;
    const unsigned long long row = rix * c;
    const unsigned long long mod = (rix / rows_per_batch) * c;
    const int chunks = c / 8;
    // The row stays packed (BF16 pairs) in registers and is widened at each use.
    uint4 raw[LN_CPL];
    double s = 0.0;
#pragma unroll
    for (int k = 0; k < LN_CPL; ++k) {
        const int ch = lane + 32 * k;
        raw[k] = make_uint4(0u, 0u, 0u, 0u);
        if (ch < chunks) raw[k] = reinterpret_cast<const uint4*>(x + row)[ch];
        const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw[k]);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float2 a = __bfloat1622float2(h[j]);
            s += (double)a.x + (double)a.y;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    const double mean = s / c;
    double v = 0.0;
#pragma unroll
    for (int k = 0; k < LN_CPL; ++k) {
        if (lane + 32 * k >= chunks) continue;
        const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw[k]);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float2 a = __bfloat1622float2(h[j]);
            const double d0 = (double)a.x - mean, d1 = (double)a.y - mean;
            v += d0 * d0;
            v += d1 * d1;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const double inv = 1.0 / sqrt(v / c + (double)eps);
#pragma unroll
    for (int k = 0; k < LN_CPL; ++k) {
        const int ch = lane + 32 * k;
        if (ch >= chunks) continue;
        const uint4 sa = reinterpret_cast<const uint4*>(scale + mod)[ch];
        const uint4 ha = reinterpret_cast<const uint4*>(shift + mod)[ch];
        const __nv_bfloat162* xh = reinterpret_cast<const __nv_bfloat162*>(&raw[k]);
        const __nv_bfloat162* sh = reinterpret_cast<const __nv_bfloat162*>(&sa);
        const __nv_bfloat162* hh = reinterpret_cast<const __nv_bfloat162*>(&ha);
        uint4 o;
        unsigned* op = reinterpret_cast<unsigned*>(&o);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float2 a = __bfloat1622float2(xh[j]);
            const float2 sc = __bfloat1622float2(sh[j]), sf = __bfloat1622float2(hh[j]);
            const float n0 = sd_round((float)(((double)a.x - mean) * inv), 1);
            const float n1 = sd_round((float)(((double)a.y - mean) * inv), 1);
            const __nv_bfloat162 r2 =
                __floats2bfloat162_rn(n0 * (1.0f + sc.x) + sf.x, n1 * (1.0f + sc.y) + sf.y);
            op[j] = *reinterpret_cast<const unsigned*>(&r2);
        }
        reinterpret_cast<uint4*>(y + row)[ch] = o;
        if (q) reinterpret_cast<uint2*>(q + row)[ch] = sd_fp8x8(o, *qscale, qfmt);
    }
}

// gated_add_bf16x8 then layer_norm_modulate_warp_bf16x8 of its result, one warp per row:
// r = x + gate * y is rounded and stored as the residual, and its BF16 values (what the
// two kernels would read back) feed the same f64 statistics and final arithmetic. q,
// qscale, qfmt: as layer_norm_modulate_warp_bf16x8's (codes of the normalized output).
extern "C" __global__ void __launch_bounds__(256, 2) gated_add_layer_norm_modulate_warp_bf16x8(
    const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ gate,
    const __nv_bfloat16* __restrict__ yv, const __nv_bfloat16* __restrict__ shift,
    const __nv_bfloat16* __restrict__ scale, __nv_bfloat16* __restrict__ res,
    __nv_bfloat16* __restrict__ y, unsigned long long rows, int c, float eps,
    unsigned long long rows_per_batch, unsigned char* __restrict__ q,
    const float* __restrict__ qscale, int qfmt) {
    const unsigned long long rix = ((unsigned long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (rix >= rows) return;
    const unsigned long long row = rix * c;
    const unsigned long long mod = (rix / rows_per_batch) * c;
    const int chunks = c / 8;
    uint4 raw[LN_CPL];
    double s = 0.0;
#pragma unroll
    for (int k = 0; k < LN_CPL; ++k) {
        const int ch = lane + 32 * k;
        raw[k] = make_uint4(0u, 0u, 0u, 0u);
        if (ch >= chunks) continue;
        const uint4 xa = reinterpret_cast<const uint4*>(x + row)[ch];
        const uint4 ya = reinterpret_cast<const uint4*>(yv + row)[ch];
        const uint4 ga = reinterpret_cast<const uint4*>(gate + mod)[ch];
        const __nv_bfloat162* xh = reinterpret_cast<const __nv_bfloat162*>(&xa);
        const __nv_bfloat162* yh = reinterpret_cast<const __nv_bfloat162*>(&ya);
        const __nv_bfloat162* gh = reinterpret_cast<const __nv_bfloat162*>(&ga);
        unsigned* rp = reinterpret_cast<unsigned*>(&raw[k]);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float2 a = __bfloat1622float2(xh[j]), b = __bfloat1622float2(yh[j]),
                         g = __bfloat1622float2(gh[j]);
            const __nv_bfloat162 r2 = __floats2bfloat162_rn(a.x + g.x * b.x, a.y + g.y * b.y);
            rp[j] = *reinterpret_cast<const unsigned*>(&r2);
            const float2 r = __bfloat1622float2(r2);
            s += (double)r.x + (double)r.y;
        }
        reinterpret_cast<uint4*>(res + row)[ch] = raw[k];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    const double mean = s / c;
    double v = 0.0;
#pragma unroll
    for (int k = 0; k < LN_CPL; ++k) {
        if (lane + 32 * k >= chunks) continue;
        const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw[k]);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float2 a = __bfloat1622float2(h[j]);
            const double d0 = (double)a.x - mean, d1 = (double)a.y - mean;
            v += d0 * d0;
            v += d1 * d1;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const double inv = 1.0 / sqrt(v / c + (double)eps);
#pragma unroll
    for (int k = 0; k < LN_CPL; ++k) {
        const int ch = lane + 32 * k;
        if (ch >= chunks) continue;
        const uint4 sa = reinterpret_cast<const uint4*>(scale + mod)[ch];
        const uint4 ha = reinterpret_cast<const uint4*>(shift + mod)[ch];
        const __nv_bfloat162* xh = reinterpret_cast<const __nv_bfloat162*>(&raw[k]);
        const __nv_bfloat162* sh = reinterpret_cast<const __nv_bfloat162*>(&sa);
        const __nv_bfloat162* hh = reinterpret_cast<const __nv_bfloat162*>(&ha);
        uint4 o;
        unsigned* op = reinterpret_cast<unsigned*>(&o);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float2 a = __bfloat1622float2(xh[j]);
            const float2 sc = __bfloat1622float2(sh[j]), sf = __bfloat1622float2(hh[j]);
            const float n0 = sd_round((float)(((double)a.x - mean) * inv), 1);
            const float n1 = sd_round((float)(((double)a.y - mean) * inv), 1);
            const __nv_bfloat162 r2 =
                __floats2bfloat162_rn(n0 * (1.0f + sc.x) + sf.x, n1 * (1.0f + sc.y) + sf.y);
            op[j] = *reinterpret_cast<const unsigned*>(&r2);
        }
        reinterpret_cast<uint4*>(y + row)[ch] = o;
        if (q) reinterpret_cast<uint2*>(q + row)[ch] = sd_fp8x8(o, *qscale, qfmt);
    }
}

extern "C" __global__ void rms_norm_f32(const void* __restrict__ x, const void* __restrict__ g,
                                        void* __restrict__ y, int c, float eps, int r) {
    __shared__ double red[32];
    const unsigned long long row = (unsigned long long)blockIdx.x * c;
    double s = 0.0;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        const double u = (double)sd_ld(x, row + i, r);
        s += u * u;
    }
    const float inv = (float)(1.0 / sqrt(sd_block_sum_d(s, red) / c + (double)eps));
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        sd_st(y, row + i, sd_ld(x, row + i, r) * inv * (g ? sd_ld(g, i, r) : 1.0f), r);
    }
}

// x [B, C, H, W]; block = (entry, group); cg channels of hw pixels each.
// The stored group-norm value, then SiLU of it when silu != 0 (group_norm_silu: the
// same values as the norm's stored output passed through the SiLU kernel).
__device__ __forceinline__ float gn_out(float v, int silu, int r) {
    if (!silu) return v;
    v = sd_round(v, r);
    return v / (1.0f + expf(-v));
}

extern "C" __global__ void group_norm_f32(const void* __restrict__ x, const void* __restrict__ g,
                                          const void* __restrict__ b, void* __restrict__ y,
                                          int groups, int cg, unsigned long long hw, float eps,
                                          int silu, int r) {
    __shared__ double red[32];
    const unsigned long long block = (unsigned long long)cg * hw;
    const unsigned long long base = blockIdx.x * block;
    const int grp = blockIdx.x % groups;
    double s = 0.0;
    for (unsigned long long i = threadIdx.x; i < block; i += blockDim.x) s += (double)sd_ld(x, base + i, r);
    const double mean = sd_block_sum_d(s, red) / (double)block;
    double v = 0.0;
    for (unsigned long long i = threadIdx.x; i < block; i += blockDim.x) {
        const double d = (double)sd_ld(x, base + i, r) - mean;
        v += d * d;
    }
    const double inv = 1.0 / sqrt(sd_block_sum_d(v, red) / (double)block + (double)eps);
    for (unsigned long long i = threadIdx.x; i < block; i += blockDim.x) {
        const int ch = grp * cg + (int)(i / hw);
        sd_st(y, base + i,
              gn_out((float)(((double)sd_ld(x, base + i, r) - mean) * inv) * sd_ld(g, ch, r) + sd_ld(b, ch, r),
                     silu, r),
              r);
    }
}

// RMS norm of short rows (c <= 1024), one warp per row: the same f64 statistics and
// final arithmetic as rms_norm_f32, without a block per 64-value row.
extern "C" __global__ void rms_norm_warp_f32(const void* __restrict__ x, const void* __restrict__ g,
                                             void* __restrict__ y, unsigned long long rows, int c,
                                             float eps, int r) {
    const unsigned long long row = ((unsigned long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const unsigned long long base = row * c;
    double s = 0.0;
    for (int i = lane; i < c; i += 32) {
        const double u = (double)sd_ld(x, base + i, r);
        s += u * u;
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    const float inv = (float)(1.0 / sqrt(s / c + (double)eps));
    for (int i = lane; i < c; i += 32)
        sd_st(y, base + i, sd_ld(x, base + i, r) * inv * (g ? sd_ld(g, i, r) : 1.0f), r);
}

// rms_norm_warp_f32 for BF16 storage and 64-value rows (SD3.5's per-head qk norm): 8
// threads per row, 8 values each (one 16-byte load and store), the same f64 statistics
// and final arithmetic. rows * 8 threads in all.
extern "C" __global__ void rms_norm_row64_bf16(const __nv_bfloat16* __restrict__ x,
                                               const __nv_bfloat16* __restrict__ g,
                                               __nv_bfloat16* __restrict__ y,
                                               unsigned long long rows, float eps) {
    const unsigned long long t = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned long long row = t >> 3;
    const int part = threadIdx.x & 7;
    // Whole octets of lanes stay together (blockDim is a multiple of 8), so the shuffles
    // below only mix lanes of one row; rows past the end compute on zeros and store nothing.
    const bool live = row < rows;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (live) v = reinterpret_cast<const uint4*>(x + row * 64)[part];
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
    float f[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float2 a = __bfloat1622float2(h[j]);
        f[2 * j] = a.x;
        f[2 * j + 1] = a.y;
    }
    double s = 0.0;
#pragma unroll
    for (int j = 0; j < 8; ++j) s += (double)f[j] * (double)f[j];
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    s += __shfl_xor_sync(0xffffffffu, s, 2);
    s += __shfl_xor_sync(0xffffffffu, s, 4);
    if (!live) return;
    const float inv = (float)(1.0 / sqrt(s / 64 + (double)eps));
    float gv[8];
    if (g) {
        const uint4 gw = reinterpret_cast<const uint4*>(g)[part];
        const __nv_bfloat162* gh = reinterpret_cast<const __nv_bfloat162*>(&gw);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float2 a = __bfloat1622float2(gh[j]);
            gv[2 * j] = a.x;
            gv[2 * j + 1] = a.y;
        }
    } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) gv[j] = 1.0f;
    }
    uint4 o;
    unsigned* op = reinterpret_cast<unsigned*>(&o);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const __nv_bfloat162 r2 =
            __floats2bfloat162_rn(f[2 * j] * inv * gv[2 * j], f[2 * j + 1] * inv * gv[2 * j + 1]);
        op[j] = *reinterpret_cast<const unsigned*>(&r2);
    }
    reinterpret_cast<uint4*>(y + row * 64)[part] = o;
}

// Group norm split over many blocks: grid (entry*group, chunks). Pass 1: f64 partial
// sums per chunk; pass 2: the mean (partials summed in order by one thread) and f64
// partial sums of squared deviations; pass 3: mean and 1/std from the partials, then
// the same final arithmetic as group_norm_f32.
__device__ __forceinline__ void gn_range(unsigned long long len, int chunks, unsigned long long* a,
                                         unsigned long long* b) {
    const unsigned long long per = (len + chunks - 1) / chunks;
    *a = per * blockIdx.y;
    *b = min(len, *a + per);
}

extern "C" __global__ void group_norm_sum(const void* __restrict__ x, double* __restrict__ part,
                                          unsigned long long len, int r) {
    __shared__ double red[32];
    const unsigned long long base = blockIdx.x * len;
    unsigned long long a, b;
    gn_range(len, gridDim.y, &a, &b);
    double s = 0.0;
    for (unsigned long long i = a + threadIdx.x; i < b; i += blockDim.x) s += (double)sd_ld(x, base + i, r);
    s = sd_block_sum_d(s, red);
    if (threadIdx.x == 0) part[blockIdx.x * gridDim.y + blockIdx.y] = s;
}

extern "C" __global__ void group_norm_var(const void* __restrict__ x, const double* __restrict__ psum,
                                          double* __restrict__ pvar, unsigned long long len, int r) {
    __shared__ double red[32];
    __shared__ double mean_s;
    const unsigned long long base = blockIdx.x * len;
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int j = 0; j < (int)gridDim.y; ++j) t += psum[blockIdx.x * gridDim.y + j];
        mean_s = t / (double)len;
    }
    __syncthreads();
    const double mean = mean_s;
    unsigned long long a, b;
    gn_range(len, gridDim.y, &a, &b);
    double v = 0.0;
    for (unsigned long long i = a + threadIdx.x; i < b; i += blockDim.x) {
        const double d = (double)sd_ld(x, base + i, r) - mean;
        v += d * d;
    }
    v = sd_block_sum_d(v, red);
    if (threadIdx.x == 0) pvar[blockIdx.x * gridDim.y + blockIdx.y] = v;
}

extern "C" __global__ void group_norm_apply(const void* __restrict__ x, const double* __restrict__ psum,
                                            const double* __restrict__ pvar, const void* __restrict__ g,
                                            const void* __restrict__ bta, void* __restrict__ y,
                                            int groups, int cg, unsigned long long hw, float eps,
                                            int silu, int r) {
    __shared__ double st[2];
    const unsigned long long len = (unsigned long long)cg * hw;
    if (threadIdx.x == 0) {
        double t = 0.0, v = 0.0;
        for (int j = 0; j < (int)gridDim.y; ++j) {
            t += psum[blockIdx.x * gridDim.y + j];
            v += pvar[blockIdx.x * gridDim.y + j];
        }
        st[0] = t / (double)len;
        st[1] = 1.0 / sqrt(v / (double)len + (double)eps);
    }
    __syncthreads();
    const double mean = st[0], inv = st[1];
    const unsigned long long base = blockIdx.x * len;
    const int grp = blockIdx.x % groups;
    unsigned long long a, b;
    gn_range(len, gridDim.y, &a, &b);
    for (unsigned long long i = a + threadIdx.x; i < b; i += blockDim.x) {
        const int ch = grp * cg + (int)(i / hw);
        sd_st(y, base + i,
              gn_out((float)(((double)sd_ld(x, base + i, r) - mean) * inv) * sd_ld(g, ch, r) + sd_ld(bta, ch, r),
                     silu, r),
              r);
    }
}

// Group norm of channels-last BF16 x [N, H*W, C] (the VAE between its cuDNN NHWC
// convolutions): a group is cg = C / groups adjacent channels of every pixel. Three
// passes, all deterministic (fixed summation orders):
//  1. group_norm_nhwc_stats, grid (N, chunks), block (C/8, 256 / (C/8)): every thread
//     sums its 8 channels (one 16-byte load a pixel) over a strided run of the chunk's
//     pixels, in f64 (sum and sum of squares); the block adds them per channel over its
//     pixel rows, then
//     per group over its channels, and writes the chunk's partials.
//  2. group_norm_nhwc_finalize: per (entry, group), the partials over the chunks in
//     order -> mean and 1/std in f64. The variance is E[x^2] - mean^2 (one pass over x
//     instead of the NCHW kernels' two): its f64 rounding error, relative to the
//     variance, is ~2^-52 * mean^2 / variance, far below the output's BF16 rounding for
//     activations; the result can still differ from the NCHW kernels' (two-pass, other
//     summation order) by one BF16 ulp in rare values.
//  3. group_norm_nhwc_apply: 8 channels a thread, the same final arithmetic as
//     group_norm_f32.
#define GN_NHWC_THREADS 256

__device__ __forceinline__ void gn_unpack8(const uint4& w, float* f) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&w);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float2 a = __bfloat1622float2(h[j]);
        f[2 * j] = a.x;
        f[2 * j + 1] = a.y;
    }
}

extern "C" __global__ void group_norm_nhwc_stats(const __nv_bfloat16* __restrict__ x,
                                                 double2* __restrict__ part, int c, int groups,
                                                 unsigned long long hw) {
    // Per thread, its 8 channels' (sum, sum of squares): acc[pixel_row * c + channel].
    __shared__ double2 acc[GN_NHWC_THREADS * 8];
    const int vecs = blockDim.x, rows = blockDim.y;
    const unsigned long long n = blockIdx.x;
    const unsigned long long per = (hw + gridDim.y - 1) / gridDim.y;
    const unsigned long long p0 = per * blockIdx.y;
    const unsigned long long p1 = min(hw, p0 + per);
    double s[8], q[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) s[j] = q[j] = 0.0;
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    for (unsigned long long p = p0 + threadIdx.y; p < p1; p += rows) {
        float f[8];
        gn_unpack8(xv[(n * hw + p) * vecs + threadIdx.x], f);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            s[j] += (double)f[j];
            q[j] += (double)f[j] * (double)f[j];
        }
    }
    const int base = threadIdx.y * c + threadIdx.x * 8;
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[base + j] = make_double2(s[j], q[j]);
    __syncthreads();
    const int cg = c / groups;
    for (int g = threadIdx.y * vecs + threadIdx.x; g < groups; g += vecs * rows) {
        double gs = 0.0, gq = 0.0;
        for (int ch = g * cg; ch < (g + 1) * cg; ++ch) {
            for (int y = 0; y < rows; ++y) {
                const double2 a = acc[y * c + ch];
                gs += a.x;
                gq += a.y;
            }
        }
        part[(n * gridDim.y + blockIdx.y) * groups + g] = make_double2(gs, gq);
    }
}

extern "C" __global__ void group_norm_nhwc_finalize(const double2* __restrict__ part,
                                                    double2* __restrict__ stats, int entries,
                                                    int groups, int chunks,
                                                    unsigned long long count, float eps) {
    SD_GRID_STRIDE(i, (unsigned long long)entries * groups) {
        const unsigned long long n = i / groups, g = i % groups;
        double s = 0.0, q = 0.0;
        for (int k = 0; k < chunks; ++k) {
            const double2 a = part[(n * chunks + k) * groups + g];
            s += a.x;
            q += a.y;
        }
        const double mean = s / (double)count;
        const double var = fmax(q / (double)count - mean * mean, 0.0);
        stats[i] = make_double2(mean, 1.0 / sqrt(var + (double)eps));
    }
}

extern "C" __global__ void group_norm_nhwc_apply(const __nv_bfloat16* __restrict__ x,
                                                 const double2* __restrict__ stats,
                                                 const __nv_bfloat16* __restrict__ g,
                                                 const __nv_bfloat16* __restrict__ b,
                                                 __nv_bfloat16* __restrict__ y,
                                                 unsigned long long vectors, int c, int groups,
                                                 unsigned long long hw, int silu) {
    const int vecs = c >> 3, cg = c / groups;
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    uint4* yv = reinterpret_cast<uint4*>(y);
    SD_GRID_STRIDE(i, vectors) {
        const int v = (int)(i % vecs);
        const unsigned long long n = i / vecs / hw;
        float f[8], gf[8], bf[8];
        gn_unpack8(xv[i], f);
        // gamma and beta of the 8 channels: one 16-byte load each (c % 8 == 0).
        gn_unpack8(reinterpret_cast<const uint4*>(g)[v], gf);
        gn_unpack8(reinterpret_cast<const uint4*>(b)[v], bf);
        uint4 o;
        __nv_bfloat16* oh = reinterpret_cast<__nv_bfloat16*>(&o);
        int grp = -1;
        double2 st = make_double2(0.0, 0.0);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int gj = (v * 8 + j) / cg;
            if (gj != grp) {
                grp = gj;
                st = stats[n * groups + gj];
            }
            const float val = gn_out((float)(((double)f[j] - st.x) * st.y) * gf[j] + bf[j], silu, 1);
            oh[j] = __float2bfloat16_rn(val);
        }
        yv[i] = o;
    }
}
