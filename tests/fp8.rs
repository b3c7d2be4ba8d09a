//! lema's FP8 E4M3 codec (src/quant/fp8.rs) against torch 2.15 and transformers 5.24
//! themselves (tools/reference/fp8_reference.py wrote tests/data/fp8_reference.safetensors):
//! the f32 → float8_e4m3fn cast byte for byte (ties, subnormals, values around 448, 464 and
//! 480, infinities, NaN), `FineGrainedFP8`'s 128 × 128 block quantization byte for byte
//! (codes and scales; short edge blocks; an all-zero block), and its dequantization bit for
//! bit in bf16 and f32, by the codec and by the CPU backend.

use lema::backend::cpu::CpuBackend;
use lema::backend::{Backend, DType, Fp8Parts};
use lema::quant::fp8::{dequantize_fp8, e4m3_to_f32, f32_to_e4m3, quantize_fp8};

fn reference() -> Vec<u8> {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/fp8_reference.safetensors"
    );
    std::fs::read(p).unwrap()
}

fn f32s(st: &safetensors::SafeTensors, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).unwrap_or_else(|_| panic!("{name}"));
    let dt = match t.dtype() {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::BF16 => DType::BF16,
        d => panic!("{name}: {d:?}"),
    };
    let mut v = vec![0.0; t.shape().iter().product()];
    dt.decode_into(t.data(), &mut v);
    (t.shape().to_vec(), v)
}

fn bytes(st: &safetensors::SafeTensors, name: &str) -> Vec<u8> {
    st.tensor(name).unwrap().data().to_vec()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn the_cast_is_torchs_byte_for_byte() {
    let data = reference();
    let st = safetensors::SafeTensors::deserialize(&data).unwrap();
    let (_, x) = f32s(&st, "cast.input");
    let want = bytes(&st, "cast.codes");
    assert!(x.len() > 4000);
    let got: Vec<u8> = x.iter().map(|&v| f32_to_e4m3(v)).collect();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "cast of {} ({:#x})", x[i], x[i].to_bits());
    }
    // and widening: every code gives torch's value back (the cast input holds them all)
    for (&v, &c) in x.iter().zip(&want) {
        if !v.is_nan() && v.abs() <= 448.0 && e4m3_to_f32(c) == v {
            assert_eq!(f32_to_e4m3(e4m3_to_f32(c)), c);
        }
    }
}

#[test]
fn block_quantization_and_dequantization_are_transformers_bit_for_bit() {
    let data = reference();
    let st = safetensors::SafeTensors::deserialize(&data).unwrap();
    let be = CpuBackend::<f32>::new();
    for case in ["full", "edge", "zero", "tiny"] {
        let (shape, w) = f32s(&st, &format!("{case}.input"));
        let q = quantize_fp8(&w, [shape[0], shape[1]]);
        assert_eq!(
            q.codes,
            bytes(&st, &format!("{case}.codes")),
            "{case}: codes"
        );
        let (s_shape, s) = f32s(&st, &format!("{case}.scale_inv"));
        assert_eq!(
            s_shape,
            vec![shape[0].div_ceil(128), shape[1].div_ceil(128)]
        );
        assert_eq!(bits(&q.scale_inv), bits(&s), "{case}: scale_inv");
        for (dt, label) in [(DType::BF16, "bf16"), (DType::F32, "f32")] {
            let (_, want) = f32s(&st, &format!("{case}.dequantized.{label}"));
            let mut got = vec![0.0; want.len()];
            dequantize_fp8(&q, dt, &mut got);
            assert_eq!(bits(&got), bits(&want), "{case}: dequantized to {label}");
            // the CPU backend's expansion, from the stored bytes
            let codes = be.upload_weight(&q.codes, DType::F8E4M3).unwrap();
            let scales = be.upload(&q.scale_inv).unwrap();
            let parts = Fp8Parts {
                codes: &codes,
                scale_inv: &scales,
                rows: shape[0],
                cols: shape[1],
            };
            let d = be
                .download(&be.dequantize_fp8(&parts, dt).unwrap())
                .unwrap();
            assert_eq!(bits(&d), bits(&want), "{case}: CPU backend, {label}");
        }
    }
    // the zero case's all-zero block has scale 1, as transformers keeps it
    let q = f32s(&st, "zero.scale_inv").1;
    assert_eq!(q[0], 1.0);
    // wrong parts are refused by the backend
    let codes = be.upload_weight(&[0u8; 6], DType::F8E4M3).unwrap();
    let scales = be.upload(&[1.0, 1.0]).unwrap();
    let parts = Fp8Parts {
        codes: &codes,
        scale_inv: &scales,
        rows: 2,
        cols: 3,
    };
    let e = be
        .dequantize_fp8(&parts, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("scales"), "{e}");
}
