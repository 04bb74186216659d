//! The Redis tier: entries shared by every server pointed at the same Redis, under keys
//! `ape:kv:<key>`. Its size is Redis's to bound (`maxmemory` with an LRU policy).
//!
//! Redis may be down when ape starts, die, or come back empty: every command has a time
//! limit, a broken connection is dropped and made again on a later use (at most once per
//! [`RETRY_AFTER`]), and meanwhile the tier fails fast, so that requests go on without it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::Commands;

use crate::entry::{Codec, Entry, Key};
use crate::error::{Result, StoreError};
use crate::{Listed, Tier};

const NAMESPACE: &str = "ape:kv:";

/// Longest wait for Redis to connect or to answer one command.
const TIMEOUT: Duration = Duration::from_secs(5);
/// How long after a failed connection the tier fails at once instead of trying again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Entries kept in a Redis server, shared by every ape server pointed at it; while Redis
/// is unreachable its operations fail at once and the other tiers carry on.
pub struct RedisTier {
    codec: Codec,
    /// The URL as given, any password in it replaced, for messages and logs.
    url: String,
    client: redis::Client,
    link: Mutex<Link>,
}

/// The connection, or when the last attempt to make one failed.
enum Link {
    Up(redis::Connection),
    Down(Option<Instant>),
}

impl RedisTier {
    /// The Redis at `url` (`redis://host:port/db`). A URL that cannot be one is an error;
    /// a Redis that does not answer yet is logged, and tried again when the tier is used.
    pub fn connect(url: &str, codec: Codec) -> Result<Self> {
        let shown = without_password(url);
        let client = redis::Client::open(url).map_err(|source| StoreError::Redis {
            url: shown.clone(),
            source,
        })?;
        let tier = RedisTier {
            codec,
            url: shown,
            client,
            link: Mutex::new(Link::Down(None)),
        };
        if let Err(e) = tier.run(|c| redis::cmd("PING").query::<()>(c)) {
            tracing::warn!("{e}; going on without the Redis tier until it answers");
        }
        Ok(tier)
    }

    fn open(&self) -> redis::RedisResult<redis::Connection> {
        let connection = self.client.get_connection_with_timeout(TIMEOUT)?;
        connection.set_read_timeout(Some(TIMEOUT))?;
        connection.set_write_timeout(Some(TIMEOUT))?;
        Ok(connection)
    }

    fn run<T>(
        &self,
        command: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T> {
        let fail = |source| StoreError::Redis {
            url: self.url.clone(),
            source,
        };
        let mut link = self.link.lock().unwrap_or_else(|e| e.into_inner());
        if let Link::Down(failed) = *link {
            if failed.is_some_and(|at| at.elapsed() < RETRY_AFTER) {
                let down = (
                    redis::ErrorKind::IoError,
                    "not connected; trying again shortly",
                );
                return Err(fail(down.into()));
            }
            match self.open() {
                Ok(connection) => *link = Link::Up(connection),
                Err(source) => {
                    *link = Link::Down(Some(Instant::now()));
                    return Err(fail(source));
                }
            }
        }
        let Link::Up(connection) = &mut *link else {
            unreachable!("connected just above")
        };
        let result = command(connection);
        if let Err(e) = &result {
            if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                *link = Link::Down(Some(Instant::now()));
            }
        }
        result.map_err(fail)
    }

    fn name_of(key: &Key) -> String {
        format!("{NAMESPACE}{}", key.to_hex())
    }

    fn keys(&self) -> Result<Vec<Key>> {
        let names: Vec<String> = self.run(|c| {
            c.scan_match::<_, String>(format!("{NAMESPACE}*"))
                .map(|names| names.collect())
        })?;
        Ok(names
            .iter()
            .filter_map(|n| Key::from_hex(n.strip_prefix(NAMESPACE)?))
            .collect())
    }
}

/// `url` with the password it may carry (`redis://user:password@host/`, or a `pass` or
/// `password` parameter of a `redis+unix://` URL) replaced by `***`: errors naming the
/// URL are logged, and a log is no place for a password. Parsed as the Redis client
/// parses it; what it cannot parse is shown as given (it holds no URL's password).
fn without_password(url: &str) -> String {
    let Some(mut parsed) = redis::parse_redis_url(url) else {
        return url.to_string();
    };
    if parsed.password().is_some() {
        // Only a URL without a host refuses a password, and one with a password has one.
        let _ = parsed.set_password(Some("***"));
    }
    let secret = |name: &str| matches!(name, "pass" | "password");
    if parsed.query_pairs().any(|(name, _)| secret(&name)) {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(name, value)| {
                let value = if secret(&name) {
                    "***".into()
                } else {
                    value.into_owned()
                };
                (name.into_owned(), value)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

impl Tier for RedisTier {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn get(&self, key: &Key) -> Result<Option<Entry>> {
        match self.stored_bytes(key)? {
            Some(bytes) => Ok(Some(self.codec.decode(key, &bytes)?)),
            None => Ok(None),
        }
    }

    fn stored_bytes(&self, key: &Key) -> Result<Option<Vec<u8>>> {
        self.run(|c| c.get(Self::name_of(key)))
    }

    fn put(&self, key: &Key, entry: &Entry) -> Result<()> {
        let bytes = self.codec.encode(key, entry);
        // Entries are content-addressed: whichever writer gets there first is as good.
        self.run(|c| c.set_nx::<_, _, ()>(Self::name_of(key), bytes))
    }

    fn holds(&self, key: &Key) -> Result<bool> {
        self.run(|c| c.exists(Self::name_of(key)))
    }

    fn remove(&self, key: &Key) -> Result<bool> {
        let removed: usize = self.run(|c| c.del(Self::name_of(key)))?;
        Ok(removed > 0)
    }

    fn list(&self) -> Result<Vec<Listed>> {
        self.keys()?
            .into_iter()
            .map(|key| {
                let bytes: u64 = self.run(|c| c.strlen(Self::name_of(&key)))?;
                Ok(Listed {
                    key,
                    bytes,
                    tokens: None,
                })
            })
            .collect()
    }

    /// Only `max_bytes == 0` (clear) is done here; Redis's own eviction bounds its size.
    fn prune(&self, max_bytes: u64) -> Result<usize> {
        if max_bytes > 0 {
            return Ok(0);
        }
        let keys = self.keys()?;
        for key in &keys {
            self.remove(key)?;
        }
        Ok(keys.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_left_out_of_the_url_shown() {
        let cases = [
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
            ("redis://:hunter2@host:6379/1", "redis://:***@host:6379/1"),
            ("rediss://ape:hunter2@host/", "rediss://ape:***@host/"),
            ("redis://ape@host", "redis://ape@host"),
            ("redis://:p@ss:w@rd@host?db=2", "redis://:***@host?db=2"),
            (
                "redis+unix:///run/redis.sock?db=1&pass=hunter2",
                "redis+unix:///run/redis.sock?db=1&pass=***",
            ),
            ("not a url", "not a url"),
        ];
        for (given, shown) in cases {
            assert_eq!(without_password(given), shown, "{given}");
        }
    }

    /// An unreachable Redis is an error that names where it was, not its password.
    #[test]
    fn an_unreachable_redis_is_named_without_its_password() {
        let codec = Codec {
            model: crate::Fingerprint([0; 32]),
            layers: 1,
            kv_heads: 1,
            head_dim: 8,
            dtype: crate::KvDtype::F16,
        };
        let tier = RedisTier::connect("redis://:hunter2@127.0.0.1:1/", codec).unwrap();
        let error = tier
            .holds(&Key::from_hex(&"0".repeat(64)).unwrap())
            .unwrap_err();
        let message = error.to_string();
        assert!(message.contains("redis://:***@127.0.0.1:1/"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
    }
}
