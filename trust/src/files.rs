//! Files that hold keys and state: written atomically (temp file + rename), keys at mode 0600.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
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
    let tmp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // `mode` is filtered by the umask on create; set it exactly.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
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

/// Creates a directory (and parents) that only its owner may enter.
pub fn create_private_dir(path: &Path) -> Result<(), FileError> {
    let err = |source| FileError::Write {
        path: path.to_path_buf(),
        source,
    };
    fs::create_dir_all(path).map_err(err)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(err)
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
}
