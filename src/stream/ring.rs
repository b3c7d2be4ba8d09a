//! The CUDA weight ring's policy (ARCHITECTURE.md §1): which layer goes into which VRAM slot and
//! when. Layers are copied from host memory into a ring of VRAM slots on a copy stream of
//! their own, ordered with events, `depth` layers ahead of the compute stream; a slot is
//! refilled only after an event says the compute that read it is done, and the compute
//! stream waits for a slot's copy on the device, so the host never synchronises in the
//! steady state. The device mechanics it drives (buffers, asynchronous copies, events,
//! pinned memory) are the backend's ([`crate::backend::cuda`]); this file decides.
//!
//! Host side (the tier plan, `crate::tiers`): when the streamed layers fit the host
//! budget, the memory-mapped file is registered with the driver as pinned, read-only
//! memory ([`ReadOnlyPin`]), so copies go from the page cache straight to the GPU
//! by DMA at the link's speed with no CPU copy. If the driver refuses (locked-memory
//! limits), copies fall back to pageable memory (the driver stages them; slower, and the
//! reason is kept in `note`). When they do not fit, as many layers as fit are kept in
//! pinned host memory and the rest are read from disk into the pinned staging ring
//! (`crate::staging`) and copied from there; a staging buffer is refilled only after the
//! event of its copy. RESIDENT keeps a pinned copy of every block.
//!
//! A VRAM budget keeps as many blocks resident on the GPU as fit (loaded once, never
//! copied again); the head (final norm + LM head) gets a slot of its own. At the
//! forward→backward turn the last blocks of the forward are still in the ring and are
//! used again instead of being copied twice.

use super::{Cycle, Part, Strategy, WeightStream, part_tensors};
use crate::backend::DType;
use crate::backend::cuda::pinned::{PinnedBuf, ReadOnlyPin};
use crate::backend::cuda::{CudaBackend, CudaBuf, CudaEvent, CudaStream, RUNTIME_HOST_BYTES};
use crate::error::{Error, Result};
use crate::gbi::{Gbi, TensorInfo};
use crate::host_tiers::{HostOptions, HostTiers, STAGING_BUFFERS};
use crate::model::{LayerWeights, Model};
use crate::staging::Fence;
use crate::tiers::WeightSource;
use std::collections::HashMap;
use std::sync::Arc;

/// One VRAM slot of the ring.
struct Slot {
    part: Option<Part>,
    weights: Arc<LayerWeights<CudaBackend>>,
    /// Completes when the slot's copy has landed.
    loaded: Option<CudaEvent>,
    /// Completes when the last compute that read the slot is done.
    free: Option<CudaEvent>,
}

/// Statistics of the stream, for `lema bench`.
#[derive(Clone, Copy, Debug, Default)]
pub struct RingStats {
    /// Bytes copied host → device.
    pub bytes_copied: u64,
    /// Copies issued when the part was asked for (not prefetched in time).
    pub demand_loads: u64,
    /// Parts served from a slot or the resident set without a copy.
    pub hits: u64,
}

/// Options of the CUDA stream.
#[derive(Clone, Copy, Debug)]
pub struct RingOptions {
    /// Layers copied ahead of the one in use.
    pub depth: usize,
    /// Bytes of VRAM for blocks kept resident (0: pure streaming).
    pub resident_bytes: u64,
    /// Copy every block into pinned host memory first (RESIDENT).
    pub pinned_copy: bool,
    /// Where streamed layers come from on the host (`weight_source`).
    pub source: WeightSource,
    /// `max_host_memory`.
    pub max_host_memory: Option<u64>,
}

impl RingOptions {
    /// The ring's options for a memory strategy: BUDGET keeps as many blocks resident in
    /// VRAM as `max_vram` bytes hold (default: what is free on `be`, less 4 GiB for
    /// activations), RESIDENT copies every block into pinned host memory first, STREAMING
    /// does neither. `depth` is at least 1.
    pub fn for_strategy(
        be: &CudaBackend,
        strategy: Strategy,
        max_vram: Option<u64>,
        depth: usize,
        source: WeightSource,
        max_host_memory: Option<u64>,
    ) -> Self {
        let resident_bytes = match strategy {
            Strategy::Budget => max_vram.unwrap_or_else(|| {
                let free = be.mem_info().map_or(0, |(free, _)| free as u64);
                free.saturating_sub(4 << 30)
            }),
            _ => 0,
        };
        RingOptions {
            depth: depth.max(1),
            resident_bytes,
            pinned_copy: strategy == Strategy::Resident,
            source,
            max_host_memory,
        }
    }
}

/// The CUDA implementation of [`WeightStream`].
pub struct CudaRing {
    gbi: Arc<Gbi>,
    model: Model,
    cycle: Cycle,
    copy: Arc<CudaStream>,
    /// The host bytes of every streamed layer.
    tiers: HostTiers,
    /// The mapping's registration as pinned memory, when it is registered; released in
    /// Drop after the copy stream has drained, while `gbi` still holds the mapping.
    registered: Option<ReadOnlyPin>,
    /// Block slots (the ring) followed by the head slot.
    slots: Vec<Slot>,
    resident: HashMap<usize, Arc<LayerWeights<CudaBackend>>>,
    /// Events of resident blocks' one-time loads, waited for once.
    resident_loaded: HashMap<usize, CudaEvent>,
    /// Slot handed out last (its `free` event is recorded at the next request).
    current: Option<usize>,
    depth: usize,
    pub stats: RingStats,
    /// Why the fast path is not in use, if it is not.
    pub note: Option<String>,
}

fn alloc_like(
    be: &CudaBackend,
    tensors: &[(String, &TensorInfo)],
) -> Result<LayerWeights<CudaBackend>> {
    let mut map = HashMap::new();
    for (name, t) in tensors {
        let len = t.shape.iter().product::<usize>();
        map.insert(name.clone(), be.alloc_weight(len, t.dtype)?);
    }
    Ok(LayerWeights { tensors: map })
}

/// Register the whole mapping as pinned read-only memory, or say why not.
fn register(gbi: &Gbi) -> std::result::Result<ReadOnlyPin, String> {
    // SAFETY: the range is the whole live mapping, kept alive by `gbi` (an Arc held by
    // the ring) until the ring's Drop releases the registration, after its copies.
    unsafe { ReadOnlyPin::new(gbi.mapped()) }.map_err(|r| {
        format!(
            "could not register the model file as pinned memory ({r}); copies go through pageable memory (raise `ulimit -l`, or use --strategy resident)"
        )
    })
}

impl CudaRing {
    /// A ring over `gbi` for `model` on `be`.
    pub fn new(be: &CudaBackend, gbi: Arc<Gbi>, model: Model, opts: RingOptions) -> Result<Self> {
        let layers = model.config().num_hidden_layers;
        let copy = be.new_copy_stream()?;
        // every block must have the same tensors (names, types, sizes) to share slots
        let template = part_tensors(&gbi, &model, Part::Block(0))?;
        let sig = |v: &[(String, &TensorInfo)]| -> Vec<(String, DType, usize)> {
            v.iter().map(|(n, t)| (n.clone(), t.dtype, t.len)).collect()
        };
        let block_bytes: usize = template.iter().map(|(_, t)| t.len).sum();
        for i in 1..layers {
            if sig(&part_tensors(&gbi, &model, Part::Block(i))?) != sig(&template) {
                return Err(Error::format(
                    gbi.path(),
                    format!(
                        "block {i} differs from block 0 in its tensors' names, types or sizes; the CUDA stream needs uniform blocks"
                    ),
                ));
            }
        }
        // resident blocks under the budget, then the ring
        let n_resident = (opts.resident_bytes as usize)
            .checked_div(block_bytes)
            .unwrap_or(0)
            .min(layers);
        let mut alloc = |n: usize| PinnedBuf::alloc(be, n);
        let tiers = if opts.pinned_copy {
            HostTiers::resident(gbi.clone(), &model, opts.max_host_memory, &mut alloc)?
        } else {
            let host = HostOptions {
                source: opts.source,
                max_host_memory: opts.max_host_memory,
                on_device: n_resident,
                working_bytes: RUNTIME_HOST_BYTES,
                pins_mapping: true,
            };
            HostTiers::planned(gbi.clone(), &model, host, &mut alloc)?
        };
        let (registered, note) = if !opts.pinned_copy && tiers.plan().all_mapped() {
            match register(&gbi) {
                Ok(pin) => (Some(pin), None),
                Err(why) => (None, Some(why)),
            }
        } else {
            (None, None)
        };
        let mut ring = CudaRing {
            gbi: gbi.clone(),
            model: model.clone(),
            cycle: Cycle { layers },
            copy,
            tiers,
            registered,
            slots: Vec::new(),
            resident: HashMap::new(),
            resident_loaded: HashMap::new(),
            current: None,
            depth: opts.depth.max(1),
            stats: RingStats::default(),
            note,
        };
        for i in 0..n_resident {
            let mut w = alloc_like(be, &part_tensors(&gbi, &model, Part::Block(i))?)?;
            let ev = ring.copy_into(be, &mut w, Part::Block(i), None)?;
            ring.resident.insert(i, Arc::new(w));
            ring.resident_loaded.insert(i, ev);
        }
        let streamed = layers - n_resident;
        let n_slots = if streamed == 0 {
            0
        } else {
            (ring.depth + 1).min(streamed)
        };
        for _ in 0..n_slots {
            ring.slots.push(Slot {
                part: None,
                weights: Arc::new(alloc_like(be, &template)?),
                loaded: None,
                free: None,
            });
        }
        let head = part_tensors(&gbi, &model, Part::Head)?;
        ring.slots.push(Slot {
            part: None,
            weights: Arc::new(alloc_like(be, &head)?),
            loaded: None,
            free: None,
        });
        Ok(ring)
    }

    /// Queue the copy of `part` into `w` on the copy stream after `free`; returns the
    /// event of its completion. A layer read from disk waits here for its read.
    fn copy_into(
        &mut self,
        be: &CudaBackend,
        w: &mut LayerWeights<CudaBackend>,
        part: Part,
        free: Option<&CudaEvent>,
    ) -> Result<CudaEvent> {
        // a file modified since it was opened is an error naming it, not a copy of
        // changed (or vanished) bytes
        self.gbi.check_unchanged()?;
        let tensors = part_tensors(&self.gbi, &self.model, part)?;
        let held = self.tiers.acquire(part)?;
        let mut queue = || -> Result<CudaEvent> {
            let mut last = None;
            for (k, (name, t)) in tensors.iter().enumerate() {
                let dst: &mut CudaBuf = w
                    .tensors
                    .get_mut(name)
                    .ok_or_else(|| Error::internal(format!("slot lacks {name}")))?;
                let bytes = self.tiers.bytes(&held, t);
                // SAFETY: the bytes live in the mapped file, a pinned RAM-tier copy or a
                // staging buffer, all owned by this ring; a staging buffer is refilled only
                // after the fence recorded below, behind this copy. The slot is not read by
                // the compute stream before the returned event (compute_wait in `get`), and
                // is refilled only after its `free` event.
                let ev = unsafe {
                    be.upload_weight_async(dst, bytes, &self.copy, if k == 0 { free } else { None })
                }?;
                self.stats.bytes_copied += bytes.len() as u64;
                last = Some(ev);
            }
            last.ok_or_else(|| Error::internal("empty part"))
        };
        let out = queue();
        // the staging buffer goes back to its ring with a fence behind every copy queued
        // from it (or, when even that fails, after the copy stream has drained)
        let fence: Option<Box<dyn Fence>> = match self.copy.record_event(None) {
            Ok(ev) => Some(Box::new(ev)),
            Err(_) => {
                let _ = self.copy.synchronize();
                None
            }
        };
        self.tiers.release(held, fence);
        out
    }

    fn head_slot(&self) -> usize {
        self.slots.len() - 1
    }

    /// Start the copy of `part` into a slot unless it is resident or already in one; the
    /// slot is one not needed within `keep`.
    fn ensure(&mut self, be: &CudaBackend, part: Part, keep: &[Part]) -> Result<Option<usize>> {
        if let Part::Block(i) = part
            && self.resident.contains_key(&i)
        {
            return Ok(None);
        }
        if let Some(s) = self.slots.iter().position(|s| s.part == Some(part)) {
            return Ok(Some(s));
        }
        let victim = match part {
            Part::Head => Some(self.head_slot()),
            Part::Block(_) => (0..self.head_slot())
                .filter(|&s| Some(s) != self.current)
                .find(|&s| self.slots[s].part.is_none_or(|p| !keep.contains(&p))),
        };
        let Some(s) = victim else { return Ok(None) };
        let free = self.slots[s].free.take();
        let mut weights = std::mem::replace(
            &mut self.slots[s].weights,
            Arc::new(LayerWeights {
                tensors: HashMap::new(),
            }),
        );
        let result = match Arc::get_mut(&mut weights) {
            Some(w) => self.copy_into(be, w, part, free.as_ref()).map(Some),
            None => Ok(None), // still borrowed by the caller: skip this prefetch
        };
        self.slots[s].weights = weights;
        match result? {
            Some(ev) => {
                self.slots[s].part = Some(part);
                self.slots[s].loaded = Some(ev);
                Ok(Some(s))
            }
            None => {
                self.slots[s].free = free;
                Ok(None)
            }
        }
    }
}

impl WeightStream<CudaBackend> for CudaRing {
    fn get(
        &mut self,
        be: &CudaBackend,
        part: Part,
        next: Option<Part>,
    ) -> Result<Arc<LayerWeights<CudaBackend>>> {
        // the compute that read the previous slot has been queued: mark when it is done
        if let Some(c) = self.current.take() {
            self.slots[c].free = Some(be.record_compute_event()?);
        }
        let window = self.cycle.window(part, next, self.depth);
        let out = if let Part::Block(i) = part
            && let Some(w) = self.resident.get(&i).cloned()
        {
            if let Some(ev) = self.resident_loaded.remove(&i) {
                be.compute_wait(&ev)?;
            }
            self.stats.hits += 1;
            w
        } else {
            let hit = self.slots.iter().any(|s| s.part == Some(part));
            let s = match self.ensure(be, part, &window)? {
                Some(s) => s,
                None => {
                    return Err(Error::internal(format!(
                        "no free weight slot for {part:?} (a layer is still borrowed)"
                    )));
                }
            };
            if hit {
                self.stats.hits += 1;
            } else {
                self.stats.demand_loads += 1;
            }
            // once waited for, later compute is ordered after it on the stream
            if let Some(ev) = self.slots[s].loaded.take() {
                be.compute_wait(&ev)?;
            }
            self.current = Some(s);
            self.slots[s].weights.clone()
        };
        // prefetch what comes next, in order; then start reading from disk the layers
        // after those
        for p in window.iter().skip(1) {
            self.ensure(be, *p, &window)?;
        }
        let beyond = self.cycle.window(part, next, self.depth + STAGING_BUFFERS);
        self.tiers.prefetch(&beyond[self.depth + 1..]);
        Ok(out)
    }

    fn bytes_copied(&self) -> u64 {
        self.stats.bytes_copied
    }

    fn note(&self) -> Option<String> {
        self.note.clone()
    }

    fn plan(&self) -> Option<String> {
        Some(self.tiers.describe())
    }

    fn disk_bytes_read(&self) -> u64 {
        self.tiers.disk_bytes_read()
    }

    fn held_elements(&self) -> usize {
        self.slots.iter().map(|s| s.weights.numel()).sum::<usize>()
            + self.resident.values().map(|w| w.numel()).sum::<usize>()
    }

    fn static_on_device(&self) -> bool {
        let head = &self.slots[self.head_slot()];
        self.resident.len() == self.model.config().num_hidden_layers
            && self.resident_loaded.is_empty()
            && head.part == Some(Part::Head)
            && head.loaded.is_none()
    }
}

impl Drop for CudaRing {
    fn drop(&mut self) {
        // copies must finish before the host memory they read goes away
        let _ = self.copy.synchronize();
        // unregistered now, while the mapping is still alive (`gbi`)
        drop(self.registered.take());
    }
}

/// A copy-stream event as the fence that says a staging buffer's last reader is done.
impl Fence for CudaEvent {
    fn wait(&self) -> Result<()> {
        self.synchronize().map_err(|e| Error::Backend {
            backend: "cuda",
            op: "staging fence",
            msg: format!("{e:?}"),
        })
    }
}
