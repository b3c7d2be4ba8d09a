//! The DLPack protocol (`__dlpack__`, `__dlpack_device__`) over engine memory: a
//! [`Buffer`] is one LoRA master or gradient, and `torch.from_dlpack(buffer)` or
//! `numpy.from_dlpack(buffer)` gives an array that *is* that memory (no copy). The
//! capsule holds a reference to the engine, so the memory outlives the model object
//! while any array made from it is alive. Both the versioned capsule (DLPack ≥ 1.0,
//! `dltensor_versioned`) and the legacy one (`dltensor`) are made, as the consumer asks.
//! The layout follows dlpack.h (github.com/dmlc/dlpack), version 1.1.

use crate::engine::Shared;
use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use std::ffi::{CStr, c_void};
use std::sync::Arc;

const KDL_CPU: i32 = 1;
const KDL_CUDA: i32 = 2;
const KDL_FLOAT: u8 = 2;
const LEGACY_NAME: &CStr = c"dltensor";
const VERSIONED_NAME: &CStr = c"dltensor_versioned";

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

#[repr(C)]
struct DLPackVersion {
    major: u32,
    minor: u32,
}

#[repr(C)]
struct DLManagedTensorVersioned {
    version: DLPackVersion,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    flags: u64,
    dl_tensor: DLTensor,
}

/// What a capsule keeps alive: its shape and strides, and the engine.
struct Ctx {
    shape: [i64; 2],
    strides: [i64; 2],
    _engine: Arc<Shared>,
}

/// One f32 matrix of engine memory, shared through DLPack.
#[pyclass(module = "lema._lema", frozen)]
pub struct Buffer {
    pub engine: Arc<Shared>,
    pub name: String,
    pub address: usize,
    pub shape: [usize; 2],
    /// `None`: host memory; `Some(ordinal)`: CUDA device memory.
    pub cuda: Option<usize>,
}

impl Buffer {
    fn device(&self) -> DLDevice {
        match self.cuda {
            None => DLDevice {
                device_type: KDL_CPU,
                device_id: 0,
            },
            Some(o) => DLDevice {
                device_type: KDL_CUDA,
                device_id: o as i32,
            },
        }
    }

    fn tensor(&self, ctx: &mut Ctx) -> DLTensor {
        DLTensor {
            data: self.address as *mut c_void,
            device: self.device(),
            ndim: 2,
            dtype: DLDataType {
                code: KDL_FLOAT,
                bits: 32,
                lanes: 1,
            },
            shape: ctx.shape.as_mut_ptr(),
            strides: ctx.strides.as_mut_ptr(),
            byte_offset: 0,
        }
    }
}

#[pymethods]
impl Buffer {
    /// The DLPack capsule of this memory. `stream` (CUDA): the consumer's stream, which
    /// is made to wait for the engine's queued work (an event; -1: no ordering).
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__(
        &self,
        py: Python<'_>,
        stream: Option<i64>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        let dev = self.device();
        if copy == Some(true) {
            return Err(PyBufferError::new_err(format!(
                "{}: lema shares its memory and does not copy it (copy=True); copy the array after from_dlpack",
                self.name
            )));
        }
        if let Some((t, id)) = dl_device
            && (t, id) != (dev.device_type, dev.device_id)
        {
            return Err(PyBufferError::new_err(format!(
                "{}: the memory is on DLPack device ({}, {}), not ({t}, {id}); lema does not copy between devices",
                self.name, dev.device_type, dev.device_id
            )));
        }
        match (self.cuda, stream) {
            (None, Some(s)) if s != -1 => {
                return Err(PyBufferError::new_err(format!(
                    "{}: host memory takes no stream (got {s})",
                    self.name
                )));
            }
            (Some(_), Some(-1)) | (None, _) => {}
            (Some(_), s) => {
                let engine = self.engine.clone();
                let s = s.unwrap_or(1) as u64;
                crate::interrupt::detached(py, move || engine.lock()?.order_before(s))?;
            }
        }
        let mut ctx = Box::new(Ctx {
            shape: [self.shape[0] as i64, self.shape[1] as i64],
            strides: [self.shape[1] as i64, 1],
            _engine: self.engine.clone(),
        });
        let dl_tensor = self.tensor(&mut ctx);
        let ctx = Box::into_raw(ctx) as *mut c_void;
        let versioned = max_version.is_some_and(|(major, _)| major >= 1);
        // SAFETY: the capsule owns the managed tensor until a consumer renames it (and
        // then calls the deleter itself); `destroy_*` calls the deleter otherwise.
        let cap = unsafe {
            if versioned {
                let m = Box::into_raw(Box::new(DLManagedTensorVersioned {
                    version: DLPackVersion { major: 1, minor: 1 },
                    manager_ctx: ctx,
                    deleter: Some(delete_versioned),
                    flags: 0,
                    dl_tensor,
                }));
                ffi::PyCapsule_New(
                    m as *mut c_void,
                    VERSIONED_NAME.as_ptr(),
                    Some(destroy_versioned),
                )
            } else {
                let m = Box::into_raw(Box::new(DLManagedTensor {
                    dl_tensor,
                    manager_ctx: ctx,
                    deleter: Some(delete_legacy),
                }));
                ffi::PyCapsule_New(m as *mut c_void, LEGACY_NAME.as_ptr(), Some(destroy_legacy))
            }
        };
        // SAFETY: a new reference, or NULL with the Python error set
        unsafe { Bound::from_owned_ptr_or_err(py, cap) }.map(Bound::unbind)
    }

    /// `(device type, device id)` as DLPack numbers them (1: CPU, 2: CUDA).
    fn __dlpack_device__(&self) -> (i32, i32) {
        let d = self.device();
        (d.device_type, d.device_id)
    }

    /// The PEFT key of the tensor this memory belongs to.
    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// The address of the first element (host or device).
    #[getter]
    fn address(&self) -> usize {
        self.address
    }

    #[getter]
    fn shape(&self) -> (usize, usize) {
        (self.shape[0], self.shape[1])
    }

    fn __repr__(&self) -> String {
        format!(
            "Buffer({}, shape={:?}, {})",
            self.name,
            self.shape,
            match self.cuda {
                None => "cpu".to_string(),
                Some(o) => format!("cuda:{o}"),
            }
        )
    }
}

unsafe extern "C" fn delete_legacy(m: *mut DLManagedTensor) {
    if m.is_null() {
        return;
    }
    // SAFETY: made by `__dlpack__` from boxes, freed once (by the consumer or the capsule)
    unsafe {
        drop(Box::from_raw((*m).manager_ctx as *mut Ctx));
        drop(Box::from_raw(m));
    }
}

unsafe extern "C" fn delete_versioned(m: *mut DLManagedTensorVersioned) {
    if m.is_null() {
        return;
    }
    // SAFETY: as in `delete_legacy`
    unsafe {
        drop(Box::from_raw((*m).manager_ctx as *mut Ctx));
        drop(Box::from_raw(m));
    }
}

/// Capsule destructor: a capsule still named `dltensor` was never consumed, so its
/// managed tensor is freed here; a consumed one (`used_dltensor`) belongs to the consumer.
unsafe extern "C" fn destroy_legacy(cap: *mut ffi::PyObject) {
    // SAFETY: `cap` is a live capsule; IsValid sets no error
    unsafe {
        if ffi::PyCapsule_IsValid(cap, LEGACY_NAME.as_ptr()) == 1 {
            let m = ffi::PyCapsule_GetPointer(cap, LEGACY_NAME.as_ptr()) as *mut DLManagedTensor;
            delete_legacy(m);
        }
    }
}

unsafe extern "C" fn destroy_versioned(cap: *mut ffi::PyObject) {
    // SAFETY: as in `destroy_legacy`
    unsafe {
        if ffi::PyCapsule_IsValid(cap, VERSIONED_NAME.as_ptr()) == 1 {
            let m = ffi::PyCapsule_GetPointer(cap, VERSIONED_NAME.as_ptr())
                as *mut DLManagedTensorVersioned;
            delete_versioned(m);
        }
    }
}
