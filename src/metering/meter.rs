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

/// A route's prices per million tokens, in its bucket's currency. The cache prices apply to the
/// input tokens an upstream reports it read from (`cache_read`) or wrote to (`cache_write`) its
/// prompt cache; a route that sets none charges them at `input`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Prices {
    pub input: Decimal,
    pub cache_read: Decimal,
    pub cache_write: Decimal,
    pub output: Decimal,
}

/// The tokens a request is billed for. `input` is the whole input, its cached parts included.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Billed {
    pub input: u64,
    pub cache_read: u64,
    pub cache_write: u64,
    pub output: u64,
}

impl Billed {
    /// The counts with `input` at least `cache_read + cache_write`: an upstream that reports
    /// more cached tokens than input tokens has its input raised to match, so that no token is
    /// billed twice or below zero (the record then stays consistent with its own counts).
    pub fn clamped(self) -> Billed {
        Billed {
            input: self
                .input
                .max(self.cache_read.saturating_add(self.cache_write)),
            ..self
        }
    }
}

impl Prices {
    /// The prices of a configured route.
    pub fn of(route: &crate::config::Route) -> Prices {
        Prices {
            input: route.input_per_mtok,
            cache_read: route.cache_read_per_mtok,
            cache_write: route.cache_write_per_mtok,
            output: route.output_per_mtok,
        }
    }

    /// The charge for `b` (clamped, see [`Billed::clamped`]): the uncached input at `input`,
    /// cache reads at `cache_read`, cache writes at `cache_write`, output at `output`, exact;
    /// saturating like [`cost`].
    pub fn charge(&self, b: Billed) -> Decimal {
        let b = b.clamped();
        let uncached = b
            .input
            .saturating_sub(b.cache_read.saturating_add(b.cache_write));
        [
            cost(uncached, self.input),
            cost(b.cache_read, self.cache_read),
            cost(b.cache_write, self.cache_write),
            cost(b.output, self.output),
        ]
        .into_iter()
        .fold(Decimal::ZERO, add_cost)
    }
}

pub struct Meter {
    pub hold: Hold,
    /// The serving route's prices, for settlement.
    pub prices: Prices,
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
    pub fn new(hold: Hold, prices: Prices, initial: u64, max: u64, limit_tokens: u64) -> Meter {
        Meter {
            hold,
            prices,
            per_token: prices.output / MILLION,
            tokens: 0,
            next_ext: initial.max(1),
            max_ext: max.max(1),
            limit_tokens: limit_tokens.max(1),
        }
    }

    /// Whether the hold pays for `tokens` output tokens as it is, without an extension.
    pub fn covers(&self, tokens: u64) -> bool {
        self.per_token
            .checked_mul(Decimal::from(tokens))
            .is_some_and(|price| price <= self.hold.remaining())
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    fn prices(input: &str, read: &str, write: &str, output: &str) -> Prices {
        Prices {
            input: d(input),
            cache_read: d(read),
            cache_write: d(write),
            output: d(output),
        }
    }

    #[test]
    fn cached_input_is_charged_at_the_cache_prices() {
        let p = prices("3", "0.3", "3.75", "15");
        let b = Billed {
            input: 1_000,
            cache_read: 600,
            cache_write: 300,
            output: 50,
        };
        // 100 × 3 + 600 × 0.3 + 300 × 3.75 + 50 × 15 = 300 + 180 + 1125 + 750 per million.
        assert_eq!(p.charge(b), d("0.002355"));
        // Without cached tokens the charge is the plain one.
        let plain = Billed {
            input: 1_000,
            output: 50,
            ..Billed::default()
        };
        assert_eq!(p.charge(plain), cost(1_000, d("3")) + cost(50, d("15")));
    }

    #[test]
    fn cache_prices_equal_to_the_input_price_change_nothing() {
        let p = prices("0.37", "0.37", "0.37", "1.4142135");
        let cached = Billed {
            input: 977,
            cache_read: 500,
            cache_write: 11,
            output: 13,
        };
        let plain = Billed {
            cache_read: 0,
            cache_write: 0,
            ..cached
        };
        assert_eq!(p.charge(cached), p.charge(plain));
    }

    #[test]
    fn more_cached_than_input_raises_the_input() {
        let b = Billed {
            input: 10,
            cache_read: 8,
            cache_write: 7,
            output: 1,
        };
        assert_eq!(b.clamped().input, 15);
        let p = prices("100", "1", "2", "0");
        // Nothing uncached: 8 × 1 + 7 × 2.
        assert_eq!(p.charge(b), d("0.000022"));
        let huge = Billed {
            input: 0,
            cache_read: u64::MAX,
            cache_write: u64::MAX,
            output: 0,
        };
        assert_eq!(huge.clamped().input, u64::MAX);
        let absurd = Prices {
            cache_read: Decimal::MAX,
            ..p
        };
        assert_eq!(absurd.charge(huge), Decimal::MAX, "saturates, never panics");
    }
}
