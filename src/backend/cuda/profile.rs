//! Where a step's GPU time goes: an opt-in timer around every kernel, GEMM, memset and
//! compute-stream copy ([`CudaOptions::profile`](super::CudaOptions::profile), or
//! `LEMA_CUDA_PROFILE=1`). Each timed region is bracketed by two events on the compute
//! stream; the time between one region's end and the next region's start is the stream
//! standing idle — waiting for a weight copy, an offloaded activation, or the host.
//!
//! Events come from a pool that is refilled by [`Profiler::take`], so a profiled step
//! creates no events once the pool is warm. Profiling adds two event records per launch
//! (a few microseconds of host time each); the GPU's own timings are unaffected.

use super::device::{driver_err, err};
use crate::backend::ProfileLine;
use crate::error::Result;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct State {
    pool: Vec<CudaEvent>,
    regions: Vec<(&'static str, CudaEvent, CudaEvent)>,
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
            state: Mutex::new(State::default()),
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
        st.regions.push((label, start, end));
        out
    }

    /// Wait for the recorded work, then the time per label (largest first) since the last
    /// call, with the idle time between regions as `idle`.
    pub fn take(&self) -> Result<Vec<ProfileLine>> {
        let op = "profile";
        let mut st = self
            .state
            .lock()
            .map_err(|_| err(op, "profiler lock poisoned"))?;
        let regions = std::mem::take(&mut st.regions);
        let mut by: BTreeMap<&'static str, (u64, f64)> = BTreeMap::new();
        let mut idle = (0u64, 0.0f64);
        let mut prev_end: Option<&CudaEvent> = None;
        for (label, start, end) in &regions {
            let ms = start.elapsed_ms(end).map_err(|e| driver_err(op, e))? as f64;
            let e = by.entry(label).or_default();
            e.0 += 1;
            e.1 += ms;
            if let Some(p) = prev_end {
                let gap = p.elapsed_ms(start).map_err(|e| driver_err(op, e))? as f64;
                if gap > 0.0 {
                    idle.0 += 1;
                    idle.1 += gap;
                }
            }
            prev_end = Some(end);
        }
        for (_, s, e) in regions {
            st.pool.push(s);
            st.pool.push(e);
        }
        let mut lines: Vec<ProfileLine> = by
            .into_iter()
            .map(|(label, (calls, ms))| ProfileLine {
                label: label.to_string(),
                calls,
                ms,
            })
            .collect();
        lines.push(ProfileLine {
            label: "idle".into(),
            calls: idle.0,
            ms: idle.1,
        });
        lines.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        Ok(lines)
    }
}
