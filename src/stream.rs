//! WeightStream: hands the trainer each layer's frozen weights on the device, in the
//! order it asks (0..L forward, L−1..0 backward). Memory strategies are implementations
//! of one trait, not branches in the trainer.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::gbi::{Gbi, Group};
use crate::model::{LayerWeights, Model};
use std::collections::HashMap;
use std::sync::Arc;

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
}

/// Upload the tensors of `part` from the file; names are relative to the block prefix
/// (blocks) or full (head). A file modified since it was opened is an error naming it,
/// not a read of changed (or vanished) bytes.
pub fn load_part<B: Backend>(
    be: &B,
    gbi: &Gbi,
    model: &Model,
    part: Part,
) -> Result<LayerWeights<B>> {
    gbi.check_unchanged()?;
    let mut tensors = HashMap::new();
    match part {
        Part::Block(i) => {
            let prefix = model.block_prefix(i);
            for t in gbi.group(Group::Layer(i)) {
                if let Some(rel) = t.name.strip_prefix(&prefix) {
                    tensors.insert(rel.to_string(), be.upload_weight(gbi.bytes(t), t.dtype)?);
                }
            }
        }
        Part::Head => {
            for &name in model.head_names() {
                let t = gbi.tensor(name)?;
                tensors.insert(name.to_string(), be.upload_weight(gbi.bytes(t), t.dtype)?);
            }
        }
    }
    Ok(LayerWeights { tensors })
}

fn group(part: Part) -> Group {
    match part {
        Part::Block(i) => Group::Layer(i),
        Part::Head => Group::Head,
    }
}

/// STREAMING: every request reads the file again, except that the part handed out last
/// is reused when asked for twice in a row (the forward→backward turn).
pub struct Streaming<B: Backend> {
    gbi: Arc<Gbi>,
    model: Model,
    last: Option<(Part, Arc<LayerWeights<B>>)>,
}

impl<B: Backend> Streaming<B> {
    /// A streaming source over `gbi`.
    pub fn new(gbi: Arc<Gbi>, model: Model) -> Self {
        Streaming {
            gbi,
            model,
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
        let w = Arc::new(load_part(be, &self.gbi, &self.model, part)?);
        if let Some(n) = next {
            self.gbi.prefetch(group(n));
        }
        self.last = Some((part, w.clone()));
        Ok(w)
    }

    fn held_elements(&self) -> usize {
        self.last.as_ref().map_or(0, |(_, w)| w.numel())
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
        let w = Arc::new(load_part(be, &self.gbi, &self.model, part)?);
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
