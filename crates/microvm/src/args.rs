//! Reading `nestor-vmm`'s command line into [`Cli`] without paying for clap on the
//! start path.
//!
//! clap (the derive on [`Cli`]) defines the flags, prints `--help` and `--version`, and
//! words every error. But code run for the first time is slow where the VMM is measured
//! (the TCG test host translates it): clap's first parse there costs 60-80 ms, a
//! quarter of the VMM's time from exec to its first KVM_RUN, where Firecracker's own
//! small parser costs next to nothing. [`parse`] therefore reads the plain command
//! lines that nestor and scripts give (each flag `--name VALUE` or `--name=VALUE` or a
//! bare switch, once, except the repeatable `--disk` and `--fs`; values non-empty
//! UTF-8 not starting with `-`) itself, into the same [`Cli`] clap would make, and
//! hands anything else whole to clap: help, version, `--call`, `--migrate-from`, an
//! unknown flag, a value or combination a flag's parser or clap refuses. So a user sees
//! clap's output wherever there is something to see, and a test checks both readers
//! agree on every flag.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;

use crate::config::Cli;
use crate::seccomp::{SeccompArgs, SeccompMode};

/// The process's command line as [`Cli`]: read by [`plain`] where it can, else by clap
/// (whose error, help or version the caller prints).
pub fn parse() -> Result<Cli, clap::Error> {
    let args: Vec<OsString> = std::env::args_os().collect();
    match args.get(1..).and_then(plain) {
        Some(cli) => Ok(cli),
        None => Cli::try_parse_from(args),
    }
}

/// `args` (the program name left out) as clap reads them, or `None` where they are left
/// to clap (see the module's doc).
pub fn plain(args: &[OsString]) -> Option<Cli> {
    let mut cli = Cli {
        config: None,
        kernel: None,
        initrd: None,
        cmdline: None,
        mem: None,
        vcpus: None,
        disk: Vec::new(),
        fs: Vec::new(),
        vsock: None,
        vsock_cid: None,
        net: None,
        console: None,
        api: None,
        log_limit: None,
        boot_timings: false,
        track_dirty_pages: false,
        balloon: false,
        mem_merge: false,
        call: None,
        restore: None,
        migrate_from: None,
        resume: false,
        seccomp: SeccompArgs {
            seccomp: SeccompMode::Default,
            seccomp_filter: None,
            seccomp_print: false,
        },
    };
    let mut seen: Vec<&str> = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.to_str()?.strip_prefix("--")?.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (arg.to_str()?.strip_prefix("--")?, None),
        };
        // clap refuses a flag given twice (except the repeatable ones).
        if seen.contains(&name) && !matches!(name, "disk" | "fs") {
            return None;
        }
        seen.push(name);
        let switch = match name {
            "boot-timings" => Some(&mut cli.boot_timings),
            "track-dirty-pages" => Some(&mut cli.track_dirty_pages),
            "balloon" => Some(&mut cli.balloon),
            "mem-merge" => Some(&mut cli.mem_merge),
            "resume" => Some(&mut cli.resume),
            "seccomp-print" => Some(&mut cli.seccomp.seccomp_print),
            _ => None,
        };
        if let Some(on) = switch {
            if inline.is_some() {
                return None;
            }
            *on = true;
            continue;
        }
        let value = match inline {
            Some(v) => v,
            None => it.next()?.to_str()?,
        };
        if value.is_empty() || value.starts_with('-') {
            return None;
        }
        let path = || Some(PathBuf::from(value));
        match name {
            "config" => cli.config = path(),
            "kernel" => cli.kernel = path(),
            "initrd" => cli.initrd = path(),
            "cmdline" => cli.cmdline = Some(value.to_string()),
            "mem" => cli.mem = Some(value.parse().ok()?),
            "vcpus" => cli.vcpus = Some(value.parse().ok()?),
            "disk" => cli.disk.push(value.parse().ok()?),
            "fs" => cli.fs.push(value.parse().ok()?),
            "vsock" => cli.vsock = path(),
            "vsock-cid" => cli.vsock_cid = Some(value.parse().ok()?),
            "net" => cli.net = Some(value.to_string()),
            "console" => cli.console = Some(value.to_string()),
            "api" => cli.api = path(),
            "log-limit" => cli.log_limit = Some(value.parse().ok()?),
            "restore" => cli.restore = path(),
            "seccomp" => {
                cli.seccomp.seccomp = match value {
                    "default" => SeccompMode::Default,
                    "none" => SeccompMode::None,
                    _ => return None,
                }
            }
            "seccomp-filter" => cli.seccomp.seccomp_filter = path(),
            // --call, --migrate-from, --help, --version and anything unknown.
            _ => return None,
        }
    }
    // What clap's `conflicts_with_all` and `requires` say of the flags read here.
    let restore_conflict = cli.config.is_some()
        || cli.kernel.is_some()
        || cli.initrd.is_some()
        || cli.cmdline.is_some();
    if (cli.restore.is_some() && restore_conflict) || (cli.resume && cli.restore.is_none()) {
        return None;
    }
    Some(cli)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    /// What clap makes of `args`, as text (Ok's Debug form, or the error's first line).
    fn by_clap(args: &[&str]) -> Result<String, String> {
        let mut v = vec!["nestor-vmm"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v)
            .map(|c| format!("{c:?}"))
            .map_err(|e| e.to_string().lines().next().unwrap_or("").to_string())
    }

    /// Checks that `plain` reads `args` (when `read`) or leaves them to clap, and that
    /// whatever it reads, clap reads the same.
    fn agree(args: &[&str], read: bool) {
        let mine = plain(&os(args));
        assert_eq!(mine.is_some(), read, "plain {args:?}: {mine:?}");
        if let Some(c) = mine {
            assert_eq!(Ok(format!("{c:?}")), by_clap(args), "{args:?}");
        }
    }

    /// A value each flag takes, for the flags `plain` reads; the ones left to clap.
    const SAMPLES: &[(&str, Option<&str>)] = &[
        ("config", Some("/etc/vm.json")),
        ("kernel", Some("/k/vmlinux")),
        ("initrd", Some("/k/initramfs.cpio.lz4")),
        ("cmdline", Some("console=ttyS0 quiet panic=-1")),
        ("mem", Some("256")),
        ("vcpus", Some("2")),
        ("disk", Some("/d/rootfs.erofs,ro,bw=1048576/100")),
        ("fs", Some("/run/fs.sock,tag=data")),
        ("vsock", Some("/run/v.sock")),
        ("vsock-cid", Some("7")),
        ("net", Some("tap0,mac=02:00:00:00:00:01")),
        ("console", Some("none")),
        ("api", Some("/run/api.sock")),
        ("log-limit", Some("4096")),
        ("boot-timings", None),
        ("track-dirty-pages", None),
        ("balloon", None),
        ("mem-merge", None),
        ("seccomp", Some("none")),
        ("seccomp-filter", Some("/etc/filters.json")),
        ("seccomp-print", None),
    ];
    const LEFT_TO_CLAP: &[&str] = &["call", "migrate-from", "help", "version"];

    #[test]
    fn every_flag_clap_knows_is_read_the_same_or_left_to_clap() {
        for arg in Cli::command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if LEFT_TO_CLAP.contains(&long) || matches!(long, "restore" | "resume") {
                continue;
            }
            let sample = SAMPLES.iter().find(|(n, _)| *n == long);
            let Some((_, value)) = sample else {
                panic!("--{long} is neither read by args::plain nor left to clap: add it to one")
            };
            let flag = format!("--{long}");
            match value {
                Some(v) => {
                    agree(&[&flag, v], true);
                    agree(&[&format!("{flag}={v}")], true);
                    // Given twice: clap refuses it, except the repeatable ones.
                    let twice = [flag.as_str(), v, flag.as_str(), v];
                    let repeatable = matches!(long, "disk" | "fs");
                    agree(&twice, repeatable);
                    assert_eq!(by_clap(&twice).is_ok(), repeatable, "{twice:?}");
                }
                None => {
                    agree(&[&flag], true);
                    agree(&[&format!("{flag}=true")], false);
                    assert!(by_clap(&[&format!("{flag}=true")]).is_err());
                }
            }
        }
        for long in LEFT_TO_CLAP {
            assert!(
                plain(&os(&[&format!("--{long}"), "x"])).is_none(),
                "--{long}"
            );
        }
    }

    #[test]
    fn the_command_lines_nestor_gives_are_read_as_clap_reads_them() {
        agree(
            &[
                "--kernel",
                "/var/lib/nestor/vm/vmlinux",
                "--initrd",
                "/var/lib/nestor/vm/initramfs.cpio.lz4",
                "--mem",
                "512",
                "--vcpus",
                "1",
                "--cmdline",
                "console=ttyS0 quiet reboot=k panic=-1 nestor.mac=02:6e:73:74:70:6c",
                "--disk",
                "/var/lib/nestor/vm-disks/abc.erofs,ro",
                "--disk",
                "/tmp/x.img",
                "--vsock",
                "/run/nestor/v.sock",
                "--net",
                "tap-1",
                "--console",
                "/var/lib/nestor/c/console.log",
                "--api",
                "/run/nestor/api.sock",
                "--log-limit",
                "1048576",
                "--boot-timings",
            ],
            true,
        );
        agree(&["--restore", "/t/vm", "--resume", "--vsock", "/v"], true);
        agree(
            &["--restore=/t/vm", "--api=/a", "--track-dirty-pages"],
            true,
        );
        agree(&[], true);
    }

    #[test]
    fn what_clap_refuses_or_words_is_left_to_it() {
        for args in [
            &["--help"][..],
            &["--version"],
            &["-h"],
            &["--kernel"],
            &["--kernel", ""],
            &["--kernel="],
            &["--mem", "lots"],
            &["--mem", "-1"],
            &["--vcpus", "256"],
            &["--seccomp", "Default"],
            &["--disk", "/d,rx"],
            &["--fs", "/s"],
            &["--cmdline", "-x"],
            &["--restore", "/t", "--kernel", "/k"],
            &["--restore", "/t", "--cmdline", "x"],
            &["--resume", "--kernel", "/k"],
            &["--call", "{}", "--api", "/a"],
            &["--migrate-from", "unix:/m"],
            &["kernel"],
            &["--kernel", "/k", "stray"],
            &["--nosuch", "1"],
            &["--", "--kernel", "/k"],
        ] {
            assert!(plain(&os(args)).is_none(), "{args:?} read without clap");
        }
        // A few of them clap reads after all; the rest it refuses, in its own words.
        assert!(by_clap(&["--call", "{}", "--api", "/a"]).is_ok());
        assert!(by_clap(&["--cmdline=-x"]).is_ok());
        let e = by_clap(&["--restore", "/t", "--kernel", "/k"]).unwrap_err();
        assert!(e.contains("cannot be used with"), "{e}");
    }

    #[test]
    fn a_value_that_is_not_utf8_is_left_to_clap() {
        use std::os::unix::ffi::OsStringExt;
        let args = vec![
            OsString::from("--kernel"),
            OsString::from_vec(vec![0xff, b'k']),
        ];
        assert!(plain(&args).is_none());
    }
}
