//! Import budgets: how much an untrusted image may make the store decompress, write and
//! create. [`ImportLimits`] holds the numbers (defaults, or `NESTOR_IMPORT_*` variables);
//! [`Meter`] counts decompressed bytes as they stream out of a decoder and refuses the
//! first byte past the budget, so a small compressed layer can never expand without bound
//! (and, with a phase limit, bounds what the tar reader reads for one entry's headers).

use std::cell::Cell;
use std::io::{self, Read};

use crate::store::human_size;
use crate::ImageError;

/// Per-layer budget on decompressed and on extracted bytes.
pub const ENV_MAX_LAYER_BYTES: &str = "NESTOR_IMPORT_MAX_LAYER_BYTES";
/// Per-import budget on decompressed and on extracted bytes.
pub const ENV_MAX_BYTES: &str = "NESTOR_IMPORT_MAX_BYTES";
/// Per-layer budget on tar entries.
pub const ENV_MAX_LAYER_ENTRIES: &str = "NESTOR_IMPORT_MAX_LAYER_ENTRIES";
/// Per-import budget on tar entries.
pub const ENV_MAX_ENTRIES: &str = "NESTOR_IMPORT_MAX_ENTRIES";

/// The budgets one `import` is held to. Each byte budget applies separately to the
/// decompressed tar stream and to the extracted file content (a sparse file counts its
/// apparent size, although its holes take no disk). Layers already in the store cost
/// nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportLimits {
    /// Bytes one layer may decompress to, and bytes of file content it may hold.
    pub max_layer_bytes: u64,
    /// The same two counts summed over every layer one import extracts; also the largest
    /// size a compressed archive may decompress to.
    pub max_bytes: u64,
    /// Tar entries one layer may hold.
    pub max_layer_entries: u64,
    /// Tar entries summed over every layer one import extracts (and entries of an
    /// archive's own index).
    pub max_entries: u64,
}

impl Default for ImportLimits {
    /// 10 GiB per layer, 32 GiB per import, 1,000,000 entries per layer, 4,000,000 per
    /// import.
    fn default() -> Self {
        ImportLimits {
            max_layer_bytes: 10 << 30,
            max_bytes: 32 << 30,
            max_layer_entries: 1_000_000,
            max_entries: 4_000_000,
        }
    }
}

impl ImportLimits {
    /// The defaults, each replaced by its environment variable when set:
    /// `NESTOR_IMPORT_MAX_LAYER_BYTES`, `NESTOR_IMPORT_MAX_BYTES` (a byte count, with an
    /// optional `K`, `M`, `G` or `T` suffix, powers of 1024, `KiB` style accepted),
    /// `NESTOR_IMPORT_MAX_LAYER_ENTRIES`, `NESTOR_IMPORT_MAX_ENTRIES` (a count). A value
    /// that does not parse, or is 0, is an error naming the variable.
    pub fn from_env() -> Result<Self, ImageError> {
        let mut l = ImportLimits::default();
        let get = |var: &str, bytes: bool, slot: &mut u64| -> Result<(), ImageError> {
            if let Some(v) = std::env::var_os(var) {
                let v = v.to_string_lossy();
                *slot = parse_amount(&v, bytes).ok_or_else(|| {
                    ImageError::invalid(
                        var,
                        format!(
                            "'{v}' is not a positive {}",
                            if bytes {
                                "byte count (like 512M or 10G)"
                            } else {
                                "count"
                            }
                        ),
                    )
                })?;
            }
            Ok(())
        };
        get(ENV_MAX_LAYER_BYTES, true, &mut l.max_layer_bytes)?;
        get(ENV_MAX_BYTES, true, &mut l.max_bytes)?;
        get(ENV_MAX_LAYER_ENTRIES, false, &mut l.max_layer_entries)?;
        get(ENV_MAX_ENTRIES, false, &mut l.max_entries)?;
        Ok(l)
    }
}

/// `123`, `512K`, `10G`, `10GiB`, `1t` -> bytes; counts take no suffix. 0 is refused.
fn parse_amount(s: &str, bytes: bool) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" => 0,
        _ if !bytes => return None,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => return None,
    };
    let v = n.checked_mul(1u64 << shift)?;
    (v > 0).then_some(v)
}

/// Which budget a count is held to, for the refusal message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    Layer,
    Import,
}

/// One budget as it applies to one layer: the effective limit (the per-layer limit, or
/// what is left of the per-import one, whichever is smaller) and where it comes from.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    pub(crate) limit: u64,
    scope: Scope,
    configured: u64,
    setting: &'static str,
    bytes: bool,
}

impl Budget {
    /// The tighter of `per_layer` and `per_import - used`.
    pub(crate) fn new(
        per_layer: u64,
        per_import: u64,
        used: u64,
        bytes: bool,
        settings: (&'static str, &'static str),
    ) -> Self {
        let left = per_import.saturating_sub(used);
        if left < per_layer {
            Budget {
                limit: left,
                scope: Scope::Import,
                configured: per_import,
                setting: settings.1,
                bytes,
            }
        } else {
            Budget {
                limit: per_layer,
                scope: Scope::Layer,
                configured: per_layer,
                setting: settings.0,
                bytes,
            }
        }
    }

    /// A budget with a single scope (the compressed archive, its index).
    pub(crate) fn single(limit: u64, bytes: bool, setting: &'static str) -> Self {
        Budget {
            limit,
            scope: Scope::Import,
            configured: limit,
            setting,
            bytes,
        }
    }

    /// The refusal: `subject` is `layer sha256:…` or `archive PATH`, `what` the count.
    pub(crate) fn exceeded(
        &self,
        subject: impl Into<String>,
        what: impl Into<String>,
    ) -> ImageError {
        let amount = |v: u64| {
            if self.bytes {
                human_size(v)
            } else {
                format!("{v} entries")
            }
        };
        let budget = match self.scope {
            Scope::Layer => format!(
                "per-layer budget of {} ({})",
                amount(self.configured),
                self.setting
            ),
            Scope::Import if self.configured == self.limit => {
                format!(
                    "per-import budget of {} ({})",
                    amount(self.configured),
                    self.setting
                )
            }
            Scope::Import => format!(
                "per-import budget of {} ({}; {} left for this layer)",
                amount(self.configured),
                self.setting,
                amount(self.limit)
            ),
        };
        ImageError::BudgetExceeded {
            subject: subject.into(),
            what: what.into(),
            budget,
            setting: self.setting,
        }
    }
}

/// Counts bytes read through [`Metered`] readers against one limit.
/// A phase limit ([`Meter::limit_phase`]) bounds the bytes read until [`Meter::end_phase`].
#[derive(Debug)]
pub(crate) struct Meter {
    limit: u64,
    count: Cell<u64>,
    tripped: Cell<bool>,
    phase_end: Cell<Option<u64>>,
    phase_tripped: Cell<bool>,
}

impl Meter {
    pub(crate) fn new(limit: u64) -> Self {
        Meter {
            limit,
            count: Cell::new(0),
            tripped: Cell::new(false),
            phase_end: Cell::new(None),
            phase_tripped: Cell::new(false),
        }
    }
    /// From now until [`Meter::end_phase`], at most `bytes` more may be read.
    pub(crate) fn limit_phase(&self, bytes: u64) {
        self.phase_end
            .set(Some(self.count.get().saturating_add(bytes).min(self.limit)));
    }
    pub(crate) fn end_phase(&self) {
        self.phase_end.set(None);
    }
    /// True once a read went over a phase limit.
    pub(crate) fn phase_tripped(&self) -> bool {
        self.phase_tripped.get()
    }
    /// Bytes handed out so far (never more than the limit).
    pub(crate) fn count(&self) -> u64 {
        self.count.get()
    }
    /// True once a read found more data than the limit allows.
    pub(crate) fn tripped(&self) -> bool {
        self.tripped.get()
    }
    pub(crate) fn reader<R: Read>(&self, inner: R) -> Metered<'_, R> {
        Metered { inner, meter: self }
    }
}

/// A reader that hands out at most its meter's limit and fails on the first byte past
/// it: it asks the inner reader for at most one byte more than is left, so nothing past
/// the budget is ever decompressed into more than that one byte.
pub(crate) struct Metered<'a, R> {
    inner: R,
    meter: &'a Meter,
}

impl<R: Read> Read for Metered<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let m = self.meter;
        if m.tripped.get() {
            return Err(io::Error::other("import budget exceeded"));
        }
        let end = m.phase_end.get().unwrap_or(m.limit);
        let left = end - m.count.get();
        let want = buf
            .len()
            .min(usize::try_from(left.saturating_add(1)).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n as u64 > left {
            if end < m.limit {
                m.phase_tripped.set(true);
                return Err(io::Error::other("entry headers too large"));
            }
            m.tripped.set(true);
            return Err(io::Error::other("import budget exceeded"));
        }
        m.count.set(m.count.get() + n as u64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_amounts() {
        assert_eq!(parse_amount("123", true), Some(123));
        assert_eq!(parse_amount("64M", true), Some(64 << 20));
        assert_eq!(parse_amount("10GiB", true), Some(10 << 30));
        assert_eq!(parse_amount("2t", true), Some(2 << 40));
        assert_eq!(parse_amount("0", true), None);
        assert_eq!(parse_amount("5G", false), None);
        assert_eq!(parse_amount("x", true), None);
        assert_eq!(parse_amount("99999999999T", true), None);
    }

    #[test]
    fn meter_refuses_the_first_byte_past_the_limit() {
        let data = [7u8; 100];
        let m = Meter::new(64);
        let mut out = Vec::new();
        let err = m.reader(&data[..]).read_to_end(&mut out).unwrap_err();
        assert!(err.to_string().contains("budget"), "{err}");
        assert!(m.tripped());
        assert_eq!(out.len(), 64);
        let exact = Meter::new(100);
        let mut out = Vec::new();
        exact.reader(&data[..]).read_to_end(&mut out).unwrap();
        assert_eq!((out.len(), exact.tripped()), (100, false));
    }

    #[test]
    fn budget_names_the_tighter_scope() {
        let s = (ENV_MAX_LAYER_BYTES, ENV_MAX_BYTES);
        let b = Budget::new(100, 1000, 0, true, s);
        assert_eq!(b.limit, 100);
        assert!(b
            .exceeded("layer x", "y")
            .to_string()
            .contains(ENV_MAX_LAYER_BYTES));
        let b = Budget::new(100, 1000, 950, true, s);
        assert_eq!(b.limit, 50);
        let msg = b.exceeded("layer x", "y").to_string();
        assert!(
            msg.contains(ENV_MAX_BYTES) && msg.contains("50 B left"),
            "{msg}"
        );
    }
}
