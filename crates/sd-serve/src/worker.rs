//! One owner thread per model: a bounded queue in front of a step-level
//! continuous-batching loop.
//!
//! The loop admits queued jobs whenever the running batch has free image slots (FIFO,
//! at a step boundary), runs one denoising step for every group of compatible images
//! (same [`BatchKey`]) in one `step` call each, reports progress, finishes and answers
//! jobs whose images are done, and drops jobs whose client went away (cancelled, or the
//! deadline passed) at the next step boundary, freeing their slots.

use std::collections::{HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sd_pipeline::{GenerateRequest, PipelineError};
use sd_proto::v1 as pb;
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::model::{BatchKey, ModelDescription, ServedModel};
use crate::output::{OutputFormat, encode_image, preview_png};

/// Batching and queueing settings of one model.
#[derive(Clone, Debug)]
pub struct BatchSettings {
    /// Most images denoised together (each job counts `num_images`).
    pub max_batch_size: usize,
    /// How long an idle model waits for more jobs to fill a batch before starting.
    pub max_queue_delay: Duration,
    /// Most jobs waiting to be admitted; more are refused with RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
}

/// What the server decided about a request before queueing it.
#[derive(Clone, Debug)]
pub struct JobSpec {
    /// The pipeline request of the first image (`seed` = `seeds[0]`).
    pub request: GenerateRequest,
    pub seeds: Vec<u64>,
    pub format: OutputFormat,
    pub preview_every: u32,
    /// The model name, for the parameters embedded in PNGs.
    pub model: String,
}

#[derive(Debug)]
pub enum Event {
    /// The request's queue position changed.
    Queued(u32),
    Progress(pb::Progress),
    Done(pb::GenerateResponse),
}

pub type EventSender = mpsc::UnboundedSender<Result<Event, Status>>;

/// Counts a job as outstanding until it is dropped (answered or abandoned).
#[derive(Debug)]
struct Outstanding(Arc<AtomicUsize>);

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct Job {
    pub spec: JobSpec,
    pub accepted: Instant,
    pub deadline: Option<Instant>,
    pub events: EventSender,
    outstanding: Option<Outstanding>,
    position: usize,
}

impl Job {
    pub fn new(spec: JobSpec, deadline: Option<Instant>, events: EventSender) -> Self {
        Self {
            spec,
            accepted: Instant::now(),
            deadline,
            events,
            outstanding: None,
            position: 0,
        }
    }
    fn images(&self) -> usize {
        self.spec.seeds.len()
    }
    /// Why this job should no longer run, if so.
    fn abandoned(&self, now: Instant) -> Option<Status> {
        match self.deadline {
            Some(d) if now >= d => Some(Status::deadline_exceeded(
                "the deadline passed before the images were done",
            )),
            _ if self.events.is_closed() => {
                Some(Status::cancelled("the client cancelled the request"))
            }
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelState {
    Loading,
    Warming,
    Serving,
    Failed,
    Draining,
}

impl ModelState {
    pub fn to_proto(self) -> pb::ModelState {
        match self {
            Self::Loading => pb::ModelState::Loading,
            Self::Warming => pb::ModelState::Warming,
            Self::Serving => pb::ModelState::Serving,
            Self::Failed => pb::ModelState::Failed,
            Self::Draining => pb::ModelState::Draining,
        }
    }
}

struct Queue {
    jobs: VecDeque<Job>,
    /// Set by [`ModelHandle::close`]: answer everything UNAVAILABLE and exit.
    closed: bool,
}

struct Info {
    description: Option<ModelDescription>,
    error: String,
}

/// The server's side of a model: its queue, state and description.
pub struct ModelHandle {
    pub name: String,
    pub settings: BatchSettings,
    queue: Mutex<Queue>,
    wake: Condvar,
    info: Mutex<Info>,
    state: watch::Sender<ModelState>,
    outstanding: Arc<AtomicUsize>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Denoising calls made, and the most images one of them carried.
    steps_run: AtomicUsize,
    largest_batch: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ModelHandle {
    /// Starts the owner thread; `load` runs on it, then warm-up, then the loop.
    pub fn spawn<M, L>(name: String, settings: BatchSettings, load: L) -> Arc<Self>
    where
        M: ServedModel,
        L: FnOnce() -> Result<M, PipelineError> + Send + 'static,
    {
        let (state, _) = watch::channel(ModelState::Loading);
        let handle = Arc::new(Self {
            name: name.clone(),
            settings: BatchSettings {
                max_batch_size: settings.max_batch_size.max(1),
                ..settings
            },
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                closed: false,
            }),
            wake: Condvar::new(),
            info: Mutex::new(Info {
                description: None,
                error: String::new(),
            }),
            state,
            outstanding: Arc::new(AtomicUsize::new(0)),
            thread: Mutex::new(None),
            steps_run: AtomicUsize::new(0),
            largest_batch: AtomicUsize::new(0),
        });
        let h = handle.clone();
        let encoder = tokio::runtime::Handle::try_current().ok();
        let spawned = std::thread::Builder::new()
            .name(format!("model-{name}"))
            .spawn(move || owner_thread(&h, load, encoder.as_ref()));
        match spawned {
            Ok(t) => *lock(&handle.thread) = Some(t),
            Err(e) => handle.fail(format!("cannot start the model thread: {e}")),
        }
        handle
    }

    pub fn state(&self) -> ModelState {
        *self.state.borrow()
    }
    pub fn watch_state(&self) -> watch::Receiver<ModelState> {
        self.state.subscribe()
    }
    fn set_state(&self, s: ModelState) {
        self.state.send_replace(s);
        metrics::gauge!("sd_model_state", "model" => self.name.clone()).set(match s {
            ModelState::Loading => 0.0,
            ModelState::Warming => 1.0,
            ModelState::Serving => 2.0,
            ModelState::Failed => 3.0,
            ModelState::Draining => 4.0,
        });
    }
    fn fail(&self, error: String) {
        tracing::error!(model = %self.name, "{error}");
        lock(&self.info).error = error;
        self.set_state(ModelState::Failed);
    }
    pub fn description(&self) -> Option<ModelDescription> {
        lock(&self.info).description.clone()
    }
    pub fn error(&self) -> String {
        lock(&self.info).error.clone()
    }
    /// Jobs accepted and not yet answered (queued or running).
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::SeqCst)
    }
    /// Denoising calls made so far.
    pub fn steps_run(&self) -> usize {
        self.steps_run.load(Ordering::SeqCst)
    }
    /// The most images one denoising call has carried.
    pub fn largest_batch(&self) -> usize {
        self.largest_batch.load(Ordering::SeqCst)
    }
    pub fn queue_depth(&self) -> usize {
        lock(&self.queue).jobs.len()
    }

    /// Queues a job; returns its position (0 = next).
    pub fn submit(&self, mut job: Job) -> Result<usize, Status> {
        let mut q = lock(&self.queue);
        match self.state() {
            ModelState::Serving => {}
            ModelState::Draining => {
                return Err(Status::unavailable("the server is shutting down"));
            }
            ModelState::Failed => {
                return Err(Status::unavailable(format!(
                    "model `{}` failed to load: {}",
                    self.name,
                    self.error()
                )));
            }
            ModelState::Loading | ModelState::Warming => {
                return Err(Status::unavailable(format!(
                    "model `{}` is still loading",
                    self.name
                )));
            }
        }
        if q.closed {
            return Err(Status::unavailable("the server is shutting down"));
        }
        if q.jobs.len() >= self.settings.queue_capacity {
            // Requests abandoned while queued give their places back first.
            purge_abandoned(&self.name, &mut q.jobs);
        }
        if q.jobs.len() >= self.settings.queue_capacity {
            return Err(Status::resource_exhausted(format!(
                "model `{}`: queue full ({} waiting); retry later",
                self.name,
                q.jobs.len()
            )));
        }
        self.outstanding.fetch_add(1, Ordering::SeqCst);
        job.outstanding = Some(Outstanding(self.outstanding.clone()));
        let position = q.jobs.len();
        job.position = position;
        q.jobs.push_back(job);
        metrics::gauge!("sd_queue_depth", "model" => self.name.clone()).set(q.jobs.len() as f64);
        drop(q);
        self.wake.notify_all();
        Ok(position)
    }

    /// Stops taking jobs (new ones get UNAVAILABLE); running ones continue.
    pub fn drain(&self) {
        if self.state() == ModelState::Serving {
            self.set_state(ModelState::Draining);
        }
    }

    /// Answers every queued and running job UNAVAILABLE and stops the owner thread.
    pub fn close(&self) {
        lock(&self.queue).closed = true;
        self.wake.notify_all();
    }

    /// Waits for the owner thread after [`Self::close`].
    pub fn join(&self) {
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }

    /// Takes jobs that fit into `free` image slots. With nothing running, first waits
    /// for a job, then up to `max_queue_delay` for a full batch. `None`: closed.
    fn take_jobs(&self, running_images: usize) -> Option<Vec<Job>> {
        let mut q = lock(&self.queue);
        if running_images == 0 {
            while q.jobs.is_empty() && !q.closed {
                q = self.wake.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            if let Some(first) = q.jobs.front() {
                let until = first.accepted + self.settings.max_queue_delay;
                loop {
                    let queued: usize = q.jobs.iter().map(Job::images).sum();
                    let now = Instant::now();
                    if q.closed || queued >= self.settings.max_batch_size || now >= until {
                        break;
                    }
                    q = self
                        .wake
                        .wait_timeout(q, until - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
        if q.closed {
            for job in q.jobs.drain(..) {
                let _ = job
                    .events
                    .send(Err(Status::unavailable("the server shut down")));
            }
            return None;
        }
        let mut taken = Vec::new();
        let mut used = running_images;
        while let Some(front) = q.jobs.front() {
            if used > 0 && used + front.images() > self.settings.max_batch_size {
                break;
            }
            used += front.images();
            taken.extend(q.jobs.pop_front());
        }
        purge_abandoned(&self.name, &mut q.jobs);
        for (i, job) in q.jobs.iter_mut().enumerate() {
            if job.position != i {
                job.position = i;
                let _ = job.events.send(Ok(Event::Queued(i as u32)));
            }
        }
        metrics::gauge!("sd_queue_depth", "model" => self.name.clone()).set(q.jobs.len() as f64);
        Some(taken)
    }
}

/// Drops queued jobs whose client went away or whose deadline passed.
fn purge_abandoned(model: &str, jobs: &mut VecDeque<Job>) {
    let now = Instant::now();
    jobs.retain(|job| match job.abandoned(now) {
        Some(status) => {
            record_request(model, status.code());
            let _ = job.events.send(Err(status));
            false
        }
        None => true,
    });
}

/// A job in the running batch.
struct Active<S> {
    job: Job,
    key: BatchKey,
    images: Vec<S>,
    admitted: Instant,
    text_encoding: Duration,
    denoise_start: Instant,
    failed: Option<Status>,
}

fn status_of(e: &PipelineError) -> Status {
    match e {
        PipelineError::InvalidRequest { field, reason } => {
            Status::invalid_argument(format!("{field}: {reason}"))
        }
        PipelineError::Cancelled => Status::cancelled("cancelled"),
        other => Status::internal(other.to_string()),
    }
}

fn panic_status(what: &str) -> Status {
    Status::internal(format!("internal error while {what} (see the server log)"))
}

fn owner_thread<M, L>(handle: &ModelHandle, load: L, encoder: Option<&tokio::runtime::Handle>)
where
    M: ServedModel,
    L: FnOnce() -> Result<M, PipelineError>,
{
    let t0 = Instant::now();
    let mut model = match catch_unwind(AssertUnwindSafe(load)) {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => return handle.fail(format!("loading: {e}")),
        Err(_) => return handle.fail("loading panicked".into()),
    };
    let description = model.describe();
    tracing::info!(model = %handle.name, engine = %description.engine_id, device = %description.device,
        "loaded in {:.2?}; warming up", t0.elapsed());
    lock(&handle.info).description = Some(description);
    handle.set_state(ModelState::Warming);
    let t1 = Instant::now();
    match catch_unwind(AssertUnwindSafe(|| model.warm_up())) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return handle.fail(format!("warm-up: {e}")),
        Err(_) => return handle.fail("warm-up panicked".into()),
    }
    tracing::info!(model = %handle.name, "warm in {:.2?}; serving", t1.elapsed());
    handle.set_state(ModelState::Serving);
    run_batches(handle, &model, encoder);
    tracing::info!(model = %handle.name, "owner thread stopped");
}

fn run_batches<M: ServedModel>(
    handle: &ModelHandle,
    model: &M,
    encoder: Option<&tokio::runtime::Handle>,
) {
    let name = handle.name.clone();
    let mut active: Vec<Active<M::State>> = Vec::new();
    let mut recent: VecDeque<(Instant, usize)> = VecDeque::new();
    let mut memory_reported: Option<Instant> = None;
    loop {
        if memory_reported.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
            memory_reported = Some(Instant::now());
            if let Some((used, total)) = model.device_memory() {
                metrics::gauge!("sd_device_memory_bytes", "model" => name.clone(), "kind" => "used")
                    .set(used as f64);
                metrics::gauge!("sd_device_memory_bytes", "model" => name.clone(), "kind" => "total")
                    .set(total as f64);
            }
        }
        let running: usize = active.iter().map(|a| a.images.len()).sum();
        let Some(new) = handle.take_jobs(running) else {
            for a in active.drain(..) {
                let _ = a
                    .job
                    .events
                    .send(Err(Status::unavailable("the server shut down")));
            }
            return;
        };
        for job in new {
            if let Some(a) = admit(model, job, &name) {
                active.push(a);
            }
        }
        // Step boundary: drop what nobody waits for any more.
        let now = Instant::now();
        active.retain(|a| match a.job.abandoned(now) {
            Some(status) => {
                tracing::info!(model = %name, code = ?status.code(), "dropping request at a step boundary");
                record_request(&name, status.code());
                let _ = a.job.events.send(Err(status));
                false
            }
            None => true,
        });
        metrics::gauge!("sd_running_images", "model" => name.clone())
            .set(active.iter().map(|a| a.images.len()).sum::<usize>() as f64);
        if active.is_empty() {
            continue;
        }
        // One denoising step per group of compatible images.
        let mut keys: Vec<BatchKey> = Vec::new();
        for a in &active {
            if !keys.contains(&a.key) {
                keys.push(a.key);
            }
        }
        let mut failed_keys: HashMap<BatchKey, Status> = HashMap::new();
        for key in keys {
            let mut batch: Vec<&mut M::State> = active
                .iter_mut()
                .filter(|a| a.key == key && a.failed.is_none())
                .flat_map(|a| a.images.iter_mut())
                .filter(|s| {
                    let (done, total) = model.progress(s);
                    done < total
                })
                .collect();
            if batch.is_empty() {
                continue;
            }
            let n = batch.len();
            handle.steps_run.fetch_add(1, Ordering::SeqCst);
            handle.largest_batch.fetch_max(n, Ordering::SeqCst);
            let t = Instant::now();
            let result = catch_unwind(AssertUnwindSafe(|| model.step(&mut batch)));
            metrics::histogram!("sd_step_seconds", "model" => name.clone())
                .record(t.elapsed().as_secs_f64());
            metrics::histogram!("sd_batch_size", "model" => name.clone()).record(n as f64);
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(model = %name, "denoising step failed: {e}");
                    failed_keys.insert(key, status_of(&e));
                }
                Err(_) => {
                    tracing::error!(model = %name, "denoising step panicked");
                    failed_keys.insert(key, panic_status("denoising"));
                }
            }
        }
        for a in active.iter_mut() {
            if let Some(s) = failed_keys.get(&a.key) {
                a.failed.get_or_insert_with(|| s.clone());
            }
        }
        // Progress, and answers for finished or failed jobs.
        let mut i = 0;
        while i < active.len() {
            let a = &active[i];
            if let Some(status) = &a.failed {
                record_request(&name, status.code());
                let _ = a.job.events.send(Err(status.clone()));
                active.swap_remove(i);
                continue;
            }
            let (done, total) = a
                .images
                .iter()
                .map(|s| model.progress(s))
                .min()
                .unwrap_or((0, 0));
            let every = a.job.spec.preview_every as usize;
            let preview = if every > 0 && done.is_multiple_of(every) && done < total {
                a.images
                    .first()
                    .and_then(|s| model.latents(s))
                    .and_then(|l| preview_png(&l).ok())
            } else {
                None
            };
            let _ = a.job.events.send(Ok(Event::Progress(pb::Progress {
                step: done as u32,
                total: total as u32,
                elapsed_ms: ms(a.job.accepted.elapsed()),
                preview,
            })));
            if done < total {
                i += 1;
                continue;
            }
            let a = active.swap_remove(i);
            let images = a.images.len();
            finish(model, a, &name, encoder);
            let now = Instant::now();
            recent.push_back((now, images));
            while recent
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(10))
            {
                recent.pop_front();
            }
            metrics::counter!("sd_images_total", "model" => name.clone()).increment(images as u64);
            metrics::gauge!("sd_images_per_second", "model" => name.clone())
                .set(recent.iter().map(|(_, n)| *n).sum::<usize>() as f64 / 10.0);
        }
        metrics::gauge!("sd_running_images", "model" => name.clone())
            .set(active.iter().map(|a| a.images.len()).sum::<usize>() as f64);
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn record_request(model: &str, code: tonic::Code) {
    metrics::counter!("sd_requests_total", "model" => model.to_string(), "status" => code_name(code))
        .increment(1);
}

pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

fn admit<M: ServedModel>(model: &M, job: Job, name: &str) -> Option<Active<M::State>> {
    let admitted = Instant::now();
    metrics::histogram!("sd_queue_seconds", "model" => name.to_string())
        .record(admitted.duration_since(job.accepted).as_secs_f64());
    if let Some(status) = job.abandoned(admitted) {
        record_request(name, status.code());
        let _ = job.events.send(Err(status));
        return None;
    }
    let mut images = Vec::with_capacity(job.images());
    for &seed in &job.spec.seeds {
        let request = GenerateRequest {
            seed,
            ..job.spec.request.clone()
        };
        match catch_unwind(AssertUnwindSafe(|| model.start(request))) {
            Ok(Ok(s)) => images.push(s),
            Ok(Err(e)) => {
                let status = status_of(&e);
                record_request(name, status.code());
                let _ = job.events.send(Err(status));
                return None;
            }
            Err(_) => {
                tracing::error!(model = %name, "start panicked");
                record_request(name, tonic::Code::Internal);
                let _ = job.events.send(Err(panic_status("encoding the prompts")));
                return None;
            }
        }
    }
    let key = images.first().map(|s| model.batch_key(s))?;
    let text_encoding = admitted.elapsed();
    metrics::histogram!("sd_stage_seconds", "model" => name.to_string(), "stage" => "text_encoding")
        .record(text_encoding.as_secs_f64());
    Some(Active {
        job,
        key,
        images,
        admitted,
        text_encoding,
        denoise_start: Instant::now(),
        failed: None,
    })
}

/// Decodes a finished job's images on the owner thread, then encodes them and answers
/// on the runtime's blocking pool (when there is one) so the batch goes on meanwhile.
fn finish<M: ServedModel>(
    model: &M,
    a: Active<M::State>,
    name: &str,
    encoder: Option<&tokio::runtime::Handle>,
) {
    let denoising = a.denoise_start.elapsed();
    let t = Instant::now();
    let engine_id = model.describe().engine_id;
    let mut generated = Vec::with_capacity(a.images.len());
    for state in a.images {
        match catch_unwind(AssertUnwindSafe(|| model.finish(state))) {
            Ok(Ok(g)) => generated.push(g),
            other => {
                let status = match other {
                    Ok(Err(e)) => status_of(&e),
                    _ => panic_status("decoding"),
                };
                record_request(name, status.code());
                let _ = a.job.events.send(Err(status));
                return;
            }
        }
    }
    let done = Finished {
        job: a.job,
        generated,
        engine_id,
        model: name.to_string(),
        admitted: a.admitted,
        text_encoding: a.text_encoding,
        denoising,
        decode_start: t,
    };
    match encoder {
        Some(rt) => {
            rt.spawn_blocking(move || done.respond());
        }
        None => done.respond(),
    }
}

/// A job whose images are decoded, waiting to be encoded and answered.
struct Finished {
    job: Job,
    generated: Vec<sd_pipeline::Generated>,
    engine_id: String,
    model: String,
    admitted: Instant,
    text_encoding: Duration,
    denoising: Duration,
    decode_start: Instant,
}

impl Finished {
    fn respond(self) {
        let name = &self.model;
        let spec = &self.job.spec;
        let mut images = Vec::with_capacity(self.generated.len());
        let mut warnings: Vec<String> = Vec::new();
        for (g, &seed) in self.generated.iter().zip(&spec.seeds) {
            for w in &g.warnings {
                if !warnings.contains(w) {
                    warnings.push(w.clone());
                }
            }
            match encode_image(g, spec, seed, &self.engine_id) {
                Ok(img) => images.push(img),
                Err(e) => {
                    record_request(name, tonic::Code::Internal);
                    let _ = self.job.events.send(Err(Status::internal(e)));
                    return;
                }
            }
        }
        let decoding = self.decode_start.elapsed();
        let total = self.job.accepted.elapsed();
        for (stage, d) in [("denoising", self.denoising), ("decoding", decoding)] {
            metrics::histogram!("sd_stage_seconds", "model" => name.clone(), "stage" => stage)
                .record(d.as_secs_f64());
        }
        metrics::histogram!("sd_request_seconds", "model" => name.clone())
            .record(total.as_secs_f64());
        record_request(name, tonic::Code::Ok);
        let r = &spec.request;
        tracing::info!(
            model = %name,
            images = images.len(),
            width = r.width,
            height = r.height,
            steps = r.steps,
            seed = spec.seeds.first().copied().unwrap_or_default(),
            queue_ms = ms(self.admitted.duration_since(self.job.accepted)),
            total_ms = ms(total),
            "generated"
        );
        let response = pb::GenerateResponse {
            images,
            seeds: spec.seeds.clone(),
            timings: Some(pb::StageTimings {
                queue_ms: ms(self.admitted.duration_since(self.job.accepted)),
                text_encoding_ms: ms(self.text_encoding),
                denoising_ms: ms(self.denoising),
                decoding_ms: ms(decoding),
                total_ms: ms(total),
            }),
            engine_id: self.engine_id.clone(),
            model: name.clone(),
            warnings,
        };
        let _ = self.job.events.send(Ok(Event::Done(response)));
    }
}
