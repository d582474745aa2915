//! The Stable Diffusion 3 / 3.5 model, written once against the [`Backend`] trait.
//!
//! Every executor (the CPU reference, the CUDA FP8 engine, the calibration observer,
//! the ONNX tracer) implements [`Backend`]; the transformer, the text encoders and the
//! VAE decoder in this crate drive it with coarse operations (a linear layer together
//! with its precision-plan entry, a modulated layer norm, a joint attention, ...), so
//! each executor is free to fuse them. This crate has no GPU dependency.

pub mod backend;
pub mod clip;
pub mod config;
pub mod error;
mod load;
pub mod mmdit;
pub mod plan;
pub mod scheduler;
pub mod t5;
pub mod tensor;
pub mod vae;
pub mod weights;

pub use backend::{
    Activation, AttentionParams, Backend, Conv2dParams, LinearSpec, ReplayableForward, TokenPick,
};
pub use error::{ModelError, Result};
pub use plan::{ActivationQuant, LinearQuant, PrecisionPlan, WeightQuant};
pub use tensor::HostTensor;
pub use weights::{StorageDType, WeightSource, WeightTensor};
