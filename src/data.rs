//! Token batches as the trainer consumes them.

use crate::error::{Error, Result};
use crate::types::IGNORE_INDEX;

/// A batch of `batch` sequences of `seq` tokens, row-major. `labels` follow the HF
/// causal-LM convention: the same positions as `input_ids` (the model shifts them, so
/// the logits at t are scored against `labels[t + 1]`), `-100` is not counted.
///
/// A packed batch also has `segment_ids` (`[B·T]`): tokens of one example share an id,
/// and examples are contiguous. Positions restart and attention is confined within each
/// segment, and the last token of a segment is not scored against the next one.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i32>,
    pub batch: usize,
    pub seq: usize,
    pub segment_ids: Option<Vec<u32>>,
}

impl Batch {
    /// A batch, checking that both arrays hold `batch · seq` entries.
    pub fn new(input_ids: Vec<u32>, labels: Vec<i32>, batch: usize, seq: usize) -> Result<Self> {
        let n = batch
            .checked_mul(seq)
            .ok_or_else(|| Error::config("batch × sequence length overflows"))?;
        if batch == 0 || seq == 0 {
            return Err(Error::config(format!(
                "a batch needs at least one sequence of at least one token (got {batch} × {seq})"
            )));
        }
        if input_ids.len() != n || labels.len() != n {
            return Err(Error::config(format!(
                "batch of {batch} × {seq} needs {n} input ids and labels, got {} and {}",
                input_ids.len(),
                labels.len()
            )));
        }
        if let Some(&l) = labels.iter().find(|&&l| l < 0 && l != IGNORE_INDEX) {
            return Err(Error::config(format!(
                "label {l} is negative; only {IGNORE_INDEX} (ignored) is allowed"
            )));
        }
        Ok(Batch {
            input_ids,
            labels,
            batch,
            seq,
            segment_ids: None,
        })
    }

    /// Mark the batch as packed: `segment_ids[i]` names the example token i belongs to.
    /// Each example must be one contiguous run within a row.
    pub fn with_segments(mut self, segment_ids: Vec<u32>) -> Result<Self> {
        if segment_ids.len() != self.input_ids.len() {
            return Err(Error::config(format!(
                "segment_ids has {} entries, the batch has {} tokens",
                segment_ids.len(),
                self.input_ids.len()
            )));
        }
        for (r, row) in segment_ids.chunks(self.seq).enumerate() {
            let mut seen = std::collections::HashSet::new();
            for (t, &id) in row.iter().enumerate() {
                if (t == 0 || id != row[t - 1]) && !seen.insert(id) {
                    return Err(Error::config(format!(
                        "segment {id} of row {r} is split (it resumes at position {t}); each packed example must be contiguous"
                    )));
                }
            }
        }
        self.segment_ids = Some(segment_ids);
        Ok(self)
    }

    /// A batch whose labels are its inputs (plain language modelling).
    pub fn language_modeling(input_ids: Vec<u32>, batch: usize, seq: usize) -> Result<Self> {
        let labels = input_ids.iter().map(|&i| i as i32).collect();
        Self::new(input_ids, labels, batch, seq)
    }

    /// Labels aligned with the logits: row t of each sequence is scored against
    /// `labels[t + 1]`; the last row of each sequence is not scored.
    pub fn shifted_labels(&self) -> Vec<i32> {
        let mut out = vec![IGNORE_INDEX; self.labels.len()];
        for (o, l) in out
            .chunks_exact_mut(self.seq)
            .zip(self.labels.chunks_exact(self.seq))
        {
            o[..self.seq - 1].copy_from_slice(&l[1..]);
        }
        if let Some(seg) = &self.segment_ids {
            // the last token of a packed example does not predict the next example
            for (i, o) in out.iter_mut().enumerate() {
                if (i + 1) % self.seq != 0 && seg[i + 1] != seg[i] {
                    *o = IGNORE_INDEX;
                }
            }
        }
        out
    }

    /// Number of tokens that count towards the loss.
    pub fn counted_tokens(&self) -> usize {
        self.shifted_labels()
            .iter()
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_and_count() {
        let b = Batch::new(vec![1, 2, 3, 4, 5, 6], vec![1, 2, 3, -100, 5, 6], 2, 3).unwrap();
        assert_eq!(b.shifted_labels(), vec![2, 3, -100, 5, 6, -100]);
        assert_eq!(b.counted_tokens(), 4);
    }

    #[test]
    fn packed_shift_stops_at_segment_ends() {
        let b = Batch::new(vec![1, 2, 3, 4, 5, 6], vec![1, 2, 3, 4, 5, 6], 1, 6)
            .unwrap()
            .with_segments(vec![0, 0, 1, 1, 1, 2])
            .unwrap();
        assert_eq!(b.shifted_labels(), vec![2, -100, 4, 5, -100, -100]);
        let e = Batch::new(vec![1; 4], vec![1; 4], 1, 4)
            .unwrap()
            .with_segments(vec![0, 1, 0, 0])
            .unwrap_err();
        assert!(e.to_string().contains("segment 0 of row 0 is split"), "{e}");
    }

    #[test]
    fn bad_batches() {
        let e = Batch::new(vec![1, 2, 3], vec![1, 2, 3], 2, 2).unwrap_err();
        assert!(e.to_string().contains("needs 4 input ids"), "{e}");
        let e = Batch::new(vec![1, 2], vec![1, -5], 1, 2).unwrap_err();
        assert!(e.to_string().contains("label -5"), "{e}");
        let e = Batch::new(vec![], vec![], 0, 2).unwrap_err();
        assert!(e.to_string().contains("at least one"), "{e}");
    }
}
