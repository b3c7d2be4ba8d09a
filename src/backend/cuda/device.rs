//! The CUDA runtime layer under [`super::CudaBackend`]: loading the driver, one context
//! and compute stream, device memory with out-of-memory reports that say what to change,
//! run-time kernel compilation with NVRTC (cached in memory and on disk), and the one
//! kernel-launch door.

use crate::backend::DType;
use crate::backend::cuda_options::KernelCache;
use crate::error::{Error, Result};
use cudarc::driver::sys::{CUdeviceptr, CUfunction_attribute, CUresult};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DriverError,
};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

pub(crate) use super::errors::{BACKEND, driver_err, err};

/// Check that the CUDA libraries lema needs can be loaded and that a device exists.
/// Returns a sentence saying what is missing otherwise (no panic: cudarc panics when it
/// calls into a library that is absent, so presence is checked first).
pub fn probe(ordinal: usize) -> std::result::Result<(), String> {
    // SAFETY: these only try to dlopen the libraries by their usual names.
    let (drv, blas, rtc) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::cublas::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
        )
    };
    if !drv {
        return Err("no CUDA driver (libcuda.so) could be loaded".into());
    }
    if !blas {
        return Err(
            "the CUDA driver is present but cuBLAS (libcublas.so.13) could not be loaded; \
                    install the CUDA 13 runtime libraries or add them to LD_LIBRARY_PATH"
                .into(),
        );
    }
    if !rtc {
        return Err(
            "the CUDA driver is present but NVRTC (libnvrtc.so.13) could not be loaded; \
                    install the CUDA 13 runtime libraries or add them to LD_LIBRARY_PATH"
                .into(),
        );
    }
    let n = CudaContext::device_count()
        .map_err(|e| format!("the CUDA driver found no usable GPU ({e:?})"))?;
    if n <= 0 {
        return Err("the CUDA driver reports no GPU".into());
    }
    if ordinal >= n as usize {
        return Err(format!(
            "GPU {ordinal} was asked for but the driver reports {n}"
        ));
    }
    Ok(())
}

impl KernelCache {
    fn dir(&self) -> Option<PathBuf> {
        match self {
            KernelCache::Off => None,
            KernelCache::Dir(d) => Some(d.clone()),
            KernelCache::Default => {
                default_cache_dir(std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME"))
            }
        }
    }
}

/// `$XDG_CACHE_HOME/lema/kernels` when that is set and not empty, else
/// `$HOME/.cache/lema/kernels`; None without either.
fn default_cache_dir(
    xdg_cache_home: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> Option<PathBuf> {
    let base = xdg_cache_home
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| home.map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("lema").join("kernels"))
}

/// One CUDA C source file compiled as a unit (`.cu` beside its Rust caller).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Module {
    pub name: &'static str,
    pub src: &'static str,
    /// Compiled for the architecture-specific target ("sm_90" → "sm_90a"), whose
    /// instructions (wgmma) only that architecture runs. Such a module is only loaded on
    /// the architecture it names (attention.rs checks).
    pub arch_specific: bool,
}

impl Module {
    /// A module compiled for the device's architecture as NVRTC names it.
    pub const fn new(name: &'static str, src: &'static str) -> Module {
        Module {
            name,
            src,
            arch_specific: false,
        }
    }

    /// The NVRTC target of this module on a device of architecture `arch`.
    pub fn target(&self, arch: &str) -> String {
        if self.arch_specific {
            format!("{arch}a")
        } else {
            arch.to_string()
        }
    }
}

/// Helpers shared by every module (half conversions, warp and block reductions);
/// prepended to each source before compilation.
const COMMON: &str = include_str!("common.cuh");

/// Compiled module images of this process, keyed by the cache key (source, arch, NVRTC
/// version): a second backend in the same process loads without compiling.
fn memory_cache() -> &'static Mutex<HashMap<u64, Arc<Vec<u8>>>> {
    static CACHE: OnceLock<Mutex<HashMap<u64, Arc<Vec<u8>>>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// FNV-1a, 64 bits: a stable hash for cache file names (std's hasher may change between
/// Rust releases).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn nvrtc_version() -> (i32, i32) {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters; NVRTC was found present by `probe`.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return (0, 0);
    }
    (major, minor)
}

/// Compile `src` for `arch` (e.g. "sm_90") to a CUBIN with NVRTC. A compile error carries
/// NVRTC's log.
fn nvrtc_compile(module: &'static str, src: &str, options: &[String]) -> Result<Vec<u8>> {
    use cudarc::nvrtc::{result, sys};
    let op = "compile kernels";
    let csrc = std::ffi::CString::new(src)
        .map_err(|_| err(op, format!("module '{module}': NUL in source")))?;
    let cname =
        std::ffi::CString::new(format!("{module}.cu")).map_err(|_| err(op, "bad module name"))?;
    let prog = result::create_program(&csrc, Some(&cname))
        .map_err(|e| err(op, format!("module '{module}': nvrtcCreateProgram: {e:?}")))?;
    struct Guard(sys::nvrtcProgram);
    impl Drop for Guard {
        fn drop(&mut self) {
            // SAFETY: the program was created above and is destroyed once, here.
            let _ = unsafe { result::destroy_program(self.0) };
        }
    }
    let guard = Guard(prog);
    // SAFETY: `prog` is a live program (held by `guard`); options are plain strings.
    if let Err(e) = unsafe { result::compile_program(guard.0, options) } {
        // SAFETY: the log of a live program.
        let log = unsafe { result::get_program_log(guard.0) }
            .map(|raw| {
                let bytes: Vec<u8> = raw
                    .iter()
                    .take_while(|&&c| c != 0)
                    .map(|&c| c as u8)
                    .collect();
                String::from_utf8_lossy(&bytes).into_owned()
            })
            .unwrap_or_else(|_| "(no log)".into());
        return Err(err(
            op,
            format!(
                "NVRTC could not compile module '{module}' ({e:?}, options {options:?}):\n{log}"
            ),
        ));
    }
    let mut size = 0usize;
    // SAFETY: live program, out-parameter.
    let r = unsafe { sys::nvrtcGetCUBINSize(guard.0, &mut size) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
        return Err(err(
            op,
            format!("module '{module}': nvrtcGetCUBINSize: {r:?}"),
        ));
    }
    let mut cubin = vec![0u8; size];
    // SAFETY: the buffer has the size NVRTC asked for.
    let r = unsafe { sys::nvrtcGetCUBIN(guard.0, cubin.as_mut_ptr() as *mut std::ffi::c_char) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(err(op, format!("module '{module}': nvrtcGetCUBIN: {r:?}")));
    }
    Ok(cubin)
}

/// Compile a module for `arch`, or take it from the memory or disk cache. Cache failures
/// (unwritable folder, corrupt file) only cost a compile.
pub(crate) fn module_image(m: Module, arch: &str, cache: &KernelCache) -> Result<Arc<Vec<u8>>> {
    let (major, minor) = nvrtc_version();
    let version = format!("{major}.{minor}");
    let options = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
    ];
    let opt_text = options.join(" ");
    let key = fnv1a(&[
        COMMON.as_bytes(),
        m.src.as_bytes(),
        arch.as_bytes(),
        version.as_bytes(),
        opt_text.as_bytes(),
    ]);
    if let Some(img) = memory_cache()
        .lock()
        .ok()
        .and_then(|c| c.get(&key).cloned())
    {
        return Ok(img);
    }
    let file = cache
        .dir()
        .map(|d| d.join(format!("{}-{arch}-nvrtc{version}-{key:016x}.cubin", m.name)));
    let from_disk = file
        .as_ref()
        .and_then(|f| std::fs::read(f).ok())
        .filter(|b| b.len() > 4 && &b[..4] == b"\x7fELF");
    let img = match from_disk {
        Some(b) => Arc::new(b),
        None => {
            // #line keeps NVRTC's line numbers those of the .cu file.
            let src = format!("{COMMON}\n#line 1 \"{}.cu\"\n{}", m.name, m.src);
            let b = Arc::new(nvrtc_compile(m.name, &src, &options)?);
            if let Some(f) = &file {
                write_cache_file(f, &b);
            }
            b
        }
    };
    if let Ok(mut c) = memory_cache().lock() {
        c.insert(key, img.clone());
    }
    Ok(img)
}

/// Write atomically (temporary name, then rename); any failure is ignored.
fn write_cache_file(path: &std::path::Path, bytes: &[u8]) {
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("k"),
        std::process::id()
    ));
    if std::fs::write(&tmp, bytes).is_ok() && std::fs::rename(&tmp, path).is_ok() {
        return;
    }
    let _ = std::fs::remove_file(&tmp);
}

/// A kernel argument. Every argument is passed by value; device pointers as `u64`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg {
    Ptr(CUdeviceptr),
    I32(i32),
    I64(i64),
    U64(u64),
    F32(f32),
}

/// Launch geometry, checked against the hardware limits before the launch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Launch {
    pub grid: (usize, usize, usize),
    pub block: u32,
    pub shared_bytes: usize,
}

impl Launch {
    /// Enough blocks of `block` threads to cover `n` elements (at most `max_blocks`, for
    /// grid-stride kernels).
    pub fn cover(n: usize, block: u32, max_blocks: usize) -> Self {
        let blocks = n.div_ceil(block as usize).clamp(1, max_blocks);
        Launch {
            grid: (blocks, 1, 1),
            block,
            shared_bytes: 0,
        }
    }
}

/// Device state shared by all ops: context, compute stream, loaded modules.
pub(crate) struct Device {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub arch: String,
    pub name: String,
    cache: KernelCache,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
    /// Synchronise after every launch, so that an asynchronous fault names its kernel
    /// (tests, `LEMA_CUDA_SYNC=1`); costs speed.
    pub sync_each_launch: bool,
    /// Times every region of the compute stream when profiling is on.
    pub profiler: Option<super::profile::Profiler>,
    /// The compute stream is being captured into a step graph (`graph.rs`).
    capturing: std::sync::atomic::AtomicBool,
}

impl Device {
    pub fn new(
        ordinal: usize,
        cache: KernelCache,
        sync_each_launch: bool,
        profile: bool,
    ) -> Result<Self> {
        let op = "init";
        probe(ordinal).map_err(|m| err(op, m))?;
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err(op, e))?;
        // We order work ourselves: one compute stream, and explicit events for any copy
        // stream (see `CudaBackend::upload_weight_async`). cudarc's per-buffer event
        // tracking would add two events to every allocation and a wait to every launch.
        // SAFETY: called before any buffer of this context exists.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| driver_err(op, e))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| driver_err(op, e))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        // Keep freed memory in the pool across synchronisations (as PyTorch's caching
        // allocator does): a training step frees and re-allocates the same sizes every
        // step, and the driver then reports the step's real peak. Out of memory trims the
        // pool before retrying (`alloc`).
        set_pool_release_threshold(&ctx, u64::MAX);
        let profiler = profile.then(|| super::profile::Profiler::new(ctx.clone()));
        Ok(Device {
            ctx,
            stream,
            profiler,
            arch: format!("sm_{major}{minor}"),
            name,
            cache,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            sync_each_launch,
            capturing: false.into(),
        })
    }

    /// Run `f`, which enqueues work on the compute stream, timed under `label` when
    /// profiling is on.
    pub fn timed<T>(&self, label: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        match &self.profiler {
            None => f(),
            Some(p) => p.time(&self.stream, label, f),
        }
    }

    /// Whether the compute stream is being captured into a graph.
    pub fn capturing(&self) -> bool {
        self.capturing.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set_capturing(&self, on: bool) {
        self.capturing
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Wait for the queued work, then hand the memory the stream's pool keeps unused back
    /// to the driver.
    pub fn trim_pool(&self, op: &'static str) -> Result<()> {
        self.stream.synchronize().map_err(|e| driver_err(op, e))?;
        set_pool_release_threshold(&self.ctx, 0);
        self.stream.synchronize().map_err(|e| driver_err(op, e))?;
        set_pool_release_threshold(&self.ctx, u64::MAX);
        Ok(())
    }

    /// Make this backend's context current on the calling thread.
    pub fn bind(&self, op: &'static str) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| driver_err(op, e))
    }

    /// `(free, total)` device memory in bytes.
    pub fn mem_info(&self) -> Option<(usize, usize)> {
        self.ctx.mem_get_info().ok()
    }

    /// `bytes` of uninitialised device memory, stream-ordered on the compute stream. Out of
    /// memory: the pool is released back to the driver and the allocation tried once more;
    /// then an error with the numbers and what to change.
    pub fn alloc(&self, op: &'static str, bytes: usize) -> Result<CudaSlice<u8>> {
        let bytes = bytes.max(4);
        // SAFETY: uninitialised bytes; every caller writes before it reads (or memsets).
        match unsafe { self.stream.alloc::<u8>(bytes) } {
            Ok(s) => Ok(s),
            // a capture cannot wait for the device
            Err(DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY)) if self.capturing() => {
                Err(self.oom(op, bytes))
            }
            Err(DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY)) => {
                // Freed buffers go back to the driver at a synchronisation point.
                set_pool_release_threshold(&self.ctx, 0);
                self.stream.synchronize().map_err(|e| driver_err(op, e))?;
                set_pool_release_threshold(&self.ctx, u64::MAX);
                // SAFETY: as above.
                match unsafe { self.stream.alloc::<u8>(bytes) } {
                    Ok(s) => Ok(s),
                    Err(DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY)) => {
                        Err(self.oom(op, bytes))
                    }
                    Err(e) => Err(driver_err(op, e)),
                }
            }
            Err(e) => Err(driver_err(op, e)),
        }
    }

    /// `bytes` of zeroed, page-locked host memory mapped into the device's address space
    /// (`cuMemHostAlloc` with `DEVICEMAP | PORTABLE`): kernels read and write it through
    /// its device pointer, over the bus. Fails with a sentence naming the size and what to
    /// change when the host cannot lock that much memory or the device cannot map it.
    pub fn alloc_mapped_host(&self, op: &'static str, bytes: usize) -> Result<HostMem> {
        use cudarc::driver::sys;
        let bytes = bytes.max(4);
        self.bind(op)?;
        let mib = bytes as f64 / (1024.0 * 1024.0);
        let mut host: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; the flags are valid for cuMemHostAlloc.
        let r = unsafe {
            sys::cuMemHostAlloc(
                &mut host,
                bytes,
                sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE,
            )
        };
        if r != CUresult::CUDA_SUCCESS || host.is_null() {
            return Err(err(
                op,
                format!(
                    "cuMemHostAlloc could not give {mib:.1} MiB of page-locked, device-mapped \
                     host memory ({r:?}); free host memory or raise the locked-memory limit \
                     (ulimit -l), or turn offload_optimizer off to keep the optimizer state \
                     in GPU memory"
                ),
            ));
        }
        // From here on the guard frees the allocation on every path.
        let mut mem = HostMem {
            host,
            dptr: 0,
            bytes,
            ctx: self.ctx.clone(),
        };
        let mut dptr: CUdeviceptr = 0;
        // SAFETY: `host` was returned by cuMemHostAlloc with DEVICEMAP; flags must be 0.
        let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dptr, host, 0) };
        if r != CUresult::CUDA_SUCCESS || dptr == 0 {
            return Err(err(
                op,
                format!(
                    "cuMemHostGetDevicePointer found no device address for {mib:.1} MiB of \
                     mapped host memory ({r:?}): {} cannot map host memory; turn \
                     offload_optimizer off",
                    self.name
                ),
            ));
        }
        mem.dptr = dptr;
        // SAFETY: `bytes` bytes of fresh host memory that no queued device work refers to.
        unsafe { std::ptr::write_bytes(host as *mut u8, 0, bytes) };
        Ok(mem)
    }

    fn oom(&self, op: &'static str, bytes: usize) -> Error {
        let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
        let (free, total) = self.mem_info().unwrap_or((0, 0));
        err(
            op,
            format!(
                "out of GPU memory on {}: needed {:.1} MiB more, {:.1} MiB free of {:.1} MiB. \
                 Reduce the batch size or the sequence length, turn gradient checkpointing on, \
                 or lower the VRAM budget so that fewer layers stay on the GPU",
                self.name,
                mib(bytes),
                mib(free),
                mib(total)
            ),
        )
    }

    /// The raw address of a buffer, for kernel arguments and cuBLAS.
    pub fn ptr(s: &CudaSlice<u8>) -> CUdeviceptr {
        // With event tracking off the returned guard does nothing.
        let (p, _guard) = s.device_ptr(s.stream());
        p
    }

    fn function(&self, m: Module, kernel: &'static str) -> Result<CudaFunction> {
        let op = "load kernel";
        if let Some(f) = self
            .functions
            .lock()
            .ok()
            .and_then(|f| f.get(&(m.name, kernel)).cloned())
        {
            return Ok(f);
        }
        let module = {
            let mut mods = self
                .modules
                .lock()
                .map_err(|_| err(op, "module cache lock poisoned"))?;
            match mods.get(m.name) {
                Some(md) => md.clone(),
                None => {
                    let target = m.target(&self.arch);
                    let img = module_image(m, &target, &self.cache)?;
                    let md = self
                        .ctx
                        .load_module(Ptx::from_binary(img.as_ref().clone()))
                        .map_err(|e| err(op, format!("module '{}' for {target}: {e:?}", m.name)))?;
                    mods.insert(m.name, md.clone());
                    md
                }
            }
        };
        let f = module.load_function(kernel).map_err(|e| {
            err(
                op,
                format!("kernel '{kernel}' not found in module '{}': {e:?}", m.name),
            )
        })?;
        if let Ok(mut fs) = self.functions.lock() {
            fs.insert((m.name, kernel), f.clone());
        }
        Ok(f)
    }

    /// Launch `kernel` of module `m` on the compute stream. The one door through which
    /// every kernel runs: sizes are checked here, and a failure names the kernel.
    pub fn launch(
        &self,
        op: &'static str,
        m: Module,
        kernel: &'static str,
        l: Launch,
        args: &[Arg],
    ) -> Result<()> {
        let (gx, gy, gz) = l.grid;
        if gx == 0 || gy == 0 || gz == 0 {
            return Ok(()); // nothing to do
        }
        if gx > i32::MAX as usize || gy > 65535 || gz > 65535 || l.block == 0 || l.block > 1024 {
            return Err(err(
                op,
                format!(
                    "kernel '{kernel}': launch grid ({gx}, {gy}, {gz}) × block {} exceeds the device limits",
                    l.block
                ),
            ));
        }
        let f = self.function(m, kernel)?;
        if l.shared_bytes > 48 * 1024 {
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                l.shared_bytes as i32,
            )
            .map_err(|e| {
                err(
                    op,
                    format!(
                        "kernel '{kernel}' needs {} bytes of shared memory: {e:?}",
                        l.shared_bytes
                    ),
                )
            })?;
        }
        // Each argument's value in its own 8-byte slot; the kernel reads as many bytes as
        // its parameter type has (little-endian, so the low bytes come first).
        let mut slots: Vec<[u8; 8]> = args
            .iter()
            .map(|a| {
                let mut s = [0u8; 8];
                match *a {
                    Arg::Ptr(p) => s.copy_from_slice(&p.to_ne_bytes()),
                    Arg::U64(v) => s.copy_from_slice(&v.to_ne_bytes()),
                    Arg::I64(v) => s.copy_from_slice(&v.to_ne_bytes()),
                    Arg::I32(v) => s[..4].copy_from_slice(&v.to_ne_bytes()),
                    Arg::F32(v) => s[..4].copy_from_slice(&v.to_ne_bytes()),
                }
                s
            })
            .collect();
        let mut params: Vec<*mut std::ffi::c_void> =
            slots.iter_mut().map(|s| s.as_mut_ptr() as *mut _).collect();
        self.bind(op)?;
        // SAFETY: the parameter list matches the kernel's signature in its .cu file (each
        // call site passes the arguments in the kernel's order, pointers to buffers whose
        // lengths the op checked); the slots outlive the call.
        self.timed(kernel, || {
            unsafe {
                cudarc::driver::result::launch_kernel(
                    f.cu_function(),
                    (gx as u32, gy as u32, gz as u32),
                    (l.block, 1, 1),
                    l.shared_bytes as u32,
                    self.stream.cu_stream(),
                    &mut params,
                )
            }
            .map_err(|e| err(op, format!("launch of kernel '{kernel}' failed: {e:?}")))
        })?;
        if self.sync_each_launch {
            self.stream
                .synchronize()
                .map_err(|e| err(op, format!("kernel '{kernel}' failed while running: {e:?}")))?;
        }
        Ok(())
    }
}

/// Page-locked host memory mapped into the device's address space (see
/// [`Device::alloc_mapped_host`]), freed with `cuMemFreeHost` once all queued work of the
/// context is done.
pub(crate) struct HostMem {
    host: *mut std::ffi::c_void,
    /// The address kernels use (with unified addressing equal to `host`).
    dptr: CUdeviceptr,
    bytes: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: plain host memory owned by this value (no thread affinity); device work that
// touches it is ordered by the streams, and the free waits for all of it.
unsafe impl Send for HostMem {}
// SAFETY: shared references only hand out the addresses; reads and writes go through the
// backend's stream-ordered ops (or happen after a synchronisation).
unsafe impl Sync for HostMem {}

impl HostMem {
    /// The device address of the memory.
    pub fn device_ptr(&self) -> CUdeviceptr {
        self.dptr
    }

    /// The host view of the memory. Only meaningful once the device work writing it is
    /// done (after a stream synchronisation).
    pub fn host_ptr(&self) -> *mut u8 {
        self.host as *mut u8
    }

    /// Size of the allocation in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for HostMem {
    fn drop(&mut self) {
        // Kernels may still read or write the memory: wait for every stream of the context
        // (binds the context too). Errors cannot be returned from a drop; they are recorded
        // in the context and reported by its next checked call (as cudarc does).
        self.ctx.record_err(self.ctx.synchronize());
        // SAFETY: `host` came from cuMemHostAlloc and is freed once, here, after the device
        // is done with it.
        let r = unsafe { cudarc::driver::sys::cuMemFreeHost(self.host) };
        if r != CUresult::CUDA_SUCCESS {
            self.ctx.record_err::<()>(Err(DriverError(r)));
        }
    }
}

/// The integer code kernels use for a stored element type (see `load_w` in common.cuh).
pub(crate) fn dtype_code(d: DType) -> i32 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        DType::U8 => 3,
        DType::F8E4M3 => 4,
    }
}

/// Set how much freed memory the device's default pool keeps at a synchronisation
/// (best effort: a failure only changes when memory goes back to the driver).
fn set_pool_release_threshold(ctx: &CudaContext, bytes: u64) {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut value = bytes;
    // SAFETY: out-pointer to a local; the attribute takes a u64 by pointer.
    unsafe {
        if sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) == sys::CUresult::CUDA_SUCCESS
        {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut value as *mut u64 as *mut std::ffi::c_void,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FNV-1a 64 as specified (cache file names must not change between builds), with a
    /// 0xff byte after each part so that moving a boundary changes the key.
    #[test]
    fn fnv_is_fnv1a_and_separates_parts() {
        const PRIME: u64 = 0x0100_0000_01b3;
        // the FNV offset basis, and FNV-1a 64 of "a", from the FNV reference test vectors
        assert_eq!(fnv1a(&[]), 0xcbf2_9ce4_8422_2325);
        let a_then_ff = (0xaf63_dc4c_8601_ec8c_u64 ^ 0xff).wrapping_mul(PRIME);
        assert_eq!(fnv1a(&[b"a"]), a_then_ff);
        assert_eq!(fnv1a(&[b"a", b""]), (a_then_ff ^ 0xff).wrapping_mul(PRIME));
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
        assert_ne!(fnv1a(&[b"ab"]), fnv1a(&[b"ab", b""]));
    }

    #[test]
    fn cache_dir_follows_xdg_then_home() {
        let os = |s: &str| Some(std::ffi::OsString::from(s));
        let kernels = |base: &str| Some(PathBuf::from(base).join("lema").join("kernels"));
        assert_eq!(
            default_cache_dir(os("/xdg"), os("/home/u")),
            kernels("/xdg")
        );
        // an empty XDG_CACHE_HOME counts as unset (XDG Base Directory spec)
        assert_eq!(
            default_cache_dir(os(""), os("/home/u")),
            kernels("/home/u/.cache")
        );
        assert_eq!(
            default_cache_dir(None, os("/home/u")),
            kernels("/home/u/.cache")
        );
        assert_eq!(default_cache_dir(None, None), None);
        assert_eq!(default_cache_dir(os("/xdg"), None), kernels("/xdg"));
        let d = KernelCache::Dir(PathBuf::from("/x")).dir();
        assert_eq!(d, Some(PathBuf::from("/x")));
        assert_eq!(KernelCache::Off.dir(), None);
    }
}
