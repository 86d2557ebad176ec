//! OCI resource values checked and turned into control-file text where cgroup v1 and
//! v2 agree: the pids limit, memory+swap, hugepage sizes. The v1 and v2 modules each
//! use these; what differs between the versions stays in its own module.

use super::CgroupError;

/// pids.max text for an OCI pids limit: <= 0 means no limit.
pub(crate) fn pids_value(limit: i64) -> String {
    if limit > 0 {
        limit.to_string()
    } else {
        "max".to_string()
    }
}

/// Checks the OCI `memory.swap` (memory + swap, -1 = unlimited, 0 = unset) against
/// `limit`, returning it when set.
pub(crate) fn checked_swap(
    limit: Option<i64>,
    swap: Option<i64>,
) -> Result<Option<i64>, CgroupError> {
    let bad = |reason: String| CgroupError::InvalidResource {
        what: "memory.swap".into(),
        reason,
    };
    match swap {
        None | Some(0) => Ok(None),
        Some(s) if s < -1 => Err(bad(format!(
            "{s} is negative (only -1, unlimited, is allowed)"
        ))),
        Some(s) => match limit {
            Some(l) if l > 0 && s > 0 && s < l => Err(bad(format!(
                "memory+swap {s} is below the memory limit {l} (OCI swap counts memory plus swap)"
            ))),
            _ => Ok(Some(s)),
        },
    }
}

/// Checks a hugepage size (`2MB`, `1GB`): it becomes part of a file name.
pub(crate) fn checked_page_size(size: &str) -> Result<&str, CgroupError> {
    if size.is_empty() || !size.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(CgroupError::InvalidResource {
            what: "hugepageLimits.pageSize".into(),
            reason: format!("{size:?} is not a page size like 2MB"),
        });
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pids_values() {
        assert_eq!(pids_value(16), "16");
        assert_eq!(pids_value(0), "max");
        assert_eq!(pids_value(-1), "max");
    }

    #[test]
    fn hugepage_size_is_checked() {
        assert!(checked_page_size("2MB").is_ok());
        assert!(checked_page_size("../x").is_err());
        assert!(checked_page_size("").is_err());
    }

    #[test]
    fn swap_is_memory_plus_swap_and_never_below_the_limit() {
        let g = 1 << 30;
        assert_eq!(checked_swap(Some(g), None).unwrap(), None);
        assert_eq!(checked_swap(Some(g), Some(0)).unwrap(), None);
        assert_eq!(checked_swap(Some(g), Some(2 * g)).unwrap(), Some(2 * g));
        assert_eq!(checked_swap(Some(g), Some(-1)).unwrap(), Some(-1));
        assert!(checked_swap(Some(2 * g), Some(g)).is_err());
        assert!(checked_swap(Some(g), Some(-2)).is_err());
    }
}
