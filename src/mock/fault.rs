//! Fault syntax shared by the `x-mock-fault` header, `--fault` and `POST /_mock/options`.

use std::fmt;

/// The syntaxes an unknown fault string is answered with.
pub(super) const FAULT_SYNTAX: &str =
    "valid faults: <status> (e.g. 500, 502, 503, 400, 401, 404, 408, 422), \
     429 or 429:<secs>, reset-after:<n>, hang, malformed, fail-rate:<p in 0..1>, none";

/// One injected failure mode.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Fault {
    /// Answer at once with this status and an OpenAI error envelope.
    Status(u16),
    /// 429 with `Retry-After: <secs>`.
    RateLimited { retry_after_secs: u64 },
    /// Streams: send this many content steps, then abort; non-streams: drop the connection.
    ResetAfter(u32),
    /// Never answer.
    Hang,
    /// A 200 whose body is not JSON.
    Malformed,
    /// A 500 with this probability, otherwise normal behaviour.
    FailRate(f64),
}

/// A fault string that matches none of the syntaxes.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct InvalidFault(pub(super) String);

impl fmt::Display for InvalidFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown mock fault {:?}; {FAULT_SYNTAX}", self.0)
    }
}

/// Parses a fault string; `""` and `"none"` mean no fault.
pub(super) fn parse_fault(raw: &str) -> Result<Option<Fault>, InvalidFault> {
    let s = raw.trim();
    let invalid = || InvalidFault(raw.to_owned());
    if s.is_empty() || s.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    if s.eq_ignore_ascii_case("hang") {
        return Ok(Some(Fault::Hang));
    }
    if s.eq_ignore_ascii_case("malformed") {
        return Ok(Some(Fault::Malformed));
    }
    if let Some(n) = s.strip_prefix("reset-after:") {
        return n
            .trim()
            .parse()
            .map(|n| Some(Fault::ResetAfter(n)))
            .map_err(|_| invalid());
    }
    if let Some(p) = s.strip_prefix("fail-rate:") {
        return match p.trim().parse::<f64>() {
            Ok(p) if (0.0..=1.0).contains(&p) => Ok(Some(Fault::FailRate(p))),
            _ => Err(invalid()),
        };
    }
    if let Some(secs) = s.strip_prefix("429:") {
        return secs
            .trim()
            .parse()
            .map(|retry_after_secs| Some(Fault::RateLimited { retry_after_secs }))
            .map_err(|_| invalid());
    }
    if s.len() == 3 && s.bytes().all(|b| b.is_ascii_digit()) {
        return match s.parse::<u16>() {
            Ok(429) => Ok(Some(Fault::RateLimited {
                retry_after_secs: 1,
            })),
            Ok(code) if (400..=599).contains(&code) => Ok(Some(Fault::Status(code))),
            _ => Err(invalid()),
        };
    }
    Err(invalid())
}

/// A fault as configured: absent, valid, or invalid (answered with a 400 naming the syntaxes).
pub(super) type FaultSetting = Result<Option<Fault>, InvalidFault>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_syntax() {
        assert_eq!(parse_fault("500"), Ok(Some(Fault::Status(500))));
        assert_eq!(parse_fault(" 404 "), Ok(Some(Fault::Status(404))));
        assert_eq!(
            parse_fault("429"),
            Ok(Some(Fault::RateLimited {
                retry_after_secs: 1
            }))
        );
        assert_eq!(
            parse_fault("429:7"),
            Ok(Some(Fault::RateLimited {
                retry_after_secs: 7
            }))
        );
        assert_eq!(parse_fault("reset-after:3"), Ok(Some(Fault::ResetAfter(3))));
        assert_eq!(parse_fault("reset-after:0"), Ok(Some(Fault::ResetAfter(0))));
        assert_eq!(parse_fault("hang"), Ok(Some(Fault::Hang)));
        assert_eq!(parse_fault("malformed"), Ok(Some(Fault::Malformed)));
        assert_eq!(
            parse_fault("fail-rate:0.25"),
            Ok(Some(Fault::FailRate(0.25)))
        );
        assert_eq!(parse_fault(""), Ok(None));
        assert_eq!(parse_fault("none"), Ok(None));
    }

    #[test]
    fn rejects_unknown_syntax() {
        for bad in [
            "200",
            "999",
            "5000",
            "boom",
            "reset-after:x",
            "fail-rate:2",
            "429:x",
        ] {
            let err = parse_fault(bad).err();
            assert!(err.is_some(), "{bad} should be rejected");
            assert!(err
                .map(|e| e.to_string())
                .unwrap_or_default()
                .contains("valid faults"));
        }
    }
}
