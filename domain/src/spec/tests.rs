#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;
use crate::duration::Duration;

/// Parses text that must fail and returns its errors.
fn errors(text: &str) -> Vec<SpecError> {
    match parse_definition(text) {
        Ok(spec) => panic!("expected errors, got {spec:?}"),
        Err(errors) => errors.into_vec(),
    }
}

/// The single error of a definition that must fail with exactly one.
fn one_error(text: &str) -> SpecError {
    let errors = errors(text);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    errors.into_iter().next().unwrap()
}

/// Asserts an error's path, position and that its message contains `needle`.
#[track_caller]
fn check(error: &SpecError, path: &str, needle: &str, line: u32, column: u32) {
    assert_eq!(error.path, path, "{error:?}");
    assert!(error.message.contains(needle), "`{}` lacks `{needle}`", error.message);
    assert_eq!((error.line, error.column), (Some(line), Some(column)), "{error:?}");
}

const FULL: &str = r#"
name: deploy-api
description: "Build, test and ship: the API"
params:
  version: { type: string, required: true, description: Version to ship }
  targets: { type: array, default: [eu, us] }
  dry_run: { type: boolean, default: false }
  ratio: { type: number, default: 1.0 }
timeout: 2h
priority: 5
concurrency: { key: "deploy-{{ params.version }}", max: 1, on_conflict: cancel_new }
triggers:
  - cron: "*/5 * * * *"
    timezone: Europe/Paris
    params: { version: "1.2.3" }
stages:
  - id: build
    name: Build
    tasks:
      - id: compile
        name: Compile
        run: ["cargo", "build", "--release"]
        timeout: 10m
        retries: { max: 2, backoff: exponential, initial: 5s, max_delay: 5m }
        env: { RUST_LOG: debug, EMPTY: "" }
        runs_on: [linux, x86_64]
        resources: { cpu: 2, memory: 1GiB }
        priority: -3
        secrets: [REGISTRY_TOKEN]
      - id: test
        needs: [compile]
        shell: |
          cargo test
          echo "done: 100%"
      - id: report
        needs: [test]
        when: always
        sleep: 2s
  - id: production
    needs: [build]
    gate: { approvals: 2, timeout: 72h, on_timeout: approve }
    tasks:
      - id: deploy
        for_each: "{{ params.targets }}"
        http:
          method: POST
          url: "https://deploy.example.com/hooks/{{ params.version }}"
          headers: { Authorization: "Bearer {{ secrets.DEPLOY }}" }
          body: '{"ok": true}'
          expect_status: [200, 201]
          timeout: 30s
      - id: done
        needs: [deploy]
        noop: true
"#;

#[test]
fn parses_full_example() {
    let spec = parse_definition(FULL).unwrap();
    assert_eq!(spec.name.as_ref().map(|n| n.as_str()), Some("deploy-api"));
    assert_eq!(spec.params.len(), 4);
    assert_eq!(spec.timeout, Some(Duration::from_secs(7_200)));
    assert_eq!(spec.concurrency.as_ref().unwrap().on_conflict, OnConflict::CancelNew);
    assert_eq!(spec.stages.len(), 2);
    let compile = &spec.stages[0].tasks[0];
    assert_eq!(compile.action, TaskAction::Run(vec!["cargo".into(), "build".into(), "--release".into()]));
    let retries = compile.retries.unwrap();
    assert_eq!((retries.max, retries.backoff, retries.initial), (2, Backoff::Exponential, Duration::from_secs(5)));
    assert_eq!(compile.resources.unwrap().cpu, Some(2.0));
    assert_eq!(spec.stages[0].tasks[1].action, TaskAction::Shell("cargo test\necho \"done: 100%\"\n".into()));
    assert_eq!(spec.stages[0].tasks[2].when, When::Always);
    let gate = spec.stages[1].gate.unwrap();
    assert_eq!((gate.approvals, gate.on_timeout), (2, OnTimeout::Approve));
    let TaskAction::Http(http) = &spec.stages[1].tasks[0].action else { panic!() };
    assert_eq!(http.method, HttpMethod::Post);
    assert_eq!(http.expect_status, [200, 201]);
    assert_eq!(spec.stages[1].tasks[1].action, TaskAction::Noop);
    assert_eq!(spec.tasks().count(), 5);
    assert!(spec.stage("production").is_some());
    assert!(spec.validate().is_ok());
}

#[test]
fn canonical_yaml_round_trips_and_is_stable() {
    let spec = parse_definition(FULL).unwrap();
    let yaml = spec.canonical_yaml();
    if std::env::var_os("SHOW_CANONICAL").is_some() {
        println!("{yaml}");
    }
    let again = parse_definition(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    assert_eq!(again, spec);
    assert_eq!(again.canonical_yaml(), yaml);
    assert_eq!(again.content_hash(), spec.content_hash());
    assert_eq!(spec.content_hash().len(), 64);
    assert!(spec.content_hash().chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    // Field order follows the model, defaults are dropped.
    let order: Vec<usize> =
        ["name:", "description:", "params:", "timeout:", "priority:", "concurrency:", "triggers:", "stages:"]
            .iter()
            .map(|k| yaml.find(&format!("\n{k}")).map_or(0, |i| i + 1))
            .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{yaml}");
    assert!(yaml.starts_with("name: deploy-api\n"), "{yaml}");
    assert!(yaml.contains("        sleep: 2s\n"), "{yaml}");
    assert!(!yaml.contains("on_success"), "{yaml}");
    // JSON input gives the same spec and hash.
    let json = serde_json::to_string(&spec).unwrap();
    let from_json = parse_definition(&json).unwrap();
    assert_eq!(from_json, spec);
    assert_eq!(from_json.content_hash(), spec.content_hash());
}

#[test]
fn hash_ignores_formatting_and_defaults() {
    let a = parse_definition("stages: [{id: s, tasks: [{id: t, noop: true}]}]").unwrap();
    let b = parse_definition(
        "# comment\nstages:\n  - id: s\n    tasks:\n      - id: t\n        when: on_success\n        priority: 0\n        noop: true\n",
    )
    .unwrap();
    assert_eq!(a, b);
    assert_eq!(a.content_hash(), b.content_hash());
    assert_eq!(a.canonical_yaml(), "stages:\n  - id: s\n    tasks:\n      - id: t\n        noop: true\n");
}

// ---- document-level errors -------------------------------------------------------------

#[test]
fn too_large() {
    let text = format!("stages: []\n#{}", "x".repeat(MAX_DEFINITION_BYTES));
    let e = one_error(&text);
    assert_eq!(e.path, "");
    assert!(e.message.contains("limit is 1048576 bytes"), "{e}");
    assert_eq!(e.line, None);
}

#[test]
fn yaml_syntax_error_has_position() {
    let e = one_error("stages:\n  - id: a\n   tasks: [\n");
    assert!(e.message.contains("YAML syntax error"), "{e}");
    assert!(e.line.is_some() && e.column.is_some(), "{e:?}");
}

#[test]
fn json_syntax_error_has_position() {
    let e = one_error("{\n  \"stages\": [\n    {\"id\": \"a\",}\n  ]\n}");
    assert!(e.message.contains("JSON syntax error"), "{e}");
    assert_eq!(e.path, "stages[0]");
    assert_eq!(e.line, Some(3));
}

#[test]
fn byte_order_mark_is_ignored() {
    let spec = "stages: [{id: s, tasks: [{id: t, noop: true}]}]";
    assert!(parse_definition(&format!("\u{feff}{spec}")).is_ok());
    let json = r#"{"stages": [{"id": "s", "tasks": [{"id": "t", "noop": true}]}]}"#;
    assert!(parse_definition(&format!("\u{feff}{json}")).is_ok());
}

#[test]
fn root_must_be_a_mapping() {
    check(&one_error("- a\n- b\n"), "", "must be a mapping", 1, 1);
    assert!(one_error("").message.contains("empty"));
}

#[test]
fn missing_stages() {
    let e = one_error("name: abc\n");
    check(&e, "", "missing field `stages`", 1, 1);
}

#[test]
fn yaml_hardening() {
    check(&one_error("stages: &s []\n"), "stages", "anchors", 1, 9);
    check(&one_error("x: 1\nstages: *x\n"), "stages", "", 2, 9);
    check(&one_error("stages: []\nstages: []\n"), "stages", "duplicate key `stages`", 2, 1);
    check(&one_error("stages: []\n1: x\n"), "", "keys must be strings", 2, 1);
    check(&one_error("stages: !!binary abc\n"), "stages", "tags", 1, 9);
    let deep = format!("stages: {}", "[".repeat(100_000));
    let e = one_error(&deep);
    assert!(e.message.contains("deeper than 64 levels"), "{e}");
    assert!(e.line.is_some());
    let long = format!("description: \"{}\"\nstages: []\n", "a".repeat(70_000));
    check(&one_error(&long), "description", "limit is 65536 bytes", 1, 14);
}

#[test]
fn json_hardening() {
    let deep = format!("{{\"stages\": {}", "[".repeat(100_000));
    let e = one_error(&deep);
    assert!(e.message.contains("deeper than 64 levels"), "{e}");
    let e = one_error(r#"{"stages": [], "stages": []}"#);
    assert_eq!(e.path, "stages");
    assert!(e.message.contains("duplicate key"), "{e}");
    assert_eq!(e.line, Some(1));
    let long = format!(r#"{{"description": "{}", "stages": []}}"#, "a".repeat(70_000));
    assert_eq!(one_error(&long).path, "description");
}

// ---- shape errors ------------------------------------------------------------------------

const BASE_TASK: &str = "stages:\n  - id: a\n    tasks:\n      - id: t\n";

#[test]
fn unknown_field_lists_expected() {
    let e = one_error(&format!("{BASE_TASK}        noop: true\n        retry: 3\n"));
    check(&e, "stages[0].tasks[0].retry", "unknown field `retry`", 6, 9);
    assert!(e.message.contains("`retries`"), "{e}");
    let e = one_error("stagez: []\n");
    check(&e, "stagez", "expected one of", 1, 1);
}

#[test]
fn wrong_types() {
    let e = one_error(&format!("{BASE_TASK}        run: cargo build\n"));
    check(&e, "stages[0].tasks[0].run", "invalid type", 5, 14);
    let e = one_error(&format!("{BASE_TASK}        noop: true\n        priority: high\n"));
    check(&e, "stages[0].tasks[0].priority", "invalid type", 6, 19);
    let e = one_error("stages:\n  - id: a\n    tasks: {}\n");
    check(&e, "stages[0].tasks", "invalid type: map", 3, 5);
}

#[test]
fn collects_errors_from_several_tasks() {
    let text = "name: Bad\nstages:\n  - id: a\n    tasks:\n      - id: t\n        sleep: 10\n      - id: u\n        noop: false\n  - id: B\n    tasks: []\n";
    let errors = errors(text);
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["name", "stages[0].tasks[0].sleep", "stages[0].tasks[1]", "stages[1].id"], "{errors:#?}");
    check(&errors[0], "name", "^[a-z0-9][a-z0-9-]{1,62}$", 1, 7);
    check(&errors[2], "stages[0].tasks[1]", "`noop` must be `true`", 7, 9);
    check(&errors[3], "stages[1].id", "invalid id `B`", 9, 9);
}

#[test]
fn bad_durations() {
    for (value, needle) in [("5x", "unknown unit"), ("10", "invalid type"), ("\"-1s\"", "negative"), ("\"\"", "empty")]
    {
        let e = one_error(&format!("{BASE_TASK}        noop: true\n        timeout: {value}\n"));
        check(&e, "stages[0].tasks[0].timeout", needle, 6, 18);
    }
    let e = one_error(&format!("{BASE_TASK}        noop: true\n        timeout: 0s\n"));
    check(&e, "stages[0].tasks[0].timeout", "greater than zero", 6, 18);
    let e = one_error("timeout: 99999999999999999999d\nstages: []\n");
    check(&e, "timeout", "too large", 1, 10);
}

#[test]
fn action_count() {
    let e = one_error(&format!("{BASE_TASK}        name: nothing\n"));
    check(&e, "stages[0].tasks[0]", "found none", 4, 9);
    let e = one_error(&format!("{BASE_TASK}        run: [a]\n        shell: b\n        noop: true\n"));
    check(&e, "stages[0].tasks[0]", "found run, shell, noop", 4, 9);
}

#[test]
fn invalid_ids() {
    let e = one_error("stages:\n  - id: a\n    tasks:\n      - id: Compile\n        noop: true\n");
    check(&e, "stages[0].tasks[0].id", "invalid id `Compile`", 4, 13);
    let e = one_error(&format!("{BASE_TASK}        noop: true\n        needs: [x.y]\n"));
    check(&e, "stages[0].tasks[0].needs[0]", "invalid id `x.y`", 6, 17);
    let e = one_error(&format!("params:\n  BadName: {{type: string}}\n{BASE_TASK}        noop: true\n"));
    check(&e, "params.BadName", "invalid id", 2, 3);
}

// ---- semantic errors ---------------------------------------------------------------------

#[test]
fn duplicate_ids() {
    let text = "stages:\n  - id: a\n    tasks:\n      - id: t\n        noop: true\n  - id: a\n    tasks:\n      - id: t\n        noop: true\n";
    let errors = errors(text);
    assert_eq!(errors.len(), 2, "{errors:#?}");
    check(&errors[0], "stages[1].id", "duplicate stage id `a`", 6, 9);
    check(&errors[1], "stages[1].tasks[0].id", "duplicate task id `t`", 8, 13);
    assert!(errors[1].message.contains("stages[0].tasks[0]"));
}

#[test]
fn unknown_and_self_needs() {
    let text = "\
stages:
  - id: a
    needs: [a, nope, t2]
    tasks:
      - id: t
        needs: [t, ghost, t2]
        noop: true
  - id: b
    tasks:
      - id: t2
        noop: true
";
    let errors = errors(text);
    assert_eq!(errors.len(), 6, "{errors:#?}");
    check(&errors[0], "stages[0].needs[0]", "stage `a` needs itself", 3, 13);
    check(&errors[1], "stages[0].needs[1]", "unknown stage `nope`", 3, 16);
    check(&errors[2], "stages[0].needs[2]", "`t2` is a task of stage `b`, not a stage", 3, 22);
    check(&errors[3], "stages[0].tasks[0].needs[0]", "task `t` needs itself", 6, 17);
    check(&errors[4], "stages[0].tasks[0].needs[1]", "unknown task `ghost` in stage `a`", 6, 20);
    check(&errors[5], "stages[0].tasks[0].needs[2]", "`t2` is in stage `b`", 6, 27);
}

#[test]
fn duplicate_need() {
    let text = "stages:\n  - id: a\n    tasks:\n      - id: x\n        noop: true\n      - id: t\n        needs: [x, x]\n        noop: true\n";
    check(&one_error(text), "stages[0].tasks[1].needs[1]", "listed twice", 7, 20);
}

#[test]
fn stage_cycle() {
    let text = "\
stages:
  - id: a
    needs: [c]
    tasks: [{id: t1, noop: true}]
  - id: b
    needs: [a]
    tasks: [{id: t2, noop: true}]
  - id: c
    needs: [b]
    tasks: [{id: t3, noop: true}]
";
    let e = one_error(text);
    check(&e, "stages[0].needs[0]", "cycle: a -> c -> b -> a", 3, 13);
}

#[test]
fn task_cycle() {
    let text = "\
stages:
  - id: s
    tasks:
      - id: a
        needs: [b]
        noop: true
      - id: b
        needs: [c]
        noop: true
      - id: c
        needs: [a]
        noop: true
";
    let e = one_error(text);
    check(&e, "stages[0].tasks[0].needs[0]", "cycle: a -> b -> c -> a", 5, 17);
}

#[test]
fn cycle_in_json_has_path() {
    let text = r#"{"stages": [{"id": "s", "tasks": [
        {"id": "a", "needs": ["b"], "noop": true},
        {"id": "b", "needs": ["a"], "noop": true}]}]}"#;
    let e = one_error(text);
    assert_eq!(e.path, "stages[0].tasks[0].needs[0]");
    assert!(e.message.contains("cycle: a -> b -> a"), "{e}");
    assert_eq!(e.line, None);
}

#[test]
fn empty_lists() {
    check(&one_error("stages: []\n"), "stages", "at least one stage", 1, 1);
    check(&one_error("stages:\n  - id: a\n    tasks: []\n"), "stages[0].tasks", "at least one task", 3, 5);
}

#[test]
fn ranges_and_formats() {
    let text = r#"
priority: 101
concurrency: { key: "", max: 0 }
params:
  n: { type: integer, default: "x" }
triggers:
  - cron: "* * *"
    params: { n: 1, other: 2 }
stages:
  - id: s
    gate: { approvals: 0, timeout: 0s }
    tasks:
      - id: a
        run: [""]
        retries: { max: 21, initial: 10s, max_delay: 1s }
        env: { "1BAD": x, SLUICE_TOKEN: y }
        resources: { cpu: 0 }
        priority: -101
        secrets: [OK, "bad-name", OK]
        runs_on: [""]
        for_each: " "
      - id: b
        shell: "  "
      - id: c
        run: []
      - id: d
        http: { method: GET, url: "ftp://x", expect_status: [99, 600], headers: { "bad header": x }, timeout: 0s }
"#;
    let errors = errors(text);
    let expected = [
        ("params.n.default", "must be of type integer", 5, 32),
        ("priority", "out of range", 2, 11),
        ("concurrency.key", "must not be empty", 3, 21),
        ("concurrency.max", "at least 1", 3, 30),
        ("triggers[0].cron", "found 3", 7, 11),
        ("triggers[0].params.other", "unknown param `other`", 8, 21),
        ("stages[0].gate.approvals", "between 1 and 20", 11, 24),
        ("stages[0].gate.timeout", "greater than zero", 11, 36),
        ("stages[0].tasks[0].run[0]", "must not be empty", 14, 15),
        ("stages[0].tasks[0].retries.max", "between 0 and 20", 15, 25),
        ("stages[0].tasks[0].retries.max_delay", "shorter than initial", 15, 54),
        ("stages[0].tasks[0].env.1BAD", "invalid environment variable name", 16, 16),
        ("stages[0].tasks[0].env.SLUICE_TOKEN", "reserved", 16, 27),
        ("stages[0].tasks[0].for_each", "must not be empty", 21, 19),
        ("stages[0].tasks[0].runs_on[0]", "must not be empty", 20, 19),
        ("stages[0].tasks[0].resources.cpu", "greater than zero", 17, 27),
        ("stages[0].tasks[0].priority", "out of range", 18, 19),
        ("stages[0].tasks[0].secrets[1]", "invalid secret name", 19, 23),
        ("stages[0].tasks[0].secrets[2]", "listed twice", 19, 35),
        ("stages[0].tasks[1].shell", "must not be empty", 23, 16),
        ("stages[0].tasks[2].run", "at least the program", 25, 9),
        ("stages[0].tasks[3].http.url", "http:// or https://", 27, 35),
        ("stages[0].tasks[3].http.headers.bad header", "invalid header name", 27, 83),
        ("stages[0].tasks[3].http.expect_status[0]", "not between 100 and 599", 27, 62),
        ("stages[0].tasks[3].http.expect_status[1]", "not between 100 and 599", 27, 66),
        ("stages[0].tasks[3].http.timeout", "greater than zero", 27, 111),
    ];
    for (path, needle, line, column) in expected {
        let Some(e) = errors.iter().find(|e| e.path == path) else {
            panic!("no error at {path}: {errors:#?}");
        };
        check(e, path, needle, line, column);
    }
    assert_eq!(errors.len(), expected.len(), "{errors:#?}");
}

#[test]
fn missing_required_trigger_param() {
    let text = "params:\n  v: {type: string, required: true}\ntriggers:\n  - cron: \"0 0 * * *\"\nstages: [{id: s, tasks: [{id: t, noop: true}]}]\n";
    check(&one_error(text), "triggers[0].params", "missing required param `v`", 4, 5);
}

#[test]
fn limits() {
    // 201 stages.
    let mut text = String::from("stages:\n");
    for i in 0..201 {
        text.push_str(&format!("  - {{id: s{i}, tasks: [{{id: t{i}, noop: true}}]}}\n"));
    }
    check(&one_error(&text), "stages", "201 stages; the limit is 200", 1, 1);
    // 2,001 tasks over 3 stages.
    let mut text = String::from("stages:\n");
    for s in 0..3 {
        text.push_str(&format!("  - id: s{s}\n    tasks:\n"));
        for t in 0..667 {
            text.push_str(&format!("      - {{id: t{s}_{t}, noop: true}}\n"));
        }
    }
    check(&one_error(&text), "stages", "2001 tasks in total; the limit is 2000", 1, 1);
    // A needs list of 2,001 entries.
    let needs: Vec<String> = (0..2001).map(|i| format!("n{i}")).collect();
    let text = format!("stages:\n  - id: s\n    needs: [{}]\n    tasks: [{{id: t, noop: true}}]\n", needs.join(", "));
    let errors = errors(&text);
    check(&errors[0], "stages[0].needs", "2001 needs; the limit is 2000", 3, 5);
}

#[test]
fn deserializing_directly_then_validating() {
    let json = serde_json::json!({"stages": [{"id": "s", "needs": ["s"], "tasks": [{"id": "t", "noop": true}]}]});
    let spec: PipelineSpec = serde_json::from_value(json).unwrap();
    let errors = spec.validate().unwrap_err();
    assert_eq!(errors.errors()[0].path, "stages[0].needs[0]");
    assert!(errors.to_string().contains("needs itself"), "{errors}");
}

// ---- properties --------------------------------------------------------------------------

/// A random DAG over `n` nodes as needs lists: node `perm[j]` may need `perm[i]` for `i < j`.
fn needs_lists(n: usize, perm: &[usize], pairs: &[(usize, usize)]) -> Vec<BTreeSet<usize>> {
    let mut needs = vec![BTreeSet::new(); n];
    for &(a, b) in pairs {
        if a != b {
            needs[perm[a.max(b)]].insert(perm[a.min(b)]);
        }
    }
    needs
}

/// Node count, a permutation, and random node pairs (turned into forward edges).
type Graph = (usize, Vec<usize>, Vec<(usize, usize)>);

fn graph() -> impl Strategy<Value = Graph> {
    (1usize..8).prop_flat_map(|n| {
        (Just(n), Just((0..n).collect::<Vec<_>>()).prop_shuffle(), proptest::collection::vec((0..n, 0..n), 0..(n * 2)))
    })
}

/// Adds needs that close a cycle through `perm[lo..=hi]` (lo < hi).
fn inject_cycle(needs: &mut [BTreeSet<usize>], perm: &[usize], lo: usize, hi: usize) {
    for k in lo..hi {
        needs[perm[k + 1]].insert(perm[k]);
    }
    needs[perm[lo]].insert(perm[hi]);
}

fn render(stage_needs: &[BTreeSet<usize>], task_needs: &[Vec<BTreeSet<usize>>]) -> String {
    let mut text = String::from("stages:\n");
    for (s, needs) in stage_needs.iter().enumerate() {
        text.push_str(&format!("  - id: s{s}\n"));
        let list: Vec<String> = needs.iter().map(|n| format!("s{n}")).collect();
        text.push_str(&format!("    needs: [{}]\n    tasks:\n", list.join(", ")));
        for (t, needs) in task_needs[s].iter().enumerate() {
            let list: Vec<String> = needs.iter().map(|n| format!("s{s}t{n}")).collect();
            text.push_str(&format!("      - id: s{s}t{t}\n        needs: [{}]\n        noop: true\n", list.join(", ")));
        }
    }
    text
}

fn spec_graphs() -> impl Strategy<Value = (Graph, Vec<Graph>)> {
    (graph(), proptest::collection::vec(graph(), 8))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn acyclic_specs_parse(((n, perm, pairs), tasks) in spec_graphs()) {
        let stage_needs = needs_lists(n, &perm, &pairs);
        let task_needs: Vec<_> = tasks[..n].iter().map(|(m, p, e)| needs_lists(*m, p, e)).collect();
        let text = render(&stage_needs, &task_needs);
        let spec = parse_definition(&text);
        prop_assert!(spec.is_ok(), "{:?}\n{}", spec, text);
        let spec = spec.unwrap();
        prop_assert_eq!(parse_definition(&spec.canonical_yaml()).unwrap(), spec);
    }

    #[test]
    fn cyclic_specs_are_rejected(
        ((n, perm, pairs), tasks) in spec_graphs(),
        in_tasks in any::<bool>(),
        which in any::<proptest::sample::Index>(),
        x in any::<proptest::sample::Index>(),
        y in any::<proptest::sample::Index>(),
    ) {
        let mut stage_needs = needs_lists(n, &perm, &pairs);
        let mut task_needs: Vec<_> = tasks[..n].iter().map(|(m, p, e)| needs_lists(*m, p, e)).collect();
        let stage = which.index(n);
        let (size, order) = if in_tasks { (tasks[stage].0, &tasks[stage].1) } else { (n, &perm) };
        prop_assume!(size >= 2);
        let (i, j) = (x.index(size), y.index(size));
        prop_assume!(i != j);
        let (lo, hi) = (i.min(j), i.max(j));
        if in_tasks {
            inject_cycle(&mut task_needs[stage], order, lo, hi);
        } else {
            inject_cycle(&mut stage_needs, order, lo, hi);
        }
        let text = render(&stage_needs, &task_needs);
        let errors = parse_definition(&text);
        prop_assert!(errors.is_err(), "{}", text);
        let errors = errors.unwrap_err();
        prop_assert!(errors.errors().iter().any(|e| e.message.contains("cycle") && e.line.is_some()), "{}", errors);
    }

    #[test]
    fn arbitrary_strings_round_trip(
        description in any::<String>(),
        value in "\\PC*",
        argv in proptest::collection::vec(any::<String>(), 1..4),
        default in prop_oneof![
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            (-1e300f64..1e300).prop_map(serde_json::Value::from),
            any::<String>().prop_map(serde_json::Value::from),
            any::<bool>().prop_map(serde_json::Value::from),
        ],
    ) {
        prop_assume!(argv[0].chars().next().is_some());
        let json = serde_json::json!({
            "description": description,
            "params": { "p": { "type": "string", "default": value }, "q": { "type": "string" } },
            "triggers": [{ "cron": "0 0 * * *", "params": { "q": default.clone() } }],
            "stages": [{ "id": "s", "tasks": [{ "id": "t", "run": argv, "env": { "K": value } }] }],
        });
        // q's declared type is string; only strings are valid there.
        let spec = parse_definition(&json.to_string());
        if !default.is_string() {
            prop_assert!(spec.is_err());
            return Ok(());
        }
        let spec = spec.unwrap();
        let yaml = spec.canonical_yaml();
        let back = parse_definition(&yaml);
        prop_assert!(back.is_ok(), "{:?}\n{}", back, yaml);
        prop_assert_eq!(back.unwrap(), spec);
    }

    #[test]
    fn arbitrary_values_round_trip(
        default in prop_oneof![
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            (-1e300f64..1e300).prop_map(serde_json::Value::from),
            any::<String>().prop_map(serde_json::Value::from),
        ],
    ) {
        let json = serde_json::json!({
            "params": { "p": { "type": "array", "default": [default, {"k": [default]}] } },
            "stages": [{ "id": "s", "tasks": [{ "id": "t", "noop": true }] }],
        });
        let spec = parse_definition(&json.to_string()).unwrap();
        let back = parse_definition(&spec.canonical_yaml()).unwrap();
        prop_assert_eq!(back, spec);
    }
}
