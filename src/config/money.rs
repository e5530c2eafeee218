//! Exact amounts in configuration: TOML strings ("0.15") or numbers (0.15, 2) become `Decimal`.
//! A TOML float is read through its shortest round-trip text, which is what the user wrote for
//! any price with up to 15 significant digits.

use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Amount(pub Decimal);

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Text(String),
            Int(i64),
            Float(f64),
        }
        let parsed = match Repr::deserialize(d)? {
            Repr::Text(s) => Decimal::from_str(s.trim()),
            Repr::Int(i) => Ok(Decimal::from(i)),
            Repr::Float(f) => Decimal::from_str(&f.to_string()),
        };
        parsed
            .map(|v| Amount(v.normalize()))
            .map_err(|_| serde::de::Error::custom("expected a decimal amount such as \"0.15\""))
    }
}
