//! The gRPC API on loopback with the tiny model: happy path, bad inputs, load,
//! cancellation, deadlines, batch-composition invariance, auth.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use sd_proto::v1 as pb;
use tokio_stream::StreamExt;
use tonic::{Code, Request};

fn model(s: &sd_serve::RunningServer) -> &sd_serve::worker::ModelHandle {
    s.shared.models.get("tiny").expect("tiny model")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path() {
    let s = server(&[]).await;
    let mut c = client(&s).await;

    let models = c
        .list_models(pb::ListModelsRequest {})
        .await
        .expect("list")
        .into_inner()
        .models;
    assert_eq!(models.len(), 1);
    let m = &models[0];
    assert_eq!(m.name, "tiny");
    assert_eq!(m.target, "cpu");
    assert_eq!(m.state, pb::ModelState::Serving as i32);
    assert_eq!((m.min_size, m.max_size, m.size_multiple), (16, 768, 16));
    let got = c
        .get_model(pb::GetModelRequest {
            name: "tiny".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(&got, m);

    // PNG with parameters; the seed comes back.
    let r = c
        .generate(small("a red cat", 42))
        .await
        .expect("generate")
        .into_inner();
    assert_eq!(r.seeds, vec![42]);
    assert_eq!(r.model, "tiny");
    assert!(r.engine_id.contains("tiny-sd3"), "{}", r.engine_id);
    let img = &r.images[0];
    assert_eq!(img.media_type, "image/png");
    assert_eq!((img.width, img.height, img.seed), (64, 64, 42));
    let decoded = image::load_from_memory(&img.data).expect("valid PNG");
    assert_eq!((decoded.width(), decoded.height()), (64, 64));
    let has = |needle: &[u8]| img.data.windows(needle.len()).any(|w| w == needle);
    assert!(has(b"tEXtparameters"), "parameters tEXt chunk");
    assert!(has(b"a red cat"), "prompt in the parameters");
    assert!(has(b"Seed: 42"), "seed in the parameters");
    let t = r.timings.expect("timings");
    assert!(t.total_ms > 0.0 && t.denoising_ms > 0.0 && t.decoding_ms > 0.0);

    // Non-Latin-1 prompts: UTF-8 iTXt for the text, escaped JSON.
    let r = c
        .generate(small("un chat 🐱 — 猫", 8))
        .await
        .expect("unicode prompt")
        .into_inner();
    let png = &r.images[0].data;
    assert!(png.windows(14).any(|w| w == b"iTXtparameters"));
    assert!(png.windows(17).any(|w| w == b"tEXtsd-parameters"));
    image::load_from_memory(png).expect("valid PNG");

    // Random seeds when unset, several images with consecutive seeds.
    let mut req = small("two dogs", 0);
    req.seed = None;
    req.num_images = Some(2);
    let r = c.generate(req).await.expect("generate 2").into_inner();
    assert_eq!(r.images.len(), 2);
    assert_eq!(r.seeds[1], r.seeds[0].wrapping_add(1));
    assert_ne!(r.images[0].data, r.images[1].data);

    // Other formats.
    for (fmt, media, magic) in [
        (pb::OutputFormat::Jpeg, "image/jpeg", &b"\xff\xd8"[..]),
        (pb::OutputFormat::Webp, "image/webp", &b"RIFF"[..]),
    ] {
        let mut req = small("a boat", 3);
        req.output_format = fmt as i32;
        let r = c.generate(req).await.expect("format").into_inner();
        assert_eq!(r.images[0].media_type, media);
        assert!(r.images[0].data.starts_with(magic), "{media}");
        image::load_from_memory(&r.images[0].data).expect("decodes");
    }
    let mut req = small("a boat", 3);
    req.output_format = pb::OutputFormat::Latents as i32;
    let r = c.generate(req).await.expect("latents").into_inner();
    let img = &r.images[0];
    assert_eq!(img.media_type, "application/x-sd-latents");
    assert_eq!(img.shape, vec![1, 16, 8, 8]);
    assert_eq!(img.data.len(), 16 * 8 * 8 * 4);

    // The stream: queued, then one progress per step (previews), then the result.
    let mut req = small("a tree", 5);
    req.steps = Some(3);
    req.preview_every = 1;
    let mut stream = c.generate_stream(req).await.expect("stream").into_inner();
    let mut events = Vec::new();
    while let Some(e) = stream.next().await {
        events.push(e.expect("event").event.expect("non-empty event"));
    }
    use pb::generate_event::Event;
    assert!(matches!(events[0], Event::Queued(_)), "queued first");
    let steps: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            Event::Progress(p) => Some(p.step),
            _ => None,
        })
        .collect();
    assert_eq!(steps, vec![1, 2, 3]);
    let previews = events
        .iter()
        .filter(|e| matches!(e, Event::Progress(p) if p.preview.is_some()))
        .count();
    assert_eq!(previews, 2, "previews at steps 1 and 2 (not at the end)");
    match events.last() {
        Some(Event::Result(r)) => assert_eq!(r.seeds, vec![5]),
        other => panic!("last event {other:?}"),
    }
    s.shutdown().await.expect("shutdown");
}

/// Every case and the status it must get.
fn bad_cases() -> Vec<(&'static str, pb::GenerateRequest, Code, &'static str)> {
    let ok = || small("fine", 1);
    let long = "x".repeat(5000);
    let with = |f: &dyn Fn(&mut pb::GenerateRequest)| {
        let mut r = ok();
        f(&mut r);
        r
    };
    use Code::InvalidArgument as IA;
    vec![
        (
            "unknown model",
            with(&|r| r.model = "nope".into()),
            IA,
            "model",
        ),
        ("empty prompt", with(&|r| r.prompt.clear()), IA, "prompt"),
        (
            "blank prompt",
            with(&|r| r.prompt = "  \n\t".into()),
            IA,
            "prompt",
        ),
        (
            "prompt too long",
            with(&|r| r.prompt = long.clone()),
            IA,
            "prompt",
        ),
        (
            "prompt_2 too long",
            with(&|r| r.prompt_2 = Some(long.clone())),
            IA,
            "prompt_2",
        ),
        (
            "prompt_3 too long",
            with(&|r| r.prompt_3 = Some(long.clone())),
            IA,
            "prompt_3",
        ),
        (
            "negative too long",
            with(&|r| r.negative_prompt = long.clone()),
            IA,
            "negative_prompt",
        ),
        (
            "negative_2 too long",
            with(&|r| r.negative_prompt_2 = Some(long.clone())),
            IA,
            "negative_prompt_2",
        ),
        (
            "negative_3 too long",
            with(&|r| r.negative_prompt_3 = Some(long.clone())),
            IA,
            "negative_prompt_3",
        ),
        (
            "NUL in prompt",
            with(&|r| r.prompt = "a\0b".into()),
            IA,
            "prompt",
        ),
        ("width 0", with(&|r| r.width = Some(0)), IA, "width"),
        ("height 0", with(&|r| r.height = Some(0)), IA, "height"),
        ("width not /16", with(&|r| r.width = Some(65)), IA, "width"),
        (
            "height not /16",
            with(&|r| r.height = Some(100)),
            IA,
            "height",
        ),
        (
            "width above max",
            with(&|r| r.width = Some(784)),
            IA,
            "width",
        ),
        (
            "height above max",
            with(&|r| r.height = Some(4096)),
            IA,
            "height",
        ),
        (
            "width u32::MAX",
            with(&|r| r.width = Some(u32::MAX)),
            IA,
            "width",
        ),
        ("steps 0", with(&|r| r.steps = Some(0)), IA, "steps"),
        (
            "steps above max",
            with(&|r| r.steps = Some(101)),
            IA,
            "steps",
        ),
        (
            "guidance NaN",
            with(&|r| r.guidance_scale = Some(f32::NAN)),
            IA,
            "guidance_scale",
        ),
        (
            "guidance +inf",
            with(&|r| r.guidance_scale = Some(f32::INFINITY)),
            IA,
            "guidance_scale",
        ),
        (
            "guidance -inf",
            with(&|r| r.guidance_scale = Some(f32::NEG_INFINITY)),
            IA,
            "guidance_scale",
        ),
        (
            "guidance negative",
            with(&|r| r.guidance_scale = Some(-1.0)),
            IA,
            "guidance_scale",
        ),
        (
            "num_images 0",
            with(&|r| r.num_images = Some(0)),
            IA,
            "num_images",
        ),
        (
            "num_images too many",
            with(&|r| r.num_images = Some(5)),
            IA,
            "num_images",
        ),
        (
            "num_images huge",
            with(&|r| r.num_images = Some(u32::MAX)),
            IA,
            "num_images",
        ),
        (
            "unknown output format",
            with(&|r| r.output_format = 99),
            IA,
            "output_format",
        ),
        (
            "negative output format",
            with(&|r| r.output_format = -1),
            IA,
            "output_format",
        ),
        (
            "max_sequence_length 0",
            with(&|r| r.max_sequence_length = Some(0)),
            IA,
            "max_sequence_length",
        ),
        (
            "max_sequence_length huge",
            with(&|r| r.max_sequence_length = Some(100_000)),
            IA,
            "max_sequence_length",
        ),
        (
            "shift NaN",
            with(&|r| r.shift = Some(f64::NAN)),
            IA,
            "shift",
        ),
        ("shift 0", with(&|r| r.shift = Some(0.0)), IA, "shift"),
        (
            "shift negative",
            with(&|r| r.shift = Some(-3.0)),
            IA,
            "shift",
        ),
        (
            "shift inf",
            with(&|r| r.shift = Some(f64::INFINITY)),
            IA,
            "shift",
        ),
        (
            "jpeg_quality 0",
            with(&|r| r.jpeg_quality = Some(0)),
            IA,
            "jpeg_quality",
        ),
        (
            "jpeg_quality 101",
            with(&|r| r.jpeg_quality = Some(101)),
            IA,
            "jpeg_quality",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_their_status_while_good_requests_succeed() {
    let s = server(&["--max-prompt-bytes", "4096", "--max-steps", "100"]).await;
    let c = client(&s).await;

    // Good traffic all along.
    let stop = Arc::new(AtomicBool::new(false));
    let good_ok = Arc::new(AtomicUsize::new(0));
    let mut good = Vec::new();
    for w in 0..2 {
        let (mut c, stop, good_ok) = (c.clone(), stop.clone(), good_ok.clone());
        good.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) || i < 5 {
                let r = c.generate(small("good", w * 1000 + i)).await;
                assert!(r.is_ok(), "a good request failed: {r:?}");
                good_ok.fetch_add(1, Ordering::SeqCst);
                i += 1;
            }
        }));
    }

    let cases = bad_cases();
    let mut checked = 0;
    for (name, req, code, field) in &cases {
        for streaming in [false, true] {
            let mut c = c.clone();
            let status = if streaming {
                match c.generate_stream(req.clone()).await {
                    Ok(resp) => {
                        let mut st = resp.into_inner();
                        match st.next().await {
                            Some(Err(s)) => s,
                            other => panic!("{name} (stream): expected an error, got {other:?}"),
                        }
                    }
                    Err(s) => s,
                }
            } else {
                c.generate(req.clone()).await.expect_err(name)
            };
            assert_eq!(status.code(), *code, "{name}: {status:?}");
            assert!(
                status.message().starts_with(field),
                "{name}: message `{}` must name `{field}`",
                status.message()
            );
        }
        checked += 1;
    }
    // Not Generate requests, but bad input too.
    let mut c2 = c.clone();
    let st = c2
        .get_model(pb::GetModelRequest {
            name: "nope".into(),
        })
        .await
        .expect_err("unknown model");
    assert_eq!(st.code(), Code::NotFound);
    let st = c2
        .get_model(pb::GetModelRequest {
            name: String::new(),
        })
        .await
        .expect_err("empty name");
    assert_eq!(st.code(), Code::InvalidArgument);
    checked += 2;
    // An oversized request message.
    let mut req = small("x", 1);
    req.negative_prompt = "y".repeat(2 << 20);
    let st = c2.generate(req).await.expect_err("oversized message");
    assert_eq!(st.code(), Code::OutOfRange, "{st:?}");
    checked += 1;

    stop.store(true, Ordering::SeqCst);
    for g in good {
        g.await.expect("good traffic");
    }
    println!(
        "bad-input cases: {checked} (each unary and streaming where applicable), good requests meanwhile: {}",
        good_ok.load(Ordering::SeqCst)
    );
    assert!(checked >= 25);
    assert!(good_ok.load(Ordering::SeqCst) >= 2);
    s.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_32_concurrent_against_a_small_queue() {
    let s = server(&["--max-batch-size", "4", "--queue-capacity", "8"]).await;
    let c = client(&s).await;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut req = Request::new(small("load", i));
            req.set_timeout(Duration::from_secs(60));
            let t = Instant::now();
            let r = c.generate(req).await;
            (r.map(|r| r.into_inner().seeds), t.elapsed())
        }));
    }
    let (mut ok, mut exhausted) = (0, 0);
    let mut lat = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let (r, d) = tokio::time::timeout(Duration::from_secs(90), t)
            .await
            .expect("no request hangs")
            .expect("task");
        match r {
            Ok(seeds) => {
                assert_eq!(seeds, vec![i as u64]);
                ok += 1;
                lat.push(d.as_secs_f64() * 1e3);
            }
            Err(st) if st.code() == Code::ResourceExhausted => exhausted += 1,
            Err(st) => panic!("request {i}: unexpected {st:?}"),
        }
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| lat[((q * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1];
    println!(
        "32 concurrent, batch 4, queue 8: {ok} ok, {exhausted} RESOURCE_EXHAUSTED in {:.2?}; ok latency ms p50 {:.0} p95 {:.0} max {:.0}; largest batch {}",
        t0.elapsed(),
        p(0.5),
        p(0.95),
        lat.last().copied().unwrap_or(0.0),
        model(&s).largest_batch()
    );
    assert_eq!(ok + exhausted, 32);
    assert!(ok >= 8, "at least a queue's worth succeeds");
    assert!(exhausted >= 1, "the queue must have overflowed");
    assert!(model(&s).largest_batch() > 1, "requests were batched");
    assert!(eventually(Duration::from_secs(5), || model(&s).outstanding() == 0).await);
    // And the server still works.
    let mut c = c.clone();
    c.generate(small("after", 1)).await.expect("after the load");
    s.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_and_deadlines_free_capacity() {
    let s = server(&[
        "--max-batch-size",
        "1",
        "--queue-capacity",
        "1",
        "--max-steps",
        "1000",
    ])
    .await;
    let c = client(&s).await;
    let m = model(&s);

    // A long stream, dropped after its first step: the slot frees at the next boundary.
    let mut c1 = c.clone();
    let mut stream = c1
        .generate_stream(slow("long", 1000))
        .await
        .expect("stream")
        .into_inner();
    loop {
        match stream.next().await.expect("event").expect("ok").event {
            Some(pb::generate_event::Event::Progress(_)) => break,
            _ => continue,
        }
    }
    assert_eq!(m.outstanding(), 1);
    drop(stream);
    assert!(
        eventually(Duration::from_secs(10), || m.outstanding() == 0).await,
        "cancelled request still holds its slot"
    );
    let mut c2 = c.clone();
    c2.generate(small("after cancel", 1))
        .await
        .expect("capacity is back");

    // A unary call whose client gives up (future dropped).
    let mut c3 = c.clone();
    let call = tokio::spawn(async move { c3.generate(slow("abandoned", 1000)).await });
    assert!(
        eventually(Duration::from_secs(10), || m.steps_run() > 0
            && m.outstanding() == 1)
        .await
    );
    call.abort();
    assert!(
        eventually(Duration::from_secs(10), || m.outstanding() == 0).await,
        "aborted unary call still holds its slot"
    );

    // Deadlines: running and queued requests both end with DEADLINE_EXCEEDED.
    let mut c4 = c.clone();
    let mut req = Request::new(slow("deadline", 1000));
    req.set_timeout(Duration::from_millis(500));
    let t = Instant::now();
    let st = c4.generate(req).await.expect_err("deadline");
    assert_eq!(st.code(), Code::DeadlineExceeded, "{st:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
    let mut c5 = c.clone();
    let mut req = Request::new(slow("deadline stream", 1000));
    req.set_timeout(Duration::from_millis(300));
    let mut st = c5.generate_stream(req).await.expect("stream").into_inner();
    let mut last = None;
    while let Some(e) = st.next().await {
        if let Err(s) = e {
            last = Some(s);
        }
    }
    assert_eq!(last.map(|s| s.code()), Some(Code::DeadlineExceeded));
    assert!(
        eventually(Duration::from_secs(10), || m.outstanding() == 0).await,
        "expired requests still hold their slots"
    );
    c2.generate(small("after deadlines", 2))
        .await
        .expect("capacity is back");
    s.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_do_not_depend_on_batch_composition() {
    let s = server(&["--max-batch-size", "8", "--max-queue-delay-ms", "600"]).await;
    let c = client(&s).await;
    let mut target = small("a lighthouse at dusk", 1234);
    target.steps = Some(3);
    target.guidance_scale = Some(4.0);
    let fmt = |mut r: pb::GenerateRequest, f: pb::OutputFormat| {
        r.output_format = f as i32;
        r
    };

    let mut c1 = c.clone();
    let alone_png = c1
        .generate(target.clone())
        .await
        .expect("alone")
        .into_inner();
    let alone_lat = c1
        .generate(fmt(target.clone(), pb::OutputFormat::Latents))
        .await
        .expect("alone latents")
        .into_inner();
    let before = model(&s).largest_batch();
    assert_eq!(before, 1, "requests sent one at a time run alone");

    // The same request among others (other seeds, prompts, guidance, image counts).
    let mut others = Vec::new();
    for (i, g) in [(1u64, 7.0f32), (2, 1.0), (3, 0.0)] {
        let mut r = small(&format!("other prompt {i}"), 99 + i);
        r.steps = Some(2 + i as u32);
        r.guidance_scale = Some(g);
        others.push(r);
    }
    let mut tasks = Vec::new();
    for r in others.iter().cloned().chain([
        target.clone(),
        fmt(target.clone(), pb::OutputFormat::Latents),
    ]) {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move { c.generate(r).await }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.expect("task").expect("batched").into_inner());
    }
    assert!(
        model(&s).largest_batch() >= 5,
        "they were batched: {}",
        model(&s).largest_batch()
    );
    let batched_png = &results[3];
    let batched_lat = &results[4];
    assert_eq!(
        batched_lat.images[0].data, alone_lat.images[0].data,
        "latents bit-identical"
    );
    assert_eq!(
        batched_png.images[0].data, alone_png.images[0].data,
        "PNG bit-identical"
    );

    // Joining a batch that is already running (at a step boundary), next to a request
    // of another size (another batch group) and one with two images.
    let mut c2 = c.clone();
    let mut long = small("a long one", 5);
    long.steps = Some(40);
    let mut running = c2.generate_stream(long).await.expect("long").into_inner();
    loop {
        let e = running.next().await.expect("event").expect("ok");
        if matches!(e.event, Some(pb::generate_event::Event::Progress(_))) {
            break;
        }
    }
    let steps_before = model(&s).steps_run();
    let mut other_size = small("other size", 6);
    other_size.width = Some(80);
    let mut two = small("two images", 7);
    two.num_images = Some(2);
    let mut tasks = Vec::new();
    for r in [
        other_size,
        two,
        fmt(target.clone(), pb::OutputFormat::Latents),
    ] {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move { c.generate(r).await }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.expect("task").expect("joined").into_inner());
    }
    assert_eq!(
        results[2].images[0].data, alone_lat.images[0].data,
        "bit-identical after joining a running batch"
    );
    let mut long_done = false;
    while let Some(e) = running.next().await {
        if let Some(pb::generate_event::Event::Result(_)) = e.expect("long request").event {
            long_done = true;
        }
    }
    assert!(long_done);
    assert!(model(&s).steps_run() > steps_before);
    s.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_on_everything_but_health() {
    let s = server(&["--auth-token", "s3cret"]).await;
    let ch = channel(&s).await;
    let mut plain = pb::diffusion_client::DiffusionClient::new(ch.clone());
    let st = plain.generate(small("x", 1)).await.expect_err("no token");
    assert_eq!(st.code(), Code::Unauthenticated);
    let st = plain
        .list_models(pb::ListModelsRequest {})
        .await
        .expect_err("no token");
    assert_eq!(st.code(), Code::Unauthenticated);

    let mut wrong = Request::new(pb::ListModelsRequest {});
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer nope".parse().expect("header"));
    assert_eq!(
        plain.list_models(wrong).await.expect_err("wrong").code(),
        Code::Unauthenticated
    );

    let mut authed =
        pb::diffusion_client::DiffusionClient::with_interceptor(ch.clone(), |mut r: Request<()>| {
            r.metadata_mut()
                .insert("authorization", "Bearer s3cret".parse().expect("header"));
            Ok(r)
        });
    authed
        .generate(small("x", 1))
        .await
        .expect("with the token");

    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    for service in ["", "tiny"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health needs no token")
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
    s.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_loading_then_serving_and_failed_models() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = format!("broken={}", dir.path().display());
    let s = sd_serve::start(args(&["--model", &bad]))
        .await
        .expect("start");
    let ch = channel(&s).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let check = |service: &'static str| {
        let mut h = health.clone();
        async move {
            h.check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("check")
            .into_inner()
            .status
        }
    };
    use tonic_health::pb::health_check_response::ServingStatus;
    let serving = ServingStatus::Serving as i32;
    let not_serving = ServingStatus::NotServing as i32;
    let until = Instant::now() + Duration::from_secs(30);
    while check("tiny").await != serving {
        assert!(Instant::now() < until, "tiny never became SERVING");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(check("broken").await, not_serving);
    assert_eq!(check("").await, not_serving, "overall needs every model");
    let st = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "nope".into(),
        })
        .await
        .expect_err("unknown service");
    assert_eq!(st.code(), Code::NotFound);

    let mut c = pb::diffusion_client::DiffusionClient::new(ch);
    let mut req = small("x", 1);
    req.model = "broken".into();
    assert_eq!(
        c.generate(req).await.expect_err("failed model").code(),
        Code::Unavailable
    );
    let mut req = small("x", 1);
    req.model = String::new();
    assert_eq!(
        c.generate(req).await.expect_err("ambiguous").code(),
        Code::InvalidArgument,
        "model is required with two models"
    );
    let mut req = small("x", 1);
    req.model = "tiny".into();
    c.generate(req).await.expect("the good model serves");
    let info = c
        .get_model(pb::GetModelRequest {
            name: "broken".into(),
        })
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.state, pb::ModelState::Failed as i32);
    assert!(!info.error.is_empty());
    s.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_drain_finishes_in_flight_and_refuses_new() {
    let s = server(&["--grace-period-secs", "30"]).await;
    let c = client(&s).await;
    let mut c1 = c.clone();
    let mut stream = c1
        .generate_stream(slow("in flight", 20))
        .await
        .expect("stream")
        .into_inner();
    while let Some(e) = stream.next().await {
        if matches!(
            e.expect("event").event,
            Some(pb::generate_event::Event::Progress(_))
        ) {
            break;
        }
    }
    let shared = s.shared.clone();
    let stopping = tokio::spawn(s.shutdown());
    assert!(
        eventually(Duration::from_secs(5), || shared
            .draining
            .load(Ordering::SeqCst))
        .await
    );
    let mut c2 = c.clone();
    let st = c2.generate(small("late", 1)).await.expect_err("draining");
    assert_eq!(st.code(), Code::Unavailable);
    let mut result = None;
    while let Some(e) = stream.next().await {
        if let Some(pb::generate_event::Event::Result(r)) = e.expect("in-flight event").event {
            result = Some(r);
        }
    }
    assert!(result.is_some(), "the in-flight request finished");
    stopping.await.expect("task").expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_and_plaintext_is_refused() {
    let dir = root().join("crates/sd-serve/tests/fixtures/tls");
    let cert = dir.join("server.pem");
    let key = dir.join("server.key");
    let (cert, key) = (cert.to_string_lossy(), key.to_string_lossy());
    let s = server(&["--tls-cert", &cert, "--tls-key", &key]).await;
    let ca = std::fs::read(dir.join("ca.pem")).expect("ca.pem");
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .domain_name("localhost");
    let ch = tonic::transport::Endpoint::from_shared(format!("https://{}", s.addr))
        .expect("endpoint")
        .tls_config(tls)
        .expect("tls config")
        .connect()
        .await
        .expect("TLS connect");
    let mut c = pb::diffusion_client::DiffusionClient::new(ch);
    let r = c
        .generate(small("over tls", 9))
        .await
        .expect("generate over TLS");
    assert_eq!(r.into_inner().seeds, vec![9]);

    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", s.addr))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await;
    if let Ok(ch) = plain {
        let mut c = pb::diffusion_client::DiffusionClient::new(ch);
        assert!(
            c.list_models(pb::ListModelsRequest {}).await.is_err(),
            "plaintext accepted"
        );
    }
    s.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let s = server(&[]).await;
    let mut c = ServerReflectionClient::new(channel(&s).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = c
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .expect("reflection")
        .into_inner();
    let msg = resp.next().await.expect("a response").expect("ok");
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("unexpected {msg:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["sd.v1.Diffusion", "grpc.health.v1.Health"] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    s.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_requests_see_their_position_and_leave_when_cancelled() {
    let s = server(&[
        "--max-batch-size",
        "1",
        "--queue-capacity",
        "2",
        "--max-steps",
        "1000",
    ])
    .await;
    let c = client(&s).await;
    let m = model(&s);
    use pb::generate_event::Event;
    let first_event = |mut c: pb::diffusion_client::DiffusionClient<tonic::transport::Channel>,
                       req: pb::GenerateRequest| async move {
        let mut st = c.generate_stream(req).await.expect("stream").into_inner();
        let e = st.next().await.expect("event").expect("ok").event;
        (st, e)
    };
    // A runs; B and C wait at positions 0 and 1; the queue is full.
    let (mut a, _) = first_event(c.clone(), slow("a", 1000)).await;
    loop {
        if let Some(Event::Progress(_)) = a.next().await.expect("a").expect("a ok").event {
            break;
        }
    }
    let (b, e) = first_event(c.clone(), slow("b", 10)).await;
    assert!(
        matches!(e, Some(Event::Queued(pb::Queued { position: 0 }))),
        "{e:?}"
    );
    let (mut cc, e) = first_event(c.clone(), small("c", 3)).await;
    assert!(
        matches!(e, Some(Event::Queued(pb::Queued { position: 1 }))),
        "{e:?}"
    );
    let mut c4 = c.clone();
    let st = c4.generate(small("d", 4)).await.expect_err("queue full");
    assert_eq!(st.code(), Code::ResourceExhausted);

    // B gives up while queued: C moves up to position 0.
    drop(b);
    let e = cc.next().await.expect("c event").expect("c ok").event;
    assert!(
        matches!(e, Some(Event::Queued(pb::Queued { position: 0 }))),
        "{e:?}"
    );
    assert!(eventually(Duration::from_secs(5), || m.queue_depth() == 1).await);
    // A gives up: C runs and finishes.
    drop(a);
    let mut done = false;
    while let Some(e) = cc.next().await {
        if let Some(Event::Result(r)) = e.expect("c stream").event {
            assert_eq!(r.seeds, vec![3]);
            done = true;
        }
    }
    assert!(done);
    assert!(eventually(Duration::from_secs(5), || m.outstanding() == 0).await);
    s.shutdown().await.expect("shutdown");
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_dir_serves_every_checkpoint() {
    use sd_serve::Parser as _;
    // A directory of its own: two checkpoints (symlinked) and something else.
    let tmp = tempfile::tempdir().expect("tempdir");
    for m in ["tiny-sd3", "tiny-sd35l-no-t5"] {
        std::os::unix::fs::symlink(root().join("models").join(m), tmp.path().join(m))
            .expect("symlink");
    }
    std::fs::create_dir(tmp.path().join("not-a-model")).expect("mkdir");
    let dir = tmp.path().to_string_lossy();
    let args = sd_serve::ServeArgs::try_parse_from([
        "sd-serve",
        "--listen",
        "127.0.0.1:0",
        "--models-dir",
        &dir,
        "--precision",
        "bf16",
    ])
    .expect("args");
    let s = sd_serve::start(args).await.expect("start");
    s.wait_ready(Duration::from_secs(60)).await.expect("ready");
    let mut c = client(&s).await;
    let models = c
        .list_models(pb::ListModelsRequest {})
        .await
        .expect("list")
        .into_inner()
        .models;
    let names: Vec<_> = models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["tiny-sd3", "tiny-sd35l-no-t5"]);
    for m in &models {
        assert!(m.precision.contains("bf16"), "{}", m.precision);
        let mut req = small("every model", 1);
        req.model = m.name.clone();
        let r = c.generate(req).await.expect("generate").into_inner();
        assert_eq!(r.model, m.name);
    }
    s.shutdown().await.expect("shutdown");
}
