//! Image names: parsing and normalising references the way podman shows them.
//!
//! Every stored name is fully qualified, `DOMAIN/PATH:TAG`:
//! - no domain (the first `/`-separated part has no `.` or `:` and is not `localhost`)
//!   gives `localhost/`, so `busybox`, `busybox:latest` and `localhost/busybox:latest`
//!   are one name; `docker.io/busybox` becomes `docker.io/library/busybox:latest`;
//! - no tag gives `:latest`;
//! - references by digest (`name@sha256:…`) are not names and are refused.
//!
//! Looking an image up by a name without a domain also matches that path and tag under
//! any domain (`busybox` finds `docker.io/library/busybox:latest` when there is no
//! `localhost/busybox:latest`), as podman's short names do for local images.

use crate::ImageError;

/// A parsed, normalised name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reference {
    pub domain: String,
    pub path: String,
    pub tag: String,
    /// Whether the input named a domain itself (affects short-name lookup only).
    pub explicit_domain: bool,
}

impl Reference {
    pub(crate) fn full(&self) -> String {
        format!("{}/{}:{}", self.domain, self.path, self.tag)
    }

    /// Whether a stored full name is what this (possibly short) reference asks for.
    pub(crate) fn matches_short(&self, stored: &Reference) -> bool {
        if self.explicit_domain {
            return self == stored || self.full() == stored.full();
        }
        if self.tag != stored.tag {
            return false;
        }
        stored.path == self.path
            || (stored.domain == "docker.io" && stored.path == format!("library/{}", self.path))
    }
}

/// Normalises `name` to `DOMAIN/PATH:TAG` (see the module doc).
pub fn normalize_name(name: &str) -> Result<String, ImageError> {
    Ok(parse(name)?.full())
}

pub(crate) fn parse(name: &str) -> Result<Reference, ImageError> {
    let bad = |reason: &str| ImageError::InvalidName {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if name.is_empty() {
        return Err(bad("empty name"));
    }
    if name.len() > 255 {
        return Err(bad("longer than 255 characters"));
    }
    if name.contains('@') {
        return Err(bad("references by digest are not image names"));
    }
    let (domain, rest, explicit_domain) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first.to_string(), rest, true)
        }
        _ => ("localhost".to_string(), name, false),
    };
    let host = domain.split(':').next().unwrap_or_default();
    if !domain
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'))
        || host
            .split('.')
            .any(|p| !p.starts_with(|c: char| c.is_ascii_alphanumeric()))
    {
        return Err(bad(
            "the registry part may hold only letters, digits, '.', '-' and ':'",
        ));
    }
    let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
    let (path, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], &rest[last_slash + i + 1..]),
        None => (rest, "latest"),
    };
    if path.is_empty() {
        return Err(bad("no repository name"));
    }
    for comp in path.split('/') {
        if comp.is_empty()
            || !comp
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
            || !comp.as_bytes()[0].is_ascii_alphanumeric()
        {
            return Err(bad(
                "repository parts must be lowercase letters, digits and '.', '_', '-', starting with a letter or digit",
            ));
        }
    }
    if tag.is_empty()
        || tag.len() > 128
        || !tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        || tag.starts_with(['.', '-'])
    {
        return Err(bad("a tag is 1-128 letters, digits, '_', '.', '-'"));
    }
    let path = if domain == "docker.io" && !path.contains('/') {
        format!("library/{path}")
    } else {
        path.to_string()
    };
    Ok(Reference {
        domain,
        path,
        tag: tag.to_string(),
        explicit_domain,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_like_podman() {
        for n in [
            "busybox",
            "busybox:latest",
            "localhost/busybox",
            "localhost/busybox:latest",
        ] {
            assert_eq!(
                normalize_name(n).unwrap(),
                "localhost/busybox:latest",
                "{n}"
            );
        }
        assert_eq!(
            normalize_name("docker.io/busybox").unwrap(),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            normalize_name("quay.io/a/b:1.2").unwrap(),
            "quay.io/a/b:1.2"
        );
        assert_eq!(
            normalize_name("localhost:5000/x:v1").unwrap(),
            "localhost:5000/x:v1"
        );
        assert_eq!(
            normalize_name("my/repo:tag").unwrap(),
            "localhost/my/repo:tag"
        );
    }

    #[test]
    fn rejects_bad_names() {
        for n in [
            "",
            "Busybox",
            "a@sha256:00",
            "a:",
            "a:-x",
            "/a",
            "a//b",
            "../x",
            "a b",
        ] {
            let e = normalize_name(n).unwrap_err();
            assert!(e.to_string().contains("invalid image name"), "{n}: {e}");
        }
    }

    #[test]
    fn short_names_match_any_domain() {
        let q = parse("busybox").unwrap();
        assert!(q.matches_short(&parse("docker.io/library/busybox:latest").unwrap()));
        assert!(q.matches_short(&parse("quay.io/busybox:latest").unwrap()));
        assert!(!q.matches_short(&parse("quay.io/busybox:1").unwrap()));
        let q = parse("localhost/busybox").unwrap();
        assert!(!q.matches_short(&parse("docker.io/library/busybox:latest").unwrap()));
    }
}
