//! The SD3 / SD3.5 transformer (`SD3Transformer2DModel`): MMDiT, with optional qk
//! RMSNorm (SD3.5) and the second image-only attention of MMDiT-X (SD3.5-medium).
//! Parameter names are diffusers'.

use crate::backend::{Activation, AttentionParams, Backend};
use crate::config::TransformerConfig;
use crate::error::{ModelError, Result};
use crate::load::Loader;
use crate::plan::PrecisionPlan;
use crate::tensor::HostTensor;
use crate::weights::WeightSource;

const NORM_EPS: f32 = 1e-6;
const TIME_PROJ_DIM: usize = 256;

/// Numbers every loaded transformer, so that a backend's recordings of one model's
/// forward are never replayed for another (two models can share input shapes).
static NEXT_MODEL_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One attention's projections; the context (`add_*`) half exists in joint attention.
struct Projections<B: Backend> {
    q: B::Linear,
    k: B::Linear,
    v: B::Linear,
    norm_q: Option<B::Tensor>,
    norm_k: Option<B::Tensor>,
}

impl<B: Backend> Projections<B> {
    fn load(
        l: &Loader<'_, B>,
        prefix: &str,
        names: [&str; 5],
        dim: usize,
        qk_norm: bool,
        head_dim: usize,
    ) -> Result<Self> {
        let [q, k, v, nq, nk] = names;
        let norm = |n: &str| -> Result<Option<B::Tensor>> {
            if qk_norm {
                Ok(Some(l.param(&format!("{prefix}.{n}.weight"), &[head_dim])?))
            } else {
                Ok(None)
            }
        };
        Ok(Self {
            q: l.linear(&format!("{prefix}.{q}"), dim, dim, true)?,
            k: l.linear(&format!("{prefix}.{k}"), dim, dim, true)?,
            v: l.linear(&format!("{prefix}.{v}"), dim, dim, true)?,
            norm_q: norm(nq)?,
            norm_k: norm(nk)?,
        })
    }

    /// q, k, v of `x [B, S, H*D]`, with q and k RMS-normalised per head when configured.
    fn project(
        &self,
        b: &B,
        x: &B::Tensor,
        heads: usize,
    ) -> Result<(B::Tensor, B::Tensor, B::Tensor)> {
        let q = b.linear(x, &self.q)?;
        let k = b.linear(x, &self.k)?;
        let v = b.linear(x, &self.v)?;
        let q = per_head_rms(b, &q, self.norm_q.as_ref(), heads)?;
        let k = per_head_rms(b, &k, self.norm_k.as_ref(), heads)?;
        Ok((q, k, v))
    }
}

fn per_head_rms<B: Backend>(
    b: &B,
    x: &B::Tensor,
    gamma: Option<&B::Tensor>,
    heads: usize,
) -> Result<B::Tensor> {
    let Some(g) = gamma else {
        return Ok(x.clone());
    };
    let d = b.dims(x);
    let (bs, s, c) = (d[0], d[1], d[2]);
    let split = b.reshape(x, &[bs, s, heads, c / heads])?;
    let n = b.rms_norm(&split, Some(g), NORM_EPS)?;
    b.reshape(&n, &[bs, s, c])
}

struct FeedForward<B: Backend> {
    up: B::Linear,
    down: B::Linear,
}

impl<B: Backend> FeedForward<B> {
    fn load(l: &Loader<'_, B>, prefix: &str, dim: usize) -> Result<Self> {
        Ok(Self {
            up: l.linear(&format!("{prefix}.net.0.proj"), dim, 4 * dim, true)?,
            down: l.linear(&format!("{prefix}.net.2"), 4 * dim, dim, true)?,
        })
    }
    fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let h = b.linear_gelu(x, &self.up)?;
        b.linear(&h, &self.down)
    }
}

struct JointBlock<B: Backend> {
    /// adaLN-Zero modulation of the image stream: 6 chunks, 9 with dual attention.
    norm1: B::Linear,
    /// Context modulation: 6 chunks, or 2 (scale, shift) in the last, context-pre-only block.
    norm1_context: B::Linear,
    image: Projections<B>,
    context: Projections<B>,
    to_out: B::Linear,
    to_add_out: Option<B::Linear>,
    /// MMDiT-X's image-only attention.
    attn2: Option<(Projections<B>, B::Linear)>,
    ff: FeedForward<B>,
    ff_context: Option<FeedForward<B>>,
}

impl<B: Backend> JointBlock<B> {
    fn load(l: &Loader<'_, B>, cfg: &TransformerConfig, i: usize) -> Result<Self> {
        let dim = cfg.inner_dim();
        let hd = cfg.attention_head_dim;
        let qk = cfg.uses_qk_norm();
        let p = format!("transformer_blocks.{i}");
        let pre_only = i == cfg.num_layers - 1;
        let dual = cfg.dual_attention_layers.contains(&i);
        let attn = format!("{p}.attn");
        Ok(Self {
            norm1: l.linear(
                &format!("{p}.norm1.linear"),
                dim,
                if dual { 9 } else { 6 } * dim,
                true,
            )?,
            norm1_context: l.linear(
                &format!("{p}.norm1_context.linear"),
                dim,
                if pre_only { 2 } else { 6 } * dim,
                true,
            )?,
            image: Projections::load(
                l,
                &attn,
                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                dim,
                qk,
                hd,
            )?,
            context: Projections::load(
                l,
                &attn,
                [
                    "add_q_proj",
                    "add_k_proj",
                    "add_v_proj",
                    "norm_added_q",
                    "norm_added_k",
                ],
                dim,
                qk,
                hd,
            )?,
            to_out: l.linear(&format!("{attn}.to_out.0"), dim, dim, true)?,
            to_add_out: if pre_only {
                None
            } else {
                Some(l.linear(&format!("{attn}.to_add_out"), dim, dim, true)?)
            },
            attn2: if dual {
                let a2 = format!("{p}.attn2");
                Some((
                    Projections::load(
                        l,
                        &a2,
                        ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                        dim,
                        qk,
                        hd,
                    )?,
                    l.linear(&format!("{a2}.to_out.0"), dim, dim, true)?,
                ))
            } else {
                None
            },
            ff: FeedForward::load(l, &format!("{p}.ff"), dim)?,
            ff_context: if pre_only {
                None
            } else {
                Some(FeedForward::load(l, &format!("{p}.ff_context"), dim)?)
            },
        })
    }

    /// adaLN's modulation vectors of this block, each cut out in one call: the image
    /// stream's 6 (9 with dual attention) and the context's 6 (2 in the last block).
    fn modulation(&self, b: &B, silu_temb: &B::Tensor, dim: usize) -> Result<Modulation<B>> {
        let cut = |lin: &B::Linear| -> Result<Vec<B::Tensor>> {
            let m = b.linear(silu_temb, lin)?;
            let parts = b.dims(&m)[1] / dim.max(1);
            b.chunks(&m, parts)
        };
        Ok(Modulation {
            image: cut(&self.norm1)?,
            context: cut(&self.norm1_context)?,
        })
    }

    /// The (shift, scale) of the context's pre-attention norm.
    fn context_shift_scale<'m>(
        &self,
        mc: &'m [B::Tensor],
    ) -> Result<(&'m B::Tensor, &'m B::Tensor)> {
        if self.to_add_out.is_none() {
            // AdaLayerNormContinuous: (scale, shift), in that order.
            Ok((chunk(mc, 1)?, chunk(mc, 0)?))
        } else {
            Ok((chunk(mc, 0)?, chunk(mc, 1)?))
        }
    }

    /// The image stream's pre-attention norm (`layer_norm_modulate_for`: a backend may
    /// write the Q/K/V projections' FP8 input codes in the norm's pass). Only the first
    /// block runs it on its own: every later block's comes fused with the previous
    /// block's MLP residual add ([`Mmdit::forward`]).
    fn image_norm(&self, b: &B, x: &B::Tensor, m: &Modulation<B>) -> Result<B::Tensor> {
        b.layer_norm_modulate_for(
            x,
            chunk(&m.image, 0)?,
            chunk(&m.image, 1)?,
            NORM_EPS,
            &self.image.q,
        )
    }

    /// The block from the image stream `x`, its normalized form `x_mod` (modulated by
    /// `m`) and the context `ctx`, to the image stream's MLP output: its gated residual
    /// add, `gated_add(x, m.image[5], x_mlp)` with the [`BlockOut`] fields, is left to
    /// the caller, which does it together with the next norm. The context's is done
    /// here (the context is a short stream).
    fn forward(
        &self,
        b: &B,
        x: &B::Tensor,
        x_mod: &B::Tensor,
        ctx: &B::Tensor,
        m: &Modulation<B>,
        heads: usize,
    ) -> Result<BlockOut<B>> {
        let dim = b.dims(x)[2];
        let m_img = &m.image;
        let (gate_msa, shift_mlp, scale_mlp) =
            (chunk(m_img, 2)?, chunk(m_img, 3)?, chunk(m_img, 4)?);
        // Each stream's norm right before its projections: a backend keeps the norm's
        // FP8 codes as the input quantization of the next linear layers.
        let (qi, ki, vi) = self.image.project(b, x_mod, heads)?;
        let (c_shift, c_scale) = self.context_shift_scale(&m.context)?;
        let c_mod = b.layer_norm_modulate_for(ctx, c_shift, c_scale, NORM_EPS, &self.context.q)?;
        let (qc, kc, vc) = self.context.project(b, &c_mod, heads)?;

        // Joint attention: image tokens first, then context tokens.
        let scale = 1.0 / ((dim / heads) as f32).sqrt();
        let params = AttentionParams {
            heads,
            scale,
            causal: false,
            bias: None,
        };
        let (o_img, o_ctx) = b.joint_attention([&qi, &ki, &vi], [&qc, &kc, &vc], params)?;
        let o_img = b.linear(&o_img, &self.to_out)?;

        // The last residual add of the attention part goes with the MLP's norm.
        let (x, h) = if let Some((proj2, out2)) = &self.attn2 {
            let x_att = b.gated_add(x, gate_msa, &o_img)?;
            // The same norm of the block input as x_mod (MMDiT-X's second attention).
            let x_mod2 = b.layer_norm_modulate_for(
                x,
                chunk(m_img, 6)?,
                chunk(m_img, 7)?,
                NORM_EPS,
                &proj2.q,
            )?;
            let (q2, k2, v2) = proj2.project(b, &x_mod2, heads)?;
            let o2 = b.linear(&b.attention(&q2, &k2, &v2, params)?, out2)?;
            b.gated_add_layer_norm_modulate_for(
                &x_att,
                chunk(m_img, 8)?,
                &o2,
                shift_mlp,
                scale_mlp,
                NORM_EPS,
                &self.ff.up,
            )?
        } else {
            b.gated_add_layer_norm_modulate_for(
                x,
                gate_msa,
                &o_img,
                shift_mlp,
                scale_mlp,
                NORM_EPS,
                &self.ff.up,
            )?
        };
        let x_mlp = self.ff.forward(b, &h)?;

        let (Some(to_add_out), Some(ff_context)) = (&self.to_add_out, &self.ff_context) else {
            return Ok(BlockOut {
                x,
                x_mlp,
                context: None,
            });
        };
        let mc = &m.context;
        let o_ctx = b.linear(&o_ctx, to_add_out)?;
        let (ctx, h) = b.gated_add_layer_norm_modulate_for(
            ctx,
            chunk(mc, 2)?,
            &o_ctx,
            chunk(mc, 3)?,
            chunk(mc, 4)?,
            NORM_EPS,
            &ff_context.up,
        )?;
        let ctx = b.gated_add(&ctx, chunk(mc, 5)?, &ff_context.forward(b, &h)?)?;
        Ok(BlockOut {
            x,
            x_mlp,
            context: Some(ctx),
        })
    }
}

/// adaLN's modulation vectors of one block.
struct Modulation<B: Backend> {
    image: Vec<B::Tensor>,
    context: Vec<B::Tensor>,
}

/// A block's image stream before its MLP residual add, that MLP's output, and the new
/// context (`None` after the last block).
struct BlockOut<B: Backend> {
    x: B::Tensor,
    x_mlp: B::Tensor,
    context: Option<B::Tensor>,
}

/// Part `i` of an adaLN modulation (`Backend::chunks`).
fn chunk<T>(parts: &[T], i: usize) -> Result<&T> {
    parts.get(i).ok_or_else(|| {
        ModelError::backend(format!(
            "adaLN modulation has {} chunks, the block needs chunk {i}",
            parts.len()
        ))
    })
}

/// The denoising transformer.
pub struct Mmdit<B: Backend> {
    pub config: TransformerConfig,
    patch_embed: B::Linear,
    /// `[M, M, D]` sin-cos table, cropped to the latent size at each call.
    pos_embed: B::Tensor,
    time_1: B::Linear,
    time_2: B::Linear,
    text_1: B::Linear,
    text_2: B::Linear,
    context_embedder: B::Linear,
    blocks: Vec<JointBlock<B>>,
    norm_out: B::Linear,
    proj_out: B::Linear,
    /// This model's name for `Backend::replayable` (unique in the process).
    replay_name: String,
}

impl<B: Backend> Mmdit<B> {
    /// Names of every linear layer in execution order, for calibration and reports.
    pub fn linear_layer_names(cfg: &TransformerConfig) -> Vec<String> {
        let mut v = vec![
            "pos_embed.proj".to_string(),
            "time_text_embed.timestep_embedder.linear_1".into(),
            "time_text_embed.timestep_embedder.linear_2".into(),
            "time_text_embed.text_embedder.linear_1".into(),
            "time_text_embed.text_embedder.linear_2".into(),
            "context_embedder".into(),
        ];
        for i in 0..cfg.num_layers {
            let p = format!("transformer_blocks.{i}");
            let pre_only = i == cfg.num_layers - 1;
            v.push(format!("{p}.norm1.linear"));
            v.push(format!("{p}.norm1_context.linear"));
            for n in [
                "to_q",
                "to_k",
                "to_v",
                "add_q_proj",
                "add_k_proj",
                "add_v_proj",
            ] {
                v.push(format!("{p}.attn.{n}"));
            }
            v.push(format!("{p}.attn.to_out.0"));
            if !pre_only {
                v.push(format!("{p}.attn.to_add_out"));
            }
            if cfg.dual_attention_layers.contains(&i) {
                for n in ["to_q", "to_k", "to_v", "to_out.0"] {
                    v.push(format!("{p}.attn2.{n}"));
                }
            }
            v.push(format!("{p}.ff.net.0.proj"));
            v.push(format!("{p}.ff.net.2"));
            if !pre_only {
                v.push(format!("{p}.ff_context.net.0.proj"));
                v.push(format!("{p}.ff_context.net.2"));
            }
        }
        v.push("norm_out.linear".into());
        v.push("proj_out".into());
        v
    }

    pub fn load(
        backend: &B,
        config: TransformerConfig,
        src: &dyn WeightSource,
        plan: &PrecisionPlan,
    ) -> Result<Self> {
        config.validate()?;
        let l = Loader { backend, src, plan };
        let d = config.inner_dim();
        let p = config.patch_size;
        let cin = config.in_channels;
        let m = config.pos_embed_max_size.unwrap_or(0);
        let pos = if src.contains("pos_embed.pos_embed") {
            let mut w = src.get_shaped("pos_embed.pos_embed", &[1, m * m, d])?;
            w.shape = vec![m, m, d];
            backend.load_param(&w)?
        } else {
            // Older exports drop the buffer; it is a pure function of the config.
            let t = sincos_pos_embed(d, m, config.sample_size / p)?;
            backend.upload(&t)?
        };
        let blocks = (0..config.num_layers)
            .map(|i| JointBlock::load(&l, &config, i))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_embed: l.linear_reshaped(
                "pos_embed.proj",
                &[d, cin, p, p],
                cin * p * p,
                d,
                true,
            )?,
            pos_embed: pos,
            time_1: l.linear(
                "time_text_embed.timestep_embedder.linear_1",
                TIME_PROJ_DIM,
                d,
                true,
            )?,
            time_2: l.linear("time_text_embed.timestep_embedder.linear_2", d, d, true)?,
            text_1: l.linear(
                "time_text_embed.text_embedder.linear_1",
                config.pooled_projection_dim,
                d,
                true,
            )?,
            text_2: l.linear("time_text_embed.text_embedder.linear_2", d, d, true)?,
            context_embedder: l.linear(
                "context_embedder",
                config.joint_attention_dim,
                config.caption_projection_dim,
                true,
            )?,
            blocks,
            norm_out: l.linear("norm_out.linear", d, 2 * d, true)?,
            proj_out: l.linear("proj_out", d, p * p * config.out_channels, true)?,
            config,
            replay_name: format!(
                "mmdit#{}",
                NEXT_MODEL_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ),
        })
    }

    /// Checks a latent size against the positional-embedding table.
    pub fn check_latent_size(&self, h: usize, w: usize) -> Result<()> {
        let p = self.config.patch_size;
        let m = self.config.pos_embed_max_size.unwrap_or(0);
        if !h.is_multiple_of(p) || !w.is_multiple_of(p) {
            return Err(ModelError::input(format!(
                "latent size {h}x{w} is not a multiple of the patch size {p}"
            )));
        }
        if h / p > m || w / p > m {
            return Err(ModelError::input(format!(
                "latent size {h}x{w} exceeds this transformer's maximum of {}x{} (pos_embed_max_size {m})",
                m * p,
                m * p
            )));
        }
        Ok(())
    }

    /// One forward pass: `latents [B, C, H, W]`, `context [B, S, joint_attention_dim]`,
    /// `pooled [B, pooled_projection_dim]`, one timestep per batch entry.
    pub fn forward(
        &self,
        b: &B,
        latents: &B::Tensor,
        context: &B::Tensor,
        pooled: &B::Tensor,
        timesteps: &[f32],
    ) -> Result<B::Tensor> {
        let bs = b.dims(latents).first().copied().unwrap_or(0);
        if timesteps.len() != bs {
            return Err(ModelError::input(format!(
                "{} timesteps for a batch of {bs}",
                timesteps.len()
            )));
        }
        // The sinusoidal projection is host data, so it is an input of the replayable
        // part (a CUDA graph replays everything after it).
        let tproj = b.upload(&timestep_embedding(timesteps, TIME_PROJ_DIM))?;
        b.replayable(
            &self.replay_name,
            &[latents, context, pooled, &tproj],
            &|x: &[&B::Tensor]| match x {
                [latents, context, pooled, tproj] => {
                    self.forward_embedded(b, latents, context, pooled, tproj)
                }
                _ => Err(ModelError::backend(format!(
                    "mmdit: replayed with {} inputs, expected 4",
                    x.len()
                ))),
            },
        )
    }

    /// [`Mmdit::forward`] with the timesteps as a backend tensor `[B]`; the sinusoidal
    /// embedding is [`Backend::timestep_embedding`] (host-side by default, graph
    /// operations in the ONNX tracer, where the timestep is a graph input).
    pub fn forward_t(
        &self,
        b: &B,
        latents: &B::Tensor,
        context: &B::Tensor,
        pooled: &B::Tensor,
        timesteps: &B::Tensor,
    ) -> Result<B::Tensor> {
        let bs = b.dims(latents).first().copied().unwrap_or(0);
        let td = b.dims(timesteps);
        if td != [bs] {
            return Err(ModelError::input(format!(
                "timesteps must be [{bs}] for a batch of {bs}, got {td:?}"
            )));
        }
        let tproj = b.timestep_embedding(timesteps, TIME_PROJ_DIM)?;
        self.forward_embedded(b, latents, context, pooled, &tproj)
    }

    /// The forward pass given the sinusoidal timestep projection `tproj [B, 256]`.
    fn forward_embedded(
        &self,
        b: &B,
        latents: &B::Tensor,
        context: &B::Tensor,
        pooled: &B::Tensor,
        tproj: &B::Tensor,
    ) -> Result<B::Tensor> {
        let cfg = &self.config;
        let dims = b.dims(latents);
        if dims.len() != 4 || dims[1] != cfg.in_channels {
            return Err(ModelError::input(format!(
                "transformer input must be [B, {}, H, W], got {dims:?}",
                cfg.in_channels
            )));
        }
        self.check_latent_size(dims[2], dims[3])?;
        let p = cfg.patch_size;

        // Patchify [B, C, gh, p, gw, p] -> [B, gh*gw, C*p*p] and embed (the conv as a linear).
        let x = b.patchify(latents, p)?;
        let x = b.linear(&x, &self.patch_embed)?;
        let pe = b.cropped_pos_embed(&self.pos_embed, latents, p)?;
        let mut x = b.add(&x, &pe)?;

        // Conditioning vector: timestep embedding + pooled text projection.
        let t = b.linear(tproj, &self.time_1)?;
        let t = b.linear(&b.activation(&t, Activation::Silu)?, &self.time_2)?;
        let y = b.linear(pooled, &self.text_1)?;
        let y = b.linear(&b.activation(&y, Activation::Silu)?, &self.text_2)?;
        let temb = b.add(&t, &y)?;
        let silu_temb = b.activation(&temb, Activation::Silu)?;

        let mut ctx = b.linear(context, &self.context_embedder)?;
        let dim = b.dims(&x)[2];
        let heads = cfg.num_attention_heads;
        let Some(first) = self.blocks.first() else {
            return Err(ModelError::input("the transformer has no blocks"));
        };
        let mut m = first.modulation(b, &silu_temb, dim)?;
        let mut x_mod = first.image_norm(b, &x, &m)?;
        let mut x_out = None;
        for (i, block) in self.blocks.iter().enumerate() {
            let out = block.forward(b, &x, &x_mod, &ctx, &m, heads)?;
            let gate_x = chunk(&m.image, 5)?;
            // The image stream's MLP residual add goes with the next norm: the next
            // block's, or the output layer's.
            let Some(next) = self.blocks.get(i + 1) else {
                let mo = b.linear(&silu_temb, &self.norm_out)?;
                let [scale, shift]: [B::Tensor; 2] = b
                    .chunks(&mo, 2)?
                    .try_into()
                    .map_err(|_| ModelError::backend("chunks: expected 2 parts"))?;
                let (_, xn) = b.gated_add_layer_norm_modulate(
                    &out.x, gate_x, &out.x_mlp, &shift, &scale, NORM_EPS,
                )?;
                x_out = Some(xn);
                break;
            };
            let nm = next.modulation(b, &silu_temb, dim)?;
            let (nx, nx_mod) = b.gated_add_layer_norm_modulate_for(
                &out.x,
                gate_x,
                &out.x_mlp,
                chunk(&nm.image, 0)?,
                chunk(&nm.image, 1)?,
                NORM_EPS,
                &next.image.q,
            )?;
            ctx = out.context.ok_or_else(|| {
                ModelError::backend(format!(
                    "transformer block {i} ended the context stream before the last block"
                ))
            })?;
            (x, x_mod, m) = (nx, nx_mod, nm);
        }
        let x =
            x_out.ok_or_else(|| ModelError::backend("the transformer's last block did not run"))?;
        let x = b.linear(&x, &self.proj_out)?;

        // Unpatchify: [B, gh, gw, p, p, C] -> [B, C, gh, p, gw, p].
        b.unpatchify(&x, p, latents)
    }
}

/// diffusers' `get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)`,
/// computed in f32 like PyTorch.
pub fn timestep_embedding(timesteps: &[f32], dim: usize) -> HostTensor {
    let half = dim / 2;
    let ln = -(10000f64.ln()) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((ln * i as f32) / half as f32).exp())
        .collect();
    let mut data = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let args: Vec<f32> = freqs.iter().map(|f| t * f).collect();
        data.extend(args.iter().map(|a| a.cos()));
        data.extend(args.iter().map(|a| a.sin()));
    }
    HostTensor {
        shape: vec![timesteps.len(), dim],
        data,
    }
}

/// The `[M, M, D]` 2-D sin-cos table of diffusers' `PatchEmbed` (`get_2d_sincos_pos_embed`
/// with `base_size`, interpolation scale 1), for checkpoints that omit the buffer.
pub fn sincos_pos_embed(dim: usize, grid: usize, base_size: usize) -> Result<HostTensor> {
    if !dim.is_multiple_of(4) || grid == 0 || base_size == 0 {
        return Err(ModelError::config(format!(
            "cannot build a sin-cos position table of dim {dim}, grid {grid}, base {base_size}"
        )));
    }
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|i| 1.0 / 10000f64.powf(i as f64 / (dim as f64 / 4.0)))
        .collect();
    let pos = |i: usize| (i as f32 / (grid as f32 / base_size as f32)) as f64;
    let mut data = Vec::with_capacity(grid * grid * dim);
    for row in 0..grid {
        for col in 0..grid {
            // diffusers' first half encodes the column (meshgrid "xy"), the second the row.
            for coord in [pos(col), pos(row)] {
                data.extend(omega.iter().map(|o| (coord * o).sin() as f32));
                data.extend(omega.iter().map(|o| (coord * o).cos() as f32));
            }
        }
    }
    HostTensor::new(vec![grid, grid, dim], data)
}
