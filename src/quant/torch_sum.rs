//! torch's CPU sum of f32 values, in torch's own order, so that the mean bitsandbytes takes
//! of the absmax values (`absmax.mean()`, the double-quantization offset) comes out with the
//! same bits.
//!
//! torch (`aten/src/ATen/native/cpu/SumKernel.cpp`, `cascade_sum`) computes a mean on the
//! CPU as sum / n, the sum in f32: below 8 values a scalar `row_sum`, else `row_sum` over
//! 8-lane vectors (the AVX2 kernel, which x86-64 builds also run on AVX-512 machines), each
//! with 4 interleaved accumulators (`ilp_factor`) folded through 4 cascade levels
//! (`multi_row_sum`), then the scalar tail, then the 8 lanes. From 32768 values on, torch
//! splits the sum over its threads, so the last bits depend on the thread count; this is the
//! single-thread order (what bitsandbytes gives below 32768 blocks, or with one thread).
//! Checked against torch itself in tests/nf4.rs (`mean_*` in tests/data/nf4_reference.*).

/// Lanes of torch's `Vectorized<float>` in the sum kernel (AVX2).
const LANES: usize = 8;
/// Interleaved accumulators of `row_sum` (`ilp_factor`).
const ILP: usize = 4;
/// Cascade levels of `multi_row_sum` (`num_levels`).
const LEVELS: usize = 4;

/// The f32 mean of `x` as torch computes it on the CPU (single-threaded order).
pub fn torch_mean(x: &[f32]) -> f32 {
    torch_sum(x) / x.len() as f32
}

/// The f32 sum of `x` in torch's CPU order (single-threaded).
pub fn torch_sum(x: &[f32]) -> f32 {
    // the output starts at 0 and the kernel adds its result to it
    if x.len() < LANES {
        return 0.0 + row_sum::<1>(|i| [x[i]], x.len())[0];
    }
    let vectors = x.len() / LANES;
    let lanes = row_sum::<LANES>(|i| std::array::from_fn(|l| x[i * LANES + l]), vectors);
    let mut acc = 0.0f32;
    for &v in &x[vectors * LANES..] {
        acc += v;
    }
    for l in lanes {
        acc += l;
    }
    0.0 + acc
}

fn add<const W: usize>(acc: &mut [f32; W], v: &[f32; W]) {
    for (a, b) in acc.iter_mut().zip(v) {
        *a += b;
    }
}

/// `CeilLog2` of torch's cpu/utils.h.
fn ceil_log2(x: usize) -> u32 {
    if x <= 2 {
        1
    } else {
        usize::BITS - (x - 1).leading_zeros()
    }
}

/// torch's `row_sum`: `size` elements (each `W` lanes), seen as rows of `ILP`.
fn row_sum<const W: usize>(load: impl Fn(usize) -> [f32; W], size: usize) -> [f32; W] {
    let rows = size / ILP;
    let mut partial = multi_row_sum(&load, rows);
    let (first, rest) = partial.split_at_mut(1);
    for i in rows * ILP..size {
        add(&mut first[0], &load(i));
    }
    for p in rest.iter() {
        add(&mut first[0], p);
    }
    partial[0]
}

/// torch's `multi_row_sum`: column sums of `rows` rows of `ILP` elements through cascade
/// levels (each level takes the one below every `2^level_power` rows).
fn multi_row_sum<const W: usize>(
    load: &impl Fn(usize) -> [f32; W],
    rows: usize,
) -> [[f32; W]; ILP] {
    let level_power = 4.max(ceil_log2(rows) / LEVELS as u32);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0.0f32; W]; ILP]; LEVELS];
    let add_row = |acc: &mut [[f32; W]; ILP], i: usize| {
        for (k, a) in acc.iter_mut().enumerate() {
            add(a, &load(i * ILP + k));
        }
    };
    let mut i = 0;
    while i + level_step <= rows {
        for _ in 0..level_step {
            add_row(&mut acc[0], i);
            i += 1;
        }
        for j in 1..LEVELS {
            let (lower, upper) = acc.split_at_mut(j);
            for (hi, lo) in upper[0].iter_mut().zip(lower[j - 1].iter_mut()) {
                add(hi, lo);
                *lo = [0.0; W];
            }
            if i & (level_mask << (j as u32 * level_power)) != 0 {
                break;
            }
        }
    }
    while i < rows {
        add_row(&mut acc[0], i);
        i += 1;
    }
    let (first, rest) = acc.split_at_mut(1);
    for level in rest.iter() {
        for (a, u) in first[0].iter_mut().zip(level) {
            add(a, u);
        }
    }
    acc[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_eight_values_the_four_accumulators_meet_at_the_end() {
        // [a, b, c, d, e]: (((0 + a) + e) + b) + c) + d — e joins a before b, c, d do
        let x = [1.0, 1e8, -1e8, 0.5, 3.0];
        let order = ((((0.0f32 + 1.0) + 3.0) + 1e8) + -1e8) + 0.5;
        assert_eq!(torch_sum(&x).to_bits(), order.to_bits());
        assert_ne!(order, x.iter().fold(0.0f32, |a, b| a + b));
    }

    #[test]
    fn from_eight_values_lanes_then_tail() {
        // 9 values: lane l holds x[l]; the tail x[8] is added before the lanes
        let mut x = [0.0f32; 9];
        x[0] = 1e8;
        x[1] = -1e8;
        x[8] = 1.0;
        assert_eq!(torch_sum(&x), ((0.0f32 + 1.0) + 1e8) - 1e8);
    }

    #[test]
    fn ceil_log2_as_torch() {
        let got: Vec<u32> = [0, 1, 2, 3, 4, 5, 16, 17].map(ceil_log2).to_vec();
        assert_eq!(got, [1, 1, 1, 2, 2, 3, 4, 5]);
    }
}
