//! Errors of model construction and execution.

use thiserror::Error;

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum ModelError {
    #[error(
        "tensor `{name}` is missing from {component} (looked in {files}); the checkpoint is incomplete or not a diffusers SD3 checkpoint"
    )]
    MissingTensor {
        name: String,
        component: String,
        files: String,
    },
    #[error(
        "tensor `{name}` in {file} has shape {found:?}, expected {expected:?}; the checkpoint does not match its config.json"
    )]
    ShapeMismatch {
        name: String,
        file: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error(
        "tensor `{name}` in {file} has dtype {dtype}; only F32, F16 and BF16 weights are supported"
    )]
    UnsupportedDType {
        name: String,
        file: String,
        dtype: String,
    },
    #[error("invalid model configuration: {0}")]
    Config(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error("backend error: {0}")]
    Backend(String),
    #[error("{0}")]
    Weights(String),
}

impl ModelError {
    pub fn config(msg: impl Into<String>) -> Self {
        Self::Config(msg.into())
    }
    pub fn input(msg: impl Into<String>) -> Self {
        Self::Input(msg.into())
    }
    pub fn backend(msg: impl Into<String>) -> Self {
        Self::Backend(msg.into())
    }
}
