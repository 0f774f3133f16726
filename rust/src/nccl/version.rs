//! NCCL version codes and the minimum versions of the features symm_rs uses.

use std::fmt;

/// A decoded `ncclGetVersion` code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct NcclVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl NcclVersion {
    /// `ncclCommWindowRegister` with `NCCL_WIN_COLL_SYMMETRIC` first works in 2.27.3.
    pub const WINDOWS: NcclVersion = NcclVersion::new(2, 27, 3);
    pub const WINDOWS_TEXT: &'static str = "2.27.3";
    /// `ncclMemAlloc` appeared in 2.19.
    pub const MEM_ALLOC: NcclVersion = NcclVersion::new(2, 19, 0);
    pub const MEM_ALLOC_TEXT: &'static str = "2.19.0";
    /// `ncclCommSplit`.
    pub const SPLIT: NcclVersion = NcclVersion::new(2, 18, 1);
    pub const SPLIT_TEXT: &'static str = "2.18.1";

    /// `ncclCommQueryProperties` (with `deviceApiSupport`, NCCL's symmetric support).
    pub const PROPERTIES: NcclVersion = NcclVersion::new(2, 28, 0);
    /// The newest properties layout asked for: later versions make the query initialise the
    /// device runtime, which symm_rs must not trigger as a side effect.
    pub const PROPERTIES_ASKED: NcclVersion = NcclVersion::new(2, 29, 2);

    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Self {
            major,
            minor,
            patch,
        }
    }

    /// Decodes `NCCL_VERSION_CODE`: `X*10000 + Y*100 + Z` since 2.9, `X*1000 + Y*100 + Z` before.
    pub fn from_code(code: i32) -> Self {
        let code = code.max(0) as u32;
        if code >= 20_900 {
            Self::new(code / 10_000, (code % 10_000) / 100, code % 100)
        } else {
            Self::new(code / 1_000, (code % 1_000) / 100, code % 100)
        }
    }

    pub fn code(self) -> u32 {
        self.major * 10_000 + self.minor * 100 + self.patch
    }
}

impl fmt::Display for NcclVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[cfg(test)]
mod tests {
    use super::NcclVersion;

    #[test]
    fn decodes_modern_and_legacy_codes() {
        assert_eq!(NcclVersion::from_code(22809), NcclVersion::new(2, 28, 9));
        assert_eq!(NcclVersion::from_code(22703).to_string(), "2.27.3");
        assert_eq!(NcclVersion::from_code(2804), NcclVersion::new(2, 8, 4));
    }

    #[test]
    fn orders_by_feature_thresholds() {
        assert!(NcclVersion::from_code(22809) >= NcclVersion::WINDOWS);
        assert!(NcclVersion::from_code(22702) < NcclVersion::WINDOWS);
        assert!(NcclVersion::from_code(21903) >= NcclVersion::MEM_ALLOC);
    }
}
