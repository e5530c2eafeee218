//! The bytes that cross the gateway for a complete answer: the body sent upstream (the client's
//! request with the route's model, usage asked for on streams, and the held bound as max tokens,
//! R8) and the answer returned with its `tollgate` object. Both are written straight from what
//! was parsed, without copying the messages or rewriting the upstream's document.

use bytes::Bytes;
use rust_decimal::Decimal;
use serde_json::{Map, Value};

use crate::config::Endpoint;
use crate::metering::meter::checked_cost;

/// The upstream's JSON object `body` with the `tollgate` object added as its last member. The
/// upstream's bytes are kept as they came and the member is appended, instead of writing the
/// whole document again; a body with a `tollgate` member of its own (`replace`) gets it replaced.
pub(super) fn with_tollgate(body: &[u8], replace: bool, tollgate: impl serde::Serialize) -> Bytes {
    if replace {
        // Rare: written again. (A body the one-pass reader took but `Value` refuses, e.g. a
        // number beyond f64, keeps both members below rather than losing its content.)
        if let Ok(Value::Object(mut m)) = serde_json::from_slice::<Value>(body) {
            m.insert(
                "tollgate".into(),
                serde_json::to_value(&tollgate).unwrap_or_default(),
            );
            return Bytes::from(serde_json::to_vec(&m).unwrap_or_default());
        }
    }
    let Some(end) = body
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .filter(|&end| body[end] == b'}')
    else {
        // Not an object (the caller parsed one, so this does not happen): left as it came.
        return Bytes::copy_from_slice(body);
    };
    // The object is empty when the byte before its closing brace is its opening one.
    let empty = body[..end].iter().rev().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    let mut out = Vec::with_capacity(end + 512);
    out.extend_from_slice(&body[..end]);
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(b"\"tollgate\":");
    // Writing a `Serialize` of strings and integers into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, &tollgate);
    out.push(b'}');
    Bytes::from(out)
}

/// The output tokens per choice that a hold of `granted` pays for once the input (`in_cost`) is
/// paid, with `n` choices at `per_mtok` (R8): at least 1 (a grant always covers the input and
/// one token), at most `bound`; `bound` itself when output is free.
pub(super) fn paid_output_tokens(
    granted: Decimal,
    in_cost: Decimal,
    n: u64,
    per_mtok: Decimal,
    bound: u64,
) -> u64 {
    use rust_decimal::prelude::ToPrimitive;
    let price = |tokens: u64| checked_cost(tokens, per_mtok);
    let budget = granted - in_cost;
    // The usual case, a full grant (or free output): the hold pays the whole bound.
    if price(n.saturating_mul(bound)).is_some_and(|c| c <= budget) {
        return bound;
    }
    let Some(step) = price(n).filter(|p| *p > Decimal::ZERO) else {
        return bound;
    };
    let mut tokens = budget
        .checked_div(step)
        .and_then(|q| q.floor().to_u64())
        .unwrap_or(bound)
        .clamp(1, bound.max(1));
    // The quotient is rounded to 28 digits: never name a token the hold cannot pay for.
    while tokens > 1 && price(tokens.saturating_mul(n)).is_none_or(|c| c > budget) {
        tokens -= 1;
    }
    tokens
}

/// The fields that carry an endpoint's max output tokens, the one written when the client sent
/// none first (R8): chat's two, `max_output_tokens` on Responses, `max_tokens` on Messages.
fn max_token_fields(endpoint: Endpoint) -> &'static [&'static str] {
    match endpoint {
        Endpoint::Chat | Endpoint::Embeddings => &["max_tokens", "max_completion_tokens"],
        Endpoint::Responses => &["max_output_tokens"],
        Endpoint::Messages => &["max_tokens"],
    }
}

/// The upstream request body: the client's object with `model` set to the route's upstream
/// model, for a chat stream `stream_options.include_usage` on (billing prefers the upstream's
/// usage, R6; the Responses and Messages streams always report theirs), and, when `max_tokens`
/// is given, that bound in the endpoint's max-tokens fields the client sent (kept if lower) or
/// else in the first of them (R8). Written straight from the parsed request, without copying
/// the messages.
pub(super) fn upstream_body(
    fields: &Map<String, Value>,
    upstream_model: &str,
    stream: bool,
    max_tokens: Option<u64>,
    endpoint: Endpoint,
) -> Bytes {
    use serde::ser::{Serialize, SerializeMap, Serializer};

    struct Body<'a> {
        fields: &'a Map<String, Value>,
        model: &'a str,
        /// Ask for the usage on a stream (chat's `stream_options.include_usage`).
        stream: bool,
        max_tokens: Option<u64>,
        max_fields: &'static [&'static str],
    }
    /// `stream_options` with `include_usage: true`; a value that is not an object stays as sent
    /// (the input checks reject one before it gets here).
    struct WithUsage<'a>(Option<&'a Value>);

    impl Serialize for Body<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let add_model = !self.fields.contains_key("model");
            let add_options = self.stream && !self.fields.contains_key("stream_options");
            let add_max = self.max_tokens.is_some()
                && !self.max_fields.iter().any(|f| self.fields.contains_key(*f));
            let len = self.fields.len()
                + usize::from(add_model)
                + usize::from(add_options)
                + usize::from(add_max);
            let mut m = s.serialize_map(Some(len))?;
            for (k, v) in self.fields {
                match (k.as_str(), self.max_tokens) {
                    ("model", _) => m.serialize_entry(k, self.model)?,
                    ("stream_options", _) if self.stream => {
                        m.serialize_entry(k, &WithUsage(Some(v)))?
                    }
                    (field, Some(max)) if self.max_fields.contains(&field) => {
                        m.serialize_entry(k, &v.as_u64().map_or(max, |own| own.min(max)))?
                    }
                    _ => m.serialize_entry(k, v)?,
                }
            }
            if add_model {
                m.serialize_entry("model", self.model)?;
            }
            if add_options {
                m.serialize_entry("stream_options", &WithUsage(None))?;
            }
            if let (true, Some(max)) = (add_max, self.max_tokens) {
                m.serialize_entry(self.max_fields[0], &max)?;
            }
            m.end()
        }
    }

    impl Serialize for WithUsage<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let fields = match self.0 {
                Some(Value::Object(m)) => Some(m),
                Some(other) => return other.serialize(s),
                None => None,
            };
            let has = fields.is_some_and(|m| m.contains_key("include_usage"));
            let len = fields.map_or(0, Map::len) + usize::from(!has);
            let mut m = s.serialize_map(Some(len))?;
            for (k, v) in fields.into_iter().flatten() {
                if k == "include_usage" {
                    m.serialize_entry(k, &true)?;
                } else {
                    m.serialize_entry(k, v)?;
                }
            }
            if !has {
                m.serialize_entry("include_usage", &true)?;
            }
            m.end()
        }
    }

    let body = Body {
        fields,
        model: upstream_model,
        stream: stream && endpoint == Endpoint::Chat,
        max_tokens,
        max_fields: max_token_fields(endpoint),
    };
    // Serialising a map of JSON values with string keys cannot fail.
    Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::metering::chunk::UpstreamBody;
    use crate::metering::meter::cost;

    #[test]
    fn the_tollgate_object_is_appended_to_the_upstream_document() {
        let tg = serde_json::json!({"cost": "0.25", "route": "m/up"});
        for body in [
            &b"{\"id\":\"x\",\"choices\":[{\"index\":0}],\"usage\":null}\n"[..],
            b"  {}  ",
            b"{\"id\":\"x\",\"tollgate\":{\"from\":\"upstream\"}}",
        ] {
            let parsed = UpstreamBody::parse(body).expect("test body parses");
            let mut want: Value = serde_json::from_slice(body).expect("test body parses");
            want["tollgate"] = tg.clone();
            let out = with_tollgate(body, parsed.has_tollgate(), tg.clone());
            let got: Value = serde_json::from_slice(&out).expect("output is JSON");
            assert_eq!(got, want, "{}", String::from_utf8_lossy(body));
        }
        // The upstream's member order and spelling are kept.
        let out = with_tollgate(b"{\"z\": 1, \"a\": 2}", false, Value::Null);
        assert_eq!(&out[..], &b"{\"z\": 1, \"a\": 2,\"tollgate\":null}"[..]);
        // A body the one-pass reader takes but `Value` refuses keeps its bytes.
        let odd = br#"{"n":1e400,"tollgate":1}"#;
        let parsed = UpstreamBody::parse(odd).expect("read in one pass");
        assert!(parsed.has_tollgate());
        let out = with_tollgate(odd, true, Value::Null);
        assert_eq!(
            &out[..],
            &br#"{"n":1e400,"tollgate":1,"tollgate":null}"#[..]
        );
    }

    #[test]
    fn upstream_body_sets_the_model_and_asks_for_usage_on_streams() {
        let parse = |b: Bytes| serde_json::from_slice::<Value>(&b).expect("valid JSON");
        let client = serde_json::json!({
            "model": "public-name",
            "messages": [{"role": "user", "content": "h\u{e9}llo \"q\""}],
            "temperature": 0.5,
            "stream": true,
            "stream_options": {"include_usage": false, "other": 1},
        });
        let Value::Object(fields) = client.clone() else {
            unreachable!()
        };
        let mut want = client.clone();
        want["model"] = "up-model".into();
        want["stream_options"]["include_usage"] = true.into();
        assert_eq!(
            parse(upstream_body(
                &fields,
                "up-model",
                true,
                None,
                Endpoint::Chat
            )),
            want
        );

        // Without stream_options, a stream gets one; a non-stream is left as sent.
        let mut plain = fields.clone();
        plain.remove("stream_options");
        let mut want = Value::Object(plain.clone());
        want["model"] = "up-model".into();
        assert_eq!(
            parse(upstream_body(
                &plain,
                "up-model",
                false,
                None,
                Endpoint::Chat
            )),
            want
        );
        want["stream_options"] = serde_json::json!({"include_usage": true});
        assert_eq!(
            parse(upstream_body(
                &plain,
                "up-model",
                true,
                None,
                Endpoint::Chat
            )),
            want
        );
        assert_eq!(
            parse(upstream_body(
                &fields,
                "up-model",
                false,
                None,
                Endpoint::Chat
            ))["stream_options"],
            serde_json::json!({"include_usage": false, "other": 1})
        );
    }

    #[test]
    fn upstream_body_carries_the_held_bound_in_the_clients_field() {
        let parse = |b: Bytes| serde_json::from_slice::<Value>(&b).expect("valid JSON");
        let fields = |v: Value| match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        let plain = fields(serde_json::json!({"model": "m", "messages": []}));
        assert_eq!(
            parse(upstream_body(&plain, "u", false, Some(7), Endpoint::Chat))["max_tokens"],
            7
        );
        let own = fields(serde_json::json!({"model": "m", "max_completion_tokens": 500}));
        let out = parse(upstream_body(&own, "u", false, Some(7), Endpoint::Chat));
        assert_eq!(out["max_completion_tokens"], 7);
        assert!(out.get("max_tokens").is_none(), "{out}");
        // Both sent: each is lowered to the bound, never raised.
        let both = fields(serde_json::json!({"max_completion_tokens": 500, "max_tokens": 3}));
        let out = parse(upstream_body(&both, "u", false, Some(7), Endpoint::Chat));
        assert_eq!(
            (&out["max_completion_tokens"], &out["max_tokens"]),
            (&7.into(), &3.into())
        );
    }

    #[test]
    fn agent_bodies_carry_the_bound_in_their_own_field_and_no_stream_options() {
        let parse = |b: Bytes| serde_json::from_slice::<Value>(&b).expect("valid JSON");
        let fields = |v: Value| match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        let plain = fields(serde_json::json!({"model": "m", "input": "hi", "stream": true}));
        let out = parse(upstream_body(
            &plain,
            "u",
            true,
            Some(9),
            Endpoint::Responses,
        ));
        assert_eq!(out["max_output_tokens"], 9);
        assert_eq!(out["model"], "u");
        assert!(
            out.get("max_tokens").is_none() && out.get("stream_options").is_none(),
            "{out}"
        );
        let own = fields(serde_json::json!({"model": "m", "max_output_tokens": 500}));
        let out = parse(upstream_body(
            &own,
            "u",
            false,
            Some(9),
            Endpoint::Responses,
        ));
        assert_eq!(out["max_output_tokens"], 9);
        let msg = fields(
            serde_json::json!({"model": "m", "max_tokens": 5, "messages": [], "stream": true}),
        );
        let out = parse(upstream_body(&msg, "u", true, Some(9), Endpoint::Messages));
        assert_eq!(out["max_tokens"], 5, "lowered, never raised");
        assert!(out.get("stream_options").is_none(), "{out}");
    }

    #[test]
    fn paid_output_tokens_floor_what_the_hold_pays_per_choice() {
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        // 10e-6 left after the input at 2/M: 5 tokens for one choice, 2 each for two.
        assert_eq!(
            paid_output_tokens(d("0.000012"), d("0.000002"), 1, d("2"), 4096),
            5
        );
        assert_eq!(
            paid_output_tokens(d("0.000012"), d("0.000002"), 2, d("2"), 4096),
            2
        );
        // At least one, at most the bound; free output: the bound.
        assert_eq!(
            paid_output_tokens(d("0.000003"), d("0.000002"), 1, d("2"), 4096),
            1
        );
        assert_eq!(paid_output_tokens(d("1"), d("0"), 1, d("2"), 300), 300);
        assert_eq!(
            paid_output_tokens(d("0.000002"), d("0.000002"), 1, d("0"), 300),
            300
        );
        // A price whose quotient does not terminate: the named tokens stay within the hold.
        let t = paid_output_tokens(d("1"), d("0"), 3, d("0.7"), u64::MAX);
        assert!(cost(t * 3, d("0.7")) <= d("1"), "{t}");
        assert!(cost((t + 1) * 3, d("0.7")) > d("1"), "{t}");
    }
}
