//! NaN is never "good": `lema eval` refuses a non-finite loss and says where to look; an
//! adapter or optimizer state holding NaN, infinity or (for AdamW's second moments) a
//! negative value is refused when it loads, naming the file and tensor, by `train
//! --resume`, `eval`, `generate` and `merge`; and non-finite parameters are never saved.

mod common;
use common::tiny::{Tiny, expect_error, expect_ok, poke_f32, tensor_names};
use lema::backend::Backend;
use lema::backend::cpu::CpuBackend;
use lema::lora::{LoraConfig, LoraParams};
use lema::optim::{Optimizer, OptimizerConfig};
use lema::{Error, LemaConfig};

/// A tiny model with data and a finished two-step run that saved `run/checkpoint-1`,
/// `run/checkpoint-2` and `run/adapter`.
fn trained() -> Tiny {
    let s = Tiny::new(None);
    let lines: Vec<String> = (0..8)
        .map(|i| format!(r#"{{"prompt": "Q{i} is? ", "completion": "yes"}}"#))
        .collect();
    s.write("d.jsonl", &lines.join("\n"));
    expect_ok(&s.train("d.jsonl", &["--max-steps", "2", "--save-steps", "1"]));
    s
}

#[test]
fn eval_refuses_a_non_finite_loss_and_says_where_to_look() {
    let s = trained();
    let args = [
        "eval", "--model", "model", "--data", "d.jsonl", "--device", "cpu",
    ];
    expect_ok(&s.lema(&args));
    for value in [f32::NAN, f32::INFINITY] {
        let s = trained();
        poke_f32(
            &s.path("model/model.safetensors"),
            "model.norm.weight",
            0,
            value,
        );
        for adapter in [None, Some("run/adapter")] {
            let mut a = args.to_vec();
            a.extend(adapter.map(|p| ["--adapter", p]).into_iter().flatten());
            let o = s.lema(&a);
            let with = adapter.map_or(String::new(), |p| format!(" with adapter {p}"));
            expect_error(
                &o,
                &[
                    &format!("error: model/model.safetensors{with} on d.jsonl: the loss is "),
                    "on evaluation batch 1 of 1: the model computes non-finite values",
                    "the base model's weights likely hold NaN or infinity",
                    "lema prepare",
                ],
            );
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(!out.contains("loss"), "a loss is printed: {out} ({value})");
        }
    }
}

/// The key of the first tensor of `file` whose name ends with `suffix`.
fn first_key(file: &std::path::Path, suffix: &str) -> String {
    tensor_names(file)
        .into_iter()
        .find(|k| k.ends_with(suffix))
        .unwrap_or_else(|| panic!("no tensor *{suffix} in {}", file.display()))
}

#[test]
fn resume_refuses_a_corrupted_optimizer_state_naming_file_and_tensor() {
    let cases = [
        (".exp_avg", f32::NAN, "holds NaN at value 5 of "),
        (".exp_avg", f32::NEG_INFINITY, "holds -inf at value 5 of "),
        (".exp_avg_sq", f32::NAN, "holds NaN at value 5 of "),
        (
            ".exp_avg_sq",
            -1e-6,
            "holds the negative second moment -0.000001 at value 5 of ",
        ),
    ];
    for (suffix, value, says) in cases {
        let s = trained();
        let file = s.path("run/checkpoint-1/optimizer.safetensors");
        let key = first_key(&file, suffix);
        poke_f32(&file, &key, 5, value);
        let o = s.lema(&["train", "--resume", "run/checkpoint-1"]);
        let err = expect_error(
            &o,
            &[
                &format!("checkpoint-1/optimizer.safetensors: tensor '{key}': {says}"),
                "(1 bad value in all)",
                "the optimizer state is corrupt: resume from an earlier checkpoint",
            ],
        );
        if value < 0.0 && value.is_finite() {
            assert!(err.contains("which AdamW never makes"), "{err}");
        }
    }
    // a negative first moment is an ordinary value
    let s = trained();
    let file = s.path("run/checkpoint-1/optimizer.safetensors");
    poke_f32(&file, &first_key(&file, ".exp_avg"), 5, -1.0);
    expect_ok(&s.lema(&["train", "--resume", "run/checkpoint-1"]));
}

#[test]
fn a_nan_adapter_is_refused_by_resume_eval_generate_and_merge() {
    let s = trained();
    for dir in ["run/checkpoint-1", "run/adapter"] {
        let file = s.path(&format!("{dir}/adapter_model.safetensors"));
        let key = first_key(&file, "lora_B.weight");
        poke_f32(&file, &key, 0, f32::NAN);
        poke_f32(&file, &key, 3, f32::INFINITY);
        let needles = [
            format!("{dir}/adapter_model.safetensors: tensor '{key}': holds NaN at value 0 of "),
            "(2 bad values in all)".into(),
            "the adapter is corrupt or was saved by a run that diverged".into(),
        ];
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        let mut runs = vec![
            s.lema(&[
                "eval",
                "--model",
                "model",
                "--adapter",
                dir,
                "--data",
                "d.jsonl",
                "--device",
                "cpu",
            ]),
            s.lema(&[
                "generate",
                "--model",
                "model",
                "--adapter",
                dir,
                "--device",
                "cpu",
                "-n",
                "3",
                "--raw",
                "hello",
            ]),
            s.lema(&[
                "merge",
                "--model",
                "model",
                "--adapter",
                dir,
                "--out",
                "merged.safetensors",
            ]),
        ];
        if dir.contains("checkpoint") {
            runs.push(s.lema(&["train", "--resume", dir]));
        }
        for o in runs {
            expect_error(&o, &needles);
        }
        assert!(!s.path("merged.safetensors").exists());
    }
}

#[test]
fn non_finite_parameters_and_optimizer_state_are_never_saved() {
    let s = Tiny::new(None);
    let (_, model) =
        lema::api::open_model(&LemaConfig::new(s.path("model/model.safetensors"))).unwrap();
    let be = CpuBackend::<f32>::new();
    let cfg = LoraConfig {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        use_rslora: false,
    };
    let arch = model.config().arch;
    let mut first = true;
    let nan_b = LoraParams::build(&be, model.block_linears(), &cfg, |spec| {
        let mut b = vec![0.0; spec.linear.out_features * spec.r];
        if std::mem::take(&mut first) {
            b[1] = f32::NAN;
        }
        Ok((vec![0.5; spec.r * spec.linear.in_features], b))
    })
    .unwrap();
    let out = s.path("saved");
    std::fs::create_dir(&out).unwrap();
    match lema::checkpoint::write_adapter(&be, &nan_b, arch, None, &out) {
        Err(Error::NonFinite(msg)) => {
            assert!(
                msg.starts_with("the LoRA parameter 'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight' holds NaN at value 1 of "),
                "{msg}"
            );
            assert!(msg.contains("non-finite values are never saved"), "{msg}");
        }
        other => panic!("saved or failed otherwise: {other:?}"),
    }
    assert!(
        std::fs::read_dir(&out).unwrap().next().is_none(),
        "something was written"
    );

    // finite parameters save; AdamW state with a negative second moment does not
    let fine = LoraParams::build(&be, model.block_linears(), &cfg, |spec| {
        Ok((
            vec![0.5; spec.r * spec.linear.in_features],
            vec![0.25; spec.linear.out_features * spec.r],
        ))
    })
    .unwrap();
    lema::checkpoint::write_adapter(&be, &fine, arch, None, &out).unwrap();
    let mut opt = Optimizer::new(&be, OptimizerConfig::adamw(1e-3), &fine, false).unwrap();
    lema::checkpoint::write_optimizer(&be, &fine, &opt, &out).unwrap();
    let n = be.download(&opt.state[2][1]).unwrap().len();
    let mut v = vec![0.0; n];
    v[n - 1] = -2.0;
    opt.state[2][1] = be.upload(&v).unwrap();
    match lema::checkpoint::write_optimizer(&be, &fine, &opt, &out) {
        Err(Error::NonFinite(msg)) => assert!(
            msg.starts_with("the optimizer state 'base_model.")
                && msg.contains(&format!(
                    ".exp_avg_sq' holds the negative second moment -2 at value {} of {n}",
                    n - 1
                )),
            "{msg}"
        ),
        other => panic!("saved or failed otherwise: {other:?}"),
    }
}

#[test]
fn a_run_that_diverges_in_its_update_saves_no_checkpoint() {
    // lr · weight_decay overflows f32, so the first update makes every lora_A infinite
    // while its loss was still finite
    let s = Tiny::new(None);
    let lines: Vec<String> = (0..8)
        .map(|i| format!(r#"{{"prompt": "Q{i} is? ", "completion": "yes"}}"#))
        .collect();
    s.write("d.jsonl", &lines.join("\n"));
    let o = s.train(
        "d.jsonl",
        &[
            "--max-steps",
            "3",
            "--save-steps",
            "1",
            "--learning-rate",
            "1e38",
            "--weight-decay",
            "1000",
        ],
    );
    expect_error(
        &o,
        &[
            "checkpoint-1: could not write this checkpoint (the LoRA parameter 'base_model.",
            ".lora_A.weight' holds ",
            "non-finite values are never saved (the run diverged: try a lower learning_rate",
            "no earlier checkpoint exists",
        ],
    );
    let left: Vec<_> = std::fs::read_dir(s.path("run"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("checkpoint") || n == "adapter")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn a_non_finite_evaluation_stops_training_at_the_last_good_checkpoint() {
    let s = Tiny::new(None);
    // the '~' embedding row is NaN: training data never reads it, evaluation data does
    let tilde = b'~' as usize;
    let file = s.path("model/model.safetensors");
    let hidden = lema::bench::preset("tiny").unwrap().hidden;
    for i in 0..hidden {
        poke_f32(
            &file,
            "model.embed_tokens.weight",
            tilde * hidden + i,
            f32::NAN,
        );
    }
    let lines: Vec<String> = (0..8)
        .map(|i| format!(r#"{{"prompt": "Q{i} is? ", "completion": "yes"}}"#))
        .collect();
    s.write("d.jsonl", &lines.join("\n"));
    s.write("e.jsonl", r#"{"text": "a ~ b"}"#);
    let o = s.train(
        "d.jsonl",
        &[
            "--max-steps",
            "4",
            "--save-steps",
            "1",
            "--eval-data",
            "e.jsonl",
            "--eval-steps",
            "2",
        ],
    );
    expect_error(
        &o,
        &[
            "training stopped: evaluating after step 2, the loss is NaN on evaluation batch 1 of 1",
            "the evaluation data meets values the training data does not",
            "the last good checkpoint is ",
            "run/checkpoint-1",
        ],
    );
    assert!(!s.path("run/checkpoint-2").exists());
}
