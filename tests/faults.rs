//! Fault tests of the test plan (A01, A07, A08, A14) with real processes: `sluice serve` and
//! `sluice worker` on PostgreSQL and Redis, killed with SIGKILL or stopped with SIGTERM.
//!
//! The tests of this file run one at a time (they measure recovery times, and A01 keeps both
//! cores busy), each on a cluster, database and Redis prefix of its own.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// One fault test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const LEASE_SECS: u64 = 3;
/// How often the reaper looks (`sluice_backend::engine::REAPER_PERIOD`).
const REAPER_SECS: f64 = 1.0;

/// Task rows of a run as (run id, index, attempt, status).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct TaskRow {
    run: String,
    idx: i64,
    attempt: i64,
    status: String,
}

fn task_row(v: &Value) -> TaskRow {
    TaskRow {
        run: v["run_id"].as_str().unwrap().to_owned(),
        idx: v["idx"].as_i64().unwrap(),
        attempt: v["attempt"].as_i64().unwrap(),
        status: v["status"].as_str().unwrap().to_owned(),
    }
}

/// The task rows `running` under the lease of worker `name`.
async fn running_under(db: &Db, name: &str) -> Vec<TaskRow> {
    let name = name.replace('\'', "''");
    db.rows(&format!(
        "SELECT run_id::text AS run_id, idx::int8 AS idx, attempt::int8 AS attempt, status FROM task_runs \
         WHERE status = 'running' AND lease_owner = '{name}'"
    ))
    .await
    .iter()
    .map(task_row)
    .collect()
}

/// Rows `running` without a lease holder or expiry (never allowed).
async fn running_without_lease(db: &Db) -> i64 {
    db.count(
        "SELECT COUNT(*) AS n FROM task_runs WHERE status = 'running' \
         AND (lease_owner IS NULL OR lease_expires_at IS NULL)",
    )
    .await
}

/// Waits until every one of `orphans` has a newer attempt queued (or further); returns the time
/// from `since` to the re-dispatch of each.
async fn wait_redispatched(db: Db, orphans: Vec<TaskRow>, since: Instant, secs: u64) -> Vec<Duration> {
    let mut left: BTreeMap<(String, i64), i64> = orphans.into_iter().map(|o| ((o.run, o.idx), o.attempt)).collect();
    let mut took = vec![];
    let deadline = since + Duration::from_secs(secs);
    while !left.is_empty() {
        let list: Vec<String> = left.keys().map(|(r, i)| format!("('{r}'::uuid, {i})")).collect();
        let rows: Vec<TaskRow> = db
            .rows(&format!(
                "SELECT run_id::text AS run_id, idx::int8 AS idx, attempt::int8 AS attempt, status FROM task_runs \
                 WHERE (run_id, idx) IN ({})",
                list.join(", ")
            ))
            .await
            .iter()
            .map(task_row)
            .collect();
        for r in &rows {
            let key = (r.run.clone(), r.idx);
            if let Some(&was) = left.get(&key)
                && r.attempt > was
                && ["queued", "running", "succeeded"].contains(&r.status.as_str())
            {
                left.remove(&key);
                took.push(since.elapsed());
            }
        }
        if !left.is_empty() && Instant::now() > deadline {
            panic!("orphans not re-dispatched {secs} s after the kill: {left:?}; their rows now: {rows:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    took
}

/// A01: SIGKILL a random worker at random points while many runs of five tasks execute, ten
/// times, starting a new worker after each kill. Every run succeeds; each task's recorded
/// completion is its current attempt's; duplicate executions stay under 10 × worker slots; every
/// orphan is re-dispatched within the lease plus a few seconds.
///
/// `SLUICE_A01_RUNS` sets the number of runs (default 1,000, as the plan says; about 50 s on two
/// cores).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a01_sigkill_random_workers_loses_no_run() {
    let _serial = SERIAL.lock().await;
    let runs: usize = std::env::var("SLUICE_A01_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    const SLOTS: usize = 4;
    const KILLS: usize = 10;
    let Setup { mut cluster, api, mut workers } = start(Options {
        name: "a01",
        worker_db_connections: 6,
        redispatch_secs: 5,
        env: vec![("SLUICE_WORKER_SLOTS".into(), SLOTS.to_string())],
        ..Options::default()
    })
    .await;
    let dir = SharedDir::new("a01");
    let d = dir.path().display();
    // a → (b, c, d) → e; each execution appends its attempt to a file of its own.
    let task = |id: &str, needs: &str| {
        format!(
            "      - id: {id}\n{needs}        shell: 'umask 0; echo \"$SLUICE_ATTEMPT\" >> \"{d}/$SLUICE_RUN_ID.$SLUICE_TASK_ID\"; echo \"attempt=$SLUICE_ATTEMPT\" >> \"$SLUICE_OUTPUT\"'\n        retries: {{ max: 10, backoff: fixed, initial: 100ms }}\n"
        )
    };
    let mut yaml = String::from("stages:\n  - id: s\n    tasks:\n");
    yaml.push_str(&task("a", ""));
    for id in ["b", "c", "d"] {
        yaml.push_str(&task(id, "        needs: [a]\n"));
    }
    yaml.push_str(&task("e", "        needs: [b, c, d]\n"));
    api.create_pipeline("a01", &yaml).await;

    let started = Instant::now();
    // Runs are started by four concurrent clients while the kills go on, each keeping at most
    // four of its runs unfinished: the workers always have work, and no backlog builds up (a
    // backlog older than the re-dispatch delay is pushed to Redis again at every reaper pass).
    let next = Arc::new(AtomicUsize::new(0));
    let mut starters = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (api, next) = (api.clone(), next.clone());
        starters.spawn(async move {
            let mut ids = vec![];
            let mut open = std::collections::VecDeque::new();
            while next.fetch_add(1, Ordering::SeqCst) < runs {
                while open.len() >= 4 {
                    let oldest: &String = open.front().unwrap();
                    if RUN_TERMINAL.contains(&api.run(oldest).await["status"].as_str().unwrap_or_default()) {
                        open.pop_front();
                    } else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                let id = api.start("a01", json!({})).await;
                open.push_back(id.clone());
                ids.push(id);
            }
            ids
        });
    }

    let db = cluster.db().await;
    let total_tasks = (runs * 5) as i64;
    let mut checks = tokio::task::JoinSet::new();
    let mut orphan_count = 0;
    let mut last_kill = Instant::now() - Duration::from_secs(10);
    for k in 0..KILLS {
        // Kill k once a random share of the work, between (k + 0.5) / 11 and (k + 1.5) / 11, is done.
        let share = (k as f64 + 0.5 + random_below(1000) as f64 / 1000.0) / 11.0;
        let threshold = (total_tasks as f64 * share) as i64;
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let done = db.count("SELECT COUNT(*) AS n FROM task_runs WHERE status = 'succeeded'").await;
            if done >= threshold && last_kill.elapsed() >= Duration::from_secs(1) {
                break;
            }
            assert!(Instant::now() < deadline, "no progress before kill {k}\n{}", cluster.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A random extra delay inside the current task executions.
        tokio::time::sleep(Duration::from_millis(random_below(50))).await;
        let slot = random_below(workers.len() as u64) as usize;
        let victim = workers[slot];
        let name = cluster.worker_name(victim);
        cluster.kill(victim);
        let killed_at = Instant::now();
        last_kill = killed_at;
        workers[slot] = cluster.spawn_worker();
        // The rows the dead worker held: they can only change through the reaper once PostgreSQL
        // has run what the worker sent before it died (a completion's commit, say).
        let orphans = match &name {
            Some(name) => {
                db.wait_disconnected(name).await;
                running_under(&db, name).await
            }
            None => vec![],
        };
        eprintln!(
            "kill {}: worker {victim} ({}) after {:?}, {} orphan(s)",
            k + 1,
            name.as_deref().unwrap_or("name not logged yet"),
            started.elapsed(),
            orphans.len()
        );
        orphan_count += orphans.len();
        checks.spawn(wait_redispatched(db.clone(), orphans, killed_at, 60));
    }
    let mut redispatch: Vec<Duration> = vec![];
    while let Some(r) = checks.join_next().await {
        redispatch.extend(r.unwrap());
    }
    let mut ids = vec![];
    while let Some(r) = starters.join_next().await {
        ids.extend(r.unwrap());
    }
    assert_eq!(ids.len(), runs);
    eprintln!("A01: {runs} runs started after {:?}", started.elapsed());
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let open = db
            .count(
                "SELECT COUNT(*) AS n FROM runs WHERE status NOT IN ('succeeded', 'failed', 'cancelled', 'timed_out')",
            )
            .await;
        if open == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{open} run(s) unfinished\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed();
    let spread = db
        .rows(
            "SELECT EXTRACT(EPOCH FROM MAX(created_at) - MIN(created_at))::float8 AS creating, \
             EXTRACT(EPOCH FROM AVG(finished_at - created_at))::float8 AS run_mean, \
             EXTRACT(EPOCH FROM MAX(finished_at - created_at))::float8 AS run_max FROM runs",
        )
        .await;
    eprintln!("A01: run timings (s): {}", spread[0]);

    // 0 lost: every run succeeded, every task too.
    let by_status = db.rows("SELECT status, COUNT(*)::int8 AS n FROM runs GROUP BY status").await;
    assert_eq!(by_status, vec![json!({ "status": "succeeded", "n": runs as i64 })], "{}", cluster.logs());
    let rows = db
        .rows(
            "SELECT run_id::text AS run_id, idx::int8 AS idx, task_id, attempt::int8 AS attempt, status, outputs \
             FROM task_runs",
        )
        .await;
    assert_eq!(rows.len(), runs * 5);
    let mut duplicates = 0;
    let mut max_attempt = 0;
    for r in &rows {
        let (run, task, attempt) =
            (r["run_id"].as_str().unwrap(), r["task_id"].as_str().unwrap(), r["attempt"].as_i64().unwrap());
        assert_eq!(r["status"], "succeeded", "{r}");
        max_attempt = max_attempt.max(attempt);
        // 0 duplicate completions: the completion recorded is the current attempt's.
        let outputs: Value = serde_json::from_str(r["outputs"].as_str().unwrap()).unwrap();
        assert_eq!(outputs["attempt"], attempt.to_string(), "{r}");
        // Executions: each attempt at most once (never two claims of one attempt), the
        // succeeded one among them.
        let text = std::fs::read_to_string(dir.path().join(format!("{run}.{task}")))
            .unwrap_or_else(|e| panic!("{run}.{task} never executed: {e}"));
        let executed: Vec<i64> = text.lines().map(|l| l.trim().parse().unwrap()).collect();
        let distinct: BTreeSet<i64> = executed.iter().copied().collect();
        assert_eq!(distinct.len(), executed.len(), "an attempt of {run}.{task} executed twice: {executed:?}");
        assert!(distinct.contains(&attempt), "{run}.{task}: attempt {attempt} not executed: {executed:?}");
        assert!(distinct.iter().all(|a| *a <= attempt), "{run}.{task}: {executed:?} beyond attempt {attempt}");
        duplicates += executed.len() - 1;
    }
    assert!(duplicates <= KILLS * SLOTS, "{duplicates} duplicate executions (at most {} allowed)", KILLS * SLOTS);
    assert!(orphan_count >= 1, "no kill hit a running task\n{}", cluster.logs());
    assert_eq!(redispatch.len(), orphan_count);
    let worst = redispatch.iter().max().copied().unwrap_or_default();
    let bound = Duration::from_secs_f64(LEASE_SECS as f64 + 2.0 * REAPER_SECS + 0.1 + 2.0);
    assert!(worst <= bound, "an orphan was re-dispatched {worst:?} after the kill (bound {bound:?})");
    assert_eq!(db.unfinished_tasks().await, 0);
    assert_eq!(running_without_lease(&db).await, 0);
    let late: usize =
        (0..cluster.children.len()).map(|i| cluster.log_of(i).matches("late completion ignored").count()).sum();
    eprintln!(
        "A01: {runs} runs × 5 tasks in {elapsed:?} with {KILLS} kills: {orphan_count} orphans, re-dispatched at worst \
         {worst:?} after the kill; {duplicates} duplicate executions; highest attempt {max_attempt}; \
         {late} late completions refused"
    );
    db.close().await;
}

/// One `POST /runs` with an idempotency key, retried (every 100 ms) until it is answered 201 or
/// 200; returns the run id and how many tries failed without an answer (or with a 5xx).
async fn start_until_answered(api: &Api, pipeline: &str, key: &str, answered: &AtomicUsize) -> (String, usize) {
    let url = api.url(&api.tenant_path(&format!("/pipelines/{pipeline}/runs")));
    let mut failures = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = api
            .client
            .post(&url)
            .bearer_auth(&api.token)
            .header("Idempotency-Key", key)
            .timeout(Duration::from_secs(20))
            .json(&json!({}))
            .send()
            .await;
        match r {
            Ok(r) if r.status() == StatusCode::CREATED || r.status() == StatusCode::OK => {
                if let Ok(v) = r.json::<Value>().await {
                    answered.fetch_add(1, Ordering::SeqCst);
                    return (v["id"].as_str().unwrap().to_owned(), failures);
                }
                failures += 1;
            }
            Ok(r) if r.status().is_server_error() => failures += 1,
            Ok(r) => {
                let status = r.status();
                panic!("{key}: {status} {}", r.text().await.unwrap_or_default());
            }
            Err(_) => failures += 1,
        }
        assert!(Instant::now() < deadline, "{key}: no answer in 120 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A07: `sluice serve` is SIGKILLed while 200 `POST /runs` with distinct `Idempotency-Key`s are
/// in flight and restarted; the client retries every request that got no answer. Exactly one run
/// per key, the answers agree with the database, every run finishes, and runs already running
/// on the workers are unaffected (they succeed, first attempt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a07_api_killed_during_idempotent_starts() {
    let _serial = SERIAL.lock().await;
    let Setup { mut cluster, api, .. } = start(Options { name: "a07", ..Options::default() }).await;
    api.create_pipeline("quick", "stages:\n  - id: s\n    tasks:\n      - id: t\n        noop: true\n").await;
    api.create_pipeline(
        "long",
        "stages:\n  - id: s\n    tasks:\n      - id: one\n        sleep: 3s\n      - id: two\n        needs: [one]\n        sleep: 2s\n",
    )
    .await;
    // Runs in progress on the workers when the API dies.
    let mut long = vec![];
    for _ in 0..3 {
        long.push(api.start("long", json!({})).await);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for id in &long {
        while task_of(&api.run(id).await, "one")["status"] != "running" {
            assert!(Instant::now() < deadline, "long run {id} did not start\n{}", cluster.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    let answered = Arc::new(AtomicUsize::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..200 {
        let (api, answered) = (api.clone(), answered.clone());
        clients.spawn(async move {
            let key = format!("a07-{i:03}");
            let (id, failures) = start_until_answered(&api, "quick", &key, &answered).await;
            (key, id, failures)
        });
    }
    // Kill the API once a few requests are answered: the rest are in flight or about to be sent.
    let deadline = Instant::now() + Duration::from_secs(60);
    while answered.load(Ordering::SeqCst) < 20 {
        assert!(Instant::now() < deadline, "no request answered\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    cluster.kill(0);
    let at_kill = answered.load(Ordering::SeqCst);
    let killed = Instant::now();
    let serve = cluster.spawn("serve");
    cluster.wait_ready(&api.client, 60).await;
    eprintln!("A07: API killed with {at_kill} of 200 answered; back in {:?}", killed.elapsed());
    assert!(cluster.try_wait(serve).is_none(), "the restarted sluice serve exited\n{}", cluster.logs());

    let mut answers: BTreeMap<String, String> = BTreeMap::new();
    let mut retried = 0;
    while let Some(r) = clients.join_next().await {
        let (key, id, failures) = r.unwrap();
        retried += usize::from(failures > 0);
        answers.insert(key, id);
    }
    assert_eq!(answers.len(), 200);
    assert!(retried >= 1, "no request was cut off by the kill; the test proves nothing");
    let ids: BTreeSet<&String> = answers.values().collect();
    assert_eq!(ids.len(), 200, "two keys were answered with the same run");
    // Exactly one run per key in the database, the one the client was given.
    let db = cluster.db().await;
    let rows = db
        .rows("SELECT idempotency_key AS key, id::text AS id FROM runs WHERE pipeline_name = 'quick' ORDER BY 1")
        .await;
    let stored: BTreeMap<String, String> = rows
        .iter()
        .map(|r| (r["key"].as_str().unwrap_or("<none>").to_owned(), r["id"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(rows.len(), 200, "runs of quick: {rows:#?}");
    // A key is stored as `api:<pipeline>:<user>:<sha256 of the key>`.
    let expected: BTreeMap<String, String> = answers
        .iter()
        .map(|(key, id)| {
            let hash = sluice_backend::auth::api_token::sha256_hex(key);
            let stored_key = stored.keys().find(|k| k.ends_with(&format!(":{hash}"))).cloned();
            (stored_key.unwrap_or_else(|| format!("<no run stored for {key}>")), id.clone())
        })
        .collect();
    assert_eq!(stored, expected);
    // Asking again with each key returns the same run.
    for (key, id) in answers.iter().step_by(10) {
        let counter = AtomicUsize::new(0);
        assert_eq!(&start_until_answered(&api, "quick", key, &counter).await.0, id);
    }
    // Every run finishes, including those whose dispatch died with the API.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let open = db
            .count(
                "SELECT COUNT(*) AS n FROM runs WHERE status NOT IN ('succeeded', 'failed', 'cancelled', 'timed_out')",
            )
            .await;
        if open == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{open} run(s) unfinished\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let statuses = db.rows("SELECT status, COUNT(*)::int8 AS n FROM runs GROUP BY status").await;
    assert_eq!(statuses, vec![json!({ "status": "succeeded", "n": 203 })]);
    for id in &long {
        let done = api.run(id).await;
        assert_eq!(done["status"], "succeeded", "{done:#}");
        for key in ["one", "two"] {
            assert_eq!(task_of(&done, key)["attempt"], 1, "{key} of {id} was disturbed: {done:#}");
        }
    }
    eprintln!(
        "A07: {retried} request(s) retried; 200 keys → 200 runs; all runs finished {:?} after the kill",
        killed.elapsed()
    );
    db.close().await;
}

/// SIGTERMs a worker with `slots` slots once `in_flight` of its tasks run (each a 4 s shell
/// sleep; `total` tasks in the run), starts another worker, and checks the drain: the first
/// worker takes no new work, every task in flight finishes there (or is released and run again
/// elsewhere), nothing is left `running` under its lease, and it exits 0. Returns how long the
/// worker took to exit.
async fn sigterm_drain(name: &'static str, total: usize, in_flight: usize, slots: usize) -> Duration {
    let Setup { mut cluster, api, .. } = start(Options { name, workers: 0, ..Options::default() }).await;
    let w1 = cluster.spawn_with("worker", &[("SLUICE_WORKER_SLOTS", slots.to_string())]);
    let dir = SharedDir::new(name);
    let d = dir.path().display();
    let mut yaml = String::from("stages:\n  - id: s\n    tasks:\n");
    for i in 0..total {
        yaml.push_str(&format!(
            "      - id: t{i}\n        shell: 'umask 0; echo \"$PPID $SLUICE_ATTEMPT start\" >> \"{d}/$SLUICE_TASK_ID\"; sleep 4; echo \"$PPID $SLUICE_ATTEMPT end\" >> \"{d}/$SLUICE_TASK_ID\"'\n        retries: {{ max: 2, backoff: fixed, initial: 100ms }}\n"
        ));
    }
    api.create_pipeline("drain", &yaml).await;
    let id = api.start("drain", json!({})).await;
    let db = cluster.db().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while db.count("SELECT COUNT(*) AS n FROM task_runs WHERE status = 'running'").await < in_flight as i64 {
        assert!(Instant::now() < deadline, "{in_flight} tasks never ran at once\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let name = cluster.worker_name(w1).expect("the worker logged its name");
    let running: BTreeSet<String> = db
        .rows(&format!(
            "SELECT task_id FROM task_runs WHERE status = 'running' AND lease_owner = '{}'",
            name.replace('\'', "''")
        ))
        .await
        .iter()
        .map(|r| r["task_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(running.len(), in_flight, "{running:?}");
    let signalled = Instant::now();
    cluster.signal(w1, nix::sys::signal::Signal::SIGTERM);
    // Another worker takes what the first no longer takes.
    let w2 = cluster.spawn_with("worker", &[("SLUICE_WORKER_SLOTS", slots.to_string())]);
    let status = cluster.wait_exit(w1, 40).await;
    let exited = signalled.elapsed();
    assert!(status.success(), "worker exit after SIGTERM: {status}\n{}", cluster.logs());
    assert!(exited <= Duration::from_secs(32), "the drain took {exited:?}");
    // Nothing stays running under the dead worker's lease.
    assert_eq!(running_under(&db, &name).await, vec![], "rows left running under {name}");
    let done = api.wait(&cluster, &id, 120).await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", cluster.logs());
    assert_eq!(db.unfinished_tasks().await, 0);
    let (p1, p2) = (cluster.pid(w1).as_raw().to_string(), cluster.pid(w2).as_raw().to_string());
    let mut finished = 0;
    for i in 0..total {
        let task = format!("t{i}");
        let text = std::fs::read_to_string(dir.path().join(&task)).unwrap();
        let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split(' ').collect()).collect();
        let t = task_of(&done, &task);
        if running.contains(&task) {
            // Finished by the draining worker, first attempt; or released and run again.
            if lines.iter().any(|l| l[0] == p1 && l[2] == "end") {
                assert_eq!(t["attempt"], 1, "{task}: {text}");
                finished += 1;
            } else {
                assert!(t["attempt"].as_i64() > Some(1), "{task} neither finished nor released: {text}");
                assert!(lines.iter().any(|l| l[0] == p2 && l[2] == "end"), "{task}: {text}");
            }
        } else {
            // Queued at the signal: the draining worker never started it.
            assert!(lines.iter().all(|l| l[0] == p2), "{task} started on the draining worker: {text}");
        }
    }
    eprintln!(
        "{name}: the worker exited 0 {exited:?} after SIGTERM; {finished} of {in_flight} tasks in flight finished there"
    );
    db.close().await;
    exited
}

/// A08: SIGTERM a worker with 10 tasks in flight (10 slots, 15 tasks in the run): each task
/// finishes or is released within the 30 s drain, 0 stuck, the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a08_sigterm_drains_ten_tasks_in_flight() {
    let _serial = SERIAL.lock().await;
    sigterm_drain("a08", 15, 10, 10).await;
}

/// The drain ends when the tasks in flight have ended: with 10 four-second tasks in flight the
/// worker exits a few seconds after SIGTERM, not at the end of the 30 s grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a08_drain_exits_once_the_tasks_in_flight_finished() {
    let _serial = SERIAL.lock().await;
    let exited = sigterm_drain("a08-exit", 10, 10, 10).await;
    assert!(exited < Duration::from_secs(15), "the worker exited {exited:?} after SIGTERM; its tasks took 4 s");
}

/// A08, a result whose commit is retried: a draining worker exits once the results of its
/// tasks are committed, not as soon as its slots are free. Here the database refuses the
/// task's result at first (a trigger of the test's), so the completion is retried with its
/// slot already given back; the worker stays until the retry commits, and exits 0 with the
/// task recorded as succeeded on its first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a08_drain_waits_for_a_result_whose_commit_is_retried() {
    use sea_orm::ConnectionTrait;
    let _serial = SERIAL.lock().await;
    // A 15 s lease: its holder retries a result for a heartbeat period (5 s), and the reaper
    // leaves the attempt alone meanwhile.
    let opts = Options { name: "a08-retry", workers: 0, lease_secs: 15, ..Options::default() };
    let Setup { mut cluster, api, .. } = start(opts).await;
    let w = cluster.spawn_worker();
    let dir = SharedDir::new("a08-retry");
    let go = dir.file("go");
    api.create_pipeline(
        "held",
        &format!("stages:\n  - id: s\n    tasks:\n      - id: t\n        shell: 'while [ ! -e \"{go}\" ]; do sleep 0.05; done'\n"),
    )
    .await;
    let id = api.start("held", json!({})).await;
    let db = cluster.db().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while db.count("SELECT COUNT(*) AS n FROM task_runs WHERE status = 'running'").await < 1 {
        assert!(Instant::now() < deadline, "the task never ran\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let name = cluster.worker_name(w).expect("the worker logged its name");
    db.0.execute_unprepared(
        "CREATE FUNCTION refuse_results() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'results are refused for now'; END $$; \
         CREATE TRIGGER refuse_results BEFORE UPDATE ON task_runs FOR EACH ROW \
         WHEN (OLD.status = 'running' AND NEW.status <> 'running') EXECUTE FUNCTION refuse_results()",
    )
    .await
    .unwrap();
    cluster.signal(w, nix::sys::signal::Signal::SIGTERM);
    std::fs::write(&go, "").unwrap();
    // The task ends; its result is refused, and retried.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cluster.log_of(w).contains("recording the task's result failed; trying again") {
        assert!(Instant::now() < deadline, "the result was never refused\n{}", cluster.logs());
        assert!(cluster.try_wait(w).is_none(), "the worker exited before its task ended\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its slot is free, its result is not recorded: the worker stays. (The result is retried
    // 0.05, 0.15, 0.35, 0.75, 1.55 and 3.15 s after the first refusal, then given up on: the
    // trigger goes well before the last try.)
    let refused = Instant::now();
    while refused.elapsed() < Duration::from_millis(500) {
        assert!(
            cluster.try_wait(w).is_none(),
            "the worker exited with its task's result unrecorded: {:?}\n{}",
            running_under(&db, &name).await,
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    db.0.execute_unprepared("DROP TRIGGER refuse_results ON task_runs").await.unwrap();
    let status = cluster.wait_exit(w, 30).await;
    assert!(status.success(), "worker exit after SIGTERM: {status}\n{}", cluster.logs());
    // Recorded before the worker exited: its first attempt, succeeded.
    let rows = db
        .rows(&format!("SELECT attempt::int8 AS attempt, status FROM task_runs WHERE run_id = '{id}' ORDER BY attempt"))
        .await;
    assert_eq!(rows, vec![json!({ "attempt": 1, "status": "succeeded" })], "{}", cluster.logs());
    let done = api.wait(&cluster, &id, 30).await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
    db.close().await;
}

/// A08, a task longer than the drain: once the grace (`SLUICE_WORKER_DRAIN_SECONDS`, 2 s here)
/// runs out, the worker kills the task's process group and gives the attempt back as lost, so
/// it runs again at once on another worker (not after its 15 s lease expires) without using a
/// retry; the worker exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a08_a_task_longer_than_the_drain_is_given_back_and_runs_again_at_once() {
    let _serial = SERIAL.lock().await;
    let opts = Options { name: "a08-release", workers: 0, lease_secs: 15, ..Options::default() };
    let Setup { mut cluster, api, .. } = start(opts).await;
    let w1 = cluster.spawn_with("worker", &[("SLUICE_WORKER_DRAIN_SECONDS", "2".into())]);
    let marker = format!("a08-release-{}", uuid::Uuid::new_v4().simple());
    let dir = SharedDir::new("a08-release");
    let go = dir.file("go");
    // No retries: a lost attempt runs again without using one. The first attempt outlasts
    // any drain; the second waits for the test, then succeeds.
    api.create_pipeline(
        "long",
        &format!(
            "stages:\n  - id: s\n    tasks:\n      - id: t\n        shell: ': {marker}; if [ \"$SLUICE_ATTEMPT\" = 1 ]; then sleep 300; fi; while [ ! -e \"{go}\" ]; do sleep 0.05; done'\n"
        ),
    )
    .await;
    let id = api.start("long", json!({})).await;
    let db = cluster.db().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while processes_with(&marker).is_empty() {
        assert!(Instant::now() < deadline, "the task never started\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let name = cluster.worker_name(w1).expect("the worker logged its name");
    let signalled = Instant::now();
    cluster.signal(w1, nix::sys::signal::Signal::SIGTERM);
    let w2 = cluster.spawn_worker();
    let status = cluster.wait_exit(w1, 30).await;
    let exited = signalled.elapsed();
    assert!(status.success(), "worker exit after SIGTERM: {status}\n{}", cluster.logs());
    assert!(exited >= Duration::from_secs(2), "the worker did not wait for its drain: {exited:?}");
    // Given back before the worker exited: the first attempt is over, recorded as lost (no
    // retry used) with why, and nothing runs under the worker's lease.
    assert!(exited < Duration::from_secs(15), "the worker took {exited:?} to give its task back");
    let rows = db
        .rows(&format!(
            "SELECT attempt::int8 AS attempt, lost::int8 AS lost, message, lease_owner FROM task_runs WHERE run_id = '{id}'"
        ))
        .await;
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0]["lost"], 1, "{rows:#?}");
    assert!(
        rows[0]["message"].as_str().is_some_and(|m| m.contains("released")),
        "the attempt does not say it was given back: {rows:#?}"
    );
    assert_eq!(running_under(&db, &name).await, vec![], "rows left running under {name}");
    let given_back = Instant::now();
    // The second attempt starts on the other worker at the reaper's next pass.
    let deadline = Instant::now() + Duration::from_secs(20);
    while db
        .count(&format!(
            "SELECT COUNT(*) AS n FROM task_runs WHERE run_id = '{id}' AND attempt = 2 AND status = 'running'"
        ))
        .await
        == 0
    {
        assert!(Instant::now() < deadline, "the second attempt never ran\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rerun = given_back.elapsed();
    std::fs::write(&go, "").unwrap();
    // The first attempt's process group is gone; the second's ends.
    wait_no_process_with(&marker, 10).await;
    let done = api.wait(&cluster, &id, 60).await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", cluster.logs());
    assert_eq!(task_of(&done, "t")["attempt"], 2, "{done:#}");
    assert!(cluster.log_of(w2).contains("dispatch received"), "the second worker ran nothing\n{}", cluster.logs());
    // The first attempt's lease, last extended at most a heartbeat (5 s) before the exit, would
    // have run out 10 s after it at the earliest.
    assert!(rerun < Duration::from_secs(8), "the second attempt started {rerun:?} after the worker exited");
    eprintln!(
        "a08-release: the worker gave its task back and exited 0 {exited:?} after SIGTERM; run again in {rerun:?}"
    );
    db.close().await;
}

/// A08 for the worker inside `sluice serve` when it consumes from Redis
/// (`SLUICE_WITH_WORKER`): on SIGTERM it drains like `sluice worker` and gives back what
/// outlasts the drain; the server exits 0, and the task runs again on a worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a08_the_worker_inside_sluice_serve_drains_over_redis() {
    let _serial = SERIAL.lock().await;
    let opts = Options { name: "a08-serve", workers: 0, lease_secs: 15, ..Options::default() };
    let Setup { mut cluster, api, .. } = start(opts).await;
    // The server again, with its own worker and a 2 s drain.
    cluster.kill(0);
    let serve = cluster
        .spawn_with("serve", &[("SLUICE_WITH_WORKER", "true".into()), ("SLUICE_WORKER_DRAIN_SECONDS", "2".into())]);
    cluster.wait_ready(&api.client, 60).await;
    let marker = format!("a08-serve-{}", uuid::Uuid::new_v4().simple());
    api.create_pipeline(
        "long",
        &format!(
            "stages:\n  - id: s\n    tasks:\n      - id: t\n        shell: ': {marker}; if [ \"$SLUICE_ATTEMPT\" = 1 ]; then sleep 300; fi'\n"
        ),
    )
    .await;
    let id = api.start("long", json!({})).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while processes_with(&marker).is_empty() {
        assert!(Instant::now() < deadline, "the task never started\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let signalled = Instant::now();
    cluster.signal(serve, nix::sys::signal::Signal::SIGTERM);
    let status = cluster.wait_exit(serve, 30).await;
    let exited = signalled.elapsed();
    assert!(status.success(), "sluice serve exit after SIGTERM: {status}\n{}", cluster.logs());
    assert!(exited >= Duration::from_secs(2), "the server did not wait for its drain: {exited:?}");
    assert!(exited < Duration::from_secs(15), "the server took {exited:?} to give its task back");
    wait_no_process_with(&marker, 10).await;
    let db = cluster.db().await;
    let rows =
        db.rows(&format!("SELECT lost::int8 AS lost, status, message FROM task_runs WHERE run_id = '{id}'")).await;
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0]["lost"], 1, "{rows:#?}");
    assert_ne!(rows[0]["status"], "running", "{rows:#?}");
    assert!(rows[0]["message"].as_str().is_some_and(|m| m.contains("released")), "{rows:#?}");
    // A server and a worker again: the task runs again, without using a retry.
    cluster.spawn("serve");
    cluster.wait_ready(&api.client, 60).await;
    cluster.spawn_worker();
    let done = api.wait(&cluster, &id, 60).await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", cluster.logs());
    assert_eq!(task_of(&done, "t")["attempt"], 2, "{done:#}");
    eprintln!("a08-serve: sluice serve gave its task back and exited 0 {exited:?} after SIGTERM");
    db.close().await;
}

/// A14: a worker SIGKILLed right after claiming a task, before its first heartbeat. The reaper
/// declares the attempt lost once the lease (3 s here) expires and queues the next attempt; no
/// row is ever `running` without a lease; the run succeeds on another worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a14_worker_dead_before_first_heartbeat() {
    let _serial = SERIAL.lock().await;
    let Setup { mut cluster, api, workers } = start(Options { name: "a14", workers: 1, ..Options::default() }).await;
    api.create_pipeline(
        "a14",
        // No retries: a lost attempt runs again without using one.
        "stages:\n  - id: s\n    tasks:\n      - id: t\n        shell: 'sleep 2; echo done'\n",
    )
    .await;
    let db = cluster.db().await;
    let id = api.start("a14", json!({})).await;
    let query = format!(
        "SELECT status, attempt::int8 AS attempt, lease_owner, \
         EXTRACT(EPOCH FROM (lease_expires_at - started_at))::float8 AS lease_left \
         FROM task_runs WHERE run_id = '{id}'"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = &db.rows(&query).await[0];
        if r["status"] == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "the task never ran: {r}\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let name = cluster.worker_name(workers[0]).unwrap();
    // The worker's connections carry its name, which is how the wait below knows them.
    assert!(db.connections_of(&name).await > 0, "no connection named {name}");
    cluster.kill(workers[0]);
    let killed = Instant::now();
    db.wait_disconnected(&name).await;
    // The lease was never extended: the worker died before its first heartbeat.
    let r = db.rows(&query).await[0].clone();
    assert_eq!(r["status"], "running", "{r}");
    assert_eq!(r["attempt"], 1, "{r}");
    let lease_left = r["lease_left"].as_f64().unwrap();
    assert!(lease_left <= LEASE_SECS as f64 + 0.01, "a heartbeat extended the lease: {r}");
    cluster.spawn_worker();
    let (mut lost, mut requeued) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    while requeued.is_none() {
        assert_eq!(running_without_lease(&db).await, 0, "a row is running without a lease");
        let r = &db.rows(&query).await[0];
        if lost.is_none() && !(r["status"] == "running" && r["attempt"] == 1) {
            lost = Some(killed.elapsed());
        }
        if r["attempt"].as_i64() >= Some(2)
            && ["queued", "running", "succeeded"].contains(&r["status"].as_str().unwrap())
        {
            requeued = Some(killed.elapsed());
        }
        assert!(Instant::now() < deadline, "the task was not re-dispatched: {r}\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (lost, requeued) = (lost.unwrap(), requeued.unwrap());
    // The lease counts from the claim, just before the kill; the reaper looks every second and
    // queues the retry (100 ms backoff) at its next pass.
    // The margins absorb a loaded machine.
    let lost_bound = Duration::from_secs_f64(LEASE_SECS as f64 + REAPER_SECS + 1.5);
    let requeue_bound = Duration::from_secs_f64(LEASE_SECS as f64 + 2.0 * REAPER_SECS + 0.1 + 1.5);
    assert!(lost <= lost_bound, "attempt 1 declared lost {lost:?} after the kill (bound {lost_bound:?})");
    assert!(requeued <= requeue_bound, "attempt 2 queued {requeued:?} after the kill (bound {requeue_bound:?})");
    let done = api.wait(&cluster, &id, 60).await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(task_of(&done, "t")["attempt"], 2);
    // The lost attempt used no retry; the run view says it was lost.
    assert_eq!(task_of(&done, "t")["lost"], 1, "{done:#}");
    assert_eq!(running_without_lease(&db).await, 0);
    eprintln!("A14: attempt 1 lost {lost:?} and attempt 2 queued {requeued:?} after the kill (lease {LEASE_SECS} s)");
    db.close().await;
}

/// Length of the Redis dispatch queue of `prefix`.
async fn dispatch_queue_len(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) -> i64 {
    redis::cmd("LLEN").arg(format!("{prefix}:dispatch:active")).query_async(conn).await.unwrap()
}

/// A backlog (more queued tasks than workers can start at once, for longer than the re-dispatch
/// delay) must not multiply the dispatches: each copy costs a claim attempt, so a queue flooded
/// at every reaper pass drains slower than it grows. A task nobody claimed is pushed again after
/// the delay, then after twice that, four times, ...: over a wait of `w` it has at most
/// 1 + log2(w / delay) copies. One worker with one slot, 40 half-second tasks (a 20 s backlog),
/// re-dispatch after 1 s: at most about 40 × (1 + log2 20) ≈ 210 pushes in all, and far fewer in
/// the queue at once (pushing again at every pass held 371).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_does_not_multiply_dispatches() {
    let _serial = SERIAL.lock().await;
    let Setup { cluster, api, workers } = start(Options {
        name: "storm",
        workers: 1,
        redispatch_secs: 1,
        env: vec![("SLUICE_WORKER_SLOTS".into(), "1".into())],
        ..Options::default()
    })
    .await;
    let mut yaml = String::from("stages:\n  - id: s\n    tasks:\n");
    for i in 0..40 {
        yaml.push_str(&format!("      - id: t{i}\n        sleep: 500ms\n"));
    }
    api.create_pipeline("backlog", &yaml).await;
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let id = api.start("backlog", json!({})).await;
    let mut longest = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        longest = longest.max(dispatch_queue_len(&mut conn, &cluster.redis_prefix).await);
        let run = api.run(&id).await;
        if RUN_TERMINAL.contains(&run["status"].as_str().unwrap_or_default()) {
            assert_eq!(run["status"], "succeeded", "{run:#}");
            break;
        }
        assert!(Instant::now() < deadline, "the run did not finish: {run:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let received = cluster.log_of(workers[0]).matches("dispatch received").count();
    eprintln!("backlog of 40: longest dispatch queue {longest}, {received} dispatches received");
    assert!(longest <= 160, "the dispatch queue held {longest} entries for 40 tasks");
    // What apalis keeps of handled dispatches is removed from Redis within seconds: the number
    // of keys under the prefix falls back below the number of tasks.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let keys = keys_under(&mut conn, &cluster.redis_prefix).await;
        if keys < 40 {
            break;
        }
        assert!(Instant::now() < deadline, "{keys} Redis keys left under the prefix after the run");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How many Redis keys start with `prefix:`.
async fn keys_under(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) -> usize {
    redis_keys(conn, prefix).await.len()
}
