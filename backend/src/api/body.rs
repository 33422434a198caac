//! The request body extractor of every JSON route: read with the 1 MiB cap (413 problem), then
//! parsed by the handler after authorization, with errors that name the field at fault.

use std::{future::Future, pin::Pin};

use actix_web::{FromRequest, HttpRequest, dev::Payload, http::header::CONTENT_TYPE, web};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

use super::MAX_BODY;
use crate::error::{ApiError, ApiResult, FieldError};

/// A request body, not yet parsed.
pub struct Body {
    bytes: web::BytesMut,
    json_type: bool,
}

impl Body {
    /// The raw bytes, as received (for routes that check a signature over them).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Parses the body as JSON into `T`; a wrong field is named by its path (`groups[1]`).
    pub fn json<T: DeserializeOwned>(&self) -> ApiResult<T> {
        if !self.json_type {
            return Err(ApiError::bad_request("content-type", "must be application/json"));
        }
        let de = &mut serde_json::Deserializer::from_slice(&self.bytes);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let field = if path.is_empty() || path == "." { "body".to_owned() } else { path };
            let message = match inner.classify() {
                serde_json::error::Category::Data => inner.to_string(),
                _ => format!("invalid JSON: {inner}"),
            };
            ApiError::BadRequest {
                detail: format!("{field}: {message}"),
                errors: vec![FieldError::new(field, message)],
            }
        })
    }

    /// Like [`Body::json`], with `T::default()` for an empty body.
    pub fn json_or_default<T: DeserializeOwned + Default>(&self) -> ApiResult<T> {
        if self.bytes.iter().all(u8::is_ascii_whitespace) { Ok(T::default()) } else { self.json() }
    }
}

fn is_json(req: &HttpRequest) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase())
        .is_some_and(|m| m == "application/json" || (m.starts_with("application/") && m.ends_with("+json")))
}

impl FromRequest for Body {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let declared = req
            .headers()
            .get(actix_web::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let json_type = is_json(req);
        let mut payload = payload.take();
        Box::pin(async move {
            if declared.is_some_and(|n| n > MAX_BODY) {
                return Err(ApiError::PayloadTooLarge(MAX_BODY));
            }
            let mut bytes = web::BytesMut::with_capacity(declared.unwrap_or(0).min(MAX_BODY));
            while let Some(chunk) = payload.next().await {
                let chunk = chunk.map_err(|e| ApiError::bad_request("body", e.to_string()))?;
                if bytes.len() + chunk.len() > MAX_BODY {
                    return Err(ApiError::PayloadTooLarge(MAX_BODY));
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok(Body { bytes, json_type })
        })
    }
}
