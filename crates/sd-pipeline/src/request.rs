use sd_model::HostTensor;
use sd_model::config::{TransformerConfig, VaeConfig};

use crate::{PipelineError, Result};

/// A text-to-image request, with diffusers' defaults.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: String,
    /// CLIP-G's prompt; defaults to `prompt`.
    pub prompt_2: Option<String>,
    /// T5's prompt; defaults to `prompt`.
    pub prompt_3: Option<String>,
    pub negative_prompt: String,
    pub negative_prompt_2: Option<String>,
    pub negative_prompt_3: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    /// Classifier-free guidance scale; <= 1 runs the conditional branch only.
    pub guidance_scale: f32,
    pub seed: u64,
    pub max_sequence_length: usize,
    /// Overrides the scheduler's configured shift.
    pub shift: Option<f64>,
    /// Initial noise `[1, C, H/8, W/8]` instead of seeded noise.
    pub latents: Option<HostTensor>,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            prompt_2: None,
            prompt_3: None,
            negative_prompt: String::new(),
            negative_prompt_2: None,
            negative_prompt_3: None,
            width: 1024,
            height: 1024,
            steps: 28,
            guidance_scale: 7.0,
            seed: 0,
            max_sequence_length: 256,
            shift: None,
            latents: None,
        }
    }
}

/// What a loaded model accepts.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Width and height must be multiples of this (VAE factor x patch size).
    pub size_multiple: usize,
    pub max_size: usize,
    /// The model's native resolution (diffusers' default width and height).
    pub default_size: usize,
    pub max_steps: usize,
    pub max_sequence_length: usize,
}

impl Limits {
    pub fn for_models(t: &TransformerConfig, v: &VaeConfig) -> Self {
        let f = v.scale_factor();
        Self {
            size_multiple: f * t.patch_size,
            max_size: t.pos_embed_max_size.unwrap_or(0) * t.patch_size * f,
            default_size: t.sample_size * f,
            max_steps: 1000,
            max_sequence_length: 512,
        }
    }
}

impl GenerateRequest {
    pub fn validate(&self, limits: &Limits) -> Result<()> {
        let bad = PipelineError::invalid;
        for (field, v) in [("width", self.width), ("height", self.height)] {
            if v == 0 || v % limits.size_multiple != 0 {
                return Err(bad(
                    field,
                    format!("{v} is not a positive multiple of {}", limits.size_multiple),
                ));
            }
            if v > limits.max_size {
                return Err(bad(
                    field,
                    format!("{v} exceeds this model's maximum of {}", limits.max_size),
                ));
            }
        }
        if self.steps == 0 || self.steps > limits.max_steps {
            return Err(bad(
                "steps",
                format!("{} is outside 1..={}", self.steps, limits.max_steps),
            ));
        }
        if !self.guidance_scale.is_finite() || self.guidance_scale < 0.0 {
            return Err(bad(
                "guidance_scale",
                format!("{} must be finite and >= 0", self.guidance_scale),
            ));
        }
        if self.max_sequence_length == 0 || self.max_sequence_length > limits.max_sequence_length {
            return Err(bad(
                "max_sequence_length",
                format!(
                    "{} is outside 1..={}",
                    self.max_sequence_length, limits.max_sequence_length
                ),
            ));
        }
        if let Some(s) = self.shift
            && !(s.is_finite() && s > 0.0)
        {
            return Err(bad("shift", format!("{s} must be positive and finite")));
        }
        Ok(())
    }
}
