//! `ape bench`: prefill and decode speed, measured the way llama-bench measures them
//! (random prompt tokens; decode timed after a prompt of a given depth), so the two
//! tools' tables can be read side by side.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use rand::{Rng, SeedableRng};

use std::sync::Arc;

use ape_core::attention::KvCache;
use ape_core::engine::chat::Message;
use ape_core::engine::generate::{prefill, Cancel, GenerateOptions};
use ape_core::engine::{
    ContextStore, Engine, Mode, Recompute, DEFAULT_APE_SCALE, DEFAULT_APE_TEMPERATURE,
};
use ape_core::model::gguf::Gguf;
use ape_core::model::Model;
use ape_eval::store::RunStore;
use ape_store::{Codec, DiskTier, Entry, KvDtype, RedisTier, Store, Tier};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    ttft: Option<TtftCommand>,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

#[derive(Subcommand)]
enum TtftCommand {
    /// Time to first token over many contexts: sequential vs APE encoding them in the
    /// request vs APE with them already encoded, at several recompute shares.
    Ttft(TtftArgs),
    /// Loading stored contexts from disk and Redis against encoding them again, and time
    /// to first token with every document stored on disk.
    Store(StoreBenchArgs),
    /// A bounded load test against a running `ape serve`: many clients at once, every
    /// answer checked, latency percentiles.
    Serve(crate::load::LoadArgs),
    /// Time to first token of a conversation's second turn, with the first turn's keys
    /// and values reused (as `ape serve` does) and read afresh.
    Turns(TurnsArgs),
}

pub(crate) fn run(args: BenchArgs) -> Result<()> {
    match args.ttft {
        Some(TtftCommand::Ttft(ttft)) => run_ttft(ttft),
        Some(TtftCommand::Store(store)) => run_store(store),
        Some(TtftCommand::Serve(load)) => crate::load::run(load),
        Some(TtftCommand::Turns(turns)) => run_turns(turns),
        None => run_runtime(args.runtime),
    }
}

#[derive(Args)]
struct RuntimeArgs {
    /// GGUF model file.
    #[arg(long, short, default_value_os_t = crate::pull::default_model_path())]
    model: PathBuf,
    /// Prompt lengths to time prefill at (0: none, as llama-bench's `-p 0`).
    #[arg(long, value_delimiter = ',', default_values_t = [512, 2048])]
    prompt: Vec<usize>,
    /// Tokens to decode for the decode measurement (0 skips it).
    #[arg(long, default_value_t = 64)]
    decode: usize,
    /// Tokens already in the cache when decoding starts.
    #[arg(long, default_value_t = 2048)]
    depth: usize,
    /// Runs per measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

fn run_runtime(args: RuntimeArgs) -> Result<()> {
    let gguf = Gguf::open(&args.model)?;
    let model = Model::load(&gguf).with_context(|| format!("loading {}", args.model.display()))?;
    let vocab = model.config.vocab_size as u32;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut random_tokens =
        |n: usize| -> Vec<u32> { (0..n).map(|_| rng.gen_range(0..vocab)).collect() };
    let threads = rayon::current_num_threads();
    let name = args.model.file_name().unwrap_or_default().to_string_lossy();

    println!(
        "| model | threads | test | tokens/s (median of {}) |",
        args.repeats
    );
    println!("|---|---|---|---|");
    for &n in args.prompt.iter().filter(|&&n| n > 0) {
        let tokens = random_tokens(n);
        let rates = repeat(args.repeats, || {
            let mut cache = model.new_cache(n);
            let start = Instant::now();
            prefill(&model, &tokens, &mut cache, &Cancel::default())?;
            Ok(n as f64 / start.elapsed().as_secs_f64())
        })?;
        println!(
            "| {name} | {threads} | prefill {n} | {:.1} |",
            median(rates)
        );
    }
    if args.decode > 0 {
        let context = random_tokens(args.depth);
        let rates = repeat(args.repeats, || {
            let mut cache = model.new_cache(args.depth + args.decode);
            if !context.is_empty() {
                prefill(&model, &context, &mut cache, &Cancel::default())?;
            }
            let mut token = 0;
            let start = Instant::now();
            for _ in 0..args.decode {
                let logits = model.forward(&[token], &mut cache);
                token = ape_core::engine::sampler::argmax(&logits);
            }
            Ok(args.decode as f64 / start.elapsed().as_secs_f64())
        })?;
        println!(
            "| {name} | {threads} | decode {} at depth {} | {:.1} |",
            args.decode,
            args.depth,
            median(rates)
        );
    }
    let longest = args
        .prompt
        .iter()
        .copied()
        .chain((args.decode > 0).then_some(args.depth + args.decode))
        .max()
        .unwrap_or(0);
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    let file = std::fs::metadata(&args.model).map_or(0, |m| m.len());
    let kv = model.new_cache(longest).bytes() as u64;
    let peak = peak_resident_bytes();
    println!(
        "\npeak resident memory {:.0} MiB: the file is {:.0} MiB and the largest KV cache \
         ({longest} positions) {:.0} MiB, so {:+.1}% over their sum; prompts are read \
         {} tokens a pass",
        mib(peak),
        mib(file),
        mib(kv),
        100.0 * (peak as f64 / (file + kv) as f64 - 1.0),
        model.tokens_per_pass(),
    );
    Ok(())
}

#[derive(Args)]
struct TtftArgs {
    /// GGUF model file.
    #[arg(long, short, default_value_os_t = crate::pull::default_model_path())]
    model: PathBuf,
    /// Total context tokens to time. A size that fits the window is trimmed, if need be,
    /// so that sequential encoding fits too; a larger one is timed with APE only.
    #[arg(long, value_delimiter = ',', default_values_t = [2048, 4096, 8192])]
    total: Vec<usize>,
    /// Tokens per context.
    #[arg(long, default_value_t = 512)]
    context_len: usize,
    /// Shares of the context tokens recomputed, each timed with the contexts in memory.
    #[arg(long, value_delimiter = ',', default_values_t = [0.0, 0.05, 0.15, 0.3])]
    recompute: Vec<f32>,
    /// Runs per measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

/// The question every TTFT request asks.
const QUESTION: &str = "Which of the reports above mentions the largest number?";

fn run_ttft(args: TtftArgs) -> Result<()> {
    anyhow::ensure!(args.context_len > 0, "--context-len must be at least 1");
    let store = Arc::new(RunStore::new(usize::MAX));
    let defaults = crate::calibrate::defaults_for(&args.model).documents;
    let engine = Engine::load(&args.model)
        .with_context(|| format!("loading {}", args.model.display()))?
        .with_store(store.clone());
    let window = engine.model.config.context_length;
    let vocab = engine.model.config.vocab_size as u32;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let no_documents: [&str; 0] = [];
    let base = engine.split_chat(None, &no_documents, QUESTION)?;
    let options = GenerateOptions {
        max_tokens: Some(1),
        ..GenerateOptions::default()
    };
    let ape = |share: f32| -> Result<Mode> {
        let factors = defaults.factors_at(share);
        Ok(Mode::ape(factors.temperature, factors.scale)?
            .with_recompute(Recompute::new(share, defaults.recompute.selection)?)?)
    };
    let sequential_room = window - base.prefix.len() - base.query.len() - 1;

    println!(
        "APE at the calibrated factors of each share (T {} S {} at {}), {} tokens recomputed; times to first token in seconds, speedups over sequential",
        defaults.factors.temperature,
        defaults.factors.scale,
        defaults.recompute.share,
        defaults.recompute.selection.name()
    );
    let in_memory: Vec<String> = args
        .recompute
        .iter()
        .map(|r| format!("in memory, r = {r} | speedup"))
        .collect();
    println!(
        "| context tokens | contexts | sequential | APE, encoded in the request | {} | context KV (MiB) | peak RSS (MiB) |",
        in_memory.join(" | ")
    );
    println!(
        "|---:|---:|---:|---:|{}---:|---:|",
        "---:|---:|".repeat(args.recompute.len())
    );
    for &asked in &args.total {
        let total = if asked <= window {
            asked.min(sequential_room)
        } else {
            asked
        };
        let mut prompt = base.clone();
        let mut left = total;
        while left > 0 {
            let n = left.min(args.context_len);
            prompt
                .contexts
                .push((0..n).map(|_| rng.gen_range(0..vocab)).collect());
            left -= n;
        }
        let ttft = |mode: Mode, forget_contexts: bool| -> Result<f64> {
            let runs = repeat(args.repeats, || {
                if forget_contexts {
                    store.clear();
                }
                let generation = engine.answer(&prompt, mode, &options, |_| {})?;
                Ok(generation.time_to_first_token.as_secs_f64())
            })?;
            Ok(median(runs))
        };
        let sequential = if total <= sequential_room {
            Some(ttft(Mode::Sequential, false)?)
        } else {
            None
        };
        let encoding = ttft(ape(0.0)?, true)?;
        let speedup = |t: f64| sequential.map_or("-".into(), |s| format!("{:.1}x", s / t));
        let mut cells = vec![format!("{encoding:.3}")];
        for &share in &args.recompute {
            // Recomputing lays the contexts out in order, which needs them to fit the window.
            if share > 0.0 && sequential.is_none() {
                cells.push("beyond the window | -".into());
                continue;
            }
            let t = ttft(ape(share)?, false)?;
            cells.push(format!("{t:.3} | {}", speedup(t)));
        }
        let contexts: Vec<&[u32]> = prompt.contexts.iter().map(Vec::as_slice).collect();
        let kv_bytes: usize = contexts
            .iter()
            .filter_map(|c| store.get(&prompt.prefix, c))
            .map(|kv| kv.bytes())
            .sum();
        println!(
            "| {total} | {} | {} | {} | {:.0} | {:.0} |",
            contexts.len(),
            sequential.map_or("beyond the window".into(), |s| format!("{s:.3}")),
            cells.join(" | "),
            kv_bytes as f64 / (1 << 20) as f64,
            peak_resident_bytes() as f64 / (1 << 20) as f64,
        );
    }
    Ok(())
}

#[derive(Args)]
struct StoreBenchArgs {
    /// GGUF model file.
    #[arg(long, short, default_value_os_t = crate::pull::default_model_path())]
    model: PathBuf,
    /// Tokens per context (fewer if the sequential reference would not fit the window).
    #[arg(long, default_value_t = 512)]
    context_len: usize,
    /// Documents in the time-to-first-token question.
    #[arg(long, default_value_t = 16)]
    documents: usize,
    /// Documents (one per file) for measuring the accuracy cost of 8-bit KV.
    #[arg(long, default_value = "examples/documents")]
    documents_dir: PathBuf,
    /// Also time loads from this Redis (redis://host:port/db).
    #[arg(long)]
    redis: Option<String>,
    /// Runs per measurement; the median is reported.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
}

fn run_store(args: StoreBenchArgs) -> Result<()> {
    let engine =
        Engine::load(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
    let codec = Codec::for_model(&args.model, &engine.model.config, KvDtype::F16)?;
    let vocab = engine.model.config.vocab_size as u32;
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let no_documents: [&str; 0] = [];
    let mut prompt = engine.split_chat(None, &no_documents, QUESTION)?;
    // Documents short enough for the sequential reference to fit the window.
    let documents = args.documents.max(1);
    let room = engine.model.config.context_length - prompt.prefix.len() - prompt.query.len() - 1;
    let document_len = args.context_len.min(room / documents);
    for _ in 0..documents {
        prompt
            .contexts
            .push((0..document_len).map(|_| rng.gen_range(0..vocab)).collect());
    }
    let prefix = engine.prefix_kv(&prompt.prefix)?;
    let dir = tempfile_dir()?;
    let disk = DiskTier::open(&dir, codec, None)?;
    let redis = match &args.redis {
        Some(url) => Some(RedisTier::connect(url, codec)?),
        None => None,
    };

    let context = &prompt.contexts[0];
    let key = codec.key(&prompt.prefix, context);
    let mut kv = None;
    let encode = median(repeat(args.repeats, || {
        let start = Instant::now();
        kv = engine.encode_contexts(&prefix, &[context])?.pop();
        Ok(start.elapsed().as_secs_f64())
    })?);
    let entry = Entry {
        prefix_len: prompt.prefix.len(),
        tokens: context.clone(),
        kv: Arc::new(kv.expect("one context was encoded")),
    };
    let mut tiers: Vec<&dyn Tier> = vec![&disk];
    tiers.extend(redis.iter().map(|r| r as &dyn Tier));
    println!(
        "| one context of {document_len} tokens | seconds (median of {}) | encode / load |",
        args.repeats
    );
    println!("|---|---:|---:|");
    println!("| encode | {encode:.4} | 1.0x |");
    for tier in tiers {
        tier.put(&key, &entry)?;
        let load = median(repeat(args.repeats, || {
            let start = Instant::now();
            tier.get(&key)?.context("the entry just stored is there")?;
            Ok(start.elapsed().as_secs_f64())
        })?);
        println!(
            "| load from {} | {load:.4} | {:.1}x |",
            tier.name(),
            encode / load
        );
        tier.prune(0)?;
    }
    println!(
        "\nf16 entry: {} bytes per token\n",
        entry.encoded_len(KvDtype::F16) / document_len.max(1)
    );

    let store = Arc::new(Store::new(
        codec,
        vec![Box::new(DiskTier::open(&dir, codec, None)?)],
    ));
    let contexts: Vec<&[u32]> = prompt.contexts.iter().map(Vec::as_slice).collect();
    let stored = engine.with_store(store.clone());
    stored.contexts_kv(&prompt.prefix, &prefix, &contexts, &Cancel::default())?;
    let options = GenerateOptions {
        max_tokens: Some(1),
        ..GenerateOptions::default()
    };
    let ape = Mode::ape(DEFAULT_APE_TEMPERATURE, DEFAULT_APE_SCALE)?;
    let ttft = |mode: Mode| -> Result<f64> {
        Ok(median(repeat(args.repeats, || {
            Ok(stored
                .answer(&prompt, mode, &options, |_| {})?
                .time_to_first_token
                .as_secs_f64())
        })?))
    };
    let (from_disk, sequential) = (ttft(ape)?, ttft(Mode::Sequential)?);
    println!(
        "| {} documents x {} tokens | TTFT (s) |\n|---|---:|\n| sequential | {sequential:.3} |\n| APE, every document stored on disk | {from_disk:.3} ({:.1}x faster) |",
        documents,
        document_len,
        sequential / from_disk
    );
    std::fs::remove_dir_all(&dir).ok();

    let (kl, agreement, positions) = q8_cost(&stored, codec, &args.documents_dir)?;
    let q8_bytes = entry.encoded_len(KvDtype::Q8) / document_len.max(1);
    println!(
        "\n| KV dtype | bytes per token | mean next-token KL vs f16 | top-1 agreement |\n|---|---:|---:|---:|\n| f16 | {} | 0 | 100% |\n| q8 | {q8_bytes} | {kl:.2e} | {:.1}% ({positions} answer tokens) |",
        entry.encoded_len(KvDtype::F16) / document_len.max(1),
        100.0 * agreement,
    );
    Ok(())
}

/// The questions asked of `examples/documents` when measuring the 8-bit KV format.
const Q8_QUESTIONS: [&str; 4] = [
    "Where does Alice keep her bicycle?",
    "When does the garage on Elm Street close?",
    "How many books does the school library hold?",
    "What grows in the community garden?",
];

/// Tokens of the greedy answer followed when comparing two encodings.
const Q8_ANSWER_TOKENS: usize = 16;

/// The cost of storing contexts as q8: the mean KL divergence of the next-token
/// distribution with q8 contexts from the one with exact (f16) contexts, and how often the
/// most likely token agrees, over the greedy answer (with exact contexts) to each question,
/// with APE's default factors. Returns (mean KL, agreement, positions compared).
fn q8_cost(
    engine: &Engine,
    codec: Codec,
    documents_dir: &std::path::Path,
) -> Result<(f64, f64, usize)> {
    let codec = Codec {
        dtype: KvDtype::Q8,
        ..codec
    };
    let documents = crate::read_files(&crate::read_folder(documents_dir)?)?;
    let factors = Mode::ape(DEFAULT_APE_TEMPERATURE, DEFAULT_APE_SCALE)?
        .factors()
        .expect("APE has factors");
    let (mut kl_sum, mut agree, mut positions) = (0.0, 0, 0);
    for question in Q8_QUESTIONS {
        let prompt = engine.split_chat(None, &documents, question)?;
        let prefix = engine.prefix_kv(&prompt.prefix)?;
        let contexts: Vec<&[u32]> = prompt.contexts.iter().map(Vec::as_slice).collect();
        let exact = engine.encode_contexts(&prefix, &contexts)?;
        let rounded = exact
            .iter()
            .zip(&contexts)
            .map(|(kv, tokens)| {
                let key = codec.key(&prompt.prefix, tokens);
                let entry = Entry {
                    prefix_len: prompt.prefix.len(),
                    tokens: tokens.to_vec(),
                    kv: Arc::new(kv.clone()),
                };
                Ok(codec.decode(&key, &codec.encode(&key, &entry))?.kv)
            })
            .collect::<Result<Vec<_>>>()?;
        let run = |contexts: Vec<&KvCache>, forced: Option<&[u32]>| {
            let mut cache =
                prefix.copy_with_capacity(prefix.len() + prompt.query.len() + Q8_ANSWER_TOKENS);
            let mut logits = engine.model.forward_ape(
                &prompt.query,
                &mut cache,
                prefix.len(),
                &contexts,
                factors,
            );
            let mut steps = vec![logits.clone()];
            let mut tokens = Vec::new();
            for i in 0..Q8_ANSWER_TOKENS - 1 {
                let token =
                    forced.map_or_else(|| ape_core::engine::sampler::argmax(&logits), |f| f[i]);
                tokens.push(token);
                logits = engine.model.forward_ape(
                    &[token],
                    &mut cache,
                    prefix.len(),
                    &contexts,
                    factors,
                );
                steps.push(logits.clone());
            }
            (steps, tokens)
        };
        let (want, answer) = run(exact.iter().collect(), None);
        let (got, _) = run(rounded.iter().map(Arc::as_ref).collect(), Some(&answer));
        for (p, q) in want.iter().zip(&got) {
            kl_sum += ape_eval::metrics::kl_divergence(p, q);
            agree += usize::from(
                ape_core::engine::sampler::argmax(p) == ape_core::engine::sampler::argmax(q),
            );
            positions += 1;
        }
    }
    Ok((
        kl_sum / positions as f64,
        agree as f64 / positions as f64,
        positions,
    ))
}

/// A fresh folder for a benchmark's own store.
fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("ape-bench-store-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// The most memory this process has had resident (Linux's VmHWM); 0 where unknown.
fn peak_resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0)
}

#[derive(Args)]
struct TurnsArgs {
    /// GGUF model file.
    #[arg(long, short, default_value_os_t = crate::pull::default_model_path())]
    model: PathBuf,
    /// Tokens in the first turn's user message (about).
    #[arg(long, default_value_t = 3000)]
    first: usize,
    /// Runs per measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

fn run_turns(args: TurnsArgs) -> Result<()> {
    let load =
        || Engine::load(&args.model).with_context(|| format!("loading {}", args.model.display()));
    let fresh = load()?;
    const LINE: &str =
        "The harbour master records every ship that enters the bay, its cargo and its crew. ";
    let line_tokens = fresh.tokenizer.encode(LINE, false)?.len().max(1);
    let long = LINE.repeat(args.first.div_ceil(line_tokens));
    let question = format!("{long}\nWhich records does the harbour master keep?");
    let first = fresh.chat_prompt(None, &question)?;
    let options = |max_tokens| GenerateOptions {
        max_tokens: Some(max_tokens),
        ..GenerateOptions::default()
    };
    let reply = fresh.generate(&first, &options(16), |_| {})?;
    let second = fresh.conversation_prompt(&[
        Message::user(question),
        Message::assistant(reply.text),
        Message::user("Answer in one word."),
    ])?;
    // Each run starts from an engine that has seen only the first turn.
    let mut cached = 0;
    let with_reuse = median(repeat(args.repeats, || {
        let reusing = load()?.with_prompt_reuse();
        reusing.generate(&first, &options(16), |_| {})?;
        let generation = reusing.generate(&second, &options(1), |_| {})?;
        cached = generation.cached_tokens;
        Ok(generation.time_to_first_token.as_secs_f64())
    })?);
    let afresh = median(repeat(args.repeats, || {
        Ok(fresh
            .generate(&second, &options(1), |_| {})?
            .time_to_first_token
            .as_secs_f64())
    })?);
    println!("| second-turn prompt tokens | reused | TTFT reusing | TTFT afresh | speed-up |");
    println!("|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {cached} | {with_reuse:.3} s | {afresh:.3} s | {:.0}x |",
        second.len(),
        afresh / with_reuse
    );
    Ok(())
}

fn repeat(times: usize, mut run: impl FnMut() -> Result<f64>) -> Result<Vec<f64>> {
    (0..times.max(1)).map(|_| run()).collect()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}
