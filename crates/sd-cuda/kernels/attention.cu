// Multi-head attention, straightforward and exact: one warp per (entry, head, query),
// softmax in the CPU backend's order (max, f64 sum, normalized weights times V), the
// output accumulated in f32 registers (PL values per lane, head dim <= 32 * PL).
// q [B, Sq, H*D], k/v [B, Sk, H*D], bias [H, Sq, Sk], all in storage type (sd_ld).
// The reference on the GPU, and the path for masks and biases (CLIP, T5); the flash
// kernels below take head dim 64 without either.
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

// ---- Flash attention on Hopper's warpgroup MMA (wgmma), head dim 64 ------------------
// sm_90a only (the kernels below are empty elsewhere; the host never launches them
// there). A block of NWG warpgroups takes NWG * 64 queries of one (entry, head): each
// warpgroup's 64 rows are one wgmma M tile, its Q fragments live in registers (the
// wgmma A-register layout is mma.m16n8k16's, warp w holding rows 16w..16w+15), and so
// does P (the S accumulators, converted to BF16, are the next MMA's A fragments). Keys
// and values come through shared memory BN rows at a time, double-buffered with
// cp.async (the next tile loads while this one is computed), stored as they are in
// memory ([key][d], 128 bytes a row) in the 128-byte swizzle the wgmma descriptors name:
// 16-byte chunk c of row r sits at chunk c ^ (r % 8), every tile 1024-byte aligned.
// S = Q K^T reads K as a K-major B operand; O += P V reads V as an MN-major one
// (transposed B), so nothing is transposed by hand.
//
// Sequences may come in two segments (MMDiT's joint attention: image tokens, then
// context tokens, each stream in its own tensor): query row r < sq1 is row r of q1,
// later rows are rows of q2; keys likewise with sk1; each output row goes to o1 or o2
// the same way. Plain attention is sq2 = sk2 = 0.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SD_HAVE_WGMMA 1
#endif

#ifdef SD_HAVE_WGMMA
// The accumulator operands of the wgmma wrappers below: an m64nN f32 tile is N/2
// registers a thread, named %0.. in the instruction and bound "+f" to d[0..].
#define SD_WG_ACC8(d, o)                                                                      \
    "+f"(d[o]), "+f"(d[o + 1]), "+f"(d[o + 2]), "+f"(d[o + 3]), "+f"(d[o + 4]), "+f"(d[o + 5]), \
        "+f"(d[o + 6]), "+f"(d[o + 7])
#define SD_WG_ACC32(d) \
    SD_WG_ACC8(d, 0), SD_WG_ACC8(d, 8), SD_WG_ACC8(d, 16), SD_WG_ACC8(d, 24)
#define SD_WG_ACC64(d) \
    SD_WG_ACC32(d), SD_WG_ACC8(d, 32), SD_WG_ACC8(d, 40), SD_WG_ACC8(d, 48), SD_WG_ACC8(d, 56)
#define SD_WG_REGS32                                                         \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define SD_WG_REGS64                                                            \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "    \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

__device__ __forceinline__ void wg_mma_n128(float (&d)[64], const unsigned (&a)[4],
                                        unsigned long long desc, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        SD_WG_REGS64 ", "
        "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
        : SD_WG_ACC64(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate));
}

__device__ __forceinline__ void wg_mma_n64(float (&d)[32], const unsigned (&a)[4],
                                        unsigned long long desc, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        SD_WG_REGS32 ", "
        "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
        : SD_WG_ACC32(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate));
}

__device__ __forceinline__ void wg_mma_n64_tb(float (&d)[32], const unsigned (&a)[4],
                                        unsigned long long desc, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        SD_WG_REGS32 ", "
        "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : SD_WG_ACC32(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate));
}


__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// Waits until at most N of this warpgroup's wgmma groups are in flight (the oldest finish
// first).
template <int N>
__device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// The compiler does not know that wgmma writes its accumulators (and reads its A
// registers) asynchronously, until the wait: these empty statements, placed after the
// wait, make every later use of a register depend on that point.
template <int N>
__device__ __forceinline__ void wg_hold(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void wg_hold(unsigned (&r)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}

// Shared-memory matrix descriptor, 128-byte swizzle: start address, leading and stride
// byte offsets (both 1024: the stride between 8-row groups; the other one has no use at
// these shapes, whichever of the two the hardware takes it to be), layout type 1.
__device__ __forceinline__ unsigned long long wg_desc(unsigned saddr) {
    return (unsigned long long)((saddr & 0x3FFFFu) >> 4) | (64ull << 16) | (64ull << 32) |
           (1ull << 62);
}

__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(bytes)
                 : "memory");
}

// Online softmax (base 2) of one K/V tile's scores in s, a thread's wgmma accumulators:
// rows g (s[4i], s[4i+1]) and g + 8 (s[4i+2], s[4i+3]), keys 8i + 2t and 8i + 2t + 1 of
// the tile. When `partial` (the tile runs past the keys), keys with k0 + key >= end are
// masked. Writes P (BF16, the A fragments of O += P V), updates the running max (m) and
// sum (l), and returns in alA/alB the factors that rescale O to the new max.
template <int NS>
__device__ __forceinline__ void fa_softmax_tile(float (&s)[NS], unsigned (&p)[NS / 8][4],
                                                bool partial, int k0, int end, int t, float sl2,
                                                float& mA, float& mB, float& lA, float& lB,
                                                float& alA, float& alB) {
    const float NEG_INF = -__int_as_float(0x7f800000);
    if (partial) {
#pragma unroll
        for (int i = 0; i < NS / 4; ++i) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                if (k0 + 8 * i + 2 * t + e >= end) s[4 * i + e] = s[4 * i + 2 + e] = NEG_INF;
            }
        }
    }
    float mxA = NEG_INF, mxB = NEG_INF;
#pragma unroll
    for (int i = 0; i < NS / 4; ++i) {
        mxA = fmaxf(mxA, fmaxf(s[4 * i], s[4 * i + 1]));
        mxB = fmaxf(mxB, fmaxf(s[4 * i + 2], s[4 * i + 3]));
    }
    mxA = fmaxf(mxA, __shfl_xor_sync(0xffffffffu, mxA, 1));
    mxA = fmaxf(mxA, __shfl_xor_sync(0xffffffffu, mxA, 2));
    mxB = fmaxf(mxB, __shfl_xor_sync(0xffffffffu, mxB, 1));
    mxB = fmaxf(mxB, __shfl_xor_sync(0xffffffffu, mxB, 2));
    const float nmA = fmaxf(mA, mxA * sl2), nmB = fmaxf(mB, mxB * sl2);
    alA = fa_exp2(mA - nmA);
    alB = fa_exp2(mB - nmB);
    mA = nmA;
    mB = nmB;
    float sumA = 0.f, sumB = 0.f;
#pragma unroll
    for (int i = 0; i < NS / 4; ++i) {
        const float p0 = fa_exp2(fmaf(s[4 * i], sl2, -nmA));
        const float p1 = fa_exp2(fmaf(s[4 * i + 1], sl2, -nmA));
        const float p2 = fa_exp2(fmaf(s[4 * i + 2], sl2, -nmB));
        const float p3 = fa_exp2(fmaf(s[4 * i + 3], sl2, -nmB));
        sumA += p0 + p1;
        sumB += p2 + p3;
        // Key chunk i is half (i % 2) of k-step i / 2: a0/a1 for keys 0..7, a2/a3 for 8..15.
        p[i / 2][(i & 1) * 2 + 0] = fa_pack(p0, p1);
        p[i / 2][(i & 1) * 2 + 1] = fa_pack(p2, p3);
    }
    lA = lA * alA + sumA;
    lB = lB * alB + sumB;
}

// O (a thread's m64n64 accumulators: rows g and g + 8, dims 8i + 2t, + 1) times the
// rescale factors of its two rows.
__device__ __forceinline__ void fa_rescale_o(float (&o)[32], float alA, float alB) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        o[4 * i] *= alA;
        o[4 * i + 1] *= alA;
        o[4 * i + 2] *= alB;
        o[4 * i + 3] *= alB;
    }
}

// O / l as BF16 into this thread's rows r0 + g and r0 + g + 8 of head h of entry bi's
// output: a row r < sq1 is row r of o1, a later one row r - sq1 of o2 (the joint
// attention's two streams); rows at or past sq are not stored.
__device__ __forceinline__ void fa_store_rows(const float (&o)[32], float lA, float lB, int r0,
                                              int g, int t, int bi, int sq1, int sq2, int sq,
                                              unsigned long long c, unsigned long long hd,
                                              __nv_bfloat16* o1, __nv_bfloat16* o2) {
    lA += __shfl_xor_sync(0xffffffffu, lA, 1);
    lA += __shfl_xor_sync(0xffffffffu, lA, 2);
    lB += __shfl_xor_sync(0xffffffffu, lB, 1);
    lB += __shfl_xor_sync(0xffffffffu, lB, 2);
    const float iA = 1.0f / lA, iB = 1.0f / lB;
    const int rA = r0 + g, rB = rA + 8;
    const unsigned long long ob1 = (unsigned long long)bi * sq1 * c + hd;
    const unsigned long long ob2 = (unsigned long long)bi * sq2 * c + hd;
    __nv_bfloat16* pA = rA < sq1 ? o1 + ob1 + (unsigned long long)rA * c
                                 : o2 + ob2 + (unsigned long long)(rA - sq1) * c;
    __nv_bfloat16* pB = rB < sq1 ? o1 + ob1 + (unsigned long long)rB * c
                                 : o2 + ob2 + (unsigned long long)(rB - sq1) * c;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int d0 = 8 * i + 2 * t;
        if (rA < sq) *reinterpret_cast<unsigned*>(pA + d0) = fa_pack(o[4 * i] * iA, o[4 * i + 1] * iA);
        if (rB < sq)
            *reinterpret_cast<unsigned*>(pB + d0) = fa_pack(o[4 * i + 2] * iB, o[4 * i + 3] * iB);
    }
}

template <int NWG, int BN, bool OVERLAP>
__device__ __forceinline__ void flash_wg_impl(
    const __nv_bfloat16* __restrict__ q1, const __nv_bfloat16* __restrict__ k1,
    const __nv_bfloat16* __restrict__ v1, __nv_bfloat16* __restrict__ o1, int sq1, int sk1,
    const __nv_bfloat16* __restrict__ q2, const __nv_bfloat16* __restrict__ k2,
    const __nv_bfloat16* __restrict__ v2, __nv_bfloat16* __restrict__ o2, int sq2, int sk2,
    int heads, float scale) {
    constexpr int NT = NWG * 128;
    constexpr int TILE = BN * 128;  // bytes of one K (or V) tile
    constexpr int NS = BN / 2;      // S accumulators per thread
    // K/V tile pairs in flight: the next tile loads while this one is computed; with
    // OVERLAP the previous tile's V is still being read too.
    constexpr int STAGES = OVERLAP ? 3 : 2;
    extern __shared__ unsigned char fa_smem[];
    const unsigned base = ((unsigned)__cvta_generic_to_shared(fa_smem) + 1023u) & ~1023u;
    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int h = blockIdx.y, bi = blockIdx.z;
    const unsigned long long c = (unsigned long long)heads * FA_D;
    const int sq = sq1 + sq2, sk = sk1 + sk2;
    const unsigned long long hd = (unsigned long long)h * FA_D;
    const __nv_bfloat16* qb1 = q1 + (unsigned long long)bi * sq1 * c + hd;
    const __nv_bfloat16* qb2 = q2 + (unsigned long long)bi * sq2 * c + hd;
    const __nv_bfloat16* kb1 = k1 + (unsigned long long)bi * sk1 * c + hd;
    const __nv_bfloat16* kb2 = k2 + (unsigned long long)bi * sk2 * c + hd;
    const __nv_bfloat16* vb1 = v1 + (unsigned long long)bi * sk1 * c + hd;
    const __nv_bfloat16* vb2 = v2 + (unsigned long long)bi * sk2 * c + hd;
    const int q0 = blockIdx.x * (NWG * 64) + wg * 64 + warp * 16;

    unsigned qa[4][4];
    {
        const int rA = q0 + g, rB = rA + 8;
        const __nv_bfloat16* pA =
            rA < sq1 ? qb1 + (unsigned long long)rA * c : qb2 + (unsigned long long)(rA - sq1) * c;
        const __nv_bfloat16* pB =
            rB < sq1 ? qb1 + (unsigned long long)rB * c : qb2 + (unsigned long long)(rB - sq1) * c;
#pragma unroll
        for (int ks_ = 0; ks_ < 4; ++ks_) {
            const int d0 = ks_ * 16 + 2 * t;
            qa[ks_][0] = rA < sq ? *reinterpret_cast<const unsigned*>(pA + d0) : 0u;
            qa[ks_][1] = rB < sq ? *reinterpret_cast<const unsigned*>(pB + d0) : 0u;
            qa[ks_][2] = rA < sq ? *reinterpret_cast<const unsigned*>(pA + d0 + 8) : 0u;
            qa[ks_][3] = rB < sq ? *reinterpret_cast<const unsigned*>(pB + d0 + 8) : 0u;
        }
    }

    // Tile j of K and V into buffer j % STAGES (rows past the keys are zero-filled).
    auto load_tile = [&](int j) {
        const int k0 = j * BN;
        const unsigned kt = base + (j % STAGES) * 2 * TILE, vt = kt + TILE;
#pragma unroll
        for (int i0 = 0; i0 < BN * 8; i0 += NT) {
            const int i = i0 + tid;
            if (BN * 8 % NT != 0 && i >= BN * 8) break;
            const int row = i >> 3, ch = i & 7;
            const int gr = k0 + row;
            const bool ok = gr < sk;
            const unsigned long long off =
                (gr < sk1 ? (unsigned long long)gr : (unsigned long long)(gr - sk1)) * c + ch * 8;
            const __nv_bfloat16* ks_ = ok ? (gr < sk1 ? kb1 : kb2) + off : kb1;
            const __nv_bfloat16* vs_ = ok ? (gr < sk1 ? vb1 : vb2) + off : vb1;
            const unsigned dst = row * 128 + ((ch ^ (row & 7)) << 4);
            cp_async16(kt + dst, ks_, ok ? 16 : 0);
            cp_async16(vt + dst, vs_, ok ? 16 : 0);
        }
        asm volatile("cp.async.commit_group;\n" ::: "memory");
    };
    auto k_tile = [&](int j) { return base + (j % STAGES) * 2 * TILE; };
    // Tile j's copies (this thread's: the only group in flight) have landed, and
    // every thread's are visible to wgmma; every warp is done with the iteration before.
    auto tile_ready = [&]() {
        asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        // cp.async writes through the generic proxy; wgmma reads through the async one.
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
    };
    // S = Q K^T over d in 4 k-steps of 16 (32 bytes along the swizzled rows), issued
    // (not waited for) as one wgmma group.
    float s[NS], o[32];
    auto issue_qk = [&](unsigned kt) {
#pragma unroll
        for (int ks_ = 0; ks_ < 4; ++ks_) {
            if constexpr (BN == 128) {
                wg_mma_n128(s, qa[ks_], wg_desc(kt + ks_ * 32), ks_ > 0);
            } else {
                wg_mma_n64(s, qa[ks_], wg_desc(kt + ks_ * 32), ks_ > 0);
            }
        }
        wg_commit();
    };
    // O += P V over the keys in k-steps of 16 (16 rows = 2048 bytes), one wgmma group.
    auto issue_pv = [&](const unsigned (&p)[BN / 16][4], unsigned vt) {
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) wg_mma_n64_tb(o, p[kk], wg_desc(vt + kk * 2048), 1);
        wg_commit();
    };

#pragma unroll
    for (int i = 0; i < NS; ++i) s[i] = 0.f;
#pragma unroll
    for (int i = 0; i < 32; ++i) o[i] = 0.f;
    const float NEG_INF = -__int_as_float(0x7f800000);
    float mA = NEG_INF, mB = NEG_INF, lA = 0.f, lB = 0.f;
    const float sl2 = scale * 1.4426950408889634f;
    const int ntiles = (sk + BN - 1) / BN;

    auto softmax_tile = [&](int j, unsigned (&p)[BN / 16][4], float& alA, float& alB) {
        const int k0 = j * BN;
        fa_softmax_tile<NS>(s, p, k0 + BN > sk, k0, sk, t, sl2, mA, mB, lA, lB, alA, alB);
    };
    auto rescale_o = [&](float alA, float alB) { fa_rescale_o(o, alA, alB); };

    unsigned pa[BN / 16][4];
    float alA, alB;
    load_tile(0);
    if constexpr (!OVERLAP) {
        // One tile at a time: S, softmax, then O += P V, each waited for.
        for (int j = 0; j < ntiles; ++j) {
            tile_ready();
            // Every warp is past tile j - 1 (its MMAs were waited for): its buffer is free.
            if (j + 1 < ntiles) load_tile(j + 1);
            const unsigned kt = k_tile(j);
            wg_fence();
            issue_qk(kt);
            wg_wait<0>();
            wg_hold(s);
            softmax_tile(j, pa, alA, alB);
            rescale_o(alA, alB);
            wg_fence();
            issue_pv(pa, kt + TILE);
            wg_wait<0>();
            wg_hold(o);
            wg_hold(pa);
        }
    } else {
        // Software-pipelined within the warpgroup (FlashAttention-3's intra-warpgroup
        // overlap): S of tile j is issued together with O += P V of tile j - 1, and the
        // softmax of tile j runs on the CUDA cores while that P V is on the tensor cores.
        // O is rescaled to tile j's max only once the P V that reads the old scale is done.
        tile_ready();
        if (ntiles > 1) load_tile(1);
        wg_fence();
        issue_qk(k_tile(0));
        wg_wait<0>();
        wg_hold(s);
        softmax_tile(0, pa, alA, alB);  // o is zero: nothing to rescale
        for (int j = 1; j < ntiles; ++j) {
            tile_ready();
            // Every warp has waited for tile j - 2's P V: its buffer is free.
            if (j + 1 < ntiles) load_tile(j + 1);
            wg_fence();
            issue_qk(k_tile(j));
            issue_pv(pa, k_tile(j - 1) + TILE);
            wg_wait<1>();  // S of tile j is done; P V may still run
            wg_hold(s);
            unsigned pn[BN / 16][4];
            softmax_tile(j, pn, alA, alB);
            wg_wait<0>();
            wg_hold(o);
            wg_hold(pa);
            rescale_o(alA, alB);
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
                for (int e = 0; e < 4; ++e) pa[kk][e] = pn[kk][e];
        }
        wg_fence();
        issue_pv(pa, k_tile(ntiles - 1) + TILE);
        wg_wait<0>();
        wg_hold(o);
        wg_hold(pa);
    }

    fa_store_rows(o, lA, lB, q0, g, t, bi, sq1, sq2, sq, c, hd, o1, o2);
}
#endif  // SD_HAVE_WGMMA

// Variants: flash_wg2_n128 (2 warpgroups = 128 queries per block, 128-key tiles),
// flash_wg3_n128 (192 queries), flash_wg2_n64 (64-key tiles); the _ov ones overlap the
// softmax with the tensor cores (3 K/V stages). Dynamic shared memory:
// 2 * STAGES * BN * 128 bytes + 1024 (alignment slack).
#ifdef SD_HAVE_WGMMA
#define SD_FLASH_WG_BODY(NWG, BN, OV) \
    flash_wg_impl<NWG, BN, OV>(q1, k1, v1, o1, sq1, sk1, q2, k2, v2, o2, sq2, sk2, heads, scale);
#else
#define SD_FLASH_WG_BODY(NWG, BN, OV)
#endif
#define SD_FLASH_WG(NAME, NWG, BN, OV)                                                        \
    extern "C" __global__ void __launch_bounds__(NWG * 128, 1) NAME(                          \
        const __nv_bfloat16* q1, const __nv_bfloat16* k1, const __nv_bfloat16* v1,            \
        __nv_bfloat16* o1, int sq1, int sk1, const __nv_bfloat16* q2,                         \
        const __nv_bfloat16* k2, const __nv_bfloat16* v2, __nv_bfloat16* o2, int sq2,         \
        int sk2, int heads, float scale) {                                                    \
        SD_FLASH_WG_BODY(NWG, BN, OV)                                                         \
    }
SD_FLASH_WG(flash_wg2_n128, 2, 128, false)
SD_FLASH_WG(flash_wg3_n128, 3, 128, false)
SD_FLASH_WG(flash_wg2_n64, 2, 64, false)
SD_FLASH_WG(flash_wg2_n128_ov, 2, 128, true)
SD_FLASH_WG(flash_wg3_n128_ov, 3, 128, true)

// ---- Flash attention with a TMA producer (warp-specialized), head dim 64 --------------
// sm_90a only. The flash_wg kernels above load K/V with every thread's cp.async and meet
// at a block barrier each tile, so their warpgroups run in lockstep: all softmax at once,
// then all MMAs, with the tensor cores idle in between. Here (FlashAttention-3's layout)
// warpgroup 0 is the producer: one thread issues a tensor-memory-accelerator copy per K
// and per V tile (the 128-byte swizzle done by the copy engine, rows past the sequence
// zero-filled), into STAGES buffers handed over through mbarriers: full_k/full_v count
// the bytes landed, empty counts the consumer warps done with a buffer. Warpgroups
// 1..NC are the consumers, 64 query rows each, Q in shared memory (the S = Q K^T wgmma
// reads both operands from there), P in registers. Nothing makes the consumers wait
// for each other, so one's softmax runs while another's MMAs hold the tensor cores.
// The producer gives most of its registers to the consumers (setmaxnreg).
//
// K and V are read through tensor maps built by the host, 3-D [B][S][H*64] with a box of
// 64 x BN x 1 (one head, BN keys); the joint attention's second segment has its own maps
// and its own tiles (key tiles never straddle the segments). A consumer does not
// overlap its own softmax with its own MMAs (flash_wg_*_ov's second P buffer): ptxas
// (13.0) fits that into the launch bound's 168 registers only by serializing the wgmma
// (C7512), whatever setmaxnreg gives the consumers at run time.
struct __align__(64) SdTmaDesc {
    unsigned long long v[16];
};

#ifdef SD_HAVE_WGMMA
__device__ __forceinline__ void mb_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// The producer's arrival: one, plus the bytes the copies of this phase will bring.
__device__ __forceinline__ void mb_expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mb_arrive(unsigned bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Waits until the phase of the given parity has completed (a fresh barrier counts the
// phase before its first, parity 1, as completed).
__device__ __forceinline__ void mb_wait(unsigned bar, unsigned parity) {
    unsigned done;
    do {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            "selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!done);
}
// One box of a 3-D tensor map into shared memory; its bytes count on `bar`.
__device__ __forceinline__ void tma_load_3d(unsigned dst, const SdTmaDesc* map, unsigned bar,
                                            int c0, int c1, int c2) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
        "[%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
        "l"(reinterpret_cast<unsigned long long>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
        : "memory");
}

// S = Q K^T for one k-step, both operands in shared memory (K-major, 128-byte swizzle).
__device__ __forceinline__ void wg_mma_ss_n128(float (&d)[64], unsigned long long adesc,
                                               unsigned long long bdesc, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        SD_WG_REGS64 ", "
        "%64, %65, p, 1, 1, 0, 0;\n}\n"
        : SD_WG_ACC64(d)
        : "l"(adesc), "l"(bdesc), "r"(accumulate));
}

template <int NC, int BN, int STAGES, bool PINGPONG>
__device__ __forceinline__ void flash_tma_impl(
    const SdTmaDesc* tk1, const SdTmaDesc* tv1, const SdTmaDesc* tk2, const SdTmaDesc* tv2,
    const __nv_bfloat16* __restrict__ q1, __nv_bfloat16* __restrict__ o1, int sq1, int sk1,
    const __nv_bfloat16* __restrict__ q2, __nv_bfloat16* __restrict__ o2, int sq2, int sk2,
    int heads, float scale) {
    static_assert(BN == 128, "the S = Q K^T wgmma is m64n128");
    // Registers per thread after the hand-over: the producer keeps 24, the consumers
    // share the rest of the block's (65536 / threads at launch, rounded down to 8).
    constexpr int LAUNCH_REGS = (65536 / ((NC + 1) * 128)) / 8 * 8;
    constexpr int CONSUMER_REGS =
        ((LAUNCH_REGS * (NC + 1) - 24) / NC) / 8 * 8 > 240 ? 240
                                                          : ((LAUNCH_REGS * (NC + 1) - 24) / NC) / 8 * 8;
    constexpr int TILE = BN * 128;  // bytes of one K (or V) tile
    constexpr int NS = BN / 2;      // S accumulators per thread
    extern __shared__ unsigned char fa_smem[];
    // [STAGES x (K tile, V tile)] [NC x Q tile (64 rows, 8 KiB)] [mbarriers], the tiles
    // 1024-byte aligned (the swizzle pattern repeats every 8 rows of 128 bytes).
    const unsigned base = ((unsigned)__cvta_generic_to_shared(fa_smem) + 1023u) & ~1023u;
    const unsigned qbase = base + STAGES * 2 * TILE;
    const unsigned bars = qbase + NC * 8192;
    auto full_k = [&](int s) { return bars + 8u * s; };
    auto full_v = [&](int s) { return bars + 8u * (STAGES + s); };
    auto empty = [&](int s) { return bars + 8u * (2 * STAGES + s); };
    auto k_tile = [&](int s) { return base + s * 2 * TILE; };
    const int tid = threadIdx.x, wg = tid >> 7;
    const int h = blockIdx.y, bi = blockIdx.z;
    const int n1 = (sk1 + BN - 1) / BN, ntiles = n1 + (sk2 + BN - 1) / BN;
    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
            mb_init(full_k(s), 1);
            mb_init(full_v(s), 1);
            mb_init(empty(s), NC * 4);  // every consumer warp arrives
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
        if (tid == 0) {
            for (int j = 0; j < ntiles; ++j) {
                const int s = j % STAGES;
                // The consumers are done with the tile STAGES before this one.
                mb_wait(empty(s), ((j / STAGES) & 1) ^ 1);
                const bool first = j < n1;
                const int row = (first ? j : j - n1) * BN;
                mb_expect_tx(full_k(s), TILE);
                tma_load_3d(k_tile(s), first ? tk1 : tk2, full_k(s), h * FA_D, row, bi);
                mb_expect_tx(full_v(s), TILE);
                tma_load_3d(k_tile(s) + TILE, first ? tv1 : tv2, full_v(s), h * FA_D, row, bi);
            }
        }
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(CONSUMER_REGS) : "memory");

    const int cw = wg - 1, ctid = tid & 127, warp = ctid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const unsigned long long c = (unsigned long long)heads * FA_D;
    const int sq = sq1 + sq2;
    const unsigned long long hd = (unsigned long long)h * FA_D;
    const int qrow0 = blockIdx.x * (NC * 64) + cw * 64;
    const unsigned qt = qbase + cw * 8192;
    // This warpgroup's 64 query rows into shared memory, swizzled as the TMA would
    // (rows past the sequence zero), then visible to wgmma.
    {
        const __nv_bfloat16* qb1 = q1 + (unsigned long long)bi * sq1 * c + hd;
        const __nv_bfloat16* qb2 = q2 + (unsigned long long)bi * sq2 * c + hd;
#pragma unroll
        for (int i0 = 0; i0 < 512; i0 += 128) {
            const int i = i0 + ctid, row = i >> 3, ch = i & 7, gr = qrow0 + row;
            uint4 val = make_uint4(0u, 0u, 0u, 0u);
            if (gr < sq) {
                const __nv_bfloat16* src = gr < sq1 ? qb1 + (unsigned long long)gr * c
                                                    : qb2 + (unsigned long long)(gr - sq1) * c;
                val = *reinterpret_cast<const uint4*>(src + ch * 8);
            }
            const unsigned dst = qt + row * 128 + ((ch ^ (row & 7)) << 4);
            asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(dst), "r"(val.x),
                         "r"(val.y), "r"(val.z), "r"(val.w)
                         : "memory");
        }
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        asm volatile("bar.sync %0, 128;\n" ::"r"(1 + cw) : "memory");
    }

    float s[NS], o[32];
    auto issue_qk = [&](int st) {
#pragma unroll
        for (int ks_ = 0; ks_ < 4; ++ks_)
            wg_mma_ss_n128(s, wg_desc(qt + ks_ * 32), wg_desc(k_tile(st) + ks_ * 32), ks_ > 0);
        wg_commit();
    };
    auto issue_pv = [&](const unsigned (&p)[BN / 16][4], int st) {
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk)
            wg_mma_n64_tb(o, p[kk], wg_desc(k_tile(st) + TILE + kk * 2048), 1);
        wg_commit();
    };
    // This warp is done reading stage st (its MMAs were waited for).
    auto release = [&](int st) {
        if (lane == 0) mb_arrive(empty(st));
    };
#pragma unroll
    for (int i = 0; i < 32; ++i) o[i] = 0.f;
    const float NEG_INF = -__int_as_float(0x7f800000);
    float mA = NEG_INF, mB = NEG_INF, lA = 0.f, lB = 0.f;
    const float sl2 = scale * 1.4426950408889634f;

    // Tile j's softmax; keys past its segment's end masked.
    auto softmax_tile = [&](int j, unsigned (&p)[BN / 16][4], float& alA, float& alB) {
        const int valid = j < n1 ? sk1 - j * BN : sk2 - (j - n1) * BN;
        fa_softmax_tile<NS>(s, p, valid < BN, 0, valid, t, sl2, mA, mB, lA, lB, alA, alB);
    };
    auto phase = [&](int j) { return (unsigned)((j / STAGES) & 1); };

    // One turn of the tensor cores per tile: P V of tile j and S = Q K^T of tile j + 1
    // are issued together and waited for once; the softmax of tile j + 1 then runs on the
    // CUDA cores while the other consumers' MMAs run. With PINGPONG the consumers take
    // these turns in a fixed cycle (FlashAttention-3's inter-warpgroup schedule: named
    // barrier 4 + w is consumer w's turn, the one before it in the cycle gives it), so
    // that one's softmax always lines up with another's MMAs instead of colliding.
    const int next_cw = cw + 1 == NC ? 0 : cw + 1;
    auto turn_wait = [&]() {
        if constexpr (PINGPONG) asm volatile("bar.sync %0, 256;\n" ::"r"(4 + cw) : "memory");
    };
    auto turn_give = [&]() {
        if constexpr (PINGPONG) asm volatile("bar.arrive %0, 256;\n" ::"r"(4 + next_cw) : "memory");
    };
    // The last consumer opens the cycle: consumer 0 takes the first turn.
    if (cw == NC - 1) turn_give();
    unsigned pa[BN / 16][4];
    float alA, alB;
    mb_wait(full_k(0), 0);
    turn_wait();
    wg_fence();
    issue_qk(0);
    turn_give();
    wg_wait<0>();
    wg_hold(s);
    softmax_tile(0, pa, alA, alB);  // o is zero: nothing to rescale
    for (int j = 0; j < ntiles; ++j) {
        const int st = j % STAGES, nst = (j + 1) % STAGES;
        const bool more = j + 1 < ntiles;
        mb_wait(full_v(st), phase(j));
        if (more) mb_wait(full_k(nst), phase(j + 1));
        turn_wait();
        wg_fence();
        issue_pv(pa, st);
        if (more) issue_qk(nst);
        // Every turn taken is given on, except the very last one of the cycle's last
        // consumer (consumer 0 takes no turn after it): the barriers end balanced.
        if (more || cw != NC - 1) turn_give();
        wg_wait<0>();
        wg_hold(o);
        wg_hold(pa);
        wg_hold(s);
        release(st);
        if (more) {
            softmax_tile(j + 1, pa, alA, alB);
            fa_rescale_o(o, alA, alB);
        }
    }
    fa_store_rows(o, lA, lB, qrow0 + warp * 16, g, t, bi, sq1, sq2, sq, c, hd, o1, o2);
}
#endif  // SD_HAVE_WGMMA

// Variants: flash_tma2_n128 (2 consumer warpgroups = 128 queries per block),
// flash_tma3_n128 (3 = 192 queries), and the _pp ones taking turns (PINGPONG). Threads: 128 x (consumers + 1). Dynamic shared memory:
// STAGES x 2 x 16 KiB + consumers x 8 KiB + 3 x STAGES x 8 (mbarriers) + 1024 (slack).
#ifdef SD_HAVE_WGMMA
#define SD_FLASH_TMA_BODY(NC, ST, PP)                                                         \
    flash_tma_impl<NC, 128, ST, PP>(&tk1, &tv1, &tk2, &tv2, q1, o1, sq1, sk1, q2, o2, sq2,   \
                                    sk2, heads, scale);
#else
#define SD_FLASH_TMA_BODY(NC, ST, PP)
#endif
#define SD_FLASH_TMA(NAME, NC, ST, PP)                                                        \
    extern "C" __global__ void __launch_bounds__((NC + 1) * 128, 1) NAME(                     \
        const __grid_constant__ SdTmaDesc tk1, const __grid_constant__ SdTmaDesc tv1,         \
        const __grid_constant__ SdTmaDesc tk2, const __grid_constant__ SdTmaDesc tv2,         \
        const __nv_bfloat16* q1, __nv_bfloat16* o1, int sq1, int sk1,                         \
        const __nv_bfloat16* q2, __nv_bfloat16* o2, int sq2, int sk2, int heads,              \
        float scale) {                                                                        \
        SD_FLASH_TMA_BODY(NC, ST, PP)                                                         \
    }
SD_FLASH_TMA(flash_tma2_n128, 2, 3, false)
SD_FLASH_TMA(flash_tma3_n128, 3, 3, false)
SD_FLASH_TMA(flash_tma2_n128_pp, 2, 3, true)
SD_FLASH_TMA(flash_tma3_n128_pp, 3, 3, true)

// Row softmax for the GEMM attention path (large head dims: the VAE's single 512-wide
// head; biased attention: T5): s [rows, n] f32 scores (already scaled), plus bias [rows, n]
// in storage type when given (T5's [H, Sq, Sk], row h * Sq + i) -> p [rows, n] BF16
// probabilities, in the exact kernel's order (scaled score + bias, max, f64 sum,
// exp(s - max) * (1 / sum)). One block per row.
extern "C" __global__ void softmax_rows_bf16(const float* __restrict__ s, const void* __restrict__ bias,
                                             __nv_bfloat16* __restrict__ p, int n, int r) {
    __shared__ float redf[32];
    __shared__ double redd[32];
    const unsigned long long base = (unsigned long long)blockIdx.x * n;
    const float* row = s + base;
    __nv_bfloat16* out = p + base;
    float m = -__int_as_float(0x7f800000);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        m = fmaxf(m, bias ? row[i] + sd_ld(bias, base + i, r) : row[i]);
    }
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) redf[warp] = m;
    __syncthreads();
    m = lane < (int)(blockDim.x >> 5) ? redf[lane] : -__int_as_float(0x7f800000);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    double sum = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = bias ? row[i] + sd_ld(bias, base + i, r) : row[i];
        sum += (double)expf(v - m);
    }
    const float inv = (float)(1.0 / sd_block_sum_d(sum, redd));
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = bias ? row[i] + sd_ld(bias, base + i, r) : row[i];
        out[i] = __float2bfloat16_rn(expf(v - m) * inv);
    }
}
