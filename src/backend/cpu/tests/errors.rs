//! Bad arguments give errors that name the op and quote the lengths or values.

use super::util::*;
use crate::backend::{Accumulate, AdamWStep, AttnDims, Backend, DType, Gemm};

/// The error message of `r`, failing if it succeeded.
fn message<T: std::fmt::Debug>(r: crate::Result<T>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} does not mention {p:?}");
    }
}

#[test]
fn length_mismatches_name_the_op_and_lengths() {
    let be = be64();
    let (mut out, mut rstd) = (buf(&[0.0; 7]), buf(&[0.0; 2]));
    let msg = message(be.rms_norm_forward(
        &mut out,
        &mut rstd,
        &buf(&[1.0; 8]),
        &buf(&[1.0; 4]),
        0.0,
        1e-5,
    ));
    assert_mentions(&msg, &["cpu", "rms_norm_forward", "out", "7", "8"]);

    let g = Gemm {
        m: 2,
        n: 3,
        k: 4,
        trans_a: true,
        trans_b: false,
        alpha: 1.0,
        accumulate: Accumulate::Overwrite,
    };
    let msg = message(be.matmul(&mut buf(&[0.0; 6]), &buf(&[0.0; 7]), &buf(&[0.0; 12]), g));
    assert_mentions(&msg, &["matmul", "a has 7", "8", "[4, 2]"]);

    let msg = message(be.axpy(&mut buf(&[0.0; 3]), 1.0, &buf(&[0.0; 4]), Accumulate::Add));
    assert_mentions(&msg, &["axpy", "3", "4"]);

    let dims = AttnDims {
        batch: 1,
        seq: 2,
        n_heads: 3,
        n_kv_heads: 2,
        head_dim: 4,
        scale: 0.5,
    };
    let (mut o, mut l) = (buf(&[0.0; 24]), buf(&[0.0; 6]));
    let msg = message(be.attention_forward(
        &mut o,
        &mut l,
        &buf(&[0.0; 24]),
        &buf(&[0.0; 16]),
        &buf(&[0.0; 16]),
        dims,
        None,
    ));
    assert_mentions(&msg, &["attention_forward", "n_heads 3", "n_kv_heads 2"]);
    let good = AttnDims { n_heads: 2, ..dims };
    let msg = message(be.attention_forward(
        &mut buf(&[0.0; 16]),
        &mut buf(&[0.0; 4]),
        &buf(&[0.0; 16]),
        &buf(&[0.0; 16]),
        &buf(&[0.0; 16]),
        good,
        Some(&[1, 1]),
    ));
    assert_mentions(&msg, &["attention_forward", "key_start[0, 0] = 1"]);

    let msg = message(be.rope_forward(&mut buf(&[0.0; 15]), &[0, 1], &[1.0, 0.5], 2));
    assert_mentions(&msg, &["rope_forward", "15", "16", "N=2"]);

    let msg = message(be.copy_cols(
        &mut buf(&[0.0; 6]),
        3,
        2,
        &buf(&[0.0; 4]),
        2,
        0,
        2,
        Accumulate::Add,
    ));
    assert_mentions(&msg, &["copy_cols", "dst", "2..2+2", "3"]);

    let msg = message(be.upload_weight(&[0u8; 5], DType::BF16));
    assert_mentions(&msg, &["upload_weight", "5", "bf16"]);

    let h = AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 0,
    };
    let msg = message(be.adamw_step(
        &mut buf(&[0.0]),
        &buf(&[0.0]),
        &mut buf(&[0.0]),
        &mut buf(&[0.0]),
        h,
    ));
    assert_mentions(&msg, &["adamw_step", "step", "0"]);

    let msg = message(be.dropout_forward(&mut buf(&[0.0]), &buf(&[0.0]), 1.0, 0, 0));
    assert_mentions(&msg, &["dropout_forward", "1"]);
}

#[test]
fn out_of_range_ids_and_labels_are_quoted() {
    let be = be64();
    let table = buf(&[0.0; 4 * 3]); // V = 4, C = 3
    let mut out = buf(&[5.0; 2 * 3]);
    let msg = message(be.embedding_forward(&mut out, &[1, 4], &table, 3, Accumulate::Overwrite));
    assert_mentions(
        &msg,
        &["embedding_forward", "id 4", "position 1", "vocabulary of 4"],
    );
    assert_eq!(out.0, [5.0; 6], "a rejected call must not write");

    let h = buf(&[0.0; 3 * 3]);
    for bad in [4, -1, -101] {
        let msg = message(be.lm_head_loss(&h, &table, &[0, bad, -100], 3, 1.0, None, None, None));
        assert_mentions(
            &msg,
            &[
                "lm_head_loss",
                &format!("label {bad}"),
                "position 1",
                "0..4",
            ],
        );
    }
}
