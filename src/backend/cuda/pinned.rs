//! Page-locked host memory as a staging buffer ([`HostBuf`]), and a copy-stream event as
//! the fence that says its last reader is done ([`Fence`]).

use super::CudaBackend;
use crate::error::{Error, Result};
use crate::staging::{Fence, HostBuf};
use cudarc::driver::{CudaEvent, PinnedHostSlice};

/// A pinned allocation and its address (page-aligned, as the driver allocates).
pub struct PinnedBuf {
    mem: PinnedHostSlice<u8>,
    ptr: *mut u8,
}

// SAFETY: the pointer is the allocation's own, reached only through `&self`/`&mut self`;
// the allocation is plain host memory (PinnedHostSlice is Send).
unsafe impl Send for PinnedBuf {}

impl PinnedBuf {
    /// `bytes` of pinned memory from `be` (checked against the host budget there).
    pub fn alloc(be: &CudaBackend, bytes: usize) -> Result<Box<dyn HostBuf>> {
        let mut mem = be.alloc_pinned(bytes.max(1))?;
        let ptr = mem.as_mut_ptr().map_err(|e| Error::Backend {
            backend: "cuda",
            op: "alloc_pinned",
            msg: format!("{e:?}"),
        })?;
        Ok(Box::new(PinnedBuf { mem, ptr }))
    }
}

impl HostBuf for PinnedBuf {
    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` addresses `mem.len()` bytes that live as long as `mem`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.mem.len()) }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.mem.len()) }
    }
}

impl Fence for CudaEvent {
    fn wait(&self) -> Result<()> {
        self.synchronize().map_err(|e| Error::Backend {
            backend: "cuda",
            op: "staging fence",
            msg: format!("{e:?}"),
        })
    }
}
