//! The `sd.v1.Diffusion` service: validation before queueing, then the model's queue.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::Stream;
use sd_pipeline::GenerateRequest;
use sd_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::model::ModelDescription;
use crate::output::OutputFormat;
use crate::worker::{Event, Job, JobSpec, ModelHandle, ModelState, record_request};

/// Request limits set by the operator (on top of each model's own limits).
#[derive(Clone, Debug)]
pub struct RequestLimits {
    /// Most denoising steps per request.
    pub max_steps: usize,
    /// Most images per request (also capped by the model's max batch size).
    pub max_images: usize,
    /// Most bytes of each prompt field.
    pub max_prompt_bytes: usize,
    /// The largest response message; requests whose raw images could not fit are refused.
    pub max_response_bytes: usize,
}

pub const DEFAULT_STEPS: usize = 28;
pub const DEFAULT_GUIDANCE: f32 = 7.0;
pub const DEFAULT_MAX_SEQUENCE_LENGTH: usize = 256;
pub const DEFAULT_JPEG_QUALITY: u32 = 90;
/// Subtracted from the client's deadline so that this server, not tonic's timeout
/// layer (which answers CANCELLED), reports DEADLINE_EXCEEDED.
const DEADLINE_MARGIN: Duration = Duration::from_millis(20);

pub struct Shared {
    pub models: BTreeMap<String, Arc<ModelHandle>>,
    pub limits: RequestLimits,
    pub draining: AtomicBool,
}

impl Shared {
    fn resolve(&self, name: &str) -> Result<&Arc<ModelHandle>, Status> {
        if name.is_empty() {
            if self.models.len() == 1
                && let Some(m) = self.models.values().next()
            {
                return Ok(m);
            }
            return Err(Status::invalid_argument(format!(
                "model: required when the server has several models ({})",
                self.names()
            )));
        }
        self.models.get(name).ok_or_else(|| {
            Status::invalid_argument(format!(
                "model: unknown model `{}` (available: {})",
                truncate(name, 64),
                self.names()
            ))
        })
    }
    fn names(&self) -> String {
        self.models.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    pub fn model_info(&self, h: &ModelHandle) -> pb::ModelInfo {
        let d = h.description();
        let l = d.as_ref().map(|d| d.limits.clone());
        let max_images = self.limits.max_images.min(h.settings.max_batch_size);
        pb::ModelInfo {
            name: h.name.clone(),
            target: d.as_ref().map(|d| d.target.clone()).unwrap_or_default(),
            precision: d.as_ref().map(|d| d.precision.clone()).unwrap_or_default(),
            device: d.as_ref().map(|d| d.device.clone()).unwrap_or_default(),
            engine_id: d.as_ref().map(|d| d.engine_id.clone()).unwrap_or_default(),
            min_size: l.as_ref().map_or(0, |l| l.size_multiple as u32),
            max_size: l.as_ref().map_or(0, |l| l.max_size as u32),
            size_multiple: l.as_ref().map_or(0, |l| l.size_multiple as u32),
            default_size: l.as_ref().map_or(0, |l| l.default_size as u32),
            max_steps: l
                .as_ref()
                .map_or(0, |l| l.max_steps.min(self.limits.max_steps) as u32),
            max_images: max_images as u32,
            max_sequence_length: l.as_ref().map_or(0, |l| l.max_sequence_length as u32),
            state: h.state().to_proto() as i32,
            error: h.error(),
            max_batch_size: h.settings.max_batch_size as u32,
            queue_capacity: h.settings.queue_capacity as u32,
        }
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Checks every field of `req` against the model and the operator's limits and builds
/// the job. Every refusal is INVALID_ARGUMENT with a message starting with the field.
pub fn validate(
    req: &pb::GenerateRequest,
    model: &str,
    desc: &ModelDescription,
    limits: &RequestLimits,
    max_batch_size: usize,
) -> Result<JobSpec, Status> {
    let bad = |field: &str, reason: String| Status::invalid_argument(format!("{field}: {reason}"));
    if req.prompt.trim().is_empty() {
        return Err(bad("prompt", "must not be empty".into()));
    }
    let texts = [
        ("prompt", Some(&req.prompt)),
        ("prompt_2", req.prompt_2.as_ref()),
        ("prompt_3", req.prompt_3.as_ref()),
        ("negative_prompt", Some(&req.negative_prompt)),
        ("negative_prompt_2", req.negative_prompt_2.as_ref()),
        ("negative_prompt_3", req.negative_prompt_3.as_ref()),
    ];
    for (field, text) in texts {
        if let Some(t) = text {
            if t.len() > limits.max_prompt_bytes {
                return Err(bad(
                    field,
                    format!(
                        "{} bytes exceeds the limit of {} bytes",
                        t.len(),
                        limits.max_prompt_bytes
                    ),
                ));
            }
            if t.contains('\0') {
                return Err(bad(field, "must not contain NUL characters".into()));
            }
        }
    }
    let l = &desc.limits;
    let size = |field: &str, v: Option<u32>| -> Result<usize, Status> {
        let v = v.map_or(l.default_size, |v| v as usize);
        if v == 0 || !v.is_multiple_of(l.size_multiple.max(1)) {
            return Err(bad(
                field,
                format!("{v} is not a positive multiple of {}", l.size_multiple),
            ));
        }
        if v < l.size_multiple || v > l.max_size {
            return Err(bad(
                field,
                format!(
                    "{v} is outside this model's range {}..={}",
                    l.size_multiple, l.max_size
                ),
            ));
        }
        Ok(v)
    };
    let width = size("width", req.width)?;
    let height = size("height", req.height)?;
    let max_steps = l.max_steps.min(limits.max_steps);
    let steps = req
        .steps
        .map_or(DEFAULT_STEPS.min(max_steps), |s| s as usize);
    if steps == 0 || steps > max_steps {
        return Err(bad("steps", format!("{steps} is outside 1..={max_steps}")));
    }
    let guidance_scale = req.guidance_scale.unwrap_or(DEFAULT_GUIDANCE);
    if !guidance_scale.is_finite() || guidance_scale < 0.0 {
        return Err(bad(
            "guidance_scale",
            format!("{guidance_scale} must be finite and >= 0"),
        ));
    }
    let max_images = limits.max_images.min(max_batch_size).max(1);
    let num_images = req.num_images.map_or(1, |n| n as usize);
    if num_images == 0 || num_images > max_images {
        return Err(bad(
            "num_images",
            format!("{num_images} is outside 1..={max_images}"),
        ));
    }
    let max_seq = l.max_sequence_length;
    let max_sequence_length = req
        .max_sequence_length
        .map_or(DEFAULT_MAX_SEQUENCE_LENGTH.min(max_seq), |n| n as usize);
    if max_sequence_length == 0 || max_sequence_length > max_seq {
        return Err(bad(
            "max_sequence_length",
            format!("{max_sequence_length} is outside 1..={max_seq}"),
        ));
    }
    if let Some(s) = req.shift
        && !(s.is_finite() && s > 0.0)
    {
        return Err(bad("shift", format!("{s} must be finite and > 0")));
    }
    let quality = req.jpeg_quality.unwrap_or(DEFAULT_JPEG_QUALITY);
    if !(1..=100).contains(&quality) {
        return Err(bad("jpeg_quality", format!("{quality} is outside 1..=100")));
    }
    let format = match pb::OutputFormat::try_from(req.output_format) {
        Ok(pb::OutputFormat::Unspecified | pb::OutputFormat::Png) => OutputFormat::Png,
        Ok(pb::OutputFormat::Jpeg) => OutputFormat::Jpeg {
            quality: quality as u8,
        },
        Ok(pb::OutputFormat::Webp) => OutputFormat::Webp,
        Ok(pb::OutputFormat::Latents) => OutputFormat::Latents,
        Err(_) => {
            return Err(bad(
                "output_format",
                format!(
                    "unknown format {} (PNG=1, JPEG=2, WEBP=3, LATENTS=4)",
                    req.output_format
                ),
            ));
        }
    };
    // Raw RGB is an upper bound of every encoding's size (plus headers).
    let raw = num_images * (width * height * 3 + 4096);
    if raw > limits.max_response_bytes {
        return Err(bad(
            "num_images",
            format!(
                "{num_images} images of {width}x{height} may exceed the response limit of {} bytes",
                limits.max_response_bytes
            ),
        ));
    }
    let seed = req.seed.unwrap_or_else(rand::random::<u64>);
    let seeds = (0..num_images as u64)
        .map(|i| seed.wrapping_add(i))
        .collect();
    Ok(JobSpec {
        request: GenerateRequest {
            prompt: req.prompt.clone(),
            prompt_2: req.prompt_2.clone(),
            prompt_3: req.prompt_3.clone(),
            negative_prompt: req.negative_prompt.clone(),
            negative_prompt_2: req.negative_prompt_2.clone(),
            negative_prompt_3: req.negative_prompt_3.clone(),
            width,
            height,
            steps,
            guidance_scale,
            seed,
            max_sequence_length,
            shift: req.shift,
            latents: None,
        },
        seeds,
        format,
        preview_every: req.preview_every,
        model: model.to_string(),
    })
}

/// Parses a `grpc-timeout` header value (`<digits><H|M|S|m|u|n>`).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn deadline_of<T>(req: &Request<T>) -> Option<Instant> {
    let timeout = req
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)?;
    Some(Instant::now() + timeout.saturating_sub(DEADLINE_MARGIN))
}

#[derive(Clone)]
pub struct DiffusionService {
    pub shared: Arc<Shared>,
}

type EventReceiver = mpsc::UnboundedReceiver<Result<Event, Status>>;

impl DiffusionService {
    /// Validates and queues; returns the model name, queue position and event receiver.
    fn submit(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<(String, usize, EventReceiver, Option<Instant>), Status> {
        let deadline = deadline_of(&req);
        let req = req.into_inner();
        let handle = self.shared.resolve(&req.model).inspect_err(|s| {
            record_request("", s.code());
        })?;
        let name = handle.name.clone();
        let result = (|| {
            if self.shared.draining.load(Ordering::SeqCst) {
                return Err(Status::unavailable("the server is shutting down"));
            }
            let desc = match (handle.state(), handle.description()) {
                (ModelState::Serving, Some(d)) => d,
                _ => {
                    return Err(match handle.state() {
                        ModelState::Failed => Status::unavailable(format!(
                            "model `{name}` failed to load: {}",
                            handle.error()
                        )),
                        ModelState::Draining => Status::unavailable("the server is shutting down"),
                        _ => Status::unavailable(format!("model `{name}` is still loading")),
                    });
                }
            };
            let spec = validate(
                &req,
                &name,
                &desc,
                &self.shared.limits,
                handle.settings.max_batch_size,
            )?;
            let (tx, rx) = mpsc::unbounded_channel();
            let position = handle.submit(Job::new(spec, deadline, tx))?;
            Ok((position, rx))
        })();
        match result {
            Ok((position, rx)) => Ok((name, position, rx, deadline)),
            Err(s) => {
                record_request(&name, s.code());
                Err(s)
            }
        }
    }
}

/// Next event, or DEADLINE_EXCEEDED once the deadline passes; `None` when the worker
/// dropped the job without answering (shut down).
async fn next_event(
    rx: &mut EventReceiver,
    deadline: Option<Instant>,
) -> Option<Result<Event, Status>> {
    match deadline {
        Some(d) => {
            match tokio::time::timeout_at(tokio::time::Instant::from_std(d), rx.recv()).await {
                Ok(e) => e,
                Err(_) => Some(Err(Status::deadline_exceeded(
                    "the deadline passed before the images were done",
                ))),
            }
        }
        None => rx.recv().await,
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::diffusion_server::Diffusion for DiffusionService {
    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let (_, _, mut rx, deadline) = self.submit(request)?;
        loop {
            match next_event(&mut rx, deadline).await {
                Some(Ok(Event::Progress(_) | Event::Queued(_))) => {}
                Some(Ok(Event::Done(r))) => return Ok(Response::new(r)),
                Some(Err(s)) => return Err(s),
                None => return Err(Status::unavailable("the server shut down")),
            }
        }
    }

    type GenerateStreamStream = EventStream;

    async fn generate_stream(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let (_, position, rx, deadline) = self.submit(request)?;
        let first = pb::GenerateEvent {
            event: Some(pb::generate_event::Event::Queued(pb::Queued {
                position: position as u32,
            })),
        };
        // State: (receiver, finished).
        let rest = futures::stream::unfold((rx, false), move |(mut rx, finished)| async move {
            if finished {
                return None;
            }
            let item = match next_event(&mut rx, deadline).await {
                Some(Ok(Event::Queued(position))) => Ok(pb::GenerateEvent {
                    event: Some(pb::generate_event::Event::Queued(pb::Queued { position })),
                }),
                Some(Ok(Event::Progress(p))) => Ok(pb::GenerateEvent {
                    event: Some(pb::generate_event::Event::Progress(p)),
                }),
                Some(Ok(Event::Done(r))) => {
                    return Some((
                        Ok(pb::GenerateEvent {
                            event: Some(pb::generate_event::Event::Result(r)),
                        }),
                        (rx, true),
                    ));
                }
                Some(Err(s)) => return Some((Err(s), (rx, true))),
                None => {
                    return Some((Err(Status::unavailable("the server shut down")), (rx, true)));
                }
            };
            Some((item, (rx, false)))
        });
        let stream = futures::StreamExt::chain(futures::stream::once(async { Ok(first) }), rest);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        Ok(Response::new(pb::ListModelsResponse {
            models: self
                .shared
                .models
                .values()
                .map(|h| self.shared.model_info(h))
                .collect(),
        }))
    }

    async fn get_model(
        &self,
        request: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let name = &request.get_ref().name;
        if name.is_empty() {
            return Err(Status::invalid_argument("name: must not be empty"));
        }
        match self.shared.models.get(name) {
            Some(h) => Ok(Response::new(self.shared.model_info(h))),
            None => Err(Status::not_found(format!(
                "no model named `{}` (available: {})",
                truncate(name, 64),
                self.shared.names()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("12x"), None);
        assert_eq!(parse_grpc_timeout("1234567890S"), None);
    }
}
