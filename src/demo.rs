//! The demo's task: free-form dates → ISO `YYYY-MM-DD`, an answer that can be checked
//! exactly. Inputs are unambiguous by construction (the month is always a name or an
//! abbreviation, never a number that could be read as a day), drawn from a seed, with a
//! held-out split whose calendar dates never occur in the training split.
//!
//! Also the demo's batches: chat-rendered examples packed into rows, with the loss on
//! the answer only (prompt tokens labelled −100), until the data pipeline of `lema
//! train` is there to do it.

use crate::data::Batch;
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tokenizer::{Message, Tokenizer};
use crate::types::IGNORE_INDEX;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// The system message of every demo prompt.
pub const DATE_SYSTEM_PROMPT: &str =
    "Convert the date to ISO 8601 format (YYYY-MM-DD). Reply with the date only.";

/// One example: a date written freely, and its ISO form.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DateExample {
    pub prompt: String,
    pub completion: String,
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// Days in `month` (1-based) of `year`, Gregorian.
pub fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400) => {
            29
        }
        2 => 28,
        _ => 31,
    }
}

/// `1st`, `2nd`, `3rd`, `4th`, …, `11th`, `12th`, `13th`, `21st`, …
pub fn ordinal(d: u32) -> String {
    let suffix = match (d % 10, d % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{d}{suffix}")
}

/// Number of written forms [`format_date`] knows.
pub const DATE_FORMATS: usize = 14;

/// Date (year, month 1–12, day) written in form `style` (0..[`DATE_FORMATS`]); `abbr`
/// picks abbreviated month names where the form allows both.
pub fn format_date(y: u32, m: u32, d: u32, style: usize, abbr: bool) -> String {
    let full = MONTHS[(m - 1) as usize];
    let short = &full[..3];
    // "Sept" is as common as "Sep"; both are unambiguous
    let mon = if abbr {
        if m == 9 && style.is_multiple_of(2) {
            "Sept"
        } else {
            short
        }
    } else {
        full
    };
    let o = ordinal(d);
    match style {
        0 => format!("{mon} {d}, {y}"),
        1 => format!("{d} {mon} {y}"),
        2 => format!("the {o} of {full}, {y}"),
        3 => format!("{short} {d} {y}"),
        4 => format!("{y}, {full} {d}"),
        5 => format!("{o} {mon} {y}"),
        6 => format!("{mon} {o}, {y}"),
        7 => format!("{d}-{short}-{y}"),
        8 => format!("{short}. {d}, {y}"),
        9 => format!("{y} {mon} {d}"),
        10 => format!("{} {d}, {y}", full.to_uppercase()),
        11 => format!("{d} {} {y}", mon.to_lowercase()),
        12 => format!("{mon} the {o}, {y}"),
        _ => format!("{o} of {mon} {y}"),
    }
}

/// A random calendar date in 1900–2099.
fn random_date(rng: &mut Rng) -> (u32, u32, u32) {
    let y = 1900 + rng.below(200) as u32;
    let m = 1 + rng.below(12) as u32;
    let d = 1 + rng.below(days_in_month(y, m) as u64) as u32;
    (y, m, d)
}

fn example(rng: &mut Rng, (y, m, d): (u32, u32, u32)) -> DateExample {
    let style = rng.below(DATE_FORMATS as u64) as usize;
    let abbr = rng.below(2) == 1;
    DateExample {
        prompt: format_date(y, m, d, style, abbr),
        completion: format!("{y:04}-{m:02}-{d:02}"),
    }
}

/// `n_train` training and `n_test` held-out examples from `seed`. The held-out split is
/// drawn first and no training example has one of its calendar dates.
pub fn date_dataset(
    seed: u64,
    n_train: usize,
    n_test: usize,
) -> (Vec<DateExample>, Vec<DateExample>) {
    let mut rng = Rng::new(seed);
    let mut test_dates = HashSet::new();
    let mut test = Vec::with_capacity(n_test);
    while test.len() < n_test {
        let date = random_date(&mut rng);
        if test_dates.insert(date) {
            test.push(example(&mut rng, date));
        }
    }
    let mut train = Vec::with_capacity(n_train);
    while train.len() < n_train {
        let date = random_date(&mut rng);
        if !test_dates.contains(&date) {
            train.push(example(&mut rng, date));
        }
    }
    (train, test)
}

/// The chat messages of an example's prompt (system instruction + the date).
pub fn date_messages(prompt: &str) -> Vec<Message> {
    vec![
        Message {
            role: "system".into(),
            content: DATE_SYSTEM_PROMPT.into(),
        },
        Message {
            role: "user".into(),
            content: prompt.into(),
        },
    ]
}

/// Token ids of a prompt ready for generation (chat template with the assistant's turn
/// opened).
pub fn prompt_ids(tok: &Tokenizer, prompt: &str) -> Result<Vec<u32>> {
    let text = tok.apply_chat_template(&date_messages(prompt), true)?;
    tok.encode(&text, false)
}

/// One training example as ids and labels: the whole conversation, with the labels of
/// the prompt part set to −100, so the loss is on the answer and the end-of-turn token.
pub fn training_ids(tok: &Tokenizer, ex: &DateExample) -> Result<(Vec<u32>, Vec<i32>)> {
    let prompt = prompt_ids(tok, &ex.prompt)?;
    let mut messages = date_messages(&ex.prompt);
    messages.push(Message {
        role: "assistant".into(),
        content: ex.completion.clone(),
    });
    let text = tok.apply_chat_template(&messages, false)?;
    let ids = tok.encode(&text, false)?;
    if ids.len() <= prompt.len() || ids[..prompt.len()] != prompt[..] {
        return Err(Error::config(format!(
            "the chat template's prompt is not a token prefix of the full conversation for {:?}",
            ex.prompt
        )));
    }
    let labels = ids
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            if i < prompt.len() {
                IGNORE_INDEX
            } else {
                t as i32
            }
        })
        .collect();
    Ok((ids, labels))
}

/// Pack examples (ids, labels) into `rows` rows: each row holds whole examples one after
/// another as separate segments (attention and positions confined to each), padded at
/// the end to the longest row with an ignored segment.
pub fn pack(examples: &[(Vec<u32>, Vec<i32>)], rows: usize, pad_id: u32) -> Result<Batch> {
    if examples.is_empty() || rows == 0 {
        return Err(Error::config("nothing to pack"));
    }
    // deal examples to the shortest row so far
    let mut row_of: Vec<Vec<usize>> = vec![Vec::new(); rows];
    let mut lens = vec![0usize; rows];
    for (i, (ids, _)) in examples.iter().enumerate() {
        let r = (0..rows).min_by_key(|&r| lens[r]).unwrap_or(0);
        row_of[r].push(i);
        lens[r] += ids.len();
    }
    let seq = lens.iter().copied().max().unwrap_or(0);
    let (mut ids, mut labels, mut seg) = (Vec::new(), Vec::new(), Vec::new());
    for (r, members) in row_of.iter().enumerate() {
        let mut s = 0u32;
        for &i in members {
            let (x, l) = &examples[i];
            ids.extend_from_slice(x);
            labels.extend_from_slice(l);
            seg.extend(std::iter::repeat_n(s, x.len()));
            s += 1;
        }
        let pad = seq - lens[r];
        ids.extend(std::iter::repeat_n(pad_id, pad));
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
        seg.extend(std::iter::repeat_n(s, pad));
    }
    Batch::new(ids, labels, rows, seq)?.with_segments(seg)
}

/// Exact-match score of an answer: the text up to the end of its first line, trimmed.
pub fn is_correct(answer: &str, expected: &str) -> bool {
    answer.trim().lines().next().unwrap_or("").trim() == expected
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_valid_iso_dates_of_the_written_date() {
        let (train, test) = date_dataset(1, 400, 100);
        for ex in train.iter().chain(&test) {
            let parts: Vec<u32> = ex
                .completion
                .split('-')
                .map(|p| p.parse().unwrap())
                .collect();
            let (y, m, d) = (parts[0], parts[1], parts[2]);
            assert!((1900..2100).contains(&y) && (1..=12).contains(&m));
            assert!(d >= 1 && d <= days_in_month(y, m), "{ex:?}");
            assert_eq!(ex.completion.len(), 10);
            // the written form names the year, the month and the day
            let p = ex.prompt.to_lowercase();
            assert!(p.contains(&y.to_string()), "{ex:?}");
            assert!(
                p.contains(&MONTHS[m as usize - 1][..3].to_lowercase()),
                "{ex:?}"
            );
            assert!(p.contains(&d.to_string()), "{ex:?}");
        }
    }

    #[test]
    fn splits_are_disjoint_and_seeded() {
        let (train, test) = date_dataset(7, 2000, 200);
        assert_eq!((train.len(), test.len()), (2000, 200));
        let held: HashSet<&str> = test.iter().map(|e| e.completion.as_str()).collect();
        assert_eq!(held.len(), 200);
        assert!(train.iter().all(|e| !held.contains(e.completion.as_str())));
        assert_eq!(date_dataset(7, 2000, 200), (train.clone(), test));
        assert_ne!(date_dataset(8, 2000, 200).0, train);
    }

    #[test]
    fn calendar_and_forms() {
        assert_eq!(days_in_month(2000, 2), 29);
        assert_eq!(days_in_month(1900, 2), 28);
        assert_eq!(days_in_month(2024, 2), 29);
        assert_eq!(days_in_month(2023, 9), 30);
        let want = [
            "March 5, 2021",
            "5 March 2021",
            "the 5th of March, 2021",
            "Mar 5 2021",
            "2021, March 5",
            "5th March 2021",
            "March 5th, 2021",
            "5-Mar-2021",
            "Mar. 5, 2021",
            "2021 March 5",
            "MARCH 5, 2021",
            "5 march 2021",
            "March the 5th, 2021",
            "5th of March 2021",
        ];
        for (s, w) in want.iter().enumerate() {
            assert_eq!(format_date(2021, 3, 5, s, false), *w);
        }
        assert_eq!(format_date(2021, 9, 22, 0, true), "Sept 22, 2021");
        for (d, o) in [
            (1, "1st"),
            (2, "2nd"),
            (3, "3rd"),
            (11, "11th"),
            (12, "12th"),
            (22, "22nd"),
            (31, "31st"),
        ] {
            assert_eq!(ordinal(d), o);
        }
    }

    #[test]
    fn packing_keeps_examples_whole_and_labels_aligned() {
        let ex = vec![
            (vec![1, 2, 3], vec![-100, 2, 3]),
            (vec![4, 5], vec![-100, 5]),
            (vec![6, 7, 8, 9], vec![-100, -100, 8, 9]),
        ];
        let b = pack(&ex, 2, 0).unwrap();
        // dealt to the shorter row: [ex0] and [ex1, ex2]
        assert_eq!((b.batch, b.seq), (2, 6));
        assert_eq!(b.input_ids, vec![1, 2, 3, 0, 0, 0, 4, 5, 6, 7, 8, 9]);
        assert_eq!(
            b.labels,
            vec![-100, 2, 3, -100, -100, -100, -100, 5, -100, -100, 8, 9]
        );
        assert_eq!(
            b.segment_ids.as_ref().unwrap(),
            &vec![0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1]
        );
        // every answer token is scored once, and nothing across examples
        assert_eq!(b.counted_tokens(), 2 + 1 + 2);
        assert!(pack(&[], 2, 0).is_err());
    }

    #[test]
    fn exact_match() {
        assert!(is_correct(" 2021-03-05\n", "2021-03-05"));
        assert!(is_correct("2021-03-05\nmore", "2021-03-05"));
        assert!(!is_correct("The date is 2021-03-05", "2021-03-05"));
        assert!(!is_correct("", "2021-03-05"));
    }
}
