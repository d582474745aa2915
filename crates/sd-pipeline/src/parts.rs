//! Building a pipeline from parts (parsed configs, one weight source per component,
//! tokenizers) rather than from a checkpoint directory: what engine bundles use.

use std::path::PathBuf;

use sd_checkpoint::Checkpoint;
use sd_model::clip::ClipTextModel;
use sd_model::config::{ClipConfig, SchedulerConfig, T5Config, TransformerConfig, VaeConfig};
use sd_model::mmdit::Mmdit;
use sd_model::scheduler::FlowMatchEulerScheduler;
use sd_model::t5::T5Encoder;
use sd_model::vae::VaeDecoder;
use sd_model::{Backend, PrecisionPlan, WeightSource};

use crate::{Limits, PipelineError, Result, Sd3Pipeline, Tokenizers};

/// The parsed configs of every component of a pipeline.
#[derive(Clone, Debug)]
pub struct ModelConfigs {
    pub transformer: TransformerConfig,
    pub clip_l: ClipConfig,
    pub clip_g: ClipConfig,
    /// `None` when the model has no T5 (zeros are fed instead).
    pub t5: Option<T5Config>,
    pub vae: VaeConfig,
    pub scheduler: SchedulerConfig,
}

impl ModelConfigs {
    pub fn of_checkpoint(ckpt: &Checkpoint) -> Self {
        Self {
            transformer: ckpt.transformer.clone(),
            clip_l: ckpt.clip_l.clone(),
            clip_g: ckpt.clip_g.clone(),
            t5: ckpt.t5.clone(),
            vae: ckpt.vae.clone(),
            scheduler: ckpt.scheduler.clone(),
        }
    }

    /// The cross-component checks of [`Checkpoint::validate`]; `origin` names where
    /// the configs came from in messages.
    pub fn validate(&self, origin: PathBuf) -> Result<()> {
        let as_ckpt = Checkpoint {
            root: origin,
            transformer: self.transformer.clone(),
            clip_l: self.clip_l.clone(),
            clip_g: self.clip_g.clone(),
            t5: self.t5.clone(),
            vae: self.vae.clone(),
            scheduler: self.scheduler.clone(),
        };
        as_ckpt.validate().map_err(PipelineError::from)
    }
}

/// One weight source per component.
#[derive(Clone, Copy)]
pub struct ComponentWeights<'a> {
    pub transformer: &'a dyn WeightSource,
    pub clip_l: &'a dyn WeightSource,
    pub clip_g: &'a dyn WeightSource,
    /// Required exactly when the configs have a T5.
    pub t5: Option<&'a dyn WeightSource>,
    pub vae: &'a dyn WeightSource,
}

impl<B: Backend> Sd3Pipeline<B> {
    /// Loads a pipeline from parsed configs and weight sources; `plan` applies to the
    /// transformer and T5 (CLIP and the VAE run at the backend's precision), as in
    /// [`Sd3Pipeline::load`].
    pub fn from_parts(
        configs: &ModelConfigs,
        weights: ComponentWeights<'_>,
        tokenizers: Tokenizers,
        backend: B,
        plan: &PrecisionPlan,
    ) -> Result<Self> {
        let none = PrecisionPlan::full_precision();
        let clip_l = ClipTextModel::load(&backend, configs.clip_l.clone(), weights.clip_l, &none)?;
        let clip_g = ClipTextModel::load(&backend, configs.clip_g.clone(), weights.clip_g, &none)?;
        let t5 = match (&configs.t5, weights.t5) {
            (Some(cfg), Some(src)) => Some(T5Encoder::load(&backend, cfg.clone(), src, plan)?),
            (None, None) => None,
            (Some(_), None) => {
                return Err(sd_model::ModelError::input(
                    "the configs have a T5 encoder but no T5 weights were given",
                )
                .into());
            }
            (None, Some(_)) => {
                return Err(sd_model::ModelError::input(
                    "T5 weights were given but the configs have no T5 encoder",
                )
                .into());
            }
        };
        if configs.t5.is_some() != tokenizers.t5.is_some() {
            return Err(sd_model::ModelError::input(
                "the T5 tokenizer must be present exactly when the T5 encoder is",
            )
            .into());
        }
        let transformer = Mmdit::load(
            &backend,
            configs.transformer.clone(),
            weights.transformer,
            plan,
        )?;
        let vae = VaeDecoder::load(&backend, configs.vae.clone(), weights.vae, &none)?;
        let limits = Limits::for_models(&transformer.config, &vae.config);
        Ok(Self {
            backend,
            tokenizers,
            clip_l,
            clip_g,
            t5,
            transformer,
            vae,
            scheduler: FlowMatchEulerScheduler::new(configs.scheduler.clone()),
            limits,
        })
    }
}
