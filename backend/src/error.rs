//! The one error type of the HTTP layer and its one mapping to RFC 9457 problem documents.

use actix_web::{HttpResponse, ResponseError, http::StatusCode};
use serde::Serialize;
use utoipa::ToSchema;

/// One field-level problem in a request.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FieldError {
    /// Where the problem is: a request field (`email`) or a path inside it
    /// (`definition: stages[1].tasks[0].needs[0]`).
    pub field: String,
    /// What is wrong.
    pub message: String,
    /// 1-based line in the submitted text, when the field is a document (YAML, Cedar).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    /// 1-based column in the submitted text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<u32>,
}

impl FieldError {
    /// A problem with a plain field.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into(), line: None, column: None }
    }
}

/// An RFC 9457 problem document.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// Stable identifier of the problem kind, e.g. `urn:sluice:problem:validation`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Short human summary of the kind.
    pub title: &'static str,
    /// HTTP status.
    pub status: u16,
    /// What went wrong in this request.
    pub detail: String,
    /// Field-level problems, when there are any.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

/// Every way a request can fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed (not JSON, wrong types, bad query).
    #[error("{detail}")]
    BadRequest { detail: String, errors: Vec<FieldError> },
    /// No valid credential.
    #[error("authentication required")]
    Unauthorized,
    /// Login failed: unknown user and wrong password answer alike.
    #[error("invalid email or password")]
    InvalidLogin,
    /// Authenticated, but Cedar denied the action.
    #[error("not permitted")]
    Forbidden,
    /// The thing does not exist, or belongs to another tenant.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The request conflicts with the current state (stale version, duplicate name).
    #[error("{detail}")]
    Conflict { detail: String, errors: Vec<FieldError> },
    /// The body is larger than the limit.
    #[error("request body too large (limit {0} bytes)")]
    PayloadTooLarge(usize),
    /// The request is well-formed but invalid.
    #[error("{detail}")]
    Validation { detail: String, errors: Vec<FieldError> },
    /// Too many attempts; retry after the given number of seconds.
    #[error("too many attempts; retry in {0} s")]
    TooManyRequests(u64),
    /// A dependency (the database) is unavailable.
    #[error("service unavailable")]
    Unavailable,
    /// Anything else: logged with its source chain, answered generically.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    /// A 422 for one field.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        let e = FieldError::new(field, message);
        Self::Validation { detail: format!("{}: {}", e.field, e.message), errors: vec![e] }
    }

    /// A 400 for one field.
    pub fn bad_request(field: impl Into<String>, message: impl Into<String>) -> Self {
        let e = FieldError::new(field, message);
        Self::BadRequest { detail: format!("{}: {}", e.field, e.message), errors: vec![e] }
    }

    /// A 409 with a message.
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::Conflict { detail: detail.into(), errors: vec![] }
    }

    fn kind(&self) -> (&'static str, &'static str) {
        match self {
            Self::BadRequest { .. } => ("bad-request", "Bad request"),
            Self::Unauthorized => ("unauthorized", "Authentication required"),
            Self::InvalidLogin => ("invalid-login", "Invalid email or password"),
            Self::Forbidden => ("forbidden", "Not permitted"),
            Self::NotFound(_) => ("not-found", "Not found"),
            Self::Conflict { .. } => ("conflict", "Conflict"),
            Self::PayloadTooLarge(_) => ("payload-too-large", "Request body too large"),
            Self::Validation { .. } => ("validation", "Validation failed"),
            Self::TooManyRequests(_) => ("too-many-requests", "Too many requests"),
            Self::Unavailable => ("unavailable", "Service unavailable"),
            Self::Internal(_) => ("internal", "Internal error"),
        }
    }
}

impl From<sea_orm::DbErr> for ApiError {
    fn from(e: sea_orm::DbErr) -> Self {
        match &e {
            sea_orm::DbErr::ConnectionAcquire(_) | sea_orm::DbErr::Conn(_) => {
                tracing::error!(error = %e, "database unavailable");
                Self::Unavailable
            }
            _ => Self::Internal(e.into()),
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        Self::Internal(e)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized | Self::InvalidLogin => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Validation { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let Self::Internal(e) = self {
            tracing::error!(error = ?e, "request failed");
        }
        let status = self.status_code();
        let (slug, title) = self.kind();
        let errors = match self {
            Self::BadRequest { errors, .. } | Self::Validation { errors, .. } | Self::Conflict { errors, .. } => {
                errors.clone()
            }
            _ => vec![],
        };
        let problem = Problem {
            kind: format!("urn:sluice:problem:{slug}"),
            title,
            status: status.as_u16(),
            detail: self.to_string(),
            errors,
        };
        let mut resp = HttpResponse::build(status);
        resp.content_type("application/problem+json");
        if let Self::TooManyRequests(secs) = self {
            resp.insert_header(("Retry-After", secs.to_string()));
        }
        if matches!(self, Self::Unauthorized | Self::InvalidLogin) {
            resp.insert_header(("WWW-Authenticate", "Bearer"));
        }
        resp.json(problem)
    }
}

/// `Option` → 404 in one call.
pub trait OrNotFound<T> {
    /// Turns `None` into [`ApiError::NotFound`] naming the kind of thing.
    fn or_not_found(self, what: &'static str) -> Result<T, ApiError>;
}

impl<T> OrNotFound<T> for Option<T> {
    fn or_not_found(self, what: &'static str) -> Result<T, ApiError> {
        self.ok_or(ApiError::NotFound(what))
    }
}

/// Result type of the HTTP layer.
pub type ApiResult<T> = Result<T, ApiError>;
