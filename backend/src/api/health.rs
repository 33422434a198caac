//! Liveness, readiness and the OpenAPI document.

use actix_web::{HttpResponse, http::Method};

use super::{Routes, State};

pub(super) fn routes(r: &mut Routes<'_>) {
    r.add(Method::GET, "/healthz", healthz);
    r.add(Method::GET, "/readyz", readyz);
    r.add(Method::GET, "/api/v1/openapi.json", openapi_json);
}

#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "the process is up")))]
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, description = "the database answers"), (status = 503, description = "the database does not answer")))]
async fn readyz(state: State) -> HttpResponse {
    match state.store.ping().await {
        Ok(()) => HttpResponse::Ok().json(serde_json::json!({ "status": "ready" })),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            HttpResponse::ServiceUnavailable().json(serde_json::json!({ "status": "unavailable" }))
        }
    }
}

#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "health", responses((status = 200, description = "this document")))]
async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok().json(super::openapi::document())
}
