//! Where a step's GPU time goes: an opt-in timer around every kernel, GEMM, memset and
//! compute-stream copy ([`CudaOptions::profile`](super::CudaOptions::profile), or
//! `LEMA_CUDA_PROFILE=1`). Each timed region is bracketed by two events on the compute
//! stream; the time between one region's end and the next region's start is the stream
//! standing idle — waiting for a weight copy, an offloaded activation, or the host.
//!
//! Events come from a pool that is refilled by [`Profiler::take`], so a profiled step
//! creates no events once the pool is warm. Profiling adds two event records per launch
//! (a few microseconds of host time each); the GPU's own timings are unaffected.

use super::errors::{driver_err, err};
use crate::backend::ProfileLine;
use crate::error::Result;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

struct State {
    pool: Vec<CudaEvent>,
    /// (label, phase, start, end)
    regions: Vec<(&'static str, &'static str, CudaEvent, CudaEvent)>,
    /// The part of the step being queued (set by the trainer).
    phase: &'static str,
}

/// The recorded regions of the compute stream since the last [`Profiler::take`].
pub(crate) struct Profiler {
    ctx: Arc<CudaContext>,
    state: Mutex<State>,
}

impl Profiler {
    pub fn new(ctx: Arc<CudaContext>) -> Self {
        Profiler {
            ctx,
            state: Mutex::new(State {
                pool: Vec::new(),
                regions: Vec::new(),
                phase: "step",
            }),
        }
    }

    fn mark(&self, st: &mut State, stream: &CudaStream, op: &'static str) -> Result<CudaEvent> {
        let ev = match st.pool.pop() {
            Some(e) => e,
            None => self
                .ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| driver_err(op, e))?,
        };
        ev.record(stream).map_err(|e| driver_err(op, e))?;
        Ok(ev)
    }

    /// Attribute the regions queued from now on to `phase` (forward, backward, …).
    pub fn set_phase(&self, phase: &'static str) {
        if let Ok(mut st) = self.state.lock() {
            st.phase = phase;
        }
    }

    /// Run `f` (which enqueues work on `stream`) between two recorded events.
    pub fn time<T>(
        &self,
        stream: &CudaStream,
        label: &'static str,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let lock = |op| {
            self.state
                .lock()
                .map_err(|_| err(op, "profiler lock poisoned"))
        };
        let start = {
            let mut st = lock(label)?;
            self.mark(&mut st, stream, label)?
        };
        let out = f();
        let mut st = lock(label)?;
        let end = self.mark(&mut st, stream, label)?;
        let phase = st.phase;
        st.regions.push((label, phase, start, end));
        out
    }

    /// Wait for the recorded work, then the time per label (largest first) since the last
    /// call, plus per phase its busy time (`busy: forward`) and the idle time before its
    /// regions (`idle: forward`).
    pub fn take(&self) -> Result<Vec<ProfileLine>> {
        let op = "profile";
        let mut st = self
            .state
            .lock()
            .map_err(|_| err(op, "profiler lock poisoned"))?;
        let regions = std::mem::take(&mut st.regions);
        let mut by: BTreeMap<String, (u64, f64)> = BTreeMap::new();
        let mut add = |key: String, ms: f64| {
            let e = by.entry(key).or_default();
            e.0 += 1;
            e.1 += ms;
        };
        let mut prev_end: Option<&CudaEvent> = None;
        for (label, phase, start, end) in &regions {
            let ms = start.elapsed_ms(end).map_err(|e| driver_err(op, e))? as f64;
            add(label.to_string(), ms);
            add(format!("busy: {phase}"), ms);
            if let Some(p) = prev_end {
                let gap = p.elapsed_ms(start).map_err(|e| driver_err(op, e))? as f64;
                if gap > 0.0 {
                    add(format!("idle: {phase}"), gap);
                }
            }
            prev_end = Some(end);
        }
        for (_, _, s, e) in regions {
            st.pool.push(s);
            st.pool.push(e);
        }
        let mut lines: Vec<ProfileLine> = by
            .into_iter()
            .map(|(label, (calls, ms))| ProfileLine { label, calls, ms })
            .collect();
        lines.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        Ok(lines)
    }
}
