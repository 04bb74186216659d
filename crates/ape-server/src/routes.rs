//! The HTTP routes: OpenAI's chat and text completions (plain or streamed as server-sent
//! events), the model list, ape's context registry, health and metrics.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ape_core::engine::generate::{Cancel, FinishReason, GenerateOptions, Generation};
use ape_core::engine::Engine;
use ape_store::{register, Registered, Store};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

use crate::api::{
    context_key, parse, stored_context, ChatRequest, CommonFields, Completion, CompletionRequest,
    Prepared, RegisterContexts, Work,
};
use crate::error::{ApiError, CLIENT_CLOSED_REQUEST};
use crate::metrics::Metrics;
use crate::scheduler::{CancelOnDrop, Scheduler, Slot};

/// What every handler shares: the model, loaded once, and the server's machinery.
pub(crate) struct AppState {
    pub engine: Arc<Engine>,
    pub store: Arc<Store>,
    pub scheduler: Scheduler,
    pub metrics: Arc<Metrics>,
    /// The name clients pass as `model`.
    pub model_id: String,
    pub started: Instant,
    /// The digest of the key clients must send, when the server has one: comparing
    /// digests takes the same time wherever the keys differ.
    pub api_key: Option<blake3::Hash>,
}

type Shared = Arc<AppState>;

pub(crate) fn router(state: Shared, max_body_bytes: usize, body_time: Duration) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/contexts", post(register_contexts).get(list_contexts))
        .route(
            "/v1/contexts/{id}",
            get(show_context).delete(delete_context),
        )
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("no such route; see README for the API") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "this route does not take that HTTP method",
            )
        })
        .layer(middleware::from_fn(move |request, next| {
            read_body(max_body_bytes, body_time, request, next)
        }))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(middleware::from_fn_with_state(state.clone(), record))
        // `read_body` bounds every body before an extractor sees it.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// Read the whole body before the handler runs: at most `max_bytes` (413 beyond), within
/// `time` (408 after), so that a client that stalls half-way holds no connection and no
/// task for long.
async fn read_body(max_bytes: usize, time: Duration, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let read = http_body_util::BodyExt::collect(http_body_util::Limited::new(body, max_bytes));
    let bytes = match tokio::time::timeout(time, read).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body is larger than the server accepts ({max_bytes} bytes); \
                     send fewer or shorter documents per request, or register them first \
                     with POST /v1/contexts"
                ),
            )
            .into_response()
        }
        Ok(Err(e)) => {
            return ApiError::bad_request(format!("the request body could not be read: {e}"))
                .into_response()
        }
        Err(_) => {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s; send it whole, or start \
                     the server with a larger --idle-timeout",
                    time.as_secs()
                ),
            )
            .code("timeout")
            .into_response()
        }
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// With an API key, refuse every request that does not send it (before its body is
/// read), except `GET /health`, which load balancers probe without credentials.
async fn authorize(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let Some(expected) = &state.api_key else {
        return next.run(request).await;
    };
    if request.uri().path() == "/health" {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    match presented {
        Some(key) if blake3::hash(key.trim().as_bytes()) == *expected => next.run(request).await,
        _ => ApiError::unauthorized().into_response(),
    }
}

/// Count every response by route and status, and time it.
async fn record(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let mut counted = Counted {
        state,
        route,
        start: Instant::now(),
        status: CLIENT_CLOSED_REQUEST.as_u16(),
    };
    let response = next.run(request).await;
    counted.status = response.status().as_u16();
    response
}

/// Counts its request when dropped: with the response's status, or, when the client left
/// before a response and the request's future was dropped, as 499.
struct Counted {
    state: Shared,
    route: String,
    start: Instant,
    status: u16,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.state
            .metrics
            .finished(&self.route, self.status, self.start.elapsed());
    }
}

/// A 500 for a store that failed: the log gets the whole error, the client what failed
/// without the server's paths.
fn store_failure(action: String, error: &ape_store::StoreError) -> ApiError {
    tracing::error!("{action}: {error}");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("{action}: {}", error.for_clients()),
    )
}

/// Run `work` on the blocking pool: store reads stay off the async threads.
async fn off_thread<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        tracing::error!("request preparation failed: {e}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error; see the server log",
        )
    })?
}

async fn chat_completions(
    State(state): State<Shared>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    complete::<ChatRequest>(state, body, Kind::Chat).await
}

async fn completions(
    State(state): State<Shared>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    complete::<CompletionRequest>(state, body, Kind::Text).await
}

/// Read a completion request of either kind; once it has a slot, tokenize it and answer.
async fn complete<R: Completion>(
    state: Shared,
    body: Result<Json<Value>, JsonRejection>,
    kind: Kind,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let (request, common): (R, CommonFields) = (parse(&body)?, parse(&body)?);
    let options = common.options(&state.model_id)?;
    let cancel = options.cancel.clone();
    let slot = state.scheduler.admit(&cancel).await?;
    // Dropped, with this future or the response stream, when the client disconnects.
    let on_disconnect = CancelOnDrop(cancel);
    let worker = state.clone();
    let (prepared, slot) = state
        .scheduler
        .run(slot, move || {
            request.prepare(&common, options, &worker.engine, &worker.store)
        })
        .await?;
    respond(state, prepared, slot, on_disconnect, kind).await
}

/// Chat completion or text completion: the two differ only in their JSON.
#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Text,
}

/// The identity every object of one response carries.
#[derive(Clone)]
struct Envelope {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
}

impl Envelope {
    fn new(kind: Kind, model: &str) -> Self {
        let tag = match kind {
            Kind::Chat => "chatcmpl",
            Kind::Text => "cmpl",
        };
        Envelope {
            kind,
            id: format!("{tag}-{:032x}", rand::random::<u128>()),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: model.to_owned(),
        }
    }

    fn object(&self, choices: Value, chunk: bool) -> Value {
        let object = match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        })
    }

    /// The whole answer, for a request that does not stream.
    fn complete(&self, generation: &Generation) -> Value {
        let finish_reason = finish_reason(generation.finish_reason);
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": generation.text},
                "logprobs": null,
                "finish_reason": finish_reason,
            }),
            Kind::Text => json!({
                "index": 0,
                "text": generation.text,
                "logprobs": null,
                "finish_reason": finish_reason,
            }),
        };
        let mut object = self.object(json!([choice]), false);
        object["usage"] = usage(generation);
        object
    }

    /// A streamed piece: `text` so far unsent, and the finish reason on the last one.
    fn chunk(&self, text: Option<&str>, finish_reason: Option<&str>) -> Event {
        let choice = match self.kind {
            Kind::Chat => {
                let delta = match text {
                    Some(text) => json!({"content": text}),
                    None if finish_reason.is_none() => json!({"role": "assistant", "content": ""}),
                    None => json!({}),
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason})
            }
            Kind::Text => json!({
                "index": 0,
                "text": text.unwrap_or(""),
                "logprobs": null,
                "finish_reason": finish_reason,
            }),
        };
        Event::default().data(self.object(json!([choice]), true).to_string())
    }

    /// The closing usage chunk `stream_options.include_usage` asks for.
    fn usage_chunk(&self, generation: &Generation) -> Event {
        let mut object = self.object(json!([]), true);
        object["usage"] = usage(generation);
        Event::default().data(object.to_string())
    }
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::EndOfText | FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn usage(generation: &Generation) -> Value {
    json!({
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.tokens.len(),
        "total_tokens": generation.prompt_tokens + generation.tokens.len(),
        "prompt_tokens_details": {
            "cached_tokens": generation.cached_tokens,
            "recomputed_tokens": generation.recomputed_tokens,
        },
    })
}

/// Run the model for `work`, sending text to `on_text` as it is made.
fn execute(
    engine: &Engine,
    metrics: &Metrics,
    work: &Work,
    options: &GenerateOptions,
    on_text: impl FnMut(&str),
) -> Result<Generation, ApiError> {
    let generation = match work {
        Work::Plain(tokens) => engine.generate(tokens, options, on_text),
        Work::Answer(prompt, mode) => engine.answer(prompt, *mode, options, on_text),
    }?;
    metrics.generated(&generation);
    Ok(generation)
}

/// Answer in `slot`, in one JSON object or as a stream of events.
async fn respond(
    state: Shared,
    prepared: Prepared,
    slot: Slot,
    on_disconnect: CancelOnDrop,
    kind: Kind,
) -> Result<Response, ApiError> {
    let Prepared {
        work,
        options,
        stream,
        include_usage,
    } = prepared;
    let envelope = Envelope::new(kind, &state.model_id);
    if !stream {
        let worker = state.clone();
        let (generation, _) = state
            .scheduler
            .run(slot, move || {
                execute(&worker.engine, &worker.metrics, &work, &options, |_| {})
            })
            .await?;
        drop(on_disconnect);
        return Ok(Json(envelope.complete(&generation)).into_response());
    }
    let (events, received) = mpsc::unbounded_channel();
    if let Kind::Chat = kind {
        let _ = events.send(envelope.chunk(None, None));
    }
    tokio::spawn(async move {
        let text_events = events.clone();
        let pieces = envelope.clone();
        let worker = state.clone();
        let outcome = state
            .scheduler
            .run(slot, move || {
                execute(&worker.engine, &worker.metrics, &work, &options, |text| {
                    if !text.is_empty() {
                        let _ = text_events.send(pieces.chunk(Some(text), None));
                    }
                })
            })
            .await;
        match outcome {
            Ok((generation, _)) => {
                let reason = finish_reason(generation.finish_reason);
                let _ = events.send(envelope.chunk(None, Some(reason)));
                if include_usage {
                    let _ = events.send(envelope.usage_chunk(&generation));
                }
            }
            Err(error) => {
                let _ = events.send(Event::default().data(error.body().to_string()));
            }
        }
        let _ = events.send(Event::default().data("[DONE]"));
    });
    let stream = UnboundedReceiverStream::new(received).map(move |event| {
        let _ = &on_disconnect;
        Ok::<_, Infallible>(event)
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn models(State(state): State<Shared>) -> Json<Value> {
    let created = SystemTime::now()
        .checked_sub(state.started.elapsed())
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_id,
            "object": "model",
            "created": created,
            "owned_by": "ape",
            "context_length": state.engine.model.config.context_length,
        }],
    }))
}

/// Encode documents after the prefix of a chat (with the given system message, if any)
/// and keep them in the store; returns each context's id and the document it belongs to
/// (a long document is several contexts). Each context is stored as soon as it is
/// encoded: a request stopped by its time limit or its client keeps what it finished, and
/// sending it again encodes only the rest.
async fn register_contexts(
    State(state): State<Shared>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let request: RegisterContexts = parse(&body)?;
    if request.documents.is_empty() {
        return Err(
            ApiError::bad_request("`documents` is empty; send at least one").param("documents"),
        );
    }
    let cancel = Cancel::new();
    let slot = state.scheduler.admit(&cancel).await?;
    let on_disconnect = CancelOnDrop(cancel.clone());
    let worker = state.clone();
    let (registration, _) = state
        .scheduler
        .run(slot, move || {
            let (engine, store) = (&worker.engine, &worker.store);
            let system = request.system.as_deref();
            Ok(register(
                engine,
                store,
                system,
                &request.documents,
                &cancel,
                |_| {},
            )?)
        })
        .await?;
    drop(on_disconnect);
    let unstored: Vec<&Registered> = registration
        .contexts
        .iter()
        .filter(|c| !c.not_stored_in.is_empty())
        .collect();
    if let Some(first) = unstored.first() {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "{} of {} contexts were encoded but not stored: {} failed; they are kept in \
                 memory only. Retry when the store is fixed",
                unstored.len(),
                registration.contexts.len(),
                first.not_stored_in.join(", ")
            ),
        ));
    }
    let data: Vec<Value> = registration
        .contexts
        .iter()
        .map(|context| {
            json!({
                "id": context.key.to_hex(),
                "object": "context",
                "document": context.document,
                "tokens": context.tokens,
                "prefix_tokens": registration.prefix_tokens,
                "cached": context.already_stored,
            })
        })
        .collect();
    Ok((
        StatusCode::CREATED,
        Json(json!({"object": "list", "data": data})),
    )
        .into_response())
}

/// Every stored context, in every tier: id, size, and which tiers hold it.
async fn list_contexts(State(state): State<Shared>) -> Result<Json<Value>, ApiError> {
    off_thread(move || {
        let mut found: Vec<(ape_store::Listed, Vec<&'static str>)> = Vec::new();
        for tier in state.store.tiers() {
            let listed = tier.list().map_err(|e| {
                store_failure(format!("could not list the {} tier", tier.name()), &e)
            })?;
            for entry in listed {
                match found.iter_mut().find(|(known, _)| known.key == entry.key) {
                    Some((known, tiers)) => {
                        known.tokens = known.tokens.or(entry.tokens);
                        tiers.push(tier.name());
                    }
                    None => found.push((entry, vec![tier.name()])),
                }
            }
        }
        let data: Vec<Value> = found
            .iter()
            .map(|(entry, tiers)| {
                json!({
                    "id": entry.key.to_hex(),
                    "object": "context",
                    "tokens": entry.tokens,
                    "bytes": entry.bytes,
                    "tiers": tiers,
                })
            })
            .collect();
        Ok(Json(json!({"object": "list", "data": data})))
    })
    .await
}

async fn show_context(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    off_thread(move || {
        let entry = stored_context(&state.store, &id)?;
        Ok(Json(json!({
            "id": id,
            "object": "context",
            "tokens": entry.tokens.len(),
            "prefix_tokens": entry.prefix_len,
            "bytes": entry.memory_bytes(),
        })))
    })
    .await
}

async fn delete_context(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    off_thread(move || {
        let key = context_key(&id)?;
        let mut removed = false;
        for tier in state.store.tiers() {
            removed |= tier.remove(&key).map_err(|e| {
                let action = format!(
                    "could not delete context `{id}` from the {} tier",
                    tier.name()
                );
                store_failure(action, &e)
            })?;
        }
        if !removed {
            return Err(
                ApiError::not_found(format!("no stored context `{id}`")).code("context_not_found")
            );
        }
        Ok(Json(
            json!({"id": id, "object": "context.deleted", "deleted": true}),
        ))
    })
    .await
}

async fn health(State(state): State<Shared>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "model": state.model_id,
        "running": state.scheduler.running(),
        "waiting": state.scheduler.waiting(),
    }))
}

async fn metrics(State(state): State<Shared>) -> Response {
    let text = state.metrics.render(
        state.scheduler.waiting(),
        state.scheduler.running(),
        &state.store,
        &state.engine,
        state.started.elapsed(),
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
