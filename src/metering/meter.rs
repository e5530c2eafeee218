//! The per-request meter: output tokens are paid from the local hold before they are forwarded;
//! when the hold runs out the wallet is asked for an extension that grows from
//! `initial_output_hold_tokens` to `max_output_hold_tokens`. No message per token.

use rust_decimal::Decimal;

use crate::wallet::Hold;

const MILLION: Decimal = Decimal::from_parts(1_000_000, 0, 0, false, 0);

/// Price of `tokens` at `per_mtok` (per million tokens), exact. A product beyond what a
/// `Decimal` holds (absurd token counts, R40) saturates at `Decimal::MAX`: it can never be paid,
/// so it debits at most the available balance and records the rest as shortfall.
pub fn cost(tokens: u64, per_mtok: Decimal) -> Decimal {
    checked_cost(tokens, per_mtok).unwrap_or(Decimal::MAX)
}

/// [`cost`], or `None` beyond what a `Decimal` holds.
pub fn checked_cost(tokens: u64, per_mtok: Decimal) -> Option<Decimal> {
    Decimal::from(tokens)
        .checked_mul(per_mtok)
        .map(|c| c / MILLION)
}

/// `a + b` for amounts, saturating at `Decimal::MAX` (see [`cost`]).
pub fn add_cost(a: Decimal, b: Decimal) -> Decimal {
    a.checked_add(b).unwrap_or(Decimal::MAX)
}

pub struct Meter {
    pub hold: Hold,
    per_token: Decimal,
    /// Output tokens paid for (and so forwarded).
    pub tokens: u64,
    next_ext: u64,
    max_ext: u64,
    /// Bound on output tokens for the whole request (n × max tokens).
    limit_tokens: u64,
}

impl Meter {
    /// `hold` must already carry the input cost as consumed.
    pub fn new(
        hold: Hold,
        output_per_mtok: Decimal,
        initial: u64,
        max: u64,
        limit_tokens: u64,
    ) -> Meter {
        Meter {
            hold,
            per_token: output_per_mtok / MILLION,
            tokens: 0,
            next_ext: initial.max(1),
            max_ext: max.max(1),
            limit_tokens: limit_tokens.max(1),
        }
    }

    /// Pays for `tokens` output tokens; false when the wallet cannot pay for all of them.
    pub async fn pay(&mut self, tokens: u64) -> bool {
        if tokens == 0 {
            return true;
        }
        let Some(price) = self.per_token.checked_mul(Decimal::from(tokens)) else {
            return false;
        };
        if self.hold.try_draw(price, tokens) {
            self.tokens += tokens;
            return true;
        }
        let left = self.limit_tokens.saturating_sub(self.tokens);
        let want_tokens = self.next_ext.min(left).max(tokens);
        self.next_ext = (self.next_ext.saturating_mul(2)).min(self.max_ext);
        let want = self
            .per_token
            .checked_mul(Decimal::from(want_tokens))
            .unwrap_or(price)
            .max(price)
            - self.hold.remaining();
        self.hold.extend(want).await;
        if self.hold.try_draw(price, tokens) {
            self.tokens += tokens;
            true
        } else {
            false
        }
    }
}
