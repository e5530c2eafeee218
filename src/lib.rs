//! tollgate: an OpenAI-compatible LLM gateway that meters streams token by token, charges exact
//! wallets per settlement bucket, and keeps a route ledger for every request.
//!
//! Request path, in module order: `api` (authenticate, check input) → `router` (plan, reserve,
//! attempt, retry/fall back) → `route` (health, breaker, probes) → `wallet` (holds) → `metering`
//! (SSE parse, count, draw) → `ledger` (settle and record) → `store` (sled, or the PostgreSQL
//! database a fleet shares). `catalog` answers what a key can call
//! now; `mock` is the built-in upstream for the demo, tests and load tests.
#![forbid(unsafe_code)]

pub mod api;
pub mod app;
pub mod catalog;
pub mod config;
pub mod console;
pub mod keys;
pub mod ledger;
pub mod limits;
pub mod metering;
pub mod metrics;
pub mod mock;
pub mod route;
pub mod router;
pub mod store;
pub mod wallet;
