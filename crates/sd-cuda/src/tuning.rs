//! GEMM algorithm selection, and the record of it that engine bundles carry.
//!
//! cuBLASLt's heuristic ranks algorithms by a model of the GPU; for the few large GEMM
//! shapes of a transformer step the ranking is not always right, so `sd-build compile
//! --target cuda` times the heuristic's top candidates on the real GPU and keeps the
//! fastest for every GEMM problem it meets (like TensorRT's timing cache). The choices
//! are stored in the bundle's manifest and handed back to the backend at load, so a
//! served engine never re-times and runs the algorithms it was built with.
//!
//! A choice is keyed by the whole problem (transposes, m, n, k, types, leading
//! dimensions, scaling) and is only valid for the cuBLASLt version that made it: the
//! algorithm descriptor is opaque data of that library.

use std::collections::BTreeMap;

use cudarc::cublaslt::sys as ltsys;

use crate::error::{CudaError, Result};
use crate::{CudaBackend, Inner};

/// How many of the heuristic's candidates are timed per GEMM problem.
const TUNE_CANDIDATES: usize = 8;
/// Timed runs per candidate (after one warm-up); the median is compared.
const TUNE_RUNS: usize = 5;

/// The chosen algorithm of every GEMM problem met so far, as an engine bundle stores
/// it: problem key -> the 8 words of `cublasLtMatmulAlgo_t`.
pub type GemmAlgorithms = BTreeMap<String, [u64; 8]>;

/// A problem key as the manifest writes it (`gemm <key>`), and back.
const KEY_PREFIX: &str = "gemm ";

impl Inner {
    /// The algorithm for one GEMM problem whose descriptors are given; `launch` runs the
    /// GEMM with an algorithm (the caller's matmul, writing the caller's output, which
    /// the final run overwrites). Without tuning this is the heuristic's first choice.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn choose_algo(
        &self,
        handle: ltsys::cublasLtHandle_t,
        desc: ltsys::cublasLtMatmulDesc_t,
        a: ltsys::cublasLtMatrixLayout_t,
        b: ltsys::cublasLtMatrixLayout_t,
        d: ltsys::cublasLtMatrixLayout_t,
        pref: ltsys::cublasLtMatmulPreference_t,
        launch: &dyn Fn(&ltsys::cublasLtMatmulAlgo_t) -> Result<()>,
    ) -> Result<ltsys::cublasLtMatmulAlgo_t> {
        let tune = self.tune_gemms.get();
        let want = if tune { TUNE_CANDIDATES } else { 1 };
        // SAFETY: plain C structs of integers and floats; all-zero is a valid value and
        // the library overwrites the first `count` entries.
        let mut results: Vec<ltsys::cublasLtMatmulHeuristicResult_t> =
            vec![unsafe { std::mem::zeroed() }; want];
        let mut count = 0i32;
        // SAFETY: the descriptors are live (owned by the caller); the output array holds
        // `want` entries.
        unsafe {
            ltsys::cublasLtMatmulAlgoGetHeuristic(
                handle,
                desc,
                a,
                b,
                d,
                d,
                pref,
                want as i32,
                results.as_mut_ptr(),
                &mut count,
            )
        }
        .result()
        .map_err(|e| CudaError::Blas(format!("no algorithm: {e:?}")))?;
        let candidates: Vec<ltsys::cublasLtMatmulAlgo_t> = results
            .iter()
            .take(count.max(0) as usize)
            .filter(|r| r.state == ltsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| r.algo)
            .collect();
        let Some(first) = candidates.first().copied() else {
            return Err(CudaError::Blas(
                "no algorithm: the heuristic returned none".into(),
            ));
        };
        if !tune || candidates.len() == 1 {
            return Ok(first);
        }
        self.not_capturing("timing cuBLASLt's algorithms")?;
        let start = self
            .ctx
            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        let end = self
            .ctx
            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        let mut best: Option<(f32, ltsys::cublasLtMatmulAlgo_t)> = None;
        for algo in candidates {
            // A candidate the library lists but then refuses at run time is skipped.
            if launch(&algo).is_err() {
                continue;
            }
            let mut times = Vec::with_capacity(TUNE_RUNS);
            for _ in 0..TUNE_RUNS {
                start.record(&self.stream)?;
                launch(&algo)?;
                end.record(&self.stream)?;
                times.push(start.elapsed_ms(&end)?);
            }
            times.sort_by(f32::total_cmp);
            let median = times[times.len() / 2];
            if best.is_none_or(|(t, _)| median < t) {
                best = Some((median, algo));
            }
        }
        Ok(best.map_or(first, |(_, a)| a))
    }
}

impl CudaBackend {
    /// Times the heuristic's candidates for every GEMM problem met from now on (and
    /// keeps the fastest), instead of taking the heuristic's first choice. For
    /// `sd-build compile`: a step run with tuning on records the algorithms a bundle
    /// stores.
    pub fn set_gemm_tuning(&self, on: bool) -> Result<()> {
        self.run(|i| {
            i.tune_gemms.set(on);
            i.clear_graphs()
        })?
    }

    /// Every GEMM problem's chosen algorithm so far (see [`GemmAlgorithms`]).
    pub fn gemm_algorithms(&self) -> Result<GemmAlgorithms> {
        self.run(|i| {
            i.algo_cache
                .borrow()
                .iter()
                .map(|(k, a)| (format!("{KEY_PREFIX}{k}"), a.data))
                .collect()
        })
    }

    /// Uses `algorithms` (from [`CudaBackend::gemm_algorithms`] of a backend on the
    /// same GPU and cuBLASLt version) for their problems; others still go to the
    /// heuristic. Returns how many were taken.
    pub fn load_gemm_algorithms(&self, algorithms: &GemmAlgorithms) -> Result<usize> {
        self.run(|i| {
            // Graphs recorded so far would keep the algorithms they were recorded with.
            i.clear_graphs()?;
            let mut cache = i.algo_cache.borrow_mut();
            let mut n = 0;
            for (k, data) in algorithms {
                if let Some(key) = k.strip_prefix(KEY_PREFIX) {
                    cache.insert(key.to_string(), ltsys::cublasLtMatmulAlgo_t { data: *data });
                    n += 1;
                }
            }
            Ok(n)
        })?
    }

    /// cuBLASLt's version number (e.g. 130100 for 13.1.0), which a stored algorithm
    /// choice is valid for.
    pub fn cublaslt_version(&self) -> usize {
        // SAFETY: a version query of the library the backend has loaded.
        unsafe { ltsys::cublasLtGetVersion() }
    }
}
