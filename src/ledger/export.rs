//! Ledger export formats (`GET /admin/ledger/export`, R31): JSON Lines (one record per line) and
//! CSV (RFC 4180: a header row of the fields in order, CRLF line ends, fields quoted when they
//! hold a comma, quote or line break; `attempts` and `upstream_usage` as JSON strings, null as an
//! empty field). A text field that a spreadsheet would read as a formula gets a leading `'`
//! (R43); JSON Lines carry every value as it is.

use serde_json::Value;

use super::record::{LedgerRecord, FIELDS};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Csv,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "jsonl" => Some(Format::Jsonl),
            "csv" => Some(Format::Csv),
            _ => None,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Jsonl => "application/x-ndjson",
            Format::Csv => "text/csv; charset=utf-8",
        }
    }

    /// What goes before the first record.
    pub fn header(self) -> String {
        match self {
            Format::Jsonl => String::new(),
            Format::Csv => {
                let mut out = FIELDS.join(",");
                out.push_str("\r\n");
                out
            }
        }
    }

    /// Appends one record, line end included.
    pub fn write(self, out: &mut Vec<u8>, rec: &LedgerRecord) {
        match self {
            Format::Jsonl => {
                // Serializing a record cannot fail: plain data, string map keys only.
                if serde_json::to_writer(&mut *out, rec).is_ok() {
                    out.push(b'\n');
                }
            }
            Format::Csv => write_csv_row(out, rec),
        }
    }
}

fn write_csv_row(out: &mut Vec<u8>, rec: &LedgerRecord) {
    let Ok(Value::Object(map)) = serde_json::to_value(rec) else {
        return;
    };
    for (i, name) in FIELDS.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let cell = match (*name, map.get(*name)) {
            (_, None | Some(Value::Null)) => String::new(),
            // Serialized from the fields themselves, so their keys keep the documented order.
            ("attempts", _) => serde_json::to_string(&rec.attempts).unwrap_or_default(),
            ("upstream_usage", _) => serde_json::to_string(&rec.upstream_usage).unwrap_or_default(),
            (name, Some(Value::String(s))) if DECIMAL_FIELDS.contains(&name) => s.clone(),
            (_, Some(Value::String(s))) => neutralise_formula(s),
            (_, Some(v)) => v.to_string(),
        };
        out.extend_from_slice(csv_quote(&cell).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// Fields holding a decimal amount as a string: computed by the gateway, never negative, so they
/// cannot start a formula and stay numbers for a spreadsheet.
const DECIMAL_FIELDS: [&str; 4] = ["input_per_mtok", "output_per_mtok", "cost", "shortfall"];

/// A text field starting with `=`, `+`, `-`, `@`, tab or carriage return is read as a formula
/// by spreadsheets (CSV injection): it gets a leading `'`, which they show as text (R43).
fn neutralise_formula(field: &str) -> String {
    if field.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{field}")
    } else {
        field.to_string()
    }
}

/// Quotes a CSV field when it needs it (RFC 4180), doubling the quotes inside.
pub fn csv_quote(field: &str) -> std::borrow::Cow<'_, str> {
    if field.contains([',', '"', '\n', '\r']) {
        std::borrow::Cow::Owned(format!("\"{}\"", field.replace('"', "\"\"")))
    } else {
        std::borrow::Cow::Borrowed(field)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::ledger::record::{Attempt, UpstreamUsage};
    use crate::ledger::usage::tests::rec;

    #[test]
    fn quoting_follows_rfc_4180() {
        assert_eq!(csv_quote("plain"), "plain");
        assert_eq!(csv_quote("a,b"), "\"a,b\"");
        assert_eq!(csv_quote("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_quote("two\nlines"), "\"two\nlines\"");
        assert_eq!(csv_quote(""), "");
    }

    #[test]
    fn csv_rows_follow_the_field_order_with_json_cells() {
        let mut r = rec("k1", Some(("m/p1", "credit", "USD")), 2, 8, "0.000018");
        r.end_user = Some("alice, \"the\" user".into());
        r.upstream_usage = Some(UpstreamUsage {
            prompt_tokens: 2,
            completion_tokens: 8,
        });
        r.attempts.push(Attempt {
            route: "m/p1".into(),
            upstream_model: "up".into(),
            bucket: "credit".into(),
            retry: 0,
            outcome: "ok".into(),
            http_status: Some(200),
            error: None,
            started_at: r.started_at,
            latency_ms: 3,
        });
        let mut out = Format::Csv.header().into_bytes();
        Format::Csv.write(&mut out, &r);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.split("\r\n").collect();
        assert_eq!(lines[0].split(',').count(), FIELDS.len());
        assert!(lines[0].starts_with("request_id,started_at,"));
        assert!(
            lines[0].contains(",input_tokens,cache_read_tokens,cache_write_tokens,output_tokens,"),
            "{}",
            lines[0]
        );
        let row = lines[1];
        assert!(row.starts_with("r-k1-2-8,2025-01-01T00:00:00Z,"), "{row}");
        assert!(row.contains(",\"alice, \"\"the\"\" user\","), "{row}");
        assert!(row.contains(",\"{\"\"prompt_tokens\"\":2,\"\"completion_tokens\"\":8}\","));
        assert!(row.contains(",\"[{\"\"route\"\":\"\"m/p1\"\""), "{row}");
        assert!(row.ends_with(",0.000018,0,,1"), "{row}");
        assert_eq!(lines[2], "");
    }

    #[test]
    fn csv_neutralises_formulas_in_text_fields_only() {
        let mut r = rec("k1", Some(("m/p1", "credit", "USD")), 2, 8, "0.000018");
        r.project = "=HYPERLINK(\"http://x\",\"y\")".into();
        r.end_user = Some("+1+cmd|' /C calc'!A0".into());
        r.key_name = "-2+3".into();
        r.workspace = "@SUM(A1)".into();
        r.requested_model = "\tm".into();
        r.upstream_model = Some("\rup".into());
        let mut out = Vec::new();
        Format::Csv.write(&mut out, &r);
        let text = String::from_utf8(out).unwrap();
        let row = text.trim_end_matches("\r\n");
        assert!(row.contains(",'@SUM(A1),"), "{row}");
        assert!(row.contains(",'-2+3,"), "{row}");
        assert!(
            row.contains(",\"'=HYPERLINK(\"\"http://x\"\",\"\"y\"\")\","),
            "{row}"
        );
        assert!(row.contains(",'+1+cmd|' /C calc'!A0,"), "{row}");
        assert!(row.contains(",'\tm,"), "{row}");
        assert!(row.contains(",\"'\rup\","), "{row}");
        // Numbers stay numbers; prices and costs are never negative and keep their form.
        assert!(row.ends_with(",1,2,0.000018,0,,1"), "{row}");
        // A cell starting with another character is unchanged.
        assert!(row.starts_with("r-k1-2-8,2025-01-01T00:00:00Z,"), "{row}");

        // JSON Lines carry the values as they are.
        let mut out = Vec::new();
        Format::Jsonl.write(&mut out, &r);
        let back: LedgerRecord = serde_json::from_slice(&out).unwrap();
        assert_eq!(back.project, r.project);
        assert_eq!(back.key_name, "-2+3");
    }

    #[test]
    fn jsonl_lines_round_trip() {
        let r = rec("k1", None, 5, 0, "0");
        let mut out = Vec::new();
        Format::Jsonl.write(&mut out, &r);
        Format::Jsonl.write(&mut out, &r);
        let text = String::from_utf8(out).unwrap();
        let back: Vec<LedgerRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(back, vec![r.clone(), r]);
    }
}
