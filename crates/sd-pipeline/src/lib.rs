//! The SD3 / SD3.5 text-to-image pipeline, backend-generic.
//!
//! [`Sd3Pipeline::generate`] runs a request end to end. Underneath it is a step-level
//! API — [`Sd3Pipeline::start`] (validate, encode prompts, draw noise),
//! [`Sd3Pipeline::step`] (one denoising step for any number of compatible requests at
//! once), [`Sd3Pipeline::finish`] (VAE decode) — which the server uses for step-level
//! continuous batching. Numerics follow diffusers' `StableDiffusion3Pipeline`.

mod image;
mod parts;
mod request;

pub use image::{Image, encode_png};
pub use parts::*;
pub use request::{GenerateRequest, Limits};

use std::path::Path;

use rand::SeedableRng;
use rand_distr::Distribution;
use sd_checkpoint::{Checkpoint, CheckpointError, component};
use sd_model::clip::ClipTextModel;
use sd_model::mmdit::Mmdit;
use sd_model::scheduler::{FlowMatchEulerScheduler, Schedule};
use sd_model::t5::T5Encoder;
use sd_model::vae::VaeDecoder;
use sd_model::{Backend, HostTensor, ModelError, PrecisionPlan};
use sd_text::{ClipTokenizer, T5Tokenizer, TextError};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PipelineError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("tokenizer: {0}")]
    Text(#[from] TextError),
    #[error("invalid request: {field}: {reason}")]
    InvalidRequest { field: &'static str, reason: String },
    #[error("cancelled")]
    Cancelled,
}

impl PipelineError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidRequest {
            field,
            reason: reason.into(),
        }
    }
}

pub type Result<T, E = PipelineError> = std::result::Result<T, E>;

/// CLIP's fixed context length.
pub const CLIP_TOKENS: usize = 77;

pub struct Tokenizers {
    pub clip_l: ClipTokenizer,
    pub clip_g: ClipTokenizer,
    pub t5: Option<T5Tokenizer>,
}

impl Tokenizers {
    pub fn load(root: &Path, with_t5: bool) -> Result<Self> {
        Ok(Self {
            clip_l: ClipTokenizer::from_dir(root.join(component::TOKENIZER_L))?,
            clip_g: ClipTokenizer::from_dir(root.join(component::TOKENIZER_G))?,
            t5: if with_t5 {
                Some(T5Tokenizer::from_dir(root.join(component::TOKENIZER_T5))?)
            } else {
                None
            },
        })
    }
}

/// Every model of the pipeline, loaded into one backend.
pub struct Sd3Pipeline<B: Backend> {
    pub backend: B,
    pub tokenizers: Tokenizers,
    pub clip_l: ClipTextModel<B>,
    pub clip_g: ClipTextModel<B>,
    pub t5: Option<T5Encoder<B>>,
    pub transformer: Mmdit<B>,
    pub vae: VaeDecoder<B>,
    pub scheduler: FlowMatchEulerScheduler,
    pub limits: Limits,
}

/// Text conditioning of one prompt set: `context [1, 77 + L, joint_dim]`, `pooled [1, P]`.
pub struct TextConditioning<T> {
    pub context: T,
    pub pooled: T,
}

/// One request in the middle of denoising.
pub struct Denoising<T> {
    pub request: GenerateRequest,
    pub schedule: Schedule,
    /// Steps done so far.
    pub step: usize,
    /// `[1, C, h, w]`, f32.
    pub latents: T,
    /// `[1 or 2, S, J]`: with guidance, the negative prompt's row comes first.
    pub context: T,
    pub pooled: T,
    pub guided: bool,
    /// Warnings met while preparing (truncated prompts).
    pub warnings: Vec<String>,
}

impl<T> Denoising<T> {
    pub fn is_done(&self) -> bool {
        self.step >= self.schedule.steps()
    }
    /// Requests that may share a transformer batch: same latent and context shapes.
    pub fn batch_key(&self) -> (usize, usize, usize) {
        (
            self.request.height,
            self.request.width,
            self.request.max_sequence_length,
        )
    }
}

/// What a finished generation returns.
pub struct Generated {
    pub image: Image,
    /// The final (pre-VAE) latents `[1, C, h, w]`.
    pub latents: HostTensor,
    pub warnings: Vec<String>,
}

impl<B: Backend> Sd3Pipeline<B> {
    /// Loads every component of `ckpt` into `backend`; `plan` applies to the transformer
    /// and to T5 (whose layers it names only when T5 was calibrated for FP8).
    pub fn load(ckpt: &Checkpoint, backend: B, plan: &PrecisionPlan) -> Result<Self> {
        ckpt.validate()?;
        let none = PrecisionPlan::full_precision();
        let tokenizers = Tokenizers::load(&ckpt.root, ckpt.t5.is_some())?;
        let clip_l = ClipTextModel::load(
            &backend,
            ckpt.clip_l.clone(),
            &ckpt.weights(component::CLIP_L)?,
            &none,
        )?;
        let clip_g = ClipTextModel::load(
            &backend,
            ckpt.clip_g.clone(),
            &ckpt.weights(component::CLIP_G)?,
            &none,
        )?;
        let t5 = match &ckpt.t5 {
            // The plan names T5 layers only when T5 was calibrated for FP8.
            Some(cfg) => Some(T5Encoder::load(
                &backend,
                cfg.clone(),
                &ckpt.weights(component::T5)?,
                plan,
            )?),
            None => None,
        };
        let transformer = Mmdit::load(
            &backend,
            ckpt.transformer.clone(),
            &ckpt.weights(component::TRANSFORMER)?,
            plan,
        )?;
        let vae = VaeDecoder::load(
            &backend,
            ckpt.vae.clone(),
            &ckpt.weights(component::VAE)?,
            &none,
        )?;
        let limits = Limits::for_models(&transformer.config, &vae.config);
        Ok(Self {
            backend,
            tokenizers,
            clip_l,
            clip_g,
            t5,
            transformer,
            vae,
            scheduler: FlowMatchEulerScheduler::new(ckpt.scheduler.clone()),
            limits,
        })
    }

    /// Opens a checkpoint directory and loads it.
    pub fn from_dir(dir: &Path, backend: B, plan: &PrecisionPlan) -> Result<Self> {
        let ckpt = Checkpoint::open(dir)?;
        Self::load(&ckpt, backend, plan)
    }

    /// diffusers' `encode_prompt` for one prompt set: CLIP-L and CLIP-G penultimate
    /// states side by side, zero-padded to the T5 width, followed by T5's states (zeros
    /// without T5); pooled = both CLIP projections.
    pub fn encode_prompt(
        &self,
        prompt_l: &str,
        prompt_g: &str,
        prompt_t5: &str,
        max_sequence_length: usize,
        warnings: &mut Vec<String>,
    ) -> Result<TextConditioning<B::Tensor>> {
        let b = &self.backend;
        let joint = self.transformer.config.joint_attention_dim;
        let mut clip = |tok: &ClipTokenizer, model: &ClipTextModel<B>, which: &str, text: &str| {
            let enc = tok.encode(text)?;
            if enc.truncated {
                let w = format!(
                    "{which} prompt truncated to {CLIP_TOKENS} tokens (it had {})",
                    enc.untruncated_len
                );
                tracing::warn!("{w}");
                warnings.push(w);
            }
            Ok::<_, PipelineError>(model.forward(b, &enc.ids, 1)?)
        };
        let l = clip(&self.tokenizers.clip_l, &self.clip_l, "CLIP-L", prompt_l)?;
        let g = clip(&self.tokenizers.clip_g, &self.clip_g, "CLIP-G", prompt_g)?;
        let clip_states = b.concat(&[&l.penultimate, &g.penultimate], 2)?;
        let clip_states = b.pad_last(&clip_states, joint)?;
        let t5_states = match (&self.t5, &self.tokenizers.t5) {
            (Some(model), Some(tok)) => {
                let enc = tok.encode(prompt_t5, max_sequence_length)?;
                if enc.truncated {
                    let w = format!(
                        "T5 prompt truncated to {max_sequence_length} tokens (it had {})",
                        enc.untruncated_len
                    );
                    tracing::warn!("{w}");
                    warnings.push(w);
                }
                model.forward(b, &enc.ids, 1)?
            }
            _ => b.upload(&HostTensor::zeros(vec![1, max_sequence_length, joint]))?,
        };
        Ok(TextConditioning {
            context: b.concat(&[&clip_states, &t5_states], 1)?,
            pooled: b.concat(&[&l.pooled, &g.pooled], 1)?,
        })
    }

    /// Validates a request, encodes its prompts and draws (or takes) its initial noise.
    pub fn start(&self, request: GenerateRequest) -> Result<Denoising<B::Tensor>> {
        request.validate(&self.limits)?;
        let b = &self.backend;
        let mut warnings = Vec::new();
        let p = &request.prompt;
        let pos = self.encode_prompt(
            p,
            request.prompt_2.as_deref().unwrap_or(p),
            request.prompt_3.as_deref().unwrap_or(p),
            request.max_sequence_length,
            &mut warnings,
        )?;
        let guided = request.guidance_scale > 1.0;
        let (context, pooled) = if guided {
            let n = &request.negative_prompt;
            let neg = self.encode_prompt(
                n,
                request.negative_prompt_2.as_deref().unwrap_or(n),
                request.negative_prompt_3.as_deref().unwrap_or(n),
                request.max_sequence_length,
                &mut warnings,
            )?;
            (
                b.concat(&[&neg.context, &pos.context], 0)?,
                b.concat(&[&neg.pooled, &pos.pooled], 0)?,
            )
        } else {
            (pos.context, pos.pooled)
        };
        let shape = self.latent_shape(&request);
        let latents = match &request.latents {
            Some(l) => {
                if l.shape != shape {
                    return Err(PipelineError::invalid(
                        "latents",
                        format!(
                            "expected shape {shape:?} for {}x{}, got {:?}",
                            request.width, request.height, l.shape
                        ),
                    ));
                }
                if l.data.iter().any(|v| !v.is_finite()) {
                    return Err(PipelineError::invalid(
                        "latents",
                        "contains NaN or infinite values",
                    ));
                }
                l.clone()
            }
            None => initial_noise(&shape, request.seed),
        };
        let schedule = self.scheduler.schedule(request.steps, request.shift)?;
        Ok(Denoising {
            latents: b.upload(&latents)?,
            request,
            schedule,
            step: 0,
            context,
            pooled,
            guided,
            warnings,
        })
    }

    pub fn latent_shape(&self, r: &GenerateRequest) -> Vec<usize> {
        let f = self.vae.config.scale_factor();
        vec![
            1,
            self.transformer.config.in_channels,
            r.height / f,
            r.width / f,
        ]
    }

    /// One denoising step for every request in `batch` (all with the same
    /// [`Denoising::batch_key`]) in a single transformer call.
    pub fn step(&self, batch: &mut [&mut Denoising<B::Tensor>]) -> Result<()> {
        let b = &self.backend;
        let Some(first) = batch.first() else {
            return Ok(());
        };
        let key = first.batch_key();
        if let Some(bad) = batch.iter().find(|d| d.batch_key() != key || d.is_done()) {
            return Err(ModelError::input(format!(
                "cannot batch request of key {:?} (done: {}) with key {key:?}",
                bad.batch_key(),
                bad.is_done()
            ))
            .into());
        }
        let mut latents = Vec::new();
        let mut contexts = Vec::new();
        let mut pooled = Vec::new();
        let mut timesteps = Vec::new();
        for d in batch.iter() {
            let t = d.schedule.timesteps[d.step];
            let rows = if d.guided { 2 } else { 1 };
            for _ in 0..rows {
                latents.push(&d.latents);
                timesteps.push(t);
            }
            contexts.push(&d.context);
            pooled.push(&d.pooled);
        }
        let x = b.concat(&latents, 0)?;
        let ctx = b.concat(&contexts, 0)?;
        let pool = b.concat(&pooled, 0)?;
        let v = self.transformer.forward(b, &x, &ctx, &pool, &timesteps)?;
        let mut row = 0;
        for d in batch.iter_mut() {
            let velocity = if d.guided {
                let u = b.narrow(&v, 0, row, 1)?;
                let c = b.narrow(&v, 0, row + 1, 1)?;
                row += 2;
                b.guidance(&u, &c, d.request.guidance_scale)?
            } else {
                row += 1;
                b.narrow(&v, 0, row - 1, 1)?
            };
            d.latents = b.euler_step(&d.latents, &velocity, d.schedule.dt(d.step))?;
            d.step += 1;
        }
        Ok(())
    }

    /// Decodes final latents `[1, C, h, w]` into an image.
    pub fn decode(&self, latents: &B::Tensor) -> Result<Image> {
        let b = &self.backend;
        let z = self.vae.unscale_latents(b, latents)?;
        let x = self.vae.decode(b, &z)?;
        Ok(Image::from_decoder_output(&b.download(&x)?)?)
    }

    /// Decodes a finished request.
    pub fn finish(&self, d: Denoising<B::Tensor>) -> Result<Generated> {
        let image = self.decode(&d.latents)?;
        Ok(Generated {
            image,
            latents: self.backend.download(&d.latents)?,
            warnings: d.warnings,
        })
    }

    /// Runs one request end to end; `on_step(done, total)` is called after each step.
    pub fn generate(
        &self,
        request: GenerateRequest,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Generated> {
        let mut d = self.start(request)?;
        let total = d.schedule.steps();
        while !d.is_done() {
            self.step(&mut [&mut d])?;
            on_step(d.step, total);
        }
        self.finish(d)
    }
}

/// Seeded standard-normal noise (ChaCha8; the same on every platform).
pub fn initial_noise(shape: &[usize], seed: u64) -> HostTensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let normal = rand_distr::StandardNormal;
    HostTensor::from_fn(shape.to_vec(), |_| normal.sample(&mut rng))
}
