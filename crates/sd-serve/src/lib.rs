//! `sd-serve`: the gRPC runtime of the `sd.v1` API (proto/sd/v1/diffusion.proto).
//!
//! - [`model`]: the [`model::ServedModel`] seam (today: diffusers checkpoints on the cpu
//!   backend; engine bundles later).
//! - [`worker`]: one owner thread per model, bounded queue, step-level continuous
//!   batching, cancellation and deadlines at step boundaries.
//! - [`service`]: validation before queueing and the `Diffusion` service.
//! - [`server`]: flags/env, health, reflection, TLS, bearer auth, metrics, drain.

pub mod model;
pub mod output;
pub mod server;
pub mod service;
pub mod worker;

/// Re-exported so that callers can parse [`ServeArgs`] without depending on clap.
pub use clap::Parser;
pub use server::{RunningServer, ServeArgs, install_metrics, run_until_signal, start};
