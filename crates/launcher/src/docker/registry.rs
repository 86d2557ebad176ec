//! The registry verbs: `pull` (and the pull that `run`/`create` do for a missing
//! image), `push`, `login` and `logout`. The protocol lives in `nestor_registry`; this module turns flags into its
//! options and its results into output.

use std::io::IsTerminal;

use anyhow::Result;

use super::store;

// `--tls-verify` and `--platform`, shared by the verbs that talk to a registry.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RegistryOpts {
    /// Verify the registry's TLS certificate; `--tls-verify=false` speaks plain HTTP
    /// (a local registry).
    #[arg(long = "tls-verify", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub tls_verify: Option<bool>,
}

/// `nestor pull REF`: prints the image id (or `--json`) on stdout; per-layer progress
/// on a terminal.
pub fn pull(
    reference: &str,
    platform: Option<&str>,
    quiet: bool,
    json: bool,
    opts: &RegistryOpts,
) -> Result<()> {
    let p = pull_image(reference, platform, quiet || json, opts)?;
    if json {
        let v = serde_json::json!({
            "reference": p.reference.to_string(),
            "digest": p.digest,
            "id": p.image.id,
            "names": p.image.names,
            "layers_downloaded": p.layers_downloaded,
            "bytes_downloaded": p.bytes_downloaded,
            "layers_reused": p.layers_reused,
        });
        println_lossy!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println_lossy!("{}", p.image.id);
    }
    Ok(())
}

/// `nestor push SOURCE [DEST]`: per-layer progress on a terminal; on stdout Docker's
/// `TAG: digest: sha256:… size: N` line (or `--json`).
pub fn push(
    source: &str,
    dest: Option<&str>,
    quiet: bool,
    json: bool,
    opts: &RegistryOpts,
) -> Result<()> {
    let images = store::image_store()?;
    // Progress and summaries go to stderr, and only while stdout is a terminal too:
    // `pull … > file` or a pipe is quiet, as podman's is.
    let tty = std::io::stderr().is_terminal() && std::io::stdout().is_terminal();
    let p = nestor_registry::push(
        &images,
        source,
        dest,
        &nestor_registry::PushOptions {
            tls_verify: opts.tls_verify,
            progress: !quiet && !json && tty,
        },
    )?;
    tracing::info!(
        reference = %p.reference,
        digest = %p.digest,
        pushed = p.layers_pushed,
        bytes = p.bytes_pushed,
        existing = p.layers_existing,
        "pushed"
    );
    if json {
        let v = serde_json::json!({
            "reference": p.reference.to_string(),
            "digest": p.digest,
            "size": p.size,
            "layers_pushed": p.layers_pushed,
            "bytes_pushed": p.bytes_pushed,
            "layers_existing": p.layers_existing,
        });
        println_lossy!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if !quiet && tty {
        eprintln_lossy!(
            "pushed {}: {} layers uploaded ({}), {} already there",
            p.reference,
            p.layers_pushed,
            nestor_image::human_size(p.bytes_pushed),
            p.layers_existing
        );
    }
    println_lossy!(
        "{}: digest: {} size: {}",
        p.reference.tag.as_deref().unwrap_or("latest"),
        p.digest,
        p.size
    );
    Ok(())
}

/// `nestor login [-u USER] [-p PASS | --password-stdin] REGISTRY`: prints
/// `Login Succeeded!` when the registry accepts the credentials, which are then stored.
/// On a terminal, a missing user name and password are asked for (the password is not
/// echoed), as Docker and podman do; off a terminal they must be given.
pub fn login(
    registry: &str,
    user: Option<&str>,
    password: Option<&str>,
    password_stdin: bool,
    opts: &RegistryOpts,
) -> Result<()> {
    let tty = std::io::stdin().is_terminal();
    let user = match user {
        Some(u) => u.to_string(),
        None if tty && !password_stdin => {
            eprint!("Username: ");
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .map_err(|e| anyhow::anyhow!("cannot read the user name: {e}"))?;
            line.trim().to_string()
        }
        None => {
            anyhow::bail!("give the user name with -u USER (stdin is not a terminal to ask on)")
        }
    };
    let password = match (password, password_stdin) {
        (Some(_), true) => anyhow::bail!("--password and --password-stdin are exclusive"),
        (Some(p), false) => p.to_string(),
        (None, true) => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .map_err(|e| anyhow::anyhow!("cannot read the password from stdin: {e}"))?;
            line.trim_end_matches(['\n', '\r']).to_string()
        }
        (None, false) if tty => rpassword::prompt_password("Password: ")
            .map_err(|e| anyhow::anyhow!("cannot read the password from the terminal: {e}"))?,
        (None, false) => anyhow::bail!(
            "give the password with --password-stdin (stdin is not a terminal to ask on)"
        ),
    };
    if password.is_empty() {
        anyhow::bail!("the password is empty");
    }
    let files = nestor_registry::auth::login(registry, &user, &password, opts.tls_verify)?;
    for file in &files {
        tracing::info!(registry, file = %file.display(), "credentials stored");
    }
    println_lossy!("Login Succeeded!");
    Ok(())
}

/// `nestor logout REGISTRY`.
pub fn logout(registry: &str) -> Result<()> {
    let r = nestor_registry::auth::normalize_registry(registry)?;
    if !nestor_registry::auth::remove(&r)? {
        anyhow::bail!(
            "not logged in to {r} (no entry in {} or Docker's config.json)",
            nestor_registry::auth::auth_file().display()
        );
    }
    println_lossy!("Removed login credentials for {r}");
    Ok(())
}

/// Pulls `reference` into the store; per-layer progress and a summary line on stderr
/// unless `quiet` or stdout or stderr is not a terminal.
pub fn pull_image(
    reference: &str,
    platform: Option<&str>,
    quiet: bool,
    opts: &RegistryOpts,
) -> Result<nestor_registry::Pulled> {
    let images = store::image_store()?;
    let tty = std::io::stderr().is_terminal() && std::io::stdout().is_terminal();
    let p = nestor_registry::pull(
        &images,
        reference,
        &nestor_registry::PullOptions {
            platform: platform.map(str::to_string),
            tls_verify: opts.tls_verify,
            progress: !quiet && tty,
        },
    )?;
    tracing::info!(
        reference = %p.reference,
        digest = %p.digest,
        downloaded = p.layers_downloaded,
        bytes = p.bytes_downloaded,
        reused = p.layers_reused,
        "pulled"
    );
    if !quiet && tty {
        eprintln_lossy!(
            "pulled {} ({}): {} layers downloaded ({}), {} reused",
            p.reference,
            p.digest,
            p.layers_downloaded,
            nestor_image::human_size(p.bytes_downloaded),
            p.layers_reused
        );
    }
    Ok(p)
}

/// The image `run` uses: from the store, pulled first as `--pull` says (`missing` by
/// default: only when the store has no image of that name).
pub fn image_for_run(
    images: &nestor_image::ImageStore,
    reference: &str,
    ctr: &crate::cli::ContainerOpts,
) -> Result<nestor_image::Image> {
    use crate::cli::PullPolicy;
    let opts = RegistryOpts {
        tls_verify: ctr.tls_verify,
    };
    let policy = ctr.pull.unwrap_or_default();
    if policy != PullPolicy::Always {
        match images.get(reference) {
            Ok(i) => return Ok(i),
            Err(nestor_image::ImageError::NotFound(_)) if policy == PullPolicy::Missing => {}
            Err(e @ nestor_image::ImageError::NotFound(_)) => {
                anyhow::bail!("{e} (--pull=never: pull it with `nestor pull` or import it with `nestor image import PATH`)")
            }
            Err(e) => return Err(e.into()),
        }
    }
    let p = match pull_image(reference, ctr.platform.as_deref(), false, &opts) {
        Ok(p) => p,
        Err(e) if policy == PullPolicy::Missing => {
            anyhow::bail!("image '{reference}' not found locally, and pulling it failed: {e:#}")
        }
        Err(e) => return Err(e),
    };
    Ok(images.get(&p.image.id)?)
}
