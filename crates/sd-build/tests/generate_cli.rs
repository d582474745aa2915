//! `sd-build generate` as a user runs it: the flag contract and every bad input the
//! foundation issue lists (clear message, non-zero exit, no panic, nothing written).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model() -> PathBuf {
    root().join("models/tiny-sd35m")
}

fn sd_build(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sd-build"))
        .args(args)
        .output()
        .expect("run sd-build")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A small, fast generation; `extra` flags are appended.
fn generate(model: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a red circle on the left",
        "--out",
        out.to_str().unwrap(),
    ];
    // Defaults for speed, unless the case sets the flag itself.
    for (flag, value) in [("--steps", "2"), ("--width", "64"), ("--height", "64")] {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    sd_build(&args)
}

/// Asserts a failed run: non-zero exit, no panic, a message containing `needle`, and no
/// output file.
fn assert_refused(o: &Output, needle: &str, out: &Path) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(err.contains(needle), "message lacks `{needle}`: {err}");
    assert!(!out.exists(), "{} was written", out.display());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

#[test]
fn writes_a_png_with_parameters_and_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.png"), dir.path().join("b.png"));
    let o = generate(&model(), &a, &["--seed", "7"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = generate(&model(), &b, &["--seed", "7"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_eq!(&a[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(a, b, "same seed must give the same image");
    let text = String::from_utf8_lossy(&a);
    assert!(
        text.contains("parameters") && text.contains("Seed: 7"),
        "no parameters chunk"
    );
    let c = dir.path().join("c.png");
    let o = generate(&model(), &c, &["--seed", "8"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(
        std::fs::read(&c).unwrap(),
        a,
        "another seed should change the image"
    );
}

#[test]
fn saved_latents_round_trip_through_latents_flag() {
    let dir = tempfile::tempdir().unwrap();
    let noise = dir.path().join("noise.safetensors");
    let fin = dir.path().join("final.safetensors");
    // Initial noise of the contract's shape [1, 16, H/8, W/8].
    let t =
        sd_model::HostTensor::from_fn(vec![1, 16, 8, 8], |i| ((i * 7919) % 13) as f32 / 6.0 - 1.0);
    sd_checkpoint::write_tensor_file(&noise, &[("latents", &t)]).unwrap();
    let (a, b) = (dir.path().join("a.png"), dir.path().join("b.png"));
    let o = generate(
        &model(),
        &a,
        &[
            "--latents",
            noise.to_str().unwrap(),
            "--save-latents",
            fin.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let saved = sd_checkpoint::read_tensor_file(&fin, "latents").unwrap();
    assert_eq!(saved.shape, vec![1, 16, 8, 8]);
    assert_ne!(saved.data, t.data, "denoising should change the latents");
    // The seed is irrelevant when noise is given.
    let o = generate(
        &model(),
        &b,
        &["--latents", noise.to_str().unwrap(), "--seed", "99"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let strip = |p: &Path| {
        // Compare pixels, not the parameters chunk (it names the seed).
        let bytes = std::fs::read(p).unwrap();
        let d = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut r = d.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        r.next_frame(&mut buf).unwrap();
        buf
    };
    assert_eq!(strip(&a), strip(&b));
}

#[test]
fn long_prompt_is_truncated_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("long.png");
    let prompt = "a small blue square next to a large red circle ".repeat(20);
    let o = sd_build(&[
        "generate",
        "--model",
        model().to_str().unwrap(),
        "--prompt",
        &prompt,
        "--steps",
        "1",
        "--width",
        "32",
        "--height",
        "32",
        "--max-sequence-length",
        "16",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("truncated"), "no truncation warning: {err}");
    assert!(out.exists());
}

#[test]
fn refuses_bad_sizes_steps_and_guidance() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let m = model();
    let cases: &[(&[&str], &str)] = &[
        (&["--width", "72"], "width"),
        (&["--height", "0"], "height"),
        (&["--width", "4096"], "maximum"),
        (&["--steps", "0"], "steps"),
        (&["--guidance", "nan"], "guidance_scale"),
        (&["--guidance", "inf"], "guidance_scale"),
        (&["--guidance", "-1"], "guidance_scale"),
        (&["--max-sequence-length", "0"], "max_sequence_length"),
        (&["--shift", "-2"], "shift"),
    ];
    for (extra, needle) in cases {
        let o = generate(&m, &out, extra);
        assert_refused(&o, needle, &out);
        assert!(
            stderr(&o).contains("invalid request"),
            "not a validation error: {}",
            stderr(&o)
        );
    }
}

#[test]
fn refuses_missing_model_and_components() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let o = generate(&dir.path().join("nope"), &out, &[]);
    assert_refused(&o, "does not exist", &out);

    let broken = dir.path().join("no-vae");
    copy_dir(&model(), &broken);
    std::fs::remove_dir_all(broken.join("vae")).unwrap();
    let o = generate(&broken, &out, &[]);
    assert_refused(&o, "vae", &out);

    let no_weights = dir.path().join("no-weights");
    copy_dir(&model(), &no_weights);
    for e in std::fs::read_dir(no_weights.join("text_encoder")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            std::fs::remove_file(p).unwrap();
        }
    }
    let o = generate(&no_weights, &out, &[]);
    assert_refused(&o, "safetensors", &out);
}

#[test]
fn refuses_corrupt_and_truncated_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let m = dir.path().join("m");
    copy_dir(&model(), &m);
    let vae = m.join("vae/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&vae).unwrap();
    std::fs::write(&vae, &bytes[..bytes.len() / 2]).unwrap();
    let o = generate(&m, &out, &[]);
    assert_refused(&o, "truncated", &out);
    std::fs::write(&vae, b"this is not a safetensors file at all").unwrap();
    let o = generate(&m, &out, &[]);
    assert_refused(&o, "corrupt", &out);
}

#[test]
fn wrong_shape_names_tensor_file_and_expected_shape() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let m = dir.path().join("m");
    copy_dir(&model(), &m);
    // A config that no longer matches the weights: the MLP is declared wider.
    let cfg_path = m.join("text_encoder/config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    let width = v["intermediate_size"].as_u64().unwrap();
    v["intermediate_size"] = serde_json::json!(width * 2);
    std::fs::write(&cfg_path, v.to_string()).unwrap();
    let o = generate(&m, &out, &[]);
    assert_refused(&o, "mlp.fc1.weight", &out);
    let err = stderr(&o);
    assert!(
        err.contains("expected [") && err.contains(".safetensors"),
        "{err}"
    );
}

#[test]
fn refuses_bad_latents_and_unwritable_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let lat = dir.path().join("lat.safetensors");
    let wrong = sd_model::HostTensor::zeros(vec![1, 16, 4, 4]);
    sd_checkpoint::write_tensor_file(&lat, &[("latents", &wrong)]).unwrap();
    let o = generate(&model(), &out, &["--latents", lat.to_str().unwrap()]);
    assert_refused(&o, "latents", &out);
    sd_checkpoint::write_tensor_file(&lat, &[("noise", &wrong)]).unwrap();
    let o = generate(&model(), &out, &["--latents", lat.to_str().unwrap()]);
    assert_refused(&o, "no tensor named `latents`", &out);
    let o = generate(
        &model(),
        &out,
        &["--latents", "/nonexistent/lat.safetensors"],
    );
    assert_refused(&o, "lat.safetensors", &out);
    let nowhere = dir.path().join("missing-dir/x.png");
    let o = generate(&model(), &nowhere, &[]);
    assert_refused(&o, "does not exist", &nowhere);
}

fn pixels(p: &Path) -> Vec<u8> {
    let d = png::Decoder::new(std::io::Cursor::new(std::fs::read(p).unwrap()));
    let mut r = d.read_info().unwrap();
    let mut buf = vec![0; r.output_buffer_size().unwrap()];
    r.next_frame(&mut buf).unwrap();
    buf
}

/// The FP8 flow through the CLI: calibrate, FP8-simulated generation, a cpu engine
/// compiled from the same cache, and the engine's image identical to the simulation's.
#[test]
fn fp8_generation_and_cpu_engine_agree_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    let m = model();
    let ms = m.to_str().unwrap();
    let cache = d("cal.yaml");
    let o = sd_build(&[
        "calibrate",
        "--model",
        ms,
        "--out",
        cache.to_str().unwrap(),
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
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    let out = d("no-cache.png");
    let o = generate(&m, &out, &["--precision", "fp8"]);
    assert_refused(&o, "--calibration", &out);
    let o = generate(
        &m,
        &out,
        &[
            "--precision",
            "bf16",
            "--calibration",
            cache.to_str().unwrap(),
        ],
    );
    assert_refused(&o, "fp8 only", &out);

    let sim = d("sim.png");
    let o = generate(
        &m,
        &sim,
        &[
            "--precision",
            "fp8",
            "--calibration",
            cache.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let full = d("fp32.png");
    let o = generate(&m, &full, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(
        pixels(&sim),
        pixels(&full),
        "FP8 simulation should differ from FP32"
    );

    let engine = d("engine");
    let o = sd_build(&[
        "compile",
        "--model",
        ms,
        "--calibration",
        cache.to_str().unwrap(),
        "--target",
        "cpu",
        "--precision",
        "fp8",
        "--out",
        engine.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let from_engine = d("engine.png");
    let mut args = vec![
        "generate",
        "--engine",
        engine.to_str().unwrap(),
        "--prompt",
        "a red circle on the left",
    ];
    args.extend([
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--out",
        from_engine.to_str().unwrap(),
    ]);
    let o = sd_build(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        pixels(&from_engine),
        pixels(&sim),
        "engine and --precision fp8 differ"
    );

    // A cache made for another model is refused.
    let other = root().join("models/tiny-sd3");
    let o = generate(
        &other,
        &out,
        &[
            "--precision",
            "fp8",
            "--calibration",
            cache.to_str().unwrap(),
        ],
    );
    assert_refused(&o, "model", &out);
    let mut args = vec![
        "generate",
        "--engine",
        engine.to_str().unwrap(),
        "--precision",
        "bf16",
    ];
    args.extend(["--prompt", "x", "--out", out.to_str().unwrap()]);
    let o = sd_build(&args);
    assert_refused(&o, "cannot be used with", &out);
}
