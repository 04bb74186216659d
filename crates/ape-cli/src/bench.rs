//! `ape bench`: prefill and decode speed, measured the way llama-bench measures them
//! (random prompt tokens; decode timed after a prompt of a given depth), so the two
//! tools' tables can be read side by side.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use rand::{Rng, SeedableRng};

use ape_core::generate::prefill;
use ape_core::gguf::Gguf;
use ape_core::model::Model;

#[derive(Args)]
pub struct BenchArgs {
    /// GGUF model file.
    #[arg(long, short, default_value_os_t = crate::pull::default_model_path())]
    model: PathBuf,
    /// Prompt lengths to time prefill at.
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

pub fn run(args: BenchArgs) -> Result<()> {
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
    for &n in &args.prompt {
        let tokens = random_tokens(n);
        let rates = repeat(args.repeats, || {
            let mut cache = model.new_cache(n);
            let start = Instant::now();
            prefill(&model, &tokens, &mut cache)?;
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
                prefill(&model, &context, &mut cache)?;
            }
            let mut token = 0;
            let start = Instant::now();
            for _ in 0..args.decode {
                let logits = model.forward(&[token], &mut cache);
                token = ape_core::sampler::argmax(&logits);
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
    Ok(())
}

fn repeat(times: usize, mut run: impl FnMut() -> Result<f64>) -> Result<Vec<f64>> {
    (0..times.max(1)).map(|_| run()).collect()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}
