// Data movement: strided 2-D copies (concat, narrow, pad), permutations, nearest 2x
// upsampling, row gathers (embedding, token selection), im2col for convolutions. Tensors
// are in storage type (r: 2-byte BF16, else 4-byte f32); copies move the stored bits.

// dst[r * dst_pitch + j] = src[r * src_pitch + j] for r < rows, j < width.
extern "C" __global__ void copy2d_f32(const void* __restrict__ src, void* __restrict__ dst,
                                      unsigned long long rows, unsigned long long width,
                                      unsigned long long src_pitch,
                                      unsigned long long dst_pitch, int r) {
    const unsigned long long n = rows * width;
    SD_GRID_STRIDE(i, n) {
        const unsigned long long row = i / width, j = i % width;
        sd_cp(dst, row * dst_pitch + j, src, row * src_pitch + j, r);
    }
}

// Backend::chunks: src [rows, n * len] -> n tensors [rows, len], part i at parts.p[i]
// (n <= 16): adaLN's modulation vectors cut out in one launch instead of one per part.
struct SdPtrs16 {
    unsigned long long p[16];
};
extern "C" __global__ void split_last_f32(const void* __restrict__ src,
                                          const __grid_constant__ SdPtrs16 parts,
                                          unsigned long long rows, unsigned long long len,
                                          int n, int r) {
    const unsigned long long width = len * (unsigned long long)n;
    SD_GRID_STRIDE(i, rows * width) {
        const unsigned long long row = i / width, j = i % width, part = j / len;
        sd_cp(reinterpret_cast<void*>(parts.p[part]), row * len + (j - part * len), src, i, r);
    }
}

// Up to 6 dimensions: out dims o0..o5 (row-major), s0..s5 the input stride of each.
extern "C" __global__ void permute_f32(const void* __restrict__ x, void* __restrict__ y,
                                       unsigned long long n, long long o0, long long o1,
                                       long long o2, long long o3, long long o4, long long o5,
                                       long long s0, long long s1, long long s2, long long s3,
                                       long long s4, long long s5, int r) {
    const long long od[6] = {o0, o1, o2, o3, o4, o5};
    const long long st[6] = {s0, s1, s2, s3, s4, s5};
    SD_GRID_STRIDE(i, n) {
        unsigned long long rem = i;
        long long src = 0;
#pragma unroll
        for (int d = 5; d >= 0; --d) {
            src += (long long)(rem % (unsigned long long)od[d]) * st[d];
            rem /= (unsigned long long)od[d];
        }
        sd_cp(y, i, x, (unsigned long long)src, r);
    }
}

extern "C" __global__ void upsample2x_f32(const void* __restrict__ x, void* __restrict__ y,
                                          unsigned long long planes, unsigned long long h,
                                          unsigned long long w, int r) {
    const unsigned long long n = planes * 4 * h * w;
    SD_GRID_STRIDE(i, n) {
        const unsigned long long ow = 2 * w, oh = 2 * h;
        const unsigned long long xx = i % ow, yy = (i / ow) % oh, p = i / (ow * oh);
        sd_cp(y, i, x, (p * h + yy / 2) * w + xx / 2, r);
    }
}

// y[r, :] = src[idx[r], :]
extern "C" __global__ void gather_rows_f32(const void* __restrict__ src,
                                           const unsigned int* __restrict__ idx,
                                           void* __restrict__ y, unsigned long long rows,
                                           unsigned long long c, int r) {
    const unsigned long long n = rows * c;
    SD_GRID_STRIDE(i, n) { sd_cp(y, i, src, (unsigned long long)idx[i / c] * c + i % c, r); }
}

// col [cin*kh*kw, rows*wo] for output rows r0 .. r0+rows of one image x [cin, h, w]
// (F32 precision: f32 storage).
extern "C" __global__ void im2col_f32(const float* __restrict__ x, float* __restrict__ col,
                                      int cin, int h, int w, int kh, int kw, int stride,
                                      int pad, int wo, int r0, int rows) {
    const unsigned long long cols = (unsigned long long)rows * wo;
    const unsigned long long n = (unsigned long long)cin * kh * kw * cols;
    SD_GRID_STRIDE(i, n) {
        const unsigned long long ki = i / cols, p = i % cols;
        const int ci = (int)(ki / (kh * kw)), ky = (int)((ki / kw) % kh), kx = (int)(ki % kw);
        const int oy = r0 + (int)(p / wo), ox = (int)(p % wo);
        const int iy = oy * stride + ky - pad, ix = ox * stride + kx - pad;
        col[i] = (iy >= 0 && iy < h && ix >= 0 && ix < w)
                     ? x[((unsigned long long)ci * h + iy) * w + ix]
                     : 0.0f;
    }
}

// im2col of a BF16-stored image (BF16/FP8 precision): the operand of a BF16 tensor-core
// convolution GEMM.
extern "C" __global__ void im2col_bf16(const __nv_bfloat16* __restrict__ x, __nv_bfloat16* __restrict__ col,
                                       int cin, int h, int w, int kh, int kw, int stride,
                                       int pad, int wo, int r0, int rows) {
    const unsigned long long cols = (unsigned long long)rows * wo;
    const unsigned long long n = (unsigned long long)cin * kh * kw * cols;
    SD_GRID_STRIDE(i, n) {
        const unsigned long long ki = i / cols, p = i % cols;
        const int ci = (int)(ki / (kh * kw)), ky = (int)((ki / kw) % kh), kx = (int)(ki % kw);
        const int oy = r0 + (int)(p / wo), ox = (int)(p % wo);
        const int iy = oy * stride + ky - pad, ix = ox * stride + kx - pad;
        col[i] = (iy >= 0 && iy < h && ix >= 0 && ix < w)
                     ? x[((unsigned long long)ci * h + iy) * w + ix]
                     : __float2bfloat16_rn(0.0f);
    }
}

// Nearest 2x upsampling of channels-last BF16 x [N, H, W, C] -> [N, 2H, 2W, C], 16 bytes
// (8 channels) a thread; vecs = C / 8.
extern "C" __global__ void upsample2x_nhwc_bf16x8(const uint4* __restrict__ x, uint4* __restrict__ y,
                                                  unsigned long long entries, unsigned long long h,
                                                  unsigned long long w, int vecs) {
    const unsigned long long ow = 2 * w, oh = 2 * h;
    const unsigned long long n = entries * oh * ow * vecs;
    SD_GRID_STRIDE(i, n) {
        const unsigned long long v = i % vecs, pix = i / vecs;
        const unsigned long long xx = pix % ow, yy = (pix / ow) % oh, e = pix / (ow * oh);
        y[i] = x[((e * h + yy / 2) * w + xx / 2) * vecs + v];
    }
}
