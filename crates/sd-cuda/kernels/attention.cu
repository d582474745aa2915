// Multi-head attention, straightforward and exact: one warp per (entry, head, query),
// softmax in the CPU backend's order (max, f64 sum, normalized weights times V), the
// output accumulated in f32 registers (PL values per lane, head dim <= 32 * PL).
// q [B, Sq, H*D], k/v [B, Sk, H*D], bias [H, Sq, Sk], all in storage type (sd_ld).
// The fast (flash) kernel is a later issue; this one is the reference on the GPU.
#include <cuda_bf16.h>

// q . k of one key, summed over the warp, scaled, plus the bias.
template <int PL>
__device__ __forceinline__ float attention_score(const float (&qv)[PL], const void* k,
                                                 unsigned long long kr, int d, int lane,
                                                 float scale, const void* bias,
                                                 unsigned long long br, int t, int r) {
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < PL; ++j) {
        const int e = lane + 32 * j;
        if (e < d) s = fmaf(qv[j], sd_ld(k, kr + e, r), s);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    s *= scale;
    if (bias) s += sd_ld(bias, br + t, r);
    return s;
}

template <int PL>
__device__ __forceinline__ void attention_impl(const void* __restrict__ q,
                                               const void* __restrict__ k,
                                               const void* __restrict__ v,
                                               const void* __restrict__ bias,
                                               void* __restrict__ out, int batch, int sq,
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
    const unsigned long long qr = ((unsigned long long)bi * sq + i) * c + (unsigned long long)h * d;
    const unsigned long long kb = (unsigned long long)bi * sk * c + (unsigned long long)h * d;
    const unsigned long long br = ((unsigned long long)h * sq + i) * sk;
    float qv[PL], acc[PL];
#pragma unroll
    for (int j = 0; j < PL; ++j) {
        const int e = lane + 32 * j;
        qv[j] = e < d ? sd_ld(q, qr + e, r) : 0.0f;
        acc[j] = 0.0f;
    }
    // Three passes over the keys, in the CPU backend's order: the row maximum, then the
    // f64 sum of exp(s - max), then sum_t (exp(s_t - max) * (1 / sum)) v_t.
    const int kend = causal ? min(sk, i + 1) : sk;
    float m = -__int_as_float(0x7f800000);
    for (int t = 0; t < kend; ++t) {
        m = fmaxf(m, attention_score<PL>(qv, k, kb + (unsigned long long)t * c, d, lane, scale, bias, br, t, r));
    }
    double sum = 0.0;
    for (int t = 0; t < kend; ++t) {
        sum += (double)expf(attention_score<PL>(qv, k, kb + (unsigned long long)t * c, d, lane, scale, bias, br, t, r) - m);
    }
    const float inv = (float)(1.0 / sum);
    for (int t = 0; t < kend; ++t) {
        const float p =
            expf(attention_score<PL>(qv, k, kb + (unsigned long long)t * c, d, lane, scale, bias, br, t, r) - m) * inv;
        const unsigned long long vr = kb + (unsigned long long)t * c;
#pragma unroll
        for (int j = 0; j < PL; ++j) {
            const int e = lane + 32 * j;
            if (e < d) acc[j] = fmaf(p, sd_ld(v, vr + e, r), acc[j]);
        }
    }
#pragma unroll
    for (int j = 0; j < PL; ++j) {
        const int e = lane + 32 * j;
        if (e < d) sd_st(out, qr + e, acc[j], r);
    }
}

#define SD_ATTENTION(PL)                                                                      \
    extern "C" __global__ void attention_pl##PL(                                              \
        const void* q, const void* k, const void* v, const void* bias, void* out,             \
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
// q [B, Sq, H*64], k/v [B, Sk, H*64] and the output stored as BF16 (BF16/FP8 precision); the dot
// products run on BF16 tensor cores (mma.sync m16n8k16, f32 accumulation), the softmax
// is online in f32 (base 2). A block of WARPS warps takes WARPS * 16 * MT queries of one
// (entry, head), each warp MT m-tiles of 16 rows. Keys and values pass through shared
// memory 64 at a time, as stored (BF16, row-major [key][d], rows padded to 72 so that the
// 8 row addresses of an ldmatrix phase hit distinct banks); the tensor-core B fragments
// come from ldmatrix (K) and ldmatrix.trans (V: no transposing store, which was 8-way
// bank-conflicted). The P fragments are reused from the S accumulators in registers.
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

// Four 8x8 BF16 matrices from shared memory; lane l gives the address of row l % 8 of
// matrix l / 8. Without .trans lane (g, t) gets row g, columns 2t, 2t+1 of each matrix;
// with .trans it gets rows 2t, 2t+1 of column g.
__device__ __forceinline__ void fa_ldm4(unsigned (&r)[4], const __nv_bfloat16* p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

__device__ __forceinline__ void fa_ldm4t(unsigned (&r)[4], const __nv_bfloat16* p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

__device__ __forceinline__ float fa_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// WARPS warps per block, MT m-tiles of 16 query rows per warp (a loaded K/V fragment
// feeds MT tensor-core ops: MT = 2 halves the shared-memory traffic per FLOP).
template <int WARPS, int MT>
__device__ __forceinline__ void flash_impl(const __nv_bfloat16* __restrict__ q,
                                           const __nv_bfloat16* __restrict__ k,
                                           const __nv_bfloat16* __restrict__ v,
                                           __nv_bfloat16* __restrict__ out, int sq, int sk,
                                           int heads, float scale) {
    constexpr int NT = WARPS * 32;
    constexpr int BQ = WARPS * 16 * MT;
    constexpr int KIT = 512 / NT;  // uint4s (8 BF16) of the K (and of the V) tile per thread
    __shared__ __align__(16) __nv_bfloat16 ks[FA_BK * FA_LD];
    __shared__ __align__(16) __nv_bfloat16 vs[FA_BK * FA_LD];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int h = blockIdx.y, bi = blockIdx.z;
    const unsigned long long c = (unsigned long long)heads * FA_D;
    const __nv_bfloat16* qb = q + (unsigned long long)bi * sq * c + (unsigned long long)h * FA_D;
    const __nv_bfloat16* kb = k + (unsigned long long)bi * sk * c + (unsigned long long)h * FA_D;
    const __nv_bfloat16* vb = v + (unsigned long long)bi * sk * c + (unsigned long long)h * FA_D;
    const int q0 = blockIdx.x * BQ + warp * 16 * MT;

    unsigned qa[MT][4][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        const int rA = q0 + mt * 16 + g, rB = rA + 8;
#pragma unroll
        for (int ks_ = 0; ks_ < 4; ++ks_) {
            const int d0 = ks_ * 16 + 2 * t;
            // Two BF16 values per register, exactly as stored.
            auto ld2 = [&](int row, int d) -> unsigned {
                return row < sq ? *reinterpret_cast<const unsigned*>(qb + (unsigned long long)row * c + d) : 0u;
            };
            qa[mt][ks_][0] = ld2(rA, d0);
            qa[mt][ks_][1] = ld2(rB, d0);
            qa[mt][ks_][2] = ld2(rA, d0 + 8);
            qa[mt][ks_][3] = ld2(rB, d0 + 8);
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

    // Register prefetch: the next tile's K/V values (8 BF16 per uint4) are loaded from
    // global memory while the current tile is computed, then stored to shared memory.
    uint4 kreg[KIT], vreg[KIT];
    const uint4 zero4 = make_uint4(0u, 0u, 0u, 0u);
    auto load_tile = [&](int k0) {
#pragma unroll
        for (int it = 0; it < KIT; ++it) {
            const int idx = it * NT + tid;  // 0..511: 64 keys x 8 uint4
            const int key = idx >> 3, d8 = (idx & 7) * 8;
            const bool ok = k0 + key < sk;
            const unsigned long long off = (unsigned long long)(k0 + key) * c + d8;
            kreg[it] = ok ? *reinterpret_cast<const uint4*>(kb + off) : zero4;
            vreg[it] = ok ? *reinterpret_cast<const uint4*>(vb + off) : zero4;
        }
    };
    load_tile(0);
    for (int k0 = 0; k0 < sk; k0 += FA_BK) {
        __syncthreads();
#pragma unroll
        for (int it = 0; it < KIT; ++it) {
            const int idx = it * NT + tid;
            const int key = idx >> 3, d8 = (idx & 7) * 8;
            // FA_LD * 2 bytes = 144 = 9 x 16: every row start is 16-byte aligned.
            *reinterpret_cast<uint4*>(ks + key * FA_LD + d8) = kreg[it];
            *reinterpret_cast<uint4*>(vs + key * FA_LD + d8) = vreg[it];
        }
        __syncthreads();
        if (k0 + FA_BK < sk) load_tile(k0 + FA_BK);
        // S = Q K^T: 8 n-tiles of 8 keys, each K fragment used by MT m-tiles.
        float s[MT][8][4];
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
            // B = K^T: keys nt*8 .. +7 (rows of ks), d in 4 k-steps of 16. Matrix i of
            // an ldmatrix.x4 = columns 8i .. 8i+7 of 32: (b0, b1) of two k-steps.
            const __nv_bfloat16* kr = ks + (nt * 8 + (lane & 7)) * FA_LD + (lane >> 3) * 8;
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                unsigned kb4[4];
                fa_ldm4(kb4, kr + half * 32);
#pragma unroll
                for (int h2 = 0; h2 < 2; ++h2) {
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt)
                        fa_mma(s[mt][nt], qa[mt][2 * half + h2], kb4[2 * h2], kb4[2 * h2 + 1]);
                }
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
            // B = V: keys j*16 .. +15 (k), dims (n) in pairs of n-tiles. Matrices of an
            // ldmatrix.x4.trans: (keys +0..7, dims dn*8), (keys +8..15, dn*8),
            // (keys +0..7, dn*8+8), (keys +8..15, dn*8+8) = (b0, b1) of n-tiles dn, dn+1.
            const __nv_bfloat16* vr =
                vs + (j * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * FA_LD + (lane >> 4) * 8;
#pragma unroll
            for (int dn = 0; dn < 8; dn += 2) {
                unsigned vb4[4];
                fa_ldm4t(vb4, vr + dn * 8);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    fa_mma(o[mt][dn], pa[mt], vb4[0], vb4[1]);
                    fa_mma(o[mt][dn + 1], pa[mt], vb4[2], vb4[3]);
                }
            }
        }
    }
    __nv_bfloat16* ob = out + (unsigned long long)bi * sq * c + (unsigned long long)h * FA_D;
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
                *reinterpret_cast<unsigned*>(ob + (unsigned long long)rA * c + d0) =
                    fa_pack(o[mt][dn][0] * iA, o[mt][dn][1] * iA);
            if (rB < sq)
                *reinterpret_cast<unsigned*>(ob + (unsigned long long)rB * c + d0) =
                    fa_pack(o[mt][dn][2] * iB, o[mt][dn][3] * iB);
        }
    }
}

// Variants: flash_attn_d64 (8 warps x 16 rows = 128 queries per block),
// flash_attn_d64_w8m2 (8 warps x 32 rows = 256), flash_attn_d64_w4m2 (4 warps x 32 = 128).
extern "C" __global__ void __launch_bounds__(256) flash_attn_d64(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
    const __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ out, int sq, int sk,
    int heads, float scale) {
    flash_impl<8, 1>(q, k, v, out, sq, sk, heads, scale);
}
extern "C" __global__ void __launch_bounds__(256) flash_attn_d64_w8m2(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
    const __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ out, int sq, int sk,
    int heads, float scale) {
    flash_impl<8, 2>(q, k, v, out, sq, sk, heads, scale);
}
extern "C" __global__ void __launch_bounds__(128) flash_attn_d64_w4m2(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
    const __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ out, int sq, int sk,
    int heads, float scale) {
    flash_impl<4, 2>(q, k, v, out, sq, sk, heads, scale);
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
