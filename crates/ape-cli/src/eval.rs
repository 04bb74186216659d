//! `ape eval`: accuracy of sequential vs parallel vs APE reading on a task, written as
//! JSON (every prediction) and Markdown, with an SVG plot when several numbers of
//! contexts are run.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use ape_core::engine::{Mode, Recompute, Selection, Shape};
use ape_eval::{Draw, Evaluator, Report, Setting, Split, Task};

#[derive(Args)]
pub(crate) struct EvalArgs {
    #[command(flatten)]
    model: crate::ModelArg,
    /// squad, needle (RAG), sentiment, intent (ICL), or file:PATH for a task written in JSON.
    #[arg(long)]
    task: String,
    /// Settings to compare: sequential, parallel, ape (with --ape-temperature and
    /// --ape-scale), or ape:T:S for APE with its own factors (repeatable in the list);
    /// every APE setting is run at each share of --recompute.
    #[arg(long, value_delimiter = ',', default_value = "sequential,parallel,ape")]
    modes: Vec<String>,
    /// APE's attention temperature for the `ape` mode; by default the model's calibrated
    /// one (`ape calibrate`), else 0.9.
    #[arg(long)]
    ape_temperature: Option<f32>,
    /// APE's scaling factor for the `ape` mode; by default the model's calibrated one,
    /// else 0.9.
    #[arg(long)]
    ape_scale: Option<f32>,
    /// Shares of the context tokens APE recomputes (0 to 1), each a setting of its own; by
    /// default the model's calibrated share, else 0.
    #[arg(long, value_delimiter = ',')]
    recompute: Option<Vec<f32>>,
    /// Which context tokens are recomputed: attended (those the query attends to most) or
    /// first (the first tokens of each context); by default the calibrated choice.
    #[arg(long)]
    selection: Option<String>,
    /// Questions per run.
    #[arg(long, default_value_t = 50)]
    n: usize,
    /// ICL tasks: sets of demonstrations drawn, each with its own --n questions, so a
    /// result does not hang on one lucky or unlucky set.
    #[arg(long, default_value_t = 1)]
    draws: usize,
    /// Picks the questions, demonstrations and distractors within the split.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// RAG tasks: leave out the first K questions of the draw, to run one long sample in
    /// parts (`--skip 0 --n 200`, `--skip 200 --n 200`, ... each write their own files).
    #[arg(long, default_value_t = 0)]
    skip: usize,
    /// needle: words in each haystack piece (each is one context).
    #[arg(long, default_value_t = ape_eval::tasks::HAYSTACK_WORDS)]
    needle_words: usize,
    /// dev (for choosing settings) or test (for reporting).
    #[arg(long, default_value = "test")]
    split: String,
    /// Contexts per question (documents with the gold one, haystack pieces, or
    /// demonstrations); several (e.g. 8,16,32) give a run each and a plot.
    #[arg(long, value_delimiter = ',', default_value = "5")]
    contexts: Vec<usize>,
    /// Also run APE at every point of the T x S grid and choose the point closest to
    /// sequential (least mean KL).
    #[arg(long)]
    sweep: bool,
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.7,0.9,1.0")]
    sweep_temperatures: Vec<f32>,
    #[arg(long, value_delimiter = ',', default_value = "0.8,0.9,1.0")]
    sweep_scales: Vec<f32>,
    /// The folder `scripts/eval-data.sh` installs the data into.
    #[arg(long, default_value = "data")]
    data: PathBuf,
    /// Where the JSON, Markdown and SVG files go.
    #[arg(long, default_value = "eval-results")]
    out: PathBuf,
    /// Most tokens generated per answer (RAG tasks).
    #[arg(long, default_value_t = 24)]
    max_answer_tokens: usize,
}

pub(crate) fn run(args: EvalArgs) -> Result<()> {
    let task = Task::from_name(&args.task)?;
    let split = Split::from_name(&args.split)?;
    anyhow::ensure!(args.n > 0, "--n must be at least 1");
    anyhow::ensure!(
        !args.contexts.is_empty(),
        "--contexts needs at least one number"
    );
    let mut sets = Vec::new();
    for &contexts in &args.contexts {
        let draw = Draw {
            split,
            n: args.n,
            contexts,
            draws: args.draws,
            seed: args.seed,
            skip: args.skip,
            needle_words: args.needle_words,
        };
        sets.push((contexts, ape_eval::tasks::load(&task, &args.data, draw)?));
    }
    let model = &args.model.model;
    let mut evaluator = Evaluator::new(args.model.load()?);
    // The calibrated defaults for the shape the engine reads the task's requests in:
    // demonstrations are many-shot, unless grouped (`--group-tokens`).
    let first = &sets[0].1;
    let shape = match first.examples.first() {
        Some(example) => Shape::of(&first.prompt(evaluator.engine(), example)?.contexts),
        None => Shape::Documents,
    };
    let defaults = evaluator.engine().ape_defaults().for_shape(shape).clone();
    let selection = match &args.selection {
        Some(name) => Selection::from_name(name)?,
        None => defaults.recompute.selection,
    };
    let shares = args
        .recompute
        .clone()
        .unwrap_or(vec![defaults.recompute.share]);
    let mut settings = Vec::new();
    for name in &args.modes {
        let name = name.trim();
        // `ape` takes the factors calibrated at each share, unless they are given.
        let mode_at = |share: f32| {
            let factors = defaults.factors_at(share);
            parse_mode(
                name,
                args.ape_temperature.unwrap_or(factors.temperature),
                args.ape_scale.unwrap_or(factors.scale),
            )
        };
        let shares = match mode_at(defaults.recompute.share)? {
            Mode::Ape { .. } => &shares[..],
            _ => &[0.0],
        };
        for &share in shares {
            let setting =
                Setting::of(mode_at(share)?.with_recompute(Recompute::new(share, selection)?)?);
            // The same factors asked for twice (ape and ape:T:S) are read once.
            if !settings.contains(&setting) {
                settings.push(setting);
            }
        }
    }
    if args.sweep {
        for &t in &args.sweep_temperatures {
            for &s in &args.sweep_scales {
                settings.push(Setting::ape_point(t, s)?);
            }
        }
    }
    anyhow::ensure!(
        !settings.is_empty(),
        "nothing to run: give --modes or --sweep"
    );

    evaluator.max_answer_tokens = args.max_answer_tokens;
    let model_name = model
        .file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());

    let metric = sets[0].1.metric;
    let total = sets.iter().map(|(_, s)| s.examples.len() as u64).sum();
    let progress = ProgressBar::new(total).with_style(
        ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} examples (eta {eta})",
        )
        .expect("the progress template is valid"),
    );
    let mut report = Report::new(
        task.name(),
        model_name.clone(),
        split.name().to_string(),
        args.seed,
        metric,
        &settings,
    )
    .skipping(args.skip);
    for (contexts, set) in &sets {
        progress.set_message(format!("{} with {contexts} contexts", set.name));
        let examples = evaluator.run(set, &settings, &progress)?;
        report.add_run(*contexts, examples, &settings);
    }
    progress.finish_and_clear();

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create the results folder {}", args.out.display()))?;
    let mut part = match args.skip {
        0 => String::new(),
        skip => format!("-from{skip}"),
    };
    if args.needle_words != ape_eval::tasks::HAYSTACK_WORDS {
        part += &format!("-words{}", args.needle_words);
    }
    let stem = format!(
        "{}-{model_name}-{}{}{part}",
        task.name(),
        split.name(),
        if args.sweep { "-sweep" } else { "" }
    );
    let markdown = report.markdown();
    println!("{markdown}");
    let json = args.out.join(format!("{stem}.json"));
    report.write_json(&json)?;
    let md = args.out.join(format!("{stem}.md"));
    std::fs::write(&md, &markdown).with_context(|| format!("cannot write {}", md.display()))?;
    eprintln!("wrote {} and {}", json.display(), md.display());
    if args.contexts.len() > 1 {
        let svg = args.out.join(format!("{stem}.svg"));
        report.plot_svg(&svg)?;
        eprintln!("wrote {}", svg.display());
    }
    Ok(())
}

/// A mode's name, or `ape:T:S` for APE with temperature T and scale S.
fn parse_mode(name: &str, temperature: f32, scale: f32) -> Result<Mode> {
    let Some(factors) = name.strip_prefix("ape:") else {
        return Ok(Mode::from_name(name, temperature, scale)?);
    };
    let parsed: Option<(f32, f32)> = factors
        .split_once(':')
        .and_then(|(t, s)| Some((t.parse().ok()?, s.parse().ok()?)));
    let (t, s) = parsed.with_context(|| {
        format!("cannot read the mode `{name}`: write APE with its own factors as ape:T:S, e.g. ape:0.9:0.9")
    })?;
    Ok(Mode::ape(t, s)?)
}
