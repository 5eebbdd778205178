//! The gossip keyring: the symmetric keys that seal and open gossip datagrams ([`super::seal`]).
//!
//! It owns parsing and checking the keyring file and the key ids; it reads only the file it is given and writes
//! nothing. The file is text, one key per line: the standard, padded base64 of 32 random bytes (`meshd gossip
//! keygen` prints one). Blank lines and `#` comments are ignored. The first key seals, every key opens, so a
//! key is rotated without a flag day: add the new key second on every host, then move it first on every host,
//! then remove the old one.
//!
//! Key bytes never leave this module in text: `Debug` and every message name a key by its id, the first 4 bytes
//! of SHA-256 of the key, in hex.

use std::fmt;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::{KeyInit, XChaCha20Poly1305};

/// A key's length in bytes (XChaCha20-Poly1305 takes 256-bit keys).
pub const KEY_LEN: usize = 32;
/// The most keys a keyring holds: every received datagram names its key by id, so the count only bounds what
/// rotation needs (two or three) and how far a mistaken file can grow.
pub const MAX_KEYS: usize = 16;

/// A key id: the first 4 bytes of SHA-256 of the key bytes. Sent in clear in every datagram.
pub(crate) type KeyId = [u8; 4];

/// One key, ready to seal and open.
#[derive(Clone)]
pub(crate) struct Key {
    pub(crate) id: KeyId,
    pub(crate) cipher: XChaCha20Poly1305,
}

/// The keys a host seals gossip with (the first) and opens it with (all of them).
#[derive(Clone)]
pub struct Keyring {
    /// Never empty, at most [`MAX_KEYS`], ids distinct.
    keys: Vec<Key>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring").field("ids", &self.ids()).finish()
    }
}

impl Keyring {
    /// Parses a keyring file's text; on failure returns every problem, each with its line number.
    pub fn parse(text: &str) -> Result<Keyring, Vec<String>> {
        let mut problems = Vec::new();
        // (line number, key bytes) of the keys accepted so far.
        let mut seen: Vec<(usize, [u8; KEY_LEN])> = Vec::new();
        let mut lines_with_keys = 0usize;
        for (index, raw) in text.lines().enumerate() {
            let number = index + 1;
            // Base64 has no '#' and no spaces, so a trailing comment cannot hide part of a key.
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            lines_with_keys += 1;
            // The line is a secret: messages say what is wrong with it, never what it holds.
            let bytes = match STANDARD.decode(line) {
                Ok(b) => b,
                Err(_) => {
                    problems.push(format!(
                        "line {number}: not base64 (a key is one line of standard base64, as printed by \
                         `meshd gossip keygen`)"
                    ));
                    continue;
                }
            };
            let Ok(key) = <[u8; KEY_LEN]>::try_from(bytes.as_slice()) else {
                problems.push(format!(
                    "line {number}: a key is {KEY_LEN} bytes, this one is {}",
                    bytes.len()
                ));
                continue;
            };
            let id = key_id(&key);
            if let Some((first, other)) = seen.iter().find(|(_, k)| key_id(k) == id) {
                if *other == key {
                    problems.push(format!(
                        "line {number}: the same key as line {first} (id {})",
                        hex(&id)
                    ));
                } else {
                    problems.push(format!(
                        "line {number}: key id {} is also line {first}'s; generate another key",
                        hex(&id)
                    ));
                }
                continue;
            }
            seen.push((number, key));
        }
        if lines_with_keys == 0 {
            problems.push("no keys (make one with `meshd gossip keygen`)".to_string());
        } else if lines_with_keys > MAX_KEYS {
            problems.push(format!(
                "{lines_with_keys} keys; a keyring holds at most {MAX_KEYS} (remove keys no host seals with)"
            ));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Keyring {
            keys: seen.iter().map(|(_, k)| make_key(k)).collect(),
        })
    }

    /// Reads and parses a keyring file. Every message starts with the path.
    pub fn read(path: &Path) -> Result<Keyring, Vec<String>> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![format!(
                "{}: cannot read the gossip keyring: {e}",
                path.display()
            )]
        })?;
        Keyring::parse(&text).map_err(|problems| {
            problems
                .into_iter()
                .map(|p| format!("{}: {p}", path.display()))
                .collect()
        })
    }

    /// A keyring of the given keys, the first sealing (for tests and simulators; hosts read a file).
    pub fn from_keys(keys: &[[u8; KEY_LEN]]) -> Result<Keyring, Vec<String>> {
        let text: String = keys.iter().map(|k| STANDARD.encode(k) + "\n").collect();
        Keyring::parse(&text)
    }

    /// A warning when the keyring file can be read by its group or by others, for the caller to log; `None`
    /// when it is private or cannot be examined ([`Keyring::read`] reports the latter).
    pub fn check_permissions(path: &Path) -> Option<String> {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
        (mode & 0o077 != 0).then(|| {
            format!(
                "{}: the gossip keyring is readable by group or others (mode {mode:03o}); anyone who reads it can \
                 join and read the gossip: chmod 600 it",
                path.display()
            )
        })
    }

    /// The ids of all keys, in file order, as 8 hex digits each.
    pub fn ids(&self) -> Vec<String> {
        self.keys.iter().map(|k| hex(&k.id)).collect()
    }

    /// The id of the key that seals.
    pub fn primary_id(&self) -> String {
        hex(&self.primary().id)
    }

    /// The key that seals.
    pub(crate) fn primary(&self) -> &Key {
        // `keys` is never empty: `parse` refuses a file without keys and is the only constructor.
        &self.keys[0]
    }

    /// The key with this id, if the ring holds it.
    pub(crate) fn get(&self, id: KeyId) -> Option<&Key> {
        self.keys.iter().find(|k| k.id == id)
    }
}

/// A new key from the OS's randomness, as one keyring-file line (base64, no newline).
pub fn generate_line() -> String {
    use rand::TryRng as _;
    let mut key = [0u8; KEY_LEN];
    // Without OS randomness there is no key worth printing; no host can run in that state either.
    rand::rngs::SysRng
        .try_fill_bytes(&mut key)
        .expect("the OS random number generator failed");
    STANDARD.encode(key)
}

fn make_key(bytes: &[u8; KEY_LEN]) -> Key {
    Key {
        id: key_id(bytes),
        cipher: XChaCha20Poly1305::new(&(*bytes).into()),
    }
}

/// The first 4 bytes of SHA-256 of `bytes`.
pub(crate) fn sha256_prefix(bytes: &[u8]) -> [u8; 4] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 4];
    for (o, d) in out.iter_mut().zip(digest.as_ref()) {
        *o = *d;
    }
    out
}

fn key_id(key: &[u8; KEY_LEN]) -> KeyId {
    sha256_prefix(key)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: [u8; 32] = [1; 32];
    const K2: [u8; 32] = [2; 32];

    fn line(key: &[u8]) -> String {
        STANDARD.encode(key)
    }

    #[test]
    fn parses_keys_in_order_skipping_blanks_and_comments() {
        let text = format!(
            "# gossip keys\n\n{}\n   {}   # added for rotation\n\n",
            line(&K2),
            line(&K1)
        );
        let ring = Keyring::parse(&text).unwrap();
        assert_eq!(ring.ids(), vec![hex(&key_id(&K2)), hex(&key_id(&K1))]);
        assert_eq!(ring.primary_id(), hex(&key_id(&K2)));
    }

    #[test]
    fn key_id_is_the_sha256_prefix() {
        // SHA-256 of 32 zero bytes starts 66687aad.
        assert_eq!(hex(&key_id(&[0; 32])), "66687aad");
    }

    #[test]
    fn every_problem_is_listed_with_its_line() {
        let text = format!(
            "{}\n# ok so far\nnot base64!\n{}\n{}\n",
            line(&K1),
            line(&[7; 16]),
            line(&K1)
        );
        let problems = Keyring::parse(&text).unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[0].starts_with("line 3: not base64"),
            "{problems:?}"
        );
        assert_eq!(problems[1], "line 4: a key is 32 bytes, this one is 16");
        assert!(
            problems[2].starts_with("line 5: the same key as line 1"),
            "{problems:?}"
        );
    }

    #[test]
    fn an_empty_file_has_no_keys() {
        let problems = Keyring::parse("# nothing here\n\n").unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(problems[0].starts_with("no keys"), "{problems:?}");
    }

    #[test]
    fn at_most_sixteen_keys() {
        let keys: Vec<[u8; 32]> = (0..17u8).map(|i| [i; 32]).collect();
        assert!(Keyring::from_keys(&keys[..16]).is_ok());
        let problems = Keyring::from_keys(&keys).unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("at most 16"), "{problems:?}");
    }

    #[test]
    fn messages_never_echo_key_material() {
        let secret = line(&[9; 31]);
        let problems = Keyring::parse(&format!("{secret}\n{secret}x\n")).unwrap_err();
        for p in &problems {
            assert!(!p.contains(&secret), "{p}");
        }
        let ring = Keyring::from_keys(&[K1]).unwrap();
        let debug = format!("{ring:?}");
        assert!(!debug.contains(&line(&K1)), "{debug}");
        assert_eq!(
            debug,
            format!("Keyring {{ ids: [\"{}\"] }}", hex(&key_id(&K1)))
        );
    }

    #[test]
    fn generated_lines_parse_and_differ() {
        let a = generate_line();
        let b = generate_line();
        assert_eq!(a.len(), 44);
        assert_ne!(a, b);
        assert_eq!(
            Keyring::parse(&format!("{a}\n{b}\n")).unwrap().ids().len(),
            2
        );
    }

    #[test]
    fn read_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.keys");
        let problems = Keyring::read(&missing).unwrap_err();
        assert!(
            problems[0].starts_with(&missing.display().to_string()),
            "{problems:?}"
        );
        assert!(problems[0].contains("cannot read"), "{problems:?}");

        let bad = dir.path().join("bad.keys");
        std::fs::write(&bad, "zzz\n").unwrap();
        let problems = Keyring::read(&bad).unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].starts_with(&format!("{}: line 1: ", bad.display())),
            "{problems:?}"
        );
    }

    #[test]
    fn warns_when_group_or_others_can_read() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gossip.keys");
        std::fs::write(&path, generate_line() + "\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(Keyring::check_permissions(&path), None);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let warning = Keyring::check_permissions(&path).unwrap();
        assert!(warning.contains("mode 640"), "{warning}");
        assert!(warning.contains("chmod 600"), "{warning}");
        assert!(Keyring::read(&path).is_ok());
    }
}
