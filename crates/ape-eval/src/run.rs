//! Running a task: every example read in every setting (sequential, parallel, APE with
//! given factors), each prediction scored, and the gold answer's log-likelihood and the
//! next-token distributions on it compared with sequential reading.

use std::sync::Arc;

use ape_core::engine::generate::GenerateOptions;
use ape_core::engine::{Engine, Mode, Prompt};
use indicatif::ProgressBar;
use serde::Serialize;

use crate::error::Result;
use crate::metrics::{contains_answer, exact_match, f1, log_likelihood, mean_kl};
use crate::store::RunStore;
use crate::tasks::{Example, Target, TaskSet};

/// Encoded contexts kept at most (then dropped and encoded again as needed).
const STORE_BUDGET: usize = 6 << 30;

/// A named way of reading the contexts, made by [`Setting::of`] or [`Setting::ape_point`].
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    /// How reports name the setting: the mode's name, or `ape T=.. S=..` with its factors.
    pub(crate) label: String,
    pub(crate) mode: Mode,
    /// A point of a T x S sweep (reported in the sweep's grid, not the main table).
    pub(crate) in_sweep: bool,
}

impl Setting {
    /// The setting of `mode`, labelled with the mode's name, and for APE with its
    /// factors and the share it recomputes (when it does).
    pub fn of(mode: Mode) -> Setting {
        let label = match mode {
            Mode::Ape { factors, recompute } => {
                let mut label = format!("ape T={} S={}", factors.temperature, factors.scale);
                if recompute.share > 0.0 {
                    label += &format!(" r={} {}", recompute.share, recompute.selection.name());
                }
                label
            }
            _ => mode.name().to_string(),
        };
        Setting {
            label,
            mode,
            in_sweep: false,
        }
    }

    /// APE with the given factors, labelled with them (a point of a sweep).
    pub fn ape_point(temperature: f32, scale: f32) -> Result<Setting> {
        Ok(Setting {
            label: format!("ape T={temperature} S={scale}"),
            mode: Mode::ape(temperature, scale)?,
            in_sweep: true,
        })
    }
}

/// How one setting did on one example. A setting that cannot read the example (its
/// contexts do not fit the model's window sequentially) has only `unavailable`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outcome {
    /// The label of the setting (see [`Setting`]) this is the outcome of.
    pub setting: String,
    /// The generated answer, trimmed, or for label tasks the label chosen; none for a sweep
    /// point on a generation task (sweep points generate nothing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prediction: Option<String>,
    /// Generation tasks: 1 when the prediction equals a gold answer after SQuAD's
    /// normalisation, else 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact_match: Option<f64>,
    /// Generation tasks: the best token F1 (0 to 1) of the prediction against the gold
    /// answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub f1: Option<f64>,
    /// Generation tasks: 1 when the prediction holds a gold answer as whole words, else 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contains: Option<f64>,
    /// Label tasks: 1 when the label chosen is the gold one, else 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Log-likelihood (nats) of the gold answer's tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gold_logprob: Option<f64>,
    /// Mean KL divergence (nats) of sequential's next-token distributions from this
    /// setting's, over the gold answer's tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl_vs_sequential: Option<f64>,
    /// Why the setting could not read the example (the request does not fit the model's
    /// window this way); every other field but `setting` is then none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

/// One example of a run and how every setting did on it.
#[derive(Debug, Clone, Serialize)]
pub struct ExampleResult {
    /// The example's id (see [`Example::id`](crate::tasks::Example::id)).
    pub id: String,
    /// The question as asked (for label tasks, the input line and the label's prompt).
    pub question: String,
    /// The answer whose log-likelihood is measured: the first gold answer, or the gold label.
    pub gold: String,
    /// Where the evidence sits (gold document, needle depth, demonstration set).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Tokens of the whole prompt (system text, contexts and question), each counted once.
    pub prompt_tokens: usize,
    /// One outcome per setting, in the order the settings were given.
    pub outcomes: Vec<Outcome>,
}

/// A model loaded for evaluation, with the store its runs share contexts through.
pub struct Evaluator {
    engine: Engine,
    store: Arc<RunStore>,
    /// Most tokens generated for an answer.
    pub max_answer_tokens: usize,
}

impl Evaluator {
    /// An evaluator running `engine` (loaded and set up as the caller wants it), with a
    /// store of its own that keeps the run's encoded contexts.
    pub fn new(engine: Engine) -> Evaluator {
        let store = Arc::new(RunStore::new(STORE_BUDGET));
        Evaluator {
            engine: engine.with_store(store.clone()),
            store,
            max_answer_tokens: 24,
        }
    }

    /// The engine the examples are read with, its contexts shared through the run's store.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Every example of `set` in every setting, ticking `progress` once per example.
    pub fn run(
        &self,
        set: &TaskSet,
        settings: &[Setting],
        progress: &ProgressBar,
    ) -> Result<Vec<ExampleResult>> {
        self.store.clear();
        let mut results = Vec::with_capacity(set.examples.len());
        for example in &set.examples {
            results.push(self.run_example(set, example, settings)?);
            progress.inc(1);
        }
        Ok(results)
    }

    fn run_example(
        &self,
        set: &TaskSet,
        example: &Example,
        settings: &[Setting],
    ) -> Result<ExampleResult> {
        let engine = &self.engine;
        let prompt = set.prompt(engine, example)?;
        // Sequential reading with the contexts folded into the prefix: the same tokens in
        // the same causal pass, but the engine keeps the prefix's keys and values, so the
        // demonstrations shared by an ICL run's questions are read once.
        let sequential = Prompt {
            prefix: prompt.sequential_tokens()[..prompt.total_tokens() - prompt.query.len()]
                .to_vec(),
            contexts: Vec::new(),
            query: prompt.query.clone(),
        };
        let (answers, gold) = match &example.target {
            Target::Answer(answers) => (&answers[..answers.len().min(1)], 0),
            Target::Choice { labels, gold } => (&labels[..], *gold),
        };
        let continuations = answers
            .iter()
            .map(|a| engine.tokenizer.encode(&set.format.continuation(a), false))
            .collect::<ape_core::Result<Vec<_>>>()?;
        let continuations: Vec<&[u32]> = continuations.iter().map(Vec::as_slice).collect();
        let score = |mode: Mode| {
            let read = if mode == Mode::Sequential {
                &sequential
            } else {
                &prompt
            };
            engine.score(read, mode, &continuations)
        };
        let reference = fits_window(score(Mode::Sequential))?;

        let mut outcomes = Vec::with_capacity(settings.len());
        for setting in settings {
            let scored = match setting.mode {
                Mode::Sequential => reference.clone().ok_or_else(beyond_window),
                mode => fits_window(score(mode))?.ok_or_else(beyond_window),
            };
            let rows = match scored {
                Ok(rows) => rows,
                Err(reason) => {
                    outcomes.push(Outcome {
                        setting: setting.label.clone(),
                        unavailable: Some(reason),
                        ..Outcome::default()
                    });
                    continue;
                }
            };
            let likelihoods: Vec<f64> = rows
                .iter()
                .zip(&continuations)
                .map(|(r, tokens)| log_likelihood(r, tokens))
                .collect();
            let mut outcome = Outcome {
                setting: setting.label.clone(),
                gold_logprob: Some(likelihoods[gold]),
                kl_vs_sequential: reference.as_ref().map(|r| mean_kl(&r[gold], &rows[gold])),
                ..Outcome::default()
            };
            match &example.target {
                // A sweep point is chosen by its distributions; generating an answer at
                // every point would cost more than all the rest of the run.
                Target::Answer(_) if setting.in_sweep => {}
                Target::Answer(answers) => {
                    let read = if setting.mode == Mode::Sequential {
                        &sequential
                    } else {
                        &prompt
                    };
                    let options = GenerateOptions {
                        max_tokens: Some(self.max_answer_tokens),
                        stop: vec!["\n".to_string()],
                        ..GenerateOptions::default()
                    };
                    let text = engine.answer(read, setting.mode, &options, |_| {})?.text;
                    let text = text.trim().to_string();
                    outcome.exact_match = Some(exact_match(&text, answers));
                    outcome.f1 = Some(f1(&text, answers));
                    outcome.contains = Some(contains_answer(&text, answers));
                    outcome.prediction = Some(text);
                }
                Target::Choice { labels, gold } => {
                    let best = (0..labels.len())
                        .max_by(|&a, &b| likelihoods[a].total_cmp(&likelihoods[b]))
                        .unwrap_or(0);
                    outcome.accuracy = Some(f64::from(u8::from(best == *gold)));
                    outcome.prediction = Some(labels[best].clone());
                }
            }
            outcomes.push(outcome);
        }
        Ok(ExampleResult {
            id: example.id.clone(),
            question: example.question.clone(),
            gold: example.target.gold_text().to_string(),
            note: example.note.clone(),
            prompt_tokens: prompt.total_tokens(),
            outcomes,
        })
    }
}

/// `None` where the request does not fit the model's window (sequential reading of many
/// contexts), the error itself otherwise.
fn fits_window<T>(result: ape_core::Result<T>) -> Result<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(
            ape_core::Error::ContextOverflow { .. } | ape_core::Error::ApeWindowOverflow { .. },
        ) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn beyond_window() -> String {
    "the request does not fit the model's window in this mode".to_string()
}
