//! Errors as OpenAI's API shapes them: a status code and
//! `{"error": {"message", "type", "param", "code"}}`, so that OpenAI clients raise the
//! matching exception (400 `BadRequestError`, 404 `NotFoundError`, 429 `RateLimitError`…).

use axum::extract::rejection::JsonRejection;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// The status nginx made common for a request whose client went away first; nobody
/// receives it, but it tells the metrics apart.
pub(crate) const CLIENT_CLOSED_REQUEST: StatusCode = match StatusCode::from_u16(499) {
    Ok(status) => status,
    Err(_) => StatusCode::BAD_REQUEST,
};

/// An error answered to a client, in OpenAI's shape.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    /// The HTTP status; it also gives OpenAI's error `type`.
    pub status: StatusCode,
    /// The explanation sent to the client: what went wrong and, where it can, how to fix it.
    pub message: String,
    /// The request field at fault, where there is one.
    pub param: Option<&'static str>,
    /// A short machine-readable reason, e.g. `context_length_exceeded`.
    pub code: Option<&'static str>,
    /// Seconds to wait before retrying, sent as `Retry-After`.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with `status` and `message`, no `param`, `code` or `Retry-After`.
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400: the request is malformed or asks for what cannot be done.
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404: no such route, model or stored context.
    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    /// Names the request field at fault.
    pub(crate) fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    /// Adds a machine-readable reason.
    pub(crate) fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// No API key, or not the server's.
    pub(crate) fn unauthorized() -> Self {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this server needs an API key: send the one it was started with (--api-key) \
             as `Authorization: Bearer KEY`",
        )
        .code("invalid_api_key")
    }

    /// The queue is full: come back in `seconds`.
    pub(crate) fn busy(seconds: u64) -> Self {
        let mut error = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "the server is busy: every generation slot is taken and the queue is full; \
                 retry after {seconds} s"
            ),
        )
        .code("queue_full");
        error.retry_after = Some(seconds);
        error
    }

    /// OpenAI's `type` for this status.
    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => "invalid_request_error",
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::GATEWAY_TIMEOUT => "timeout_error",
            _ => "server_error",
        }
    }

    /// The error as the JSON object OpenAI clients expect.
    pub(crate) fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// `Retry-After` for a request the KV budget cannot hold now: the running requests free
/// their caches as they finish, typically within seconds.
const KV_MEMORY_RETRY_SECONDS: u64 = 2;

impl From<ape_core::Error> for ApiError {
    fn from(error: ape_core::Error) -> Self {
        use ape_core::Error as E;
        let message = error.to_string();
        match error {
            E::ContextOverflow { .. } | E::ApeWindowOverflow { .. } | E::TextOverflow { .. } => {
                ApiError::bad_request(message)
                    .param("max_tokens")
                    .code("context_length_exceeded")
            }
            E::ApeSetting(_) | E::UnknownMode(_) => ApiError::bad_request(message).param("ape"),
            E::Sampling(_) => ApiError::bad_request(message),
            E::EmptyQuery | E::EmptyPrompt => ApiError::bad_request(message).param("messages"),
            E::Template(_) | E::Tokenizer(_) => ApiError::bad_request(message),
            E::NoChatTemplate => ApiError::bad_request(message).code("no_chat_template"),
            E::KvMemoryTooSmall { .. } => ApiError::bad_request(message).code("kv_memory_exceeded"),
            E::KvMemoryBusy { .. } => {
                let mut error =
                    ApiError::new(StatusCode::TOO_MANY_REQUESTS, message).code("kv_memory_full");
                error.retry_after = Some(KV_MEMORY_RETRY_SECONDS);
                error
            }
            E::Cancelled => ApiError::new(CLIENT_CLOSED_REQUEST, message),
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message),
        }
    }
}

/// A body that is not JSON, not the expected shape, or too large.
impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let status = rejection.status();
        let message = match status {
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                "the request body must be JSON with `Content-Type: application/json`".to_string()
            }
            _ => format!("invalid request body: {}", rejection.body_text()),
        };
        // Every malformed body is the client's fault, as OpenAI answers it. (Its size was
        // bounded before, when the body was read.)
        ApiError::bad_request(message)
    }
}
