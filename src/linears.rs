//! What the linears of a block are — names, shapes, weight layout, bias — and where they
//! repeat: shared by the model that runs them (`model`) and the LoRA that adapts them
//! (`lora`), so that neither needs the other's types to describe them.

/// How a frozen weight matrix is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `nn.Linear`: `[out, in]`, y = x·Wᵀ.
    OutIn,
    /// GPT-2's `Conv1D`: `[in, out]`, y = x·W.
    InOut,
}

/// A linear layer inside a block that LoRA may adapt.
#[derive(Clone, Debug)]
pub struct LinearSpec {
    /// Module path relative to the block, as HF names it (`self_attn.q_proj`).
    pub name: &'static str,
    pub in_features: usize,
    pub out_features: usize,
    /// How the frozen weight is stored (`[out, in]`, or Conv1D's `[in, out]`).
    pub layout: Layout,
    /// Whether the linear has a `.bias` tensor.
    pub bias: bool,
}

/// The linears of every block of a model: the same `linears` in each of `layers`
/// blocks, block `i`'s module paths prefixed by `block_prefix(i)` (`model.layers.3.`).
#[derive(Clone, Copy, Debug)]
pub struct BlockLinears<'a> {
    pub linears: &'a [LinearSpec],
    pub layers: usize,
    pub block_prefix: fn(usize) -> String,
}
