//! Learning-rate schedules with linear warm-up, as HF transformers'
//! `get_constant_schedule_with_warmup`, `get_linear_schedule_with_warmup` and
//! `get_cosine_schedule_with_warmup` (half a cosine cycle) define them.
//!
//! As in HF, the multiplier is evaluated at the number of optimizer steps already done:
//! the first update uses `lr_at(0)`, which is 0 when there is a warm-up.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// The shape of the schedule after warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// The peak rate throughout.
    Constant,
    /// Linear decay from the peak to 0 at the last step.
    Linear,
    /// Half a cosine from the peak to 0 at the last step.
    Cosine,
}

impl std::str::FromStr for ScheduleKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "constant" => Ok(ScheduleKind::Constant),
            "linear" => Ok(ScheduleKind::Linear),
            "cosine" => Ok(ScheduleKind::Cosine),
            _ => Err(Error::config(format!(
                "unknown learning-rate schedule '{s}'; supported: constant, linear, cosine"
            ))),
        }
    }
}

/// A learning-rate schedule over a run of `total_steps` optimizer steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    /// The peak learning rate.
    pub peak_lr: f64,
    /// Steps of linear warm-up from 0 to the peak.
    pub warmup_steps: u64,
    /// Optimizer steps in the whole run.
    pub total_steps: u64,
}

impl Schedule {
    /// A schedule, rejecting a negative or non-finite peak rate.
    pub fn new(
        kind: ScheduleKind,
        peak_lr: f64,
        warmup_steps: u64,
        total_steps: u64,
    ) -> Result<Self> {
        if !(peak_lr.is_finite() && peak_lr >= 0.0) {
            return Err(Error::config(format!(
                "learning_rate = {peak_lr} must be a finite number ≥ 0"
            )));
        }
        Ok(Schedule {
            kind,
            peak_lr,
            warmup_steps,
            total_steps,
        })
    }

    /// The multiplier of the peak rate after `step` optimizer steps.
    pub fn factor(&self, step: u64) -> f64 {
        let (s, w, t) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if step < self.warmup_steps {
            return s / w.max(1.0);
        }
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine => {
                let progress = (s - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate of the update made after `step` optimizer steps.
    pub fn lr_at(&self, step: u64) -> f64 {
        self.peak_lr * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f64::consts::PI;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1.0)
    }

    #[test]
    fn schedules_match_hf_formulas() {
        // HF's lambdas, written out for warm-up w = 10 over t = 110 steps at peak 3e-4.
        let (w, t, lr) = (10u64, 110u64, 3e-4);
        let hf_warm = |s: u64| s as f64 / w as f64;
        let hf_linear = |s: u64| (t - s) as f64 / (t - w) as f64;
        let hf_cosine =
            |s: u64| 0.5 * (1.0 + (PI * 2.0 * 0.5 * (s - w) as f64 / (t - w) as f64).cos());
        let c = Schedule::new(ScheduleKind::Constant, lr, w, t).unwrap();
        let l = Schedule::new(ScheduleKind::Linear, lr, w, t).unwrap();
        let k = Schedule::new(ScheduleKind::Cosine, lr, w, t).unwrap();
        for s in [0, 1, 5, 9] {
            for sch in [&c, &l, &k] {
                assert!(
                    close(sch.lr_at(s), lr * hf_warm(s)),
                    "{:?} at {s}",
                    sch.kind
                );
            }
        }
        for s in [10, 11, 50, 60, 109, 110] {
            assert!(close(c.lr_at(s), lr), "constant at {s}");
            assert!(
                close(l.lr_at(s), lr * hf_linear(s)),
                "linear at {s}: {}",
                l.lr_at(s)
            );
            assert!(
                close(k.lr_at(s), lr * hf_cosine(s)),
                "cosine at {s}: {}",
                k.lr_at(s)
            );
        }
        // past the end HF clamps at 0
        assert_eq!(l.lr_at(200), 0.0);
        assert!(k.lr_at(110).abs() < 1e-20);
        // the midpoint of the cosine is half the peak
        assert!(close(k.lr_at(60), lr * 0.5));
    }

    #[test]
    fn no_warmup_starts_at_peak() {
        for kind in [
            ScheduleKind::Constant,
            ScheduleKind::Linear,
            ScheduleKind::Cosine,
        ] {
            let s = Schedule::new(kind, 1e-3, 0, 4).unwrap();
            assert!(close(s.lr_at(0), 1e-3), "{kind:?}");
        }
        let l = Schedule::new(ScheduleKind::Linear, 1e-3, 0, 4).unwrap();
        assert!(close(l.lr_at(2), 0.5e-3));
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(Schedule::new(ScheduleKind::Linear, f64::NAN, 0, 1).is_err());
        assert!(Schedule::new(ScheduleKind::Linear, -1.0, 0, 1).is_err());
        let e = "cosinus".parse::<ScheduleKind>().unwrap_err();
        assert!(e.to_string().contains("constant, linear, cosine"), "{e}");
    }
}
