//! The harness end to end on the real default model (SmolLM2-135M) with hand-written
//! tasks, checking what holds by construction: sequential against itself has KL 0; with
//! one context, parallel reading is sequential reading (to the 8-bit rounding of the
//! output projection's input, see ape-core's APE tests); APE at T = S = 1 is parallel
//! reading; and the tiny sets score what was checked by hand.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ape_core::engine::{Engine, Mode};
use ape_eval::run::ExampleResult;
use ape_eval::tasks::{self, Draw, Split, Task};
use ape_eval::{EvalError, Evaluator, Report, Setting};
use indicatif::ProgressBar;

fn evaluator() -> &'static Evaluator {
    static EVALUATOR: OnceLock<Evaluator> = OnceLock::new();
    EVALUATOR.get_or_init(|| {
        let dir = std::env::var_os("APE_MODELS_DIR").map_or_else(
            || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"),
            PathBuf::from,
        );
        let path = dir.join("smollm2-135m-instruct-q4_1.gguf");
        assert!(
            path.exists(),
            "model file {} is missing: run `ape model pull` (or `bash scripts/test.sh`), or point APE_MODELS_DIR at it",
            path.display()
        );
        Evaluator::new(Engine::load(&path).expect("the model loads"))
    })
}

fn fixture(name: &str) -> Task {
    Task::File(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
}

fn run(task: &Task, contexts: usize, settings: &[Setting]) -> Vec<ExampleResult> {
    let draw = Draw {
        split: Split::Test,
        n: 100,
        contexts,
        draws: 1,
        seed: 1,
        skip: 0,
        needle_words: tasks::HAYSTACK_WORDS,
    };
    let set = tasks::load(task, Path::new("unused"), draw).unwrap();
    evaluator()
        .run(&set, settings, &ProgressBar::hidden())
        .unwrap()
}

fn settings() -> Vec<Setting> {
    vec![
        Setting::of(Mode::Sequential),
        Setting::of(Mode::Parallel),
        Setting::ape_point(1.0, 1.0).unwrap(),
    ]
}

#[test]
fn with_one_context_parallel_reads_like_sequential_and_sequential_has_no_kl_to_itself() {
    let examples = run(&fixture("tiny-rag.json"), 1, &settings());
    assert_eq!(examples.len(), 4);
    for e in &examples {
        let [sequential, parallel, unit_ape] = &e.outcomes[..] else {
            panic!("three outcomes per example");
        };
        assert_eq!(sequential.kl_vs_sequential, Some(0.0), "{}", e.id);
        assert_eq!(parallel.prediction, sequential.prediction, "{}", e.id);
        let kl = parallel.kl_vs_sequential.unwrap();
        assert!((0.0..5e-3).contains(&kl), "{}: KL {kl}", e.id);
        let (a, b) = (
            parallel.gold_logprob.unwrap(),
            sequential.gold_logprob.unwrap(),
        );
        assert!((a - b).abs() < 0.1, "{}: log-likelihoods {a} and {b}", e.id);
        // APE at T = S = 1 is the same computation as parallel reading; a sweep point
        // is scored but generates nothing.
        assert_eq!(unit_ape.gold_logprob, parallel.gold_logprob, "{}", e.id);
        assert_eq!(
            unit_ape.kl_vs_sequential, parallel.kl_vs_sequential,
            "{}",
            e.id
        );
        assert_eq!(unit_ape.prediction, None);
    }
    // Checked by hand: SmolLM2 answers each question in a sentence that holds the answer
    // ("Tom's cat is Pepper.", "The capital city of Australia is Canberra.", ...).
    let contains: Vec<f64> = examples
        .iter()
        .map(|e| e.outcomes[0].contains.unwrap())
        .collect();
    assert_eq!(contains, [1.0; 4]);
    assert!(examples
        .iter()
        .all(|e| e.outcomes[0].exact_match == Some(0.0)));
}

#[test]
fn label_choice_scores_the_hand_checked_set_and_reports_it() {
    let task = fixture("tiny-icl.json");
    let settings = settings();
    let examples = run(&task, 4, &settings);
    let predictions = |i: usize| -> Vec<String> {
        examples
            .iter()
            .map(|e| e.outcomes[i].prediction.clone().unwrap())
            .collect()
    };
    // Checked by hand: laid out as plain text, where the label continues the review's own
    // lines, SmolLM2 labels each of the four reviews right when reading sequentially.
    assert_eq!(
        predictions(0),
        ["positive", "negative", "positive", "negative"]
    );
    assert!(examples
        .iter()
        .all(|e| e.outcomes[0].kl_vs_sequential == Some(0.0)));
    for e in &examples {
        for o in &e.outcomes {
            let right = o.prediction.as_deref() == Some(e.gold.as_str());
            assert_eq!(
                o.accuracy,
                Some(f64::from(u8::from(right))),
                "{} {}",
                e.id,
                o.setting
            );
        }
    }

    let mut report = Report::new(
        "tiny-icl".into(),
        "smollm2".into(),
        "test".into(),
        1,
        ape_eval::tasks::Metric::Accuracy,
        &settings,
    );
    report.add_run(4, examples.clone(), &settings);
    report.add_run(2, run(&task, 2, &settings), &settings);
    let sequential = &report.runs[0].summaries[0];
    assert_eq!(sequential.accuracy, Some(1.0));
    assert_eq!(sequential.agrees_with_sequential, Some(1.0));
    assert_eq!(sequential.metric_stderr, Some(0.0));
    assert_eq!(sequential.ratio_to_sequential, Some(1.0));
    let choice = report
        .sweep_choice
        .as_ref()
        .expect("one sweep point to choose");
    assert_eq!((choice.temperature, choice.scale), (1.0, 1.0));
    let markdown = report.markdown();
    assert!(
        markdown.contains("| sequential | 100.0% | 0.0% | 100.0% | 100% |"),
        "{markdown}"
    );

    let dir = std::env::temp_dir().join(format!("ape-eval-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, svg) = (dir.join("report.json"), dir.join("report.svg"));
    report.write_json(&json).unwrap();
    report.plot_svg(&svg).unwrap();
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(written["runs"][0]["examples"].as_array().unwrap().len(), 4);
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_data_points_at_the_setup_script() {
    let draw = Draw {
        split: Split::Dev,
        n: 1,
        contexts: 2,
        draws: 1,
        seed: 1,
        skip: 0,
        needle_words: tasks::HAYSTACK_WORDS,
    };
    for task in [Task::Squad, Task::Needle, Task::Sentiment, Task::Intent] {
        let err = tasks::load(&task, Path::new("/nonexistent/ape-eval-data"), draw).unwrap_err();
        assert!(matches!(err, EvalError::MissingData { .. }), "{err}");
        assert!(err.to_string().contains("scripts/eval-data.sh"), "{err}");
    }
    let err = Task::from_name("trivia").unwrap_err();
    assert!(err.to_string().contains("squad, needle"), "{err}");
}
