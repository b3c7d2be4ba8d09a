//! Sequence tiles bound a block's working set (issue 14, item 1), measured on the CPU:
//! every byte the process allocates is counted (a counting global allocator; this binary
//! holds one test so that nothing else allocates meanwhile), and the peak of a training
//! step above what the model holds before it is compared untiled and tiled, and against
//! the engine's own estimate (`Model::token_bytes`) that chooses automatic tiles.
//!
//! The shape has an MLP 16× wider than the hidden size, so that the MLP's activations
//! (gate, up, act and their gradients) dominate an untiled block as they do at long
//! sequences of real models.

use lema::bench::Shape;
use lema::{Batch, Device, LemaConfig, LemaModel, OptimizerConfig, Strategy, Trainer};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = NOW.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            let now = NOW.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        NOW.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

const SEQ: usize = 2048;
const TILE: usize = 256;

/// Peak bytes allocated during one training step above those held before it, after a
/// warm-up step (pools, thread-locals), with `seq_tile`.
fn step_peak(model_path: &std::path::Path, seq_tile: usize) -> (usize, f64) {
    let mut cfg = LemaConfig::new(model_path);
    cfg.device = Device::Cpu;
    cfg.strategy = Strategy::Resident;
    cfg.lora_rank = 4;
    cfg.lora_target_modules = Some(vec!["all-linear".into()]);
    cfg.seq_tile = Some(seq_tile);
    let mut model = LemaModel::new(cfg).unwrap();
    model.initialize_lora().unwrap();
    let mut t = Trainer::new(model, OptimizerConfig::sgd(0.1, 0.0)).unwrap();
    let ids: Vec<u32> = (0..SEQ as u32).map(|i| (i * 7919) % 256).collect();
    let batch = Batch::language_modeling(ids, 1, SEQ).unwrap();
    t.train_step(&batch).unwrap();
    let before = NOW.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let loss = t.train_step(&batch).unwrap().loss;
    (PEAK.load(Ordering::Relaxed) - before, loss)
}

#[test]
fn tiles_bound_the_working_set_of_a_step() {
    let shape = Shape {
        name: "wide-mlp".into(),
        gpt2: false,
        vocab: 256,
        hidden: 128,
        intermediate: 2048,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        max_positions: SEQ,
        tied: false,
    };
    let dir = tempfile::tempdir().unwrap();
    let path =
        lema::bench::write_random_model(dir.path(), &shape, lema::backend::DType::F32, 3, 0.02)
            .unwrap();
    let (untiled, loss0) = step_peak(&path, 0);
    let (tiled, loss1) = step_peak(&path, TILE);
    // f32 rounding of the LoRA gradients' per-tile sums, after one SGD step
    assert!(
        ((loss1 - loss0) / loss0).abs() < 1e-5,
        "losses {loss0} and {loss1}"
    );
    // the engine's estimate: whole-call tensors per token, and the tile's per row
    let cfg = lema::config::ModelConfig::from_file(&dir.path().join("config.json")).unwrap();
    let per = lema::model::Model::new(cfg).token_bytes();
    let (whole, tile) = (per.whole as usize, per.tile as usize);
    eprintln!(
        "peak above the model: untiled {:.1} MB, tiles of {TILE}: {:.1} MB; estimate \
         {:.1} KB a token whole-call + {:.1} KB a tile row",
        untiled as f64 / 1e6,
        tiled as f64 / 1e6,
        whole as f64 / 1e3,
        tile as f64 / 1e3
    );
    // what the tiles save is the MLP half's rows past one tile's, as estimated (the
    // estimate is an upper bound: it counts every buffer alive at once)
    let saved = untiled.saturating_sub(tiled);
    let estimate = (SEQ - TILE) * tile;
    assert!(
        saved > estimate / 2 && saved <= estimate,
        "tiles saved {saved} bytes, the estimate {estimate}"
    );
    // and the tiled step stays within the estimate of what it holds (the block's
    // whole-call tensors, one tile, the blocks' inputs and the head's rows: 4 × [N, C]),
    // plus the CPU attention backward's workspace, which is whole-call as attention is:
    // at most 32 query chunks a row, each with a partial dk and dv of at most
    // [N, KVH·D] f32 (src/backend/cpu/attention.rs, `chunks_per_row`)
    let kv_dim = shape.kv_heads * (shape.hidden / shape.heads);
    let attention_partials = 32.min(SEQ.div_ceil(64)) * SEQ * kv_dim * 2 * 4;
    let bound = SEQ * whole + TILE * tile + 4 * SEQ * shape.hidden * 4 + attention_partials;
    assert!(
        tiled <= bound,
        "the tiled step peaked at {tiled} bytes, above the estimate {bound}"
    );
}
