//! Ledger retention (`[ledger] retention_days`): a background task that asks the writer thread,
//! once at start and then every hour, to delete records (and their `x/` and `i/` indexes) that
//! started more than `retention_days` ago. The deletion runs on the writer thread in batches, so
//! requests never wait on it; the task only awaits the writer's answer. `retention_days = 0`
//! keeps records forever.

use std::time::Duration;

use chrono::Utc;

use super::store::micros;
use super::store::StoreError;
use super::writer::{LedgerWriter, StoreOp, PRUNE_MAX};

pub const INTERVAL: Duration = Duration::from_secs(3600);

/// The cutoff for `retention_days` at `now_micros`: records that started before it go.
pub fn cutoff_micros(now_micros: u64, retention_days: u32) -> u64 {
    now_micros.saturating_sub(u64::from(retention_days) * 86_400 * 1_000_000)
}

/// Prunes once now and then every `INTERVAL` until the task is dropped or the writer stops.
pub async fn run(writer: LedgerWriter, retention_days: u32) {
    if retention_days == 0 {
        return;
    }
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match prune(&writer, cutoff_micros(micros(Utc::now()), retention_days)).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(records = n, retention_days, "pruned old ledger records"),
            Err(StoreError::WriterGone) => return,
            Err(e) => tracing::error!(error = %e, "ledger retention pruning failed"),
        }
    }
}

/// Deletes every record that started before the cutoff, `PRUNE_MAX` at a time with a pause in
/// between, so settlements queued meanwhile are written without waiting for the whole backlog.
pub async fn prune(writer: &LedgerWriter, before_micros: u64) -> Result<usize, StoreError> {
    let mut total = 0;
    loop {
        let n = writer
            .ask(|reply| StoreOp::Prune {
                before_micros,
                reply,
            })
            .await?;
        total += n;
        if n < PRUNE_MAX {
            return Ok(total);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::ledger::store::{key_l, Store};
    use crate::ledger::usage::tests::rec;
    use crate::ledger::writer;
    use chrono::TimeZone;

    #[test]
    fn cutoff_is_retention_days_before_now() {
        assert_eq!(cutoff_micros(10 * 86_400_000_000, 3), 7 * 86_400_000_000);
        assert_eq!(cutoff_micros(5, 3), 0);
    }

    #[tokio::test]
    async fn prune_deletes_old_records_and_their_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (w, thread) = writer::start(store.clone(), Duration::from_millis(10)).unwrap();
        let mut old = rec("k1", None, 1, 0, "0");
        old.request_id = "old".into();
        old.started_at = Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap();
        let mut new = rec("k1", None, 1, 0, "0");
        new.request_id = "new".into();
        new.started_at = Utc::now();
        for r in [&old, &new] {
            w.send(StoreOp::Record(Box::new(r.clone()))).unwrap();
        }
        let before_micros = cutoff_micros(micros(Utc::now()), 30);
        let n = prune(&w, before_micros).await.unwrap();
        assert_eq!(n, 1);
        assert!(store.record("old").unwrap().is_none());
        assert!(store.record("new").unwrap().is_some());
        assert!(store.db().get(key_l(&old)).unwrap().is_none());
        let left: Vec<_> = store
            .scan_records(Some("k1"), None, None, None)
            .map(|r| r.unwrap().1.request_id)
            .collect();
        assert_eq!(left, vec!["new".to_string()]);
        thread.stop();
    }
}
