//! Chat templates run under a budget of work and output scaled by the conversation
//! (`TemplateBudget`): the templates of real models (SmolLM2, Llama-3.1, Qwen2.5) and one
//! written a block tag a line, in tests/fixtures/chat_templates, render as HF does and use
//! a small part of it, and a template that loops, writes without end or does not parse
//! stops `train`, `eval` and `generate` at once with a message that names the template's
//! file, not a data line.

mod common;
use common::tiny::{Tiny, expect_error};
use lema::tokenizer::{ChatTemplate, Message, TemplateBudget, TemplateError};
use std::time::{Duration, Instant};

fn msg(role: &str, content: &str) -> Message {
    Message {
        role: role.into(),
        content: content.into(),
    }
}

fn real_template(name: &str) -> ChatTemplate {
    let path = common::fixture("chat_templates").join(format!("{name}.jinja"));
    ChatTemplate::new(&std::fs::read_to_string(&path).unwrap())
}

const BOS: &str = "<|begin_of_text|>";
const EOS: &str = "<|eot_id|>";

/// `(template, one user message, a four-message conversation)`: each conversation
/// rendered with `add_generation_prompt` by Jinja2 3.1.6 set up as HF transformers'
/// `apply_chat_template` sets it up (sandboxed, `trim_blocks`, `lstrip_blocks`,
/// `loopcontrols`), with bos `<|begin_of_text|>` and eos `<|eot_id|>`.
const HF_RENDERINGS: [(&str, &str, &str); 4] = [
    (
        "smollm2",
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        "llama3.1",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    (
        "qwen2.5",
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
    ),
    // one block tag a line, as many templates are written: HF's trim_blocks and
    // lstrip_blocks decide every newline (plain Jinja2 gives "\n\n<|user|>\nHi…")
    (
        "zephyr-style",
        "<|user|>\nHi<|eot_id|>\n<|assistant|>\n",
        "<|system|>\nBe brief.<|eot_id|>\n<|user|>\nHi<|eot_id|>\n<|assistant|>\nHello!<|eot_id|>\n<|user|>\nBye<|eot_id|>\n<|assistant|>\n",
    ),
];

#[test]
fn real_templates_render_as_hf_does() {
    let one = [msg("user", "Hi")];
    let four = [
        msg("system", "Be brief."),
        msg("user", "Hi"),
        msg("assistant", "Hello!"),
        msg("user", "Bye"),
    ];
    for (name, want_one, want_four) in HF_RENDERINGS {
        let t = real_template(name);
        let got = t.render(&one, true, Some(BOS), Some(EOS)).unwrap();
        assert_eq!(got, want_one, "{name}, one message");
        let got = t.render(&four, true, Some(BOS), Some(EOS)).unwrap();
        assert_eq!(got, want_four, "{name}, four messages");
    }
}

/// A conversation of `turns` user/assistant messages of `content` after a system message.
fn conversation(turns: usize, content: impl Fn(usize) -> String) -> Vec<Message> {
    std::iter::once(msg("system", "Answer briefly."))
        .chain((0..turns).map(|i| msg(["user", "assistant"][i % 2], &content(i))))
        .collect()
}

#[test]
fn real_templates_use_under_an_eighth_of_their_work_and_a_quarter_of_their_output_budget() {
    let conversations = [
        ("one message", vec![msg("user", "Hi")]),
        (
            "200 turns of 2 kB",
            conversation(200, |_| "word ".repeat(400)),
        ),
        (
            "5000 short turns",
            conversation(5000, |i| format!("turn {i}")),
        ),
        (
            "one 4 MB message",
            vec![msg("user", &"long text ".repeat(400_000))],
        ),
    ];
    for name in ["smollm2", "llama3.1", "qwen2.5"] {
        let t = real_template(name);
        for (what, c) in &conversations {
            let full = TemplateBudget::for_conversation(c, BOS.len() + EOS.len());
            let small = TemplateBudget {
                fuel: full.fuel / 8,
                output_bytes: full.output_bytes / 4,
            };
            for prompt in [false, true] {
                let out = t
                    .render_within(c, prompt, Some(BOS), Some(EOS), small)
                    .unwrap_or_else(|e| panic!("{name}, {what}: {e}"));
                let content: usize = c.iter().map(|m| m.content.len()).sum();
                assert!(out.len() > content, "{name}, {what}: the output lacks text");
            }
        }
    }
}

/// Templates that never end, write without end or do not parse, as a user's
/// tokenizer_config.json may hold them; each with what its error must say.
const BROKEN: [(&str, &str); 5] = [
    (
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
        "exceeded its work budget",
    ),
    (
        "{% for i in range(100000) %}{{ 'x' * 10000 }}{% endfor %}",
        "exceeded its output budget",
    ),
    ("{{ 'x' * 1000000000 }}", "exceeded its work budget"),
    (
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
        "exceeded its work budget",
    ),
    (
        "{% for m in messages %}{{ m.content }}",
        "does not parse: syntax error",
    ),
];

#[test]
fn broken_templates_stop_at_their_budget_or_parse() {
    for (src, why) in BROKEN {
        let t = ChatTemplate::new(src);
        let start = Instant::now();
        let e = t
            .render(&[msg("user", "hi")], true, None, None)
            .unwrap_err();
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{src}: took {:?}",
            start.elapsed()
        );
        match &e {
            TemplateError::Template(m) => assert!(m.starts_with(why), "{src}: {m}"),
            other => panic!("{src}: the template is not blamed: {other:?}"),
        }
        // the template stays refused, whatever the next conversation or budget
        let again = t.render_within(
            &[msg("user", "another")],
            false,
            None,
            None,
            TemplateBudget {
                fuel: u64::MAX,
                output_bytes: usize::MAX,
            },
        );
        assert_eq!(again, Err(e), "{src}");
    }
}

#[test]
fn train_and_eval_stop_at_a_broken_template_and_name_it() {
    let line = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#;
    for (src, why) in BROKEN {
        let s = Tiny::new(Some(src));
        s.write("chat.jsonl", &vec![line; 200].join("\n"));
        let start = Instant::now();
        let runs = [
            // skipping bad lines does not skip a broken template
            s.train("chat.jsonl", &["--max-steps", "1", "--on-bad-line", "skip"]),
            s.lema(&[
                "eval",
                "--model",
                "model",
                "--data",
                "chat.jsonl",
                "--device",
                "cpu",
            ]),
        ];
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "{src}: took {:?}",
            start.elapsed()
        );
        for o in runs {
            let err = expect_error(
                &o,
                &[
                    &format!("model/tokenizer_config.json: chat_template {why}"),
                    "fix or replace the chat_template in this file",
                    "(rendering the conversation at ",
                ],
            );
            assert!(err.contains("chat.jsonl:1)"), "{err}");
            assert!(
                !err.contains("on_bad_line"),
                "the data is blamed for the template: {err}"
            );
        }
        assert!(!s.path("run/adapter").exists());
    }
}

#[test]
fn generate_stops_at_a_broken_template_and_names_it() {
    for (src, why) in BROKEN {
        let s = Tiny::new(Some(src));
        let start = Instant::now();
        let o = s.lema(&[
            "generate", "--model", "model", "--device", "cpu", "-n", "3", "hello",
        ]);
        expect_error(
            &o,
            &[
                &format!("model/tokenizer_config.json: chat_template {why}"),
                "fix or replace the chat_template in this file",
            ],
        );
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{src}: took {:?}",
            start.elapsed()
        );
        // --raw needs no template
        let o = s.lema(&[
            "generate", "--model", "model", "--device", "cpu", "-n", "3", "--raw", "hello",
        ]);
        common::tiny::expect_ok(&o);
    }
}

/// A chat template saved apart from tokenizer_config.json (`chat_template.jinja`, or
/// `chat_template.json`, as newer transformers writes them) is the model's template, and
/// wins over tokenizer_config.json's, as in transformers; a broken one is named.
#[test]
fn template_files_beside_the_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    lema::tokenizer::write_byte_level_tokenizer(d, &["<|end|>"], Some("<|end|>"), Some("CONFIG"))
        .unwrap();
    let render = || {
        lema::tokenizer::Tokenizer::from_dir(d)
            .unwrap()
            .apply_chat_template(&[msg("user", "hi")], true)
    };
    assert_eq!(render().unwrap(), "CONFIG");
    std::fs::write(
        d.join("chat_template.json"),
        r#"{"chat_template": "JSON {{ messages[0].content }}"}"#,
    )
    .unwrap();
    assert_eq!(render().unwrap(), "JSON hi");
    std::fs::write(
        d.join("chat_template.jinja"),
        "JINJA {{ messages[0].content }}",
    )
    .unwrap();
    assert_eq!(render().unwrap(), "JINJA hi");
    std::fs::write(d.join("chat_template.jinja"), "{% for %}").unwrap();
    let e = render().unwrap_err().to_string();
    assert!(
        e.contains("chat_template.jinja") && e.contains("does not parse"),
        "{e}"
    );
    std::fs::remove_file(d.join("chat_template.jinja")).unwrap();
    std::fs::write(d.join("chat_template.json"), r#"{"template": 1}"#).unwrap();
    let e = lema::tokenizer::Tokenizer::from_dir(d)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("chat_template.json") && e.contains("'chat_template'"),
        "{e}"
    );
}
