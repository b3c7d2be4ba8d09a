use super::*;
use crate::tokenizer::write_byte_level_tokenizer;

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

struct Fixture {
    dir: tempfile::TempDir,
    tok: Tokenizer,
}

fn fixture(template: Option<&str>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    write_byte_level_tokenizer(
        dir.path(),
        &["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        Some("<|endoftext|>"),
        template,
    )
    .unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    Fixture { dir, tok }
}

impl Fixture {
    fn file(&self, name: &str, lines: &[&str]) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, lines.join("\n")).unwrap();
        p
    }
}

fn opts(max: usize, on_bad_line: BadLinePolicy) -> DataOptions {
    DataOptions {
        max_seq_length: max,
        on_bad_line,
    }
}

/// The text of the scored tokens of an example.
fn scored_text(tok: &Tokenizer, e: &Example) -> String {
    let ids: Vec<u32> = e
        .labels
        .iter()
        .filter(|&&l| l != IGNORE_INDEX)
        .map(|&l| l as u32)
        .collect();
    tok.decode(&ids, false).unwrap()
}

#[test]
fn three_formats_label_what_they_should() {
    let f = fixture(Some(CHATML));
    let path = f.file(
        "d.jsonl",
        &[
            r#"{"text": "plain words"}"#,
            r#"{"prompt": "Q: 2+2? A:", "completion": " four"}"#,
            r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]}"#,
            "",
        ],
    );
    let (ex, rep) = load_file(&path, &f.tok, &opts(512, BadLinePolicy::Error)).unwrap();
    assert_eq!((ex.len(), rep.records, rep.skipped.len()), (3, 3, 0));
    assert_eq!(scored_text(&f.tok, &ex[0]), "plain words<|endoftext|>");
    assert_eq!(
        f.tok.decode(&ex[0].input_ids, false).unwrap(),
        "plain words<|endoftext|>"
    );
    assert_eq!(scored_text(&f.tok, &ex[1]), " four<|endoftext|>");
    assert_eq!(
        f.tok.decode(&ex[1].input_ids, false).unwrap(),
        "Q: 2+2? A: four<|endoftext|>"
    );
    assert_eq!(
        scored_text(&f.tok, &ex[2]),
        "hello<|im_end|>\nciao<|im_end|>\n"
    );
    assert_eq!(
        f.tok.decode(&ex[2].input_ids, false).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\nciao<|im_end|>\n"
    );
    assert_eq!(ex.iter().map(|e| e.line).collect::<Vec<_>>(), vec![1, 2, 3]);
}

#[test]
fn malformed_lines_are_reported_with_file_and_line() {
    let f = fixture(Some(CHATML));
    let lines = [
        r#"{"text": "good"}"#,
        r#"{"text": "unterminated"#,
        r#"{"txt": "typo"}"#,
        r#"[1, 2]"#,
        r#"{"prompt": "p", "completion": 5}"#,
        r#"{"messages": [{"role": "user", "content": "no answer"}]}"#,
        r#"{"text": "also good"}"#,
    ];
    let path = f.file("bad.jsonl", &lines);
    let (ex, rep) = load_file(&path, &f.tok, &opts(64, BadLinePolicy::Skip)).unwrap();
    assert_eq!(ex.len(), 2);
    assert_eq!(rep.skipped.len(), 5, "{:?}", rep.skipped);
    let p = path.display().to_string();
    let expect = [
        (2, "not valid JSON"),
        (
            3,
            "no \"text\", \"prompt\"/\"completion\" or \"messages\" field (found: txt)",
        ),
        (4, "expected a JSON object, found a list"),
        (5, "\"completion\" must be a string, found a number"),
        (6, "no \"assistant\" message"),
    ];
    for (got, (line, what)) in rep.skipped.iter().zip(expect) {
        assert!(
            got.starts_with(&format!("{p}:{line}: {what}")),
            "expected {p}:{line}: {what}…, got {got}"
        );
    }
    assert!(rep.summary(64).contains("5 skipped"), "{}", rep.summary(64));

    let e = load_file(&path, &f.tok, &opts(64, BadLinePolicy::Error)).unwrap_err();
    let msg = e.to_string();
    assert!(msg.starts_with(&format!("{p}:2: not valid JSON")), "{msg}");
    assert!(msg.contains("on_bad_line = \"skip\""), "{msg}");
}

#[test]
fn long_examples_are_truncated_and_prompt_only_ones_skipped() {
    let f = fixture(None);
    let long_prompt = "p".repeat(40);
    let lines = [
        format!(r#"{{"text": "{}"}}"#, "x".repeat(100)),
        format!(r#"{{"prompt": "{long_prompt}", "completion": "answer"}}"#),
        r#"{"prompt": "short", "completion": "answer that is long enough to be cut"}"#.to_string(),
    ];
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let path = f.file("long.jsonl", &refs);
    let (ex, rep) = load_file(&path, &f.tok, &opts(16, BadLinePolicy::Skip)).unwrap();
    assert_eq!(ex.len(), 2);
    assert_eq!(rep.truncated, 2);
    assert_eq!(rep.prompt_too_long, 1);
    assert!(
        ex.iter()
            .all(|e| e.input_ids.len() == 16 && e.labels.len() == 16)
    );
    assert!(
        rep.skipped[0].contains(":2: the prompt alone is 40 tokens, max_seq_length is 16"),
        "{:?}",
        rep.skipped
    );
    // the cut prompt/completion example keeps its prompt unscored
    assert_eq!(scored_text(&f.tok, &ex[1]), "answer that");
    let e = load_file(&path, &f.tok, &opts(16, BadLinePolicy::Error)).unwrap_err();
    assert!(
        e.to_string().contains(":2: the prompt alone is 40 tokens"),
        "{e}"
    );
}

#[test]
fn empty_data_sets_are_errors() {
    let f = fixture(None);
    let empty = f.file("empty.jsonl", &["", "  "]);
    let e = load_file(&empty, &f.tok, &opts(16, BadLinePolicy::Skip)).unwrap_err();
    assert!(
        e.to_string().contains("empty data set: it has no records"),
        "{e}"
    );
    let all_bad = f.file("allbad.jsonl", &["{", "{}"]);
    let e = load_file(&all_bad, &f.tok, &opts(16, BadLinePolicy::Skip)).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("none of its 2 records could be used"), "{msg}");
    assert!(msg.contains("allbad.jsonl:2: no \"text\""), "{msg}");
}

#[test]
fn chat_data_needs_a_template_that_renders() {
    let chat = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#;
    let f = fixture(None);
    let path = f.file("chat.jsonl", &[r#"{"text": "ok"}"#, chat]);
    // fatal even when skipping: every chat record would fail the same way
    let e = load_file(&path, &f.tok, &opts(64, BadLinePolicy::Skip)).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("chat.jsonl:2: chat-format record, but the model has no chat_template"),
        "{msg}"
    );

    let raising = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}";
    let f = fixture(Some(raising));
    let sys = r#"{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#;
    let path = f.file("chat.jsonl", &[chat, sys]);
    let (ex, rep) = load_file(&path, &f.tok, &opts(64, BadLinePolicy::Skip)).unwrap();
    assert_eq!(ex.len(), 1);
    assert!(
        rep.skipped[0]
            .contains("chat.jsonl:2: the chat template failed to render this conversation")
            && rep.skipped[0].contains("System role not supported"),
        "{:?}",
        rep.skipped
    );
}

#[test]
fn templates_that_rewrite_history_are_detected() {
    // drops every assistant turn but the last, as reasoning templates do with thoughts
    let t = "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['role'] + ':' + m['content'] + ';' }}{% endif %}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}";
    let f = fixture(Some(t));
    let path = f.file(
        "c.jsonl",
        &[r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}"#],
    );
    let e = load_file(&path, &f.tok, &opts(64, BadLinePolicy::Error)).unwrap_err();
    assert!(
        e.to_string().contains(":1: cannot locate assistant turn 1"),
        "{e}"
    );
}

#[test]
fn text_files_are_cut_into_windows() {
    let f = fixture(None);
    let p = f.dir.path().join("corpus.txt");
    std::fs::write(&p, "abcdefghij").unwrap();
    let (ex, _) = load_file(&p, &f.tok, &opts(4, BadLinePolicy::Error)).unwrap();
    let lens: Vec<usize> = ex.iter().map(|e| e.input_ids.len()).collect();
    assert_eq!(lens, vec![4, 4, 2]);
    let all: Vec<u32> = ex.iter().flat_map(|e| e.input_ids.clone()).collect();
    assert_eq!(f.tok.decode(&all, false).unwrap(), "abcdefghij");
}

fn examples(lens: &[usize]) -> Vec<Example> {
    lens.iter()
        .enumerate()
        .map(|(i, &n)| Example {
            input_ids: vec![i as u32; n],
            labels: vec![i as i32; n],
            line: i + 1,
        })
        .collect()
}

#[test]
fn split_is_disjoint_and_seeded() {
    let ex = examples(&[3; 20]);
    let (tr, ev) = split_validation(ex.clone(), 0.25, 1).unwrap();
    assert_eq!((tr.len(), ev.len()), (15, 5));
    let mut lines: Vec<usize> = tr.iter().chain(&ev).map(|e| e.line).collect();
    lines.sort();
    assert_eq!(lines, (1..=20).collect::<Vec<_>>());
    let (_, ev2) = split_validation(ex.clone(), 0.25, 1).unwrap();
    assert_eq!(ev, ev2);
    let (_, ev3) = split_validation(ex.clone(), 0.25, 2).unwrap();
    assert_ne!(ev, ev3);
    assert!(split_validation(ex.clone(), 1.0, 1).is_err());
    assert!(split_validation(examples(&[3]), 0.5, 1).is_err());
}

/// (row, segment) → example id, checking each segment holds one example's tokens.
fn examples_in(b: &Batch) -> Vec<u32> {
    let mut out = Vec::new();
    let segs = b
        .segment_ids
        .clone()
        .unwrap_or_else(|| vec![0; b.input_ids.len()]);
    for r in 0..b.batch {
        let row = r * b.seq..(r + 1) * b.seq;
        let mut prev = None;
        for t in row {
            if b.labels[t] == IGNORE_INDEX {
                continue; // padding
            }
            if prev != Some(segs[t]) {
                out.push(b.input_ids[t]);
                prev = Some(segs[t]);
            } else {
                assert_eq!(Some(&b.input_ids[t]), out.last(), "segment mixes examples");
            }
        }
    }
    out
}

#[test]
fn packed_epochs_cover_every_example_once_and_reshuffle() {
    let lens = [5, 3, 7, 2, 8, 1, 4, 6, 3, 5, 2, 2];
    let ex = examples(&lens);
    let mut plan = BatchPlan::new(&ex, Layout::Packed, 8, 2, 99, 7, true).unwrap();
    assert!(plan.rows() < ex.len(), "packing should share rows");
    let epoch = |plan: &mut BatchPlan, e: u64| -> Vec<u32> {
        (0..plan.batches_per_epoch())
            .flat_map(|i| {
                let (b, real) = plan.batch(e, i).unwrap();
                assert!(b.seq <= 8);
                let non_pad = b.labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
                assert_eq!(real, non_pad);
                examples_in(&b)
            })
            .collect()
    };
    let e0 = epoch(&mut plan, 0);
    let e1 = epoch(&mut plan, 1);
    for e in [&e0, &e1] {
        let mut s = e.clone();
        s.sort();
        assert_eq!(s, (0..lens.len() as u32).collect::<Vec<_>>());
    }
    assert_ne!(e0, e1, "epochs should be shuffled differently");
    // the order depends on (seed, epoch) alone, not on what was asked before
    let mut fresh = BatchPlan::new(&ex, Layout::Packed, 8, 2, 99, 7, true).unwrap();
    assert_eq!(epoch(&mut fresh, 1), e1);
    let (b, _) = fresh.batch(1, 1).unwrap();
    assert_eq!(b, plan.batch(1, 1).unwrap().0);
}

#[test]
fn padded_batches_hold_one_example_per_row() {
    let ex = examples(&[5, 3, 7]);
    let mut plan = BatchPlan::new(&ex, Layout::Padded, 8, 2, 99, 7, false).unwrap();
    assert_eq!((plan.rows(), plan.batches_per_epoch()), (3, 2));
    let (b, real) = plan.batch(0, 0).unwrap();
    assert_eq!((b.batch, b.seq, real), (2, 5, 8));
    assert!(b.segment_ids.is_none());
    assert_eq!(&b.input_ids[5..], &[1, 1, 1, 99, 99]);
    assert_eq!(&b.labels[5..], &[1, 1, 1, IGNORE_INDEX, IGNORE_INDEX]);
    let (b, _) = plan.batch(0, 1).unwrap();
    assert_eq!((b.batch, b.seq), (1, 7));
    assert!(plan.batch(0, 2).is_err());
}

#[test]
fn permutations_are_permutations() {
    for n in [0, 1, 2, 10, 101] {
        let mut p = permutation(n, n as u64);
        p.sort();
        assert_eq!(p, (0..n).collect::<Vec<_>>());
    }
    assert_ne!(permutation(50, 1), permutation(50, 2));
}

/// Text of many pieces with what pre-tokenizers treat specially: runs of spaces, tabs,
/// newlines, digits, punctuation, non-ASCII letters and special tokens.
pub(crate) fn mixed_text(bytes: usize, seed: u64) -> String {
    let words = [
        "the",
        "of",
        "and",
        "2024",
        "3.14",
        "café",
        "naïve",
        "日本語",
        "don't",
        "it's",
        "x1",
        "(a)",
        "--",
        "...",
        "<|im_end|>",
        "$5.99",
        "ZZZ",
        "über",
        "\t",
        "a.b",
    ];
    let seps = [
        " ", " ", " ", " ", "  ", "   ", "\n", "\n\n", " \n", "\t", "",
    ];
    let mut rng = crate::rng::Rng::new(seed);
    let mut s = String::new();
    while s.len() < bytes {
        s += words[rng.below(words.len() as u64) as usize];
        s += seps[rng.below(seps.len() as u64) as usize];
    }
    s
}

#[test]
fn bounded_encoding_is_the_whole_texts_encoding() {
    use crate::tokenizer::PIECE_BYTES;
    let f = fixture(None);
    assert!(f.tok.encodes_in_pieces());
    let text = mixed_text(5 * PIECE_BYTES + 1234, 3);
    let (ids, offsets) = f.tok.encode_with_offsets(&text, true).unwrap();
    let all = f.tok.encode_bounded(&text, true, None).unwrap();
    assert!(all.complete);
    assert_eq!((&all.ids, &all.offsets), (&ids, &offsets));
    for limit in [64, PIECE_BYTES, 3 * PIECE_BYTES] {
        let b = f.tok.encode_bounded(&text, true, Some(limit)).unwrap();
        assert!(!b.complete && b.ids.len() > limit, "limit {limit}");
        // at most one piece more than needed was encoded
        assert!(b.ids.len() <= limit + 2 * PIECE_BYTES, "limit {limit}");
        assert_eq!(b.ids[..], ids[..b.ids.len()]);
        assert_eq!(b.offsets[..], offsets[..b.ids.len()]);
    }
}

#[test]
fn a_tokenizer_that_cutting_would_change_is_run_on_the_whole_text() {
    // a normalizer that prepends to each text it sees (old Llama tokenizers do): a piece
    // would get its own prefix, so pieces are not used
    let f = fixture(None);
    let path = f.dir.path().join("tokenizer.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["normalizer"] = serde_json::json!({"type": "Prepend", "prepend": "_"});
    std::fs::write(&path, json.to_string()).unwrap();
    let tok = Tokenizer::from_dir(f.dir.path()).unwrap();
    assert!(!tok.encodes_in_pieces());
    let text = mixed_text(3 * crate::tokenizer::PIECE_BYTES, 5);
    let (ids, _) = tok.encode_with_offsets(&text, true).unwrap();
    let b = tok.encode_bounded(&text, true, Some(64)).unwrap();
    assert!(b.complete);
    assert_eq!(b.ids, ids);
    let p = f.dir.path().join("t.txt");
    std::fs::write(&p, &text).unwrap();
    let (ex, _) = load_file(&p, &tok, &opts(64, BadLinePolicy::Error)).unwrap();
    let got: Vec<u32> = ex.iter().flat_map(|e| e.input_ids.clone()).collect();
    assert_eq!(got, ids);
}

#[test]
fn long_records_keep_what_whole_text_tokenization_keeps() {
    use crate::tokenizer::PIECE_BYTES;
    let f = fixture(None);
    let long = mixed_text(4 * PIECE_BYTES, 7);
    let prompt = "Q: what follows? A:";
    let lines = [
        serde_json::json!({ "text": long }).to_string(),
        serde_json::json!({ "prompt": prompt, "completion": long }).to_string(),
        serde_json::json!({ "prompt": long, "completion": "x" }).to_string(),
    ];
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let path = f.file("long.jsonl", &refs);
    let max = 100;
    let (ex, rep) = load_file(&path, &f.tok, &opts(max, BadLinePolicy::Skip)).unwrap();
    assert_eq!((ex.len(), rep.truncated, rep.prompt_too_long), (2, 2, 1));
    let whole = |t: &str| f.tok.encode_with_offsets(t, true).unwrap();
    let (ids, _) = whole(&long);
    assert_eq!(ex[0].input_ids, ids[..max]);
    assert_eq!(
        ex[0].labels,
        ids[..max].iter().map(|&i| i as i32).collect::<Vec<_>>()
    );
    let full = format!("{prompt}{long}");
    let (ids, offs) = whole(&full);
    assert_eq!(ex[1].input_ids, ids[..max]);
    let labels: Vec<i32> = ids[..max]
        .iter()
        .zip(&offs)
        .map(|(&i, &(s, _))| {
            if s >= prompt.len() {
                i as i32
            } else {
                IGNORE_INDEX
            }
        })
        .collect();
    assert_eq!(ex[1].labels, labels);
    assert!(
        rep.skipped[0].contains(":3: the prompt alone is more than ")
            && rep.skipped[0].contains(" tokens, max_seq_length is 100: nothing of the answer"),
        "{:?}",
        rep.skipped
    );
    // the kept examples hold no spare capacity
    assert!(ex.iter().all(|e| e.input_ids.capacity() == max));
}

#[test]
fn streamed_text_files_are_the_whole_texts_windows() {
    use crate::tokenizer::PIECE_BYTES;
    let f = fixture(None);
    // more than one read block, ending in a partial window
    let text = mixed_text(2 * PIECE_BYTES * rayon::current_num_threads() + 777, 11);
    let p = f.dir.path().join("big.txt");
    std::fs::write(&p, &text).unwrap();
    let (ex, rep) = load_file(&p, &f.tok, &opts(50, BadLinePolicy::Error)).unwrap();
    let ids = f.tok.encode(&text, true).unwrap();
    let want: Vec<&[u32]> = ids.chunks(50).filter(|w| w.len() >= 2).collect();
    assert_eq!(ex.len(), want.len());
    assert_eq!(rep.records, want.len());
    for (i, (e, w)) in ex.iter().zip(&want).enumerate() {
        assert_eq!((e.input_ids.as_slice(), e.line), (*w, i + 1));
        assert_eq!(e.labels, w.iter().map(|&t| t as i32).collect::<Vec<_>>());
    }
    // a file that is not UTF-8 is named with the offset of the bad byte
    let mut bad = text.clone().into_bytes();
    let at = (PIECE_BYTES..).find(|&i| bad[i].is_ascii()).unwrap();
    bad[at] = 0xff;
    std::fs::write(&p, &bad).unwrap();
    let e = load_file(&p, &f.tok, &opts(50, BadLinePolicy::Error)).unwrap_err();
    assert!(
        e.to_string()
            .contains(&format!("not UTF-8 text (invalid byte at offset {at})")),
        "{e}"
    );
}

/// `max_seq_length = 131072` (128k tokens, issue 14): a JSONL record and a text file of
/// more tokens than that are cut to 131072-token examples, and a packed plan lays them
/// out in rows of that length; nothing on the way caps the length.
#[test]
fn examples_of_128k_tokens_load_and_batch() {
    let max = 131_072;
    let f = fixture(None);
    // the byte-level tokenizer: a token per byte of this text
    let text: String = (0..200_000)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let jsonl = f.file("long.jsonl", &[&format!(r#"{{"text": "{text}"}}"#), ""]);
    let (ex, rep) = load_file(&jsonl, &f.tok, &opts(max, BadLinePolicy::Error)).unwrap();
    assert_eq!(ex.len(), 1);
    assert_eq!(
        ex[0].input_ids.len(),
        max,
        "the record is cut at max_seq_length"
    );
    assert_eq!(rep.truncated, 1);
    let txt = f.file("long.txt", &[&text, &text]);
    let (windows, _) = load_file(&txt, &f.tok, &opts(max, BadLinePolicy::Error)).unwrap();
    let lens: Vec<usize> = windows.iter().map(|e| e.input_ids.len()).collect();
    assert_eq!(lens.iter().sum::<usize>(), 400_001);
    assert!(lens[..3].iter().all(|&l| l == max) && lens[3] == 400_001 - 3 * max);
    let mut all = ex;
    all.extend(windows);
    let mut plan = BatchPlan::new(&all, Layout::Packed, max, 1, 0, 7, false).unwrap();
    let (b, real) = plan.batch(0, 0).unwrap();
    assert_eq!((b.batch, b.seq), (1, max));
    assert_eq!(real, max, "a full row, no padding");
}
