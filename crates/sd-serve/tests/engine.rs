//! Serving an engine bundle (`sd-build compile --target cpu`): it loads, reports itself
//! as an engine, and answers with exactly what the bundle computes in-process.

mod common;

use std::path::Path;

use common::{client, root, small};
use sd_checkpoint::Checkpoint;
use sd_checkpoint::fingerprint::ModelFingerprint;
use sd_engine::{CompileOptions, Precision, Target};
use sd_proto::v1 as pb;
use sd_serve::ServeArgs;

fn compile_bundle(out: &Path) {
    let ckpt = Checkpoint::open(root().join("models/tiny-sd3")).expect("checkpoint");
    let fp = ModelFingerprint::compute(&ckpt).expect("fingerprint");
    sd_engine::compile(
        &ckpt,
        &fp,
        &CompileOptions::new(Target::Cpu, Precision::Bf16),
        out,
    )
    .expect("compile");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_an_engine_bundle_bit_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("tiny-engine");
    compile_bundle(&bundle);

    let model = format!("eng={}", bundle.display());
    let args = <ServeArgs as clap::Parser>::try_parse_from([
        "sd-serve",
        "--listen",
        "127.0.0.1:0",
        "--model",
        &model,
    ])
    .expect("args");
    let s = sd_serve::start(args).await.expect("start");
    s.wait_ready(std::time::Duration::from_secs(60))
        .await
        .expect("ready");
    let mut c = client(&s).await;
    let m = c
        .get_model(pb::GetModelRequest { name: "eng".into() })
        .await
        .expect("get model")
        .into_inner();
    assert_eq!(m.target, "cpu");
    assert_eq!(m.state, pb::ModelState::Serving as i32);

    let mut req = small("a red circle on the left", 5);
    req.output_format = pb::OutputFormat::Latents as i32;
    let r = c.generate(req).await.expect("generate").into_inner();
    assert!(r.engine_id.starts_with("engine:eng:"), "{}", r.engine_id);
    let served: Vec<f32> = r.images[0]
        .data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();

    let pipeline = sd_engine::load_cpu_pipeline(&bundle).expect("load bundle");
    let direct = pipeline
        .generate(
            sd_pipeline::GenerateRequest {
                prompt: "a red circle on the left".into(),
                width: 64,
                height: 64,
                steps: 2,
                seed: 5,
                max_sequence_length: 16,
                ..Default::default()
            },
            &mut |_, _| {},
        )
        .expect("direct generate");
    assert_eq!(
        served, direct.latents.data,
        "served engine differs from the bundle in-process"
    );

    // Options make no sense for a bundle: refused at parse time.
    let bad = format!("eng={},precision=bf16", bundle.display());
    assert!(<ServeArgs as clap::Parser>::try_parse_from(["sd-serve", "--model", &bad]).is_err());
}
