//! The reference docs cannot drift from the code: every configuration key in
//! `docs/configuration.md` is set by a checked example that the real `check-config` accepts (and
//! every key the examples set is documented); every `tollgate_*` metric in `docs/metrics.md`
//! appears in a real scrape (and every scraped family is documented); every relative link in
//! README.md and docs/ points to a file that exists.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

/// The marker line before each fenced TOML example that `check-config` must accept.
const EXAMPLE_MARKER: &str = "<!-- check-config:";

/// The configuration's top-level sections: a reference-table row names a key when its first
/// cell starts with one of them.
const SECTIONS: [&str; 9] = [
    "server",
    "settlement",
    "ledger",
    "routing",
    "store",
    "buckets",
    "providers",
    "models",
    "keys",
];

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Runs `tollgate check-config FILE`: (exit code, stdout + stderr).
fn check_config(path: &Path) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["check-config", path.to_str().unwrap()])
        .env_remove("TOLLGATE_ADMIN_TOKEN")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// The fenced ```toml blocks that follow a marker line: (marker line, block text).
fn checked_examples(md: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = md.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if !line.trim_start().starts_with(EXAMPLE_MARKER) {
            continue;
        }
        let fence = lines.get(i + 1).map(|l| l.trim());
        assert_eq!(
            fence,
            Some("```toml"),
            "the line after {line:?} must open a ```toml block"
        );
        let body: Vec<&str> = lines[i + 2..]
            .iter()
            .take_while(|l| l.trim() != "```")
            .copied()
            .collect();
        out.push((line.trim().to_string(), body.join("\n")));
    }
    out
}

/// The keys named in the first column of the reference tables: `server.listen`,
/// `providers[].circuit.open_ms`, `buckets.NAME.currency`…
fn documented_keys(md: &str) -> BTreeSet<String> {
    md.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|rest| rest.split_once('`').map(|(key, _)| key.to_string()))
        .filter(|key| {
            SECTIONS.iter().any(|s| {
                key.strip_prefix(s)
                    .is_some_and(|r| r.starts_with('.') || r.starts_with('['))
            })
        })
        .collect()
}

/// Every key a TOML document sets, in the notation of the reference tables: arrays of tables
/// as `name[]`, bucket names as `NAME`, top-up buckets as `BUCKET`.
fn example_keys(doc: &toml::Table) -> BTreeSet<String> {
    fn walk(prefix: &str, table: &toml::Table, out: &mut BTreeSet<String>) {
        for (k, v) in table {
            let name = if prefix == "buckets" {
                "NAME"
            } else if prefix.ends_with(".topup") {
                "BUCKET"
            } else {
                k.as_str()
            };
            let path = if prefix.is_empty() {
                name.to_string()
            } else {
                format!("{prefix}.{name}")
            };
            match v {
                toml::Value::Table(t) => walk(&path, t, out),
                toml::Value::Array(items)
                    if !items.is_empty() && items.iter().all(toml::Value::is_table) =>
                {
                    for item in items {
                        walk(&format!("{path}[]"), item.as_table().unwrap(), out);
                    }
                }
                _ => {
                    out.insert(path);
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk("", doc, &mut out);
    out
}

#[test]
fn every_documented_config_key_is_in_a_checked_example_and_the_reverse() {
    let md = read("docs/configuration.md");
    let examples = checked_examples(&md);
    assert!(
        examples.iter().any(|(m, _)| m.contains("complete example")),
        "docs/configuration.md has no `{EXAMPLE_MARKER} complete example -->` block"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut set = BTreeSet::new();
    for (i, (marker, text)) in examples.iter().enumerate() {
        let path = dir.path().join(format!("example-{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let (code, out) = check_config(&path);
        assert_eq!(
            code,
            Some(0),
            "check-config refuses the example after {marker}:\n{out}"
        );
        let doc: toml::Table = text.parse().unwrap();
        set.extend(example_keys(&doc));
    }
    let documented = documented_keys(&md);
    assert!(documented.len() > 50, "too few keys found: {documented:?}");
    let undocumented: Vec<_> = set.difference(&documented).collect();
    let unset: Vec<_> = documented.difference(&set).collect();
    assert!(
        undocumented.is_empty() && unset.is_empty(),
        "docs/configuration.md: keys set by the examples but not in the tables: {undocumented:?}; \
         keys in the tables that no checked example sets: {unset:?}"
    );
}

#[test]
fn the_demo_config_passes_check_config() {
    let (code, out) = check_config(&repo_path("config/default.toml"));
    assert_eq!(code, Some(0), "config/default.toml:\n{out}");
}

/// `tollgate_*` names in a text, with a histogram's `_bucket`/`_sum`/`_count` suffix removed.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("tollgate_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        // A name glued to a longer word (e.g. inside a path) is not a metric.
        let glued = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '/');
        if !glued {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            out.insert(family.to_string());
        }
        rest = &tail[end..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_metric_is_scraped_and_every_scraped_metric_is_documented() {
    let g = Gateway::start(Setup {
        mocks: vec![
            ("p1", "probe = { interval_ms = 200, kind = \"models\" }"),
            ("p2", ""),
        ],
        body: standard_body("", "10", "10"),
        data_dir: None,
    });
    // One stream with its usage: the per-route histograms, spend, tokens and the metering drift
    // get a sample.
    let resp = g
        .client()
        .post(g.chat_url())
        .bearer_auth(DEMO_KEY)
        .json(
            &json!({"model": "m", "stream": true, "stream_options": {"include_usage": true},
                      "messages": [{"role": "user", "content": "hello"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let events = sse_events(resp).await;
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = g
            .client()
            .get(format!("{}/metrics", g.admin_url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let settled = text.lines().any(|l| {
            l.starts_with("tollgate_requests_total{")
                && l.contains("status=\"completed\"")
                && !l.ends_with(" 0")
        });
        let probed = text
            .lines()
            .any(|l| l.starts_with("tollgate_probes_total{") && !l.ends_with(" 0"));
        if settled && probed {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "the stream was not settled or no probe ran:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let families: BTreeMap<String, String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .filter(|(name, _)| name.starts_with("tollgate_"))
        .map(|(name, kind)| (name.to_string(), kind.trim().to_string()))
        .collect();
    let samples: BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let scraped: BTreeSet<String> = families.keys().cloned().collect();
    let documented = metric_names(&read("docs/metrics.md"));

    let missing: Vec<_> = documented.difference(&scraped).collect();
    let undocumented: Vec<_> = scraped.difference(&documented).collect();
    assert!(
        missing.is_empty() && undocumented.is_empty(),
        "docs/metrics.md names metrics the scrape lacks: {missing:?}; the scrape has families \
         docs/metrics.md does not name: {undocumented:?}\n{text}"
    );
    for (name, kind) in &families {
        let wanted: Vec<String> = match kind.as_str() {
            "histogram" => vec![format!("{name}_bucket"), format!("{name}_count")],
            _ => vec![name.clone()],
        };
        for w in wanted {
            assert!(samples.contains(w.as_str()), "no sample of {w} in:\n{text}");
        }
    }
}

/// Relative link targets in a Markdown text: `[text](target)`, without URLs or anchors-only.
fn relative_links(md: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = md;
    while let Some(at) = rest.find("](") {
        let tail = &rest[at + 2..];
        let Some(end) = tail.find(')') else { break };
        let target = tail[..end].trim();
        let is_url = target.contains("://") || target.starts_with("mailto:");
        if !is_url && !target.starts_with('#') && !target.is_empty() {
            let file = target.split('#').next().unwrap_or(target);
            out.push(file.to_string());
        }
        rest = &tail[end..];
    }
    out
}

#[test]
fn every_relative_link_in_the_docs_points_to_a_file() {
    let mut pages = vec![PathBuf::from("README.md")];
    for entry in std::fs::read_dir(repo_path("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(path.strip_prefix(repo_path("")).unwrap().to_path_buf());
        }
    }
    assert!(pages.len() > 5, "{pages:?}");
    let mut broken = Vec::new();
    let mut outside = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(repo_path("").join(page)).unwrap();
        let base = repo_path("").join(page.parent().unwrap_or(Path::new("")));
        for link in relative_links(&text) {
            let target = base.join(&link);
            if !target.exists() {
                broken.push(format!("{}: {link}", page.display()));
            } else if !target
                .canonicalize()
                .unwrap()
                .starts_with(repo_path("").canonicalize().unwrap())
            {
                outside.push(format!("{}: {link}", page.display()));
            }
        }
    }
    assert!(broken.is_empty(), "links to missing files: {broken:?}");
    assert!(
        outside.is_empty(),
        "links outside the repository: {outside:?}"
    );
}
