//! `sd-build inspect`: what an engine bundle is, and whether this machine can run it.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use sd_engine::manifest::Manifest;

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The engine bundle directory.
    #[arg(value_name = "ENGINE")]
    pub engine: PathBuf,
    /// Print the manifest as JSON instead of the summary.
    #[arg(long)]
    pub json: bool,
    /// Skip checksum verification (sizes are still checked).
    #[arg(long)]
    pub no_verify: bool,
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn short(s: &str) -> &str {
    &s[..s.len().min(12)]
}

pub fn run(args: InspectArgs) -> Result<()> {
    let m = sd_engine::read_manifest(&args.engine)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else {
        print_summary(&args, &m);
    }
    // Integrity last: a damaged bundle is still described, then refused.
    let problems: Vec<String> = if args.no_verify {
        sd_engine::Bundle::open_with(&args.engine, sd_engine::Verify::Sizes)
            .err()
            .map(|e| e.to_string())
            .into_iter()
            .collect()
    } else {
        sd_engine::verify_report(&args.engine, &m)
            .into_iter()
            .filter_map(|(_, e)| e.map(|e| e.to_string()))
            .collect()
    };
    if !args.json {
        let what = if args.no_verify { "sizes" } else { "checksums" };
        if problems.is_empty() {
            println!("integrity:     {what} of {} files ok", m.files.len());
        } else {
            println!("integrity:     FAILED");
        }
    }
    if let Some(first) = problems.first() {
        for p in &problems[1..] {
            eprintln!("error: {p}");
        }
        bail!("{first}");
    }
    Ok(())
}

fn print_summary(args: &InspectArgs, m: &Manifest) {
    println!("engine bundle: {}", args.engine.display());
    println!(
        "format:        {} v{} (written by {})",
        m.format, m.format_version, m.created_by
    );
    println!("target:        {} (compute {})", m.target, m.compute);
    let planned = m.layers.len();
    let (fp8, weight_only) = (m.fp8_layer_count(), m.fp8_weight_only_layer_count());
    let mut parts = vec![format!("{fp8} FP8 linear layers")];
    if weight_only > 0 {
        parts.push(format!("{weight_only} with FP8 weights only"));
    }
    if planned > fp8 + weight_only {
        parts.push(format!(
            "{} kept dense by the plan",
            planned - fp8 - weight_only
        ));
    }
    println!("precision:     {} ({})", m.precision, parts.join(", "));
    println!(
        "model:         {} (compiled from {})",
        short(&m.model.fingerprint),
        m.model.source
    );
    match &m.calibration {
        Some(c) => println!(
            "calibration:   {}{}",
            short(&c.hash),
            c.source
                .as_deref()
                .map(|s| format!(" ({s})"))
                .unwrap_or_default()
        ),
        None => println!("calibration:   none"),
    }
    if let Some(c) = &m.cuda {
        let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        println!(
            "cuda:          gpu {}, compute capability {}, CUDA {}, driver {}, {} GEMM algorithms, {} kernels, FP8 accumulation {}",
            opt(&c.gpu_name),
            c.compute_capability
                .map(|[a, b]| format!("{a}.{b}"))
                .unwrap_or_else(|| "-".into()),
            opt(&c.cuda_version),
            opt(&c.driver_version),
            c.gemm_algorithms.len(),
            c.kernels.len(),
            // Bundles from before the choice existed accumulate as `native`.
            c.fp8_gemm.as_deref().unwrap_or("native")
        );
        for k in &c.kernels {
            println!(
                "  kernel {} ({} {}, build {}): {}",
                k.name, k.kind, k.arch, k.build_id, k.file
            );
        }
    }
    let runs_here = match m.target {
        sd_engine::Target::Cuda => sd_cuda::bundle::can_run_here(m, 0),
        sd_engine::Target::Cpu => sd_engine::host::can_run(m),
    };
    match runs_here {
        Ok(s) | Err(s) => println!("runs here:     {s}"),
    }

    println!("\nsizes by component:");
    println!(
        "  {:<16} {:>8} {:>12} {:>12}  dense dtypes",
        "component", "tensors", "bytes", "fp8 bytes"
    );
    let mut listed = 0u64;
    for c in &m.components {
        let file_bytes = m.file(&c.file).map(|f| f.bytes).unwrap_or(0);
        listed += file_bytes;
        let dtypes: Vec<String> = c
            .dense_dtypes
            .iter()
            .map(|(d, n)| format!("{d} x{n}"))
            .collect();
        println!(
            "  {:<16} {:>8} {:>12} {:>12}  {}",
            c.name,
            c.tensors,
            human_bytes(file_bytes),
            human_bytes(c.fp8_bytes),
            dtypes.join(", ")
        );
    }
    let other = m.total_bytes().saturating_sub(listed);
    println!(
        "  {:<16} {:>8} {:>12}",
        "tokenizers etc.",
        m.files.len() - m.components.len(),
        human_bytes(other)
    );
    println!(
        "  {:<16} {:>8} {:>12}",
        "total",
        "",
        human_bytes(m.total_bytes())
    );

    if !m.layers.is_empty() {
        println!("\nper-layer precision:");
        println!(
            "  {:<44} {:<6} {:<6} {:<6} {:>12} {:>8}  shape",
            "layer", "prec", "weight", "input", "input scale", "w scales"
        );
        for l in &m.layers {
            println!(
                "  {:<44} {:<6} {:<6} {:<6} {:>12} {:>8}  {:?}",
                l.name,
                l.precision,
                l.weight_format.as_deref().unwrap_or("-"),
                l.input_format.as_deref().unwrap_or("-"),
                l.input_scale
                    .map(|s| format!("{s:.4e}"))
                    .unwrap_or_else(|| "-".into()),
                l.weight_scales
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "-".into()),
                l.shape
            );
        }
    }
    println!();
}
