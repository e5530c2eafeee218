//! The route ledger: the record type, the sled store, and the writer thread that commits wallet
//! debits together with the records that explain them; then what reads it in bulk: export
//! formats, usage aggregation, the spend-change explainer, and retention pruning.

pub mod explain;
pub mod export;
pub mod record;
pub mod retention;
pub mod rollup;
pub mod store;
pub mod usage;
pub mod writer;

pub use record::{Attempt, LedgerRecord, Status, UpstreamUsage, UsageSource};
pub use store::{new_request_id, Store, StoreError};
pub use writer::{LedgerWriter, StoreOp, TopupOutcome};
