//! The command line, as clap structs only: no behaviour here. The OCI runtime verbs
//! (create, start, state, kill, delete, exec, pause, resume, list, spec, features, run
//! --bundle, ps ID, update, events, checkpoint, restore) follow runc's and crun's shapes so podman can drive
//! nestor; the others follow Docker's. `run`'s option groups are serde types too: a
//! container `nestor create` made keeps them in its record for `start`.
//!
//! Subcommands are built only when used (clap's `defer`): parsing `nestor run` no longer
//! builds every other verb's arguments (0.7 ms -> 0.3 ms on this host, and a process
//! start under TCG). So `Args` structs carry `//` comments, not doc comments: clap would
//! take one for the help line of the subcommand made from it, over its variant's.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "nestor",
    version,
    about = "Containers, microVMs, and both nestings, measured side by side"
)]
pub struct Cli {
    /// State root for containers (OCI --root).
    #[arg(long, global = true, env = "NESTOR_STATE", default_value = nestor_container::state::DEFAULT_ROOT)]
    pub root: PathBuf,
    /// Write errors to this file too (OCI runtimes' --log; podman's conmon reads it).
    #[arg(long, global = true)]
    pub log: Option<PathBuf>,
    /// Format of --log.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Verbose logs on stderr.
    #[arg(long, global = true)]
    pub debug: bool,
    /// VM mode: the OCI verbs and `run` put every container in its own microVM (also
    /// selected by invoking nestor as `nestor-vm`).
    #[arg(long, global = true)]
    pub vm_runtime: bool,
    /// With --vm-runtime, `create` makes pod VMs: one microVM per CRI sandbox, which the
    /// sandbox container boots and the sandbox's containers join (by the CRI plugin's
    /// annotations io.kubernetes.cri.container-type and io.kubernetes.cri.sandbox-id).
    #[arg(long, global = true, hide = true)]
    pub vm_pod: bool,
    /// Accepted for compatibility; nestor manages cgroupfs directly.
    #[arg(long, global = true, hide = true)]
    pub systemd_cgroup: bool,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
#[command(defer = true)]
pub enum Cmd {
    /// Create a container without starting it: Docker style with an image (`create
    /// [OPTIONS] IMAGE [CMD…]`, run's options), OCI style with --bundle (`create --bundle
    /// DIR ID`; its process waits for `start`).
    Create(Box<CreateCmd>),
    /// Start a created container: one `nestor create IMAGE` made (by name or id, detached
    /// as `run -d`), or an OCI container in --root.
    Start { id: String },
    /// OCI: print a container's state as JSON.
    State { id: String },
    /// Send a signal to a container (OCI: `kill ID [SIGNAL]`).
    Kill(KillArgs),
    /// OCI: delete a container.
    Delete {
        #[arg(short, long)]
        force: bool,
        id: String,
    },
    /// OCI: the runtime-spec features document (what this runtime honours), as JSON.
    Features,
    /// Freeze every process of a container.
    Pause { id: String },
    /// Thaw a paused container.
    Resume { id: String },
    /// OCI: list containers in the state root.
    List {
        #[arg(short, long, value_enum, default_value_t = ListFormat::Table)]
        format: ListFormat,
        #[arg(short, long)]
        quiet: bool,
    },
    /// OCI: write a default config.json into a bundle directory.
    Spec {
        #[arg(short, long, default_value = ".")]
        bundle: PathBuf,
        /// Map container root to an unprivileged host uid range.
        #[arg(long)]
        rootless: bool,
    },
    /// Run a process in a running container (OCI with --process; Docker-style otherwise).
    Exec(ExecArgs),
    /// Run a container: OCI style with --bundle, Docker style with an image.
    Run(Box<RunArgs>),
    /// List containers made with `nestor run`; with an ID, OCI `ps ID [PS-ARGS…]`: the
    /// processes in that container's cgroup (in --root), as runc lists them.
    Ps {
        /// Show exited containers too.
        #[arg(short, long)]
        all: bool,
        #[arg(short, long)]
        quiet: bool,
        #[arg(long)]
        json: bool,
        /// OCI ps: `table` (the host's `ps` output, default `-ef`, filtered to the
        /// container's pids) or `json` (the pids).
        #[arg(short, long, value_enum)]
        format: Option<ListFormat>,
        /// OCI ps: the container id, then arguments for the host's `ps`.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ID [PS-ARGS]"
        )]
        oci: Vec<String>,
    },
    /// OCI: change the cgroup limits of a created, running or paused container (runc's
    /// flags; kept in its state).
    Update(UpdateArgs),
    /// OCI: the container's resource usage as JSON events (`stats` every --interval, or
    /// once with --stats; `oom` when the OOM killer strikes in its cgroup).
    Events {
        /// Print one stats event and exit.
        #[arg(long)]
        stats: bool,
        /// Time between stats events (`5s`, `500ms`, `1m`).
        #[arg(long, default_value = "5s")]
        interval: String,
        id: String,
    },
    /// OCI: save a running container with CRIU (runc's flags); without
    /// --leave-running or --pre-dump the container is then gone.
    Checkpoint(CheckpointArgs),
    /// Move a running `run --vm -d` container to another nestor (its microVM migrates
    /// live), or with --listen take one in.
    Migrate(MigrateArgs),
    /// OCI: a new container from a bundle, its processes CRIU's restore of a
    /// checkpoint (runc's flags); waits for it and exits with its code unless --detach.
    Restore(RestoreArgs),
    /// Print the output of a detached container.
    Logs {
        #[arg(short, long)]
        follow: bool,
        container: String,
    },
    /// Stop containers: the stop signal, then KILL after a grace period.
    Stop {
        #[arg(short, long, default_value_t = 10)]
        time: u64,
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Remove containers.
    Rm {
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Show a container or an image as JSON.
    Inspect { name: String },
    /// List images.
    Images {
        #[arg(short, long)]
        quiet: bool,
        #[arg(long)]
        json: bool,
        /// Show the manifest digest of each image (what a registry serves it by).
        #[arg(long)]
        digests: bool,
    },
    /// Write images to one archive: `nestor save -o FILE [--format docker-archive|oci-archive] IMAGE…`.
    Save {
        /// The archive to write (replaced only once it is complete).
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long, value_enum, default_value = "docker-archive")]
        format: SaveFormat,
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Load the images of an archive (docker-archive, oci-archive; plain, gzip or zstd).
    Load {
        /// The archive to read.
        #[arg(short, long)]
        input: PathBuf,
        /// No progress on stderr.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Log in to a registry: the credentials are checked, then stored in podman's auth
    /// file ($REGISTRY_AUTH_FILE, else $XDG_RUNTIME_DIR/containers/auth.json). On a
    /// terminal, a user name or password not given is asked for.
    Login {
        registry: String,
        /// The user name (asked for on a terminal when not given).
        #[arg(short, long)]
        username: Option<String>,
        /// The password (visible to other users in the process list: prefer
        /// --password-stdin).
        #[arg(short, long)]
        password: Option<String>,
        /// Read the password from stdin (its first line).
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        registry_opts: crate::docker::registry::RegistryOpts,
    },
    /// Remove a registry's credentials from the auth file.
    Logout { registry: String },
    /// Give an image another name: `nestor tag SOURCE TARGET` (TARGET moves to SOURCE's
    /// image if another image had it).
    Tag { source: String, target: String },
    /// Push an image from the store to a registry: `nestor push IMAGE [DESTINATION]`
    /// (IMAGE's own name when no destination is given). Layers the registry already
    /// has are not sent; the manifest digest is printed as `TAG: digest: … size: …`.
    Push {
        source: String,
        destination: Option<String>,
        /// No progress on stderr.
        #[arg(short, long)]
        quiet: bool,
        /// Print what was pushed as JSON (reference, digest, layers pushed and already
        /// there).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        registry: crate::docker::registry::RegistryOpts,
    },
    /// Manage images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Pull an image from a registry (`alpine` is docker.io/library/alpine:latest; the
    /// search registries for short names are in the registries.conf file).
    Pull {
        /// `[REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST]`.
        reference: String,
        /// `OS/ARCH[/VARIANT]` to pick from a multi-platform image (default: linux and
        /// this host's architecture).
        #[arg(long)]
        platform: Option<String>,
        /// No progress on stderr.
        #[arg(short, long)]
        quiet: bool,
        /// Print what was pulled as JSON (reference, digest, id, layers downloaded and
        /// reused).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        registry: crate::docker::registry::RegistryOpts,
    },
    /// Remove whatever killed runs left behind: mounts, cgroups, state, unused layers.
    Gc,
    /// Measure and compare every nesting: process, container, microVM, both scenarios.
    Bench(BenchArgs),
    /// The bench's workloads (cpu, mem, disk, net), printing JSON result lines.
    #[command(hide = true)]
    Workload(WorkloadArgs),
    /// Run any program jailed as Firecracker's jailer would (scenario 2's jail).
    Jail(JailArgs),
    /// MicroVMs.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Pods: one long-lived microVM that holds several containers (Kata's sandbox).
    #[command(subcommand)]
    Pod(PodCmd),
    /// Networks containers join (CNI bridges with NAT and published ports).
    #[command(subcommand)]
    Network(NetworkCmd),
    /// The published ports of a container.
    Port { container: String },
    /// Named volumes: directories containers mount with `-v NAME:/dst`.
    #[command(subcommand)]
    Volume(VolumeCmd),
}

#[derive(Subcommand, Debug)]
#[command(defer = true)]
pub enum VolumeCmd {
    /// Create a named volume (`-v NAME:/dst` also makes one on first use).
    Create { name: String },
    /// List volumes.
    #[command(alias = "list")]
    Ls {
        #[arg(short, long)]
        quiet: bool,
        #[arg(long)]
        json: bool,
    },
    /// Show volumes as JSON: mount point, creation time, the containers that mount them.
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove volumes and their data (refused while a running container mounts one).
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove every volume no container mounts.
    Prune,
}

#[derive(Subcommand, Debug)]
#[command(defer = true)]
pub enum NetworkCmd {
    /// Create a network: a bridge with its own subnet, NAT and published ports.
    Create {
        /// The subnet (default: a free /24 of 10.89.0.0-10.99.255.0).
        #[arg(long)]
        subnet: Option<ipnet::Ipv4Net>,
        /// No NAT to the outside, no default route, no published ports.
        #[arg(long)]
        internal: bool,
        name: String,
    },
    /// List networks.
    #[command(alias = "list")]
    Ls {
        #[arg(short, long)]
        quiet: bool,
        #[arg(long)]
        json: bool,
    },
    /// Show networks and the containers on them, as JSON.
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove networks (refused while a container is on one).
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove every network no container is on.
    Prune,
    /// CNI CHECK of a container's (or a pod's) networks: whether its interface,
    /// address, routes and rules are still as ADD made them.
    Check { container: String },
}

#[derive(Subcommand, Debug)]
#[command(defer = true)]
pub enum PodCmd {
    /// Boot a pod's microVM, with the disks of every image in the store (at most 8).
    Create {
        name: String,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 512)]
        vm_mem: u32,
        /// vCPUs.
        #[arg(long, default_value_t = 1)]
        vm_cpus: u8,
        /// The pod's network (its containers share it, as a Kubernetes pod's do).
        #[command(flatten)]
        net: NetOpts,
        /// A host directory or named volume shared into the pod's VM over virtio-fs and
        /// mounted in each of its containers (SRC:DST[:ro], as podman's pod create -v);
        /// `run --pod -v SRC:DST` mounts such a source elsewhere.
        #[arg(short = 'v', long = "volume")]
        volume: Vec<String>,
        /// virtiofsd's cache mode for the pod's shared directories.
        #[arg(long = "vm-fs-cache", value_enum, default_value_t = FsCache::Auto)]
        fs_cache: FsCache,
    },
    /// List pods.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Power a pod's microVM off (with its containers) and remove the pod.
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
        /// Remove even if containers still run in it.
        #[arg(short, long)]
        force: bool,
    },
}

// `nestor create`, both forms: run's options (Docker style: IMAGE [CMD…]) and the OCI
// runtime's (`--bundle`, `--console-socket`, `--pid-file`, `--preserve-fds`,
// `--no-pivot`, `--no-new-keyring`; ID). [`CreateCmd::oci`] tells them apart.
#[derive(Args, Debug, Clone)]
pub struct CreateCmd {
    #[command(flatten)]
    pub run: RunArgs,
    /// Accepted for runc's callers; nestor always pivots and keyrings are left alone.
    #[arg(long, hide = true)]
    pub no_pivot: bool,
    #[arg(long, hide = true)]
    pub no_new_keyring: bool,
}

impl CreateCmd {
    /// The OCI runtime's `create`, when this is one: with `--bundle` or a flag only the
    /// OCI form has, or, as runc defaults the bundle to the working directory, one
    /// argument and a `config.json` here. Anything else is Docker's `create IMAGE`.
    pub fn oci(&self) -> Option<CreateArgs> {
        let o = &self.run.oci;
        let oci_flags = o.bundle.is_some()
            || o.console_socket.is_some()
            || o.pid_file.is_some()
            || o.preserve_fds > 0
            || self.no_pivot
            || self.no_new_keyring;
        let bundle_here = self.run.args.len() == 1 && std::path::Path::new("config.json").is_file();
        if !oci_flags && !bundle_here {
            return None;
        }
        Some(CreateArgs {
            bundle: o.bundle.clone().unwrap_or_else(|| ".".into()),
            console_socket: o.console_socket.clone(),
            pid_file: o.pid_file.clone(),
            preserve_fds: o.preserve_fds,
            // More than one argument is refused by the caller.
            id: self.run.args.first().cloned().unwrap_or_default(),
        })
    }
}

/// The OCI runtime's `create` (see [`CreateCmd::oci`]).
#[derive(Debug, Clone)]
pub struct CreateArgs {
    pub bundle: PathBuf,
    pub console_socket: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
    pub preserve_fds: u32,
    pub id: String,
}

#[derive(Args, Debug)]
pub struct KillArgs {
    /// Signal every process in the container's cgroup.
    #[arg(short, long)]
    pub all: bool,
    /// Signal to send (name or number), Docker style.
    #[arg(short, long)]
    pub signal: Option<String>,
    pub id: String,
    /// Signal to send (name or number), OCI style; default TERM (Docker: KILL).
    pub sig: Option<String>,
}

// `exec`: Docker's (`nestor exec NAME CMD…` on a container `nestor run` made) or the
// OCI runtime's (`--process F`, or runc's flags, on a container in `--root`).
#[derive(Args, Debug, Clone, Default)]
pub struct ExecArgs {
    /// OCI: the process spec as JSON.
    #[arg(short, long)]
    pub process: Option<PathBuf>,
    /// OCI: add a capability to the process's bounding, effective and permitted sets.
    #[arg(short = 'c', long = "cap", value_name = "CAP")]
    pub caps: Vec<String>,
    /// OCI: set no_new_privs for the process.
    #[arg(long)]
    pub no_new_privs: bool,
    /// OCI: exec even when the container is paused.
    #[arg(long)]
    pub ignore_paused: bool,
    /// OCI: additional groups of the process (repeatable).
    #[arg(short = 'g', long = "additional-gids", value_name = "GID")]
    pub additional_gids: Vec<u32>,
    /// OCI: the process's SELinux label (accepted; nestor does not apply SELinux).
    #[arg(long)]
    pub process_label: Option<String>,
    /// OCI: the process's AppArmor profile (accepted; nestor does not apply AppArmor).
    #[arg(long)]
    pub apparmor: Option<String>,
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    #[arg(short, long)]
    pub detach: bool,
    #[arg(short, long)]
    pub tty: bool,
    #[arg(short, long)]
    pub interactive: bool,
    #[arg(long)]
    pub cwd: Option<String>,
    #[arg(short = 'w', long = "workdir")]
    pub workdir: Option<String>,
    #[arg(short, long = "env")]
    pub env: Vec<String>,
    #[arg(short, long)]
    pub user: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    pub id: String,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub cmd: Vec<String>,
}

/// `--log-format`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

// The CRIU switches `checkpoint` and `restore` share (runc's).
#[derive(Args, Debug, Clone)]
pub struct CriuArgs {
    /// Directory of the CRIU images (default: ./checkpoint).
    #[arg(long)]
    pub image_path: Option<PathBuf>,
    /// Directory for CRIU's log and work files (default: the image directory).
    #[arg(long)]
    pub work_path: Option<PathBuf>,
    /// Allow open TCP connections.
    #[arg(long)]
    pub tcp_established: bool,
    /// Allow external unix sockets.
    #[arg(long)]
    pub ext_unix_sk: bool,
    /// Allow shell jobs.
    #[arg(long)]
    pub shell_job: bool,
    /// Handle file locks.
    #[arg(long)]
    pub file_locks: bool,
    /// Deduplicate memory images as they are written or read.
    #[arg(long)]
    pub auto_dedup: bool,
    /// CRIU's cgroup mode: soft (default), full, strict or ignore.
    #[arg(long)]
    pub manage_cgroups_mode: Option<String>,
    /// Namespaces to create empty rather than restore (runc: only `network`).
    #[arg(long)]
    pub empty_ns: Vec<String>,
    /// Lazy page restore (userfaultfd): not supported by nestor.
    #[arg(long)]
    pub lazy_pages: bool,
}

// OCI `checkpoint ID` (runc's flags).
#[derive(Args, Debug, Clone)]
pub struct CheckpointArgs {
    #[command(flatten)]
    pub criu: CriuArgs,
    /// Images of a previous --pre-dump, relative to --image-path.
    #[arg(long)]
    pub parent_path: Option<PathBuf>,
    /// Keep the container running after the checkpoint.
    #[arg(long)]
    pub leave_running: bool,
    /// Save memory only and keep running (for a later dump with --parent-path).
    #[arg(long)]
    pub pre_dump: bool,
    /// Skip TCP connections in flight.
    #[arg(long)]
    pub tcp_skip_in_flight: bool,
    /// Link unlinked files back when possible.
    #[arg(long)]
    pub link_remap: bool,
    /// A page server ADDRESS:PORT: not supported by nestor.
    #[arg(long)]
    pub page_server: Option<String>,
    /// FD CRIU writes to when lazy pages are ready: not supported by nestor.
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    pub status_fd: i32,
    /// The container: an OCI id in --root, or a `nestor run --vm -d` container's name
    /// or id (then DIR is required).
    pub id: String,
    /// A VM container's checkpoint directory (new or empty): the whole microVM is
    /// snapshotted into it (`nestor restore DIR` runs it again).
    pub dir: Option<PathBuf>,
}

// `nestor migrate NAME --to ADDR` / `nestor migrate --listen ADDR`.
#[derive(Args, Debug, Clone)]
pub struct MigrateArgs {
    /// The container to move (with --to).
    #[arg(required_unless_present = "listen")]
    pub container: Option<String>,
    /// Where it goes: unix:PATH or tcp:IP:PORT, where a `nestor migrate --listen` waits.
    #[arg(long, required_unless_present = "listen", conflicts_with = "listen")]
    pub to: Option<String>,
    /// pre-copy (copy memory while the VM runs, then the rest paused), stop-copy, or
    /// post-copy (the state first, the VM runs there at once and faults its memory in;
    /// needs an unjailed destination VMM).
    #[arg(long, default_value = "pre-copy")]
    pub strategy: String,
    /// pre-copy's target for the paused part, in milliseconds.
    #[arg(long, default_value_t = 300)]
    pub downtime_ms: u64,
    /// Take one container in on unix:PATH or tcp:IP:PORT; prints its id once it runs.
    #[arg(long, conflicts_with = "container")]
    pub listen: Option<String>,
    /// With --listen: run it under this name (its own by default).
    #[arg(long, requires = "listen")]
    pub name: Option<String>,
    /// With --to: print the move's figures as one JSON object (container, to, strategy,
    /// paused_ms, total_ms, bytes, rounds) instead of the sentence.
    #[arg(long, conflicts_with = "listen")]
    pub json: bool,
}

// OCI `restore ID` (runc's flags).
#[derive(Args, Debug, Clone)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub criu: CriuArgs,
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// Return once the container is restored instead of waiting for it.
    #[arg(short, long)]
    pub detach: bool,
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Socket for a terminal's master: not supported by restore yet.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// LSM profile TYPE:NAME for the restored processes.
    #[arg(long)]
    pub lsm_profile: Option<String>,
    /// LSM mount context for the restored mounts.
    #[arg(long)]
    pub lsm_mount_context: Option<String>,
    #[arg(long, hide = true)]
    pub no_subreaper: bool,
    #[arg(long, hide = true)]
    pub no_pivot: bool,
    /// With a VM container's checkpoint directory: restore a copy under this name
    /// (with an id of its own).
    #[arg(long)]
    pub name: Option<String>,
    /// The container's OCI id, or a VM container's checkpoint directory (made by
    /// `nestor checkpoint NAME DIR`).
    pub id: String,
}

// OCI `update`: runc's flags, or the whole `linux.resources` document with
// `-r FILE` (`-` for stdin), in which case the other flags are ignored as runc does.
#[derive(Args, Debug, Clone)]
pub struct UpdateArgs {
    /// A `linux.resources` JSON document to apply (`-` reads stdin).
    #[arg(short, long, value_name = "FILE")]
    pub resources: Option<PathBuf>,
    /// Block I/O weight, 10 to 1000.
    #[arg(long)]
    pub blkio_weight: Option<u16>,
    /// CPU CFS period, microseconds.
    #[arg(long)]
    pub cpu_period: Option<String>,
    /// CPU CFS quota, microseconds (-1: none).
    #[arg(long, allow_hyphen_values = true)]
    pub cpu_quota: Option<String>,
    /// CPU shares (relative weight).
    #[arg(long = "cpu-share", alias = "cpu-shares")]
    pub cpu_share: Option<String>,
    /// Realtime period, microseconds.
    #[arg(long)]
    pub cpu_rt_period: Option<String>,
    /// Realtime runtime, microseconds.
    #[arg(long, allow_hyphen_values = true)]
    pub cpu_rt_runtime: Option<String>,
    /// CPUs the container may run on (`0-1`, `0,2`).
    #[arg(long)]
    pub cpuset_cpus: Option<String>,
    /// Memory nodes the container may use.
    #[arg(long)]
    pub cpuset_mems: Option<String>,
    /// Refused: kernel memory limits are gone from the kernel.
    #[arg(long)]
    pub kernel_memory: Option<String>,
    /// Refused, as --kernel-memory.
    #[arg(long)]
    pub kernel_memory_tcp: Option<String>,
    /// Memory limit (`100m`, `1g`, bytes; -1: none).
    #[arg(long, allow_hyphen_values = true)]
    pub memory: Option<String>,
    /// Memory soft limit.
    #[arg(long, allow_hyphen_values = true)]
    pub memory_reservation: Option<String>,
    /// Memory plus swap limit (-1: none).
    #[arg(long, allow_hyphen_values = true)]
    pub memory_swap: Option<String>,
    /// Maximum number of tasks (-1: none; 0 leaves it as it is, as runc does).
    #[arg(long, allow_hyphen_values = true)]
    pub pids_limit: Option<i64>,
    /// Refused: Intel RDT is not supported.
    #[arg(long)]
    pub l3_cache_schema: Option<String>,
    /// Refused: Intel RDT is not supported.
    #[arg(long)]
    pub mem_bw_schema: Option<String>,
    pub id: String,
}

/// `list --format`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListFormat {
    Table,
    Json,
}

// `nestor run`: Docker-style (IMAGE [CMD…]) or, with `--bundle`, the OCI runtime's
// `run ID`. Its options come in groups, one per concern.
#[derive(Args, Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RunArgs {
    #[command(flatten)]
    pub oci: OciRunOpts,
    #[command(flatten)]
    pub ctr: ContainerOpts,
    #[command(flatten)]
    pub net: NetOpts,
    #[command(flatten)]
    pub vm: VmOpts,
    #[command(flatten)]
    pub jail: JailRunOpts,
    /// IMAGE [CMD…] (Docker style) or ID (OCI style, with --bundle). Options go before
    /// the image; everything after it is the container's command.
    #[arg(trailing_var_arg = true, required = true)]
    pub args: Vec<String>,
}

// The OCI runtime's `run` (with `--bundle`).
#[derive(Args, Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct OciRunOpts {
    /// OCI: run the bundle in this directory (and take ID as the first argument).
    #[arg(short, long)]
    pub bundle: Option<PathBuf>,
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
}

// The container itself, as Docker's and podman's `run` take it.
#[derive(Args, Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ContainerOpts {
    #[arg(short, long)]
    pub detach: bool,
    /// Remove the container when it exits.
    #[arg(long)]
    pub rm: bool,
    /// Keep stdin open (pass it to the container).
    #[arg(short, long)]
    pub interactive: bool,
    /// Give the container a pseudo-terminal.
    #[arg(short, long)]
    pub tty: bool,
    /// Set an environment variable (K=V, or K to copy nestor's own).
    #[arg(short, long = "env")]
    pub env: Vec<String>,
    /// Bind mount SRC:DST[:ro].
    #[arg(short, long = "volume")]
    pub volume: Vec<String>,
    /// Working directory inside the container.
    #[arg(short, long)]
    pub workdir: Option<String>,
    /// Memory limit (bytes, or with k, m, g).
    #[arg(short, long)]
    pub memory: Option<String>,
    /// CPU limit in CPUs (e.g. 0.5).
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Maximum number of processes.
    #[arg(long)]
    pub pids_limit: Option<i64>,
    /// Limit reads from a block device, DEVICE:RATE (bytes per second, with k, m or g)
    /// (repeatable). With --vm: limits the guest's image disk (DEVICE must be the
    /// guest's /dev/vda).
    #[arg(long, value_name = "DEVICE:RATE")]
    pub device_read_bps: Vec<String>,
    /// Limit writes to a block device, DEVICE:RATE (bytes per second) (repeatable).
    #[arg(long, value_name = "DEVICE:RATE")]
    pub device_write_bps: Vec<String>,
    /// Limit reads from a block device, DEVICE:RATE (operations per second)
    /// (repeatable).
    #[arg(long, value_name = "DEVICE:RATE")]
    pub device_read_iops: Vec<String>,
    /// Limit writes to a block device, DEVICE:RATE (operations per second)
    /// (repeatable).
    #[arg(long, value_name = "DEVICE:RATE")]
    pub device_write_iops: Vec<String>,
    /// USER[:GROUP] (names or ids) to run as.
    #[arg(short, long)]
    pub user: Option<String>,
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub hostname: Option<String>,
    /// Map container root to an unprivileged host uid range (user namespace).
    #[arg(long)]
    pub userns: bool,
    /// Pull the image from its registry: when it is not in the store (missing, the
    /// default), every time (always), or never.
    #[arg(long, value_enum, value_name = "WHEN")]
    pub pull: Option<PullPolicy>,
    /// `OS/ARCH[/VARIANT]` to pick from a multi-platform image when it is pulled
    /// (default: linux and this machine's architecture).
    #[arg(long, value_name = "PLATFORM")]
    pub platform: Option<String>,
    /// Verify the registry's TLS certificate when pulling; `--tls-verify=false` takes
    /// TLS without checking the certificate, or plain HTTP where the registry has no TLS.
    #[arg(long = "tls-verify", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub tls_verify: Option<bool>,
}

/// The archive formats `save` writes.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveFormat {
    DockerArchive,
    OciArchive,
}

/// When `run` pulls its image.
#[derive(
    clap::ValueEnum,
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
pub enum PullPolicy {
    #[default]
    Missing,
    Always,
    Never,
}

// The container's network, as Docker's `run` takes it.
#[derive(Args, Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct NetOpts {
    /// bridge (the default network), none (loopback only), host, container:NAME (join
    /// another container's), or the name of a network (`nestor network create`).
    #[arg(long, value_name = "NETWORK")]
    pub network: Option<String>,
    /// Publish a port: [IP:][HOST:]CONTAINER[/tcp|/udp] (repeatable).
    #[arg(short = 'p', long = "publish", value_name = "PORT")]
    pub publish: Vec<String>,
    /// Publish every port the image exposes, each on a free host port.
    #[arg(short = 'P', long = "publish-all")]
    pub publish_all: bool,
    /// A nameserver for the container's /etc/resolv.conf (repeatable).
    #[arg(long, value_name = "IP")]
    pub dns: Vec<std::net::Ipv4Addr>,
    /// An /etc/hosts entry NAME:IP (repeatable).
    #[arg(long = "add-host", value_name = "NAME:IP")]
    pub add_host: Vec<String>,
    /// The container's address on its (first) network.
    #[arg(long, value_name = "IP")]
    pub ip: Option<std::net::Ipv4Addr>,
}

/// What `--network` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkMode {
    /// A network namespace of its own with only loopback.
    None,
    /// The host's network namespace.
    Host,
    /// Another container's network namespace.
    Container(String),
    /// A network namespace on these networks (CNI), `bridge` meaning the default one.
    Networks(Vec<String>),
}

impl NetworkMode {
    /// The default network (`bridge`): what a container gets without `--network`, as
    /// in Docker and podman, natively and in a microVM.
    pub fn bridge() -> NetworkMode {
        NetworkMode::Networks(vec!["nestor".into()])
    }
}

impl NetOpts {
    /// `--network`, or `default` when it was not given.
    pub fn mode(&self, default: NetworkMode) -> NetworkMode {
        match self.network.as_deref() {
            None => default,
            Some("none") => NetworkMode::None,
            Some("host") => NetworkMode::Host,
            Some("bridge") | Some("default") => NetworkMode::bridge(),
            Some(s) => match s.strip_prefix("container:") {
                Some(c) => NetworkMode::Container(c.to_string()),
                None => NetworkMode::Networks(vec![s.to_string()]),
            },
        }
    }

    /// Whether any option beyond `--network` was given.
    pub fn wants_more(&self) -> bool {
        !self.publish.is_empty()
            || self.publish_all
            || !self.dns.is_empty()
            || !self.add_host.is_empty()
            || self.ip.is_some()
    }
}

// Scenario 1: the container in a microVM (its own, or a pod's).
#[derive(Args, Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct VmOpts {
    /// Run the container inside a fresh KVM microVM (scenario 1).
    #[arg(id = "vm", long = "vm")]
    pub enabled: bool,
    /// Guest memory of the microVM in MiB (--vm; default 256, or --memory + 64).
    #[arg(id = "vm_mem", long = "vm-mem", value_name = "MiB")]
    pub mem: Option<u32>,
    /// vCPUs of the microVM (--vm; default 1).
    #[arg(id = "vm_cpus", long = "vm-cpus", value_name = "N")]
    pub cpus: Option<u8>,
    /// Guest kernel for --vm (default: $NESTOR_VM_KERNEL or $NESTOR_ROOT/vm/vmlinux).
    #[arg(id = "vm_kernel", long = "vm-kernel", value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Agent initramfs for --vm (default: $NESTOR_VM_INITRD or
    /// $NESTOR_ROOT/vm/initramfs.cpio.lz4).
    #[arg(id = "vm_initrd", long = "vm-initrd", value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Run the container in this pod's microVM (`nestor pod create`); implies --vm.
    #[arg(long, value_name = "POD")]
    pub pod: Option<String>,
    /// virtiofsd's cache mode for `-v DIR` and `-v NAME` shared into the microVM.
    #[arg(id = "vm_fs_cache", long = "vm-fs-cache", value_enum, default_value_t = FsCache::Auto)]
    pub fs_cache: FsCache,
    /// A balloon with free page reporting in the microVM (--vm): the memory the guest
    /// frees goes back to the host, so an idle VM holds about what it uses.
    #[arg(id = "vm_balloon", long = "vm-balloon")]
    pub balloon: bool,
    /// Offer the microVM's memory to the host's KSM (--vm): pages identical across VMs
    /// are kept once when /sys/kernel/mm/ksm/run is 1. One guest can then time
    /// another's writes: for containers that trust each other.
    #[arg(id = "vm_mem_merge", long = "vm-mem-merge")]
    pub mem_merge: bool,
    /// Start the microVM from a snapshot of a booted, idle one of the same shape (made
    /// by the first such run) instead of booting it; each clone gets fresh entropy,
    /// the host's time and its own hostname and MAC. Clones share their unchanged
    /// pages: for containers that trust each other. Not with volumes, a pod,
    /// --vm-balloon or --vm-mem-merge (those boot).
    #[arg(id = "vm_warm", long = "vm-warm")]
    pub warm: bool,
}

/// virtiofsd's `--cache`: how long the guest may trust what it read from the host.
#[derive(
    clap::ValueEnum,
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
)]
pub enum FsCache {
    /// Close-to-open: the guest revalidates on open (host changes seen at next open).
    #[default]
    Auto,
    /// The guest caches freely (only the guest writes the directory).
    Always,
    /// Metadata cached, data not.
    Metadata,
    /// Nothing cached (every read goes to the host).
    Never,
}

impl FsCache {
    pub fn as_str(self) -> &'static str {
        match self {
            FsCache::Auto => "auto",
            FsCache::Always => "always",
            FsCache::Metadata => "metadata",
            FsCache::Never => "never",
        }
    }
}

// Scenario 2 around scenario 1: the microVM's monitor jailed, by default.
#[derive(Args, Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct JailRunOpts {
    /// With --vm: require the jail the microVM's monitor runs in by default (its own
    /// namespaces, cgroup, unprivileged uid, no capabilities, seccomp). Without this
    /// flag, a run the jail cannot serve (a disk file the jail's uid cannot write) runs
    /// the monitor unjailed with one warning; with it, such a run fails. A pod's VM is
    /// not jailed (`--jail --pod` is refused).
    #[arg(id = "jail", long = "jail", conflicts_with = "no_jail")]
    pub strict: bool,
    /// With --vm: run the microVM's monitor unjailed, as root in the host's namespaces.
    #[arg(id = "no_jail", long = "no-jail")]
    pub off: bool,
    /// Host uid that root in the VMM's jail maps to (default: a uid of its own, from
    /// 200000-204095).
    #[arg(id = "jail_uid", long = "jail-uid")]
    pub uid: Option<u32>,
    /// Host gid that root in the VMM's jail maps to.
    #[arg(id = "jail_gid", long = "jail-gid", default_value_t = crate::docker::store::JAIL_ID_DEFAULT)]
    pub gid: u32,
}

#[derive(Subcommand, Debug)]
#[command(defer = true)]
pub enum ImageCmd {
    /// Import an OCI layout directory, an oci-archive or a docker-archive.
    Import {
        path: PathBuf,
        /// Name to give the image (default: the name the archive carries).
        #[arg(long)]
        name: Option<String>,
    },
    /// List images.
    Ls {
        #[arg(short, long)]
        quiet: bool,
        #[arg(long)]
        json: bool,
        /// Show the manifest digest of each image.
        #[arg(long)]
        digests: bool,
    },
    /// Remove images.
    Rm {
        #[arg(required = true)]
        images: Vec<String>,
    },
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Modes to measure: all, or a comma-separated list of process, container, vm,
    /// vm-container, jailed-vm, jailed-vm-container.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    pub modes: Vec<String>,
    /// Timed start/stop runs per row [default: 20; 5 with --quick].
    #[arg(long)]
    pub runs: Option<usize>,
    /// Paired workload runs per mode, each a native run then the mode's; ratios are the
    /// median over the pairs, with a 95% interval [default: 5; 3 with --quick].
    #[arg(long)]
    pub pairs: Option<usize>,
    /// A first look in a few minutes: fewer runs, shorter workloads, a small density sweep.
    #[arg(long)]
    pub quick: bool,
    /// Write the whole report, every sample included, as JSON here
    /// (schema: crates/launcher/bench-schema.json).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write SVG plots here (start time per mode, overhead per workload, density).
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Image for the `nestor run IMAGE` rows (container and VM-container modes).
    #[arg(long, default_value = "busybox")]
    pub image: String,
    /// Guest kernel [default: the newest guest-kernel/build.sh cached].
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Static nestor binary that runs the workloads [default: found next to this build,
    /// or $NESTOR_STATIC_BIN; images/build-agent.sh builds it].
    #[arg(long)]
    pub workload_bin: Option<PathBuf>,
    /// Seconds each time-boxed workload runs [default: 2; 0.5 with --quick].
    #[arg(long)]
    pub workload_secs: Option<f64>,
    /// Memory budget of the density sweep, MiB [default: 2048; 256 with --quick].
    #[arg(long)]
    pub density_budget: Option<u64>,
    /// Most units the density sweep starts per mode [default: 100; 8 with --quick].
    #[arg(long)]
    pub density_max: Option<usize>,
    /// Sections to measure: all, or a comma-separated list of start-stop, unit-size,
    /// density, workloads, services, state-transfer, fs (a shared directory through a
    /// host process, a bind mount, virtio-fs and virtio-blk; each VM boot counts: the
    /// test host's kernel tires after about 30 nested launches in one boot).
    #[arg(long, value_delimiter = ',', default_value = "all")]
    pub sections: Vec<String>,
    /// Guest memory of VM units, MiB (state transfer: the size its goals and
    /// migrations use).
    #[arg(long, default_value_t = 256)]
    pub vm_mem: u64,
    /// Time limit per unit launch, seconds [default: 60; 300 inside the KVM test host].
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Measure nothing: join the reports of runs that each measured some modes into one
    /// (each mode from the first report that measured it), then print it as usual
    /// (with --json and --svg where given).
    #[arg(long, num_args = 1.., value_name = "REPORT.json", conflicts_with = "compare")]
    pub merge: Vec<PathBuf>,
    /// Measure nothing: print what changed from OLD to NEW, row by row, as ratios.
    #[arg(long, num_args = 2, value_names = ["OLD.json", "NEW.json"])]
    pub compare: Vec<PathBuf>,
}

// `nestor workload KIND…`: what the bench runs in every mode (hidden).
#[derive(Args, Debug)]
pub struct WorkloadArgs {
    /// cpu, mem, disk, meta (file metadata in the --disk directory), net (a client of
    /// the bench's server), serve (the server, until killed).
    #[arg(required = true)]
    pub kinds: Vec<String>,
    /// Seconds per time-boxed workload.
    #[arg(long, default_value_t = 1.0)]
    pub secs: f64,
    /// Size of each of the two arrays the memory copy uses, MiB.
    #[arg(long, default_value_t = 64)]
    pub mem_mib: usize,
    /// File or block device for the disk workload (a directory for meta).
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// Bytes the sequential disk passes move, MiB.
    #[arg(long, default_value_t = 64)]
    pub disk_mib: usize,
    /// HOST:PORT of the bench's TCP server.
    #[arg(long)]
    pub net: Option<String>,
    /// The port `serve` listens on (every address).
    #[arg(long, default_value_t = 5201)]
    pub port: u16,
}

// Limits and identity of a jail.
#[derive(Args, Debug, Clone)]
pub struct JailOpts {
    /// Host uid that root in the jail maps to (default: a uid of its own, from
    /// 200000-204095).
    #[arg(long)]
    pub jail_uid: Option<u32>,
    /// Host gid that root in the jail maps to.
    #[arg(long, default_value_t = crate::docker::store::JAIL_ID_DEFAULT)]
    pub jail_gid: u32,
    /// Memory limit of the jail's cgroup (bytes, or with k, m, g).
    #[arg(long)]
    pub memory: Option<String>,
    /// CPU limit in CPUs.
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Maximum number of processes (threads count).
    #[arg(long)]
    pub pids_limit: Option<i64>,
    /// Open files limit inside the jail.
    #[arg(long, default_value_t = 2048)]
    pub nofile: u64,
    /// Largest file the jail may write, bytes.
    #[arg(long)]
    pub fsize: Option<u64>,
    /// Network of the jail: none (own empty network namespace), or tap (a tap device
    /// owned by the jail's uid moved into it, and /dev/net/tun).
    #[arg(long, value_enum, default_value_t = JailNetwork::None)]
    pub network: JailNetwork,
}

/// `--network` of a jail.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum JailNetwork {
    None,
    Tap,
}

#[derive(Args, Debug)]
pub struct JailArgs {
    /// Name of the jail (default: generated).
    #[arg(long)]
    pub id: Option<String>,
    #[command(flatten)]
    pub opts: JailOpts,
    /// Give the jail /dev/kvm.
    #[arg(long)]
    pub kvm: bool,
    /// Bind a host file read-only: HOST:INSIDE (repeatable).
    #[arg(long = "file")]
    pub files: Vec<String>,
    /// The program and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    pub cmd: Vec<String>,
}

#[derive(Subcommand, Debug)]
#[command(defer = true)]
pub enum VmCmd {
    /// Boot a microVM with nestor-vmm, optionally jailed (--jail).
    Run(VmRunArgs),
}

#[derive(Args, Debug)]
pub struct VmRunArgs {
    #[arg(long)]
    pub kernel: PathBuf,
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Guest memory in MiB.
    #[arg(long)]
    pub mem: Option<u64>,
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// PATH[,ro] (repeatable).
    #[arg(long)]
    pub disk: Vec<String>,
    /// Host-side Unix socket of the guest's vsock.
    #[arg(long)]
    pub vsock: Option<PathBuf>,
    /// Tap device for virtio-net.
    #[arg(long)]
    pub net: Option<String>,
    /// stdio, none or a file.
    #[arg(long)]
    pub console: Option<String>,
    /// The VMM binary (default: nestor-vmm next to nestor, or $NESTOR_VMM).
    #[arg(long)]
    pub vmm: Option<PathBuf>,
    /// A balloon with free page reporting (nestor-vmm --balloon): the memory the
    /// guest frees goes back to the host.
    #[arg(long)]
    pub balloon: bool,
    /// Offer guest memory to the host's KSM (nestor-vmm --mem-merge).
    #[arg(long)]
    pub mem_merge: bool,
    /// Run the VMM in a jail (scenario 2).
    #[arg(long)]
    pub jail: bool,
    #[command(flatten)]
    pub jail_opts: JailOpts,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn each_subcommand_keeps_its_own_help_line() {
        // Subcommands are built when used (`defer`), after their variant's doc comment
        // is applied: an `Args` struct with a doc comment would replace the help line
        // of every subcommand made from it (it once made `pull`, `push` and `login`
        // read "`--tls-verify` and `--platform`, shared by…").
        fn walk(c: &clap::Command, path: &str, seen: &mut Vec<(String, String)>) {
            for s in c.get_subcommands().filter(|s| s.get_name() != "help") {
                let p = format!("{path} {}", s.get_name());
                let about = s.get_about().map(|a| a.to_string()).unwrap_or_default();
                assert!(!about.is_empty(), "{p} has no help line");
                // `images` is Docker's name for `image ls`: the one help line both share.
                if let Some((other, _)) = seen.iter().find(|(_, a)| *a == about) {
                    let pair = [other.as_str(), p.as_str()];
                    let alias = pair == ["nestor images", "nestor image ls"];
                    assert!(alias, "{p} and {other} share the help line {about:?}");
                }
                seen.push((p.clone(), about));
                walk(s, &p, seen);
            }
        }
        // The verbs' help lines before their deferred parts are built: their variants'
        // doc comments, which building must leave as they are.
        let mut cmd = Cli::command();
        let before: Vec<(String, String)> = cmd
            .get_subcommands()
            .map(|s| {
                (
                    format!("nestor {}", s.get_name()),
                    s.get_about().map(|a| a.to_string()).unwrap_or_default(),
                )
            })
            .collect();
        cmd.build();
        let mut seen = Vec::new();
        walk(&cmd, "nestor", &mut seen);
        for (path, about) in before.iter().filter(|(p, _)| p != "nestor help") {
            let now = seen
                .iter()
                .find(|(p, _)| p == path)
                .map(|(_, a)| a.as_str());
            assert_eq!(
                now,
                Some(about.as_str()),
                "{path}'s help line changed when built"
            );
        }
        let about = |path: &str| seen.iter().find(|(p, _)| p == path).map(|(_, a)| a.clone());
        let run = about("nestor run").unwrap();
        assert!(run.starts_with("Run a container"), "{run}");
        let pull = about("nestor pull").unwrap();
        assert!(pull.starts_with("Pull an image"), "{pull}");
        let vm_run = about("nestor vm run").unwrap();
        assert!(vm_run.starts_with("Boot a microVM"), "{vm_run}");
    }

    #[test]
    fn an_unknown_flag_before_the_image_is_refused_as_a_flag() {
        let e =
            Cli::try_parse_from(["nestor", "run", "--no-such-flag", "x", "busybox"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::UnknownArgument, "{e}");
        let c =
            Cli::try_parse_from(["nestor", "run", "--rm", "busybox", "ls", "-l", "--x"]).unwrap();
        let Cmd::Run(r) = c.cmd else {
            panic!("not run")
        };
        assert_eq!(r.args, ["busybox", "ls", "-l", "--x"]);
        assert!(r.ctr.rm);
    }

    fn create(args: &[&str]) -> CreateCmd {
        let c = Cli::try_parse_from(["nestor", "create"].iter().chain(args)).unwrap();
        let Cmd::Create(a) = c.cmd else {
            panic!("not create")
        };
        *a
    }

    #[test]
    fn create_is_ocis_with_a_bundle_and_dockers_with_an_image() {
        // conmon's call.
        let a = create(&[
            "--bundle",
            "/b",
            "--pid-file",
            "/p",
            "--no-new-keyring",
            "--console-socket",
            "/s",
            "ctr1",
        ]);
        let o = a.oci().expect("OCI create");
        assert_eq!((o.bundle.to_str(), o.id.as_str()), (Some("/b"), "ctr1"));
        assert_eq!(
            o.console_socket.as_deref(),
            Some(std::path::Path::new("/s"))
        );
        assert!(create(&["--pid-file", "/p", "ctr1"]).oci().is_some());
        // No config.json in the crate's directory: an image and its command.
        assert!(!std::path::Path::new("config.json").exists());
        let a = create(&["--name", "n", "-e", "A=1", "busybox", "echo", "-n", "hi"]);
        assert!(a.oci().is_none());
        assert_eq!(a.run.args, ["busybox", "echo", "-n", "hi"]);
        assert!(create(&["busybox"]).oci().is_none());
    }
}
