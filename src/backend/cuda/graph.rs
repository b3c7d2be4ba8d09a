//! Step graphs: the device work of one training step captured once as a CUDA graph and
//! replayed for every later step with the same inputs, so that the host issues one launch
//! a step instead of one per kernel (issue 16, item 4).
//!
//! Why: a small shape's step is bound by the host. On the H200's host a cuBLAS GEMM costs
//! 8–12 µs of host time and a plain kernel launch 3–5 µs, so TinyLlama's 1880 launches a
//! step at 1 × 512 took longer to issue than the GPU took to run them.
//!
//! What the engine does (`crate::trainer`): it asks for a capture when a step's key
//! repeats the previous step's. The key names everything the step's host code decides
//! from: the batch's shape and packing, the counted tokens and the loss scale, the
//! adapters' configuration and buffers. The capture runs the step's host code as usual,
//! but every op only records into the graph. After the capture the graph runs once,
//! which is that step. Later steps with the same key replay it without running any host
//! code: only their *step inputs* differ, the bytes that depend on the tokens themselves
//! (the gathered embedding rows and the labels). The engine hands them to the capture,
//! which finds the one upload that carried each of them; a replay writes the new ones
//! into those uploads' page-locked buffers before the launch (the embedding gathered
//! straight into it, as an eager step gathers into its staging buffer).
//! A step input that no upload, or more than one, carried makes the graph not kept.
//!
//! What capturing asks of the ops:
//! * Nothing may read back or wait for the device (`copy_out`, `synchronize`, the
//!   out-of-memory retry); such an op fails the capture.
//! * Uploads copy from page-locked buffers that the graph keeps. A replay has the same
//!   inputs, so their bytes are still right.
//! * The loss is not downloaded inside the step. `lm_head_loss` leaves its per-row losses
//!   to the graph and returns a placeholder; the sum is taken after each launch.
//!
//! Memory: the graph's allocations live in the driver's graph pool, at the same
//! addresses on every launch. Everything the step allocates is freed inside the step,
//! except the per-row losses, which live in memory outside the graph's pool
//! ([`PlainAlloc`]) for as long as the graph. If the capture leaves anything else
//! allocated (a buffer that outlives the step), the graph runs once for that step and is
//! not kept.

use super::device::{Device, driver_err, err};
use super::{CudaBackend, pinned};
use crate::backend::LossSum;
use crate::error::Result;
use crate::hostmem::HostBuf;
use cudarc::driver::CudaGraph;
use cudarc::driver::sys::{self, CUdeviceptr};

/// The per-row losses that the captured `lm_head_loss` left on the device.
pub(super) struct PendingLoss {
    pub rows: PlainAlloc,
    pub n: usize,
    pub count: usize,
}

/// Device memory from `cuMemAlloc`, not from a stream's pool: made inside a capture (which
/// relaxed capture allows), it is no allocation node of the graph, so it outlives every
/// launch at one address and the graph's own memory never overlaps it. The per-row losses
/// that each launch writes and the host reads after it live here. (They were a graph
/// allocation freed after each download at first; compute-sanitizer's memcheck kept that
/// freed allocation's record and flagged the next launch's writes to graph memory at the
/// same addresses.)
pub(super) struct PlainAlloc {
    pub ptr: CUdeviceptr,
    ctx: std::sync::Arc<cudarc::driver::CudaContext>,
}

impl PlainAlloc {
    pub fn new(dev: &Device, op: &'static str, bytes: usize) -> Result<Self> {
        let mut ptr: CUdeviceptr = 0;
        // SAFETY: allocates `bytes` bytes of device memory in the bound context.
        let r = unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes.max(4)) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(err(
                op,
                format!("cuMemAlloc of {bytes} bytes failed: {r:?}"),
            ));
        }
        Ok(PlainAlloc {
            ptr,
            ctx: dev.ctx.clone(),
        })
    }
}

impl Drop for PlainAlloc {
    fn drop(&mut self) {
        // cuMemFree waits for the device work that uses the memory
        self.ctx.record_err(self.ctx.bind_to_thread());
        // SAFETY: allocated by cuMemAlloc above and freed once, here.
        let r = unsafe { sys::cuMemFree_v2(self.ptr) };
        if r != sys::CUresult::CUDA_SUCCESS {
            self.ctx
                .record_err::<()>(Err(cudarc::driver::DriverError(r)));
        }
    }
}

/// The state of an open capture.
pub(super) struct Capture {
    key: u64,
    /// The page-locked copies of what the captured uploads read, and their lengths.
    uploads: Vec<(Box<dyn HostBuf>, usize)>,
    loss: Option<PendingLoss>,
}

/// A captured step, ready to replay.
struct Ready {
    key: u64,
    graph: OwnedGraph,
    /// The per-row losses each launch writes, their row count and counted tokens.
    loss: (PlainAlloc, usize, usize),
    uploads: Vec<(Box<dyn HostBuf>, usize)>,
    /// For each step input, the upload that carries it.
    inputs: Vec<usize>,
}

/// A graph and its executable, used under the backend's graph lock only.
struct OwnedGraph(CudaGraph);

// SAFETY: the graph objects are only touched by the thread holding `Graphs`'s lock
// (CUDA requires access to one graph to be serialised, not confined to a thread).
unsafe impl Send for OwnedGraph {}

/// The backend's step graphs: an open capture, or the one captured step it holds.
#[derive(Default)]
pub(super) struct Graphs {
    capture: Option<Capture>,
    ready: Option<Ready>,
    /// Steps replayed since the backend was made.
    pub replays: u64,
    /// Why the last capture was not kept, for reports.
    pub dropped: Option<String>,
}

/// The loss from `n` per-row f32 losses.
pub(super) fn loss_sum(bytes: &[u8], n: usize, count: usize) -> LossSum {
    let sum: f64 = bytes[..n * 4]
        .chunks_exact(4)
        .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as f64)
        .sum();
    LossSum { sum, count }
}

impl CudaBackend {
    fn graphs(&self, op: &'static str) -> Result<std::sync::MutexGuard<'_, Graphs>> {
        self.graphs
            .lock()
            .map_err(|_| err(op, "graph lock poisoned"))
    }

    /// Whether an op is being captured.
    pub(super) fn capturing(&self) -> bool {
        self.dev.capturing()
    }

    /// Fail an op that cannot run inside a capture.
    pub(super) fn refuse_in_capture(&self, op: &'static str, what: &str) -> Result<()> {
        if self.capturing() {
            return Err(err(
                op,
                format!(
                    "{what} inside a CUDA graph capture (a bug in lema: set LEMA_CUDA_GRAPHS=0 to run without graphs)"
                ),
            ));
        }
        Ok(())
    }

    /// Inside a capture: copy `src` into `dst` through a page-locked buffer that the graph
    /// keeps (the copy node reads it at every replay).
    pub(super) fn capture_htod(
        &self,
        op: &'static str,
        dst: CUdeviceptr,
        src: &[u8],
    ) -> Result<()> {
        let mut host = pinned::PinnedBuf::alloc(self, src.len())?;
        host.bytes_mut()[..src.len()].copy_from_slice(src);
        // SAFETY: dst addresses src.len() bytes on this device (the caller's buffer); the
        // host memory is page-locked and lives as long as the graph that reads it.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(
                dst,
                &host.bytes()[..src.len()],
                self.dev.stream.cu_stream(),
            )
        }
        .map_err(|e| driver_err(op, e))?;
        let mut g = self.graphs(op)?;
        match g.capture.as_mut() {
            Some(c) => c.uploads.push((host, src.len())),
            None => return Err(err(op, "an upload into a capture that is not open")),
        }
        Ok(())
    }

    /// Inside a capture: keep the per-row losses for the download after the launch.
    pub(super) fn capture_loss(&self, loss: PendingLoss) -> Result<()> {
        let op = "lm_head_loss";
        let mut g = self.graphs(op)?;
        match g.capture.as_mut() {
            Some(c) if c.loss.is_none() => {
                c.loss = Some(loss);
                Ok(())
            }
            Some(_) => Err(err(op, "a second loss inside one captured step")),
            None => Err(err(op, "a loss into a capture that is not open")),
        }
    }

    pub(super) fn step_graph_begin_impl(&self, key: u64) -> Result<bool> {
        let op = "graph capture";
        if self.opts.profile || self.opts.sync_each_launch || !self.opts.step_graphs {
            return Ok(false);
        }
        let mut g = self.graphs(op)?;
        if g.capture.is_some() {
            return Err(err(op, "a capture is already open"));
        }
        g.ready = None; // its memory goes back to the graph pool before the new capture
        drop(g);
        self.dev.bind(op)?;
        // what the eager steps left in the stream's pool goes back to the driver, for the
        // graph's pool to take
        self.dev.trim_pool(op)?;
        self.dev
            .stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(|e| driver_err(op, e))?;
        self.dev.set_capturing(true);
        self.graphs(op)?.capture = Some(Capture {
            key,
            uploads: Vec::new(),
            loss: None,
        });
        Ok(true)
    }

    /// End the capture; with `ok` run the captured step once and return its loss. A
    /// capture that failed (`ok` false, or an error here) is dropped: nothing of it ran.
    /// `inputs` are the step's inputs (module docs), as the capture uploaded them.
    pub(super) fn step_graph_end_impl(
        &self,
        ok: bool,
        inputs: &[&[u8]],
    ) -> Result<Option<LossSum>> {
        let op = "graph capture";
        let capture = self.graphs(op)?.capture.take();
        let Some(capture) = capture else {
            return Ok(None);
        };
        self.dev.set_capturing(false);
        self.dev.bind(op)?;
        let ended = self
            .dev
            .stream
            .end_capture(sys::CUgraphInstantiate_flags(0));
        let graph = match (ok, ended) {
            (true, Ok(Some(graph))) => Some(graph),
            (_, Err(e)) => {
                self.graphs(op)?.dropped = Some(format!("the capture failed: {e:?}"));
                None
            }
            _ => None,
        };
        let Some(graph) = graph else {
            // errors that the failed capture left behind are its own
            let _ = self.dev.ctx.check_err();
            return Ok(None);
        };
        let Some(loss) = capture.loss else {
            self.graphs(op)?.dropped = Some("the captured step computed no loss".into());
            return Err(err(
                op,
                "the captured step computed no loss (a bug in lema)",
            ));
        };
        let (escaped, foreign) = memory_nodes(&graph).map_err(|e| driver_err(op, e))?;
        if let Err(e) = graph.launch() {
            // e.g. no memory for the graph's pool: nothing ran, the step runs eagerly
            let _ = self.dev.ctx.check_err();
            self.graphs(op)?.dropped = Some(format!("its launch failed: {e:?}"));
            return Ok(None);
        }
        let sum = self.download_losses(op, &loss.rows, loss.n, loss.count)?;
        let found = find_inputs(&capture.uploads, inputs);
        let mut g = self.graphs(op)?;
        g.dropped = match (&found, escaped, foreign) {
            (Ok(_), 0, 0) => None,
            (Err(why), _, _) => Some(why.clone()),
            // the step's buffers that outlive it hold the graph's memory: they stay
            // allocated (valid after the graph is destroyed), the graph is not replayed
            (_, e, 0) => Some(format!("{e} buffers allocated in the step outlive it")),
            // a replay would free them a second time
            (_, _, f) => Some(format!("the step frees {f} buffers made before it")),
        };
        if let (None, Ok(inputs)) = (&g.dropped, found) {
            g.ready = Some(Ready {
                key: capture.key,
                graph: OwnedGraph(graph),
                loss: (loss.rows, loss.n, loss.count),
                uploads: capture.uploads,
                inputs,
            });
        }
        Ok(Some(sum))
    }

    /// Replay the step held under `key`: its first input (the embedding rows) written by
    /// `embed` straight into the page-locked buffer the graph uploads from, its second
    /// (the labels) copied there.
    pub(super) fn step_graph_replay_impl(
        &self,
        key: u64,
        embed: &mut dyn FnMut(&mut [f32]) -> Result<()>,
        labels: &[u8],
    ) -> Result<Option<LossSum>> {
        let op = "graph replay";
        let mut g = self.graphs(op)?;
        let Some(ready) = g.ready.as_mut().filter(|r| r.key == key) else {
            return Ok(None);
        };
        let [e, l] = ready.inputs[..] else {
            return Err(err(
                op,
                "a step graph without its two inputs (a bug in lema)",
            ));
        };
        if ready.uploads[l].1 != labels.len() {
            return Err(err(op, "labels unlike the captured ones (a bug in lema)"));
        }
        // the last launch read these buffers before its loss came back
        ready.uploads[l].0.bytes_mut()[..labels.len()].copy_from_slice(labels);
        let (host, len) = &mut ready.uploads[e];
        let bytes = &mut host.bytes_mut()[..*len];
        // SAFETY: the page-locked buffer is page-aligned (so f32-aligned) and `len` long;
        // every bit pattern is an f32.
        let values = unsafe {
            std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<f32>(), bytes.len() / 4)
        };
        embed(values)?;
        self.dev.bind(op)?;
        if let Err(e) = ready.graph.0.launch() {
            // e.g. no memory for the graph's pool: run the step eagerly instead
            g.dropped = Some(format!("its launch failed: {e:?}"));
            g.ready = None;
            let _ = self.dev.ctx.check_err();
            return Ok(None);
        }
        let (rows, n, count) = &ready.loss;
        let sum = self.download_losses(op, rows, *n, *count)?;
        g.replays += 1;
        Ok(Some(sum))
    }

    /// The loss from the `n` per-row losses at `rows`, after the work queued so far.
    fn download_losses(
        &self,
        op: &'static str,
        rows: &PlainAlloc,
        n: usize,
        count: usize,
    ) -> Result<LossSum> {
        let mut bytes = vec![0u8; n * 4];
        // SAFETY: `rows` holds n f32 losses; the copy is ordered after the launch that
        // writes them and waited for.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(
                &mut bytes,
                rows.ptr,
                self.dev.stream.cu_stream(),
            )
            .map_err(|e| driver_err(op, e))?;
        }
        self.dev
            .stream
            .synchronize()
            .map_err(|e| driver_err(op, e))?;
        Ok(loss_sum(&bytes, n, count))
    }
}

/// For each step input, the one captured upload that carried exactly its bytes.
fn find_inputs(
    uploads: &[(Box<dyn HostBuf>, usize)],
    inputs: &[&[u8]],
) -> std::result::Result<Vec<usize>, String> {
    inputs
        .iter()
        .enumerate()
        .map(|(k, x)| {
            let mut hits = uploads
                .iter()
                .enumerate()
                .filter(|(_, (b, len))| *len == x.len() && &b.bytes()[..*len] == *x);
            match (hits.next(), hits.next()) {
                (Some((u, _)), None) => Ok(u),
                (None, _) => Err(format!("no upload of the step carried its input {k}")),
                (Some(_), Some(_)) => Err(format!(
                    "more than one upload of the step carried the bytes of its input {k}"
                )),
            }
        })
        .collect()
}

/// Of the graph's memory nodes: the allocations not freed inside it, and the frees of
/// memory that it did not allocate.
fn memory_nodes(
    graph: &CudaGraph,
) -> std::result::Result<(usize, usize), cudarc::driver::DriverError> {
    use cudarc::driver::DriverError;
    let g = graph.cu_graph();
    let mut count = 0usize;
    let check = |r: sys::CUresult| match r {
        sys::CUresult::CUDA_SUCCESS => Ok(()),
        e => Err(DriverError(e)),
    };
    // SAFETY: queries of a graph this function does not modify; the node array is sized
    // by the first call.
    unsafe {
        check(sys::cuGraphGetNodes(g, std::ptr::null_mut(), &mut count))?;
        let mut nodes = vec![std::ptr::null_mut(); count];
        check(sys::cuGraphGetNodes(g, nodes.as_mut_ptr(), &mut count))?;
        let mut allocated = std::collections::HashSet::new();
        let mut freed = std::collections::HashSet::new();
        for &node in &nodes[..count] {
            let mut t = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
            check(sys::cuGraphNodeGetType(node, &mut t))?;
            match t {
                sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_ALLOC => {
                    let mut p: sys::CUDA_MEM_ALLOC_NODE_PARAMS = std::mem::zeroed();
                    check(sys::cuGraphMemAllocNodeGetParams(node, &mut p))?;
                    allocated.insert(p.dptr);
                }
                sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_FREE => {
                    let mut p: CUdeviceptr = 0;
                    check(sys::cuGraphMemFreeNodeGetParams(node, &mut p))?;
                    freed.insert(p);
                }
                _ => {}
            }
        }
        let escaped = allocated.iter().filter(|p| !freed.contains(p)).count();
        Ok((escaped, freed.difference(&allocated).count()))
    }
}
