//! `sd-build compile` and `sd-build inspect` as a user runs them, with a calibration
//! cache from `sd-build calibrate`, and the bad inputs of the engine issue.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn models() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models")
}

fn sd_build(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sd-build"))
        .args(args)
        .output()
        .expect("run sd-build")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn ok(o: Output) -> String {
    let (out, err) = text(&o);
    assert!(o.status.success(), "failed:\n{out}\n{err}");
    out
}

fn refused(o: Output, needle: &str) -> String {
    let (out, err) = text(&o);
    assert!(!o.status.success(), "should fail:\n{out}\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(needle), "expected `{needle}` in:\n{err}");
    err
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn calibrate(model: &Path, out: &Path) {
    ok(sd_build(&[
        "calibrate",
        "--model",
        p(model),
        "--out",
        p(out),
        "--target",
        "cpu",
        "--samples",
        "2",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--max-sequence-length",
        "16",
    ]));
}

#[test]
fn compile_fp8_with_a_cache_then_inspect() {
    let tmp = tempfile::tempdir().unwrap();
    let model = models().join("tiny-sd3");
    let cache = tmp.path().join("cache.yaml");
    calibrate(&model, &cache);
    let engine = tmp.path().join("engine");
    let out = ok(sd_build(&[
        "compile",
        "--model",
        p(&model),
        "--calibration",
        p(&cache),
        "--target",
        "cpu",
        "--out",
        p(&engine),
    ]));
    assert!(out.contains("fp8 precision"), "{out}");
    let out = ok(sd_build(&["inspect", p(&engine)]));
    for needle in [
        "target:        cpu",
        "precision:     fp8",
        "runs here:     yes",
        "sizes by component:",
        "transformer",
        "per-layer precision:",
        "e4m3",
        "checksums of",
    ] {
        assert!(out.contains(needle), "`{needle}` missing from:\n{out}");
    }
    let json = ok(sd_build(&["inspect", "--json", p(&engine)]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["target"], "cpu");
    assert!(v["calibration"]["hash"].as_str().unwrap().len() == 64);

    // The bundle's images are bit-identical to the checkpoint run with the cache's plan,
    // for both compute precisions.
    let plan = sd_calibrate::CalibrationCache::load(&cache).unwrap().plan();
    assert!(plan.fp8_layer_count() > 0);
    let ckpt = sd_checkpoint::Checkpoint::open(&model).unwrap();
    let engine32 = tmp.path().join("engine32");
    ok(sd_build(&[
        "compile",
        "--model",
        p(&model),
        "--calibration",
        p(&cache),
        "--target",
        "cpu",
        "--compute",
        "fp32",
        "--out",
        p(&engine32),
    ]));
    for (dir, precision) in [
        (&engine, sd_cpu::ComputePrecision::Bf16),
        (&engine32, sd_cpu::ComputePrecision::F32),
    ] {
        let request = || sd_pipeline::GenerateRequest {
            prompt: "a blue ball".into(),
            width: 64,
            height: 64,
            steps: 2,
            seed: 3,
            max_sequence_length: 16,
            ..Default::default()
        };
        let a = sd_engine::load_cpu_pipeline(dir)
            .unwrap()
            .generate(request(), &mut |_, _| {})
            .unwrap();
        let b = sd_pipeline::Sd3Pipeline::load(&ckpt, sd_cpu::CpuBackend::new(precision), &plan)
            .unwrap()
            .generate(request(), &mut |_, _| {})
            .unwrap();
        assert!(a.image.rgb == b.image.rgb, "{precision:?}: images differ");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(bits(&a.latents.data) == bits(&b.latents.data));
    }

    // Existing bundle: refused without --force, replaced with it.
    let args = |force: bool| {
        let mut a = vec![
            "compile",
            "--model",
            p(&model),
            "--precision",
            "bf16",
            "--target",
            "cpu",
            "--out",
            p(&engine),
        ];
        if force {
            a.push("--force");
        }
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |a: Vec<String>| {
        Command::new(env!("CARGO_BIN_EXE_sd-build"))
            .args(a)
            .output()
            .unwrap()
    };
    refused(run(args(false)), "--force");
    ok(run(args(true)));
    let out = ok(sd_build(&["inspect", p(&engine)]));
    assert!(out.contains("precision:     bf16"), "{out}");

    // A cache for another model, and one for another target.
    refused(
        sd_build(&[
            "compile",
            "--model",
            p(&models().join("tiny-sd35m")),
            "--calibration",
            p(&cache),
            "--target",
            "cpu",
            "--out",
            p(&tmp.path().join("other")),
        ]),
        "recalibrate",
    );
    let yaml = std::fs::read_to_string(&cache).unwrap();
    assert!(yaml.contains("target: cpu"), "cache layout changed");
    let cuda_cache = tmp.path().join("cuda.yaml");
    std::fs::write(&cuda_cache, yaml.replace("target: cpu", "target: tensorrt")).unwrap();
    refused(
        sd_build(&[
            "compile",
            "--model",
            p(&model),
            "--calibration",
            p(&cuda_cache),
            "--target",
            "cpu",
            "--out",
            p(&tmp.path().join("other")),
        ]),
        "another target",
    );
    assert!(!tmp.path().join("other").exists());

    // Tampered payload: inspect describes it, then fails.
    let vae = engine.join("weights/vae.safetensors");
    let mut bytes = std::fs::read(&vae).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(&vae, bytes).unwrap();
    let o = sd_build(&["inspect", p(&engine)]);
    assert!(text(&o).0.contains("integrity:     FAILED"));
    refused(o, "does not match its checksum");
}

#[test]
fn compile_refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let model = models().join("tiny-sd3");
    let out = tmp.path().join("engine");
    let base = ["compile", "--model", p(&model), "--out", p(&out)];
    let with = |extra: &[&str]| {
        let mut a: Vec<&str> = base.to_vec();
        a.extend(extra);
        sd_build(&a)
    };
    refused(with(&["--target", "cpu"]), "needs a calibration cache");
    refused(
        with(&["--target", "cuda", "--precision", "bf16"]),
        "--target cpu",
    );
    refused(
        with(&["--target", "cpu", "--calibration", "/nonexistent.yaml"]),
        "nonexistent.yaml",
    );
    assert!(!out.exists());
    refused(
        sd_build(&["inspect", p(&tmp.path().join("nothing"))]),
        "not an engine bundle",
    );
}

/// `sd-build inspect ENGINE | head -1`: a closed stdout ends the process quietly (as
/// SIGPIPE ends any Unix tool), never with a panic.
#[test]
fn inspect_into_a_closed_pipe_does_not_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let engine = tmp.path().join("engine");
    ok(sd_build(&[
        "compile",
        "--model",
        p(&models().join("tiny-sd3")),
        "--target",
        "cpu",
        "--precision",
        "bf16",
        "--out",
        p(&engine),
    ]));
    let script = format!(
        "'{}' inspect '{}' | head -n 1",
        env!("CARGO_BIN_EXE_sd-build"),
        engine.display()
    );
    let o = Command::new("sh").args(["-c", &script]).output().unwrap();
    let (out, err) = text(&o);
    assert!(out.starts_with("engine bundle:"), "{out}");
    assert!(!err.contains("panicked"), "{err}");
}
