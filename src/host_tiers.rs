//! The host side of a weight stream, after the [`TierPlan`]: the bytes of each streamed
//! layer come from the mapped file, from a copy in host RAM (read once at start), or from
//! the staging ring (read from disk at each use). The CPU stream and the CUDA ring both
//! take their bytes from here; only what they do with them differs.

use crate::diskread::DiskReader;
use crate::error::Result;
use crate::gbi::{Gbi, Group, TensorInfo};
use crate::hostmem::{Alloc, HostBudget, HostBuf};
use crate::model::Model;
use crate::staging::{Fence, Layout, Staged, StagingRing};
use crate::stream::{Part, part_tensors};
use crate::tiers::{PlanInput, Tier, TierPlan, WeightSource};
use std::collections::HashMap;
use std::sync::Arc;

/// Buffers of the staging ring: about two layers, as the guide says (one being copied or
/// computed from while the next is read).
pub const STAGING_BUFFERS: usize = 2;

/// A layer's bytes, while in use.
pub enum Held {
    Mapped,
    Ram(Part),
    Staged(Staged),
}

/// What the planner needs besides the file: from [`crate::api::LemaConfig`] and the backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostOptions {
    pub source: WeightSource,
    /// `max_host_memory`.
    pub max_host_memory: Option<u64>,
    /// Blocks 0..n stay on the device.
    pub on_device: usize,
    /// Host bytes the backend keeps for layers in use (the CPU's decoded copies).
    pub working_bytes: u64,
    /// The mapped path pins the whole file (CUDA registers it with the driver).
    pub pins_mapping: bool,
}

/// See the module's description.
pub struct HostTiers {
    gbi: Arc<Gbi>,
    plan: TierPlan,
    ram: HashMap<Part, (Box<dyn HostBuf>, Layout)>,
    staging: Option<StagingRing>,
    /// How the file is read, when it is.
    reads: Option<String>,
}

/// Every part in the order of the file's layers: blocks, then the head.
fn parts(layers: usize) -> impl Iterator<Item = Part> {
    (0..layers)
        .map(Part::Block)
        .chain(std::iter::once(Part::Head))
}

impl HostTiers {
    /// Everything from the mapping (no planning, no probing).
    pub fn mapped(gbi: Arc<Gbi>, model: &Model) -> HostTiers {
        let layers = model.config().num_hidden_layers;
        let mapped_bytes = parts(layers)
            .filter_map(|p| tensors_of(&gbi, model, p).ok())
            .flatten()
            .map(|t| t.len as u64)
            .sum();
        HostTiers {
            gbi,
            plan: TierPlan {
                blocks: vec![Tier::Mapped; layers],
                head: Tier::Mapped,
                staging_buffers: 0,
                buffer_bytes: 0,
                ram_bytes: 0,
                disk_bytes: 0,
                mapped_bytes,
                why: "every layer from the mapped file".into(),
            },
            ram: HashMap::new(),
            staging: None,
            reads: None,
        }
    }

    /// Plan the tiers of `model` for this process's host budget and build them: the RAM
    /// tier is read now, the staging ring allocated (buffers from `alloc`).
    pub fn planned(
        gbi: Arc<Gbi>,
        model: &Model,
        opts: HostOptions,
        alloc: Alloc,
    ) -> Result<HostTiers> {
        let layers = model.config().num_hidden_layers;
        let mut layouts = HashMap::new();
        for p in parts(layers) {
            layouts.insert(p, Layout::of(&tensors_of(&gbi, model, p)?));
        }
        let bytes = |p: Part| -> Result<u64> {
            Ok(tensors_of(&gbi, model, p)?
                .iter()
                .map(|t| t.len as u64)
                .sum())
        };
        let input = PlanInput {
            block_bytes: (0..layers)
                .map(|i| bytes(Part::Block(i)))
                .collect::<Result<_>>()?,
            head_bytes: bytes(Part::Head)?,
            on_device: opts.on_device,
            working_bytes: opts.working_bytes,
            staging_buffers: STAGING_BUFFERS,
            buffer_bytes: layouts.values().map(|l| l.len as u64).max().unwrap_or(0),
            source: opts.source,
            mapping_pin_bytes: if opts.pins_mapping {
                gbi.mapped().len() as u64
            } else {
                0
            },
        };
        let plan = crate::tiers::plan(&input, &HostBudget::probe(opts.max_host_memory))?;
        Self::build(gbi, plan, layouts, alloc)
    }

    /// RESIDENT on CUDA: a copy of every block in host memory from `alloc` (pinned), the
    /// head from the mapping; refused with the numbers when the blocks do not fit what
    /// the process may use.
    pub fn resident(
        gbi: Arc<Gbi>,
        model: &Model,
        max_host_memory: Option<u64>,
        alloc: Alloc,
    ) -> Result<HostTiers> {
        let layers = model.config().num_hidden_layers;
        let mut layouts = HashMap::new();
        for i in 0..layers {
            let p = Part::Block(i);
            layouts.insert(p, Layout::of(&tensors_of(&gbi, model, p)?));
        }
        let ram_bytes: u64 = layouts.values().map(|l| l.len as u64).sum();
        HostBudget::probe(max_host_memory).check(
            ram_bytes,
            "RESIDENT (a pinned host copy of every block)",
            "use --strategy streaming, which reads the layers that do not fit from disk, or raise the memory limit (max_host_memory, the cgroup's memory.max)",
        )?;
        let plan = TierPlan {
            blocks: vec![Tier::Ram; layers],
            head: Tier::Mapped,
            staging_buffers: 0,
            buffer_bytes: 0,
            ram_bytes,
            disk_bytes: 0,
            mapped_bytes: 0,
            why: "strategy resident".into(),
        };
        Self::build(gbi, plan, layouts, alloc)
    }

    /// Tiers after `plan`: RAM-tier layers read into buffers from `alloc` now.
    pub fn build(
        gbi: Arc<Gbi>,
        mut plan: TierPlan,
        mut layouts: HashMap<Part, Layout>,
        alloc: Alloc,
    ) -> Result<HostTiers> {
        if plan.all_mapped() {
            return Ok(HostTiers {
                gbi,
                plan,
                ram: HashMap::new(),
                staging: None,
                reads: None,
            });
        }
        let reader = Arc::new(DiskReader::new(gbi.file(), gbi.path())?);
        let layers = plan.blocks.len();
        let mut ram = HashMap::new();
        let mut disk = HashMap::new();
        for p in parts(layers) {
            let Some(layout) = layouts.remove(&p) else {
                continue;
            };
            match plan.tier(p) {
                Tier::Ram => {
                    gbi.check_unchanged()?;
                    let mut buf = alloc(layout.len)?;
                    layout.read(&reader, buf.bytes_mut())?;
                    ram.insert(p, (buf, layout));
                }
                Tier::Disk => {
                    disk.insert(p, Arc::new(layout));
                }
                Tier::Device | Tier::Mapped => {}
            }
        }
        let staging = if disk.is_empty() {
            plan.staging_buffers = 0;
            None
        } else {
            Some(StagingRing::new(
                gbi.clone(),
                reader.clone(),
                disk,
                plan.staging_buffers,
                alloc,
            )?)
        };
        Ok(HostTiers {
            gbi,
            plan,
            ram,
            staging,
            reads: Some(reader.mode()),
        })
    }

    /// The plan in effect.
    pub fn plan(&self) -> &TierPlan {
        &self.plan
    }

    /// The plan as the line printed once at start, with how the file is read.
    pub fn describe(&self) -> String {
        match &self.reads {
            Some(r) => format!("{}; {r}", self.plan),
            None => self.plan.to_string(),
        }
    }

    /// Bytes read from disk through the staging ring so far.
    pub fn disk_bytes_read(&self) -> u64 {
        self.staging.as_ref().map_or(0, |s| s.bytes_read)
    }

    /// The bytes of `part`, until [`HostTiers::release`] (a disk layer waits for its read).
    pub fn acquire(&mut self, part: Part) -> Result<Held> {
        if self.ram.contains_key(&part) {
            return Ok(Held::Ram(part));
        }
        match (&mut self.staging, self.plan.tier(part)) {
            (Some(s), Tier::Disk) => Ok(Held::Staged(s.take(part)?)),
            _ => Ok(Held::Mapped),
        }
    }

    /// The bytes of tensor `t` of the held layer.
    pub fn bytes<'a>(&'a self, held: &'a Held, t: &TensorInfo) -> &'a [u8] {
        match held {
            Held::Mapped => self.gbi.bytes(t),
            Held::Ram(p) => match self.ram.get(p) {
                Some((buf, layout)) => layout.bytes(buf.bytes(), t),
                None => &[],
            },
            Held::Staged(s) => match self.staging.as_ref().and_then(|r| r.layout(s.part)) {
                Some(layout) => layout.bytes(s.buf.bytes(), t),
                None => &[],
            },
        }
    }

    /// Done with `held`; a staging buffer is refilled only after `fence`.
    pub fn release(&mut self, held: Held, fence: Option<Box<dyn Fence>>) {
        if let (Held::Staged(s), Some(ring)) = (held, &mut self.staging) {
            ring.give_back(s, fence);
        }
    }

    /// Start fetching `upcoming` (in the order they will be asked for): the first mapped
    /// layer's pages are advised in (as before), disk layers are read into free staging
    /// buffers while there are some.
    pub fn prefetch(&mut self, upcoming: &[Part]) {
        if let Some(&p) = upcoming.first()
            && self.plan.tier(p) == Tier::Mapped
        {
            self.gbi.prefetch(match p {
                Part::Block(i) => Group::Layer(i),
                Part::Head => Group::Head,
            });
        }
        if let Some(ring) = &mut self.staging {
            for &p in upcoming {
                if self.plan.tier(p) == Tier::Disk && !ring.prefetch(p, upcoming) {
                    break;
                }
            }
        }
    }
}

/// The file tensors of `part`.
fn tensors_of<'g>(gbi: &'g Gbi, model: &Model, part: Part) -> Result<Vec<&'g TensorInfo>> {
    Ok(part_tensors(gbi, model, part)?
        .into_iter()
        .map(|(_, t)| t)
        .collect())
}
