//! Which registries a name means, in the spirit of containers' `registries.conf`: the
//! registries tried in order for a short name (`alpine`), and the registries spoken to
//! over plain HTTP (`insecure = true`).
//!
//! The file is `$NESTOR_REGISTRIES_CONF`, else `/etc/nestor/registries.conf`; with
//! neither, short names go to `docker.io` only. Its keys are a subset of containers':
//!
//! ```toml
//! unqualified-search-registries = ["docker.io"]
//!
//! [[registry]]
//! location = "127.0.0.1:5000"
//! insecure = true
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::RegistryError;

/// The variable naming the configuration file.
pub const ENV_CONF: &str = "NESTOR_REGISTRIES_CONF";
/// The configuration file when the variable is not set.
pub const DEFAULT_CONF: &str = "/etc/nestor/registries.conf";

/// The registries configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RegistriesConf {
    /// Registries tried in order for a name without one.
    #[serde(default = "default_search")]
    pub unqualified_search_registries: Vec<String>,
    /// Per-registry settings.
    #[serde(default, rename = "registry")]
    pub registries: Vec<RegistryEntry>,
}

/// One `[[registry]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryEntry {
    /// `host[:port]`.
    pub location: String,
    /// Plain HTTP, no TLS.
    #[serde(default)]
    pub insecure: bool,
}

fn default_search() -> Vec<String> {
    vec!["docker.io".to_string()]
}

impl Default for RegistriesConf {
    fn default() -> Self {
        RegistriesConf {
            unqualified_search_registries: default_search(),
            registries: Vec::new(),
        }
    }
}

impl RegistriesConf {
    /// Loads the file the environment names, the default file, or the defaults.
    pub fn load() -> Result<Self, RegistryError> {
        match std::env::var_os(ENV_CONF) {
            Some(p) => Self::from_file(&PathBuf::from(p)),
            None if Path::new(DEFAULT_CONF).exists() => Self::from_file(Path::new(DEFAULT_CONF)),
            None => Ok(Self::default()),
        }
    }

    /// Parses one file.
    pub fn from_file(path: &Path) -> Result<Self, RegistryError> {
        let text = std::fs::read_to_string(path).map_err(|e| RegistryError::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let conf: RegistriesConf = toml::from_str(&text).map_err(|e| RegistryError::Config {
            path: path.to_path_buf(),
            reason: e.message().to_string(),
        })?;
        if conf.unqualified_search_registries.is_empty() {
            return Err(RegistryError::Config {
                path: path.to_path_buf(),
                reason: "unqualified-search-registries is empty".into(),
            });
        }
        Ok(conf)
    }

    /// Whether `registry` is marked insecure (plain HTTP).
    pub fn insecure(&self, registry: &str) -> bool {
        self.registries
            .iter()
            .any(|r| r.insecure && r.location == registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let c: RegistriesConf = toml::from_str(
            "unqualified-search-registries = [\"127.0.0.1:5000\", \"docker.io\"]\n\
             [[registry]]\nlocation = \"127.0.0.1:5000\"\ninsecure = true\n",
        )
        .unwrap();
        assert_eq!(c.unqualified_search_registries[0], "127.0.0.1:5000");
        assert!(c.insecure("127.0.0.1:5000"));
        assert!(!c.insecure("docker.io"));
        assert!(toml::from_str::<RegistriesConf>("mirrors = 1").is_err());
        let d = RegistriesConf::default();
        assert_eq!(d.unqualified_search_registries, ["docker.io"]);
    }
}
