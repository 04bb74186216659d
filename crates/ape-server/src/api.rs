//! The request bodies the server accepts, and how each becomes model work.
//!
//! Fields follow OpenAI's API. ape adds two to chat and text completions:
//! - `documents`: the texts (or ids of contexts stored with `POST /v1/contexts`) to answer
//!   from; each is one context, encoded once and kept in the context store;
//! - `ape`: `{"mode": "ape" | "parallel" | "sequential", "temperature", "scale",
//!   "recompute"}`, each left out taken from the engine's APE defaults.
//!
//! and to text completions a third, `prefix`: the text before the documents that every
//! one of them is encoded after (an instruction, say). The prompt follows the documents,
//! so few-shot prompts work as base models read them: demonstrations as documents, the
//! prompt ending where the next label goes.
//!
//! Fields OpenAI defines that ape does not implement are refused when set to anything but
//! their neutral value, rather than silently ignored.

use ape_core::engine::chat::Message;
use ape_core::engine::generate::{Cancel, GenerateOptions};
use ape_core::engine::sampler::SamplingParams;
use ape_core::engine::{Engine, Mode, Prompt};
use ape_store::{Key, Store};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

/// Read one view of a request body: the fields one of the structs here knows, the others
/// left to the other view. A field of the wrong type is a 400 that names it.
pub(crate) fn parse<T: DeserializeOwned>(body: &Value) -> Result<T, ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object of the request's fields",
        ));
    }
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let message = format!("invalid request body: `{path}`: {}", e.inner());
        ApiError::bad_request(message)
    })
}

/// The sampling and streaming fields chat and text completions share, read from the same
/// body as the fields particular to each.
#[derive(Debug, Deserialize)]
pub(crate) struct CommonFields {
    pub model: Option<String>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub stop: Option<Stop>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logprobs: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or a list of strings")]
pub(crate) enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub documents: Vec<DocumentRef>,
    pub ape: Option<ApeOptions>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ChatMessage {
    pub role: String,
    pub content: Content,
}

/// A message's content: a string, or a list of parts of which ape reads the text ones.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or a list of content parts")]
pub(crate) enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub(crate) struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// A document: its text, or `{"id": ...}` naming a stored context, or `{"text": ...}`.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "a document: a string, {\"id\": ID} or {\"text\": TEXT}"
)]
pub(crate) enum DocumentRef {
    Text(String),
    Stored { id: String },
    Inline { text: String },
}

#[derive(Debug, Deserialize)]
pub(crate) struct ApeOptions {
    pub mode: Option<String>,
    pub temperature: Option<f32>,
    pub scale: Option<f32>,
    /// Share of the context tokens to recompute (0 to 1).
    pub recompute: Option<f32>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct CompletionRequest {
    pub prompt: PromptText,
    #[serde(default)]
    pub documents: Vec<DocumentRef>,
    pub prefix: Option<String>,
    pub ape: Option<ApeOptions>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or a list of one string")]
pub(crate) enum PromptText {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub(crate) struct RegisterContexts {
    pub documents: Vec<String>,
    /// The system message the documents will be asked about under; contexts are encoded
    /// after the prefix it makes, and a chat with another system message encodes them again.
    pub system: Option<String>,
}

/// What the model is asked to do for one request.
pub(crate) enum Work {
    /// Continue these tokens.
    Plain(Vec<u32>),
    /// Answer over contexts.
    Answer(Prompt, Mode),
}

/// A request checked and turned into tokens, ready to be scheduled.
pub(crate) struct Prepared {
    pub work: Work,
    pub options: GenerateOptions,
    pub stream: bool,
    pub include_usage: bool,
}

impl Content {
    fn text(&self) -> Result<String, ApiError> {
        match self {
            Content::Text(text) => Ok(text.clone()),
            Content::Parts(parts) => parts
                .iter()
                .map(|part| match (part.kind.as_str(), &part.text) {
                    ("text", Some(text)) => Ok(text.as_str()),
                    (kind, _) => Err(ApiError::bad_request(format!(
                        "message content part of type `{kind}` is not supported; ape reads \
                         only text parts"
                    ))
                    .param("messages")),
                })
                .collect(),
        }
    }
}

impl CommonFields {
    /// Check the fields against what ape supports and the served model; the options they
    /// ask for.
    pub(crate) fn options(&self, served_model: &str) -> Result<GenerateOptions, ApiError> {
        if let Some(model) = &self.model {
            if model != served_model {
                return Err(ApiError::not_found(format!(
                    "model `{model}` is not served here; this server serves `{served_model}` \
                     (see GET /v1/models)"
                ))
                .param("model")
                .code("model_not_found"));
            }
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(unsupported("n", "only one choice per request (n = 1)"));
        }
        if self.presence_penalty.is_some_and(|p| p != 0.0) {
            return Err(unsupported("presence_penalty", "no presence penalty"));
        }
        if self.frequency_penalty.is_some_and(|p| p != 0.0) {
            return Err(unsupported("frequency_penalty", "no frequency penalty"));
        }
        if self.logprobs == Some(true) {
            return Err(unsupported("logprobs", "no log-probabilities in answers"));
        }
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(0), _) | (None, Some(0)) => {
                return Err(
                    ApiError::bad_request("max_tokens must be at least 1").param("max_tokens")
                )
            }
            (Some(n), _) | (None, Some(n)) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            (None, None) => None,
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(list)) => list.clone(),
        };
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::bad_request("stop strings must not be empty").param("stop"));
        }
        let sampling = SamplingParams {
            // OpenAI's defaults: temperature 1, nucleus off.
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(1.0),
            seed: self.seed.unwrap_or_else(rand::random),
            ..SamplingParams::default()
        };
        sampling.validate()?;
        Ok(GenerateOptions {
            max_tokens,
            stop,
            sampling,
            cancel: Cancel::new(),
        })
    }

    fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|options| options.include_usage)
    }
}

fn unsupported(param: &'static str, what: &str) -> ApiError {
    ApiError::bad_request(format!(
        "`{param}` is not supported: ape generates {what}; leave it out"
    ))
    .param(param)
}

/// A completion request's own fields, which become model work once tokenized (stored
/// documents read from `store`) and checked against the model's window.
pub(crate) trait Completion: DeserializeOwned + Send + 'static {
    fn prepare(
        &self,
        common: &CommonFields,
        options: GenerateOptions,
        engine: &Engine,
        store: &Store,
    ) -> Result<Prepared, ApiError>;
}

/// The message roles the chat templates know.
const ROLES: [&str; 3] = ["system", "user", "assistant"];

impl Completion for ChatRequest {
    fn prepare(
        &self,
        common: &CommonFields,
        options: GenerateOptions,
        engine: &Engine,
        store: &Store,
    ) -> Result<Prepared, ApiError> {
        let messages = self
            .messages
            .iter()
            .map(|m| {
                if !ROLES.contains(&m.role.as_str()) {
                    return Err(ApiError::bad_request(format!(
                        "unknown message role `{}`: use one of {}",
                        m.role,
                        ROLES.join(", ")
                    ))
                    .param("messages"));
                }
                Ok(Message::new(&m.role, m.content.text()?))
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        let Some(last) = messages.last() else {
            return Err(ApiError::bad_request("messages must not be empty").param("messages"));
        };
        let work = if self.documents.is_empty() {
            refuse_without_documents("ape", self.ape.is_some())?;
            plain(engine, engine.conversation_prompt(&messages)?, &options)?
        } else {
            if last.role != "user" {
                return Err(ApiError::bad_request(
                    "with `documents`, the last message must be the user's question",
                )
                .param("messages"));
            }
            let turns = &messages[..messages.len() - 1];
            let prompt = engine.split_conversation(turns, &[] as &[&str], &last.content)?;
            answer(
                engine,
                store,
                prompt,
                &self.documents,
                self.ape.as_ref(),
                &options,
            )?
        };
        Ok(Prepared {
            work,
            options,
            stream: common.stream,
            include_usage: common.include_usage(),
        })
    }
}

/// 400 for a field (`ape`, `prefix`) set on a request without documents.
fn refuse_without_documents(field: &'static str, set: bool) -> Result<(), ApiError> {
    if set {
        return Err(ApiError::bad_request(format!(
            "`{field}` needs `documents` to apply to; add documents or leave `{field}` out"
        ))
        .param(field));
    }
    Ok(())
}

/// `prompt` (prefix and query, no contexts yet) answered over `documents` in the mode
/// `ape` asks for, once it is known to fit the window.
fn answer(
    engine: &Engine,
    store: &Store,
    mut prompt: Prompt,
    documents: &[DocumentRef],
    ape: Option<&ApeOptions>,
    options: &GenerateOptions,
) -> Result<Work, ApiError> {
    let mut contexts = Vec::new();
    for document in documents {
        contexts.extend(document_contexts(engine, store, document, &options.cancel)?);
    }
    prompt.contexts = engine.group_contexts(contexts);
    let mode = engine.ape_defaults().mode(
        &prompt.contexts,
        ape.and_then(|a| a.mode.as_deref()),
        ape.and_then(|a| a.temperature),
        ape.and_then(|a| a.scale),
        ape.and_then(|a| a.recompute),
    )?;
    engine.check_window(&prompt, mode, options.max_tokens)?;
    Ok(Work::Answer(prompt, mode))
}

/// Plain generation from `tokens`, once they are known to fit the window.
fn plain(engine: &Engine, tokens: Vec<u32>, options: &GenerateOptions) -> Result<Work, ApiError> {
    let prompt = Prompt {
        prefix: tokens,
        contexts: Vec::new(),
        query: Vec::new(),
    };
    engine.check_window(&prompt, Mode::Sequential, options.max_tokens)?;
    Ok(Work::Plain(prompt.prefix))
}

/// A document's contexts: its text's (several if it is long), or the stored one it names.
fn document_contexts(
    engine: &Engine,
    store: &Store,
    document: &DocumentRef,
    cancel: &Cancel,
) -> Result<Vec<Vec<u32>>, ApiError> {
    match document {
        DocumentRef::Text(text) | DocumentRef::Inline { text } => {
            Ok(engine.document_contexts(text, cancel)?)
        }
        DocumentRef::Stored { id } => Ok(vec![stored_context(store, id)?.tokens]),
    }
}

/// The store key a context id spells, or 400.
pub(crate) fn context_key(id: &str) -> Result<Key, ApiError> {
    Key::from_hex(id).ok_or_else(|| {
        ApiError::bad_request(format!(
            "`{id}` is not a context id; ids are the 64 hexadecimal digits POST /v1/contexts returns"
        ))
        .param("documents")
        .code("invalid_context_id")
    })
}

/// The stored context `id`, or 404.
pub(crate) fn stored_context(store: &Store, id: &str) -> Result<ape_store::Entry, ApiError> {
    let key = context_key(id)?;
    store.lookup(&key).ok_or_else(|| {
        ApiError::not_found(format!(
            "no stored context `{id}`; register the document with POST /v1/contexts, or send \
             its text instead"
        ))
        .param("documents")
        .code("context_not_found")
    })
}

impl Completion for CompletionRequest {
    fn prepare(
        &self,
        common: &CommonFields,
        options: GenerateOptions,
        engine: &Engine,
        store: &Store,
    ) -> Result<Prepared, ApiError> {
        let text = match &self.prompt {
            PromptText::One(text) => text,
            PromptText::Many(list) if list.len() == 1 => &list[0],
            PromptText::Many(_) => {
                return Err(unsupported(
                    "prompt",
                    "one completion per request; send one prompt string",
                ))
            }
        };
        if text.is_empty() {
            return Err(ApiError::bad_request("the prompt is empty").param("prompt"));
        }
        let work = if self.documents.is_empty() {
            refuse_without_documents("ape", self.ape.is_some())?;
            refuse_without_documents("prefix", self.prefix.is_some())?;
            plain(engine, engine.encode_prompt(text)?, &options)?
        } else {
            let prefix = self.prefix.as_deref().unwrap_or_default();
            let prompt = engine.split_text(prefix, &[] as &[&str], text)?;
            answer(
                engine,
                store,
                prompt,
                &self.documents,
                self.ape.as_ref(),
                &options,
            )?
        };
        Ok(Prepared {
            work,
            options,
            stream: common.stream,
            include_usage: common.include_usage(),
        })
    }
}
