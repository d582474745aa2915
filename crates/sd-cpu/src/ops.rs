//! The CPU kernels. f32 storage; reductions accumulate in f64 where PyTorch's own
//! reductions are more accurate than a naive f32 sum would be.

use gemm::Parallelism;
use rayon::prelude::*;
use sd_model::backend::{Activation, Conv2dParams};
use sd_model::{ModelError, Result};

use crate::tensor::CpuTensor;

fn threads() -> Parallelism {
    let n = rayon::current_num_threads();
    if n > 1 {
        Parallelism::Rayon(n)
    } else {
        Parallelism::None
    }
}

pub fn round_bf16_slice(v: &mut [f32]) {
    v.par_chunks_mut(1 << 14).for_each(|c| {
        for x in c {
            *x = sd_model::tensor::round_bf16(*x);
        }
    });
}

pub fn par_fake_quantize(format: sd_fp8::Fp8Format, v: &mut [f32], scale: f32) {
    v.par_chunks_mut(1 << 14)
        .for_each(|c| sd_fp8::fake_quantize_slice(format, c, scale));
}

pub fn check_same(a: &[usize], b: &[usize], op: &str) -> Result<()> {
    if a != b {
        return Err(ModelError::backend(format!(
            "{op}: shapes {a:?} and {b:?} differ"
        )));
    }
    Ok(())
}

/// For `x [B, .., C]` and a per-entry vector `v [B, C]`: (B, C).
pub fn batch_channels(x: &[usize], v: &[usize], op: &str) -> Result<(usize, usize)> {
    if x.len() < 2 || v.len() != 2 || v[0] != x[0] || v[1] != x[x.len() - 1] {
        return Err(ModelError::backend(format!(
            "{op}: per-entry vector {v:?} does not fit {x:?}"
        )));
    }
    Ok((v[0], v[1]))
}

pub fn zip(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    a.par_iter()
        .zip(b.par_iter())
        .map(|(x, y)| f(*x, *y))
        .collect()
}

/// A strided view of a matrix: element (i, j) is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Mat<'a> {
    /// Row-major with leading dimension `ld`.
    fn rows(data: &'a [f32], ld: usize) -> Self {
        Self {
            data,
            row_stride: ld,
            col_stride: 1,
        }
    }
    /// The transpose of a row-major matrix with leading dimension `ld` (a weight
    /// `[n, k]` seen as `[k, n]`).
    fn transposed(data: &'a [f32], ld: usize) -> Self {
        Self {
            data,
            row_stride: 1,
            col_stride: ld,
        }
    }
    /// Panics unless every element of an `r x c` matrix lies inside `data`.
    fn check(&self, r: usize, c: usize) {
        let last = (r - 1) * self.row_stride + (c - 1) * self.col_stride;
        assert!(last < self.data.len(), "matrix view out of bounds");
    }
}

/// `C[m, n] (+)= A[m, k] · B[k, n]`, C row-major with leading dimension `ldc`.
fn gemm(
    (m, n, k): (usize, usize, usize),
    a: Mat<'_>,
    b: Mat<'_>,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    par: Parallelism,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    a.check(m, k);
    b.check(k, n);
    Mat::rows(c, ldc).check(m, n);
    // SAFETY: the checks above bound every element the GEMM reads (A, B) or writes (C)
    // within the slices, using exactly the strides passed here.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        );
    }
}

/// `x [E * rows, k] · Wᵀ + b` one entry (`rows` rows) at a time.
pub fn linear(
    x: &[f32],
    rows: usize,
    k: usize,
    n: usize,
    w: &[f32],
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let total = x.len() / k.max(1);
    let mut out = vec![0.0f32; total * n];
    if let Some(b) = bias {
        for row in out.chunks_mut(n) {
            row.copy_from_slice(b);
        }
    }
    let rows = rows.max(1);
    let accumulate = bias.is_some();
    if rows == 1 {
        // Vector inputs (conditioning paths): one GEMV per entry, in parallel.
        out.par_chunks_mut(n)
            .zip(x.par_chunks(k))
            .for_each(|(o, xi)| {
                let (a, b) = (Mat::rows(xi, k), Mat::transposed(w, k));
                gemm((1, n, k), a, b, o, n, accumulate, Parallelism::None)
            });
    } else {
        for (o, xe) in out.chunks_mut(rows * n).zip(x.chunks(rows * k)) {
            let (a, b) = (Mat::rows(xe, k), Mat::transposed(w, k));
            gemm((rows, n, k), a, b, o, n, accumulate, threads());
        }
    }
    out
}

pub fn layer_norm(
    x: &[f32],
    c: usize,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    eps: f32,
) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .for_each(|(o, r)| {
            let mean = r.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
            let var = r.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / c as f64;
            let inv = 1.0 / (var + eps as f64).sqrt();
            for i in 0..c {
                let mut y = ((r[i] as f64 - mean) * inv) as f32;
                if let Some(g) = gamma {
                    y *= g[i];
                }
                if let Some(b) = beta {
                    y += b[i];
                }
                o[i] = y;
            }
        });
    out
}

pub fn rms_norm(x: &[f32], c: usize, gamma: Option<&[f32]>, eps: f32) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .for_each(|(o, r)| {
            let ms = r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / c as f64;
            let inv = (1.0 / (ms + eps as f64).sqrt()) as f32;
            for i in 0..c {
                o[i] = r[i] * inv * gamma.map_or(1.0, |g| g[i]);
            }
        });
    out
}

pub fn modulate(x: &[f32], b: usize, c: usize, shift: &[f32], scale: &[f32]) -> Vec<f32> {
    let per = x.len() / b;
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .enumerate()
        .for_each(|(row, (o, r))| {
            let e = row * c / per;
            let (sh, sc) = (&shift[e * c..(e + 1) * c], &scale[e * c..(e + 1) * c]);
            for i in 0..c {
                o[i] = r[i] * (1.0 + sc[i]) + sh[i];
            }
        });
    out
}

pub fn gated_add(x: &[f32], b: usize, c: usize, gate: &[f32], y: &[f32]) -> Vec<f32> {
    let per = x.len() / b;
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(c)
        .zip(x.par_chunks(c).zip(y.par_chunks(c)))
        .enumerate()
        .for_each(|(row, (o, (xr, yr)))| {
            let e = row * c / per;
            let g = &gate[e * c..(e + 1) * c];
            for i in 0..c {
                o[i] = xr[i] + g[i] * yr[i];
            }
        });
    out
}

pub fn group_norm(
    x: &[f32],
    s: &[usize],
    groups: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) -> Vec<f32> {
    let (c, hw) = (s[1], s[2] * s[3]);
    let cg = c / groups;
    let block = cg * hw;
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(block)
        .zip(x.par_chunks(block))
        .enumerate()
        .for_each(|(i, (o, r))| {
            let g = i % groups;
            let mean = r.iter().map(|&v| v as f64).sum::<f64>() / block as f64;
            let var = r.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / block as f64;
            let inv = 1.0 / (var + eps as f64).sqrt();
            for ch in 0..cg {
                let cc = g * cg + ch;
                for j in 0..hw {
                    let idx = ch * hw + j;
                    o[idx] = ((r[idx] as f64 - mean) * inv) as f32 * gamma[cc] + beta[cc];
                }
            }
        });
    out
}

fn gelu_tanh(x: f32) -> f32 {
    const K: f32 = 0.797_884_6; // sqrt(2/pi)
    0.5 * x * (1.0 + (K * (x + 0.044715 * x * x * x)).tanh())
}

pub fn activation(x: &[f32], act: Activation) -> Vec<f32> {
    x.par_iter()
        .map(|&v| match act {
            Activation::Silu => v / (1.0 + (-v).exp()),
            Activation::Gelu => 0.5 * v * (1.0 + libm::erff(v * std::f32::consts::FRAC_1_SQRT_2)),
            Activation::GeluTanh => gelu_tanh(v),
            Activation::QuickGelu => v / (1.0 + (-1.702 * v).exp()),
            Activation::Relu => v.max(0.0),
        })
        .collect()
}

/// `a + b` with `b` equal in shape, `[C]` (last dim), or a leading-1 broadcast of `a`.
pub fn add_broadcast(a: &[f32], sa: &[usize], b: &[f32], sb: &[usize]) -> Result<Vec<f32>> {
    if sa == sb {
        return Ok(zip(a, b, |x, y| x + y));
    }
    let period = if sb.len() == 1 && sa.last() == sb.last() {
        sb[0]
    } else if sb.len() == sa.len() && sb[0] == 1 && sb[1..] == sa[1..] {
        b.len()
    } else {
        return Err(ModelError::backend(format!(
            "add: cannot broadcast {sb:?} to {sa:?}"
        )));
    };
    let mut out = vec![0.0f32; a.len()];
    out.par_chunks_mut(period)
        .zip(a.par_chunks(period))
        .for_each(|(o, x)| {
            for i in 0..period {
                o[i] = x[i] + b[i];
            }
        });
    Ok(out)
}

pub fn concat(parts: &[&CpuTensor], dim: usize) -> Result<(Vec<usize>, Vec<f32>)> {
    let first = parts
        .first()
        .ok_or_else(|| ModelError::backend("concat of nothing"))?;
    let s0 = first.shape();
    if dim >= s0.len() {
        return Err(ModelError::backend("concat: dim out of range"));
    }
    for p in parts {
        let s = p.shape();
        if s.len() != s0.len() || s.iter().enumerate().any(|(i, &d)| i != dim && d != s0[i]) {
            return Err(ModelError::backend(format!("concat: {s:?} vs {s0:?}")));
        }
    }
    let outer: usize = s0[..dim].iter().product();
    let inner: usize = s0[dim + 1..].iter().product();
    let total_dim: usize = parts.iter().map(|p| p.shape()[dim]).sum();
    let mut out = Vec::with_capacity(outer * total_dim * inner);
    for o in 0..outer {
        for p in parts {
            let len = p.shape()[dim] * inner;
            out.extend_from_slice(&p.data()[o * len..(o + 1) * len]);
        }
    }
    let mut shape = s0.to_vec();
    shape[dim] = total_dim;
    Ok((shape, out))
}

pub fn narrow(
    x: &[f32],
    s: &[usize],
    dim: usize,
    start: usize,
    len: usize,
) -> Result<(Vec<usize>, Vec<f32>)> {
    if dim >= s.len() || start + len > s[dim] {
        return Err(ModelError::backend(format!(
            "narrow: {start}+{len} out of range of dim {dim} in {s:?}"
        )));
    }
    let outer: usize = s[..dim].iter().product();
    let inner: usize = s[dim + 1..].iter().product();
    let mut out = Vec::with_capacity(outer * len * inner);
    for o in 0..outer {
        let base = (o * s[dim] + start) * inner;
        out.extend_from_slice(&x[base..base + len * inner]);
    }
    let mut shape = s.to_vec();
    shape[dim] = len;
    Ok((shape, out))
}

pub fn permute(x: &[f32], s: &[usize], perm: &[usize]) -> Result<(Vec<usize>, Vec<f32>)> {
    let n = s.len();
    let mut seen = vec![false; n];
    if perm.len() != n
        || perm
            .iter()
            .any(|&p| p >= n || std::mem::replace(&mut seen[p], true))
    {
        return Err(ModelError::backend(format!("permute: {perm:?} for {s:?}")));
    }
    let mut in_strides = vec![1usize; n];
    for i in (0..n.saturating_sub(1)).rev() {
        in_strides[i] = in_strides[i + 1] * s[i + 1];
    }
    let shape: Vec<usize> = perm.iter().map(|&p| s[p]).collect();
    let strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    let total = x.len();
    let last = *shape.last().unwrap_or(&1);
    let last_stride = *strides.last().unwrap_or(&1);
    let mut out = vec![0.0f32; total];
    out.par_chunks_mut(last.max(1))
        .enumerate()
        .for_each(|(row, o)| {
            // Offset of this output row's first element in the input.
            let mut rem = row;
            let mut base = 0;
            for d in (0..n - 1).rev() {
                base += (rem % shape[d]) * strides[d];
                rem /= shape[d];
            }
            for (j, v) in o.iter_mut().enumerate() {
                *v = x[base + j * last_stride];
            }
        });
    Ok((shape, out))
}

pub fn upsample_nearest2x(x: &[f32], s: &[usize]) -> Result<(Vec<usize>, Vec<f32>)> {
    if s.len() != 4 {
        return Err(ModelError::backend("upsample: expected [B, C, H, W]"));
    }
    let (h, w) = (s[2], s[3]);
    let mut out = vec![0.0f32; x.len() * 4];
    out.par_chunks_mut(4 * h * w)
        .zip(x.par_chunks(h * w))
        .for_each(|(o, plane)| {
            for i in 0..2 * h {
                for j in 0..2 * w {
                    o[i * 2 * w + j] = plane[(i / 2) * w + j / 2];
                }
            }
        });
    Ok((vec![s[0], s[1], 2 * h, 2 * w], out))
}

pub fn conv2d(
    x: &[f32],
    xs: &[usize],
    w: &[f32],
    ws: &[usize],
    bias: Option<&[f32]>,
    p: Conv2dParams,
) -> Result<(Vec<usize>, Vec<f32>)> {
    if xs.len() != 4 || ws.len() != 4 || ws[1] != xs[1] || p.stride == 0 {
        return Err(ModelError::backend(format!(
            "conv2d: input {xs:?}, kernel {ws:?}"
        )));
    }
    let (b, cin, h, wd) = (xs[0], xs[1], xs[2], xs[3]);
    let (cout, kh, kw) = (ws[0], ws[2], ws[3]);
    if h + 2 * p.padding < kh || wd + 2 * p.padding < kw {
        return Err(ModelError::backend(
            "conv2d: kernel larger than padded input",
        ));
    }
    let ho = (h + 2 * p.padding - kh) / p.stride + 1;
    let wo = (wd + 2 * p.padding - kw) / p.stride + 1;
    let kk = cin * kh * kw;
    let mut out = vec![0.0f32; b * cout * ho * wo];
    // Bands of output rows keep the im2col buffer near 32 MiB.
    let band = ((8 << 20) / (kk * wo).max(1)).clamp(1, ho);
    for bi in 0..b {
        let xin = &x[bi * cin * h * wd..(bi + 1) * cin * h * wd];
        let ob = &mut out[bi * cout * ho * wo..(bi + 1) * cout * ho * wo];
        let mut r0 = 0;
        while r0 < ho {
            let rows = band.min(ho - r0);
            let cols = rows * wo;
            let mut col = vec![0.0f32; kk * cols];
            col.par_chunks_mut(cols).enumerate().for_each(|(ki, crow)| {
                let ci = ki / (kh * kw);
                let ky = (ki / kw) % kh;
                let kx = ki % kw;
                for r in 0..rows {
                    let oy = r0 + r;
                    let iy = (oy * p.stride + ky) as isize - p.padding as isize;
                    for ox in 0..wo {
                        let ix = (ox * p.stride + kx) as isize - p.padding as isize;
                        crow[r * wo + ox] =
                            if iy >= 0 && (iy as usize) < h && ix >= 0 && (ix as usize) < wd {
                                xin[ci * h * wd + iy as usize * wd + ix as usize]
                            } else {
                                0.0
                            };
                    }
                }
            });
            let mut tmp = vec![0.0f32; cout * cols];
            let (a, b) = (Mat::rows(w, kk), Mat::rows(&col, cols));
            gemm((cout, cols, kk), a, b, &mut tmp, cols, false, threads());
            for co in 0..cout {
                let bv = bias.map_or(0.0, |bb| bb[co]);
                let dst = &mut ob[co * ho * wo + r0 * wo..co * ho * wo + r0 * wo + cols];
                for (d, s) in dst.iter_mut().zip(&tmp[co * cols..(co + 1) * cols]) {
                    *d = s + bv;
                }
            }
            r0 += rows;
        }
    }
    Ok((vec![b, cout, ho, wo], out))
}

/// Gathers head `h` of packed `[S, H*D]` rows into a contiguous `[S, D]`.
fn gather_head(x: &[f32], s: usize, heads: usize, d: usize, h: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(s * d);
    for i in 0..s {
        let base = i * heads * d + h * d;
        out.extend_from_slice(&x[base..base + d]);
    }
    out
}

const QUERY_BLOCK: usize = 128;

#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    qs: &[usize],
    k: &[f32],
    ks: &[usize],
    v: &[f32],
    vs: &[usize],
    heads: usize,
    scale: f32,
    causal: bool,
    bias: Option<(&[f32], &[usize])>,
) -> Result<Vec<f32>> {
    if qs.len() != 3 || ks.len() != 3 || ks != vs || qs[0] != ks[0] || qs[2] != ks[2] {
        return Err(ModelError::backend(format!(
            "attention: q {qs:?}, k {ks:?}, v {vs:?}"
        )));
    }
    let (b, sq, c) = (qs[0], qs[1], qs[2]);
    let sk = ks[1];
    if heads == 0 || c % heads != 0 {
        return Err(ModelError::backend(
            "attention: channels not divisible by heads",
        ));
    }
    if let Some((_, bs)) = bias
        && bs != [heads, sq, sk]
    {
        return Err(ModelError::backend(format!(
            "attention: bias {bs:?}, expected {:?}",
            [heads, sq, sk]
        )));
    }
    let d = c / heads;
    let blocks = sq.div_ceil(QUERY_BLOCK);
    // One task per (batch entry, head, query block); each writes its own output rows.
    let results: Vec<(usize, usize, usize, Vec<f32>)> = (0..b * heads * blocks)
        .into_par_iter()
        .map(|task| {
            let bi = task / (heads * blocks);
            let h = (task / blocks) % heads;
            let blk = task % blocks;
            let q0 = blk * QUERY_BLOCK;
            let nq = QUERY_BLOCK.min(sq - q0);
            let qb = &q[bi * sq * c..(bi + 1) * sq * c];
            let kb = &k[bi * sk * c..(bi + 1) * sk * c];
            let vb = &v[bi * sk * c..(bi + 1) * sk * c];
            let qh = gather_head(&qb[q0 * c..(q0 + nq) * c], nq, heads, d, h);
            let kh = gather_head(kb, sk, heads, d, h);
            let vh = gather_head(vb, sk, heads, d, h);
            let mut scores = vec![0.0f32; nq * sk];
            let (a, b) = (Mat::rows(&qh, d), Mat::transposed(&kh, d));
            gemm((nq, sk, d), a, b, &mut scores, sk, false, Parallelism::None);
            for (i, row) in scores.chunks_mut(sk).enumerate() {
                let qi = q0 + i;
                for (j, sc) in row.iter_mut().enumerate() {
                    *sc *= scale;
                    if let Some((bias, _)) = bias {
                        *sc += bias[(h * sq + qi) * sk + j];
                    }
                    if causal && j > qi {
                        *sc = f32::NEG_INFINITY;
                    }
                }
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let mut sum = 0.0f64;
                for sc in row.iter_mut() {
                    *sc = (*sc - max).exp();
                    sum += *sc as f64;
                }
                let inv = (1.0 / sum) as f32;
                for sc in row.iter_mut() {
                    *sc *= inv;
                }
            }
            let mut o = vec![0.0f32; nq * d];
            let (a, b) = (Mat::rows(&scores, sk), Mat::rows(&vh, d));
            gemm((nq, d, sk), a, b, &mut o, d, false, Parallelism::None);
            (bi, h, q0, o)
        })
        .collect();
    let mut out = vec![0.0f32; b * sq * c];
    for (bi, h, q0, o) in results {
        for (i, row) in o.chunks(d).enumerate() {
            let base = (bi * sq + q0 + i) * c + h * d;
            out[base..base + d].copy_from_slice(row);
        }
    }
    Ok(out)
}
