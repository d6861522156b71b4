//! Tests of the ops server, by behaviour: `metrics` (the text a scraper parses),
//! `health` (healthCheckNodePort answers and listeners, liveness), `server` (real HTTP
//! on loopback), `kernel` (as root: metrics read from a real loaded object's maps). This
//! page holds what they share: a strict parser of the text format, desired states with
//! health-checked services, and a plain HTTP client.

mod health;
mod kernel;
mod metrics;
mod server;

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::model::{DesiredState, Endpoint, Protocol, ServicePortId, ServicePortState};

/// One sample of the Prometheus text format: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A strict-enough parser of the text format: every non-comment line must be
/// `name{k="v",...} value`, every sample's family must have a `# TYPE` line before it.
fn parse(text: &str) -> (BTreeMap<String, String>, Vec<Sample>) {
    let mut types = BTreeMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').expect("TYPE line has a type");
            types.insert(name.to_owned(), ty.to_owned());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = value.parse().expect("sample value is a number");
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => {
                let l = l.strip_suffix('}').expect("labels end with }");
                let mut m = BTreeMap::new();
                for kv in l.split(',').filter(|s| !s.is_empty()) {
                    let (k, v) = kv.split_once('=').expect("label k=v");
                    let v = v
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .expect("label value quoted");
                    m.insert(k.to_owned(), v.to_owned());
                }
                (n.to_owned(), m)
            }
            None => (series.to_owned(), BTreeMap::new()),
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.contains_key(*f)))
            .unwrap_or(&name)
            .to_owned();
        assert!(
            types.contains_key(&family),
            "sample {name} without a TYPE line"
        );
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    (types, samples)
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels.len() == s.labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn ep(addr: &str, port: u16) -> Endpoint {
    Endpoint {
        addr: ip(addr),
        port,
        target: None,
    }
}

/// Service `ns/name` with one port per entry of `ports`: (port name, healthCheckNodePort,
/// local endpoints).
fn with_service(
    d: &mut DesiredState,
    ns: &str,
    name: &str,
    ports: &[(&str, Option<u16>, Vec<Endpoint>)],
) {
    for (port_name, hc, local) in ports {
        d.services.insert(
            ServicePortId::new(ns, name, port_name, Protocol::Tcp),
            ServicePortState {
                endpoints: local.clone(),
                local_endpoints: local.clone(),
                external_local: true,
                health_check_node_port: *hc,
                ..Default::default()
            },
        );
    }
}

/// A plain HTTP/1.1 GET: (status, headers lower-cased, body).
fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, BTreeMap<String, String>, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP head");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok((status, headers, body.to_owned()))
}

async fn get_async(
    addr: SocketAddr,
    path: &'static str,
) -> std::io::Result<(u16, BTreeMap<String, String>, String)> {
    tokio::task::spawn_blocking(move || get(addr, path))
        .await
        .expect("client thread")
}

/// Waits until nothing accepts connections on `addr` (an aborted server task lets go of
/// its socket when the runtime next gets to it).
async fn wait_closed(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while get_async(addr, "/").await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "{addr} still accepts connections"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("ephemeral port")
        .port()
}
