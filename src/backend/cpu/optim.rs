//! Optimizer updates with PyTorch's semantics and order of operations
//! (`torch.optim.AdamW` and `torch.optim.SGD`, single-tensor path). Scalar
//! hyper-parameter arithmetic is done in f64, as Python does, then rounded to T.

use rayon::prelude::*;

use super::CpuFloat;
use super::elementwise::PAR_MIN;
use crate::backend::{AdamWStep, SgdStep};

/// torch's `lerp(a, b, w)`: `a + w·(b − a)` for |w| < ½, else `b − (b − a)·(1 − w)`.
#[inline]
fn lerp<T: CpuFloat>(a: T, b: T, w: T) -> T {
    if w.abs() < T::from_f64(0.5) {
        a + w * (b - a)
    } else {
        b - (b - a) * (T::one() - w)
    }
}

/// One AdamW update of p `[n]` with gradient g and moments m, v `[n]`; `h.step` ≥ 1.
pub(crate) fn adamw_step<T: CpuFloat>(
    p: &mut [T],
    g: &[T],
    m: &mut [T],
    v: &mut [T],
    h: &AdamWStep,
) {
    let (lr, b1, b2, wd) = (
        h.lr as f64,
        h.beta1 as f64,
        h.beta2 as f64,
        h.weight_decay as f64,
    );
    let step = h.step as f64;
    let decay = T::from_f64(1.0 - lr * wd);
    let w1 = T::from_f64(1.0 - b1);
    let (beta2, w2) = (T::from_f64(b2), T::from_f64(1.0 - b2));
    let bias_correction1 = 1.0 - b1.powf(step);
    let bias_correction2 = 1.0 - b2.powf(step);
    let neg_step_size = T::from_f64(-(lr / bias_correction1));
    let bias_correction2_sqrt = T::from_f64(bias_correction2.sqrt());
    let eps = T::from_f32(h.eps);
    p.par_iter_mut()
        .zip(g.par_iter())
        .zip(m.par_iter_mut().zip(v.par_iter_mut()))
        .with_min_len(PAR_MIN)
        .for_each(|((p, &g), (m, v))| {
            // param.mul_(1 - lr * weight_decay)
            if wd != 0.0 {
                *p = *p * decay;
            }
            // exp_avg.lerp_(grad, 1 - beta1)
            *m = lerp(*m, g, w1);
            // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            *v = *v * beta2 + w2 * g * g;
            // denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            let denom = v.sqrt() / bias_correction2_sqrt + eps;
            // param.addcdiv_(exp_avg, denom, value=-step_size)
            *p = *p + neg_step_size * *m / denom;
        });
}

/// One SGD update of p `[n]` with gradient g and momentum buffer buf `[n]` (dampening 0,
/// no Nesterov): `d = g + wd·p; buf = first ? d : momentum·buf + d; p −= lr·buf`.
pub(crate) fn sgd_step<T: CpuFloat>(p: &mut [T], g: &[T], buf: &mut [T], h: &SgdStep) {
    let wd = T::from_f32(h.weight_decay);
    let momentum = T::from_f32(h.momentum);
    let neg_lr = T::from_f64(-(h.lr as f64));
    // torch skips the buffer without momentum; writing buf = d then is the same update.
    let fresh = h.first || h.momentum == 0.0;
    p.par_iter_mut()
        .zip(g.par_iter().zip(buf.par_iter_mut()))
        .with_min_len(PAR_MIN)
        .for_each(|(p, (&g, b))| {
            // grad = grad.add(param, alpha=weight_decay)
            let d = if h.weight_decay != 0.0 {
                g + wd * *p
            } else {
                g
            };
            // buf = clone(grad) | buf.mul_(momentum).add_(grad)
            *b = if fresh { d } else { *b * momentum + d };
            // param.add_(buf, alpha=-lr)
            *p = *p + neg_lr * *b;
        });
}
