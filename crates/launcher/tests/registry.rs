//! `nestor pull` and `run --pull` against a real registry (Debian's docker-registry,
//! distribution 2.8) that each test starts on 127.0.0.1 at a free port, fed by podman
//! (`podman push`, with a storage of the test's own). Faults are real too: a blob
//! corrupted on the registry's disk, the registry killed mid-download by the TCP relay
//! the test puts in front of it, nestor killed with SIGKILL mid-pull, a tmpfs too small.
//! Every test has its own registry, port, podman storage and nestor roots; the registry
//! is killed on every path (Drop).

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Skips the test (with the reason printed) when a tool is missing.
macro_rules! need {
    ($($tool:expr),+) => {
        $(if !have($tool) {
            eprintln!("SKIP: {} is not installed (scripts/setup.sh installs it)", $tool);
            return;
        })+
    };
}

/// A docker-registry process on 127.0.0.1, storage in a temp dir; killed on drop.
struct Registry {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Registry {
    fn start(storage: &Path) -> Registry {
        Registry::start_with(storage, "")
    }

    /// With `extra` appended to the configuration's `http:` section's level (auth, TLS):
    /// ready when the port accepts connections.
    fn start_with(storage: &Path, extra: &str) -> Registry {
        for _ in 0..10 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let conf = storage.join(format!("config-{port}.yml"));
            std::fs::write(
                &conf,
                format!(
                    "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{extra}",
                    storage.join("data").display()
                ),
            )
            .unwrap();
            let child = Command::new("docker-registry")
                .args(["serve", conf.to_str().unwrap()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut r = Registry {
                child,
                port,
                dir: storage.to_path_buf(),
            };
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(15) {
                if let Ok(Some(_)) = r.child.try_wait() {
                    break; // port taken meanwhile: try another
                }
                if (!extra.is_empty() && TcpStream::connect(("127.0.0.1", port)).is_ok())
                    || http_get(port, "/v2/").starts_with("HTTP/1.0 200")
                    || http_get(port, "/v2/").starts_with("HTTP/1.1 200")
                {
                    return r;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            r.kill();
        }
        panic!("docker-registry did not start");
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The largest blob on the registry's disk: its file and digest.
    fn largest_blob(&self) -> (PathBuf, String) {
        let mut best: Option<(u64, PathBuf, String)> = None;
        let top = self.dir.join("data/docker/registry/v2/blobs/sha256");
        for pre in std::fs::read_dir(top).unwrap().flatten() {
            for b in std::fs::read_dir(pre.path()).unwrap().flatten() {
                let f = b.path().join("data");
                let len = std::fs::metadata(&f).map(|m| m.len()).unwrap_or(0);
                if best.as_ref().is_none_or(|(l, _, _)| len > *l) {
                    let d = format!("sha256:{}", b.file_name().to_string_lossy());
                    best = Some((len, f, d));
                }
            }
        }
        let (_, f, d) = best.expect("the registry holds blobs");
        (f, d)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}

fn http_get(port: u16, path: &str) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// One HTTP/1.0 request; the whole response.
fn http(port: u16, method: &str, path: &str, headers: &[&str], body: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn http_body(resp: &str) -> Option<&str> {
    resp.split_once("\r\n\r\n").map(|(_, b)| b)
}

/// A TCP relay in front of a registry that, once `after` bytes have come back from it
/// in total, calls `trip` and then either cuts every connection or stalls them.
struct Relay {
    port: u16,
    tripped: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    fn start(
        upstream: u16,
        after: u64,
        stall: bool,
        trip: impl Fn() + Send + Sync + 'static,
    ) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let tripped = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let trip = Arc::new(trip);
        let (t2, s2) = (tripped.clone(), stop.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                if s2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = c else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (mut c_r, mut s_w) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_r, &mut s_w);
                    let _ = s_w.shutdown(Shutdown::Write);
                });
                let (count, tripped, trip, stop) =
                    (count.clone(), t2.clone(), trip.clone(), s2.clone());
                std::thread::spawn(move || {
                    let (mut s_r, mut c_w) = (server, client);
                    let mut buf = [0u8; 16384];
                    loop {
                        let n = match s_r.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if c_w.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        if count.fetch_add(n as u64, Ordering::SeqCst) + n as u64 > after {
                            if !tripped.swap(true, Ordering::SeqCst) {
                                trip();
                            }
                            if stall {
                                while !stop.load(Ordering::SeqCst) {
                                    std::thread::sleep(Duration::from_millis(50));
                                }
                            }
                            break;
                        }
                    }
                    let _ = c_w.shutdown(Shutdown::Both);
                    let _ = s_r.shutdown(Shutdown::Both);
                });
            }
        });
        Relay {
            port,
            tripped,
            stop,
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// A nestor with roots of its own and a registries.conf whose search list is `search`.
struct Nestor {
    dir: tempfile::TempDir,
    root: PathBuf,
}

impl Nestor {
    fn new(search: &[&str]) -> Nestor {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let quoted: Vec<String> = search.iter().map(|s| format!("\"{s}\"")).collect();
        let mut conf = format!("unqualified-search-registries = [{}]\n", quoted.join(", "));
        for s in search {
            conf.push_str(&format!(
                "[[registry]]\nlocation = \"{s}\"\ninsecure = true\n"
            ));
        }
        std::fs::write(dir.path().join("registries.conf"), conf).unwrap();
        Nestor { dir, root }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(nestor());
        c.env("NESTOR_ROOT", &self.root)
            .env("NESTOR_STATE", self.dir.path().join("state"))
            .env(
                "NESTOR_REGISTRIES_CONF",
                self.dir.path().join("registries.conf"),
            )
            .args(args)
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn pull_json(&self, reference: &str) -> Value {
        let o = self.run(&["pull", "--json", "--tls-verify=false", reference]);
        assert!(o.status.success(), "pull {reference}: {}", stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    }

    fn images(&self) -> Vec<Value> {
        let o = self.run(&["images", "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice::<Vec<Value>>(&o.stdout).unwrap()
    }

    fn downloads(&self) -> Vec<String> {
        std::fs::read_dir(self.root.join("images/downloads"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n != "blobs")
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Verified blobs kept in the download cache for a later pull.
    fn cached_blobs(&self) -> usize {
        std::fs::read_dir(self.root.join("images/downloads/blobs/sha256"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    fn layer_count(&self) -> usize {
        std::fs::read_dir(self.root.join("images/layers"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

impl Drop for Nestor {
    fn drop(&mut self) {
        let ids = self.run(&["ps", "-a", "-q"]);
        for id in stdout(&ids).lines() {
            let _ = self.run(&["rm", "-f", id]);
        }
        let _ = self.run(&["gc"]);
        // The default network a `run` made: its bridge and subnet claim.
        let _ = self.run(&["network", "prune"]);
    }
}

/// podman with a storage of its own (vfs), removed with the temp dir.
struct Podman {
    dir: tempfile::TempDir,
}

impl Podman {
    fn new() -> Podman {
        Podman {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        let d = self.dir.path();
        Command::new("podman")
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `podman run --rm IMAGE sh -c SCRIPT` on the image podman pulled and unpacked. The
    /// OCI runtime is nestor (crun refuses this host's hybrid cgroups), with limits
    /// under this host's hard ones and no network.
    fn run_container(&self, image: &str, script: &str) -> Output {
        self.run(&[
            "--runtime",
            nestor(),
            "run",
            "--rm",
            "--ulimit",
            "nofile=20000:20000",
            "--ulimit",
            "nproc=32768:32768",
            "--network=none",
            image,
            "sh",
            "-c",
            script,
        ])
    }

    /// Loads an OCI layout and pushes it as `dest`; returns the image id.
    fn push_layout(&self, layout: &Path, dest: &str) -> String {
        let loaded = self.load_layout(layout);
        let o = self.run(&["push", "-q", "--tls-verify=false", &loaded, dest]);
        assert!(o.status.success(), "podman push: {}", stderr(&o));
        let o = self.run(&["image", "inspect", "--format", "{{.Id}}", &loaded]);
        assert!(o.status.success(), "podman inspect: {}", stderr(&o));
        stdout(&o).trim().to_string()
    }

    /// Loads an OCI layout; returns the name podman gave it.
    fn load_layout(&self, layout: &Path) -> String {
        let tar = self.dir.path().join(format!("{}.tar", unique("img")));
        let o = Command::new("tar")
            .arg("-C")
            .arg(layout)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .output()
            .unwrap();
        assert!(o.status.success(), "tar: {}", stderr(&o));
        let o = self.run(&["load", "-q", "-i", tar.to_str().unwrap()]);
        assert!(o.status.success(), "podman load: {}", stderr(&o));
        stdout(&o)
            .lines()
            .last()
            .unwrap()
            .trim()
            .trim_start_matches("Loaded image: ")
            .trim_start_matches("Loaded image(s): ")
            .to_string()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["rmi", "-a", "-f"]);
    }
}

fn sample_layout() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../images/build-busybox-image.sh");
    let o = Command::new("bash").arg(script).output().unwrap();
    assert!(
        o.status.success(),
        "sample image build failed: {}",
        stderr(&o)
    );
    PathBuf::from(stdout(&o).lines().last().unwrap().trim())
}

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The sample image plus a third layer holding `/big`, `big` bytes of random data
/// (incompressible, stored uncompressed): a copy of the layout in `dir`.
fn layout_with_big_layer(dir: &Path, big: usize) -> PathBuf {
    let src = sample_layout();
    let out = dir.join("layout");
    let o = Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success());
    let blobs = out.join("blobs/sha256");
    let read_blob =
        |d: &str| std::fs::read(blobs.join(d.strip_prefix("sha256:").unwrap())).unwrap();
    let put_blob = |bytes: &[u8]| -> String {
        let d = sha(bytes);
        std::fs::write(blobs.join(d.strip_prefix("sha256:").unwrap()), bytes).unwrap();
        d
    };
    let content = dir.join("big-content");
    std::fs::create_dir_all(&content).unwrap();
    let mut data = vec![0u8; big];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut data)
        .unwrap();
    std::fs::write(content.join("big"), &data).unwrap();
    let tar = dir.join("big.tar");
    let o = Command::new("tar")
        .args(["--owner=0", "--group=0", "-C"])
        .arg(&content)
        .arg("-cf")
        .arg(&tar)
        .arg("big")
        .output()
        .unwrap();
    assert!(o.status.success());
    let layer = std::fs::read(&tar).unwrap();
    let layer_digest = put_blob(&layer);
    let mut index: Value =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    let mdigest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let mut manifest: Value = serde_json::from_slice(&read_blob(&mdigest)).unwrap();
    let cdigest = manifest["config"]["digest"].as_str().unwrap().to_string();
    let mut config: Value = serde_json::from_slice(&read_blob(&cdigest)).unwrap();
    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .unwrap()
        .push(json!(layer_digest));
    if let Some(h) = config["history"].as_array_mut() {
        h.push(json!({"created_by": "test: big layer"}));
    }
    let cbytes = serde_json::to_vec(&config).unwrap();
    manifest["config"]["digest"] = json!(put_blob(&cbytes));
    manifest["config"]["size"] = json!(cbytes.len());
    manifest["layers"].as_array_mut().unwrap().push(json!({
        "mediaType": "application/vnd.oci.image.layer.v1.tar",
        "digest": layer_digest,
        "size": layer.len(),
    }));
    let mbytes = serde_json::to_vec(&manifest).unwrap();
    index["manifests"][0]["digest"] = json!(put_blob(&mbytes));
    index["manifests"][0]["size"] = json!(mbytes.len());
    index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] = json!("big:latest");
    std::fs::write(out.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    out
}

/// Exactly one line on stderr, starting with `error:`, mentioning `what`.
fn one_error_line(o: &Output, what: &str) {
    assert!(!o.status.success(), "should have failed: {}", stdout(o));
    let e = stderr(o);
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {e}");
    assert!(
        lines[0].starts_with("error:") && lines[0].contains(what),
        "{e}"
    );
}

/// podman pushes the two-layer sample (a whiteout and an opaque dir in layer 2); nestor
/// pulls it by short name, by digest and through `run --pull`, runs it, and downloads
/// nothing the second time.
#[test]
fn pull_push_by_podman_and_run() {
    need!("docker-registry", "podman");
    let store = tempfile::tempdir().unwrap();
    let reg = Registry::start(store.path());
    let podman = Podman::new();
    let id = podman.push_layout(&sample_layout(), &format!("{}/busybox:latest", reg.addr()));
    podman.push_layout(&sample_layout(), &format!("{}/tools/second:v2", reg.addr()));
    let n = Nestor::new(&[&reg.addr()]);

    let p = n.pull_json("busybox");
    assert_eq!(p["id"], json!(id), "{p}");
    assert_eq!(p["layers_downloaded"], json!(2), "{p}");
    assert_eq!(
        p["names"],
        json!([format!("{}/busybox:latest", reg.addr())])
    );
    let o = n.run(&[
        "run",
        "--rm",
        &format!("{}/busybox", reg.addr()),
        "sh",
        "-c",
        "test ! -e /etc/motd && ls /var/cache/sample && cat /etc/nestor-sample",
    ]);
    assert!(o.status.success(), "run: {}", stderr(&o));
    assert!(
        stdout(&o).starts_with("new\nnestor busybox sample"),
        "{}",
        stdout(&o)
    );

    // Again: every layer is in the store, nothing is downloaded.
    let again = n.pull_json(&format!("{}/busybox:latest", reg.addr()));
    assert_eq!(again["layers_downloaded"], json!(0), "{again}");
    assert_eq!(again["layers_reused"], json!(2), "{again}");
    let digest = p["digest"].as_str().unwrap();
    let by_digest = n.pull_json(&format!("{}/busybox@{digest}", reg.addr()));
    assert_eq!(by_digest["id"], json!(id));

    // run pulls a missing image, and --pull=never does not.
    let o = n.run(&["run", "--rm", "--pull=never", "tools/second:v2", "true"]);
    one_error_line(&o, "not found");
    let o = n.run(&[
        "run",
        "--rm",
        "tools/second:v2",
        "sh",
        "-c",
        "echo pulled-by-run",
    ]);
    assert!(o.status.success(), "run --pull=missing: {}", stderr(&o));
    assert!(stdout(&o).contains("pulled-by-run"));
    let o = n.run(&["run", "--rm", "--pull=always", "tools/second:v2", "true"]);
    assert!(o.status.success(), "run --pull=always: {}", stderr(&o));

    // Unknown tag, unknown repository, nothing listening.
    one_error_line(&n.run(&["pull", "busybox:nosuch"]), "not found");
    one_error_line(
        &n.run(&["pull", &format!("{}/nosuch/repo", reg.addr())]),
        "not found",
    );
    one_error_line(
        &n.run(&["pull", "--tls-verify=false", "127.0.0.1:1/x:y"]),
        "cannot connect",
    );
    one_error_line(&n.run(&["pull", "Bad Name"]), "invalid image reference");

    // A manifest whose layer is not a tar layer (an artifact) is refused as unsupported.
    let mut m: Value = serde_json::from_str(
        http_body(&http(
            reg.port,
            "GET",
            "/v2/busybox/manifests/latest",
            &["Accept: application/vnd.oci.image.manifest.v1+json"],
            b"",
        ))
        .unwrap(),
    )
    .unwrap();
    m["layers"][1]["mediaType"] = json!("application/vnd.example.data.v1");
    let body = serde_json::to_vec(&m).unwrap();
    let put = http(
        reg.port,
        "PUT",
        "/v2/busybox/manifests/odd",
        &["Content-Type: application/vnd.oci.image.manifest.v1+json"],
        &body,
    );
    assert!(
        put.starts_with("HTTP/1.0 201") || put.starts_with("HTTP/1.1 201"),
        "{put}"
    );
    one_error_line(&n.run(&["pull", "busybox:odd"]), "unsupported");
    assert!(n.downloads().is_empty(), "{:?}", n.downloads());
}

/// The record of container `name` as `ps -a --json` shows it.
fn ps_record(n: &Nestor, name: &str) -> Option<Value> {
    let o = n.run(&["ps", "-a", "--json"]);
    assert!(o.status.success(), "ps: {}", stderr(&o));
    serde_json::from_slice::<Vec<Value>>(&o.stdout)
        .unwrap()
        .into_iter()
        .find(|m| m["name"] == json!(name))
}

/// Waits (up to 20 s) until container `name` has exited; its record then.
fn wait_exited(n: &Nestor, name: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = ps_record(n, name).expect("the record");
        if m["status"] == json!("exited") || Instant::now() > deadline {
            return m;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Docker's `create`: the image is pulled when missing (`--pull=never` refuses in one
/// line and records nothing), the container is recorded `Created` with nothing running,
/// `start` runs it detached with the options given to `create` (its output in `logs`),
/// and again after its exit; a running one is not started twice, a name is not taken
/// twice, a created one is removed without -f and survives `gc`.
#[test]
fn create_pulls_a_missing_image_and_start_runs_it() {
    need!("docker-registry", "podman");
    let store = tempfile::tempdir().unwrap();
    let reg = Registry::start(store.path());
    let podman = Podman::new();
    let id = podman.push_layout(
        &sample_layout(),
        &format!("{}/tools/created:v1", reg.addr()),
    );
    let n = Nestor::new(&[&reg.addr()]);
    let name = unique("created");

    let o = n.run(&[
        "create",
        "--pull=never",
        "--name",
        &name,
        "tools/created:v1",
        "true",
    ]);
    one_error_line(&o, "not found");
    assert!(
        ps_record(&n, &name).is_none(),
        "--pull=never recorded a container"
    );
    assert!(n.images().is_empty(), "{:?}", n.images());

    // The variable is taken from create's environment, not start's.
    let o = n
        .cmd(&[
            "create",
            "--name",
            &name,
            "--network",
            "none",
            "-e",
            "FROM_CREATE",
            "tools/created:v1",
            "sh",
            "-c",
            "echo out-of-created $FROM_CREATE $(cut -d, -f1 /etc/nestor-sample)",
        ])
        .env("FROM_CREATE", "yes")
        .output()
        .unwrap();
    assert!(o.status.success(), "create: {}", stderr(&o));
    let cid = stdout(&o).trim().to_string();
    assert!(
        cid.len() == 64 && cid.bytes().all(|b| b.is_ascii_hexdigit()),
        "create printed {cid:?}"
    );
    let images = n.images();
    assert_eq!(images.len(), 1, "{images:?}");
    assert_eq!(images[0]["id"], json!(id), "{images:?}");
    let m = ps_record(&n, &name).expect("the created record");
    assert_eq!(m["status"], json!("created"), "{m}");
    assert_eq!(m["id"], json!(cid));
    let o = n.run(&["ps", "-a"]);
    let line = stdout(&o)
        .lines()
        .find(|l| l.ends_with(&name))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(line.contains("Created"), "ps -a: {}", stdout(&o));
    // Nothing runs: not in `ps`, and the log is empty.
    assert!(!stdout(&n.run(&["ps"])).contains(&name));
    let o = n.run(&["logs", &name]);
    assert!(o.status.success(), "logs: {}", stderr(&o));
    assert_eq!(stdout(&o), "");
    let o = n.run(&["inspect", &name]);
    assert!(o.status.success(), "inspect: {}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["Status"], json!("Created"), "{v}");
    // `gc` leaves a created container be, though the nestor that made it is gone.
    assert!(n.run(&["gc"]).status.success());
    assert_eq!(ps_record(&n, &name).unwrap()["status"], json!("created"));
    one_error_line(
        &n.run(&["create", "--name", &name, "tools/created:v1", "true"]),
        "already in use",
    );

    let o = n
        .cmd(&["start", &name])
        .env_remove("FROM_CREATE")
        .output()
        .unwrap();
    assert!(o.status.success(), "start: {}", stderr(&o));
    assert_eq!(stdout(&o).trim(), name);
    let m = wait_exited(&n, &name);
    assert_eq!(m["status"], json!("exited"), "{m}");
    assert_eq!(m["exit_code"], json!(0), "{m}");
    let o = n.run(&["logs", &cid[..12]]);
    assert!(o.status.success(), "logs: {}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "out-of-created yes nestor busybox sample image\n"
    );
    // Started again after its exit, as Docker's `start`: the log grows.
    let o = n.run(&["start", &cid]);
    assert!(o.status.success(), "start again: {}", stderr(&o));
    assert_eq!(wait_exited(&n, &name)["exit_code"], json!(0));
    assert_eq!(
        stdout(&n.run(&["logs", &name])),
        "out-of-created yes nestor busybox sample image\n".repeat(2)
    );

    // A running container is not started twice, and is removed only with -f.
    let long = unique("created-long");
    let o = n.run(&[
        "create",
        "--name",
        &long,
        "--network",
        "none",
        "tools/created:v1",
        "sleep",
        "60",
    ]);
    assert!(o.status.success(), "create: {}", stderr(&o));
    let o = n.run(&["start", &long]);
    assert!(o.status.success(), "start: {}", stderr(&o));
    assert!(stdout(&n.run(&["ps"])).contains(&long));
    one_error_line(&n.run(&["start", &long]), "already running");
    one_error_line(&n.run(&["start", "t-no-such-container"]), "");
    let o = n.run(&["rm", "-f", &long]);
    assert!(o.status.success(), "rm -f: {}", stderr(&o));

    // A created container goes without -f; a removed one's name is free again.
    let o = n.run(&["rm", &name]);
    assert!(o.status.success(), "rm: {}", stderr(&o));
    assert!(ps_record(&n, &name).is_none());
    let o = n.run(&["create", "--name", &name, "tools/created:v1", "true"]);
    assert!(o.status.success(), "create again: {}", stderr(&o));
    let o = n.run(&["rm", &name]);
    assert!(o.status.success(), "rm a created one: {}", stderr(&o));
    assert!(ps_record(&n, &name).is_none());
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// The digest and size of the manifest (of media type `mt`) the registry holds under
/// `repo:tag`.
fn manifest_of(reg: &Registry, repo: &str, tag: &str, mt: &str) -> (String, usize) {
    let resp = http(
        reg.port,
        "GET",
        &format!("/v2/{repo}/manifests/{tag}"),
        &[&format!("Accept: {mt}")],
        b"",
    );
    let body = http_body(&resp).expect("a manifest body");
    (sha(body.as_bytes()), body.len())
}

/// A multi-platform index whose first entry is another platform's image: `pull` takes
/// linux/amd64 from it by default and the other with `--platform`; a platform the
/// index lacks, or a malformed one, is refused in one line.
#[test]
fn pull_picks_the_platform_from_an_index() {
    need!("docker-registry", "podman");
    let store = tempfile::tempdir().unwrap();
    let reg = Registry::start(store.path());
    let podman = Podman::new();
    let work = tempfile::tempdir().unwrap();
    let amd64_id = podman.push_layout(&sample_layout(), &format!("{}/multi:amd64", reg.addr()));
    let other = layout_with_big_layer(work.path(), 4096);
    let arm64_id = podman.push_layout(&other, &format!("{}/multi:arm64", reg.addr()));
    assert_ne!(amd64_id, arm64_id);
    // The same two images again as Docker's schema 2 manifests (what Docker Hub serves).
    for (id, tag) in [(&amd64_id, "amd64-v2"), (&arm64_id, "arm64-v2")] {
        let dest = format!("{}/multi:{tag}", reg.addr());
        let o = podman.run(&[
            "push",
            "-q",
            "--tls-verify=false",
            "--format",
            "v2s2",
            id,
            &dest,
        ]);
        assert!(o.status.success(), "podman push v2s2: {}", stderr(&o));
    }
    // An OCI index under `latest`, a Docker manifest list under `list`; in both the
    // first entry is the other platform's.
    for (tag, list_type, entry_type, suffix) in [
        (
            "latest",
            "application/vnd.oci.image.index.v1+json",
            OCI_MANIFEST,
            "",
        ),
        (
            "list",
            "application/vnd.docker.distribution.manifest.list.v2+json",
            DOCKER_MANIFEST,
            "-v2",
        ),
    ] {
        let entry = |arch: &str| {
            let (digest, size) = manifest_of(&reg, "multi", &format!("{arch}{suffix}"), entry_type);
            json!({
                "mediaType": entry_type,
                "digest": digest,
                "size": size,
                "platform": {"os": "linux", "architecture": arch},
            })
        };
        let index = json!({
            "schemaVersion": 2,
            "mediaType": list_type,
            "manifests": [entry("arm64"), entry("amd64")],
        });
        let put = http(
            reg.port,
            "PUT",
            &format!("/v2/multi/manifests/{tag}"),
            &[&format!("Content-Type: {list_type}")],
            &serde_json::to_vec(&index).unwrap(),
        );
        assert!(
            put.starts_with("HTTP/1.0 201") || put.starts_with("HTTP/1.1 201"),
            "{put}"
        );
    }
    // The OCI index and the Docker list, each into a store of its own.
    for image in ["multi", "multi:list"] {
        let n = Nestor::new(&[&reg.addr()]);
        let p = n.pull_json(image);
        assert_eq!(
            p["id"],
            json!(amd64_id),
            "{image}, the default platform: {p}"
        );
        let o = n.run(&[
            "run",
            "--rm",
            "--pull=never",
            image,
            "cat",
            "/etc/nestor-sample",
        ]);
        assert!(o.status.success(), "run {image}: {}", stderr(&o));
        let o = n.run(&["pull", "--json", "--platform", "linux/arm64", image]);
        assert!(
            o.status.success(),
            "pull --platform {image}: {}",
            stderr(&o)
        );
        let p: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(p["id"], json!(arm64_id), "{image}, linux/arm64: {p}");
        one_error_line(
            &n.run(&["pull", "--platform", "linux/s390x", image]),
            "linux/s390x",
        );
    }
    one_error_line(
        &Nestor::new(&[&reg.addr()]).run(&["pull", "--platform", "linux", "multi"]),
        "platform",
    );
}

/// Uploads `bytes` as a blob of `repo` (monolithic: POST, then PUT with the digest).
fn upload_blob(reg: &Registry, repo: &str, bytes: &[u8]) -> String {
    let digest = sha(bytes);
    let resp = http(
        reg.port,
        "POST",
        &format!("/v2/{repo}/blobs/uploads/"),
        &[],
        b"",
    );
    let location = resp
        .lines()
        .find_map(|l| {
            l.strip_prefix("Location: ")
                .or_else(|| l.strip_prefix("location: "))
        })
        .unwrap_or_else(|| panic!("no upload location: {resp}"))
        .trim()
        .to_string();
    let path = location
        .split_once("://")
        .map(|(_, rest)| &rest[rest.find('/').unwrap()..])
        .unwrap_or(&location);
    let sep = if path.contains('?') { '&' } else { '?' };
    let resp = http(
        reg.port,
        "PUT",
        &format!("{path}{sep}digest={digest}"),
        &["Content-Type: application/octet-stream"],
        bytes,
    );
    assert!(
        resp.starts_with("HTTP/1.0 201") || resp.starts_with("HTTP/1.1 201"),
        "blob upload: {resp}"
    );
    digest
}

/// zstd layers as registries serve them: podman pushes the sample with
/// `--compression-format zstd`, and an image gets a third layer of several zstd frames
/// with a skippable frame between them (zstd:chunked layers are built so), uploaded as
/// is; nestor pulls and runs both.
#[test]
fn pull_zstd_layers() {
    need!("docker-registry", "podman");
    let store = tempfile::tempdir().unwrap();
    let reg = Registry::start(store.path());
    let podman = Podman::new();
    // Loaded only: a gzip push to this registry first would be reused by the next push.
    let loaded = podman.load_layout(&sample_layout());
    let o = podman.run(&[
        "push",
        "-q",
        "--tls-verify=false",
        "--compression-format",
        "zstd",
        &loaded,
        &format!("{}/zst/bb:zstd", reg.addr()),
    ]);
    assert!(o.status.success(), "podman push zstd: {}", stderr(&o));
    let m: Value = serde_json::from_str(
        http_body(&http(
            reg.port,
            "GET",
            "/v2/zst/bb/manifests/zstd",
            &["Accept: application/vnd.oci.image.manifest.v1+json"],
            b"",
        ))
        .unwrap(),
    )
    .unwrap();
    assert!(
        m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["mediaType"] == json!("application/vnd.oci.image.layer.v1.tar+zstd")),
        "podman pushed zstd layers: {m}"
    );
    let n = Nestor::new(&[&reg.addr()]);
    let o = n.run(&["run", "--rm", "zst/bb:zstd", "sh", "-c", SAMPLE_CHECK]);
    assert_sample_output(&o, "nestor on podman's zstd layers");

    // A layer of two frames with a skippable one between: a.txt from the first, b.txt
    // from the second.
    let content = store.path().join("frames");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("a.txt"), "first frame\n").unwrap();
    std::fs::write(content.join("b.txt"), "second frame\n").unwrap();
    let tar = Command::new("tar")
        .args(["--owner=0", "--group=0", "-C"])
        .arg(&content)
        .args(["-cf", "-", "a.txt", "b.txt"])
        .output()
        .unwrap();
    assert!(tar.status.success());
    let plain = tar.stdout;
    let cut = 512 * 3; // inside b.txt's header block: any cut works for a stream
    let fast = ruzstd::encoding::CompressionLevel::Fastest;
    let mut layer = ruzstd::encoding::compress_to_vec(&plain[..cut], fast);
    layer.extend_from_slice(&[0x5e, 0x2a, 0x4d, 0x18, 4, 0, 0, 0, b't', b'o', b'c', b'!']);
    layer.extend_from_slice(&ruzstd::encoding::compress_to_vec(&plain[cut..], fast));
    let layer_digest = upload_blob(&reg, "zst/bb", &layer);
    let mut config: Value = serde_json::from_str(
        http_body(&http(
            reg.port,
            "GET",
            &format!(
                "/v2/zst/bb/blobs/{}",
                m["config"]["digest"].as_str().unwrap()
            ),
            &[],
            b"",
        ))
        .unwrap(),
    )
    .unwrap();
    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .unwrap()
        .push(json!(sha(&plain)));
    let cbytes = serde_json::to_vec(&config).unwrap();
    let cdigest = upload_blob(&reg, "zst/bb", &cbytes);
    let mut m2 = m.clone();
    m2["config"]["digest"] = json!(cdigest);
    m2["config"]["size"] = json!(cbytes.len());
    m2["layers"].as_array_mut().unwrap().push(json!({
        "mediaType": "application/vnd.oci.image.layer.v1.tar+zstd",
        "digest": layer_digest,
        "size": layer.len(),
    }));
    let put = http(
        reg.port,
        "PUT",
        "/v2/zst/bb/manifests/frames",
        &["Content-Type: application/vnd.oci.image.manifest.v1+json"],
        &serde_json::to_vec(&m2).unwrap(),
    );
    assert!(
        put.starts_with("HTTP/1.0 201") || put.starts_with("HTTP/1.1 201"),
        "{put}"
    );
    let o = n.run(&["run", "--rm", "zst/bb:frames", "cat", "/a.txt", "/b.txt"]);
    assert!(o.status.success(), "run: {}", stderr(&o));
    assert_eq!(stdout(&o), "first frame\nsecond frame\n");
}

/// A layer corrupted on the registry's disk is refused with one line; the store gets
/// nothing.
#[test]
fn pull_refuses_a_corrupt_blob() {
    need!("docker-registry", "podman");
    let store = tempfile::tempdir().unwrap();
    let reg = Registry::start(store.path());
    let podman = Podman::new();
    let work = tempfile::tempdir().unwrap();
    let layout = layout_with_big_layer(work.path(), 256 << 10);
    podman.push_layout(&layout, &format!("{}/big:v1", reg.addr()));
    // podman recompresses layers as it pushes: the largest blob on the registry's
    // disk is the big layer. Flip a byte in its middle, keep the size.
    let (f, big) = reg.largest_blob();
    let mut bytes = std::fs::read(&f).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&f, bytes).unwrap();

    let n = Nestor::new(&[&reg.addr()]);
    let o = n.run(&["pull", "big:v1"]);
    one_error_line(&o, "does not match its digest");
    assert!(stderr(&o).contains(&big), "{}", stderr(&o));
    assert!(n.images().is_empty());
    assert_eq!(n.layer_count(), 0);
    assert!(n.downloads().is_empty(), "{:?}", n.downloads());
}

/// The registry dies mid-download (killed by the relay in front of it): one line, no
/// image; once it is back, the next pull succeeds and takes the layers the first one
/// verified from the download cache.
#[test]
fn registry_dying_mid_pull_then_pull_again() {
    need!("docker-registry", "podman");
    let store = tempfile::tempdir().unwrap();
    let mut reg = Registry::start(store.path());
    let podman = Podman::new();
    let work = tempfile::tempdir().unwrap();
    let big = 8 << 20;
    let layout = layout_with_big_layer(work.path(), big);
    podman.push_layout(&layout, &format!("{}/big:v1", reg.addr()));
    let pid = reg.child.id() as i32;
    // Killed when 6 MiB have gone through: the small layers are done, the big one not.
    let relay = Relay::start(reg.port, 6 << 20, false, move || {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    });
    let n = Nestor::new(&[&format!("127.0.0.1:{}", relay.port)]);
    let o = n.run(&["pull", "big:v1"]);
    assert!(relay.tripped.load(Ordering::SeqCst));
    one_error_line(&o, &format!("127.0.0.1:{}", relay.port));
    assert!(n.images().is_empty());
    assert!(n.downloads().is_empty(), "{:?}", n.downloads());
    // What the first pull verified before the registry died: in the download cache, or
    // extracted. Which layers got through depends on how the parallel downloads shared
    // the relay's 6 MiB, so a loaded machine may verify none.
    let verified = n.cached_blobs() + n.layer_count();
    reg.kill();

    let reg2 = Registry::start(store.path());
    let p = n.pull_json(&format!("{}/big:v1", reg2.addr()));
    assert!(
        p["layers_reused"].as_u64().unwrap() >= (verified as u64).min(1),
        "{p} after {verified} verified"
    );
    assert_eq!(
        p["layers_reused"].as_u64().unwrap() + p["layers_downloaded"].as_u64().unwrap(),
        3,
        "{p}"
    );
    let o = n.run(&[
        "run",
        "--rm",
        &format!("{}/big:v1", reg2.addr()),
        "sh",
        "-c",
        "wc -c < /big",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), big.to_string());
}

/// nestor killed with SIGKILL mid-download: its staging stays until `gc`, which removes
/// it; nothing half-written is taken as an image or layer.
#[test]
fn kill9_mid_pull_then_gc() {
    need!("docker-registry", "podman");
    let store = tempfile::tempdir().unwrap();
    let reg = Registry::start(store.path());
    let podman = Podman::new();
    let work = tempfile::tempdir().unwrap();
    let layout = layout_with_big_layer(work.path(), 4 << 20);
    podman.push_layout(&layout, &format!("{}/big:v1", reg.addr()));
    let relay = Relay::start(reg.port, 2 << 20, true, || {});
    let n = Nestor::new(&[&format!("127.0.0.1:{}", relay.port)]);
    let mut child = n
        .cmd(&["pull", "big:v1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !relay.tripped.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        relay.tripped.load(Ordering::SeqCst),
        "the pull never got going"
    );
    std::thread::sleep(Duration::from_millis(200));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        n.downloads().len(),
        1,
        "the killed pull's staging: {:?}",
        n.downloads()
    );
    assert!(n.images().is_empty());
    let o = n.run(&["gc"]);
    assert!(o.status.success(), "gc: {}", stderr(&o));
    assert!(n.downloads().is_empty(), "{:?}", n.downloads());
    let cache = std::fs::read_dir(n.root.join("images/downloads/blobs"))
        .unwrap()
        .count();
    assert_eq!(cache, 0);
    assert_eq!(n.layer_count(), 0);
}

/// A store on a tmpfs too small for the image: one line naming the full disk, nothing
/// left but what the store had.
#[test]
fn pull_on_a_full_disk() {
    need!("docker-registry", "podman");
    let store = tempfile::tempdir().unwrap();
    let reg = Registry::start(store.path());
    let podman = Podman::new();
    let work = tempfile::tempdir().unwrap();
    let layout = layout_with_big_layer(work.path(), 6 << 20);
    podman.push_layout(&layout, &format!("{}/big:v1", reg.addr()));
    let n = Nestor::new(&[&reg.addr()]);
    std::fs::create_dir_all(&n.root).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &n.root,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=4m"),
    )
    .unwrap();
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _u = Unmount(n.root.clone());
    let o = n.run(&["pull", "big:v1"]);
    one_error_line(&o, "No space left on device");
    assert!(n.images().is_empty());
    assert!(n.downloads().is_empty(), "{:?}", n.downloads());
}

/// The manifest digest in `nestor push`'s `TAG: digest: sha256:… size: N` line.
fn pushed_digest(o: &Output) -> String {
    assert!(o.status.success(), "push: {}", stderr(o));
    let out = stdout(o);
    let d = out
        .split_whitespace()
        .skip_while(|w| *w != "digest:")
        .nth(1)
        .unwrap_or_else(|| panic!("no digest in push output: {out}"));
    assert!(d.starts_with("sha256:") && d.len() == 71, "{out}");
    d.to_string()
}

/// What the sample prints when its two layers were applied right (the whiteout hid
/// /etc/motd, the opaque dir hid the old file).
const SAMPLE_CHECK: &str = "test ! -e /etc/motd && ls /var/cache/sample && cat /etc/nestor-sample";

fn assert_sample_output(o: &Output, who: &str) {
    assert!(o.status.success(), "{who} run: {}", stderr(o));
    assert!(
        stdout(o).starts_with("new\nnestor busybox sample"),
        "{who}: {}",
        stdout(o)
    );
}

/// nestor tags and pushes the imported two-layer sample (whiteout, opaque dir) with the
/// manifest it came with; podman pulls it by the same digest and runs it, pushes it on
/// (recompressed), and a second nestor pulls and runs that. A second push sends no layer;
/// a pulled image is pushed on with its pulled manifest digest.
#[test]
fn push_to_podman_and_back() {
    need!("docker-registry", "podman");
    let store = tempfile::tempdir().unwrap();
    let reg = Registry::start(store.path());
    let layout = sample_layout();
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let layout_digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let n = Nestor::new(&[&reg.addr()]);
    let o = n.run(&["image", "import", layout.to_str().unwrap()]);
    assert!(o.status.success(), "import: {}", stderr(&o));

    let dest = format!("{}/pushed/bb:v1", reg.addr());
    let o = n.run(&["tag", "busybox", &dest]);
    assert!(o.status.success(), "tag: {}", stderr(&o));
    let names = &n.images()[0]["names"];
    assert!(names.as_array().unwrap().contains(&json!(dest)), "{names}");
    let digest = pushed_digest(&n.run(&["push", "--tls-verify=false", &dest]));
    assert_eq!(digest, layout_digest, "the image's own manifest is pushed");
    // `images --digests` shows it.
    let o = n.run(&["images", "--digests"]);
    assert!(o.status.success());
    assert!(
        stdout(&o)
            .lines()
            .any(|l| l.contains("pushed/bb") && l.contains(&digest)),
        "{}",
        stdout(&o)
    );

    let podman = Podman::new();
    let o = podman.run(&["pull", "-q", "--tls-verify=false", &dest]);
    assert!(o.status.success(), "podman pull: {}", stderr(&o));
    let o = podman.run(&["image", "inspect", "--format", "{{.Digest}}", &dest]);
    assert_eq!(stdout(&o).trim(), digest, "{}", stderr(&o));
    let o = podman.run_container(&dest, SAMPLE_CHECK);
    assert_sample_output(&o, "podman");

    let via = format!("{}/viapodman/bb:v2", reg.addr());
    let o = podman.run(&["push", "-q", "--tls-verify=false", &dest, &via]);
    assert!(o.status.success(), "podman push: {}", stderr(&o));
    let n2 = Nestor::new(&[&reg.addr()]);
    let p = n2.pull_json(&via);
    assert_eq!(p["layers_downloaded"], json!(2), "{p}");
    let o = n2.run(&["run", "--rm", &via, "sh", "-c", SAMPLE_CHECK]);
    assert_sample_output(&o, "nestor after podman");

    // The pulled image goes on with the manifest it was pulled by.
    let on = format!("{}/again/bb:v3", reg.addr());
    let o = n2.run(&["push", "--tls-verify=false", &via, &on]);
    assert_eq!(pushed_digest(&o), p["digest"].as_str().unwrap());

    // A second push finds every blob there and sends none.
    let o = n.run(&["push", "--json", "--tls-verify=false", &dest]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["layers_pushed"], json!(0), "{v}");
    assert_eq!(v["layers_existing"], json!(2), "{v}");
    assert_eq!(v["digest"], json!(digest), "{v}");

    one_error_line(
        &n.run(&["push", "--tls-verify=false", "nosuch:tag"]),
        "not found",
    );
    one_error_line(
        &n.run(&["push", "--tls-verify=false", &dest, "127.0.0.1:1/x:y"]),
        "cannot connect",
    );
    one_error_line(
        &n.run(&[
            "push",
            "--tls-verify=false",
            &dest,
            &format!("{}/x@{digest}", reg.addr()),
        ]),
        "not a digest",
    );
    one_error_line(&n.run(&["tag", "nosuch", "a:b"]), "not found");
}

/// A docker-archive (podman save) carries no manifest: nestor makes one from the kept
/// (uncompressed) layer blobs, the same bytes each time, and podman pulls and runs it.
#[test]
fn push_a_docker_archive_import() {
    need!("docker-registry", "podman");
    let store = tempfile::tempdir().unwrap();
    let reg = Registry::start(store.path());
    let podman = Podman::new();
    let src = format!("{}/src/bb:v1", reg.addr());
    let id = podman.push_layout(&sample_layout(), &src);
    let archive = podman.dir.path().join("docker.tar");
    let o = podman.run(&[
        "save",
        "--format",
        "docker-archive",
        "-o",
        archive.to_str().unwrap(),
        &id,
    ]);
    assert!(o.status.success(), "podman save: {}", stderr(&o));
    let n = Nestor::new(&[&reg.addr()]);
    let o = n.run(&[
        "image",
        "import",
        "--name",
        "fromarchive:v1",
        archive.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "import: {}", stderr(&o));

    let dest = format!("{}/fromarchive/bb:v1", reg.addr());
    let d1 = pushed_digest(&n.run(&["push", "--tls-verify=false", "fromarchive:v1", &dest]));
    let d2 = pushed_digest(&n.run(&[
        "push",
        "--tls-verify=false",
        "fromarchive:v1",
        &format!("{}/fromarchive/bb:v2", reg.addr()),
    ]));
    assert_eq!(d1, d2, "the made manifest is deterministic");
    let p2 = Podman::new();
    let o = p2.run(&["pull", "-q", "--tls-verify=false", &dest]);
    assert!(o.status.success(), "podman pull: {}", stderr(&o));
    let o = p2.run(&["image", "inspect", "--format", "{{.Digest}}", &dest]);
    assert_eq!(stdout(&o).trim(), d1);
    let o = p2.run_container(&dest, SAMPLE_CHECK);
    assert_sample_output(&o, "podman");
}

/// The store's image ids, layer directories and leftovers in `tmp/`.
fn store_state(n: &Nestor) -> (Vec<Value>, usize, usize) {
    let ids = n.images().iter().map(|i| i["id"].clone()).collect();
    let tmp = std::fs::read_dir(n.root.join("images/tmp"))
        .map(|d| d.count())
        .unwrap_or(0);
    (ids, n.layer_count(), tmp)
}

/// `save` in both formats and `load` back into another store (same id, runs); podman
/// loads nestor's docker-archive and nestor loads podman's archives (both formats);
/// bad archives are refused in one line and leave the store as it was.
#[test]
fn save_and_load_round_trips() {
    need!("podman");
    let layout = sample_layout();
    let n = Nestor::new(&[]);
    let o = n.run(&["image", "import", layout.to_str().unwrap()]);
    assert!(o.status.success(), "import: {}", stderr(&o));
    let id = n.images()[0]["id"].clone();
    let dir = n.dir.path().to_path_buf();
    for format in ["oci-archive", "docker-archive"] {
        let out = dir.join(format!("{format}.tar"));
        let o = n.run(&[
            "save",
            "-o",
            out.to_str().unwrap(),
            "--format",
            format,
            "busybox",
        ]);
        assert!(o.status.success(), "save {format}: {}", stderr(&o));
        let n2 = Nestor::new(&[]);
        let o = n2.run(&["load", "-i", out.to_str().unwrap()]);
        assert!(o.status.success(), "load {format}: {}", stderr(&o));
        assert_eq!(stdout(&o).trim(), "Loaded image: localhost/busybox:latest");
        assert_eq!(n2.images()[0]["id"], id, "{format}");
        let o = n2.run(&["run", "--rm", "busybox", "sh", "-c", SAMPLE_CHECK]);
        assert_sample_output(&o, &format!("nestor after {format}"));
        // The same image saves to the same bytes.
        let again = dir.join(format!("{format}-again.tar"));
        let o = n.run(&[
            "save",
            "-o",
            again.to_str().unwrap(),
            "--format",
            format,
            "busybox",
        ]);
        assert!(o.status.success());
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&again).unwrap());
    }

    // podman loads nestor's docker-archive (same image id) and runs it.
    let podman = Podman::new();
    let archive = dir.join("docker-archive.tar");
    let o = podman.run(&["load", "-q", "-i", archive.to_str().unwrap()]);
    assert!(o.status.success(), "podman load: {}", stderr(&o));
    let o = podman.run(&[
        "image",
        "inspect",
        "--format",
        "{{.Id}}",
        "localhost/busybox:latest",
    ]);
    assert_eq!(json!(stdout(&o).trim()), id, "{}", stderr(&o));
    let o = podman.run_container("localhost/busybox:latest", SAMPLE_CHECK);
    assert_sample_output(&o, "podman after nestor save");

    // nestor loads podman's archives.
    let o = podman.run(&["tag", "localhost/busybox:latest", "localhost/frompodman:v1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for format in ["docker-archive", "oci-archive"] {
        let out = dir.join(format!("podman-{format}.tar"));
        let o = podman.run(&[
            "save",
            "--format",
            format,
            "-o",
            out.to_str().unwrap(),
            "localhost/frompodman:v1",
        ]);
        assert!(o.status.success(), "podman save {format}: {}", stderr(&o));
        let n3 = Nestor::new(&[]);
        let o = n3.run(&["load", "-i", out.to_str().unwrap()]);
        assert!(o.status.success(), "load podman's {format}: {}", stderr(&o));
        assert!(stdout(&o).contains("frompodman"), "{}", stdout(&o));
        let o = n3.run(&["run", "--rm", "frompodman:v1", "sh", "-c", SAMPLE_CHECK]);
        assert_sample_output(&o, &format!("nestor after podman's {format}"));
    }

    // Bad archives: garbage, truncated, a corrupted layer. One line each, and the store
    // (one image, its layers) is as it was, with nothing left in tmp/.
    let before = store_state(&n);
    let good = std::fs::read(dir.join("oci-archive.tar")).unwrap();
    let garbage = dir.join("garbage.tar");
    std::fs::write(&garbage, b"this is not an archive at all").unwrap();
    let truncated = dir.join("truncated.tar");
    std::fs::write(&truncated, &good[..good.len() / 2]).unwrap();
    let corrupt = dir.join("corrupt.tar");
    let mut bad = good.clone();
    // The biggest blob (the base layer) sits in the middle of the archive.
    let mid = bad.len() / 2;
    for b in &mut bad[mid..mid + 64] {
        *b ^= 0xff;
    }
    std::fs::write(&corrupt, &bad).unwrap();
    let n4 = Nestor::new(&[]);
    let short = dir.join("short.tar");
    std::fs::write(&short, &good[..1000]).unwrap();
    // A store that has the layers does not read them again (it knows them by diff_id),
    // so the archives whose layer is cut or corrupted are refused by the empty store only.
    for (f, stores) in [
        (&garbage, vec![&n, &n4]),
        (&short, vec![&n, &n4]),
        (&truncated, vec![&n4]),
        (&corrupt, vec![&n4]),
    ] {
        for who in stores {
            let o = who.run(&["load", "-i", f.to_str().unwrap()]);
            one_error_line(&o, "");
        }
        assert_eq!(store_state(&n), before, "{}", f.display());
        let (ids, layers, tmp) = store_state(&n4);
        assert_eq!((ids.len(), layers, tmp), (0, 0, 0), "{}", f.display());
    }
    one_error_line(
        &n.run(&["save", "-o", dir.join("x.tar").to_str().unwrap(), "nosuch"]),
        "not found",
    );
    one_error_line(
        &n.run(&["save", "-o", "/nonexistent-dir/x.tar", "busybox"]),
        "cannot create",
    );
    assert!(!dir.join("x.tar").exists());
}

fn sh(script: &str) {
    let o = Command::new("sh").args(["-ec", script]).output().unwrap();
    assert!(o.status.success(), "{script}: {}", stderr(&o));
}

/// A registry behind TLS (a CA the test makes, trusted through a certs.d directory)
/// and htpasswd auth: no trust gives one certificate line; no login, one access line;
/// a wrong password, one login line and nothing stored; the right one is stored 0600
/// and push and pull use it; logout takes it away; Docker's config.json is read too.
/// The password shows in no output, at trace level either.
#[test]
fn login_tls_and_htpasswd() {
    need!("docker-registry", "htpasswd", "openssl");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let user = "nestoruser";
    let password = format!("pw-{}", unique("secret"));
    sh(&format!(
        "cd {d}
        openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=nestor-test-ca 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1 2>/dev/null
        printf 'subjectAltName=IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\nbasicConstraints=CA:FALSE\\n' > ext
        openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 2 -extfile ext 2>/dev/null
        htpasswd -Bbn {user} '{password}' > htpasswd",
        d = d.display()
    ));
    let extra = format!(
        "  tls:\n    certificate: {d}/server.crt\n    key: {d}/server.key\nauth:\n  htpasswd:\n    realm: nestor-test\n    path: {d}/htpasswd\n",
        d = d.display()
    );
    let reg = Registry::start_with(d, &extra);
    let certs = d.join("certs.d");
    std::fs::create_dir_all(certs.join(reg.addr())).unwrap();
    let auth = d.join("auth/auth.json");
    let n = Nestor::new(&["docker.io"]);
    let n2 = Nestor::new(&["docker.io"]);
    let mut seen = String::new();
    let mut run = |who: &Nestor, args: &[&str], stdin: Option<&str>| -> Output {
        let mut c = who.cmd(args);
        c.env("REGISTRY_AUTH_FILE", &auth)
            .env("NESTOR_CERTS_D", &certs)
            .env("DOCKER_CONFIG", d.join("docker"))
            .env("RUST_LOG", "trace")
            .env("NESTOR_LOG", "trace");
        let o = match stdin {
            Some(s) => {
                c.stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                let mut ch = c.spawn().unwrap();
                ch.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
                ch.wait_with_output().unwrap()
            }
            None => c.output().unwrap(),
        };
        seen.push_str(&stdout(&o));
        seen.push_str(&stderr(&o));
        o
    };
    // One line on stderr once the trace lines are left out.
    let one_line = |o: &Output, what: &str| {
        assert!(!o.status.success(), "should have failed: {}", stdout(o));
        let e = stderr(o);
        let lines: Vec<&str> = e.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(lines.len(), 1, "{e}");
        assert!(lines[0].contains(what), "{what}: {}", lines[0]);
    };

    let o = run(
        &n,
        &["image", "import", sample_layout().to_str().unwrap()],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let dest = format!("{}/secure/bb:v1", reg.addr());
    assert!(run(&n, &["tag", "busybox", &dest], None).status.success());

    // Not trusted yet.
    let pw_line = format!("{password}\n");
    let o = run(
        &n,
        &["login", "-u", user, "--password-stdin", &reg.addr()],
        Some(&pw_line),
    );
    one_line(&o, "certificate");
    // --tls-verify=false speaks TLS without checking the certificate (as podman's
    // does): the registry itself answers, and wants a login.
    one_line(
        &run(&n, &["push", "--tls-verify=false", &dest], None),
        "access denied",
    );
    std::fs::copy(d.join("ca.crt"), certs.join(reg.addr()).join("ca.crt")).unwrap();
    // Trusted, not logged in.
    one_line(&run(&n, &["push", &dest], None), "access denied");
    // A wrong password.
    let o = run(
        &n,
        &["login", "-u", user, "--password-stdin", &reg.addr()],
        Some("wrong-password\n"),
    );
    one_line(&o, "login failed");
    assert!(!auth.exists(), "nothing stored after a failed login");
    // The right one.
    // --debug, as a user would turn the logs on, besides NESTOR_LOG=trace.
    let o = run(
        &n,
        &[
            "--debug",
            "login",
            "-u",
            user,
            "--password-stdin",
            &reg.addr(),
        ],
        Some(&pw_line),
    );
    assert!(o.status.success(), "login: {}", stderr(&o));
    assert!(stdout(&o).contains("Login Succeeded"));
    assert_eq!(mode_of(&auth) & 0o777, 0o600);
    let stored = std::fs::read_to_string(&auth).unwrap();
    assert!(stored.contains(&reg.addr()) && !stored.contains(&password));
    let digest = pushed_digest(&run(&n, &["push", &dest], None));
    let o = run(&n2, &["pull", &dest], None);
    assert!(o.status.success(), "pull: {}", stderr(&o));
    let o = run(&n2, &["run", "--rm", &dest, "sh", "-c", SAMPLE_CHECK], None);
    assert_sample_output(&o, "nestor after an authenticated pull");
    let o = run(&n2, &["images", "--digests"], None);
    assert!(stdout(&o).contains(&digest), "{}", stdout(&o));

    // logout: gone, and pulls are refused again; a second logout is an error.
    let o = run(&n, &["logout", &reg.addr()], None);
    assert!(o.status.success(), "logout: {}", stderr(&o));
    assert!(!std::fs::read_to_string(&auth)
        .unwrap()
        .contains(&reg.addr()));
    one_line(
        &run(&n2, &["pull", "--quiet", &dest], None),
        "access denied",
    );
    one_line(&run(&n, &["logout", &reg.addr()], None), "not logged in");

    // Docker's config.json is read when the auth file has nothing.
    std::fs::create_dir_all(d.join("docker")).unwrap();
    let o = Command::new("sh")
        .args([
            "-c",
            &format!("printf '%s' '{user}:{password}' | base64 -w0"),
        ])
        .output()
        .unwrap();
    let b64 = stdout(&o);
    std::fs::write(
        d.join("docker/config.json"),
        json!({"auths": {reg.addr(): {"auth": b64}}}).to_string(),
    )
    .unwrap();
    let n3 = Nestor::new(&["docker.io"]);
    let o = run(&n3, &["pull", &dest], None);
    assert!(
        o.status.success(),
        "pull with docker's config: {}",
        stderr(&o)
    );

    // logout takes Docker's entry away too (nestor would go on using it), and with
    // Docker's file there, login writes both files.
    let o = run(&n3, &["logout", &reg.addr()], None);
    assert!(
        o.status.success(),
        "logout of Docker's entry: {}",
        stderr(&o)
    );
    let docker = std::fs::read_to_string(d.join("docker/config.json")).unwrap();
    assert!(!docker.contains(&reg.addr()), "{docker}");
    one_line(&run(&n3, &["pull", &dest], None), "access denied");
    let o = run(
        &n3,
        &["login", "-u", user, "--password-stdin", &reg.addr()],
        Some(&pw_line),
    );
    assert!(o.status.success(), "login: {}", stderr(&o));
    for f in [auth.clone(), d.join("docker/config.json")] {
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(text.contains(&reg.addr()), "{}: {text}", f.display());
        assert_eq!(mode_of(&f) & 0o777, 0o600, "{}", f.display());
    }
    assert!(run(&n3, &["pull", &dest], None).status.success());

    assert!(
        seen.contains("DEBUG") || seen.contains("TRACE"),
        "logs were on"
    );
    assert!(
        !seen.contains(&password),
        "the password leaked into some output"
    );
    assert!(
        !seen.contains(&b64),
        "the credentials leaked (base64) into some output"
    );
}

/// A token server for docker-registry's `auth: token:` (the Docker registry token
/// protocol), run by the test on 127.0.0.1: `GET /token?service=…&scope=…` answers with
/// a JWT (RS256, signed with `openssl dgst` by a key whose self-signed certificate is
/// the registry's `rootcertbundle` and rides in the token's `x5c`). A request with the
/// right basic credentials gets every action it asks for; a wrong password gets 401;
/// an anonymous one gets `pull` on `public/*` only. Every token it issued is kept, so
/// the test can look for them in nestor's output.
struct TokenServer {
    port: u16,
    stop: Arc<AtomicBool>,
    issued: Arc<std::sync::Mutex<Vec<String>>>,
    anonymous: Arc<AtomicU64>,
    authenticated: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const TOKEN_ISSUER: &str = "nestor-test-issuer";
const TOKEN_SERVICE: &str = "nestor-test-registry";

fn b64url(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("00");
                out.push(u8::from_str_radix(h, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl TokenServer {
    fn start(dir: &Path, user: &str, password: &str) -> TokenServer {
        use base64::Engine;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let der = std::fs::read(dir.join("token.der")).unwrap();
        let x5c = base64::engine::general_purpose::STANDARD.encode(der);
        let key = dir.join("token.key");
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let stop = Arc::new(AtomicBool::new(false));
        let issued = Arc::new(std::sync::Mutex::new(Vec::new()));
        let anonymous = Arc::new(AtomicU64::new(0));
        let authenticated = Arc::new(AtomicU64::new(0));
        let (st, iss, an, au) = (
            stop.clone(),
            issued.clone(),
            anonymous.clone(),
            authenticated.clone(),
        );
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut s) = conn else { continue };
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let req = String::from_utf8_lossy(&req).into_owned();
                let target = req.split_whitespace().nth(1).unwrap_or("").to_string();
                let auth = req.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("authorization")
                        .then(|| v.trim().to_string())
                });
                let query = target.split_once('?').map(|x| x.1).unwrap_or("");
                let mut service = String::new();
                let mut scopes = Vec::new();
                for kv in query.split('&') {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    match k {
                        "service" => service = url_decode(v),
                        "scope" => scopes.push(url_decode(v)),
                        _ => {}
                    }
                }
                let anon = auth.is_none();
                let reply = |s: &mut TcpStream, status: &str, body: &str| {
                    let _ = s.write_all(
                        format!(
                            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    );
                };
                if !anon && auth.as_deref() != Some(expected.as_str()) {
                    reply(
                        &mut s,
                        "401 Unauthorized",
                        r#"{"details":"wrong credentials"}"#,
                    );
                    continue;
                }
                if anon {
                    an.fetch_add(1, Ordering::SeqCst);
                } else {
                    au.fetch_add(1, Ordering::SeqCst);
                }
                // scope: repository:NAME:ACTION[,ACTION]
                let mut access = Vec::new();
                for sc in &scopes {
                    let mut parts = sc.splitn(3, ':');
                    let (Some(t), Some(name), Some(actions)) =
                        (parts.next(), parts.next(), parts.next())
                    else {
                        continue;
                    };
                    let actions: Vec<&str> = actions
                        .split(',')
                        .filter(|a| !anon || (*a == "pull" && name.starts_with("public/")))
                        .collect();
                    access.push(json!({"type": t, "name": name, "actions": actions}));
                }
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                let header = json!({"alg": "RS256", "typ": "JWT", "x5c": [x5c]});
                let claims = json!({
                    "iss": TOKEN_ISSUER,
                    "sub": if anon { "" } else { "nestoruser" },
                    "aud": service,
                    "exp": now + 300,
                    "nbf": now - 30,
                    "iat": now - 30,
                    "jti": unique("jti"),
                    "access": access,
                });
                let signing_input = format!(
                    "{}.{}",
                    b64url(header.to_string().as_bytes()),
                    b64url(claims.to_string().as_bytes())
                );
                let mut child = Command::new("openssl")
                    .args(["dgst", "-sha256", "-sign"])
                    .arg(&key)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(signing_input.as_bytes())
                    .unwrap();
                let sig = child.wait_with_output().unwrap().stdout;
                let token = format!("{signing_input}.{}", b64url(&sig));
                iss.lock().unwrap().push(token.clone());
                reply(
                    &mut s,
                    "200 OK",
                    &json!({"token": token, "access_token": token, "expires_in": 300}).to_string(),
                );
            }
        });
        TokenServer {
            port,
            stop,
            issued,
            anonymous,
            authenticated,
            thread: Some(thread),
        }
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// docker-registry with `auth: token:` and the test's token server: an anonymous pull
/// of a public repository goes through the anonymous token flow; an anonymous push, and
/// an anonymous pull of a private one, are one access line; a wrong password is one
/// login line and stores nothing; with the right one, nestor pushes (bearer tokens for
/// pull,push) and another store pulls and runs the image. No token the server issued,
/// and not the password, shows in any output at trace level.
#[test]
fn bearer_token_auth() {
    need!("docker-registry", "openssl");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let user = "nestoruser";
    let password = format!("pw-{}", unique("token"));
    sh(&format!(
        "cd {d}
        openssl req -x509 -newkey rsa:2048 -nodes -keyout token.key -out token.crt -days 2 -subj /CN=nestor-token-issuer 2>/dev/null
        openssl x509 -in token.crt -outform DER -out token.der",
        d = d.display()
    ));
    let ts = TokenServer::start(d, user, &password);
    let extra = format!(
        "auth:\n  token:\n    realm: http://127.0.0.1:{}/token\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}/token.crt\n",
        ts.port,
        d.display()
    );
    let reg = Registry::start_with(d, &extra);
    let auth = d.join("auth/auth.json");
    let no_auth = d.join("auth/none.json");
    let n = Nestor::new(&["docker.io"]);
    let n2 = Nestor::new(&["docker.io"]);
    let mut seen = String::new();
    let mut run = |who: &Nestor, args: &[&str], stdin: Option<&str>, file: &Path| -> Output {
        let mut c = who.cmd(args);
        c.env("REGISTRY_AUTH_FILE", file)
            .env("DOCKER_CONFIG", d.join("docker"))
            .env("RUST_LOG", "trace")
            .env("NESTOR_LOG", "trace");
        let o = match stdin {
            Some(s) => {
                c.stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                let mut ch = c.spawn().unwrap();
                ch.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
                ch.wait_with_output().unwrap()
            }
            None => c.output().unwrap(),
        };
        seen.push_str(&stdout(&o));
        seen.push_str(&stderr(&o));
        o
    };
    let one_line = |o: &Output, what: &str| {
        assert!(!o.status.success(), "should have failed: {}", stdout(o));
        let e = stderr(o);
        let lines: Vec<&str> = e.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(lines.len(), 1, "{e}");
        assert!(lines[0].contains(what), "{what}: {}", lines[0]);
    };
    let tls = "--tls-verify=false";
    let o = run(
        &n,
        &["image", "import", sample_layout().to_str().unwrap()],
        None,
        &auth,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let public = format!("{}/public/bb:v1", reg.addr());
    let private = format!("{}/private/bb:v1", reg.addr());
    for dest in [&public, &private] {
        assert!(run(&n, &["tag", "busybox", dest], None, &auth)
            .status
            .success());
    }

    // Anonymous: the registry asks for a token, the server gives one without push.
    one_line(
        &run(&n, &["push", tls, &public], None, &auth),
        "access denied",
    );
    assert!(
        ts.anonymous.load(Ordering::SeqCst) > 0,
        "anonymous token flow used"
    );
    // A wrong password: one line, nothing stored.
    let o = run(
        &n,
        &["login", tls, "-u", user, "--password-stdin", &reg.addr()],
        Some("wrong-password\n"),
        &auth,
    );
    one_line(&o, "login failed");
    assert!(!auth.exists(), "nothing stored after a failed login");
    let o = run(
        &n,
        &["login", tls, "-u", user, "--password-stdin", &reg.addr()],
        Some(&format!("{password}\n")),
        &auth,
    );
    assert!(o.status.success(), "login: {}", stderr(&o));
    assert!(ts.authenticated.load(Ordering::SeqCst) > 0);
    let dpub = pushed_digest(&run(&n, &["push", tls, &public], None, &auth));
    let dpriv = pushed_digest(&run(&n, &["push", tls, &private], None, &auth));
    assert_eq!(dpub, dpriv, "same image, same manifest");

    // Another store, no credentials: public pulls, private is refused.
    let o = run(&n2, &["pull", tls, &public], None, &no_auth);
    assert!(o.status.success(), "anonymous pull: {}", stderr(&o));
    one_line(
        &run(&n2, &["pull", "--quiet", tls, &private], None, &no_auth),
        "access denied",
    );
    // Wrong stored credentials: the token server refuses them, one line.
    let wrong = d.join("auth/wrong.json");
    let b64 = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:not-{password}"))
    };
    std::fs::write(
        &wrong,
        json!({"auths": {reg.addr(): {"auth": b64}}}).to_string(),
    )
    .unwrap();
    one_line(
        &run(&n2, &["pull", "--quiet", tls, &private], None, &wrong),
        "access denied",
    );
    // With them, private pulls and runs.
    let o = run(&n2, &["pull", tls, &private], None, &auth);
    assert!(o.status.success(), "pull with a token: {}", stderr(&o));
    let o = run(
        &n2,
        &[
            "run",
            "--rm",
            "--pull",
            "never",
            &private,
            "sh",
            "-c",
            SAMPLE_CHECK,
        ],
        None,
        &auth,
    );
    assert_sample_output(&o, "nestor after a pull with a bearer token");
    let o = run(&n2, &["images", "--digests"], None, &auth);
    assert!(stdout(&o).contains(&dpriv), "{}", stdout(&o));

    let issued = ts.issued.lock().unwrap().clone();
    assert!(!issued.is_empty());
    assert!(
        seen.contains("DEBUG") || seen.contains("TRACE"),
        "logs were on"
    );
    assert!(
        !seen.contains(&password),
        "the password leaked into some output"
    );
    for t in &issued {
        // The signature part alone is unique to the token.
        let sig = t.rsplit('.').next().unwrap();
        assert!(
            !seen.contains(sig),
            "a bearer token leaked into some output"
        );
    }
}

/// `login` on a terminal (a pty the test holds, nestor's controlling terminal) asks
/// for the user name and the password, the password with echo off: what was typed is
/// stored, and the password shows nowhere on the terminal. Off a terminal, a missing
/// user name or password is one error line.
#[test]
fn login_prompts_on_a_terminal() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    need!("docker-registry");
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(dir.path());
    let n = Nestor::new(&["docker.io"]);
    let auth = dir.path().join("auth.json");
    let user = "promptuser";
    let password = format!("pw-{}", unique("typed"));

    // Off a terminal: one line each, nothing stored.
    let o = n
        .cmd(&["login", "--tls-verify=false", &reg.addr()])
        .env("REGISTRY_AUTH_FILE", &auth)
        .output()
        .unwrap();
    one_error_line(&o, "-u USER");
    let o = n
        .cmd(&["login", "--tls-verify=false", "-u", user, &reg.addr()])
        .env("REGISTRY_AUTH_FILE", &auth)
        .output()
        .unwrap();
    one_error_line(&o, "--password-stdin");
    assert!(!auth.exists());

    // On a terminal.
    let pty = nix::pty::openpty(None, None).unwrap();
    for fd in [pty.master.as_raw_fd(), pty.slave.as_raw_fd()] {
        // Other tests fork meanwhile: their children must not keep the pty.
        nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .unwrap();
    }
    let master = std::fs::File::from(pty.master);
    let slave = pty.slave;
    let mut c = n.cmd(&["login", "--tls-verify=false", &reg.addr()]);
    c.env("REGISTRY_AUTH_FILE", &auth)
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave));
    // SAFETY: between fork and exec only async-signal-safe calls: setsid and the ioctl
    // that makes the pty (fd 0) the controlling terminal.
    unsafe {
        c.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = c.spawn().unwrap();
    drop(c);
    let screen = Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let screen = screen.clone();
        let mut m = master.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok(k) = m.read(&mut buf) {
                if k == 0 {
                    break;
                }
                screen
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..k]));
            }
        })
    };
    let wait_for = |what: &dyn Fn(&str) -> bool, label: &str| {
        let t0 = Instant::now();
        while !what(&screen.lock().unwrap()) {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "no {label} on the terminal: {:?}",
                screen.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut m = master.try_clone().unwrap();
    wait_for(&|s| s.contains("Username:"), "user name prompt");
    m.write_all(format!("{user}\n").as_bytes()).unwrap();
    wait_for(&|s| s.contains("Password:"), "password prompt");
    // Type only once echo is off, as a person would after the prompt.
    let t0 = Instant::now();
    loop {
        let t = nix::sys::termios::tcgetattr(&master).unwrap();
        if !t.local_flags.contains(nix::sys::termios::LocalFlags::ECHO) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "echo never went off"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    m.write_all(format!("{password}\n").as_bytes()).unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("login hung: {:?}", screen.lock().unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // The reader ends when the last holder of the slave (nestor) is gone; it is not
    // waited for beyond the line nestor prints last.
    let t0 = Instant::now();
    while !reader.is_finished()
        && !screen.lock().unwrap().contains("Login Succeeded")
        && t0.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let screen = screen.lock().unwrap().clone();
    assert!(status.success(), "login on a terminal: {screen}");
    assert!(screen.contains("Login Succeeded"), "{screen}");
    assert!(screen.contains(user), "the user name is echoed: {screen}");
    assert!(
        !screen.contains(&password),
        "the password was echoed: {screen}"
    );
    let stored = std::fs::read_to_string(&auth).unwrap();
    let want = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    };
    assert!(stored.contains(&want), "what was typed is stored: {stored}");
}

/// Runs `cmd` with stderr (and stdout, when `stdout_too`; else a pipe) on a fresh pty;
/// what the terminal showed, once it exits (at most 60 s).
fn on_pty(mut c: Command, stdout_too: bool) -> (std::process::ExitStatus, String) {
    use std::os::fd::AsRawFd;
    let pty = nix::pty::openpty(None, None).unwrap();
    for fd in [pty.master.as_raw_fd(), pty.slave.as_raw_fd()] {
        // Other tests fork meanwhile: their children must not keep the pty.
        nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .unwrap();
    }
    let mut master = std::fs::File::from(pty.master);
    let slave = pty.slave;
    c.stderr(Stdio::from(slave.try_clone().unwrap()));
    if stdout_too {
        c.stdout(Stdio::from(slave));
    } else {
        c.stdout(Stdio::piped());
        drop(slave);
    }
    let mut child = c.spawn().unwrap();
    drop(c);
    let reader = std::thread::spawn(move || {
        let mut screen = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once the last holder of the slave is gone.
        while let Ok(k @ 1..) = master.read(&mut buf) {
            screen.extend_from_slice(&buf[..k]);
        }
        String::from_utf8_lossy(&screen).into_owned()
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no exit within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, reader.join().unwrap())
}

/// On a terminal a pull draws a bar per layer (its digest, bytes and rate) on stderr;
/// with stdout not a terminal it draws none.
#[test]
fn pull_shows_progress_only_on_a_terminal() {
    need!("docker-registry", "podman");
    let store = tempfile::tempdir().unwrap();
    let reg = Registry::start(store.path());
    let podman = Podman::new();
    let work = tempfile::tempdir().unwrap();
    let layout = layout_with_big_layer(work.path(), 16 << 20);
    let dest = format!("{}/progress/big:v1", reg.addr());
    podman.push_layout(&layout, &dest);
    let (_, big) = reg.largest_blob();
    let short = &big["sha256:".len().."sha256:".len() + 12];

    let n = Nestor::new(&[&reg.addr()]);
    let (status, screen) = on_pty(n.cmd(&["pull", "--tls-verify=false", &dest]), true);
    assert!(status.success(), "pull on a terminal: {screen}");
    assert!(
        screen.contains(short),
        "no bar for layer {short}: {screen:?}"
    );
    assert!(screen.contains("/s"), "no rate: {screen:?}");
    assert!(screen.contains("pulled "), "no summary: {screen:?}");

    let quiet = Nestor::new(&[&reg.addr()]);
    let (status, screen) = on_pty(quiet.cmd(&["pull", "--tls-verify=false", &dest]), false);
    assert!(status.success(), "pull piped: {screen}");
    assert!(
        !screen.contains(short) && !screen.contains("/s"),
        "bars with stdout not a terminal: {screen:?}"
    );
    assert_eq!(quiet.images().len(), 1, "the piped pull stored the image");
}
