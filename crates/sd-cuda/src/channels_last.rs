//! Channels-last (NHWC) image tensors: the layout the VAE decoder keeps between its cuDNN
//! convolutions (see `conv.rs` for why).
//!
//! A [`CudaTensor`] always has its logical shape, `[N, C, H, W]` for images, as the model
//! code sees it; its [`Layout`] says how the buffer holds those values. Only 4-D tensors
//! are ever channels-last, and only these operations make or read them in place:
//! convolutions on [`ConvPath::CudnnNhwc`] (their output and filters), group norm (+ SiLU),
//! nearest upsampling, same-shape adds and products, the unary elementwise operations,
//! and `patchify` / `unpatchify` with one-pixel patches (the mid-block attention's
//! `[N, H*W, C]` tokens are the NHWC buffer as it is). Every other operation receives
//! its inputs through [`Inner::row_major`] at the backend's trait boundary, so a
//! channels-last tensor is never read as row-major by mistake; the conversion is one
//! transposing copy.

use std::borrow::Cow;
use std::sync::Arc;

use cudarc::driver::LaunchConfig;
use sd_model::HostTensor;

use crate::conv::ConvPath;
use crate::error::Result;
use crate::{Arg, CudaPrecision, CudaTensor, DeviceBuf, Inner, Storage, bad};

/// How a tensor's buffer holds the values of its logical shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Layout {
    /// Row-major over the logical shape.
    RowMajor,
    /// A logical `[N, C, H, W]` stored as row-major `[N, H, W, C]`.
    ChannelsLast,
}

/// The group norm kernels' block size (`GN_NHWC_THREADS` in norm.cu).
const GN_THREADS: usize = 256;

/// `[N, C, H, W]` -> `[N, H, W, C]` (what a channels-last buffer holds, row-major).
fn nhwc_dims(shape: &[usize]) -> [usize; 4] {
    [shape[0], shape[2], shape[3], shape[1]]
}

/// A host tensor `[K, C, R, S]` transposed to `[K, R, S, C]`: a convolution filter in the
/// layout cuDNN's channels-last kernels read.
pub(crate) fn host_krsc(t: &HostTensor) -> HostTensor {
    let (k, c, r, s) = (t.shape[0], t.shape[1], t.shape[2], t.shape[3]);
    let mut data = vec![0.0; t.data.len()];
    for ki in 0..k {
        for ci in 0..c {
            for ri in 0..r {
                for si in 0..s {
                    data[((ki * r + ri) * s + si) * c + ci] =
                        t.data[((ki * c + ci) * r + ri) * s + si];
                }
            }
        }
    }
    HostTensor {
        shape: vec![k, r, s, c],
        data,
    }
}

impl Inner {
    /// A channels-last tensor of logical shape `[N, C, H, W]` over `buf`, which holds
    /// `[N, H, W, C]` row-major.
    pub(crate) fn wrap_channels_last(&self, shape: Vec<usize>, buf: Storage) -> CudaTensor {
        CudaTensor {
            shape,
            buf: Arc::new(DeviceBuf::new(buf)),
            layout: Layout::ChannelsLast,
        }
    }

    /// The same buffer under another shape and layout (no copy): the caller states what
    /// the buffer holds.
    pub(crate) fn relabel(x: &CudaTensor, shape: Vec<usize>, layout: Layout) -> CudaTensor {
        CudaTensor {
            shape,
            buf: x.buf.clone(),
            layout,
        }
    }

    /// A channels-last tensor's buffer as the row-major `[N, H, W, C]` tensor it is.
    pub(crate) fn physical(x: &CudaTensor) -> CudaTensor {
        match x.layout {
            Layout::RowMajor => x.clone(),
            Layout::ChannelsLast => {
                Self::relabel(x, nhwc_dims(&x.shape).to_vec(), Layout::RowMajor)
            }
        }
    }

    /// `x` row-major: itself, or a transposed copy of a channels-last tensor.
    pub(crate) fn row_major<'a>(&self, x: &'a CudaTensor) -> Result<Cow<'a, CudaTensor>> {
        match x.layout {
            Layout::RowMajor => Ok(Cow::Borrowed(x)),
            Layout::ChannelsLast => Ok(Cow::Owned(
                self.permute_impl(&Self::physical(x), &[0, 3, 1, 2])?,
            )),
        }
    }

    /// As [`Inner::row_major`], with the model's error type (the trait boundary).
    pub(crate) fn rm<'a>(&self, x: &'a CudaTensor) -> sd_model::Result<Cow<'a, CudaTensor>> {
        self.row_major(x).map_err(sd_model::ModelError::from)
    }

    /// A 4-D `x` channels-last: itself, or a transposed copy of a row-major tensor.
    pub(crate) fn channels_last<'a>(&self, x: &'a CudaTensor) -> Result<Cow<'a, CudaTensor>> {
        if x.layout == Layout::ChannelsLast {
            return Ok(Cow::Borrowed(x));
        }
        if x.shape.len() != 4 {
            return Err(bad(format!(
                "channels-last: {:?} is not [N, C, H, W]",
                x.shape
            )));
        }
        let t = self.permute_impl(x, &[0, 2, 3, 1])?;
        Ok(Cow::Owned(Self::relabel(
            &t,
            x.shape.clone(),
            Layout::ChannelsLast,
        )))
    }

    /// Whether the channels-last kernels take `x`: BF16 storage, whole 16-byte vectors
    /// of channels.
    fn nhwc_vectors_fit(&self, x: &CudaTensor) -> bool {
        let c = x.shape.get(1).copied().unwrap_or(0);
        self.precision != CudaPrecision::F32
            && x.layout == Layout::ChannelsLast
            && c.is_multiple_of(8)
            && c > 0
    }

    /// Whether 4-D parameters go up channels-last: convolutions run on cuDNN's NHWC
    /// path (BF16 storage, cuDNN present).
    pub(crate) fn conv_filters_channels_last(&self) -> bool {
        self.precision != CudaPrecision::F32
            && self.conv_path.get() == ConvPath::CudnnNhwc
            && self.cudnn_ready()
    }

    /// Group norm (+ SiLU) of a channels-last `x` in place of layout, or None when the
    /// kernels do not take it (the caller converts to row-major). The caller has checked
    /// the shapes of x, gamma and beta.
    pub(crate) fn group_norm_channels_last(
        &self,
        x: &CudaTensor,
        groups: usize,
        gamma: &CudaTensor,
        beta: &CudaTensor,
        eps: f32,
        silu: bool,
    ) -> Result<Option<CudaTensor>> {
        // One block row of GN_THREADS threads covers a pixel's channels: at most 2048.
        let c = x.shape[1];
        if !self.nhwc_vectors_fit(x) || c / 8 > GN_THREADS || groups > i32::MAX as usize {
            return Ok(None);
        }
        let [n, h, w, c] = nhwc_dims(&x.shape);
        let hw = h * w;
        let out = self.talloc(x.numel())?;
        if x.numel() == 0 {
            return Ok(Some(self.wrap_channels_last(x.shape.clone(), out)));
        }
        let vecs = c / 8;
        let rows = GN_THREADS / vecs;
        // Enough blocks to fill the GPU (the SD3 VAE's 1024x1024 stage: ~1M pixels an
        // image), each with at least a few hundred pixels to sum.
        let chunks = hw.div_ceil(rows * 64).clamp(1, 1024);
        let part = self.alloc::<f64>(2 * n * chunks * groups)?;
        let stats = self.alloc::<f64>(2 * n * groups)?;
        self.launch(
            "group_norm_nhwc_stats",
            LaunchConfig {
                grid_dim: (n as u32, chunks as u32, 1),
                block_dim: (vecs as u32, rows as u32, 1),
                shared_mem_bytes: 0,
            },
            &[
                Arg::P(self.tp(x)),
                Arg::P(self.ptr(&part)),
                Arg::I(c as i32),
                Arg::I(groups as i32),
                Arg::U(hw as u64),
            ],
        )?;
        self.launch(
            "group_norm_nhwc_finalize",
            Self::grid(n * groups),
            &[
                Arg::P(self.ptr(&part)),
                Arg::P(self.ptr(&stats)),
                Arg::I(n as i32),
                Arg::I(groups as i32),
                Arg::I(chunks as i32),
                Arg::U(((c / groups) * hw) as u64),
                Arg::F(eps),
            ],
        )?;
        let vectors = n * hw * vecs;
        self.launch(
            "group_norm_nhwc_apply",
            Self::grid(vectors),
            &[
                Arg::P(self.tp(x)),
                Arg::P(self.ptr(&stats)),
                Arg::P(self.tp(gamma)),
                Arg::P(self.tp(beta)),
                Arg::P(self.sptr(&out)),
                Arg::U(vectors as u64),
                Arg::I(c as i32),
                Arg::I(groups as i32),
                Arg::U(hw as u64),
                Arg::I(silu as i32),
            ],
        )?;
        drop((part, stats));
        Ok(Some(self.wrap_channels_last(x.shape.clone(), out)))
    }

    /// Nearest 2x upsampling of a channels-last `x`, staying channels-last, or None when
    /// the kernel does not take it.
    pub(crate) fn upsample_channels_last(&self, x: &CudaTensor) -> Result<Option<CudaTensor>> {
        if !self.nhwc_vectors_fit(x) || x.shape[1] / 8 > i32::MAX as usize {
            return Ok(None);
        }
        let [n, h, w, c] = nhwc_dims(&x.shape);
        let shape = vec![n, c, 2 * h, 2 * w];
        let out = self.talloc(x.numel() * 4)?;
        let vectors = x.numel() * 4 / 8;
        if vectors > 0 {
            self.launch(
                "upsample2x_nhwc_bf16x8",
                Self::grid(vectors),
                &[
                    Arg::P(self.tp(x)),
                    Arg::P(self.sptr(&out)),
                    Arg::U(n as u64),
                    Arg::U(h as u64),
                    Arg::U(w as u64),
                    Arg::I((c / 8) as i32),
                ],
            )?;
        }
        Ok(Some(self.wrap_channels_last(shape, out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_transpose_to_krsc() {
        // One output channel, two input channels, a 1x2 kernel: KCRS [c0s0 c0s1 c1s0 c1s1]
        // becomes KRSC [s0c0 s0c1 s1c0 s1c1].
        let small = HostTensor {
            shape: vec![1, 2, 1, 2],
            data: vec![10.0, 11.0, 20.0, 21.0],
        };
        let k = host_krsc(&small);
        assert_eq!(k.shape, vec![1, 1, 2, 2]);
        assert_eq!(k.data, vec![10.0, 20.0, 11.0, 21.0]);
        // [K=2, C=3, R=2, S=2], value = its KCRS index.
        let t = HostTensor {
            shape: vec![2, 3, 2, 2],
            data: (0..24).map(|v| v as f32).collect(),
        };
        let k = host_krsc(&t);
        assert_eq!(k.shape, vec![2, 2, 2, 3]);
        for (ki, ci, ri, si) in [(0, 0, 0, 0), (1, 2, 1, 0), (0, 1, 0, 1), (1, 0, 1, 1)] {
            let krsc = ((ki * 2 + ri) * 2 + si) * 3 + ci;
            let kcrs = ((ki * 3 + ci) * 2 + ri) * 2 + si;
            assert_eq!(k.data[krsc], kcrs as f32, "k{ki} c{ci} r{ri} s{si}");
        }
    }

    #[test]
    fn channels_last_buffers_hold_nhwc() {
        assert_eq!(nhwc_dims(&[2, 512, 128, 96]), [2, 128, 96, 512]);
    }
}
