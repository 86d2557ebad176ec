"""Reproducible OCI image layouts for the sample images (build-*-image.sh).

Tars have fixed mtimes (2024-01-01), owners 0:0 and sorted entries; gzip carries no name
or time; JSON is canonical (sorted keys, no spaces). So the same inputs give the same
digests. A layout is written into a fresh directory: blobs/sha256/*, index.json with one
manifest named by org.opencontainers.image.ref.name, and oci-layout.
"""
import gzip
import hashlib
import io
import json
import os
import tarfile

MTIME = 1704067200  # 2024-01-01T00:00:00Z
CREATED = "2024-01-01T00:00:00Z"
D, F, L = tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.SYMTYPE
GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
PLAIN = "application/vnd.oci.image.layer.v1.tar"


def _info(name, kind, mode, size=0, link="", owner=0):
    t = tarfile.TarInfo(name)
    t.type, t.mode, t.size, t.linkname = kind, mode, size, link
    t.mtime, t.uid, t.gid, t.uname, t.gname = MTIME, owner, owner, "", ""
    return t


def build_tar(entries):
    """entries: (name, kind, mode, data-or-linkname[, owner uid = gid]) tuples, owner 0
    unless given; written sorted by name."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, kind, mode, payload, *rest in sorted(entries, key=lambda e: e[0]):
            owner = rest[0] if rest else 0
            if kind == F:
                tf.addfile(_info(name, kind, mode, len(payload), owner=owner), io.BytesIO(payload))
            elif kind == L:
                tf.addfile(_info(name, kind, mode, link=payload, owner=owner))
            else:
                tf.addfile(_info(name, kind, mode, owner=owner))
    return buf.getvalue()


def gzipped(data):
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, filename="", compresslevel=9) as g:
        g.write(data)
    return out.getvalue()


def canon(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def write_layout(out, ref_name, arch, config, layers, history):
    """layers: (media type, blob bytes, uncompressed tar bytes) in order; `config` is the
    image config's "config" object. Returns the manifest's digest."""
    os.makedirs(f"{out}/blobs/sha256")

    def blob(data):
        d = hashlib.sha256(data).hexdigest()
        with open(f"{out}/blobs/sha256/{d}", "wb") as f:
            f.write(data)
        return "sha256:" + d

    image_config = {
        "created": CREATED,
        "architecture": arch,
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers",
                   "diff_ids": ["sha256:" + hashlib.sha256(t).hexdigest() for _, _, t in layers]},
        "history": [{"created": CREATED, "created_by": h} for h in history],
    }
    config_b = canon(image_config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": blob(config_b), "size": len(config_b)},
        "layers": [{"mediaType": m, "digest": blob(b), "size": len(b)} for m, b, _ in layers],
    }
    manifest_b = canon(manifest)
    digest = blob(manifest_b)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": len(manifest_b),
            "annotations": {"org.opencontainers.image.ref.name": ref_name},
        }],
    }
    with open(f"{out}/index.json", "wb") as f:
        f.write(canon(index))
    with open(f"{out}/oci-layout", "wb") as f:
        f.write(canon({"imageLayoutVersion": "1.0.0"}))
    return digest
