//! `ape serve` as clients meet it: the official `openai` Python client, raw HTTP with bad
//! input, two replicas sharing one Redis, a bounded load test, and clients that leave or
//! run out of time. Everything runs over loopback against the real model.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{ape, free_port, RedisServer, Server};
use serde_json::{json, Value};

const MODEL_ID: &str = "smollm2-135m-instruct-q4_1";

fn documents() -> Value {
    json!([
        "Alice keeps her bicycle in the green shed behind the school.",
        "Bob's car is parked in the underground garage on Elm Street.",
        "The school library opens at eight in the morning.",
    ])
}

fn question(documents: Value) -> Value {
    json!({
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "Where does Alice keep her bicycle?"}],
        "documents": documents,
        "max_tokens": 16,
        "temperature": 0,
    })
}

/// The answer text of a 200 chat completion.
fn answer(response: reqwest::blocking::Response) -> String {
    assert_eq!(response.status(), 200);
    let body: Value = response.json().unwrap();
    body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Status and body of an error response, checked to be OpenAI's error object.
fn error(response: reqwest::blocking::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body: Value = response.json().expect("errors are JSON");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(body["error"]["type"].is_string(), "{body}");
    (status, body["error"].clone())
}

/// A Python with the `openai` package: `$APE_TEST_PYTHON` (set by scripts/test.sh), else
/// `python3`.
fn python() -> String {
    let python = std::env::var("APE_TEST_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let found = Command::new(&python)
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "`{python}` cannot import `openai`: run `bash scripts/test.sh`, which installs it, or \
         set APE_TEST_PYTHON to a Python that has it"
    );
    python
}

#[test]
fn the_openai_python_client_works_against_ape_serve() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&["--cache-dir", dir.path().to_str().unwrap()]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let out = Command::new(python())
        .args([script, &server.url, MODEL_ID])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the openai client checks failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    // What the Python client got is what a plain HTTP request gets.
    assert_eq!(
        seen["answer"].as_str().unwrap(),
        answer(server.post("/v1/chat/completions", &question(documents())))
    );
    assert!(!seen["plain"].as_str().unwrap().is_empty());
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&[
        "--cache-dir",
        dir.path().to_str().unwrap(),
        "--max-body",
        "4K",
    ]);
    let client = reqwest::blocking::Client::new();
    let raw = |body: &str| {
        client
            .post(format!("{}/v1/chat/completions", server.url))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .unwrap()
    };
    let (status, e) = error(raw("{\"messages\": ["));
    assert_eq!(status, 400, "{e}");
    let (status, e) = error(raw(
        r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}"#,
    ));
    assert_eq!(status, 400);
    assert!(e["message"].as_str().unwrap().contains("max_tokens"), "{e}");

    let with = |change: &dyn Fn(&mut Value)| {
        let mut body = question(documents());
        change(&mut body);
        error(server.post("/v1/chat/completions", &body))
    };
    for factors in [
        json!({"temperature": -0.5}),
        json!({"temperature": 1e30}),
        json!({"scale": 1e3}),
    ] {
        let (status, e) = with(&|b| b["ape"] = factors.clone());
        assert_eq!((status, e["param"].as_str()), (400, Some("ape")), "{e}");
    }
    for role in ["", "wizard"] {
        let (status, e) = with(&|b| b["messages"][0]["role"] = json!(role));
        assert_eq!(
            (status, e["param"].as_str()),
            (400, Some("messages")),
            "{e}"
        );
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains("unknown message role"),
            "{e}"
        );
    }
    let (status, e) = with(&|b| b["ape"] = json!({"mode": "telepathy"}));
    assert_eq!(status, 400, "{e}");
    for recompute in [
        json!({"recompute": 2}),
        json!({"mode": "parallel", "recompute": 0.5}),
    ] {
        let (status, e) = with(&|b| b["ape"] = recompute.clone());
        assert_eq!((status, e["param"].as_str()), (400, Some("ape")), "{e}");
    }
    for too_many in [json!(100_000), json!(u64::MAX)] {
        let (status, e) = with(&|b| b["max_tokens"] = too_many.clone());
        assert_eq!(
            (status, e["code"].as_str()),
            (400, Some("context_length_exceeded")),
            "{e}"
        );
        let (status, e) = with(&|b| {
            b["max_tokens"] = too_many.clone();
            b.as_object_mut().unwrap().remove("documents");
        });
        assert_eq!(
            (status, e["code"].as_str()),
            (400, Some("context_length_exceeded")),
            "{e}"
        );
    }
    let (status, e) = with(&|b| b["documents"] = json!([{"id": "f".repeat(64)}]));
    assert_eq!(
        (status, e["code"].as_str()),
        (404, Some("context_not_found")),
        "{e}"
    );
    let (status, e) = with(&|b| b["documents"] = json!([{"id": "not-an-id"}]));
    assert_eq!(
        (status, e["code"].as_str()),
        (400, Some("invalid_context_id")),
        "{e}"
    );
    let (status, e) = with(&|b| b["documents"] = json!(["x".repeat(8000)]));
    assert_eq!(status, 413, "{e}");
    let (status, _) = with(&|b| b["n"] = json!(3));
    assert_eq!(status, 400);
    let (status, _) = with(&|b| b["model"] = json!("gpt-4"));
    assert_eq!(status, 404);
    let (status, _) = error(server.get("/v1/contexts/".to_string().as_str()));
    assert_eq!(status, 404);
    let (status, _) = error(server.post("/v1/contexts", &json!({"documents": []})));
    assert_eq!(status, 400);

    // Still serving, and every refusal above was counted.
    assert!(!answer(server.post("/v1/chat/completions", &question(documents()))).is_empty());
    // Recomputing every document token: the usage and the metrics say how many.
    let before = server.metric("ape_recomputed_tokens_total");
    let mut body = question(documents());
    body["ape"] = json!({"recompute": 1.0});
    let reply: Value = server.post("/v1/chat/completions", &body).json().unwrap();
    let recomputed = reply["usage"]["prompt_tokens_details"]["recomputed_tokens"]
        .as_f64()
        .unwrap_or_default();
    assert!(recomputed > 0.0, "{reply}");
    assert_eq!(
        server.metric("ape_recomputed_tokens_total") - before,
        recomputed
    );
    let health: Value = server.get("/health").json().unwrap();
    assert_eq!(health["status"], "ok");
    assert!(
        server.metric(r#"ape_requests_total{route="/v1/chat/completions",status="400"}"#) >= 7.0
    );
}

#[test]
fn registered_contexts_can_be_read_used_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&[
        "--cache-dir",
        dir.path().to_str().unwrap(),
        "--chunk-tokens",
        "64",
    ]);
    // A document longer than the chunk size is registered as several contexts.
    let long: String = (0..20)
        .map(|i| format!("Ferry {i} leaves the north pier at half past the hour.\n"))
        .collect();
    let mut with_long = documents();
    with_long.as_array_mut().unwrap().push(json!(long));
    let split: Value = server
        .post("/v1/contexts", &json!({"documents": with_long}))
        .json()
        .unwrap();
    let parts: Vec<&Value> = split["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["document"] == 3)
        .collect();
    assert!(parts.len() >= 3, "{split}");
    assert!(parts.iter().all(|c| c["tokens"].as_u64().unwrap() <= 64));

    let registered = server.post("/v1/contexts", &json!({"documents": documents()}));
    assert_eq!(registered.status(), 201);
    let registered: Value = registered.json().unwrap();
    assert_eq!(split["data"][0]["cached"], false);
    let ids: Vec<&str> = registered["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3);
    assert_eq!(registered["data"][0]["cached"], true);
    let again: Value = server
        .post("/v1/contexts", &json!({"documents": documents()}))
        .json()
        .unwrap();
    assert_eq!(again["data"][2]["id"], ids[2]);
    assert_eq!(again["data"][2]["cached"], true);

    let listed: Value = server.get("/v1/contexts").json().unwrap();
    let listed_ids: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed_ids.len(), split["data"].as_array().unwrap().len());
    assert!(ids.iter().all(|id| listed_ids.contains(id)));
    let shown: Value = server
        .get(&format!("/v1/contexts/{}", ids[0]))
        .json()
        .unwrap();
    assert_eq!(shown["tokens"], registered["data"][0]["tokens"]);

    let by_id: Vec<Value> = ids.iter().map(|id| json!({ "id": id })).collect();
    assert_eq!(
        answer(server.post("/v1/chat/completions", &question(json!(by_id)))),
        answer(server.post("/v1/chat/completions", &question(documents())))
    );

    let deleted = reqwest::blocking::Client::new()
        .delete(format!("{}/v1/contexts/{}", server.url, ids[0]))
        .send()
        .unwrap();
    assert_eq!(deleted.status(), 200);
    let (status, _) = error(server.get(&format!("/v1/contexts/{}", ids[0])));
    assert_eq!(status, 404);
    let (status, _) = error(server.post("/v1/chat/completions", &question(json!(by_id))));
    assert_eq!(status, 404);
}

#[test]
fn text_completions_read_few_shot_demonstrations_as_documents() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&["--cache-dir", dir.path().to_str().unwrap()]);
    let demonstrations = json!([
        "Review: a warm, funny and beautifully acted film.\nSentiment: positive",
        "Review: dull, slow and far too long.\nSentiment: negative",
        "Review: one of the best films of the year.\nSentiment: positive",
        "Review: the plot makes no sense and the jokes fall flat.\nSentiment: negative",
    ]);
    let prefix = "Movie reviews, each labelled with its sentiment: positive or negative.\n\n";
    let label = |review: &str, mode: &str| -> (String, Value) {
        let response = server.post(
            "/v1/completions",
            &json!({
                "prefix": prefix,
                "documents": demonstrations,
                "prompt": format!("Review: {review}\nSentiment:"),
                "max_tokens": 1,
                "temperature": 0,
                "ape": {"mode": mode},
            }),
        );
        assert_eq!(response.status(), 200);
        let body: Value = response.json().unwrap();
        let text = body["choices"][0]["text"]
            .as_str()
            .unwrap()
            .trim()
            .to_owned();
        (text, body["usage"].clone())
    };
    for mode in ["sequential", "parallel", "ape"] {
        let (liked, _) = label("a wonderful, moving story that I loved.", mode);
        let (disliked, usage) = label("a boring, lifeless mess that wasted my evening.", mode);
        assert_eq!(
            (liked.as_str(), disliked.as_str()),
            ("positive", "negative"),
            "{mode}"
        );
        // The second question finds the demonstrations the first one encoded.
        if mode != "sequential" {
            let demonstrations_and_prefix = usage["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap();
            assert!(demonstrations_and_prefix > 40, "{usage}");
        }
    }
    let (status, e) = error(server.post(
        "/v1/completions",
        &json!({"prompt": "Review: fine.\nSentiment:", "prefix": prefix}),
    ));
    assert_eq!((status, e["param"].as_str()), (400, Some("prefix")), "{e}");
}

/// A many-shot request's demonstrations are encoded as one group: the same ones in the same
/// order find it stored, the same ones in another order do not.
#[test]
fn many_short_demonstrations_are_encoded_and_stored_as_a_group() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&["--cache-dir", dir.path().to_str().unwrap()]);
    let mut demonstrations: Vec<String> = (0..8)
        .map(|i| {
            let (word, label) = [("loved", "positive"), ("hated", "negative")][i % 2];
            format!("Review: I {word} film number {i}.\nSentiment: {label}")
        })
        .collect();
    let cached = |demonstrations: &[String]| -> u64 {
        let response = server.post(
            "/v1/completions",
            &json!({
                "documents": demonstrations,
                "prompt": "Review: I loved the last one.\nSentiment:",
                "max_tokens": 1,
                "temperature": 0,
            }),
        );
        assert_eq!(response.status(), 200);
        let body: Value = response.json().unwrap();
        body["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };
    cached(&demonstrations);
    let same_order = cached(&demonstrations);
    demonstrations.reverse();
    let other_order = cached(&demonstrations);
    assert!(
        other_order + 40 < same_order,
        "cached tokens: {same_order} in the same order, {other_order} in another"
    );
}

/// Gemma 3 is a base model with local sliding-window layers: it labels reviews from
/// demonstrations sent as documents, and refuses chat with a 400 that says what to send.
#[test]
fn a_base_model_serves_completions_over_documents_and_refuses_chat() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::model_file("gemma-3-270m-q4_k_m.gguf");
    let server = Server::start_model(&model, &["--cache-dir", dir.path().to_str().unwrap()]);
    let demonstrations = json!([
        "Review: A wonderful, moving film.\nSentiment: positive",
        "Review: Dull and far too long.\nSentiment: negative",
        "Review: The best thing I saw all year.\nSentiment: positive",
        "Review: A waste of two hours.\nSentiment: negative",
    ]);
    for (review, label) in [
        ("I loved every minute of it.", "positive"),
        ("Boring from start to finish.", "negative"),
    ] {
        let response = server.post(
            "/v1/completions",
            &json!({
                "documents": demonstrations,
                "prompt": format!("Review: {review}\nSentiment:"),
                "max_tokens": 2,
                "temperature": 0,
            }),
        );
        assert_eq!(response.status(), 200);
        let body: Value = response.json().unwrap();
        assert_eq!(body["choices"][0]["text"].as_str().unwrap().trim(), label);
    }
    let chat = json!({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4});
    let (status, e) = error(server.post("/v1/chat/completions", &chat));
    assert_eq!(
        (status, e["code"].as_str()),
        (400, Some("no_chat_template")),
        "{e}"
    );
    assert!(
        e["message"].as_str().unwrap().contains("/v1/completions"),
        "{e}"
    );
    assert_eq!(server.get("/health").status(), 200);
}

#[test]
fn two_servers_share_registered_contexts_through_redis() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start();
    let cache = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let (first_dir, second_dir) = (cache("first"), cache("second"));
    let first = Server::start(&["--cache-dir", &first_dir, "--redis", &redis.url]);
    let second = Server::start(&["--cache-dir", &second_dir, "--redis", &redis.url]);

    let registered: Value = first
        .post("/v1/contexts", &json!({"documents": documents()}))
        .json()
        .unwrap();
    let by_id: Vec<Value> = registered["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| json!({"id": c["id"]}))
        .collect();
    let on_first = answer(first.post("/v1/chat/completions", &question(json!(by_id))));
    let reply: Value = second
        .post("/v1/chat/completions", &question(json!(by_id)))
        .json()
        .unwrap();
    let on_second = reply["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(on_first, on_second);
    // Every document's tokens were reused, none read again (the prefix was new there).
    let document_tokens: u64 = registered["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(
        reply["usage"]["prompt_tokens_details"]["cached_tokens"],
        document_tokens
    );
    // The second server read each context from Redis and encoded none of them.
    assert_eq!(second.metric(r#"ape_store_hits_total{tier="redis"}"#), 3.0);
    assert_eq!(
        second.metric(r#"ape_store_misses_total{tier="redis"}"#),
        0.0
    );
    // By text, the same documents are memory hits there now.
    assert_eq!(
        answer(second.post("/v1/chat/completions", &question(documents()))),
        on_first
    );
    assert_eq!(
        second.metric(r#"ape_store_misses_total{tier="redis"}"#),
        0.0
    );
}

#[test]
fn a_server_keeps_answering_while_its_redis_is_down_comes_up_and_dies() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/");
    // Redis is not up yet: the server starts anyway and answers from memory and disk.
    let server = Server::start(&["--cache-dir", dir.path().to_str().unwrap(), "--redis", &url]);
    let expected = answer(server.post("/v1/chat/completions", &question(documents())));
    assert!(!expected.is_empty());

    // Redis comes up: registering stores in it too, once the server has reconnected.
    let redis = RedisServer::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(60);
    let registered: Value = loop {
        let response = server.post("/v1/contexts", &json!({"documents": documents()}));
        if response.status() == 201 {
            break response.json().unwrap();
        }
        assert!(Instant::now() < deadline, "{}", response.text().unwrap());
        std::thread::sleep(Duration::from_millis(200));
    };
    let by_id: Vec<Value> = registered["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| json!({ "id": c["id"] }))
        .collect();
    assert_eq!(
        answer(server.post("/v1/chat/completions", &question(json!(by_id)))),
        expected
    );

    // Redis dies: the same answers, by text and by id; a new registration says what
    // was not stored; the server stays up.
    drop(redis);
    assert_eq!(
        answer(server.post("/v1/chat/completions", &question(documents()))),
        expected
    );
    assert_eq!(
        answer(server.post("/v1/chat/completions", &question(json!(by_id)))),
        expected
    );
    let (status, e) = error(server.post(
        "/v1/contexts",
        &json!({"documents": ["The ferry to the island leaves at noon."]}),
    ));
    assert_eq!(status, 500, "{e}");
    assert!(e["message"].as_str().unwrap().contains("redis tier"), "{e}");
    assert_eq!(server.get("/health").status(), 200);
}

#[test]
fn silent_connections_and_stalled_bodies_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&[
        "--cache-dir",
        dir.path().to_str().unwrap(),
        "--idle-timeout",
        "2",
    ]);
    let address = server.url.trim_start_matches("http://");
    // The read time-out is a ceiling for a server that never closes, not a speed limit.
    let connect = || {
        let socket = TcpStream::connect(address).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        socket
    };
    let read_all = |mut socket: TcpStream| {
        let mut text = String::new();
        socket
            .read_to_string(&mut text)
            .expect("the server closes the connection");
        text
    };

    // Connected, never a byte sent: closed without an answer.
    assert_eq!(read_all(connect()), "");

    // Headers sent, then half the body and silence: 408, then closed.
    let mut stalled = connect();
    write!(
        stalled,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"messages\": "
    )
    .unwrap();
    let answer_text = read_all(stalled);
    assert!(answer_text.starts_with("HTTP/1.1 408"), "{answer_text}");
    assert!(answer_text.contains("--idle-timeout"), "{answer_text}");
    assert_eq!(
        server.metric(r#"ape_requests_total{route="/v1/chat/completions",status="408"}"#),
        1.0
    );
    // Still serving.
    assert!(!answer(server.post("/v1/chat/completions", &question(documents()))).is_empty());
}

#[test]
fn a_bounded_load_is_answered_or_cleanly_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&[
        "--cache-dir",
        dir.path().to_str().unwrap(),
        "--concurrency",
        "2",
        "--queue",
        "8",
    ]);
    let docs = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/documents");
    let out = ape(&[
        "bench",
        "serve",
        "--url",
        &server.url,
        "--clients",
        "32",
        "--requests",
        "200",
        "--documents-dir",
        docs,
        "--json",
    ])
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["requests"], 200, "{summary}");
    assert_eq!(summary["wrong"], 0, "{summary}");
    assert_eq!(summary["failed"], 0, "{summary}");
    let answered = summary["answered"].as_u64().unwrap();
    let given_up = summary["refused"].as_u64().unwrap();
    assert_eq!(answered + given_up, 200, "{summary}");
    assert!(answered > 0, "{summary}");
    // 32 clients against 2 slots and 8 places in the queue: some were turned away, and
    // the server counted exactly the refusals the clients saw.
    let (first, whole) = (
        summary["first_token_p50"].as_f64().unwrap(),
        summary["latency_p50"].as_f64().unwrap(),
    );
    assert!(
        first > 0.0 && first <= whole,
        "the first text comes before the whole answer: {summary}"
    );
    let refusals = summary["refusals"].as_f64().unwrap();
    assert!(refusals > 0.0, "{summary}");
    assert_eq!(server.metric("ape_requests_refused_total"), refusals);
    assert_eq!(server.metric("ape_queue_depth"), 0.0);
}

/// A request that reads a long prompt: many documents in sequential mode.
fn slow_request(stream: bool) -> Value {
    let document = "The quick brown fox jumps over the lazy dog near the river bank. ".repeat(40);
    json!({
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "Summarise."}],
        "documents": vec![document; 12],
        "ape": {"mode": "sequential"},
        "max_tokens": 64,
        "temperature": 0,
        "stream": stream,
    })
}

/// POST `body` to the chat route on a connection of its own, left open for the caller to
/// read from or drop.
fn send(server: &Server, body: &Value) -> TcpStream {
    let address = server.url.trim_start_matches("http://");
    let mut socket = TcpStream::connect(address).unwrap();
    let body = body.to_string();
    write!(
        socket,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    socket
}

/// Wait until `/metrics` shows `sample` at `value`.
fn wait_for(server: &Server, sample: &str, value: f64) {
    // A ceiling for a wedged server, not a speed limit: a busy machine may take long.
    let deadline = Instant::now() + Duration::from_secs(300);
    while server.metric(sample) != value {
        assert!(
            Instant::now() < deadline,
            "{sample} never reached {value}:\n{}",
            server.get("/metrics").text().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A sequential request over four long documents, about 2,300 tokens: with SmolLM2's
/// 22.5 KiB of keys and values per position, 53 MB charged to the KV budget.
fn long_request(max_tokens: usize) -> Value {
    let mut body = slow_request(false);
    let documents = body["documents"].as_array().unwrap()[..4].to_vec();
    body["documents"] = json!(documents);
    body["max_tokens"] = json!(max_tokens);
    body
}

#[test]
fn requests_beyond_the_kv_memory_budget_are_refused_not_run_out_of_memory() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&[
        "--cache-dir",
        dir.path().to_str().unwrap(),
        "--concurrency",
        "2",
        "--kv-memory",
        "80M",
    ]);
    // Two at once: each fits the 80 MB alone, not both together. Reading the prompt
    // takes seconds, the other's admission milliseconds, so they always overlap.
    let outcomes: Vec<(u16, Option<String>, Value)> = std::thread::scope(|scope| {
        let sent: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| {
                    let response = server.post("/v1/chat/completions", &long_request(8));
                    let status = response.status().as_u16();
                    let retry = response
                        .headers()
                        .get("retry-after")
                        .map(|v| v.to_str().unwrap().to_owned());
                    (status, retry, response.json::<Value>().unwrap())
                })
            })
            .collect();
        sent.into_iter().map(|s| s.join().unwrap()).collect()
    });
    let mut statuses: Vec<u16> = outcomes.iter().map(|o| o.0).collect();
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 429], "{outcomes:?}");
    let (_, retry, refused) = outcomes.iter().find(|o| o.0 == 429).unwrap();
    assert_eq!(refused["error"]["code"], "kv_memory_full", "{refused}");
    assert!(retry.is_some(), "a 429 says when to retry");
    assert_eq!(server.metric("ape_kv_memory_bytes"), (80u64 << 20) as f64);
    assert_eq!(server.metric("ape_requests_refused_total"), 1.0);
    // Once the first is done its memory is free again (what it left in the kept caches
    // gives way): the refused request now runs.
    wait_for(&server, "ape_running_requests", 0.0);
    assert_eq!(
        server
            .post("/v1/chat/completions", &long_request(8))
            .status(),
        200
    );
    // More than the whole budget could ever hold: a 400 that says what to change.
    let (status, e) = error(server.post("/v1/chat/completions", &long_request(5000)));
    assert_eq!(
        (status, e["code"].as_str()),
        (400, Some("kv_memory_exceeded")),
        "{e}"
    );
    assert!(
        e["message"].as_str().unwrap().contains("--kv-memory"),
        "{e}"
    );
}

#[test]
fn with_an_api_key_only_requests_that_send_it_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&[
        "--cache-dir",
        dir.path().to_str().unwrap(),
        "--api-key",
        "open sesame",
    ]);
    let chat = |key: Option<&str>| {
        let request = reqwest::blocking::Client::new()
            .post(format!("{}/v1/chat/completions", server.url))
            .json(&question(documents()));
        match key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
        .send()
        .unwrap()
    };
    for key in [None, Some("open sesam"), Some("open sesame!"), Some("")] {
        let response = chat(key);
        let challenge = response.headers().get("www-authenticate").cloned();
        let (status, e) = error(response);
        assert_eq!(status, 401, "{key:?}: {e}");
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str()),
            (Some("authentication_error"), Some("invalid_api_key"))
        );
        assert_eq!(challenge.unwrap(), "Bearer");
    }
    assert!(!answer(chat(Some("open sesame"))).is_empty());
    assert_eq!(server.get("/health").status(), 200, "probes need no key");
    assert_eq!(server.get("/metrics").status(), 401);
    assert_eq!(server.get("/v1/models").status(), 401);
}

#[test]
fn a_request_past_its_time_limit_is_stopped_with_504() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&[
        "--cache-dir",
        dir.path().to_str().unwrap(),
        "--request-timeout",
        "6",
    ]);
    // The prompt alone takes about 15 s to read on an idle machine; the question after it
    // a fraction of a second, so the limit holds on a machine several times slower too.
    let (status, e) = error(server.post("/v1/chat/completions", &slow_request(false)));
    assert_eq!((status, e["code"].as_str()), (504, Some("timeout")), "{e}");
    assert_eq!(server.metric("ape_requests_timed_out_total"), 1.0);
    wait_for(&server, "ape_running_requests", 0.0);
    assert!(!answer(server.post("/v1/chat/completions", &question(documents()))).is_empty());
}

#[test]
fn clients_that_leave_stop_their_generation() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&["--cache-dir", dir.path().to_str().unwrap()]);
    // A client that gives up on a plain request once it is running.
    let waiting = send(&server, &slow_request(false));
    wait_for(&server, "ape_running_requests", 1.0);
    drop(waiting);
    wait_for(&server, "ape_requests_cancelled_total", 1.0);
    wait_for(&server, "ape_running_requests", 0.0);
    // Counted, as 499, though no response was sent.
    let left = r#"ape_requests_total{route="/v1/chat/completions",status="499"}"#;
    assert_eq!(server.metric(left), 1.0);

    // A client that closes a stream after its first event.
    let mut streaming = send(&server, &slow_request(true));
    let mut first = [0u8; 64];
    let read = streaming.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..read]).starts_with("HTTP/1.1 200"));
    drop(streaming);
    wait_for(&server, "ape_requests_cancelled_total", 2.0);
    wait_for(&server, "ape_running_requests", 0.0);

    // The slots are free again: a short request is answered at once.
    assert!(!answer(server.post("/v1/chat/completions", &question(documents()))).is_empty());
}

#[test]
fn a_registration_stopped_by_its_time_limit_keeps_what_it_encoded() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&[
        "--cache-dir",
        dir.path().to_str().unwrap(),
        "--request-timeout",
        "8",
    ]);
    // Most of a minute of encoding on an idle machine, a third of a second each.
    let documents: Vec<String> = (0..120)
        .map(|i| {
            format!("Note {i}: the tide at the harbour turned at {i} minutes past six. ").repeat(12)
        })
        .collect();
    let response = server.post("/v1/contexts", &json!({ "documents": documents }));
    let listed = |server: &Server| -> usize {
        let listed: Value = server.get("/v1/contexts").json().unwrap();
        listed["data"].as_array().unwrap().len()
    };
    let kept = match response.status().as_u16() {
        // A machine fast enough to encode them all within the limit.
        201 => documents.len(),
        504 => listed(&server),
        other => panic!("status {other}: {}", response.text().unwrap()),
    };
    assert!(
        kept > 0,
        "nothing was kept of a registration stopped after 8 s"
    );
    assert_eq!(listed(&server), kept);
    // They were stored one document after another: the first `kept` are all there.
    let again: Value = server
        .post("/v1/contexts", &json!({ "documents": documents[..kept] }))
        .json()
        .unwrap();
    let contexts = again["data"].as_array().unwrap();
    assert_eq!(contexts.len(), kept, "{again}");
    assert!(contexts.iter().all(|c| c["cached"] == true), "{again}");
}

#[test]
fn a_prompt_too_long_for_the_window_is_refused_without_reading_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&["--cache-dir", dir.path().to_str().unwrap()]);
    // 12 MB of text: more tokens than the window holds, however it tokenizes.
    let content = "many words ".repeat(1 << 20);
    let body = json!({
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 4,
    });
    let (status, e) = error(server.post("/v1/chat/completions", &body));
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["code"], "context_length_exceeded", "{e}");
    assert!(e["message"].as_str().unwrap().contains("at least"), "{e}");
    assert!(!answer(server.post("/v1/chat/completions", &question(documents()))).is_empty());
}

/// A varied set of greedy requests: plain chat, documents by text in each mode, a text
/// completion, different lengths.
fn greedy_requests() -> Vec<(&'static str, Value)> {
    let chat = |content: &str, max_tokens: u64| {
        json!({
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
        })
    };
    let with_documents = |mode: &str| {
        let mut body = question(documents());
        body["max_tokens"] = json!(40);
        body["ape"] = json!({ "mode": mode });
        body
    };
    vec![
        ("/v1/chat/completions", chat("Say hello", 48)),
        (
            "/v1/chat/completions",
            chat("Name three rivers of Europe.", 40),
        ),
        ("/v1/chat/completions", with_documents("ape")),
        ("/v1/chat/completions", with_documents("sequential")),
        ("/v1/chat/completions", with_documents("parallel")),
        (
            "/v1/completions",
            json!({"model": MODEL_ID, "prompt": "The tide tables for the harbour", "max_tokens": 32, "temperature": 0}),
        ),
    ]
}

fn text_of(response: reqwest::blocking::Response) -> String {
    assert_eq!(response.status(), 200);
    let body: Value = response.json().unwrap();
    let choice = &body["choices"][0];
    choice["message"]["content"]
        .as_str()
        .or(choice["text"].as_str())
        .unwrap()
        .to_owned()
}

/// A greedy request answers the same whatever the server computed, cached or stored before
/// it, whatever runs beside it, and after a restart.
#[test]
fn greedy_answers_do_not_depend_on_what_came_before_or_beside() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--cache-dir",
        dir.path().to_str().unwrap(),
        "--concurrency",
        "3",
    ];
    let requests = greedy_requests();
    let server = Server::start(&args);
    // First answers: the prompts and documents are new to the server.
    let first: Vec<String> = requests
        .iter()
        .map(|(path, body)| text_of(server.post(path, body)))
        .collect();
    // Again, now with the prompt's prefix and the documents cached or stored.
    for ((path, body), want) in requests.iter().zip(&first) {
        assert_eq!(&text_of(server.post(path, body)), want, "{body}");
    }
    // All at once, three at a time side by side, twice over.
    let together: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = requests
            .iter()
            .chain(&requests)
            .map(|(path, body)| scope.spawn(|| text_of(server.post(path, body))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, got) in together.iter().enumerate() {
        assert_eq!(
            got,
            &first[i % requests.len()],
            "{}",
            requests[i % requests.len()].1
        );
    }
    // They were decoded together, not merely side by side.
    let steps = server.metric("ape_decode_steps_total");
    assert!(server.metric("ape_decode_step_tokens_total") > steps);
    drop(server);
    // A new process reading the documents back from the disk store.
    let restarted = Server::start(&args);
    for ((path, body), want) in requests.iter().zip(&first) {
        assert_eq!(&text_of(restarted.post(path, body)), want, "{body}");
    }
}

/// A disk tier that fails is answered with 500 and what failed, never with the server's
/// paths; the server keeps serving. `--max-body 0` is refused at start.
#[test]
fn a_broken_disk_tier_answers_without_its_paths() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap();
    let server = Server::start(&["--cache-dir", root]);
    let registered: Value = server
        .post("/v1/contexts", &json!({"documents": documents()}))
        .json()
        .unwrap();
    let id = registered["data"][0]["id"].as_str().unwrap().to_owned();
    // The entries folder becomes a file: listing and deleting fail.
    let entries = dir.path().join("entries");
    std::fs::remove_dir_all(&entries).unwrap();
    std::fs::write(&entries, b"not a folder").unwrap();
    let listed = error(server.get("/v1/contexts"));
    let deleted = error(
        reqwest::blocking::Client::new()
            .delete(format!("{}/v1/contexts/{id}", server.url))
            .send()
            .unwrap(),
    );
    for (status, e) in [listed, deleted] {
        assert_eq!(status, 500, "{e}");
        let message = e["message"].as_str().unwrap();
        assert!(message.contains("disk tier"), "{e}");
        assert!(
            !message.contains(root),
            "the answer names a server path: {e}"
        );
    }
    // A new document is encoded, but cannot be stored: said so, not 201.
    let (status, e) = error(server.post(
        "/v1/contexts",
        &json!({"documents": ["The ferry to the island leaves at noon."]}),
    ));
    assert_eq!(status, 500, "{e}");
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("not stored") && message.contains("disk tier"),
        "{e}"
    );
    assert!(
        !message.contains(root),
        "the answer names a server path: {e}"
    );
    // Still serving, from memory.
    assert!(!answer(server.post("/v1/chat/completions", &question(documents()))).is_empty());

    let refused = ape(&[
        "serve",
        "--model",
        common::model().to_str().unwrap(),
        "--max-body",
        "0",
    ])
    .output()
    .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--max-body must be at least 1"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}
