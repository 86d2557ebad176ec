//! The registry verbs: `pull` (and the pull that `run`/`create` do for a missing
//! image). The protocol lives in `nestor_registry`; this module turns flags into its
//! options and its results into output.

use std::io::IsTerminal;

use anyhow::Result;

use super::store;

/// `--tls-verify` and `--platform`, shared by the verbs that talk to a registry.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RegistryOpts {
    /// Verify the registry's TLS certificate; `--tls-verify=false` speaks plain HTTP
    /// (a local registry).
    #[arg(long = "tls-verify", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub tls_verify: Option<bool>,
}

/// `nestor pull REF`: prints the image id on stdout; per-layer progress on a terminal.
pub fn pull(
    reference: &str,
    platform: Option<&str>,
    quiet: bool,
    opts: &RegistryOpts,
) -> Result<()> {
    let p = pull_image(reference, platform, quiet, opts)?;
    println!("{}", p.image.id);
    Ok(())
}

/// Pulls `reference` into the store; a summary line on stderr unless `quiet` or stderr
/// is not a terminal.
pub fn pull_image(
    reference: &str,
    platform: Option<&str>,
    quiet: bool,
    opts: &RegistryOpts,
) -> Result<nestor_registry::Pulled> {
    let images = store::image_store()?;
    let tty = std::io::stderr().is_terminal();
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
        eprintln!(
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
