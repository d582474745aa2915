//! Command-line / environment settings, and the server's life: load models, serve
//! Diffusion + health + reflection, drain on shutdown.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use sd_cpu::ComputePrecision;
use sd_proto::v1 as pb;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Identity, ServerTlsConfig};
use tonic::{Request, Status};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::model::{
    ModelSource, ModelSpec, engine_target, load_cuda_engine, load_diffusers_cpu, load_engine,
    parse_precision, scan_models_dir,
};
use crate::service::{DiffusionService, RequestLimits, Shared};
use crate::worker::{BatchSettings, ModelHandle, ModelState};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// sd-serve: Stable Diffusion 3 / 3.5 over gRPC (package sd.v1) with step-level
/// continuous batching. Every flag can also be set by the environment variable shown.
#[derive(Clone, Debug, Parser)]
#[command(name = "sd-serve", version)]
pub struct ServeArgs {
    /// Address to listen on for gRPC.
    #[arg(long, env = "SD_SERVE_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// A model to serve: NAME=DIR[,precision=fp32|bf16] (a diffusers checkpoint directory
    /// on the cpu backend). Repeatable; in the environment, separate entries with `;`.
    #[arg(long = "model", env = "SD_SERVE_MODELS", value_delimiter = ';')]
    pub models: Vec<ModelSpec>,
    /// Serve every checkpoint subdirectory (with a model_index.json) of this directory,
    /// named after the subdirectory.
    #[arg(long, env = "SD_SERVE_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,
    /// Compute precision of the models found by --models-dir.
    #[arg(long, env = "SD_SERVE_PRECISION", default_value = "fp32", value_parser = parse_precision)]
    pub precision: ComputePrecision,
    /// Most images denoised together per model.
    #[arg(long, env = "SD_SERVE_MAX_BATCH_SIZE", default_value_t = 4)]
    pub max_batch_size: usize,
    /// How long an idle model waits for more requests to fill a batch, in milliseconds.
    #[arg(long, env = "SD_SERVE_MAX_QUEUE_DELAY_MS", default_value_t = 5)]
    pub max_queue_delay_ms: u64,
    /// Most requests waiting per model; beyond it requests get RESOURCE_EXHAUSTED.
    #[arg(long, env = "SD_SERVE_QUEUE_CAPACITY", default_value_t = 32)]
    pub queue_capacity: usize,
    /// GPU ordinal that cuda engine bundles run on.
    #[arg(long, env = "SD_SERVE_GPU", default_value_t = 0)]
    pub gpu: usize,
    /// Most denoising steps per request.
    #[arg(long, env = "SD_SERVE_MAX_STEPS", default_value_t = 100)]
    pub max_steps: usize,
    /// Most images per request (also capped by --max-batch-size).
    #[arg(long, env = "SD_SERVE_MAX_IMAGES", default_value_t = 4)]
    pub max_images: usize,
    /// Most bytes in each prompt field.
    #[arg(long, env = "SD_SERVE_MAX_PROMPT_BYTES", default_value_t = 4096)]
    pub max_prompt_bytes: usize,
    /// Largest request message accepted, in bytes.
    #[arg(long, env = "SD_SERVE_MAX_REQUEST_BYTES", default_value_t = 1 << 20)]
    pub max_request_bytes: usize,
    /// Largest response message sent, in bytes (images are sized against it).
    #[arg(long, env = "SD_SERVE_MAX_RESPONSE_BYTES", default_value_t = 64 << 20)]
    pub max_response_bytes: usize,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish, in seconds.
    #[arg(long, env = "SD_SERVE_GRACE_PERIOD_SECS", default_value_t = 30.0)]
    pub grace_period_secs: f64,
    /// Address for Prometheus metrics over HTTP (e.g. 127.0.0.1:9090); off when unset.
    #[arg(long, env = "SD_SERVE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// TLS certificate chain (PEM); with --tls-key, serves TLS.
    #[arg(long, env = "SD_SERVE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "SD_SERVE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require `authorization: Bearer <TOKEN>` on every RPC except grpc.health.v1.
    #[arg(long, env = "SD_SERVE_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// Log format.
    #[arg(long, env = "SD_SERVE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

impl ServeArgs {
    /// Every model to serve: the --model entries, then the --models-dir scan.
    pub fn model_specs(&self) -> anyhow::Result<Vec<ModelSpec>> {
        let mut specs = self.models.clone();
        if let Some(dir) = &self.models_dir {
            specs.extend(scan_models_dir(dir, self.precision)?);
        }
        let mut seen = std::collections::BTreeSet::new();
        for s in &specs {
            if !seen.insert(s.name.clone()) {
                bail!("model `{}` is configured twice", s.name);
            }
        }
        if specs.is_empty() {
            bail!("no models: pass --model NAME=DIR or --models-dir DIR");
        }
        Ok(specs)
    }
}

/// Checks `authorization: Bearer <token>`.
#[derive(Clone)]
pub struct BearerAuth {
    token: Option<Arc<str>>,
}

impl Interceptor for BearerAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.token else {
            return Ok(req);
        };
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
            Ok(req)
        } else {
            Err(Status::unauthenticated(
                "missing or wrong bearer token (authorization: Bearer <token>)",
            ))
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A started server.
pub struct RunningServer {
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningServer {
    /// Waits until every model is SERVING (error if one fails or `timeout` passes).
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + timeout;
        loop {
            let states: Vec<_> = self.shared.models.values().map(|m| m.state()).collect();
            if let Some(m) = self
                .shared
                .models
                .values()
                .find(|m| m.state() == ModelState::Failed)
            {
                bail!("model `{}` failed: {}", m.name, m.error());
            }
            if states.iter().all(|s| *s == ModelState::Serving) {
                return Ok(());
            }
            if Instant::now() > until {
                bail!("models not ready after {timeout:?}: {states:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts draining (as on SIGTERM) and waits for the server to stop.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.await.context("server task")?
    }

    /// Waits for the server to stop on its own.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("server task")?
    }

    /// A sender that starts the drain (for signal handlers).
    pub fn take_shutdown(&mut self) -> Option<oneshot::Sender<()>> {
        self.shutdown.take()
    }
}

fn health_status(ok: bool) -> ServingStatus {
    if ok {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// Recomputes the overall ("") health: SERVING when every model serves and the server
/// is not draining.
async fn update_overall(reporter: &HealthReporter, shared: &Shared) {
    let ok = !shared.draining.load(Ordering::SeqCst)
        && shared
            .models
            .values()
            .all(|m| m.state() == ModelState::Serving);
    reporter.set_service_status("", health_status(ok)).await;
}

/// Binds, starts loading every model, and serves until [`RunningServer::shutdown`].
pub async fn start(args: ServeArgs) -> anyhow::Result<RunningServer> {
    let specs = args.model_specs()?;
    if args.queue_capacity == 0 {
        bail!("--queue-capacity must be at least 1");
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    let settings = BatchSettings {
        max_batch_size: args.max_batch_size.max(1),
        max_queue_delay: Duration::from_millis(args.max_queue_delay_ms),
        queue_capacity: args.queue_capacity,
    };
    let mut models = BTreeMap::new();
    for spec in specs {
        let name = spec.name.clone();
        let handle = match spec.source {
            ModelSource::DiffusersCpu { dir, precision } => {
                let n = name.clone();
                ModelHandle::spawn(name.clone(), settings.clone(), move || {
                    load_diffusers_cpu(&n, &dir, precision)
                })
            }
            ModelSource::Engine { dir } => {
                let n = name.clone();
                if engine_target(&dir) == Some(sd_engine::Target::Cuda) {
                    let gpu = args.gpu;
                    ModelHandle::spawn(name.clone(), settings.clone(), move || {
                        load_cuda_engine(&n, &dir, gpu)
                    })
                } else {
                    ModelHandle::spawn(name.clone(), settings.clone(), move || {
                        load_engine(&n, &dir)
                    })
                }
            }
        };
        models.insert(name, handle);
    }
    let shared = Arc::new(Shared {
        models,
        limits: RequestLimits {
            max_steps: args.max_steps,
            max_images: args.max_images,
            max_prompt_bytes: args.max_prompt_bytes,
            max_response_bytes: args.max_response_bytes,
        },
        draining: AtomicBool::new(false),
    });

    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    for handle in shared.models.values() {
        reporter
            .set_service_status(&handle.name, ServingStatus::NotServing)
            .await;
        let mut rx = handle.watch_state();
        let (reporter, name) = (reporter.clone(), handle.name.clone());
        // Weak: the task ends once the server (and so the model's state sender) is gone.
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            loop {
                let state = *rx.borrow_and_update();
                reporter
                    .set_service_status(&name, health_status(state == ModelState::Serving))
                    .await;
                match weak.upgrade() {
                    Some(shared) => update_overall(&reporter, &shared).await,
                    None => break,
                }
                if rx.changed().await.is_err() {
                    break;
                }
            }
        });
    }

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("reflection service")?;
    let auth = BearerAuth {
        token: args.auth_token.clone().map(Arc::from),
    };
    let diffusion = pb::diffusion_server::DiffusionServer::new(DiffusionService {
        shared: shared.clone(),
    })
    .max_decoding_message_size(args.max_request_bytes)
    .max_encoding_message_size(args.max_response_bytes);

    let mut builder = tonic::transport::Server::builder();
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let cert = std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
        let key = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
            .context("TLS configuration")?;
    }
    let router = builder
        .add_service(health_service)
        .add_service(InterceptedService::new(reflection, auth.clone()))
        .add_service(InterceptedService::new(diffusion, auth));

    let (tx, rx) = oneshot::channel::<()>();
    let grace = Duration::from_secs_f64(args.grace_period_secs.max(0.0));
    let drain_shared = shared.clone();
    let drain_reporter = reporter.clone();
    let (drained_tx, drained_rx) = oneshot::channel::<()>();
    let drain = async move {
        // A dropped sender also starts the drain.
        let _ = rx.await;
        drain_and_close(&drain_shared, &drain_reporter, grace).await;
        let _ = drained_tx.send(());
    };
    tracing::info!(%addr, tls = args.tls_cert.is_some(), auth = args.auth_token.is_some(), "listening");
    let serve_shared = shared.clone();
    let task = tokio::spawn(async move {
        let serve = router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), drain);
        tokio::pin!(serve);
        // Connections that stay open after the drain must not keep the process alive.
        let result = tokio::select! {
            r = &mut serve => r.map_err(anyhow::Error::from),
            _ = async {
                let _ = drained_rx.await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            } => Ok(()),
        };
        let models: Vec<_> = serve_shared.models.values().cloned().collect();
        let _ = tokio::task::spawn_blocking(move || models.iter().for_each(|m| m.join())).await;
        tracing::info!("stopped");
        result
    });
    Ok(RunningServer {
        addr,
        shared,
        shutdown: Some(tx),
        task,
    })
}

/// New requests get UNAVAILABLE, health goes NOT_SERVING, in-flight requests get up to
/// `grace` to finish; whatever is left is answered UNAVAILABLE.
async fn drain_and_close(shared: &Shared, reporter: &HealthReporter, grace: Duration) {
    shared.draining.store(true, Ordering::SeqCst);
    for m in shared.models.values() {
        m.drain();
    }
    update_overall(reporter, shared).await;
    let outstanding = || {
        shared
            .models
            .values()
            .map(|m| m.outstanding())
            .sum::<usize>()
    };
    tracing::info!(in_flight = outstanding(), ?grace, "draining");
    let until = Instant::now() + grace;
    while outstanding() > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let left = outstanding();
    if left > 0 {
        tracing::warn!(left, "grace period over; cancelling the rest");
    }
    for m in shared.models.values() {
        m.close();
    }
}

/// Serves until SIGTERM or SIGINT, then drains.
pub async fn run_until_signal(args: ServeArgs) -> anyhow::Result<()> {
    let mut server = start(args).await?;
    let trigger = server.take_shutdown();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown signal received");
        if let Some(t) = trigger {
            let _ = t.send(());
        }
    });
    server.wait().await
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Installs the Prometheus recorder and its HTTP listener.
pub fn install_metrics(addr: SocketAddr) -> anyhow::Result<()> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let seconds = [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        120.0,
    ];
    let batch = [1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0];
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)?
        .set_buckets_for_metric(Matcher::Full("sd_batch_size".into()), &batch)?
        .install()
        .context("installing the Prometheus exporter")?;
    describe_metrics();
    tracing::info!(%addr, "metrics on http://{addr}/metrics");
    Ok(())
}

fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "sd_requests_total",
        "Generate/GenerateStream requests answered, by model and gRPC status"
    );
    describe_gauge!(
        "sd_queue_depth",
        "Requests waiting to join the running batch"
    );
    describe_gauge!("sd_running_images", "Images in the running batch");
    describe_histogram!(
        "sd_batch_size",
        "Images per denoising call (one transformer forward)"
    );
    describe_histogram!(
        "sd_queue_seconds",
        Unit::Seconds,
        "Time from acceptance to joining the batch"
    );
    describe_histogram!(
        "sd_step_seconds",
        Unit::Seconds,
        "Time of one denoising call for the whole batch"
    );
    describe_histogram!(
        "sd_stage_seconds",
        Unit::Seconds,
        "Per-request stage time: stage=text_encoding|denoising|decoding"
    );
    describe_histogram!(
        "sd_request_seconds",
        Unit::Seconds,
        "Time from acceptance to the answer of successful requests"
    );
    describe_counter!("sd_images_total", "Images generated");
    describe_gauge!(
        "sd_images_per_second",
        "Images generated per second over the last 10 s (updated as images complete)"
    );
    describe_gauge!(
        "sd_device_memory_bytes",
        Unit::Bytes,
        "Device memory, kind=used|total (GPU targets only)"
    );
    describe_gauge!(
        "sd_model_state",
        "0 loading, 1 warming, 2 serving, 3 failed, 4 draining"
    );
}

/// Sets up tracing: `RUST_LOG` filter (default info), text or JSON lines on stderr.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
