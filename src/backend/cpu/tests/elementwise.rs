//! Memory, elementwise and row ops against direct loops.

use super::util::*;
use crate::backend::cpu::CpuBackend;
use crate::backend::{Accumulate, Backend, DType};

#[test]
fn upload_weight_decodes_every_dtype() {
    let vals = [1.5f32, -2.25, 0.0, 65504.0, 3.0e-3];
    let be = CpuBackend::<f64>::new();
    let f32_bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let f16_bytes: Vec<u8> = vals
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect();
    let bf16_bytes: Vec<u8> = vals
        .iter()
        .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
        .collect();
    let cases = [
        (DType::F32, f32_bytes, vals.map(|v| v as f64)),
        (
            DType::F16,
            f16_bytes,
            vals.map(|v| half::f16::from_f32(v).to_f64()),
        ),
        (
            DType::BF16,
            bf16_bytes,
            vals.map(|v| half::bf16::from_f32(v).to_f64()),
        ),
    ];
    for (dtype, bytes, want) in cases {
        let b = be.upload_weight(&bytes, dtype).unwrap();
        assert_eq!(b.0, want, "{dtype}");
    }
    // Larger than the decoder's scratch, to cross its chunk boundary.
    let big: Vec<f32> = (0..40_000).map(|i| i as f32 * 0.5).collect();
    let bytes: Vec<u8> = big.iter().flat_map(|v| v.to_le_bytes()).collect();
    let be32 = CpuBackend::<f32>::new();
    let b = be32.upload_weight(&bytes, DType::F32).unwrap();
    assert_eq!(be32.download(&b).unwrap(), big);
}

#[test]
fn axpy_bias_copy_cols_and_sum_squares_match_loops() {
    let mut rng = Rng::new(70);
    let be = be64();
    let (rows, cols) = (5, 6);
    let (x, y0, bias) = (
        rng.vec(rows * cols, 1.0),
        rng.vec(rows * cols, 1.0),
        rng.vec(cols, 1.0),
    );

    let mut y = buf(&y0);
    be.axpy(&mut y, 0.5, &buf(&x), Accumulate::Add).unwrap();
    let want: Vec<f64> = y0.iter().zip(&x).map(|(y, x)| y + 0.5 * x).collect();
    assert_close("axpy add", &y.0, &want, 1e-15, 0.0);
    be.axpy(&mut y, -2.0, &buf(&x), Accumulate::Overwrite)
        .unwrap();
    let want: Vec<f64> = x.iter().map(|x| -2.0 * x).collect();
    assert_close("axpy overwrite", &y.0, &want, 1e-15, 0.0);

    let mut xb = buf(&x);
    be.add_bias(&mut xb, &buf(&bias)).unwrap();
    let want: Vec<f64> = x
        .iter()
        .enumerate()
        .map(|(i, x)| x + bias[i % cols])
        .collect();
    assert_close("add_bias", &xb.0, &want, 1e-15, 0.0);

    // dst [rows, 6] columns 3..5 (=|+=) src [rows, 4] columns 1..3
    let src = rng.vec(rows * 4, 1.0);
    for acc in [Accumulate::Overwrite, Accumulate::Add] {
        let mut dst = buf(&y0);
        be.copy_cols(&mut dst, cols, 3, &buf(&src), 4, 1, 2, acc)
            .unwrap();
        let mut want = y0.clone();
        for r in 0..rows {
            for j in 0..2 {
                let s = src[r * 4 + 1 + j];
                let d = &mut want[r * cols + 3 + j];
                *d = if acc == Accumulate::Add { *d + s } else { s };
            }
        }
        assert_close(&format!("copy_cols {acc:?}"), &dst.0, &want, 1e-15, 0.0);
    }

    let big = rng.vec(50_000, 3.0);
    let ss = be.sum_squares(&buf(&big)).unwrap();
    let want: f64 = big.iter().map(|v| v * v).sum();
    assert_close("sum_squares", &[ss], &[want], 1e-12, 0.0);
}

#[test]
fn embedding_forward_matches_indexing() {
    let mut rng = Rng::new(71);
    let be = be64();
    let (v, c) = (9, 5);
    let table = rng.vec(v * c, 1.0);
    let ids: Vec<u32> = (0..12).map(|_| rng.below(v) as u32).collect();
    let out0 = rng.vec(ids.len() * c, 1.0);
    for acc in [Accumulate::Overwrite, Accumulate::Add] {
        let mut out = buf(&out0);
        be.embedding_forward(&mut out, &ids, &buf(&table), c, acc)
            .unwrap();
        let mut want = vec![0.0; out0.len()];
        for (i, &id) in ids.iter().enumerate() {
            for j in 0..c {
                let base = if acc == Accumulate::Add {
                    out0[i * c + j]
                } else {
                    0.0
                };
                want[i * c + j] = base + table[id as usize * c + j];
            }
        }
        assert_close(&format!("embedding {acc:?}"), &out.0, &want, 1e-15, 0.0);
    }
}
