//! Exports the tiny checkpoints and validates them with the peer tools: the `onnx`
//! checker (full check, shape inference), the FP8 Q/DQ conventions read back by the onnx
//! package, and ONNX Runtime on the CPU (graph optimizations off), against reference
//! outputs of the project's CPU backend at the same precision.
//!
//! Needs `SD_TEST_PYTHON` (a Python with scripts/ci/requirements-onnx.txt installed);
//! fails without it when `CI` is set, skips with a message otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;

use sd_checkpoint::{Checkpoint, component};
use sd_cpu::{ComputePrecision, CpuBackend};
use sd_fp8::Fp8Format;
use sd_model::clip::ClipTextModel;
use sd_model::mmdit::Mmdit;
use sd_model::t5::T5Encoder;
use sd_model::vae::VaeDecoder;
use sd_model::{
    ActivationQuant, Backend, HostTensor, LinearQuant, PrecisionPlan, WeightQuant, WeightSource,
};
use sd_onnx::{ExportOptions, ExportedModel, write_model};

/// FP32 export vs the FP32 CPU backend: max |ort - cpu| / max |cpu| per output.
const FP32_TOL: f64 = 1e-4;

/// FP8-simulated export vs the CPU backend with the same plan.
///
/// Both sides quantize at the same points with the same arithmetic (x / scale in f32,
/// round to nearest even, saturate; the weights are bit-identical FP8 codes), so away
/// from rounding boundaries they agree to FP32 noise (~1e-6, as the FP32 exports do).
/// But the value reaching each QuantizeLinear differs by that FP32 noise (other GEMM
/// summation orders, f32 vs f64 norm statistics, ORT's vs libm's exp/sin/cos), and an
/// element within that noise of the midpoint between two FP8 codes lands on the
/// neighbouring code on one side: a jump of one FP8 step, 2^-3 (E4M3) or 2^-2 (E5M2) of
/// that element, instead of 1e-6. One flip in a token's input moves that token's outputs
/// by about |w x| / 8 and spreads through attention. Measured with the inputs below
/// (latents 6x10, traced at 8x8): at most 3.1e-7 of the output range over the six
/// exports (no flip); with other inputs (the traced sizes) at most 1.6e-6, and once one
/// export flipped once: 1.1e-4, 0.03% of the elements above 1e-4. A flip in an adaLN modulation input is worse, since that one vector per sample
/// scales every token: an E5M2 flip there measured 4.5e-3 with 9% of the elements above
/// 1e-4, which is why the test plan keeps those inputs E4M3. The bound, 5e-3, covers even
/// such a flip, and stays 8x below the effect of quantization itself (FP8 vs FP32
/// reference: 4e-2..7e-2, asserted above 4x the bound in `transformer_job`), so a missing
/// or misplaced Q/DQ, or a wrong scale or axis, fails. Flips are rare events: at most 25%
/// of the elements may differ by more than 1e-4 of the range (a systematic error moves
/// nearly all of them).
const FP8_TOL: f64 = 5e-3;
const FP8_FRAC_OVER_1E4: f64 = 0.25;

/// FP16 exports vs the FP32 CPU backend (see `fp16_and_bf16_exports`).
const FP16_TOL: f64 = 3e-3;

/// The batch the tests run with; the graphs are traced with 2, so this checks the
/// dynamic batch axis. Every other dynamic axis is run at a size other than the traced
/// one too (latent size, text lengths).
const BATCH: usize = 3;

/// The latent size the VAE graphs are traced at, and the one they run at.
const VAE_TRACED: (usize, usize) = (4, 4);
const VAE_RUN: (usize, usize) = (3, 5);

/// CLIP token count at run time (the graphs are traced at 77).
const CLIP_RUN_LEN: usize = 13;

/// T5 token count at run time: longer than traced (16) and than the tiny T5's
/// `relative_attention_max_distance` (128), where the relative positions are clipped.
const T5_RUN_LEN: usize = 150;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn python() -> Option<PathBuf> {
    match std::env::var_os("SD_TEST_PYTHON") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => {
            if std::env::var_os("CI").is_some() {
                panic!(
                    "CI is set but SD_TEST_PYTHON is not: the ONNX validation needs a Python \
                     with scripts/ci/requirements-onnx.txt installed"
                );
            }
            eprintln!(
                "SKIPPED: SD_TEST_PYTHON is not set (python3 -m venv /tmp/onnx-venv && \
                 /tmp/onnx-venv/bin/pip install -r scripts/ci/requirements-onnx.txt; \
                 SD_TEST_PYTHON=/tmp/onnx-venv/bin/python cargo test -p sd-onnx)"
            );
            None
        }
    }
}

/// Deterministic pseudo-random values in [-amp, amp).
fn noise(n: usize, seed: u64, amp: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
        })
        .collect()
}

fn host(shape: &[usize], seed: u64, amp: f32) -> HostTensor {
    let n = shape.iter().product();
    HostTensor::new(shape.to_vec(), noise(n, seed, amp)).unwrap()
}

fn npy_header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_s = if shape.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_s}, }}");
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(h.len() as u16).to_le_bytes());
    out.extend_from_slice(h.as_bytes());
    out
}

fn write_f32(path: &Path, t: &HostTensor) {
    let mut b = npy_header("<f4", &t.shape);
    b.extend(t.data.iter().flat_map(|v| v.to_le_bytes()));
    std::fs::write(path, b).unwrap();
}

fn write_i64(path: &Path, shape: &[usize], v: &[u32]) {
    let mut b = npy_header("<i8", shape);
    b.extend(v.iter().flat_map(|&x| i64::from(x).to_le_bytes()));
    std::fs::write(path, b).unwrap();
}

/// One model to validate: written into `dir`, with inputs and expected outputs.
struct Job {
    model: String,
    inputs: Vec<(String, PathBuf)>,
    expected: Vec<(String, PathBuf)>,
    tol: f64,
    fp8: bool,
    /// Run ONNX Runtime (false: checker and conventions only).
    run: bool,
    /// Layers with FP8 weights and no input Q/DQ pair (the checker expects none).
    weight_only: Vec<String>,
}

impl Job {
    fn new(dir: &Path, m: &ExportedModel, tag: &str, tol: f64) -> Self {
        let sub = dir.join(tag);
        std::fs::create_dir_all(&sub).unwrap();
        write_model(m, &sub, usize::MAX).unwrap();
        Self {
            model: sub.join(&m.file).display().to_string(),
            inputs: vec![],
            expected: vec![],
            tol,
            fp8: !m.quantized.is_empty(),
            run: true,
            weight_only: m
                .quantized
                .iter()
                .filter(|q| q.input_format.is_none())
                .map(|q| q.name.clone())
                .collect(),
        }
    }
    fn dir(&self) -> PathBuf {
        Path::new(&self.model).parent().unwrap().to_path_buf()
    }
    fn input_f32(&mut self, name: &str, t: &HostTensor) {
        let p = self.dir().join(format!("in_{name}.npy"));
        write_f32(&p, t);
        self.inputs.push((name.into(), p));
    }
    fn input_ids(&mut self, name: &str, shape: &[usize], ids: &[u32]) {
        let p = self.dir().join(format!("in_{name}.npy"));
        write_i64(&p, shape, ids);
        self.inputs.push((name.into(), p));
    }
    fn expect(&mut self, name: &str, t: &HostTensor) {
        let p = self.dir().join(format!("ref_{name}.npy"));
        write_f32(&p, t);
        self.expected.push((name.into(), p));
    }
    fn json(&self) -> serde_json::Value {
        let map = |v: &[(String, PathBuf)]| -> serde_json::Map<String, serde_json::Value> {
            v.iter()
                .map(|(k, p)| (k.clone(), serde_json::json!(p.display().to_string())))
                .collect()
        };
        serde_json::json!({
            "model": self.model,
            "inputs": map(&self.inputs),
            "expected": map(&self.expected),
            "tolerance": self.tol,
            "run": self.run,
            "weight_only": self.weight_only,
        })
    }
}

/// Runs the Python checker over the jobs; returns its per-job JSON results.
fn run_checks(py: &Path, dir: &Path, jobs: &[Job]) -> Vec<serde_json::Value> {
    let results = run_script(py, dir, jobs);
    for (job, r) in jobs.iter().zip(&results) {
        assert_eq!(r["checker"], "ok", "{}: {r}", job.model);
        assert_eq!(
            r["conventions"],
            serde_json::json!([]),
            "{}: {r}",
            job.model
        );
        for (name, _) in job.expected.iter().filter(|_| job.run) {
            let o = &r["outputs"][name];
            let rel = o["rel_err"].as_f64().unwrap_or(f64::INFINITY);
            assert!(
                rel <= job.tol,
                "{} {name}: rel err {rel} > {}: {r}",
                job.model,
                job.tol
            );
            if job.fp8 {
                let frac = o["frac_over_1e-4"].as_f64().unwrap();
                assert!(frac <= FP8_FRAC_OVER_1E4, "{} {name}: {r}", job.model);
            }
        }
        assert_eq!(r["ok"], true, "{}: {r}", job.model);
    }
    results
}

/// Runs `tests/python/onnx_check.py` over the jobs; its per-job JSON results.
fn run_script(py: &Path, dir: &Path, jobs: &[Job]) -> Vec<serde_json::Value> {
    let spec = dir.join("jobs.json");
    let all: Vec<_> = jobs.iter().map(Job::json).collect();
    std::fs::write(&spec, serde_json::to_string_pretty(&all).unwrap()).unwrap();
    let out = Command::new(py)
        .arg(repo().join("tests/python/onnx_check.py"))
        .arg(&spec)
        .output()
        .expect("run SD_TEST_PYTHON");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    let results: Vec<serde_json::Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), jobs.len(), "onnx_check.py output: {stderr}");
    results
}

fn cpu() -> CpuBackend {
    CpuBackend::new(ComputePrecision::F32)
}

fn opts() -> ExportOptions {
    ExportOptions {
        latent_size: Some((8, 8)),
        text_len: Some(12),
        t5_len: 16,
        ..Default::default()
    }
}

/// A plan quantizing every transformer linear but the embedders and the output layers
/// (Model Optimizer's SD3 exclusions): weights E4M3 with per-channel scales (or one
/// per-tensor scale on every third layer), inputs E4M3 or, on every other layer and
/// when `e5m2`, E5M2.
fn test_plan(
    cfg: &sd_model::config::TransformerConfig,
    src: &dyn WeightSource,
    e5m2: bool,
) -> PrecisionPlan {
    let mut plan = PrecisionPlan::default();
    let names = Mmdit::<CpuBackend>::linear_layer_names(cfg);
    for (i, name) in names.iter().enumerate() {
        if !name.starts_with("transformer_blocks.") {
            continue;
        }
        let w = src.get(&format!("{name}.weight")).unwrap();
        let (out, inp) = (w.shape[0], w.numel() / w.shape[0]);
        let v = w.to_f32();
        let amax_row = |o: usize| {
            v[o * inp..(o + 1) * inp]
                .iter()
                .fold(0f32, |m, x| m.max(x.abs()))
                .max(1e-12)
        };
        // E5M2 weights (allowed by the plan, not by cuBLASLt pairs or TensorRT) on a few
        // layers when `e5m2`, to cover FLOAT8E5M2 initializers.
        let wformat = if e5m2 && i % 5 == 2 {
            Fp8Format::E5M2
        } else {
            Fp8Format::E4M3
        };
        let fmax = wformat.max_finite();
        let scales = if i % 3 == 0 {
            vec![(0..out).map(amax_row).fold(0f32, f32::max) / fmax]
        } else {
            (0..out).map(|o| amax_row(o) / fmax).collect()
        };
        // adaLN modulation inputs are one vector per sample feeding every token: keep them
        // E4M3 (see FP8_TOL).
        let modulation = name.contains(".norm1");
        let input = if e5m2 && i % 2 == 1 && !modulation {
            ActivationQuant {
                format: Fp8Format::E5M2,
                scale: 4.0 / 57344.0,
            }
        } else {
            ActivationQuant {
                format: Fp8Format::E4M3,
                scale: 4.0 / 448.0,
            }
        };
        let weight = WeightQuant {
            format: wformat,
            scales,
        };
        // Half the modulation layers weight-only (FP8 weights, unquantized input), as
        // calibration makes adaLN by default.
        let quant = if modulation && i % 2 == 0 {
            LinearQuant::Fp8WeightOnly { weight }
        } else {
            LinearQuant::Fp8 { weight, input }
        };
        plan.layers.insert(name.clone(), quant);
    }
    assert!(plan.fp8_weight_layer_count() > plan.fp8_layer_count());
    plan
}

fn transformer_job(
    dir: &Path,
    ckpt: &Checkpoint,
    plan: &PrecisionPlan,
    o: &ExportOptions,
    tag: &str,
    tol: f64,
) -> Job {
    let cfg = &ckpt.transformer;
    let src = ckpt.weights(component::TRANSFORMER).unwrap();
    let m = sd_onnx::trace_transformer(cfg, &src, plan, o).unwrap();
    assert_eq!(m.quantized.len(), plan.fp8_weight_layer_count(), "{tag}");
    // Weight-only layers dequantize their weights and quantize no input.
    let weight_only: Vec<_> = m
        .quantized
        .iter()
        .filter(|q| q.input_format.is_none())
        .collect();
    assert_eq!(
        weight_only.len(),
        plan.fp8_weight_layer_count() - plan.fp8_layer_count(),
        "{tag}"
    );
    // The timestep is a graph input, not a host-computed constant.
    assert_eq!(m.host_constants, vec![], "{tag}");
    // The latent size is dynamic: run at a non-square size other than the traced one,
    // with odd patch counts (the positional crop rounds its offsets down).
    let (th, tw) = o.latent_size.unwrap();
    let (h, w) = (th - 2, tw + 2);
    // The text length is a dynamic axis: run with fewer tokens than were traced.
    let s = o.text_len.unwrap() - 5;
    let lat = host(&[BATCH, cfg.in_channels, h, w], 1, 1.5);
    let ctx = host(&[BATCH, s, cfg.joint_attention_dim], 2, 1.0);
    let pooled = host(&[BATCH, cfg.pooled_projection_dim], 3, 1.0);
    let ts = HostTensor::new(vec![BATCH], vec![999.0, 421.25, 3.5]).unwrap();
    let b = cpu();
    let model = Mmdit::load(&b, cfg.clone(), &src, plan).unwrap();
    let out = model
        .forward(
            &b,
            &b.upload(&lat).unwrap(),
            &b.upload(&ctx).unwrap(),
            &b.upload(&pooled).unwrap(),
            &ts.data,
        )
        .unwrap();
    let out = b.download(&out).unwrap();
    if plan.fp8_layer_count() > 0 && tol <= FP8_TOL {
        // The test must be able to see quantization: the FP8 reference has to differ from
        // the unquantized one by much more than the tolerance.
        let full = Mmdit::load(&b, cfg.clone(), &src, &PrecisionPlan::default()).unwrap();
        let f = full
            .forward(
                &b,
                &b.upload(&lat).unwrap(),
                &b.upload(&ctx).unwrap(),
                &b.upload(&pooled).unwrap(),
                &ts.data,
            )
            .unwrap();
        let f = b.download(&f).unwrap();
        let range = f.data.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        let diff = out
            .data
            .iter()
            .zip(&f.data)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs())) as f64;
        eprintln!("{tag}: FP8 vs FP32 CPU reference: rel {:.3e}", diff / range);
        assert!(
            diff / range > 4.0 * tol,
            "{tag}: FP8 barely changes the output"
        );
    }
    let mut job = Job::new(dir, &m, tag, tol);
    job.input_f32("hidden_states", &lat);
    job.input_f32("encoder_hidden_states", &ctx);
    job.input_f32("pooled_projections", &pooled);
    job.input_f32("timestep", &ts);
    job.expect("sample", &out);
    job
}

fn ids(n: usize, seq: usize, vocab: usize, eos: Option<u32>, seed: u64) -> Vec<u32> {
    let r = noise(n * seq, seed, 1.0);
    let mut v: Vec<u32> = r
        .iter()
        .map(|x| ((x + 1.0) * 0.5 * (vocab as f32 - 3.0)) as u32 % (vocab as u32 - 2))
        .collect();
    if let Some(e) = eos {
        // End-of-text at a different position in each row.
        for row in 0..n {
            v[row * seq + (3 + 4 * row).min(seq - 1)] = e;
        }
    }
    v
}

fn text_jobs(dir: &Path, ckpt: &Checkpoint, tag: &str, o: &ExportOptions) -> Vec<Job> {
    let b = cpu();
    let mut jobs = vec![];
    for (file, comp, cfg) in [
        ("clip_l.onnx", component::CLIP_L, &ckpt.clip_l),
        ("clip_g.onnx", component::CLIP_G, &ckpt.clip_g),
    ] {
        let src = ckpt.weights(comp).unwrap();
        let m = sd_onnx::trace_clip(file, cfg, &src, o).unwrap();
        assert_eq!(
            m.host_constants,
            vec![],
            "{file}: ids must stay graph inputs"
        );
        // Traced at max_position_embeddings; the token count is dynamic.
        assert_eq!(m.inputs[0].shape_string(), "[batch, seq_len]");
        let seq = CLIP_RUN_LEN;
        let eos = if cfg.eos_token_id == 2 {
            // Legacy configs pool at the argmax id: put the largest id somewhere.
            Some(cfg.vocab_size as u32 - 1)
        } else {
            Some(cfg.eos_token_id as u32)
        };
        let tokens = ids(BATCH, seq, cfg.vocab_size, eos, 7);
        let model = ClipTextModel::load(&b, cfg.clone(), &src, &PrecisionPlan::default()).unwrap();
        let r = model.forward(&b, &tokens, BATCH).unwrap();
        let mut job = Job::new(dir, &m, &format!("{tag}_{file}"), FP32_TOL);
        job.input_ids("input_ids", &[BATCH, seq], &tokens);
        job.expect(
            "penultimate_hidden_state",
            &b.download(&r.penultimate).unwrap(),
        );
        job.expect("text_embeds", &b.download(&r.pooled).unwrap());
        jobs.push(job);
    }
    if let Some(cfg) = &ckpt.t5 {
        let src = ckpt.weights(component::T5).unwrap();
        let m = sd_onnx::trace_t5(cfg, &src, &sd_model::PrecisionPlan::default(), o).unwrap();
        // The relative-position bias is built in the graph for the input's length.
        assert_eq!(m.host_constants, vec![]);
        let tokens = ids(BATCH, T5_RUN_LEN, cfg.vocab_size, None, 9);
        let model = T5Encoder::load(&b, cfg.clone(), &src, &PrecisionPlan::default()).unwrap();
        let r = model.forward(&b, &tokens, BATCH).unwrap();
        let mut job = Job::new(dir, &m, &format!("{tag}_t5"), FP32_TOL);
        job.input_ids("input_ids", &[BATCH, T5_RUN_LEN], &tokens);
        job.expect("last_hidden_state", &b.download(&r).unwrap());
        jobs.push(job);
    }
    jobs
}

/// T5 with every linear layer in FP8 (E4M3, per-channel weight scales), against the
/// CPU backend's FP8 simulation of the same plan.
fn t5_fp8_job(dir: &Path, ckpt: &Checkpoint, tag: &str) -> Job {
    let b = cpu();
    let o = opts();
    let cfg = ckpt.t5.as_ref().expect("a model with T5");
    let src = ckpt.weights(component::T5).unwrap();
    let mut plan = PrecisionPlan::default();
    for name in T5Encoder::<CpuBackend>::linear_layer_names(cfg) {
        let w = src.get(&format!("{name}.weight")).unwrap();
        let inp = w.shape[1];
        let scales = w
            .to_f32()
            .chunks(inp)
            .map(|r| r.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12) / 448.0)
            .collect();
        plan.layers.insert(
            name,
            LinearQuant::Fp8 {
                weight: WeightQuant {
                    format: Fp8Format::E4M3,
                    scales,
                },
                input: ActivationQuant {
                    format: Fp8Format::E4M3,
                    scale: 4.0 / 448.0,
                },
            },
        );
    }
    let m = sd_onnx::trace_t5(cfg, &src, &plan, &o).unwrap();
    assert!(!m.quantized.is_empty(), "the T5 graph has no FP8 layers");
    // Shorter than traced (the FP32 jobs run longer).
    let len = o.t5_len - 5;
    let tokens = ids(BATCH, len, cfg.vocab_size, None, 13);
    let model = T5Encoder::load(&b, cfg.clone(), &src, &plan).unwrap();
    let r = model.forward(&b, &tokens, BATCH).unwrap();
    let mut job = Job::new(dir, &m, tag, FP8_TOL);
    job.input_ids("input_ids", &[BATCH, len], &tokens);
    job.expect("last_hidden_state", &b.download(&r).unwrap());
    job
}

fn vae_job(dir: &Path, ckpt: &Checkpoint, tag: &str, o: &ExportOptions) -> Job {
    let b = cpu();
    let src = ckpt.weights(component::VAE).unwrap();
    let m = sd_onnx::trace_vae(&ckpt.vae, &src, VAE_TRACED, o).unwrap();
    assert_eq!(m.outputs[0].shape_string(), "[batch, 3, 8*height, 8*width]");
    let (h, w) = VAE_RUN;
    let z = host(&[BATCH, ckpt.vae.latent_channels, h, w], 11, 2.0);
    let model = VaeDecoder::load(&b, ckpt.vae.clone(), &src, &PrecisionPlan::default()).unwrap();
    let zu = model.unscale_latents(&b, &b.upload(&z).unwrap()).unwrap();
    let img = model.decode(&b, &zu).unwrap();
    let mut job = Job::new(dir, &m, &format!("{tag}_vae"), FP32_TOL);
    job.input_f32("latent", &z);
    job.expect("image", &b.download(&img).unwrap());
    job
}

const MODELS: [&str; 3] = ["tiny-sd3", "tiny-sd35m", "tiny-sd35l-no-t5"];

#[test]
fn fp32_exports_match_cpu_backend() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let o = opts();
    let mut jobs = vec![];
    for name in MODELS {
        let ckpt = Checkpoint::open(repo().join("models").join(name)).unwrap();
        jobs.push(transformer_job(
            dir.path(),
            &ckpt,
            &PrecisionPlan::default(),
            &o,
            &format!("{name}_transformer_fp32"),
            FP32_TOL,
        ));
        jobs.extend(text_jobs(dir.path(), &ckpt, name, &o));
        jobs.push(vae_job(dir.path(), &ckpt, name, &o));
    }
    run_checks(&py, dir.path(), &jobs);
}

#[test]
fn fp8_exports_match_cpu_fp8_simulation() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut jobs = vec![];
    for name in MODELS {
        let ckpt = Checkpoint::open(repo().join("models").join(name)).unwrap();
        let src = ckpt.weights(component::TRANSFORMER).unwrap();
        // E4M3 + E5M2 activations, one Q/DQ pair per layer.
        let plan = test_plan(&ckpt.transformer, &src, true);
        jobs.push(transformer_job(
            dir.path(),
            &ckpt,
            &plan,
            &opts(),
            &format!("{name}_transformer_fp8"),
            FP8_TOL,
        ));
        // E4M3 only, TensorRT placement (shared quantizers).
        let plan = test_plan(&ckpt.transformer, &src, false);
        let o = ExportOptions {
            for_tensorrt: true,
            ..opts()
        };
        jobs.push(transformer_job(
            dir.path(),
            &ckpt,
            &plan,
            &o,
            &format!("{name}_transformer_fp8_trt"),
            FP8_TOL,
        ));
    }
    // T5 calibrated for FP8 (`calibrate --quantize-t5`): Q/DQ in t5.onnx too.
    for name in ["tiny-sd3", "tiny-sd35m"] {
        let ckpt = Checkpoint::open(repo().join("models").join(name)).unwrap();
        jobs.push(t5_fp8_job(dir.path(), &ckpt, &format!("{name}_t5_fp8")));
    }
    let results = run_checks(&py, dir.path(), &jobs);
    for r in &results {
        let q = &r["qdq"];
        assert!(q["QuantizeLinear"].as_u64().unwrap() > 0, "{r}");
        assert!(q["fp8_weights"].as_u64().unwrap() > 0, "{r}");
        assert!(q["per_channel"].as_u64().unwrap() > 0, "{r}");
        // Every FP8 weight sits in a quantized GEMM with its activation Q/DQ pair, or
        // in a weight-only layer's GEMM without one.
        let count = |k: &str| q[k].as_u64().unwrap_or(0);
        assert_eq!(
            count("quantized_matmuls") + count("weight_only_matmuls"),
            count("fp8_weights"),
            "{r}"
        );
    }
}

/// FP16 exports run in ONNX Runtime against the FP32 CPU reference (the error is
/// float16 rounding of every activation and weight: 11-bit significands, ~2.4e-4 per
/// rounding; measured up to 5.7e-4 of the range). The FP16 + FP8 transformer is a smoke
/// test only (runs, finite, within 0.1 of the FP8-simulated FP32 reference): with FP16
/// noise ~1e-3 at every QuantizeLinear input and FP16-rounded scales, about 1% of the
/// FP8 codes differ from the FP32 simulation's (measured 3.3e-2 of the range); the FP8
/// numerics are validated in FP32 above. BF16
/// exports pass the checker and the conventions (ONNX Runtime's CPU provider has no
/// bfloat16 kernels for most of these operators).
#[test]
fn fp16_and_bf16_exports() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut jobs = vec![];
    for (compute, run) in [
        (sd_onnx::ElemType::F16, true),
        (sd_onnx::ElemType::Bf16, false),
    ] {
        let o = ExportOptions { compute, ..opts() };
        let tag = format!("tiny-sd35m_{}", compute.name());
        let ckpt = Checkpoint::open(repo().join("models/tiny-sd35m")).unwrap();
        let src = ckpt.weights(component::TRANSFORMER).unwrap();
        let plan = test_plan(&ckpt.transformer, &src, false);
        let mut js = vec![transformer_job(
            dir.path(),
            &ckpt,
            &PrecisionPlan::default(),
            &o,
            &format!("{tag}_transformer"),
            FP16_TOL,
        )];
        let mut fp8 = transformer_job(
            dir.path(),
            &ckpt,
            &plan,
            &o,
            &format!("{tag}_transformer_fp8"),
            FP16_TOL,
        );
        fp8.fp8 = false;
        let fp8_tol = 0.1;
        js.push(fp8);
        js.extend(text_jobs(dir.path(), &ckpt, &tag, &o));
        js.push(vae_job(dir.path(), &ckpt, &tag, &o));
        for (i, j) in js.iter_mut().enumerate() {
            j.run = run;
            j.tol = if i == 1 { fp8_tol } else { FP16_TOL };
        }
        jobs.extend(js);
    }
    run_checks(&py, dir.path(), &jobs);
}

/// Latent sizes the transformer cannot take (not a multiple of the patch size; more
/// patches than the positional table has) make ONNX Runtime fail rather than compute
/// something with a wrong positional crop.
#[test]
fn bad_latent_sizes_fail_in_onnx_runtime() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint::open(repo().join("models/tiny-sd3")).unwrap();
    let cfg = &ckpt.transformer;
    let src = ckpt.weights(component::TRANSFORMER).unwrap();
    let m = sd_onnx::trace_transformer(cfg, &src, &PrecisionPlan::default(), &opts()).unwrap();
    let too_big = cfg.patch_size * (cfg.pos_embed_max_size.unwrap() + 1);
    let mut jobs = vec![];
    for (i, (h, w)) in [(7, 8), (too_big, too_big)].into_iter().enumerate() {
        let mut job = Job::new(dir.path(), &m, &format!("bad_{i}"), FP32_TOL);
        job.input_f32("hidden_states", &host(&[1, cfg.in_channels, h, w], 1, 1.0));
        job.input_f32(
            "encoder_hidden_states",
            &host(&[1, 4, cfg.joint_attention_dim], 2, 1.0),
        );
        job.input_f32(
            "pooled_projections",
            &host(&[1, cfg.pooled_projection_dim], 3, 1.0),
        );
        job.input_f32("timestep", &HostTensor::new(vec![1], vec![500.0]).unwrap());
        jobs.push(job);
    }
    for r in run_script(&py, dir.path(), &jobs) {
        assert_eq!(r["ok"], false, "{r}");
        let e = r["exception"].as_str().unwrap_or_default();
        assert!(e.contains("ONNXRuntimeError"), "{r}");
    }
}

#[test]
fn tensorrt_export_refuses_e5m2() {
    let ckpt = Checkpoint::open(repo().join("models/tiny-sd3")).unwrap();
    let src = ckpt.weights(component::TRANSFORMER).unwrap();
    let plan = test_plan(&ckpt.transformer, &src, true);
    let o = ExportOptions {
        for_tensorrt: true,
        ..opts()
    };
    let e = sd_onnx::trace_transformer(&ckpt.transformer, &src, &plan, &o).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("E5M2") && msg.contains("TensorRT"), "{msg}");
}

#[test]
fn external_data_round_trips() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint::open(repo().join("models/tiny-sd3")).unwrap();
    let mut jobs = text_jobs(dir.path(), &ckpt, "ext", &opts());
    jobs.truncate(1);
    // Rewrite the CLIP-L model with every initializer of 1 KiB or more outside.
    let src = ckpt.weights(component::CLIP_L).unwrap();
    let m = sd_onnx::trace_clip("clip_l.onnx", &ckpt.clip_l, &src, &opts()).unwrap();
    let sub = jobs[0].dir();
    write_model(&m, &sub, 0).unwrap();
    let data = sub.join("clip_l.onnx.data");
    assert!(data.metadata().unwrap().len() > 0);
    assert!(
        std::fs::metadata(&jobs[0].model).unwrap().len() < data.metadata().unwrap().len(),
        "weights stayed inside the .onnx"
    );
    run_checks(&py, dir.path(), &jobs);
}

#[test]
fn export_checkpoint_is_atomic_and_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts();
    // Missing model: a clear error and nothing written.
    let out = dir.path().join("onnx");
    let e = sd_onnx::export_checkpoint(
        &dir.path().join("nope"),
        &PrecisionPlan::default(),
        &o,
        &out,
        false,
    )
    .unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());

    // E5M2 under TensorRT: error, no output, no temporary directory left.
    let model = repo().join("models/tiny-sd3");
    let ckpt = Checkpoint::open(&model).unwrap();
    let src = ckpt.weights(component::TRANSFORMER).unwrap();
    let plan = test_plan(&ckpt.transformer, &src, true);
    let trt = ExportOptions {
        for_tensorrt: true,
        ..opts()
    };
    let e = sd_onnx::export_checkpoint(&model, &plan, &trt, &out, false).unwrap_err();
    assert!(e.to_string().contains("E5M2"), "{e}");
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());

    // A good export writes every model and the manifest.
    let models = sd_onnx::export_checkpoint(&model, &plan, &o, &out, false).unwrap();
    let files: Vec<String> = models.iter().map(|m| m.file.clone()).collect();
    assert_eq!(
        files,
        [
            "transformer.onnx",
            "clip_l.onnx",
            "clip_g.onnx",
            "t5.onnx",
            "vae_decoder.onnx"
        ]
    );
    for f in &files {
        assert!(out.join(f).is_file(), "{f}");
    }
    let man: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("onnx_export.json")).unwrap())
            .unwrap();
    let listed = man["models"][0]["fp8_layers"].as_array().unwrap();
    assert_eq!(listed.len(), plan.fp8_weight_layer_count());
    assert_eq!(
        listed.iter().filter(|l| l["input"].is_null()).count(),
        plan.fp8_weight_layer_count() - plan.fp8_layer_count()
    );
    // An existing output is refused without force, replaced with it.
    let e = sd_onnx::export_checkpoint(&model, &plan, &o, &out, false).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    sd_onnx::export_checkpoint(&model, &PrecisionPlan::default(), &o, &out, true).unwrap();
    let entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(entries.len(), 1, "only the export is left");

    // An unwritable parent directory.
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let mut perm = std::fs::metadata(&ro).unwrap().permissions();
    perm.set_readonly(true);
    std::fs::set_permissions(&ro, perm.clone()).unwrap();
    let r = sd_onnx::export_checkpoint(&model, &plan, &o, &ro.join("onnx"), false);
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    std::fs::set_permissions(&ro, perm).unwrap();
    if let Err(e) = r {
        assert!(e.to_string().contains("cannot create"), "{e}");
        assert!(std::fs::read_dir(&ro).unwrap().next().is_none());
    } else {
        // Running as root: permissions do not apply.
        eprintln!("note: running as root, the read-only directory was writable");
    }
}

/// The tensor-input model entry points the exporter traces (`Mmdit::forward_t`,
/// `ClipTextModel::forward_ids`, `T5Encoder::forward_ids`) run through the Backend
/// methods' default implementations on ordinary backends and give bit-identical results
/// to the host-input entry points.
#[test]
fn tensor_input_entry_points_match_host_paths() {
    let b = cpu();
    let ckpt = Checkpoint::open(repo().join("models/tiny-sd3")).unwrap();
    let cfg = &ckpt.transformer;
    let src = ckpt.weights(component::TRANSFORMER).unwrap();
    let model = Mmdit::load(&b, cfg.clone(), &src, &PrecisionPlan::default()).unwrap();
    let lat = b
        .upload(&host(&[2, cfg.in_channels, 8, 8], 1, 1.0))
        .unwrap();
    let ctx = b
        .upload(&host(&[2, 5, cfg.joint_attention_dim], 2, 1.0))
        .unwrap();
    let pooled = b
        .upload(&host(&[2, cfg.pooled_projection_dim], 3, 1.0))
        .unwrap();
    let ts = [999.0, 12.5];
    let a = model.forward(&b, &lat, &ctx, &pooled, &ts).unwrap();
    let t = b
        .upload(&HostTensor::new(vec![2], ts.to_vec()).unwrap())
        .unwrap();
    let c = model.forward_t(&b, &lat, &ctx, &pooled, &t).unwrap();
    assert_eq!(b.download(&a).unwrap(), b.download(&c).unwrap());

    for (comp, cfg) in [
        (component::CLIP_L, &ckpt.clip_l),
        (component::CLIP_G, &ckpt.clip_g),
    ] {
        let src = ckpt.weights(comp).unwrap();
        let m = ClipTextModel::load(&b, cfg.clone(), &src, &PrecisionPlan::default()).unwrap();
        let tokens = ids(2, 9, cfg.vocab_size, Some(cfg.vocab_size as u32 - 1), 5);
        let r1 = m.forward(&b, &tokens, 2).unwrap();
        let t = HostTensor::new(vec![2, 9], tokens.iter().map(|&i| i as f32).collect()).unwrap();
        let r2 = m.forward_ids(&b, &b.upload(&t).unwrap()).unwrap();
        assert_eq!(
            b.download(&r1.pooled).unwrap(),
            b.download(&r2.pooled).unwrap()
        );
        assert_eq!(
            b.download(&r1.penultimate).unwrap(),
            b.download(&r2.penultimate).unwrap()
        );
    }
    let t5 = ckpt.t5.as_ref().unwrap();
    let src = ckpt.weights(component::T5).unwrap();
    let m = T5Encoder::load(&b, t5.clone(), &src, &PrecisionPlan::default()).unwrap();
    let tokens = ids(2, 7, t5.vocab_size, None, 6);
    let r1 = m.forward(&b, &tokens, 2).unwrap();
    let t = HostTensor::new(vec![2, 7], tokens.iter().map(|&i| i as f32).collect()).unwrap();
    let r2 = m.forward_ids(&b, &b.upload(&t).unwrap()).unwrap();
    assert_eq!(b.download(&r1).unwrap(), b.download(&r2).unwrap());
}

#[test]
fn token_pick_rules() {
    use sd_model::TokenPick;
    assert_eq!(TokenPick::ArgMax.index(&[5, 9, 3, 9]), 1);
    assert_eq!(TokenPick::FirstEqual(3).index(&[5, 9, 3, 3]), 2);
    assert_eq!(TokenPick::FirstEqual(7).index(&[5, 9]), 0);
}
