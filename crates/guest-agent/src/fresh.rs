//! A guest restored from a template snapshot made its own (`Request::Refresh`): every
//! clone of one template starts with the template's memory, so the same random
//! generator state, the template's wall clock, hostname and MAC. This module gives it
//! fresh entropy from the host (added to the pool and the generator reseeded at once),
//! the host's time, its own hostname and MAC.

use std::os::fd::AsRawFd;

use nestor_agent_protocol::MacChange;

/// `RNDADDENTROPY` and `RNDRESEEDCRNG` (linux/random.h: `_IOW('R', 0x03, int[2])` and
/// `_IO('R', 0x07)`).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Bytes of entropy a refresh takes: enough to reseed (32), few enough to be one frame.
const ENTROPY_BYTES: std::ops::RangeInclusive<usize> = 32..=512;

fn hex_bytes(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("entropy is not hex".into());
    }
    Ok((0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap_or(0))
        .collect())
}

/// Adds `bytes` to the kernel's input pool, credited as entropy, and reseeds the
/// generator from it now (not at its next scheduled reseed, up to a minute later).
fn reseed(bytes: &[u8]) -> Result<(), String> {
    let urandom = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(bytes);
    // The kernel reads the header as ints and the buffer as u32s: 4-byte alignment.
    let words: Vec<u32> = info
        .chunks(4)
        .map(|c| {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            u32::from_ne_bytes(w)
        })
        .collect();
    // SAFETY: `words` holds a rand_pool_info whose buf_size matches the bytes after its
    // header, alive for the call.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, words.as_ptr()) } < 0 {
        return Err(format!("add entropy: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: an ioctl without an argument.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) } < 0 {
        return Err(format!(
            "reseed the random generator: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Sets the wall clock to `unix_ns`.
fn set_clock(unix_ns: u64) -> Result<(), String> {
    let ts = libc::timespec {
        tv_sec: (unix_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: a valid timespec, alive for the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } < 0 {
        return Err(format!(
            "set the clock: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Applies `Request::Refresh`; one line saying what failed.
pub fn apply(
    entropy: &str,
    unix_ns: u64,
    hostname: &str,
    mac: Option<&MacChange>,
) -> Result<(), String> {
    let bytes = hex_bytes(entropy)?;
    if !ENTROPY_BYTES.contains(&bytes.len()) {
        return Err(format!(
            "entropy of {} bytes (32 to 512 are taken)",
            bytes.len()
        ));
    }
    if hostname.is_empty() || hostname.len() > 64 {
        return Err("the hostname must be 1-64 bytes".into());
    }
    reseed(&bytes)?;
    set_clock(unix_ns)?;
    nix::unistd::sethostname(hostname).map_err(|e| format!("set the hostname: {e}"))?;
    if let Some(m) = mac {
        crate::net::change_mac(&m.from, &m.to)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_is_hex_of_a_bounded_size() {
        assert_eq!(hex_bytes("00ff10").unwrap(), [0, 255, 16]);
        assert!(hex_bytes("0").is_err());
        assert!(hex_bytes("zz").is_err());
        let e = apply("00", 0, "h", None).unwrap_err();
        assert!(e.contains("32 to 512"), "{e}");
        let e = apply(&"00".repeat(32), 0, "", None).unwrap_err();
        assert!(e.contains("hostname"), "{e}");
    }
}
