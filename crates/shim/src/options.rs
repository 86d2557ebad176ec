//! How a container is to be run, from what containerd sends with Create:
//!
//! - the runtime options, in one of the two types containerd attaches: runc's `Options`
//!   (`BinaryName`, `Root`; what `ctr --runc-binary` and a runc-typed config send) or
//!   the CRI plugin's generic `runtimeoptions.v1.Options`, whose `ConfigPath` names a
//!   TOML file of this shim's own (the CRI plugin passes only `TypeUrl` and
//!   `ConfigPath` to a runtime that is not runc, as Kata's shims get theirs);
//! - the annotation [`MODE_ANNOTATION`] in the bundle's config.json (`ctr run
//!   --annotation nestor.io/mode=vm`, or a pod annotation the CRI plugin passes on),
//!   which wins over the config file.
//!
//! The config file (every key optional; an unknown key is an error):
//!
//! ```toml
//! mode = "vm"                     # "native" (default), "vm": one microVM per container,
//!                                 # or "sandbox": one microVM per pod (CRI sandbox)
//! binary = "/usr/local/bin/nestor"
//! root = "/run/containerd/nestor"
//! ```

use std::path::Path;

use anyhow::{bail, Context, Result};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{CodedInputStream, Message};
use serde::Deserialize;

/// The OCI annotation that picks the mode of one container.
pub const MODE_ANNOTATION: &str = "nestor.io/mode";
/// The CRI plugin's annotation naming a container's sandbox (its pod): the containers
/// of one sandbox share a shim, and in sandbox mode a microVM.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

/// Where a container runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// nestor's OCI runtime on the host.
    #[default]
    Native,
    /// Its own microVM (`nestor --vm-runtime`: the launcher's VM-mode OCI verbs).
    Vm,
    /// Its pod's microVM (`nestor --vm-runtime --vm-pod`): the CRI sandbox container
    /// boots it, the sandbox's other containers join it, as Kata's containers do.
    Sandbox,
}

impl Mode {
    fn parse(s: &str) -> Result<Mode> {
        match s {
            "native" => Ok(Mode::Native),
            "vm" => Ok(Mode::Vm),
            "sandbox" => Ok(Mode::Sandbox),
            other => bail!("mode {other:?} is not \"native\", \"vm\" or \"sandbox\""),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::Vm => "vm",
            Mode::Sandbox => "sandbox",
        }
    }

    /// Whether the container is in a microVM (its own or its pod's).
    pub fn in_vm(self) -> bool {
        matches!(self, Mode::Vm | Mode::Sandbox)
    }
}

/// What the shim runs a container with. Empty strings mean the defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    pub binary: String,
    pub root: String,
    pub mode: Mode,
}

/// The shim's config file (`ConfigPath`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    mode: Option<Mode>,
    binary: Option<String>,
    root: Option<String>,
}

/// containerd's type URL of the CRI plugin's generic runtime options.
const RUNTIME_OPTIONS: &str = "runtimeoptions.v1.Options";

/// `ConfigPath` of a `runtimeoptions.v1.Options` (field 2; field 1 is `TypeUrl`).
fn config_path(bytes: &[u8]) -> Result<String> {
    let mut is = CodedInputStream::from_bytes(bytes);
    let mut path = String::new();
    while let Some(tag) = is.read_raw_tag_or_eof()? {
        match tag {
            // field 2, length-delimited
            18 => path = is.read_string()?,
            t => containerd_shim::protos::protobuf::rt::skip_field_for_tag(t, &mut is)?,
        }
    }
    Ok(path)
}

/// The settings for a container: runtime options, then its config.json's annotation.
pub fn settings(options: Option<&Any>, bundle: &Path) -> Result<Settings> {
    let mut s = Settings::default();
    if let Some(any) = options {
        if any.type_url.ends_with(RUNTIME_OPTIONS) {
            let path = config_path(&any.value).context("runtime options (runtimeoptions)")?;
            if !path.is_empty() {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("shim config {path}"))?;
                let f: FileConfig =
                    toml::from_str(&text).with_context(|| format!("shim config {path}"))?;
                s.mode = f.mode.unwrap_or_default();
                s.binary = f.binary.unwrap_or_default();
                s.root = f.root.unwrap_or_default();
            }
        } else if let Ok(o) = containerd_shim::api::Options::parse_from_bytes(&any.value) {
            s.binary = o.binary_name;
            s.root = o.root;
        }
    }
    let cfg = bundle.join("config.json");
    let spec: serde_json::Value = std::fs::read(&cfg)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    if let Some(m) = spec["annotations"][MODE_ANNOTATION].as_str() {
        s.mode = Mode::parse(m).with_context(|| format!("annotation {MODE_ANNOTATION}"))?;
    }
    Ok(s)
}

/// Kept in the bundle for `delete` after a crash (the shim's clean-up reads it back).
pub fn save(bundle: &Path, s: &Settings) {
    let _ = std::fs::write(
        bundle.join("nestor-options"),
        format!("{}\n{}\n{}\n", s.binary, s.root, s.mode.name()),
    );
}

/// What [`save`] kept (defaults when nothing was).
pub fn saved(bundle: &Path) -> Settings {
    let text = std::fs::read_to_string(bundle.join("nestor-options")).unwrap_or_default();
    let mut l = text.lines();
    Settings {
        binary: l.next().unwrap_or("").to_string(),
        root: l.next().unwrap_or("").to_string(),
        mode: Mode::parse(l.next().unwrap_or("native")).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::protobuf::CodedOutputStream;

    fn any(type_url: &str, value: Vec<u8>) -> Any {
        Any {
            type_url: type_url.into(),
            value,
            ..Default::default()
        }
    }

    fn runtime_options(config: &str) -> Vec<u8> {
        let mut v = Vec::new();
        {
            let mut os = CodedOutputStream::vec(&mut v);
            os.write_string(1, "ignored").unwrap();
            os.write_string(2, config).unwrap();
            os.write_uint32(9, 7).unwrap();
            os.flush().unwrap();
        }
        v
    }

    #[test]
    fn options_config_file_and_annotation() {
        let d = tempfile::tempdir().unwrap();
        let bundle = d.path();
        let conf = d.path().join("vm.toml");
        std::fs::write(&conf, "mode = \"vm\"\nbinary = \"/x/nestor\"\n").unwrap();
        let opts = any(
            "runtimeoptions.v1.Options",
            runtime_options(conf.to_str().unwrap()),
        );
        let s = settings(Some(&opts), bundle).unwrap();
        assert_eq!(s.mode, Mode::Vm);
        assert_eq!(s.binary, "/x/nestor");

        // runc's options: BinaryName (6), Root (7).
        let o = containerd_shim::api::Options {
            binary_name: "/b".into(),
            root: "/r".into(),
            ..Default::default()
        };
        let s = settings(
            Some(&any(
                "containerd.runc.v1.Options",
                o.write_to_bytes().unwrap(),
            )),
            bundle,
        )
        .unwrap();
        assert_eq!(
            (s.binary.as_str(), s.root.as_str(), s.mode),
            ("/b", "/r", Mode::Native)
        );

        // The annotation wins; a bad value is one clear error.
        std::fs::write(
            bundle.join("config.json"),
            r#"{"annotations":{"nestor.io/mode":"native"}}"#,
        )
        .unwrap();
        assert_eq!(settings(Some(&opts), bundle).unwrap().mode, Mode::Native);
        std::fs::write(
            bundle.join("config.json"),
            r#"{"annotations":{"nestor.io/mode":"vmm"}}"#,
        )
        .unwrap();
        let e = format!("{:#}", settings(None, bundle).unwrap_err());
        assert!(e.contains("nestor.io/mode") && e.contains("vmm"), "{e}");

        // A config file with an unknown key, or a missing one, names the file.
        std::fs::write(&conf, "mood = \"vm\"\n").unwrap();
        let e = format!("{:#}", settings(Some(&opts), d.path()).unwrap_err());
        assert!(e.contains("vm.toml") && e.contains("mood"), "{e}");
        let gone = any(
            "runtimeoptions.v1.Options",
            runtime_options("/nonexistent.toml"),
        );
        let e = format!("{:#}", settings(Some(&gone), d.path()).unwrap_err());
        assert!(e.contains("/nonexistent.toml"), "{e}");

        // Sandbox mode, by annotation or by the config file.
        std::fs::write(
            bundle.join("config.json"),
            r#"{"annotations":{"nestor.io/mode":"sandbox"}}"#,
        )
        .unwrap();
        assert_eq!(settings(None, bundle).unwrap().mode, Mode::Sandbox);
        std::fs::remove_file(bundle.join("config.json")).unwrap();
        std::fs::write(&conf, "mode = \"sandbox\"\n").unwrap();
        assert_eq!(settings(Some(&opts), bundle).unwrap().mode, Mode::Sandbox);

        save(
            bundle,
            &Settings {
                binary: "b".into(),
                root: String::new(),
                mode: Mode::Sandbox,
            },
        );
        assert_eq!(
            saved(bundle),
            Settings {
                binary: "b".into(),
                root: String::new(),
                mode: Mode::Sandbox
            }
        );
    }
}
