//! The CUDA weight stream (DESIGN.md §1): layers are copied from host memory into a ring
//! of VRAM slots on a copy stream of their own, ordered with events, `depth` layers ahead
//! of the compute stream; a slot is refilled only after an event says the compute that
//! read it is done, and the compute stream waits for a slot's copy on the device, so the
//! host never synchronises in the steady state.
//!
//! Host side: the memory-mapped file is registered with the driver as pinned, read-only
//! memory (`cuMemHostRegister`), so copies go from the page cache straight to the GPU
//! by DMA at the link's speed with no CPU copy. If the driver refuses (locked-memory
//! limits), copies fall back to pageable memory (the driver stages them; slower, and the
//! reason is kept in `note`). RESIDENT copies every layer once into pinned host memory.
//!
//! A VRAM budget keeps as many blocks resident on the GPU as fit (loaded once, never
//! copied again); the head (final norm + LM head) gets a slot of its own. At the
//! forward→backward turn the last blocks of the forward are still in the ring and are
//! used again instead of being copied twice.

use super::{CudaBackend, CudaBuf};
use crate::backend::DType;
use crate::error::{Error, Result};
use crate::gbi::{Gbi, Group, TensorInfo};
use crate::model::{LayerWeights, Model};
use crate::stream::{Part, WeightStream};
use cudarc::driver::{CudaEvent, CudaStream};
use std::collections::HashMap;
use std::sync::Arc;

/// Where the ring's host bytes come from.
enum Source {
    /// The mapped file, registered as pinned read-only memory (base pointer kept for
    /// unregistering).
    Registered(usize),
    /// The mapped file as pageable memory.
    Pageable,
    /// A pinned copy of every block (RESIDENT), by tensor name.
    Pinned(
        cudarc::driver::PinnedHostSlice<u8>,
        HashMap<String, std::ops::Range<usize>>,
    ),
}

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
}

/// The CUDA implementation of [`WeightStream`].
pub struct CudaRing {
    gbi: Arc<Gbi>,
    model: Model,
    layers: usize,
    copy: Arc<CudaStream>,
    source: Source,
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

/// Tensors of a part in a fixed order: (name in the layer map, file tensor).
fn part_tensors<'g>(
    gbi: &'g Gbi,
    model: &Model,
    part: Part,
) -> Result<Vec<(String, &'g TensorInfo)>> {
    match part {
        Part::Block(i) => {
            let prefix = model.block_prefix(i);
            let mut v: Vec<_> = gbi
                .group(Group::Layer(i))
                .into_iter()
                .filter_map(|t| t.name.strip_prefix(&prefix).map(|r| (r.to_string(), t)))
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(v)
        }
        Part::Head => model
            .head_names()
            .iter()
            .map(|&n| Ok((n.to_string(), gbi.tensor(n)?)))
            .collect(),
    }
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
        let mut note = None;
        let source = if opts.pinned_copy {
            let total: usize = (0..layers).map(|i| gbi.group_bytes(Group::Layer(i))).sum();
            let mut pinned = be.alloc_pinned(total)?;
            let mut ranges = HashMap::new();
            let mut off = 0;
            {
                let dst = pinned.as_mut_slice().map_err(|e| Error::Backend {
                    backend: "cuda",
                    op: "alloc_pinned",
                    msg: format!("{e:?}"),
                })?;
                for i in 0..layers {
                    gbi.check_unchanged()?;
                    for (_, t) in part_tensors(&gbi, &model, Part::Block(i))? {
                        dst[off..off + t.len].copy_from_slice(gbi.bytes(t));
                        ranges.insert(t.name.clone(), off..off + t.len);
                        off += t.len;
                    }
                }
            }
            Source::Pinned(pinned, ranges)
        } else {
            let m = gbi.mapped();
            // SAFETY: the range is the whole live mapping, kept alive by `gbi` (an Arc held
            // by this ring) until Drop unregisters it; READ_ONLY because the map is.
            let r = unsafe {
                cudarc::driver::sys::cuMemHostRegister_v2(
                    m.as_ptr() as *mut _,
                    m.len(),
                    cudarc::driver::sys::CU_MEMHOSTREGISTER_READ_ONLY,
                )
            };
            if r == cudarc::driver::sys::cudaError_enum::CUDA_SUCCESS {
                Source::Registered(m.as_ptr() as usize)
            } else {
                note = Some(format!(
                    "could not register the model file as pinned memory ({r:?}); copies go through pageable memory (raise `ulimit -l`, or use --strategy resident)"
                ));
                Source::Pageable
            }
        };
        // resident blocks under the budget, then the ring
        let n_resident = (opts.resident_bytes as usize)
            .checked_div(block_bytes)
            .unwrap_or(0)
            .min(layers);
        let mut ring = CudaRing {
            gbi: gbi.clone(),
            model: model.clone(),
            layers,
            copy,
            source,
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

    /// Host bytes of file tensor `t` from the source.
    fn host_bytes<'a>(&'a self, t: &'a TensorInfo) -> &'a [u8] {
        match &self.source {
            Source::Pinned(p, ranges) => match (ranges.get(&t.name), p.as_slice()) {
                (Some(r), Ok(s)) => &s[r.clone()],
                _ => self.gbi.bytes(t),
            },
            _ => self.gbi.bytes(t),
        }
    }

    /// Queue the copy of `part` into `w` on the copy stream after `free`; returns the
    /// event of its completion.
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
        let mut last = None;
        for (k, (name, t)) in tensors.iter().enumerate() {
            let dst: &mut CudaBuf = w
                .tensors
                .get_mut(name)
                .ok_or_else(|| Error::config(format!("internal: slot lacks {name}")))?;
            let bytes = self.host_bytes(t);
            // SAFETY: the bytes live in the mapped file or the pinned copy, both owned by
            // this ring and unchanged while it lives; the slot is not read by the compute
            // stream before the returned event (compute_wait in `get`), and is refilled only
            // after its `free` event.
            let ev = unsafe {
                be.upload_weight_async(dst, bytes, &self.copy, if k == 0 { free } else { None })
            }?;
            self.stats.bytes_copied += bytes.len() as u64;
            last = Some(ev);
        }
        last.ok_or_else(|| Error::config("internal: empty part"))
    }

    /// Position of `part` in the step's cycle F0..F(L−1), H, B(L−1)..B0, judged from the
    /// caller's hint of what comes next.
    fn cycle_index(&self, part: Part, next: Option<Part>) -> usize {
        let l = self.layers;
        match part {
            Part::Head => l,
            Part::Block(i) => {
                let forward = match next {
                    Some(Part::Block(j)) => j > i,
                    Some(Part::Head) => true,
                    None => false,
                };
                if forward { i } else { l + 1 + (l - 1 - i) }
            }
        }
    }

    fn cycle_part(&self, k: usize) -> Part {
        let l = self.layers;
        let k = k % (2 * l + 1);
        if k < l {
            Part::Block(k)
        } else if k == l {
            Part::Head
        } else {
            Part::Block(2 * l - k)
        }
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
        let k = self.cycle_index(part, next);
        let window: Vec<Part> = (k..=k + self.depth).map(|j| self.cycle_part(j)).collect();
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
                    return Err(Error::config(format!(
                        "internal: no free weight slot for {part:?} (a layer is still borrowed)"
                    )));
                }
            };
            if hit {
                self.stats.hits += 1;
            } else {
                self.stats.demand_loads += 1;
            }
            if let Some(ev) = &self.slots[s].loaded {
                be.compute_wait(ev)?;
            }
            self.current = Some(s);
            self.slots[s].weights.clone()
        };
        // prefetch what comes next, in order
        for p in window.iter().skip(1) {
            self.ensure(be, *p, &window)?;
        }
        Ok(out)
    }

    fn bytes_copied(&self) -> u64 {
        self.stats.bytes_copied
    }

    fn note(&self) -> Option<String> {
        self.note.clone()
    }

    fn held_elements(&self) -> usize {
        self.slots.iter().map(|s| s.weights.numel()).sum::<usize>()
            + self.resident.values().map(|w| w.numel()).sum::<usize>()
    }
}

impl Drop for CudaRing {
    fn drop(&mut self) {
        // copies must finish before the host memory they read goes away
        let _ = self.copy.synchronize();
        if let Source::Registered(base) = self.source {
            // SAFETY: `base` was registered in `new` and the mapping is still alive (gbi).
            unsafe {
                cudarc::driver::sys::cuMemHostUnregister(base as *mut _);
            }
        }
    }
}
