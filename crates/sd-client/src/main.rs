//! `sd-client`: command-line client of sd-serve (package sd.v1).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use sd_proto::v1 as pb;
use sd_proto::v1::diffusion_client::DiffusionClient;
use tokio_stream::StreamExt;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

/// Largest response accepted (images).
const MAX_RESPONSE_BYTES: usize = 64 << 20;

#[derive(Parser)]
#[command(
    name = "sd-client",
    version,
    about = "Client of sd-serve (gRPC, package sd.v1)"
)]
struct Cli {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Conn {
    /// Server address: HOST:PORT or a URL (http://, https://).
    #[arg(
        long,
        global = true,
        env = "SD_SERVER",
        default_value = "127.0.0.1:50051"
    )]
    server: String,
    /// Bearer token sent as `authorization: Bearer <TOKEN>`.
    #[arg(long, global = true, env = "SD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) to verify a TLS server; implies TLS.
    #[arg(long, global = true, env = "SD_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// TLS server name to verify (default: the host of --server).
    #[arg(long, global = true, env = "SD_TLS_DOMAIN")]
    tls_domain: Option<String>,
    /// Per-request deadline in seconds.
    #[arg(long, global = true, env = "SD_TIMEOUT_SECS")]
    timeout: Option<f64>,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images, showing progress from the stream.
    Generate {
        #[command(flatten)]
        params: GenArgs,
        /// Output file; with several images, `-N` is added before the extension.
        #[arg(short, long, default_value = "out.png")]
        output: PathBuf,
        /// Use the unary Generate call (no progress bar).
        #[arg(long)]
        unary: bool,
    },
    /// List the served models.
    Models,
    /// Query grpc.health.v1 (the whole server, or one model with --service).
    Health {
        #[arg(long, default_value = "")]
        service: String,
    },
    /// Load test: M requests, N at a time; prints throughput and latency percentiles.
    Bench {
        #[command(flatten)]
        params: GenArgs,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        #[arg(long, default_value_t = 32)]
        requests: usize,
    },
}

#[derive(Args, Clone)]
struct GenArgs {
    #[arg(long, default_value = "")]
    model: String,
    #[arg(long)]
    prompt: String,
    #[arg(long)]
    prompt_2: Option<String>,
    #[arg(long)]
    prompt_3: Option<String>,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    #[arg(long)]
    width: Option<u32>,
    #[arg(long)]
    height: Option<u32>,
    #[arg(long)]
    steps: Option<u32>,
    #[arg(long)]
    guidance_scale: Option<f32>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    num_images: Option<u32>,
    #[arg(long, value_enum, default_value = "png")]
    format: Format,
    #[arg(long)]
    max_sequence_length: Option<u32>,
    #[arg(long)]
    shift: Option<f64>,
    #[arg(long)]
    jpeg_quality: Option<u32>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Png,
    Jpeg,
    Webp,
    Latents,
}

impl GenArgs {
    fn request(&self) -> pb::GenerateRequest {
        pb::GenerateRequest {
            model: self.model.clone(),
            prompt: self.prompt.clone(),
            prompt_2: self.prompt_2.clone(),
            prompt_3: self.prompt_3.clone(),
            negative_prompt: self.negative_prompt.clone(),
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            seed: self.seed,
            num_images: self.num_images,
            output_format: match self.format {
                Format::Png => pb::OutputFormat::Png,
                Format::Jpeg => pb::OutputFormat::Jpeg,
                Format::Webp => pb::OutputFormat::Webp,
                Format::Latents => pb::OutputFormat::Latents,
            } as i32,
            max_sequence_length: self.max_sequence_length,
            shift: self.shift,
            jpeg_quality: self.jpeg_quality,
            ..Default::default()
        }
    }
}

#[derive(Clone)]
struct Auth(Option<Arc<str>>);

impl Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(t) = &self.0 {
            let v: MetadataValue<_> = format!("Bearer {t}")
                .parse()
                .map_err(|_| Status::invalid_argument("the token is not a valid header value"))?;
            req.metadata_mut().insert("authorization", v);
        }
        Ok(req)
    }
}

type Client = DiffusionClient<InterceptedService<Channel, Auth>>;

async fn channel(conn: &Conn) -> anyhow::Result<Channel> {
    let tls = conn.ca_cert.is_some() || conn.server.starts_with("https://");
    let url = if conn.server.contains("://") {
        conn.server.clone()
    } else if tls {
        format!("https://{}", conn.server)
    } else {
        format!("http://{}", conn.server)
    };
    let mut ep = Endpoint::from_shared(url.clone())
        .with_context(|| format!("bad server address `{url}`"))?
        .connect_timeout(Duration::from_secs(10));
    if tls {
        let mut cfg = ClientTlsConfig::new().with_enabled_roots();
        if let Some(ca) = &conn.ca_cert {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            cfg = cfg.ca_certificate(Certificate::from_pem(pem));
        }
        if let Some(d) = &conn.tls_domain {
            cfg = cfg.domain_name(d.clone());
        }
        ep = ep.tls_config(cfg)?;
    }
    ep.connect()
        .await
        .with_context(|| format!("connecting to {url}"))
}

async fn client(conn: &Conn) -> anyhow::Result<Client> {
    let ch = channel(conn).await?;
    Ok(
        DiffusionClient::with_interceptor(ch, Auth(conn.token.clone().map(Arc::from)))
            .max_decoding_message_size(MAX_RESPONSE_BYTES),
    )
}

fn with_timeout<T>(conn: &Conn, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(t) = conn.timeout {
        r.set_timeout(Duration::from_secs_f64(t.max(0.001)));
    }
    r
}

fn status_error(s: Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

fn output_path(base: &Path, i: usize, n: usize, media_type: &str) -> PathBuf {
    let ext = match media_type {
        "image/png" => "png",
        "image/jpeg" => "jpg",
        "image/webp" => "webp",
        _ => "latents",
    };
    let stem = base
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let given = base.extension().map(|e| e.to_string_lossy().into_owned());
    let ext = given.unwrap_or_else(|| ext.to_string());
    let name = if n > 1 {
        format!("{stem}-{i}.{ext}")
    } else {
        format!("{stem}.{ext}")
    };
    base.with_file_name(name)
}

fn save(resp: &pb::GenerateResponse, output: &Path) -> anyhow::Result<()> {
    let n = resp.images.len();
    for (i, img) in resp.images.iter().enumerate() {
        let path = output_path(output, i, n, &img.media_type);
        std::fs::write(&path, &img.data).with_context(|| format!("writing {}", path.display()))?;
        let shape = if img.shape.is_empty() {
            String::new()
        } else {
            format!(" shape {:?}", img.shape)
        };
        println!(
            "{} ({}x{} {}, seed {}{shape})",
            path.display(),
            img.width,
            img.height,
            img.media_type,
            img.seed
        );
    }
    if let Some(t) = &resp.timings {
        println!(
            "engine {} | queue {:.1} ms, text {:.1} ms, denoise {:.1} ms, decode {:.1} ms, total {:.1} ms",
            resp.engine_id,
            t.queue_ms,
            t.text_encoding_ms,
            t.denoising_ms,
            t.decoding_ms,
            t.total_ms
        );
    }
    for w in &resp.warnings {
        eprintln!("warning: {w}");
    }
    Ok(())
}

async fn generate(conn: &Conn, params: &GenArgs, output: &Path, unary: bool) -> anyhow::Result<()> {
    let mut c = client(conn).await?;
    let req = with_timeout(conn, params.request());
    if unary {
        let resp = c.generate(req).await.map_err(status_error)?.into_inner();
        return save(&resp, output);
    }
    let mut stream = c
        .generate_stream(req)
        .await
        .map_err(status_error)?
        .into_inner();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} steps {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("queued");
    while let Some(event) = stream.next().await {
        match event.map_err(status_error)?.event {
            Some(pb::generate_event::Event::Queued(q)) => {
                bar.set_message(format!("queued (position {})", q.position));
            }
            Some(pb::generate_event::Event::Progress(p)) => {
                bar.set_length(p.total as u64);
                bar.set_position(p.step as u64);
                bar.set_message("denoising");
            }
            Some(pb::generate_event::Event::Result(r)) => {
                bar.finish_and_clear();
                return save(&r, output);
            }
            None => {}
        }
    }
    bar.abandon();
    bail!("the stream ended without a result")
}

async fn models(conn: &Conn) -> anyhow::Result<()> {
    let mut c = client(conn).await?;
    let resp = c
        .list_models(with_timeout(conn, pb::ListModelsRequest {}))
        .await
        .map_err(status_error)?
        .into_inner();
    for m in resp.models {
        let state = pb::ModelState::try_from(m.state)
            .map(|s| s.as_str_name())
            .unwrap_or("?");
        println!(
            "{}\t{}\t{}\ttarget={} device={} precision={} sizes={}..={} (x{}, default {}) max_steps={} max_images={} batch={} queue={}{}",
            m.name,
            state,
            m.engine_id,
            m.target,
            m.device,
            m.precision,
            m.min_size,
            m.max_size,
            m.size_multiple,
            m.default_size,
            m.max_steps,
            m.max_images,
            m.max_batch_size,
            m.queue_capacity,
            if m.error.is_empty() {
                String::new()
            } else {
                format!(" error={}", m.error)
            }
        );
    }
    Ok(())
}

async fn health(conn: &Conn, service: &str) -> anyhow::Result<bool> {
    let ch = channel(conn).await?;
    let mut c = tonic_health::pb::health_client::HealthClient::new(ch);
    let resp = c
        .check(with_timeout(
            conn,
            tonic_health::pb::HealthCheckRequest {
                service: service.to_string(),
            },
        ))
        .await
        .map_err(status_error)?
        .into_inner();
    let status = tonic_health::pb::health_check_response::ServingStatus::try_from(resp.status)
        .map(|s| s.as_str_name())
        .unwrap_or("UNKNOWN");
    println!("{status}");
    Ok(status == "SERVING")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn bench(
    conn: &Conn,
    params: &GenArgs,
    concurrency: usize,
    requests: usize,
) -> anyhow::Result<()> {
    let c = client(conn).await?;
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(requests);
    for _ in 0..requests {
        let permit = sem.clone().acquire_owned().await?;
        let mut c = c.clone();
        let req = with_timeout(conn, params.request());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = c.generate(req).await;
            drop(permit);
            (
                t.elapsed().as_secs_f64(),
                r.map(|r| r.into_inner().images.len()),
            )
        }));
    }
    let mut lat = Vec::new();
    let mut images = 0;
    let mut errors: std::collections::BTreeMap<String, usize> = Default::default();
    for t in tasks {
        let (secs, r) = t.await?;
        match r {
            Ok(n) => {
                lat.push(secs);
                images += n;
            }
            Err(s) => *errors.entry(format!("{:?}", s.code())).or_default() += 1,
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{requests} requests, concurrency {concurrency}: {} ok, {} failed {:?}",
        lat.len(),
        requests - lat.len(),
        errors
    );
    println!(
        "wall {wall:.2} s | {:.2} req/s | {:.2} images/s",
        lat.len() as f64 / wall,
        images as f64 / wall
    );
    println!(
        "latency ms: p50 {:.1} p95 {:.1} p99 {:.1} max {:.1}",
        percentile(&lat, 50.0) * 1e3,
        percentile(&lat, 95.0) * 1e3,
        percentile(&lat, 99.0) * 1e3,
        lat.last().copied().unwrap_or(f64::NAN) * 1e3
    );
    Ok(())
}

/// Restores the default SIGPIPE action, so that `sd-client models | head` ends
/// quietly like any Unix tool instead of panicking on a closed stdout (Rust ignores
/// SIGPIPE by default, turning it into a write error that `println!` panics on).
fn restore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: setting a signal disposition to SIG_DFL at start-up, before any thread
    // exists, is async-signal-safe and has no other effect on the process.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    restore_sigpipe();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Generate {
            params,
            output,
            unary,
        } => generate(&cli.conn, params, output, *unary).await,
        Command::Models => models(&cli.conn).await,
        Command::Health { service } => match health(&cli.conn, service).await {
            Ok(true) => Ok(()),
            Ok(false) => return std::process::ExitCode::from(2),
            Err(e) => Err(e),
        },
        Command::Bench {
            params,
            concurrency,
            requests,
        } => bench(&cli.conn, params, *concurrency, *requests).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sd-client: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
