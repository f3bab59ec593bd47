//! Kubernetes resource quantities, parsed exactly into milli-units (as the API machinery's
//! `MilliValue`, rounding up), so requests and capacities add and compare without float
//! rounding. A malformed quantity is an error, never a silent zero.

use std::collections::BTreeMap;

/// Amounts by resource name, in milli-units: 1 CPU = 1000, 1 byte = 1000, 1 pod = 1000.
pub type Resources = BTreeMap<String, i128>;

/// One unit of a resource, in milli-units (one `pods` slot, one GPU).
pub const ONE: i128 = 1000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid quantity {0:?}")]
pub struct InvalidQuantity(pub String);

/// Parses `<number><suffix>`: a decimal number (sign and fraction allowed) and a binary
/// (`Ki`…`Ei`), decimal SI (`n u m k M G T P E`) or exponent (`e3`, `E-2`) suffix.
pub fn parse_milli(q: &str) -> Result<i128, InvalidQuantity> {
    let invalid = || InvalidQuantity(q.to_owned());
    let s = q.trim();
    let number_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(number_end);
    let (negative, digits) = match number.as_bytes().first() {
        Some(b'-') => (true, &number[1..]),
        Some(b'+') => (false, &number[1..]),
        _ => (false, number),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let all_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !all_digits(whole) || !all_digits(fraction) {
        return Err(invalid());
    }
    // value = mantissa / 10^fraction_len × base^exp; binary suffixes scale by 1024^k.
    let mantissa: i128 = format!("{whole}{fraction}")
        .parse()
        .map_err(|_| invalid())?;
    let mut ten_exp: i32 = -(fraction.len() as i32) + 3; // milli-units
    let mut binary: u32 = 0;
    match suffix {
        "" => {}
        "Ki" => binary = 1,
        "Mi" => binary = 2,
        "Gi" => binary = 3,
        "Ti" => binary = 4,
        "Pi" => binary = 5,
        "Ei" => binary = 6,
        "n" => ten_exp -= 9,
        "u" => ten_exp -= 6,
        "m" => ten_exp -= 3,
        "k" => ten_exp += 3,
        "M" => ten_exp += 6,
        "G" => ten_exp += 9,
        "T" => ten_exp += 12,
        "P" => ten_exp += 15,
        "E" => ten_exp += 18,
        other => {
            let exp = other
                .strip_prefix(['e', 'E'])
                .filter(|e| !e.is_empty())
                .and_then(|e| e.parse::<i32>().ok())
                .ok_or_else(invalid)?;
            ten_exp += exp;
        }
    }
    let mut value = mantissa
        .checked_mul(1024i128.checked_pow(binary).ok_or_else(invalid)?)
        .ok_or_else(invalid)?;
    if ten_exp >= 0 {
        value = value
            .checked_mul(10i128.checked_pow(ten_exp as u32).ok_or_else(invalid)?)
            .ok_or_else(invalid)?;
    } else {
        let divisor = 10i128
            .checked_pow(ten_exp.unsigned_abs())
            .ok_or_else(invalid)?;
        // Round up, as Kubernetes does when it scales a quantity down.
        value = (value + divisor - 1) / divisor;
    }
    Ok(if negative { -value } else { value })
}

/// `name → quantity` as [`Resources`]; the first malformed quantity is the error.
pub fn parse_all<'a>(
    quantities: impl IntoIterator<Item = (&'a String, &'a str)>,
) -> Result<Resources, InvalidQuantity> {
    quantities
        .into_iter()
        .map(|(k, v)| Ok((k.clone(), parse_milli(v)?)))
        .collect()
}

pub fn add(into: &mut Resources, from: &Resources) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

/// Whether `want` fits in `free` (resources not listed in `free` have none).
pub fn fits(free: &Resources, want: &Resources) -> bool {
    want.iter()
        .all(|(k, v)| *v <= 0 || free.get(k).copied().unwrap_or(0) >= *v)
}

pub fn take(free: &mut Resources, want: &Resources) {
    for (k, v) in want {
        *free.entry(k.clone()).or_default() -= v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_exactly() {
        let cases: &[(&str, i128)] = &[
            ("1", 1000),
            ("500m", 500),
            ("0.1", 100),
            ("1.5", 1500),
            ("100Mi", 100 * 1024 * 1024 * 1000),
            ("1Gi", 1024i128.pow(3) * 1000),
            ("1G", 1_000_000_000_000),
            ("128974848", 128_974_848_000),
            ("129e6", 129_000_000_000),
            ("12E-1", 1200),
            ("1n", 1),
            ("250u", 1),
            ("0", 0),
            ("+2", 2000),
            ("-1", -1000),
            ("1Ei", 1024i128.pow(6) * 1000),
        ];
        for (q, want) in cases {
            assert_eq!(parse_milli(q), Ok(*want), "{q}");
        }
        // Three tenths are three tenths: no float drift when adding.
        let sum: i128 = ["100m", "100m", "100m"]
            .iter()
            .map(|q| parse_milli(q).unwrap())
            .sum();
        assert_eq!(sum, parse_milli("0.3").unwrap());
    }

    #[test]
    fn malformed_quantities_are_errors() {
        for bad in ["", "abc", "1.2.3", "1Qi", "m", "1e", "--1", "1 Gi", "1ee3"] {
            assert!(parse_milli(bad).is_err(), "{bad:?}");
        }
    }
}
