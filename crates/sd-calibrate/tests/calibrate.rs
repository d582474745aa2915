//! Calibration on the tiny models: speed, determinism, refusals, target constraints,
//! bad inputs.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use sd_calibrate::*;
use sd_checkpoint::Checkpoint;
use sd_checkpoint::fingerprint::ModelFingerprint;
use sd_fp8::Fp8Format;

fn model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models")
        .join(name)
}

fn quick(name: &str, target: Target) -> CalibrationConfig {
    let mut cfg = CalibrationConfig::new(model(name));
    cfg.samples = 2;
    cfg.steps = 3;
    cfg.width = Some(64);
    cfg.height = Some(64);
    cfg.max_sequence_length = 32;
    cfg.target = target;
    cfg
}

/// One calibration of tiny-sd35m for the cuda target, shared by several tests.
fn cuda_cache() -> &'static CalibrationCache {
    static C: OnceLock<CalibrationCache> = OnceLock::new();
    C.get_or_init(|| calibrate(&quick("tiny-sd35m", Target::Cuda), &mut |_| {}).unwrap())
}

#[test]
fn calibrates_tiny_model_quickly_with_full_records() {
    let t = std::time::Instant::now();
    let mut steps_seen = 0;
    let c = calibrate(&quick("tiny-sd3", Target::Cpu), &mut |p| {
        if p.stage == "calibrate" {
            steps_seen = p.done;
        }
    })
    .unwrap();
    assert!(t.elapsed().as_secs() < 20, "took {:?}", t.elapsed());
    assert_eq!(steps_seen, 6);
    let ckpt = Checkpoint::open(model("tiny-sd3")).unwrap();
    let names = sd_model::mmdit::Mmdit::<sd_cpu::CpuBackend>::linear_layer_names(&ckpt.transformer);
    assert_eq!(
        c.layers.iter().map(|l| l.name.clone()).collect::<Vec<_>>(),
        names
    );
    // By default adaLN keeps FP8 weights with a high-precision input (not excluded).
    let excl = quick("tiny-sd3", Target::Cpu).exclusions();
    assert!(!excl.iter().any(|p| p == "*.norm1.linear"));
    let mut high = quick("tiny-sd3", Target::Cpu);
    high.adaln = sd_calibrate::AdalnPrecision::High;
    assert!(high.exclusions().iter().any(|p| p == "*.norm1.linear"));
    for l in &c.layers {
        assert_eq!(l.activation.step_amax.len(), 3, "{}", l.name);
        assert!(l.activation.amax > 0.0);
        assert!(l.activation.threshold <= l.activation.amax * 1.0001);
        assert_eq!(l.weight.scales.len(), l.out_features);
        assert_eq!(l.activation.evidence.len(), 2);
        let excluded = excl.iter().any(|p| pattern::glob_match(p, &l.name));
        assert_eq!(l.weight_only, l.role == "adaln", "{}", l.name);
        assert_eq!(l.quantized, !excluded, "{}", l.name);
    }
    let plan = c.plan();
    assert_eq!(plan.fp8_layer_count(), c.summary.fp8_layers);
    assert_eq!(
        plan.fp8_weight_layer_count(),
        c.summary.fp8_layers + c.summary.weight_only_layers
    );
    assert!(c.summary.weight_only_layers > 0);
    assert!(!plan.get("proj_out").is_fp8());
    assert!(plan.get("transformer_blocks.0.attn.to_q").is_fp8());
    assert!(matches!(
        plan.get("transformer_blocks.0.norm1.linear"),
        sd_model::LinearQuant::Fp8WeightOnly { .. }
    ));
    // The cache says so, and reads back to the same plan.
    assert_eq!(c.settings.adaln(), sd_calibrate::AdalnPrecision::Fp8Weights);
    let back = CalibrationCache::from_yaml("test", &c.to_yaml().unwrap()).unwrap();
    assert_eq!(back.plan(), plan);
    // The plan runs: FP8-simulated generation works and stays close to FP32.
    let p = sd_pipeline::Sd3Pipeline::load(&ckpt, sd_cpu::CpuBackend::default(), &plan).unwrap();
    let req = sd_pipeline::GenerateRequest {
        prompt: "a small red circle on the left, white background".into(),
        width: 64,
        height: 64,
        steps: 2,
        max_sequence_length: 32,
        ..Default::default()
    };
    let img = p.generate(req, &mut |_, _| {}).unwrap();
    assert_eq!(img.image.width, 64);
}

#[test]
fn cache_is_byte_identical_across_runs_and_round_trips() {
    let a = cuda_cache();
    let b = calibrate(&quick("tiny-sd35m", Target::Cuda), &mut |_| {}).unwrap();
    let ya = a.to_yaml().unwrap();
    assert_eq!(ya, b.to_yaml().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let (p1, p2) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
    a.save(&p1).unwrap();
    b.save(&p2).unwrap();
    assert_eq!(std::fs::read(&p1).unwrap(), std::fs::read(&p2).unwrap());
    let loaded = CalibrationCache::load(&p1).unwrap();
    assert_eq!(&loaded, a);
    assert_eq!(loaded.to_yaml().unwrap(), ya);
    assert_eq!(loaded.plan(), a.plan());
    assert_eq!(loaded.content_hash(), a.content_hash());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p1).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
    }
    // Only the cache files are left in the directory (no temporary files).
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn refuses_another_models_or_targets_cache() {
    let c = cuda_cache();
    let own = ModelFingerprint::compute(&Checkpoint::open(model("tiny-sd35m")).unwrap()).unwrap();
    c.check_model(&own).unwrap();
    let other = ModelFingerprint::compute(&Checkpoint::open(model("tiny-sd3")).unwrap()).unwrap();
    let e = c.check_model(&other).unwrap_err().to_string();
    assert!(e.contains("another") || e.contains("re-run"), "{e}");
    assert!(e.contains(other.short()), "{e}");
    assert_eq!(c.target(), Target::Cuda);
    c.check_target(Target::Cuda).unwrap();
    let e = c.check_target(Target::Tensorrt).unwrap_err().to_string();
    assert!(e.contains("tensorrt") && e.contains("cuda"), "{e}");
}

#[test]
fn tensorrt_target_has_no_e5m2_and_tampered_caches_are_refused() {
    // A margin of 0 dB lets E5M2 win wherever it is at all better: on the cpu target
    // some layer may take it; on tensorrt none may.
    let mut cfg = quick("tiny-sd35l-no-t5", Target::Tensorrt);
    cfg.e5m2_margin_db = 0.0;
    let c = calibrate(&cfg, &mut |_| {}).unwrap();
    assert!(
        c.layers
            .iter()
            .all(|l| l.activation.format == Fp8Format::E4M3)
    );
    assert_eq!(c.summary.e5m2_activations, 0);
    for l in &c.layers {
        let e5 = l
            .activation
            .evidence
            .iter()
            .find(|e| e.format == Fp8Format::E5M2)
            .unwrap();
        assert!(!e5.allowed);
    }
    // An E5M2 activation edited into a tensorrt cache is rejected at load.
    let y = c.to_yaml().unwrap().replace(
        "    format: e4m3\n    scale:",
        "    format: e5m2\n    scale:",
    );
    let Err(e) = CalibrationCache::from_yaml("edited.yaml", &y) else {
        panic!("an E5M2 tensorrt cache was accepted")
    };
    let e = e.to_string();
    assert!(e.contains("not allowed for target tensorrt"), "{e}");
    // weight_only on a layer the cache keeps in high precision is refused.
    let mut edited = c.clone();
    let l = edited.layers.iter_mut().find(|l| !l.quantized).unwrap();
    l.weight_only = true;
    let name = l.name.clone();
    let Err(e) = CalibrationCache::from_yaml("edited.yaml", &edited.to_yaml().unwrap()) else {
        panic!("weight_only on an unquantized layer was accepted")
    };
    let e = e.to_string();
    assert!(e.contains(&name) && e.contains("not quantized"), "{e}");
    // A cache written before weight-only layers (no such fields) reads as before.
    let old_yaml: String = c
        .to_yaml()
        .unwrap()
        .lines()
        .filter(|l| !l.contains("weight_only"))
        .map(|l| format!("{l}\n"))
        .collect();
    let old = CalibrationCache::from_yaml("old.yaml", &old_yaml).unwrap();
    assert!(old.layers.iter().all(|l| !l.weight_only));
    // Wrong version.
    let y = c
        .to_yaml()
        .unwrap()
        .replacen("format_version: 1", "format_version: 99", 1);
    let Err(e) = CalibrationCache::from_yaml("old.yaml", &y) else {
        panic!("a version-99 cache was accepted")
    };
    let e = e.to_string();
    assert!(e.contains("format_version 99"), "{e}");
}

#[test]
fn naive_plan_is_e4m3_everywhere_per_tensor() {
    let c = cuda_cache();
    let naive = c.naive_plan();
    assert_eq!(naive.fp8_layer_count(), c.layers.len());
    for (name, q) in &naive.layers {
        let sd_model::LinearQuant::Fp8 { weight, input } = q else {
            panic!("{name} not fp8")
        };
        assert_eq!(weight.scales.len(), 1);
        assert_eq!(weight.format, Fp8Format::E4M3);
        assert_eq!(input.format, Fp8Format::E4M3);
        let l = c.layers.iter().find(|l| &l.name == name).unwrap();
        assert_eq!(input.scale, l.activation.amax / 448.0);
    }
}

#[test]
fn bad_inputs_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    // Empty prompt files (text with only comments, YAML empty list), unreadable file.
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "# nothing\n\n   \n").unwrap();
    let e = PromptSet::load(&empty).unwrap_err().to_string();
    assert!(e.contains("no prompts"), "{e}");
    let ey = dir.path().join("empty.yaml");
    std::fs::write(&ey, "prompts: []\n").unwrap();
    assert!(PromptSet::load(&ey).is_err());
    let e = PromptSet::load(&dir.path().join("missing.txt"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot read prompt file"), "{e}");
    // YAML forms.
    let y1 = dir.path().join("a.yaml");
    std::fs::write(&y1, "- a red cube\n- '  a blue ball '\n").unwrap();
    assert_eq!(
        PromptSet::load(&y1).unwrap().prompts,
        vec!["a red cube", "a blue ball"]
    );
    let y2 = dir.path().join("b.yml");
    std::fs::write(&y2, "prompts:\n  - one\n  - two\n").unwrap();
    assert_eq!(PromptSet::load(&y2).unwrap().prompts.len(), 2);
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "prompts: 3\n").unwrap();
    assert!(PromptSet::load(&bad).is_err());

    // Zero steps / samples.
    let mut cfg = quick("tiny-sd3", Target::Cpu);
    cfg.steps = 0;
    let e = calibrate(&cfg, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("--steps"), "{e}");
    let mut cfg = quick("tiny-sd3", Target::Cpu);
    cfg.samples = 0;
    let e = calibrate(&cfg, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("--samples"), "{e}");
    let mut cfg = quick("tiny-sd3", Target::Cpu);
    cfg.prompts.prompts.clear();
    assert!(calibrate(&cfg, &mut |_| {}).is_err());

    // A model directory without transformer weights.
    let m = dir.path().join("model");
    copy_dir(&model("tiny-sd3"), &m);
    std::fs::remove_file(m.join("transformer/diffusion_pytorch_model.safetensors")).unwrap();
    let mut cfg = quick("tiny-sd3", Target::Cpu);
    cfg.model = m;
    let e = calibrate(&cfg, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("transformer") && e.contains("missing"), "{e}");

    // Unwritable output: a directory that does not exist; a directory as the path.
    let out = dir.path().join("no/such/dir/cache.yaml");
    assert!(check_writable(&out).is_err());
    let e = cuda_cache().save(&out).unwrap_err().to_string();
    assert!(e.contains("cannot write"), "{e}");
    assert!(!out.exists());
    assert!(check_writable(dir.path()).is_err());
    assert!(cuda_cache().save(dir.path()).is_err());
}

#[test]
fn percentile_and_max_methods_and_attention_observation() {
    let mut cfg = quick("tiny-sd35m", Target::Cpu);
    cfg.samples = 1;
    cfg.steps = 2;
    cfg.method = Method::Max;
    cfg.observe_attention = true;
    cfg.exclude = vec!["transformer_blocks.1.*".into()];
    let max = calibrate(&cfg, &mut |_| {}).unwrap();
    for l in max
        .layers
        .iter()
        .filter(|l| l.name.starts_with("transformer_blocks.1."))
    {
        assert!(!l.quantized);
        if l.role != "adaln" {
            assert_eq!(l.excluded_by.as_deref(), Some("transformer_blocks.1.*"));
        }
    }
    assert!(!max.plan().get("transformer_blocks.1.ff.net.2").is_fp8());
    assert!(max.plan().get("transformer_blocks.2.ff.net.2").is_fp8());
    for l in &max.layers {
        let f = l.activation.format.max_finite();
        assert_eq!(l.activation.scale, l.activation.amax / f, "{}", l.name);
    }
    // Q, K, V and softmax of every joint and dual attention.
    assert!(
        max.attention
            .iter()
            .any(|t| t.name == "transformer_blocks.0.attn.softmax")
    );
    assert!(
        max.attention
            .iter()
            .any(|t| t.name == "transformer_blocks.0.attn2.q")
    );
    let sm = max
        .attention
        .iter()
        .find(|t| t.name.ends_with(".softmax"))
        .unwrap();
    assert!(sm.amax <= 1.0 && sm.amax > 0.0);
    cfg.method = Method::Percentile;
    cfg.percentile = 99.0;
    cfg.observe_attention = false;
    let pc = calibrate(&cfg, &mut |_| {}).unwrap();
    assert!(pc.attention.is_empty());
    assert!(
        pc.layers
            .iter()
            .any(|l| l.activation.threshold < l.activation.amax)
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

/// `--quantize-t5`: T5's linear layers are observed, get records and FP8 plan entries
/// (weights from the T5 payload), and the plan changes the T5 output; a model without
/// T5 refuses the option.
#[test]
fn t5_can_be_calibrated_for_fp8() {
    let mut cfg = quick("tiny-sd35m", Target::Cuda);
    cfg.quantize_t5 = true;
    let cache = calibrate(&cfg, &mut |_| {}).unwrap();
    let t5: Vec<_> = cache
        .layers
        .iter()
        .filter(|l| l.name.starts_with("encoder.block."))
        .collect();
    let ckpt = Checkpoint::open(model("tiny-sd35m")).unwrap();
    let names = sd_model::t5::T5Encoder::<sd_cpu::CpuBackend>::linear_layer_names(
        ckpt.t5.as_ref().unwrap(),
    );
    assert_eq!(t5.len(), names.len());
    assert!(
        t5.iter()
            .all(|l| l.quantized && l.role.starts_with("t5_") && l.activation.amax > 0.0)
    );
    assert!(cache.settings.quantize_t5);
    let plan = cache.plan();
    assert!(names.iter().all(|n| plan.get(n).is_fp8()));

    // The T5 hidden states move under the plan (they would not if T5 ignored it).
    use sd_model::Backend;
    let b = sd_cpu::CpuBackend::default();
    let encode = |plan: &sd_model::PrecisionPlan| {
        let p = sd_pipeline::Sd3Pipeline::load(&ckpt, b.clone(), plan).unwrap();
        let mut w = Vec::new();
        let c = p
            .encode_prompt("a red circle", "a red circle", "a red circle", 16, &mut w)
            .unwrap();
        p.backend.download(&c.context).unwrap().data
    };
    assert_ne!(
        encode(&plan),
        encode(&sd_model::PrecisionPlan::full_precision())
    );
    // The transformer-only cache leaves the context untouched.
    assert_eq!(
        encode(&cuda_cache().plan()),
        encode(&sd_model::PrecisionPlan::full_precision())
    );

    let mut no_t5 = quick("tiny-sd35l-no-t5", Target::Cuda);
    no_t5.quantize_t5 = true;
    let err = calibrate(&no_t5, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("no T5"), "{err}");
}
