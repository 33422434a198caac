//! Distributed workers, with real processes: one `sluice serve` and two `sluice worker` on
//! PostgreSQL and Redis. Needs both (CI has them): PostgreSQL at `SLUICE_TEST_POSTGRES_URL`
//! (default postgres://postgres@127.0.0.1:5432) and Redis at `SLUICE_TEST_REDIS_URL` (default
//! redis://127.0.0.1:6379); the test fails when either is unreachable.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_over_redis_survive_a_killed_worker() {
    let Setup { mut cluster, api, workers } = setup().await;
    let (w1, w2) = (workers[0], workers[1]);
    let data_dir = cluster.data_dir.clone();

    // A 40-task chain: every hop is a dispatch through Redis to one of the workers.
    let mut chain = String::from("stages:\n  - id: s\n    tasks:\n");
    for i in 0..40 {
        chain.push_str(&format!("      - id: t{i}\n        noop: true\n"));
        if i > 0 {
            chain.push_str(&format!("        needs: [t{}]\n", i - 1));
        }
    }
    api.create_pipeline("chain40", &chain).await;
    let fan = "params:\n  targets: { type: array, required: true }\nstages:\n  - id: s\n    tasks:\n      - id: each\n        for_each: '{{ params.targets }}'\n        noop: true\n      - id: join\n        needs: [each]\n        noop: true\n";
    api.create_pipeline("fan50", fan).await;

    let started = Instant::now();
    let chain_run = api.start("chain40", json!({})).await;
    let done = api.wait(&cluster, &chain_run, 120).await;
    let chain_time = started.elapsed();
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(done["tasks"].as_array().unwrap().len(), 40);
    eprintln!(
        "40-task chain over Redis with 2 workers: {:?} ({:?} per task, dispatch + claim + complete)",
        chain_time,
        chain_time / 40
    );

    let started = Instant::now();
    let targets: Vec<String> = (0..50).map(|i| format!("host-{i}")).collect();
    let fan_run = api.start("fan50", json!({ "params": { "targets": targets } })).await;
    let done = api.wait(&cluster, &fan_run, 120).await;
    eprintln!("50-task fan-out + join: {:?}", started.elapsed());
    assert_eq!(done["status"], "succeeded", "{done:#}");
    let tasks = done["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 51);
    assert!(tasks.iter().all(|t| t["status"] == "succeeded"), "{done:#}");

    let received = |i: usize| {
        let text = std::fs::read_to_string(data_dir.join(format!("worker-{i}.log"))).unwrap_or_default();
        text.matches("dispatch received").count()
    };
    eprintln!("dispatches received: worker 1: {}, worker 2: {}", received(w1), received(w2));
    // Twenty 300 ms sleeps; one worker is killed with SIGKILL while it runs some of them. Their
    // leases expire (3 s here), the reaper retries them, and the other worker finishes the run.
    let mut sleeps = String::from("stages:\n  - id: s\n    tasks:\n");
    for i in 0..20 {
        sleeps.push_str(&format!(
            "      - id: z{i}\n        sleep: 300ms\n        retries: {{ max: 3, backoff: exponential, initial: 100ms }}\n"
        ));
    }
    api.create_pipeline("sleep20", &sleeps).await;
    let before = received(w1);
    let sleep_run = api.start("sleep20", json!({})).await;
    // Kill worker 1 once it is executing some of them.
    let deadline = Instant::now() + Duration::from_secs(30);
    while received(w1) == before {
        assert!(Instant::now() < deadline, "worker 1 took none of the sleeps\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    cluster.children[w1].1.kill().unwrap();
    cluster.children[w1].1.wait().unwrap();
    let killed_at = Instant::now();
    let done = api.wait(&cluster, &sleep_run, 120).await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", cluster.logs());
    let retried = done["tasks"].as_array().unwrap().iter().filter(|t| t["attempt"].as_u64() > Some(1)).count();
    eprintln!("sleep20 finished {:?} after the SIGKILL; {retried} task(s) needed another attempt", killed_at.elapsed());
    assert!(retried >= 1, "the killed worker's tasks were retried: {done:#}");

    for id in [&chain_run, &fan_run, &sleep_run] {
        assert_eq!(api.run(id).await["status"], "succeeded");
    }
    let db = cluster.db().await;
    assert_eq!(db.unfinished_tasks().await, 0, "tasks left non-terminal");
    db.close().await;

    // SIGTERM while a task runs: the surviving worker takes no new work, lets the task finish
    // (its completion is recorded, first attempt), and exits 0.
    api.create_pipeline("slow", "stages:\n  - id: s\n    tasks:\n      - id: slow\n        sleep: 2s\n").await;
    let slow_run = api.start("slow", json!({})).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while api.run(&slow_run).await["tasks"][0]["status"] != "running" {
        assert!(Instant::now() < deadline, "the slow task did not start\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let signalled = Instant::now();
    nix::sys::signal::kill(cluster.pid(w2), nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(35);
    let status = loop {
        if let Some(s) = cluster.children[w2].1.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the worker did not exit after SIGTERM\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "worker exit after SIGTERM: {status}\n{}", cluster.logs());
    eprintln!("the worker exited {:?} after SIGTERM", signalled.elapsed());
    let done = api.wait(&cluster, &slow_run, 10).await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", cluster.logs());
    assert_eq!(done["tasks"][0]["attempt"], 1, "{done:#}");
}

/// A05: Redis restarted empty mid-run, simulated by deleting every key under this test's prefix
/// twice while sleeps are in flight and queued (the shared server itself keeps running for the
/// other tests): the reaper re-dispatches from the database, the
/// workers keep fetching, and every run still finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_finish_after_redis_loses_its_keys() {
    let Setup { cluster, api, .. } = setup().await;
    // 30 sleeps: a 20-way fan-out with a join, beside a 9-task chain.
    let mut yaml = String::from(
        "params:\n  targets: { type: array, required: true }\nstages:\n  - id: s\n    tasks:\n      - id: each\n        for_each: '{{ params.targets }}'\n        sleep: 200ms\n      - id: join\n        needs: [each]\n        sleep: 200ms\n",
    );
    for i in 0..9 {
        yaml.push_str(&format!("      - id: c{i}\n        sleep: 200ms\n"));
        if i > 0 {
            yaml.push_str(&format!("        needs: [c{}]\n", i - 1));
        }
    }
    api.create_pipeline("mixed30", &yaml).await;
    let targets: Vec<String> = (0..20).map(|i| format!("host-{i}")).collect();
    let body = json!({ "params": { "targets": targets } });
    let first = api.start("mixed30", body.clone()).await;

    // First wipe once some sleeps are running (the rest sit queued in Redis).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !api.run(&first).await["tasks"].as_array().unwrap().iter().any(|t| t["status"] == "running") {
        assert!(Instant::now() < deadline, "no sleep started\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let wiped = Instant::now();
    let n = delete_redis_keys(&cluster.redis_prefix).await;
    eprintln!("first wipe: {n} Redis key(s) deleted");
    // The second as soon as keys are back (workers registered again, dispatches pushed again).
    let deadline = Instant::now() + Duration::from_secs(30);
    let n = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let n = delete_redis_keys(&cluster.redis_prefix).await;
        if n > 0 {
            break n;
        }
        assert!(Instant::now() < deadline, "no Redis key came back after the wipe\n{}", cluster.logs());
    };
    eprintln!("second wipe: {n} Redis key(s) deleted, {:?} after the first", wiped.elapsed());
    // A run started after the wipes goes through the emptied Redis from the start.
    let second = api.start("mixed30", body).await;

    for id in [&first, &second] {
        let done = api.wait(&cluster, id, 60).await;
        assert_eq!(done["status"], "succeeded", "{done:#}\n{}", cluster.logs());
        let tasks = done["tasks"].as_array().unwrap();
        assert_eq!(tasks.len(), 30, "{done:#}");
        assert!(tasks.iter().all(|t| t["status"] == "succeeded"), "{done:#}");
    }
    eprintln!("both runs finished {:?} after the first wipe", wiped.elapsed());
    let db = cluster.db().await;
    assert_eq!(db.unfinished_tasks().await, 0, "tasks left non-terminal");
    db.close().await;
}

/// Priorities hold across runs over Redis: with the worker's one slot busy, runs queued behind
/// it start by priority (the pipeline's plus the task's), not in the order they were rung.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_runs_start_by_priority_over_redis() {
    let Setup { cluster, api, .. } = start(Options {
        name: "priority",
        workers: 1,
        env: vec![("SLUICE_WORKER_SLOTS".into(), "1".into())],
        ..Options::default()
    })
    .await;
    api.create_pipeline("hold", "stages:\n  - id: s\n    tasks:\n      - id: hold\n        sleep: 1s\n").await;
    let three = "stages:\n  - id: s\n    tasks:\n      - id: a\n        sleep: 50ms\n      - id: b\n        sleep: 50ms\n      - id: c\n        sleep: 50ms\n";
    api.create_pipeline("low", &format!("priority: -10\n{three}")).await;
    api.create_pipeline("mid", "stages:\n  - id: s\n    tasks:\n      - id: m\n        sleep: 50ms\n").await;
    api.create_pipeline(
        "high",
        "priority: 5\nstages:\n  - id: s\n    tasks:\n      - id: h\n        priority: 5\n        sleep: 50ms\n",
    )
    .await;
    let hold = api.start("hold", json!({})).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while api.run(&hold).await["tasks"][0]["status"] != "running" {
        assert!(Instant::now() < deadline, "the holding task did not start\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Rung in the opposite order of their priorities while the slot is taken.
    let low = api.start("low", json!({})).await;
    let mid = api.start("mid", json!({})).await;
    let high = api.start("high", json!({})).await;
    let started = |v: &serde_json::Value, key: &str| {
        chrono::DateTime::parse_from_rfc3339(task_of(v, key)["started_at"].as_str().unwrap()).unwrap()
    };
    let mut done = vec![];
    for id in [&hold, &low, &mid, &high] {
        let v = api.wait(&cluster, id, 60).await;
        assert_eq!(v["status"], "succeeded", "{v:#}\n{}", cluster.logs());
        done.push(v);
    }
    let (low, mid, high) = (&done[1], &done[2], &done[3]);
    assert!(started(high, "h") < started(mid, "m"), "high after mid\n{high:#}\n{mid:#}");
    for key in ["a", "b", "c"] {
        assert!(started(mid, "m") < started(low, key), "mid after low's {key}\n{mid:#}\n{low:#}");
    }
}
