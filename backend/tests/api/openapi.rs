//! The OpenAPI document and the route table describe the same API.

use std::collections::BTreeSet;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use sluice_backend::api::{openapi::document, route_table};

use crate::helpers::*;

const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

fn doc_json() -> Value {
    serde_json::to_value(document()).unwrap()
}

/// Every (method, path) the document declares.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths object") {
        for m in METHODS {
            if item.get(m).is_some() {
                out.insert((m.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

fn served() -> BTreeSet<(String, String)> {
    route_table().into_iter().map(|r| (r.method.as_str().to_owned(), r.path.to_owned())).collect()
}

#[test]
fn route_table_has_no_duplicates() {
    let table = route_table();
    assert!(table.len() >= 30, "suspiciously small route table: {table:?}");
    assert_eq!(served().len(), table.len(), "duplicate routes in {table:?}");
}

#[test]
fn every_route_is_documented_and_every_documented_route_is_served() {
    let doc = doc_json();
    let documented = documented(&doc);
    let served = served();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let phantom: Vec<_> = documented.difference(&served).collect();
    assert!(undocumented.is_empty(), "served but not in the OpenAPI document: {undocumented:?}");
    assert!(phantom.is_empty(), "in the OpenAPI document but not served: {phantom:?}");
}

#[test]
fn tenant_routes_declare_not_found_or_forbidden_and_bearer_security() {
    let doc = doc_json();
    let scheme = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!(scheme["type"], "http", "{scheme}");
    assert_eq!(scheme["scheme"].as_str().map(str::to_lowercase).as_deref(), Some("bearer"), "{scheme}");
    let mut problems = vec![];
    let mut checked = 0;
    for r in route_table().into_iter().filter(|r| r.path.starts_with("/api/v1/t/{tenant}")) {
        checked += 1;
        let op = &doc["paths"][r.path][r.method.as_str().to_lowercase()];
        let responses = op["responses"].as_object().cloned().unwrap_or_default();
        if !responses.contains_key("404") && !responses.contains_key("403") {
            problems.push(format!(
                "{} {}: no 403/404 response (has {:?})",
                r.method,
                r.path,
                responses.keys().collect::<Vec<_>>()
            ));
        }
        let bearer = op["security"].as_array().is_some_and(|s| s.iter().any(|req| req.get("bearer").is_some()));
        if !bearer {
            problems.push(format!("{} {}: no bearer security ({})", r.method, r.path, op["security"]));
        }
        let tenant_param =
            op["parameters"].as_array().is_some_and(|ps| ps.iter().any(|p| p["name"] == "tenant" && p["in"] == "path"));
        if !tenant_param {
            problems.push(format!("{} {}: no `tenant` path parameter", r.method, r.path));
        }
    }
    assert!(checked >= 25, "only {checked} tenant routes");
    assert!(problems.is_empty(), "{problems:#?}");
}

#[actix_web::test]
async fn served_over_http() {
    let app = spawn_app().await;
    let r = app.call(Method::GET, "/api/v1/openapi.json", None, None).await;
    assert_eq!(r.status(), StatusCode::OK);
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("application/json"), "{ct}");
    let served: Value = r.json().await.unwrap();
    assert!(served["openapi"].as_str().unwrap().starts_with("3.1"), "{}", served["openapi"]);
    assert_eq!(served, doc_json());
    assert_eq!(served["info"]["title"], "Sluice API");
    // The problem schema is published.
    assert!(served["components"]["schemas"]["Problem"].is_object());
}
