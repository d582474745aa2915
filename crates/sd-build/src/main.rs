//! `sd-build`: the offline builder. Each subcommand lives in its own module.

mod calibrate;
mod compile;
mod export;
mod generate;
mod inspect;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sd-build",
    version,
    about = "Build FP8 engines for Stable Diffusion 3 / 3.5, and run them offline"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"], env = "SD_LOG_FORMAT")]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// FP8 post-training calibration: per-layer formats and scales into a YAML cache.
    Calibrate(calibrate::CalibrateArgs),
    /// Generate an image in-process from a checkpoint.
    Generate(generate::GenerateArgs),
    /// Compile a checkpoint (+ calibration cache) into an engine bundle.
    Compile(compile::CompileArgs),
    /// Export ONNX models (transformer with FP8 Q/DQ from a calibration cache, text
    /// encoders, VAE decoder) for TensorRT and other runtimes.
    Export(export::ExportArgs),
    /// Describe an engine bundle, check it, and say whether this machine can run it.
    Inspect(inspect::InspectArgs),
}

/// Restores the default SIGPIPE action, so that `sd-build inspect ENGINE | head` ends
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

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> std::process::ExitCode {
    restore_sigpipe();
    let cli = Cli::parse();
    init_tracing(&cli.log_format);
    let result = match cli.command {
        Command::Calibrate(args) => calibrate::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Compile(args) => compile::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Export(args) => export::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
