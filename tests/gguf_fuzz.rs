//! Property test of the GGUF header parser on hostile input: thousands of seeded random
//! mutations and truncations of a small valid file. The parser must never panic, must
//! only accept files whose tensor data lies inside the file, and must never allocate
//! much more than the file's own size (a lying count is rejected before allocating).
//!
//! A counting global allocator measures the peak live heap of the parsing thread.

use lema::import::gguf::{GgmlType, GgufHeader, MetaArray, MetaValue};
use lema::import::gguf_write::GgufBuilder;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;

struct Counting;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; the bookkeeping only
// touches const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = TRACKING.try_with(|t| {
            if t.get() {
                let live = LIVE.with(|l| {
                    l.set(l.get() + layout.size());
                    l.get()
                });
                PEAK.with(|p| p.set(p.get().max(live)));
            }
        });
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _ = TRACKING.try_with(|t| {
            if t.get() {
                LIVE.with(|l| l.set(l.get().saturating_sub(layout.size())));
            }
        });
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Peak live heap bytes allocated by `f` on this thread.
fn peak_heap<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    TRACKING.with(|t| t.set(true));
    let out = f();
    TRACKING.with(|t| t.set(false));
    (out, PEAK.with(Cell::get))
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn sample() -> Vec<u8> {
    GgufBuilder::new()
        .kv("general.architecture", MetaValue::String("llama".into()))
        .kv("general.alignment", MetaValue::U32(32))
        .kv("llama.block_count", MetaValue::U32(1))
        .kv("f", MetaValue::F32(0.5))
        .kv("b", MetaValue::Bool(true))
        .kv("i64", MetaValue::I64(-7))
        .kv(
            "tokenizer.ggml.tokens",
            MetaValue::Array(MetaArray::String(
                ["<s>", "a", "b", "ab", "Ġ", "ü"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            )),
        )
        .kv(
            "tokenizer.ggml.token_type",
            MetaValue::Array(MetaArray::I32(vec![3, 1, 1, 1, 1, 1])),
        )
        .kv(
            "tokenizer.ggml.scores",
            MetaValue::Array(MetaArray::F32(vec![0.0; 6])),
        )
        .kv("u16s", MetaValue::Array(MetaArray::U16(vec![1, 2, 3])))
        .tensor_f32("token_embd.weight", &[4, 6], &[0.5; 24])
        .tensor(
            "blk.0.attn_q.weight",
            &[32, 2],
            GgmlType::Q4_0,
            vec![0x88; 36],
        )
        .tensor(
            "blk.0.ffn_down.weight",
            &[256],
            GgmlType::Q6_K,
            vec![1; 210],
        )
        .build()
}

const INTERESTING: [u64; 8] = [
    0,
    1,
    u64::MAX,
    u64::MAX / 2,
    1 << 32,
    1 << 40,
    0xFFFF_FFFF,
    0x7FFF_FFFF_FFFF_FFFF,
];

fn mutate(rng: &mut Rng, base: &[u8]) -> Vec<u8> {
    let mut b = base.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(6) {
            0 => {
                // Flip some bytes.
                for _ in 0..1 + rng.below(8) {
                    let i = rng.below(b.len());
                    if let Some(x) = b.get_mut(i) {
                        *x ^= 1 << rng.below(8);
                    }
                }
            }
            1 => {
                // Overwrite a u64 or u32 with an interesting value (lying counts, lengths).
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let width = if rng.below(2) == 0 { 8 } else { 4 };
                let at = rng.below(b.len().saturating_sub(width));
                if let Some(dst) = b.get_mut(at..at + width) {
                    dst.copy_from_slice(&v.to_le_bytes()[..width]);
                }
            }
            2 => {
                // Truncate.
                let n = rng.below(b.len() + 1);
                b.truncate(n);
            }
            3 => {
                // Delete a range.
                let at = rng.below(b.len());
                let n = rng.below(16).min(b.len() - at.min(b.len()));
                b.drain(at..at + n);
            }
            4 => {
                // Insert random bytes.
                let at = rng.below(b.len() + 1);
                let n = 1 + rng.below(16);
                let ins: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                b.splice(at..at, ins);
            }
            _ => {
                // Set one byte to a random value.
                let i = rng.below(b.len());
                if let Some(x) = b.get_mut(i) {
                    *x = rng.next() as u8;
                }
            }
        }
        if b.is_empty() {
            break;
        }
    }
    b
}

/// Parse, check what an accepted header promises, and return the peak heap.
fn check(bytes: &[u8], what: &str) -> (bool, usize) {
    let path = Path::new("fuzz.gguf");
    let (result, peak) = peak_heap(|| GgufHeader::parse(bytes, path));
    let ok = match result {
        Ok(h) => {
            assert!(matches!(h.version, 2 | 3), "{what}: version {}", h.version);
            assert!(h.alignment.is_power_of_two(), "{what}");
            for t in &h.tensors {
                let end = h
                    .data_offset
                    .checked_add(t.offset)
                    .and_then(|s| s.checked_add(t.n_bytes));
                assert!(
                    end.is_some_and(|e| e <= bytes.len() as u64),
                    "{what}: tensor '{}' accepted with data outside the file",
                    t.name
                );
                assert_eq!(t.offset % h.alignment, 0, "{what}");
            }
            // The converters must not panic on whatever the parser accepts.
            let _ = lema::import::gguf_convert::GgufPlan::new(&h, path, None);
            let _ = lema::import::gguf_tokenizer::from_gguf(&h, path, None);
            true
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.starts_with("fuzz.gguf"),
                "{what}: message does not name the file: {msg}"
            );
            false
        }
    };
    // Legitimate decoding needs at most a few times the file size (e.g. 24-byte String
    // headers for 8-byte length prefixes); anything bigger means a count was trusted.
    let bound = 8 * bytes.len() + 64 * 1024;
    assert!(
        peak <= bound,
        "{what}: parsing {} bytes peaked at {peak} bytes of heap (bound {bound})",
        bytes.len()
    );
    (ok, peak)
}

#[test]
fn the_sample_parses() {
    let base = sample();
    let (ok, peak) = check(&base, "unmutated");
    assert!(ok);
    assert!(peak > 0, "the allocator should have counted something");
}

#[test]
fn every_truncation_is_rejected_or_consistent() {
    let base = sample();
    let mut accepted = 0;
    for n in 0..base.len() {
        if check(&base[..n], &format!("truncated to {n}")).0 {
            accepted += 1;
        }
    }
    // Only cuts inside the final padding can still be valid.
    assert!(accepted < 32, "{accepted} truncations accepted");
}

#[test]
fn seeded_random_mutations_never_panic_or_overallocate() {
    let base = sample();
    let mut accepted = 0usize;
    let mut rejected = 0usize;
    let mut max_peak = 0usize;
    for seed in 0..20_000u64 {
        let mut rng = Rng(seed);
        let bytes = mutate(&mut rng, &base);
        let (ok, peak) = check(&bytes, &format!("seed {seed}"));
        max_peak = max_peak.max(peak);
        if ok {
            accepted += 1;
        } else {
            rejected += 1;
        }
    }
    println!("mutations: {accepted} accepted, {rejected} rejected, peak heap {max_peak} bytes");
    // Both outcomes must occur, or the mutations are not exercising the parser.
    assert!(
        accepted > 100 && rejected > 1000,
        "{accepted} accepted, {rejected} rejected"
    );
}

#[test]
fn lying_counts_fail_fast_without_allocating() {
    // A header claiming 2^60 tensors, then 2^60 metadata entries, then a 2^60-element
    // array: each must be refused with a tiny heap.
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((1u64 << 60).to_le_bytes());
    b.extend(0u64.to_le_bytes());
    let (_, peak) = check(&b, "2^60 tensors");
    assert!(peak < 4096, "{peak}");

    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(3u64.to_le_bytes());
    b.extend(b"arr");
    b.extend(9u32.to_le_bytes()); // array
    b.extend(8u32.to_le_bytes()); // of strings
    b.extend((1u64 << 60).to_le_bytes());
    b.extend([0u8; 64]);
    let (ok, peak) = check(&b, "2^60 strings");
    assert!(!ok);
    assert!(peak < 4096, "{peak}");
}
