//! `Http` tasks: an HTTP(S) request that can only reach permitted addresses.
//!
//! Every hop (the first URL and each redirect target, followed by hand) is checked before anything is sent:
//! the scheme must be `http` or `https`; an IP-literal host (as normalized by the `url` crate, so
//! `2852039166`, `0251.0376.0251.0376` and `0xa9fea9fe` are all 169.254.169.254) must be permitted; a
//! name is resolved and refused when none of its addresses is permitted. The connection itself resolves
//! names through [`GuardedResolver`], which drops non-permitted addresses, so a DNS answer that changes
//! between the check and the connect (rebinding) cannot reach a refused address. No proxy is used.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, LOCATION};
use reqwest::{Method, StatusCode};
use tokio::sync::watch;
use tokio::time::Instant;
use url::{Host, Url};

use sluice_domain::network::AllowedHost;

use crate::logs::LogSink;
use crate::ssrf::{ip_is_private_network, ip_permitted};
use crate::{ExecOutcome, HttpCall, Stream, TaskRequest, cancelled, deadline_reached};

type Outputs = BTreeMap<String, String>;

fn failed(message: impl Into<String>) -> ExecOutcome {
    ExecOutcome::Failed { exit_code: None, message: message.into() }
}

/// What a task may connect to: the tenant's allow-listed networks and host names.
struct Allowed {
    networks: Vec<(IpAddr, u8)>,
    hosts: Vec<AllowedHost>,
}

/// DNS resolver that only returns permitted addresses.
struct GuardedResolver {
    allow: Arc<Allowed>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow = self.allow.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let addrs = permitted_addrs(&host, resolved, &allow)?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// The addresses `host` resolved to that a task may connect to: public ones, those inside an
/// allow-listed network and, when the host's name is allow-listed, those in a private network;
/// an error naming them when there are none.
fn permitted_addrs(host: &str, resolved: Vec<SocketAddr>, allow: &Allowed) -> Result<Vec<SocketAddr>, std::io::Error> {
    let named = allow.hosts.iter().any(|h| h.matches(host));
    let permitted: Vec<SocketAddr> = resolved
        .iter()
        .copied()
        .filter(|a| ip_permitted(a.ip(), &allow.networks) || (named && ip_is_private_network(a.ip())))
        .collect();
    if permitted.is_empty() {
        let list: Vec<String> = resolved.iter().map(|a| a.ip().to_string()).collect();
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{host} resolves only to refused addresses ({}) (SSRF policy)", list.join(", ")),
        ));
    }
    Ok(permitted)
}

/// Checks one hop before any connection is made.
async fn check_url(url: &Url, allow: &Allowed) -> Result<(), String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("URL scheme {:?} refused: only http and https are allowed", url.scheme()));
    }
    match url.host() {
        None => Err("URL has no host".to_owned()),
        Some(Host::Ipv4(v4)) => check_ip(IpAddr::V4(v4), &allow.networks),
        Some(Host::Ipv6(v6)) => check_ip(IpAddr::V6(v6), &allow.networks),
        Some(Host::Domain(name)) => {
            // An IP literal in a form `url` did not normalize would still be treated as an address.
            if let Ok(ip) = name.trim_matches(|c| c == '[' || c == ']').parse::<IpAddr>() {
                return check_ip(ip, &allow.networks);
            }
            let refused = |e: std::io::Error| format!("address refused: {e}");
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((name, 0)).await.map_err(refused)?.collect();
            permitted_addrs(name, resolved, allow).map(|_| ()).map_err(refused)
        }
    }
}

fn check_ip(ip: IpAddr, allow: &[(IpAddr, u8)]) -> Result<(), String> {
    if ip_permitted(ip, allow) {
        Ok(())
    } else {
        Err(format!("address {ip} refused (SSRF policy: not a public address and not allow-listed)"))
    }
}

/// Runs an `Http` task.
pub(crate) async fn run(
    call: &HttpCall,
    req: &TaskRequest,
    sink: Arc<LogSink>,
    deadline: Option<Instant>,
    cancel: &mut watch::Receiver<bool>,
) -> (ExecOutcome, Outputs) {
    let timeout = match (call.timeout, req.timeout) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let deadline = match (deadline, timeout.map(|t| Instant::now() + t)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let mut outputs = Outputs::new();
    let outcome = tokio::select! {
        o = request(call, req, &sink, &mut outputs) => o,
        _ = deadline_reached(deadline) => ExecOutcome::TimedOut,
        _ = cancelled(cancel) => ExecOutcome::Cancelled,
    };
    if let ExecOutcome::Failed { message, .. } = &outcome {
        sink.system(&format!("HTTP task failed: {message}")).await;
    }
    (outcome, outputs)
}

async fn request(call: &HttpCall, req: &TaskRequest, sink: &LogSink, outputs: &mut Outputs) -> ExecOutcome {
    let policy = &req.http;
    let mut url = match Url::parse(call.url.trim()) {
        Ok(u) => u,
        Err(e) => return failed(format!("invalid URL: {e}")),
    };
    if !matches!(url.scheme(), "http" | "https") {
        return failed(format!("URL scheme {:?} refused: only http and https are allowed", url.scheme()));
    }
    let mut method = match Method::from_bytes(call.method.trim().to_ascii_uppercase().as_bytes()) {
        Ok(m) => m,
        Err(_) => return failed(format!("invalid HTTP method {:?}", call.method)),
    };
    let mut headers = HeaderMap::new();
    for (name, value) in &call.headers {
        let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) else {
            return failed(format!("invalid header {name:?}"));
        };
        headers.append(n, v);
    }
    let mut body = call.body.clone();

    let allow = Arc::new(Allowed { networks: policy.allow.clone(), hosts: policy.allow_hosts.clone() });
    let client = match reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(Arc::new(GuardedResolver { allow: allow.clone() }))
        .connect_timeout(Duration::from_secs(30))
        .user_agent(concat!("sluice-worker/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(c) => c,
        Err(e) => return failed(format!("cannot build the HTTP client: {e}")),
    };

    let mut hop = 0usize;
    loop {
        if let Err(msg) = check_url(&url, &allow).await {
            return failed(format!("{msg}: {}", shown(&url)));
        }
        let mut rb = client.request(method.clone(), url.clone()).headers(headers.clone());
        if let Some(b) = &body {
            rb = rb.body(b.clone());
        }
        let mut resp = match rb.send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return ExecOutcome::TimedOut,
            Err(e) => return failed(format!("{method} {}: {}", shown(&url), error_chain(&e.without_url()))),
        };
        let status = resp.status();
        sink.system(&format!("HTTP {method} {} -> {}", shown(&url), status.as_u16())).await;

        if status.is_redirection()
            && let Some(location) = resp.headers().get(LOCATION)
        {
            if hop >= policy.max_redirects {
                return failed(format!("too many redirects (more than {})", policy.max_redirects));
            }
            let next = match location.to_str().ok().and_then(|l| url.join(l).ok()) {
                Some(n) => n,
                None => return failed(format!("invalid redirect location from {}", shown(&url))),
            };
            if status == StatusCode::SEE_OTHER
                || (matches!(status, StatusCode::MOVED_PERMANENTLY | StatusCode::FOUND) && method == Method::POST)
            {
                method = Method::GET;
                body = None;
                headers.remove(reqwest::header::CONTENT_TYPE);
                headers.remove(reqwest::header::CONTENT_LENGTH);
            }
            if next.origin() != url.origin() {
                // What the task sends (credentials in any header, a body) is meant for the origin
                // it named: another origin gets none of it, and never over plain HTTP after HTTPS.
                if url.scheme() == "https" && next.scheme() != "https" {
                    return failed(format!("refused a redirect from https to {}", shown(&next)));
                }
                if body.is_some() {
                    return failed(format!(
                        "refused a redirect to another origin that would send the request body again: {}",
                        shown(&next)
                    ));
                }
                headers.clear();
            }
            url = next;
            hop += 1;
            continue;
        }

        let mut data = Vec::new();
        let mut cut = false;
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    let room = policy.max_body_bytes.saturating_sub(data.len());
                    if chunk.len() > room {
                        data.extend_from_slice(&chunk[..room]);
                        cut = true;
                        break;
                    }
                    data.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) if e.is_timeout() => return ExecOutcome::TimedOut,
                Err(e) => return failed(format!("reading the response body: {}", error_chain(&e))),
            }
        }
        drop(resp);
        sink.output_bytes(Stream::Stdout, &data).await;
        if cut {
            sink.system(&format!("[response body truncated after {} bytes]", policy.max_body_bytes)).await;
        }
        outputs.insert("status".to_owned(), status.as_u16().to_string());
        let accepted = if call.expect_status.is_empty() {
            status.is_success()
        } else {
            call.expect_status.contains(&status.as_u16())
        };
        return if accepted {
            ExecOutcome::Succeeded
        } else {
            failed(format!("unexpected HTTP status {}", status.as_u16()))
        };
    }
}

/// A URL as logs and messages show it: without user name, password, query and fragment, which
/// may carry a secret in an encoded form that the masking of logs does not know.
fn shown(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    let query = u.query().is_some();
    u.set_query(None);
    u.set_fragment(None);
    if query { format!("{u}?…") } else { u.to_string() }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_msg = s.to_string();
        if !msg.contains(&s_msg) {
            msg.push_str(": ");
            msg.push_str(&s_msg);
        }
        source = s.source();
    }
    msg
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|s| SocketAddr::new(s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0])), 0)).collect()
    }

    fn kept(host: &str, resolved: &[&str], allow: &Allowed) -> Result<Vec<String>, String> {
        permitted_addrs(host, addrs(resolved), allow)
            .map(|a| a.iter().map(|a| a.ip().to_string()).collect())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn an_allow_listed_name_reaches_its_private_addresses_and_nothing_else() {
        let allow = Allowed {
            networks: vec![],
            hosts: vec![
                AllowedHost::parse("build.corp.example").unwrap(),
                AllowedHost::parse("*.svc.corp.example").unwrap(),
            ],
        };
        let everything = ["10.1.2.3", "fd00::7", "127.0.0.1", "169.254.169.254", "::ffff:127.0.0.1", "8.8.8.8"];
        assert_eq!(kept("build.corp.example", &everything, &allow).unwrap(), ["10.1.2.3", "fd00::7", "8.8.8.8"]);
        assert_eq!(kept("api.svc.corp.example", &everything, &allow).unwrap(), ["10.1.2.3", "fd00::7", "8.8.8.8"]);
        // Other names get public addresses only.
        assert_eq!(kept("other.corp.example", &everything, &allow).unwrap(), ["8.8.8.8"]);
        let e = kept("other.corp.example", &["10.1.2.3"], &allow).unwrap_err();
        assert!(e.contains("resolves only to refused addresses (10.1.2.3)"), "{e}");
        // A name never opens loopback or link-local, whatever it resolves to.
        let e = kept("build.corp.example", &["127.0.0.1", "169.254.169.254"], &allow).unwrap_err();
        assert!(e.contains("refused"), "{e}");
        // A network entry does.
        let allow = Allowed { networks: vec![(IpAddr::from([127, 0, 0, 0]), 8)], hosts: vec![] };
        assert_eq!(kept("anything.example", &["127.0.0.1", "10.0.0.1"], &allow).unwrap(), ["127.0.0.1"]);
    }
}
