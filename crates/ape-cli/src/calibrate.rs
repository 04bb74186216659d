//! `ape calibrate`: choose APE's temperature, scale and default recompute share for a
//! model without labels, and keep them beside the model, where `generate`, `serve` and
//! `eval` read them as their defaults.
//!
//! The sample is a set of questions over several documents. Each is answered greedily by
//! sequential reading, and every point of the grid is scored on that answer's tokens: the
//! mean KL divergence of sequential's next-token distributions from the point's. No gold
//! answer is read. At each recompute share the factors with the least KL win; the default
//! share is the largest one the grid has within `--max-recompute`: recomputing more reads
//! closer to sequential (up to the sample's noise) but costs time to first token in
//! proportion.
//!
//! Requests of many short contexts (in-context learning's demonstrations) read best with
//! other factors than a few documents do, so they get their own choice
//! ([`Shape::ManyShot`]), made the same way on a sample of sentiment demonstrations.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use ape_core::attention::ApeFactors;
use ape_core::engine::generate::GenerateOptions;
use ape_core::engine::{
    ApeDefaults, Engine, Mode, Prompt, Recompute, Selection, Shape, ShapeDefaults,
};
use ape_eval::metrics::mean_kl;
use ape_eval::{Draw, Evaluator, Split, Task};

/// Bytes at the start of the model file whose digest tells one file from another: the
/// header, the metadata and the first tensors.
const FINGERPRINT_BYTES: u64 = 16 << 20;

#[derive(Args)]
pub(crate) struct CalibrateArgs {
    #[command(flatten)]
    model: crate::ModelArg,
    /// A folder of documents (one per file) to ask about. Without it the sample is SQuAD's
    /// dev split (paragraphs and questions; `scripts/eval-data.sh` installs it), whose
    /// gold answers are not read.
    #[arg(long)]
    documents: Option<PathBuf>,
    /// The folder `scripts/eval-data.sh` installs the data into.
    #[arg(long, default_value = "data")]
    data: PathBuf,
    /// Questions in the sample. A few questions carry most of the KL at a small share
    /// (on 64 of Qwen2.5-Coder-0.5B's, five made half the mean at 5%), so fewer than
    /// this cannot rank the factors there.
    #[arg(long, default_value_t = 64)]
    n: usize,
    /// Documents per question.
    #[arg(long, default_value_t = 5)]
    contexts: usize,
    /// Documents grid: every model so far chose T 0.9 or 1 and S 1 for documents.
    #[arg(long, value_delimiter = ',', default_value = "0.7,0.8,0.9,1.0")]
    temperatures: Vec<f32>,
    #[arg(long, value_delimiter = ',', default_value = "0.9,1.0")]
    scales: Vec<f32>,
    /// Recompute shares tried.
    #[arg(long, value_delimiter = ',', default_value = "0,0.05,0.15,0.3")]
    recompute: Vec<f32>,
    /// The most the default share may be: time to first token grows with it (at 0.05,
    /// Qwen2.5-Coder-0.5B answered over 8K stored tokens 12 to 16 times sooner than
    /// sequential reading, in three runs).
    #[arg(long, default_value_t = 0.05)]
    max_recompute: f32,
    /// Which context tokens are recomputed: attended or first.
    #[arg(long, default_value = "attended")]
    selection: String,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Which shapes of request to choose for: documents, many-shot or both; a shape left
    /// out keeps what an earlier calibration of the same file chose for it.
    #[arg(long, default_value = "both")]
    shape: String,
    /// Many-shot sample: questions, each after this many sentiment demonstrations of the
    /// dev split (their labels are part of the demonstrations; the questions' are not read).
    #[arg(long, default_value_t = 24)]
    many_shot_n: usize,
    #[arg(long, default_value_t = 32)]
    many_shot_contexts: usize,
    /// Many-shot grid: its best factors lie lower than the documents' (the README's ICL
    /// sweeps).
    #[arg(long, value_delimiter = ',', default_value = "0.3,0.5,0.7,0.9,1.0")]
    many_shot_temperatures: Vec<f32>,
    #[arg(long, value_delimiter = ',', default_value = "0.6,0.8,1.0")]
    many_shot_scales: Vec<f32>,
    /// Many-shot recompute shares tried. Only 0 unless asked: on Qwen2.5-Coder-0.5B's
    /// intent test cells, recomputing at the many-shot factors read no better on average
    /// than not recomputing at any share up to 0.3, and worse at 0.05 (`docs/fidelity.md`,
    /// "Accuracy at each share").
    #[arg(long, value_delimiter = ',', default_value = "0")]
    many_shot_recompute: Vec<f32>,
}

/// What `ape calibrate` chose for one model file, kept beside it as `<model>.ape.json`:
/// for requests over documents (at the top level), and for many-shot requests.
#[derive(Debug, Serialize, Deserialize)]
struct Calibration {
    /// Which file this is for: its size and the BLAKE3 digest of its first bytes.
    model_bytes: u64,
    model_digest: String,
    selection: String,
    #[serde(flatten)]
    documents: Choice,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    many_shot: Option<Choice>,
}

/// The factors and share chosen for one shape of request.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Choice {
    temperature: f32,
    scale: f32,
    recompute: f32,
    /// Mean KL from sequential at the chosen point, and the sample it was measured on.
    kl: f64,
    sample: String,
    /// The best factors at every share tried.
    by_share: Vec<Point>,
}

impl Choice {
    /// The settings for this shape; every factor checked as a request's would be.
    fn settings(&self, selection: Selection) -> Result<ShapeDefaults> {
        let factors = |t: f32, s: f32| -> Result<ApeFactors> {
            Ok(Mode::ape(t, s)?.factors().expect("APE has factors"))
        };
        let by_share = self
            .by_share
            .iter()
            .map(|p| {
                Ok((
                    Recompute::new(p.recompute, selection)?.share,
                    factors(p.temperature, p.scale)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(ShapeDefaults {
            factors: factors(self.temperature, self.scale)?,
            recompute: Recompute::new(self.recompute, selection)?,
            by_share,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Point {
    recompute: f32,
    temperature: f32,
    scale: f32,
    kl: f64,
}

/// Where the calibration of `model` is kept: `x.gguf` has `x.ape.json`.
pub(crate) fn calibration_path(model: &Path) -> PathBuf {
    model.with_extension("ape.json")
}

/// Write `text`, a calibration made for the file at `model`, beside it, unless a
/// calibration is there already: its path when written. `text` is checked to be a sound
/// calibration of that very file first, and appears whole or not at all.
pub(crate) fn install(model: &Path, text: &str) -> Result<Option<PathBuf>> {
    let path = calibration_path(model);
    if path.exists() {
        return Ok(None);
    }
    parse_for(model, text).with_context(|| {
        format!(
            "the shipped calibration does not fit {}; run `ape calibrate`",
            model.display()
        )
    })?;
    write_whole(&path, text)?;
    Ok(Some(path))
}

/// Write `text` to `path` through a file beside it, renamed into place: a reader finds the
/// old file or the new one, never part of one.
fn write_whole(path: &Path, text: &str) -> Result<()> {
    let partial = path.with_extension("json.partial");
    std::fs::write(&partial, text)
        .with_context(|| format!("cannot write {}", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Size and digest of the start of `model`, which a calibration must match.
fn fingerprint(model: &Path) -> Result<(u64, String)> {
    let file = std::fs::File::open(model)
        .with_context(|| format!("cannot read the model file {}", model.display()))?;
    let bytes = file.metadata()?.len();
    let mut hasher = blake3::Hasher::new();
    std::io::copy(&mut file.take(FINGERPRINT_BYTES), &mut hasher)?;
    Ok((bytes, hasher.finalize().to_hex().to_string()))
}

/// The APE defaults for `model`: its calibration where there is a sound one beside it,
/// else the paper's. A damaged or stale file is reported on stderr and left alone.
pub(crate) fn defaults_for(model: &Path) -> ApeDefaults {
    let path = calibration_path(model);
    if !path.exists() {
        return ApeDefaults::default();
    }
    match read_calibration(model, &path) {
        Ok(defaults) => defaults,
        Err(e) => {
            eprintln!(
                "warning: ignoring the calibration {}: {e:#}; using the paper's defaults \
                 (T 0.9, S 0.9, nothing recomputed). Run `ape calibrate` to write a new one",
                path.display()
            );
            ApeDefaults::default()
        }
    }
}

fn read_calibration(model: &Path, path: &Path) -> Result<ApeDefaults> {
    let calibration = read_file(model, path)?;
    let selection = Selection::from_name(&calibration.selection)?;
    let many_shot = match &calibration.many_shot {
        Some(choice) => Some(choice.settings(selection)?),
        None => None,
    };
    Ok(ApeDefaults {
        documents: calibration.documents.settings(selection)?,
        many_shot,
    })
}

/// The calibration at `path`, checked to be one and to be written for `model`.
fn read_file(model: &Path, path: &Path) -> Result<Calibration> {
    let text = std::fs::read_to_string(path).context("cannot read it")?;
    parse_for(model, &text)
}

/// `text` read as a calibration, checked to be one written for `model`.
fn parse_for(model: &Path, text: &str) -> Result<Calibration> {
    let calibration: Calibration =
        serde_json::from_str(text).context("it is not a calibration file")?;
    let (bytes, digest) = fingerprint(model)?;
    anyhow::ensure!(
        calibration.model_bytes == bytes && calibration.model_digest == digest,
        "it was written for another model file"
    );
    Ok(calibration)
}

pub(crate) fn run(args: CalibrateArgs) -> Result<()> {
    anyhow::ensure!(args.n > 0, "--n must be at least 1");
    anyhow::ensure!(args.contexts > 0, "--contexts must be at least 1");
    anyhow::ensure!(
        args.recompute.iter().any(|&r| r <= args.max_recompute),
        "no share of --recompute is within --max-recompute {}",
        args.max_recompute
    );
    let selection = Selection::from_name(&args.selection)?;
    let model = &args.model.model;
    // Many-shot factors are for requests read one demonstration per context: grouped,
    // a many-shot request reads as documents do (`Engine::group_contexts`).
    let evaluator = Evaluator::new(args.model.load()?.with_group_tokens(0));
    let engine = evaluator.engine();
    let (documents, many_shot) = match args.shape.as_str() {
        "both" => (true, true),
        "documents" => (true, false),
        "many-shot" => (false, true),
        other => anyhow::bail!("unknown --shape `{other}`: use documents, many-shot or both"),
    };
    let path = calibration_path(model);
    // A shape not asked for keeps its earlier choice, from a sound file for this model.
    let earlier = match (documents && many_shot, path.exists()) {
        (false, true) => Some(read_file(model, &path).with_context(|| {
            format!(
                "cannot keep the other shape's choice from {}; calibrate both shapes",
                path.display()
            )
        })?),
        _ => None,
    };
    let windowed = engine.model.config.sliding_window.is_some();
    if windowed {
        eprintln!(
            "this model has sliding-window layers, where recomputing is not supported yet: \
             only a share of 0 is calibrated"
        );
    }
    let shares = |asked: &[f32]| if windowed { vec![0.0] } else { asked.to_vec() };
    let documents = match (documents, &earlier) {
        (true, _) => {
            let (prompts, sample) = documents_sample(engine, &args)?;
            let shares = shares(&args.recompute);
            let grid = Grid::new(&shares, &args.temperatures, &args.scales, selection)?;
            println!("requests over documents ({sample}):");
            choose(engine, &prompts, sample, &grid, args.max_recompute)?
        }
        (false, Some(earlier)) => earlier.documents.clone(),
        (false, None) => anyhow::bail!(
            "no earlier calibration beside the model keeps a choice for documents; \
             calibrate both shapes"
        ),
    };
    let many_shot = match (many_shot, earlier) {
        (true, _) => {
            let (prompts, sample) = many_shot_sample(engine, &args)?;
            let grid = Grid::new(
                &shares(&args.many_shot_recompute),
                &args.many_shot_temperatures,
                &args.many_shot_scales,
                selection,
            )?;
            println!("many-shot requests ({sample}):");
            Some(choose(engine, &prompts, sample, &grid, args.max_recompute)?)
        }
        (false, earlier) => earlier.and_then(|e| e.many_shot),
    };
    let (model_bytes, model_digest) = fingerprint(model)?;
    let calibration = Calibration {
        model_bytes,
        model_digest,
        selection: selection.name().to_string(),
        documents,
        many_shot,
    };
    write_whole(&path, &(serde_json::to_string_pretty(&calibration)? + "\n"))?;
    for (shape, choice) in [
        (Shape::Documents, Some(&calibration.documents)),
        (Shape::ManyShot, calibration.many_shot.as_ref()),
    ] {
        if let Some(c) = choice {
            println!(
                "{shape:?}: T {} S {} recompute {} ({}), mean KL {:.4}",
                c.temperature, c.scale, c.recompute, calibration.selection, c.kl
            );
        }
    }
    println!("wrote {}", path.display());
    Ok(())
}

/// The points a sample is scored at: every factor pair at every share.
struct Grid {
    points: Vec<(f32, f32, f32, Mode)>,
}

impl Grid {
    fn new(
        shares: &[f32],
        temperatures: &[f32],
        scales: &[f32],
        selection: Selection,
    ) -> Result<Grid> {
        let mut points = Vec::new();
        for &recompute in shares {
            for &temperature in temperatures {
                for &scale in scales {
                    let mode = Mode::ape(temperature, scale)?
                        .with_recompute(Recompute::new(recompute, selection)?)?;
                    points.push((recompute, temperature, scale, mode));
                }
            }
        }
        Ok(Grid { points })
    }
}

/// The documents sample: questions over the documents in `--documents`, or SQuAD's dev
/// split; and its description.
fn documents_sample(engine: &Engine, args: &CalibrateArgs) -> Result<(Vec<Prompt>, String)> {
    if let Some(dir) = &args.documents {
        return Ok((
            questions_over(engine, dir, args.n, args.contexts, args.seed)?,
            format!("{} questions over {}", args.n, dir.display()),
        ));
    }
    let prompts = dev_prompts(engine, args, "squad", args.n, args.contexts)?;
    Ok((
        prompts,
        format!(
            "{} SQuAD dev questions, {} documents each",
            args.n, args.contexts
        ),
    ))
}

/// The many-shot sample: sentiment questions of the dev split after demonstrations.
fn many_shot_sample(engine: &Engine, args: &CalibrateArgs) -> Result<(Vec<Prompt>, String)> {
    let (n, contexts) = (args.many_shot_n, args.many_shot_contexts);
    let prompts = dev_prompts(engine, args, "sentiment", n, contexts)?;
    Ok((
        prompts,
        format!("{n} sentiment dev questions, {contexts} demonstrations each"),
    ))
}

/// `n` prompts of `task`'s dev split with `contexts` contexts each, laid out as `ape eval`
/// lays them out.
fn dev_prompts(
    engine: &Engine,
    args: &CalibrateArgs,
    task: &str,
    n: usize,
    contexts: usize,
) -> Result<Vec<Prompt>> {
    let draw = Draw {
        split: Split::Dev,
        n,
        contexts,
        draws: 1,
        seed: args.seed,
        skip: 0,
        needle_words: ape_eval::tasks::HAYSTACK_WORDS,
    };
    let set = ape_eval::tasks::load(&Task::from_name(task)?, &args.data, draw)?;
    let prompts = set
        .examples
        .iter()
        .map(|e| set.prompt(engine, e))
        .collect::<ape_core::Result<Vec<_>>>()?;
    Ok(prompts)
}

/// Score every point of `grid` on `prompts` (each against sequential reading's own
/// greedy answer), print the best factors at each share, and choose: the largest share
/// within `max_recompute`, with its best factors.
fn choose(
    engine: &Engine,
    prompts: &[Prompt],
    sample: String,
    grid: &Grid,
    max_recompute: f32,
) -> Result<Choice> {
    let progress = ProgressBar::new((prompts.len() * grid.points.len()) as u64).with_style(
        ProgressStyle::with_template("calibrating [{elapsed_precise}] {wide_bar} {pos}/{len}")
            .expect("the progress template is valid"),
    );
    let modes: Vec<Mode> = grid.points.iter().map(|&(.., mode)| mode).collect();
    let mut kl_sums = vec![0f64; modes.len()];
    let mut read = 0;
    for prompt in prompts {
        let Some(answer) = sequential_answer(engine, prompt)? else {
            progress.inc(modes.len() as u64);
            continue;
        };
        let reference = engine
            .score(prompt, Mode::Sequential, &[&answer])?
            .remove(0);
        for (mut scores, sum) in engine
            .score_modes(prompt, &modes, &[&answer])?
            .into_iter()
            .zip(&mut kl_sums)
        {
            *sum += mean_kl(&reference, &scores.remove(0));
        }
        progress.inc(modes.len() as u64);
        read += 1;
    }
    progress.finish_and_clear();
    anyhow::ensure!(read > 0, "no question of the sample could be answered");

    let mut by_share: Vec<Point> = Vec::new();
    for (&(recompute, temperature, scale, _), sum) in grid.points.iter().zip(&kl_sums) {
        let point = Point {
            recompute,
            temperature,
            scale,
            kl: sum / read as f64,
        };
        match by_share.iter_mut().find(|p| p.recompute == recompute) {
            Some(best) if point.kl < best.kl => *best = point,
            Some(_) => {}
            None => by_share.push(point),
        }
    }
    println!("| recompute | best T | best S | mean KL from sequential |");
    println!("|---:|---:|---:|---:|");
    for p in &by_share {
        println!(
            "| {} | {} | {} | {:.4} |",
            p.recompute, p.temperature, p.scale, p.kl
        );
    }
    let chosen = by_share
        .iter()
        .filter(|p| p.recompute <= max_recompute)
        .max_by(|a, b| a.recompute.total_cmp(&b.recompute))
        .context("no share of the grid is within --max-recompute")?
        .clone();
    Ok(Choice {
        temperature: chosen.temperature,
        scale: chosen.scale,
        recompute: chosen.recompute,
        kl: chosen.kl,
        sample: format!("{sample} ({read} read; the others were empty or too long)"),
        by_share,
    })
}

/// Sequential reading's greedy answer to `prompt` (at most 16 tokens, up to a line
/// break); `None` when it is empty or the prompt does not fit the window.
fn sequential_answer(engine: &Engine, prompt: &Prompt) -> Result<Option<Vec<u32>>> {
    let options = GenerateOptions {
        max_tokens: Some(16),
        stop: vec!["\n".to_string()],
        ..GenerateOptions::default()
    };
    match engine.answer(prompt, Mode::Sequential, &options, |_| {}) {
        Ok(answer) => Ok(Some(answer.tokens).filter(|t| !t.is_empty())),
        Err(ape_core::Error::ContextOverflow { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// `n` questions over the documents in `dir`, each over `contexts` of them drawn at
/// random: it names the opening words of a sentence of one of them and asks what the
/// documents say about it.
fn questions_over(
    engine: &Engine,
    dir: &Path,
    n: usize,
    contexts: usize,
    seed: u64,
) -> Result<Vec<Prompt>> {
    let documents = crate::read_documents(&[], Some(dir))?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut prompts = Vec::with_capacity(n);
    for _ in 0..n {
        let chosen: Vec<&String> = documents
            .choose_multiple(&mut rng, contexts.min(documents.len()))
            .collect();
        let sentences: Vec<&str> = chosen
            .choose(&mut rng)
            .expect("at least one document")
            .split(['.', '\n'])
            .filter(|s| s.split_whitespace().count() >= 4)
            .collect();
        let Some(sentence) = sentences.choose(&mut rng) else {
            continue;
        };
        let opening: Vec<&str> = sentence.split_whitespace().take(4).collect();
        let question = format!("What do the documents say about \"{}\"?", opening.join(" "));
        prompts.push(engine.split_chat(None, &chosen, &question)?);
    }
    anyhow::ensure!(
        !prompts.is_empty(),
        "the documents in {} have no sentence of four words or more to ask about",
        dir.display()
    );
    Ok(prompts)
}
