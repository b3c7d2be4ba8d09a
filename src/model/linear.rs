//! A frozen linear layer with an optional LoRA branch — the one place where the
//! `x·Wᵀ + scale·(drop(x)·Aᵀ)·Bᵀ` forward and its backward are written.

use super::{Keep, Saved, keep_in};
use crate::backend::{Accumulate, Backend, Gemm};
use crate::error::Result;
use crate::lora::BlockLora;

pub use crate::linears::Layout;

/// A frozen linear of a block: weight, optional bias, shapes.
pub struct Linear<'a, B: Backend> {
    /// Module path relative to the block (`self_attn.q_proj`), as LoRA modules name it.
    pub name: &'static str,
    pub w: &'a B::Buf,
    pub bias: Option<&'a B::Buf>,
    pub layout: Layout,
    pub in_features: usize,
    pub out_features: usize,
}

fn gemm(
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    alpha: f32,
    acc: Accumulate,
) -> Gemm {
    Gemm {
        m,
        n,
        k,
        trans_a,
        trans_b,
        alpha,
        accumulate: acc,
    }
}

/// The input of one or more linears that read the same activation: the f32 values and,
/// when the backend's GEMMs read activations rounded to the weights' half type, that
/// rounded copy, made on first use and shared (q, k and v read one input; so do gate and
/// up).
pub struct LinearInput<'x, B: Backend> {
    /// The activation: f32, or only its GEMM copy when a block kept just that for the
    /// backward ([`keep_for_backward`]).
    pub x: &'x B::Buf,
    /// A weight of the linears that read this input (its type decides the rounding).
    w: &'x B::Buf,
    /// The row of the block call that `x`'s first row is (a tile's start), so that LoRA
    /// dropout draws the mask of the whole call whatever the tiling.
    first_row: usize,
    half: std::cell::OnceCell<Option<B::Buf>>,
}

impl<'x, B: Backend> LinearInput<'x, B> {
    /// The input `x` of linears whose weight is (of the type of) `w`.
    pub fn new(x: &'x B::Buf, w: &'x B::Buf) -> Self {
        Self::from_row(x, w, 0)
    }

    /// The input `x`, rows `first_row..` of the block call, of linears whose weight is
    /// (of the type of) `w`.
    pub fn from_row(x: &'x B::Buf, w: &'x B::Buf, first_row: usize) -> Self {
        LinearInput {
            x,
            w,
            first_row,
            half: std::cell::OnceCell::new(),
        }
    }

    /// Index in the dropout mask of `x`'s first element, for a linear of `in_features`.
    fn mask_offset(&self, in_features: usize) -> u64 {
        (self.first_row * in_features) as u64
    }

    /// What the GEMMs read: the rounded copy if the backend makes one, else the f32 values.
    fn gemm(&self, be: &B) -> Result<&B::Buf> {
        if self.half.get().is_none() {
            let h = be.gemm_input(self.x, self.w)?;
            let _ = self.half.set(h);
        }
        Ok(self.half.get().and_then(Option::as_ref).unwrap_or(self.x))
    }

    /// The GEMM copy made so far, if any, giving up the input.
    pub fn into_gemm_copy(self) -> Option<B::Buf> {
        self.half.into_inner().flatten()
    }
}

/// What a block keeps of a linear input `x` for the backward when nothing else reads it:
/// without LoRA dropout the backward reads x only through its GEMM copy, so when there
/// is one (half weights) it alone is kept — half the memory, and no second cast.
pub fn keep_for_backward<T>(gemm_copy: Option<T>, x: T, dropout: f32) -> T {
    match gemm_copy {
        Some(h) if dropout == 0.0 => h,
        _ => x,
    }
}

impl<'a, B: Backend> Linear<'a, B> {
    /// The input `x` of this linear, to share with linears that read the same input
    /// (see [`LinearInput`]).
    pub fn input<'x>(&self, x: &'x B::Buf) -> LinearInput<'x, B>
    where
        'a: 'x,
    {
        LinearInput::new(x, self.w)
    }

    /// The input `x`, rows `first_row..` of the block call (a tile), of this linear.
    pub fn input_from<'x>(&self, x: &'x B::Buf, first_row: usize) -> LinearInput<'x, B>
    where
        'a: 'x,
    {
        LinearInput::from_row(x, self.w, first_row)
    }

    /// y `[N, out]` = x `[N, in]`·Wᵀ + bias + LoRA. When `saved` is given, keeps the LoRA
    /// intermediate `t = drop(x)·Aᵀ` `[N, R]` for the backward.
    ///
    /// Order: the LoRA term is written first and the frozen GEMM adds into it (its
    /// epilogue reads the output once), which saves a pass over `y`. Without dropout the
    /// LoRA GEMMs read the same (possibly half-precision) copy of x as the frozen GEMM,
    /// as autocast does; they accumulate and write in f32.
    pub fn forward(
        &self,
        be: &B,
        x: &LinearInput<B>,
        n: usize,
        lora: &BlockLora<B>,
        saved: Option<&mut Saved<B>>,
    ) -> Result<B::Buf> {
        let t = self.lora_t(be, x, n, lora)?;
        self.forward_with_t(be, x, n, lora, t, saved)
    }

    /// [`Linear::forward`] of linears that read one input `x` (q, k and v; gate and up):
    /// the same outputs, with the LoRA intermediates `t = x·Aᵀ` of the adapted ones made
    /// by one GEMM for the group ([`Backend::matmul_group`]) when none drops its input
    /// out. Each `t` is the product [`Linear::forward`] would make, to the rounding of the
    /// kernel that runs it.
    pub fn forward_group<const N: usize>(
        group: [&Self; N],
        be: &B,
        x: &LinearInput<B>,
        n: usize,
        lora: &BlockLora<B>,
        mut saved: Option<&mut Saved<B>>,
    ) -> Result<[B::Buf; N]> {
        let ts = Self::group_t(&group, be, x, n, lora)?;
        let mut out = Vec::with_capacity(N);
        for (lin, t) in group.iter().zip(ts) {
            out.push(lin.forward_with_t(be, x, n, lora, t, saved.as_deref_mut())?);
        }
        out.try_into()
            .map_err(|_| crate::error::Error::internal("forward_group: outputs lost"))
    }

    /// The LoRA intermediates of `group`'s adapted linears (see [`Linear::forward_group`]).
    #[allow(clippy::type_complexity)]
    fn group_t<'l>(
        group: &[&Self],
        be: &B,
        x: &LinearInput<B>,
        n: usize,
        lora: &'l BlockLora<B>,
    ) -> Result<Vec<Option<(B::Buf, &'l crate::lora::LoraModule<B>)>>> {
        let adapted: Vec<_> = group.iter().map(|l| lora.find(l.name)).collect();
        let count = adapted.iter().flatten().count();
        if lora.dropout > 0.0 || count < 2 {
            return group.iter().map(|l| l.lora_t(be, x, n, lora)).collect();
        }
        let (fi, w) = (group[0].in_features, group[0].w);
        let mut a_copies = Vec::with_capacity(count);
        for (lin, m) in group.iter().zip(&adapted) {
            if let Some((_, m)) = m {
                a_copies.push(m.gemm_copies(be, lin.w)?[0]);
            }
        }
        // t_i[N, R] = x[N, in] · A_iᵀ, A_i [R, in]
        let mut ts = be.gemm_output_group(n * lora.r, count, w)?;
        let mut outs: Vec<&mut B::Buf> = ts.iter_mut().collect();
        be.matmul_group(
            &mut outs,
            &[x.gemm(be)?],
            &a_copies,
            gemm(n, lora.r, fi, false, true, 1.0, Accumulate::Overwrite),
        )?;
        let mut ts = ts.into_iter();
        Ok(adapted
            .into_iter()
            .map(|m| m.and_then(|(_, m)| ts.next().map(|t| (t, m))))
            .collect())
    }

    /// [`Linear::forward`] given the LoRA intermediate `t` (and adapter) of this linear,
    /// if it is adapted.
    fn forward_with_t(
        &self,
        be: &B,
        x: &LinearInput<B>,
        n: usize,
        lora: &BlockLora<B>,
        t: Option<(B::Buf, &crate::lora::LoraModule<B>)>,
        saved: Option<&mut Saved<B>>,
    ) -> Result<B::Buf> {
        let (fi, fo) = (self.in_features, self.out_features);
        let mut y = be.uninit(n * fo)?;
        let mut acc = Accumulate::Overwrite;
        if let Some((t, m)) = t {
            // y[N, out] = scale · t · Bᵀ, B [out, R]
            let [_, b] = m.gemm_copies(be, self.w)?;
            be.matmul(
                &mut y,
                &t,
                b,
                gemm(
                    n,
                    fo,
                    lora.r,
                    false,
                    true,
                    lora.scale,
                    Accumulate::Overwrite,
                ),
            )?;
            acc = Accumulate::Add;
            if let Some(s) = saved {
                s.lora_t.push((self.name, t));
            }
        }
        // y[N, out] (+)= x[N, in] · op(W), W [out, in] (transposed) or [in, out]
        be.matmul(
            &mut y,
            x.gemm(be)?,
            self.w,
            gemm(n, fo, fi, false, self.layout == Layout::OutIn, 1.0, acc),
        )?;
        if let Some(b) = self.bias {
            be.add_bias(&mut y, b)?;
        }
        Ok(y)
    }

    /// A block's last linear with the residual stream added: `residual + forward(x)`;
    /// with [`Keep::SavedOnly`] (a recompute, whose output the first forward made) only
    /// what the backward reads ([`Linear::forward_saved_only`]) and no output.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_residual(
        &self,
        be: &B,
        x: &LinearInput<B>,
        residual: &B::Buf,
        n: usize,
        lora: &BlockLora<B>,
        keep: Keep,
        saved: &mut Saved<B>,
    ) -> Result<Option<B::Buf>> {
        if !keep.output() {
            self.forward_saved_only(be, x, n, lora, saved)?;
            return Ok(None);
        }
        let mut y = self.forward(be, x, n, lora, keep_in(keep, saved))?;
        be.axpy(&mut y, 1.0, residual, Accumulate::Add)?;
        Ok(Some(y))
    }

    /// What a re-run forward must keep when its output is not needed (the last linear of
    /// a recomputed block, whose output the first forward already produced): only the
    /// LoRA intermediate `t`, exactly as [`Linear::forward`] computes it.
    fn forward_saved_only(
        &self,
        be: &B,
        x: &LinearInput<B>,
        n: usize,
        lora: &BlockLora<B>,
        saved: &mut Saved<B>,
    ) -> Result<()> {
        if let Some((t, _)) = self.lora_t(be, x, n, lora)? {
            saved.lora_t.push((self.name, t));
        }
        Ok(())
    }

    /// `t[N, R] = drop(x)[N, in] · Aᵀ` and the adapter, when this linear is adapted.
    fn lora_t<'l>(
        &self,
        be: &B,
        x: &LinearInput<B>,
        n: usize,
        lora: &'l BlockLora<B>,
    ) -> Result<Option<(B::Buf, &'l crate::lora::LoraModule<B>)>> {
        let Some((idx, m)) = lora.find(self.name) else {
            return Ok(None);
        };
        let fi = self.in_features;
        let dropped;
        let xd = if lora.dropout > 0.0 {
            let mut d = be.uninit(n * fi)?;
            be.dropout_forward(
                &mut d,
                x.x,
                lora.dropout,
                lora.module_seed(idx),
                x.mask_offset(fi),
            )?;
            dropped = d;
            &dropped
        } else {
            x.gemm(be)?
        };
        // t[N, R] = xd[N, in] · Aᵀ, A [R, in]; t in the type the B GEMM reads
        let [a, _] = m.gemm_copies(be, self.w)?;
        let mut t = be.gemm_output(n * lora.r, self.w)?;
        be.matmul(
            &mut t,
            xd,
            a,
            gemm(n, lora.r, fi, false, true, 1.0, Accumulate::Overwrite),
        )?;
        Ok(Some((t, m)))
    }

    /// Backward of [`Linear::forward`]: `dx (=|+=) dy·W` plus the LoRA branch's input
    /// gradient; adds dA and dB into the adapter's gradients. The weight and bias are
    /// frozen and get none. The LoRA GEMMs read the GEMM copy of dy (and of x) as the
    /// forward's did; the frozen GEMM adds into the LoRA branch's dx.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        be: &B,
        dx: &mut B::Buf,
        dy: &B::Buf,
        x: &LinearInput<B>,
        n: usize,
        lora: &mut BlockLora<B>,
        saved: &Saved<B>,
        acc: Accumulate,
    ) -> Result<()> {
        Self::backward_group([self], be, dx, [dy], x, n, lora, saved, acc)
    }

    /// Backward of [`Linear::forward_group`]: [`Linear::backward`] of each linear in turn
    /// (`dys[i]` the gradient of linear i's output), all adding into `dx`, with the dA of
    /// the adapted ones made by one GEMM for the group ([`Backend::matmul_group`]) when no
    /// dropout makes their inputs differ. dx sums its terms in the same order as the
    /// linears' backwards one after the other.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_group<const N: usize>(
        group: [&Self; N],
        be: &B,
        dx: &mut B::Buf,
        dys: [&B::Buf; N],
        x: &LinearInput<B>,
        n: usize,
        lora: &mut BlockLora<B>,
        saved: &Saved<B>,
        acc: Accumulate,
    ) -> Result<()> {
        if lora.dropout > 0.0 {
            let mut acc = acc;
            for (lin, dy) in group.iter().zip(dys) {
                lin.backward_dropout(be, dx, dy, x, n, lora, saved, acc)?;
                acc = Accumulate::Add;
            }
            return Ok(());
        }
        let (r, scale) = (lora.r, lora.scale);
        let dys: Vec<LinearInput<B>> = group
            .iter()
            .zip(dys)
            .map(|(l, dy)| LinearInput::new(dy, l.w))
            .collect();
        let names: Vec<&str> = group.iter().map(|l| l.name).collect();
        let mods = lora.group_mut(&names);
        let count = mods.iter().flatten().count();
        let mut dts = match count {
            0 => Vec::new(),
            _ => be.gemm_output_group(n * r, count, group[0].w)?,
        };
        // per adapted linear: its index in the group, A's GEMM copy, dA
        let (mut adapted, mut a_copies, mut das) = (Vec::new(), Vec::new(), Vec::new());
        for (i, m) in mods.into_iter().enumerate() {
            let Some(m) = m else { continue };
            let (lin, k) = (group[i], adapted.len());
            let ([a, b], da, db) = m.gemm_copies_and_grads(be, lin.w)?;
            let (t, dy) = (saved.lora_t(lin.name)?, dys[i].gemm(be)?);
            let fo = lin.out_features;
            // forward: y += scale · t · Bᵀ  ⇒  dB[out, R] += scale · dyᵀ · t
            be.matmul(
                db,
                dy,
                t,
                gemm(fo, r, n, true, false, scale, Accumulate::Add),
            )?;
            //                              dt[N, R] = scale · dy · B
            let g = gemm(n, r, fo, false, false, scale, Accumulate::Overwrite);
            be.matmul(&mut dts[k], dy, b, g)?;
            adapted.push(i);
            a_copies.push(a);
            das.push(da);
        }
        if count > 0 {
            // forward: t = x · Aᵀ  ⇒  dA[R, in] += dtᵀ · x
            let fi = group[0].in_features;
            let dt_refs: Vec<&B::Buf> = dts.iter().collect();
            be.matmul_group(
                &mut das,
                &dt_refs,
                &[x.gemm(be)?],
                gemm(r, fi, n, true, false, 1.0, Accumulate::Add),
            )?;
        }
        let mut acc = acc;
        for (i, lin) in group.iter().enumerate() {
            let fi = lin.in_features;
            if let Some(k) = adapted.iter().position(|&j| j == i) {
                //                          dx[N, in] (+)= dt · A
                be.matmul(
                    dx,
                    &dts[k],
                    a_copies[k],
                    gemm(n, fi, r, false, false, 1.0, acc),
                )?;
                acc = Accumulate::Add;
            }
            lin.frozen_backward(be, dx, &dys[i], n, acc)?;
            acc = Accumulate::Add;
        }
        Ok(())
    }

    /// The frozen weight's part of the backward: `dx (+)= dy · op(W)ᵀ`.
    fn frozen_backward(
        &self,
        be: &B,
        dx: &mut B::Buf,
        dy: &LinearInput<B>,
        n: usize,
        acc: Accumulate,
    ) -> Result<()> {
        let (fi, fo) = (self.in_features, self.out_features);
        // forward: y = x · op(W)  ⇒  dx (+)= dy · op(W)ᵀ; W [out, in] is used as stored.
        be.matmul(
            dx,
            dy.gemm(be)?,
            self.w,
            gemm(n, fi, fo, false, self.layout == Layout::InOut, 1.0, acc),
        )
    }

    /// [`Linear::backward`] with LoRA dropout: the adapter's input is this linear's own
    /// dropped-out copy of x, remade from the seeded mask.
    #[allow(clippy::too_many_arguments)]
    fn backward_dropout(
        &self,
        be: &B,
        dx: &mut B::Buf,
        dy: &B::Buf,
        x: &LinearInput<B>,
        n: usize,
        lora: &mut BlockLora<B>,
        saved: &Saved<B>,
        acc: Accumulate,
    ) -> Result<()> {
        let (fi, fo) = (self.in_features, self.out_features);
        let dy = LinearInput::new(dy, self.w);
        let mut acc = acc;
        let (r, scale, p) = (lora.r, lora.scale, lora.dropout);
        let seed = lora.find(self.name).map(|(idx, _)| lora.module_seed(idx));
        if let Some((_, m)) = lora.find_mut(self.name) {
            let t = saved.lora_t(self.name)?;
            let ([a, b], da, db) = m.gemm_copies_and_grads(be, self.w)?;
            be.matmul(
                db,
                dy.gemm(be)?,
                t,
                gemm(fo, r, n, true, false, scale, Accumulate::Add),
            )?;
            let mut dt = be.gemm_output(n * r, self.w)?;
            be.matmul(
                &mut dt,
                dy.gemm(be)?,
                b,
                gemm(n, r, fo, false, false, scale, Accumulate::Overwrite),
            )?;
            // forward: t = xd · Aᵀ  ⇒  dA[R, in] += dtᵀ · xd,  dxd[N, in] = dt · A
            let seed = seed.unwrap_or_default();
            let off = x.mask_offset(fi);
            let mut xd = be.uninit(n * fi)?;
            be.dropout_forward(&mut xd, x.x, p, seed, off)?;
            be.matmul(
                da,
                &dt,
                &xd,
                gemm(r, fi, n, true, false, 1.0, Accumulate::Add),
            )?;
            let mut dxd = be.uninit(n * fi)?;
            be.matmul(
                &mut dxd,
                &dt,
                a,
                gemm(n, fi, r, false, false, 1.0, Accumulate::Overwrite),
            )?;
            // forward: xd = dropout(x)  ⇒  dx (+)= dropout_backward(dxd)
            if acc == Accumulate::Overwrite {
                be.dropout_backward(dx, &dxd, p, seed, off)?;
            } else {
                be.dropout_backward(&mut xd, &dxd, p, seed, off)?;
                be.axpy(dx, 1.0, &xd, Accumulate::Add)?;
            }
            acc = Accumulate::Add;
        }
        self.frozen_backward(be, dx, &dy, n, acc)
    }
}
