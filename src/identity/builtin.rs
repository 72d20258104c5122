//! `BuiltinCa`: a single-machine CA whose root is created once and shared by every process.
//!
//! Input: the state directory. On first start the root (ECDSA P-256, self-signed, 10 years,
//! `O=meshnode, CN=meshnode root CA`) is written to `<state_dir>/ca/root-cert.pem` and
//! `root-key.pem` (mode 0600). Creation is atomic: both files go into a fresh temporary directory
//! inside `state_dir`, which is then renamed to `ca`; a process that loses that race discards its
//! own root and loads the winner's, so concurrent starters share one root. An existing `ca`
//! directory is never overwritten: if it is half-written or corrupt, loading fails with an error
//! naming the bad file. Also offers an in-memory [`BuiltinCa::ephemeral`] root for tests.
//! Output: [`WorkloadCert`]s with `chain = [leaf]` (signed directly by the root), `roots = [root]`.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use super::signer::{self, CaFiles, Signer};
use super::{BoxFuture, CertSource, Error, Identity, WorkloadCert};

/// Subdirectory of the state directory holding the root.
const CA_DIR: &str = "ca";
/// The root certificate file inside [`CA_DIR`].
const ROOT_CERT_FILE: &str = "root-cert.pem";
/// The root key file inside [`CA_DIR`] (PKCS#8 PEM, mode 0600).
const ROOT_KEY_FILE: &str = "root-key.pem";
/// Organisation in the root's subject.
const ROOT_ORG: &str = "meshnode";
/// Common name in the persistent root's subject.
const ROOT_CN: &str = "meshnode root CA";
/// How long a new root is valid: long, since replacing it means re-trusting every node.
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How far a new root's `notBefore` is back-dated for clock skew between nodes.
const ROOT_BACKDATE: Duration = Duration::from_secs(3600);

/// The built-in CA.
pub struct BuiltinCa {
    signer: Signer,
    root_pem: String,
}

impl BuiltinCa {
    /// Loads the root from `<state_dir>/ca`, creating it first if it does not exist.
    pub fn load_or_create(state_dir: &Path, ttl: Duration) -> Result<Self, Error> {
        // Checked before anything is created on disk.
        signer::check_ttl(ttl)?;
        let dir = state_dir.join(CA_DIR);
        let exists = dir.try_exists().map_err(|source| Error::Read {
            path: dir.clone(),
            source,
        })?;
        if !exists {
            create(state_dir, &dir)?;
        }
        Self::load(&dir, ttl).map_err(|source| Error::BuiltinRoot {
            dir,
            source: Box::new(source),
        })
    }

    /// A CA with a fresh in-memory root that is never written anywhere (tests, "another CA").
    pub fn ephemeral(ttl: Duration) -> Result<Self, Error> {
        let (root, key) = new_root("meshnode ephemeral root CA")?;
        let root_pem = root.pem();
        let signer = Signer::from_generated_root(root.der().clone(), key, ttl)?;
        Ok(Self { signer, root_pem })
    }

    fn load(dir: &Path, ttl: Duration) -> Result<Self, Error> {
        let cert = dir.join(ROOT_CERT_FILE);
        let root_pem = String::from_utf8_lossy(&signer::read_file(&cert)?).into_owned();
        let files = CaFiles {
            key: dir.join(ROOT_KEY_FILE),
            chain: None,
            roots: cert.clone(),
            cert,
        };
        let signer = Signer::load(&files, ttl)?;
        Ok(Self { signer, root_pem })
    }

    /// Issues a leaf for `id` valid from `not_before` to `not_after` (whole seconds).
    pub fn issue(
        &self,
        id: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCert, Error> {
        self.signer.issue(id, not_before, not_after)
    }

    /// The loaded signer (CSR signing for the CA service).
    pub(crate) fn signer(&self) -> &Signer {
        &self.signer
    }

    /// The root certificate, PEM.
    pub fn root_pem(&self) -> String {
        self.root_pem.clone()
    }

    /// The root certificate, DER (a one-element slice).
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        self.signer.roots()
    }
}

/// Never prints the key.
impl std::fmt::Debug for BuiltinCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuiltinCa").finish_non_exhaustive()
    }
}

impl CertSource for BuiltinCa {
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, Error>> {
        Box::pin(async move { self.signer.issue_now(id) })
    }
}

/// Generates a self-signed ECDSA P-256 root with the given common name.
fn new_root(common_name: &str) -> Result<(rcgen::Certificate, KeyPair), Error> {
    let create_error = |source| Error::CreateRoot { source };
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(create_error)?;
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, ROOT_ORG);
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(signer::random_serial());
    params.not_before = now - ROOT_BACKDATE;
    params.not_after = now + ROOT_VALIDITY;
    let cert = params.self_signed(&key).map_err(create_error)?;
    Ok((cert, key))
}

/// Creates `<state_dir>/ca` atomically, or leaves the one another process created first.
fn create(state_dir: &Path, dir: &Path) -> Result<(), Error> {
    let write_error = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Write { path, source }
    };
    fs::create_dir_all(state_dir).map_err(write_error(state_dir))?;
    let (root, key) = new_root(ROOT_CN)?;
    let tmp = state_dir.join(format!(
        ".{CA_DIR}-{}-{:016x}.tmp",
        std::process::id(),
        rand::random::<u64>()
    ));
    DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .map_err(write_error(&tmp))?;
    let written = write_new(&tmp.join(ROOT_CERT_FILE), root.pem().as_bytes(), 0o644)
        .and_then(|()| {
            write_new(
                &tmp.join(ROOT_KEY_FILE),
                key.serialize_pem().as_bytes(),
                0o600,
            )
        })
        .and_then(|()| sync_dir(&tmp));
    if let Err(e) = written {
        // Best effort: the temporary directory is ours alone and holds nothing of value.
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    match fs::rename(&tmp, dir) {
        Ok(()) => {
            sync_dir(state_dir)?;
            tracing::info!(dir = %dir.display(), "created built-in root CA");
            Ok(())
        }
        Err(source) => {
            // Best effort, as above.
            let _ = fs::remove_dir_all(&tmp);
            if dir.exists() {
                // Another process won the race; its root is the one everyone uses.
                Ok(())
            } else {
                Err(Error::Write {
                    path: PathBuf::from(dir),
                    source,
                })
            }
        }
    }
}

/// Creates `path` (which must not exist) with `mode`, writes `contents` and syncs it.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| f.write_all(contents).map(|()| f))
        .map_err(|source| Error::Write {
            path: path.to_owned(),
            source,
        })?;
    file.flush()
        .and_then(|()| file.sync_all())
        .map_err(|source| Error::Write {
            path: path.to_owned(),
            source,
        })
}

/// Makes a directory's entries durable.
fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| Error::Write {
            path: dir.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::{Arc, Barrier};

    use super::*;

    const TTL: Duration = Duration::from_secs(3600);

    #[test]
    fn creates_the_root_once_and_reloads_the_same_one() {
        let state = tempfile::tempdir().unwrap();
        let first = BuiltinCa::load_or_create(state.path(), TTL).unwrap();
        let second = BuiltinCa::load_or_create(state.path(), TTL).unwrap();
        assert_eq!(first.root_pem(), second.root_pem());
        assert_eq!(first.roots(), second.roots());
        let key = state.path().join(CA_DIR).join(ROOT_KEY_FILE);
        let mode = fs::metadata(key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn processes_starting_together_share_one_root() {
        let state = tempfile::tempdir().unwrap();
        let nested = Arc::new(state.path().join("not/yet/there"));
        let threads = 8;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (barrier, nested) = (barrier.clone(), nested.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    BuiltinCa::load_or_create(&nested, TTL).map(|ca| ca.root_pem())
                })
            })
            .collect();
        let roots: Vec<String> = handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect();
        assert!(roots.iter().all(|r| *r == roots[0]), "roots differ");
        let leftovers: Vec<_> = fs::read_dir(&*nested)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from(CA_DIR)]);
    }

    #[test]
    fn refuses_a_corrupt_root_and_leaves_it_alone() {
        let state = tempfile::tempdir().unwrap();
        BuiltinCa::load_or_create(state.path(), TTL).unwrap();
        let key = state.path().join(CA_DIR).join(ROOT_KEY_FILE);
        fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();

        let err = BuiltinCa::load_or_create(state.path(), TTL).expect_err("corrupt key accepted");
        assert!(matches!(err, Error::BuiltinRoot { .. }), "{err}");
        assert!(err.to_string().contains(&*key.to_string_lossy()), "{err}");
        assert!(fs::read_to_string(&key).unwrap().contains("AAAA"));
    }

    #[test]
    fn refuses_a_half_written_root_naming_the_missing_file() {
        let state = tempfile::tempdir().unwrap();
        BuiltinCa::load_or_create(state.path(), TTL).unwrap();
        let key = state.path().join(CA_DIR).join(ROOT_KEY_FILE);
        fs::remove_file(&key).unwrap();

        let err = BuiltinCa::load_or_create(state.path(), TTL).expect_err("missing key accepted");
        let Error::BuiltinRoot { source, .. } = &err else {
            panic!("unexpected error {err}");
        };
        assert!(
            matches!(**source, Error::Read { ref path, .. } if *path == key),
            "{err}"
        );
    }

    #[test]
    fn refuses_a_root_whose_key_was_swapped() {
        let state = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        BuiltinCa::load_or_create(state.path(), TTL).unwrap();
        BuiltinCa::load_or_create(other.path(), TTL).unwrap();
        let key = state.path().join(CA_DIR).join(ROOT_KEY_FILE);
        fs::copy(other.path().join(CA_DIR).join(ROOT_KEY_FILE), &key).unwrap();

        let err = BuiltinCa::load_or_create(state.path(), TTL).expect_err("swapped key accepted");
        let Error::BuiltinRoot { source, .. } = &err else {
            panic!("unexpected error {err}");
        };
        assert!(matches!(**source, Error::KeyMismatch { .. }), "{err}");
    }

    #[test]
    fn ephemeral_roots_are_distinct() {
        let a = BuiltinCa::ephemeral(TTL).unwrap();
        let b = BuiltinCa::ephemeral(TTL).unwrap();
        assert_ne!(a.root_pem(), b.root_pem());
        assert!(a.root_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    }
}
