//! The tasks: how each data set becomes examples of (contexts, question, target).
//!
//! Every task has a fixed dev/test partition (drawn with a constant seed, so `--seed`
//! never moves an example from one split to the other); `--seed` only picks which
//! examples, demonstrations and distractors a run uses. Settings are chosen on `dev` and
//! reported on `test`.
//!
//! - `squad` (RAG): a SQuAD v1.1 question, its gold paragraph and distractor paragraphs
//!   from other articles, one context each, the gold one at a random place.
//! - `needle` (RAG): Paul Graham essays cut into contexts, one made-up fact (the needle)
//!   inserted at a depth that cycles through 0, 1/4, 1/2, 3/4 and 1 of the haystack.
//! - `sentiment`, `intent` (ICL): demonstrations, one per context, laid out as plain text
//!   so that each label continues its demonstration's lines; a run draws one or more sets
//!   of them, each shared by its own questions (so each is encoded once); the answer is
//!   the label with the highest log-likelihood as the question's continuation.
//! - `file:PATH`: examples written by hand in JSON (see [`TaskFile`]).

use std::path::{Path, PathBuf};

use ape_core::engine::{Engine, Prompt};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

use crate::data::{self, Labelled};
use crate::error::{EvalError, Result};

/// Drawn once to fix every task's dev/test partition.
const SPLIT_SEED: u64 = 0x0a9e_e7a1;
/// Words in each haystack piece (context) of `needle` unless the draw says otherwise
/// (about 200 tokens).
pub const HAYSTACK_WORDS: usize = 150;

/// A task to evaluate on, named on the command line (see the module's list).
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// SQuAD v1.1 questions among distractor paragraphs (RAG).
    Squad,
    /// A made-up fact hidden in Paul Graham essays (RAG).
    Needle,
    /// Movie review polarity from demonstrations (ICL).
    Sentiment,
    /// Voice-assistant request intents from demonstrations (ICL).
    Intent,
    /// Examples written by hand in this JSON file (see [`TaskFile`]).
    File(PathBuf),
}

/// What kind of context a task has; settings are chosen per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Retrieved documents, answered by generation.
    Rag,
    /// Demonstrations, answered by choosing a label.
    Icl,
}

/// How a task's prompt is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// The model's chat template: the system text, then a user turn of the contexts and
    /// the question; the answer is the assistant's reply.
    #[default]
    Chat,
    /// Plain text, as a base model reads few-shot examples: the system text and a blank
    /// line, the contexts, then the question, which the answer continues after a space
    /// ("Review: ...\nSentiment:" + " positive"). Every demonstration's label continues
    /// its own text the same way, so the question reads like one more demonstration.
    Text,
}

impl Format {
    /// The text the model is scored on for the answer or label `answer`.
    pub fn continuation(self, answer: &str) -> String {
        match self {
            Format::Chat => answer.to_string(),
            Format::Text => format!(" {answer}"),
        }
    }
}

impl Task {
    /// The task called `name` (`squad`, `needle`, `sentiment`, `intent` or `file:PATH`);
    /// [`EvalError::UnknownTask`] for any other.
    pub fn from_name(name: &str) -> Result<Task> {
        match name {
            "squad" => Ok(Task::Squad),
            "needle" => Ok(Task::Needle),
            "sentiment" => Ok(Task::Sentiment),
            "intent" => Ok(Task::Intent),
            other => match other.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(Task::File(PathBuf::from(path))),
                _ => Err(EvalError::UnknownTask(other.to_string())),
            },
        }
    }

    /// The task's name for reports and file names; a task file's name without extension.
    pub fn name(&self) -> String {
        match self {
            Task::Squad => "squad".into(),
            Task::Needle => "needle".into(),
            Task::Sentiment => "sentiment".into(),
            Task::Intent => "intent".into(),
            Task::File(path) => path
                .file_stem()
                .map_or_else(|| "file".into(), |s| s.to_string_lossy().into_owned()),
        }
    }
}

/// Which fixed part of a task's data a run draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The part settings are chosen on (sweeps, calibration).
    Dev,
    /// The part results are reported on.
    Test,
}

impl Split {
    /// The split called `name` (`dev` or `test`); [`EvalError::Setting`] for any other.
    pub fn from_name(name: &str) -> Result<Split> {
        match name {
            "dev" => Ok(Split::Dev),
            "test" => Ok(Split::Test),
            other => Err(EvalError::Setting(format!(
                "unknown split `{other}`; choose dev (for choosing settings) or test (for reporting)"
            ))),
        }
    }

    /// `dev` or `test`, as [`Split::from_name`] reads it.
    pub fn name(self) -> &'static str {
        match self {
            Split::Dev => "dev",
            Split::Test => "test",
        }
    }
}

/// What a question is answered against.
#[derive(Debug, Clone)]
pub enum Target {
    /// Free generation, scored against any of these answers; the first is the one whose
    /// log-likelihood is measured.
    Answer(Vec<String>),
    /// The label of highest log-likelihood among `labels`; `gold` is the right one.
    Choice {
        /// The labels to choose among.
        labels: Vec<String>,
        /// The index of the right label in `labels`.
        gold: usize,
    },
}

impl Target {
    /// The text whose log-likelihood and next-token distributions are measured.
    pub(crate) fn gold_text(&self) -> &str {
        match self {
            Target::Answer(answers) => answers.first().map_or("", String::as_str),
            Target::Choice { labels, gold } => &labels[*gold],
        }
    }
}

/// One question with the contexts it is read with.
#[derive(Debug, Clone)]
pub struct Example {
    /// Names the example in reports: SQuAD's question id, the task file's, or one made up
    /// (`needle-3`, `sentiment-17`).
    pub id: String,
    /// The documents, haystack pieces or demonstrations, each read as one context.
    pub contexts: Vec<String>,
    /// What is asked after the contexts.
    pub question: String,
    /// What the answer is scored against.
    pub target: Target,
    /// Where the evidence sits, for the report (gold paragraph index, needle depth).
    pub note: Option<String>,
}

/// The number a task is judged by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// SQuAD token F1 of the generated answer.
    F1,
    /// Whether the generated answer contains the gold one.
    Contains,
    /// Whether the most likely label is the gold one.
    Accuracy,
}

impl Metric {
    /// The metric's name in reports' tables and plots.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Metric::F1 => "F1",
            Metric::Contains => "answer contains",
            Metric::Accuracy => "accuracy",
        }
    }
}

/// The examples of one run, with the system text they are asked under.
#[derive(Debug, Clone)]
pub struct TaskSet {
    /// The task's name (see [`Task::name`]).
    pub name: String,
    /// Whether the contexts are documents or demonstrations.
    pub family: Family,
    /// The number the task's results are judged by.
    pub metric: Metric,
    /// How the prompt is laid out (chat template or plain text).
    pub format: Format,
    /// The instruction the examples are asked under (the system turn, or the text's head).
    pub system: String,
    /// The questions of the run, in the order they are asked.
    pub examples: Vec<Example>,
}

impl TaskSet {
    /// `example` split for `engine` as the task lays it out: through the chat template
    /// (the system text, then a user turn of the contexts and the question), or as plain
    /// text (the system text and a blank line, the contexts, the question).
    pub fn prompt(&self, engine: &Engine, example: &Example) -> ape_core::Result<Prompt> {
        match self.format {
            Format::Chat => {
                engine.split_chat(Some(&self.system), &example.contexts, &example.question)
            }
            Format::Text => engine.split_text(
                &format!("{}\n\n", self.system),
                &example.contexts,
                &example.question,
            ),
        }
    }
}

/// Which examples a run draws.
#[derive(Debug, Clone, Copy)]
pub struct Draw {
    /// The part of the data the questions come from.
    pub split: Split,
    /// Examples (questions) in the run.
    pub n: usize,
    /// Contexts per question: documents (gold included), haystack pieces or demonstrations.
    pub contexts: usize,
    /// Sets of demonstrations (ICL tasks), each with its own `n` questions. RAG tasks draw
    /// distractors per question already and take 1.
    pub draws: usize,
    /// Picks the questions, demonstrations and distractors within the split (never the
    /// split itself).
    pub seed: u64,
    /// Questions left out from the start of the draw: runs with `skip` 0, n, 2n, ... and
    /// the same seed are the parts of one long run, each question in exactly one part.
    pub skip: usize,
    /// Words in each haystack piece of `needle` ([`HAYSTACK_WORDS`] by default).
    pub needle_words: usize,
}

/// The examples of `task` for `draw`, reading data from `dir`.
pub fn load(task: &Task, dir: &Path, draw: Draw) -> Result<TaskSet> {
    if draw.skip == 0 {
        return load_all(task, dir, draw);
    }
    if matches!(task, Task::Sentiment | Task::Intent) {
        return Err(EvalError::Setting(format!(
            "--skip is for tasks that draw contexts per question; {} shares its demonstrations \
             among a run's questions, so raise --n or --draws instead",
            task.name()
        )));
    }
    // Drawing the skipped questions too keeps the random stream, and so every later
    // question's distractors, what they are in one long run.
    let mut set = load_all(
        task,
        dir,
        Draw {
            n: draw.n + draw.skip,
            skip: 0,
            ..draw
        },
    )?;
    set.examples.drain(..draw.skip.min(set.examples.len()));
    Ok(set)
}

fn load_all(task: &Task, dir: &Path, draw: Draw) -> Result<TaskSet> {
    if draw.contexts == 0 {
        return Err(EvalError::Setting(
            "--contexts must be at least 1".to_string(),
        ));
    }
    if draw.draws == 0 {
        return Err(EvalError::Setting("--draws must be at least 1".to_string()));
    }
    if draw.draws > 1 && !matches!(task, Task::Sentiment | Task::Intent) {
        return Err(EvalError::Setting(format!(
            "--draws is for the ICL tasks (sentiment, intent), whose demonstrations are shared by \
             a run's questions; {} draws its contexts per question, so raise --n instead",
            task.name()
        )));
    }
    match task {
        Task::Squad => squad(&data::squad(dir)?, draw),
        Task::Needle => needle(&data::essays(dir)?, draw),
        Task::Sentiment => {
            let head = "Movie reviews, each labelled with its sentiment: positive or negative.";
            let set = classification(
                &data::polarity(dir)?,
                draw,
                "Review",
                "Sentiment",
                [1000, 500],
            )?;
            Ok(TaskSet {
                name: task.name(),
                system: head.into(),
                ..set
            })
        }
        Task::Intent => {
            let head = "Requests to a voice assistant, each labelled with its intent: \
                        add_to_playlist, book_restaurant, get_weather, play_music, \
                        search_screening_event, search_creative_work or rate_book.";
            let set = classification(
                &data::intents(dir)?,
                draw,
                "Utterance",
                "Intent",
                [200, 100],
            )?;
            Ok(TaskSet {
                name: task.name(),
                system: head.into(),
                ..set
            })
        }
        Task::File(path) => from_file(path, draw),
    }
}

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// SQuAD split by article: a quarter of the articles are dev, the rest test.
fn squad(articles: &[data::Article], draw: Draw) -> Result<TaskSet> {
    let mut order: Vec<usize> = (0..articles.len()).collect();
    order.shuffle(&mut rng(SPLIT_SEED));
    let dev = order.len() / 4;
    let chosen = match draw.split {
        Split::Dev => &order[..dev],
        Split::Test => &order[dev..],
    };
    // (article, paragraph, question) of the split.
    let mut questions: Vec<(usize, usize, usize)> = chosen
        .iter()
        .flat_map(|&a| {
            articles[a]
                .paragraphs
                .iter()
                .enumerate()
                .flat_map(move |(p, para)| (0..para.qas.len()).map(move |q| (a, p, q)))
        })
        .collect();
    let mut rng = rng(draw.seed);
    questions.shuffle(&mut rng);
    let other_paragraphs = |article: usize| -> Vec<(usize, usize)> {
        chosen
            .iter()
            .filter(|&&a| a != article)
            .flat_map(|&a| (0..articles[a].paragraphs.len()).map(move |p| (a, p)))
            .collect()
    };
    let examples = questions
        .into_iter()
        .take(draw.n)
        .map(|(a, p, q)| {
            let para = &articles[a].paragraphs[p];
            let qa = &para.qas[q];
            let pool = other_paragraphs(a);
            let mut contexts: Vec<String> = pool
                .choose_multiple(&mut rng, draw.contexts - 1)
                .map(|&(a, p)| articles[a].paragraphs[p].context.clone())
                .collect();
            let gold_at = rng.gen_range(0..=contexts.len());
            contexts.insert(gold_at, para.context.clone());
            Example {
                id: qa.id.clone(),
                contexts,
                question: qa.question.clone(),
                target: Target::Answer(qa.answers.iter().map(|x| x.text.clone()).collect()),
                note: Some(format!("gold document {gold_at}")),
            }
        })
        .collect();
    Ok(TaskSet {
        name: "squad".into(),
        family: Family::Rag,
        metric: Metric::F1,
        format: Format::Chat,
        system: "Answer the question with a few words copied from the documents.".into(),
        examples,
    })
}

/// Cities whose (made-up) vault codes are the needles.
const CITIES: [&str; 24] = [
    "Lisbon",
    "Oslo",
    "Nairobi",
    "Lima",
    "Hanoi",
    "Dublin",
    "Quito",
    "Tbilisi",
    "Perth",
    "Montreal",
    "Seville",
    "Krakow",
    "Osaka",
    "Accra",
    "Bergen",
    "Valparaiso",
    "Tallinn",
    "Cusco",
    "Porto",
    "Zagreb",
    "Leipzig",
    "Manila",
    "Dakar",
    "Reykjavik",
];

/// The needle task: the essays of the split, shuffled by the seed, cut into contexts of
/// `draw.needle_words` words; each example hides one vault code in them.
fn needle(essays: &[(String, String)], draw: Draw) -> Result<TaskSet> {
    let piece_words = draw.needle_words.max(1);
    let mut order: Vec<usize> = (0..essays.len()).collect();
    order.shuffle(&mut rng(SPLIT_SEED));
    let dev = order.len() / 3;
    let mut chosen = match draw.split {
        Split::Dev => order[..dev].to_vec(),
        Split::Test => order[dev..].to_vec(),
    };
    let mut rng = rng(draw.seed);
    chosen.shuffle(&mut rng);
    let words: Vec<&str> = chosen
        .iter()
        .flat_map(|&i| essays[i].1.split(' '))
        .take(draw.contexts * piece_words)
        .collect();
    if words.len() < draw.contexts * piece_words {
        return Err(EvalError::Setting(format!(
            "the {} essays hold {} words, too few for {} contexts of {piece_words} words; ask for fewer --contexts",
            draw.split.name(),
            words.len(),
            draw.contexts
        )));
    }
    let examples = (0..draw.n)
        .map(|i| {
            let city = CITIES[rng.gen_range(0..CITIES.len())];
            let code = rng.gen_range(1000..10000).to_string();
            let depth = (i % 5) as f64 / 4.0;
            let mut contexts: Vec<Vec<&str>> =
                words.chunks(piece_words).map(<[&str]>::to_vec).collect();
            let at = ((depth * words.len() as f64) as usize).min(words.len() - 1);
            let (piece, mut offset) = (at / piece_words, at % piece_words);
            let piece_words = &mut contexts[piece];
            // Put the needle between sentences: after the next word that ends one.
            while offset < piece_words.len()
                && offset > 0
                && !piece_words[offset - 1].ends_with('.')
            {
                offset += 1;
            }
            let sentence = format!("The secret code of the {city} vault is {code}.");
            piece_words.insert(offset.min(piece_words.len()), &sentence);
            Example {
                id: format!("needle-{i}"),
                contexts: contexts.iter().map(|w| w.join(" ")).collect(),
                question: format!("What is the secret code of the {city} vault?"),
                target: Target::Answer(vec![code]),
                note: Some(format!("depth {depth:.2}, context {piece}")),
            }
        })
        .collect();
    Ok(TaskSet {
        name: "needle".into(),
        family: Family::Rag,
        metric: Metric::Contains,
        format: Format::Chat,
        system: "Answer the question from the documents.".into(),
        examples,
    })
}

/// An ICL task over labelled texts, laid out as plain text (see [`Format::Text`]): the
/// shuffled data holds `[test, dev]` examples first, the rest is the pool demonstrations
/// are drawn from. Each of the `draws` sets of demonstrations is the first `contexts` of
/// the pool shuffled anew, so a run with more contexts keeps those of a run with fewer,
/// and has its own `n` questions, none asked twice in a run.
fn classification(
    data: &[Labelled],
    draw: Draw,
    input_name: &str,
    label_name: &str,
    [test, dev]: [usize; 2],
) -> Result<TaskSet> {
    if data.len() <= test + dev {
        return Err(EvalError::Setting(format!(
            "the data has {} labelled examples, too few for the task's {test} test and {dev} \
             dev questions and a pool of demonstrations; run `bash scripts/eval-data.sh` for \
             the full set",
            data.len()
        )));
    }
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.shuffle(&mut rng(SPLIT_SEED));
    let (split, pool) = order.split_at(test + dev);
    let questions = match draw.split {
        Split::Test => &split[..test],
        Split::Dev => &split[test..],
    };
    if draw.contexts > pool.len() {
        return Err(EvalError::Setting(format!(
            "the demonstration pool has {} examples; ask for at most that many --contexts",
            pool.len()
        )));
    }
    if draw.n * draw.draws > questions.len() {
        return Err(EvalError::Setting(format!(
            "the {} split has {} questions, fewer than --n {} times --draws {}; ask for fewer",
            draw.split.name(),
            questions.len(),
            draw.n,
            draw.draws
        )));
    }
    let mut labels: Vec<String> = data.iter().map(|d| d.label.clone()).collect();
    labels.sort();
    labels.dedup();
    let mut rng = rng(draw.seed);
    let mut questions = questions.to_vec();
    questions.shuffle(&mut rng);
    let mut pool = pool.to_vec();
    let mut examples = Vec::with_capacity(draw.n * draw.draws);
    for (set, asked) in questions.chunks(draw.n).take(draw.draws).enumerate() {
        pool.shuffle(&mut rng);
        let demonstrations: Vec<String> = pool[..draw.contexts]
            .iter()
            .map(|&i| {
                format!(
                    "{input_name}: {}\n{label_name}: {}",
                    data[i].text, data[i].label
                )
            })
            .collect();
        examples.extend(asked.iter().map(|&i| Example {
            id: format!("{}-{i}", label_name.to_lowercase()),
            contexts: demonstrations.clone(),
            question: format!("{input_name}: {}\n{label_name}:", data[i].text),
            target: Target::Choice {
                gold: labels.iter().position(|l| *l == data[i].label).unwrap_or(0),
                labels: labels.clone(),
            },
            note: Some(format!("demonstration set {set}")),
        }));
    }
    Ok(TaskSet {
        name: String::new(),
        family: Family::Icl,
        metric: Metric::Accuracy,
        format: Format::Text,
        system: String::new(),
        examples,
    })
}

/// A task written by hand:
/// `{"system": "...", "examples": [{"id": "...", "contexts": ["..."], "question": "...",
/// "answers": ["..."]}]}`, where a choice example gives `"labels": [...]` and `"gold": i`
/// instead of `"answers"`. A run keeps the first `contexts` contexts of each example.
/// `"format": "text"` lays the prompt out as plain text instead of a chat (see [`Format`]).
#[derive(Debug, Deserialize)]
pub struct TaskFile {
    /// The instruction every example is asked under.
    pub system: String,
    /// `"chat"` (the default) or `"text"`.
    #[serde(default)]
    pub format: Format,
    /// The examples; a run takes the first `n`. All answer examples or all choice examples.
    pub examples: Vec<FileExample>,
}

/// One example of a [`TaskFile`]: either `answers` (answered by generation) or `labels`
/// with `gold` (answered by choosing a label).
#[derive(Debug, Deserialize)]
pub struct FileExample {
    /// Names the example in reports.
    pub id: String,
    /// Its contexts, of which a run keeps the first `contexts`.
    pub contexts: Vec<String>,
    /// What is asked after the contexts.
    pub question: String,
    /// Acceptable answers; the first is the one whose log-likelihood is measured.
    #[serde(default)]
    pub answers: Vec<String>,
    /// The labels to choose among.
    #[serde(default)]
    pub labels: Vec<String>,
    /// The index of the right label in `labels` (0 when not given).
    #[serde(default)]
    pub gold: usize,
}

fn from_file(path: &Path, draw: Draw) -> Result<TaskSet> {
    let bad = |reason: String| EvalError::BadTaskFile {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let file: TaskFile = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let mut family = None;
    let mut examples = Vec::new();
    for e in file.examples.into_iter().take(draw.n) {
        let (target, this) = match (e.answers.is_empty(), e.labels.is_empty()) {
            (false, true) => (Target::Answer(e.answers), Family::Rag),
            (true, false) if e.gold < e.labels.len() => (
                Target::Choice {
                    labels: e.labels,
                    gold: e.gold,
                },
                Family::Icl,
            ),
            _ => {
                return Err(bad(format!(
                    "example `{}` needs either `answers` or `labels` with `gold` inside them",
                    e.id
                )))
            }
        };
        if *family.get_or_insert(this) != this {
            return Err(bad(
                "mixes answer and choice examples; keep one kind per file".into(),
            ));
        }
        let mut contexts = e.contexts;
        contexts.truncate(draw.contexts);
        examples.push(Example {
            id: e.id,
            contexts,
            question: e.question,
            target,
            note: None,
        });
    }
    let family = family.unwrap_or(Family::Rag);
    Ok(TaskSet {
        name: Task::File(path.to_path_buf()).name(),
        family,
        metric: match family {
            Family::Rag => Metric::F1,
            Family::Icl => Metric::Accuracy,
        },
        format: file.format,
        system: file.system,
        examples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labelled(n: usize) -> Vec<Labelled> {
        (0..n)
            .map(|i| Labelled {
                text: format!("text {i}"),
                label: ["no", "yes"][i % 2].to_string(),
            })
            .collect()
    }

    fn draw(contexts: usize, n: usize, draws: usize) -> Draw {
        Draw {
            split: Split::Test,
            n,
            contexts,
            draws,
            seed: 7,
            skip: 0,
            needle_words: HAYSTACK_WORDS,
        }
    }

    #[test]
    fn each_demonstration_set_has_its_own_questions_and_grows_by_keeping_the_smaller() {
        let data = labelled(400);
        let small = classification(&data, draw(4, 10, 3), "Text", "Label", [60, 20]).unwrap();
        let large = classification(&data, draw(16, 10, 3), "Text", "Label", [60, 20]).unwrap();
        assert_eq!(small.examples.len(), 30);
        let mut ids: Vec<&str> = small.examples.iter().map(|e| e.id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 30, "no question is asked twice in a run");
        let sets: Vec<&Vec<String>> = small.examples.chunks(10).map(|c| &c[0].contexts).collect();
        assert!(sets[0] != sets[1] && sets[1] != sets[2]);
        for (s, l) in small.examples.iter().zip(&large.examples) {
            assert_eq!(s.id, l.id);
            assert_eq!(s.contexts[..], l.contexts[..4]);
            assert!(s.question.ends_with("\nLabel:"));
        }
        assert_eq!(small.format, Format::Text);
        assert_eq!(small.format.continuation("yes"), " yes");
        assert!(sets[0][0].starts_with("Text: ") && sets[0][0].contains("\nLabel: "));
    }

    #[test]
    fn asking_for_more_questions_than_the_split_holds_says_so() {
        let err =
            classification(&labelled(400), draw(4, 25, 3), "Text", "Label", [60, 20]).unwrap_err();
        assert!(err.to_string().contains("--draws 3"), "{err}");
        let err = load(&Task::Squad, Path::new("unused"), draw(4, 10, 2)).unwrap_err();
        assert!(err.to_string().contains("raise --n"), "{err}");
        let err =
            classification(&labelled(70), draw(4, 2, 1), "Text", "Label", [60, 20]).unwrap_err();
        assert!(err.to_string().contains("70 labelled examples"), "{err}");
    }

    #[test]
    fn parts_drawn_with_skip_are_the_questions_of_one_long_run() {
        let dir = tempfile::tempdir().unwrap();
        let essays = dir.path().join(crate::data::ESSAYS_DIR);
        std::fs::create_dir(&essays).unwrap();
        for i in 0..6 {
            let text: Vec<String> = (0..400).map(|w| format!("w{i}x{w}.")).collect();
            std::fs::write(essays.join(format!("{i}.txt")), text.join(" ")).unwrap();
        }
        let whole = load(&Task::Needle, dir.path(), draw(3, 10, 1)).unwrap();
        let part = |skip, n| {
            let draw = Draw {
                skip,
                ..draw(3, n, 1)
            };
            load(&Task::Needle, dir.path(), draw).unwrap().examples
        };
        let parts = [part(0, 4), part(4, 4), part(8, 2)].concat();
        assert_eq!(parts.len(), 10);
        for (p, w) in parts.iter().zip(&whole.examples) {
            assert_eq!(
                (&p.id, &p.question, &p.contexts),
                (&w.id, &w.question, &w.contexts)
            );
        }
        let err = load(
            &Task::Intent,
            dir.path(),
            Draw {
                skip: 4,
                ..draw(3, 4, 1)
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("--skip"), "{err}");
    }
}
