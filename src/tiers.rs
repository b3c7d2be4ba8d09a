//! The tier plan: where each frozen layer lives between uses. Blocks within the VRAM
//! budget stay on the device; the rest are streamed from the host: from the mapped file
//! when the whole streamed part fits the host budget (today's path), else from copies in
//! host RAM for as many as fit beside the staging ring, and from disk through the staging
//! ring for the others. The choice can be forced (`weight_source`).

use crate::error::{Error, Result};
use crate::hostmem::HostBudget;
use crate::stream::Part;
use std::fmt;

/// Where streamed layers come from on the host (the `weight_source` setting).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightSource {
    /// The mapped file when the streamed layers fit the host budget, else RAM + disk.
    #[default]
    Auto,
    /// Always the mapped file (CUDA: registered as pinned memory when the driver allows).
    Mapped,
    /// Every streamed layer from disk through the staging ring.
    Disk,
}

impl std::str::FromStr for WeightSource {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(WeightSource::Auto),
            "mapped" => Ok(WeightSource::Mapped),
            "disk" => Ok(WeightSource::Disk),
            _ => Err(Error::config(format!(
                "unknown weight_source '{s}'; supported: auto, mapped, disk"
            ))),
        }
    }
}

/// Where one layer lives between uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// Resident in device memory (the VRAM budget).
    Device,
    /// Read from the mapped file.
    Mapped,
    /// A copy in host RAM (CUDA: pinned), read from the file once.
    Ram,
    /// Read from disk into the staging ring at each use.
    Disk,
}

/// What the planner is given.
#[derive(Clone, Debug)]
pub struct PlanInput {
    /// Stored bytes of each block.
    pub block_bytes: Vec<u64>,
    /// Stored bytes of the head (final norm + LM head).
    pub head_bytes: u64,
    /// Blocks 0..n stay on the device.
    pub on_device: usize,
    /// Host bytes the backend holds for layers in use besides the tiers (the CPU's decoded
    /// copies; 0 on CUDA).
    pub working_bytes: u64,
    /// Buffers of the staging ring and the bytes of each.
    pub staging_buffers: usize,
    pub buffer_bytes: u64,
    pub source: WeightSource,
    /// Host bytes the mapped path pins (CUDA registers the whole file; 0 on the CPU,
    /// whose mapped pages the kernel can evict).
    pub mapping_pin_bytes: u64,
}

/// Per layer, where it lives; with the sizes and the reason, for the printed line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierPlan {
    pub blocks: Vec<Tier>,
    pub head: Tier,
    /// Staging buffers (0 when nothing comes from disk) and the bytes of each.
    pub staging_buffers: usize,
    pub buffer_bytes: u64,
    /// Bytes of the RAM tier.
    pub ram_bytes: u64,
    /// Bytes read from disk each pass over the layers.
    pub disk_bytes: u64,
    /// Bytes read from the mapping each pass.
    pub mapped_bytes: u64,
    pub why: String,
}

/// Bytes in GB, or MB below 1 GB.
fn gb(b: u64) -> String {
    if b >= 1_000_000_000 {
        format!("{:.2} GB", b as f64 / 1e9)
    } else {
        format!("{:.1} MB", b as f64 / 1e6)
    }
}

impl TierPlan {
    /// Where `part` lives.
    pub fn tier(&self, part: Part) -> Tier {
        match part {
            Part::Block(i) => self.blocks.get(i).copied().unwrap_or(Tier::Mapped),
            Part::Head => self.head,
        }
    }

    /// True when every streamed layer comes from the mapping (today's path).
    pub fn all_mapped(&self) -> bool {
        self.ram_bytes == 0 && self.disk_bytes == 0
    }

    /// Host memory the plan holds besides the working set: RAM tier + staging ring.
    pub fn host_bytes(&self) -> u64 {
        self.ram_bytes + self.staging_buffers as u64 * self.buffer_bytes
    }
}

impl fmt::Display for TierPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = |t: Tier| self.blocks.iter().filter(|&&b| b == t).count();
        let mut parts = Vec::new();
        if count(Tier::Device) > 0 {
            parts.push(format!("{} blocks on the device", count(Tier::Device)));
        }
        if count(Tier::Mapped) > 0 || self.all_mapped() {
            parts.push(format!(
                "{} blocks from the mapped file ({} per pass)",
                count(Tier::Mapped),
                gb(self.mapped_bytes)
            ));
        }
        if count(Tier::Ram) > 0 || self.head == Tier::Ram {
            parts.push(format!(
                "{} blocks in host RAM ({})",
                count(Tier::Ram),
                gb(self.ram_bytes)
            ));
        }
        if self.disk_bytes > 0 {
            parts.push(format!(
                "{} from disk through a staging ring of {} × {} ({} read per pass)",
                count(Tier::Disk),
                self.staging_buffers,
                gb(self.buffer_bytes),
                gb(self.disk_bytes)
            ));
        }
        let head = match self.head {
            Tier::Device => "on the device",
            Tier::Mapped => "mapped",
            Tier::Ram => "in RAM",
            Tier::Disk => "from disk",
        };
        write!(
            f,
            "frozen weights: {}, head {head}; {}",
            parts.join(", "),
            self.why
        )
    }
}

/// The plan for `input` under `host` (see the module's description).
pub fn plan(input: &PlanInput, host: &HostBudget) -> Result<TierPlan> {
    let n = input.block_bytes.len();
    let on_device = input.on_device.min(n);
    let streamed: u64 = input.block_bytes[on_device..].iter().sum::<u64>() + input.head_bytes;
    let budget = host.for_weights().saturating_sub(input.working_bytes);
    let mut blocks = vec![Tier::Device; on_device];
    let mapped = |why: String| TierPlan {
        blocks: [blocks.clone(), vec![Tier::Mapped; n - on_device]].concat(),
        head: Tier::Mapped,
        staging_buffers: 0,
        buffer_bytes: 0,
        ram_bytes: 0,
        disk_bytes: 0,
        mapped_bytes: streamed,
        why,
    };
    match input.source {
        WeightSource::Mapped => {
            let over = if streamed > budget {
                format!(
                    "; they exceed the {} that weights may use ({host}), so the kernel must evict pages (CPU) or may refuse to pin them (CUDA)",
                    gb(budget)
                )
            } else {
                String::new()
            };
            return Ok(mapped(format!("weight_source = mapped{over}")));
        }
        WeightSource::Auto if streamed.max(input.mapping_pin_bytes) <= budget => {
            return Ok(mapped(format!(
                "the {} {} fit the {} that weights may use ({host})",
                gb(streamed.max(input.mapping_pin_bytes)),
                if input.mapping_pin_bytes > streamed {
                    "of the file, pinned whole,"
                } else {
                    "streamed"
                },
                gb(budget)
            )));
        }
        _ => {}
    }
    let ring = input.staging_buffers as u64 * input.buffer_bytes;
    // the ring is the least the disk path needs: refuse with the numbers when even that
    // does not fit, rather than be killed for it
    host.check(
        ring + input.working_bytes,
        &format!(
            "reading the weights from disk through a staging ring of {} × {}",
            input.staging_buffers,
            gb(input.buffer_bytes)
        ),
        "raise the memory limit (max_host_memory, the cgroup's memory.max) or free memory",
    )?;
    let mut room = match input.source {
        WeightSource::Disk => 0,
        _ => budget.saturating_sub(ring),
    };
    let (mut ram_bytes, mut disk_bytes) = (0, 0);
    // blocks first (each is read twice a step, the head once), in order
    for &b in &input.block_bytes[on_device..] {
        if b <= room {
            room -= b;
            ram_bytes += b;
            blocks.push(Tier::Ram);
        } else {
            disk_bytes += b;
            blocks.push(Tier::Disk);
        }
    }
    let head = if input.head_bytes <= room {
        ram_bytes += input.head_bytes;
        Tier::Ram
    } else {
        disk_bytes += input.head_bytes;
        Tier::Disk
    };
    let why = match input.source {
        WeightSource::Disk => "weight_source = disk".to_string(),
        _ if input.mapping_pin_bytes > streamed => format!(
            "the {} file, which the mapped path pins whole, exceeds the {} that weights may use ({host})",
            gb(input.mapping_pin_bytes),
            gb(budget)
        ),
        _ => format!(
            "the {} streamed exceed the {} that weights may use ({host})",
            gb(streamed),
            gb(budget)
        ),
    };
    Ok(TierPlan {
        blocks,
        head,
        staging_buffers: input.staging_buffers,
        buffer_bytes: input.buffer_bytes,
        ram_bytes,
        disk_bytes,
        mapped_bytes: 0,
        why,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostmem::Limit;

    fn host(gb: u64) -> HostBudget {
        HostBudget {
            available: gb * 1_000_000_000,
            limit: Limit::System,
        }
    }

    fn input(source: WeightSource) -> PlanInput {
        PlanInput {
            block_bytes: vec![400_000_000; 32],
            head_bytes: 260_000_000,
            on_device: 0,
            working_bytes: 0,
            staging_buffers: 2,
            buffer_bytes: 400_000_000,
            source,
            mapping_pin_bytes: 0,
        }
    }

    #[test]
    fn a_model_that_fits_stays_mapped() {
        let p = plan(&input(WeightSource::Auto), &host(100)).unwrap();
        assert!(p.all_mapped());
        assert_eq!(p.mapped_bytes, 32 * 400_000_000 + 260_000_000);
        assert!(p.to_string().contains("fit"), "{p}");
    }

    #[test]
    fn ram_then_disk_under_a_small_budget() {
        // 16 GB available: 8 GB for weights, 0.8 GB of ring, 18 blocks of 0.4 GB in RAM
        let p = plan(&input(WeightSource::Auto), &host(16)).unwrap();
        assert_eq!(p.blocks.iter().filter(|&&t| t == Tier::Ram).count(), 18);
        assert_eq!(p.blocks[18..], vec![Tier::Disk; 14][..]);
        assert_eq!(p.head, Tier::Disk);
        assert!(p.host_bytes() <= host(16).for_weights());
        let line = p.to_string();
        for part in [
            "18 blocks in host RAM",
            "14 from disk",
            "2 × 400.0 MB",
            "exceed",
        ] {
            assert!(line.contains(part), "{part} missing from: {line}");
        }
    }

    #[test]
    fn device_blocks_are_not_streamed() {
        let mut i = input(WeightSource::Auto);
        i.on_device = 30;
        let p = plan(&i, &host(4)).unwrap();
        assert_eq!(p.blocks[..30], vec![Tier::Device; 30][..]);
        assert!(p.all_mapped(), "{p}"); // 2 blocks + head = 1.06 GB ≤ 2 GB
        // unless the mapped path pins the whole file (CUDA registers it)
        i.mapping_pin_bytes = 13_000_000_000;
        let p = plan(&i, &host(4)).unwrap();
        assert_eq!(p.blocks[30..], vec![Tier::Ram; 2][..]);
        assert_eq!(p.head, Tier::Ram);
        assert!(p.to_string().contains("pins whole"), "{p}");
    }

    #[test]
    fn forced_sources() {
        let p = plan(&input(WeightSource::Disk), &host(100)).unwrap();
        assert_eq!(p.ram_bytes, 0);
        assert!(p.blocks.iter().all(|&t| t == Tier::Disk) && p.head == Tier::Disk);
        let p = plan(&input(WeightSource::Mapped), &host(4)).unwrap();
        assert!(p.all_mapped());
        assert!(p.to_string().contains("exceed"), "{p}");
    }

    #[test]
    fn too_little_for_the_ring_is_refused_with_the_numbers() {
        let msg = plan(&input(WeightSource::Auto), &host(0))
            .unwrap_err()
            .to_string();
        for part in [
            "staging ring of 2 × 400.0 MB",
            "762.9 MiB",
            "max_host_memory",
        ] {
            assert!(msg.contains(part), "{part} missing from: {msg}");
        }
    }
}
