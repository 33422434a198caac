//! Pipelines: versions, optimistic concurrency, archive, diff, restore and definition errors.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::helpers::*;

const V2: &str = "\
stages:
  - id: build
    tasks:
      - id: compile
        run: [\"cargo\", \"build\", \"--release\"]
      - id: lint
        needs: [compile]
        run: [\"cargo\", \"clippy\"]
  - id: ship
    needs: [build]
    tasks:
      - id: upload
        sleep: 5s
";

fn base(m: &Member) -> String {
    format!("/api/v1/t/{}/pipelines", m.tenant)
}

fn canonical(text: &str) -> (String, String) {
    let spec = sluice_domain::parse_definition(text).unwrap();
    (spec.canonical_yaml(), spec.content_hash())
}

async fn ok_json(r: reqwest::Response, status: StatusCode) -> Value {
    let got = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(got, status, "{text}");
    serde_json::from_str(&text).unwrap()
}

async fn update(app: &TestApp, m: &Member, name: &str, def: &str, base_version: i64) -> reqwest::Response {
    app.put(
        &format!("{}/{name}", base(m)),
        &m.token,
        json!({ "definition": def, "message": "edit", "base_version": base_version }),
    )
    .await
}

/// The pipeline's audit events, oldest first.
async fn audit_of(app: &TestApp, m: &Member, name: &str) -> Vec<Value> {
    let r = app.get(&format!("/api/v1/t/{}/audit?resource_id={name}&limit=200", m.tenant), &m.token).await;
    let page = ok_json(r, StatusCode::OK).await;
    let mut items = page["items"].as_array().unwrap().clone();
    items.reverse();
    items
}

#[actix_web::test]
async fn lifecycle_versions_diff_restore_archive() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("pipe")).await;
    let (canon1, sha1) = canonical(PIPELINE);
    let (canon2, sha2) = canonical(V2);

    // Create.
    let v1 = ok_json(app.create_pipeline(&admin, "deploy", PIPELINE).await, StatusCode::CREATED).await;
    assert_eq!(v1["name"], "deploy");
    assert_eq!(v1["version"], 1);
    assert_eq!(v1["latest_version"], 1);
    assert_eq!(v1["definition"], canon1.as_str());
    assert_eq!(v1["source"], PIPELINE);
    assert_eq!(v1["sha256"], sha1.as_str());
    assert_eq!(v1["sha256"], hex::encode(Sha256::digest(canon1.as_bytes())));
    assert_eq!(v1["author"], admin.email.as_str());
    assert_eq!(v1["message"], "test");
    assert_eq!(v1["archived"], false);
    assert_eq!(v1["spec"]["stages"][0]["tasks"][1]["id"], "test");

    // Get latest.
    let got = ok_json(app.get(&format!("{}/deploy", base(&admin)), &admin.token).await, StatusCode::OK).await;
    assert_eq!(got, v1);

    // Update from the latest version.
    let v2 = ok_json(update(&app, &admin, "deploy", V2, 1).await, StatusCode::OK).await;
    assert_eq!(v2["version"], 2);
    assert_eq!(v2["latest_version"], 2);
    assert_eq!(v2["definition"], canon2.as_str());
    assert_eq!(v2["sha256"], sha2.as_str());
    assert_eq!(v2["message"], "edit");

    // A save from a stale base is refused and stores nothing.
    let r = update(&app, &admin, "deploy", PIPELINE, 1).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let p = problem(r).await;
    assert_eq!(p["type"], "urn:sluice:problem:conflict");
    assert_eq!(p["errors"][0]["field"], "base_version", "{p}");
    let r = update(&app, &admin, "deploy", PIPELINE, 7).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);

    // Versions and single versions.
    let versions =
        ok_json(app.get(&format!("{}/deploy/versions", base(&admin)), &admin.token).await, StatusCode::OK).await;
    let nums: Vec<i64> = versions.as_array().unwrap().iter().map(|v| v["version"].as_i64().unwrap()).collect();
    assert_eq!(nums, [2, 1]);
    assert_eq!(versions[1]["sha256"], sha1.as_str());
    assert_eq!(versions[0]["author"], admin.email.as_str());
    let one =
        ok_json(app.get(&format!("{}/deploy/versions/1", base(&admin)), &admin.token).await, StatusCode::OK).await;
    assert_eq!(one["version"], 1);
    assert_eq!(one["latest_version"], 2);
    assert_eq!(one["definition"], canon1.as_str());
    for missing in ["3", "0", "-1"] {
        let r = app.get(&format!("{}/deploy/versions/{missing}", base(&admin)), &admin.token).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "version {missing}");
        assert_eq!(problem(r).await["type"], "urn:sluice:problem:not-found");
    }
    let r = app.get(&format!("{}/nope", base(&admin)), &admin.token).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(problem(r).await["detail"], "pipeline not found");

    // Diff.
    let d = ok_json(app.get(&format!("{}/deploy/diff?from=1&to=2", base(&admin)), &admin.token).await, StatusCode::OK)
        .await;
    assert_eq!(d["from"], 1);
    assert_eq!(d["to"], 2);
    let unified = d["unified"].as_str().unwrap();
    assert!(unified.starts_with("--- v1\n+++ v2\n"), "{unified}");
    assert!(unified.contains("\n+      - id: lint\n"), "{unified}");
    assert!(unified.contains("\n-      - id: test\n"), "{unified}");
    assert!(unified.contains("\n+  - id: ship\n"), "{unified}");
    assert_eq!(d["stages"], json!({ "added": ["ship"], "removed": [], "changed": ["build"] }));
    assert_eq!(d["tasks"], json!({ "added": ["lint", "upload"], "removed": ["test"], "changed": ["compile"] }));
    let same =
        ok_json(app.get(&format!("{}/deploy/diff?from=2&to=2", base(&admin)), &admin.token).await, StatusCode::OK)
            .await;
    assert_eq!(same["unified"], "");
    let r = app.get(&format!("{}/deploy/diff?from=1&to=9", base(&admin)), &admin.token).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // Restore v1 as v3.
    let r = app.post(&format!("{}/deploy/versions/1/restore", base(&admin)), &admin.token, json!({})).await;
    let v3 = ok_json(r, StatusCode::CREATED).await;
    assert_eq!(v3["version"], 3);
    assert_eq!(v3["latest_version"], 3);
    assert_eq!(v3["definition"], v1["definition"]);
    assert_eq!(v3["sha256"], v1["sha256"]);
    assert_eq!(v3["message"], "Restored version 1");
    let d = ok_json(app.get(&format!("{}/deploy/diff?from=1&to=3", base(&admin)), &admin.token).await, StatusCode::OK)
        .await;
    assert_eq!(d["unified"], "");
    let r = app.post(&format!("{}/deploy/versions/9/restore", base(&admin)), &admin.token, json!({})).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // An empty body is fine too.
    let r =
        app.call(Method::POST, &format!("{}/deploy/versions/2/restore", base(&admin)), Some(&admin.token), None).await;
    let v4 = ok_json(r, StatusCode::CREATED).await;
    assert_eq!(v4["version"], 4);
    assert_eq!(v4["sha256"], sha2.as_str());

    // Archive: gone from the default listing, present with include_archived, no more edits.
    let r = app.post(&format!("{}/deploy/archive", base(&admin)), &admin.token, json!({})).await;
    let s = ok_json(r, StatusCode::OK).await;
    assert_eq!(s["name"], "deploy");
    assert!(s["archived_at"].is_string(), "{s}");
    let list = ok_json(app.get(&base(&admin), &admin.token).await, StatusCode::OK).await;
    assert_eq!(list["items"], json!([]));
    let list =
        ok_json(app.get(&format!("{}?include_archived=true", base(&admin)), &admin.token).await, StatusCode::OK).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert_eq!(list["items"][0]["name"], "deploy");
    assert_eq!(list["items"][0]["latest_version"], 4);
    let r = update(&app, &admin, "deploy", PIPELINE, 4).await;
    assert_eq!(r.status(), StatusCode::CONFLICT, "updating an archived pipeline");
    assert_eq!(problem(r).await["type"], "urn:sluice:problem:conflict");
    let r = app.post(&format!("{}/deploy/versions/1/restore", base(&admin)), &admin.token, json!({})).await;
    assert_eq!(r.status(), StatusCode::CONFLICT, "restoring into an archived pipeline");
    // Still readable, still at version 4.
    let got = ok_json(app.get(&format!("{}/deploy", base(&admin)), &admin.token).await, StatusCode::OK).await;
    assert_eq!(got["version"], 4);
    assert_eq!(got["archived"], true);

    // One audit event per change, with the version it produced.
    let events = audit_of(&app, &admin, "deploy").await;
    let changes: Vec<(String, Value)> = events
        .iter()
        .filter(|e| e["outcome"] == "allow")
        .map(|e| (e["action"].as_str().unwrap().to_owned(), e["resource_version"].clone()))
        .collect();
    assert_eq!(
        changes,
        [
            ("pipeline.create".to_owned(), json!(1)),
            ("pipeline.update".to_owned(), json!(2)),
            ("pipeline.update".to_owned(), json!(3)),
            ("pipeline.update".to_owned(), json!(4)),
            ("pipeline.archive".to_owned(), json!(4)),
        ]
    );
    assert!(events.iter().all(|e| e["resource_type"] == "Pipeline" && e["actor"] == admin.email.as_str()));
    let allowed: Vec<&Value> = events.iter().filter(|e| e["outcome"] == "allow").collect();
    assert_eq!(allowed[0]["details"]["sha256"], sha1.as_str());
    assert_eq!(allowed[1]["details"]["base_version"], 1);
    assert_eq!(allowed[2]["details"]["restored_from"], 1);
    assert_eq!(allowed[2]["details"]["sha256"], sha1.as_str());
    // Archiving twice changes nothing and records nothing.
    let r = app.post(&format!("{}/deploy/archive", base(&admin)), &admin.token, json!({})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let again = audit_of(&app, &admin, "deploy").await;
    assert_eq!(again.iter().filter(|e| e["action"] == "pipeline.archive").count(), 1);
}

/// Definition text, error field, message excerpt, expected line and column.
type SpecCase = (String, &'static str, &'static str, Option<(u64, u64)>);

#[actix_web::test]
async fn definition_errors_name_the_path_and_position() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("spec")).await;
    const T: &str = "stages:\n  - id: a\n    tasks:\n      - id: t\n";
    let cases: Vec<SpecCase> = vec![
        (format!("{T}        noop: true\n        retry: 3\n"), "definition.stages[0].tasks[0].retry", "unknown field `retry`", Some((6, 9))),
        (format!("{T}        noop: true\n      - id: t\n        noop: true\n"), "definition.stages[0].tasks[1].id", "duplicate task id `t`", Some((6, 13))),
        (format!("{T}        noop: true\n      - id: u\n        needs: [ghost]\n        noop: true\n"),
            "definition.stages[0].tasks[1].needs[0]", "unknown task `ghost`", Some((7, 17))),
        ("stages:\n  - id: s\n    tasks:\n      - id: a\n        needs: [b]\n        noop: true\n      - id: b\n        needs: [c]\n        noop: true\n      - id: c\n        needs: [a]\n        noop: true\n".to_owned(),
            "definition.stages[0].tasks[0].needs[0]", "cycle: a -> b -> c -> a", Some((5, 17))),
        (format!("{T}        noop: true\n        timeout: 5x\n"), "definition.stages[0].tasks[0].timeout", "unknown unit", Some((6, 18))),
        (format!("{T}        run: [a]\n        shell: b\n"), "definition.stages[0].tasks[0]", "found run, shell", Some((4, 9))),
        ("stages: [\n".to_owned(), "definition.stages[0]", "YAML syntax error", Some((2, 1))),
        (r#"{"stages": [{"id": "s", "tasks": [{"id": "a", "needs": ["b"], "noop": true}, {"id": "b", "needs": ["a"], "noop": true}]}]}"#.to_owned(),
            "definition.stages[0].tasks[0].needs[0]", "cycle: a -> b -> a", None),
    ];
    for (text, field, needle, pos) in &cases {
        let r = app.create_pipeline(&admin, "bad", text).await;
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY, "{text}");
        let p = problem(r).await;
        assert_eq!(p["type"], "urn:sluice:problem:validation");
        let e = p["errors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["field"] == *field)
            .unwrap_or_else(|| panic!("no error at {field}: {p}"));
        assert!(e["message"].as_str().unwrap().contains(needle), "{needle}: {p}");
        assert!(p["detail"].as_str().unwrap().starts_with("invalid pipeline definition"), "{p}");
        if let Some((line, column)) = pos {
            assert_eq!((e["line"].as_u64(), e["column"].as_u64()), (Some(*line), Some(*column)), "{p}");
        }
    }
    let r = app.create_pipeline(&admin, "good", PIPELINE).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = update(&app, &admin, "good", &cases[2].0, 1).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(problem(r).await["errors"][0]["field"], "definition.stages[0].tasks[1].needs[0]");

    // The definition's own name must match; the pipeline name must be a slug; names are unique.
    let r = app.create_pipeline(&admin, "named", &format!("name: other\n{PIPELINE}")).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let p = problem(r).await;
    assert_eq!(p["errors"][0]["field"], "definition.name", "{p}");
    let r = app.create_pipeline(&admin, "named", &format!("name: named\n{PIPELINE}")).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = update(&app, &admin, "named", &format!("name: renamed\n{PIPELINE}"), 1).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(problem(r).await["errors"][0]["field"], "definition.name");
    for bad in ["Bad_Name", "x", "-lead", "with space", "ünï", &"a".repeat(64)] {
        let r = app.create_pipeline(&admin, bad, PIPELINE).await;
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
        let p = problem(r).await;
        assert_eq!(p["errors"][0]["field"], "name", "{bad}: {p}");
    }
    let r = app.create_pipeline(&admin, "good", V2).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let p = problem(r).await;
    assert_eq!(p["type"], "urn:sluice:problem:conflict");
    assert_eq!(p["errors"][0]["field"], "name");
    // The duplicate did not touch the original.
    let got = ok_json(app.get(&format!("{}/good", base(&admin)), &admin.token).await, StatusCode::OK).await;
    assert_eq!(got["latest_version"], 1);
    assert_eq!(got["sha256"], canonical(PIPELINE).1.as_str());

    // Only the valid pipelines exist, and only their creations were audited.
    let list = ok_json(app.get(&base(&admin), &admin.token).await, StatusCode::OK).await;
    let names: Vec<&str> = list["items"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["good", "named"]);
    let r = app.get(&format!("/api/v1/t/{}/audit?action=pipeline.create", admin.tenant), &admin.token).await;
    assert_eq!(ok_json(r, StatusCode::OK).await["items"].as_array().unwrap().len(), 2);
}

#[actix_web::test]
async fn json_definitions_are_accepted_and_canonicalised() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("json")).await;
    let json_def = r#"{"stages": [{"id": "s", "tasks": [{"id": "t", "noop": true}]}]}"#;
    let yaml_def =
        "# same thing\nstages:\n  - id: s\n    tasks:\n      - id: t\n        when: on_success\n        noop: true\n";
    let a = ok_json(app.create_pipeline(&admin, "from-json", json_def).await, StatusCode::CREATED).await;
    let b = ok_json(app.create_pipeline(&admin, "from-yaml", yaml_def).await, StatusCode::CREATED).await;
    assert_eq!(a["definition"], "stages:\n  - id: s\n    tasks:\n      - id: t\n        noop: true\n");
    assert_eq!(a["source"], json_def);
    assert_eq!(a["sha256"], b["sha256"]);
    assert_eq!(a["definition"], b["definition"]);
    // Saving the same content again still makes a version (with the same hash).
    let r = update(&app, &admin, "from-json", yaml_def, 1).await;
    let v2 = ok_json(r, StatusCode::OK).await;
    assert_eq!(v2["version"], 2);
    assert_eq!(v2["sha256"], a["sha256"]);
}

#[actix_web::test]
async fn concurrent_saves_from_the_same_base_one_wins() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("race")).await;
    for round in 0..5 {
        let name = format!("race-{round}");
        let r = app.create_pipeline(&admin, &name, PIPELINE).await;
        assert_eq!(r.status(), StatusCode::CREATED);
        let def_a = PIPELINE.replace("cargo test", "cargo test --a");
        let def_b = PIPELINE.replace("cargo test", "cargo test --b");
        let (ra, rb) = tokio::join!(update(&app, &admin, &name, &def_a, 1), update(&app, &admin, &name, &def_b, 1));
        let mut statuses = [ra.status(), rb.status()];
        let (ta, tb) = (ra.text().await.unwrap(), rb.text().await.unwrap());
        statuses.sort();
        assert_eq!(statuses, [StatusCode::OK, StatusCode::CONFLICT], "round {round}: {ta} / {tb}");
        let winner: Value = serde_json::from_str(if ta.contains("\"version\"") { &ta } else { &tb }).unwrap();
        let loser: Value = serde_json::from_str(if ta.contains("\"version\"") { &tb } else { &ta }).unwrap();
        assert_eq!(winner["version"], 2);
        assert_eq!(loser["type"], "urn:sluice:problem:conflict");
        // The stored version is the winner's, and only one version 2 exists.
        let got = ok_json(app.get(&format!("{}/{name}", base(&admin)), &admin.token).await, StatusCode::OK).await;
        assert_eq!(got["latest_version"], 2);
        assert_eq!(got["sha256"], winner["sha256"]);
        let versions =
            ok_json(app.get(&format!("{}/{name}/versions", base(&admin)), &admin.token).await, StatusCode::OK).await;
        assert_eq!(versions.as_array().unwrap().len(), 2);
        let updates =
            audit_of(&app, &admin, &name).await.into_iter().filter(|e| e["action"] == "pipeline.update").count();
        assert_eq!(updates, 1, "round {round}");
    }
    let v =
        ok_json(app.get(&format!("/api/v1/t/{}/audit/verify", admin.tenant), &admin.token).await, StatusCode::OK).await;
    assert_eq!(v["ok"], true, "{v}");
}

#[actix_web::test]
async fn editors_author_their_versions() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("auth")).await;
    let editor = app.add_member(&admin, &["editors"]).await;
    let v1 = ok_json(app.create_pipeline(&admin, "shared", PIPELINE).await, StatusCode::CREATED).await;
    assert_eq!(v1["author"], admin.email.as_str());
    let v2 = ok_json(update(&app, &editor, "shared", V2, 1).await, StatusCode::OK).await;
    assert_eq!(v2["author"], editor.email.as_str());
    let versions =
        ok_json(app.get(&format!("{}/shared/versions", base(&admin)), &admin.token).await, StatusCode::OK).await;
    let authors: Vec<&str> = versions.as_array().unwrap().iter().map(|v| v["author"].as_str().unwrap()).collect();
    assert_eq!(authors, [editor.email.as_str(), admin.email.as_str()]);
}
