//! Scenario files (`loadtest/scenarios/*.toml`): what to send, how hard, for how long, and how the
//! mock upstream should behave while it runs. Every phase is bounded by a request count and a
//! duration; unknown keys are rejected so a typo never silently changes a benchmark.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One scenario file.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Run against `--direct-url` too (side by side), when it is given.
    #[serde(default = "default_true")]
    pub compare: bool,
    /// Rounds per target; targets alternate round by round (direct, gateway, direct, ...), each
    /// round taking `1/rounds` of every phase's count and duration.
    #[serde(default = "default_rounds")]
    pub rounds: u32,
    /// Per-request limit, seconds (a request over it counts as a `timeout` error).
    #[serde(default = "default_request_timeout")]
    pub request_timeout_s: f64,
    pub request: RequestSpec,
    /// Mock options POSTed to every `--mock` before each round (phases may override fields).
    #[serde(default)]
    pub mock: MockSettings,
    /// A fresh key funded through the admin API for this run (needs `--admin-url`).
    #[serde(default)]
    pub key: Option<KeySetup>,
    pub phases: Vec<Phase>,
}

/// The request body and the model mix.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RequestSpec {
    /// The client endpoint: `chat` (`/chat/completions`), `responses` (OpenAI Responses) or
    /// `messages` (Anthropic Messages).
    #[serde(default)]
    pub endpoint: Endpoint,
    /// Models sent to the target under test, picked by weight (deterministic round robin).
    pub models: Vec<WeightedModel>,
    /// The model sent to `--direct-url` (the mock answers any name).
    #[serde(default = "default_direct_model")]
    pub direct_model: String,
    #[serde(default = "default_true")]
    pub stream: bool,
    #[serde(default = "default_true")]
    pub include_usage: bool,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default = "default_prompt")]
    pub prompt: String,
}

/// The wire format a scenario speaks.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    #[default]
    Chat,
    Responses,
    Messages,
}

impl Endpoint {
    /// The path under an API base URL.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/chat/completions",
            Endpoint::Responses => "/responses",
            Endpoint::Messages => "/messages",
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WeightedModel {
    pub name: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

/// Fields of the mock's `POST /_mock/options`; absent fields are left as they are.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MockSettings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    /// `"none"` clears a fault.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<String>,
}

impl MockSettings {
    /// `self` with the fields `over` sets replaced.
    pub fn merged(&self, over: &MockSettings) -> MockSettings {
        MockSettings {
            ttft_ms: over.ttft_ms.or(self.ttft_ms),
            tokens: over.tokens.or(self.tokens),
            interval_ms: over.interval_ms.or(self.interval_ms),
            fault: over.fault.clone().or_else(|| self.fault.clone()),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == MockSettings::default()
    }

    /// The JSON body for `POST /_mock/options`; `"none"` becomes `null`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::Map::new();
        if let Some(t) = self.ttft_ms {
            v.insert("ttft_ms".into(), t.into());
        }
        if let Some(t) = self.tokens {
            v.insert("tokens".into(), t.into());
        }
        if let Some(t) = self.interval_ms {
            v.insert("interval_ms".into(), t.into());
        }
        if let Some(f) = &self.fault {
            let value = if f == "none" || f.is_empty() {
                serde_json::Value::Null
            } else {
                f.clone().into()
            };
            v.insert("fault".into(), value);
        }
        serde_json::Value::Object(v)
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeySetup {
    #[serde(default = "default_key_name")]
    pub name: String,
    /// Bucket → amount (decimal string).
    pub topup: BTreeMap<String, String>,
}

/// Closed loop keeps `concurrency` requests in flight; open loop starts `rate` requests per
/// second on schedule whatever the answers do (latency counts from the scheduled start).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Closed,
    Open,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    pub name: String,
    pub mode: Mode,
    /// Closed loop: requests in flight.
    #[serde(default)]
    pub concurrency: u32,
    /// Open loop: starts per second.
    #[serde(default)]
    pub rate: f64,
    /// Open loop: most requests in flight before new starts are dropped (counted as `overload`).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
    /// Bound by count (over all rounds of one target).
    pub requests: u64,
    /// Bound by time (over all rounds of one target), seconds.
    pub duration_s: f64,
    /// Closed loop: workers start evenly spread over this many seconds (so streams do not
    /// start and end in lockstep waves).
    #[serde(default)]
    pub ramp_up_s: f64,
    /// Requests started in the first `warmup_s` of each round (and among its first tenth by
    /// count) are sent and counted in the totals (ledger, process cost) but kept out of the
    /// latency histograms and rates.
    #[serde(default)]
    pub warmup_s: f64,
    /// Mock options for this phase, over the scenario's.
    #[serde(default)]
    pub mock: MockSettings,
    /// Mock changes at offsets into each round of this phase (e.g. the primary starts failing).
    #[serde(default)]
    pub events: Vec<MockEvent>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MockEvent {
    /// Seconds after the round starts.
    pub at_s: f64,
    /// A `--mock NAME=URL` name; empty: every mock.
    #[serde(default)]
    pub mock: String,
    pub options: MockSettings,
}

fn default_true() -> bool {
    true
}
fn default_rounds() -> u32 {
    2
}
fn default_request_timeout() -> f64 {
    60.0
}
fn default_direct_model() -> String {
    "mock-model".into()
}
fn default_prompt() -> String {
    "Say something about load testing.".into()
}
fn default_weight() -> u32 {
    1
}
fn default_key_name() -> String {
    "loadtest".into()
}
fn default_max_in_flight() -> u32 {
    20_000
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Scenario::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Scenario, String> {
        let s: Scenario = toml::from_str(text).map_err(|e| e.to_string())?;
        s.check()?;
        Ok(s)
    }

    fn check(&self) -> Result<(), String> {
        if self.rounds == 0 {
            return Err("rounds: must be at least 1".into());
        }
        if self.request.models.is_empty() || self.request.models.iter().all(|m| m.weight == 0) {
            return Err("request.models: needs at least one model with a weight above 0".into());
        }
        if self.phases.is_empty() {
            return Err("phases: needs at least one phase".into());
        }
        if self.request_timeout_s.is_nan() || self.request_timeout_s <= 0.0 {
            return Err("request_timeout_s: must be above 0".into());
        }
        for (i, p) in self.phases.iter().enumerate() {
            let at = format!("phases[{i}] ({})", p.name);
            if p.requests == 0 || (p.duration_s.is_nan() || p.duration_s <= 0.0) {
                return Err(format!(
                    "{at}: `requests` and `duration_s` must both be above 0 (every run is bounded)"
                ));
            }
            match p.mode {
                Mode::Closed if p.concurrency == 0 => {
                    return Err(format!("{at}.concurrency: must be above 0 in closed mode"))
                }
                Mode::Open if (p.rate.is_nan() || p.rate <= 0.0) => {
                    return Err(format!("{at}.rate: must be above 0 in open mode"))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Model for request number `i` by weight, deterministic.
    pub fn model_for(&self, i: u64) -> &str {
        let total: u64 = self
            .request
            .models
            .iter()
            .map(|m| u64::from(m.weight))
            .sum();
        let mut slot = i % total.max(1);
        for m in &self.request.models {
            if slot < u64::from(m.weight) {
                return &m.name;
            }
            slot -= u64::from(m.weight);
        }
        &self.request.models[0].name
    }

    /// The request body for `model`.
    pub fn body(&self, model: &str) -> bytes::Bytes {
        let r = &self.request;
        let messages = serde_json::json!([{"role": "user", "content": r.prompt}]);
        let body = match r.endpoint {
            Endpoint::Chat => {
                let mut body =
                    serde_json::json!({"model": model, "stream": r.stream, "messages": messages});
                if r.stream && r.include_usage {
                    body["stream_options"] = serde_json::json!({"include_usage": true});
                }
                if let Some(m) = r.max_tokens {
                    body["max_tokens"] = m.into();
                }
                body
            }
            Endpoint::Responses => {
                let mut body =
                    serde_json::json!({"model": model, "stream": r.stream, "input": r.prompt});
                if let Some(m) = r.max_tokens {
                    body["max_output_tokens"] = m.into();
                }
                body
            }
            // The Messages format requires `max_tokens`.
            Endpoint::Messages => serde_json::json!({
                "model": model,
                "stream": r.stream,
                "messages": messages,
                "max_tokens": r.max_tokens.unwrap_or(4096),
            }),
        };
        bytes::Bytes::from(body.to_string())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
name = "t"
rounds = 1
[request]
models = [{ name = "a", weight = 3 }, { name = "b" }]
stream = true
[mock]
tokens = 8
[[phases]]
name = "p"
mode = "closed"
concurrency = 4
requests = 10
duration_s = 2
mock = { interval_ms = 5 }
events = [{ at_s = 1, mock = "primary", options = { fault = "500" } }]
"#;

    #[test]
    fn parses_and_checks() {
        let s = Scenario::parse(SAMPLE).unwrap();
        assert_eq!(s.phases[0].mode, Mode::Closed);
        assert_eq!(s.phases[0].events[0].options.fault.as_deref(), Some("500"));
        let merged = s.mock.merged(&s.phases[0].mock);
        assert_eq!(merged.tokens, Some(8));
        assert_eq!(merged.interval_ms, Some(5));
        let picks: Vec<&str> = (0..4).map(|i| s.model_for(i)).collect();
        assert_eq!(picks, ["a", "a", "a", "b"]);
        let body: serde_json::Value = serde_json::from_slice(&s.body("a")).unwrap();
        assert_eq!(body["stream_options"]["include_usage"], true);
    }

    #[test]
    fn rejects_unbounded_and_unknown() {
        let unbounded = SAMPLE.replace("requests = 10", "requests = 0");
        assert!(Scenario::parse(&unbounded).unwrap_err().contains("bounded"));
        let typo = SAMPLE.replace("rounds = 1", "rounds = 1\nround = 2");
        assert!(Scenario::parse(&typo).is_err());
        let open = SAMPLE.replace("mode = \"closed\"", "mode = \"open\"");
        assert!(Scenario::parse(&open).unwrap_err().contains("rate"));
    }

    #[test]
    fn mock_fault_none_is_null() {
        let m = MockSettings {
            fault: Some("none".into()),
            ..MockSettings::default()
        };
        assert_eq!(m.to_json()["fault"], serde_json::Value::Null);
    }

    #[test]
    fn shipped_scenarios_parse() {
        // `cargo test` runs a package's unit tests from its own directory.
        let dir = Path::new("scenarios");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Scenario::load(&path).unwrap();
                n += 1;
            }
        }
        assert!(n >= 6);
    }
}
