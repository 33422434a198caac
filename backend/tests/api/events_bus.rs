//! The event bus between processes, on a real Redis (`SLUICE_TEST_REDIS_URL`, default
//! redis://127.0.0.1:6379): each bus stands for one process, with its own local channel.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use sluice_backend::engine::{RunEvent, bus::EventBus};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::broadcast,
    task::JoinHandle,
    time::timeout,
};
use uuid::Uuid;

fn redis_url() -> String {
    std::env::var("SLUICE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// `host:port` of the test Redis.
fn redis_addr() -> String {
    let url = redis_url();
    let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

fn prefix() -> String {
    format!("sluice-bus-test-{}", Uuid::new_v4().simple())
}

fn event(tenant: Uuid, text: &str) -> RunEvent {
    RunEvent {
        tenant,
        run_id: Uuid::new_v4(),
        kind: "log",
        index: Some(0),
        status: None,
        attempt: Some(1),
        lines: vec![serde_json::json!({ "at": "2026-01-01T00:00:00Z", "stream": "out", "text": text })],
        relayed: false,
    }
}

fn status_event(tenant: Uuid, status: &'static str) -> RunEvent {
    RunEvent { kind: "task", status: Some(status), lines: vec![], ..event(tenant, "") }
}

/// One "process": its local channel and its bus.
struct Process {
    events: broadcast::Sender<RunEvent>,
    bus: EventBus,
}

impl Process {
    async fn start(url: &str, prefix: &str) -> Self {
        let (events, _) = broadcast::channel(256);
        let bus = EventBus::spawn(url, prefix, &events).unwrap();
        timeout(Duration::from_secs(10), bus.subscribed()).await.expect("the bus subscribes to Redis");
        Self { events, bus }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.bus.stop();
    }
}

/// Everything that arrives on `rx` within `wait`.
async fn drain(rx: &mut broadcast::Receiver<RunEvent>, wait: Duration) -> Vec<RunEvent> {
    let mut out = vec![];
    while let Ok(Ok(e)) = timeout(wait, rx.recv()).await {
        out.push(e);
    }
    out
}

fn texts(events: &[RunEvent]) -> Vec<(String, bool)> {
    events
        .iter()
        .map(|e| {
            let text = e.lines.first().and_then(|l| l["text"].as_str()).unwrap_or(e.status.unwrap_or_default());
            (text.to_owned(), e.relayed)
        })
        .collect()
}

#[tokio::test]
async fn events_reach_every_other_process_once_and_never_echo_or_cross_prefixes() {
    let url = redis_url();
    let prefix = prefix();
    let a = Process::start(&url, &prefix).await;
    let b = Process::start(&url, &prefix).await;
    let foreign = Process::start(&url, &format!("{prefix}-other")).await;
    let mut at_a = a.events.subscribe();
    let mut at_b = b.events.subscribe();
    let mut at_foreign = foreign.events.subscribe();

    let tenant = Uuid::new_v4();
    let sent = event(tenant, "from a");
    a.events.send(sent.clone()).unwrap();
    // An event that already came from elsewhere is never published again.
    a.events.send(RunEvent { relayed: true, ..event(tenant, "relayed at a") }).unwrap();
    foreign.events.send(event(tenant, "other deployment")).unwrap();
    b.events.send(status_event(tenant, "running")).unwrap();

    let at_b = drain(&mut at_b, Duration::from_millis(700)).await;
    assert_eq!(texts(&at_b), [("running".to_owned(), false), ("from a".to_owned(), true)], "{at_b:?}");
    let got = &at_b[1];
    assert_eq!(
        (got.tenant, got.run_id, got.kind, got.index, got.attempt),
        (tenant, sent.run_id, "log", Some(0), Some(1))
    );
    assert_eq!(got.lines, sent.lines);

    let at_a = drain(&mut at_a, Duration::from_millis(300)).await;
    assert_eq!(
        texts(&at_a),
        [("from a".to_owned(), false), ("relayed at a".to_owned(), true), ("running".to_owned(), true)],
        "A sees its own events once (no echo) and B's status change: {at_a:?}"
    );
    assert_eq!(at_a[2].kind, "task");

    let at_foreign = drain(&mut at_foreign, Duration::from_millis(300)).await;
    assert_eq!(texts(&at_foreign), [("other deployment".to_owned(), false)], "{at_foreign:?}");
}

/// A TCP proxy to Redis whose connections can be cut, as if Redis went away and came back.
struct Proxy {
    port: u16,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let target = redis_addr();
        let list = conns.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                list.lock().unwrap().push(task);
            }
        });
        Self { port, conns, accept }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Closes every connection made so far.
    fn cut(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Sends events from `from` until one arrives at `to` (relayed), or fails after 20 s.
async fn until_relayed(from: &Process, to: &mut broadcast::Receiver<RunEvent>, tenant: Uuid) {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        assert!(tokio::time::Instant::now() < give_up, "the bus did not recover");
        let _ = from.events.send(event(tenant, "probe"));
        for e in drain(to, Duration::from_millis(200)).await {
            if e.relayed && e.tenant == tenant {
                return;
            }
        }
    }
}

/// Waits until a `gap` notice arrives on `rx` (other events pass by), or fails after `secs`.
async fn until_gap(rx: &mut broadcast::Receiver<RunEvent>, secs: u64, what: &str) {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let left = give_up.saturating_duration_since(tokio::time::Instant::now());
        match timeout(left, rx.recv()).await {
            Ok(Ok(e)) if e.kind == "gap" => {
                assert!(e.relayed, "a gap notice is never published as an event of this process");
                return;
            }
            Ok(Ok(_)) => {}
            other => panic!("no gap notice {what}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn the_bus_survives_losing_redis_announces_what_may_have_been_missed_and_relays_again() {
    let proxy = Proxy::start().await;
    let prefix = prefix();
    let direct = Process::start(&redis_url(), &prefix).await;
    let proxied = Process::start(&proxy.url(), &prefix).await;
    let mut at_direct = direct.events.subscribe();
    let mut at_proxied = proxied.events.subscribe();
    let tenant = Uuid::new_v4();
    until_relayed(&direct, &mut at_proxied, tenant).await;
    until_relayed(&proxied, &mut at_direct, tenant).await;
    // While connected, nothing announces a gap.
    assert!(drain(&mut at_direct, Duration::from_millis(300)).await.iter().all(|e| e.kind != "gap"));

    // Redis goes away for the proxied process: its subscription and its publishing connection.
    proxy.cut();
    // Events in the meantime may be lost; none crash anything.
    let _ = proxied.events.send(event(tenant, "during the outage"));
    // The proxied process's subscription comes back: its own watchers hear of the gap.
    until_gap(&mut at_proxied, 20, "where the subscription was lost").await;
    // Its events published meanwhile were dropped; once it publishes again, the other process
    // hears of the gap.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        assert!(tokio::time::Instant::now() < give_up, "no gap notice reached the other process");
        let _ = proxied.events.send(event(tenant, "after the outage"));
        if drain(&mut at_direct, Duration::from_millis(200)).await.iter().any(|e| e.kind == "gap") {
            break;
        }
    }
    // Both directions relay again, and a gap notice is never sent on by a process that got it.
    until_relayed(&direct, &mut at_proxied, tenant).await;
    until_relayed(&proxied, &mut at_direct, tenant).await;
    let again = drain(&mut at_proxied, Duration::from_millis(300)).await;
    assert!(again.iter().all(|e| e.kind != "gap"), "{again:?}");
}
