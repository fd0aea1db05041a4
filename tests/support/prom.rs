//! A real Prometheus server (Debian's `prometheus`) for the tests: scrapes targets every second,
//! optionally evaluates rule files, and answers instant queries over its HTTP API.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
};

/// A real Prometheus server; stopped on drop.
pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

/// One scrape target: its address and the `job` label it gets.
pub struct Target {
    pub job: String,
    pub addr: SocketAddr,
}

impl Prometheus {
    /// Scrapes `target` (job `knhk`) every second.
    pub fn start(target: SocketAddr) -> Prometheus {
        Self::start_with(
            &[Target {
                job: "knhk".into(),
                addr: target,
            }],
            None,
        )
    }

    /// Scrapes `targets` every second and, with `rules`, evaluates that rule file every second.
    pub fn start_with(targets: &[Target], rules: Option<&Path>) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        let mut yml = String::from("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n");
        if let Some(rules) = rules {
            yml.push_str(&format!("rule_files:\n  - '{}'\n", rules.display()));
        }
        yml.push_str("scrape_configs:\n");
        for t in targets {
            yml.push_str(&format!(
                "  - job_name: '{}'\n    scrape_timeout: 900ms\n    static_configs:\n      - targets: ['{}']\n",
                t.job, t.addr
            ));
        }
        std::fs::write(&config, yml).expect("write prometheus.yml");
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus (Debian package prometheus; cargo xtask setup installs it)");
        Prometheus {
            child,
            addr,
            _dir: dir,
        }
    }

    /// The JSON answer of `GET path` on the HTTP API, if it answered.
    pub fn api(&self, path_and_query: &str) -> Option<serde_json::Value> {
        let (_, body) = super::http::request(self.addr, "GET", path_and_query, &[], "")?;
        serde_json::from_str(&body).ok()
    }

    /// Every result of an instant PromQL query: (labels, value).
    pub fn query_all(&self, promql: &str) -> Option<Vec<(serde_json::Value, f64)>> {
        let json = self.api(&format!("/api/v1/query?query={}", encode(promql)))?;
        json["data"]["result"]
            .as_array()?
            .iter()
            .map(|r| Some((r["metric"].clone(), r["value"][1].as_str()?.parse().ok()?)))
            .collect()
    }

    /// The value of an instant PromQL query with one result, if it has one.
    pub fn query(&self, promql: &str) -> Option<f64> {
        self.query_all(promql)?.first().map(|(_, v)| *v)
    }

    /// Alerts now firing: (alertname, labels).
    pub fn firing(&self) -> Vec<(String, serde_json::Value)> {
        let Some(json) = self.api("/api/v1/alerts") else {
            return Vec::new();
        };
        json["data"]["alerts"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|x| x["state"] == "firing")
                    .map(|x| {
                        (
                            x["labels"]["alertname"].as_str().unwrap_or("").to_owned(),
                            x["labels"].clone(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Percent-encodes a query for a URL.
fn encode(promql: &str) -> String {
    let mut enc = String::new();
    for b in promql.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => enc.push(b as char),
            _ => enc.push_str(&format!("%{b:02X}")),
        }
    }
    enc
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
