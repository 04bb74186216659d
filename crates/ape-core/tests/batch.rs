//! Requests decoded together give the tokens each gets alone: plain generation and APE
//! answers (with recomputed document tokens too), of different lengths, started at
//! different times, on the real models.

mod common;

use ape_core::engine::generate::GenerateOptions;
use ape_core::engine::{Engine, Mode, Recompute, Selection};

fn greedy(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens: Some(max_tokens),
        ..GenerateOptions::default()
    }
}

/// One request: plain chat, or a question over documents in one of the modes.
enum Request {
    Chat(&'static str, usize),
    Documents(&'static str, Mode, usize),
}

const DOCUMENTS: [&str; 3] = [
    "Alice keeps her bicycle in the green shed behind the school.",
    "Bob's car is parked in the underground garage on Elm Street.",
    "The school library opens at eight in the morning.",
];

fn answer(engine: &Engine, request: &Request) -> Vec<u32> {
    match request {
        Request::Chat(text, max_tokens) => {
            let prompt = engine.chat_prompt(None, text).unwrap();
            engine.generate(&prompt, &greedy(*max_tokens), |_| {})
        }
        Request::Documents(question, mode, max_tokens) => {
            let prompt = engine.split_chat(None, &DOCUMENTS, question).unwrap();
            engine.answer(&prompt, *mode, &greedy(*max_tokens), |_| {})
        }
    }
    .unwrap()
    .tokens
}

#[test]
fn requests_decoded_together_answer_as_alone() {
    let requests = [
        Request::Chat("Write a short poem about the sea.", 40),
        Request::Chat("Say hello.", 8),
        Request::Documents(
            "Where does Alice keep her bicycle?",
            Mode::ape(0.9, 0.9).unwrap(),
            24,
        ),
        Request::Documents("When does the library open?", Mode::Parallel, 16),
        Request::Documents(
            "Where is the green shed?",
            Mode::ape(1.0, 1.0)
                .unwrap()
                .with_recompute(Recompute::new(0.3, Selection::Attended).unwrap())
                .unwrap(),
            20,
        ),
        Request::Documents("Where is Bob's car?", Mode::Sequential, 20),
        Request::Chat("Count from one to twenty in words.", 48),
    ];
    for model in [common::SMOLLM2, common::QWEN2] {
        let alone = Engine::load(common::model_path(model)).unwrap();
        let expected: Vec<Vec<u32>> = requests.iter().map(|r| answer(&alone, r)).collect();
        drop(alone);

        let batched = Engine::load(common::model_path(model))
            .unwrap()
            .with_batching(16);
        // Twice over, all at once, so that requests join and leave the batch mid-way; their
        // prompts are read 16 tokens a step, beside the others' decoding.
        let together: Vec<Vec<u32>> = std::thread::scope(|scope| {
            let running: Vec<_> = requests
                .iter()
                .chain(&requests)
                .map(|request| scope.spawn(|| answer(&batched, request)))
                .collect();
            running.into_iter().map(|r| r.join().unwrap()).collect()
        });
        let counts = batched.decode_steps().unwrap();
        let steps = counts.steps.load(std::sync::atomic::Ordering::Relaxed);
        let tokens = counts.tokens.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            tokens > steps,
            "{model}: {tokens} tokens in {steps} steps, never together"
        );
        for (i, tokens) in together.iter().enumerate() {
            assert_eq!(
                tokens,
                &expected[i % requests.len()],
                "{model}, request {i}"
            );
        }
    }
}

#[test]
fn a_request_cancelled_in_the_batch_stops_there_and_the_others_answer_as_alone() {
    let requests = [
        Request::Chat("Write a short poem about the sea.", 40),
        Request::Documents(
            "Where does Alice keep her bicycle?",
            Mode::ape(0.9, 0.9).unwrap(),
            24,
        ),
        Request::Chat("Count from one to twenty in words.", 48),
    ];
    let engine = Engine::load(common::model_path(common::SMOLLM2))
        .unwrap()
        .with_batching(16);
    let expected: Vec<Vec<u32>> = requests.iter().map(|r| answer(&engine, r)).collect();

    let (answers, cancelled) = std::thread::scope(|scope| {
        let running: Vec<_> = requests
            .iter()
            .map(|request| scope.spawn(|| answer(&engine, request)))
            .collect();
        // A long answer whose client leaves after its third piece of text.
        let leaving = scope.spawn(|| {
            let prompt = engine
                .chat_prompt(None, "Count from one to a hundred in words.")
                .unwrap();
            let options = greedy(200);
            let (cancel, mut pieces) = (options.cancel.clone(), 0);
            let outcome = engine.generate(&prompt, &options, |_| {
                pieces += 1;
                if pieces == 3 {
                    cancel.cancel();
                }
            });
            (outcome.map(|g| g.tokens.len()), pieces)
        });
        let answers: Vec<Vec<u32>> = running.into_iter().map(|r| r.join().unwrap()).collect();
        (answers, leaving.join().unwrap())
    });
    let (outcome, pieces) = cancelled;
    assert!(
        matches!(outcome, Err(ape_core::Error::Cancelled)),
        "{outcome:?}"
    );
    assert_eq!(
        pieces, 3,
        "no token is decoded for a request after it is cancelled"
    );
    assert_eq!(answers, expected);
}
