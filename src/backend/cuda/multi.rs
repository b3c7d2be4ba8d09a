//! Multi-tensor launches: one kernel over many small tensors (a step's hundreds of LoRA
//! parameters, gradients and moments) instead of one launch each, whose fixed cost is
//! most of the time at that size and keeps the GPU waiting for the host.
//!
//! The host writes a table — per tensor its device pointers, its length and the first grid
//! block it gets — and uploads it with one copy. Each block of the kernel finds its tensor
//! (`tensor_block` in common.cuh: a binary search over the first blocks) and covers the
//! share of it that block j of a launch of nb blocks over that tensor alone would cover
//! (`BLOCK_STRIDE`). So a per-tensor kernel and its multi-tensor twin share their
//! arithmetic (a `__device__` function) and, where it matters (the partial sums of
//! `sum_squares_partial`), their partition of each tensor: the results are the same bits.

use super::CudaBackend;
use super::device::{Arg, Device, Launch, Module, err};
use crate::error::Result;

/// Threads per block of the multi-tensor kernels.
pub(super) const BLOCK: u32 = 256;

/// Elements each block of an elementwise multi-tensor kernel covers (8 a thread): enough to
/// amortise the block's search for its tensor.
const ELEMS_PER_BLOCK: usize = 8 * BLOCK as usize;

/// The most blocks one tensor gets; past that they stride over it.
const MAX_BLOCKS_PER_TENSOR: usize = 65535;

/// Blocks of an elementwise multi-tensor kernel for a tensor of `n` elements.
pub(super) fn elementwise_blocks(n: usize) -> usize {
    n.div_ceil(ELEMS_PER_BLOCK).min(MAX_BLOCKS_PER_TENSOR)
}

/// The tensors of one multi-tensor launch, each with `K` device pointers. Its device form,
/// as the kernels take it (`const i64* first_block, const i64* lens, const u64* ptrs, int
/// count`): `first_block[t]` the first grid block of tensor t (`count + 1` entries, the
/// last the grid size), `lens[t]` its length, `ptrs[K·t .. K·t + K]` its pointers.
pub(super) struct TensorTable<const K: usize> {
    first_block: Vec<i64>,
    lens: Vec<i64>,
    ptrs: Vec<u64>,
}

impl<const K: usize> TensorTable<K> {
    pub fn new() -> Self {
        TensorTable {
            first_block: vec![0],
            lens: Vec::new(),
            ptrs: Vec::new(),
        }
    }

    /// Add a tensor of `n` elements at `ptrs`, covered by `blocks` blocks. A tensor without
    /// elements or blocks is left out (a kernel never sees an empty one).
    pub fn push(&mut self, ptrs: [u64; K], n: usize, blocks: usize) {
        if n == 0 || blocks == 0 {
            return;
        }
        self.first_block.push(self.blocks() as i64 + blocks as i64);
        self.lens.push(n as i64);
        self.ptrs.extend_from_slice(&ptrs);
    }

    /// The grid's blocks: those of every tensor.
    pub fn blocks(&self) -> usize {
        self.first_block.last().copied().unwrap_or(0) as usize
    }

    /// Upload the table and launch `kernel` of `m` over it: its arguments are the table's
    /// four, then `args`. Nothing is launched for a table without tensors.
    pub fn launch(
        &self,
        be: &CudaBackend,
        op: &'static str,
        m: Module,
        kernel: &'static str,
        args: &[Arg],
    ) -> Result<()> {
        let count = self.lens.len();
        if count == 0 {
            return Ok(());
        }
        let count_arg = i32::try_from(count)
            .map_err(|_| err(op, format!("{count} tensors are too many for one launch")))?;
        let words = self.first_block.iter().chain(&self.lens).map(|&v| v as u64);
        let bytes: Vec<u8> = words
            .chain(self.ptrs.iter().copied())
            .flat_map(u64::to_ne_bytes)
            .collect();
        // A copy from pageable memory: the driver has taken the bytes when it returns, so
        // `bytes` may go; the table's device memory is freed in stream order after the
        // kernel (as every small upload of the backend).
        let table = be.upload_bytes(op, &bytes)?;
        let base = Device::ptr(&table);
        let mut all = vec![
            Arg::Ptr(base),
            Arg::Ptr(base + 8 * (count as u64 + 1)),
            Arg::Ptr(base + 8 * (2 * count as u64 + 1)),
            Arg::I32(count_arg),
        ];
        all.extend_from_slice(args);
        let l = Launch {
            grid: (self.blocks(), 1, 1),
            block: BLOCK,
            shared_bytes: 0,
        };
        be.dev.launch(op, m, kernel, l, &all)
    }
}
