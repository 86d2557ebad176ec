//! Image references as a registry sees them: `[REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST]`,
//! with Docker's rules (`alpine` = `docker.io/library/alpine:latest`), a short name
//! expanded over the configured search registries, in order.

use oci_client::Reference;

use crate::config::RegistriesConf;
use crate::RegistryError;

/// A fully qualified reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `host[:port]`, `docker.io` for Docker Hub.
    pub registry: String,
    /// `library/alpine`.
    pub repository: String,
    /// The tag (`latest` when neither a tag nor a digest was given).
    pub tag: Option<String>,
    /// `sha256:…` when the reference pins a manifest.
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parses a qualified reference (the registry part is taken as given).
    pub fn parse_qualified(s: &str) -> Result<Self, RegistryError> {
        let bad = |reason: String| RegistryError::BadReference {
            reference: s.to_string(),
            reason,
        };
        if s.is_empty() || s.len() > 512 || s.chars().any(|c| c.is_whitespace()) {
            return Err(bad("empty, too long or holds spaces".into()));
        }
        let r = Reference::try_from(s).map_err(|e| bad(e.to_string()))?;
        if let Some(d) = r.digest() {
            let hex = d.strip_prefix("sha256:").unwrap_or("");
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(format!("digest '{d}' is not sha256:<64 hex digits>")));
            }
        }
        let tag = match (r.tag(), r.digest()) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some("latest".to_string()),
        };
        Ok(ImageRef {
            registry: r.registry().to_string(),
            repository: r.repository().to_string(),
            tag,
            digest: r.digest().map(str::to_string),
        })
    }

    /// The reference for the client.
    pub fn to_oci(&self) -> Reference {
        match (&self.tag, &self.digest) {
            (Some(t), Some(d)) => Reference::with_tag_and_digest(
                self.registry.clone(),
                self.repository.clone(),
                t.clone(),
                d.clone(),
            ),
            (_, Some(d)) => {
                Reference::with_digest(self.registry.clone(), self.repository.clone(), d.clone())
            }
            (t, None) => Reference::with_tag(
                self.registry.clone(),
                self.repository.clone(),
                t.clone().unwrap_or_else(|| "latest".into()),
            ),
        }
    }

    /// The name the image store gives the pulled image (`REGISTRY/REPOSITORY:TAG`),
    /// none for a reference by digest only.
    pub fn store_name(&self) -> Option<String> {
        self.tag
            .as_ref()
            .map(|t| format!("{}/{}:{t}", self.registry, self.repository))
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Whether `s` names its registry (Docker's rule: the first `/` part has a `.` or a
/// `:`, or is `localhost`).
pub fn is_qualified(s: &str) -> bool {
    match s.split_once('/') {
        Some((first, _)) => first.contains('.') || first.contains(':') || first == "localhost",
        None => false,
    }
}

/// The references `input` may mean, in the order to try them: itself when qualified,
/// else one per search registry.
pub fn candidates(input: &str, conf: &RegistriesConf) -> Result<Vec<ImageRef>, RegistryError> {
    if is_qualified(input) {
        return Ok(vec![ImageRef::parse_qualified(input)?]);
    }
    conf.unqualified_search_registries
        .iter()
        .map(|reg| ImageRef::parse_qualified(&format!("{reg}/{input}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_rules() {
        let c = candidates("alpine", &RegistriesConf::default()).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].to_string(), "docker.io/library/alpine:latest");
        assert_eq!(
            c[0].store_name().as_deref(),
            Some("docker.io/library/alpine:latest")
        );
        let r = ImageRef::parse_qualified("127.0.0.1:5000/a/b:v1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("127.0.0.1:5000", "a/b")
        );
        assert_eq!(r.tag.as_deref(), Some("v1"));
        let d = format!("sha256:{}", "ab".repeat(32));
        let r = ImageRef::parse_qualified(&format!("localhost:5000/x@{d}")).unwrap();
        assert_eq!(r.digest.as_deref(), Some(d.as_str()));
        assert_eq!(r.store_name(), None);
        assert!(ImageRef::parse_qualified("localhost:5000/x@sha256:abc").is_err());
        assert!(ImageRef::parse_qualified("Bad Name").is_err());
        let conf = RegistriesConf {
            unqualified_search_registries: vec!["127.0.0.1:9".into(), "docker.io".into()],
            registries: vec![],
        };
        let c = candidates("busybox:1", &conf).unwrap();
        assert_eq!(c[0].to_string(), "127.0.0.1:9/busybox:1");
        assert_eq!(c[1].to_string(), "docker.io/library/busybox:1");
    }
}
