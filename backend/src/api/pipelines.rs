//! Pipelines and their immutable, versioned definitions.

use actix_web::{HttpResponse, http::Method, web};
use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use sluice_domain::{PipelineSpec, SpecErrors, cedar::Action, ids::Slug, parse_definition};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::{Body, PageParams, Routes, State, audit_change, authorize, encode_cursor};
use crate::{
    auth::TenantCtx,
    authz::Resource,
    error::{ApiError, ApiResult, FieldError, OrNotFound},
    store::{Store, is_unique_violation},
};

pub(super) fn routes(r: &mut Routes<'_>) {
    r.add(Method::GET, "/api/v1/t/{tenant}/pipelines", list_pipelines);
    r.add(Method::POST, "/api/v1/t/{tenant}/pipelines", create_pipeline);
    r.add(Method::GET, "/api/v1/t/{tenant}/pipelines/{pipeline}", get_pipeline);
    r.add(Method::PUT, "/api/v1/t/{tenant}/pipelines/{pipeline}", update_pipeline);
    r.add(Method::POST, "/api/v1/t/{tenant}/pipelines/{pipeline}/archive", archive_pipeline);
    r.add(Method::GET, "/api/v1/t/{tenant}/pipelines/{pipeline}/versions", list_versions);
    r.add(Method::GET, "/api/v1/t/{tenant}/pipelines/{pipeline}/versions/{version}", get_version);
    r.add(Method::GET, "/api/v1/t/{tenant}/pipelines/{pipeline}/diff", diff_versions);
    r.add(Method::POST, "/api/v1/t/{tenant}/pipelines/{pipeline}/versions/{version}/restore", restore_version);
}

/// A pipeline in a listing.
#[derive(Debug, Serialize, ToSchema, sea_orm::FromQueryResult)]
pub struct PipelineSummary {
    /// Name (its slug in URLs).
    pub name: String,
    /// Latest version.
    pub latest_version: i64,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last saved.
    pub updated_at: DateTime<Utc>,
    /// Archived, if it is.
    pub archived_at: Option<DateTime<Utc>>,
}

/// A page of pipelines.
#[derive(Debug, Serialize, ToSchema)]
pub struct PipelinePage {
    /// Pipelines, by name.
    pub items: Vec<PipelineSummary>,
    /// Cursor of the next page, if there is one.
    pub next_cursor: Option<String>,
}

/// Listing filters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Include archived pipelines (default false).
    #[serde(default)]
    pub include_archived: bool,
    /// Cursor from `next_cursor`.
    pub cursor: Option<String>,
    /// Page size 1..=200 (default 50).
    pub limit: Option<u64>,
}

#[utoipa::path(get, path = "/api/v1/t/{tenant}/pipelines", tag = "pipelines", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug"), ListQuery),
    responses((status = 200, body = PipelinePage), (status = 403, description = "not permitted")))]
async fn list_pipelines(state: State, ctx: TenantCtx, q: web::Query<ListQuery>) -> ApiResult<web::Json<PipelinePage>> {
    authorize(&state, &ctx, Action::PipelineList, Resource::Tenant).await?;
    let page = PageParams { cursor: q.cursor.clone(), limit: q.limit };
    let limit = page.limit()?;
    let after = page.cursor()?.unwrap_or_default();
    let archived = if q.include_archived { "" } else { " AND archived_at IS NULL" };
    let sql = format!(
        "SELECT name, latest_version, created_at, updated_at, archived_at FROM pipelines \
         WHERE tenant_id = $1 AND name > $2{archived} ORDER BY name LIMIT $3"
    );
    let mut items: Vec<PipelineSummary> = state
        .store
        .query_all(state.store.db(), &sql, vec![ctx.tenant.id.into(), after.into(), (limit as i64 + 1).into()])
        .await?;
    let next_cursor = if items.len() as u64 > limit {
        items.truncate(limit as usize);
        items.last().map(|p| encode_cursor(&p.name))
    } else {
        None
    };
    Ok(web::Json(PipelinePage { items, next_cursor }))
}

/// Create a pipeline.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CreatePipeline {
    /// Name: 2-63 of `a-z`, `0-9`, `-`. Also the pipeline's slug in URLs.
    pub name: String,
    /// The definition, as YAML or JSON text.
    pub definition: String,
    /// Why, up to 1000 characters (default "Created").
    #[serde(default)]
    pub message: Option<String>,
}

/// Save a new version.
#[derive(Debug, Deserialize, ToSchema)]
pub struct UpdatePipeline {
    /// The definition, as YAML or JSON text.
    pub definition: String,
    /// Why, up to 1000 characters.
    #[serde(default)]
    pub message: Option<String>,
    /// The version this edit started from; a save on a stale base answers 409.
    pub base_version: i64,
}

/// One version of a pipeline.
#[derive(Debug, Serialize, ToSchema)]
pub struct PipelineVersionView {
    /// Pipeline name.
    pub name: String,
    /// Version number, from 1.
    pub version: i64,
    /// The latest version of the pipeline.
    pub latest_version: i64,
    /// Canonical YAML of the definition.
    pub definition: String,
    /// The text as it was submitted.
    pub source: String,
    /// The parsed definition.
    #[schema(value_type = Object)]
    pub spec: serde_json::Value,
    /// SHA-256 of the canonical YAML.
    pub sha256: String,
    /// Why it was saved.
    pub message: String,
    /// Who saved it.
    pub author: String,
    /// When.
    pub created_at: DateTime<Utc>,
    /// Whether the pipeline is archived.
    pub archived: bool,
}

#[derive(sea_orm::FromQueryResult)]
struct PipelineRow {
    id: Uuid,
    name: String,
    latest_version: i64,
    archived_at: Option<DateTime<Utc>>,
}

#[derive(sea_orm::FromQueryResult)]
struct VersionRow {
    version: i64,
    definition: String,
    source: String,
    sha256: String,
    message: String,
    author: String,
    created_at: DateTime<Utc>,
}

fn spec_error(e: SpecErrors) -> ApiError {
    let errors: Vec<FieldError> = e
        .errors()
        .iter()
        .map(|s| FieldError {
            field: if s.path.is_empty() { "definition".into() } else { format!("definition.{}", s.path) },
            message: s.message.clone(),
            line: s.line,
            column: s.column,
        })
        .collect();
    let first = e.errors().first().map(ToString::to_string).unwrap_or_default();
    ApiError::Validation { detail: format!("invalid pipeline definition: {first}"), errors }
}

fn parse(name: &str, text: &str) -> ApiResult<PipelineSpec> {
    let spec = parse_definition(text).map_err(spec_error)?;
    if let Some(n) = &spec.name
        && n.as_str() != name
    {
        return Err(ApiError::invalid(
            "definition.name",
            format!("is {:?} but the pipeline is named {name:?}", n.as_str()),
        ));
    }
    Ok(spec)
}

fn message(m: Option<&str>, default: &str) -> ApiResult<String> {
    let m = m.map(str::trim).filter(|m| !m.is_empty()).unwrap_or(default);
    if m.chars().count() > 1000 {
        return Err(ApiError::invalid("message", "must be at most 1000 characters"));
    }
    Ok(m.to_owned())
}

async fn load_pipeline(
    store: &Store,
    conn: &impl sea_orm::ConnectionTrait,
    tenant: Uuid,
    name: &str,
) -> ApiResult<PipelineRow> {
    store
        .query_one(
            conn,
            "SELECT id, name, latest_version, archived_at FROM pipelines WHERE tenant_id = $1 AND name = $2",
            vec![tenant.into(), name.into()],
        )
        .await?
        .or_not_found("pipeline")
}

async fn load_version(store: &Store, tenant: Uuid, pipeline: Uuid, version: i64) -> ApiResult<VersionRow> {
    store
        .query_one(
            store.db(),
            "SELECT version, definition, source, sha256, message, author, created_at FROM pipeline_versions \
             WHERE tenant_id = $1 AND pipeline_id = $2 AND version = $3",
            vec![tenant.into(), pipeline.into(), version.into()],
        )
        .await?
        .or_not_found("pipeline version")
}

fn view(p: &PipelineRow, v: VersionRow) -> PipelineVersionView {
    let spec = parse_definition(&v.definition).ok().and_then(|s| serde_json::to_value(s).ok()).unwrap_or_default();
    PipelineVersionView {
        name: p.name.clone(),
        version: v.version,
        latest_version: p.latest_version,
        definition: v.definition,
        source: v.source,
        spec,
        sha256: v.sha256,
        message: v.message,
        author: v.author,
        created_at: v.created_at,
        archived: p.archived_at.is_some(),
    }
}

/// Loads a pipeline that is about to get a new version and authorizes that. An archived
/// pipeline answers 409 (a state conflict) rather than the 403 that the default
/// `archived-pipelines-read-only` policy would give; that policy stays as a second line of defence.
async fn load_for_update(
    state: &State,
    ctx: &TenantCtx,
    name: &str,
) -> ApiResult<(PipelineRow, crate::authz::Decision)> {
    let p = load_pipeline(&state.store, state.store.db(), ctx.tenant.id, name).await?;
    if p.archived_at.is_some() {
        return Err(ApiError::conflict("the pipeline is archived"));
    }
    let resource = Resource::Pipeline { name: &p.name, archived: false };
    let decision = authorize(state, ctx, Action::PipelineUpdate, resource).await?;
    Ok((p, decision))
}

#[allow(clippy::too_many_arguments)]
async fn insert_version(
    state: &State,
    conn: &impl sea_orm::ConnectionTrait,
    ctx: &TenantCtx,
    pipeline: Uuid,
    version: i64,
    spec: &PipelineSpec,
    source: &str,
    message: &str,
) -> ApiResult<VersionRow> {
    let now = Utc::now().trunc_subsecs(6); // as stored (PostgreSQL keeps microseconds)
    let row = VersionRow {
        version,
        definition: spec.canonical_yaml(),
        source: source.to_owned(),
        sha256: spec.content_hash(),
        message: message.to_owned(),
        author: ctx.principal.actor().label,
        created_at: now,
    };
    state
        .store
        .execute(conn,
            "INSERT INTO pipeline_versions (tenant_id, pipeline_id, version, definition, source, sha256, message, author_id, author, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            vec![ctx.tenant.id.into(), pipeline.into(), version.into(), row.definition.clone().into(), row.source.clone().into(),
                 row.sha256.clone().into(), row.message.clone().into(), ctx.principal.id.into(), row.author.clone().into(), now.into()])
        .await
        .map_err(|e| if is_unique_violation(&e) { ApiError::conflict(format!("version {version} was saved concurrently; reload and retry")) } else { e.into() })?;
    Ok(row)
}

#[utoipa::path(post, path = "/api/v1/t/{tenant}/pipelines", tag = "pipelines", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug")), request_body = CreatePipeline,
    responses((status = 201, body = PipelineVersionView), (status = 403, description = "not permitted"),
              (status = 409, description = "name taken"), (status = 422, description = "invalid definition, each error with its path and line", body = crate::error::Problem)))]
async fn create_pipeline(state: State, ctx: TenantCtx, body: Body) -> ApiResult<HttpResponse> {
    let decision = authorize(&state, &ctx, Action::PipelineCreate, Resource::Tenant).await?;
    let body: CreatePipeline = body.json()?;
    Slug::parse(&body.name).map_err(|e| ApiError::invalid("name", e.to_string()))?;
    let msg = message(body.message.as_deref(), "Created")?;
    let spec = parse(&body.name, &body.definition)?;
    let store = &state.store;
    let txn = store.write().await?;
    let id = Uuid::now_v7();
    let now = Utc::now().trunc_subsecs(6); // as stored (PostgreSQL keeps microseconds)
    store
        .execute(&*txn,
            "INSERT INTO pipelines (id, tenant_id, name, latest_version, created_by, created_at, updated_at, archived_at) \
             VALUES ($1, $2, $3, 1, $4, $5, $5, NULL)",
            vec![id.into(), ctx.tenant.id.into(), body.name.clone().into(), ctx.principal.id.into(), now.into()])
        .await
        .map_err(|e| if is_unique_violation(&e) {
            ApiError::Conflict { detail: format!("a pipeline named {} exists", body.name), errors: vec![FieldError::new("name", "already exists")] }
        } else { e.into() })?;
    let v = insert_version(&state, &*txn, &ctx, id, 1, &spec, &body.definition, &msg).await?;
    audit_change(
        &state,
        &*txn,
        &ctx,
        &decision,
        Action::PipelineCreate,
        Some(&body.name),
        Some(1),
        serde_json::json!({ "message": msg, "sha256": v.sha256 }),
    )
    .await?;
    txn.commit().await?;
    let p = PipelineRow { id, name: body.name.clone(), latest_version: 1, archived_at: None };
    Ok(HttpResponse::Created().json(view(&p, v)))
}

#[utoipa::path(get, path = "/api/v1/t/{tenant}/pipelines/{pipeline}", tag = "pipelines", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug"), ("pipeline" = String, Path, description = "pipeline name")),
    responses((status = 200, body = PipelineVersionView), (status = 404, description = "no such pipeline")))]
async fn get_pipeline(
    state: State,
    ctx: TenantCtx,
    path: web::Path<(String, String)>,
) -> ApiResult<web::Json<PipelineVersionView>> {
    let p = load_pipeline(&state.store, state.store.db(), ctx.tenant.id, &path.1).await?;
    authorize(
        &state,
        &ctx,
        Action::PipelineRead,
        Resource::Pipeline { name: &p.name, archived: p.archived_at.is_some() },
    )
    .await?;
    let v = load_version(&state.store, ctx.tenant.id, p.id, p.latest_version).await?;
    Ok(web::Json(view(&p, v)))
}

#[utoipa::path(put, path = "/api/v1/t/{tenant}/pipelines/{pipeline}", tag = "pipelines", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug"), ("pipeline" = String, Path, description = "pipeline name")),
    request_body = UpdatePipeline,
    responses((status = 200, body = PipelineVersionView), (status = 404, description = "no such pipeline"),
              (status = 409, description = "stale base_version or archived"), (status = 422, body = crate::error::Problem)))]
async fn update_pipeline(
    state: State,
    ctx: TenantCtx,
    path: web::Path<(String, String)>,
    body: Body,
) -> ApiResult<web::Json<PipelineVersionView>> {
    let (p, decision) = load_for_update(&state, &ctx, &path.1).await?;
    let body: UpdatePipeline = body.json()?;
    let msg = message(body.message.as_deref(), "Updated")?;
    let spec = parse(&p.name, &body.definition)?;
    save_version(
        &state,
        &ctx,
        &decision,
        p,
        body.base_version,
        &spec,
        &body.definition,
        &msg,
        Action::PipelineUpdate,
        None,
    )
    .await
    .map(web::Json)
}

#[allow(clippy::too_many_arguments)]
async fn save_version(
    state: &State,
    ctx: &TenantCtx,
    decision: &crate::authz::Decision,
    p: PipelineRow,
    base: i64,
    spec: &PipelineSpec,
    source: &str,
    msg: &str,
    action: Action,
    restored_from: Option<i64>,
) -> ApiResult<PipelineVersionView> {
    if p.archived_at.is_some() {
        return Err(ApiError::conflict("the pipeline is archived"));
    }
    let store = &state.store;
    let txn = store.write().await?;
    let next = base + 1;
    let moved = store
        .execute(&*txn,
            "UPDATE pipelines SET latest_version = $3, updated_at = $4 WHERE id = $1 AND latest_version = $2 AND archived_at IS NULL",
            vec![p.id.into(), base.into(), next.into(), Utc::now().into()])
        .await?;
    if moved != 1 {
        return Err(ApiError::Conflict {
            detail: format!("version {base} is not the latest version; reload, merge and save again"),
            errors: vec![FieldError::new("base_version", "stale")],
        });
    }
    let v = insert_version(state, &*txn, ctx, p.id, next, spec, source, msg).await?;
    audit_change(
        state,
        &*txn,
        ctx,
        decision,
        action,
        Some(&p.name),
        Some(next),
        serde_json::json!({ "message": msg, "sha256": v.sha256, "base_version": base, "restored_from": restored_from }),
    )
    .await?;
    txn.commit().await?;
    let p = PipelineRow { latest_version: next, ..p };
    Ok(view(&p, v))
}

#[utoipa::path(post, path = "/api/v1/t/{tenant}/pipelines/{pipeline}/archive", tag = "pipelines", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug"), ("pipeline" = String, Path, description = "pipeline name")),
    responses((status = 200, body = PipelineSummary), (status = 404, description = "no such pipeline")))]
async fn archive_pipeline(
    state: State,
    ctx: TenantCtx,
    path: web::Path<(String, String)>,
) -> ApiResult<web::Json<PipelineSummary>> {
    let store = &state.store;
    let p = load_pipeline(store, store.db(), ctx.tenant.id, &path.1).await?;
    let decision = authorize(
        &state,
        &ctx,
        Action::PipelineArchive,
        Resource::Pipeline { name: &p.name, archived: p.archived_at.is_some() },
    )
    .await?;
    let txn = store.write().await?;
    let n = store
        .execute(
            &*txn,
            "UPDATE pipelines SET archived_at = $2 WHERE id = $1 AND archived_at IS NULL",
            vec![p.id.into(), Utc::now().into()],
        )
        .await?;
    if n == 1 {
        audit_change(
            &state,
            &*txn,
            &ctx,
            &decision,
            Action::PipelineArchive,
            Some(&p.name),
            Some(p.latest_version),
            serde_json::json!({}),
        )
        .await?;
    }
    let s: PipelineSummary = store
        .query_one(
            &*txn,
            "SELECT name, latest_version, created_at, updated_at, archived_at FROM pipelines WHERE id = $1",
            vec![p.id.into()],
        )
        .await?
        .or_not_found("pipeline")?;
    txn.commit().await?;
    Ok(web::Json(s))
}

/// A version in a listing.
#[derive(Debug, Serialize, ToSchema, sea_orm::FromQueryResult)]
pub struct VersionSummary {
    /// Version.
    pub version: i64,
    /// SHA-256 of the canonical YAML.
    pub sha256: String,
    /// Why.
    pub message: String,
    /// Who.
    pub author: String,
    /// When.
    pub created_at: DateTime<Utc>,
}

#[utoipa::path(get, path = "/api/v1/t/{tenant}/pipelines/{pipeline}/versions", tag = "pipelines", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug"), ("pipeline" = String, Path, description = "pipeline name")),
    responses((status = 200, body = Vec<VersionSummary>), (status = 404, description = "no such pipeline")))]
async fn list_versions(
    state: State,
    ctx: TenantCtx,
    path: web::Path<(String, String)>,
) -> ApiResult<web::Json<Vec<VersionSummary>>> {
    let store = &state.store;
    let p = load_pipeline(store, store.db(), ctx.tenant.id, &path.1).await?;
    authorize(
        &state,
        &ctx,
        Action::PipelineRead,
        Resource::Pipeline { name: &p.name, archived: p.archived_at.is_some() },
    )
    .await?;
    let rows = store
        .query_all(store.db(),
            "SELECT version, sha256, message, author, created_at FROM pipeline_versions WHERE tenant_id = $1 AND pipeline_id = $2 ORDER BY version DESC",
            vec![ctx.tenant.id.into(), p.id.into()])
        .await?;
    Ok(web::Json(rows))
}

#[utoipa::path(get, path = "/api/v1/t/{tenant}/pipelines/{pipeline}/versions/{version}", tag = "pipelines", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug"), ("pipeline" = String, Path, description = "pipeline name"),
           ("version" = i64, Path, description = "version number")),
    responses((status = 200, body = PipelineVersionView), (status = 404, description = "no such pipeline or version")))]
async fn get_version(
    state: State,
    ctx: TenantCtx,
    path: web::Path<(String, String, i64)>,
) -> ApiResult<web::Json<PipelineVersionView>> {
    let store = &state.store;
    let p = load_pipeline(store, store.db(), ctx.tenant.id, &path.1).await?;
    authorize(
        &state,
        &ctx,
        Action::PipelineRead,
        Resource::Pipeline { name: &p.name, archived: p.archived_at.is_some() },
    )
    .await?;
    let v = load_version(store, ctx.tenant.id, p.id, path.2).await?;
    Ok(web::Json(view(&p, v)))
}

/// Which versions to compare.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DiffQuery {
    /// The older version.
    pub from: i64,
    /// The newer version.
    pub to: i64,
}

/// The difference between two versions.
#[derive(Debug, Serialize, ToSchema)]
pub struct DiffView {
    /// From version.
    pub from: i64,
    /// To version.
    pub to: i64,
    /// Unified diff of the canonical YAML.
    pub unified: String,
    /// Stage ids added, removed, changed.
    #[schema(value_type = Object)]
    pub stages: serde_json::Value,
    /// Task ids added, removed, changed.
    #[schema(value_type = Object)]
    pub tasks: serde_json::Value,
}

#[utoipa::path(get, path = "/api/v1/t/{tenant}/pipelines/{pipeline}/diff", tag = "pipelines", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug"), ("pipeline" = String, Path, description = "pipeline name"), DiffQuery),
    responses((status = 200, body = DiffView), (status = 404, description = "no such pipeline or version")))]
async fn diff_versions(
    state: State,
    ctx: TenantCtx,
    path: web::Path<(String, String)>,
    q: web::Query<DiffQuery>,
) -> ApiResult<web::Json<DiffView>> {
    let store = &state.store;
    let p = load_pipeline(store, store.db(), ctx.tenant.id, &path.1).await?;
    authorize(
        &state,
        &ctx,
        Action::PipelineRead,
        Resource::Pipeline { name: &p.name, archived: p.archived_at.is_some() },
    )
    .await?;
    let a = load_version(store, ctx.tenant.id, p.id, q.from).await?;
    let b = load_version(store, ctx.tenant.id, p.id, q.to).await?;
    let sa = parse_definition(&a.definition)
        .map_err(|e| anyhow::anyhow!("stored version {} does not parse: {e}", q.from))?;
    let sb =
        parse_definition(&b.definition).map_err(|e| anyhow::anyhow!("stored version {} does not parse: {e}", q.to))?;
    let d = sluice_domain::diff::diff(&sa, &sb, &format!("v{}", q.from), &format!("v{}", q.to));
    Ok(web::Json(DiffView {
        from: q.from,
        to: q.to,
        unified: d.unified,
        stages: serde_json::to_value(d.stages).unwrap_or_default(),
        tasks: serde_json::to_value(d.tasks).unwrap_or_default(),
    }))
}

/// Restore an old version as a new one.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct RestoreRequest {
    /// Why (default "Restored version N").
    pub message: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/t/{tenant}/pipelines/{pipeline}/versions/{version}/restore", tag = "pipelines", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug"), ("pipeline" = String, Path, description = "pipeline name"),
           ("version" = i64, Path, description = "version to restore")),
    request_body = RestoreRequest,
    responses((status = 201, body = PipelineVersionView), (status = 404, description = "no such pipeline or version"), (status = 409, description = "archived or saved concurrently")))]
async fn restore_version(
    state: State,
    ctx: TenantCtx,
    path: web::Path<(String, String, i64)>,
    body: Body,
) -> ApiResult<HttpResponse> {
    let store = &state.store;
    let (p, decision) = load_for_update(&state, &ctx, &path.1).await?;
    let req: RestoreRequest = body.json_or_default()?;
    let old = load_version(store, ctx.tenant.id, p.id, path.2).await?;
    let msg = message(req.message.as_deref(), &format!("Restored version {}", path.2))?;
    let spec = parse_definition(&old.definition).map_err(|e| anyhow::anyhow!("stored version does not parse: {e}"))?;
    let base = p.latest_version;
    let v =
        save_version(&state, &ctx, &decision, p, base, &spec, &old.source, &msg, Action::PipelineUpdate, Some(path.2))
            .await?;
    Ok(HttpResponse::Created().json(v))
}
