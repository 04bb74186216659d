//! Gemma 3 through the engine: a base model (no chat template) reads requests over
//! documents as plain text and refuses chat; its local layers' sliding window keeps
//! APE's invariant that one context at T = S = 1 is sequential reading to the bit, also
//! when the context is longer than the window (the window counts APE's positions).

mod common;

use std::sync::OnceLock;

use ape_core::attention::{ApeFactors, KvCache};
use ape_core::engine::generate::GenerateOptions;
use ape_core::engine::{Engine, Mode, Prompt, Recompute, Selection};
use ape_core::Error;

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| Engine::load(common::model_path(common::GEMMA3)).expect("model loads"))
}

/// A document of about 900 tokens: longer than the local layers' window of 512.
fn long_document() -> String {
    (1..=60)
        .map(|i| {
            format!(
                "On day {i} the keeper climbed the tower and wrote {} words.",
                7 * i
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn a_base_model_refuses_chat_and_reads_documents_as_text() {
    let e = engine();
    assert!(
        e.template.is_none(),
        "the Gemma 3 270M file has no chat template"
    );
    let chat = e.chat_prompt(None, "Hello");
    assert!(matches!(chat, Err(Error::NoChatTemplate)), "{chat:?}");
    let message = Error::NoChatTemplate.to_string();
    assert!(
        message.contains("/v1/completions") && message.contains("--raw"),
        "{message}"
    );

    let prompt = e
        .split_chat(
            Some("Label each review."),
            &["Review: Great.\nSentiment: positive"],
            "Review: Awful.\nSentiment:",
        )
        .unwrap();
    let bos = e.tokenizer.bos_id().expect("Gemma wants BOS");
    assert_eq!(prompt.prefix[0], bos);
    let text = e
        .tokenizer
        .decode(&prompt.sequential_tokens()[1..])
        .unwrap();
    assert_eq!(
        text,
        "Label each review.\n\nReview: Great.\nSentiment: positive\n\nReview: Awful.\nSentiment:"
    );
}

#[test]
fn one_context_longer_than_the_window_at_unit_factors_is_sequential_reading_to_the_bit() {
    let e = engine();
    let window = e
        .model
        .config
        .sliding_window
        .expect("Gemma 3 has local layers");
    let prompt = e
        .split_chat(
            None,
            &[long_document()],
            "How many words did the keeper write on day 31?",
        )
        .unwrap();
    assert_eq!(prompt.contexts.len(), 1);
    assert!(
        prompt.contexts[0].len() > window.size + 100,
        "the context ({} tokens) must outgrow the window ({})",
        prompt.contexts[0].len(),
        window.size
    );

    let sequential = prompt.sequential_tokens();
    let mut cache = e.model.new_cache(sequential.len());
    let want = e.model.forward(&sequential, &mut cache);
    let got = ape_logits(e, &prompt, ApeFactors::ONE_SOFTMAX);
    assert_eq!(got, want, "one context at T = S = 1 is sequential reading");
}

/// A few-shot prompt whose demonstrations are the contexts answers the label the
/// demonstrations teach, in every mode.
#[test]
fn few_shot_demonstrations_as_contexts_answer_in_every_mode() {
    let e = engine();
    let demonstrations = [
        "Review: A wonderful, moving film.\nSentiment: positive",
        "Review: Dull and far too long.\nSentiment: negative",
        "Review: The best thing I saw all year.\nSentiment: positive",
        "Review: A waste of two hours.\nSentiment: negative",
    ];
    let prompt = e
        .split_chat(
            None,
            &demonstrations,
            "Review: I loved every minute of it.\nSentiment:",
        )
        .unwrap();
    let options = GenerateOptions {
        max_tokens: Some(2),
        ..GenerateOptions::default()
    };
    for mode in [
        Mode::Sequential,
        Mode::Parallel,
        Mode::ape(0.9, 0.9).unwrap(),
    ] {
        let answer = e.answer(&prompt, mode, &options, |_| {}).unwrap();
        assert_eq!(
            answer.text.trim(),
            "positive",
            "{mode:?}: {:?}",
            answer.text
        );
    }
    // Recomputing is refused, not silently skipped, on local layers.
    let recompute = Mode::ape(0.9, 0.9)
        .unwrap()
        .with_recompute(Recompute::new(0.1, Selection::Attended).unwrap())
        .unwrap();
    let refused = e.answer(&prompt, recompute, &options, |_| {}).unwrap_err();
    assert!(matches!(refused, Error::ApeSetting(_)), "{refused}");
    assert!(refused.to_string().contains("sliding-window"), "{refused}");
}

fn ape_logits(e: &Engine, prompt: &Prompt, factors: ApeFactors) -> Vec<f32> {
    let prefix = e.prefix_kv(&prompt.prefix).unwrap();
    let contexts: Vec<&[u32]> = prompt.contexts.iter().map(Vec::as_slice).collect();
    let encoded = e.encode_contexts(&prefix, &contexts).unwrap();
    let refs: Vec<&KvCache> = encoded.iter().collect();
    let mut cache = prefix.copy_with_capacity(prefix.len() + prompt.query.len());
    e.model
        .forward_ape(&prompt.query, &mut cache, prefix.len(), &refs, factors)
}
