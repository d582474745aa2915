// Elementwise kernels: activations, broadcast arithmetic, adaLN modulation, gated
// residuals, guidance, Euler steps. Tensors in their storage type (BF16 when r, else f32,
// see sd_ld / sd_st), arithmetic in f32.
#include <cuda_bf16.h>

extern "C" __global__ void unary_f32(const void* __restrict__ x, void* __restrict__ y,
                                     unsigned long long n, int op, float a, float b, int r) {
    SD_GRID_STRIDE(i, n) {
        const float v = sd_ld(x, i, r);
        float o;
        switch (op) {
            case 1: o = v / (1.0f + expf(-v)); break;                              // SiLU
            case 2: o = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); break;  // GELU
            case 3: {                                                               // tanh GELU
                const float k = 0.7978846f;
                o = 0.5f * v * (1.0f + tanhf(k * (v + 0.044715f * v * v * v)));
                break;
            }
            case 4: o = v / (1.0f + expf(-1.702f * v)); break;  // quick GELU
            case 5: o = fmaxf(v, 0.0f); break;                  // ReLU
            case 6: o = v * a + b; break;                       // scale_shift
            default: o = v; break;                              // copy / round
        }
        sd_st(y, i, o, r);
    }
}

// op 0: a + b[i % period]; 1: a * b; 2: guidance a + s (b - a); 3: euler a + s b.
extern "C" __global__ void binary_f32(const void* __restrict__ a, const void* __restrict__ b,
                                      void* __restrict__ y, unsigned long long n,
                                      unsigned long long period, int op, float s, int r) {
    SD_GRID_STRIDE(i, n) {
        const float u = sd_ld(a, i, r);
        float o;
        switch (op) {
            case 0: o = u + sd_ld(b, i % period, r); break;
            case 1: o = u * sd_ld(b, i, r); break;
            case 2: o = u + s * (sd_ld(b, i, r) - u); break;
            default: o = u + s * sd_ld(b, i, r); break;
        }
        sd_st(y, i, o, r);
    }
}

// adaLN: x [B, S, C], shift/scale [B, C]; per = S * C.
extern "C" __global__ void modulate_f32(const void* __restrict__ x, const void* __restrict__ shift,
                                        const void* __restrict__ scale, void* __restrict__ y,
                                        unsigned long long n, unsigned long long per,
                                        unsigned long long c, int r) {
    SD_GRID_STRIDE(i, n) {
        const unsigned long long v = (i / per) * c + i % c;
        sd_st(y, i, sd_ld(x, i, r) * (1.0f + sd_ld(scale, v, r)) + sd_ld(shift, v, r), r);
    }
}

// Gated residual: x + gate[b, c] * yv.
extern "C" __global__ void gated_add_f32(const void* __restrict__ x, const void* __restrict__ gate,
                                         const void* __restrict__ yv, void* __restrict__ out,
                                         unsigned long long n, unsigned long long per,
                                         unsigned long long c, int r) {
    SD_GRID_STRIDE(i, n) {
        const unsigned long long v = (i / per) * c + i % c;
        sd_st(out, i, sd_ld(x, i, r) + sd_ld(gate, v, r) * sd_ld(yv, i, r), r);
    }
}

// gated_add_f32 for BF16 storage, 8 values per thread (16-byte accesses): the same
// arithmetic. Needs c % 8 == 0 (8 values never straddle a gate row); n8 = n / 8.
extern "C" __global__ void gated_add_bf16x8(const __nv_bfloat16* __restrict__ x,
                                            const __nv_bfloat16* __restrict__ gate,
                                            const __nv_bfloat16* __restrict__ yv,
                                            __nv_bfloat16* __restrict__ out,
                                            unsigned long long n8, unsigned long long per,
                                            unsigned long long c) {
    SD_GRID_STRIDE(i8, n8) {
        const unsigned long long i = i8 * 8;
        const unsigned long long v = (i / per) * c + i % c;
        const uint4 xa = reinterpret_cast<const uint4*>(x)[i8];
        const uint4 ya = reinterpret_cast<const uint4*>(yv)[i8];
        const uint4 ga = *reinterpret_cast<const uint4*>(gate + v);
        const __nv_bfloat162* xh = reinterpret_cast<const __nv_bfloat162*>(&xa);
        const __nv_bfloat162* yh = reinterpret_cast<const __nv_bfloat162*>(&ya);
        const __nv_bfloat162* gh = reinterpret_cast<const __nv_bfloat162*>(&ga);
        uint4 o;
        unsigned* op = reinterpret_cast<unsigned*>(&o);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float2 a = __bfloat1622float2(xh[j]), b = __bfloat1622float2(yh[j]),
                         g = __bfloat1622float2(gh[j]);
            const __nv_bfloat162 r2 = __floats2bfloat162_rn(a.x + g.x * b.x, a.y + g.y * b.y);
            op[j] = *reinterpret_cast<const unsigned*>(&r2);
        }
        reinterpret_cast<uint4*>(out)[i8] = o;
    }
}

// GEMM epilogue of a linear layer: y = d * colscale[c] + bias[c] (either may be null);
// d (the GEMM's f32 output), colscale and bias are f32, y is a tensor in storage type.
extern "C" __global__ void linear_epilogue_f32(const float* __restrict__ d,
                                               const float* __restrict__ colscale,
                                               const float* __restrict__ bias,
                                               void* __restrict__ y, unsigned long long n,
                                               unsigned long long cols, int r) {
    SD_GRID_STRIDE(i, n) {
        const unsigned long long c = i % cols;
        float v = d[i];
        if (colscale) v *= colscale[c];
        if (bias) v += bias[c];
        sd_st(y, i, v, r);
    }
}

// Conv bias: y[i] = d[i] + bias[(i / plane) % channels], d the GEMM's f32 output, bias
// (may be null) and y tensors in storage type.
extern "C" __global__ void channel_bias_f32(const float* __restrict__ d, const void* __restrict__ bias,
                                            void* __restrict__ y, unsigned long long n,
                                            unsigned long long plane, unsigned long long channels,
                                            int r) {
    SD_GRID_STRIDE(i, n) {
        float v = d[i];
        if (bias) v += sd_ld(bias, (i / plane) % channels, r);
        sd_st(y, i, v, r);
    }
}

// Fills y [B, C, plane] with bias[c]: a convolution's bias, into which cuDNN then adds
// the convolution (beta = 1) instead of a separate bias pass over its output.
extern "C" __global__ void channel_fill(const void* __restrict__ bias, void* __restrict__ y,
                                        unsigned long long n, unsigned long long plane,
                                        unsigned long long channels, int r) {
    SD_GRID_STRIDE(i, n) { sd_cp(y, i, bias, (i / plane) % channels, r); }
}

extern "C" __global__ void f32_to_bf16(const float* __restrict__ x, __nv_bfloat16* __restrict__ y,
                                       unsigned long long n) {
    SD_GRID_STRIDE(i, n) { y[i] = __float2bfloat16_rn(x[i]); }
}
