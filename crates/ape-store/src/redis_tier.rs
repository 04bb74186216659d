//! The Redis tier: entries shared by every server pointed at the same Redis, under keys
//! `ape:kv:<key>`. Its size is Redis's to bound (`maxmemory` with an LRU policy).

use std::sync::Mutex;

use redis::Commands;

use crate::entry::{Codec, Entry, Key};
use crate::error::{Result, StoreError};
use crate::{Listed, Tier};

const NAMESPACE: &str = "ape:kv:";

pub struct RedisTier {
    codec: Codec,
    url: String,
    connection: Mutex<redis::Connection>,
}

impl RedisTier {
    /// Connect to the Redis at `url` (`redis://host:port/db`).
    pub fn connect(url: &str, codec: Codec) -> Result<Self> {
        let fail = |source| StoreError::Redis {
            url: url.to_string(),
            source,
        };
        let connection = redis::Client::open(url)
            .and_then(|client| client.get_connection())
            .map_err(fail)?;
        Ok(RedisTier {
            codec,
            url: url.to_string(),
            connection: Mutex::new(connection),
        })
    }

    fn run<T>(
        &self,
        command: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T> {
        let mut connection = self.connection.lock().unwrap_or_else(|e| e.into_inner());
        command(&mut connection).map_err(|source| StoreError::Redis {
            url: self.url.clone(),
            source,
        })
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
