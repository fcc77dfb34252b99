//! `app_version` packing: "M.m.p" (or "M.m") into the integer `M*10000 + m*100 + p`, and back.
//!
//! The packed code sorts like the version and is lossless for the numeric triple: minor and patch must be
//! 0..=99, major 0..=214747 so the code fits a Postgres `integer`. "0.96" is major 0, minor 96 → 9600.

use thiserror::Error;

/// Largest major component whose packed code still fits an `i32` with minor and patch at 99.
pub const MAX_MAJOR: u32 = 214_747;

/// Why a version cannot be packed. The texts name the part, never the value: versions arrive from untrusted
/// producers, and a device id or IP put in this field must not show in `dead_letters.reason`.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum VersionError {
    #[error("app_version is empty")]
    Empty,
    #[error("app_version has {0} dot-separated parts; expected two or three numeric parts (M.m or M.m.p)")]
    Shape(usize),
    #[error("app_version part {0} is not a decimal number of at most 6 digits")]
    NotNumeric(usize),
    #[error("app_version part {0} is above 99, which the packed integer cannot hold")]
    PartTooLarge(usize),
    #[error("app_version major part is above {MAX_MAJOR}, which the packed integer cannot hold")]
    MajorTooLarge,
}

/// Packs "M.m.p" / "M.m" into `M*10000 + m*100 + p`.
pub fn pack(text: &str) -> Result<i32, VersionError> {
    if text.is_empty() {
        return Err(VersionError::Empty);
    }
    let parts: Vec<&str> = text.split('.').collect();
    if !(2..=3).contains(&parts.len()) {
        return Err(VersionError::Shape(parts.len()));
    }
    let mut nums = [0u32; 3];
    for (i, (slot, part)) in nums.iter_mut().zip(&parts).enumerate() {
        if part.is_empty() || part.len() > 6 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(VersionError::NotNumeric(i + 1));
        }
        *slot = part.parse().map_err(|_| VersionError::NotNumeric(i + 1))?;
    }
    let [major, minor, patch] = nums;
    if minor > 99 {
        return Err(VersionError::PartTooLarge(2));
    }
    if patch > 99 {
        return Err(VersionError::PartTooLarge(3));
    }
    if major > MAX_MAJOR {
        return Err(VersionError::MajorTooLarge);
    }
    Ok((major * 10_000 + minor * 100 + patch) as i32)
}

/// Prints a packed code back as "M.m.p". Negative codes are not produced by [`pack`] and are refused.
pub fn unpack(code: i32) -> Option<String> {
    if code < 0 {
        return None;
    }
    let c = code as u32;
    Some(format!("{}.{}.{}", c / 10_000, (c / 100) % 100, c % 100))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_the_documented_examples() {
        assert_eq!(pack("2.3.0"), Ok(20300));
        assert_eq!(pack("0.96"), Ok(9600));
        assert_eq!(pack("0.6"), Ok(600));
        assert_eq!(pack("9.8.0"), Ok(90800));
        assert_eq!(pack("2.00"), Ok(20000));
    }

    #[test]
    fn unpack_inverts_pack_for_every_small_triple() {
        for major in [0u32, 1, 9, 10, 99, 12345, MAX_MAJOR] {
            for minor in 0..=99u32 {
                for patch in [0u32, 1, 50, 99] {
                    let text = format!("{major}.{minor}.{patch}");
                    let code = pack(&text).unwrap();
                    assert_eq!(unpack(code).unwrap(), text);
                }
            }
        }
    }

    #[test]
    fn packed_codes_sort_like_versions() {
        let ordered = ["0.1.1", "0.2", "0.9.6", "0.96", "1.0.3", "1.35", "2.3.0", "10.0"];
        let codes: Vec<i32> = ordered.iter().map(|v| pack(v).unwrap()).collect();
        assert!(codes.windows(2).all(|w| w[0] < w[1]), "{codes:?}");
    }

    #[test]
    fn rejects_malformed_versions() {
        assert_eq!(pack(""), Err(VersionError::Empty));
        assert!(matches!(pack("3"), Err(VersionError::Shape(_))));
        assert!(matches!(pack("1.2.3.4"), Err(VersionError::Shape(_))));
        assert!(matches!(pack("1..2"), Err(VersionError::NotNumeric(_))));
        assert!(matches!(pack("1.2."), Err(VersionError::NotNumeric(_))));
        assert!(matches!(pack("v1.2"), Err(VersionError::NotNumeric(_))));
        assert!(matches!(pack("1.-2"), Err(VersionError::NotNumeric(_))));
        assert!(matches!(pack("1.+2"), Err(VersionError::NotNumeric(_))));
        assert!(matches!(pack(" 1.2"), Err(VersionError::NotNumeric(_))));
        assert!(matches!(pack("1.100"), Err(VersionError::PartTooLarge(_))));
        assert!(matches!(pack("1.2.100"), Err(VersionError::PartTooLarge(_))));
        assert!(matches!(pack("214748.0.0"), Err(VersionError::MajorTooLarge)));
        assert!(matches!(pack("9999999.0"), Err(VersionError::NotNumeric(_))));
    }

    #[test]
    fn error_texts_never_quote_the_value() {
        for bad in ["203.0.113.77.5", "10.20.30.40", "a1b2-c3d4.99", "1.2.399", "9999999.0", "300000.1.1", "x"] {
            let e = pack(bad).unwrap_err().to_string();
            for piece in bad.split('.').filter(|p| p.len() > 1) {
                assert!(!e.contains(piece), "{bad}: {e}");
            }
        }
    }

    #[test]
    fn largest_version_fits_i32() {
        assert_eq!(pack("214747.99.99"), Ok(2_147_479_999));
        assert!(unpack(-1).is_none());
    }
}
