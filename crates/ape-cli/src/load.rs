//! `ape bench serve`: a bounded load test against a running `ape serve`.
//!
//! Registers the documents, takes each question's greedy answer once as the reference,
//! then has many clients ask the questions at once (documents by id on even requests, by
//! text on odd ones). Every response must be the reference answer or a clean 429 refusal;
//! a refused request is retried after the wait the server asks for. Anything else counts
//! as wrong or failed. Answers are streamed. Reports answers and generated tokens per
//! second, and percentiles of the latency and of the time to first token (the first piece
//! of text), both from each request's first try. With `--plain`, the questions are plain
//! chats without documents, which any OpenAI-compatible server answers (llama.cpp's
//! `llama-server`, say), so that servers can be compared on the same load.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use reqwest::blocking::Client;
use reqwest::StatusCode;
use serde_json::{json, Value};

const QUESTIONS: &[&str] = &[
    "Where does Alice keep her bicycle?",
    "Summarise the documents in one sentence.",
    "Which region grew the most?",
    "What time does the library open?",
];

/// The questions of `--plain`.
const CHATS: &[&str] = &[
    "Write a short poem about the sea.",
    "Explain what a hash table is, in a few sentences.",
    "Give three tips for learning a new language.",
    "Describe a sunrise over the mountains.",
];

#[derive(Args)]
pub(crate) struct LoadArgs {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Clients sending requests at the same time.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Requests in all.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Tokens per answer.
    #[arg(long, default_value_t = 8)]
    max_tokens: usize,
    /// Documents to ask over, one per file.
    #[arg(long, default_value = "examples/documents")]
    documents_dir: PathBuf,
    /// Times a refused request is retried, after the wait its `Retry-After` asks for.
    #[arg(long, default_value_t = 30)]
    retries: usize,
    /// Ask plain chats without documents (nothing is registered), which any
    /// OpenAI-compatible server answers.
    #[arg(long)]
    plain: bool,
    /// Print the summary as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// How one request ended.
enum Outcome {
    /// The reference answer (this many tokens), this long after the first try, after this
    /// many refusals, its first text this long after the first try.
    Answered(usize, Duration, usize, Duration),
    /// Still refused after every retry.
    Refused,
    /// Another answer than the reference (this many tokens).
    Wrong(usize, String),
    Failed(String),
}

pub(crate) fn run(args: LoadArgs) -> Result<()> {
    anyhow::ensure!(
        args.clients > 0 && args.requests > 0,
        "--clients and --requests must be at least 1"
    );
    // A fresh connection per request: a server may close a kept-alive connection just as
    // the client reuses it (llama-server does, under load), failing a request it never saw.
    let client = Client::builder()
        .timeout(Duration::from_secs(600))
        .pool_max_idle_per_host(0)
        .build()
        .context("could not build the HTTP client")?;
    let base = args.url.trim_end_matches('/');
    let (questions, by_id, by_text) = if args.plain {
        (CHATS, Vec::new(), Vec::new())
    } else {
        let documents = crate::read_files(&crate::read_folder(&args.documents_dir)?)?;
        let ids = register(&client, base, &documents)?;
        let by_id: Vec<Value> = ids.iter().map(|id| json!({ "id": id })).collect();
        let by_text: Vec<Value> = documents.iter().map(|d| json!(d)).collect();
        (QUESTIONS, by_id, by_text)
    };
    let body = |question: &str, documents: &[Value]| {
        let mut body = json!({
            "messages": [{"role": "user", "content": question}],
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if !documents.is_empty() {
            body["documents"] = json!(documents);
        }
        body
    };
    let reference = questions
        .iter()
        .map(|q| match ask(&client, base, &body(q, &by_id))? {
            Reply::Answer { text, .. } => Ok(text),
            Reply::Refused(_) => bail!("the server refused a request while idle"),
            Reply::Other(status, text) => {
                bail!("the reference request failed with {status}: {text}")
            }
        })
        .collect::<Result<Vec<String>>>()?;

    let next = AtomicUsize::new(0);
    let outcomes = Mutex::new(Vec::with_capacity(args.requests));
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..args.clients {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= args.requests {
                    break;
                }
                let documents = if i.is_multiple_of(2) {
                    &by_id
                } else {
                    &by_text
                };
                let question = i % questions.len();
                let sent = Instant::now();
                let mut refusals = 0;
                let outcome = loop {
                    break match ask(&client, base, &body(questions[question], documents)) {
                        Ok(Reply::Answer {
                            text,
                            tokens,
                            first,
                        }) if text == reference[question] => Outcome::Answered(
                            tokens,
                            sent.elapsed(),
                            refusals,
                            first.duration_since(sent),
                        ),
                        Ok(Reply::Answer { text, tokens, .. }) => Outcome::Wrong(
                            tokens,
                            format!("request {i}: `{text}` instead of `{}`", reference[question]),
                        ),
                        Ok(Reply::Refused(wait)) if refusals < args.retries => {
                            refusals += 1;
                            std::thread::sleep(wait);
                            continue;
                        }
                        Ok(Reply::Refused(_)) => Outcome::Refused,
                        Ok(Reply::Other(status, text)) => {
                            Outcome::Failed(format!("request {i}: {status} {text}"))
                        }
                        Err(e) => Outcome::Failed(format!("request {i}: {e:#}")),
                    };
                };
                outcomes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(outcome);
            });
        }
    });
    let wall = start.elapsed();
    let outcomes = outcomes.into_inner().unwrap_or_else(|e| e.into_inner());
    report(&args, &outcomes, wall);
    Ok(())
}

/// Register `documents` with `POST /v1/contexts`; their ids.
fn register(client: &Client, base: &str, documents: &[String]) -> Result<Vec<String>> {
    let response = client
        .post(format!("{base}/v1/contexts"))
        .json(&json!({ "documents": documents }))
        .send()
        .with_context(|| format!("cannot reach the server at {base}; is `ape serve` running?"))?;
    let status = response.status();
    let body: Value = response.json().context("the server's reply is not JSON")?;
    anyhow::ensure!(
        status.is_success(),
        "registering the documents failed: {body}"
    );
    body["data"]
        .as_array()
        .context("no `data` in the reply")?
        .iter()
        .map(|d| {
            d["id"]
                .as_str()
                .map(str::to_owned)
                .context("a context without an id")
        })
        .collect()
}

/// What the server said to one request.
enum Reply {
    /// The answer, its length in tokens, and when its first text arrived.
    Answer {
        text: String,
        tokens: usize,
        first: Instant,
    },
    /// 429 with `Retry-After` and OpenAI's error object: wait this long.
    Refused(Duration),
    Other(StatusCode, String),
}

/// One streamed chat completion.
fn ask(client: &Client, base: &str, body: &Value) -> Result<Reply> {
    let response = client
        .post(format!("{base}/v1/chat/completions"))
        .json(body)
        .send()?;
    let status = response.status();
    if status == StatusCode::OK {
        return read_stream(response);
    }
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let reply: Value = response.json().context("the reply is not JSON")?;
    Ok(match (status, retry_after) {
        (StatusCode::TOO_MANY_REQUESTS, Some(seconds)) if reply["error"]["message"].is_string() => {
            Reply::Refused(Duration::from_secs(seconds))
        }
        _ => Reply::Other(status, reply.to_string()),
    })
}

/// The text of a stream of server-sent chunks; its length in tokens from the usage of
/// the last chunk (where the server sends none, the chunks with text).
fn read_stream(response: reqwest::blocking::Response) -> Result<Reply> {
    let (mut text, mut chunks, mut usage, mut first) = (String::new(), 0, None, None);
    for line in BufReader::new(response).lines() {
        let line = line.context("the stream broke off")?;
        let Some(data) = line.strip_prefix("data:").map(str::trim) else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let chunk: Value =
            serde_json::from_str(data).with_context(|| format!("a chunk is not JSON: {data}"))?;
        if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
            if !piece.is_empty() {
                first.get_or_insert_with(Instant::now);
                text.push_str(piece);
                chunks += 1;
            }
        }
        if let Some(tokens) = chunk["usage"]["completion_tokens"].as_u64() {
            usage = Some(tokens as usize);
        }
    }
    Ok(Reply::Answer {
        text,
        tokens: usage.unwrap_or(chunks),
        first: first.unwrap_or_else(Instant::now),
    })
}

fn report(args: &LoadArgs, outcomes: &[Outcome], wall: Duration) {
    let sorted = |of: fn(&Outcome) -> Option<Duration>| {
        let mut seconds: Vec<f64> = outcomes
            .iter()
            .filter_map(of)
            .map(|d| d.as_secs_f64())
            .collect();
        seconds.sort_by(f64::total_cmp);
        seconds
    };
    let latencies = sorted(|o| match o {
        Outcome::Answered(_, latency, _, _) => Some(*latency),
        _ => None,
    });
    let firsts = sorted(|o| match o {
        Outcome::Answered(_, _, _, first) => Some(*first),
        _ => None,
    });
    let refused = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Refused))
        .count();
    let refusals: usize = outcomes
        .iter()
        .map(|o| match o {
            Outcome::Answered(_, _, refusals, _) => *refusals,
            Outcome::Refused => args.retries + 1,
            _ => 0,
        })
        .sum();
    let problems: Vec<&str> = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Wrong(_, why) | Outcome::Failed(why) => Some(why.as_str()),
            _ => None,
        })
        .collect();
    let wrong = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Wrong(..)))
        .count();
    let generated: usize = outcomes
        .iter()
        .map(|o| match o {
            Outcome::Answered(tokens, ..) | Outcome::Wrong(tokens, _) => *tokens,
            _ => 0,
        })
        .sum();
    let percentile = |of: &[f64], p: f64| -> f64 {
        if of.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * of.len() as f64).ceil() as usize;
        of[rank.clamp(1, of.len()) - 1]
    };
    let summary = json!({
        "requests": outcomes.len(),
        "answered": latencies.len(),
        "refused": refused,
        "refusals": refusals,
        "wrong": wrong,
        "failed": problems.len() - wrong,
        "problems": problems,
        "clients": args.clients,
        "wall_seconds": wall.as_secs_f64(),
        "answers_per_second": latencies.len() as f64 / wall.as_secs_f64(),
        "generated_tokens": generated,
        "tokens_per_second": generated as f64 / wall.as_secs_f64(),
        "latency_p50": percentile(&latencies, 50.0),
        "latency_p90": percentile(&latencies, 90.0),
        "latency_p99": percentile(&latencies, 99.0),
        "latency_max": latencies.last().copied().unwrap_or(f64::NAN),
        "first_token_p50": percentile(&firsts, 50.0),
        "first_token_p90": percentile(&firsts, 90.0),
        "first_token_p99": percentile(&firsts, 99.0),
    });
    if args.json {
        println!("{summary}");
        return;
    }
    println!("| clients | requests | answered | 429s on the way | given up | wrong | failed | answers/s | tokens/s | p50 | p90 | p99 | max | first token p50 | p90 | p99 |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.1} | {:.2} s | {:.2} s | {:.2} s | {:.2} s | {:.2} s | {:.2} s | {:.2} s |",
        args.clients,
        outcomes.len(),
        latencies.len(),
        refusals,
        refused,
        wrong,
        problems.len() - wrong,
        summary["answers_per_second"].as_f64().unwrap_or(f64::NAN),
        summary["tokens_per_second"].as_f64().unwrap_or(f64::NAN),
        percentile(&latencies, 50.0),
        percentile(&latencies, 90.0),
        percentile(&latencies, 99.0),
        summary["latency_max"].as_f64().unwrap_or(f64::NAN),
        percentile(&firsts, 50.0),
        percentile(&firsts, 90.0),
        percentile(&firsts, 99.0),
    );
    for problem in problems {
        println!("- {problem}");
    }
}
