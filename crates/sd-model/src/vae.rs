//! The decoder half of `AutoencoderKL` (SD3's 16-channel VAE): latents -> RGB in [-1, 1].

use crate::backend::{AttentionParams, Backend, Conv2dParams};
use crate::config::VaeConfig;
use crate::error::{ModelError, Result};
use crate::load::Loader;
use crate::plan::PrecisionPlan;
use crate::weights::WeightSource;

const EPS: f32 = 1e-6;
const PAD1: Conv2dParams = Conv2dParams {
    stride: 1,
    padding: 1,
};
const PAD0: Conv2dParams = Conv2dParams {
    stride: 1,
    padding: 0,
};

struct Conv<B: Backend> {
    w: B::Tensor,
    b: B::Tensor,
    p: Conv2dParams,
}

impl<B: Backend> Conv<B> {
    fn load(l: &Loader<'_, B>, name: &str, cin: usize, cout: usize, k: usize) -> Result<Self> {
        Ok(Self {
            w: l.param(&format!("{name}.weight"), &[cout, cin, k, k])?,
            b: l.param(&format!("{name}.bias"), &[cout])?,
            p: if k == 1 { PAD0 } else { PAD1 },
        })
    }
    fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        b.conv2d(x, &self.w, Some(&self.b), self.p)
    }
    /// `residual + conv(x)`.
    fn forward_add(&self, b: &B, x: &B::Tensor, residual: &B::Tensor) -> Result<B::Tensor> {
        b.conv2d_add(x, &self.w, Some(&self.b), self.p, residual)
    }
}

struct Resnet<B: Backend> {
    norm1: (B::Tensor, B::Tensor),
    conv1: Conv<B>,
    norm2: (B::Tensor, B::Tensor),
    conv2: Conv<B>,
    shortcut: Option<Conv<B>>,
}

impl<B: Backend> Resnet<B> {
    fn load(l: &Loader<'_, B>, p: &str, cin: usize, cout: usize) -> Result<Self> {
        Ok(Self {
            norm1: l.norm(&format!("{p}.norm1"), cin)?,
            conv1: Conv::load(l, &format!("{p}.conv1"), cin, cout, 3)?,
            norm2: l.norm(&format!("{p}.norm2"), cout)?,
            conv2: Conv::load(l, &format!("{p}.conv2"), cout, cout, 3)?,
            shortcut: if cin != cout {
                Some(Conv::load(l, &format!("{p}.conv_shortcut"), cin, cout, 1)?)
            } else {
                None
            },
        })
    }
    fn forward(&self, b: &B, x: &B::Tensor, groups: usize) -> Result<B::Tensor> {
        let h = b.group_norm_silu(x, groups, &self.norm1.0, &self.norm1.1, EPS)?;
        let h = self.conv1.forward(b, &h)?;
        let h = b.group_norm_silu(&h, groups, &self.norm2.0, &self.norm2.1, EPS)?;
        let skip = match &self.shortcut {
            Some(c) => c.forward(b, x)?,
            None => x.clone(),
        };
        self.conv2.forward_add(b, &h, &skip)
    }
}

/// Single-head spatial self-attention of the mid block.
struct SpatialAttention<B: Backend> {
    norm: (B::Tensor, B::Tensor),
    q: B::Linear,
    k: B::Linear,
    v: B::Linear,
    out: B::Linear,
}

impl<B: Backend> SpatialAttention<B> {
    fn load(l: &Loader<'_, B>, p: &str, c: usize) -> Result<Self> {
        Ok(Self {
            norm: l.norm(&format!("{p}.group_norm"), c)?,
            q: l.linear(&format!("{p}.to_q"), c, c, true)?,
            k: l.linear(&format!("{p}.to_k"), c, c, true)?,
            v: l.linear(&format!("{p}.to_v"), c, c, true)?,
            out: l.linear(&format!("{p}.to_out.0"), c, c, true)?,
        })
    }
    fn forward(&self, b: &B, x: &B::Tensor, groups: usize) -> Result<B::Tensor> {
        let c = b.dims(x)[1];
        let n = b.group_norm(x, groups, &self.norm.0, &self.norm.1, EPS)?;
        // [B, C, H, W] -> [B, H*W, C]: one-pixel patches.
        let tokens = b.patchify(&n, 1)?;
        let (q, k, v) = (
            b.linear(&tokens, &self.q)?,
            b.linear(&tokens, &self.k)?,
            b.linear(&tokens, &self.v)?,
        );
        let params = AttentionParams {
            heads: 1,
            scale: 1.0 / (c as f32).sqrt(),
            causal: false,
            bias: None,
        };
        let o = b.linear(&b.attention(&q, &k, &v, params)?, &self.out)?;
        let o = b.unpatchify(&o, 1, x)?;
        b.add(x, &o)
    }
}

struct UpBlock<B: Backend> {
    resnets: Vec<Resnet<B>>,
    upsample: Option<Conv<B>>,
}

pub struct VaeDecoder<B: Backend> {
    pub config: VaeConfig,
    post_quant_conv: Option<Conv<B>>,
    conv_in: Conv<B>,
    mid_resnets: [Resnet<B>; 2],
    mid_attention: Option<SpatialAttention<B>>,
    up_blocks: Vec<UpBlock<B>>,
    norm_out: (B::Tensor, B::Tensor),
    conv_out: Conv<B>,
}

impl<B: Backend> VaeDecoder<B> {
    pub fn load(
        backend: &B,
        config: VaeConfig,
        src: &dyn WeightSource,
        plan: &PrecisionPlan,
    ) -> Result<Self> {
        let l = Loader { backend, src, plan };
        let ch = &config.block_out_channels;
        let top = *ch.last().unwrap_or(&0);
        let zc = config.latent_channels;
        let mut up_blocks = Vec::new();
        let mut prev = top;
        let reversed: Vec<usize> = ch.iter().rev().copied().collect();
        for (i, &out) in reversed.iter().enumerate() {
            let p = format!("decoder.up_blocks.{i}");
            let resnets = (0..=config.layers_per_block)
                .map(|j| {
                    let cin = if j == 0 { prev } else { out };
                    Resnet::load(&l, &format!("{p}.resnets.{j}"), cin, out)
                })
                .collect::<Result<Vec<_>>>()?;
            let upsample = if i + 1 < reversed.len() {
                Some(Conv::load(
                    &l,
                    &format!("{p}.upsamplers.0.conv"),
                    out,
                    out,
                    3,
                )?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsample });
            prev = out;
        }
        Ok(Self {
            post_quant_conv: if config.use_post_quant_conv {
                Some(Conv::load(&l, "post_quant_conv", zc, zc, 1)?)
            } else {
                None
            },
            conv_in: Conv::load(&l, "decoder.conv_in", zc, top, 3)?,
            mid_resnets: [
                Resnet::load(&l, "decoder.mid_block.resnets.0", top, top)?,
                Resnet::load(&l, "decoder.mid_block.resnets.1", top, top)?,
            ],
            mid_attention: if config.mid_block_add_attention {
                Some(SpatialAttention::load(
                    &l,
                    "decoder.mid_block.attentions.0",
                    top,
                )?)
            } else {
                None
            },
            up_blocks,
            norm_out: l.norm("decoder.conv_norm_out", ch[0])?,
            conv_out: Conv::load(&l, "decoder.conv_out", ch[0], config.out_channels, 3)?,
            config,
        })
    }

    /// Undoes the latent normalisation: `z / scaling_factor + shift_factor`.
    pub fn unscale_latents(&self, b: &B, z: &B::Tensor) -> Result<B::Tensor> {
        let shift = self.config.shift_factor.unwrap_or(0.0) as f32;
        // diffusers divides by the factor; multiplying by its reciprocal differs by at most
        // one ulp, far inside every tolerance, and keeps the backend op a plain affine map.
        b.scale_shift(z, 1.0 / self.config.scaling_factor as f32, shift)
    }

    /// `z [B, latent_channels, h, w]` (already unscaled) -> image `[B, 3, 8h, 8w]` in ~[-1, 1].
    pub fn decode(&self, b: &B, z: &B::Tensor) -> Result<B::Tensor> {
        let d = b.dims(z);
        if d.len() != 4 || d[1] != self.config.latent_channels {
            return Err(ModelError::input(format!(
                "VAE input must be [B, {}, h, w], got {d:?}",
                self.config.latent_channels
            )));
        }
        let g = self.config.norm_num_groups;
        let mut x = match &self.post_quant_conv {
            Some(c) => c.forward(b, z)?,
            None => z.clone(),
        };
        x = self.conv_in.forward(b, &x)?;
        x = self.mid_resnets[0].forward(b, &x, g)?;
        if let Some(a) = &self.mid_attention {
            x = a.forward(b, &x, g)?;
        }
        x = self.mid_resnets[1].forward(b, &x, g)?;
        for block in &self.up_blocks {
            for r in &block.resnets {
                x = r.forward(b, &x, g)?;
            }
            if let Some(up) = &block.upsample {
                x = up.forward(b, &b.upsample_nearest2x(&x)?)?;
            }
        }
        let x = b.group_norm_silu(&x, g, &self.norm_out.0, &self.norm_out.1, EPS)?;
        self.conv_out.forward(b, &x)
    }
}
