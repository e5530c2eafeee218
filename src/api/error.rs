//! The one place errors become HTTP: every error is the OpenAI envelope
//! `{"error":{"message","type","param","code"}}` with the request id header when there is one;
//! on `/v1/messages` it is Anthropic's `{"type":"error","error":{"type","message"}}` with the
//! code as `error.type`.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: String,
    pub message: String,
    pub param: Option<String>,
    pub request_id: Option<String>,
    pub retry_after_s: Option<u64>,
    /// Written in Anthropic's envelope (the error of a `/v1/messages` request).
    pub anthropic: bool,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            kind,
            code: code.to_string(),
            message: message.into(),
            param: None,
            request_id: None,
            retry_after_s: None,
            anthropic: false,
        }
    }
    pub fn invalid(code: &str, message: impl Into<String>) -> Self {
        ApiError::new(400, "invalid_request_error", code, message)
    }
    pub fn invalid_value(param: &str, message: impl Into<String>) -> Self {
        let mut e = ApiError::invalid("invalid_value", message);
        e.param = Some(param.to_string());
        e
    }
    pub fn missing_field(param: &str) -> Self {
        let mut e = ApiError::invalid("missing_field", format!("missing required field '{param}'"));
        e.param = Some(param.to_string());
        e
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError::new(401, "invalid_request_error", "invalid_api_key", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(404, "invalid_request_error", "not_found", message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(500, "server_error", "internal_error", message)
    }
    pub fn with_request_id(mut self, id: &str) -> Self {
        self.request_id = Some(id.to_string());
        self
    }

    /// The same error in Anthropic's envelope.
    pub fn anthropic(mut self) -> Self {
        self.anthropic = true;
        self
    }

    pub fn body(&self) -> serde_json::Value {
        if self.anthropic {
            return json!({"type": "error", "error": {
                "type": self.code,
                "message": self.message,
            }});
        }
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }
    fn error_response(&self) -> HttpResponse {
        let mut r = HttpResponse::build(self.status);
        if let Some(id) = &self.request_id {
            r.insert_header(("x-tollgate-request-id", id.as_str()));
        }
        if let Some(s) = self.retry_after_s {
            r.insert_header(("retry-after", s.to_string()));
        }
        r.content_type("application/json").json(self.body())
    }
}
