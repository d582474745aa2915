//! Diffusers-format checkpoint directories.
//!
//! A checkpoint is a directory with `model_index.json` and one sub-directory per
//! component (`transformer/`, `text_encoder/`, `text_encoder_2/`, optional
//! `text_encoder_3/`, `tokenizer*/`, `vae/`, `scheduler/`). Weights are memory-mapped
//! safetensors, single-file or sharded with a `*.safetensors.index.json`; tensors are
//! handed out as borrowed bytes through [`sd_model::WeightSource`].

pub mod fingerprint;
mod safetensors_io;

pub use safetensors_io::{SafetensorsWeights, atomic_write, read_tensor_file, write_tensor_file};

use std::path::{Path, PathBuf};

use sd_model::config::{ClipConfig, SchedulerConfig, T5Config, TransformerConfig, VaeConfig};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error(
        "model directory {0} does not exist; pass a diffusers-format SD3/SD3.5 checkpoint directory (one with model_index.json)"
    )]
    NoDirectory(PathBuf),
    #[error("{path} is missing: {what}")]
    Missing { path: PathBuf, what: String },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(transparent)]
    Model(#[from] sd_model::ModelError),
}

pub type Result<T, E = CheckpointError> = std::result::Result<T, E>;

pub(crate) fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            CheckpointError::Missing {
                path: path.to_path_buf(),
                what: "required file not found".into(),
            }
        } else {
            CheckpointError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

/// Parsed configs and open weight files of one checkpoint.
pub struct Checkpoint {
    pub root: PathBuf,
    pub transformer: TransformerConfig,
    pub clip_l: ClipConfig,
    pub clip_g: ClipConfig,
    /// `None` when the checkpoint ships no T5 (diffusers then feeds zeros).
    pub t5: Option<T5Config>,
    pub vae: VaeConfig,
    pub scheduler: SchedulerConfig,
}

/// The component sub-directories, as named in `model_index.json`.
pub mod component {
    pub const TRANSFORMER: &str = "transformer";
    pub const CLIP_L: &str = "text_encoder";
    pub const CLIP_G: &str = "text_encoder_2";
    pub const T5: &str = "text_encoder_3";
    pub const TOKENIZER_L: &str = "tokenizer";
    pub const TOKENIZER_G: &str = "tokenizer_2";
    pub const TOKENIZER_T5: &str = "tokenizer_3";
    pub const VAE: &str = "vae";
    pub const SCHEDULER: &str = "scheduler";
}

impl Checkpoint {
    /// Reads `model_index.json` and every component's config (not the weights).
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        if !root.is_dir() {
            return Err(CheckpointError::NoDirectory(root));
        }
        let index_path = root.join("model_index.json");
        let index: serde_json::Value =
            serde_json::from_str(&read_text(&index_path)?).map_err(|e| {
                CheckpointError::Invalid {
                    path: index_path.clone(),
                    reason: e.to_string(),
                }
            })?;
        let present = |name: &str| -> bool {
            index
                .get(name)
                .and_then(|v| v.as_array())
                .is_some_and(|a| a.first().is_some_and(|x| !x.is_null()))
        };
        for required in [
            component::TRANSFORMER,
            component::CLIP_L,
            component::CLIP_G,
            component::TOKENIZER_L,
            component::TOKENIZER_G,
            component::VAE,
            component::SCHEDULER,
        ] {
            if !present(required) {
                return Err(CheckpointError::Invalid {
                    path: index_path.clone(),
                    reason: format!(
                        "component `{required}` is not listed; an SD3 pipeline needs it"
                    ),
                });
            }
        }
        let config = |comp: &str, file: &str| read_text(&root.join(comp).join(file));
        let t5 = if present(component::T5) {
            if !present(component::TOKENIZER_T5) {
                return Err(CheckpointError::Invalid {
                    path: index_path.clone(),
                    reason: "text_encoder_3 is listed without tokenizer_3".into(),
                });
            }
            Some(T5Config::from_json(&config(component::T5, "config.json")?)?)
        } else {
            None
        };
        Ok(Self {
            transformer: TransformerConfig::from_json(&config(
                component::TRANSFORMER,
                "config.json",
            )?)?,
            clip_l: ClipConfig::from_json(
                "text_encoder/config.json",
                &config(component::CLIP_L, "config.json")?,
            )?,
            clip_g: ClipConfig::from_json(
                "text_encoder_2/config.json",
                &config(component::CLIP_G, "config.json")?,
            )?,
            t5,
            vae: VaeConfig::from_json(&config(component::VAE, "config.json")?)?,
            scheduler: SchedulerConfig::from_json(&config(
                component::SCHEDULER,
                "scheduler_config.json",
            )?)?,
            root,
        })
    }

    pub fn component_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Memory-maps a component's safetensors.
    pub fn weights(&self, name: &str) -> Result<SafetensorsWeights> {
        SafetensorsWeights::open_dir(&self.component_dir(name), name)
    }

    /// Checks the cross-component dimensions diffusers relies on.
    pub fn validate(&self) -> Result<()> {
        let t = &self.transformer;
        let pooled = self.clip_l.projection_dim + self.clip_g.projection_dim;
        let bad = |reason: String| CheckpointError::Invalid {
            path: self.root.clone(),
            reason,
        };
        if pooled != t.pooled_projection_dim {
            return Err(bad(format!(
                "CLIP projections give a pooled vector of {pooled}, the transformer expects {}",
                t.pooled_projection_dim
            )));
        }
        let clip_width = self.clip_l.hidden_size + self.clip_g.hidden_size;
        if clip_width > t.joint_attention_dim {
            return Err(bad(format!(
                "CLIP hidden states ({clip_width} wide) do not fit the joint attention dim {}",
                t.joint_attention_dim
            )));
        }
        if let Some(t5) = &self.t5
            && t5.d_model != t.joint_attention_dim
        {
            return Err(bad(format!(
                "T5 d_model {} differs from the transformer's joint_attention_dim {}",
                t5.d_model, t.joint_attention_dim
            )));
        }
        if self.vae.latent_channels != t.in_channels {
            return Err(bad(format!(
                "VAE latent channels {} differ from the transformer's in_channels {}",
                self.vae.latent_channels, t.in_channels
            )));
        }
        Ok(())
    }
}
