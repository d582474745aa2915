//! The sd-cuda benchmark: SD3.5 transformer steps (and the VAE decoder) at 1024x1024,
//! batch 2, with deterministic pseudo-random weights made on the machine that runs it
//! (nothing is downloaded or committed). Driven by `scripts/bench/run_bench.sh`.
//!
//! ```text
//! bench OUT_DIR [--models sd3.5-medium,sd3.5-large] [--precisions fp8,fp8-fast-accum,bf16]
//!               [--iters 12] [--warmup 3] [--no-vae] [--no-exact] [--no-attention]
//!               [--no-pipeline] [--tokenizers models/tiny-sd35m] [--label TEXT]
//!               [--per-tensor] [--adaln fp8-weights|fp8|high] [--tune-gemms]
//!               [--fp8-gemm native|fast-accum|exact-via-bf16] [--flash-variants 4,8,9]
//!               [--no-graphs]
//! ```
//!
//! Timing: CUDA events recorded on the backend's stream before and after one whole
//! `Mmdit::forward` (what diffusers' script measures too), median of `--iters` after
//! `--warmup`; the stream-synchronised wall time is kept next to it. The pipeline stage
//! (`--tokenizers DIR`, default `models/tiny-sd35m`: only its tokenizers are used) loads
//! a whole SD3.5-medium pipeline at real sizes (CLIP-L, CLIP-G, T5-XXL, transformer,
//! VAE; random weights) and times each text encoder (events) and a full 28-step
//! 1024x1024 image with CFG 5.0 (wall time, like diffusers' `sd35_e2e.py`).
//! Each transformer record also times the same step replayed from a CUDA graph
//! (`cuda_graph`: recorded on the second call, replayed after) and checks its output
//! against the eager step's; the pipeline stage times the full image both ways
//! (`--no-graphs`: eager only).
//! Memory: the high-water mark of the stream-ordered pool every allocation comes
//! from (weights included), comparable to `torch.cuda.max_memory_allocated`; a graph's
//! activations are graph allocations, reported next to it (`graph_peak_gib`).
//! Writes `OUT_DIR/bench.json` (rewritten after every measurement) and prints a log.

use std::borrow::Cow;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use sd_cuda::{
    ConvPath, CudaBackend, CudaPrecision, FlashVariant, Fp8Gemm, flash_variant, set_flash_variant,
};
use sd_fp8::Fp8Format;
use sd_model::config::{ClipConfig, SchedulerConfig, T5Config, TransformerConfig, VaeConfig};
use sd_model::mmdit::Mmdit;
use sd_model::vae::VaeDecoder;
use sd_model::{
    ActivationQuant, AttentionParams, Backend, HostTensor, LinearQuant, PrecisionPlan,
    StorageDType, WeightQuant, WeightSource, WeightTensor,
};
use sd_pipeline::{ComponentWeights, GenerateRequest, ModelConfigs, Sd3Pipeline, Tokenizers};
use serde_json::{Value, json};

type R<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// splitmix64: a fast, seedable generator.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn name_seed(name: &str) -> u64 {
    // FNV-1a
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Uniform values in [center - amp, center + amp], deterministic in (seed, index).
fn fill_uniform(seed: u64, center: f32, amp: f32, out: &mut [f32]) {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(16);
    let chunk = out.len().div_ceil(threads).max(1 << 16);
    std::thread::scope(|sc| {
        for (ci, c) in out.chunks_mut(chunk).enumerate() {
            sc.spawn(move || {
                let mut st = seed ^ (ci as u64).wrapping_mul(0xA24B_AED4_963E_E407);
                for v in c {
                    let u = (splitmix(&mut st) >> 40) as f32 / (1u64 << 24) as f32;
                    *v = center + amp * (2.0 * u - 1.0);
                }
            });
        }
    });
}

fn random_host(shape: Vec<usize>, seed: u64, amp: f32) -> HostTensor {
    let mut data = vec![0f32; shape.iter().product()];
    fill_uniform(seed, 0.0, amp, &mut data);
    HostTensor { shape, data }
}

/// Every tensor any loader asks for, made up on request with the requested shape:
/// linear weights uniform in ±1/sqrt(fan_in) (PyTorch's default init range), norm
/// weights 1 ± 0.1, biases ±0.02. BF16 bytes, like a real checkpoint.
struct RandomWeights;

impl WeightSource for RandomWeights {
    fn describe(&self) -> String {
        "pseudo-random weights (splitmix64, seeded by tensor name)".into()
    }
    fn names(&self) -> Vec<String> {
        Vec::new()
    }
    fn contains(&self, _name: &str) -> bool {
        // Buffers a loader may compute instead (pos_embed.pos_embed) are computed.
        false
    }
    fn get(&self, name: &str) -> sd_model::Result<WeightTensor<'_>> {
        Err(sd_model::ModelError::input(format!(
            "RandomWeights needs the shape of {name}"
        )))
    }
    fn get_shaped(&self, name: &str, shape: &[usize]) -> sd_model::Result<WeightTensor<'_>> {
        let n: usize = shape.iter().product();
        let (center, amp) = if name.ends_with(".bias") {
            (0.0, 0.02)
        } else if shape.len() >= 2 {
            let fan_in: usize = shape[1..].iter().product();
            (0.0, 1.0 / (fan_in.max(1) as f32).sqrt())
        } else {
            (1.0, 0.1)
        };
        let mut v = vec![0f32; n];
        fill_uniform(name_seed(name), center, amp, &mut v);
        let mut bytes = vec![0u8; 2 * n];
        // Converted on every core: T5-XXL alone is 4.8 G values.
        let chunk = n.div_ceil(16).max(1 << 16);
        std::thread::scope(|sc| {
            for (dst, src) in bytes.chunks_mut(2 * chunk).zip(v.chunks(chunk)) {
                sc.spawn(move || {
                    for (b, x) in dst.chunks_exact_mut(2).zip(src) {
                        b.copy_from_slice(&half::bf16::from_f32(*x).to_le_bytes());
                    }
                });
            }
        });
        Ok(WeightTensor {
            name: name.to_string(),
            origin: "<random>".into(),
            shape: shape.to_vec(),
            dtype: StorageDType::BF16,
            bytes: Cow::Owned(bytes),
        })
    }
}

fn config(name: &str) -> R<TransformerConfig> {
    // Sizes of ../shared/peer/sd35_peer.py (diffusers' SD3.5 configs).
    let mut c = TransformerConfig {
        sample_size: 128,
        patch_size: 2,
        in_channels: 16,
        attention_head_dim: 64,
        joint_attention_dim: 4096,
        pooled_projection_dim: 2048,
        out_channels: 16,
        qk_norm: Some("rms_norm".into()),
        ..TransformerConfig::default()
    };
    match name {
        "sd3.5-medium" => {
            c.num_layers = 24;
            c.num_attention_heads = 24;
            c.caption_projection_dim = 1536;
            c.pos_embed_max_size = Some(384);
            c.dual_attention_layers = (0..13).collect();
        }
        "sd3.5-large" => {
            c.num_layers = 38;
            c.num_attention_heads = 38;
            c.caption_projection_dim = 2432;
            c.pos_embed_max_size = Some(192);
        }
        other => return Err(format!("unknown model {other}").into()),
    }
    Ok(c)
}

/// Layers kept out of FP8 (the calibration defaults): embedders, the output norm and
/// projection, and (unless `adaln`) the adaLN modulation layers.
fn is_adaln(layer: &str) -> bool {
    layer.ends_with(".norm1.linear") || layer.ends_with(".norm1_context.linear")
}

/// Layers the plan leaves in BF16 (as calibration does): the embedders and the final
/// norm and projection; the adaLN modulation layers too with `--adaln high`.
fn excluded(layer: &str, adaln: Adaln) -> bool {
    layer.starts_with("pos_embed.")
        || layer.starts_with("time_text_embed.")
        || layer == "context_embedder"
        || layer == "norm_out.linear"
        || layer == "proj_out"
        || (adaln == Adaln::High && is_adaln(layer))
}

/// How the adaLN modulation layers run (`sd-build calibrate --adaln`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Adaln {
    /// FP8 E4M3 weights, BF16 input (W8A16): calibration's default.
    Fp8Weights,
    /// FP8 weights and input, like every other linear.
    Fp8,
    /// BF16.
    High,
}

impl Adaln {
    fn name(self) -> &'static str {
        match self {
            Self::Fp8Weights => "fp8-weights",
            Self::Fp8 => "fp8",
            Self::High => "high",
        }
    }
}

/// Every other linear layer in FP8, as a calibration cache would have it (but with
/// fixed scales): E4M3 weights with one scale per output channel, 0.95-1.0 x the init
/// range (amax 1/sqrt(fan_in)), so that they differ from channel to channel (one scale
/// per tensor with `per_tensor`); E4M3 inputs with a static scale (amax 16); the adaLN
/// modulation layers as `adaln` says.
fn fp8_plan(cfg: &TransformerConfig, per_tensor: bool, adaln: Adaln) -> PrecisionPlan {
    let d = cfg.inner_dim();
    let mut plan = PrecisionPlan::default();
    for l in Mmdit::<CudaBackend>::linear_layer_names(cfg) {
        if excluded(&l, adaln) {
            continue;
        }
        let fan_in = if l.ends_with("net.2") { 4 * d } else { d };
        let out = if l.ends_with("net.0.proj") {
            4 * d
        } else if l.ends_with(".norm1.linear") {
            // adaLN-Zero: 6 chunks, 9 with a second (dual) attention.
            let i: usize = l
                .split('.')
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if cfg.dual_attention_layers.contains(&i) {
                9 * d
            } else {
                6 * d
            }
        } else if l.ends_with(".norm1_context.linear") {
            // The last block's context stream only needs scale and shift.
            if l == format!(
                "transformer_blocks.{}.norm1_context.linear",
                cfg.num_layers - 1
            ) {
                2 * d
            } else {
                6 * d
            }
        } else {
            d
        };
        let amax = 1.0 / (fan_in as f32).sqrt();
        let scales = if per_tensor {
            vec![amax / 448.0]
        } else {
            (0..out)
                .map(|c| amax * (1.0 - 0.05 * (c % 11) as f32 / 10.0) / 448.0)
                .collect()
        };
        let weight = WeightQuant {
            format: Fp8Format::E4M3,
            scales,
        };
        let quant = if adaln == Adaln::Fp8Weights && is_adaln(&l) {
            LinearQuant::Fp8WeightOnly { weight }
        } else {
            LinearQuant::Fp8 {
                weight,
                input: ActivationQuant {
                    format: Fp8Format::E4M3,
                    scale: 16.0 / 448.0,
                },
            }
        };
        plan.layers.insert(l, quant);
    }
    plan
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

fn rel_err(a: &HostTensor, b: &HostTensor) -> (f64, f64) {
    let mut max_d = 0f64;
    let mut max_r = 0f64;
    let mut se = 0f64;
    let mut sr = 0f64;
    for (x, y) in a.data.iter().zip(&b.data) {
        let (x, y) = (*x as f64, *y as f64);
        max_d = max_d.max((x - y).abs());
        max_r = max_r.max(y.abs());
        se += (x - y) * (x - y);
        sr += y * y;
    }
    (max_d / max_r.max(1e-30), (se / sr.max(1e-30)).sqrt())
}

struct Bench {
    out: PathBuf,
    doc: Value,
}

impl Bench {
    fn push(&mut self, key: &str, v: Value) {
        println!("{key}: {v}");
        if let Some(arr) = self.doc[key].as_array_mut() {
            arr.push(v);
        } else {
            self.doc[key] = json!([v]);
        }
        self.save();
    }
    fn save(&self) {
        let p = self.out.join("bench.json");
        if let Ok(mut f) = std::fs::File::create(&p) {
            let _ = f.write_all(
                serde_json::to_string_pretty(&self.doc)
                    .unwrap_or_default()
                    .as_bytes(),
            );
        }
    }
}

struct Opts {
    iters: usize,
    warmup: usize,
    exact: bool,
    /// What distinguishes this run's engine (recorded as "variant").
    label: Option<String>,
    /// One FP8 weight scale per tensor instead of per output channel.
    per_tensor: bool,
    /// How the adaLN modulation layers run.
    adaln: Adaln,
    /// Choose GEMM algorithms by timing during the first warm-up step (what `sd-build
    /// compile --target cuda` stores in a bundle) instead of cuBLASLt's heuristic.
    tune_gemms: bool,
    /// How the FP8 engine's GEMMs accumulate (`--fp8-gemm`).
    fp8_gemm: Fp8Gemm,
    /// The flash tilings the attention microbenchmark times (`--flash-variants 4,8`:
    /// `SD_CUDA_FLASH_VARIANT` numbers); all of them when not given.
    flash_variants: Vec<FlashVariant>,
    /// Also time the step replayed from a CUDA graph (`--no-graphs`: not).
    graphs: bool,
}

fn profile_json(b: &CudaBackend) -> R<Value> {
    let p = b.profile()?;
    Ok(Value::Array(
        p.into_iter()
            .map(|(op, n, ms)| json!({"op": op, "calls": n, "ms": (ms * 1000.0).round() / 1000.0}))
            .collect(),
    ))
}

fn bench_transformer(
    bench: &mut Bench,
    model: &str,
    precision: &str,
    o: &Opts,
    outputs: &mut Vec<(String, HostTensor)>,
) -> R<()> {
    let cfg = config(model)?;
    // "fp8-fast-accum": the FP8 engine with cuBLASLt's fast accumulation, whatever
    // `--fp8-gemm` says (so both accumulations can be measured in one process).
    let (prec, fp8_gemm) = match precision {
        "fp8" => (CudaPrecision::Fp8, o.fp8_gemm),
        "fp8-fast-accum" => (CudaPrecision::Fp8, Fp8Gemm::NativeFastAccum),
        "bf16" => (CudaPrecision::Bf16, o.fp8_gemm),
        p => return Err(format!("precision {p}? (fp8, fp8-fast-accum or bf16)").into()),
    };
    let plan = if prec == CudaPrecision::Fp8 {
        fp8_plan(&cfg, o.per_tensor, o.adaln)
    } else {
        PrecisionPlan::default()
    };
    let b = CudaBackend::new(0, prec)?.with_fp8_gemm(fp8_gemm);
    // The eager step first, whatever SD_CUDA_GRAPHS says; the graph replay below.
    b.set_cuda_graphs(false)?;
    let t0 = Instant::now();
    let m = Mmdit::load(&b, cfg.clone(), &RandomWeights, &plan)?;
    b.synchronize()?;
    let load_s = t0.elapsed().as_secs_f64();
    let after_load = b.memory_stats()?;
    // Inputs: batch 2 (classifier-free guidance), 1024x1024 -> 128x128 latents,
    // 333 text tokens (77 CLIP + 256 T5).
    let lat = b.upload(&random_host(vec![2, 16, 128, 128], 1, 1.0))?;
    let ctx = b.upload(&random_host(vec![2, 333, 4096], 2, 1.0))?;
    let pooled = b.upload(&random_host(vec![2, 2048], 3, 1.0))?;
    let ts = [500.0f32, 500.0];
    // (CUDA-event ms, wall ms) of one step.
    let step = |b: &CudaBackend| -> R<(f64, f64)> {
        let t = Instant::now();
        let e0 = b.record_event()?;
        let y = m.forward(b, &lat, &ctx, &pooled, &ts)?;
        let e1 = b.record_event()?;
        let gpu = e0.elapsed_ms(&e1)? as f64;
        b.synchronize()?;
        drop(y);
        Ok((gpu, t.elapsed().as_secs_f64() * 1e3))
    };
    let tw = Instant::now();
    if o.tune_gemms {
        b.set_gemm_tuning(true)?;
        step(&b)?;
        b.set_gemm_tuning(false)?;
    }
    for _ in 0..o.warmup {
        step(&b)?;
    }
    let warm_s = tw.elapsed().as_secs_f64();
    let gemm_algorithms = if o.tune_gemms {
        format!(
            "timed: fastest of cuBLASLt's top 8 per problem ({} problems)",
            b.gemm_algorithms()?.len()
        )
    } else {
        "cuBLASLt heuristic".to_string()
    };
    b.reset_peak_memory()?;
    let both: Vec<(f64, f64)> = (0..o.iters).map(|_| step(&b)).collect::<R<_>>()?;
    let mem = b.memory_stats()?;
    let mut times: Vec<f64> = both.iter().map(|t| t.0).collect();
    let mut walls: Vec<f64> = both.iter().map(|t| t.1).collect();
    let min = times.iter().cloned().fold(f64::INFINITY, f64::min);
    let med = median(&mut times);
    let wall_med = median(&mut walls);
    // The output, for the FP8-vs-BF16 comparison.
    let y = b.download(&m.forward(&b, &lat, &ctx, &pooled, &ts)?)?;
    // Per-operation profile of one step.
    b.set_profiling(true)?;
    let tp = Instant::now();
    let _ = m.forward(&b, &lat, &ctx, &pooled, &ts)?;
    b.synchronize()?;
    let prof_ms = tp.elapsed().as_secs_f64() * 1e3;
    let prof = profile_json(&b)?;
    b.set_profiling(false)?;
    let mut rec = json!({
        "model": model,
        "precision": precision,
        "engine": "sd-cuda",
        "res": 1024, "batch": 2, "text_tokens": 333,
        "step_ms_median": (med * 100.0).round() / 100.0,
        "step_ms_min": (min * 100.0).round() / 100.0,
        "step_wall_ms_median": (wall_med * 100.0).round() / 100.0,
        "iters": o.iters, "warmup": o.warmup,
        "timing": "CUDA events on the backend's stream around one forward (median); wall = stream-synchronised host time",
        "peak_gib": (gib(mem.peak_used) * 1000.0).round() / 1000.0,
        "peak_reserved_gib": (gib(mem.peak_reserved) * 1000.0).round() / 1000.0,
        "param_bytes": after_load.param_bytes,
        "param_gib": (gib(after_load.param_bytes) * 1000.0).round() / 1000.0,
        "weights_resident_gib": (gib(after_load.used) * 1000.0).round() / 1000.0,
        "fp8_layers": plan.fp8_layer_count(),
        "fp8_weight_scales": if o.per_tensor { "per tensor" } else { "per output channel" },
        "adaln": o.adaln.name(),
        "fp8_weight_only_layers": plan.fp8_weight_layer_count() - plan.fp8_layer_count(),
        "load_s": (load_s * 10.0).round() / 10.0,
        "warmup_s": (warm_s * 10.0).round() / 10.0,
        "profiled_step_ms": (prof_ms * 10.0).round() / 10.0,
        "profile": prof,
        "gpu": b.gpu_name(),
        "attention": format!("flash (bf16, head dim 64): {}", flash_variant().name()),
        "linear_epilogue": b.fused_epilogue()?,
        "gemm_algorithms": gemm_algorithms,
        "fp8_gemm": fp8_gemm.name(),
    });
    if let Some(l) = &o.label {
        rec["variant"] = json!(l);
    }
    // The same step with the exact reference attention (the engine before flash
    // attention), once, and how far the flash output is from it.
    if o.exact && model == "sd3.5-medium" {
        b.set_flash_attention(false)?;
        let t = Instant::now();
        let ye = b.download(&m.forward(&b, &lat, &ctx, &pooled, &ts)?)?;
        let exact_ms = t.elapsed().as_secs_f64() * 1e3;
        b.set_flash_attention(true)?;
        let (rel_max, rel_rms) = rel_err(&y, &ye);
        rec["exact_attention_step_ms"] = json!((exact_ms * 10.0).round() / 10.0);
        rec["flash_vs_exact_step_output"] = json!({"max_rel": rel_max, "rms_rel": rel_rms});
    }
    // The same step recorded once as a CUDA graph and replayed: one launch per step
    // instead of ~1,000, and proof that nothing in the step waits for the host.
    if o.graphs {
        b.set_cuda_graphs(true)?;
        // The eager first run, the recording, then warm replays.
        for _ in 0..o.warmup.max(1) + 2 {
            step(&b)?;
        }
        b.reset_peak_memory()?;
        let both: Vec<(f64, f64)> = (0..o.iters).map(|_| step(&b)).collect::<R<_>>()?;
        let gmem = b.memory_stats()?;
        let yg = b.download(&m.forward(&b, &lat, &ctx, &pooled, &ts)?)?;
        let stats = b.graph_stats()?;
        b.set_cuda_graphs(false)?;
        let mut times: Vec<f64> = both.iter().map(|t| t.0).collect();
        let mut walls: Vec<f64> = both.iter().map(|t| t.1).collect();
        let max_abs = y
            .data
            .iter()
            .zip(&yg.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        rec["cuda_graph"] = json!({
            "step_ms_median": (median(&mut times) * 100.0).round() / 100.0,
            "step_wall_ms_median": (median(&mut walls) * 100.0).round() / 100.0,
            "pool_peak_gib": (gib(gmem.peak_used) * 1000.0).round() / 1000.0,
            "graph_peak_gib": (gib(gmem.graph_peak_used) * 1000.0).round() / 1000.0,
            "graph_reserved_gib": (gib(gmem.graph_reserved) * 1000.0).round() / 1000.0,
            "output_identical_to_eager": yg.data == y.data,
            "output_max_abs_diff_vs_eager": max_abs,
            "replays": stats.replays,
            "captures": stats.captures,
            "failed_captures": stats.failed,
            "timing": "as the eager step: CUDA events around one forward (input copies, graph launch, output copy)",
        });
    }
    let finite = y.data.iter().all(|v| v.is_finite());
    rec["output_finite"] = json!(finite);
    bench.push("transformer", rec);
    outputs.push((format!("{model} {precision}"), y));
    Ok(())
}

fn bench_attention(bench: &mut Bench, o: &Opts) -> R<()> {
    // SD3.5-medium joint attention: 4,096 image + 333 text tokens, 24 heads of 64.
    let b = CudaBackend::new(0, CudaPrecision::Bf16)?;
    let (bs, s, h, d) = (2usize, 4429usize, 24usize, 64usize);
    let q = b.upload(&random_host(vec![bs, s, h * d], 11, 2.0))?;
    let k = b.upload(&random_host(vec![bs, s, h * d], 12, 2.0))?;
    let v = b.upload(&random_host(vec![bs, s, h * d], 13, 1.0))?;
    let p = AttentionParams {
        heads: h,
        scale: 1.0 / (d as f32).sqrt(),
        causal: false,
        bias: None,
    };
    let flops = 4.0 * (bs * h) as f64 * (s * s) as f64 * d as f64;
    let run = |b: &CudaBackend, n: usize| -> R<(f64, HostTensor)> {
        let mut ts = Vec::new();
        let mut last = None;
        for _ in 0..n {
            let t = Instant::now();
            let y = b.attention(&q, &k, &v, p)?;
            b.synchronize()?;
            ts.push(t.elapsed().as_secs_f64() * 1e3);
            last = Some(y);
        }
        let y = b.download(&last.ok_or("no run")?)?;
        Ok((median(&mut ts), y))
    };
    // The exact reference kernel first (its output checks every flash tiling).
    let exact = if o.exact {
        b.set_flash_attention(false)?;
        let r = run(&b, 1)?;
        b.set_flash_attention(true)?;
        Some(r)
    } else {
        None
    };
    let mut variants = Vec::new();
    let mut best: Option<(f64, FlashVariant)> = None;
    for &var in &o.flash_variants {
        set_flash_variant(var);
        let _ = run(&b, 2)?;
        let (ms, y) = run(&b, o.iters.max(10))?;
        let mut vr = json!({
            "kernel": var.name(),
            "ms": (ms * 1000.0).round() / 1000.0,
            "tflops": (flops / ms / 1e9).round(),
        });
        let mut ok = y.data.iter().all(|v| v.is_finite());
        if let Some((_, ye)) = &exact {
            let (rel_max, rel_rms) = rel_err(&y, ye);
            vr["vs_exact"] = json!({"max_rel": rel_max, "rms_rel": rel_rms});
            ok &= rel_max < 2e-2;
        }
        vr["ok"] = json!(ok);
        if ok && best.is_none_or(|(t, _)| ms < t) {
            best = Some((ms, var));
        }
        variants.push(vr);
    }
    let (flash_ms, chosen) = best.ok_or("no flash-attention tiling passed")?;
    // Every later backend of this run uses the fastest correct tiling.
    set_flash_variant(chosen);
    let mut rec = json!({
        "shape": format!("batch {bs}, {s} tokens, {h} heads x {d}"),
        "flash_kernel": chosen.name(),
        "flash_ms": (flash_ms * 1000.0).round() / 1000.0,
        "flash_tflops": (flops / flash_ms / 1e9).round(),
        "variants": variants,
    });
    if let Some((exact_ms, ye)) = exact {
        set_flash_variant(chosen);
        let (_, yf) = run(&b, 1)?;
        let (rel_max, rel_rms) = rel_err(&yf, &ye);
        rec["exact_ms"] = json!((exact_ms * 1000.0).round() / 1000.0);
        rec["exact_tflops"] = json!((flops / exact_ms / 1e9 * 10.0).round() / 10.0);
        rec["flash_vs_exact"] = json!({"max_rel": rel_max, "rms_rel": rel_rms});
    }
    // The joint attention as the model calls it, each stream in its own tensor: in place
    // (two-segment kernel, Hopper) against concat + attention + narrow.
    let s_img = 4096;
    let split = |t: &sd_cuda::CudaTensor| -> R<_> {
        Ok((b.narrow(t, 1, 0, s_img)?, b.narrow(t, 1, s_img, s - s_img)?))
    };
    let ((qi, qc), (ki, kc), (vi, vc)) = (split(&q)?, split(&k)?, split(&v)?);
    let time_joint = |by_concat: bool, n: usize| -> R<(f64, HostTensor)> {
        let mut ts = Vec::new();
        let mut last = None;
        for _ in 0..n {
            let t = Instant::now();
            let y = if by_concat {
                sd_model::backend::joint_attention_by_concat(
                    &b,
                    [&qi, &ki, &vi],
                    [&qc, &kc, &vc],
                    p,
                )?
            } else {
                b.joint_attention([&qi, &ki, &vi], [&qc, &kc, &vc], p)?
            };
            b.synchronize()?;
            ts.push(t.elapsed().as_secs_f64() * 1e3);
            last = Some(y);
        }
        let (yi, yc) = last.ok_or("no run")?;
        let y = b.download(&b.concat(&[&yi, &yc], 1)?)?;
        Ok((median(&mut ts), y))
    };
    let _ = time_joint(false, 2)?;
    let (joint_ms, yj) = time_joint(false, o.iters.max(10))?;
    let (concat_ms, yc) = time_joint(true, o.iters.max(10))?;
    let same = yj.data == yc.data;
    rec["joint"] = json!({
        "in_place_ms": (joint_ms * 1000.0).round() / 1000.0,
        "concat_attention_narrow_ms": (concat_ms * 1000.0).round() / 1000.0,
        "identical_outputs": same,
    });
    bench.push("attention", rec);
    Ok(())
}

/// The SD3 / SD3.5 VAE (decoder side) at its real size.
fn vae_config() -> VaeConfig {
    VaeConfig {
        in_channels: 3,
        out_channels: 3,
        latent_channels: 16,
        block_out_channels: vec![128, 256, 512, 512],
        layers_per_block: 2,
        norm_num_groups: 32,
        scaling_factor: 1.5305,
        shift_factor: Some(0.0609),
        use_post_quant_conv: false,
        mid_block_add_attention: true,
        up_block_types: vec!["UpDecoderBlock2D".into(); 4],
    }
}

fn bench_vae(bench: &mut Bench, o: &Opts) -> R<()> {
    let b = CudaBackend::new(0, CudaPrecision::Bf16)?;
    let default_path = b.conv_stats()?.path;
    let z = b.upload(&random_host(vec![1, 16, 128, 128], 21, 1.0))?;
    let iters = o.iters.clamp(1, 3);
    let dec = |vae: &VaeDecoder<CudaBackend>| -> R<f64> {
        let e0 = b.record_event()?;
        let y = vae.decode(&b, &z)?;
        let e1 = b.record_event()?;
        let ms = e0.elapsed_ms(&e1)? as f64;
        drop(y);
        Ok(ms)
    };
    // One convolution path: the decoder loaded after the path is chosen (its filters
    // are stored in the layout the path reads), a warm-up decode (cuDNN plans, the
    // pool), `iters` timed decodes, one profiled, the image.
    let measure = |path: ConvPath| -> R<(Value, HostTensor)> {
        b.set_conv_path(path)?;
        let vae = VaeDecoder::load(&b, vae_config(), &RandomWeights, &PrecisionPlan::default())?;
        dec(&vae)?;
        b.reset_peak_memory()?;
        let mut ts = (0..iters).map(|_| dec(&vae)).collect::<R<Vec<f64>>>()?;
        let mem = b.memory_stats()?;
        let stats = b.conv_stats()?;
        b.set_profiling(true)?;
        let _ = dec(&vae)?;
        let prof = profile_json(&b)?;
        b.set_profiling(false)?;
        let image = b.download(&vae.decode(&b, &z)?)?;
        let tag = format!(" {}:", path.name());
        let rec = json!({
            "path": path.name(),
            "ms_median": (median(&mut ts) * 100.0).round() / 100.0,
            "peak_gib": (gib(mem.peak_used) * 1000.0).round() / 1000.0,
            "conv_path": stats.to_string(),
            // The problems this path ran on cuDNN (the backend lists every layout seen).
            "conv_problems": stats.cudnn_problems.iter().filter(|p| p.contains(&tag)).collect::<Vec<_>>(),
            "cudnn": stats.cudnn_version.is_some() && stats.unavailable.is_none(),
            "profile": prof,
        });
        Ok((rec, image))
    };
    let (mut rec, default_image) = measure(default_path)?;
    rec["what"] = json!("SD3 VAE decode 1024x1024, batch 1, bf16");
    rec["iters"] = json!(iters);
    rec["timing"] = json!("CUDA events around one decode");
    // The other paths, same process and weights (RandomWeights is deterministic): time
    // and how far each image is from the default path's.
    let mut others = Vec::new();
    if rec["cudnn"] == json!(true) {
        for path in ConvPath::ALL.into_iter().filter(|p| *p != default_path) {
            // A path that fails is recorded; the default path's figures stay.
            others.push(match measure(path) {
                Ok((mut r, image)) => {
                    let (max_rel, rms_rel) = rel_err(&default_image, &image);
                    r["vs_default"] = json!({"max_rel": max_rel, "rms_rel": rms_rel});
                    r
                }
                Err(e) => json!({"path": path.name(), "error": e.to_string()}),
            });
        }
    }
    b.set_conv_path(default_path)?;
    rec["other_paths"] = json!(others);
    bench.push("vae", rec);
    Ok(())
}

/// CLIP-L, CLIP-G and T5-XXL at SD3.5's real sizes (the text encoders of every SD3.5
/// model; `eos_token_id` 2 picks the pooled token by argmax, as diffusers' test
/// configs and `sd35_e2e.py` do).
fn text_configs() -> (ClipConfig, ClipConfig, T5Config) {
    let clip = |hidden: usize, inter: usize, layers: usize, heads: usize, act: &str| ClipConfig {
        vocab_size: 49408,
        hidden_size: hidden,
        intermediate_size: inter,
        projection_dim: hidden,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        max_position_embeddings: 77,
        hidden_act: act.into(),
        layer_norm_eps: 1e-5,
        eos_token_id: 2,
    };
    let t5 = T5Config {
        vocab_size: 32128,
        d_model: 4096,
        d_kv: 64,
        d_ff: 10240,
        num_layers: 24,
        num_heads: 64,
        relative_attention_num_buckets: 32,
        relative_attention_max_distance: 128,
        layer_norm_epsilon: 1e-6,
        feed_forward_proj: "gated-gelu".into(),
    };
    (
        clip(768, 3072, 12, 12, "quick_gelu"),
        clip(1280, 5120, 32, 20, "gelu"),
        t5,
    )
}

/// A whole SD3.5-medium pipeline (FP8 transformer with the plan above; CLIP, T5 and
/// the VAE in BF16): per-stage latency of the text encoders and a full 28-step
/// 1024x1024 image with CFG 5.0, as diffusers' pipeline runs it.
fn bench_pipeline(bench: &mut Bench, o: &Opts, tokenizers: &std::path::Path) -> R<()> {
    let model = "sd3.5-medium";
    let (clip_l, clip_g, t5) = text_configs();
    let configs = ModelConfigs {
        transformer: config(model)?,
        clip_l,
        clip_g,
        t5: Some(t5),
        vae: vae_config(),
        scheduler: SchedulerConfig {
            shift: 3.0,
            ..SchedulerConfig::default()
        },
    };
    let plan = fp8_plan(&configs.transformer, o.per_tensor, o.adaln);
    let toks = Tokenizers::load(tokenizers, true)?;
    let b = CudaBackend::new(0, CudaPrecision::Fp8)?.with_fp8_gemm(o.fp8_gemm);
    let t0 = Instant::now();
    let w = ComponentWeights {
        transformer: &RandomWeights,
        clip_l: &RandomWeights,
        clip_g: &RandomWeights,
        t5: Some(&RandomWeights),
        vae: &RandomWeights,
    };
    let pipe = Sd3Pipeline::from_parts(&configs, w, toks, b, &plan)?;
    let b = &pipe.backend;
    b.set_cuda_graphs(false)?;
    b.synchronize()?;
    let load_s = t0.elapsed().as_secs_f64();
    let params = b.memory_stats()?.param_bytes;
    let prompt = "a crimson kite over the sea";
    let l_ids = pipe.tokenizers.clip_l.encode(prompt)?.ids;
    let g_ids = pipe.tokenizers.clip_g.encode(prompt)?.ids;
    let t5_tok = pipe.tokenizers.t5.as_ref().ok_or("no T5 tokenizer")?;
    let t5_ids = t5_tok.encode(prompt, 256)?.ids;
    let t5_model = pipe.t5.as_ref().ok_or("no T5")?;
    // Each encoder once per prompt (batch 1), as the pipeline calls it; an image with
    // CFG encodes the prompt and the negative prompt.
    let time = |f: &dyn Fn() -> R<()>| -> R<f64> {
        f()?;
        let mut ts = Vec::new();
        for _ in 0..o.iters.clamp(3, 10) {
            let e0 = b.record_event()?;
            f()?;
            let e1 = b.record_event()?;
            ts.push(e0.elapsed_ms(&e1)? as f64);
        }
        Ok(median(&mut ts))
    };
    let clip_l_ms = time(&|| {
        pipe.clip_l.forward(b, &l_ids, 1)?;
        Ok(())
    })?;
    let clip_g_ms = time(&|| {
        pipe.clip_g.forward(b, &g_ids, 1)?;
        Ok(())
    })?;
    let t5_ms = time(&|| {
        t5_model.forward(b, &t5_ids, 1)?;
        Ok(())
    })?;
    // T5 with its biased attention on the exact kernel (the path before the batched GEMM
    // attention), and how far its output is from the GEMM path's.
    let t5_gemm_out = b.download(&t5_model.forward(b, &t5_ids, 1)?)?;
    b.set_flash_attention(false)?;
    let t5_exact_ms = time(&|| {
        t5_model.forward(b, &t5_ids, 1)?;
        Ok(())
    })?;
    let t5_exact_out = b.download(&t5_model.forward(b, &t5_ids, 1)?)?;
    b.set_flash_attention(true)?;
    let (t5_max_rel, t5_rms_rel) = rel_err(&t5_gemm_out, &t5_exact_out);
    let req = || GenerateRequest {
        prompt: prompt.into(),
        negative_prompt: "blurry".into(),
        width: 1024,
        height: 1024,
        steps: 28,
        guidance_scale: 5.0,
        seed: 0,
        ..GenerateRequest::default()
    };
    let mut steps = 0usize;
    pipe.generate(req(), &mut |_, _| {})?;
    b.reset_peak_memory()?;
    let mut e2e = Vec::new();
    for _ in 0..2 {
        let t = Instant::now();
        let img = pipe.generate(req(), &mut |done, _| steps = done)?;
        e2e.push(t.elapsed().as_secs_f64() * 1e3);
        if img.image.width != 1024 {
            return Err("unexpected image size".into());
        }
    }
    let mem = b.memory_stats()?;
    // The same images with the transformer step replayed from CUDA graphs.
    let mut e2e_graphs = Vec::new();
    if o.graphs {
        b.set_cuda_graphs(true)?;
        pipe.generate(req(), &mut |_, _| {})?;
        for _ in 0..2 {
            let t = Instant::now();
            pipe.generate(req(), &mut |_, _| {})?;
            e2e_graphs.push(t.elapsed().as_secs_f64() * 1e3);
        }
        b.set_cuda_graphs(false)?;
    }
    let r2 = |v: f64| (v * 100.0).round() / 100.0;
    bench.push(
        "pipeline",
        json!({
            "model": model,
            "what": "whole pipeline at real sizes, random weights: FP8 transformer (plan above), BF16 CLIP-L, CLIP-G, T5-XXL and VAE",
            "clip_l_ms": r2(clip_l_ms),
            "clip_g_ms": r2(clip_g_ms),
            "t5_ms": r2(t5_ms),
            "t5_exact_attention_ms": r2(t5_exact_ms),
            "t5_gemm_vs_exact_attention": {"max_rel": t5_max_rel, "rms_rel": t5_rms_rel},
            "text_encoders_per_image_ms": r2(2.0 * (clip_l_ms + clip_g_ms + t5_ms)),
            "text_timing": "CUDA events, one prompt (batch 1) per call, median; an image with CFG encodes two prompts",
            "e2e_ms": e2e.iter().map(|&v| r2(v)).collect::<Vec<_>>(),
            "e2e_ms_median": r2(e2e.iter().cloned().fold(f64::INFINITY, f64::min)),
            "e2e_cuda_graphs_ms": e2e_graphs.iter().map(|&v| r2(v)).collect::<Vec<_>>(),
            "e2e_cuda_graphs_ms_best": (!e2e_graphs.is_empty())
                .then(|| r2(e2e_graphs.iter().cloned().fold(f64::INFINITY, f64::min))),
            "e2e_steps": steps,
            "e2e_timing": "wall time of Sd3Pipeline::generate (1024x1024, 28 steps, CFG 5.0, PNG-ready RGB downloaded), best of 2 after one warm-up",
            "peak_gib": (gib(mem.peak_used) * 1000.0).round() / 1000.0,
            "param_gib": (gib(params) * 1000.0).round() / 1000.0,
            "load_s": (load_s * 10.0).round() / 10.0,
        }),
    );
    Ok(())
}

fn main() -> R<()> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().ok_or("usage: bench OUT_DIR [options]")?);
    std::fs::create_dir_all(&out)?;
    let mut models = vec!["sd3.5-medium".to_string(), "sd3.5-large".to_string()];
    let mut precisions = vec!["fp8".to_string(), "bf16".to_string()];
    let mut o = Opts {
        iters: 12,
        warmup: 3,
        exact: true,
        label: None,
        per_tensor: false,
        adaln: Adaln::Fp8Weights,
        tune_gemms: false,
        fp8_gemm: Fp8Gemm::from_env()?,
        flash_variants: FlashVariant::ALL.to_vec(),
        graphs: true,
    };
    let mut vae = true;
    let mut attn = true;
    let mut pipeline = true;
    let mut tokenizers = PathBuf::from("models/tiny-sd35m");
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--models" => {
                models = val()?
                    .split(',')
                    .filter(|m| !m.is_empty())
                    .map(String::from)
                    .collect()
            }
            "--precisions" => precisions = val()?.split(',').map(String::from).collect(),
            "--iters" => o.iters = val()?.parse()?,
            "--warmup" => o.warmup = val()?.parse()?,
            "--no-vae" => vae = false,
            "--no-attention" => attn = false,
            "--no-exact" => o.exact = false,
            "--no-pipeline" => pipeline = false,
            "--no-graphs" => o.graphs = false,
            "--label" => o.label = Some(val()?),
            "--per-tensor" => o.per_tensor = true,
            "--adaln" => {
                o.adaln = match val()?.as_str() {
                    "fp8-weights" => Adaln::Fp8Weights,
                    "fp8" => Adaln::Fp8,
                    "high" => Adaln::High,
                    other => {
                        return Err(
                            format!("--adaln {other}: expected fp8-weights, fp8 or high").into(),
                        );
                    }
                }
            }
            "--tune-gemms" => o.tune_gemms = true,
            "--fp8-gemm" => o.fp8_gemm = Fp8Gemm::parse(&val()?)?,
            "--tokenizers" => tokenizers = PathBuf::from(val()?),
            "--flash-variants" => {
                o.flash_variants = val()?
                    .split(',')
                    .map(|n| {
                        n.trim()
                            .parse::<usize>()
                            .ok()
                            .and_then(|i| FlashVariant::ALL.get(i).copied())
                            .ok_or_else(|| {
                                format!(
                                    "--flash-variants: {n:?} is not a tiling number (0..{})",
                                    FlashVariant::ALL.len() - 1
                                )
                            })
                    })
                    .collect::<Result<_, _>>()?
            }
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    let mut bench = Bench {
        out,
        doc: json!({
            "harness": "crates/sd-cuda/examples/bench.rs",
            "started_unix": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }),
    };
    if attn && let Err(e) = bench_attention(&mut bench, &o) {
        bench.push("errors", json!(format!("attention: {e}")));
    }
    for model in &models {
        let mut outs = Vec::new();
        for p in &precisions {
            if let Err(e) = bench_transformer(&mut bench, model, p, &o, &mut outs) {
                bench.push("errors", json!(format!("{model} {p}: {e}")));
            }
        }
        // Every FP8 engine's output against the BF16 engine's.
        let bf16 = outs.iter().find(|(name, _)| name.ends_with(" bf16"));
        for (name, y) in outs.iter().filter(|(name, _)| !name.ends_with(" bf16")) {
            let Some((_, yb)) = bf16 else { break };
            let (rel_max, rel_rms) = rel_err(y, yb);
            let precision = name.rsplit(' ').next().unwrap_or_default();
            bench.push(
                "fp8_vs_bf16",
                json!({"model": model, "precision": precision, "max_rel": rel_max, "rms_rel": rel_rms,
                       "note": "one step's output, random weights and inputs"}),
            );
        }
    }
    if vae && let Err(e) = bench_vae(&mut bench, &o) {
        bench.push("errors", json!(format!("vae: {e}")));
    }
    if pipeline && let Err(e) = bench_pipeline(&mut bench, &o, &tokenizers) {
        bench.push("errors", json!(format!("pipeline: {e}")));
    }
    bench.doc["finished_unix"] = json!(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    );
    bench.save();
    Ok(())
}
