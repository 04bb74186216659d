//! The recompute dial on the real models: recomputing no context token is APE bit for
//! bit, recomputing all of them is sequential reading whatever APE's factors, the choice
//! of tokens is deterministic, and a request whose contexts do not fit the window in
//! order is read with APE alone.

mod common;

use std::sync::OnceLock;

use ape_core::engine::generate::GenerateOptions;
use ape_core::engine::sampler::argmax;
use ape_core::engine::{Engine, Mode, Prompt, Recompute, Selection};

fn smollm2() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| Engine::load(common::model_path(common::SMOLLM2)).expect("model loads"))
}

fn qwen() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| Engine::load(common::model_path(common::QWEN2)).expect("model loads"))
}

fn prompt(e: &Engine) -> Prompt {
    e.split_chat(
        None,
        &[
            "The community garden on Elm Street opens at dawn and closes at dusk; its gate is green.",
            "Alice keeps her bicycle in the blue shed behind the bakery, next to the old oven.",
            "Bob walks to work every day, except on Fridays, when he takes the tram along the river.",
            "The bakery sells rye bread on Mondays and croissants on every other day of the week.",
        ],
        "Where does Alice keep her bicycle?",
    )
    .unwrap()
}

fn ape(temperature: f32, scale: f32, share: f32, selection: Selection) -> Mode {
    Mode::ape(temperature, scale)
        .unwrap()
        .with_recompute(Recompute::new(share, selection).unwrap())
        .unwrap()
}

/// The rows `Engine::score` gives `continuation` after `prompt` read in `mode`.
fn rows(e: &Engine, prompt: &Prompt, mode: Mode, continuation: &[u32]) -> Vec<Vec<f32>> {
    e.score(prompt, mode, &[continuation]).unwrap().remove(0)
}

/// Same argmax, and no logit further from `want` than 0.5% of its range: the tolerance
/// of the other invariant tests (tests/ape.rs says why it is not smaller).
fn assert_logits_agree(got: &[f32], want: &[f32]) {
    assert_eq!(argmax(got), argmax(want));
    let (lo, hi) = want
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &x| {
            (l.min(x), h.max(x))
        });
    let diff = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(
        diff < 5e-3 * (hi - lo),
        "max |diff| {diff} on a range of {}",
        hi - lo
    );
}

fn kl(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let log_softmax = |xs: &[f32]| {
        let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = xs.iter().map(|&x| (x as f64 - max).exp()).sum();
        xs.iter()
            .map(|&x| x as f64 - max - sum.ln())
            .collect::<Vec<f64>>()
    };
    let (p, q) = (log_softmax(p_logits), log_softmax(q_logits));
    p.iter().zip(&q).map(|(a, b)| a.exp() * (a - b)).sum()
}

#[test]
fn recomputing_nothing_is_ape_bit_for_bit() {
    let e = smollm2();
    let prompt = prompt(e);
    let answer = e.tokenizer.encode("In the blue shed.", false).unwrap();
    for selection in [Selection::First, Selection::Attended] {
        assert_eq!(
            rows(e, &prompt, ape(0.9, 0.9, 0.0, selection), &answer),
            rows(e, &prompt, Mode::ape(0.9, 0.9).unwrap(), &answer)
        );
    }
    let options = GenerateOptions {
        max_tokens: Some(12),
        ..Default::default()
    };
    let plain = e
        .answer(&prompt, Mode::ape(0.9, 0.9).unwrap(), &options, |_| {})
        .unwrap();
    let dialled = e
        .answer(
            &prompt,
            ape(0.9, 0.9, 0.0, Selection::Attended),
            &options,
            |_| {},
        )
        .unwrap();
    assert_eq!(dialled.tokens, plain.tokens);
    assert_eq!(dialled.recomputed_tokens, 0);
}

#[test]
fn recomputing_everything_is_sequential_reading_on_both_models() {
    for e in [smollm2(), qwen()] {
        let prompt = prompt(e);
        let answer = e.tokenizer.encode("In the blue shed.", false).unwrap();
        let want = rows(e, &prompt, Mode::Sequential, &answer);
        // APE's factors have nothing left to correct once every token has seen the
        // contexts before it.
        for (selection, t, s) in [
            (Selection::Attended, 0.9, 0.9),
            (Selection::First, 0.5, 1.2),
        ] {
            let got = rows(e, &prompt, ape(t, s, 1.0, selection), &answer);
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert_logits_agree(g, w);
            }
        }
    }
}

#[test]
fn recomputing_a_share_counts_its_tokens_and_moves_towards_sequential() {
    let e = qwen();
    let prompt = prompt(e);
    let context_tokens: usize = prompt.contexts.iter().map(Vec::len).sum();
    let answer = e.tokenizer.encode("In the blue shed.", false).unwrap();
    let sequential = rows(e, &prompt, Mode::Sequential, &answer);
    let mean_kl = |mode: Mode| {
        let got = rows(e, &prompt, mode, &answer);
        sequential
            .iter()
            .zip(&got)
            .map(|(p, q)| kl(p, q))
            .sum::<f64>()
            / got.len() as f64
    };
    let none = mean_kl(Mode::Parallel);
    let half = mean_kl(ape(1.0, 1.0, 0.5, Selection::Attended));
    let all = mean_kl(ape(1.0, 1.0, 1.0, Selection::Attended));
    assert!(
        all < 0.01 && half < none,
        "KL from sequential: nothing recomputed {none}, half {half}, all {all}"
    );

    let options = GenerateOptions {
        max_tokens: Some(4),
        ..Default::default()
    };
    // The first context's keys and values are sequential's already: the share is spent
    // on the others, and recomputing everything runs exactly their tokens again.
    let later: usize = prompt.contexts[1..].iter().map(|c| c.len()).sum();
    let share = (0.3 * context_tokens as f32).ceil() as usize;
    assert!(
        share < later,
        "the test needs more than the share after the first context"
    );
    for selection in [Selection::Attended, Selection::First] {
        let all = e
            .answer(&prompt, ape(0.9, 0.9, 1.0, selection), &options, |_| {})
            .unwrap();
        assert_eq!(all.recomputed_tokens, later, "{selection:?}");
        let mode = ape(0.9, 0.9, 0.3, selection);
        let first = e.answer(&prompt, mode, &options, |_| {}).unwrap();
        assert_eq!(first.recomputed_tokens, share, "{selection:?}");
        let again = e.answer(&prompt, mode, &options, |_| {}).unwrap();
        assert_eq!(again.tokens, first.tokens, "the same tokens are chosen");
        assert_eq!(
            rows(e, &prompt, mode, &answer),
            rows(e, &prompt, mode, &answer),
            "scoring twice gives the same logits"
        );
    }
}

#[test]
fn contexts_that_do_not_fit_in_order_are_read_with_ape_alone() {
    let e = smollm2();
    let prompt = prompt(e);
    let window = e.model.config.context_length;
    let longest = prompt.contexts.iter().map(Vec::len).max().unwrap();
    let mode = ape(0.9, 0.9, 0.5, Selection::Attended);
    let recomputed = |max_tokens: Option<usize>| {
        // The answer's first sentence is enough; the token limit only sets the room.
        let options = GenerateOptions {
            max_tokens,
            stop: vec![".".into(), "\n".into()],
            ..Default::default()
        };
        e.answer(&prompt, mode, &options, |_| {})
            .unwrap()
            .recomputed_tokens
    };
    // Room for the answer up to the end of the window at APE's positions leaves none for
    // the contexts laid out one after another.
    let up_to_the_end = window - prompt.prefix.len() - longest - prompt.query.len();
    assert_eq!(
        recomputed(Some(up_to_the_end)),
        0,
        "nothing is recomputed beyond the window"
    );
    assert!(
        recomputed(Some(6)) > 0,
        "within the window the share is recomputed"
    );
    assert!(
        recomputed(None) > 0,
        "without a token limit, the answer may run to the end of the window after the contexts"
    );
}

#[test]
fn a_document_named_twice_and_a_long_question_read_like_sequential_at_the_full_share() {
    let e = smollm2();
    let garden = "The community garden on Elm Street opens at dawn; its gate is green.";
    let question = format!(
        "{} Where does Alice keep her bicycle?",
        "Please answer briefly and only from the documents above. ".repeat(60)
    );
    let prompt = e
        .split_chat(
            None,
            &[
                garden,
                "Alice keeps her bicycle in the blue shed behind the bakery.",
                garden,
            ],
            &question,
        )
        .unwrap();
    assert!(
        prompt.query.len() > 512,
        "the question spans several chunks"
    );
    let answer = e.tokenizer.encode("In the blue shed.", false).unwrap();
    let want = rows(e, &prompt, Mode::Sequential, &answer);
    let got = rows(e, &prompt, ape(0.9, 0.9, 1.0, Selection::Attended), &answer);
    for (g, w) in got.iter().zip(&want) {
        assert_logits_agree(g, w);
    }
}

#[test]
fn a_lone_context_is_not_recomputed_but_read_as_if_it_were() {
    let e = qwen();
    let prompt = e
        .split_chat(
            None,
            &["Alice keeps her bicycle in the blue shed behind the bakery, next to the old oven."],
            "Where does Alice keep her bicycle?",
        )
        .unwrap();
    let answer = e.tokenizer.encode("In the blue shed.", false).unwrap();
    let sequential = rows(e, &prompt, Mode::Sequential, &answer);
    // Its tokens have seen everything sequential reading shows them; once all of them
    // count as repaired, the factors are 1 and the reading is sequential's, bit for bit.
    for selection in [Selection::Attended, Selection::First] {
        let all = rows(e, &prompt, ape(0.5, 1.2, 1.0, selection), &answer);
        assert_eq!(all, sequential, "{selection:?}");
    }
    let mean_kl = |share: f32| {
        let got = rows(
            e,
            &prompt,
            ape(0.5, 1.2, share, Selection::Attended),
            &answer,
        );
        let total: f64 = sequential.iter().zip(&got).map(|(p, q)| kl(p, q)).sum();
        total / got.len() as f64
    };
    let (none, some) = (mean_kl(0.0), mean_kl(0.3));
    assert!(
        some < none,
        "KL from sequential: share 0 {none}, 0.3 {some}"
    );

    let options = GenerateOptions {
        max_tokens: Some(4),
        ..Default::default()
    };
    let mode = ape(0.5, 1.2, 0.3, Selection::Attended);
    let generation = e.answer(&prompt, mode, &options, |_| {}).unwrap();
    assert_eq!(generation.recomputed_tokens, 0, "nothing is run again");
}
