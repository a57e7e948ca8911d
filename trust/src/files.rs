//! Files that hold keys and state: written atomically (temp file + rename), keys at mode 0600, and
//! the directories that hold sockets checked before they are trusted.
//!
//! The temporary file has a random name and is created exclusively (`O_EXCL`, by `tempfile`): in a
//! shared directory (`fedmesh workload fetch --write /tmp`) a name another user could predict
//! would let them plant a symlink and have root write a key where they can read it. The rename
//! replaces whatever is at the final path, a symlink included, without following it.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "key file {path} has mode {mode:o}, readable by other users; fix it with `chmod 600 {path}`"
    )]
    LoosePermissions { path: PathBuf, mode: u32 },
    #[error(
        "directory {path} cannot be trusted: {reason}. Use a directory only root (or this user) can change, such as /run/fedmesh"
    )]
    UntrustedDirectory { path: PathBuf, reason: String },
}

/// Writes a file holding a secret: created 0600 before any byte is written, replaced atomically.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), FileError> {
    write_atomic(path, contents, 0o600)
}

/// Writes a public file (certificates, bundles, state) atomically with mode 0644.
pub fn write_public(path: &Path, contents: &[u8]) -> Result<(), FileError> {
    write_atomic(path, contents, 0o644)
}

fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), FileError> {
    let err = |source| FileError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let result = (|| {
        let mut f = tempfile::Builder::new()
            .prefix(&format!(".{file_name}."))
            .suffix(".tmp")
            .permissions(fs::Permissions::from_mode(mode))
            .tempfile_in(dir)?;
        // `mode` is filtered by the umask on create; set it exactly.
        f.as_file()
            .set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(contents)?;
        f.as_file().sync_all()?;
        // On failure the temporary file is removed when `f` drops.
        f.persist(path).map_err(|e| e.error)?;
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(err)
}

/// Reads a key file, refusing one that other users can read.
pub fn read_private(path: &Path) -> Result<Vec<u8>, FileError> {
    let meta = fs::metadata(path).map_err(|source| FileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(FileError::LoosePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    read(path)
}

pub fn read(path: &Path) -> Result<Vec<u8>, FileError> {
    fs::read(path).map_err(|source| FileError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Checks that nobody but root or this process's user can change what `dir` holds: it is not a
/// symbolic link, it and every directory above it belong to root or us, and none is writable by
/// others (unless sticky, as /tmp is, where others cannot rename what is ours). A socket or file
/// placed in such a directory cannot be swapped by another local user.
pub fn check_trusted_dir(dir: &Path) -> Result<(), FileError> {
    let untrusted = |reason: String| FileError::UntrustedDirectory {
        path: dir.to_path_buf(),
        reason,
    };
    let meta = fs::symlink_metadata(dir).map_err(|e| untrusted(e.to_string()))?;
    if meta.file_type().is_symlink() {
        return Err(untrusted("it is a symbolic link".into()));
    }
    if !meta.is_dir() {
        return Err(untrusted("it is not a directory".into()));
    }
    let me = unsafe { libc::geteuid() };
    let real = fs::canonicalize(dir).map_err(|e| untrusted(e.to_string()))?;
    for (i, d) in real.ancestors().enumerate() {
        let m = fs::metadata(d).map_err(|e| untrusted(format!("{}: {e}", d.display())))?;
        let which = if i == 0 {
            "it".to_string()
        } else {
            format!("{} above it", d.display())
        };
        if m.uid() != 0 && m.uid() != me {
            return Err(untrusted(format!("{which} belongs to uid {}", m.uid())));
        }
        let mode = m.mode();
        let writable_by_others = mode & 0o022 != 0;
        let sticky = mode & 0o1000 != 0;
        if writable_by_others && (i == 0 || !sticky) {
            return Err(untrusted(format!(
                "{which} is writable by other users (mode {:o})",
                mode & 0o7777
            )));
        }
    }
    Ok(())
}

/// Creates a directory (and parents) that only its owner may enter.
pub fn create_private_dir(path: &Path) -> Result<(), FileError> {
    let err = |source| FileError::Write {
        path: path.to_path_buf(),
        source,
    };
    fs::create_dir_all(path).map_err(err)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(err)
}

/// A certificate chain (PEM, leaf first) and its private key (PEM, a file only its owner can
/// read), as a TLS server presents them; each error names the file and what is wrong with it.
pub fn read_chain_and_key(
    chain: &Path,
    key: &Path,
) -> Result<
    (
        Vec<rustls_pki_types::CertificateDer<'static>>,
        rustls_pki_types::PrivateKeyDer<'static>,
    ),
    String,
> {
    use rustls_pki_types::pem::PemObject;
    let certs = crate::bundle::parse_pem_certificates(&read(chain).map_err(|e| e.to_string())?)
        .map_err(|e| format!("{}: {e}", chain.display()))?;
    let pem = read_private(key).map_err(|e| e.to_string())?;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| format!("{}: not a PEM private key ({e})", key.display()))?;
    Ok((certs, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_0600_and_loose_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.pem");
        write_private(&p, b"secret").unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(read_private(&p).unwrap(), b"secret");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_private(&p).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        // Rewriting restores the mode.
        write_private(&p, b"again").unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    /// In a directory other users can write to, they may plant symlinks where a key is about to
    /// be written: at a temporary name they can predict, or at the key's own path.
    #[test]
    fn planted_symlinks_never_redirect_a_key() {
        let shared = tempfile::tempdir().unwrap();
        let attacker = tempfile::tempdir().unwrap();
        let key = shared.path().join("svid.key");
        let stolen = attacker.path().join("stolen");
        // The name a pid-derived temporary file had, and the final path itself.
        for planted in [
            shared
                .path()
                .join(format!(".svid.key.tmp.{}", std::process::id())),
            key.clone(),
        ] {
            let _ = fs::remove_file(&planted);
            std::os::unix::fs::symlink(&stolen, &planted).unwrap();
            write_private(&key, b"secret").unwrap();
            assert!(!stolen.exists(), "nothing was written through {planted:?}");
            let meta = fs::symlink_metadata(&key).unwrap();
            assert!(meta.file_type().is_file(), "the key replaced the symlink");
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
            assert_eq!(fs::read(&key).unwrap(), b"secret");
        }
        let leftovers: Vec<_> = fs::read_dir(shared.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
