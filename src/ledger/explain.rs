//! The spend-change explainer (`GET /admin/usage/explain`, docs/api.md): why spend in one currency
//! moved between a base period and a current period, split over seven drivers whose
//! contributions add up to the change exactly.
//!
//! Method: sequential substitution (a chained index decomposition) over a cost model that
//! reproduces each period's spend. Per currency, every billed record falls in a *cell*
//! `k = (model, fell back?, route, retried?)`. A period's spend is
//!
//! ```text
//! cost = N × Σ_k  μ(model) · φ(fell back | model) · ρ(route | model, fell back)
//!                 · τ(retried | model, fell back, route) · (ī_k · a_k + ō_k · b_k)
//! ```
//!
//! with `N` requests, the conditional shares `μ φ ρ τ` (the cell's share of requests is their
//! product), `ī_k`/`ō_k` input/output tokens per request in the cell, and `a_k`/`b_k` the cell's
//! effective price per input/output token (the priced cost of its tokens, scaled so the cell's
//! modelled cost equals what was actually debited: shortfalls and price edits are absorbed here).
//! A record with cached input tokens prices its input as its charge less its output, since the
//! cache prices it was charged at are the route's, not the record's.
//!
//! Starting from the base period's factors, the factors are switched to the current period's one
//! driver at a time in a fixed order — `volume` (N), `input_tokens` (ī), `output_tokens` (ō),
//! `model_mix` (μ), `route_mix` (ρ, with the route prices a, b), `fallback_share` (φ),
//! `retry_share` (τ) — and each driver's contribution is the change in modelled spend at its
//! step. The first stage is the base spend and the last the current spend, so the contributions
//! telescope to `current − base` exactly; the two end stages are pinned to the recorded sums and
//! the intermediate stages rounded to a fixed scale, so the exactness does not depend on decimal
//! division being exact. A factor that does not exist in one period (a model, route or cell with
//! no requests there) takes the other period's value: it carries zero weight where it is missing,
//! so this changes no period's spend and keeps a new route's cost out of the token drivers.
//!
//! Retries are not billed (only the serving attempt is), so `retry_share` only moves spend when
//! retried requests cost differently per request from the others; fallbacks move spend when the
//! backup routes cost differently from the primaries. Records without a bucket (rejected
//! requests) cost nothing and are left out.

use std::collections::{BTreeMap, BTreeSet};

use rust_decimal::{Decimal, RoundingStrategy};
use serde::Serialize;

use super::record::LedgerRecord;
use super::rollup::{CellStats, RollupCell};

/// The drivers, in substitution order.
pub const DRIVERS: [&str; 7] = [
    "volume",
    "input_tokens",
    "output_tokens",
    "model_mix",
    "route_mix",
    "fallback_share",
    "retry_share",
];

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Cell {
    model: String,
    fell_back: bool,
    route: String,
    retried: bool,
}

/// One period's billed records, per currency and cell. Fold records in with `add`.
#[derive(Debug, Clone, Default)]
pub struct Period {
    currencies: BTreeMap<String, BTreeMap<Cell, CellStats>>,
}

impl Period {
    pub fn add(&mut self, r: &LedgerRecord) {
        if let Some(cell) = RollupCell::of(r) {
            self.add_cell(&cell, &CellStats::of(r));
        }
    }

    /// Adds the sums of a rollup cell (the records of an hour that fall in it): the same as
    /// adding those records one by one.
    pub fn add_cell(&mut self, cell: &RollupCell, s: &CellStats) {
        let Some(currency) = &cell.currency else {
            return;
        };
        let key = Cell {
            model: cell.model.clone(),
            fell_back: cell.fell_back,
            route: cell.route.clone(),
            retried: cell.retried,
        };
        let cells = match self.currencies.get_mut(currency) {
            Some(c) => c,
            None => self.currencies.entry(currency.clone()).or_default(),
        };
        match cells.get_mut(&key) {
            Some(c) => c.add(s),
            None => {
                cells.insert(key, s.clone());
            }
        }
    }

    pub fn from_records<'a>(records: impl IntoIterator<Item = &'a LedgerRecord>) -> Period {
        let mut p = Period::default();
        for r in records {
            p.add(r);
        }
        p
    }
}

/// One currency's explanation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CurrencyChange {
    pub currency: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub base_cost: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub current_cost: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub change: Decimal,
    pub drivers: Vec<Driver>,
}

/// One driver's figures in both periods and its share of the change.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Driver {
    pub driver: &'static str,
    /// The period figure (decimal string): requests; tokens per request; share of requests on
    /// pricier models/routes; share of requests with a fallback/retry.
    pub base: String,
    pub current: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub contribution: Decimal,
    pub summary: String,
}

/// Explains the change from `base` to `current`, one entry per currency seen in either period.
pub fn explain(base: &Period, current: &Period) -> Vec<CurrencyChange> {
    let currencies: BTreeSet<&String> = base
        .currencies
        .keys()
        .chain(current.currencies.keys())
        .collect();
    let empty = BTreeMap::new();
    currencies
        .into_iter()
        .map(|c| {
            explain_currency(
                c,
                base.currencies.get(c).unwrap_or(&empty),
                current.currencies.get(c).unwrap_or(&empty),
            )
        })
        .collect()
}

/// Request counts per conditioning context of one period.
#[derive(Default)]
struct Counts<'a> {
    total: u64,
    model: BTreeMap<&'a str, u64>,
    model_fb: BTreeMap<(&'a str, bool), u64>,
    model_fb_route: BTreeMap<(&'a str, bool, &'a str), u64>,
}

impl<'a> Counts<'a> {
    fn of(cells: &'a BTreeMap<Cell, CellStats>) -> Counts<'a> {
        let mut c = Counts::default();
        for (k, s) in cells {
            c.total += s.requests;
            *c.model.entry(&k.model).or_default() += s.requests;
            *c.model_fb.entry((&k.model, k.fell_back)).or_default() += s.requests;
            *c.model_fb_route
                .entry((&k.model, k.fell_back, &k.route))
                .or_default() += s.requests;
        }
        c
    }
}

fn ratio(num: Decimal, den: Decimal) -> Option<Decimal> {
    if den.is_zero() {
        None
    } else {
        num.checked_div(den)
    }
}

fn count(n: u64) -> Decimal {
    Decimal::from(n)
}

/// A conditional share in period p: `num/den` when the context exists in p, else the other
/// period's (it has no weight in p, see the module comment).
fn share(p: (u64, u64), q: (u64, u64)) -> Decimal {
    ratio(count(p.0), count(p.1))
        .or_else(|| ratio(count(q.0), count(q.1)))
        .unwrap_or_default()
}

/// A cell's factors in one period.
#[derive(Clone, Copy, Default)]
struct Factors {
    in_per_req: Decimal,
    out_per_req: Decimal,
    model: Decimal,
    route: Decimal,
    price_in: Decimal,
    price_out: Decimal,
    fallback: Decimal,
    retry: Decimal,
}

/// Token and price factors from the cell's own stats in p, else q's.
fn cell_values(
    p: Option<&CellStats>,
    q: Option<&CellStats>,
) -> (Decimal, Decimal, Decimal, Decimal) {
    let Some(s) = p.filter(|s| s.requests > 0).or(q) else {
        return Default::default();
    };
    let n = count(s.requests);
    let priced = s.priced_in + s.priced_out;
    // What was debited over what the tokens cost at list price (1 without shortfall).
    let paid = ratio(s.cost, priced).unwrap_or(Decimal::ONE);
    let price_in = ratio(s.priced_in, count(s.input_tokens)).unwrap_or_default() * paid;
    let price_out = ratio(s.priced_out, count(s.output_tokens)).unwrap_or_default() * paid;
    (
        ratio(count(s.input_tokens), n).unwrap_or_default(),
        ratio(count(s.output_tokens), n).unwrap_or_default(),
        price_in,
        price_out,
    )
}

fn factors(
    cell: &Cell,
    own: (&BTreeMap<Cell, CellStats>, &Counts),
    other: (&BTreeMap<Cell, CellStats>, &Counts),
) -> Factors {
    let m = cell.model.as_str();
    let mf = (m, cell.fell_back);
    let mfr = (m, cell.fell_back, cell.route.as_str());
    let get = |c: &Counts, which: u8| -> (u64, u64) {
        let n_m = c.model.get(m).copied().unwrap_or(0);
        let n_mf = c.model_fb.get(&mf).copied().unwrap_or(0);
        let n_mfr = c.model_fb_route.get(&mfr).copied().unwrap_or(0);
        match which {
            0 => (n_m, c.total),
            1 => (n_mf, n_m),
            2 => (n_mfr, n_mf),
            _ => (0, n_mfr),
        }
    };
    let leaf = |cells: &BTreeMap<Cell, CellStats>| cells.get(cell).map_or(0, |s| s.requests);
    let (in_per_req, out_per_req, price_in, price_out) =
        cell_values(own.0.get(cell), other.0.get(cell));
    Factors {
        in_per_req,
        out_per_req,
        model: share(get(own.1, 0), get(other.1, 0)),
        fallback: share(get(own.1, 1), get(other.1, 1)),
        route: share(get(own.1, 2), get(other.1, 2)),
        retry: share(
            (leaf(own.0), get(own.1, 3).1),
            (leaf(other.0), get(other.1, 3).1),
        ),
        price_in,
        price_out,
    }
}

/// Modelled spend at stage `j`: drivers before `j` (in `DRIVERS` order) take current values.
fn stage(j: usize, n: (Decimal, Decimal), cells: &[(Factors, Factors)]) -> Decimal {
    let pick = |i: usize, b: Decimal, c: Decimal| if j > i { c } else { b };
    let mut per_request = Decimal::ZERO;
    for (b, c) in cells {
        let route_current = j > 4;
        let (price_in, price_out) = if route_current {
            (c.price_in, c.price_out)
        } else {
            (b.price_in, b.price_out)
        };
        let unit = pick(1, b.in_per_req, c.in_per_req) * price_in
            + pick(2, b.out_per_req, c.out_per_req) * price_out;
        per_request += pick(3, b.model, c.model)
            * pick(4, b.route, c.route)
            * pick(5, b.fallback, c.fallback)
            * pick(6, b.retry, c.retry)
            * unit;
    }
    pick(0, n.0, n.1) * per_request
}

/// Period figures shown next to each driver.
struct Figures {
    requests: u64,
    input_tokens: u64,
    output_tokens: u64,
    pricier_models: u64,
    pricier_routes: u64,
    fell_back: u64,
    retried: u64,
    cost: Decimal,
}

fn figures(
    cells: &BTreeMap<Cell, CellStats>,
    pricier_models: &BTreeSet<String>,
    pricier_routes: &BTreeSet<(String, String)>,
) -> Figures {
    let mut f = Figures {
        requests: 0,
        input_tokens: 0,
        output_tokens: 0,
        pricier_models: 0,
        pricier_routes: 0,
        fell_back: 0,
        retried: 0,
        cost: Decimal::ZERO,
    };
    for (k, s) in cells {
        f.requests += s.requests;
        f.input_tokens += s.input_tokens;
        f.output_tokens += s.output_tokens;
        f.cost += s.cost;
        if pricier_models.contains(&k.model) {
            f.pricier_models += s.requests;
        }
        if pricier_routes.contains(&(k.model.clone(), k.route.clone())) {
            f.pricier_routes += s.requests;
        }
        if k.fell_back {
            f.fell_back += s.requests;
        }
        if k.retried {
            f.retried += s.requests;
        }
    }
    f.cost = f.cost.normalize();
    f
}

/// Models (and routes within their model) whose cost per request, over both periods together,
/// is above the average of everything (of their model): what "pricier" means in the figures.
fn pricier(
    base: &BTreeMap<Cell, CellStats>,
    current: &BTreeMap<Cell, CellStats>,
) -> (BTreeSet<String>, BTreeSet<(String, String)>) {
    let mut all = (0u64, Decimal::ZERO);
    let mut models: BTreeMap<&str, (u64, Decimal)> = BTreeMap::new();
    let mut routes: BTreeMap<(&str, &str), (u64, Decimal)> = BTreeMap::new();
    for (k, s) in base.iter().chain(current.iter()) {
        for acc in [
            &mut all,
            models.entry(&k.model).or_default(),
            routes.entry((&k.model, &k.route)).or_default(),
        ] {
            acc.0 += s.requests;
            acc.1 += s.cost;
        }
    }
    let avg = |a: (u64, Decimal)| ratio(a.1, count(a.0)).unwrap_or_default();
    let pricier_models = models
        .iter()
        .filter(|(_, a)| avg(**a) > avg(all))
        .map(|(m, _)| m.to_string())
        .collect();
    let pricier_routes = routes
        .iter()
        .filter(|((m, _), a)| models.get(m).is_some_and(|ma| avg(**a) > avg(*ma)))
        .map(|((m, r), _)| (m.to_string(), r.to_string()))
        .collect();
    (pricier_models, pricier_routes)
}

fn explain_currency(
    currency: &str,
    base: &BTreeMap<Cell, CellStats>,
    current: &BTreeMap<Cell, CellStats>,
) -> CurrencyChange {
    let (cb, cc) = (Counts::of(base), Counts::of(current));
    let all: BTreeSet<&Cell> = base.keys().chain(current.keys()).collect();
    let cells: Vec<(Factors, Factors)> = all
        .into_iter()
        .map(|k| {
            (
                factors(k, (base, &cb), (current, &cc)),
                factors(k, (current, &cc), (base, &cb)),
            )
        })
        .collect();
    let (pm, pr) = pricier(base, current);
    let fb = figures(base, &pm, &pr);
    let fc = figures(current, &pm, &pr);
    let change = fc.cost - fb.cost;

    // Intermediate stages are rounded a few digits below the recorded amounts' own precision,
    // so exact cases read exactly; the end stages are the recorded sums.
    let scale = (fb.cost.scale().max(fc.cost.scale()) + 4).min(24);
    let n = (count(cb.total), count(cc.total));
    let mut stages = vec![fb.cost];
    for j in 1..DRIVERS.len() {
        stages.push(
            stage(j, n, &cells)
                .round_dp_with_strategy(scale, RoundingStrategy::MidpointNearestEven),
        );
    }
    stages.push(fc.cost);

    let share_of =
        |part: u64, f: &Figures| ratio(count(part), count(f.requests)).unwrap_or_default();
    let per_req =
        |part: u64, f: &Figures| ratio(count(part), count(f.requests)).unwrap_or_default();
    let names = |set: &BTreeSet<String>| set.iter().cloned().collect::<Vec<_>>();
    let route_names: Vec<String> = pr.iter().map(|(_, r)| r.clone()).collect();
    let drivers = DRIVERS
        .iter()
        .enumerate()
        .map(|(i, &driver)| {
            let contribution = (stages[i + 1] - stages[i]).normalize();
            let (kind, b, c) = match driver {
                "volume" => (
                    Figure::Count("requests"),
                    count(fb.requests),
                    count(fc.requests),
                ),
                "input_tokens" => (
                    Figure::Count("input tokens per request"),
                    per_req(fb.input_tokens, &fb),
                    per_req(fc.input_tokens, &fc),
                ),
                "output_tokens" => (
                    Figure::Count("output tokens per request"),
                    per_req(fb.output_tokens, &fb),
                    per_req(fc.output_tokens, &fc),
                ),
                "model_mix" => (
                    Figure::Share(named("share of requests on pricier models", &names(&pm))),
                    share_of(fb.pricier_models, &fb),
                    share_of(fc.pricier_models, &fc),
                ),
                "route_mix" => (
                    Figure::Share(named("share of requests on pricier routes", &route_names)),
                    share_of(fb.pricier_routes, &fb),
                    share_of(fc.pricier_routes, &fc),
                ),
                "fallback_share" => (
                    Figure::Share("share of requests that fell back".into()),
                    share_of(fb.fell_back, &fb),
                    share_of(fc.fell_back, &fc),
                ),
                _ => (
                    Figure::Share("share of requests with retries".into()),
                    share_of(fb.retried, &fb),
                    share_of(fc.retried, &fc),
                ),
            };
            let (b, c) = match kind {
                Figure::Count(_) => (round(b, 2), round(c, 2)),
                Figure::Share(_) => (round(b, 4), round(c, 4)),
            };
            Driver {
                driver,
                summary: summary(
                    &kind,
                    (b, c),
                    contribution,
                    matches!(
                        driver,
                        "input_tokens" | "output_tokens" | "model_mix" | "route_mix"
                    ),
                    currency,
                ),
                base: b.to_string(),
                current: c.to_string(),
                contribution,
            }
        })
        .collect();
    CurrencyChange {
        currency: currency.to_string(),
        base_cost: fb.cost,
        current_cost: fc.cost,
        change: change.normalize(),
        drivers,
    }
}

enum Figure {
    Count(&'static str),
    Share(String),
}

fn named(label: &str, names: &[String]) -> String {
    match names.len() {
        0 => label.to_string(),
        1..=3 => format!("{label} ({})", names.join(", ")),
        n => format!("{label} ({} and {} more)", names[..2].join(", "), n - 2),
    }
}

fn round(d: Decimal, dp: u32) -> Decimal {
    d.round_dp_with_strategy(dp, RoundingStrategy::MidpointAwayFromZero)
        .normalize()
}

/// One plain-language line, e.g. "requests rose from 10 to 20 (+100%), adding 0.00012 USD".
///
/// For the token and mix drivers the figure is the period's plain average, while the contribution
/// compares like for like (within each model and route); when the two point different ways (a
/// shift of traffic towards cheaper, shorter requests, say), the line says so.
fn summary(
    kind: &Figure,
    (b, c): (Decimal, Decimal),
    contribution: Decimal,
    directional: bool,
    currency: &str,
) -> String {
    let (label, show): (String, fn(Decimal) -> String) = match kind {
        Figure::Count(l) => (l.to_string(), |d| d.to_string()),
        Figure::Share(l) => (l.clone(), |d| {
            format!("{}%", round(d * Decimal::ONE_HUNDRED, 1))
        }),
    };
    let movement = if b == c {
        format!("stayed at {}", show(b))
    } else {
        let verb = if c > b { "rose" } else { "fell" };
        let pct = match (kind, ratio((c - b) * Decimal::ONE_HUNDRED, b)) {
            (Figure::Count(_), Some(p)) => {
                let p = round(p, 1);
                format!(" ({}{p}%)", if p > Decimal::ZERO { "+" } else { "" })
            }
            _ => String::new(),
        };
        format!("{verb} from {} to {}{pct}", show(b), show(c))
    };
    let effect = if contribution > Decimal::ZERO {
        format!("adding {contribution} {currency}")
    } else if contribution < Decimal::ZERO {
        format!("saving {} {currency}", contribution.abs())
    } else {
        "no effect on spend".to_string()
    };
    let agrees = contribution.is_zero() && b == c
        || contribution > Decimal::ZERO && c > b
        || contribution < Decimal::ZERO && c < b;
    if directional && !agrees {
        let effect = if contribution > Decimal::ZERO {
            format!("added {contribution} {currency}")
        } else if contribution < Decimal::ZERO {
            format!("saved {} {currency}", contribution.abs())
        } else {
            "had no effect on spend".to_string()
        };
        format!(
            "{label} {movement} overall; like for like (within each model and route) it {effect}"
        )
    } else {
        format!("{label} {movement}, {effect}")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::ledger::usage::tests::rec;

    const MILLION: Decimal = Decimal::from_parts(1_000_000, 0, 0, false, 0);

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    /// A USD record on `route` of model `m` priced at `pin`/`pout` per Mtok.
    fn billed(route: &str, input: u64, output: u64, pin: &str, pout: &str) -> LedgerRecord {
        let mut r = rec("k", Some((route, "credit", "USD")), input, output, "0");
        r.input_per_mtok = Some(d(pin));
        r.output_per_mtok = Some(d(pout));
        r.cost = (Decimal::from(input) * d(pin) + Decimal::from(output) * d(pout)) / MILLION;
        r
    }

    fn run(base: &[LedgerRecord], current: &[LedgerRecord]) -> CurrencyChange {
        let out = explain(&Period::from_records(base), &Period::from_records(current));
        assert_eq!(out.len(), 1);
        let c = out.into_iter().next().unwrap();
        let sum: Decimal = c.drivers.iter().map(|d| d.contribution).sum();
        assert_eq!(sum, c.change, "contributions must add up to the change");
        assert_eq!(c.change, c.current_cost - c.base_cost);
        c
    }

    fn contribution(c: &CurrencyChange, driver: &str) -> Decimal {
        c.drivers
            .iter()
            .find(|d| d.driver == driver)
            .unwrap()
            .contribution
    }

    fn driver<'a>(c: &'a CurrencyChange, name: &str) -> &'a Driver {
        c.drivers.iter().find(|d| d.driver == name).unwrap()
    }

    #[test]
    fn doubled_volume_is_all_volume() {
        let base: Vec<_> = (0..10).map(|_| billed("A", 2, 8, "1", "2")).collect();
        let current: Vec<_> = (0..20).map(|_| billed("A", 2, 8, "1", "2")).collect();
        let c = run(&base, &current);
        assert_eq!(c.base_cost, d("0.00018"));
        assert_eq!(c.current_cost, d("0.00036"));
        assert_eq!(contribution(&c, "volume"), d("0.00018"));
        for other in &DRIVERS[1..] {
            assert_eq!(contribution(&c, other), Decimal::ZERO, "{other}");
        }
        let v = driver(&c, "volume");
        assert_eq!((v.base.as_str(), v.current.as_str()), ("10", "20"));
        assert_eq!(
            v.summary,
            "requests rose from 10 to 20 (+100%), adding 0.00018 USD"
        );
        assert_eq!(
            driver(&c, "output_tokens").summary,
            "output tokens per request stayed at 8, no effect on spend"
        );
    }

    #[test]
    fn moving_traffic_to_a_pricier_route_is_route_mix() {
        let base: Vec<_> = (0..10).map(|_| billed("cheap", 2, 8, "1", "2")).collect();
        let current: Vec<_> = (0..10).map(|_| billed("pricey", 2, 8, "3", "4")).collect();
        let c = run(&base, &current);
        // 10 × (2×3 + 8×4)/1e6 − 10 × (2×1 + 8×2)/1e6 = 0.00038 − 0.00018
        assert_eq!(c.change, d("0.0002"));
        assert_eq!(contribution(&c, "route_mix"), d("0.0002"));
        let r = driver(&c, "route_mix");
        assert_eq!((r.base.as_str(), r.current.as_str()), ("0", "1"));
        assert!(r.summary.contains("(pricey)"), "{}", r.summary);
        assert!(r.summary.contains("rose from 0% to 100%"), "{}", r.summary);
        assert_eq!(contribution(&c, "volume"), Decimal::ZERO);
    }

    #[test]
    fn longer_answers_are_output_tokens() {
        let base: Vec<_> = (0..4).map(|_| billed("A", 2, 8, "1", "2")).collect();
        let current: Vec<_> = (0..4).map(|_| billed("A", 2, 16, "1", "2")).collect();
        let c = run(&base, &current);
        assert_eq!(contribution(&c, "output_tokens"), d("0.000064"));
        assert_eq!(c.change, d("0.000064"));
        assert!(driver(&c, "output_tokens")
            .summary
            .starts_with("output tokens per request rose from 8 to 16 (+100%)"));
    }

    #[test]
    fn fallbacks_to_a_pricier_backup_are_fallback_share() {
        let base: Vec<_> = (0..10).map(|_| billed("primary", 2, 8, "1", "2")).collect();
        let mut current: Vec<_> = (0..7).map(|_| billed("primary", 2, 8, "1", "2")).collect();
        for _ in 0..3 {
            let mut r = billed("backup", 2, 8, "3", "4");
            r.fallbacks = 1;
            current.push(r);
        }
        let c = run(&base, &current);
        // 3 requests moved from 0.000018 to 0.000038 each.
        assert_eq!(c.change, d("0.00006"));
        assert_eq!(contribution(&c, "fallback_share"), d("0.00006"));
        let f = driver(&c, "fallback_share");
        assert_eq!((f.base.as_str(), f.current.as_str()), ("0", "0.3"));
        assert_eq!(contribution(&c, "route_mix"), Decimal::ZERO);
    }

    #[test]
    fn mixed_changes_add_up_exactly_and_a_new_currency_is_all_volume() {
        let mut base = Vec::new();
        let mut current = Vec::new();
        for i in 0..7u64 {
            base.push(billed("A", 3 + i, 5 + i, "0.15", "0.6"));
            let mut r = billed(
                if i % 3 == 0 { "B" } else { "A" },
                4 + 2 * i,
                9,
                "0.15",
                "0.6",
            );
            if i % 3 == 0 {
                r.input_per_mtok = Some(d("0.5"));
                r.output_per_mtok = Some(d("2"));
                r.cost = (Decimal::from(r.input_tokens) * d("0.5") + Decimal::from(9u64) * d("2"))
                    / MILLION;
                r.retries = 1;
            }
            current.push(r);
        }
        for i in 0..4u64 {
            let mut r = billed("A", 1, 1 + i, "0.15", "0.6");
            r.requested_model = "other".into();
            // A shortfall: only part of the charge was debited.
            r.cost /= Decimal::TWO;
            current.push(r);
        }
        let c = run(&base, &current);
        assert!(c.change > Decimal::ZERO);
        // The new model's short answers pull the plain average down; like for like it rose.
        let out = driver(&c, "output_tokens");
        assert_eq!((out.base.as_str(), out.current.as_str()), ("8", "6.64"));
        assert!(out.summary.contains("like for like"), "{}", out.summary);
        assert!(contribution(&c, "output_tokens") > Decimal::ZERO);
        assert!(contribution(&c, "model_mix") < Decimal::ZERO);
        assert!(contribution(&c, "route_mix") > Decimal::ZERO);
        assert_eq!(contribution(&c, "retry_share"), Decimal::ZERO);

        let mut cny = billed("C", 2, 8, "3", "4");
        cny.currency = Some("CNY".into());
        let out = explain(&Period::default(), &Period::from_records([&cny]));
        assert_eq!(out[0].currency, "CNY");
        assert_eq!(out[0].change, d("0.000038"));
        assert_eq!(contribution(&out[0], "volume"), d("0.000038"));
    }

    #[test]
    fn rejected_records_are_left_out() {
        let rejected = rec("k", None, 5, 0, "0");
        assert!(explain(&Period::from_records([&rejected]), &Period::default()).is_empty());
    }
}
