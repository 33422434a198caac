//! HTTP tasks against local servers on loopback (test plan D19 and the HTTP executor behaviour).
//! Only loopback addresses are ever connected to; the refused ones are refused before any connection.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{TempDir, dump, run, texts};
use sluice_worker::{ExecAction, ExecOutcome, ExecResult, HttpCall, LogLine, Stream, TaskRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A tiny HTTP/1.1 server that counts the connections it accepts.
struct Server {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
}

impl Server {
    async fn start(ip: IpAddr) -> Option<Server> {
        let listener = TcpListener::bind((ip, 0)).await.ok()?;
        let addr = listener.local_addr().ok()?;
        let accepts = Arc::new(AtomicUsize::new(0));
        let counter = accepts.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream));
            }
        });
        Some(Server { addr, accepts })
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }
}

async fn serve(mut stream: TcpStream) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let target = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
    let (status, extra, body): (&str, String, Vec<u8>) = match path {
        "/ok" => ("200 OK", String::new(), b"hello\nworld\n".to_vec()),
        "/big" => ("200 OK", String::new(), vec![b'z'; 100_000]),
        "/status500" => ("500 Internal Server Error", String::new(), b"boom".to_vec()),
        "/redirect" => ("302 Found", format!("Location: {query}\r\n"), Vec::new()),
        "/redirect307" => ("307 Temporary Redirect", format!("Location: {query}\r\n"), Vec::new()),
        // The request's header lines, lower-cased, one per body line.
        "/headers" => ("200 OK", String::new(), head.to_ascii_lowercase().into_bytes()),
        "/hang" => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            return;
        }
        _ => ("404 Not Found", String::new(), Vec::new()),
    };
    let response = format!("HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.write_all(&body).await;
    let _ = stream.shutdown().await;
}

fn call(url: &str) -> HttpCall {
    HttpCall {
        method: "GET".into(),
        url: url.into(),
        headers: Vec::new(),
        body: None,
        expect_status: Vec::new(),
        timeout: Some(Duration::from_secs(10)),
    }
}

fn loopback_allowed() -> Vec<(IpAddr, u8)> {
    vec![(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8)]
}

async fn http(call: HttpCall, allow: Vec<(IpAddr, u8)>, root: &TempDir) -> (ExecResult, Vec<LogLine>) {
    let mut req = TaskRequest::new(ExecAction::Http(call), root.path());
    req.http.allow = allow;
    run(req).await
}

fn failure(res: &ExecResult) -> String {
    match &res.outcome {
        ExecOutcome::Failed { message, .. } => message.clone(),
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[tokio::test]
async fn loopback_allowed_only_via_allow_list() {
    let root = TempDir::new("http-allow");
    let server = Server::start(IpAddr::V4(Ipv4Addr::LOCALHOST)).await.expect("server");

    let (res, lines) = http(call(&server.url("/ok")), Vec::new(), &root).await;
    assert!(failure(&res).contains("refused"), "{res:?}");
    assert_eq!(server.accepts(), 0, "refused before connect");

    let (res, lines2) = http(call(&server.url("/ok")), loopback_allowed(), &root).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded, "{}", dump(&lines2));
    assert_eq!(server.accepts(), 1);
    assert_eq!(texts(&lines2, Stream::Stdout), vec!["hello", "world"]);
    assert!(texts(&lines2, Stream::System).iter().any(|l| l == &format!("HTTP GET {} -> 200", server.url("/ok"))));
    assert_eq!(res.outputs.get("status").map(String::as_str), Some("200"));
    drop(lines);
}

/// The `url` crate normalizes the numeric IPv4 spellings to 169.254.169.254 (so the IP check sees them).
#[test]
fn url_normalizes_numeric_hosts() {
    for u in ["http://2852039166/", "http://0251.0376.0251.0376/", "http://0xa9fea9fe/", "http://0xA9.0xFE.43518/"] {
        let parsed = url::Url::parse(u).expect("parses");
        assert_eq!(parsed.host(), Some(url::Host::Ipv4(Ipv4Addr::new(169, 254, 169, 254))), "{u}");
    }
}

/// D19: every listed target is refused before a connection is attempted.
#[tokio::test]
async fn d19_ssrf_targets_refused_before_connect() {
    let root = TempDir::new("d19");
    let v4 = Server::start(IpAddr::V4(Ipv4Addr::LOCALHOST)).await.expect("server");
    let v6 = Server::start("::1".parse().expect("ip")).await;
    let p4 = v4.addr.port();
    let mut targets = vec![
        format!("http://127.0.0.1:{p4}/"),
        format!("http://localhost:{p4}/"),
        format!("http://[::ffff:127.0.0.1]:{p4}/"),
        format!("http://[::ffff:7f00:1]:{p4}/"),
        format!("http://2130706433:{p4}/"),
        format!("http://0x7f.1:{p4}/"),
        format!("http://0177.0.0.1:{p4}/"),
        format!("http://127.1:{p4}/"),
        format!("http://LOCALHOST.:{p4}/"),
        format!("https://127.0.0.1:{p4}/"),
        "http://127.0.0.1/".into(),
        "http://localhost/".into(),
        "http://[::1]/".into(),
        "http://169.254.169.254/".into(),
        "http://169.254.169.254/latest/meta-data/".into(),
        "http://2852039166/".into(),
        "http://0251.0376.0251.0376/".into(),
        "http://0xa9fea9fe/".into(),
        "http://[::ffff:127.0.0.1]/".into(),
        "http://[::ffff:169.254.169.254]/".into(),
        "http://[fe80::1]/".into(),
        "http://[fd00::1]/".into(),
        "http://10.0.0.1/".into(),
        "http://172.16.0.1/".into(),
        "http://192.168.0.1/".into(),
        "http://100.64.0.1/".into(),
        "http://0.0.0.0/".into(),
        "http://[::]/".into(),
        "http://224.0.0.1/".into(),
        "http://255.255.255.255/".into(),
        "file:///etc/passwd".into(),
        "gopher://x/".into(),
        "ftp://127.0.0.1/".into(),
        "data:text/plain,hi".into(),
        "not a url".into(),
    ];
    if let Some(v6) = &v6 {
        targets.push(format!("http://[::1]:{}/", v6.addr.port()));
    } else {
        eprintln!("note: no IPv6 loopback; [::1] listener part skipped");
    }
    for t in &targets {
        let start = Instant::now();
        let (res, lines) = http(call(t), Vec::new(), &root).await;
        let msg = failure(&res);
        assert!(
            msg.contains("refused") || msg.contains("invalid URL"),
            "{t}: unexpected failure {msg}\n{}",
            dump(&lines)
        );
        assert!(start.elapsed() < Duration::from_secs(3), "{t} took {:?}", start.elapsed());
        assert!(!lines.iter().any(|l| l.text.starts_with("HTTP GET")), "{t}: a request was made");
    }
    assert_eq!(v4.accepts(), 0, "connections reached the IPv4 listener");
    if let Some(v6) = &v6 {
        assert_eq!(v6.accepts(), 0, "connections reached the IPv6 listener");
    }
    // A narrower allow-list does not open the rest of the range.
    let (res, _) =
        http(call("http://169.254.169.254/"), vec![(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 32)], &root).await;
    assert!(failure(&res).contains("refused"));
}

/// A redirect from an allowed server to a refused address is refused at that hop, with no connection.
#[tokio::test]
async fn redirect_hops_are_rechecked() {
    let root = TempDir::new("redir");
    let allowed = Server::start(IpAddr::V4(Ipv4Addr::LOCALHOST)).await.expect("server");
    let other = Server::start(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))).await.expect("second loopback server");
    let only_first = vec![(IpAddr::V4(Ipv4Addr::LOCALHOST), 32)];

    let target = allowed.url(&format!("/redirect?{}", other.url("/ok")));
    let (res, lines) = http(call(&target), only_first.clone(), &root).await;
    let msg = failure(&res);
    assert!(msg.contains("127.0.0.2") && msg.contains("refused"), "{msg}\n{}", dump(&lines));
    assert_eq!(allowed.accepts(), 1);
    assert_eq!(other.accepts(), 0);

    let target = allowed.url("/redirect?http://169.254.169.254/latest/meta-data/");
    let (res, _) = http(call(&target), only_first.clone(), &root).await;
    assert!(failure(&res).contains("169.254.169.254"));

    let target = allowed.url("/redirect?file:///etc/passwd");
    let (res, _) = http(call(&target), only_first.clone(), &root).await;
    assert!(failure(&res).contains("scheme"));

    // Permitted hops are followed (relative location too), up to max_redirects.
    let (res, lines) = http(call(&allowed.url("/redirect?/ok")), only_first.clone(), &root).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded, "{}", dump(&lines));
    assert_eq!(texts(&lines, Stream::Stdout), vec!["hello", "world"]);
    let mut req = TaskRequest::new(ExecAction::Http(call(&allowed.url("/redirect?/ok"))), root.path());
    req.http.allow = only_first;
    req.http.max_redirects = 0;
    let (res, _) = run(req).await;
    assert!(failure(&res).contains("too many redirects"));
}

#[tokio::test]
async fn body_cap_status_check_timeout_and_masking() {
    let root = TempDir::new("http-misc");
    let server = Server::start(IpAddr::V4(Ipv4Addr::LOCALHOST)).await.expect("server");

    let mut req = TaskRequest::new(ExecAction::Http(call(&server.url("/big"))), root.path());
    req.http.allow = loopback_allowed();
    req.http.max_body_bytes = 1000;
    let (res, lines) = run(req).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded);
    assert_eq!(texts(&lines, Stream::Stdout).concat().len(), 1000);
    assert!(texts(&lines, Stream::System).contains(&"[response body truncated after 1000 bytes]".to_owned()));

    let (res, _) = http(call(&server.url("/status500")), loopback_allowed(), &root).await;
    assert!(failure(&res).contains("unexpected HTTP status 500"));
    assert_eq!(res.outputs.get("status").map(String::as_str), Some("500"));
    let mut c = call(&server.url("/status500"));
    c.expect_status = vec![500];
    let (res, _) = http(c, loopback_allowed(), &root).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded);
    let mut c = call(&server.url("/ok"));
    c.expect_status = vec![201];
    let (res, _) = http(c, loopback_allowed(), &root).await;
    assert!(failure(&res).contains("unexpected HTTP status 200"));

    let mut c = call(&server.url("/hang"));
    c.timeout = Some(Duration::from_millis(300));
    let start = Instant::now();
    let (res, _) = http(c, loopback_allowed(), &root).await;
    assert_eq!(res.outcome, ExecOutcome::TimedOut);
    assert!(start.elapsed() < Duration::from_secs(3));

    // A URL's query (where secrets often go) is not logged at all.
    let secret = "tok-9f8e7d6c5b4a";
    let mut req = TaskRequest::new(ExecAction::Http(call(&server.url(&format!("/ok?key={secret}")))), root.path());
    req.http.allow = loopback_allowed();
    req.secrets = vec![secret.into()];
    let (res, lines) = run(req).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded);
    assert!(!dump(&lines).contains(secret));
    assert!(texts(&lines, Stream::System).iter().any(|l| l.contains("/ok?… -> 200")), "{}", dump(&lines));

    let mut c = call(&server.url("/ok"));
    c.method = "BAD METHOD".into();
    let (res, _) = http(c, loopback_allowed(), &root).await;
    assert!(failure(&res).contains("method"));
}

/// A redirect to another origin gets none of what the task sends: no header of its own (API
/// keys in any header) and no body; the same origin gets them all. URLs are logged without
/// credentials or query.
#[tokio::test]
async fn another_origin_gets_no_header_or_body_of_the_task() {
    let root = TempDir::new("origin");
    let first = Server::start(IpAddr::V4(Ipv4Addr::LOCALHOST)).await.expect("server");
    let second = Server::start(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))).await.expect("second loopback server");
    let keyed = |url: String| HttpCall { headers: vec![("X-Api-Key".into(), "k-123".into())], ..call(&url) };

    let (res, lines) = http(keyed(first.url("/redirect?/headers")), loopback_allowed(), &root).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded, "{}", dump(&lines));
    assert!(texts(&lines, Stream::Stdout).iter().any(|l| l.starts_with("x-api-key: k-123")), "{}", dump(&lines));

    let elsewhere = first.url(&format!("/redirect?{}", second.url("/headers")));
    let (res, lines) = http(keyed(elsewhere), loopback_allowed(), &root).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded, "{}", dump(&lines));
    let received = texts(&lines, Stream::Stdout);
    assert!(received.iter().any(|l| l.starts_with("get /headers")), "{}", dump(&lines));
    assert!(!received.iter().any(|l| l.contains("k-123")), "the key went to another origin: {}", dump(&lines));
    // The log shows each hop without its query.
    let system = texts(&lines, Stream::System);
    assert!(system.contains(&format!("HTTP GET {} -> 302", first.url("/redirect?…"))), "{system:?}");

    // A body would be sent again by a 307: refused for another origin, before connecting to it.
    let posted = |url: String| HttpCall { method: "POST".into(), body: Some("secret body".into()), ..keyed(url) };
    let before = second.accepts();
    let elsewhere = first.url(&format!("/redirect307?{}", second.url("/headers")));
    let (res, _) = http(posted(elsewhere), loopback_allowed(), &root).await;
    assert!(failure(&res).contains("another origin"), "{}", failure(&res));
    assert_eq!(second.accepts(), before);

    // User name and password in the URL are not logged.
    let url = first.url("/ok").replace("http://", "http://user:p%40ss@");
    let (res, lines) = http(call(&url), loopback_allowed(), &root).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded, "{}", dump(&lines));
    assert!(!dump(&lines).contains("p%40ss") && !dump(&lines).contains("user:"), "{}", dump(&lines));
}
