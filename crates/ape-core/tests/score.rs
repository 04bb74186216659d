//! Teacher-forced scoring (`Engine::score`) on the real default model: each row is the
//! distribution the model gives that token when the prompt and the tokens before it are
//! read the ordinary way, in every mode, and scoring several continuations reads each as
//! if it were alone.

mod common;

use ape_core::engine::sampler::argmax;
use ape_core::engine::{Engine, Mode, Prompt};

fn engine() -> Engine {
    Engine::load(common::model_path(common::SMOLLM2)).expect("model loads")
}

/// The same bits: scoring feeds tokens in batches, and a token's result does not depend
/// on the batch around it.
fn assert_logits_agree(got: &[f32], want: &[f32]) {
    assert_eq!(argmax(got), argmax(want));
    assert!(got == want, "the logits differ");
}

fn prompt(e: &Engine) -> Prompt {
    e.split_chat(
        None,
        &[
            "Alice keeps her bicycle in the green shed behind the school.",
            "The library opens at nine in the morning.",
        ],
        "Where does Alice keep her bicycle?",
    )
    .unwrap()
}

#[test]
fn sequential_rows_are_the_logits_of_each_prefix_read_anew() {
    let e = engine();
    let prompt = prompt(&e);
    let continuation = e.tokenizer.encode("In the green shed.", false).unwrap();
    let rows = e
        .score(&prompt, Mode::Sequential, &[&continuation])
        .unwrap()
        .remove(0);
    assert_eq!(rows.len(), continuation.len());
    for (i, row) in rows.iter().enumerate() {
        let mut tokens = prompt.sequential_tokens();
        tokens.extend(&continuation[..i]);
        let mut cache = e.model.new_cache(tokens.len());
        let want = e.model.forward(&tokens, &mut cache);
        assert_logits_agree(row, &want);
    }
}

#[test]
fn ape_rows_follow_the_query_and_continuations_do_not_see_each_other() {
    let e = engine();
    let prompt = prompt(&e);
    let mode = Mode::ape(0.8, 0.9).unwrap();
    let a = e.tokenizer.encode("In the green shed.", false).unwrap();
    let b = e.tokenizer.encode("At the library", false).unwrap();
    let both = e.score(&prompt, mode, &[&a, &b]).unwrap();
    let alone = e.score(&prompt, mode, &[&b]).unwrap();
    assert_eq!(
        both[1], alone[0],
        "a continuation scores the same after another one"
    );
    assert_eq!(
        both[0][0], both[1][0],
        "both start from the distribution after the query"
    );

    // The first row is what answering would sample the first token from.
    let prefix = e.prefix_kv(&prompt.prefix).unwrap();
    let contexts: Vec<&[u32]> = prompt.contexts.iter().map(Vec::as_slice).collect();
    let encoded = e.encode_contexts(&prefix, &contexts).unwrap();
    let refs: Vec<_> = encoded.iter().collect();
    let mut cache = prefix.copy_with_capacity(prefix.len() + prompt.query.len() + a.len());
    let factors = mode.factors().unwrap();
    let after_query = e
        .model
        .forward_ape(&prompt.query, &mut cache, prefix.len(), &refs, factors);
    assert_logits_agree(&both[0][0], &after_query);
    // The last row follows the continuation's tokens fed one by one.
    let mut last = after_query;
    for &t in &a[..a.len() - 1] {
        last = e
            .model
            .forward_ape(&[t], &mut cache, prefix.len(), &refs, factors);
    }
    assert_logits_agree(both[0].last().unwrap(), &last);
}

#[test]
fn an_empty_continuation_has_no_rows_and_an_empty_query_is_an_error() {
    let e = engine();
    let mut prompt = prompt(&e);
    let rows = e.score(&prompt, Mode::Parallel, &[&[]]).unwrap();
    assert_eq!(rows, vec![Vec::<Vec<f32>>::new()]);
    prompt.query.clear();
    let err = e.score(&prompt, Mode::Sequential, &[&[1]]).unwrap_err();
    assert!(matches!(err, ape_core::Error::EmptyQuery), "{err}");
}
