//! Credentials and trust for registries, shared with podman and Docker. Owns the auth
//! file (podman's `$XDG_RUNTIME_DIR/containers/auth.json`, `$REGISTRY_AUTH_FILE` when
//! set) and Docker's (`~/.docker/config.json`, or `$DOCKER_CONFIG/config.json`), both
//! `{"auths": {"HOST[:PORT]": {"auth": base64("user:password")}}}`: read in that order;
//! `login` writes podman's, and Docker's too when that file exists and leaves
//! credentials to no helper (`credsStore`, `credHelpers`); `logout` removes the entry
//! from both. Files are written 0600 under a temporary name and renamed, other entries
//! and keys kept; and the per-registry CA
//! certificates of containers' `certs.d` (`/etc/containers/certs.d/HOST[:PORT]/*.crt`,
//! or `$NESTOR_CERTS_D/HOST[:PORT]/*.crt`), added to the platform's roots.
//!
//! Passwords are never logged or shown: the client's `RegistryAuth` prints only the
//! user name, and nothing here formats a password.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use oci_client::client::{Certificate, CertificateEncoding};
use oci_client::secrets::RegistryAuth;
use serde_json::{json, Value};

use crate::RegistryError;

/// The file `login` writes and pull/push read first.
pub fn auth_file() -> PathBuf {
    if let Some(p) = std::env::var_os("REGISTRY_AUTH_FILE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|p| !p.is_empty()) {
        Some(d) => PathBuf::from(d).join("containers/auth.json"),
        None => PathBuf::from(format!(
            "/run/containers/{}/auth.json",
            nix::unistd::getuid()
        )),
    }
}

/// Docker's config file, read when the auth file has no entry.
fn docker_config() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// The keys an entry for `registry` may have (Docker Hub's legacy URL too).
fn keys(registry: &str) -> Vec<String> {
    let mut k = vec![registry.to_string(), format!("https://{registry}")];
    if registry == "docker.io" {
        k.push("https://index.docker.io/v1/".into());
        k.push("index.docker.io".into());
    }
    k
}

fn read_json(p: &Path) -> Result<Option<Value>, RegistryError> {
    match fs::read(p) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| RegistryError::Config {
                path: p.to_path_buf(),
                reason: format!("not a valid auth file: {e}"),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(RegistryError::Io {
            context: format!("cannot read {}", p.display()),
            source: e,
        }),
    }
}

fn decode(p: &Path, entry: &Value) -> Result<Option<(String, String)>, RegistryError> {
    let Some(a) = entry["auth"].as_str().filter(|a| !a.is_empty()) else {
        return Ok(None);
    };
    let bad = || RegistryError::Config {
        path: p.to_path_buf(),
        reason: "an \"auth\" entry is not base64 of USER:PASSWORD".into(),
    };
    let raw = base64::engine::general_purpose::STANDARD
        .decode(a.trim())
        .map_err(|_| bad())?;
    let s = String::from_utf8(raw).map_err(|_| bad())?;
    let (u, p) = s.split_once(':').ok_or_else(bad)?;
    Ok(Some((u.to_string(), p.to_string())))
}

/// The user and password stored for `registry`, from the auth file, else Docker's.
pub fn credentials(registry: &str) -> Result<Option<(String, String)>, RegistryError> {
    for p in [Some(auth_file()), docker_config()].into_iter().flatten() {
        if let Some(v) = read_json(&p)? {
            for k in keys(registry) {
                if let Some(c) = decode(&p, &v["auths"][&k])? {
                    tracing::debug!(registry, file = %p.display(), "using stored credentials");
                    return Ok(Some(c));
                }
            }
        }
    }
    Ok(None)
}

/// What the client sends `registry`: its stored credentials, else nothing.
pub fn registry_auth(registry: &str) -> Result<RegistryAuth, RegistryError> {
    Ok(match credentials(registry)? {
        Some((u, p)) => RegistryAuth::Basic(u, p),
        None => RegistryAuth::Anonymous,
    })
}

fn write_auth_file(p: &Path, v: &Value) -> Result<(), RegistryError> {
    let io_err = |e: io::Error| RegistryError::Io {
        context: format!("cannot write {}", p.display()),
        source: e,
    };
    if let Some(dir) = p.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err)?;
    }
    let tmp = p.with_extension(format!("tmp-{}", std::process::id()));
    let res = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(
            serde_json::to_string_pretty(v)
                .unwrap_or_default()
                .as_bytes(),
        )?;
        f.sync_all()?;
        fs::rename(&tmp, p)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res.map_err(io_err)
}

/// Stores `user`/`password` for `registry` in the auth file, and in Docker's config
/// file when it exists and no credential helper holds `registry`'s credentials there;
/// returns the files written.
pub fn store(registry: &str, user: &str, password: &str) -> Result<Vec<PathBuf>, RegistryError> {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let put = |v: &mut Value| {
        if !v["auths"].is_object() {
            v["auths"] = json!({});
        }
        v["auths"][registry] = json!({ "auth": token });
    };
    let p = auth_file();
    let mut v = read_json(&p)?
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}));
    put(&mut v);
    write_auth_file(&p, &v)?;
    let mut written = vec![p];
    if let Some(d) = docker_config().filter(|d| !written.contains(d)) {
        if let Some(mut v) = read_json(&d)?.filter(Value::is_object) {
            let helper = v["credsStore"].is_string() || v["credHelpers"][registry].is_string();
            if helper {
                tracing::debug!(file = %d.display(), "Docker's credential helper holds them: left alone");
            } else {
                put(&mut v);
                write_auth_file(&d, &v)?;
                written.push(d);
            }
        }
    }
    Ok(written)
}

/// Removes `registry`'s entries from the auth file and from Docker's config file.
/// Returns whether there was one.
pub fn remove(registry: &str) -> Result<bool, RegistryError> {
    let mut found = false;
    for p in [Some(auth_file()), docker_config()].into_iter().flatten() {
        let Some(mut v) = read_json(&p)? else {
            continue;
        };
        let mut here = false;
        if let Some(auths) = v["auths"].as_object_mut() {
            for k in keys(registry) {
                here |= auths.remove(&k).is_some();
            }
        }
        if here {
            write_auth_file(&p, &v)?;
        }
        found |= here;
    }
    Ok(found)
}

/// The CA certificates `certs.d` has for `registry` (`*.crt`, PEM).
pub fn registry_cas(registry: &str) -> Result<Vec<Certificate>, RegistryError> {
    let base = std::env::var_os("NESTOR_CERTS_D")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/containers/certs.d"));
    if registry.contains('/') || registry.starts_with('.') {
        return Ok(Vec::new());
    }
    let dir = base.join(registry);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(RegistryError::Io {
                context: format!("cannot read {}", dir.display()),
                source: e,
            })
        }
    };
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "crt"))
        .collect();
    files.sort();
    for f in files {
        let data = fs::read(&f).map_err(|e| RegistryError::Io {
            context: format!("cannot read {}", f.display()),
            source: e,
        })?;
        tracing::debug!(registry, file = %f.display(), "trusting CA");
        out.push(Certificate {
            encoding: CertificateEncoding::Pem,
            data,
        });
    }
    Ok(out)
}

/// `registry` as an auth-file key: `HOST[:PORT]`, a leading `https://`/`http://` and a
/// trailing `/` dropped.
pub fn normalize_registry(registry: &str) -> Result<String, RegistryError> {
    let r = registry
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/');
    if r.is_empty()
        || r.contains('/')
        || !r
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
    {
        return Err(RegistryError::BadReference {
            reference: registry.to_string(),
            reason: "a registry is HOST[:PORT]".into(),
        });
    }
    Ok(r.to_string())
}

/// `login`: checks `user`/`password` against `registry` (a request that needs them),
/// then stores them. Returns the auth file's path.
pub fn login(
    registry: &str,
    user: &str,
    password: &str,
    tls_verify: Option<bool>,
) -> Result<Vec<PathBuf>, RegistryError> {
    let registry = normalize_registry(registry)?;
    if user.is_empty() || user.contains(':') {
        return Err(RegistryError::BadReference {
            reference: user.to_string(),
            reason: "a user name is not empty and has no ':'".into(),
        });
    }
    let conf = crate::RegistriesConf::load()?;
    let client = crate::pull::client_for(&registry, &conf, tls_verify)?;
    let r = crate::ImageRef::parse_qualified(&format!("{registry}/nestor-login-check:latest"))?;
    let auth = RegistryAuth::Basic(user.to_string(), password.to_string());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RegistryError::Io {
            context: "cannot start the network runtime".into(),
            source: e,
        })?;
    let res = rt.block_on(async {
        client
            .auth(&r.to_oci(), &auth, oci_client::RegistryOperation::Pull)
            .await?;
        client.list_tags(&r.to_oci(), &auth, Some(1), None).await
    });
    match res.map_err(|e| crate::pull::map_oci(e, &r)) {
        Ok(_) | Err(RegistryError::NotFound { .. }) => {}
        Err(RegistryError::Unauthorized { registry }) => {
            return Err(RegistryError::LoginFailed { registry })
        }
        Err(e) => return Err(e),
    }
    store(&registry, user, password)
}
