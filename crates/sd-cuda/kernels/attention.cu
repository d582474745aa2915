// Multi-head attention, straightforward and exact: one warp per (entry, head, query),
// softmax in the CPU backend's order (max, f64 sum, normalized weights times V), the
// output accumulated in f32 registers (PL values per lane, head dim <= 32 * PL).
// q [B, Sq, H*D], k/v [B, Sk, H*D], bias [H, Sq, Sk].
// The fast (flash) kernel is a later issue; this one is the reference on the GPU.
#include <cuda_bf16.h>

// q . k of one key, summed over the warp, scaled, plus the bias.
template <int PL>
__device__ __forceinline__ float attention_score(const float (&qv)[PL], const float* kr, int d,
                                                 int lane, float scale, const float* br, int t) {
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < PL; ++j) {
        const int e = lane + 32 * j;
        if (e < d) s = fmaf(qv[j], kr[e], s);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    s *= scale;
    if (br) s += br[t];
    return s;
}

template <int PL>
__device__ __forceinline__ void attention_impl(const float* __restrict__ q,
                                               const float* __restrict__ k,
                                               const float* __restrict__ v,
                                               const float* __restrict__ bias,
                                               float* __restrict__ out, int batch, int sq,
                                               int sk, int heads, int d, float scale,
                                               int causal, int r) {
    const unsigned long long warp =
        ((unsigned long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (warp >= (unsigned long long)batch * heads * sq) return;
    const int i = (int)(warp % sq);
    const int h = (int)((warp / sq) % heads);
    const int bi = (int)(warp / ((unsigned long long)sq * heads));
    const unsigned long long c = (unsigned long long)heads * d;
    const float* qr = q + ((unsigned long long)bi * sq + i) * c + (unsigned long long)h * d;
    const float* kb = k + (unsigned long long)bi * sk * c + (unsigned long long)h * d;
    const float* vb = v + (unsigned long long)bi * sk * c + (unsigned long long)h * d;
    const float* br = bias ? bias + ((unsigned long long)h * sq + i) * sk : nullptr;
    float qv[PL], acc[PL];
#pragma unroll
    for (int j = 0; j < PL; ++j) {
        const int e = lane + 32 * j;
        qv[j] = e < d ? qr[e] : 0.0f;
        acc[j] = 0.0f;
    }
    // Three passes over the keys, in the CPU backend's order: the row maximum, then the
    // f64 sum of exp(s - max), then sum_t (exp(s_t - max) * (1 / sum)) v_t.
    const int kend = causal ? min(sk, i + 1) : sk;
    float m = -__int_as_float(0x7f800000);
    for (int t = 0; t < kend; ++t) {
        m = fmaxf(m, attention_score<PL>(qv, kb + (unsigned long long)t * c, d, lane, scale, br, t));
    }
    double sum = 0.0;
    for (int t = 0; t < kend; ++t) {
        sum += (double)expf(attention_score<PL>(qv, kb + (unsigned long long)t * c, d, lane, scale, br, t) - m);
    }
    const float inv = (float)(1.0 / sum);
    for (int t = 0; t < kend; ++t) {
        const float p =
            expf(attention_score<PL>(qv, kb + (unsigned long long)t * c, d, lane, scale, br, t) - m) * inv;
        const float* vr = vb + (unsigned long long)t * c;
#pragma unroll
        for (int j = 0; j < PL; ++j) {
            const int e = lane + 32 * j;
            if (e < d) acc[j] = fmaf(p, vr[e], acc[j]);
        }
    }
    float* orow = out + ((unsigned long long)bi * sq + i) * c + (unsigned long long)h * d;
#pragma unroll
    for (int j = 0; j < PL; ++j) {
        const int e = lane + 32 * j;
        if (e < d) orow[e] = sd_round(acc[j], r);
    }
}

#define SD_ATTENTION(PL)                                                                      \
    extern "C" __global__ void attention_pl##PL(                                              \
        const float* q, const float* k, const float* v, const float* bias, float* out,        \
        int batch, int sq, int sk, int heads, int d, float scale, int causal, int r) {        \
        attention_impl<PL>(q, k, v, bias, out, batch, sq, sk, heads, d, scale, causal, r);     \
    }
SD_ATTENTION(1)
SD_ATTENTION(2)
SD_ATTENTION(4)
SD_ATTENTION(8)
SD_ATTENTION(16)
SD_ATTENTION(32)

// ---- Flash attention (FlashAttention-2 style), head dim 64, no mask, no bias --------
// q [B, Sq, H*64], k/v [B, Sk, H*64] f32 (BF16 values in BF16/FP8 precision); the dot
// products run on BF16 tensor cores (mma.sync m16n8k16, f32 accumulation), the softmax
// is online in f32 (base 2). A block of WARPS warps takes WARPS * 16 * MT queries of one
// (entry, head), each warp MT m-tiles of 16 rows. Keys and values pass through shared
// memory 64 at a time, as BF16 (K row-major [key][d], V transposed [d][key], rows padded
// to 72 to avoid bank conflicts). The P fragments are reused from the S accumulators in
// registers.
#define FA_D 64
#define FA_BK 64
#define FA_LD 72

__device__ __forceinline__ unsigned fa_pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

__device__ __forceinline__ void fa_mma(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                       unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float fa_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// WARPS warps per block, MT m-tiles of 16 query rows per warp (a loaded K/V fragment
// feeds MT tensor-core ops: MT = 2 halves the shared-memory traffic per FLOP).
template <int WARPS, int MT>
__device__ __forceinline__ void flash_impl(const float* __restrict__ q, const float* __restrict__ k,
                                           const float* __restrict__ v, float* __restrict__ out,
                                           int sq, int sk, int heads, float scale, int r) {
    constexpr int NT = WARPS * 32;
    constexpr int BQ = WARPS * 16 * MT;
    constexpr int KIT = 1024 / NT;  // float4s of the K tile per thread
    constexpr int VIT = 512 / NT;   // key pairs x float4 of the V tile per thread
    __shared__ __align__(16) __nv_bfloat16 ks[FA_BK * FA_LD];
    __shared__ __align__(16) __nv_bfloat16 vt[FA_D * FA_LD];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int h = blockIdx.y, bi = blockIdx.z;
    const unsigned long long c = (unsigned long long)heads * FA_D;
    const float* qb = q + (unsigned long long)bi * sq * c + (unsigned long long)h * FA_D;
    const float* kb = k + (unsigned long long)bi * sk * c + (unsigned long long)h * FA_D;
    const float* vb = v + (unsigned long long)bi * sk * c + (unsigned long long)h * FA_D;
    const int q0 = blockIdx.x * BQ + warp * 16 * MT;

    unsigned qa[MT][4][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        const int rA = q0 + mt * 16 + g, rB = rA + 8;
#pragma unroll
        for (int ks_ = 0; ks_ < 4; ++ks_) {
            const int d0 = ks_ * 16 + 2 * t;
            float2 x0 = rA < sq ? *reinterpret_cast<const float2*>(qb + (unsigned long long)rA * c + d0) : make_float2(0.f, 0.f);
            float2 x1 = rB < sq ? *reinterpret_cast<const float2*>(qb + (unsigned long long)rB * c + d0) : make_float2(0.f, 0.f);
            float2 x2 = rA < sq ? *reinterpret_cast<const float2*>(qb + (unsigned long long)rA * c + d0 + 8) : make_float2(0.f, 0.f);
            float2 x3 = rB < sq ? *reinterpret_cast<const float2*>(qb + (unsigned long long)rB * c + d0 + 8) : make_float2(0.f, 0.f);
            qa[mt][ks_][0] = fa_pack(x0.x, x0.y);
            qa[mt][ks_][1] = fa_pack(x1.x, x1.y);
            qa[mt][ks_][2] = fa_pack(x2.x, x2.y);
            qa[mt][ks_][3] = fa_pack(x3.x, x3.y);
        }
    }
    float o[MT][8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < 8; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
    const float NEG_INF = -__int_as_float(0x7f800000);
    float mA[MT], mB[MT], lA[MT], lB[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        mA[mt] = mB[mt] = NEG_INF;
        lA[mt] = lB[mt] = 0.f;
    }
    const float sl2 = scale * 1.4426950408889634f;

    // Register prefetch: the next tile's K/V values are loaded from global memory while
    // the current tile is computed, then converted and stored to shared memory.
    float4 kreg[KIT], vreg0[VIT], vreg1[VIT];
    auto load_tile = [&](int k0) {
#pragma unroll
        for (int it = 0; it < KIT; ++it) {
            const int idx = it * NT + tid;  // 0..1023: 64 keys x 16 float4
            const int key = idx >> 4, d4 = (idx & 15) * 4;
            kreg[it] = k0 + key < sk
                           ? *reinterpret_cast<const float4*>(kb + (unsigned long long)(k0 + key) * c + d4)
                           : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int it = 0; it < VIT; ++it) {
            const int idx = it * NT + tid;  // 0..511: 32 key pairs x 16 float4
            const int key = 2 * (idx >> 4), d4 = (idx & 15) * 4;
            vreg0[it] = k0 + key < sk
                            ? *reinterpret_cast<const float4*>(vb + (unsigned long long)(k0 + key) * c + d4)
                            : make_float4(0.f, 0.f, 0.f, 0.f);
            vreg1[it] = k0 + key + 1 < sk
                            ? *reinterpret_cast<const float4*>(vb + (unsigned long long)(k0 + key + 1) * c + d4)
                            : make_float4(0.f, 0.f, 0.f, 0.f);
        }
    };
    load_tile(0);
    for (int k0 = 0; k0 < sk; k0 += FA_BK) {
        __syncthreads();
#pragma unroll
        for (int it = 0; it < KIT; ++it) {
            const int idx = it * NT + tid;
            const int key = idx >> 4, d4 = (idx & 15) * 4;
            unsigned* dst = reinterpret_cast<unsigned*>(ks + key * FA_LD + d4);
            dst[0] = fa_pack(kreg[it].x, kreg[it].y);
            dst[1] = fa_pack(kreg[it].z, kreg[it].w);
        }
#pragma unroll
        for (int it = 0; it < VIT; ++it) {
            const int idx = it * NT + tid;
            const int key = 2 * (idx >> 4), d4 = (idx & 15) * 4;
            const float4 x = vreg0[it], y = vreg1[it];
            *reinterpret_cast<unsigned*>(vt + (d4 + 0) * FA_LD + key) = fa_pack(x.x, y.x);
            *reinterpret_cast<unsigned*>(vt + (d4 + 1) * FA_LD + key) = fa_pack(x.y, y.y);
            *reinterpret_cast<unsigned*>(vt + (d4 + 2) * FA_LD + key) = fa_pack(x.z, y.z);
            *reinterpret_cast<unsigned*>(vt + (d4 + 3) * FA_LD + key) = fa_pack(x.w, y.w);
        }
        __syncthreads();
        if (k0 + FA_BK < sk) load_tile(k0 + FA_BK);
        // S = Q K^T: 8 n-tiles of 8 keys, each K fragment used by MT m-tiles.
        float s[MT][8][4];
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
            const __nv_bfloat16* kr = ks + (nt * 8 + g) * FA_LD + 2 * t;
#pragma unroll
            for (int ks_ = 0; ks_ < 4; ++ks_) {
                const unsigned b0 = *reinterpret_cast<const unsigned*>(kr + ks_ * 16);
                const unsigned b1 = *reinterpret_cast<const unsigned*>(kr + ks_ * 16 + 8);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) fa_mma(s[mt][nt], qa[mt][ks_], b0, b1);
            }
        }
        // Online softmax (base 2) per m-tile, rows rA (s[.][0..1]) and rB (s[.][2..3]).
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            float mxA = NEG_INF, mxB = NEG_INF;
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                const int key = k0 + nt * 8 + 2 * t;
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const bool ok = key + e < sk;
                    s[mt][nt][e] = ok ? s[mt][nt][e] * sl2 : NEG_INF;
                    s[mt][nt][2 + e] = ok ? s[mt][nt][2 + e] * sl2 : NEG_INF;
                    mxA = fmaxf(mxA, s[mt][nt][e]);
                    mxB = fmaxf(mxB, s[mt][nt][2 + e]);
                }
            }
            mxA = fmaxf(mxA, __shfl_xor_sync(0xffffffffu, mxA, 1));
            mxA = fmaxf(mxA, __shfl_xor_sync(0xffffffffu, mxA, 2));
            mxB = fmaxf(mxB, __shfl_xor_sync(0xffffffffu, mxB, 1));
            mxB = fmaxf(mxB, __shfl_xor_sync(0xffffffffu, mxB, 2));
            const float nmA = fmaxf(mA[mt], mxA), nmB = fmaxf(mB[mt], mxB);
            const float alA = fa_exp2(mA[mt] - nmA), alB = fa_exp2(mB[mt] - nmB);
            mA[mt] = nmA;
            mB[mt] = nmB;
            float sumA = 0.f, sumB = 0.f;
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                s[mt][nt][0] = fa_exp2(s[mt][nt][0] - nmA);
                s[mt][nt][1] = fa_exp2(s[mt][nt][1] - nmA);
                s[mt][nt][2] = fa_exp2(s[mt][nt][2] - nmB);
                s[mt][nt][3] = fa_exp2(s[mt][nt][3] - nmB);
                sumA += s[mt][nt][0] + s[mt][nt][1];
                sumB += s[mt][nt][2] + s[mt][nt][3];
            }
            lA[mt] = lA[mt] * alA + sumA;
            lB[mt] = lB[mt] * alB + sumB;
#pragma unroll
            for (int dn = 0; dn < 8; ++dn) {
                o[mt][dn][0] *= alA;
                o[mt][dn][1] *= alA;
                o[mt][dn][2] *= alB;
                o[mt][dn][3] *= alB;
            }
        }
        // O += P V: 4 k-steps of 16 keys, 8 n-tiles of 8 dims; each V fragment used MT times.
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            unsigned pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                pa[mt][0] = fa_pack(s[mt][2 * j][0], s[mt][2 * j][1]);
                pa[mt][1] = fa_pack(s[mt][2 * j][2], s[mt][2 * j][3]);
                pa[mt][2] = fa_pack(s[mt][2 * j + 1][0], s[mt][2 * j + 1][1]);
                pa[mt][3] = fa_pack(s[mt][2 * j + 1][2], s[mt][2 * j + 1][3]);
            }
#pragma unroll
            for (int dn = 0; dn < 8; ++dn) {
                const __nv_bfloat16* vr = vt + (dn * 8 + g) * FA_LD + j * 16 + 2 * t;
                const unsigned b0 = *reinterpret_cast<const unsigned*>(vr);
                const unsigned b1 = *reinterpret_cast<const unsigned*>(vr + 8);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) fa_mma(o[mt][dn], pa[mt], b0, b1);
            }
        }
    }
    float* ob = out + (unsigned long long)bi * sq * c + (unsigned long long)h * FA_D;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        float la = lA[mt], lb = lB[mt];
        la += __shfl_xor_sync(0xffffffffu, la, 1);
        la += __shfl_xor_sync(0xffffffffu, la, 2);
        lb += __shfl_xor_sync(0xffffffffu, lb, 1);
        lb += __shfl_xor_sync(0xffffffffu, lb, 2);
        const float iA = 1.0f / la, iB = 1.0f / lb;
        const int rA = q0 + mt * 16 + g, rB = rA + 8;
#pragma unroll
        for (int dn = 0; dn < 8; ++dn) {
            const int d0 = dn * 8 + 2 * t;
            if (rA < sq)
                *reinterpret_cast<float2*>(ob + (unsigned long long)rA * c + d0) =
                    make_float2(sd_round(o[mt][dn][0] * iA, r), sd_round(o[mt][dn][1] * iA, r));
            if (rB < sq)
                *reinterpret_cast<float2*>(ob + (unsigned long long)rB * c + d0) =
                    make_float2(sd_round(o[mt][dn][2] * iB, r), sd_round(o[mt][dn][3] * iB, r));
        }
    }
}

// Variants: flash_attn_d64 (8 warps x 16 rows = 128 queries per block),
// flash_attn_d64_w8m2 (8 warps x 32 rows = 256), flash_attn_d64_w4m2 (4 warps x 32 = 128).
extern "C" __global__ void __launch_bounds__(256) flash_attn_d64(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    float* __restrict__ out, int sq, int sk, int heads, float scale, int r) {
    flash_impl<8, 1>(q, k, v, out, sq, sk, heads, scale, r);
}
extern "C" __global__ void __launch_bounds__(256) flash_attn_d64_w8m2(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    float* __restrict__ out, int sq, int sk, int heads, float scale, int r) {
    flash_impl<8, 2>(q, k, v, out, sq, sk, heads, scale, r);
}
extern "C" __global__ void __launch_bounds__(128) flash_attn_d64_w4m2(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    float* __restrict__ out, int sq, int sk, int heads, float scale, int r) {
    flash_impl<4, 2>(q, k, v, out, sq, sk, heads, scale, r);
}

// Row softmax for the GEMM attention path (large head dims: the VAE's single 512-wide
// head): s [rows, n] f32 scores (already scaled) -> p [rows, n] BF16 probabilities, in
// the exact kernel's order (max, f64 sum, exp(s - max) * (1 / sum)). One block per row.
extern "C" __global__ void softmax_rows_bf16(const float* __restrict__ s, __nv_bfloat16* __restrict__ p,
                                             int n) {
    __shared__ float redf[32];
    __shared__ double redd[32];
    const float* row = s + (unsigned long long)blockIdx.x * n;
    __nv_bfloat16* out = p + (unsigned long long)blockIdx.x * n;
    float m = -__int_as_float(0x7f800000);
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, row[i]);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) redf[warp] = m;
    __syncthreads();
    m = lane < (int)(blockDim.x >> 5) ? redf[lane] : -__int_as_float(0x7f800000);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    double sum = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) sum += (double)expf(row[i] - m);
    const float inv = (float)(1.0 / sd_block_sum_d(sum, redd));
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = __float2bfloat16_rn(expf(row[i] - m) * inv);
}
