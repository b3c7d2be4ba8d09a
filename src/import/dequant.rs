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
//!   `scales` (see [`scale_min_k4`]); value = d·scale·q − dmin·min.
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
