//! A frozen base stored in NF4 (bitsandbytes' layout, as transformers saves a 4-bit model):
//! the real `save_pretrained` output of tests/fixtures/bnb4_tiny (a tiny Llama quantized by
//! transformers 5.24 + bitsandbytes 0.50.2 on the CPU, tools/reference/nf4_reference.py)
//! loads directly, and training on it is bit for bit training on its "twin": the same file
//! with each NF4 weight replaced by bitsandbytes' own `dequantize_4bit` of it (bf16,
//! recorded in the fixture's reference.safetensors). So lema's expansion is bitsandbytes',
//! and every strategy and checkpointing setting gives the same bits on the quantized base.
//! Bad layouts are refused by name.

mod common;
use common::fixture;
use lema::backend::DType;
use lema::{Batch, Device, LemaConfig, LemaModel, OptimizerConfig, Strategy, Trainer};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The fixture's tensors as stored: name → (dtype, shape, bytes).
type Raw = BTreeMap<String, (DType, Vec<usize>, Vec<u8>)>;

fn read_raw(path: &Path) -> Raw {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let dtype = match v.dtype() {
                safetensors::Dtype::F32 => DType::F32,
                safetensors::Dtype::F16 => DType::F16,
                safetensors::Dtype::BF16 => DType::BF16,
                safetensors::Dtype::U8 => DType::U8,
                safetensors::Dtype::F8_E4M3 => DType::F8E4M3,
                other => panic!("{name}: {other:?}"),
            };
            (name, (dtype, v.shape().to_vec(), v.data().to_vec()))
        })
        .collect()
}

fn write_raw(dir: &Path, tensors: &Raw, config: &serde_json::Value) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let out: Vec<lema::fsutil::TensorOut> = tensors
        .iter()
        .map(|(name, (dtype, shape, data))| lema::fsutil::TensorOut {
            name: name.clone(),
            dtype: *dtype,
            shape: shape.clone(),
            data: Cow::Borrowed(data),
        })
        .collect();
    let path = dir.join("model.safetensors");
    lema::fsutil::write_safetensors(&path, &out, &Default::default()).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    path
}

fn config_of(case_dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(case_dir.join("config.json")).unwrap()).unwrap()
}

/// The NF4 weights of the fixture (those with a quant state).
fn quantized_weights(t: &Raw) -> Vec<String> {
    t.keys()
        .filter_map(|k| k.strip_suffix(".quant_state.bitsandbytes__nf4"))
        .map(str::to_string)
        .collect()
}

/// The fixture with every NF4 weight replaced by bitsandbytes' dequantization of it.
fn dequantized_twin(dir: &Path) -> PathBuf {
    let src = fixture("bnb4_tiny");
    let mut t = read_raw(&src.join("model.safetensors"));
    let reference = read_raw(&src.join("reference.safetensors"));
    let weights = quantized_weights(&t);
    assert_eq!(weights.len(), 7, "the fixture quantizes the 7 projections");
    for w in &weights {
        t.retain(|k, _| !(k.starts_with(w.as_str()) && k.len() > w.len()));
        let d = reference[&format!("{w}.dequantized")].clone();
        assert_eq!(
            d.0,
            DType::BF16,
            "{w}: bitsandbytes dequantizes to bf16 here"
        );
        t.insert(w.clone(), d);
    }
    let mut config = config_of(&src);
    config
        .as_object_mut()
        .unwrap()
        .remove("quantization_config");
    write_raw(dir, &t, &config)
}

fn config(path: &Path, strategy: Strategy, checkpointing: bool) -> LemaConfig {
    let mut c = LemaConfig::new(path);
    c.device = Device::Cpu;
    c.strategy = strategy;
    c.gradient_checkpointing = checkpointing.into();
    c.lora_rank = 4;
    c.lora_alpha = 8.0;
    c.lora_target_modules = Some(vec!["all-linear".into()]);
    c
}

fn batch() -> Batch {
    // vocab 96; two rows of 11
    let ids: Vec<u32> = (0..22).map(|i| (i * 37 + 5) % 96).collect();
    Batch::language_modeling(ids, 2, 11).unwrap()
}

/// Logits, then the losses, gradient norms and LoRA weights of 3 AdamW steps.
fn run(
    path: &Path,
    strategy: Strategy,
    checkpointing: bool,
) -> (Vec<f32>, Vec<f64>, Vec<Vec<f32>>) {
    let mut m = LemaModel::new(config(path, strategy, checkpointing)).expect("model");
    m.initialize_lora().unwrap();
    let b = batch();
    let (_, _, logits) = m.evaluate(&b, true).unwrap();
    let mut t = Trainer::new(m, OptimizerConfig::adamw(1e-2)).unwrap();
    let mut scalars = Vec::new();
    for _ in 0..3 {
        let out = t.train_step(&b).unwrap();
        scalars.extend([out.loss, out.grad_norm]);
    }
    let weights = t
        .model
        .lora_tensors()
        .unwrap()
        .into_iter()
        .map(|(_, _, w)| w)
        .collect();
    (logits.unwrap(), scalars, weights)
}

#[test]
fn a_bitsandbytes_checkpoint_trains_as_its_dequantized_twin_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let twin = dequantized_twin(tmp.path());
    let nf4 = fixture("bnb4_tiny").join("model.safetensors");
    let want = run(&twin, Strategy::Streaming, true);
    assert!(want.0.iter().all(|x| x.is_finite()));
    assert!(
        want.1[0] > want.1[4],
        "training lowers the loss: {:?}",
        want.1
    );
    for (strategy, ckpt) in [
        (Strategy::Streaming, true),
        (Strategy::Resident, true),
        (Strategy::Streaming, false),
    ] {
        let got = run(&nf4, strategy, ckpt);
        assert_eq!(got.0, want.0, "{strategy:?}/ckpt={ckpt}: logits");
        assert_eq!(
            got.1, want.1,
            "{strategy:?}/ckpt={ckpt}: losses, gradient norms"
        );
        assert_eq!(got.2, want.2, "{strategy:?}/ckpt={ckpt}: LoRA weights");
    }
}

/// The fixture changed by `edit` (tensors and config.json); its open error.
fn open_err(edit: impl FnOnce(&mut Raw, &mut serde_json::Value)) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("bnb4_tiny");
    let mut t = read_raw(&src.join("model.safetensors"));
    let mut c = config_of(&src);
    edit(&mut t, &mut c);
    let path = write_raw(tmp.path(), &t, &c);
    match LemaModel::new(config(&path, Strategy::Streaming, true)) {
        Ok(_) => panic!("the edited checkpoint opened"),
        Err(e) => e.to_string(),
    }
}

const Q: &str = "model.layers.0.self_attn.q_proj.weight";

fn state_json(t: &Raw, w: &str) -> serde_json::Value {
    serde_json::from_slice(&t[&format!("{w}.quant_state.bitsandbytes__nf4")].2).unwrap()
}

fn set_state(t: &mut Raw, w: &str, key: &str, v: serde_json::Value) {
    let mut s = state_json(t, w);
    s[key] = v;
    let bytes = s.to_string().into_bytes();
    t.insert(
        format!("{w}.quant_state.bitsandbytes__nf4"),
        (DType::U8, vec![bytes.len()], bytes),
    );
}

#[test]
fn bad_quantized_layouts_are_refused_by_name() {
    // FP4 instead of NF4
    let msg = open_err(|t, _| {
        let k = format!("{Q}.quant_state.bitsandbytes__nf4");
        let v = t.remove(&k).unwrap();
        t.insert(format!("{Q}.quant_state.bitsandbytes__fp4"), v);
    });
    assert!(msg.contains(Q) && msg.contains("fp4"), "{msg}");
    // a quant_state whose shape disagrees with the packed bytes
    let msg = open_err(|t, _| set_state(t, Q, "shape", serde_json::json!([64, 66])));
    assert!(msg.contains(Q) && msg.contains("packed"), "{msg}");
    // ... or with the model's config.json (a consistent layout of another shape)
    let msg = open_err(|_, c| c["num_attention_heads"] = 2.into());
    assert!(msg.contains("shape"), "{msg}");
    // a missing companion
    let msg = open_err(|t, _| {
        t.remove(&format!("{Q}.absmax"));
    });
    assert!(msg.contains(&format!("{Q}.absmax")), "{msg}");
    // an embedding stored quantized
    let msg = open_err(|t, _| {
        for (k, v) in t.clone() {
            if let Some(rest) = k.strip_prefix(Q) {
                t.insert(format!("model.embed_tokens.weight{rest}"), v);
            }
        }
    });
    assert!(
        msg.contains("model.embed_tokens.weight") && msg.contains("not a linear"),
        "{msg}"
    );
    // the packed codes stored in another type (bnb_4bit_quant_storage)
    let msg = open_err(|t, _| {
        let (_, shape, data) = t[Q].clone();
        t.insert(Q.to_string(), (DType::BF16, vec![shape[0] / 2, 1], data));
    });
    assert!(msg.contains(Q) && msg.contains("U8"), "{msg}");
}

/// `lema merge` onto the NF4 base writes a dense model in the dtype bitsandbytes expands
/// to (bf16 here), never requantized: byte for byte what merging into the dequantized
/// twin writes, with no quantized tensor and no `quantization_config` left.
#[test]
fn merging_into_the_nf4_base_writes_the_dense_merge_of_its_twin() {
    let tmp = tempfile::tempdir().unwrap();
    let twin = dequantized_twin(&tmp.path().join("twin"));
    let nf4 = fixture("bnb4_tiny").join("model.safetensors");
    // an adapter trained on the quantized base
    let mut m = LemaModel::new(config(&nf4, Strategy::Streaming, true)).unwrap();
    m.initialize_lora().unwrap();
    let mut t = Trainer::new(m, OptimizerConfig::adamw(1e-2)).unwrap();
    for _ in 0..3 {
        t.train_step(&batch()).unwrap();
    }
    let adapter = tmp.path().join("adapter");
    t.model.save_adapter(&adapter).unwrap();
    let from_nf4 = tmp.path().join("m1/model.safetensors");
    let from_twin = tmp.path().join("m2/model.safetensors");
    let report = lema::merge::merge_adapter(&nf4, &adapter, &from_nf4).expect("merge into NF4");
    assert_eq!(report.merged.len(), 7, "{:?}", report.merged);
    lema::merge::merge_adapter(&twin, &adapter, &from_twin).expect("merge into the twin");
    let (a, b) = (read_raw(&from_nf4), read_raw(&from_twin));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "tensor names"
    );
    for (name, (dtype, shape, data)) in &a {
        assert_ne!(*dtype, DType::U8, "{name} is still quantized");
        assert_eq!(
            (dtype, shape, data),
            (&b[name].0, &b[name].1, &b[name].2),
            "{name}"
        );
    }
    let merged_config = config_of(from_nf4.parent().unwrap());
    assert!(merged_config.get("quantization_config").is_none());
    // and the merged model is the base with its adapter, to bf16 rounding of the sums
    let with_adapter = {
        let mut c = config(&nf4, Strategy::Streaming, true);
        c.adapter_path = Some(adapter.clone());
        let mut m = LemaModel::new(c).unwrap();
        m.evaluate(&batch(), true).unwrap().2.unwrap()
    };
    let merged = {
        let mut m = LemaModel::new(config(&from_nf4, Strategy::Streaming, true)).unwrap();
        m.initialize_lora().unwrap();
        m.evaluate(&batch(), true).unwrap().2.unwrap()
    };
    let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    common::assert_close(
        "merged vs NF4 base + adapter",
        &f64s(&merged),
        &f64s(&with_adapter),
        1e-2,
    );
}

/// `lema prepare --quantize nf4`'s rewrite of a dense model (here the fixture's bf16
/// originals) is byte for byte what transformers + bitsandbytes saved: every NF4 part
/// and quant state, and the untouched tensors; quantizing it again is refused.
#[test]
fn quantizing_the_originals_reproduces_the_transformers_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("bnb4_tiny");
    let saved = read_raw(&src.join("model.safetensors"));
    let reference = read_raw(&src.join("reference.safetensors"));
    let weights = quantized_weights(&saved);
    let mut dense = saved.clone();
    for w in &weights {
        dense.retain(|k, _| !(k.starts_with(w.as_str()) && k.len() > w.len()));
        dense.insert(w.clone(), reference[&format!("{w}.original")].clone());
    }
    let mut config = config_of(&src);
    config
        .as_object_mut()
        .unwrap()
        .remove("quantization_config");
    let dense_path = write_raw(&tmp.path().join("dense"), &dense, &config);
    let out = tmp.path().join("nf4.safetensors");
    let names = lema::import::quantize::quantize_file(
        &dense_path,
        &dense_path.with_file_name("config.json"),
        &out,
        lema::import::quantize::Format::Nf4,
    )
    .expect("quantize");
    assert_eq!(names, weights);
    let ours = read_raw(&out);
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        saved.keys().collect::<Vec<_>>()
    );
    for (name, t) in &saved {
        assert_eq!(&ours[name], t, "{name}");
    }
    // the output is quantized: asking again says what to do instead
    let again = lema::import::quantize::quantize_file(
        &out,
        &dense_path.with_file_name("config.json"),
        &tmp.path().join("twice.safetensors"),
        lema::import::quantize::Format::Nf4,
    )
    .unwrap_err()
    .to_string();
    assert!(again.contains("already quantized"), "{again}");
}

/// lema on the NF4 base against PEFT + bitsandbytes' own QLoRA (tests/fixtures/bnb4_tiny/qlora,
/// tools/reference/qlora_reference.py: transformers' 4-bit load of the fixture, float32
/// compute on the CPU, a PEFT adapter with non-zero B): logits, loss, every LoRA gradient and
/// the losses and weights of 3 AdamW steps.
///
/// bitsandbytes' CPU forward multiplies by the float32 dequantization (`code * absmax`, not
/// rounded), its backward by the bf16 one (the quant state's dtype); lema uses the bf16 one for
/// both. The weights differ by 1.6e-3 (relative), so lema is compared twice: tightly with the
/// same PEFT model whose 4-bit forwards use the bf16 dequantization (`twin.*`: lema's
/// arithmetic, in torch), and with bitsandbytes as it runs, within that rounding. Measured
/// with `LEMA_TEST_VERBOSE=1 cargo test --release --test quantized -- --nocapture`.
#[test]
fn training_on_the_nf4_base_matches_peft_and_bitsandbytes_qlora() {
    let dir = fixture("bnb4_tiny");
    let qlora = dir.join("qlora");
    let reference = common::read_tensors(&qlora.join("reference.safetensors"));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(qlora.join("meta.json")).unwrap()).unwrap();
    let o = &meta["optimizers"]["adamw"];
    let f = |v: &serde_json::Value| v.as_f64().unwrap() as f32;
    let adamw = OptimizerConfig::AdamW {
        lr: f(&o["lr"]),
        beta1: f(&o["betas"][0]),
        beta2: f(&o["betas"][1]),
        eps: f(&o["eps"]),
        weight_decay: f(&o["weight_decay"]),
    };
    let steps = o["steps"].as_u64().unwrap() as usize;
    let batch = common::fixture_batch(&reference);
    let mut c = LemaConfig::new(dir.join("model.safetensors"));
    c.adapter_path = Some(qlora.join("adapter"));
    c.device = Device::Cpu;
    let model = LemaModel::new(c).expect("NF4 base with the PEFT adapter");
    let mut t = Trainer::new(model, adamw).unwrap();
    let out = t.train_step_with_logits(&batch).expect("step");
    let logits = common::f64s(out.logits.as_ref().unwrap());
    let grads = t.model.lora_grads().unwrap();
    let n_ref = reference.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(grads.len(), n_ref, "number of LoRA tensors");
    assert_eq!(n_ref, 14, "7 projections (1 layer), A and B");
    let mut losses = vec![out.loss];
    for _ in 1..steps {
        losses.push(t.train_step(&batch).expect("step").loss);
    }
    let after = t.model.lora_tensors().unwrap();
    // relative errors: logits, loss, grad norm, each grad, the losses, each weight after the
    // steps. Against the twin both sides are f32 with bf16 weights (summation order only);
    // against bitsandbytes its unrounded forward weights add what the script measures between
    // bitsandbytes and the twin (meta.json: logits 1.4e-3, grads <= 2.9e-3, losses 9.0e-6,
    // weights <= 1.6e-2: AdamW's normalised steps move small elements by whole steps).
    let twin = [
        2e-6, // measured 2.7e-7
        1e-6, // measured 1.2e-7
        3e-7, // measured 3.2e-8
        5e-6, // measured <= 5.2e-7
        1e-6, // measured 9.0e-8
        8e-5, // measured <= 8.8e-6 (q_proj A; the others <= 7.1e-7)
    ];
    let bnb = [
        1e-2, // measured 1.4e-3
        1e-5, // measured 1.4e-6
        3e-3, // measured 3.5e-4
        2e-2, // measured <= 2.9e-3
        8e-5, // measured 9.0e-6
        1e-1, // measured <= 1.6e-2
    ];
    for (pre, tol) in [("twin.", twin), ("", bnb)] {
        let r = |k: &str| &reference[&format!("{pre}{k}")].1;
        let who = if pre.is_empty() {
            "bitsandbytes"
        } else {
            "bf16-forward twin"
        };
        common::assert_close(&format!("{who}: logits"), &logits, r("logits"), tol[0]);
        common::assert_close(&format!("{who}: loss"), &[out.loss], r("loss"), tol[1]);
        common::assert_close(
            &format!("{who}: grad norm"),
            &[out.grad_norm],
            r("grad_norm"),
            tol[2],
        );
        for (key, g) in &grads {
            let what = format!("{who}: grad {key}");
            common::assert_close(&what, &common::f64s(g), r(&format!("grad.{key}")), tol[3]);
        }
        common::assert_close(
            &format!("{who}: losses"),
            &losses,
            r("losses_adamw"),
            tol[4],
        );
        for (key, _, w) in &after {
            let what = format!("{who}: weights after {steps} steps {key}");
            common::assert_close(
                &what,
                &common::f64s(w),
                r(&format!("after_adamw.{key}")),
                tol[5],
            );
        }
    }
}

/// `lema prepare --quantize fp8` of tests/fixtures/llama_gqa (f32; every linear one short
/// 128 × 128 block) in `dir`, with its config.json (`quantization_config` fp8).
fn fp8_copy(dir: &Path) -> PathBuf {
    let src = fixture("llama_gqa");
    let out = dir.join("model.safetensors");
    std::fs::create_dir_all(dir).unwrap();
    let names = lema::import::quantize::quantize_file(
        &src.join("model.safetensors"),
        &src.join("config.json"),
        &out,
        lema::import::quantize::Format::Fp8,
    )
    .expect("quantize to FP8");
    assert_eq!(names.len(), 14, "{names:?}");
    let mut c = config_of(&src);
    c["quantization_config"] = lema::quant::fp8::quantization_config();
    std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
    out
}

/// The FP8 weight `name` of `t` (its E4M3 codes and `name_scale_inv`).
fn fp8_of(t: &Raw, name: &str) -> lema::quant::fp8::Fp8Tensor {
    let (_, shape, codes) = &t[name];
    let scales = &t[&format!("{name}_scale_inv")].2;
    lema::quant::fp8::Fp8Tensor {
        shape: [shape[0], shape[1]],
        codes: codes.clone(),
        scale_inv: scales
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
    }
}

/// The FP8 file with each weight replaced by its dequantization (the model's f32) and
/// no scales: the dense twin.
fn fp8_twin(fp8: &Path, dir: &Path) -> PathBuf {
    use lema::quant::fp8::dequantize_fp8;
    let mut t = read_raw(fp8);
    for (name, (dtype, shape, _)) in t.clone() {
        if dtype != DType::F8E4M3 {
            continue;
        }
        let q = fp8_of(&t, &name);
        t.remove(&format!("{name}_scale_inv"));
        let mut w = vec![0.0f32; shape[0] * shape[1]];
        dequantize_fp8(&q, DType::F32, &mut w);
        let bytes = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        t.insert(name, (DType::F32, shape, bytes));
    }
    write_raw(dir, &t, &config_of(&fixture("llama_gqa")))
}

#[test]
fn an_fp8_base_trains_as_its_dequantized_twin_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let fp8 = fp8_copy(&tmp.path().join("fp8"));
    let twin = fp8_twin(&fp8, &tmp.path().join("twin"));
    let want = run(&twin, Strategy::Streaming, true);
    assert!(want.0.iter().all(|x| x.is_finite()));
    assert!(
        want.1[0] > want.1[4],
        "training lowers the loss: {:?}",
        want.1
    );
    for (strategy, ckpt) in [
        (Strategy::Streaming, true),
        (Strategy::Resident, true),
        (Strategy::Streaming, false),
    ] {
        let got = run(&fp8, strategy, ckpt);
        assert_eq!(got.0, want.0, "{strategy:?}/ckpt={ckpt}: logits");
        assert_eq!(
            got.1, want.1,
            "{strategy:?}/ckpt={ckpt}: losses, gradient norms"
        );
        assert_eq!(got.2, want.2, "{strategy:?}/ckpt={ckpt}: LoRA weights");
    }
    // and FP8 is not the dense original: its logits differ, a little
    let dense = run(
        &fixture("llama_gqa").join("model.safetensors"),
        Strategy::Streaming,
        true,
    );
    assert_ne!(dense.0, want.0);
    // `lema merge` expands it: the twin's merge, byte for byte
    let adapter = tmp.path().join("adapter");
    {
        let mut m = LemaModel::new(config(&fp8, Strategy::Streaming, true)).unwrap();
        m.initialize_lora().unwrap();
        let mut t = Trainer::new(m, OptimizerConfig::adamw(1e-2)).unwrap();
        t.train_step(&batch()).unwrap();
        t.model.save_adapter(&adapter).unwrap();
    }
    let (m1, m2) = (
        tmp.path().join("m1/model.safetensors"),
        tmp.path().join("m2/model.safetensors"),
    );
    lema::merge::merge_adapter(&fp8, &adapter, &m1).expect("merge into FP8");
    lema::merge::merge_adapter(&twin, &adapter, &m2).expect("merge into the twin");
    assert_eq!(read_raw(&m1), read_raw(&m2));
    assert!(
        config_of(m1.parent().unwrap())
            .get("quantization_config")
            .is_none()
    );
    // quantizing the FP8 file again is refused
    let again = lema::import::quantize::quantize_file(
        &fp8,
        &fp8.with_file_name("config.json"),
        &tmp.path().join("twice.safetensors"),
        lema::import::quantize::Format::Fp8,
    )
    .unwrap_err()
    .to_string();
    assert!(again.contains("already quantized (FP8)"), "{again}");
}

#[test]
fn bad_fp8_layouts_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let fp8 = fp8_copy(&tmp.path().join("fp8"));
    let base = read_raw(&fp8);
    let base_config = config_of(fp8.parent().unwrap());
    let w = "model.layers.1.mlp.down_proj.weight";
    let open = |edit: &dyn Fn(&mut Raw, &mut serde_json::Value)| -> String {
        let dir = tempfile::tempdir().unwrap();
        let (mut t, mut c) = (base.clone(), base_config.clone());
        edit(&mut t, &mut c);
        let path = write_raw(dir.path(), &t, &c);
        match LemaModel::new(config(&path, Strategy::Streaming, true)) {
            Ok(_) => panic!("the edited checkpoint opened"),
            Err(e) => e.to_string(),
        }
    };
    // scales of the wrong shape (a per-row scale)
    let msg = open(&|t, _| {
        t.insert(
            format!("{w}_scale_inv"),
            (DType::F32, vec![32, 1], vec![0; 128]),
        );
    });
    assert!(
        msg.contains(&format!("{w}_scale_inv")) && msg.contains("[1, 1]"),
        "{msg}"
    );
    // no scales
    let msg = open(&|t, _| {
        t.remove(&format!("{w}_scale_inv"));
    });
    assert!(msg.contains(w) && msg.contains("block scales"), "{msg}");
    // another block size
    let msg =
        open(&|_, c| c["quantization_config"]["weight_block_size"] = serde_json::json!([64, 64]));
    assert!(
        msg.contains("weight_block_size") && msg.contains("[64,64]"),
        "{msg}"
    );
    // an FP8 embedding
    let msg = open(&|t, _| {
        let e = t.get_mut("model.embed_tokens.weight").unwrap();
        *e = (DType::F8E4M3, e.1.clone(), vec![0; e.1.iter().product()]);
    });
    assert!(
        msg.contains("model.embed_tokens.weight") && msg.contains("not a linear"),
        "{msg}"
    );
}

/// `lema bench --quant nf4|fp8` writes its random model directly in the quantized layout:
/// the model opens as a quantized base (every block linear in the format, nothing else),
/// its expanded weights have about the dense random model's spread (uniform, σ 0.02), it
/// trains (the loss falls, nothing non-finite) and every strategy gives the same bits.
#[test]
fn benchmark_models_in_each_quantized_format_train_on_every_strategy() {
    use lema::quant::Format;
    let shape = lema::bench::preset("tiny").unwrap();
    for format in [Format::Nf4, Format::Fp8] {
        let tmp = tempfile::tempdir().unwrap();
        let path = lema::bench::write_random_quantized_model(tmp.path(), &shape, format, 7)
            .expect("write the random model");
        let gbi = lema::gbi::Gbi::open(&path).unwrap();
        let cfg = lema::config::ModelConfig::from_file(&path.with_file_name("config.json"))
            .expect("its config.json reads");
        let model = lema::model::Model::new(cfg);
        let table = lema::model::quantized::QuantTable::read(
            &gbi,
            &model.linear_weights(),
            &config_of(tmp.path()),
        )
        .expect("a valid quantized layout")
        .expect("quantized weights");
        assert_eq!(table.len(), 7 * shape.layers, "{format:?}");
        assert!(
            table
                .iter()
                .all(|(_, w)| w.format().eq_ignore_ascii_case(format.name())),
            "{format:?}"
        );
        // the expansion's spread, from the stored parts
        let raw = read_raw(&path);
        let w = "model.layers.0.mlp.down_proj.weight";
        let dense: Vec<f32> = match format {
            Format::Nf4 => {
                let get = |n: &str| {
                    raw.get(n).map(|(d, s, b)| lema::quant::TensorRef {
                        dtype: (*d).into(),
                        shape: s.clone(),
                        data: b.as_slice(),
                    })
                };
                let q = lema::quant::decode_bnb4(&path, w, get).unwrap();
                let mut out = vec![0.0f32; q.shape.iter().product()];
                lema::quant::dequantize_nf4(&q, &mut out);
                out
            }
            Format::Fp8 => {
                let q = fp8_of(&raw, w);
                let mut out = vec![0.0f32; q.codes.len()];
                lema::quant::fp8::dequantize_fp8(&q, DType::BF16, &mut out);
                out
            }
        };
        let n = dense.len() as f64;
        let mean = dense.iter().map(|&x| x as f64).sum::<f64>() / n;
        let std = (dense
            .iter()
            .map(|&x| (x as f64 - mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        assert!(dense.iter().all(|x| x.is_finite()), "{format:?}");
        assert!(mean.abs() < 0.005, "{format:?}: mean {mean}");
        assert!((0.01..0.04).contains(&std), "{format:?}: σ {std}");
        // it trains, and the strategies agree bit for bit
        let want = run(&path, Strategy::Streaming, true);
        assert!(want.0.iter().all(|x| x.is_finite()), "{format:?}");
        assert!(want.1[0] > want.1[4], "{format:?}: {:?}", want.1);
        for (strategy, ckpt) in [(Strategy::Resident, true), (Strategy::Streaming, false)] {
            assert_eq!(
                run(&path, strategy, ckpt),
                want,
                "{format:?} {strategy:?}/ckpt={ckpt}"
            );
        }
    }
}
