//! LoRA adapters with PEFT semantics: `A` `[R, in]` kaiming-uniform (a = √5, bound
//! 1/√in), `B` `[out, R]` zeros, output adds `(drop(x)·Aᵀ·Bᵀ)·scale` with scale α/R
//! (α/√R with rsLoRA). Masters, gradients and optimizer moments are f32.

use crate::backend::{Backend, DeviceBuf};
use crate::error::{Error, Result};
use crate::linears::{BlockLinears, LinearSpec};
use crate::rng::{Rng, mix_seed};
use serde::{Deserialize, Serialize};

/// The adapter's hyper-parameters (PEFT's `LoraConfig` subset that lema supports).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f32,
    pub dropout: f32,
    /// Module names as PEFT matches them: a module is adapted when its path equals an
    /// entry or ends with `.` + entry. `all-linear` adapts every linear of every block.
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
}

impl LoraConfig {
    /// The multiplier of the LoRA branch: α/r, or α/√r with rsLoRA.
    pub fn scale(&self) -> f32 {
        if self.use_rslora {
            self.alpha / (self.r as f32).sqrt()
        } else {
            self.alpha / self.r as f32
        }
    }

    /// Reject values PEFT would reject or that make no sense.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::config("lora_rank must be at least 1"));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(Error::config(format!(
                "lora_alpha must be a positive number, got {}",
                self.alpha
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config(format!(
                "lora_dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if self.target_modules.is_empty() {
            return Err(Error::config("lora_target_modules is empty"));
        }
        Ok(())
    }

    /// Whether the module at `path` (e.g. `model.layers.0.self_attn.q_proj`) is adapted.
    pub fn targets(&self, path: &str) -> bool {
        self.target_modules
            .iter()
            .any(|t| t == "all-linear" || path == t || path.ends_with(&format!(".{t}")))
    }
}

/// One adapted linear: its PEFT module path, shapes, parameters and gradients.
pub struct LoraModule<B: Backend> {
    /// Full HF module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    /// Block index.
    pub layer: usize,
    /// Module path relative to the block (`self_attn.q_proj`).
    pub linear: &'static str,
    pub in_features: usize,
    pub out_features: usize,
    /// `[R, in]`
    pub a: B::Buf,
    /// `[out, R]`
    pub b: B::Buf,
    /// Gradient of `a`, `[R, in]` (accumulated).
    pub da: B::Buf,
    /// Gradient of `b`, `[out, R]` (accumulated).
    pub db: B::Buf,
    /// `a` and `b` rounded to the type the frozen GEMMs read ([`Backend::gemm_input`]),
    /// made with the block's others before its first linear
    /// ([`BlockLora::make_gemm_copies`]) or else on first use
    /// ([`LoraModule::gemm_copies`]), and dropped by every mutable access
    /// to the parameters ([`LoraParams::named_params_mut`]) and at the start of every pass
    /// ([`LoraParams::drop_gemm_copies`]): the adapter's GEMMs of one pass share one
    /// rounding of each matrix instead of casting it for every GEMM.
    gemm_copies: CopiesCell<B>,
}

impl<B: Backend> LoraModule<B> {
    /// `a` and `b` as the adapter's GEMMs read them next to the frozen weight `w`: their
    /// copies in `w`'s half type when the backend's GEMMs round to it, else the parameters
    /// themselves.
    pub fn gemm_copies(&self, be: &B, w: &B::Buf) -> Result<[&B::Buf; 2]> {
        copies_of(&self.gemm_copies, &self.a, &self.b, be, w)
    }

    /// [`LoraModule::gemm_copies`] beside mutable access to the gradients (dA, dB), for
    /// the backward.
    pub fn gemm_copies_and_grads(&mut self, be: &B, w: &B::Buf) -> Result<CopiesAndGrads<'_, B>> {
        let copies = copies_of(&self.gemm_copies, &self.a, &self.b, be, w)?;
        Ok((copies, &mut self.da, &mut self.db))
    }
}

/// The adapter's GEMM copies of A and B, and its gradients dA and dB.
pub type CopiesAndGrads<'m, B> = (
    [&'m <B as Backend>::Buf; 2],
    &'m mut <B as Backend>::Buf,
    &'m mut <B as Backend>::Buf,
);

/// A module's cell of GEMM copies (see [`LoraModule::gemm_copies`]).
type CopiesCell<B> = std::sync::OnceLock<Option<[<B as Backend>::Buf; 2]>>;

/// Fill an empty `cell` with the GEMM copies of A and B (when the backend made both).
fn store_copies<B: Backend>(cell: &CopiesCell<B>, a: Option<B::Buf>, b: Option<B::Buf>) {
    let copies = match (a, b) {
        (Some(a), Some(b)) => Some([a, b]),
        _ => None,
    };
    let _ = cell.set(copies);
}

fn copies_of<'m, B: Backend>(
    cell: &'m CopiesCell<B>,
    a: &'m B::Buf,
    b: &'m B::Buf,
    be: &B,
    w: &B::Buf,
) -> Result<[&'m B::Buf; 2]> {
    if cell.get().is_none() {
        store_copies::<B>(cell, be.gemm_input(a, w)?, be.gemm_input(b, w)?);
    }
    Ok(match cell.get().and_then(Option::as_ref) {
        Some([a, b]) => [a, b],
        None => [a, b],
    })
}

/// Key of a LoRA matrix in PEFT's `adapter_model.safetensors`.
pub fn peft_key(path: &str, which: char) -> String {
    format!("base_model.model.{path}.lora_{which}.weight")
}

/// All adapters of a model, ordered by block then by the block's linear order.
pub struct LoraParams<B: Backend> {
    pub cfg: LoraConfig,
    pub modules: Vec<LoraModule<B>>,
    /// `layer_range[i]` indexes the modules of block i.
    layer_range: Vec<std::ops::Range<usize>>,
}

/// The adapters of one block, plus what a forward needs to apply them.
pub struct BlockLora<'a, B: Backend> {
    pub modules: &'a mut [LoraModule<B>],
    pub r: usize,
    pub scale: f32,
    pub dropout: f32,
    /// Seed of this block's dropout masks for this micro-batch.
    pub seed: u64,
}

impl<B: Backend> BlockLora<'_, B> {
    /// No adapter: the block runs as the base model.
    pub fn none() -> BlockLora<'static, B> {
        BlockLora {
            modules: &mut [],
            r: 0,
            scale: 0.0,
            dropout: 0.0,
            seed: 0,
        }
    }

    /// The adapter of `linear`, if that linear is adapted, with its position (for seeds).
    pub fn find(&self, linear: &str) -> Option<(usize, &LoraModule<B>)> {
        self.modules
            .iter()
            .enumerate()
            .find(|(_, m)| m.linear == linear)
    }

    /// Mutable access to the adapter of `linear`.
    pub fn find_mut(&mut self, linear: &str) -> Option<(usize, &mut LoraModule<B>)> {
        self.modules
            .iter_mut()
            .enumerate()
            .find(|(_, m)| m.linear == linear)
    }

    /// The adapters of the linears `names` (None where one is not adapted), mutably and
    /// all at once.
    pub fn group_mut(&mut self, names: &[&str]) -> Vec<Option<&mut LoraModule<B>>> {
        let mut out: Vec<Option<&mut LoraModule<B>>> = names.iter().map(|_| None).collect();
        for m in self.modules.iter_mut() {
            if let Some(i) = names.iter().position(|n| *n == m.linear) {
                out[i] = Some(m);
            }
        }
        out
    }

    /// Dropout seed of the module at position `idx` of this block.
    pub fn module_seed(&self, idx: usize) -> u64 {
        mix_seed(&[self.seed, idx as u64])
    }

    /// Make the GEMM copies ([`LoraModule::gemm_copies`]) of every adapter of this block
    /// that has none yet, all in one [`Backend::gemm_input_all`] (one launch on CUDA instead
    /// of two a module); `weight(linear)` is the frozen weight beside which the adapter of
    /// `linear` runs. The same copies as the adapters' first GEMMs would make.
    pub fn make_gemm_copies<'w>(
        &self,
        be: &B,
        weight: impl Fn(&'static str) -> Result<&'w B::Buf>,
    ) -> Result<()>
    where
        B::Buf: 'w,
    {
        let todo: Vec<&LoraModule<B>> = (self.modules.iter())
            .filter(|m| m.gemm_copies.get().is_none())
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        // every A, then every B: the A copies of linears that share an input are then
        // equally long neighbours, as one group GEMM reads them (`Backend::matmul_group`)
        let mut pairs = Vec::with_capacity(2 * todo.len());
        for m in &todo {
            pairs.push((&m.a, weight(m.linear)?));
        }
        for m in &todo {
            pairs.push((&m.b, weight(m.linear)?));
        }
        let mut copies = be.gemm_input_all(&pairs)?;
        let bs = copies.split_off(todo.len());
        for ((m, a), b) in todo.into_iter().zip(copies).zip(bs) {
            store_copies::<B>(&m.gemm_copies, a, b);
        }
        Ok(())
    }
}

impl<B: Backend> LoraParams<B> {
    /// Adapters for every targeted linear of `blocks`, initialised as PEFT does: A
    /// kaiming-uniform from `rng`, B zero. A target list that matches nothing is an error.
    pub fn init(be: &B, blocks: BlockLinears<'_>, cfg: &LoraConfig, rng: &mut Rng) -> Result<Self> {
        Self::build(be, blocks, cfg, |spec| {
            let bound = 1.0 / (spec.linear.in_features as f64).sqrt();
            let a: Vec<f32> = (0..cfg.r * spec.linear.in_features)
                .map(|_| rng.uniform(-bound, bound) as f32)
                .collect();
            let b = vec![0.0f32; spec.linear.out_features * cfg.r];
            Ok((a, b))
        })
    }

    /// Adapters whose A and B come from `load(path, spec)`.
    pub fn build(
        be: &B,
        blocks: BlockLinears<'_>,
        cfg: &LoraConfig,
        mut load: impl FnMut(&ModuleSpec) -> Result<(Vec<f32>, Vec<f32>)>,
    ) -> Result<Self> {
        cfg.validate()?;
        let (linears, n_layers) = (blocks.linears, blocks.layers);
        // checked before anything is allocated: A and B hold r × (in + out) scalars
        if let Some(lin) = linears
            .iter()
            .filter(|l| {
                (0..n_layers)
                    .any(|i| cfg.targets(&format!("{}{}", (blocks.block_prefix)(i), l.name)))
            })
            .min_by_key(|l| l.in_features.min(l.out_features))
        {
            let most = lin.in_features.min(lin.out_features);
            if cfg.r > most {
                return Err(Error::config(format!(
                    "lora_rank = {} is more than {most}, the smaller side of the adapted linear {} ([{}, {}]): an update of that linear has rank at most {most}; set lora_rank to at most {most}",
                    cfg.r, lin.name, lin.out_features, lin.in_features
                )));
            }
        }
        let mut modules = Vec::new();
        let mut layer_range = Vec::with_capacity(n_layers);
        for layer in 0..n_layers {
            let start = modules.len();
            let mut loaded = Vec::new();
            for lin in linears {
                let path = format!("{}{}", (blocks.block_prefix)(layer), lin.name);
                if !cfg.targets(&path) {
                    continue;
                }
                let spec = ModuleSpec {
                    path,
                    layer,
                    linear: lin.clone(),
                    r: cfg.r,
                };
                let (a, b) = load(&spec)?;
                loaded.push((spec.path, lin, a, b));
            }
            // a block's dA in one group: those of linears that share an input lie at one
            // stride, as their group GEMM writes them (`Backend::zeros_group`)
            let da_lens: Vec<usize> = loaded.iter().map(|(_, _, a, _)| a.len()).collect();
            let das = be.zeros_group(&da_lens)?;
            for ((path, lin, a, b), da) in loaded.into_iter().zip(das) {
                modules.push(LoraModule {
                    a: be.upload(&a)?,
                    b: be.upload(&b)?,
                    da,
                    db: be.zeros(b.len())?,
                    path,
                    layer,
                    linear: lin.name,
                    in_features: lin.in_features,
                    out_features: lin.out_features,
                    gemm_copies: Default::default(),
                });
            }
            layer_range.push(start..modules.len());
        }
        if modules.is_empty() {
            let names: Vec<&str> = linears.iter().map(|l| l.name).collect();
            return Err(Error::config(format!(
                "lora_target_modules {:?} match no module of this model; its block linears are {:?}",
                cfg.target_modules, names
            )));
        }
        Ok(LoraParams {
            cfg: cfg.clone(),
            modules,
            layer_range,
        })
    }

    /// The adapters of block `layer`, with dropout seed `seed`.
    pub fn block(&mut self, layer: usize, seed: u64) -> BlockLora<'_, B> {
        let range = self.layer_range.get(layer).cloned().unwrap_or(0..0);
        BlockLora {
            r: self.cfg.r,
            scale: self.cfg.scale(),
            dropout: self.cfg.dropout,
            seed,
            modules: &mut self.modules[range],
        }
    }

    /// The adapters of block `layer` when there are adapters, else none (the base
    /// model), with dropout probability `dropout`.
    pub fn block_or_none(
        lora: Option<&mut Self>,
        layer: usize,
        seed: u64,
        dropout: f32,
    ) -> BlockLora<'_, B> {
        match lora {
            Some(l) => {
                let mut bl = l.block(layer, seed);
                bl.dropout = dropout;
                bl
            }
            None => BlockLora::none(),
        }
    }

    /// `target_modules` as PEFT itself saves them: `all-linear` resolved to the full paths
    /// of the modules it adapted (`model.layers.0.self_attn.q_proj`, ...; PEFT 0.21 writes
    /// exactly these, as an unordered set, and refuses `all-linear` when loading a saved
    /// adapter), sorted; any other list as given. Both select the same modules under
    /// PEFT's (and lema's) matching: equal to an entry or ending with `.` + entry.
    pub fn peft_target_modules(&self) -> Vec<String> {
        if !self.cfg.target_modules.iter().any(|t| t == "all-linear") {
            return self.cfg.target_modules.clone();
        }
        let mut paths: Vec<String> = self.modules.iter().map(|m| m.path.clone()).collect();
        paths.sort();
        paths
    }

    /// Number of trainable scalars.
    pub fn num_parameters(&self) -> usize {
        self.modules.iter().map(|m| m.a.len() + m.b.len()).sum()
    }

    /// Zero every gradient (in one launch where the backend can).
    pub fn zero_grads(&mut self, be: &B) -> Result<()> {
        let mut grads: Vec<&mut B::Buf> = self
            .modules
            .iter_mut()
            .flat_map(|m| [&mut m.da, &mut m.db])
            .collect();
        be.fill_zero_all(&mut grads)
    }

    /// Drop every module's GEMM copies of A and B ([`LoraModule::gemm_copies`]), so the
    /// next pass rounds the parameters as they are now. Every pass over the model starts
    /// with it (a training or evaluation call, a generation's cache): between calls a host
    /// optimizer may have written the parameters through shared memory (DLPack), which no
    /// `&mut` access here sees.
    pub fn drop_gemm_copies(&mut self) {
        for m in &mut self.modules {
            m.gemm_copies = Default::default();
        }
    }

    /// Every trainable tensor as (PEFT key, parameter, gradient), in a fixed order.
    pub fn named_params_mut(&mut self) -> Vec<(String, &mut B::Buf, &mut B::Buf)> {
        let mut out = Vec::with_capacity(self.modules.len() * 2);
        for m in &mut self.modules {
            m.gemm_copies = Default::default(); // the parameters may change
            out.push((peft_key(&m.path, 'A'), &mut m.a, &mut m.da));
            out.push((peft_key(&m.path, 'B'), &mut m.b, &mut m.db));
        }
        out
    }

    /// Every trainable tensor as (PEFT key, shape, parameter, gradient), in a fixed order.
    pub fn named_params(&self) -> Vec<NamedParam<'_, B>> {
        let r = self.cfg.r;
        let mut out = Vec::with_capacity(self.modules.len() * 2);
        for m in &self.modules {
            out.push((peft_key(&m.path, 'A'), [r, m.in_features], &m.a, &m.da));
            out.push((peft_key(&m.path, 'B'), [m.out_features, r], &m.b, &m.db));
        }
        out
    }
}

/// (PEFT key, shape `[rows, cols]`, parameter, gradient).
pub type NamedParam<'a, B> = (
    String,
    [usize; 2],
    &'a <B as Backend>::Buf,
    &'a <B as Backend>::Buf,
);

/// What a loader needs to know about one adapted linear.
pub struct ModuleSpec {
    pub path: String,
    pub layer: usize,
    pub linear: LinearSpec,
    pub r: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(targets: &[&str]) -> LoraConfig {
        LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: targets.iter().map(|s| s.to_string()).collect(),
            use_rslora: false,
        }
    }

    #[test]
    fn peft_style_matching() {
        let c = cfg(&["q_proj", "c_proj"]);
        assert!(c.targets("model.layers.0.self_attn.q_proj"));
        assert!(!c.targets("model.layers.0.self_attn.qq_proj"));
        assert!(c.targets("transformer.h.1.attn.c_proj"));
        assert!(c.targets("transformer.h.1.mlp.c_proj"));
        let c = cfg(&["mlp.c_proj"]);
        assert!(!c.targets("transformer.h.1.attn.c_proj"));
        assert!(c.targets("transformer.h.1.mlp.c_proj"));
    }

    #[test]
    fn scale_and_validation() {
        let mut c = cfg(&["q_proj"]);
        assert_eq!(c.scale(), 2.0);
        c.use_rslora = true;
        assert_eq!(c.scale(), 4.0);
        c.r = 0;
        assert!(c.validate().unwrap_err().to_string().contains("lora_rank"));
        let mut c = cfg(&["q_proj"]);
        c.dropout = 1.0;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("lora_dropout")
        );
        let c = cfg(&[]);
        assert!(c.validate().unwrap_err().to_string().contains("empty"));
    }
}
