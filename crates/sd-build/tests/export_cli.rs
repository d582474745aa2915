//! `sd-build export` end to end on the tiny checkpoint: FP8 layers from a calibration
//! cache, and the refusals that must leave nothing behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn sd_build(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sd-build"))
        .args(args)
        .output()
        .expect("run sd-build")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn export_with_calibration_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).display().to_string();
    let sd3 = repo().join("models/tiny-sd3").display().to_string();
    let sd35m = repo().join("models/tiny-sd35m").display().to_string();
    let cache = p("cal.yaml");
    let o = sd_build(&[
        "calibrate",
        "--model",
        &sd3,
        "--out",
        &cache,
        "--steps",
        "2",
        "--samples",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--target",
        "tensorrt",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    // A cache for another model: refused, nothing written.
    let out = p("onnx");
    let o = sd_build(&[
        "export",
        "--model",
        &sd35m,
        "--calibration",
        &cache,
        "--height",
        "64",
        "--out",
        &out,
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("does not belong"), "{}", stderr(&o));
    assert!(!Path::new(&out).exists());

    // A missing model.
    let o = sd_build(&["export", "--model", &p("nope"), "--out", &out]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("does not exist"), "{}", stderr(&o));
    assert!(!Path::new(&out).exists());

    // The real thing, TensorRT flavour.
    let o = sd_build(&[
        "export",
        "--model",
        &sd3,
        "--calibration",
        &cache,
        "--for-tensorrt",
        "--precision",
        "fp16",
        "--height",
        "64",
        "--out",
        &out,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in [
        "transformer.onnx",
        "clip_l.onnx",
        "clip_g.onnx",
        "t5.onnx",
        "vae_decoder.onnx",
        "onnx_export.json",
    ] {
        assert!(Path::new(&out).join(f).is_file(), "{f}");
    }
    let man: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(&out).join("onnx_export.json")).unwrap(),
    )
    .unwrap();
    let fp8 = man["models"][0]["fp8_layers"].as_array().unwrap();
    assert!(!fp8.is_empty());
    // Inputs E4M3 (the tensorrt target), or none for the weight-only adaLN layers.
    assert!(
        fp8.iter()
            .all(|l| (l["input"] == "e4m3" || l["input"].is_null()) && l["weight"] == "e4m3"),
        "{man}"
    );
    assert!(fp8.iter().any(|l| l["input"].is_null()), "{man}");
    assert_eq!(
        man["models"][0]["inputs"][0]["shape"],
        serde_json::json!(["batch", 16, "height", "width"])
    );
    let vae = man["models"].as_array().unwrap().last().unwrap();
    assert_eq!(
        vae["outputs"][0]["shape"],
        serde_json::json!(["batch", 3, "8*height", "8*width"])
    );

    // An existing output is kept without --force.
    let o = sd_build(&["export", "--model", &sd3, "--out", &out]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 2, "cache + export only: {left:?}");
}
