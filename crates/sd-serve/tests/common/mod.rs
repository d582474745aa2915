//! Loopback helpers: an in-process server on the tiny model, and small requests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use sd_proto::v1 as pb;
use sd_proto::v1::diffusion_client::DiffusionClient;
use sd_serve::{RunningServer, ServeArgs};
use tonic::transport::Channel;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn tiny_model_arg() -> String {
    format!("tiny={}", root().join("models/tiny-sd3").display())
}

pub fn args(extra: &[&str]) -> ServeArgs {
    let model = tiny_model_arg();
    let mut argv = vec!["sd-serve", "--listen", "127.0.0.1:0", "--model", &model];
    argv.extend_from_slice(extra);
    ServeArgs::try_parse_from(argv).expect("server arguments")
}

pub async fn server(extra: &[&str]) -> RunningServer {
    let s = sd_serve::start(args(extra)).await.expect("start server");
    s.wait_ready(Duration::from_secs(60))
        .await
        .expect("models ready");
    s
}

pub async fn channel(s: &RunningServer) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{}", s.addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect")
}

pub async fn client(s: &RunningServer) -> DiffusionClient<Channel> {
    DiffusionClient::new(channel(s).await).max_decoding_message_size(64 << 20)
}

/// 64x64, 2 steps, short T5 sequence: fast on the tiny model.
pub fn small(prompt: &str, seed: u64) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: prompt.into(),
        width: Some(64),
        height: Some(64),
        steps: Some(2),
        seed: Some(seed),
        max_sequence_length: Some(16),
        ..Default::default()
    }
}

/// A request that takes a while (seconds) on the tiny model: 256x256, many steps.
pub fn slow(prompt: &str, steps: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        width: Some(256),
        height: Some(256),
        steps: Some(steps),
        ..small(prompt, 1)
    }
}

/// Waits until `cond` holds, up to `timeout`.
pub async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let until = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < until {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}
