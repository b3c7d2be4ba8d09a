//! The CUDA weight stream (copy stream, VRAM slot ring, registered or pinned host memory,
//! VRAM budget) gives exactly the losses and weights of whole-layer uploads: the same
//! kernels read the same bytes, only their way to the GPU differs. Runs on a GPU machine;
//! skips visibly elsewhere (`common::skip_without_gpu`).
#![cfg(feature = "cuda")]

mod common;
use common::*;
use lema::backend::DType;
use lema::rng::Rng;
use lema::{Batch, Device, LemaConfig, LemaModel, OptimizerConfig, Strategy, Trainer};
use std::path::Path;

/// Whether a GPU is here; first turns on NaN-filled `uninit` buffers for every backend
/// this process builds.
fn gpu() -> bool {
    poison_uninit();
    match lema::backend::cuda::CudaBackend::new(0) {
        Ok(_) => true,
        Err(e) => {
            skip_without_gpu(&e.to_string());
            false
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    path: &Path,
    strategy: Strategy,
    depth: usize,
    max_vram: Option<u64>,
    offload: bool,
    dropout: f32,
    steps: usize,
) -> (Vec<f64>, Vec<Vec<f32>>) {
    let source = lema::tiers::WeightSource::Auto;
    run_from(
        path, strategy, depth, max_vram, offload, dropout, steps, source,
    )
}

/// [`run`] with the host side's `weight_source`.
#[allow(clippy::too_many_arguments)]
fn run_from(
    path: &Path,
    strategy: Strategy,
    depth: usize,
    max_vram: Option<u64>,
    offload: bool,
    dropout: f32,
    steps: usize,
    source: lema::tiers::WeightSource,
) -> (Vec<f64>, Vec<Vec<f32>>) {
    let mut c = LemaConfig::new(path);
    c.weight_source = source;
    c.device = Device::Cuda;
    c.strategy = strategy;
    c.prefetch_depth = depth;
    c.max_vram = max_vram;
    c.offload_activations = offload;
    c.lora_rank = 4;
    c.lora_alpha = 8.0;
    c.lora_dropout = dropout;
    c.lora_target_modules = Some(vec!["all-linear".into()]);
    let mut m = LemaModel::new(c).unwrap();
    m.initialize_lora().unwrap();
    let mut t = Trainer::new(m, OptimizerConfig::adamw(1e-2)).unwrap();
    let mut r = Rng::new(3);
    let v = t.model.model_config().vocab_size as u64;
    let ids: Vec<u32> = (0..2 * 24).map(|_| r.below(v) as u32).collect();
    let b = Batch::language_modeling(ids, 2, 24).unwrap();
    let losses = (0..steps).map(|_| t.train_step(&b).unwrap().loss).collect();
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
fn ring_budget_and_pinned_copies_match_exactly() {
    if !gpu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut shape = lema::bench::preset("tiny").unwrap();
    shape.layers = 5;
    let bf16 = lema::bench::write_random_model(dir.path(), &shape, DType::BF16, 4, 0.5).unwrap();
    // a base stored in NF4 (bitsandbytes' layout): a random one, and transformers' own
    // save; a random FP8 one
    let nf4_dir = tempfile::tempdir().unwrap();
    let nf4 = lema::bench::write_random_nf4_model(nf4_dir.path(), &shape, 4).unwrap();
    let fp8_dir = tempfile::tempdir().unwrap();
    let fp8 = lema::bench::write_random_quantized_model(
        fp8_dir.path(),
        &shape,
        lema::quant::Format::Fp8,
        4,
    )
    .unwrap();
    for path in [
        bf16.as_path(),
        &fixture("llama_gqa").join("model.safetensors"),
        &fixture("gpt2").join("model.safetensors"),
        nf4.as_path(),
        fp8.as_path(),
        &fixture("bnb4_tiny").join("model.safetensors"),
    ] {
        // with dropout the blocks keep f32 linear inputs; without, only their bf16 copies
        for dropout in [0.1, 0.0] {
            // reference: everything resident on the GPU
            let reference = run(
                path,
                Strategy::Budget,
                2,
                Some(u64::MAX / 2),
                false,
                dropout,
                3,
            );
            for (strategy, depth, budget, offload) in [
                (Strategy::Streaming, 1, None, false),
                (Strategy::Streaming, 2, None, false),
                (Strategy::Streaming, 4, None, false),
                (Strategy::Resident, 2, None, false),
                (Strategy::Budget, 1, Some(1), false), // budget below one layer: all streamed
                // saved activations parked in host memory, brought back 1, 2 or 4 blocks ahead
                (Strategy::Streaming, 1, None, true),
                (Strategy::Streaming, 2, None, true),
                (Strategy::Streaming, 4, None, true),
            ] {
                let got = run(path, strategy, depth, budget, offload, dropout, 3);
                assert!(
                    got.0.iter().all(|l| l.is_finite()),
                    "{}: non-finite loss",
                    path.display()
                );
                assert_eq!(
                    got,
                    reference,
                    "{}: {strategy:?} depth {depth} budget {budget:?} offload {offload} differs",
                    path.display()
                );
            }
            println!(
                "PASS {} (dropout {dropout}): streaming (depth 1, 2, 4), resident, budget, offloaded activations all equal: losses {:?}",
                path.display(),
                reference.0
            );
        }
    }
}

/// With `profile` on, a step's GPU time comes back by kernel and by phase, every phase of
/// a training step present and the times plausible (positive, within the step).
#[test]
fn profile_reports_kernels_and_phases() {
    if !gpu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let shape = lema::bench::preset("tiny").unwrap();
    let path = lema::bench::write_random_model(dir.path(), &shape, DType::BF16, 4, 0.5).unwrap();
    let mut c = LemaConfig::new(&path);
    c.device = Device::Cuda;
    c.profile = true;
    c.lora_target_modules = Some(vec!["all-linear".into()]);
    let mut m = LemaModel::new(c).unwrap();
    m.initialize_lora().unwrap();
    let mut t = Trainer::new(m, OptimizerConfig::adamw(1e-3)).unwrap();
    let ids: Vec<u32> = (0..2 * 16).map(|i| i % 200).collect();
    let b = Batch::language_modeling(ids, 2, 16).unwrap();
    t.train_step(&b).unwrap();
    t.model.profile_take().unwrap();
    let start = std::time::Instant::now();
    t.train_step(&b).unwrap();
    let wall_ms = start.elapsed().as_secs_f64() * 1e3;
    let lines = t.model.profile_take().unwrap().expect("profiling is on");
    let get = |label: &str| lines.iter().find(|l| l.label == label);
    for phase in ["forward", "head", "backward", "optimizer"] {
        let busy =
            get(&format!("busy: {phase}")).unwrap_or_else(|| panic!("no {phase}: {lines:?}"));
        assert!(busy.ms > 0.0 && busy.calls > 0, "{busy:?}");
    }
    let gemm = get("gemm half").expect("bf16 GEMMs are timed");
    assert!(gemm.calls > 0 && gemm.ms > 0.0);
    let busy: f64 = lines
        .iter()
        .filter(|l| l.label.starts_with("busy: "))
        .map(|l| l.ms)
        .sum();
    assert!(
        busy < wall_ms,
        "{busy} ms of GPU work in a {wall_ms} ms step"
    );
    assert!(lines.iter().all(|l| l.ms >= 0.0));
    // nothing left over for the next call
    let again = t.model.profile_take().unwrap().unwrap();
    assert!(again.is_empty(), "{again:?}");
    println!("PASS profile: {busy:.2} ms busy of a {wall_ms:.2} ms step");
}

/// `zeros_host` buffers (mapped host memory) behave like device buffers in every op that
/// touches memory: zeroed, downloaded, zero-filled, parked and unparked, and the AdamW and
/// SGD kernels, reading and writing them over the bus, give the bits of device moments.
#[test]
fn host_mapped_buffers_match_device_buffers() {
    use lema::backend::{AdamWStep, Backend, DeviceBuf, SgdStep};
    if !gpu() {
        return;
    }
    let be = lema::backend::cuda::CudaBackend::new(0).unwrap();
    let n = 100_003; // not a multiple of a block
    let mut r = Rng::new(11);
    let mut fresh = || -> Vec<f32> { (0..n).map(|_| r.normal() as f32).collect() };
    let (p0, g1, g2) = (fresh(), fresh(), fresh());

    let mut m_host = be.zeros_host(n).unwrap();
    assert!(m_host.is_host_mapped());
    assert_eq!(m_host.len(), n);
    assert!(be.download(&m_host).unwrap().iter().all(|&x| x == 0.0));
    let mut v_host = be.zeros_host(n).unwrap();
    let (mut m_dev, mut v_dev) = (be.zeros(n).unwrap(), be.zeros(n).unwrap());
    assert!(!m_dev.is_host_mapped());
    let (mut p_host, mut p_dev) = (be.upload(&p0).unwrap(), be.upload(&p0).unwrap());
    for (step, g) in [(1, &g1), (2, &g2), (3, &g1)] {
        let g = be.upload(g).unwrap();
        let h = AdamWStep {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            step,
        };
        be.adamw_step(&mut p_host, &g, &mut m_host, &mut v_host, h)
            .unwrap();
        be.adamw_step(&mut p_dev, &g, &mut m_dev, &mut v_dev, h)
            .unwrap();
    }
    let bits = |b: &lema::backend::cuda::CudaBuf| -> Vec<u32> {
        be.download(b)
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    };
    let m_bits = bits(&m_dev);
    assert!(m_bits.iter().any(|&b| b != 0), "the moments moved");
    assert_eq!(bits(&p_host), bits(&p_dev), "adamw: parameters differ");
    assert_eq!(bits(&m_host), m_bits, "adamw: exp_avg differs");
    assert_eq!(bits(&v_host), bits(&v_dev), "adamw: exp_avg_sq differs");

    // SGD momentum in host memory
    let (mut b_host, mut b_dev) = (be.zeros_host(n).unwrap(), be.zeros(n).unwrap());
    for (first, g) in [(true, &g1), (false, &g2)] {
        let g = be.upload(g).unwrap();
        let h = SgdStep {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 0.01,
            first,
        };
        be.sgd_step(&mut p_host, &g, &mut b_host, h).unwrap();
        be.sgd_step(&mut p_dev, &g, &mut b_dev, h).unwrap();
    }
    assert_eq!(bits(&p_host), bits(&p_dev), "sgd: parameters differ");
    assert_eq!(bits(&b_host), bits(&b_dev), "sgd: momentum differs");

    // park / unpark a host buffer: back on the device with the same bits
    let before = bits(&b_host);
    let parked = be.park(b_host).unwrap();
    let back = be.unpark(parked).unwrap();
    assert!(!back.is_host_mapped());
    assert_eq!(bits(&back), before, "park/unpark of a host buffer");

    // fill_zero through the device address (stream-ordered)
    be.fill_zero(&mut m_host).unwrap();
    assert!(be.download(&m_host).unwrap().iter().all(|&x| x == 0.0));
    let empty = be.zeros_host(0).unwrap();
    assert!(be.download(&empty).unwrap().is_empty());
    drop((m_host, v_host, empty));
    be.synchronize().unwrap(); // a failed free would surface here
    println!("PASS: host-mapped AdamW/SGD state equals device state bit for bit");
}

/// Training with `offload_optimizer` (AdamW moments in mapped host memory) gives the
/// losses and LoRA weights of device-resident moments bit for bit, and a checkpoint saved
/// with it on resumes onto the same trajectory.
#[test]
fn offloaded_optimizer_matches_device_optimizer_and_resumes() {
    if !gpu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut shape = lema::bench::preset("tiny").unwrap();
    shape.layers = 3;
    let bf16 = lema::bench::write_random_model(dir.path(), &shape, DType::BF16, 4, 0.5).unwrap();
    let trainer = |path: &Path, offload: bool| {
        let mut c = LemaConfig::new(path);
        c.device = Device::Cuda;
        c.offload_optimizer = offload;
        c.lora_rank = 4;
        c.lora_alpha = 8.0;
        c.lora_dropout = 0.1;
        c.lora_target_modules = Some(vec!["all-linear".into()]);
        let mut m = LemaModel::new(c).unwrap();
        m.initialize_lora().unwrap();
        let mut t = Trainer::new(m, OptimizerConfig::adamw(1e-2)).unwrap();
        t.max_grad_norm = Some(1.0);
        t
    };
    for path in [
        bf16.as_path(),
        &fixture("llama_gqa").join("model.safetensors"),
        &fixture("gpt2").join("model.safetensors"),
    ] {
        let mut r = Rng::new(5);
        let mut reference = trainer(path, false);
        let v = reference.model.model_config().vocab_size as u64;
        let ids: Vec<u32> = (0..2 * 16).map(|_| r.below(v) as u32).collect();
        let b = Batch::language_modeling(ids, 2, 16).unwrap();
        let steps = |t: &mut Trainer, n: usize| -> Vec<f64> {
            (0..n).map(|_| t.train_step(&b).unwrap().loss).collect()
        };
        let full = steps(&mut reference, 5);
        assert!(full.iter().all(|l| l.is_finite()), "{full:?}");
        let weights = |t: &Trainer| -> Vec<Vec<f32>> {
            t.model
                .lora_tensors()
                .unwrap()
                .into_iter()
                .map(|(_, _, w)| w)
                .collect()
        };

        let mut straight = trainer(path, true);
        assert_eq!(
            steps(&mut straight, 5),
            full,
            "{}: losses differ with offload_optimizer",
            path.display()
        );
        assert_eq!(
            weights(&straight),
            weights(&reference),
            "{}: LoRA weights differ with offload_optimizer",
            path.display()
        );

        let mut first = trainer(path, true);
        let mut got = steps(&mut first, 3);
        let ck = dir.path().join("ckpt");
        first.save_checkpoint(&ck).unwrap();
        drop(first);
        let mut resumed = Trainer::from_checkpoint(&ck, None).unwrap();
        assert!(resumed.model.config().offload_optimizer);
        assert_eq!(resumed.step(), 3);
        got.extend(steps(&mut resumed, 2));
        assert_eq!(got, full, "{}: resumed run diverged", path.display());
        assert_eq!(
            weights(&resumed),
            weights(&reference),
            "{}: weights differ after resume",
            path.display()
        );
        println!(
            "PASS {}: offloaded optimizer state, straight and resumed, equals device state: {full:?}",
            path.display()
        );
    }
}

/// The staging ring (issue 17): layers read from disk into pinned staging buffers and
/// copied from there give exactly the losses and weights of the registered mapping, at
/// every prefetch depth, with a VRAM budget and with offloaded activations.
#[test]
fn staging_ring_matches_the_mapped_path_exactly() {
    if !gpu() {
        return;
    }
    use lema::tiers::WeightSource::{Disk, Mapped};
    let dir = tempfile::tempdir().unwrap();
    let mut shape = lema::bench::preset("tiny").unwrap();
    shape.layers = 5;
    let path = lema::bench::write_random_model(dir.path(), &shape, DType::BF16, 4, 0.5).unwrap();
    let gbi = lema::gbi::Gbi::open(&path).unwrap();
    let block = gbi.group_bytes(lema::gbi::Group::Layer(0)) as u64;
    let reference = run_from(&path, Strategy::Streaming, 2, None, false, 0.0, 3, Mapped);
    for (strategy, depth, budget, offload) in [
        (Strategy::Streaming, 1, None, false),
        (Strategy::Streaming, 2, None, false),
        (Strategy::Streaming, 4, None, false),
        (Strategy::Budget, 2, Some(2 * block), false), // 2 blocks on the GPU, 3 from disk
        (Strategy::Streaming, 2, None, true),
    ] {
        let got = run_from(&path, strategy, depth, budget, offload, 0.0, 3, Disk);
        assert!(got.0.iter().all(|l| l.is_finite()), "non-finite loss");
        assert_eq!(
            got, reference,
            "{strategy:?} depth {depth} budget {budget:?} offload {offload} from disk differs"
        );
    }
    println!("PASS staging ring: losses {:?}", reference.0);
}

/// Step graphs (`backend/cuda/graph.rs`) replay the eager steps bit for bit: new tokens
/// every step, a packed batch, masked labels, with and without checkpointing, on models
/// of several families and storage types; a step replays only after its shape repeated.
#[test]
fn step_graphs_replay_the_eager_steps_exactly() {
    if !gpu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bf16 =
        lema::bench::write_random_model(dir.path(), &graph_test_shape(), DType::BF16, 4, 0.5)
            .unwrap();
    for path in [
        bf16.as_path(),
        &fixture("llama_gqa").join("model.safetensors"),
        &fixture("gpt2").join("model.safetensors"),
        &fixture("gemma3").join("model.safetensors"),
        &fixture("qwen3").join("model.safetensors"),
    ] {
        assert_graphs_replay_eager_steps(path);
    }
}

/// [`step_graphs_replay_the_eager_steps_exactly`] on an NF4 base, whose weights are
/// expanded inside the step (a test of its own, so that a sanitizer can run it alone).
#[test]
fn step_graphs_replay_the_eager_steps_of_an_nf4_base_exactly() {
    if !gpu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let nf4 = lema::bench::write_random_nf4_model(dir.path(), &graph_test_shape(), 4).unwrap();
    assert_graphs_replay_eager_steps(&nf4);
}

fn graph_test_shape() -> lema::bench::Shape {
    let mut shape = lema::bench::preset("tiny").unwrap();
    shape.layers = 3;
    shape
}

/// Eleven steps of the model at `path` with and without step graphs, checkpointing every
/// block and none: the same losses and adapters, and replays exactly where expected.
fn assert_graphs_replay_eager_steps(path: &Path) {
    let (b, t) = (2, 24);
    let run = |path: &Path, graphs: bool, checkpointing| {
        let mut c = LemaConfig::new(path);
        c.device = Device::Cuda;
        c.strategy = Strategy::Budget;
        c.max_vram = Some(u64::MAX / 2);
        c.gradient_checkpointing = checkpointing;
        c.step_graphs = graphs;
        c.lora_rank = 4;
        c.lora_alpha = 8.0;
        c.lora_target_modules = Some(vec!["all-linear".into()]);
        let mut m = LemaModel::new(c).unwrap();
        m.initialize_lora().unwrap();
        let mut tr = Trainer::new(m, OptimizerConfig::adamw(1e-2)).unwrap();
        let v = tr.model.model_config().vocab_size as u64;
        let mut r = Rng::new(5);
        let mut tokens = || -> Vec<u32> { (0..b * t).map(|_| r.below(v) as u32).collect() };
        let lm = |ids: Vec<u32>| Batch::language_modeling(ids, b, t).unwrap();
        // two examples in each row, split at 10
        let segments: Vec<u32> = (0..b * t).map(|i| u32::from(i % t >= 10)).collect();
        let packed = |ids: Vec<u32>| lm(ids).with_segments(segments.clone()).unwrap();
        let masked = |ids: Vec<u32>| {
            let labels = ids
                .iter()
                .enumerate()
                .map(|(i, &id)| if i % t < 7 { -100 } else { id as i32 })
                .collect();
            Batch::new(ids, labels, b, t).unwrap()
        };
        // (batch, replayed with graphs on): a shape is captured when it repeats and
        // replayed from its third step on
        let steps = [
            (lm(tokens()), false),
            (lm(tokens()), false),
            (lm(tokens()), true),
            (lm(tokens()), true),
            (packed(tokens()), false),
            (packed(tokens()), false),
            (packed(tokens()), true),
            (masked(tokens()), false),
            (masked(tokens()), false),
            (masked(tokens()), true),
            (lm(tokens()), false),
        ];
        let mut losses = Vec::new();
        for (batch, replayed) in &steps {
            let before = tr.model.step_graphs().unwrap().0;
            losses.push(tr.train_step(batch).unwrap().loss);
            let (after, why) = tr.model.step_graphs().unwrap();
            assert_eq!(
                after - before,
                u64::from(graphs && *replayed),
                "{}: step {} (graphs {graphs}) replayed {} times; last capture dropped: {why:?}",
                path.display(),
                losses.len(),
                after - before
            );
        }
        let w: Vec<Vec<f32>> = tr
            .model
            .lora_tensors()
            .unwrap()
            .into_iter()
            .map(|(_, _, w)| w)
            .collect();
        (losses, w)
    };
    for ck in [
        lema::GradientCheckpointing::Every,
        lema::GradientCheckpointing::Off,
    ] {
        let eager = run(path, false, ck);
        let graphed = run(path, true, ck);
        assert!(eager.0.iter().all(|l| l.is_finite()));
        assert_eq!(
            graphed,
            eager,
            "{} ({ck:?}): the step graphs' losses or adapters differ from the eager steps'",
            path.display()
        );
        println!(
            "PASS {} ({ck:?}): 5 of 11 steps replayed, losses and adapters bit-identical: {:?}",
            path.display(),
            eager.0
        );
    }
}
