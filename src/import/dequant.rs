//! Dequantization of ggml tensor data to f32, value for value as llama.cpp's
//! `dequantize_row_*` reference functions in `ggml-quants.c`.
//!
//! Block layouts (all little-endian, `f16` = IEEE half):
//! * `Q8_0`  (32 values, 34 B): d: f16, qs: [i8; 32]               → d·q
//! * `Q4_0`  (32 values, 18 B): d: f16, qs: [u8; 16]               → d·(nibble − 8)
//! * `Q4_1`  (32 values, 20 B): d: f16, m: f16, qs: [u8; 16]       → d·nibble + m
//! * `Q5_0`  (32 values, 22 B): d: f16, qh: u32, qs: [u8; 16]      → d·(nibble | hbit<<4 − 16)
//! * `Q5_1`  (32 values, 24 B): d: f16, m: f16, qh: u32, qs: [u8; 16] → d·(nibble | hbit<<4) + m
//!
//!   In the 32-value types, low nibbles hold values 0..16 and high nibbles 16..32; bit `j`
//!   of `qh` is the fifth bit of value `j`.
//! * `Q4_K` (256 values, 144 B): d, dmin: f16, scales: [u8; 12], qs: [u8; 128]
//! * `Q5_K` (256 values, 176 B): d, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]
//!
//!   Eight sub-blocks of 32 values, each with a 6-bit scale and 6-bit min packed in
//!   `scales` (see `scale_min_k4`); value = d·scale·q − dmin·min.
//! * `Q6_K` (256 values, 210 B): ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16
//!
//!   Sixteen sub-blocks of 16 values; value = d·scale·(q − 32), q six bits.

use super::gguf::GgmlType;
use std::fmt;

/// Why a dequantization could not run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DequantError {
    /// The type has no dequantizer here.
    Unsupported(GgmlType),
    /// Input and output sizes disagree.
    Length {
        ty: GgmlType,
        bytes: usize,
        values: usize,
    },
}

impl fmt::Display for DequantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DequantError::Unsupported(ty) => write!(
                f,
                "ggml type {ty} cannot be dequantized by lema (supported: {})",
                SUPPORTED
                    .iter()
                    .map(|t| t.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            DequantError::Length { ty, bytes, values } => write!(
                f,
                "{bytes} bytes of {ty} data do not hold exactly {values} values \
                 ({} values per {}-byte block)",
                ty.block_size(),
                ty.block_bytes()
            ),
        }
    }
}

impl std::error::Error for DequantError {}

/// The types [`dequantize`] handles.
pub const SUPPORTED: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Whether [`dequantize`] handles `ty`.
pub fn is_supported(ty: GgmlType) -> bool {
    SUPPORTED.contains(&ty)
}

/// Decode `src` (whole blocks of type `ty`) into `dst`, which must have exactly as many
/// values as `src` encodes.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), DequantError> {
    if !is_supported(ty) {
        return Err(DequantError::Unsupported(ty));
    }
    let bs = ty.block_size() as usize;
    let bb = ty.block_bytes() as usize;
    let n_blocks = src.len() / bb;
    if !src.len().is_multiple_of(bb) || n_blocks.checked_mul(bs) != Some(dst.len()) {
        return Err(DequantError::Length {
            ty,
            bytes: src.len(),
            values: dst.len(),
        });
    }
    let blocks = src.chunks_exact(bb).zip(dst.chunks_exact_mut(bs));
    match ty {
        GgmlType::F32 => blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes(le4(b, 0))),
        GgmlType::F16 => blocks.for_each(|(b, y)| y[0] = f16_at(b, 0)),
        GgmlType::BF16 => {
            blocks.for_each(|(b, y)| y[0] = half::bf16::from_le_bytes(le2(b, 0)).to_f32())
        }
        GgmlType::Q8_0 => blocks.for_each(|(b, y)| q8_0(b, y)),
        GgmlType::Q4_0 => blocks.for_each(|(b, y)| q4_0(b, y)),
        GgmlType::Q4_1 => blocks.for_each(|(b, y)| q4_1(b, y)),
        GgmlType::Q5_0 => blocks.for_each(|(b, y)| q5_0(b, y)),
        GgmlType::Q5_1 => blocks.for_each(|(b, y)| q5_1(b, y)),
        GgmlType::Q4_K => blocks.for_each(|(b, y)| q4_k(b, y)),
        GgmlType::Q5_K => blocks.for_each(|(b, y)| q5_k(b, y)),
        GgmlType::Q6_K => blocks.for_each(|(b, y)| q6_k(b, y)),
        other => return Err(DequantError::Unsupported(other)),
    }
    Ok(())
}

// The block helpers below take slices of exactly one block (`chunks_exact` guarantees the
// length), so their fixed indices are in bounds by construction.

fn le2(b: &[u8], at: usize) -> [u8; 2] {
    [b[at], b[at + 1]]
}

fn le4(b: &[u8], at: usize) -> [u8; 4] {
    [b[at], b[at + 1], b[at + 2], b[at + 3]]
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes(le2(b, at)).to_f32()
}

fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (yj, &q) in y.iter_mut().zip(&b[2..34]) {
        *yj = f32::from(q as i8) * d;
    }
}

fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    let (lo, hi) = y.split_at_mut(16);
    for j in 0..16 {
        lo[j] = (i32::from(qs[j] & 0x0F) - 8) as f32 * d;
        hi[j] = (i32::from(qs[j] >> 4) - 8) as f32 * d;
    }
}

fn q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    let (lo, hi) = y.split_at_mut(16);
    for j in 0..16 {
        lo[j] = f32::from(qs[j] & 0x0F) * d + m;
        hi[j] = f32::from(qs[j] >> 4) * d + m;
    }
}

fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes(le4(b, 2));
    let qs = &b[6..22];
    let (lo, hi) = y.split_at_mut(16);
    for j in 0..16 {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        lo[j] = (i32::from((qs[j] & 0x0F) | h0) - 16) as f32 * d;
        hi[j] = (i32::from((qs[j] >> 4) | h1) - 16) as f32 * d;
    }
}

fn q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes(le4(b, 4));
    let qs = &b[8..24];
    let (lo, hi) = y.split_at_mut(16);
    for j in 0..16 {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        lo[j] = f32::from((qs[j] & 0x0F) | h0) * d + m;
        hi[j] = f32::from((qs[j] >> 4) | h1) * d + m;
    }
}

/// Scale and min of sub-block `j` (0..8) from the 12 packed bytes of a `Q4_K`/`Q5_K`
/// block: sub-blocks 0..4 use the low 6 bits of bytes `j` and `j+4`; sub-blocks 4..8
/// combine a nibble of byte `j+4` with the top two bits of bytes `j-4` and `j`.
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

fn q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    // Four groups of 64 values: 32 from the low nibbles of 32 bytes, 32 from the high.
    for (g, (q, out)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * g, scales);
        let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
        let (d1, m1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), dmin * f32::from(m2));
        let (lo, hi) = out.split_at_mut(32);
        for l in 0..32 {
            lo[l] = d1 * f32::from(q[l] & 0x0F) - m1;
            hi[l] = d2 * f32::from(q[l] >> 4) - m2;
        }
    }
}

fn q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (g, (q, out)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * g, scales);
        let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
        let (d1, m1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), dmin * f32::from(m2));
        // Group g takes its fifth bits from bits 2g and 2g+1 of qh[l].
        let u1 = 1u8 << (2 * g);
        let u2 = 2u8 << (2 * g);
        let (lo, hi) = out.split_at_mut(32);
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            lo[l] = d1 * f32::from((q[l] & 0x0F) + h1) - m1;
            hi[l] = d2 * f32::from((q[l] >> 4) + h2) - m2;
        }
    }
}

fn q6_k(b: &[u8], y: &mut [f32]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let sc = &b[192..208];
    let d = f16_at(b, 208);
    // Two halves of 128 values, each from 64 bytes of ql, 32 of qh and 8 scales.
    for (n, out) in y.chunks_exact_mut(128).enumerate() {
        let ql = &ql[64 * n..64 * n + 64];
        let qh = &qh[32 * n..32 * n + 32];
        let sc = &sc[8 * n..8 * n + 8];
        for l in 0..32 {
            let is = l / 16;
            let q1 = i32::from((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32;
            let q2 = i32::from((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
            let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            out[l] = d * f32::from(sc[is] as i8) * q1 as f32;
            out[l + 32] = d * f32::from(sc[is + 2] as i8) * q2 as f32;
            out[l + 64] = d * f32::from(sc[is + 4] as i8) * q3 as f32;
            out[l + 96] = d * f32::from(sc[is + 6] as i8) * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    //! Each test packs logical values (scales, mins, quants) into a block by the layout
    //! in the module documentation and compares the dequantized output with the formula
    //! evaluated in f64 on those logical values, never with the code under test.
    use super::*;
    use half::f16;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        /// A finite f16 in [-4, 4), sometimes an extreme or zero.
        fn half(&mut self) -> f16 {
            match self.below(8) {
                0 => f16::from_f32(-2.0),
                1 => f16::from_f32(0.0),
                2 => f16::MAX,
                _ => f16::from_f32((self.below(1 << 16) as f32 / 8192.0) - 4.0),
            }
        }
    }

    /// Within a few f32 ulps of the terms that were combined.
    fn assert_close(got: &[f32], want: &[f64], scale: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
            assert!(
                g.is_finite() || !w.is_finite(),
                "{what}[{i}]: got {g}, want {w}"
            );
            let tol = 4.0 * f64::from(f32::EPSILON) * s.abs().max(f64::from(f32::MIN_POSITIVE));
            assert!(
                (f64::from(g) - w).abs() <= tol,
                "{what}[{i}]: got {g}, want {w} (tol {tol})"
            );
        }
    }

    fn run(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; n];
        let r = dequantize(ty, bytes, &mut out);
        assert_eq!(r, Ok(()), "{ty}");
        out
    }

    #[test]
    fn plain_types() {
        let vals = [0.0f32, -1.5, 3.25, f32::MIN_POSITIVE, -65504.0, 1e-3];
        let f32_bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(run(GgmlType::F32, &f32_bytes, vals.len()), vals);
        let f16_bytes: Vec<u8> = vals
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect();
        let want: Vec<f32> = vals.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        assert_eq!(run(GgmlType::F16, &f16_bytes, vals.len()), want);
        // bf16 is the top half of an f32: build the bytes by shifting, not with `half`.
        let bf_bytes: Vec<u8> = vals
            .iter()
            .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
            .collect();
        let want: Vec<f32> = vals
            .iter()
            .map(|v| f32::from_bits(v.to_bits() & 0xFFFF_0000))
            .collect();
        assert_eq!(run(GgmlType::BF16, &bf_bytes, vals.len()), want);
    }

    #[test]
    fn q8_0() {
        let mut rng = Rng(1);
        for _ in 0..50 {
            let d = rng.half();
            let mut q: Vec<i8> = (0..32).map(|_| rng.below(256) as u8 as i8).collect();
            q[0] = -128;
            q[1] = 127;
            let mut b = d.to_le_bytes().to_vec();
            b.extend(q.iter().map(|&x| x as u8));
            let want: Vec<f64> = q
                .iter()
                .map(|&x| f64::from(x) * f64::from(d.to_f32()))
                .collect();
            assert_close(&run(GgmlType::Q8_0, &b, 32), &want, &want, "q8_0");
        }
    }

    /// Pack 32 four-bit values: byte j holds value j (low nibble) and value j+16 (high).
    fn pack_nibbles_32(q: &[u8]) -> Vec<u8> {
        (0..16).map(|j| q[j] | (q[j + 16] << 4)).collect()
    }

    /// The fifth bits of 32 five-bit values as a little-endian u32 (bit j = value j).
    fn pack_high_bits_32(q: &[u8]) -> [u8; 4] {
        let mut h = 0u32;
        for (j, &v) in q.iter().enumerate() {
            h |= u32::from(v >> 4) << j;
        }
        h.to_le_bytes()
    }

    fn nibble_quants(rng: &mut Rng, max: u64) -> Vec<u8> {
        let mut q: Vec<u8> = (0..32).map(|_| rng.below(max) as u8).collect();
        q[0] = 0;
        q[31] = (max - 1) as u8;
        q[16] = (max - 1) as u8;
        q
    }

    #[test]
    fn q4_0() {
        let mut rng = Rng(2);
        // Two blocks at once to check block stepping.
        for _ in 0..50 {
            let mut bytes = Vec::new();
            let mut want = Vec::new();
            for _ in 0..2 {
                let d = rng.half();
                let q = nibble_quants(&mut rng, 16);
                bytes.extend(d.to_le_bytes());
                bytes.extend(pack_nibbles_32(&q));
                want.extend(
                    q.iter()
                        .map(|&x| (f64::from(x) - 8.0) * f64::from(d.to_f32())),
                );
            }
            assert_close(&run(GgmlType::Q4_0, &bytes, 64), &want, &want, "q4_0");
        }
    }

    #[test]
    fn q4_1() {
        let mut rng = Rng(3);
        for _ in 0..50 {
            let (d, m) = (rng.half(), rng.half());
            let q = nibble_quants(&mut rng, 16);
            let mut b = d.to_le_bytes().to_vec();
            b.extend(m.to_le_bytes());
            b.extend(pack_nibbles_32(&q));
            let (df, mf) = (f64::from(d.to_f32()), f64::from(m.to_f32()));
            let want: Vec<f64> = q.iter().map(|&x| f64::from(x) * df + mf).collect();
            let scale: Vec<f64> = q
                .iter()
                .map(|&x| (f64::from(x) * df).abs() + mf.abs())
                .collect();
            assert_close(&run(GgmlType::Q4_1, &b, 32), &want, &scale, "q4_1");
        }
    }

    #[test]
    fn q5_0() {
        let mut rng = Rng(4);
        for _ in 0..50 {
            let d = rng.half();
            let q = nibble_quants(&mut rng, 32);
            let low: Vec<u8> = q.iter().map(|&x| x & 0x0F).collect();
            let mut b = d.to_le_bytes().to_vec();
            b.extend(pack_high_bits_32(&q));
            b.extend(pack_nibbles_32(&low));
            let want: Vec<f64> = q
                .iter()
                .map(|&x| (f64::from(x) - 16.0) * f64::from(d.to_f32()))
                .collect();
            assert_close(&run(GgmlType::Q5_0, &b, 32), &want, &want, "q5_0");
        }
    }

    #[test]
    fn q5_1() {
        let mut rng = Rng(5);
        for _ in 0..50 {
            let (d, m) = (rng.half(), rng.half());
            let q = nibble_quants(&mut rng, 32);
            let low: Vec<u8> = q.iter().map(|&x| x & 0x0F).collect();
            let mut b = d.to_le_bytes().to_vec();
            b.extend(m.to_le_bytes());
            b.extend(pack_high_bits_32(&q));
            b.extend(pack_nibbles_32(&low));
            let (df, mf) = (f64::from(d.to_f32()), f64::from(m.to_f32()));
            let want: Vec<f64> = q.iter().map(|&x| f64::from(x) * df + mf).collect();
            let scale: Vec<f64> = q
                .iter()
                .map(|&x| (f64::from(x) * df).abs() + mf.abs())
                .collect();
            assert_close(&run(GgmlType::Q5_1, &b, 32), &want, &scale, "q5_1");
        }
    }

    /// Pack eight 6-bit scales and mins into 12 bytes: sub-blocks 0..4 in the low six
    /// bits of bytes 0..4 (scales) and 4..8 (mins); sub-blocks 4..8 keep their low four
    /// bits in bytes 8..12 (scale low nibble, min high nibble) and their top two bits in
    /// the top bits of bytes 0..4 (scales) and 4..8 (mins).
    fn pack_scales_k4(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
        let mut s = [0u8; 12];
        for j in 0..4 {
            s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            s[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
            s[j + 8] = (sc[j + 4] & 0x0F) | ((m[j + 4] & 0x0F) << 4);
        }
        s
    }

    fn six_bit_set(rng: &mut Rng) -> [u8; 8] {
        let mut v = [0u8; 8];
        for x in v.iter_mut() {
            *x = rng.below(64) as u8;
        }
        v[rng.below(8) as usize] = 63;
        v
    }

    /// Expected K-quant values: value i is in sub-block i/32.
    fn k_expected(d: f16, dmin: f16, sc: &[u8; 8], m: &[u8; 8], q: &[u8]) -> (Vec<f64>, Vec<f64>) {
        let (d, dmin) = (f64::from(d.to_f32()), f64::from(dmin.to_f32()));
        let mut want = Vec::new();
        let mut scale = Vec::new();
        for (i, &qi) in q.iter().enumerate() {
            let a = d * f64::from(sc[i / 32]) * f64::from(qi);
            let b = dmin * f64::from(m[i / 32]);
            want.push(a - b);
            scale.push(a.abs() + b.abs() + (d * f64::from(sc[i / 32])).abs());
        }
        (want, scale)
    }

    /// 4-bit quants of a 256-value K block: value i (sub-block sb = i/32, l = i%32) sits
    /// in byte 32·(sb/2) + l, low nibble for even sb and high nibble for odd sb.
    fn pack_qs_k(q4: &[u8]) -> Vec<u8> {
        let mut qs = vec![0u8; 128];
        for (i, &v) in q4.iter().enumerate() {
            let (sb, l) = (i / 32, i % 32);
            qs[32 * (sb / 2) + l] |= if sb % 2 == 0 { v } else { v << 4 };
        }
        qs
    }

    #[test]
    fn q4_k() {
        let mut rng = Rng(6);
        for _ in 0..50 {
            let (d, dmin) = (rng.half(), rng.half());
            let (sc, m) = (six_bit_set(&mut rng), six_bit_set(&mut rng));
            let q: Vec<u8> = (0..256)
                .map(|i| if i % 37 == 0 { 15 } else { rng.below(16) as u8 })
                .collect();
            let mut b = d.to_le_bytes().to_vec();
            b.extend(dmin.to_le_bytes());
            b.extend(pack_scales_k4(&sc, &m));
            b.extend(pack_qs_k(&q));
            assert_eq!(b.len(), 144);
            let (want, scale) = k_expected(d, dmin, &sc, &m, &q);
            assert_close(&run(GgmlType::Q4_K, &b, 256), &want, &scale, "q4_k");
        }
    }

    #[test]
    fn q5_k() {
        let mut rng = Rng(7);
        for _ in 0..50 {
            let (d, dmin) = (rng.half(), rng.half());
            let (sc, m) = (six_bit_set(&mut rng), six_bit_set(&mut rng));
            let q: Vec<u8> = (0..256)
                .map(|i| if i % 41 == 0 { 31 } else { rng.below(32) as u8 })
                .collect();
            // Fifth bit of value i: bit sb (= i/32) of qh[i % 32].
            let mut qh = vec![0u8; 32];
            for (i, &v) in q.iter().enumerate() {
                qh[i % 32] |= (v >> 4) << (i / 32);
            }
            let low: Vec<u8> = q.iter().map(|&v| v & 0x0F).collect();
            let mut b = d.to_le_bytes().to_vec();
            b.extend(dmin.to_le_bytes());
            b.extend(pack_scales_k4(&sc, &m));
            b.extend(qh);
            b.extend(pack_qs_k(&low));
            assert_eq!(b.len(), 176);
            let (want, scale) = k_expected(d, dmin, &sc, &m, &q);
            assert_close(&run(GgmlType::Q5_K, &b, 256), &want, &scale, "q5_k");
        }
    }

    #[test]
    fn q6_k() {
        let mut rng = Rng(8);
        for _ in 0..50 {
            let d = rng.half();
            let mut sc: Vec<i8> = (0..16).map(|_| rng.below(256) as u8 as i8).collect();
            sc[0] = -128;
            sc[15] = 127;
            let q: Vec<u8> = (0..256)
                .map(|i| if i % 43 == 0 { 63 } else { rng.below(64) as u8 })
                .collect();
            // Value i: half n = i/128, quarter k = (i%128)/32, l = i%32. Its low four bits
            // are in ql[64n + 32(k%2) + l] (low nibble for k < 2, high for k ≥ 2), its top
            // two bits in bits 2k..2k+2 of qh[32n + l]; its scale is sc[8n + 2k + l/16].
            let (mut ql, mut qh) = (vec![0u8; 128], vec![0u8; 64]);
            let mut want = Vec::new();
            let df = f64::from(d.to_f32());
            for (i, &v) in q.iter().enumerate() {
                let (n, k, l) = (i / 128, (i % 128) / 32, i % 32);
                let lo = v & 0x0F;
                ql[64 * n + 32 * (k % 2) + l] |= if k < 2 { lo } else { lo << 4 };
                qh[32 * n + l] |= (v >> 4) << (2 * k);
                let s = sc[8 * n + 2 * k + l / 16];
                want.push(df * f64::from(s) * (f64::from(v) - 32.0));
            }
            let mut b = ql;
            b.extend(qh);
            b.extend(sc.iter().map(|&s| s as u8));
            b.extend(d.to_le_bytes());
            assert_eq!(b.len(), 210);
            assert_close(&run(GgmlType::Q6_K, &b, 256), &want, &want, "q6_k");
        }
    }

    #[test]
    fn unsupported_and_wrong_sizes_are_errors() {
        let mut out = vec![0f32; 256];
        assert_eq!(
            dequantize(GgmlType::Q2_K, &[0u8; 84], &mut out),
            Err(DequantError::Unsupported(GgmlType::Q2_K))
        );
        let msg = DequantError::Unsupported(GgmlType::IQ2_XXS).to_string();
        assert!(msg.contains("IQ2_XXS") && msg.contains("Q4_K"), "{msg}");
        assert!(matches!(
            dequantize(GgmlType::Q4_0, &[0u8; 17], &mut out[..32]),
            Err(DequantError::Length { .. })
        ));
        assert!(matches!(
            dequantize(GgmlType::Q4_0, &[0u8; 18], &mut out[..31]),
            Err(DequantError::Length { .. })
        ));
    }
}
