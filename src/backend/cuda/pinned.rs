//! Page-locked host memory as a host buffer ([`HostBuf`]), and the registration of
//! existing memory (a memory-mapped file) as pinned and read-only ([`ReadOnlyPin`]).
//!
//! The memory is ordinary page-aligned heap memory registered with the driver
//! (`cuMemHostRegister`), not the driver's own allocation: `O_DIRECT` reads can target it
//! (the kernel pins user pages for them, which it cannot do for driver-mapped memory), and
//! it is charged to the process's cgroup like any other memory.

use super::CudaBackend;
use crate::error::{Error, Result};
use crate::hostmem::{HeapBuf, HostBudget, HostBuf};
use cudarc::driver::{CudaContext, sys};
use std::sync::Arc;

/// Heap memory registered as pinned for as long as it lives.
pub struct PinnedBuf {
    heap: HeapBuf,
    ctx: Arc<CudaContext>,
}

impl PinnedBuf {
    /// `bytes` of pinned memory for `be`, checked against the host budget first.
    pub fn alloc(be: &CudaBackend, bytes: usize) -> Result<Box<dyn HostBuf>> {
        let op = "pin host memory";
        HostBudget::probe(be.opts.max_host_memory).check(
            bytes as u64,
            "a pinned buffer for the frozen weights",
            "use a smaller strategy (streaming instead of resident), or raise the memory limit (max_host_memory, the cgroup's memory.max)",
        )?;
        let mut heap = HeapBuf::new(bytes.max(1))?;
        be.dev.bind(op)?;
        let b = heap.bytes_mut();
        // SAFETY: the range is this buffer's own, alive until Drop unregisters it.
        let r = unsafe { sys::cuMemHostRegister_v2(b.as_mut_ptr().cast(), b.len(), 0) };
        if r != sys::cudaError_enum::CUDA_SUCCESS {
            return Err(Error::Backend {
                backend: "cuda",
                op,
                msg: format!(
                    "could not page-lock {:.1} MiB of host memory ({r:?}); raise the locked-memory limit (ulimit -l) or lower what is pinned",
                    b.len() as f64 / (1 << 20) as f64
                ),
            });
        }
        Ok(Box::new(PinnedBuf {
            heap,
            ctx: be.dev.ctx.clone(),
        }))
    }
}

impl HostBuf for PinnedBuf {
    fn bytes(&self) -> &[u8] {
        self.heap.bytes()
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.heap.bytes_mut()
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        // the owners drop a buffer only once no copy reads it (the ring synchronises its
        // copy stream first; the staging ring waits for its fences)
        let _ = self.ctx.bind_to_thread();
        // SAFETY: registered in `alloc`, and the memory is still alive (`heap`).
        unsafe {
            sys::cuMemHostUnregister(self.heap.bytes_mut().as_mut_ptr().cast());
        }
    }
}

/// A range of existing host memory registered with the driver as pinned, read-only memory
/// (`cuMemHostRegister`), so copies from it go to the GPU by DMA; unregistered on drop.
pub struct ReadOnlyPin {
    base: usize,
}

impl ReadOnlyPin {
    /// Register `bytes`; on failure, the driver's status (e.g. a locked-memory limit).
    ///
    /// # Safety
    /// `bytes` must stay alive (mapped) until the returned value is dropped, and no copy
    /// may read from it after that.
    pub unsafe fn new(bytes: &[u8]) -> std::result::Result<Self, String> {
        // SAFETY: the caller keeps the range alive until Drop unregisters it; READ_ONLY,
        // so a read-only mapping may be registered.
        let r = unsafe {
            sys::cuMemHostRegister_v2(
                bytes.as_ptr() as *mut _,
                bytes.len(),
                sys::CU_MEMHOSTREGISTER_READ_ONLY,
            )
        };
        if r == sys::cudaError_enum::CUDA_SUCCESS {
            Ok(ReadOnlyPin {
                base: bytes.as_ptr() as usize,
            })
        } else {
            Err(format!("{r:?}"))
        }
    }
}

impl Drop for ReadOnlyPin {
    fn drop(&mut self) {
        // SAFETY: `base` was registered in `new`, and the memory is alive (its contract).
        unsafe {
            sys::cuMemHostUnregister(self.base as *mut _);
        }
    }
}
