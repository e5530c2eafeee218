//! The database's work for a fleet run (`--pg-url`): PostgreSQL's own counters, read with `psql`
//! (installed with the server) so the load generator needs no database driver.
//!
//! - `transactions`: `xact_commit + xact_rollback` of the database in `pg_stat_database`. Every
//!   transaction, reads included; the server publishes a busy session's counts about once a
//!   second, so both ends of a window taken under load lag alike.
//! - `write_transactions`: how far the next transaction id moved
//!   (`pg_snapshot_xmax(pg_current_snapshot())`, which assigns none itself). Only transactions
//!   that wrote take an id, and the figure is exact at any moment.

use std::process::{Command, Stdio};

use serde::Serialize;

const QUERY: &str = "SELECT d.xact_commit + d.xact_rollback, \
     pg_snapshot_xmax(pg_current_snapshot())::text::bigint \
     FROM pg_stat_database d WHERE d.datname = current_database()";

/// Counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DbSample {
    pub transactions: u64,
    pub next_xid: u64,
}

/// The database's work over a phase's steady state (after warm-up, under load), per request.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct DbCost {
    /// Requests finished in the window.
    pub requests: u64,
    pub transactions: u64,
    pub write_transactions: u64,
    pub transactions_per_request: f64,
    pub write_transactions_per_request: f64,
}

impl DbCost {
    /// Adds one window (`before`, `after`, requests finished between them).
    pub fn add(&mut self, before: DbSample, after: DbSample, requests: u64) {
        self.requests += requests;
        self.transactions += after.transactions.saturating_sub(before.transactions);
        self.write_transactions += after.next_xid.saturating_sub(before.next_xid);
        if self.requests > 0 {
            self.transactions_per_request = self.transactions as f64 / self.requests as f64;
            self.write_transactions_per_request =
                self.write_transactions as f64 / self.requests as f64;
        }
    }
}

/// Reads the counters of the database at `url` (blocking: run it off the async workers).
pub fn sample(url: &str) -> Result<DbSample, String> {
    let out = Command::new("psql")
        .args([
            "-X",
            "-At",
            "-F",
            " ",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            QUERY,
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run psql (needed for --pg-url): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "psql: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    parse(&String::from_utf8_lossy(&out.stdout))
}

fn parse(text: &str) -> Result<DbSample, String> {
    let mut fields = text.split_whitespace();
    let mut next = || -> Result<u64, String> {
        fields
            .next()
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("psql: unexpected answer {text:?}"))
    };
    Ok(DbSample {
        transactions: next()?,
        next_xid: next()?,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_adds_windows() {
        let a = parse("1000 500\n").unwrap();
        let b = parse("1090 530").unwrap();
        assert_eq!(
            a,
            DbSample {
                transactions: 1000,
                next_xid: 500
            }
        );
        let mut cost = DbCost::default();
        cost.add(a, b, 300);
        cost.add(a, b, 300);
        assert_eq!(cost.transactions, 180);
        assert_eq!(cost.write_transactions, 60);
        assert!((cost.transactions_per_request - 0.3).abs() < 1e-9);
        assert!((cost.write_transactions_per_request - 0.1).abs() < 1e-9);
        assert!(parse("x").is_err());
        assert!(parse("").is_err());
    }
}
