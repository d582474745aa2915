use clap::Parser;
use sd_serve::{ServeArgs, install_metrics, run_until_signal};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = ServeArgs::parse();
    sd_serve::server::init_logging(args.log_format);
    if let Some(addr) = args.metrics_listen
        && let Err(e) = install_metrics(addr)
    {
        tracing::error!("{e:#}");
        return std::process::ExitCode::FAILURE;
    }
    match run_until_signal(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("sd-serve: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
