//! End-to-end: compile tiny models into cpu bundles, run them, and check every refusal.

use std::path::{Path, PathBuf};

use sd_checkpoint::Checkpoint;
use sd_checkpoint::fingerprint::ModelFingerprint;
use sd_cpu::{ComputePrecision, CpuBackend};
use sd_engine::{
    Bundle, CalibrationInfo, CompileOptions, Compute, EngineError, Precision, Target, compile,
    load_cpu_pipeline,
};
use sd_fp8::Fp8Format;
use sd_model::{ActivationQuant, LinearQuant, PrecisionPlan, WeightQuant, WeightSource};
use sd_pipeline::{GenerateRequest, Generated, Sd3Pipeline};

fn model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models")
        .join(name)
}

/// E4M3 per-channel weight scales from each row's amax, a fixed activation scale, for
/// every 2-D linear weight in the transformer blocks.
fn test_plan(ckpt: &Checkpoint) -> PrecisionPlan {
    let w = ckpt.weights("transformer").unwrap();
    let mut plan = PrecisionPlan::full_precision();
    for name in w.names() {
        let Some(layer) = name.strip_suffix(".weight") else {
            continue;
        };
        if !layer.starts_with("transformer_blocks.") {
            continue;
        }
        let t = w.get(&name).unwrap();
        if t.shape.len() != 2 {
            continue;
        }
        let inp = t.shape[1];
        let scales = t
            .to_f32()
            .chunks(inp)
            .map(|r| {
                let amax = r.iter().fold(0f32, |m, v| m.max(v.abs()));
                if amax > 0.0 { amax / 448.0 } else { 1.0 }
            })
            .collect();
        let weight = WeightQuant {
            format: Fp8Format::E4M3,
            scales,
        };
        // adaLN modulation as calibration makes it by default: FP8 weights only.
        let quant = if layer.ends_with(".norm1.linear") || layer.ends_with(".norm1_context.linear")
        {
            LinearQuant::Fp8WeightOnly { weight }
        } else {
            LinearQuant::Fp8 {
                weight,
                input: ActivationQuant {
                    format: Fp8Format::E4M3,
                    scale: 0.02,
                },
            }
        };
        plan.layers.insert(layer.to_string(), quant);
    }
    assert!(
        plan.fp8_layer_count() > 4,
        "the test plan should quantize layers"
    );
    assert!(
        plan.fp8_weight_layer_count() > plan.fp8_layer_count(),
        "the test plan should have weight-only layers"
    );
    plan
}

fn fp8_options(plan: PrecisionPlan, compute: Compute) -> CompileOptions {
    let mut o = CompileOptions::new(Target::Cpu, Precision::Fp8);
    o.plan = plan;
    o.compute = compute;
    o.calibration = Some(CalibrationInfo {
        hash: "test-plan".into(),
        source: None,
    });
    o
}

fn request() -> GenerateRequest {
    GenerateRequest {
        prompt: "a red cube on a table".into(),
        negative_prompt: "blurry".into(),
        width: 64,
        height: 64,
        steps: 2,
        guidance_scale: 4.0,
        seed: 7,
        max_sequence_length: 16,
        ..Default::default()
    }
}

fn run<B: sd_model::Backend>(p: &Sd3Pipeline<B>) -> Generated {
    p.generate(request(), &mut |_, _| {}).unwrap()
}

fn assert_identical(a: &Generated, b: &Generated) {
    assert_eq!(a.latents.shape, b.latents.shape);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert!(
        bits(&a.latents.data) == bits(&b.latents.data),
        "latents differ"
    );
    assert!(a.image.rgb == b.image.rgb, "images differ");
    assert!(
        bits(&a.image.float) == bits(&b.image.float),
        "float images differ"
    );
}

fn compile_to(model_name: &str, opts: &CompileOptions, out: &Path) -> Checkpoint {
    let ckpt = Checkpoint::open(model(model_name)).unwrap();
    let fp = ModelFingerprint::compute(&ckpt).unwrap();
    compile(&ckpt, &fp, opts, out).unwrap();
    ckpt
}

#[test]
fn fp8_bundle_matches_checkpoint_pipeline_bit_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint::open(model("tiny-sd3")).unwrap();
    let plan = test_plan(&ckpt);
    for (compute, precision) in [
        (Compute::Bf16, ComputePrecision::Bf16),
        (Compute::Fp32, ComputePrecision::F32),
    ] {
        let out = tmp.path().join(format!("engine-{compute}"));
        compile_to("tiny-sd3", &fp8_options(plan.clone(), compute), &out);
        let bundle = Bundle::open(&out).unwrap();
        assert_eq!(bundle.plan().unwrap(), plan, "plan round-trips exactly");
        assert_eq!(bundle.manifest.fp8_layer_count(), plan.fp8_layer_count());
        // FP8 codes are stored as bytes: the transformer payload is smaller.
        let tr = bundle.manifest.component("transformer").unwrap();
        assert!(tr.fp8_bytes > 0);
        let from_bundle = run(&load_cpu_pipeline(&out).unwrap());
        let reference = run(&Sd3Pipeline::load(&ckpt, CpuBackend::new(precision), &plan).unwrap());
        assert_identical(&from_bundle, &reference);
        // ... and FP8 made a difference (the test would be vacuous otherwise).
        let dense = run(&Sd3Pipeline::load(
            &ckpt,
            CpuBackend::new(precision),
            &PrecisionPlan::full_precision(),
        )
        .unwrap());
        assert!(dense.latents.data != from_bundle.latents.data);
    }
}

#[test]
fn fp8_codes_are_stored_as_bytes_with_scales() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint::open(model("tiny-sd3")).unwrap();
    let plan = test_plan(&ckpt);
    let out = tmp.path().join("e");
    compile_to("tiny-sd3", &fp8_options(plan.clone(), Compute::Bf16), &out);
    let bundle = Bundle::open(&out).unwrap();
    let w = bundle.weights("transformer").unwrap();
    let orig = ckpt.weights("transformer").unwrap();
    // One FP8 GEMM layer and one weight-only layer.
    let fp8 = plan.layers.iter().find(|(_, q)| q.is_fp8()).unwrap();
    let weight_only = plan
        .layers
        .iter()
        .find(|(_, q)| matches!(q, LinearQuant::Fp8WeightOnly { .. }))
        .unwrap();
    for (layer, q) in [fp8, weight_only] {
        let f = w.fp8(layer).unwrap();
        assert_eq!(f.quant, q);
        let ow = orig.get(&format!("{layer}.weight")).unwrap();
        assert_eq!(f.shape, ow.shape);
        assert_eq!(f.codes.len(), ow.numel());
        // The weight handed to backends is code * scale, f32.
        let deq = w.get(&format!("{layer}.weight")).unwrap();
        assert_eq!(deq.dtype, sd_model::StorageDType::F32);
        let weight = q.weight_quant().unwrap();
        let inp = ow.shape[1];
        let v = deq.to_f32();
        for (i, &c) in f.codes.iter().enumerate().take(4 * inp) {
            assert_eq!(
                v[i].to_bits(),
                sd_fp8::dequantize(Fp8Format::E4M3, c, weight.scales[i / inp]).to_bits()
            );
        }
    }
    // A weight-only layer has no input scale; the manifest says what it is.
    let names = w.names();
    assert!(!names.contains(&format!("{}.input_scale", weight_only.0)));
    assert_eq!(bundle.manifest.fp8_layer_count(), plan.fp8_layer_count());
    assert_eq!(
        bundle.manifest.fp8_weight_only_layer_count(),
        plan.fp8_weight_layer_count() - plan.fp8_layer_count()
    );
    // The plan read back from the bundle is the plan compiled.
    assert_eq!(bundle.plan().unwrap(), plan);
    // Scales are not model parameters.
    assert!(!w.names().iter().any(|n| n.ends_with("_scale")));
}

#[test]
fn bf16_bundles_run_with_and_without_t5() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["tiny-sd35m", "tiny-sd35l-no-t5"] {
        let out = tmp.path().join(name);
        let ckpt = compile_to(
            name,
            &CompileOptions::new(Target::Cpu, Precision::Bf16),
            &out,
        );
        let bundle = Bundle::open(&out).unwrap();
        assert!(bundle.manifest.calibration.is_none());
        assert_eq!(bundle.manifest.fp8_layer_count(), 0);
        assert_eq!(
            bundle.manifest.configs.contains_key("text_encoder_3"),
            ckpt.t5.is_some()
        );
        let got = run(&load_cpu_pipeline(&out).unwrap());
        let reference = run(&Sd3Pipeline::load(
            &ckpt,
            CpuBackend::new(ComputePrecision::Bf16),
            &PrecisionPlan::full_precision(),
        )
        .unwrap());
        assert_identical(&got, &reference);
    }
}

fn bf16_bundle(tmp: &Path) -> PathBuf {
    let out = tmp.join("engine");
    compile_to(
        "tiny-sd3",
        &CompileOptions::new(Target::Cpu, Precision::Bf16),
        &out,
    );
    out
}

#[test]
fn tampered_truncated_missing_and_versioned_bundles_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = bf16_bundle(tmp.path());
    let vae = out.join("weights/vae.safetensors");
    let original = std::fs::read(&vae).unwrap();

    // Tampered: one byte flipped, same size.
    let mut bad = original.clone();
    let n = bad.len();
    bad[n - 3] ^= 0x40;
    std::fs::write(&vae, &bad).unwrap();
    let e = load_cpu_pipeline(&out).err().unwrap();
    assert!(matches!(e, EngineError::Checksum { .. }), "{e}");
    assert!(e.to_string().contains("weights/vae.safetensors"), "{e}");
    assert!(e.to_string().contains("rebuild"), "{e}");

    // Truncated.
    std::fs::write(&vae, &original[..n / 2]).unwrap();
    let e = load_cpu_pipeline(&out).err().unwrap();
    assert!(matches!(e, EngineError::Truncated { .. }), "{e}");
    assert!(e.to_string().contains("truncated"), "{e}");

    // Missing payload.
    std::fs::remove_file(&vae).unwrap();
    let e = load_cpu_pipeline(&out).err().unwrap();
    assert!(matches!(e, EngineError::MissingFile { .. }), "{e}");
    std::fs::write(&vae, &original).unwrap();
    load_cpu_pipeline(&out).unwrap();

    // Version 1 (before weight-only layers) still reads: a bundle without such
    // layers is the same in both versions.
    let mpath = out.join("manifest.json");
    let manifest = std::fs::read_to_string(&mpath).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    v["format_version"] = serde_json::json!(1);
    std::fs::write(&mpath, serde_json::to_string(&v).unwrap()).unwrap();
    load_cpu_pipeline(&out).unwrap();

    // Another format version.
    v["format_version"] = serde_json::json!(999);
    std::fs::write(&mpath, serde_json::to_string(&v).unwrap()).unwrap();
    let e = load_cpu_pipeline(&out).err().unwrap();
    assert!(matches!(e, EngineError::Version { found: 999, .. }), "{e}");
    assert!(e.to_string().contains("Rebuild"), "{e}");
    assert!(e.to_string().contains("versions 1 to 2"), "{e}");

    // No manifest.
    std::fs::remove_file(&mpath).unwrap();
    let e = load_cpu_pipeline(&out).err().unwrap();
    assert!(matches!(e, EngineError::NotABundle { .. }), "{e}");
    let e = load_cpu_pipeline(tmp.path().join("nope")).err().unwrap();
    assert!(matches!(e, EngineError::NotABundle { .. }), "{e}");
}

#[test]
fn another_model_and_another_target_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = bf16_bundle(tmp.path());
    let bundle = Bundle::open(&out).unwrap();
    let same = ModelFingerprint::compute(&Checkpoint::open(model("tiny-sd3")).unwrap()).unwrap();
    bundle.check_model(&same, &model("tiny-sd3")).unwrap();
    let other = ModelFingerprint::compute(&Checkpoint::open(model("tiny-sd35m")).unwrap()).unwrap();
    let e = bundle
        .check_model(&other, &model("tiny-sd35m"))
        .err()
        .unwrap();
    assert!(matches!(e, EngineError::ModelMismatch { .. }), "{e}");
    assert!(e.to_string().contains("Rebuild it from this model"), "{e}");
    let e = bundle.check_target(Target::Cuda).err().unwrap();
    assert!(matches!(e, EngineError::TargetMismatch { .. }), "{e}");
}

#[test]
fn bad_compile_requests_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint::open(model("tiny-sd3")).unwrap();
    let fp = ModelFingerprint::compute(&ckpt).unwrap();
    let out = tmp.path().join("engine");

    // FP8 without a calibration cache.
    let mut o = CompileOptions::new(Target::Cpu, Precision::Fp8);
    o.plan = test_plan(&ckpt);
    let e = compile(&ckpt, &fp, &o, &out).err().unwrap();
    assert!(matches!(e, EngineError::NoCalibration), "{e}");
    assert!(e.to_string().contains("--precision bf16"), "{e}");

    // A plan naming layers the model lacks (a cache for another model).
    let mut plan = test_plan(&ckpt);
    let q = plan.layers.values().next().unwrap().clone();
    plan.layers
        .insert("transformer_blocks.99.attn.to_q".into(), q);
    let e = compile(&ckpt, &fp, &fp8_options(plan, Compute::Bf16), &out)
        .err()
        .unwrap();
    assert!(matches!(e, EngineError::PlanMismatch(_)), "{e}");

    // cuda on a machine without GPU / executor.
    let e = compile(
        &ckpt,
        &fp,
        &CompileOptions::new(Target::Cuda, Precision::Bf16),
        &out,
    )
    .err()
    .unwrap();
    assert!(matches!(e, EngineError::CudaUnavailable(_)), "{e}");
    assert!(e.to_string().contains("--target cpu"), "{e}");
    assert!(!out.exists());
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[test]
fn compile_is_atomic_and_force_replaces() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint::open(model("tiny-sd3")).unwrap();
    let fp = ModelFingerprint::compute(&ckpt).unwrap();
    let out = tmp.path().join("engine");

    // Interrupted after two payloads: nothing at --out, no staging left behind.
    let mut o = CompileOptions::new(Target::Cpu, Precision::Bf16);
    o.fail_after_payloads = Some(2);
    assert!(compile(&ckpt, &fp, &o, &out).is_err());
    assert!(!out.exists());
    assert_eq!(leftovers(tmp.path()), Vec::<String>::new());

    // A real bundle; a second compile without --force is refused and leaves it intact.
    let bf16 = CompileOptions::new(Target::Cpu, Precision::Bf16);
    compile(&ckpt, &fp, &bf16, &out).unwrap();
    let e = compile(&ckpt, &fp, &bf16, &out).err().unwrap();
    assert!(matches!(e, EngineError::Exists(_)), "{e}");
    assert!(e.to_string().contains("--force"), "{e}");

    // A failed --force rebuild keeps the old bundle.
    let mut failing = fp8_options(test_plan(&ckpt), Compute::Bf16);
    failing.force = true;
    failing.fail_after_payloads = Some(1);
    assert!(compile(&ckpt, &fp, &failing, &out).is_err());
    assert_eq!(
        Bundle::open(&out).unwrap().manifest.precision,
        Precision::Bf16
    );

    // A successful --force rebuild replaces it.
    failing.fail_after_payloads = None;
    compile(&ckpt, &fp, &failing, &out).unwrap();
    assert_eq!(
        Bundle::open(&out).unwrap().manifest.precision,
        Precision::Fp8
    );
    assert_eq!(leftovers(tmp.path()), Vec::<String>::new());
}

/// A stand-in for the cuda executor's builder: writes one "kernel" file.
struct FakeCuda;

impl sd_engine::TargetBuilder for FakeCuda {
    fn preflight(&self, _: &CompileOptions, _: &PrecisionPlan) -> sd_engine::Result<()> {
        Ok(())
    }
    fn write_extras(
        &self,
        staging: &Path,
        _: &sd_engine::Manifest,
    ) -> sd_engine::Result<sd_engine::TargetExtras> {
        std::fs::create_dir_all(staging.join("kernels")).unwrap();
        std::fs::write(staging.join("kernels/norms.sm_90a.ptx"), b"// ptx").unwrap();
        Ok(sd_engine::TargetExtras {
            files: vec!["kernels/norms.sm_90a.ptx".into()],
            cuda: Some(sd_engine::CudaInfo {
                gpu_name: Some("NVIDIA H100 80GB HBM3".into()),
                compute_capability: Some([9, 0]),
                kernels: vec![sd_engine::manifest::KernelEntry {
                    name: "norms".into(),
                    build_id: "abc".into(),
                    arch: "sm_90a".into(),
                    kind: "ptx".into(),
                    file: "kernels/norms.sm_90a.ptx".into(),
                }],
                ..Default::default()
            }),
        })
    }
}

#[test]
fn cuda_layout_packs_transposed_codes_and_records_the_gpu() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint::open(model("tiny-sd3")).unwrap();
    let fp = ModelFingerprint::compute(&ckpt).unwrap();
    let plan = test_plan(&ckpt);
    let cpu_out = tmp.path().join("cpu");
    compile(
        &ckpt,
        &fp,
        &fp8_options(plan.clone(), Compute::Bf16),
        &cpu_out,
    )
    .unwrap();
    let mut o = fp8_options(plan.clone(), Compute::Bf16);
    o.target = Target::Cuda;
    let cuda_out = tmp.path().join("cuda");
    sd_engine::compile_with(&ckpt, &fp, &o, &cuda_out, Some(&FakeCuda)).unwrap();

    let cuda = Bundle::open(&cuda_out).unwrap();
    assert!(cuda.manifest.file("kernels/norms.sm_90a.ptx").is_some());
    assert_eq!(cuda.plan().unwrap(), plan);
    cuda.check_gpu([9, 0], "H100").unwrap();
    let e = cuda.check_gpu([8, 9], "NVIDIA L4").err().unwrap();
    assert!(matches!(e, EngineError::GpuMismatch { .. }), "{e}");
    assert!(e.to_string().contains("Rebuild it on this GPU"), "{e}");
    let e = load_cpu_pipeline(&cuda_out).err().unwrap();
    assert!(matches!(e, EngineError::TargetMismatch { .. }), "{e}");
    assert!(sd_engine::host::can_run(&Bundle::open(&cpu_out).unwrap().manifest).is_ok());
    if sd_engine::host::CudaProbe::run().missing().is_some() {
        let why = sd_engine::host::can_run(&cuda.manifest).err().unwrap();
        assert!(why.starts_with("no: missing"), "{why}");
    }

    let (cw, gw) = (
        Bundle::open(&cpu_out)
            .unwrap()
            .weights("transformer")
            .unwrap(),
        cuda.weights("transformer").unwrap(),
    );
    let layer = plan.layers.keys().next().unwrap();
    let (c, g) = (cw.fp8(layer).unwrap(), gw.fp8(layer).unwrap());
    assert_eq!(g.layout, sd_engine::Fp8Layout::CublasltTn);
    // cuBLASLt's TN layout of a row-major [out, in] weight is the same bytes.
    assert_eq!(g.shape, c.shape);
    assert_eq!(g.codes, c.codes);
    // Handed to a backend, both give the same [out, in] dequantized weight.
    let name = format!("{layer}.weight");
    let (a, b) = (cw.get(&name).unwrap(), gw.get(&name).unwrap());
    assert_eq!(a.shape, b.shape);
    assert!(a.bytes == b.bytes);
    // Tampering with a kernel is caught like any payload.
    std::fs::write(cuda_out.join("kernels/norms.sm_90a.ptx"), b"// PTX").unwrap();
    let e = Bundle::open(&cuda_out).err().unwrap();
    assert!(matches!(e, EngineError::Checksum { .. }), "{e}");
}

#[test]
fn failure_just_before_the_rename_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint::open(model("tiny-sd35l-no-t5")).unwrap();
    let fp = ModelFingerprint::compute(&ckpt).unwrap();
    let out = tmp.path().join("engine");
    let mut o = CompileOptions::new(Target::Cpu, Precision::Bf16);
    o.fail_after_payloads = Some(usize::MAX);
    assert!(compile(&ckpt, &fp, &o, &out).is_err());
    assert!(!out.exists());
    assert_eq!(leftovers(tmp.path()), Vec::<String>::new());
}

#[test]
fn staging_left_by_a_killed_compile_is_cleaned_up() {
    let tmp = tempfile::tempdir().unwrap();
    // A pid that cannot be alive (above the kernel's pid_max limit of 2^22).
    let stale = tmp.path().join(".engine.partial-99999999-1");
    std::fs::create_dir_all(stale.join("weights")).unwrap();
    let out = bf16_bundle(tmp.path());
    assert!(out.join("manifest.json").exists());
    if Path::new("/proc/self").exists() {
        assert!(!stale.exists());
    }
}

/// With T5 calibrated for FP8 (`sd-build calibrate --quantize-t5`) the plan names T5's
/// layers too: the bundle stores them as FP8 codes in the T5 payload, its plan gives
/// them back, and the bundle still reproduces the checkpoint pipeline bit for bit.
#[test]
fn t5_fp8_layers_round_trip_through_the_bundle() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint::open(model("tiny-sd3")).unwrap();
    let mut plan = test_plan(&ckpt);
    let t5 = ckpt.weights("text_encoder_3").unwrap();
    let t5_names =
        sd_model::t5::T5Encoder::<CpuBackend>::linear_layer_names(ckpt.t5.as_ref().unwrap());
    for layer in &t5_names {
        let t = t5.get(&format!("{layer}.weight")).unwrap();
        let inp = t.shape[1];
        let scales = t
            .to_f32()
            .chunks(inp)
            .map(|r| r.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6) / 448.0)
            .collect();
        plan.layers.insert(
            layer.clone(),
            LinearQuant::Fp8 {
                weight: WeightQuant {
                    format: Fp8Format::E4M3,
                    scales,
                },
                input: ActivationQuant {
                    format: Fp8Format::E4M3,
                    scale: 0.01,
                },
            },
        );
    }
    let out = tmp.path().join("engine-t5");
    compile_to("tiny-sd3", &fp8_options(plan.clone(), Compute::Bf16), &out);
    let bundle = Bundle::open(&out).unwrap();
    assert_eq!(
        bundle.plan().unwrap(),
        plan,
        "T5 layers round-trip in the plan"
    );
    assert!(
        bundle
            .manifest
            .component("text_encoder_3")
            .unwrap()
            .fp8_bytes
            > 0
    );
    let from_bundle = run(&load_cpu_pipeline(&out).unwrap());
    let reference =
        run(&Sd3Pipeline::load(&ckpt, CpuBackend::new(ComputePrecision::Bf16), &plan).unwrap());
    assert_identical(&from_bundle, &reference);
    // T5 in FP8 changes the result compared with the transformer-only plan.
    let transformer_only = run(&Sd3Pipeline::load(
        &ckpt,
        CpuBackend::new(ComputePrecision::Bf16),
        &test_plan(&ckpt),
    )
    .unwrap());
    assert!(transformer_only.latents.data != from_bundle.latents.data);
}
