//! CUDA backend (ARCHITECTURE.md §5, §6, and CUDA.md; issue 4): the [`Backend`] ops as
//! cuBLAS GEMMs and our own CUDA C kernels, compiled at run time with NVRTC for the
//! device's architecture and cached in memory and on disk. cudarc loads CUDA at run time,
//! so a build with the `cuda` feature runs on machines without a GPU (where
//! [`CudaBackend::new`] returns an error).
//!
//! Layout: `device.rs` (context, stream, memory, compilation, the launch door), `gemm.rs`
//! (the one cuBLAS wrapper), and one pair `<op>.rs` + `<op>.cu` per op family.
//!
//! Numerics: activations, LoRA parameters, gradients and optimizer state are f32. Frozen
//! weights keep their stored type (bf16/f16; f32 as f32 unless [`CudaOptions::weight_dtype`]
//! converts it). A GEMM with a half weight casts the f32 operand to the same half type and
//! accumulates in f32; norms, softmax, RoPE angles, loss and reductions run in f32
//! (`sum_squares` in f64).
//!
//! All work runs in order on one compute stream. For the streaming engine, weights can
//! also be uploaded from pinned host memory on a separate copy stream, ordered with
//! events ([`CudaBackend::upload_weight_async`]); which layer is copied where and when is
//! the weight ring's policy, in `crate::stream::ring`, not the backend's.

mod attention;
mod device;
mod elementwise;
mod errors;
mod gemm;
mod graph;
mod loss;
mod multi;
mod norm;
mod offload;
mod optim;
pub mod pinned;
mod profile;
mod quant;
mod rope;

pub use crate::backend::ProfileLine;

/// Host memory the CUDA side of a process still takes after the weights are planned: the
/// pages of cuBLAS, NVRTC and the compiled kernels as they are first used, and the
/// driver's bookkeeping (0.31 GB measured on an H200 for the Llama-2-7B shape, between
/// the plan and the step's peak RSS). The host-memory plan holds it back from the weights.
pub const RUNTIME_HOST_BYTES: u64 = 512 << 20;
pub use crate::backend::cuda_options::{CudaOptions, KernelCache};
pub use cudarc::driver::{CudaEvent, CudaStream, PinnedHostSlice};
pub use device::probe;

use crate::backend::{
    Accumulate, Activation, AdamWItem, AdamWStep, AttnDims, Backend, DType, DeviceBuf, Fp8Parts,
    Gemm, LossSum, Nf4Parts, RopeAngles, SgdItem, SgdStep,
};
use crate::error::Result;
use cudarc::driver::CudaSlice;
use device::{Device, err};
use std::sync::{Arc, Mutex};

/// A buffer the GPU computes on: f32, or a frozen weight kept as bf16/f16. It lives in
/// device memory, or (from [`Backend::zeros_host`]) in mapped host memory that kernels
/// reach over the bus.
pub struct CudaBuf {
    mem: Mem,
    len: usize,
    dtype: DType,
}

/// Where a [`CudaBuf`]'s elements live.
enum Mem {
    /// Device memory from the compute stream's pool.
    Device(CudaSlice<u8>),
    /// Page-locked host memory mapped into the device's address space.
    Host(device::HostMem),
    /// Bytes `offset..` of device memory shared with other buffers ([`CudaBackend::new_bufs`]):
    /// buffers that one group GEMM reads or writes at a fixed stride. The memory is freed
    /// with the last of them.
    Part(Arc<CudaSlice<u8>>, usize),
}

impl CudaBuf {
    /// Storage type of the elements.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// True when the elements live in mapped host memory ([`Backend::zeros_host`]), not
    /// in device memory.
    pub fn is_host_mapped(&self) -> bool {
        matches!(self.mem, Mem::Host(_))
    }

    /// The address kernels, copies and cuBLAS use (a device address either way).
    pub(crate) fn ptr(&self) -> u64 {
        match &self.mem {
            Mem::Device(s) => Device::ptr(s),
            Mem::Host(h) => h.device_ptr(),
            Mem::Part(s, offset) => Device::ptr(s) + *offset as u64,
        }
    }
}

impl DeviceBuf for CudaBuf {
    fn len(&self) -> usize {
        self.len
    }
    /// In device memory, or in host memory when host-mapped.
    fn bytes(&self) -> usize {
        self.len * self.dtype.size()
    }
    fn address(&self) -> usize {
        self.ptr() as usize
    }
}

/// A `CUstream` handle from another library, with DLPack's special values: 0 (no
/// stream given) and 1 mean the legacy default stream, 2 the per-thread default stream.
fn foreign_stream(stream: u64) -> cudarc::driver::sys::CUstream {
    let legacy = 0x1usize; // CU_STREAM_LEGACY
    let handle = if stream == 0 { legacy } else { stream as usize };
    handle as cudarc::driver::sys::CUstream
}

/// The CUDA backend: one GPU, one compute stream, one cuBLAS handle bound to it.
pub struct CudaBackend {
    dev: Device,
    gemm: Mutex<gemm::GemmState>,
    opts: CudaOptions,
    offload: offload::Offload,
    /// [`Backend::upload_with`]'s page-locked staging buffer and the event that completes
    /// when the last copy out of it is done.
    staging: Mutex<Option<Staging>>,
    /// The step graph being captured or held for replay (`graph.rs`).
    graphs: Mutex<graph::Graphs>,
}

/// A page-locked host buffer, and the event after the last copy out of it.
type Staging = (Box<dyn crate::hostmem::HostBuf>, Option<CudaEvent>);

impl CudaBackend {
    /// The backend on GPU `ordinal` with default options.
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::with_options(CudaOptions {
            ordinal,
            ..CudaOptions::default()
        })
    }

    /// The backend with explicit options. Fails with a sentence saying what is missing
    /// when there is no driver, no CUDA 13 libraries or no GPU.
    pub fn with_options(opts: CudaOptions) -> Result<Self> {
        let dev = Device::new(
            opts.ordinal,
            opts.kernel_cache.clone(),
            opts.sync_each_launch,
            opts.profile,
        )?;
        let gemm = gemm::GemmState::new(&dev)?;
        Ok(CudaBackend {
            dev,
            gemm: Mutex::new(gemm),
            opts,
            offload: offload::Offload::default(),
            staging: Mutex::new(None),
            graphs: Mutex::new(graph::Graphs::default()),
        })
    }

    /// GPU time per kernel (and `idle` time) since the last call, when the backend was
    /// made with [`CudaOptions::profile`]; waits for the queued work. `None` otherwise.
    pub fn profile_take(&self) -> Result<Option<Vec<ProfileLine>>> {
        self.dev.profiler.as_ref().map(|p| p.take()).transpose()
    }

    /// Make the work queued from now on on `stream` (a stream of this device's primary
    /// context, such as torch's current stream) wait for the work queued so far on the
    /// compute stream: one event, not a device-wide synchronisation. `stream` is a
    /// `CUstream` handle; 0 and 1 name the legacy default stream, 2 the per-thread one
    /// (DLPack's conventions).
    pub fn order_before(&self, stream: u64) -> Result<()> {
        self.join_streams(
            "order_before",
            self.dev.stream.cu_stream(),
            foreign_stream(stream),
        )
    }

    /// Make the work queued from now on on the compute stream wait for the work queued
    /// so far on `stream` (as in [`CudaBackend::order_before`]).
    pub fn order_after(&self, stream: u64) -> Result<()> {
        self.join_streams(
            "order_after",
            foreign_stream(stream),
            self.dev.stream.cu_stream(),
        )
    }

    /// `waiter` waits for what `first` has queued so far.
    fn join_streams(
        &self,
        op: &'static str,
        first: cudarc::driver::sys::CUstream,
        waiter: cudarc::driver::sys::CUstream,
    ) -> Result<()> {
        use cudarc::driver::sys;
        self.dev.bind(op)?;
        let check = |r: sys::CUresult| match r {
            sys::CUresult::CUDA_SUCCESS => Ok(()),
            e => Err(device::driver_err(op, cudarc::driver::DriverError(e))),
        };
        let mut ev: sys::CUevent = std::ptr::null_mut();
        // SAFETY: plain driver calls on handles of the bound context; the event is
        // destroyed once the wait is queued (the driver keeps it until it completes).
        unsafe {
            check(sys::cuEventCreate(
                &mut ev,
                sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32,
            ))?;
            let r = check(sys::cuEventRecord(ev, first))
                .and_then(|()| check(sys::cuStreamWaitEvent(waiter, ev, 0)));
            let destroyed = check(sys::cuEventDestroy_v2(ev));
            r.and(destroyed)
        }
    }

    /// The GPU's name as the driver reports it.
    pub fn device_name(&self) -> &str {
        &self.dev.name
    }

    /// The architecture kernels are compiled for, e.g. `sm_90`.
    pub fn arch(&self) -> &str {
        &self.dev.arch
    }

    /// `(free, total)` device memory in bytes, as the driver reports it (all processes).
    pub fn mem_info(&self) -> Option<(usize, usize)> {
        self.dev.mem_info()
    }

    /// Peak bytes the default memory pool (where every buffer of this backend comes
    /// from) has held since the backend was made, as the driver tracks it.
    pub fn pool_peak_bytes(&self) -> Option<u64> {
        use cudarc::driver::sys::CUmemPool_attribute as A;
        self.pool_attribute(A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)
    }

    /// An attribute of the default memory pool (bytes), as the driver reports it.
    fn pool_attribute(&self, attr: cudarc::driver::sys::CUmemPool_attribute) -> Option<u64> {
        use cudarc::driver::sys;
        self.dev.bind("pool_attribute").ok()?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut value: u64 = 0;
        // SAFETY: out-pointers to locals of the right types; the device handle is valid.
        unsafe {
            if sys::cuDeviceGetDefaultMemPool(&mut pool, self.dev.ctx.cu_device())
                != sys::CUresult::CUDA_SUCCESS
            {
                return None;
            }
            if sys::cuMemPoolGetAttribute(
                pool,
                attr,
                &mut value as *mut u64 as *mut std::ffi::c_void,
            ) != sys::CUresult::CUDA_SUCCESS
            {
                return None;
            }
        }
        Some(value)
    }

    /// The options this backend was made with.
    pub fn options(&self) -> &CudaOptions {
        &self.opts
    }

    /// Whether [`Backend::uninit`] fills its buffers with NaN
    /// ([`CudaOptions::poison_uninit`], or `sync_each_launch`).
    pub fn poisons_uninit(&self) -> bool {
        self.opts.poison_uninit || self.opts.sync_each_launch
    }

    /// The stream all ops run on.
    pub fn compute_stream(&self) -> &Arc<CudaStream> {
        &self.dev.stream
    }

    fn new_buf(&self, op: &'static str, len: usize, dtype: DType) -> Result<CudaBuf> {
        let mem = Mem::Device(self.dev.alloc(op, len * dtype.size())?);
        Ok(CudaBuf { mem, len, dtype })
    }

    /// Buffers of `lens[i]` elements of `dtype`, consecutive in one allocation (each
    /// starting 256-byte aligned, as cuBLAS likes its operands), so that a group GEMM
    /// ([`Backend::matmul_group`]) finds equally long ones at one stride.
    fn new_bufs(&self, op: &'static str, lens: &[usize], dtype: DType) -> Result<Vec<CudaBuf>> {
        if lens.len() < 2 {
            return lens.iter().map(|&n| self.new_buf(op, n, dtype)).collect();
        }
        let padded = |n: usize| (n * dtype.size()).div_ceil(256) * 256;
        let total: usize = lens.iter().map(|&n| padded(n)).sum();
        let base = Arc::new(self.dev.alloc(op, total)?);
        let mut offset = 0;
        Ok(lens
            .iter()
            .map(|&len| {
                let b = CudaBuf {
                    mem: Mem::Part(base.clone(), offset),
                    len,
                    dtype,
                };
                offset += padded(len);
                b
            })
            .collect())
    }

    /// Set `bytes` bytes at device address `ptr` to zero, stream-ordered.
    fn memset_raw(&self, op: &'static str, ptr: u64, bytes: usize, what: &str) -> Result<()> {
        use cudarc::driver::sys;
        // SAFETY: the caller's buffer covers `bytes` bytes at `ptr`, alive while it is.
        let r = unsafe { sys::cuMemsetD8Async(ptr, 0, bytes, self.dev.stream.cu_stream()) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(err(
                op,
                format!("memset of {bytes} bytes of {what} failed: {r:?}"),
            ));
        }
        Ok(())
    }

    /// Set every byte of `b` to zero, stream-ordered on the compute stream.
    fn memset_zero(&self, op: &'static str, b: &mut CudaBuf) -> Result<()> {
        self.dev.timed("memset", || match &mut b.mem {
            Mem::Device(s) => self
                .dev
                .stream
                .memset_zeros(s)
                .map_err(|e| device::driver_err(op, e)),
            Mem::Host(h) => self.memset_raw(op, h.device_ptr(), h.bytes(), "mapped host memory"),
            Mem::Part(..) => self.memset_raw(op, b.ptr(), b.bytes(), "device memory"),
        })
    }

    /// Copy `src` (exactly `b.bytes()` long) into `b`, in order with the compute stream.
    fn copy_in(&self, op: &'static str, b: &mut CudaBuf, src: &[u8]) -> Result<()> {
        if src.len() != b.bytes() {
            return Err(err(
                op,
                format!(
                    "{} bytes given for a buffer of {} bytes",
                    src.len(),
                    b.bytes()
                ),
            ));
        }
        if src.is_empty() {
            return Ok(());
        }
        match &mut b.mem {
            Mem::Device(_) | Mem::Part(..) if self.capturing() => {
                self.capture_htod(op, b.ptr(), src)
            }
            // SAFETY: the buffer covers src.len() bytes (checked above); the copy from
            // pageable memory is waited for before `src` can go.
            Mem::Part(..) => unsafe {
                cudarc::driver::result::memcpy_htod_async(b.ptr(), src, self.dev.stream.cu_stream())
                    .and_then(|()| self.dev.stream.synchronize())
                    .map_err(|e| device::driver_err(op, e))
            },
            Mem::Device(s) => self
                .dev
                .stream
                .memcpy_htod(src, s)
                .map_err(|e| device::driver_err(op, e)),
            Mem::Host(h) => {
                self.refuse_in_capture(op, "a write to mapped host memory")?;
                // Queued kernels may still use the memory: let them finish, then write it
                // from the host.
                self.dev
                    .stream
                    .synchronize()
                    .map_err(|e| device::driver_err(op, e))?;
                // SAFETY: the allocation holds at least `src.len()` bytes (checked above)
                // and no device work is queued on it any more.
                unsafe {
                    std::ptr::copy_nonoverlapping(src.as_ptr(), h.host_ptr(), src.len());
                }
                Ok(())
            }
        }
    }

    /// The stored bytes of `b` (`b.bytes()` of them), after the work queued so far.
    fn copy_out(&self, op: &'static str, b: &CudaBuf) -> Result<Vec<u8>> {
        self.refuse_in_capture(op, "a read back")?;
        if b.bytes() == 0 {
            // an empty buffer's allocation is a few bytes nothing wrote: nothing to copy
            return Ok(Vec::new());
        }
        match &b.mem {
            // the buffer's bytes only: an allocation is at least 4 bytes, so a 1-element
            // half buffer's last 2 were never written (initcheck would see them copied)
            Mem::Device(s) => self
                .dev
                .stream
                .clone_dtoh(&s.slice(..b.bytes()))
                .map_err(|e| device::driver_err(op, e)),
            Mem::Part(..) => {
                let mut bytes = vec![0u8; b.bytes()];
                // SAFETY: the buffer covers b.bytes() bytes; the copy is waited for.
                unsafe {
                    cudarc::driver::result::memcpy_dtoh_async(
                        &mut bytes,
                        b.ptr(),
                        self.dev.stream.cu_stream(),
                    )
                }
                .and_then(|()| self.dev.stream.synchronize())
                .map_err(|e| device::driver_err(op, e))?;
                Ok(bytes)
            }
            Mem::Host(h) => {
                // The writers are kernels on the compute stream: once it is idle their
                // writes over the bus have landed in host memory.
                self.dev
                    .stream
                    .synchronize()
                    .map_err(|e| device::driver_err(op, e))?;
                let mut bytes = vec![0u8; b.bytes()];
                // SAFETY: the allocation holds at least `b.bytes()` bytes and no device
                // work is queued on it any more.
                unsafe {
                    std::ptr::copy_nonoverlapping(h.host_ptr(), bytes.as_mut_ptr(), bytes.len());
                }
                Ok(bytes)
            }
        }
    }

    /// An uninitialised buffer of `len` elements of `dtype` (a slot for
    /// [`CudaBackend::upload_weight_async`]).
    pub fn alloc_weight(&self, len: usize, dtype: DType) -> Result<CudaBuf> {
        self.dev.bind("alloc_weight")?;
        self.new_buf("alloc_weight", len, dtype)
    }

    // ---- hooks for the streaming engine -------------------------------------------------

    /// `bytes` of page-locked host memory (write-combined: fast to fill and to copy to the
    /// device, slow for the CPU to read), the source of asynchronous weight uploads.
    pub fn alloc_pinned(&self, bytes: usize) -> Result<PinnedHostSlice<u8>> {
        let op = "alloc_pinned";
        // driver-pinned memory may escape the cgroup's accounting: check it here
        crate::hostmem::HostBudget::probe(self.opts.max_host_memory).check(
            bytes as u64,
            "page-locking host memory",
            "lower the pinned memory asked for (--strategy streaming instead of resident, no offload_activations), or raise the memory limit (max_host_memory, the cgroup's memory.max)",
        )?;
        self.dev.bind(op)?;
        // SAFETY: plain host allocation of `bytes` u8, which any bit pattern is valid for.
        unsafe { self.dev.ctx.alloc_pinned::<u8>(bytes) }.map_err(|e| {
            err(
                op,
                format!(
                    "could not page-lock {:.1} MiB of host memory ({e:?}); use fewer or smaller staging buffers",
                    bytes as f64 / (1024.0 * 1024.0)
                ),
            )
        })
    }

    /// A new stream for host→device weight copies, running beside the compute stream.
    pub fn new_copy_stream(&self) -> Result<Arc<CudaStream>> {
        self.dev.bind("new_copy_stream")?;
        self.dev
            .ctx
            .new_stream()
            .map_err(|e| device::driver_err("new_copy_stream", e))
    }

    /// An event recorded on the compute stream now: it completes when every op queued so
    /// far has run (e.g. the last reader of a weight slot, before the slot is refilled).
    pub fn record_compute_event(&self) -> Result<CudaEvent> {
        self.dev.bind("record_compute_event")?;
        self.dev
            .stream
            .record_event(None)
            .map_err(|e| device::driver_err("record_compute_event", e))
    }

    /// Make the compute stream wait (on the device, the host does not block) for `event`,
    /// e.g. the completion of a weight upload on the copy stream.
    pub fn compute_wait(&self, event: &CudaEvent) -> Result<()> {
        self.refuse_in_capture("compute_wait", "a wait for an event recorded outside it")?;
        self.dev.bind("compute_wait")?;
        self.dev
            .stream
            .wait(event)
            .map_err(|e| device::driver_err("compute_wait", e))
    }

    /// Copy a weight's stored bytes from host memory into `dst` on `copy`, after `copy`
    /// has waited for `slot_free` (when given), and return an event that completes when
    /// the data is on the device: pass it to [`CudaBackend::compute_wait`] before the first
    /// op that reads `dst`. The bytes are copied as they are (no dtype conversion), so
    /// `dst` must have the stored type and `bytes.len() == dst.bytes()`.
    ///
    /// # Safety
    /// `bytes` must stay valid and unchanged until the returned event completes; for the
    /// copy to be asynchronous it must be page-locked (pinned) memory, e.g. from
    /// `CudaContext::alloc_pinned`. `dst` must not be freed or read by the compute stream
    /// before the event completes.
    pub unsafe fn upload_weight_async(
        &self,
        dst: &mut CudaBuf,
        bytes: &[u8],
        copy: &CudaStream,
        slot_free: Option<&CudaEvent>,
    ) -> Result<CudaEvent> {
        let op = "upload_weight_async";
        self.refuse_in_capture(op, "a weight upload on the copy stream")?;
        if bytes.len() != dst.bytes() {
            return Err(err(
                op,
                format!(
                    "{} bytes given for a slot of {} bytes ({} × {})",
                    bytes.len(),
                    dst.bytes(),
                    dst.len,
                    dst.dtype
                ),
            ));
        }
        self.dev.bind(op)?;
        if let Some(ev) = slot_free {
            copy.wait(ev).map_err(|e| device::driver_err(op, e))?;
        }
        // SAFETY: dst holds exactly bytes.len() bytes (checked); the caller keeps the host
        // memory alive and unchanged until the returned event completes.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(dst.ptr(), bytes, copy.cu_stream())
                .map_err(|e| device::driver_err(op, e))?;
        }
        copy.record_event(None)
            .map_err(|e| device::driver_err(op, e))
    }

    fn check_f32(op: &'static str, what: &str, b: &CudaBuf, len: usize) -> Result<u64> {
        if b.dtype != DType::F32 {
            return Err(err(op, format!("{what} must be f32, it is {}", b.dtype)));
        }
        if b.len != len {
            return Err(err(
                op,
                format!("{what} has {} elements, expected {len}", b.len),
            ));
        }
        Ok(b.ptr())
    }

    /// With [`CudaBackend::poisons_uninit`], fill `bytes` bytes at `ptr` with 0xFF (NaN in
    /// f32, bf16 and f16), so that a read before a write shows up in tests; else nothing.
    pub(super) fn poison(&self, op: &'static str, ptr: u64, bytes: usize) -> Result<()> {
        if !self.poisons_uninit() || bytes == 0 {
            return Ok(());
        }
        self.dev.timed("memset (poison)", || {
            // SAFETY: the caller's buffer owns `bytes` bytes at `ptr`, allocated on the
            // compute stream, on which the memset is ordered.
            unsafe {
                cudarc::driver::result::memset_d8_async(
                    ptr,
                    0xFF,
                    bytes,
                    self.dev.stream.cu_stream(),
                )
            }
            .map_err(|e| device::driver_err(op, e))
        })
    }

    /// An activation output that may be stored in a half type (`Backend::gemm_output`):
    /// its address and type code.
    fn check_act(op: &'static str, what: &str, b: &CudaBuf, len: usize) -> Result<(u64, i32)> {
        if !matches!(b.dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(err(
                op,
                format!("{what} must be f32, bf16 or f16, it is {}", b.dtype),
            ));
        }
        Self::check_any(op, what, b, len)
    }

    fn check_any(op: &'static str, what: &str, b: &CudaBuf, len: usize) -> Result<(u64, i32)> {
        if b.len != len {
            return Err(err(
                op,
                format!("{what} has {} elements, expected {len}", b.len),
            ));
        }
        Ok((b.ptr(), device::dtype_code(b.dtype)))
    }
}

/// Rows of a `[rows, cols]` buffer, or an error naming the op when it is not a whole number.
fn rows_of(op: &'static str, what: &str, len: usize, cols: usize) -> Result<usize> {
    if cols == 0 || !len.is_multiple_of(cols) {
        return Err(err(
            op,
            format!("{what} has {len} elements, not a multiple of {cols} columns"),
        ));
    }
    Ok(len / cols)
}

/// View f32 values as their bytes (native order, which CUDA shares on every host we run on).
fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: u8 has alignment 1 and every byte of an f32 is initialised.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn i32_bytes(v: &[i32]) -> &[u8] {
    // SAFETY: as for `f32_bytes`.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Parked = offload::Parked;

    fn park(&self, buf: CudaBuf) -> Result<offload::Parked> {
        self.refuse_in_capture("park", "activation offloading")?;
        self.park_buf(buf)
    }

    fn unpark(&self, parked: offload::Parked) -> Result<CudaBuf> {
        self.refuse_in_capture("unpark", "activation offloading")?;
        self.unpark_buf(parked)
    }

    fn prefetch(&self, parked: &mut offload::Parked) -> Result<()> {
        self.refuse_in_capture("prefetch", "activation offloading")?;
        self.prefetch_buf(parked)
    }

    fn step_graph_begin(&self, key: u64) -> Result<bool> {
        self.step_graph_begin_impl(key)
    }

    fn step_graph_end(
        &self,
        ok: bool,
        embedded: &[f32],
        labels: &[i32],
    ) -> Result<Option<LossSum>> {
        self.step_graph_end_impl(ok, &[f32_bytes(embedded), i32_bytes(labels)])
    }

    fn step_graph_replay(
        &self,
        key: u64,
        embed: &mut dyn FnMut(&mut [f32]) -> Result<()>,
        labels: &[i32],
    ) -> Result<Option<LossSum>> {
        self.step_graph_replay_impl(key, embed, i32_bytes(labels))
    }

    fn step_graph_report(&self) -> Option<(u64, Option<String>)> {
        self.graphs
            .lock()
            .ok()
            .map(|g| (g.replays, g.dropped.clone()))
    }

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn free_memory(&self) -> Option<u64> {
        use cudarc::driver::sys::CUmemPool_attribute as A;
        let (free, _) = self.mem_info()?;
        let reserved = self.pool_attribute(A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?;
        let used = self.pool_attribute(A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?;
        Some(free as u64 + reserved.saturating_sub(used))
    }

    fn profile_phase(&self, phase: &'static str) {
        if let Some(p) = &self.dev.profiler {
            p.set_phase(phase);
        }
    }

    fn zeros(&self, n: usize) -> Result<CudaBuf> {
        let op = "zeros";
        self.dev.bind(op)?;
        let mut b = self.new_buf(op, n, DType::F32)?;
        self.memset_zero(op, &mut b)?;
        Ok(b)
    }

    fn uninit(&self, n: usize) -> Result<CudaBuf> {
        let op = "uninit";
        self.dev.bind(op)?;
        let b = self.new_buf(op, n, DType::F32)?;
        self.poison(op, b.ptr(), b.bytes())?;
        Ok(b)
    }

    fn gemm_input(&self, x: &CudaBuf, w: &CudaBuf) -> Result<Option<CudaBuf>> {
        self.gemm_input_impl(x, w)
    }

    fn gemm_input_all(&self, pairs: &[(&CudaBuf, &CudaBuf)]) -> Result<Vec<Option<CudaBuf>>> {
        self.gemm_input_all_impl(pairs)
    }

    fn gemm_output(&self, n: usize, w: &CudaBuf) -> Result<CudaBuf> {
        let op = "gemm_output";
        match w.dtype {
            DType::BF16 | DType::F16 => {
                self.dev.bind(op)?;
                let b = self.new_buf(op, n, w.dtype)?;
                self.poison(op, b.ptr(), b.bytes())?;
                Ok(b)
            }
            _ => self.uninit(n),
        }
    }

    fn gemm_output_group(&self, n: usize, count: usize, w: &CudaBuf) -> Result<Vec<CudaBuf>> {
        let op = "gemm_output";
        self.dev.bind(op)?;
        let dtype = match w.dtype {
            DType::BF16 | DType::F16 => w.dtype,
            _ => DType::F32,
        };
        let bufs = self.new_bufs(op, &vec![n; count], dtype)?;
        for b in &bufs {
            self.poison(op, b.ptr(), b.bytes())?;
        }
        Ok(bufs)
    }

    fn zeros_group(&self, lens: &[usize]) -> Result<Vec<CudaBuf>> {
        let op = "zeros";
        self.dev.bind(op)?;
        let mut bufs = self.new_bufs(op, lens, DType::F32)?;
        for b in &mut bufs {
            self.memset_zero(op, b)?;
        }
        Ok(bufs)
    }

    fn widen(&self, x: &CudaBuf) -> Result<CudaBuf> {
        self.widen_impl(x)
    }

    fn is_half(&self, x: &CudaBuf) -> bool {
        matches!(x.dtype, DType::BF16 | DType::F16)
    }

    fn uninit_like(&self, n: usize, like: &CudaBuf) -> Result<CudaBuf> {
        let op = "uninit_like";
        self.dev.bind(op)?;
        let b = self.new_buf(op, n, like.dtype)?;
        self.poison(op, b.ptr(), b.bytes())?;
        Ok(b)
    }

    fn copy_range(
        &self,
        dst: &mut CudaBuf,
        dst_off: usize,
        src: &CudaBuf,
        src_off: usize,
        len: usize,
    ) -> Result<()> {
        self.copy_range_impl(dst, dst_off, src, src_off, len)
    }

    /// Page-locked host memory mapped into the device's address space, zero-filled on the
    /// host (it is new, so no device work can refer to it yet).
    fn zeros_host(&self, n: usize) -> Result<CudaBuf> {
        let op = "zeros_host";
        let bytes = n
            .checked_mul(DType::F32.size())
            .ok_or_else(|| err(op, format!("{n} f32 elements overflow the address space")))?;
        crate::hostmem::HostBudget::probe(self.opts.max_host_memory).check(
            bytes as u64,
            "page-locking the optimizer state in host memory (offload_optimizer)",
            "turn offload_optimizer off, or raise the memory limit (max_host_memory, the cgroup's memory.max)",
        )?;
        let mem = Mem::Host(self.dev.alloc_mapped_host(op, bytes)?);
        Ok(CudaBuf {
            mem,
            len: n,
            dtype: DType::F32,
        })
    }

    fn upload(&self, data: &[f32]) -> Result<CudaBuf> {
        let op = "upload";
        self.dev.bind(op)?;
        let mut b = self.new_buf(op, data.len(), DType::F32)?;
        self.copy_in(op, &mut b, f32_bytes(data))?;
        Ok(b)
    }

    fn upload_with(
        &self,
        n: usize,
        fill: &mut dyn FnMut(&mut [f32]) -> Result<()>,
    ) -> Result<CudaBuf> {
        let op = "upload_with";
        self.dev.bind(op)?;
        if self.capturing() {
            let mut values = vec![0f32; n];
            fill(&mut values)?;
            let b = self.new_buf(op, n, DType::F32)?;
            self.capture_htod(op, b.ptr(), f32_bytes(&values))?;
            return Ok(b);
        }
        let bytes = n * DType::F32.size();
        let mut guard = self
            .staging
            .lock()
            .map_err(|_| err(op, "staging lock poisoned"))?;
        // the previous copy out of the staging buffer must be done before it is refilled
        if let Some((_, Some(done))) = guard.as_ref() {
            done.synchronize().map_err(|e| device::driver_err(op, e))?;
        }
        if guard.as_ref().is_none_or(|(h, _)| h.bytes().len() < bytes) {
            *guard = None; // unpinned before the larger one is pinned
            *guard = Some((pinned::PinnedBuf::alloc(self, bytes.max(1 << 20))?, None));
        }
        let (host, done) = guard.as_mut().ok_or_else(|| err(op, "no staging buffer"))?;
        let slice = &mut host.bytes_mut()[..bytes];
        // SAFETY: the heap buffer is page-aligned (so f32-aligned) and `bytes` long; every
        // bit pattern is an f32.
        let values = unsafe { std::slice::from_raw_parts_mut(slice.as_mut_ptr().cast::<f32>(), n) };
        fill(values)?;
        let b = self.new_buf(op, n, DType::F32)?;
        if bytes > 0 {
            // SAFETY: b holds exactly `bytes` bytes; the staging memory is page-locked and
            // is not written again before `done` completes (waited for above).
            unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    b.ptr(),
                    &host.bytes()[..bytes],
                    self.dev.stream.cu_stream(),
                )
                .map_err(|e| device::driver_err(op, e))?;
            }
            *done = Some(
                self.dev
                    .stream
                    .record_event(None)
                    .map_err(|e| device::driver_err(op, e))?,
            );
        }
        Ok(b)
    }

    fn upload_weight(&self, bytes: &[u8], dtype: DType) -> Result<CudaBuf> {
        let op = "upload_weight";
        self.dev.bind(op)?;
        if !bytes.len().is_multiple_of(dtype.size()) {
            return Err(err(
                op,
                format!(
                    "{} bytes is not a whole number of {dtype} elements",
                    bytes.len()
                ),
            ));
        }
        let n = bytes.len() / dtype.size();
        let target = if dtype == DType::F32 {
            self.opts.weight_dtype
        } else {
            dtype
        };
        let converted;
        let src: &[u8] = if target == dtype {
            bytes
        } else {
            // f32 → half once on the host (round to nearest even, as PyTorch's .to()).
            let mut out = Vec::with_capacity(n * 2);
            for c in bytes.chunks_exact(4) {
                let x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                let h = match target {
                    DType::BF16 => half::bf16::from_f32(x).to_bits(),
                    _ => half::f16::from_f32(x).to_bits(),
                };
                out.extend_from_slice(&h.to_le_bytes());
            }
            converted = out;
            &converted
        };
        let mut b = self.new_buf(op, n, target)?;
        self.copy_in(op, &mut b, src)?;
        Ok(b)
    }

    fn download(&self, buf: &CudaBuf) -> Result<Vec<f32>> {
        let op = "download";
        self.dev.bind(op)?;
        let bytes = self.copy_out(op, buf)?;
        let mut out = vec![0f32; buf.len];
        buf.dtype.decode_into(&bytes[..buf.bytes()], &mut out);
        Ok(out)
    }

    fn fill_zero(&self, buf: &mut CudaBuf) -> Result<()> {
        let op = "fill_zero";
        self.dev.bind(op)?;
        self.memset_zero(op, buf)
    }

    fn fill_zero_all(&self, bufs: &mut [&mut CudaBuf]) -> Result<()> {
        self.fill_zero_all_impl(bufs)
    }

    fn synchronize(&self) -> Result<()> {
        let op = "synchronize";
        self.refuse_in_capture(op, "a wait for the device")?;
        self.dev.bind(op)?;
        self.dev
            .stream
            .synchronize()
            .map_err(|e| device::driver_err(op, e))?;
        self.dev
            .ctx
            .check_err()
            .map_err(|e| device::driver_err(op, e))
    }

    fn matmul(&self, c: &mut CudaBuf, a: &CudaBuf, b: &CudaBuf, g: Gemm) -> Result<()> {
        self.gemm_checked(c, a, b, g)
    }

    fn matmul_group(
        &self,
        cs: &mut [&mut CudaBuf],
        a: &[&CudaBuf],
        b: &[&CudaBuf],
        g: Gemm,
    ) -> Result<()> {
        self.gemm_group_checked(cs, a, b, g)
    }

    fn axpy(&self, y: &mut CudaBuf, alpha: f32, x: &CudaBuf, acc: Accumulate) -> Result<()> {
        self.axpy_impl(y, alpha, x, acc)
    }

    fn add_bias(&self, x: &mut CudaBuf, b: &CudaBuf) -> Result<()> {
        self.add_bias_impl(x, b)
    }

    fn copy_cols(
        &self,
        dst: &mut CudaBuf,
        dst_cols: usize,
        dst_off: usize,
        src: &CudaBuf,
        src_cols: usize,
        src_off: usize,
        width: usize,
        acc: Accumulate,
    ) -> Result<()> {
        self.copy_cols_impl(dst, dst_cols, dst_off, src, src_cols, src_off, width, acc)
    }

    fn sum_squares(&self, x: &CudaBuf) -> Result<f64> {
        self.sum_squares_impl(x)
    }

    fn sum_squares_all(&self, xs: &[&CudaBuf]) -> Result<f64> {
        self.sum_squares_all_impl(xs)
    }

    fn embedding_forward(
        &self,
        out: &mut CudaBuf,
        ids: &[u32],
        table: &CudaBuf,
        c: usize,
        acc: Accumulate,
    ) -> Result<()> {
        self.embedding_impl(out, ids, table, c, acc)
    }

    fn rms_norm_forward(
        &self,
        out: &mut CudaBuf,
        rstd: &mut CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        w_offset: f32,
        eps: f32,
    ) -> Result<()> {
        self.rms_norm_forward_impl(out, rstd, x, w, w_offset, eps)
    }

    fn rms_norm_backward(
        &self,
        dx: &mut CudaBuf,
        dout: &CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        w_offset: f32,
        rstd: &CudaBuf,
        acc: Accumulate,
    ) -> Result<()> {
        self.rms_norm_backward_impl(dx, dout, x, w, w_offset, rstd, acc)
    }

    fn layer_norm_forward(
        &self,
        out: &mut CudaBuf,
        mean: &mut CudaBuf,
        rstd: &mut CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        b: &CudaBuf,
        eps: f32,
    ) -> Result<()> {
        self.layer_norm_forward_impl(out, mean, rstd, x, w, b, eps)
    }

    fn layer_norm_backward(
        &self,
        dx: &mut CudaBuf,
        dout: &CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        mean: &CudaBuf,
        rstd: &CudaBuf,
        acc: Accumulate,
    ) -> Result<()> {
        self.layer_norm_backward_impl(dx, dout, x, w, mean, rstd, acc)
    }

    fn rope_forward(
        &self,
        x: &mut CudaBuf,
        positions: &[u32],
        inv_freq: &[f32],
        heads: usize,
    ) -> Result<()> {
        self.rope_impl("rope_forward", x, positions, inv_freq, heads, 1.0)
    }

    fn rope_backward(
        &self,
        dx: &mut CudaBuf,
        positions: &[u32],
        inv_freq: &[f32],
        heads: usize,
    ) -> Result<()> {
        self.rope_impl("rope_backward", dx, positions, inv_freq, heads, -1.0)
    }

    fn attention_operand(
        &self,
        x: CudaBuf,
        rope: Option<RopeAngles<'_>>,
        heads: usize,
        head_dim: usize,
    ) -> Result<CudaBuf> {
        self.attention_operand_impl(x, rope, heads, head_dim)
    }

    fn attention_forward(
        &self,
        out: &mut CudaBuf,
        lse: &mut CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        dims: AttnDims,
        key_start: Option<&[u32]>,
    ) -> Result<()> {
        self.attention_forward_impl(out, lse, q, k, v, dims, key_start)
    }

    fn attention_decode(
        &self,
        out: &mut CudaBuf,
        q: &CudaBuf,
        k_cache: &CudaBuf,
        v_cache: &CudaBuf,
        dims: crate::backend::DecodeDims,
        key_start: Option<&[u32]>,
    ) -> Result<()> {
        self.attention_decode_impl(out, q, k_cache, v_cache, dims, key_start)
    }

    fn attention_backward(
        &self,
        dq: &mut CudaBuf,
        dk: &mut CudaBuf,
        dv: &mut CudaBuf,
        dout: &CudaBuf,
        out: &CudaBuf,
        lse: &CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        dims: AttnDims,
        key_start: Option<&[u32]>,
    ) -> Result<()> {
        self.attention_backward_impl(dq, dk, dv, dout, out, lse, q, k, v, dims, key_start)
    }

    fn attention_backward_owned(
        &self,
        dout: CudaBuf,
        out: CudaBuf,
        lse: &CudaBuf,
        q: CudaBuf,
        k: CudaBuf,
        v: CudaBuf,
        dims: AttnDims,
        key_start: Option<&[u32]>,
    ) -> Result<(CudaBuf, CudaBuf, CudaBuf)> {
        self.attention_backward_owned_impl(dout, out, lse, q, k, v, dims, key_start)
    }

    fn gated_forward(
        &self,
        act: Activation,
        out: &mut CudaBuf,
        gate: &CudaBuf,
        up: &CudaBuf,
    ) -> Result<()> {
        self.gated_forward_impl(act, out, gate, up)
    }

    fn gated_backward(
        &self,
        act: Activation,
        dgate: &mut CudaBuf,
        dup: &mut CudaBuf,
        dout: &CudaBuf,
        gate: &CudaBuf,
        up: &CudaBuf,
    ) -> Result<()> {
        self.gated_backward_impl(act, dgate, dup, dout, gate, up)
    }

    fn gelu_forward(&self, out: &mut CudaBuf, x: &CudaBuf) -> Result<()> {
        self.gelu_forward_impl(out, x)
    }

    fn gelu_backward(&self, dx: &mut CudaBuf, dout: &CudaBuf, x: &CudaBuf) -> Result<()> {
        self.gelu_backward_impl(dx, dout, x)
    }

    fn dropout_forward(
        &self,
        out: &mut CudaBuf,
        x: &CudaBuf,
        p: f32,
        seed: u64,
        offset: u64,
    ) -> Result<()> {
        self.dropout_impl("dropout_forward", out, x, p, seed, offset)
    }

    fn dropout_backward(
        &self,
        dx: &mut CudaBuf,
        dout: &CudaBuf,
        p: f32,
        seed: u64,
        offset: u64,
    ) -> Result<()> {
        self.dropout_impl("dropout_backward", dx, dout, p, seed, offset)
    }

    fn lm_head_loss(
        &self,
        h: &CudaBuf,
        w: &CudaBuf,
        labels: &[i32],
        c: usize,
        loss_scale: f32,
        softcap: Option<f32>,
        dh: Option<&mut CudaBuf>,
        logits: Option<&mut CudaBuf>,
    ) -> Result<LossSum> {
        self.lm_head_loss_impl(h, w, labels, c, loss_scale, softcap, dh, logits)
    }

    fn dequantize_nf4(&self, q: &Nf4Parts<'_, Self>, dtype: DType) -> Result<CudaBuf> {
        self.dequantize_nf4_impl(q, dtype)
    }

    fn dequantize_fp8(&self, q: &Fp8Parts<'_, Self>, dtype: DType) -> Result<CudaBuf> {
        self.dequantize_fp8_impl(q, dtype)
    }

    fn softcap(&self, x: &mut CudaBuf, cap: f32) -> Result<()> {
        self.softcap_impl(x, cap)
    }

    fn adamw_step(
        &self,
        p: &mut CudaBuf,
        g: &CudaBuf,
        m: &mut CudaBuf,
        v: &mut CudaBuf,
        h: AdamWStep,
    ) -> Result<()> {
        self.adamw_impl(p, g, m, v, h)
    }

    fn sgd_step(&self, p: &mut CudaBuf, g: &CudaBuf, buf: &mut CudaBuf, h: SgdStep) -> Result<()> {
        self.sgd_impl(p, g, buf, h)
    }

    fn adamw_step_all(&self, items: &mut [AdamWItem<'_, Self>], h: AdamWStep) -> Result<()> {
        self.adamw_all_impl(items, h)
    }

    fn sgd_step_all(&self, items: &mut [SgdItem<'_, Self>], h: SgdStep) -> Result<()> {
        self.sgd_all_impl(items, h)
    }
}

/// Every kernel module, for ahead-of-time checks.
#[cfg(test)]
fn all_modules() -> [device::Module; 9] {
    [
        elementwise::MODULE,
        norm::MODULE,
        rope::MODULE,
        attention::MODULE,
        attention::MODULE_MMA,
        attention::MODULE_WGMMA,
        loss::MODULE,
        optim::MODULE,
        quant::MODULE,
    ]
}

/// The integration tests' visible skip (a failure under `CI=true`), shared as a file.
#[cfg(test)]
#[path = "../../../tests/common/skip.rs"]
mod test_skip;

#[cfg(test)]
mod tests {
    use super::test_skip::skip;
    use super::*;
    use std::path::PathBuf;

    /// Every .cu file compiles with NVRTC for Hopper and Ampere (an architecture-specific
    /// module for Hopper only, where its kernels must be in the image). Needs only NVRTC,
    /// no GPU; skipped visibly where libnvrtc cannot be loaded (a failure under CI).
    #[test]
    fn kernels_compile_with_nvrtc() {
        // SAFETY: only tries to dlopen the library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            skip("NVRTC (libnvrtc.so.13) not found: run scripts/test, which fetches it");
            return;
        }
        for arch in ["sm_90", "sm_80"] {
            for m in all_modules() {
                if m.arch_specific && arch != "sm_90" {
                    continue;
                }
                let img = device::module_image(m, &m.target(arch), &KernelCache::Off)
                    .unwrap_or_else(|e| panic!("{}: {e}", m.name));
                assert!(img.starts_with(b"\x7fELF"), "{}: not a CUBIN", m.name);
                if m.arch_specific {
                    // the kernels are guarded by the target's feature macro: they must be in
                    for name in ["awg_fwd_d128", "awg_bwd_dq_d64", "awg_bwd_dkdv_d128"] {
                        assert!(
                            img.windows(name.len()).any(|w| w == name.as_bytes()),
                            "{}: kernel {name} is not in the {} image",
                            m.name,
                            m.target(arch)
                        );
                    }
                }
            }
        }
    }

    /// A compiled module lands in the disk cache; a cache folder that cannot be written
    /// costs nothing but the write. (Distinct architectures keep the in-memory cache out
    /// of the way.)
    #[test]
    fn kernel_disk_cache_is_written_and_optional() {
        // SAFETY: only tries to dlopen the library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            skip("NVRTC (libnvrtc.so.13) not found: run scripts/test, which fetches it");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let cache = KernelCache::Dir(dir.path().join("kernels"));
        device::module_image(rope::MODULE, "sm_86", &cache).unwrap();
        let files: Vec<_> = std::fs::read_dir(dir.path().join("kernels"))
            .unwrap()
            .flatten()
            .collect();
        assert_eq!(files.len(), 1, "one cached module");
        let name = files[0].file_name().to_string_lossy().into_owned();
        assert!(
            name.starts_with("rope-sm_86-nvrtc") && name.ends_with(".cubin"),
            "{name}"
        );
        assert!(
            std::fs::read(files[0].path())
                .unwrap()
                .starts_with(b"\x7fELF")
        );
        let blocked = KernelCache::Dir(PathBuf::from("/proc/lema-cannot-write-here"));
        device::module_image(rope::MODULE, "sm_89", &blocked)
            .expect("an unwritable cache only costs time");
    }
}
