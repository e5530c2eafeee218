//! Hourly rollups of the ledger: what the billed records of one UTC hour add up to, per cell
//! (bucket, currency, requested model, route, fell back?, retried?), so that the pages that sum
//! a long time range (a wallet's spend per day, the spend explainer) read one entry per hour
//! instead of every record.
//!
//! Four families, values postcard behind [`VERSION`]:
//! - `r/a/{hour:016x}`: every key's records of the hour;
//! - `r/k/{hex(key_id)}/{hour:016x}`: one key's, per project (a key's records carry the project
//!   the key had when they were written);
//! - `r/p/{hex(project)}/{hour:016x}`: one project's;
//! - `r/t/{hex(task)}/`: every record of one workflow run, whatever its hour, per [`TaskCell`]
//!   (key, project, model, route, bucket, currency, status): what `/admin/usage?task=` and the
//!   console's task page add up, so that neither reads the run's records one by one.
//!
//! (`hour` counts hours since the Unix epoch; names are hex-encoded so that no name can run into
//! another's prefix.) Cells count only records with a bucket: the others were never billed. The
//! all-keys rollup also tallies every record of the hour by status and whether it fell back or
//! retried ([`Tally`]), for the overview's rates and cut-offs.
//!
//! The ledger writer updates the rollups of the records it writes in the same sled batch, so
//! they are exact and survive a crash together: per batch it sums its records per rollup key in
//! memory ([`RollupDelta`]), then reads each touched rollup once and writes it once. A record
//! that replaces an earlier one of the same request (a settlement after a disconnect's fallback
//! record) takes the earlier one's counts out; retention pruning takes pruned records out.
//!
//! Stores written before rollups existed have no `m/rollups` marker: [`Store::open`] then builds
//! every rollup from the records once, in one batch with the marker (about a second per 300,000
//! records), and readers can always rely on them.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::record::LedgerRecord;
use super::store::{micros, Store, StoreError};

/// The rollup layout's version: the marker's value. A store marked with another version has its
/// rollups built again at open.
pub(crate) const VERSION: u8 = 2;
/// Present (with [`VERSION`]) once the rollups cover every record in the store.
pub(crate) const MARKER: &[u8] = b"m/rollups";
/// Microseconds per hour.
pub const HOUR: u64 = 3_600_000_000;

const MILLION: Decimal = Decimal::from_parts(1_000_000, 0, 0, false, 0);

/// What a rollup counts records by.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RollupCell {
    pub bucket: String,
    pub currency: Option<String>,
    /// The requested model.
    pub model: String,
    /// The route that served (empty if none).
    pub route: String,
    pub fell_back: bool,
    pub retried: bool,
}

impl RollupCell {
    /// The cell of a billed record; `None` for a record without a bucket.
    pub fn of(r: &LedgerRecord) -> Option<RollupCell> {
        Some(RollupCell {
            bucket: r.bucket.clone()?,
            currency: r.currency.clone(),
            model: r.requested_model.clone(),
            route: r.route.clone().unwrap_or_default(),
            fell_back: r.fallbacks > 0,
            retried: r.retries > 0,
        })
    }
}

/// Sums over the records of a cell. Additive: the sums over two sets of records are the sums of
/// their sums, exactly (decimal addition).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CellStats {
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// What was debited.
    #[serde(with = "rust_decimal::serde::str")]
    pub cost: Decimal,
    /// Input and output tokens at the record's prices (before any shortfall).
    #[serde(with = "rust_decimal::serde::str")]
    pub priced_in: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub priced_out: Decimal,
}

impl CellStats {
    /// One record's counts.
    pub fn of(r: &LedgerRecord) -> CellStats {
        let priced = |tokens: u64, price: Option<Decimal>| {
            Decimal::from(tokens)
                .checked_mul(price.unwrap_or_default())
                .and_then(|d| d.checked_div(MILLION))
                .unwrap_or_default()
        };
        let priced_out = priced(r.output_tokens, r.output_per_mtok);
        CellStats {
            requests: 1,
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            cost: r.cost,
            priced_in: if r.cache_read_tokens == 0 && r.cache_write_tokens == 0 {
                priced(r.input_tokens, r.input_per_mtok)
            } else {
                // Cached input was charged at the route's cache prices, which the record does
                // not carry: the input's part is the charge less the output's.
                let charge = r.cost.checked_add(r.shortfall).unwrap_or(Decimal::MAX);
                (charge - priced_out).max(Decimal::ZERO)
            },
            priced_out,
        }
    }

    pub fn add(&mut self, o: &CellStats) {
        self.requests = self.requests.saturating_add(o.requests);
        self.input_tokens = self.input_tokens.saturating_add(o.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(o.output_tokens);
        self.cost = self.cost.saturating_add(o.cost);
        self.priced_in = self.priced_in.saturating_add(o.priced_in);
        self.priced_out = self.priced_out.saturating_add(o.priced_out);
    }

    /// Takes out counts added before.
    fn sub(&mut self, o: &CellStats) {
        self.requests = self.requests.saturating_sub(o.requests);
        self.input_tokens = self.input_tokens.saturating_sub(o.input_tokens);
        self.output_tokens = self.output_tokens.saturating_sub(o.output_tokens);
        self.cost = self.cost.saturating_sub(o.cost);
        self.priced_in = self.priced_in.saturating_sub(o.priced_in);
        self.priced_out = self.priced_out.saturating_sub(o.priced_out);
    }
}

/// The cells of one hour.
pub type Cells = BTreeMap<RollupCell, CellStats>;

/// What every record (billed or not) of an hour is tallied by, in the all-keys rollup.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Tally {
    /// The record's status (`Status::as_str`).
    pub status: String,
    pub fell_back: bool,
    pub retried: bool,
}

/// What a workflow run's rollup counts records by: every dimension the usage answer groups or
/// filters a run's records by. Unlike the hourly cells, records without a bucket count too.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskCell {
    pub key_id: String,
    pub project: String,
    /// The requested model.
    pub model: String,
    pub route: Option<String>,
    pub bucket: Option<String>,
    pub currency: Option<String>,
    /// The record's status (`Status::as_str`).
    pub status: String,
}

impl TaskCell {
    pub fn of(r: &LedgerRecord) -> TaskCell {
        TaskCell {
            key_id: r.key_id.clone(),
            project: r.project.clone(),
            model: r.requested_model.clone(),
            route: r.route.clone(),
            bucket: r.bucket.clone(),
            currency: r.currency.clone(),
            status: r.status.as_str().to_string(),
        }
    }
}

/// Sums over the records of a [`TaskCell`]; additive like [`CellStats`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskStats {
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// What was debited.
    #[serde(with = "rust_decimal::serde::str")]
    pub cost: Decimal,
    pub fallbacks: u64,
    pub retries: u64,
}

impl TaskStats {
    pub fn of(r: &LedgerRecord) -> TaskStats {
        TaskStats {
            requests: 1,
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            cost: r.cost,
            fallbacks: u64::from(r.fallbacks),
            retries: u64::from(r.retries),
        }
    }

    pub fn add(&mut self, o: &TaskStats) {
        self.requests = self.requests.saturating_add(o.requests);
        self.input_tokens = self.input_tokens.saturating_add(o.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(o.output_tokens);
        self.cost = self.cost.saturating_add(o.cost);
        self.fallbacks = self.fallbacks.saturating_add(o.fallbacks);
        self.retries = self.retries.saturating_add(o.retries);
    }

    fn sub(&mut self, o: &TaskStats) {
        self.requests = self.requests.saturating_sub(o.requests);
        self.input_tokens = self.input_tokens.saturating_sub(o.input_tokens);
        self.output_tokens = self.output_tokens.saturating_sub(o.output_tokens);
        self.cost = self.cost.saturating_sub(o.cost);
        self.fallbacks = self.fallbacks.saturating_sub(o.fallbacks);
        self.retries = self.retries.saturating_sub(o.retries);
    }
}

/// A workflow run's cells.
pub type TaskCells = BTreeMap<TaskCell, TaskStats>;

/// Counts one record into a run's cells.
pub fn add_to_task(cells: &mut TaskCells, r: &LedgerRecord) {
    let s = TaskStats::of(r);
    let cell = TaskCell::of(r);
    match cells.get_mut(&cell) {
        Some(c) => c.add(&s),
        None => {
            cells.insert(cell, s);
        }
    }
}

/// What a rollup gives for an hour: a cell's sums, or how many records share a tally.
#[derive(Debug, Clone, Copy)]
pub enum Sums<'a> {
    Cell(&'a RollupCell, &'a CellStats),
    Tally(&'a Tally, u64),
}

/// One rollup entry: cells per project in a key's rollup, under `""` in the others; tallies in
/// the all-keys rollup; a workflow run's cells in its rollup.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Rollup {
    parts: BTreeMap<String, Cells>,
    tallies: BTreeMap<Tally, u64>,
    tasks: TaskCells,
}

impl Rollup {
    fn is_empty(&self) -> bool {
        self.parts.is_empty() && self.tallies.is_empty() && self.tasks.is_empty()
    }

    fn add(&mut self, part: &str, cell: &RollupCell, s: &CellStats) {
        let cells = match self.parts.get_mut(part) {
            Some(c) => c,
            None => self.parts.entry(part.to_string()).or_default(),
        };
        match cells.get_mut(cell) {
            Some(c) => c.add(s),
            None => {
                cells.insert(cell.clone(), s.clone());
            }
        }
    }

    fn merge(&mut self, o: &Rollup) {
        for (part, cells) in &o.parts {
            for (cell, s) in cells {
                self.add(part, cell, s);
            }
        }
        for (t, n) in &o.tallies {
            let e = self.tallies.entry(t.clone()).or_default();
            *e = e.saturating_add(*n);
        }
        for (cell, s) in &o.tasks {
            match self.tasks.get_mut(cell) {
                Some(c) => c.add(s),
                None => {
                    self.tasks.insert(cell.clone(), s.clone());
                }
            }
        }
    }

    /// Takes out `o`'s counts; cells left without requests go.
    fn take_out(&mut self, o: &Rollup) {
        for (part, cells) in &o.parts {
            let Some(mine) = self.parts.get_mut(part) else {
                continue;
            };
            for (cell, s) in cells {
                if let Some(c) = mine.get_mut(cell) {
                    c.sub(s);
                    if c.requests == 0 {
                        mine.remove(cell);
                    }
                }
            }
            if mine.is_empty() {
                self.parts.remove(part);
            }
        }
        for (t, n) in &o.tallies {
            if let Some(e) = self.tallies.get_mut(t) {
                *e = e.saturating_sub(*n);
                if *e == 0 {
                    self.tallies.remove(t);
                }
            }
        }
        for (cell, s) in &o.tasks {
            if let Some(c) = self.tasks.get_mut(cell) {
                c.sub(s);
                if c.requests == 0 {
                    self.tasks.remove(cell);
                }
            }
        }
    }
}

fn encode(r: &Rollup) -> Vec<u8> {
    let out = vec![VERSION];
    match postcard::to_extend(r, out) {
        Ok(out) => out,
        // Encoding plain data into a growable buffer cannot fail.
        Err(_) => vec![VERSION],
    }
}

fn decode(key: &[u8], v: &[u8]) -> Result<Rollup, StoreError> {
    match v.split_first() {
        Some((&VERSION, body)) => postcard::from_bytes(body).map_err(|e| StoreError::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            err: e.to_string(),
        }),
        _ => Err(StoreError::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            err: "unknown rollup layout".into(),
        }),
    }
}

fn push_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    for b in bytes {
        out.push(b"0123456789abcdef"[usize::from(b >> 4)]);
        out.push(b"0123456789abcdef"[usize::from(b & 0xf)]);
    }
}

/// The prefix of a family (`r/a/`) or of one name's rollups (`r/k/{hex}/`).
fn prefix(family: u8, name: Option<&str>) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + name.map_or(0, |n| 2 * n.len() + 1) + 16);
    k.extend_from_slice(&[b'r', b'/', family, b'/']);
    if let Some(n) = name {
        push_hex(&mut k, n.as_bytes());
        k.push(b'/');
    }
    k
}

fn with_hour(mut prefix: Vec<u8>, hour: u64) -> Vec<u8> {
    prefix.extend_from_slice(format!("{hour:016x}").as_bytes());
    prefix
}

/// When an hour (since the epoch) starts.
pub fn hour_start(hour: u64) -> Option<DateTime<Utc>> {
    i64::try_from(hour.checked_mul(HOUR)?)
        .ok()
        .and_then(DateTime::from_timestamp_micros)
}

/// The hour (since the epoch) a record counts in.
pub fn hour_of(r: &LedgerRecord) -> u64 {
    micros(r.started_at) / HOUR
}

/// The three rollup keys a record counts in, with the part it counts under in each.
fn keys_of(r: &LedgerRecord) -> [(Vec<u8>, &str); 3] {
    let hour = hour_of(r);
    [
        (with_hour(prefix(b'a', None), hour), ""),
        (
            with_hour(prefix(b'k', Some(&r.key_id)), hour),
            r.project.as_str(),
        ),
        (with_hour(prefix(b'p', Some(&r.project)), hour), ""),
    ]
}

/// The rollup key of a workflow run.
fn task_key(task: &str) -> Vec<u8> {
    prefix(b't', Some(task))
}

/// Changes to the rollups, summed in memory: what to add and what to take out, per rollup key.
#[derive(Default)]
pub(crate) struct RollupDelta {
    plus: HashMap<Vec<u8>, Rollup>,
    minus: HashMap<Vec<u8>, Rollup>,
}

impl RollupDelta {
    fn put(map: &mut HashMap<Vec<u8>, Rollup>, r: &LedgerRecord) {
        let keys = keys_of(r);
        let tally = Tally {
            status: r.status.as_str().to_string(),
            fell_back: r.fallbacks > 0,
            retried: r.retries > 0,
        };
        let [(all, _), ..] = &keys;
        let n = map
            .entry(all.clone())
            .or_default()
            .tallies
            .entry(tally)
            .or_default();
        *n = n.saturating_add(1);
        if let Some(task) = &r.task {
            add_to_task(&mut map.entry(task_key(task)).or_default().tasks, r);
        }
        let Some(cell) = RollupCell::of(r) else {
            return;
        };
        let s = CellStats::of(r);
        for (k, part) in keys {
            map.entry(k).or_default().add(part, &cell, &s);
        }
    }

    /// Counts a record written.
    pub fn add(&mut self, r: &LedgerRecord) {
        Self::put(&mut self.plus, r);
    }

    /// Takes out a record replaced or deleted.
    pub fn remove(&mut self, r: &LedgerRecord) {
        Self::put(&mut self.minus, r);
    }

    /// Adds to `batch` the new value of every touched rollup, read from `db` (which must not
    /// change before the batch is applied: only the writer thread writes). Leaves `self` as it
    /// was, so a batch whose commit fails can be written again.
    pub fn write_into(&self, db: &sled::Db, batch: &mut sled::Batch) -> Result<(), StoreError> {
        let empty = Rollup::default();
        let keys: std::collections::BTreeSet<&Vec<u8>> =
            self.plus.keys().chain(self.minus.keys()).collect();
        for k in keys {
            let mut value = match db.get(k)? {
                Some(v) => decode(k, &v)?,
                None => Rollup::default(),
            };
            value.merge(self.plus.get(k).unwrap_or(&empty));
            value.take_out(self.minus.get(k).unwrap_or(&empty));
            if value.is_empty() {
                batch.remove(k.as_slice());
            } else {
                batch.insert(k.as_slice(), encode(&value));
            }
        }
        Ok(())
    }

    pub fn clear(&mut self) {
        self.plus.clear();
        self.minus.clear();
    }
}

/// Whose rollups to read.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    All,
    /// One key's records, optionally only those of one project.
    Key(&'a str, Option<&'a str>),
    Project(&'a str),
}

impl Scope<'_> {
    /// The scope for a key and project filter.
    pub fn of<'a>(key_id: Option<&'a str>, project: Option<&'a str>) -> Scope<'a> {
        match (key_id, project) {
            (Some(k), p) => Scope::Key(k, p),
            (None, Some(p)) => Scope::Project(p),
            (None, None) => Scope::All,
        }
    }
}

impl Store {
    /// Calls `f(hour, sums)` for every rollup cell (and, for all keys, tally) of the hours
    /// `[from, to)` (hours since the epoch) within `scope`, hour by hour in order.
    pub fn rollup_hours(
        &self,
        scope: Scope<'_>,
        from: u64,
        to: u64,
        mut f: impl FnMut(u64, Sums<'_>),
    ) -> Result<(), StoreError> {
        let (p, part) = match scope {
            Scope::All => (prefix(b'a', None), None),
            Scope::Key(k, project) => (prefix(b'k', Some(k)), project),
            Scope::Project(name) => (prefix(b'p', Some(name)), None),
        };
        let hour_at = p.len();
        let lo = with_hour(p.clone(), from);
        let hi = with_hour(p, to);
        for kv in self.db().range(lo..hi) {
            let (k, v) = kv?;
            let hour = std::str::from_utf8(k.get(hour_at..).unwrap_or_default())
                .ok()
                .and_then(|h| u64::from_str_radix(h, 16).ok())
                .ok_or_else(|| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    err: "not a rollup key".into(),
                })?;
            let rollup = decode(&k, &v)?;
            for (name, cells) in &rollup.parts {
                if part.is_some_and(|p| p != name) {
                    continue;
                }
                for (cell, s) in cells {
                    f(hour, Sums::Cell(cell, s));
                }
            }
            for (t, n) in &rollup.tallies {
                f(hour, Sums::Tally(t, *n));
            }
        }
        Ok(())
    }

    /// What the records of workflow run `task` add up to, per cell, from its rollup (one read,
    /// whatever the run's length). Empty for a run without records.
    pub fn task_cells(&self, task: &str) -> Result<TaskCells, StoreError> {
        let k = task_key(task);
        match self.db().get(&k)? {
            Some(v) => Ok(decode(&k, &v)?.tasks),
            None => Ok(TaskCells::new()),
        }
    }

    /// Folds the records of `scope` that started in `[since, until)`: the whole hours from the
    /// rollups (`on_hour(hour, sums)`: cells of billed records, and for all keys the tallies of
    /// every record), the records of the partial
    /// hours at either end one by one (`on_record`, every record of the scope there). Together
    /// the same sums as every record of the range, at the cost of one entry per hour.
    pub fn fold_span<T>(
        &self,
        scope: Scope<'_>,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        acc: &mut T,
        on_record: impl Fn(&mut T, &LedgerRecord),
        on_hour: impl Fn(&mut T, u64, Sums<'_>),
    ) -> Result<(), StoreError> {
        let lo = since.map(micros).unwrap_or(0);
        let hi = until.map(micros);
        // Whole hours: [first, end).
        let first = lo.div_ceil(HOUR);
        let end = hi.map_or(u64::MAX, |h| h / HOUR);
        let (key_id, project) = match scope {
            Scope::All => (None, None),
            Scope::Key(k, p) => (Some(k), p),
            Scope::Project(p) => (None, Some(p)),
        };
        let records = |acc: &mut T, from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>| {
            for item in self.scan_records(key_id, from, to, None) {
                let (_, rec) = item?;
                if project.is_none_or(|p| rec.project == p) {
                    on_record(acc, &rec);
                }
            }
            Ok::<(), StoreError>(())
        };
        if first >= end {
            return records(acc, since, until);
        }
        if lo < first.saturating_mul(HOUR) {
            records(acc, since, hour_start(first))?;
        }
        if let (Some(hi), Some(until)) = (hi, until) {
            if end.saturating_mul(HOUR) < hi {
                records(acc, hour_start(end), Some(until))?;
            }
        }
        self.rollup_hours(scope, first, end, |h, s| on_hour(acc, h, s))
    }

    /// Builds every rollup from the records, unless the store is marked as having them
    /// (current [`VERSION`]). Run at open, before any writer. Returns how many records it read
    /// (`None` if nothing had to be built).
    pub(crate) fn ensure_rollups(&self) -> Result<Option<usize>, StoreError> {
        let db = self.db();
        if db.get(MARKER)?.as_deref() == Some(&[VERSION][..]) {
            return Ok(None);
        }
        let mut delta = RollupDelta::default();
        let mut n = 0;
        for item in self.scan_records(None, None, None, None) {
            let (_, rec) = item?;
            delta.add(&rec);
            n += 1;
        }
        let mut batch = sled::Batch::default();
        // Whatever an earlier layout left goes first; the new values overwrite it in the batch.
        for k in db.scan_prefix(b"r/").keys() {
            batch.remove(k?);
        }
        for (k, value) in &delta.plus {
            batch.insert(k.as_slice(), encode(value));
        }
        batch.insert(MARKER, &[VERSION][..]);
        db.apply_batch(batch)?;
        db.flush()?;
        Ok(Some(n))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    use crate::ledger::explain::{explain, Period};
    use crate::ledger::usage::tests::rec;
    use crate::ledger::writer::{self, StoreOp};
    use chrono::TimeZone;
    use rand::{Rng, SeedableRng};

    /// A random billed (or, 1 in 8, rejected) record within three days from `t0`.
    fn random_record(rng: &mut rand::rngs::StdRng, t0: DateTime<Utc>) -> LedgerRecord {
        let key = ["k1", "k2", "k3"][rng.gen_range(0..3)];
        let (bucket, currency) =
            [("credit", "USD"), ("yuan", "CNY"), ("odd", "")][rng.gen_range(0..3)];
        let route = ["m/a", "m/b", "n/c"][rng.gen_range(0..3)];
        let billed = rng.gen_range(0..8) > 0;
        let mut r = rec(
            key,
            billed.then_some((route, bucket, currency)),
            rng.gen_range(0..5000),
            rng.gen_range(0..3000),
            "0",
        );
        if currency.is_empty() {
            r.currency = None;
        }
        r.started_at = t0 + chrono::Duration::microseconds(rng.gen_range(0..3 * 86_400_000_000i64));
        r.request_id = crate::ledger::new_request_id(r.started_at);
        r.project = format!("proj-{}", rng.gen_range(0..2));
        r.task = (rng.gen_range(0..4) > 0).then(|| format!("run-{}", rng.gen_range(0..5)));
        r.requested_model = route[..1].to_string();
        r.fallbacks = rng.gen_range(0..3) / 2;
        r.retries = rng.gen_range(0..4) / 3;
        r.input_per_mtok = Some(Decimal::new(rng.gen_range(1..5000), rng.gen_range(0..4)));
        r.output_per_mtok = Some(Decimal::new(rng.gen_range(1..9000), rng.gen_range(0..4)));
        // What was debited: the priced cost, or part of it (a shortfall), at varied scales.
        let priced = CellStats::of(&r);
        r.cost = match rng.gen_range(0..4) {
            0 => Decimal::new(rng.gen_range(0..100_000), rng.gen_range(2..9)),
            _ => priced.priced_in + priced.priced_out,
        };
        r
    }

    /// The explanation of two periods of `scope`, from every record or through the rollups.
    fn explained(
        s: &Store,
        scope: Scope<'_>,
        periods: [(DateTime<Utc>, DateTime<Utc>); 2],
        rollups: bool,
    ) -> String {
        let (key_id, project) = match scope {
            Scope::All => (None, None),
            Scope::Key(k, p) => (Some(k), p),
            Scope::Project(p) => (None, Some(p)),
        };
        let period = |(since, until): (DateTime<Utc>, DateTime<Utc>)| {
            let mut p = Period::default();
            if rollups {
                s.fold_span(
                    scope,
                    Some(since),
                    Some(until),
                    &mut p,
                    |p, r| p.add(r),
                    |p, _, sums| {
                        if let Sums::Cell(c, sums) = sums {
                            p.add_cell(c, sums)
                        }
                    },
                )
                .unwrap();
            } else {
                for item in s.scan_records(key_id, Some(since), Some(until), None) {
                    let (_, r) = item.unwrap();
                    if project.is_none_or(|p| r.project == p) {
                        p.add(&r);
                    }
                }
            }
            p
        };
        serde_json::to_string(&explain(&period(periods[0]), &period(periods[1]))).unwrap()
    }

    /// A sled store seen through the ledger trait's required methods only: what a store that keeps
    /// no rollups answers.
    struct WithoutRollups<'s>(&'s Store);

    impl crate::store::LedgerStore for WithoutRollups<'_> {
        fn record(&self, request_id: &str) -> Result<Option<LedgerRecord>, StoreError> {
            self.0.record(request_id)
        }
        fn scan_records<'a>(
            &'a self,
            key_id: Option<&str>,
            since: Option<DateTime<Utc>>,
            until: Option<DateTime<Utc>>,
            cursor: Option<&[u8]>,
        ) -> crate::store::RecordScan<'a> {
            Box::new(self.0.scan_records(key_id, since, until, cursor))
        }
        fn task_records(
            &self,
            task: &str,
            key_id: Option<&str>,
            since: Option<DateTime<Utc>>,
            until: Option<DateTime<Utc>>,
        ) -> Result<Vec<LedgerRecord>, StoreError> {
            self.0.task_records(task, key_id, since, until)
        }
    }

    /// Spend per hour and bucket, from every record or from the rollups alone.
    fn hourly(s: &Store, rollups: bool) -> BTreeMap<(u64, String), Decimal> {
        let mut out: BTreeMap<(u64, String), Decimal> = BTreeMap::new();
        if rollups {
            s.rollup_hours(Scope::All, 0, u64::MAX, |h, sums| match sums {
                Sums::Cell(c, sums) => {
                    *out.entry((h, c.bucket.clone())).or_default() += sums.cost;
                }
                Sums::Tally(t, n) => {
                    *out.entry((h, t.status.clone())).or_default() += Decimal::from(n);
                }
            })
            .unwrap();
        } else {
            for item in s.scan_records(None, None, None, None) {
                let (_, r) = item.unwrap();
                if let Some(b) = &r.bucket {
                    *out.entry((hour_of(&r), b.clone())).or_default() += r.cost;
                }
                let status = r.status.as_str().to_string();
                *out.entry((hour_of(&r), status)).or_default() += Decimal::ONE;
            }
        }
        out.retain(|_, v| !v.is_zero());
        out
    }

    /// The rollups answer exactly what the records answer, on a random ledger written through
    /// the writer with replaced records (a settlement after a fallback record), a crash's
    /// interrupted records and retention pruning; and a store without rollups gets the same
    /// ones built at open.
    #[tokio::test]
    async fn rollups_answer_as_the_records_do() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (w, thread) =
            writer::start(store.clone(), std::time::Duration::from_millis(5)).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(15);
        let t0 = Utc.with_ymd_and_hms(2026, 3, 1, 0, 17, 31).unwrap();
        for i in 0..3000 {
            let r = random_record(&mut rng, t0);
            match i % 10 {
                // A disconnect's fallback record, then the settlement that replaces it (in the
                // same batch or a later one).
                0 | 1 => {
                    let mut fallback = r.clone();
                    fallback.cost = Decimal::ZERO;
                    fallback.output_tokens = 1;
                    w.send(StoreOp::RecordIfAbsent(Box::new(fallback))).unwrap();
                    if i % 10 == 1 {
                        w.barrier().await.unwrap();
                    }
                    w.send(StoreOp::Settle {
                        key_id: r.key_id.clone(),
                        balances: Default::default(),
                        debit: writer::Debit {
                            bucket: r.bucket.clone().unwrap_or_default(),
                            amount: r.cost,
                            charge: r.cost,
                            epoch: 0,
                        },
                        hold_id: None,
                        drew: false,
                        record: Some(Box::new(r)),
                    })
                    .unwrap();
                }
                // A fallback record after the settlement changes nothing.
                2 => {
                    let mut fallback = r.clone();
                    fallback.cost = Decimal::ONE;
                    w.send(StoreOp::Record(Box::new(r))).unwrap();
                    w.send(StoreOp::RecordIfAbsent(Box::new(fallback))).unwrap();
                }
                _ => w.send(StoreOp::Record(Box::new(r))).unwrap(),
            }
        }
        // Retention takes out everything before a cutoff inside an hour.
        let cutoff = t0 + chrono::Duration::minutes(200);
        crate::ledger::retention::prune(&w, micros(cutoff))
            .await
            .unwrap();
        thread.stop();
        // Two open holds left by a crash: one request with a fallback record already.
        let mut draft = random_record(&mut rng, t0);
        draft.bucket = Some("credit".into());
        draft.currency = Some("USD".into());
        draft.task = Some("run-2".into());
        let mut fallback = draft.clone();
        fallback.cost = Decimal::ZERO;
        let mut batch = sled::Batch::default();
        let mut delta = RollupDelta::default();
        super::super::store::put_record(&mut batch, &mut delta, &fallback);
        delta.write_into(store.db(), &mut batch).unwrap();
        store.db().apply_batch(batch).unwrap();
        for (id, d) in [(1u64, draft), (2, random_record(&mut rng, t0))] {
            let hold = crate::ledger::store::PersistedHold {
                hold_id: id,
                key_id: d.key_id.clone(),
                bucket: d.bucket.clone().unwrap_or_default(),
                granted: Decimal::ONE,
                consumed: Decimal::new(37, 3),
                consumed_tokens: 5,
                updated_at: d.started_at,
                draft: Box::new(d),
            };
            let k = format!("h/{id:016x}");
            store
                .db()
                .insert(k, crate::ledger::store::encode_compact(&hold))
                .unwrap();
        }
        assert_eq!(store.recover_holds().unwrap(), 2);

        let written = hourly(&store, true);
        assert_eq!(written, hourly(&store, false));
        assert!(written.len() > 100, "{}", written.len());
        assert!(written.keys().all(|(h, _)| *h >= micros(cutoff) / HOUR));

        // Each workflow run's rollup holds what its records add up to, and answers the usage
        // endpoint as its records do, for every grouping.
        let mut runs_seen = 0;
        for task in ["run-0", "run-1", "run-2", "run-3", "run-4", "no-such-run"] {
            let records = store.task_records(task, None, None, None).unwrap();
            let mut by_records = TaskCells::new();
            for r in &records {
                add_to_task(&mut by_records, r);
            }
            let rolled = store.task_cells(task).unwrap();
            assert_eq!(rolled, by_records, "{task}");
            let group_by = crate::ledger::usage::GroupKey::ALL.to_vec();
            let mut usage = crate::ledger::usage::Usage::new(group_by.clone());
            for (c, sums) in &rolled {
                usage.add_task_cell(task, c, sums);
            }
            assert_eq!(
                usage.finish(),
                crate::ledger::usage::aggregate(group_by, &records),
                "{task}"
            );
            if !records.is_empty() {
                runs_seen += 1;
            }
        }
        assert_eq!(runs_seen, 5);
        // A store without rollups (PostgreSQL) answers through the trait's defaults, from the
        // run's records: the same cells, the same first records and the same newest one.
        let plain = WithoutRollups(&store);
        for task in ["run-0", "run-3", "no-such-run"] {
            use crate::store::LedgerStore;
            assert_eq!(
                plain.task_cells(task).unwrap(),
                store.task_cells(task).unwrap()
            );
            let ids = |(first, last): (Vec<LedgerRecord>, Option<LedgerRecord>)| {
                let first: Vec<String> = first.into_iter().map(|r| r.request_id).collect();
                (first, last.map(|r| r.request_id))
            };
            for limit in [0, 7, 10_000] {
                let sled = ids(store.task_ends(task, limit).unwrap());
                assert_eq!(ids(plain.task_ends(task, limit).unwrap()), sled, "{task}");
                assert!(sled.0.len() <= limit);
            }
        }
        // The recovered run's rollup counts its interrupted record, not the fallback it replaced.
        let recovered = store
            .scan_records(None, None, None, None)
            .map(|item| item.unwrap().1)
            .find(|r| r.status == crate::ledger::Status::Interrupted && r.task.is_some())
            .expect("an interrupted record of a run");
        let cells = store
            .task_cells(recovered.task.as_deref().unwrap())
            .unwrap();
        assert!(cells.keys().any(|c| c.status == "interrupted"));

        // Periods on and off the hour, whole and partial, for every filter the explainer takes.
        let at = |m: i64| t0 + chrono::Duration::minutes(m);
        let periods = [
            [(at(0), at(1440)), (at(1440), at(2880))],
            [(at(190), at(1000)), (at(1001), at(4000))],
            [(at(43), at(100)), (at(2000), at(2030))],
            [(at(-60), at(5000)), (at(61), at(62))],
        ];
        let scopes = [
            Scope::All,
            Scope::Key("k1", None),
            Scope::Key("k2", Some("proj-1")),
            Scope::Project("proj-0"),
        ];
        for p in periods {
            for scope in scopes {
                let by_records = explained(&store, scope, p, false);
                assert_eq!(
                    explained(&store, scope, p, true),
                    by_records,
                    "{scope:?} {p:?}"
                );
            }
        }
        assert!(explained(&store, Scope::All, periods[0], true).contains("CNY"));

        // A store from before rollups: built once at open, the same as the writer kept them.
        let before: Vec<_> = store
            .db()
            .scan_prefix(b"r/")
            .map(|kv| kv.unwrap())
            .collect();
        let mut wipe = sled::Batch::default();
        for (k, _) in &before {
            wipe.remove(k.clone());
        }
        wipe.remove(MARKER);
        store.db().apply_batch(wipe).unwrap();
        assert_eq!(
            store.ensure_rollups().unwrap(),
            Some(store.scan_records(None, None, None, None).count())
        );
        let rebuilt: Vec<_> = store
            .db()
            .scan_prefix(b"r/")
            .map(|kv| kv.unwrap())
            .collect();
        let decoded = |kvs: &[(sled::IVec, sled::IVec)]| -> Vec<(Vec<u8>, Rollup)> {
            kvs.iter()
                .map(|(k, v)| (k.to_vec(), decode(k, v).unwrap()))
                .collect()
        };
        assert_eq!(decoded(&rebuilt), decoded(&before));
        assert_eq!(store.ensure_rollups().unwrap(), None, "built once");
    }

    #[test]
    fn rollup_keys_keep_names_apart() {
        // "a/b" and "a" + "/b..." cannot meet: names are hex, then '/'.
        assert_ne!(prefix(b'k', Some("a")), prefix(b'k', Some("a/")));
        assert!(!prefix(b'k', Some("ab")).starts_with(&prefix(b'k', Some("a"))));
        assert_eq!(with_hour(prefix(b'a', None), 1), b"r/a/0000000000000001");
        assert_eq!(
            with_hour(prefix(b'p', Some("p1")), 2),
            b"r/p/7031/0000000000000002"
        );
    }

    #[test]
    fn a_rollup_takes_out_what_it_added() {
        let mut r =
            crate::ledger::usage::tests::rec("k1", Some(("m/p1", "credit", "USD")), 3, 7, "0.25");
        r.input_per_mtok = Some(Decimal::ONE);
        let mut delta = RollupDelta::default();
        delta.add(&r);
        delta.add(&r);
        assert_eq!(delta.plus.len(), 3);
        let mut value = Rollup::default();
        value.merge(&delta.plus[&keys_of(&r)[1].0]);
        let stats = &value.parts[&r.project].values().next().unwrap();
        assert_eq!(stats.requests, 2);
        assert_eq!(stats.cost, "0.50".parse::<Decimal>().unwrap());
        assert_eq!(stats.priced_in, "0.000006".parse::<Decimal>().unwrap());
        let mut once = RollupDelta::default();
        once.add(&r);
        value.take_out(&once.plus[&keys_of(&r)[1].0]);
        assert_eq!(value.parts[&r.project].values().next().unwrap().requests, 1);
        value.take_out(&once.plus[&keys_of(&r)[1].0]);
        assert!(value.parts.is_empty());
        assert_eq!(
            delta.plus[&keys_of(&r)[0].0].tallies.values().sum::<u64>(),
            2
        );
        // A record without a bucket is tallied for all keys, and in no cell.
        let mut delta = RollupDelta::default();
        let rejected = crate::ledger::usage::tests::rec("k1", None, 3, 7, "0");
        delta.add(&rejected);
        assert_eq!(delta.plus.len(), 1);
        let all = &delta.plus[&keys_of(&rejected)[0].0];
        assert!(all.parts.is_empty());
        assert_eq!(all.tallies.values().sum::<u64>(), 1);
    }
}
