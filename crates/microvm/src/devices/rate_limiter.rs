//! Token-bucket rate limiting for the virtio devices' queues: owns the bucket arithmetic
//! (size, one-time burst, refill time), a limiter of two buckets (bandwidth in bytes and
//! operations), its configuration as serde data and as a flag value, and how long a
//! throttled queue has to wait. Time is passed in (`Instant`), so the arithmetic is pure
//! and testable; the caller arms a timer for [`RateLimiter::consume`]'s wait.
//!
//! A bucket holds at most `size` tokens and refills `size` tokens every `refill_time_ms`,
//! continuously (in proportion to the time elapsed, in nanoseconds). `one_time_burst`
//! tokens are spent first and never refill. A request larger than `size` is let through
//! when the bucket is full and leaves it in debt, so one big request is not starved and
//! the average rate still holds.
//!
//! [`Throttle`] is what a device holds: a limiter and the timerfd that wakes the device
//! (on the virtio event thread's epoll) when a deferred request's tokens have refilled.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// One bucket's configuration (bytes or operations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Tokens the bucket holds when full, and refills per `refill_time_ms`.
    pub size: u64,
    /// Extra tokens spent before the bucket's own; never refilled.
    #[serde(default)]
    pub one_time_burst: u64,
    /// Milliseconds to refill `size` tokens.
    pub refill_time_ms: u64,
}

/// Errors of a rate-limit configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RateLimitError {
    /// A flag value that is not `SIZE/REFILL_MS[+BURST]`.
    #[error("rate limit '{0}': expected SIZE/REFILL_MS[+BURST] (e.g. 1048576/1000)")]
    Syntax(String),
    /// A zero size or refill time.
    #[error("rate limit '{0}': size and refill time must be greater than 0")]
    Zero(String),
}

impl TokenBucketConfig {
    /// Parses `SIZE/REFILL_MS[+BURST]` (the `--disk`/`--net` option value).
    /// `REFILL_MS` may be `s` (1000): `1048576/s` is 1 MiB per second.
    pub fn parse(text: &str) -> Result<Self, RateLimitError> {
        let syntax = || RateLimitError::Syntax(text.to_string());
        let (size, rest) = text.split_once('/').ok_or_else(syntax)?;
        let (refill, burst) = match rest.split_once('+') {
            Some((r, b)) => (r, b.parse().map_err(|_| syntax())?),
            None => (rest, 0),
        };
        let refill_time_ms = match refill {
            "s" => 1000,
            r => r.parse().map_err(|_| syntax())?,
        };
        let cfg = TokenBucketConfig {
            size: size.parse().map_err(|_| syntax())?,
            one_time_burst: burst,
            refill_time_ms,
        };
        cfg.check(text)?;
        Ok(cfg)
    }

    fn check(&self, text: &str) -> Result<(), RateLimitError> {
        if self.size == 0 || self.refill_time_ms == 0 {
            return Err(RateLimitError::Zero(text.to_string()));
        }
        Ok(())
    }
}

/// A limiter's configuration: either bucket may be absent (unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketConfig>,
    /// Requests (virtio-blk) or frames (virtio-net).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketConfig>,
}

impl RateLimiterConfig {
    /// True when neither bucket is set.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    /// Checks both buckets (a JSON config or API update is checked as a flag is).
    pub fn validate(&self) -> Result<(), RateLimitError> {
        for b in [self.bandwidth, self.ops].into_iter().flatten() {
            b.check(&format!("{}/{}", b.size, b.refill_time_ms))?;
        }
        Ok(())
    }
}

/// A token bucket. Tokens are counted in units of 1/`refill_time_ns` token, so refills
/// are exact integers (no drift over long runs).
#[derive(Debug, Clone)]
pub struct TokenBucket {
    cfg: TokenBucketConfig,
    /// Tokens × refill_time_ns; negative after a request larger than the bucket.
    budget: i128,
    burst: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(cfg: TokenBucketConfig, now: Instant) -> Self {
        let mut b = TokenBucket {
            cfg,
            budget: 0,
            burst: cfg.one_time_burst,
            last: now,
        };
        b.budget = b.capacity();
        b
    }

    fn refill_ns(&self) -> i128 {
        i128::from(self.cfg.refill_time_ms) * 1_000_000
    }

    fn capacity(&self) -> i128 {
        i128::from(self.cfg.size) * self.refill_ns()
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos() as i128;
        self.last = self.last.max(now);
        // size tokens per refill_ns: elapsed ns bring elapsed × size units.
        let gained = elapsed.saturating_mul(i128::from(self.cfg.size));
        self.budget = self.budget.saturating_add(gained).min(self.capacity());
    }

    /// Whole tokens available now (burst included).
    pub fn available(&mut self, now: Instant) -> u64 {
        self.refill(now);
        let own = (self.budget.max(0) / self.refill_ns()) as u64;
        own.saturating_add(self.burst)
    }

    /// How long until `tokens` can be taken (zero when they can now).
    pub fn wait_for(&mut self, tokens: u64, now: Instant) -> Duration {
        self.refill(now);
        let from_burst = tokens.min(self.burst);
        // A request larger than the bucket needs a full bucket, no more.
        let need =
            i128::from(tokens - from_burst).min(i128::from(self.cfg.size)) * self.refill_ns();
        if self.budget >= need {
            return Duration::ZERO;
        }
        // Units missing / units per ns (= size), rounded up.
        let size = i128::from(self.cfg.size);
        let ns = (need - self.budget + size - 1) / size;
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// Takes `tokens` (call after `wait_for` returned zero): burst first, then the bucket,
    /// which may go into debt for a request larger than it.
    pub fn take(&mut self, tokens: u64) {
        let from_burst = tokens.min(self.burst);
        self.burst -= from_burst;
        self.budget -= i128::from(tokens - from_burst) * self.refill_ns();
    }

    /// The bucket's configuration.
    pub fn config(&self) -> TokenBucketConfig {
        self.cfg
    }
}

/// Bandwidth and operations buckets, and the limiter's own accounting.
#[derive(Debug, Clone, Default)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    /// Bytes and operations let through.
    pub passed_bytes: u64,
    /// Operations let through.
    pub passed_ops: u64,
    /// Times a request had to wait.
    pub throttled: u64,
}

impl RateLimiter {
    /// A limiter with full buckets.
    pub fn new(cfg: &RateLimiterConfig, now: Instant) -> Self {
        RateLimiter {
            bandwidth: cfg.bandwidth.map(|c| TokenBucket::new(c, now)),
            ops: cfg.ops.map(|c| TokenBucket::new(c, now)),
            ..Default::default()
        }
    }

    /// Replaces the configuration (fresh, full buckets), keeping the counters.
    pub fn update(&mut self, cfg: &RateLimiterConfig, now: Instant) {
        self.bandwidth = cfg.bandwidth.map(|c| TokenBucket::new(c, now));
        self.ops = cfg.ops.map(|c| TokenBucket::new(c, now));
    }

    /// The current configuration.
    pub fn config(&self) -> RateLimiterConfig {
        RateLimiterConfig {
            bandwidth: self.bandwidth.as_ref().map(TokenBucket::config),
            ops: self.ops.as_ref().map(TokenBucket::config),
        }
    }

    /// True when no bucket is configured.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    /// Lets one operation of `bytes` through (taking from both buckets) or says how long to
    /// wait before retrying it (taking nothing).
    pub fn consume(&mut self, bytes: u64, now: Instant) -> Result<(), Duration> {
        let wait = [
            self.bandwidth.as_mut().map(|b| b.wait_for(bytes, now)),
            self.ops.as_mut().map(|b| b.wait_for(1, now)),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(Duration::ZERO);
        if !wait.is_zero() {
            self.throttled += 1;
            return Err(wait);
        }
        if let Some(b) = self.bandwidth.as_mut() {
            b.take(bytes);
        }
        if let Some(b) = self.ops.as_mut() {
            b.take(1);
        }
        self.passed_bytes += bytes;
        self.passed_ops += 1;
        Ok(())
    }
}

/// A device queue's limiter and its wake-up timer. A request that does not fit is left
/// in its queue (deferred, never dropped) and the timer is armed for when it will fit;
/// until it fires, [`Throttle::admit`] refuses everything, so requests keep their order.
#[derive(Debug)]
pub struct Throttle {
    limiter: RateLimiter,
    timer: OwnedFd,
    blocked: bool,
}

impl Throttle {
    /// A throttle with `cfg` and a disarmed, non-blocking timerfd.
    pub fn new(cfg: &RateLimiterConfig) -> std::io::Result<Self> {
        // SAFETY: timerfd_create takes no pointers; the result is checked.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Throttle {
            limiter: RateLimiter::new(cfg, Instant::now()),
            // SAFETY: fd is a fresh descriptor nothing else owns.
            timer: unsafe { OwnedFd::from_raw_fd(fd) },
            blocked: false,
        })
    }

    /// The timer's fd (to watch for readability).
    pub fn timer_fd(&self) -> std::os::fd::RawFd {
        self.timer.as_raw_fd()
    }

    fn arm(&self, after: Duration) {
        // A zero it_value would disarm the timer.
        let after = after.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_nsec: libc::c_long::from(after.subsec_nanos() as i32),
            },
        };
        // SAFETY: spec is a valid itimerspec; the old value is not asked for.
        let rc = unsafe {
            libc::timerfd_settime(self.timer.as_raw_fd(), 0, &spec, std::ptr::null_mut())
        };
        if rc < 0 {
            tracing::warn!(
                "rate limiter: cannot arm its timer: {}",
                std::io::Error::last_os_error()
            );
        }
    }

    /// Lets an operation of `bytes` through now, or refuses it (the caller leaves the
    /// request where it is) and arms the timer for when it will fit.
    pub fn admit(&mut self, bytes: u64) -> bool {
        if self.blocked {
            return false;
        }
        match self.limiter.consume(bytes, Instant::now()) {
            Ok(()) => true,
            Err(wait) => {
                self.blocked = true;
                self.arm(wait);
                false
            }
        }
    }

    /// True while a deferred request waits for the timer.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// The timer fired: drains it; the device retries its deferred requests.
    pub fn timer_fired(&mut self) {
        let mut b = [0u8; 8];
        // SAFETY: reads at most 8 bytes into `b`; EAGAIN (nothing expired) is fine.
        let _ = unsafe { libc::read(self.timer.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
        self.blocked = false;
    }

    /// New limits (full buckets); a deferred request is retried at once.
    pub fn update(&mut self, cfg: &RateLimiterConfig) {
        self.limiter.update(cfg, Instant::now());
        if self.blocked {
            self.arm(Duration::ZERO);
        }
    }

    /// Forgets a deferred request (the device was reset) and disarms the timer.
    pub fn reset(&mut self) {
        self.blocked = false;
        let zero = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
        };
        // SAFETY: as in `arm`; a zero it_value disarms.
        unsafe { libc::timerfd_settime(self.timer.as_raw_fd(), 0, &zero, std::ptr::null_mut()) };
    }

    /// The limiter (configuration and counters).
    pub fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(size: u64, ms: u64, burst: u64) -> TokenBucketConfig {
        TokenBucketConfig {
            size,
            one_time_burst: burst,
            refill_time_ms: ms,
        }
    }

    #[test]
    fn parse_flag_values() {
        assert_eq!(
            TokenBucketConfig::parse("1000/100").unwrap(),
            cfg(1000, 100, 0)
        );
        assert_eq!(
            TokenBucketConfig::parse("1000/100+50").unwrap(),
            cfg(1000, 100, 50)
        );
        assert_eq!(
            TokenBucketConfig::parse("4096/s").unwrap(),
            cfg(4096, 1000, 0)
        );
        for bad in ["", "1000", "x/100", "1000/", "1000/100+", "-1/10", "1/m"] {
            assert!(
                matches!(
                    TokenBucketConfig::parse(bad),
                    Err(RateLimitError::Syntax(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            TokenBucketConfig::parse("0/100"),
            Err(RateLimitError::Zero(_))
        ));
        assert!(matches!(
            TokenBucketConfig::parse("10/0"),
            Err(RateLimitError::Zero(_))
        ));
        let json: RateLimiterConfig =
            serde_json::from_str(r#"{"ops":{"size":10,"refill_time_ms":1000}}"#).unwrap();
        assert_eq!(json.ops, Some(cfg(10, 1000, 0)));
        assert!(json.bandwidth.is_none());
        assert!(serde_json::from_str::<RateLimiterConfig>(r#"{"iops":{}}"#).is_err());
        let zero: RateLimiterConfig =
            serde_json::from_str(r#"{"bandwidth":{"size":0,"refill_time_ms":1}}"#).unwrap();
        assert!(zero.validate().is_err());
    }

    #[test]
    fn bucket_starts_full_and_refills_in_proportion() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(cfg(1000, 1000, 0), t0);
        assert_eq!(b.available(t0), 1000);
        assert_eq!(b.wait_for(1000, t0), Duration::ZERO);
        b.take(1000);
        assert_eq!(b.available(t0), 0);
        // 1000 tokens per second: 100 tokens take 100 ms.
        assert_eq!(b.wait_for(100, t0), Duration::from_millis(100));
        assert_eq!(b.available(t0 + Duration::from_millis(250)), 250);
        // Never more than the size.
        assert_eq!(b.available(t0 + Duration::from_secs(60)), 1000);
    }

    #[test]
    fn one_time_burst_is_spent_first_and_not_refilled() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(cfg(100, 1000, 500), t0);
        assert_eq!(b.available(t0), 600);
        b.take(550);
        assert_eq!(b.available(t0), 50);
        let later = t0 + Duration::from_secs(10);
        assert_eq!(b.available(later), 100);
    }

    #[test]
    fn oversized_request_passes_on_a_full_bucket_and_leaves_debt() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(cfg(100, 1000, 0), t0);
        assert_eq!(b.wait_for(300, t0), Duration::ZERO);
        b.take(300);
        // 200 tokens of debt plus 1 token: 2.01 s at 100 tokens/s.
        assert_eq!(b.wait_for(1, t0), Duration::from_millis(2010));
    }

    #[test]
    fn limiter_takes_from_both_buckets_or_neither() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(
            &RateLimiterConfig {
                bandwidth: Some(cfg(4096, 1000, 0)),
                ops: Some(cfg(2, 1000, 0)),
            },
            t0,
        );
        assert_eq!(l.consume(1024, t0), Ok(()));
        assert_eq!(l.consume(1024, t0), Ok(()));
        // The ops bucket is empty: half a second for one op; bandwidth untouched.
        assert_eq!(l.consume(1024, t0), Err(Duration::from_millis(500)));
        assert_eq!((l.passed_ops, l.passed_bytes, l.throttled), (2, 2048, 1));
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(l.consume(2048, t1), Ok(()));
        // Bandwidth has 2048 left, but the ops bucket (one op refilled, one taken) is empty.
        assert!(l.consume(1024, t1).is_err());
    }

    #[test]
    fn rate_over_a_long_run_is_bounded_by_the_config() {
        // Simulated clock: a client retrying exactly when told gets size/refill per second.
        let t0 = Instant::now();
        let mut l = RateLimiter::new(
            &RateLimiterConfig {
                bandwidth: Some(cfg(64 * 1024, 100, 0)),
                ops: None,
            },
            t0,
        );
        let mut now = t0;
        while now < t0 + Duration::from_secs(10) {
            match l.consume(4096, now) {
                Ok(()) => {}
                Err(wait) => now += wait,
            }
        }
        // 640 KiB/s for 10 s plus the initial full bucket, within one request.
        let expected = 64 * 1024 * 100 + 64 * 1024;
        assert!(
            l.passed_bytes.abs_diff(expected) <= 4096,
            "{}",
            l.passed_bytes
        );
    }

    #[test]
    fn update_keeps_counters_and_unlimited_passes_everything() {
        let t0 = Instant::now();
        let mut l = RateLimiter::default();
        assert!(l.is_unlimited());
        for _ in 0..1000 {
            assert_eq!(l.consume(1 << 20, t0), Ok(()));
        }
        l.update(
            &RateLimiterConfig {
                bandwidth: None,
                ops: Some(cfg(1, 1000, 0)),
            },
            t0,
        );
        assert_eq!(l.consume(0, t0), Ok(()));
        assert!(l.consume(0, t0).is_err());
        assert_eq!(l.passed_ops, 1001);
        assert_eq!(l.config().ops, Some(cfg(1, 1000, 0)));
    }

    #[test]
    fn throttle_defers_then_its_timer_fires() {
        let mut t = Throttle::new(&RateLimiterConfig {
            bandwidth: None,
            ops: Some(cfg(2, 100, 0)),
        })
        .unwrap();
        assert!(t.admit(0) && t.admit(0));
        assert!(!t.admit(0));
        assert!(t.is_blocked());
        // Blocked: nothing passes before the timer, however long one waits.
        std::thread::sleep(Duration::from_millis(80));
        assert!(!t.admit(0));
        let mut p = libc::pollfd {
            fd: t.timer_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, 2000) };
        assert_eq!(n, 1, "the timer never fired");
        t.timer_fired();
        assert!(!t.is_blocked());
        assert!(t.admit(0));
        assert_eq!(t.limiter().passed_ops, 3);
        // An update while blocked re-arms the timer at once.
        assert!(!t.admit(0));
        t.update(&RateLimiterConfig::default());
        // SAFETY: as above.
        let n = unsafe { libc::poll(&mut p, 1, 2000) };
        assert_eq!(n, 1);
        t.timer_fired();
        assert!(t.admit(1 << 30));
    }
}
