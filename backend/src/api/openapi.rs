//! The OpenAPI 3.1 document, generated from the handlers' annotations.

use utoipa::{
    Modify, OpenApi,
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
};

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An access JWT from /api/v1/auth/login, or an API token (slc_...)"))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Sluice API", description = "Multi-tenant task pipelines with approval gates, Cedar authorization and a hash-chained audit log. Errors are RFC 9457 problem documents."),
    modifiers(&Security),
    paths(
        super::health::healthz, super::health::readyz, super::health::openapi_json,
        super::auth::signup, super::auth::login, super::auth::refresh, super::auth::logout, super::auth::me,
        super::auth::accept_invitation, super::auth::jwks,
        super::tenant::get_tenant, super::tenant::list_members, super::tenant::add_member, super::tenant::update_member,
        super::tenant::remove_member, super::tenant::list_groups, super::tenant::create_group,
        super::tenant::get_settings, super::tenant::update_settings,
        super::tokens::list_tokens, super::tokens::create_token, super::tokens::revoke_token,
        super::policies::get_policies, super::policies::put_policies, super::policies::list_versions, super::policies::get_version,
        super::pipelines::list_pipelines, super::pipelines::create_pipeline, super::pipelines::get_pipeline,
        super::pipelines::update_pipeline, super::pipelines::archive_pipeline, super::pipelines::list_versions,
        super::pipelines::get_version, super::pipelines::diff_versions, super::pipelines::restore_version,
        super::audit_log::list_events, super::audit_log::verify, super::audit_log::export,
        super::runs::create_run, super::runs::list_runs, super::runs::get_run, super::runs::cancel_run, super::runs::retry_run,
        super::runs::task_logs,
        super::events::run_events, super::events::tenant_events,
        super::secrets::list_secrets, super::secrets::put_secret, super::secrets::get_secret, super::secrets::delete_secret,
        super::hooks::put_webhook, super::hooks::delete_webhook, super::hooks::receive,
        super::workers::list_workers,
    ),
    components(schemas(crate::error::Problem, crate::error::FieldError))
)]
struct ApiDoc;

/// The OpenAPI document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
