//! One arithmetic for every token, on the real models: a token's keys, values and logits
//! are the same bits however the prompt is cut into forward passes, and one context read
//! at T = S = 1 is sequential reading, token for token.

mod common;

use ape_core::attention::KvCache;
use ape_core::engine::generate::{Cancel, GenerateOptions};
use ape_core::engine::{Engine, Mode};
use ape_core::model::Model;

/// Every key and value `cache` holds, as bits.
fn contents(model: &Model, cache: &KvCache) -> Vec<u16> {
    let mut bits = Vec::new();
    for layer in 0..cache.layer_count() {
        for g in 0..model.config.kv_heads {
            let (k, v) = cache.head(layer, g);
            bits.extend(k.iter().chain(v).map(|x| x.to_bits()));
        }
    }
    bits
}

/// A prompt of a little over 512 tokens, so that the largest chunk leaves a remainder.
fn long_prompt(engine: &Engine) -> Vec<u32> {
    let text: String = (0..60)
        .map(|i| format!("Line {i}: the tide came in at {} past six. ", i % 7))
        .collect();
    let tokens = engine.tokenizer.encode(&text, true).unwrap();
    assert!(tokens.len() > 520, "{} tokens", tokens.len());
    tokens[..520].to_vec()
}

/// Chunks of one token read every token's last hidden state; a chunk of several reads
/// only its last token's, the others stopping after the last layer's keys and values.
fn prompt_in_chunks(engine: &Engine, model_file: &str) {
    let prompt = long_prompt(engine);
    let model = &engine.model;
    let run = |chunk: usize| {
        let mut cache = model.new_cache(prompt.len());
        let mut logits = Vec::new();
        for part in prompt.chunks(chunk) {
            logits = model.forward(part, &mut cache);
        }
        (logits, contents(model, &cache))
    };
    let (logits, kv) = run(512);
    for chunk in [1, 7] {
        let (other_logits, other_kv) = run(chunk);
        assert!(
            other_kv == kv,
            "{model_file}: keys and values differ with chunks of {chunk}"
        );
        assert_eq!(
            other_logits, logits,
            "{model_file}: logits differ with chunks of {chunk}"
        );
    }
}

#[test]
fn a_prompt_gives_the_same_bits_in_chunks_of_1_7_and_512() {
    for file in [common::SMOLLM2, common::QWEN2] {
        let engine = Engine::load(common::model_path(file)).unwrap();
        prompt_in_chunks(&engine, file);
    }
}

#[test]
fn one_context_at_unit_factors_answers_64_tokens_as_sequential_reading() {
    let engine = Engine::load(common::model_path(common::QWEN2)).unwrap();
    let prompt = engine
        .split_chat(
            None,
            &[
                "The lighthouse on Gull Island was built in 1871 from granite quarried on the \
               mainland. Its lamp burned whale oil until 1902, then kerosene, and since 1954 \
               electricity. Three keepers lived there in turn, each for about twenty years.",
            ],
            "Name every year the text mentions, then count from one to forty in words.",
        )
        .unwrap();
    let options = GenerateOptions {
        max_tokens: Some(64),
        ..GenerateOptions::default()
    };
    let sequential = engine
        .answer(&prompt, Mode::Sequential, &options, |_| {})
        .unwrap();
    let parallel = engine
        .answer(&prompt, Mode::Parallel, &options, |_| {})
        .unwrap();
    assert_eq!(sequential.tokens.len(), 64, "{}", sequential.text);
    assert_eq!(
        parallel.tokens, sequential.tokens,
        "{}\n---\n{}",
        parallel.text, sequential.text
    );
}

#[test]
fn a_long_context_encoded_in_pieces_gets_the_bits_of_one_piece() {
    let engine = Engine::load(common::model_path(common::SMOLLM2)).unwrap();
    let prefix = engine
        .prefix_kv(&engine.split_chat(None, &[] as &[&str], "").unwrap().prefix)
        .unwrap();
    let mut context = long_prompt(&engine);
    context.extend_from_slice(&long_prompt(&engine)[1..]);
    assert!(context.len() > 1024, "three pieces at least");
    let whole = engine
        .model
        .encode_contexts(&prefix, &[&context], &Cancel::default())
        .unwrap();
    let pieces = engine.encode_contexts(&prefix, &[&context]).unwrap();
    assert!(contents(&engine.model, &pieces[0]) == contents(&engine.model, &whole[0]));
}
