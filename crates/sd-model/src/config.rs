//! Component configurations, parsed from the `config.json` files diffusers and
//! transformers write. Defaults are those of the Python classes, so partial configs
//! load the way they do in diffusers. Every architecture variant (SD3-medium MMDiT,
//! SD3.5-large MMDiT with qk norm, SD3.5-medium MMDiT-X) is a configuration, never a
//! code path chosen by checkpoint name.

use serde::Deserialize;

use crate::error::{ModelError, Result};

fn parse<T: for<'de> Deserialize<'de>>(what: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| ModelError::config(format!("{what}: {e}")))
}

/// `SD3Transformer2DModel` (MMDiT and MMDiT-X).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct TransformerConfig {
    pub sample_size: usize,
    pub patch_size: usize,
    pub in_channels: usize,
    pub num_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub joint_attention_dim: usize,
    pub caption_projection_dim: usize,
    pub pooled_projection_dim: usize,
    pub out_channels: usize,
    pub pos_embed_max_size: Option<usize>,
    /// Blocks with a second, image-only attention (MMDiT-X, SD3.5-medium).
    pub dual_attention_layers: Vec<usize>,
    /// `"rms_norm"` for SD3.5; absent for SD3-medium.
    pub qk_norm: Option<String>,
}

impl Default for TransformerConfig {
    fn default() -> Self {
        Self {
            sample_size: 128,
            patch_size: 2,
            in_channels: 16,
            num_layers: 18,
            attention_head_dim: 64,
            num_attention_heads: 18,
            joint_attention_dim: 4096,
            caption_projection_dim: 1152,
            pooled_projection_dim: 2048,
            out_channels: 16,
            pos_embed_max_size: Some(96),
            dual_attention_layers: vec![],
            qk_norm: None,
        }
    }
}

impl TransformerConfig {
    pub fn from_json(text: &str) -> Result<Self> {
        let c: Self = parse("transformer/config.json", text)?;
        c.validate()?;
        Ok(c)
    }
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }
    pub fn uses_qk_norm(&self) -> bool {
        self.qk_norm.is_some()
    }
    pub fn validate(&self) -> Result<()> {
        if let Some(q) = &self.qk_norm
            && q != "rms_norm"
        {
            return Err(ModelError::config(format!(
                "transformer qk_norm `{q}` is not supported (SD3.5 uses `rms_norm`)"
            )));
        }
        if self.num_layers == 0 || self.num_attention_heads == 0 || self.attention_head_dim == 0 {
            return Err(ModelError::config(
                "transformer num_layers, num_attention_heads and attention_head_dim must be > 0",
            ));
        }
        if self.caption_projection_dim != self.inner_dim() {
            return Err(ModelError::config(format!(
                "caption_projection_dim {} must equal num_attention_heads*attention_head_dim {}",
                self.caption_projection_dim,
                self.inner_dim()
            )));
        }
        if let Some(&l) = self
            .dual_attention_layers
            .iter()
            .find(|&&l| l >= self.num_layers)
        {
            return Err(ModelError::config(format!(
                "dual_attention_layers names block {l} but there are only {} blocks",
                self.num_layers
            )));
        }
        if self.pos_embed_max_size.is_none() {
            return Err(ModelError::config(
                "pos_embed_max_size is required (all SD3/SD3.5 checkpoints set it)",
            ));
        }
        Ok(())
    }
}

/// `CLIPTextModelWithProjection`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    /// 2 in legacy configs (then the pooled token is the argmax id), the real id otherwise.
    pub eos_token_id: i64,
}

impl Default for ClipConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            eos_token_id: 2,
        }
    }
}

impl ClipConfig {
    pub fn from_json(what: &str, text: &str) -> Result<Self> {
        let c: Self = parse(what, text)?;
        if c.num_hidden_layers < 2 {
            return Err(ModelError::config(format!(
                "{what}: SD3 uses the penultimate hidden state, so CLIP needs >= 2 layers"
            )));
        }
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(ModelError::config(format!(
                "{what}: hidden_size must be a multiple of num_attention_heads"
            )));
        }
        c.activation()?;
        Ok(c)
    }
    pub fn activation(&self) -> Result<crate::Activation> {
        match self.hidden_act.as_str() {
            "quick_gelu" => Ok(crate::Activation::QuickGelu),
            "gelu" => Ok(crate::Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(crate::Activation::GeluTanh),
            other => Err(ModelError::config(format!(
                "CLIP hidden_act `{other}` is not supported"
            ))),
        }
    }
}

/// `T5EncoderModel`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f64,
    pub feed_forward_proj: String,
}

impl Default for T5Config {
    fn default() -> Self {
        Self {
            vocab_size: 32128,
            d_model: 512,
            d_kv: 64,
            d_ff: 2048,
            num_layers: 6,
            num_heads: 8,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "relu".into(),
        }
    }
}

impl T5Config {
    pub fn from_json(text: &str) -> Result<Self> {
        let c: Self = parse("text_encoder_3/config.json", text)?;
        c.feed_forward()?;
        if c.num_layers == 0 || c.num_heads == 0 {
            return Err(ModelError::config("T5 needs >= 1 layer and >= 1 head"));
        }
        Ok(c)
    }
    /// (gated, activation) as transformers derives them from `feed_forward_proj`.
    pub fn feed_forward(&self) -> Result<(bool, crate::Activation)> {
        match self.feed_forward_proj.as_str() {
            "gated-gelu" => Ok((true, crate::Activation::GeluTanh)),
            "relu" => Ok((false, crate::Activation::Relu)),
            "gated-relu" => Ok((true, crate::Activation::Relu)),
            "gelu" => Ok((false, crate::Activation::Gelu)),
            other => Err(ModelError::config(format!(
                "T5 feed_forward_proj `{other}` is not supported"
            ))),
        }
    }
}

/// `AutoencoderKL` (only the decoder is used).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
    pub up_block_types: Vec<String>,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            block_out_channels: vec![64],
            layers_per_block: 1,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            up_block_types: vec!["UpDecoderBlock2D".into()],
        }
    }
}

impl VaeConfig {
    pub fn from_json(text: &str) -> Result<Self> {
        let c: Self = parse("vae/config.json", text)?;
        if c.block_out_channels.is_empty() {
            return Err(ModelError::config("vae block_out_channels is empty"));
        }
        if let Some(bad) = c
            .block_out_channels
            .iter()
            .find(|&&ch| ch % c.norm_num_groups != 0)
        {
            return Err(ModelError::config(format!(
                "vae channel count {bad} is not a multiple of norm_num_groups {}",
                c.norm_num_groups
            )));
        }
        if let Some(t) = c.up_block_types.iter().find(|t| *t != "UpDecoderBlock2D") {
            return Err(ModelError::config(format!(
                "vae up block type `{t}` is not supported (SD3 uses UpDecoderBlock2D)"
            )));
        }
        Ok(c)
    }
    /// Pixels per latent cell: 2^(number of blocks - 1), as diffusers computes it.
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// `FlowMatchEulerDiscreteScheduler`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub shift: f64,
    pub use_dynamic_shifting: bool,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub invert_sigmas: bool,
    pub shift_terminal: Option<f64>,
    pub stochastic_sampling: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            invert_sigmas: false,
            shift_terminal: None,
            stochastic_sampling: false,
        }
    }
}

impl SchedulerConfig {
    pub fn from_json(text: &str) -> Result<Self> {
        let c: Self = parse("scheduler/scheduler_config.json", text)?;
        let unsupported = [
            (c.use_dynamic_shifting, "use_dynamic_shifting"),
            (c.use_karras_sigmas, "use_karras_sigmas"),
            (c.use_exponential_sigmas, "use_exponential_sigmas"),
            (c.use_beta_sigmas, "use_beta_sigmas"),
            (c.invert_sigmas, "invert_sigmas"),
            (c.shift_terminal.is_some(), "shift_terminal"),
            (c.stochastic_sampling, "stochastic_sampling"),
        ];
        if let Some((_, name)) = unsupported.iter().find(|(on, _)| *on) {
            return Err(ModelError::config(format!(
                "scheduler option `{name}` is not used by SD3/SD3.5 and is not supported"
            )));
        }
        if c.num_train_timesteps == 0 || !(c.shift.is_finite() && c.shift > 0.0) {
            return Err(ModelError::config(
                "scheduler needs num_train_timesteps > 0 and a positive finite shift",
            ));
        }
        Ok(c)
    }
}
