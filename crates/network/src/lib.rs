//! nestor's networks, and the spec of how they work.
//!
//! **nestor is a CNI runtime** (CNI spec 1.0) over the standard plugins of Debian's
//! `containernetworking-plugins` (`/usr/lib/cni`, or `$NESTOR_CNI_PATH`): it writes a
//! network's configuration list, runs each plugin with `CNI_COMMAND`, `CNI_CONTAINERID`,
//! `CNI_NETNS`, `CNI_IFNAME` and `CNI_PATH` in its environment and the configuration on
//! its stdin, chains each plugin's result into the next one's `prevResult`, and keeps
//! the final result so that `DEL` (in reverse order) gets it from any later process
//! (`rm`, `gc` after `kill -9`).
//!
//! - **Networks** (`store`) live in `$NESTOR_ROOT/networks/NAME.conflist`: a `bridge`
//!   (gateway, hairpin) with `host-local` addresses (its state under the same
//!   directory) and `portmap` for published ports (left out of an internal network, and
//!   not run for a container that publishes none).
//!   Masquerade and forwarding are the network's own rules (`firewall`: one chain per
//!   table for the subnet, made once per boot), not per container: CNI's `ipMasq` and
//!   `firewall` plugin cost 27 `iptables` runs per container. The default network `nestor` is made on
//!   first use, on bridge `nestor0` for the default data root (another root gets a
//!   bridge named from a hash of it, so parallel test roots never share one). A subnet
//!   is chosen from 10.89.0.0-10.99.255.0 (/24s) so that it overlaps no route of the
//!   host and no subnet another network (of any data root) claimed: claims live in
//!   `/run/nestor-net/subnets/`, taken under a host-wide lock.
//! - **Namespaces** (`netns`): one per container, a file under
//!   `/run/nestor-net/<root hash>/netns/` bind-mounted from a namespace a thread
//!   unshared, as `ip netns add` makes them.
//! - **Attachments** (`attach`): `attach` creates the namespace and runs ADD for each
//!   network (eth0, eth1, …) with `portMappings` and `ips` as runtime configuration;
//!   what DEL needs is written to `networks/attachments/<id>.json` before ADD, so a
//!   crash in between is still undone. `detach` runs DEL for each, removes the
//!   namespace and the record; it is idempotent and collects errors rather than
//!   stopping halfway.
//! - **A microVM's tap** (`tap`): inside the container's namespace, a tap for the VMM
//!   joined to the CNI interface by tc redirects both ways (Kata's "tcfilter" model).
//! - **Published ports** (`ports`): Docker's `-p [IP:][HOST:]CTR[/tcp|/udp]`; a host
//!   port is refused before anything is made when a process on the host holds it (a
//!   bind says so) or another container published it.
//! - **Names**: containers on one user-defined network reach each other by name through
//!   their `/etc/hosts`, which nestor keeps current: each attach or detach rewrites the
//!   hosts file of every container on that network in place (the container sees it
//!   through its bind mount). This needs no server and no port on the host; aardvark-dns
//!   was tried and needs more of its environment than nestor provides. `files` also
//!   writes `/etc/resolv.conf` (the host's nameservers without loopback ones, or
//!   `--dns`) and `/etc/hostname`.

pub mod attach;
pub mod cni;
pub mod files;
pub mod firewall;
pub mod netns;
pub mod ports;
pub mod store;
pub mod tap;

pub use attach::{AttachRequest, Attachment, Iface};
pub use ports::{PortMapping, Proto};
pub use store::{Network, Networks};

/// What goes wrong in networking, one line each.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("no such network: {0}")]
    NoNetwork(String),
    #[error("network {network}: CNI plugin {plugin}: {msg}")]
    Plugin {
        network: String,
        plugin: String,
        msg: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: nix::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Adds what failed to an I/O or system error.
pub(crate) trait Ctx<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Ctx<T> for std::io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            what: what(),
            source,
        })
    }
}

impl<T> Ctx<T> for nix::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Sys {
            what: what(),
            source,
        })
    }
}

/// 8 hex digits of the SHA-256 of `s`: names derived from a data root or network.
pub(crate) fn short_hash(s: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(s.as_bytes())[..4])
}

/// The host-wide runtime directory (`/run/nestor-net`, or `$NESTOR_NET_RUN`).
pub(crate) fn run_dir() -> std::path::PathBuf {
    std::env::var_os("NESTOR_NET_RUN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/run/nestor-net".into())
}

/// An exclusive lock on `path` (created if missing), held while the guard lives.
pub(crate) fn lock(path: &std::path::Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).ctx(|| format!("create {}", p.display()))?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .ctx(|| format!("open {}", path.display()))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .ctx(|| format!("lock {}", path.display()))
}
