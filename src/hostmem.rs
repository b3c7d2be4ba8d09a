//! How much host memory this process may still use: the least of its cgroup's headroom
//! (cgroup v2 `memory.max − memory.current`, or v1's limit and usage, for its own group
//! and every group above it; inactive file pages count as free, and the use is at least
//! the process's own `VmRSS`), the system's `MemAvailable`, and the `max_host_memory`
//! setting less what the process holds already (`VmRSS`). Page-locked (pinned) memory
//! that the CUDA driver allocates is not always charged to the cgroup, so lema checks it
//! against this budget itself instead of trusting the kernel to stop it.
//!
//! Also the host buffers that weights are read into ([`HostBuf`]: page-aligned, on the
//! heap as [`HeapBuf`], or pinned by the CUDA backend).

use crate::diskread::ALIGN;
use crate::error::{Error, Result};
use std::fmt;
use std::path::{Path, PathBuf};

/// What bounds the budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Limit {
    /// A cgroup's memory limit: the group folder, its limit and its use (less reclaimable
    /// file pages) when probed.
    Cgroup { group: PathBuf, max: u64, used: u64 },
    /// The system's `MemAvailable`.
    System,
    /// The `max_host_memory` setting, and the process's resident set when probed.
    Setting { max: u64, rss: u64 },
}

/// Host memory this process may still use, and what bounds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostBudget {
    /// Bytes the process may still add.
    pub available: u64,
    pub limit: Limit,
}

/// Files the budget is read from (the real ones, or synthetic ones in tests).
pub struct Sources<'a> {
    /// `/proc/self/cgroup`.
    pub proc_cgroup: &'a str,
    /// Where cgroupfs is mounted (`/sys/fs/cgroup`).
    pub cgroup_root: &'a Path,
    /// `/proc/meminfo`.
    pub meminfo: &'a str,
    /// `/proc/self/status`.
    pub status: &'a str,
}

/// Bytes in GiB, or MiB below 1 GiB.
fn gib(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Cgroup { group, max, used } => write!(
                f,
                "the memory limit of cgroup {} ({} limit, {} in use)",
                group.display(),
                gib(*max),
                gib(*used)
            ),
            Limit::System => write!(f, "the memory the system has available (MemAvailable)"),
            Limit::Setting { max, rss } => write!(
                f,
                "max_host_memory ({}, of which this process holds {})",
                gib(*max),
                gib(*rss)
            ),
        }
    }
}

impl fmt::Display for HostBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} available, set by {}",
            gib(self.available),
            self.limit
        )
    }
}

/// A `kB` field of a `/proc` status-style file, in bytes.
fn kb_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line[key.len()..].split_whitespace().next()?.parse().ok()?;
    kb.checked_mul(1024)
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// A key of a cgroup `memory.stat` file.
fn stat_field(dir: &Path, key: &str) -> u64 {
    std::fs::read_to_string(dir.join("memory.stat"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// (folder, limit, use) of the memory cgroup at `dir`, when it has a limit. Inactive file
/// pages count as free: the kernel reclaims them before it kills anything.
fn group_limit(dir: &Path) -> Option<(u64, u64)> {
    let (max, current, stat_key) = if dir.join("memory.max").exists() {
        let max = read_u64(&dir.join("memory.max"))?; // "max": no limit
        (max, read_u64(&dir.join("memory.current"))?, "inactive_file")
    } else {
        let max = read_u64(&dir.join("memory.limit_in_bytes"))?;
        if max >= 1 << 60 {
            return None; // v1's "no limit"
        }
        (
            max,
            read_u64(&dir.join("memory.usage_in_bytes"))?,
            "total_inactive_file",
        )
    };
    let used = current.saturating_sub(stat_field(dir, stat_key));
    Some((max, used))
}

/// The memory-cgroup folders of this process from its own group up to the mount's root:
/// v2's `0::/path` line, else v1's `memory` controller. Inside a cgroup namespace the
/// path may not exist under the mount (the mount is the group itself): then the root.
fn group_dirs(s: &Sources) -> Vec<PathBuf> {
    let mut v2 = None;
    let mut v1 = None;
    for line in s.proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (id, ctl, path) = (parts.next(), parts.next(), parts.next());
        match (id, ctl, path) {
            (Some("0"), Some(""), Some(p)) => v2 = Some(p.to_string()),
            (Some(_), Some(c), Some(p)) if c.split(',').any(|c| c == "memory") => {
                v1 = Some(p.to_string())
            }
            _ => {}
        }
    }
    let (root, rel) = match (v1, v2) {
        (Some(p), _) if s.cgroup_root.join("memory").is_dir() => (s.cgroup_root.join("memory"), p),
        (_, Some(p)) => (s.cgroup_root.to_path_buf(), p),
        _ => return Vec::new(),
    };
    let mut dir = root.join(rel.trim_start_matches('/'));
    if !dir.is_dir() {
        dir = root.clone();
    }
    let mut dirs = Vec::new();
    loop {
        dirs.push(dir.clone());
        if dir == root || !dir.pop() || !dir.starts_with(&root) {
            break;
        }
    }
    dirs
}

impl HostBudget {
    /// The budget from `s` and the `max_host_memory` setting.
    pub fn from_sources(s: &Sources, setting: Option<u64>) -> HostBudget {
        let mut best = HostBudget {
            available: kb_field(s.meminfo, "MemAvailable:").unwrap_or(u64::MAX),
            limit: Limit::System,
        };
        let mut consider = |available: u64, limit: Limit| {
            if available < best.available {
                best = HostBudget { available, limit };
            }
        };
        // pinned memory the driver allocates may not be charged to the group: the
        // process's own resident set is a floor of what it uses
        let rss = kb_field(s.status, "VmRSS:").unwrap_or(0);
        for dir in group_dirs(s) {
            if let Some((max, used)) = group_limit(&dir) {
                let used = used.max(rss);
                consider(
                    max.saturating_sub(used),
                    Limit::Cgroup {
                        group: dir,
                        max,
                        used,
                    },
                );
            }
        }
        if let Some(max) = setting {
            consider(max.saturating_sub(rss), Limit::Setting { max, rss });
        }
        best
    }

    /// The budget of this process now.
    pub fn probe(setting: Option<u64>) -> HostBudget {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let (cg, mi, st) = (
            read("/proc/self/cgroup"),
            read("/proc/meminfo"),
            read("/proc/self/status"),
        );
        HostBudget::from_sources(
            &Sources {
                proc_cgroup: &cg,
                cgroup_root: Path::new("/sys/fs/cgroup"),
                meminfo: &mi,
                status: &st,
            },
            setting,
        )
    }

    /// What the limit already counts as used: the group's use, or the process's resident
    /// set under `max_host_memory`; nothing for `MemAvailable`, which is net of it.
    pub fn held(&self) -> u64 {
        match self.limit {
            Limit::Cgroup { used, .. } => used,
            Limit::Setting { rss, .. } => rss,
            Limit::System => 0,
        }
    }

    /// What may go to frozen weights (the RAM tier and the staging ring): what is
    /// available less half of the whole limit (what is held counted in), with at most
    /// 8 GiB held back for everything else (activations, the CUDA runtime, page cache of
    /// the reads, the allocator's slack). So under a small limit the process as a whole
    /// stays near half of it: a limit of 8 GiB with 0.27 GiB held gives 3.73 GiB.
    pub fn for_weights(&self) -> u64 {
        let whole = self.available.saturating_add(self.held());
        self.available.saturating_sub((whole / 2).min(8 << 30))
    }

    /// An error unless `needed` bytes for `what` fit in what is available; the message
    /// gives both numbers, what sets the limit and `fix`.
    pub fn check(&self, needed: u64, what: &str, fix: &str) -> Result<()> {
        if needed <= self.available {
            return Ok(());
        }
        Err(Error::HostMemory(format!(
            "{what} needs {} of host memory, but this process may use only {} more ({}); {fix}",
            gib(needed),
            gib(self.available),
            self.limit
        )))
    }
}

/// Host memory that layers are read into: [`ALIGN`]-aligned, its length a multiple.
pub trait HostBuf: Send {
    fn bytes(&self) -> &[u8];
    fn bytes_mut(&mut self) -> &mut [u8];
}

/// Makes host buffers of a byte length.
pub type Alloc<'a> = &'a mut dyn FnMut(usize) -> Result<Box<dyn HostBuf>>;

#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Page([u8; ALIGN]);

/// Aligned heap memory (the CPU backend's buffers).
pub struct HeapBuf(Vec<Page>);

impl HeapBuf {
    /// `bytes` (rounded up to whole pages) of zeroed memory, boxed.
    pub fn alloc(bytes: usize) -> Result<Box<dyn HostBuf>> {
        Ok(Box::new(HeapBuf::new(bytes)?))
    }

    /// `bytes` (rounded up to whole pages) of zeroed memory.
    pub fn new(bytes: usize) -> Result<HeapBuf> {
        let pages = bytes.div_ceil(ALIGN);
        let mut v = Vec::new();
        v.try_reserve_exact(pages).map_err(|_| {
            Error::config(format!(
                "could not allocate a {:.1} MiB host buffer for the weights",
                bytes as f64 / (1 << 20) as f64
            ))
        })?;
        v.resize(pages, Page([0; ALIGN]));
        Ok(HeapBuf(v))
    }
}

impl HostBuf for HeapBuf {
    fn bytes(&self) -> &[u8] {
        // SAFETY: `Page` is a plain byte array without padding; the slice covers the vector.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), self.0.len() * ALIGN) }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), self.0.len() * ALIGN) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       24684084 kB\nMemAvailable:   20000000 kB\n";
    const STATUS: &str = "Name: lema\nVmHWM:    30000 kB\nVmRSS:    10000 kB\n";

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(name), text).unwrap();
    }

    fn budget(cg: &str, root: &Path, setting: Option<u64>) -> HostBudget {
        HostBudget::from_sources(
            &Sources {
                proc_cgroup: cg,
                cgroup_root: root,
                meminfo: MEMINFO,
                status: STATUS,
            },
            setting,
        )
    }

    #[test]
    fn system_only() {
        let d = tempfile::tempdir().unwrap();
        let b = budget("0::/\n", d.path(), None);
        assert_eq!(b.available, 20_000_000 * 1024);
        assert_eq!(b.limit, Limit::System);
    }

    #[test]
    fn v2_group_limit_less_reclaimable_cache() {
        let d = tempfile::tempdir().unwrap();
        let g = d.path().join("lema.slice/run");
        write(&g, "memory.max", "8589934592\n");
        write(&g, "memory.current", "1073741824\n");
        write(
            &g,
            "memory.stat",
            "anon 1\ninactive_file 536870912\nactive_file 7\n",
        );
        let b = budget("0::/lema.slice/run\n", d.path(), None);
        assert_eq!(b.available, (8u64 << 30) - (1 << 29));
        let msg = b.to_string();
        assert!(
            msg.contains("lema.slice/run") && msg.contains("8.00 GiB limit"),
            "{msg}"
        );
    }

    #[test]
    fn a_parent_group_limit_counts_and_max_means_none() {
        let d = tempfile::tempdir().unwrap();
        let parent = d.path().join("a");
        let child = parent.join("b");
        write(&child, "memory.max", "max\n");
        write(&child, "memory.current", "100\n");
        write(&parent, "memory.max", "4294967296\n");
        write(&parent, "memory.current", "294967296\n");
        let b = budget("0::/a/b\n", d.path(), None);
        assert_eq!(b.available, 4_000_000_000);
        assert!(matches!(b.limit, Limit::Cgroup { ref group, .. } if group == &parent));
    }

    #[test]
    fn v1_memory_controller() {
        let d = tempfile::tempdir().unwrap();
        let g = d.path().join("memory/job");
        write(&g, "memory.limit_in_bytes", "2147483648\n");
        write(&g, "memory.usage_in_bytes", "1073741824\n");
        let b = budget("4:memory:/job\n0::/\n", d.path(), None);
        assert_eq!(b.available, 1 << 30);
        // v1's unlimited value is no limit
        write(&g, "memory.limit_in_bytes", "9223372036854771712\n");
        assert_eq!(
            budget("4:memory:/job\n", d.path(), None).limit,
            Limit::System
        );
    }

    #[test]
    fn setting_less_resident_set() {
        let d = tempfile::tempdir().unwrap();
        let b = budget("0::/\n", d.path(), Some(100 << 20));
        assert_eq!(b.available, (100 << 20) - 10_000 * 1024);
        assert!(matches!(b.limit, Limit::Setting { .. }));
    }

    #[test]
    fn a_missing_group_folder_falls_back_to_the_mount() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "memory.max", "1073741824\n");
        write(d.path(), "memory.current", "0\n");
        let b = budget("0::/not/here\n", d.path(), None);
        // the group's use counts at least this process's resident set (pinned memory
        // may not be charged to the group)
        assert_eq!(b.available, (1 << 30) - 10_000 * 1024);
    }

    #[test]
    fn check_gives_the_numbers_and_the_fix() {
        let b = HostBudget {
            available: 3 << 30,
            limit: Limit::Setting {
                max: 4 << 30,
                rss: 1 << 30,
            },
        };
        assert!(b.check(3 << 30, "x", "y").is_ok());
        let msg = b
            .check(5 << 30, "RESIDENT", "use STREAMING")
            .unwrap_err()
            .to_string();
        for part in [
            "RESIDENT",
            "5.00 GiB",
            "3.00 GiB more",
            "max_host_memory",
            "use STREAMING",
        ] {
            assert!(msg.contains(part), "{part} missing from: {msg}");
        }
        // half of the 4 GiB limit is held back: 1 GiB of it is the process already
        assert_eq!(b.for_weights(), 1 << 30);
    }
}
