//! WeightStream: hands the trainer each layer's frozen weights on the device, in the
//! order it asks (0..L forward, L−1..0 backward). Memory strategies are implementations
//! of one trait, not branches in the trainer.
//!
//! Here: the trait, the order of a step ([`Cycle`]), the generic streams ([`Streaming`],
//! [`Resident`]) and, with the `cuda` feature, the CUDA ring's policy (`ring`). The host
//! side they read from is `crate::host_tiers` (after the plan of `crate::tiers`).

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::gbi::{Gbi, Group, TensorInfo};
use crate::host_tiers::HostTiers;
use crate::model::{LayerWeights, Model};
use std::collections::HashMap;
use std::sync::Arc;

#[cfg(feature = "cuda")]
pub mod ring;

/// How frozen weights are kept between uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Read each layer from the mapped file when it is needed; keep nothing else.
    Streaming,
    /// Decode every layer once and keep it (CUDA: in pinned host memory).
    Resident,
    /// CUDA: keep as many layers on the GPU as `max_vram` allows and stream the rest
    /// (the CPU has no separate device memory and treats it as RESIDENT).
    Budget,
}

impl std::str::FromStr for Strategy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "streaming" => Ok(Strategy::Streaming),
            "resident" => Ok(Strategy::Resident),
            "budget" => Ok(Strategy::Budget),
            _ => Err(Error::config(format!(
                "unknown strategy '{s}'; supported: streaming, resident, budget"
            ))),
        }
    }
}

/// Which group of weights: a block or the head (final norm + LM head).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    Block(usize),
    Head,
}

/// A source of device-resident layer weights.
pub trait WeightStream<B: Backend>: Send {
    /// The weights of `part`, on the device. `next` says what the caller will ask for
    /// after it, so the stream can start fetching it.
    fn get(&mut self, be: &B, part: Part, next: Option<Part>) -> Result<Arc<LayerWeights<B>>>;
    /// Bytes of weights currently held by the stream on the device.
    fn held_elements(&self) -> usize;
    /// Bytes of weights copied from the host to the device so far.
    fn bytes_copied(&self) -> u64 {
        0
    }
    /// Why the stream runs on a slower path than it could, if it does.
    fn note(&self) -> Option<String> {
        None
    }
    /// Where the streamed layers come from (the tier plan), printed once at start.
    fn plan(&self) -> Option<String> {
        None
    }
    /// Bytes read from disk through a staging ring so far.
    fn disk_bytes_read(&self) -> u64 {
        0
    }
    /// Every part is on the device and a step's `get`s queue nothing on the device (no
    /// copy, no wait), so the step's work may be captured and replayed as a graph.
    fn static_on_device(&self) -> bool {
        false
    }
}

/// Tensors of a part in a fixed order: (name in the layer map, file tensor). Names are
/// relative to the block prefix (blocks) or full (head).
pub fn part_tensors<'g>(
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

/// The order a step asks for parts in: F0..F(L−1), H, B(L−1)..B0, and around again.
#[derive(Clone, Copy, Debug)]
pub struct Cycle {
    pub layers: usize,
}

impl Cycle {
    /// Position of `part` in the cycle, judged from the caller's hint of what comes next.
    pub fn index(&self, part: Part, next: Option<Part>) -> usize {
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

    /// The part at position `k` (modulo the cycle).
    pub fn part(&self, k: usize) -> Part {
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

    /// `part` and the `n` parts after it.
    pub fn window(&self, part: Part, next: Option<Part>, n: usize) -> Vec<Part> {
        let k = self.index(part, next);
        (k..=k + n).map(|j| self.part(j)).collect()
    }
}

/// Upload the tensors of `part` from `tiers` (the mapped file, a RAM copy or a staging
/// buffer). A file modified since it was opened is an error naming it, not a read of
/// changed (or vanished) bytes.
pub fn load_part<B: Backend>(
    be: &B,
    tiers: &mut HostTiers,
    gbi: &Gbi,
    model: &Model,
    part: Part,
) -> Result<LayerWeights<B>> {
    gbi.check_unchanged()?;
    let held = tiers.acquire(part)?;
    let upload = || -> Result<LayerWeights<B>> {
        let mut tensors = HashMap::new();
        for (rel, t) in part_tensors(gbi, model, part)? {
            tensors.insert(rel, be.upload_weight(tiers.bytes(&held, t), t.dtype)?);
        }
        Ok(LayerWeights { tensors })
    };
    let w = upload();
    tiers.release(held, None);
    w
}

/// Parts read ahead of the one in use: the staging ring's buffers are filled with the
/// next disk layers while this one is computed with.
const LOOKAHEAD: usize = 2;

/// STREAMING: every request reads the layer again (from the mapped file, a RAM copy or
/// disk, after the tier plan), except that the part handed out last is reused when asked
/// for twice in a row (the forward→backward turn).
pub struct Streaming<B: Backend> {
    gbi: Arc<Gbi>,
    model: Model,
    tiers: HostTiers,
    cycle: Cycle,
    last: Option<(Part, Arc<LayerWeights<B>>)>,
}

impl<B: Backend> Streaming<B> {
    /// A streaming source over `gbi`, every layer from the mapping.
    pub fn new(gbi: Arc<Gbi>, model: Model) -> Self {
        let tiers = HostTiers::mapped(gbi.clone(), &model);
        Self::with_tiers(gbi, model, tiers)
    }

    /// A streaming source whose host bytes come from `tiers`.
    pub fn with_tiers(gbi: Arc<Gbi>, model: Model, tiers: HostTiers) -> Self {
        let cycle = Cycle {
            layers: model.config().num_hidden_layers,
        };
        Streaming {
            gbi,
            model,
            tiers,
            cycle,
            last: None,
        }
    }
}

impl<B: Backend> WeightStream<B> for Streaming<B> {
    fn get(&mut self, be: &B, part: Part, next: Option<Part>) -> Result<Arc<LayerWeights<B>>> {
        if let Some((p, w)) = &self.last
            && *p == part
        {
            return Ok(w.clone());
        }
        self.last = None;
        let w = Arc::new(load_part(
            be,
            &mut self.tiers,
            &self.gbi,
            &self.model,
            part,
        )?);
        // around the step boundary too: the next step starts where this one ends
        let ahead = self.cycle.window(part, next, LOOKAHEAD);
        self.tiers.prefetch(&ahead[1..]);
        self.last = Some((part, w.clone()));
        Ok(w)
    }

    fn held_elements(&self) -> usize {
        self.last.as_ref().map_or(0, |(_, w)| w.numel())
    }

    fn plan(&self) -> Option<String> {
        Some(self.tiers.describe())
    }

    fn disk_bytes_read(&self) -> u64 {
        self.tiers.disk_bytes_read()
    }
}

/// RESIDENT: every part decoded once, on first use, and kept.
pub struct Resident<B: Backend> {
    gbi: Arc<Gbi>,
    model: Model,
    parts: HashMap<Part, Arc<LayerWeights<B>>>,
}

impl<B: Backend> Resident<B> {
    /// A resident source over `gbi`.
    pub fn new(gbi: Arc<Gbi>, model: Model) -> Self {
        Resident {
            gbi,
            model,
            parts: HashMap::new(),
        }
    }
}

impl<B: Backend> WeightStream<B> for Resident<B> {
    fn get(&mut self, be: &B, part: Part, _next: Option<Part>) -> Result<Arc<LayerWeights<B>>> {
        if let Some(w) = self.parts.get(&part) {
            return Ok(w.clone());
        }
        let mut tiers = HostTiers::mapped(self.gbi.clone(), &self.model);
        let w = Arc::new(load_part(be, &mut tiers, &self.gbi, &self.model, part)?);
        self.parts.insert(part, w.clone());
        Ok(w)
    }

    fn held_elements(&self) -> usize {
        self.parts.values().map(|w| w.numel()).sum()
    }
}

/// The stream for `strategy`.
pub fn make_stream<B: Backend>(
    strategy: Strategy,
    gbi: Arc<Gbi>,
    model: Model,
) -> Box<dyn WeightStream<B>> {
    match strategy {
        Strategy::Streaming => Box::new(Streaming::<B>::new(gbi, model)),
        Strategy::Resident | Strategy::Budget => Box::new(Resident::<B>::new(gbi, model)),
    }
}
