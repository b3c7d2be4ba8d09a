//! Properties of the engine on the CPU: strategies agree bit for bit, gradient
//! checkpointing changes nothing, accumulation equals one big batch, resume equals an
//! uninterrupted run, a fixed batch can be learned, and the LoRA gradients of the whole
//! model match central finite differences in f64.

mod common;
use common::*;
use lema::backend::cpu::CpuBackend;
use lema::lora::LoraConfig;
use lema::model::Model;
use lema::rng::Rng;
use lema::stream::Strategy;
use lema::trainer::Engine;
use lema::{Batch, Device, LemaConfig, LemaModel, OptimizerConfig, Trainer};
use std::sync::Arc;

fn config(case: &str) -> LemaConfig {
    let mut c = LemaConfig::new(fixture(case).join("model.safetensors"));
    c.device = Device::Cpu;
    c.lora_rank = 4;
    c.lora_alpha = 8.0;
    c.lora_target_modules = Some(vec!["all-linear".into()]);
    c
}

/// A batch of fresh random tokens (labels = inputs, a few ignored).
fn random_batch(seed: u64, batch: usize, seq: usize, vocab: u64) -> Batch {
    let mut r = Rng::new(seed);
    let ids: Vec<u32> = (0..batch * seq).map(|_| r.below(vocab) as u32).collect();
    let mut labels: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    labels[1] = -100;
    Batch::new(ids, labels, batch, seq).unwrap()
}

/// Start from non-zero B so every gradient is exercised: one SGD step with a large lr.
fn trainer(cfg: LemaConfig, opt: OptimizerConfig) -> Trainer {
    let mut m = LemaModel::new(cfg).unwrap();
    m.initialize_lora().unwrap();
    Trainer::new(m, opt).unwrap()
}

fn run(cfg: LemaConfig, steps: usize, batch: &Batch) -> (Vec<f64>, Vec<Vec<f32>>) {
    let mut t = trainer(cfg, OptimizerConfig::adamw(1e-2));
    let losses = (0..steps)
        .map(|_| t.train_step(batch).unwrap().loss)
        .collect();
    let w = t
        .model
        .lora_tensors()
        .unwrap()
        .into_iter()
        .map(|(_, _, w)| w)
        .collect();
    (losses, w)
}

#[test]
fn strategies_and_checkpointing_are_bit_identical() {
    for case in ["llama_gqa", "gpt2"] {
        let b = random_batch(1, 2, 9, 96);
        let mut base = config(case);
        base.lora_dropout = 0.1;
        let reference = run(base.clone(), 3, &b);
        for (strategy, ckpt) in [
            (Strategy::Resident, true),
            (Strategy::Streaming, false),
            (Strategy::Resident, false),
        ] {
            let mut c = base.clone();
            c.strategy = strategy;
            c.gradient_checkpointing = ckpt.into();
            let got = run(c, 3, &b);
            assert_eq!(
                got, reference,
                "{case}: {strategy:?}, checkpointing={ckpt} differs from STREAMING"
            );
        }
    }
}

#[test]
fn accumulation_equals_one_big_batch() {
    for case in ["llama_tied", "gpt2"] {
        let big = random_batch(2, 3, 8, 96);
        let micro: Vec<Batch> = (0..3)
            .map(|i| {
                let r = i * 8..(i + 1) * 8;
                Batch::new(
                    big.input_ids[r.clone()].to_vec(),
                    big.labels[r].to_vec(),
                    1,
                    8,
                )
                .unwrap()
            })
            .collect();
        let mut a = trainer(config(case), OptimizerConfig::sgd(0.5, 0.9));
        let mut b = trainer(config(case), OptimizerConfig::sgd(0.5, 0.9));
        for step in 0..3 {
            let la = a.train_step(&big).unwrap();
            let lb = b.train_step_accumulated(&micro, None, false).unwrap();
            assert_close(
                &format!("{case} step {step} loss"),
                &[lb.loss],
                &[la.loss],
                1e-6,
            );
            assert_close(
                &format!("{case} step {step} grad norm"),
                &[lb.grad_norm],
                &[la.grad_norm],
                1e-5,
            );
        }
        for ((k, _, wa), (_, _, wb)) in a
            .model
            .lora_tensors()
            .unwrap()
            .iter()
            .zip(b.model.lora_tensors().unwrap())
        {
            assert_close(&format!("{case} {k}"), &f64s(&wb), &f64s(wa), 1e-5);
        }
    }
}

#[test]
fn resume_equals_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    for case in ["llama_gqa", "gpt2"] {
        let b = random_batch(3, 2, 6, 96);
        let mut cfg = config(case);
        cfg.lora_dropout = 0.2;
        let mut straight = trainer(cfg.clone(), OptimizerConfig::adamw(5e-3));
        straight.max_grad_norm = Some(0.5);
        let full: Vec<f64> = (0..6)
            .map(|_| straight.train_step(&b).unwrap().loss)
            .collect();

        let mut first = trainer(cfg.clone(), OptimizerConfig::adamw(5e-3));
        first.max_grad_norm = Some(0.5);
        let mut got: Vec<f64> = (0..3).map(|_| first.train_step(&b).unwrap().loss).collect();
        let ck = dir.path().join(format!("{case}-ckpt"));
        first.save_checkpoint(&ck).unwrap();
        drop(first);
        let mut resumed = Trainer::from_checkpoint(&ck, None).unwrap();
        assert_eq!(resumed.step(), 3);
        assert_eq!(resumed.max_grad_norm, Some(0.5));
        got.extend((0..3).map(|_| resumed.train_step(&b).unwrap().loss));
        assert_eq!(got, full, "{case}: resumed run diverged");
        assert_eq!(
            resumed.model.lora_tensors().unwrap(),
            straight.model.lora_tensors().unwrap(),
            "{case}: weights differ after resume"
        );
    }
}

/// Optimizer state in host memory (`offload_optimizer`) changes nothing: on the CPU the
/// state is an ordinary buffer either way, so this proves the plumbing (config → engine →
/// optimizer → checkpoint save and load) bit for bit, for AdamW and SGD.
#[test]
fn offloaded_optimizer_state_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    for case in ["llama_gqa", "gpt2"] {
        let b = random_batch(4, 2, 7, 96);
        for opt in [OptimizerConfig::adamw(1e-2), OptimizerConfig::sgd(0.5, 0.9)] {
            let mut cfg = config(case);
            cfg.lora_dropout = 0.1;
            let mut on = cfg.clone();
            on.offload_optimizer = true;
            let steps = |t: &mut Trainer, n: usize| -> Vec<f64> {
                (0..n).map(|_| t.train_step(&b).unwrap().loss).collect()
            };
            let mut reference = trainer(cfg.clone(), opt.clone());
            let full = steps(&mut reference, 4);
            assert!(full.iter().all(|l| l.is_finite()), "{case}: {full:?}");

            let mut first = trainer(on.clone(), opt.clone());
            let mut got = steps(&mut first, 2);
            let ck = dir
                .path()
                .join(format!("{case}-{}-ckpt", opt.state_names()[0]));
            first.save_checkpoint(&ck).unwrap();
            drop(first);
            let mut resumed = Trainer::from_checkpoint(&ck, None).unwrap();
            assert!(
                resumed.model.config().offload_optimizer,
                "saved with the run"
            );
            assert_eq!(resumed.step(), 2);
            got.extend(steps(&mut resumed, 2));
            assert_eq!(
                got, full,
                "{case} {opt:?}: losses differ with offload_optimizer"
            );
            assert_eq!(
                resumed.model.lora_tensors().unwrap(),
                reference.model.lora_tensors().unwrap(),
                "{case} {opt:?}: weights differ with offload_optimizer"
            );
        }
    }
}

#[test]
fn fixed_batch_is_learned() {
    // A random model whose embedding and head have unit-scale weights, so that a frozen
    // head can express confident predictions (with HF's 0.02 init the logits of a tiny
    // model cannot leave the neighbourhood of uniform, whatever LoRA does).
    let dir = tempfile::tempdir().unwrap();
    let shape = lema::bench::preset("tiny").unwrap();
    let path =
        lema::bench::write_random_model(dir.path(), &shape, lema::backend::DType::F32, 3, 1.0)
            .unwrap();
    let mut cfg = LemaConfig::new(path);
    cfg.device = Device::Cpu;
    cfg.lora_rank = 8;
    cfg.lora_alpha = 16.0;
    cfg.lora_target_modules = Some(vec!["all-linear".into()]);
    let b = random_batch(4, 2, 16, shape.vocab as u64);
    let mut t = trainer(cfg, OptimizerConfig::adamw(1e-2));
    let first = t.train_step(&b).unwrap().loss;
    let mut last = first;
    for _ in 0..300 {
        last = t.train_step(&b).unwrap().loss;
    }
    eprintln!("fixed batch: loss {first:.4} -> {last:.5} after 300 AdamW steps");
    assert!(
        first > 2.0,
        "a random model should start far from the answer, got {first}"
    );
    assert!(
        last < 0.05,
        "loss after 300 steps on one batch is {last} (from {first})"
    );
}

/// Whole-model LoRA gradients in f64 against central finite differences of the loss,
/// with LoRA dropout on (the masks are a pure function of the seed, so the loss is a
/// deterministic function of the parameters).
#[test]
fn model_lora_gradients_match_finite_differences() {
    for case in ["llama_tied", "gpt2", "llama_gqa"] {
        let mut cfg = config(case);
        cfg.lora_dropout = 0.25;
        let (gbi, model): (Arc<_>, Model) = lema::api::open_model(&cfg).unwrap();
        let lcfg = LoraConfig {
            r: 3,
            alpha: 5.0,
            dropout: 0.25,
            target_modules: vec!["all-linear".into()],
            use_rslora: false,
        };
        let be = CpuBackend::<f64>::new();
        let mut e = Engine::new(be, model, gbi, Strategy::Streaming, true, 9);
        let mut rng = Rng::new(5);
        let mut lora =
            lema::lora::LoraParams::init(&e.be, e.model.block_linears(), &lcfg, &mut rng).unwrap();
        // non-zero B so that dA is exercised
        for m in &mut lora.modules {
            for x in m.b.as_mut_slice() {
                *x = rng.normal() * 0.2;
            }
        }
        e.lora = Some(lora);
        let b = random_batch(6, 2, 5, 96);
        let total = b.counted_tokens() as f64;
        let seed = 77;
        let loss = |e: &mut Engine<CpuBackend<f64>>| {
            let (l, _) = e.forward_backward(&b, 1.0, true, false, seed).unwrap();
            l.sum / total
        };
        e.lora.as_mut().unwrap().zero_grads(&e.be).unwrap();
        e.forward_backward(&b, (1.0 / total) as f32, true, false, seed)
            .unwrap();
        // snapshot the analytic gradients first: the loss evaluations below run the
        // backward too and add into the gradient buffers
        let grads: Vec<[Vec<f64>; 2]> = e
            .lora
            .as_ref()
            .unwrap()
            .modules
            .iter()
            .map(|m| [m.da.as_slice().to_vec(), m.db.as_slice().to_vec()])
            .collect();
        let mut picks = Rng::new(11);
        let mut checked = 0;
        for (mi, g) in grads.iter().enumerate() {
            for (which, analytic) in g.iter().enumerate() {
                let len = analytic.len();
                for _ in 0..2 {
                    let j = picks.below(len as u64) as usize;
                    let h = 1e-6;
                    let set = |e: &mut Engine<CpuBackend<f64>>, d: f64| {
                        let m = &mut e.lora.as_mut().unwrap().modules[mi];
                        let p = if which == 0 { &mut m.a } else { &mut m.b };
                        p.as_mut_slice()[j] += d;
                    };
                    set(&mut e, h);
                    let lp = loss(&mut e);
                    set(&mut e, -2.0 * h);
                    let lm = loss(&mut e);
                    set(&mut e, h);
                    let numeric = (lp - lm) / (2.0 * h);
                    let a = analytic[j];
                    let err = (a - numeric).abs() / numeric.abs().max(1e-4);
                    let name = &e.lora.as_ref().unwrap().modules[mi].path;
                    assert!(
                        err < 1e-5 && a.is_finite(),
                        "{case} {name} {}[{j}]: analytic {a:e} vs numeric {numeric:e}",
                        if which == 0 { "A" } else { "B" }
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked >= 16, "{case}: only {checked} entries checked");
    }
}

/// A packed row of two examples gives the same logits, loss and gradients as the two
/// examples run as separate sequences (positions restart, attention stays inside each).
#[test]
fn packed_examples_do_not_see_each_other() {
    for case in ["llama_gqa", "gpt2"] {
        let a = random_batch(7, 1, 5, 96);
        let b = random_batch(8, 1, 4, 96);
        let ids: Vec<u32> = a.input_ids.iter().chain(&b.input_ids).copied().collect();
        let labels: Vec<i32> = a.labels.iter().chain(&b.labels).copied().collect();
        let packed = Batch::new(ids, labels, 1, 9)
            .unwrap()
            .with_segments(vec![0, 0, 0, 0, 0, 1, 1, 1, 1])
            .unwrap();
        // start both from the same adapter with non-zero B (one real step from init)
        let mut warm = trainer(config(case), OptimizerConfig::sgd(1.0, 0.0));
        warm.train_step(&a).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ad = dir.path().join("adapter");
        warm.model.save_adapter(&ad).unwrap();
        let from_adapter = || {
            let mut c = config(case);
            c.adapter_path = Some(ad.clone());
            Trainer::new(LemaModel::new(c).unwrap(), OptimizerConfig::sgd(0.0, 0.0)).unwrap()
        };
        let (mut tp, mut ts) = (from_adapter(), from_adapter());
        let (_, _, lp) = tp.model.evaluate(&packed, true).unwrap();
        let (_, _, la) = ts.model.evaluate(&a, true).unwrap();
        let (_, _, lb) = ts.model.evaluate(&b, true).unwrap();
        let sep: Vec<f32> = la.unwrap().into_iter().chain(lb.unwrap()).collect();
        assert_close(
            &format!("{case} packed logits"),
            &f64s(&lp.unwrap()),
            &f64s(&sep),
            1e-6,
        );
        let op = tp.train_step(&packed).unwrap();
        let os = ts
            .train_step_accumulated(&[a.clone(), b.clone()], None, false)
            .unwrap();
        assert_eq!(op.tokens, os.tokens, "{case}: counted tokens");
        assert_close(&format!("{case} packed loss"), &[op.loss], &[os.loss], 1e-6);
        for ((k, gp), (_, gs)) in tp
            .model
            .lora_grads()
            .unwrap()
            .iter()
            .zip(ts.model.lora_grads().unwrap())
        {
            assert_close(
                &format!("{case} packed grad {k}"),
                &f64s(gp),
                &f64s(&gs),
                1e-5,
            );
        }
    }
}

/// `gradient_checkpointing = "auto"` keeps the activations of the first blocks that fit
/// in its room and re-runs the others: every split (none kept, some, all) gives the
/// loss and LoRA gradients of checkpointing every block, bit for bit, on models with
/// sliding windows and post-norms (three blocks each).
#[test]
fn auto_checkpointing_keeps_the_blocks_that_fit_and_changes_nothing() {
    use lema::GradientCheckpointing;
    for case in ["gemma3", "qwen2_sw"] {
        let mut cfg = config(case);
        cfg.lora_dropout = 0.1;
        let (gbi, model): (Arc<_>, Model) = lema::api::open_model(&cfg).unwrap();
        let layers = model.config().num_hidden_layers;
        assert_eq!(layers, 3, "{case}: the test needs three blocks");
        let lcfg = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.1,
            target_modules: vec!["all-linear".into()],
            use_rslora: false,
        };
        let vocab = model.config().vocab_size as u64;
        let b = random_batch(8, 2, 7, vocab.min(96));
        let n = (b.batch * b.seq) as u64;
        let engine = |mode: GradientCheckpointing| {
            let mut e = Engine::new(
                CpuBackend::<f32>::new(),
                model.clone(),
                gbi.clone(),
                Strategy::Streaming,
                mode,
                4,
            );
            let mut rng = Rng::new(5);
            let mut lora =
                lema::lora::LoraParams::init(&e.be, e.model.block_linears(), &lcfg, &mut rng)
                    .unwrap();
            for m in &mut lora.modules {
                for x in m.b.as_mut_slice() {
                    *x = (rng.normal() * 0.2) as f32;
                }
            }
            e.lora = Some(lora);
            e
        };
        let pass = |e: &mut Engine<CpuBackend<f32>>| {
            e.lora.as_mut().unwrap().zero_grads(&e.be).unwrap();
            let (l, _) = e.forward_backward(&b, 0.01, true, false, 3).unwrap();
            let g: Vec<Vec<f32>> = e
                .lora
                .as_ref()
                .unwrap()
                .modules
                .iter()
                .flat_map(|m| [m.da.as_slice().to_vec(), m.db.as_slice().to_vec()])
                .collect();
            (l.sum, g)
        };
        let mut every = engine(GradientCheckpointing::Every);
        let reference = pass(&mut every);
        assert_eq!(every.last_kept, 0, "{case}: true keeps no block");
        let mut off = engine(GradientCheckpointing::Off);
        assert_eq!(pass(&mut off), reference, "{case}: false");
        assert_eq!(off.last_kept, layers);

        let mut auto = engine(GradientCheckpointing::Auto);
        // the host's free memory holds these blocks many times over
        assert_eq!(pass(&mut auto), reference, "{case}: auto, all kept");
        assert_eq!(auto.last_kept, layers, "{case}: auto on a roomy host");
        let per_block = auto.saved_bytes_per_token().unwrap() * n;
        assert!(per_block > 0);
        for want in 0..=layers {
            auto.activation_budget = Some(want as u64 * per_block + per_block / 2);
            assert_eq!(pass(&mut auto), reference, "{case}: auto keeping {want}");
            assert_eq!(auto.last_kept, want, "{case}: blocks kept");
        }
        // an evaluation keeps nothing
        auto.eval(&b, false).unwrap();
        assert_eq!(auto.last_kept, 0);
    }
}
