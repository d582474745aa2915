//! The real `sd-serve` binary (SIGTERM drain, metrics endpoint) and a real client
//! nobody here wrote (Python grpcio, tests/python/grpc_client_check.py).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use sd_proto::v1 as pb;
use tokio_stream::StreamExt;
use tonic::Code;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_then_exits_zero() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_sd-serve"))
        .env("SD_SERVE_LISTEN", "127.0.0.1:0")
        .env("SD_SERVE_MODELS", tiny_model_arg())
        .env("SD_SERVE_METRICS_LISTEN", &metrics)
        .env("SD_SERVE_LOG_FORMAT", "json")
        .env("SD_SERVE_GRACE_PERIOD_SECS", "60")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sd-serve");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut log = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && v["fields"]["message"] == "listening"
                && let Some(a) = v["fields"]["addr"].as_str()
            {
                let _ = tx.send(a.to_string());
            }
            log.push(line);
        }
        log
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the server logs its address (JSON logs)");
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health");
        if r.into_inner().status == 1 {
            break;
        }
        assert!(Instant::now() < until, "never SERVING");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut c = pb::diffusion_client::DiffusionClient::new(ch.clone());
    c.generate(small("warm", 1)).await.expect("a first request");

    let scrape = http_get(&metrics, "/metrics");
    for name in [
        "sd_requests_total{model=\"tiny\",status=\"OK\"} 1",
        "sd_queue_depth",
        "sd_batch_size_bucket",
        "sd_step_seconds_bucket",
        "sd_queue_seconds_bucket",
        "sd_stage_seconds_bucket{model=\"tiny\",stage=\"text_encoding\"",
        "sd_stage_seconds_bucket{model=\"tiny\",stage=\"denoising\"",
        "sd_stage_seconds_bucket{model=\"tiny\",stage=\"decoding\"",
        "sd_images_per_second",
        "sd_images_total",
        "sd_model_state{model=\"tiny\"} 2",
    ] {
        assert!(scrape.contains(name), "metrics lack `{name}`:\n{scrape}");
    }

    // An in-flight request (~1 s of steps), then SIGTERM.
    let mut c1 = c.clone();
    let mut stream = c1
        .generate_stream(slow("in flight", 40))
        .await
        .expect("stream")
        .into_inner();
    loop {
        let e = stream.next().await.expect("event").expect("ok");
        if matches!(e.event, Some(pb::generate_event::Event::Progress(_))) {
            break;
        }
    }
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    // New requests are refused while the in-flight one finishes.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c2 = c.clone();
        match c2.generate(small("late", 2)).await {
            Err(st) if st.code() == Code::Unavailable => break,
            Err(st) => panic!("late request: {st:?}"),
            Ok(_) => {
                // The signal may not have landed yet.
                assert!(Instant::now() < until, "new requests still accepted");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    let mut done = false;
    while let Some(e) = stream.next().await {
        if let Some(pb::generate_event::Event::Result(r)) = e.expect("in-flight stream").event {
            assert_eq!(r.images.len(), 1);
            done = true;
        }
    }
    assert!(done, "the in-flight request completed");
    let until = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > until {
            let _ = child.kill();
            panic!("sd-serve did not exit after SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let log = reader.join().expect("log reader");
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        log.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client() {
    let Some(python) = std::env::var_os("SD_TEST_PYTHON") else {
        if std::env::var_os("CI").is_some() {
            panic!(
                "SD_TEST_PYTHON is not set on CI: it must name a python with scripts/ci/requirements-serve.txt installed"
            );
        }
        eprintln!(
            "SKIPPED python_grpcio_client: set SD_TEST_PYTHON to a python with scripts/ci/requirements-serve.txt installed"
        );
        return;
    };
    let s = server(&[]).await;
    let script = root().join("tests/python/grpc_client_check.py");
    let addr = s.addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .arg(addr)
            .arg("tiny")
            .output()
    })
    .await
    .expect("join")
    .expect("run python");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "python client failed:\n{text}");
    assert!(text.contains("python grpc client: OK"));
    s.shutdown().await.expect("shutdown");
}
