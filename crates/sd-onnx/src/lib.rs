//! ONNX export of the SD3 / SD3.5 networks, with FP8 Q/DQ from the precision plan.
//!
//! The graphs come from the model code itself: [`tracer::OnnxTracer`] is a
//! [`sd_model::Backend`] whose tensors are symbolic graph values and whose operations
//! append ONNX nodes, so `Mmdit`, `ClipTextModel`, `T5Encoder` and `VaeDecoder` run on
//! it unchanged. Quantized linear layers become FP8 weight initializers
//! (FLOAT8E4M3FN / FLOAT8E5M2) behind a DequantizeLinear (per-output-channel `axis`
//! when the plan has per-channel scales) and a QuantizeLinear + DequantizeLinear pair on
//! the input (FP8 zero point 0, `saturate = 1`, scales of the compute type), directly in
//! front of the MatMul. Opset 21, IR version 10.
//!
//! Host-side computations of the model code have graph-building counterparts (Backend
//! methods with host-side defaults): the timestep embedding (the timestep is a graph
//! input), token embeddings and the pooled-token choice (the ids are an int64 graph
//! input; ArgMax / Equal in the graph), the T5 relative-position bias (Range / Sub /
//! Clip on the length, then a Gather of bucket ids and of the learned table). Anything
//! else the model code uploads becomes a recorded constant
//! ([`ExportedModel::host_constants`]; only the positional table of a checkpoint
//! without one).
//!
//! Dynamic axes: the batch everywhere; the latent height and width of the transformer
//! and the VAE decoder (patchify / unpatchify and the centre crop of the positional
//! table compute their shapes and bounds from `Shape` in the graph); the transformer's
//! text length; the token count of CLIP (up to `max_position_embeddings`; positions
//! sliced and the causal mask built in the graph) and of T5. The sizes given at export
//! are only the traced ones.
//!
//! The ONNX messages are prost types declared in [`proto`] from the ONNX spec's field
//! numbers (no code generation, no protoc).

pub mod export;
pub mod graph;
pub mod proto;
pub mod tracer;

use std::path::PathBuf;

pub use export::{
    ExportOptions, ExportedModel, IoSpec, export_checkpoint, export_opened, trace_checkpoint,
    trace_clip, trace_t5, trace_transformer, trace_vae, write_model,
};
pub use graph::ElemType;
pub use tracer::{OnnxTracer, QuantizedLayer, Sym, TraceOptions};

#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error(transparent)]
    Model(#[from] sd_model::ModelError),
    #[error(transparent)]
    Checkpoint(#[from] sd_checkpoint::CheckpointError),
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the export next to {path} (is the directory writable?)")]
    Unwritable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} already exists; pass --force to replace it")]
    Exists(PathBuf),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = OnnxError> = std::result::Result<T, E>;
