//! Activation offloading: a saved hidden state is copied to pinned host memory on a
//! stream of its own while the next layer computes, and copied back before its backward.
//! The device buffer is released only after its copy has landed: the release is queued
//! (stream-ordered) behind a wait for the copy's event at the next park or unpark, when
//! the copy is long done, so the compute stream never stalls for it.

use super::{CudaBackend, CudaBuf, device};
use crate::backend::DType;
use crate::backend::DeviceBuf;
use crate::error::Result;
use cudarc::driver::{CudaEvent, CudaStream, PinnedHostSlice, sys};
use std::sync::{Arc, Mutex, OnceLock};

/// Offloading state of a backend: its copy stream, a pool of pinned buffers reused across
/// steps, and device buffers waiting for their copy before release.
#[derive(Default)]
pub struct Offload {
    stream: OnceLock<Arc<CudaStream>>,
    pool: Mutex<Vec<PinnedHostSlice<u8>>>,
    pending: Mutex<Vec<(CudaBuf, CudaEvent)>>,
}

/// A hidden state in pinned host memory, and once prefetched, its device copy on the way.
pub struct Parked {
    /// `None` only after [`CudaBackend::unpark_buf`] returned it to the pool.
    host: Option<PinnedHostSlice<u8>>,
    len: usize,
    dtype: DType,
    /// Completes when the device → host copy has landed.
    done: CudaEvent,
    /// The device buffer of a prefetch and the event that completes its copy.
    device: Option<(CudaBuf, CudaEvent)>,
}

impl Drop for Parked {
    /// Dropped without an unpark (a failed step): let the copies in flight land before
    /// their memory is freed.
    fn drop(&mut self) {
        if let Some((buf, ready)) = self.device.take() {
            let _ = ready.synchronize();
            drop(buf);
        }
        if self.host.is_some() {
            let _ = self.done.synchronize();
        }
    }
}

// SAFETY: the pinned buffer is plain host memory owned by this value; the event handle
// may be used from any thread of the process.
unsafe impl Send for Parked {}

impl CudaBackend {
    fn offload_stream(&self) -> Result<Arc<CudaStream>> {
        if let Some(s) = self.offload.stream.get() {
            return Ok(s.clone());
        }
        let s = self.new_copy_stream()?;
        Ok(self.offload.stream.get_or_init(|| s).clone())
    }

    /// Release device buffers whose copies were queued earlier (ordered behind them).
    fn release_pending(&self) -> Result<()> {
        let pending = std::mem::take(
            &mut *self
                .offload
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for (buf, ev) in pending {
            self.compute_wait(&ev)?;
            drop(buf); // stream-ordered free on the compute stream, after the wait
        }
        Ok(())
    }

    fn take_pinned(&self, bytes: usize) -> Result<PinnedHostSlice<u8>> {
        let mut pool = self.offload.pool.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = pool.iter().position(|p| p.len() >= bytes) {
            return Ok(pool.swap_remove(i));
        }
        drop(pool);
        self.alloc_pinned(bytes)
    }

    pub(super) fn park_buf(&self, buf: CudaBuf) -> Result<Parked> {
        let op = "park";
        self.release_pending()?;
        let bytes = buf.bytes();
        let mut host = self.take_pinned(bytes)?;
        let stream = self.offload_stream()?;
        self.dev.bind(op)?;
        // the copy starts after everything queued so far (the writer of `buf`)
        let ready = self.record_compute_event()?;
        stream.wait(&ready).map_err(|e| device::driver_err(op, e))?;
        let dst = host.as_mut_ptr().map_err(|e| device::driver_err(op, e))?;
        // SAFETY: `dst` holds at least `bytes` bytes and stays alive in the returned value;
        // `buf` stays alive (pending) until the compute stream has waited for `done`.
        let r = unsafe {
            sys::cuMemcpyDtoHAsync_v2(dst as *mut _, buf.ptr(), bytes, stream.cu_stream())
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(device::err(
                op,
                format!("device → host copy of {bytes} bytes failed: {r:?}"),
            ));
        }
        let done = stream
            .record_event(None)
            .map_err(|e| device::driver_err(op, e))?;
        let (len, dtype) = (buf.len, buf.dtype);
        let keep = stream
            .record_event(None)
            .map_err(|e| device::driver_err(op, e))?;
        self.offload
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((buf, keep));
        Ok(Parked {
            host: Some(host),
            len,
            dtype,
            done,
            device: None,
        })
    }

    /// Start the host → device copy of `p` on the offload stream, into a buffer allocated
    /// at the current point of the compute stream (the copy waits for that point, so
    /// memory the pool hands back is no longer in use).
    pub(super) fn prefetch_buf(&self, p: &mut Parked) -> Result<()> {
        let op = "unpark";
        if p.device.is_some() {
            return Ok(());
        }
        self.release_pending()?;
        let stream = self.offload_stream()?;
        self.dev.bind(op)?;
        let buf = self.alloc_weight(p.len, p.dtype)?;
        let allocated = self.record_compute_event()?;
        stream
            .wait(&allocated)
            .map_err(|e| device::driver_err(op, e))?;
        let bytes = buf.bytes();
        let host = p
            .host
            .as_ref()
            .ok_or_else(|| device::err(op, "internal: parked buffer already returned"))?;
        let src = host.as_ptr().map_err(|e| device::driver_err(op, e))?;
        // SAFETY: `src` holds the parked bytes (its device → host copy was queued earlier
        // on this same stream); `buf` has `bytes` bytes and is kept, with the event that
        // completes the copy, in `p` until the compute stream has waited for it.
        let r = unsafe {
            sys::cuMemcpyHtoDAsync_v2(buf.ptr(), src as *const _, bytes, stream.cu_stream())
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(device::err(
                op,
                format!("host → device copy of {bytes} bytes failed: {r:?}"),
            ));
        }
        let ready = stream
            .record_event(None)
            .map_err(|e| device::driver_err(op, e))?;
        p.device = Some((buf, ready));
        Ok(())
    }

    pub(super) fn unpark_buf(&self, mut p: Parked) -> Result<CudaBuf> {
        self.prefetch_buf(&mut p)?;
        let (buf, ready) = p
            .device
            .take()
            .ok_or_else(|| device::err("unpark", "internal: no prefetched buffer"))?;
        self.compute_wait(&ready)?;
        // later users of the pinned buffer are parks, whose copies queue on the same
        // stream behind this one
        if let Some(host) = p.host.take() {
            self.offload
                .pool
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(host);
        }
        Ok(buf)
    }
}
