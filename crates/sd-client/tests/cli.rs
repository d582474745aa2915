//! The `sd-client` binary against an in-process sd-serve on the tiny model.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use sd_serve::Parser as _;
use sd_serve::ServeArgs;

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sd-client"))
        .args(args)
        .output()
        .expect("run sd-client");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_models_health_bench() {
    let model = format!(
        "tiny={}",
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/tiny-sd3")
            .display()
    );
    let args =
        ServeArgs::try_parse_from(["sd-serve", "--listen", "127.0.0.1:0", "--model", &model])
            .expect("args");
    let s = sd_serve::start(args).await.expect("start");
    s.wait_ready(Duration::from_secs(60)).await.expect("ready");
    let addr = s.addr.to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("cat.png");
    let out_s = out.to_string_lossy().into_owned();

    let (ok, text) = tokio::task::spawn_blocking({
        let (addr, out_s) = (addr.clone(), out_s.clone());
        move || {
            run(&[
                "--server",
                &addr,
                "generate",
                "--prompt",
                "a cat",
                "--width",
                "64",
                "--height",
                "64",
                "--steps",
                "2",
                "--seed",
                "5",
                "--max-sequence-length",
                "16",
                "-o",
                &out_s,
            ])
        }
    })
    .await
    .expect("join");
    assert!(ok, "{text}");
    assert!(text.contains("seed 5"), "{text}");
    let png = std::fs::read(&out).expect("the PNG was written");
    assert!(png.starts_with(b"\x89PNG"));

    let (ok, text) = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || run(&["--server", &addr, "models"])
    })
    .await
    .expect("join");
    assert!(
        ok && text.contains("tiny") && text.contains("MODEL_STATE_SERVING"),
        "{text}"
    );

    let (ok, text) = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || run(&["--server", &addr, "health", "--service", "tiny"])
    })
    .await
    .expect("join");
    assert!(ok && text.trim() == "SERVING", "{text}");

    let (ok, text) = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || {
            run(&[
                "--server",
                &addr,
                "bench",
                "--prompt",
                "x",
                "--width",
                "64",
                "--height",
                "64",
                "--steps",
                "2",
                "--max-sequence-length",
                "16",
                "--concurrency",
                "4",
                "--requests",
                "8",
            ])
        }
    })
    .await
    .expect("join");
    assert!(ok, "{text}");
    assert!(text.contains("8 ok") && text.contains("p95"), "{text}");
    println!("{text}");

    let (ok, text) = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || {
            run(&[
                "--server",
                &addr,
                "generate",
                "--prompt",
                "",
                "-o",
                "/nonexistent/x.png",
            ])
        }
    })
    .await
    .expect("join");
    assert!(
        !ok && text.contains("InvalidArgument") && text.contains("prompt"),
        "{text}"
    );
    s.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_token() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let model = format!("tiny={}", root.join("models/tiny-sd3").display());
    let tls = root.join("crates/sd-serve/tests/fixtures/tls");
    let (cert, key, ca) = (
        tls.join("server.pem").to_string_lossy().into_owned(),
        tls.join("server.key").to_string_lossy().into_owned(),
        tls.join("ca.pem").to_string_lossy().into_owned(),
    );
    let args = ServeArgs::try_parse_from([
        "sd-serve",
        "--listen",
        "127.0.0.1:0",
        "--model",
        &model,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--auth-token",
        "tok",
    ])
    .expect("args");
    let s = sd_serve::start(args).await.expect("start");
    s.wait_ready(Duration::from_secs(60)).await.expect("ready");
    let addr = s.addr.to_string();
    let base = move |extra: &[&str]| {
        let mut v: Vec<String> = [
            "--server",
            &addr,
            "--ca-cert",
            &ca,
            "--tls-domain",
            "localhost",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let cases = [
        (base(&["health"]), true, "SERVING"),
        (base(&["models"]), false, "Unauthenticated"),
        (base(&["--token", "tok", "models"]), true, "tiny"),
    ];
    for (argv, want_ok, want_text) in cases {
        let (ok, text) = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
            run(&refs)
        })
        .await
        .expect("join");
        assert_eq!(ok, want_ok, "{text}");
        assert!(text.contains(want_text), "{text}");
    }
    s.shutdown().await.expect("shutdown");
}
