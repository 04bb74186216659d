//! Tokenizers and chat templates of the real model files. Token ids are checked against
//! fixtures produced by llama.cpp (scripts/reference/make_token_fixtures.py).

mod common;

use std::sync::OnceLock;

use ape_core::engine::chat::{ChatTemplate, Message};
use ape_core::model::gguf::Gguf;
use ape_core::tokenizer::Tokenizer;
use serde::Deserialize;

use common::{GEMMA3, QWEN2, SMOLLM2};

struct Model {
    tokenizer: Tokenizer,
    template: ChatTemplate,
}

fn load(file: &str) -> Model {
    let gguf = Gguf::open(common::model_path(file)).unwrap();
    Model {
        tokenizer: Tokenizer::from_gguf(&gguf).unwrap(),
        template: ChatTemplate::from_gguf(&gguf)
            .unwrap()
            .expect("the model file has a chat template"),
    }
}

/// Gemma 3's SentencePiece vocabulary (262,144 pieces with scores).
fn gemma3() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let gguf = Gguf::open(common::model_path(GEMMA3)).unwrap();
        Tokenizer::from_gguf(&gguf).unwrap()
    })
}

// Building a 150K-token vocabulary takes a moment; every test shares one per model.
fn smollm2() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| load(SMOLLM2))
}

fn qwen2() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| load(QWEN2))
}

#[derive(Deserialize)]
struct Fixture {
    model: String,
    reference: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    special: bool,
    ids: Vec<u32>,
}

/// Every fixture case must give llama.cpp's ids and decode back to its text. All
/// failures are listed at once, since one pre-tokenizer slip usually breaks several.
fn check_against_llama_cpp(tokenizer: &Tokenizer, model_file: &str, fixture_file: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(fixture_file);
    let json = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}; generate it with scripts/reference/make_token_fixtures.py",
            path.display()
        )
    });
    let fixture: Fixture = serde_json::from_str(&json).unwrap();
    assert_eq!(
        fixture.model, model_file,
        "{fixture_file} was made for another model"
    );
    assert!(!fixture.cases.is_empty(), "{fixture_file} has no cases");

    let mut failures = Vec::new();
    for case in &fixture.cases {
        let ids = tokenizer.encode(&case.text, case.special).unwrap();
        if ids != case.ids {
            failures.push(format!(
                "{:?} (special={}):\n    expected {:?}\n    got      {:?}",
                case.text, case.special, case.ids, ids
            ));
        }
        let decoded = tokenizer.decode(&ids).unwrap();
        if decoded != case.text {
            failures.push(format!("{:?} decodes back to {decoded:?}", case.text));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from {}:\n{}",
        failures.len(),
        fixture.cases.len(),
        fixture.reference,
        failures.join("\n")
    );
}

#[test]
fn smollm2_matches_llama_cpp() {
    check_against_llama_cpp(&smollm2().tokenizer, SMOLLM2, "tokens-smollm2.json");
}

#[test]
fn qwen2_matches_llama_cpp() {
    check_against_llama_cpp(&qwen2().tokenizer, QWEN2, "tokens-qwen2.json");
}

#[test]
fn gemma3_matches_llama_cpp() {
    check_against_llama_cpp(gemma3(), GEMMA3, "tokens-gemma3.json");
}

#[test]
fn gemma3_special_ids() {
    let tok = gemma3();
    assert_eq!(tok.vocab_size(), 262_144);
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(2), Some(1)));
    assert!(tok.add_bos());
    assert_eq!(tok.token_text(105), Some("<start_of_turn>"));
    // <eos>, <end_of_turn>, and </s>, which llama.cpp also makes a control token (so its
    // text in plain input is read as text, though the file types it user-defined).
    assert_eq!(tok.eog_ids(), &[1, 106, 212]);
}

#[test]
fn smollm2_special_ids() {
    let tok = &smollm2().tokenizer;
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    assert!(!tok.add_bos());
    assert_eq!(tok.token_text(2), Some("<|im_end|>"));
    assert_eq!(tok.token_text(49152), None);
    // <|endoftext|>, <|im_end|>, and <reponame>, on which llama.cpp stops as well.
    assert_eq!(tok.eog_ids(), &[0, 2, 4]);
    assert!(tok.is_eog(2) && !tok.is_eog(1));
}

#[test]
fn qwen2_special_ids() {
    let tok = &qwen2().tokenizer;
    assert_eq!(tok.vocab_size(), 151936);
    assert_eq!(tok.bos_id(), Some(151643));
    assert_eq!(tok.eos_id(), Some(151645));
    assert!(!tok.add_bos());
    assert_eq!(tok.token_text(151644), Some("<|im_start|>"));
    // </s>, <|endoftext|>, <|im_end|>, and the FIM pad, repo-name and file-separator
    // tokens, as llama.cpp stops on them.
    assert_eq!(
        tok.eog_ids(),
        &[128247, 151643, 151645, 151662, 151663, 151664]
    );
}

#[test]
fn control_tokens_are_parsed_only_on_request() {
    for model in [smollm2(), qwen2()] {
        let tok = &model.tokenizer;
        let im_start = tok.encode("<|im_start|>", true).unwrap();
        assert_eq!(im_start.len(), 1);
        assert_eq!(tok.token_text(im_start[0]), Some("<|im_start|>"));

        let plain = tok.encode("<|im_start|>", false).unwrap();
        assert!(
            plain.len() > 1,
            "user text must not produce control tokens: {plain:?}"
        );
        assert_eq!(tok.decode(&plain).unwrap(), "<|im_start|>");
    }
}

#[test]
fn user_defined_tokens_are_matched_in_plain_text() {
    let tok = &qwen2().tokenizer;
    assert_eq!(tok.encode("<tool_call>", false).unwrap(), [151657]);
    assert_eq!(tok.encode("<tool_call>", true).unwrap(), [151657]);
}

#[test]
fn decode_rejects_ids_outside_the_vocabulary() {
    let err = smollm2()
        .tokenizer
        .decode(&[5, 49152])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("49152") && err.contains("outside the vocabulary"),
        "{err}"
    );
}

#[test]
fn stream_decoding_waits_for_whole_characters() {
    let text = "naïve 你好 👨‍👩‍👧 🇫🇷 done";
    for model in [smollm2(), qwen2()] {
        let tok = &model.tokenizer;
        let ids = tok.encode(text, false).unwrap();
        let mut decoder = tok.stream_decoder();
        let mut streamed = String::new();
        let mut held_back = 0;
        for &id in &ids {
            let chunk = decoder.push(id).unwrap();
            assert!(
                !chunk.contains('\u{FFFD}'),
                "half a character came out: {chunk:?}"
            );
            held_back += usize::from(chunk.is_empty());
            streamed.push_str(&chunk);
        }
        streamed.push_str(&decoder.finish());
        assert_eq!(streamed, text);
        assert!(
            held_back > 0,
            "no token split a character, so nothing was tested"
        );
    }
}

#[test]
fn stream_decoding_replaces_bytes_that_never_complete() {
    let tok = &qwen2().tokenizer;
    // In the byte-level alphabet "ä" (U+00E4) is the byte 0xE4, which starts a
    // three-byte character; a plain "a" after it means that character never finishes.
    let lead = (0..tok.vocab_size() as u32)
        .find(|&id| tok.token_text(id) == Some("ä"))
        .unwrap();
    let a = tok.encode("a", false).unwrap();
    let mut decoder = tok.stream_decoder();
    assert_eq!(decoder.push(lead).unwrap(), "");
    assert_eq!(decoder.push(a[0]).unwrap(), "\u{FFFD}a");
    assert_eq!(decoder.finish(), "");

    let mut decoder = tok.stream_decoder();
    assert_eq!(decoder.push(lead).unwrap(), "");
    assert_eq!(decoder.finish(), "\u{FFFD}");
}

#[test]
fn smollm2_chat_template() {
    let template = &smollm2().template;
    let conversation = [Message::system("You are terse."), Message::user("Hi!")];
    assert_eq!(
        template.render(&conversation, true).unwrap(),
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        template.render(&conversation[1..], true).unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        template.render(&conversation, false).unwrap(),
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
    );
}

#[test]
fn qwen2_chat_template() {
    let template = &qwen2().template;
    let conversation = [
        Message::system("You are terse."),
        Message::user("Hi!"),
        Message::assistant("Hello."),
        Message::user("Bye."),
    ];
    assert_eq!(
        template.render(&conversation, true).unwrap(),
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n\
         <|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye.<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        template.render(&conversation[1..2], true).unwrap(),
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn rendered_chat_encodes_to_control_tokens() {
    let model = qwen2();
    let prompt = model
        .template
        .render(&[Message::user("Hi!")], true)
        .unwrap();
    let ids = model.tokenizer.encode(&prompt, true).unwrap();
    let im_start = 151644;
    let im_end = 151645;
    assert_eq!(ids.iter().filter(|&&id| id == im_start).count(), 3);
    assert_eq!(ids.iter().filter(|&&id| id == im_end).count(), 2);
    assert_eq!(model.tokenizer.decode(&ids).unwrap(), prompt);
}
