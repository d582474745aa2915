//! CUDA graphs of replayable forwards (`Backend::replayable`: the MMDiT step).
//!
//! Per name and input shapes, the first call runs eagerly: it makes everything a layer
//! creates on first use (bias copies, uniform weight scales, activation-scale vectors,
//! cuBLASLt algorithm choices) and tells the output's shape. The second call records the
//! forward into a graph by stream capture, reading static copies of its inputs and
//! copying its output into a static buffer, both allocated before the capture; every
//! buffer the forward allocates is a graph allocation freed inside the graph, so the
//! graph can be relaunched (graph allocations have fixed addresses, which the captured
//! kernel arguments and tensor maps rely on). Every later call copies its inputs into
//! the static ones, launches the graph and copies the output out (a few MB each way).
//!
//! A capture that fails (an operation that cannot be captured: a host synchronisation
//! or upload inside the forward) ends the capture, marks the shape `Failed` and runs the
//! forward eagerly from then on; the reason is logged once.
//!
//! Two threads take part in a recording: the caller's, which runs the forward and drops
//! its intermediate tensors, and the backend's owner thread, which issues every
//! operation. A tensor dropped on any other thread meanwhile (a buffer from before the
//! recording, whose free the graph must not contain) is freed only after the recording
//! ends (`free_or_defer`). Layers (`CudaLinear`) are not covered: they are dropped with
//! their model, never while it runs. A forward must not call the backend from a helper
//! thread of its own: that thread would wait for the recording to end.
//!
//! A graph replays the kernels it recorded, so settings that change them drop every
//! graph (`set_flash_attention`, `set_conv_path`, `set_gemm_tuning`,
//! `load_gemm_algorithms`, `with_fp8_gemm`); the process-wide `set_flash_variant` does
//! not (it is for benchmarks and tests, set before a model runs).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::ThreadId;

use cudarc::driver::CudaGraph;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};

use crate::channels_last::Layout;
use crate::{CudaError, CudaTensor, DeviceBuf, Inner, Result, Storage};

/// The streams recording a graph, process-wide (a tensor may be dropped on any thread),
/// with the frees other threads made meanwhile. Generic over what is freed so that its
/// logic is tested without a GPU.
struct Recordings<T> {
    active: RwLock<Vec<Recording<T>>>,
}

struct Recording<T> {
    stream: usize,
    /// The threads whose frees belong to the recording.
    threads: [ThreadId; 2],
    /// Frees from other threads, made after the recording ends.
    deferred: Mutex<Vec<T>>,
}

impl<T> Recordings<T> {
    const fn new() -> Self {
        Self {
            active: RwLock::new(Vec::new()),
        }
    }

    /// Frees `item` (of `stream`, dropped on thread `me`) with `free`, or keeps it when
    /// that stream records a graph and `me` is not part of the recording. The free
    /// happens under the read lock, which a registration (made before its capture
    /// begins) waits for, so no free from another thread slips into a capture.
    fn free_or_defer(&self, item: T, stream: usize, me: ThreadId, free: impl FnOnce(T)) {
        let active = match self.active.read() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(r) = active
            .iter()
            .find(|r| r.stream == stream && !r.threads.contains(&me))
        {
            match r.deferred.lock() {
                Ok(mut d) => d.push(item),
                Err(mut poisoned) => poisoned.get_mut().push(item),
            }
            return;
        }
        free(item);
    }

    fn register(&self, stream: usize, threads: [ThreadId; 2]) {
        let mut r = match self.active.write() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        r.push(Recording {
            stream,
            threads,
            deferred: Mutex::new(Vec::new()),
        });
    }

    /// Ends a stream's registration; returns what other threads dropped meanwhile.
    fn unregister(&self, stream: usize) -> Vec<T> {
        let mut r = match self.active.write() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        match r.iter().position(|x| x.stream == stream) {
            Some(i) => r
                .remove(i)
                .deferred
                .into_inner()
                .unwrap_or_else(|p| p.into_inner()),
            None => Vec::new(),
        }
    }
}

static RECORDINGS: Recordings<Storage> = Recordings::new();

/// Buffers freed after a recording ended because another thread dropped them during it
/// (process-wide; for tests).
static DEFERRED_FREES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn free_storage(storage: Storage) {
    storage.bind_context();
    drop(storage);
}

/// Frees a tensor's buffer, stream-ordered; or, while its stream records a graph and
/// this thread is not part of the recording, keeps it for the recording to free when it
/// ends (inside the capture, the free would break it).
pub(crate) fn free_or_defer(storage: Storage) {
    let stream = storage.stream_handle();
    RECORDINGS.free_or_defer(storage, stream, std::thread::current().id(), free_storage);
}

fn register_recording(stream: usize, threads: [ThreadId; 2]) {
    RECORDINGS.register(stream, threads);
}

/// Ends a stream's registration and frees what other threads dropped meanwhile (stream-
/// ordered after the recording, outside it).
fn unregister_recording(stream: usize) {
    for storage in RECORDINGS.unregister(stream) {
        free_storage(storage);
        DEFERRED_FREES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Graphs kept at once (the least recently replayed goes first): a server batching at
/// step boundaries sees a few batch sizes per resolution.
pub(crate) const MAX_GRAPHS: usize = 8;

/// What a tensor must look like to be a graph's input or output.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TensorSpec {
    shape: Vec<usize>,
    layout: Layout,
    /// f32 storage (else BF16).
    f32: bool,
}

impl TensorSpec {
    fn of(t: &CudaTensor) -> Self {
        Self {
            shape: t.shape.clone(),
            layout: t.layout,
            f32: matches!(**t.buf, Storage::F32(_)),
        }
    }

    fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn bytes(&self) -> usize {
        self.numel() * if self.f32 { 4 } else { 2 }
    }
}

/// One graph per forward name and input specs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct GraphKey {
    name: String,
    inputs: Vec<TensorSpec>,
}

impl GraphKey {
    pub(crate) fn name(&self) -> &str {
        &self.name
    }
}

enum Entry {
    /// Ran eagerly once; its output looked like this.
    Seen(TensorSpec),
    Ready(Box<Captured>),
    /// The capture failed; runs eagerly.
    Failed,
}

struct Captured {
    graph: CudaGraph,
    /// The buffers the graph reads its inputs from and writes its output to.
    inputs: Vec<CudaTensor>,
    output: CudaTensor,
    last_use: u64,
}

/// A capture in progress: its static buffers, until the graph exists.
struct Pending {
    key: GraphKey,
    inputs: Vec<CudaTensor>,
    output: CudaTensor,
}

/// The owner thread's graphs.
#[derive(Default)]
pub(crate) struct Graphs {
    entries: HashMap<GraphKey, Entry>,
    pending: Option<Pending>,
    clock: u64,
}

/// What `graph_begin` found.
pub(crate) enum Begin {
    /// Recording: the forward must read these static inputs.
    Recording(Vec<CudaTensor>),
    /// Another thread recorded this shape meanwhile, or graphs were switched off or
    /// dropped: decide again.
    Decided,
}

/// What `CudaBackend::replayable` does with a call.
pub(crate) enum GraphAction {
    /// Run the forward; with a key, tell `graph_seen` its output afterwards.
    Eager(Option<GraphKey>),
    /// Record the forward (`graph_begin`, the forward, `graph_end`).
    Capture(GraphKey),
    /// Replayed already: the output.
    Replayed(CudaTensor),
}

/// Counts for tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Graphs held now.
    pub ready: usize,
    /// Shapes whose capture failed (they run eagerly).
    pub failed: usize,
    /// Graph launches so far.
    pub replays: u64,
    /// Captures so far (including failed ones).
    pub captures: u64,
    /// Buffers other threads dropped during a recording, freed after it (process-wide,
    /// never reset).
    pub deferred_frees: u64,
}

impl Inner {
    /// Decides how to run a replayable forward on `inputs`, replaying it when a graph
    /// exists.
    pub(crate) fn graph_action(&self, name: &str, inputs: &[&CudaTensor]) -> Result<GraphAction> {
        // Profiling times each operation by itself; a forward inside a recording is
        // part of that recording.
        if !self.graphs_on.get() || self.profile.borrow().is_some() || self.capturing.get() {
            return Ok(GraphAction::Eager(None));
        }
        let key = GraphKey {
            name: name.to_string(),
            inputs: inputs.iter().map(|t| TensorSpec::of(t)).collect(),
        };
        let mut graphs = self.graphs.borrow_mut();
        graphs.clock += 1;
        let now = graphs.clock;
        match graphs.entries.get_mut(&key) {
            None => Ok(GraphAction::Eager(Some(key))),
            Some(Entry::Seen(_)) => Ok(GraphAction::Capture(key)),
            Some(Entry::Failed) => Ok(GraphAction::Eager(None)),
            Some(Entry::Ready(c)) => {
                c.last_use = now;
                for (src, dst) in inputs.iter().zip(&c.inputs) {
                    self.copy_tensor(src, dst)?;
                }
                if let Err(e) = c.graph.launch() {
                    // Run eagerly from now on (if the GPU itself is broken, so is that).
                    tracing::warn!(forward = %name, error = ?e, "CUDA graph launch failed; this shape runs eagerly");
                    let _ = self.ctx.check_err();
                    graphs.entries.insert(key, Entry::Failed);
                    return Ok(GraphAction::Eager(None));
                }
                let out = self.empty_like(&TensorSpec::of(&c.output))?;
                self.copy_tensor(&c.output, &out)?;
                self.graph_counts.set({
                    let (r, cap) = self.graph_counts.get();
                    (r + 1, cap)
                });
                Ok(GraphAction::Replayed(out))
            }
        }
    }

    /// Remembers the output of a forward's first (eager) run.
    pub(crate) fn graph_seen(&self, key: GraphKey, output: &CudaTensor) {
        self.graphs
            .borrow_mut()
            .entries
            .entry(key)
            .or_insert_with(|| Entry::Seen(TensorSpec::of(output)));
    }

    /// Starts recording for the caller thread `caller`: static copies of `inputs`
    /// (returned: the forward must read these), the static output buffer, then stream
    /// capture. A failure marks the key `Failed`.
    pub(crate) fn graph_begin(
        &self,
        key: &GraphKey,
        inputs: &[&CudaTensor],
        caller: ThreadId,
    ) -> Result<Begin> {
        // Another thread may have switched graphs off or profiling on since the decision.
        if !self.graphs_on.get() || self.profile.borrow().is_some() {
            return Ok(Begin::Decided);
        }
        let out_spec = match self.graphs.borrow().entries.get(key) {
            Some(Entry::Seen(spec)) => spec.clone(),
            _ => return Ok(Begin::Decided),
        };
        let r = self.begin_capture(key, inputs, out_spec, caller);
        if r.is_err() {
            self.graphs
                .borrow_mut()
                .entries
                .insert(key.clone(), Entry::Failed);
        }
        r.map(Begin::Recording)
    }

    fn begin_capture(
        &self,
        key: &GraphKey,
        inputs: &[&CudaTensor],
        out_spec: TensorSpec,
        caller: ThreadId,
    ) -> Result<Vec<CudaTensor>> {
        let statics = inputs
            .iter()
            .map(|t| {
                let s = self.empty_like(&TensorSpec::of(t))?;
                self.copy_tensor(t, &s)?;
                Ok(s)
            })
            .collect::<Result<Vec<_>>>()?;
        let output = self.empty_like(&out_spec)?;
        // The cached quantization holds a buffer allocated before the capture: freeing it
        // inside the capture would record a free the graph does not own.
        self.quant_cache.borrow_mut().take();
        // A stale error recorded by some earlier free would make cudarc's capture calls
        // return before doing anything: report it, then clear it.
        if let Err(e) = self.ctx.check_err() {
            tracing::warn!(error = ?e, "an earlier asynchronous CUDA error was pending");
        }
        self.ctx.bind_to_thread()?;
        let stream = self.stream.cu_stream() as usize;
        register_recording(stream, [std::thread::current().id(), caller]);
        if let Err(e) = self
            .stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        {
            self.leave_capture_mode();
            unregister_recording(stream);
            return Err(CudaError::Driver(format!(
                "beginning stream capture: {e:?}"
            )));
        }
        self.capturing.set(true);
        self.graphs.borrow_mut().pending = Some(Pending {
            key: key.clone(),
            inputs: statics.clone(),
            output,
        });
        Ok(statics)
    }

    /// Makes sure the stream is not capturing any more (after an error on the way out of
    /// a capture), discarding whatever was recorded.
    fn leave_capture_mode(&self) {
        let stream = self.stream.cu_stream();
        // SAFETY: the stream is this backend's, alive; a graph ended here is destroyed
        // at once and never instantiated.
        unsafe {
            let capturing = cudarc::driver::result::stream::is_capturing(stream).is_ok_and(|s| {
                s != cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
            });
            if capturing
                && let Ok(g) = cudarc::driver::result::stream::end_capture(stream)
                && !g.is_null()
            {
                let _ = cudarc::driver::result::graph::destroy(g);
            }
        }
        let _ = self.ctx.check_err();
    }

    /// Ends recording with the forward's result: copies it into the static output,
    /// frees it (inside the graph), instantiates the graph and keeps it. Any failure
    /// marks the key `Failed` and comes back as the reason.
    pub(crate) fn graph_end(
        &self,
        key: &GraphKey,
        output: sd_model::Result<CudaTensor>,
    ) -> std::result::Result<(), String> {
        let pending = self.graphs.borrow_mut().pending.take();
        let copied = match (&pending, output) {
            (Some(p), Ok(out)) if p.key == *key => {
                if TensorSpec::of(&out) != TensorSpec::of(&p.output) {
                    Err(format!(
                        "the output changed between runs: {:?} then {:?}",
                        TensorSpec::of(&p.output),
                        TensorSpec::of(&out)
                    ))
                } else {
                    self.copy_tensor(&out, &p.output).map_err(|e| e.to_string())
                }
            }
            (_, Err(e)) => Err(format!("the forward failed while recording: {e}")),
            _ => Err("no capture in progress".into()),
        };
        // Buffers allocated during the capture must be freed inside it.
        self.quant_cache.borrow_mut().take();
        // cudarc's end_capture returns early on a stored error: clear it first, and make
        // sure the capture is over whatever happened.
        let _ = self.ctx.check_err();
        let ended = self
            .stream
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(|e| format!("ending stream capture: {e:?}"));
        if ended.is_err() {
            self.leave_capture_mode();
        }
        self.capturing.set(false);
        unregister_recording(self.stream.cu_stream() as usize);
        self.graph_counts.set({
            let (r, cap) = self.graph_counts.get();
            (r, cap + 1)
        });
        let graph = match (copied, ended) {
            (Ok(()), Ok(Some(g))) => g
                .upload()
                .map(|()| g)
                .map_err(|e| format!("uploading the graph: {e:?}")),
            (Ok(()), Ok(None)) => Err("the capture recorded nothing".into()),
            (Err(e), _) | (Ok(()), Err(e)) => Err(e),
        };
        let mut graphs = self.graphs.borrow_mut();
        match (graph, pending) {
            (Ok(graph), Some(p)) => {
                let now = graphs.clock;
                graphs.entries.insert(
                    key.clone(),
                    Entry::Ready(Box::new(Captured {
                        graph,
                        inputs: p.inputs,
                        output: p.output,
                        last_use: now,
                    })),
                );
                self.evict_graphs(&mut graphs);
                drop(graphs);
                tracing::info!(forward = %key.name, inputs = ?key.inputs.iter().map(|s| &s.shape).collect::<Vec<_>>(), "CUDA graph recorded");
                // The eager runs' activations stay cached in the stream-ordered pool;
                // the graph has its own, so give the pool's unused memory back.
                self.trim_pool();
                Ok(())
            }
            (graph, _) => {
                graphs.entries.insert(key.clone(), Entry::Failed);
                // Frees of a broken capture record their errors in the context; they
                // belong to the capture, not to whatever runs next.
                let _ = self.ctx.check_err();
                Err(graph
                    .err()
                    .unwrap_or_else(|| "no capture in progress".into()))
            }
        }
    }

    /// Drops the least recently replayed graphs beyond [`MAX_GRAPHS`].
    fn evict_graphs(&self, graphs: &mut Graphs) {
        loop {
            let ready: Vec<(&GraphKey, u64)> = graphs
                .entries
                .iter()
                .filter_map(|(k, e)| match e {
                    Entry::Ready(c) => Some((k, c.last_use)),
                    _ => None,
                })
                .collect();
            if ready.len() <= MAX_GRAPHS {
                return;
            }
            let Some(oldest) = ready
                .iter()
                .min_by_key(|(_, t)| *t)
                .map(|(k, _)| (*k).clone())
            else {
                return;
            };
            // A launch may still be running: let it finish before its graph goes.
            let _ = self.stream.synchronize();
            graphs.entries.remove(&oldest);
            self.trim_graph_memory();
        }
    }

    /// Hands the memory the driver keeps for graphs no longer alive back to the device
    /// (it stays cached for graphs otherwise, out of reach of everything else).
    fn trim_graph_memory(&self) {
        // SAFETY: a trim of this context's device; only memory no graph uses goes.
        let _ = unsafe { cudarc::driver::sys::cuDeviceGraphMemTrim(self.ctx.cu_device()) };
    }

    fn trim_pool(&self) {
        // SAFETY: the pool belongs to this context's device; trimming only releases
        // memory no allocation holds.
        let _ = unsafe { cudarc::driver::sys::cuMemPoolTrimTo(self.pool, 0) };
    }

    pub(crate) fn graph_stats(&self) -> GraphStats {
        let graphs = self.graphs.borrow();
        let (replays, captures) = self.graph_counts.get();
        GraphStats {
            ready: graphs
                .entries
                .values()
                .filter(|e| matches!(e, Entry::Ready(_)))
                .count(),
            failed: graphs
                .entries
                .values()
                .filter(|e| matches!(e, Entry::Failed))
                .count(),
            replays,
            captures,
            deferred_frees: DEFERRED_FREES.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Drops every graph, forgets every shape and zeroes the counts (after a
    /// synchronisation). Settings that change what a forward runs call it, so no graph
    /// replays an old path.
    pub(crate) fn clear_graphs(&self) -> Result<()> {
        self.not_capturing("a change of settings")?;
        self.graph_counts.set((0, 0));
        let mut graphs = self.graphs.borrow_mut();
        if graphs.entries.is_empty() {
            return Ok(());
        }
        // A launch may still be running: let it finish before its graph goes.
        self.stream.synchronize()?;
        graphs.entries.clear();
        drop(graphs);
        self.trim_graph_memory();
        Ok(())
    }

    /// Fails when a stream capture is recording: `what` would be made on first use
    /// inside the graph (an allocation kept after it, or a host copy it cannot hold).
    pub(crate) fn not_capturing(&self, what: &str) -> Result<()> {
        if self.capturing.get() {
            return Err(CudaError::Driver(format!(
                "{what} would be made while recording a CUDA graph (a first use the eager run did not cover)"
            )));
        }
        Ok(())
    }

    /// An uninitialised tensor of `spec`.
    fn empty_like(&self, spec: &TensorSpec) -> Result<CudaTensor> {
        let n = spec.numel();
        let buf = if spec.f32 {
            Storage::F32(self.alloc::<f32>(n)?)
        } else {
            Storage::Bf16(self.alloc::<u16>(n)?)
        };
        Ok(CudaTensor {
            shape: spec.shape.clone(),
            buf: Arc::new(DeviceBuf::new(buf)),
            layout: spec.layout,
        })
    }

    /// Copies `src` into `dst` (the same spec), stream-ordered.
    fn copy_tensor(&self, src: &CudaTensor, dst: &CudaTensor) -> Result<()> {
        let spec = TensorSpec::of(src);
        if spec != TensorSpec::of(dst) {
            return Err(CudaError::Driver(format!(
                "graph copy: {spec:?} into {:?}",
                TensorSpec::of(dst)
            )));
        }
        let bytes = spec.bytes();
        if bytes == 0 {
            return Ok(());
        }
        self.ctx.bind_to_thread()?;
        // SAFETY: both buffers hold at least `bytes` (allocated for this spec's element
        // count and type) and are live for the call; the copy is ordered on the stream.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(
                self.sptr(&dst.buf),
                self.sptr(&src.buf),
                bytes,
                self.stream.cu_stream(),
            )?
        };
        Ok(())
    }
}

/// Whether new backends run replayable forwards as CUDA graphs: `SD_CUDA_GRAPHS` = `1`
/// or `on` (`0` / `off`, or unset: eager).
pub(crate) fn graphs_from_env() -> Result<bool> {
    match std::env::var("SD_CUDA_GRAPHS") {
        Err(_) => Ok(false),
        Ok(v) => parse_graphs_setting(&v),
    }
}

fn parse_graphs_setting(v: &str) -> Result<bool> {
    match v {
        "1" | "on" => Ok(true),
        "0" | "off" => Ok(false),
        other => Err(crate::bad(format!(
            "SD_CUDA_GRAPHS={other:?}: expected 1 / on (CUDA graphs) or 0 / off (eager)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graphs_setting_parses_and_names_bad_values() {
        assert!(parse_graphs_setting("1").unwrap());
        assert!(parse_graphs_setting("on").unwrap());
        assert!(!parse_graphs_setting("0").unwrap());
        assert!(!parse_graphs_setting("off").unwrap());
        let e = parse_graphs_setting("yes").unwrap_err().to_string();
        assert!(e.contains("SD_CUDA_GRAPHS") && e.contains("\"yes\""), "{e}");
    }

    #[test]
    fn frees_from_outside_a_recording_wait_for_its_end() {
        let reg: Recordings<u32> = Recordings::new();
        let me = std::thread::current().id();
        let other = std::thread::spawn(|| std::thread::current().id())
            .join()
            .expect("thread");
        let freed = std::cell::RefCell::new(Vec::new());
        let free = |v: u32| freed.borrow_mut().push(v);
        // Nothing recording: freed at once.
        reg.free_or_defer(1, 10, other, free);
        reg.register(10, [me, me]);
        // A participating thread: freed at once (inside the recording, where it belongs).
        reg.free_or_defer(2, 10, me, free);
        // Another stream: freed at once.
        reg.free_or_defer(3, 11, other, free);
        // Another thread on the recording stream: kept.
        reg.free_or_defer(4, 10, other, free);
        reg.free_or_defer(5, 10, other, free);
        assert_eq!(*freed.borrow(), vec![1, 2, 3]);
        assert_eq!(reg.unregister(10), vec![4, 5]);
        assert!(reg.unregister(10).is_empty(), "unregistered once");
        reg.free_or_defer(6, 10, other, free);
        assert_eq!(*freed.borrow(), vec![1, 2, 3, 6]);
    }

    #[test]
    fn tensor_spec_sizes_follow_the_storage_type() {
        let s = TensorSpec {
            shape: vec![2, 16, 128, 128],
            layout: Layout::RowMajor,
            f32: false,
        };
        assert_eq!(s.numel(), 2 * 16 * 128 * 128);
        assert_eq!(s.bytes(), 2 * s.numel());
        let f = TensorSpec {
            f32: true,
            ..s.clone()
        };
        assert_eq!(f.bytes(), 4 * s.numel());
        assert_ne!(f, s, "storage type is part of a graph's key");
    }
}
