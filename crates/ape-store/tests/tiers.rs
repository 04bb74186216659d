//! Every tier round-trips entries bit for bit, and damaged entries are caught, deleted
//! and reported as misses. The Redis tests run against a real `redis-server`.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ape_core::attention::{KvBudget, KvCache};
use ape_core::engine::ContextStore;
use ape_store::{
    Codec, Corrupt, DiskTier, Entry, Fingerprint, Key, KvDtype, MemoryTier, RedisTier, Store,
    StoreError, Tier,
};
use half::f16;

fn codec(model: u8) -> Codec {
    Codec {
        model: Fingerprint([model; 32]),
        layers: 3,
        kv_heads: 2,
        head_dim: 8,
        dtype: KvDtype::F16,
    }
}

/// An entry of `len` tokens with keys and values that differ everywhere.
fn entry(codec: &Codec, len: usize, seed: u32) -> Entry {
    let mut n = seed;
    let kv = KvCache::from_fn(
        codec.layers,
        codec.kv_heads,
        codec.head_dim,
        len,
        |_, _, k, v| {
            for x in k.iter_mut().chain(v.iter_mut()) {
                n = n.wrapping_mul(1664525).wrapping_add(1013904223);
                *x = f16::from_f32((n >> 8) as f32 / (1u32 << 24) as f32 - 0.5);
            }
            Ok::<(), ()>(())
        },
    )
    .unwrap();
    Entry {
        prefix_len: 7,
        tokens: (0..len as u32).map(|t| t * 31 + seed).collect(),
        kv: Arc::new(kv),
    }
}

fn assert_same(a: &Entry, b: &Entry) {
    assert_eq!(a.prefix_len, b.prefix_len);
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.kv.len(), b.kv.len());
    for layer in 0..a.kv.layer_count() {
        for g in 0..a.kv.kv_heads {
            let (ak, av) = a.kv.head(layer, g);
            let (bk, bv) = b.kv.head(layer, g);
            let bits = |x: &[f16]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(ak), bits(bk), "keys of layer {layer} head {g}");
            assert_eq!(bits(av), bits(bv), "values of layer {layer} head {g}");
        }
    }
}

fn key(codec: &Codec, entry: &Entry) -> Key {
    codec.key(&[1, 2, 3, 4, 5, 6, 7], &entry.tokens)
}

fn round_trip(tier: &dyn Tier, codec: &Codec) {
    for (len, seed) in [(0, 1), (1, 2), (37, 3)] {
        let e = entry(codec, len, seed);
        let k = key(codec, &e);
        assert!(tier.get(&k).unwrap().is_none());
        tier.put(&k, &e).unwrap();
        tier.put(&k, &e).unwrap();
        assert_same(&tier.get(&k).unwrap().expect("stored"), &e);
    }
    assert_eq!(tier.list().unwrap().len(), 3);
    assert_eq!(tier.prune(0).unwrap(), 3);
    assert!(tier.list().unwrap().is_empty());
}

#[test]
fn a_model_fingerprint_is_the_blake3_of_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    // Two and a half of the 4 MiB pieces it is read in and a few bytes, so that piece
    // boundaries and a short last piece are crossed.
    let bytes: Vec<u8> = (0..(10 << 20) + 7u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(&path, &bytes).unwrap();
    let fingerprint = Fingerprint::of_file(&path).unwrap();
    assert_eq!(fingerprint.0, *blake3::hash(&bytes).as_bytes());
    let missing = Fingerprint::of_file(&dir.path().join("absent.gguf"))
        .err()
        .unwrap();
    assert!(missing.to_string().contains("absent.gguf"), "{missing}");
}

#[test]
fn keys_are_stable_and_change_with_every_input() {
    let c = codec(1);
    let base = Key::new(&c.model, &[1, 2], &[3, 4], KvDtype::F16);
    assert_eq!(base, Key::new(&c.model, &[1, 2], &[3, 4], KvDtype::F16));
    assert_eq!(Key::from_hex(&base.to_hex()), Some(base));
    for other in [
        Key::new(&Fingerprint([2; 32]), &[1, 2], &[3, 4], KvDtype::F16),
        Key::new(&c.model, &[1], &[2, 3, 4], KvDtype::F16),
        Key::new(&c.model, &[1, 2], &[3, 5], KvDtype::F16),
        Key::new(&c.model, &[1, 2], &[3, 4, 0], KvDtype::F16),
    ] {
        assert_ne!(base, other);
    }
    assert_eq!(Key::from_hex("xyz"), None);
}

#[test]
fn memory_tier_round_trips_and_gives_way_least_recently_used_first() {
    let c = codec(1);
    round_trip(&MemoryTier::new(KvBudget::new(1 << 30)), &c);

    let (a, b, d) = (entry(&c, 20, 1), entry(&c, 20, 2), entry(&c, 20, 3));
    let size = a.memory_bytes();
    let (ka, kb, kd) = (key(&c, &a), key(&c, &b), key(&c, &d));
    let budget = KvBudget::new(2 * size);
    let tier = MemoryTier::new(budget.clone());
    tier.put(&ka, &a).unwrap();
    tier.put(&kb, &b).unwrap();
    assert_eq!(
        budget.used(),
        2 * size,
        "each entry is charged to the budget"
    );
    drop((a, b));
    assert!(tier.get(&ka).unwrap().is_some());
    tier.put(&kd, &d).unwrap();
    drop(d);
    assert!(tier.holds(&ka).unwrap(), "recently used stays");
    assert!(!tier.holds(&kb).unwrap(), "least recently used goes");
    assert!(tier.holds(&kd).unwrap());

    // A request reading `a` holds it: a running request's room comes from `d`, though
    // `a` was used longer ago, and nothing is left to give for a second one.
    let read = tier.get(&ka).unwrap().unwrap();
    tier.get(&kd).unwrap();
    let running = budget.charge(size).expect("d gives way");
    assert!(tier.holds(&ka).unwrap() && !tier.holds(&kd).unwrap());
    assert!(budget.charge(size).is_err(), "a read entry never gives way");
    drop((read, running));
    assert_eq!(budget.used(), size, "only `a` is charged now");
}

#[test]
fn disk_tier_round_trips_across_instances_and_keeps_under_its_cap() {
    let dir = tempfile::tempdir().unwrap();
    let c = codec(1);
    round_trip(&DiskTier::open(dir.path(), c, None).unwrap(), &c);

    let e = entry(&c, 50, 9);
    DiskTier::open(dir.path(), c, None)
        .unwrap()
        .put(&key(&c, &e), &e)
        .unwrap();
    let reopened = DiskTier::open(dir.path(), c, None).unwrap();
    assert_same(&reopened.get(&key(&c, &e)).unwrap().unwrap(), &e);

    let capped = DiskTier::open(dir.path(), c, Some(3 * e.encoded_len(c.dtype) as u64)).unwrap();
    for seed in 10..15 {
        let e = entry(&c, 50, seed);
        capped.put(&key(&c, &e), &e).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = capped.list().unwrap();
    assert_eq!(left.len(), 3);
    let newest = entry(&c, 50, 14);
    assert!(left.iter().any(|l| l.key == key(&c, &newest)));
}

fn entry_file(dir: &Path, key: &Key) -> std::path::PathBuf {
    dir.join("entries").join(format!("{}.kv", key.to_hex()))
}

#[test]
fn damaged_entries_are_detected_deleted_and_missed() {
    let dir = tempfile::tempdir().unwrap();
    let c = codec(1);
    let e = entry(&c, 40, 5);
    let k = key(&c, &e);
    let good = c.encode(&k, &e);
    type Spoil = fn(&mut Vec<u8>);
    let damage: Vec<(&str, Spoil, Corrupt)> = vec![
        (
            "flipped byte",
            |b: &mut Vec<u8>| b[500] ^= 0x10,
            Corrupt::Checksum,
        ),
        (
            "truncated",
            |b: &mut Vec<u8>| b.truncate(b.len() - 9),
            Corrupt::Length {
                expected: good.len(),
                found: good.len() - 9,
            },
        ),
        (
            "cut to a stub",
            |b: &mut Vec<u8>| b.truncate(20),
            Corrupt::Truncated,
        ),
        (
            "other version",
            |b: &mut Vec<u8>| b[8] = 99,
            Corrupt::Version(99),
        ),
        (
            "not an entry",
            |b: &mut Vec<u8>| b[0] = b'X',
            Corrupt::NotAnEntry,
        ),
    ];
    for (what, spoil, reason) in damage {
        let mut bytes = good.clone();
        spoil(&mut bytes);
        std::fs::create_dir_all(dir.path().join("entries")).unwrap();
        std::fs::write(entry_file(dir.path(), &k), &bytes).unwrap();
        let tier = DiskTier::open(dir.path(), c, None).unwrap();
        match tier.get(&k) {
            Err(StoreError::Corrupt(found)) => assert_eq!(found, reason, "{what}"),
            Err(other) => panic!("{what}: {other}"),
            Ok(_) => panic!("{what}: a damaged entry was accepted"),
        }
        let store = Store::new(c, vec![Box::new(tier)]);
        assert!(store.lookup(&k).is_none(), "{what}");
        assert_eq!(store.stats()[0].corrupt.load(Ordering::Relaxed), 1);
        assert!(!entry_file(dir.path(), &k).exists(), "{what}: not deleted");
    }

    // An entry written for another model, or filed under another key, is refused too.
    let other_model = codec(2);
    std::fs::write(entry_file(dir.path(), &k), other_model.encode(&k, &e)).unwrap();
    let tier = DiskTier::open(dir.path(), c, None).unwrap();
    assert!(matches!(
        tier.get(&k),
        Err(StoreError::Corrupt(Corrupt::Model))
    ));
    let elsewhere = c.key(&[9], &e.tokens);
    std::fs::write(entry_file(dir.path(), &k), c.encode(&elsewhere, &e)).unwrap();
    assert!(matches!(
        tier.get(&k),
        Err(StoreError::Corrupt(Corrupt::Key))
    ));
}

#[test]
fn the_store_reads_through_its_tiers_and_promotes() {
    let dir = tempfile::tempdir().unwrap();
    let c = codec(1);
    let prefix = [1, 2, 3, 4, 5, 6, 7];
    let e = entry(&c, 30, 4);
    let writer = Store::new(
        c,
        vec![Box::new(DiskTier::open(dir.path(), c, None).unwrap())],
    );
    writer.put(&prefix, &e.tokens, e.kv.clone());

    let reader = Store::new(
        c,
        vec![
            Box::new(MemoryTier::new(KvBudget::new(1 << 30))),
            Box::new(DiskTier::open(dir.path(), c, None).unwrap()),
        ],
    );
    assert!(reader.get(&prefix, &e.tokens).is_some());
    assert!(reader.get(&prefix, &e.tokens).is_some());
    assert!(reader.get(&prefix, &[42]).is_none());
    let count = |tier: usize| {
        let s = &reader.stats()[tier];
        (
            s.hits.load(Ordering::Relaxed),
            s.misses.load(Ordering::Relaxed),
        )
    };
    assert_eq!(count(0), (1, 2), "memory: hit after promotion, two misses");
    assert_eq!(
        count(1),
        (1, 1),
        "disk: the first read, and the unknown context"
    );
}

/// A `redis-server` on a free loopback port for the length of a test.
struct RedisServer {
    child: Child,
    url: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RedisServer {
    fn start() -> RedisServer {
        RedisServer::start_on(free_port())
    }

    /// A fresh, empty `redis-server` on `port`.
    fn start_on(port: u16) -> RedisServer {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is not installed: run `bash scripts/test.sh`, which installs it with apt-get");
        let url = format!("redis://127.0.0.1:{port}/");
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        RedisServer { child, url }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn redis_tier_round_trips_and_is_shared() {
    let server = RedisServer::start();
    let c = codec(1);
    round_trip(&RedisTier::connect(&server.url, c).unwrap(), &c);

    let e = entry(&c, 25, 8);
    let k = key(&c, &e);
    RedisTier::connect(&server.url, c)
        .unwrap()
        .put(&k, &e)
        .unwrap();
    let other_client = RedisTier::connect(&server.url, c).unwrap();
    assert_same(&other_client.get(&k).unwrap().unwrap(), &e);

    let mut conn = redis::Client::open(server.url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let mut bytes = c.encode(&k, &e);
    bytes[300] ^= 1;
    redis::cmd("SET")
        .arg(format!("ape:kv:{}", k.to_hex()))
        .arg(bytes)
        .exec(&mut conn)
        .unwrap();
    let store = Store::new(c, vec![Box::new(other_client)]);
    assert!(store.lookup(&k).is_none());
    assert_eq!(
        store.tiers()[0].list().unwrap().len(),
        0,
        "damaged entry deleted"
    );
}

/// Keep trying `work` until it succeeds: a tier that lost Redis connects again on a
/// later use. The ceiling is for a tier that never comes back, not a speed limit.
fn eventually<T>(mut work: impl FnMut() -> ape_store::Result<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match work() {
            Ok(value) => return value,
            Err(e) => assert!(Instant::now() < deadline, "Redis never came back: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_redis_tier_survives_redis_down_at_start_killed_restarted_empty_and_edited_by_hand() {
    let c = codec(1);
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/");

    // Nothing listens yet: the tier is made, fails each use with a clear error, and the
    // store reads it as a miss.
    let tier = RedisTier::connect(&url, c).expect("a Redis that is down is not fatal");
    let e = entry(&c, 20, 5);
    let k = key(&c, &e);
    let err = tier.put(&k, &e).expect_err("nothing listens there");
    assert!(
        err.to_string().contains("Check that the server is running"),
        "{err}"
    );
    let store = Store::new(
        c,
        vec![
            Box::new(MemoryTier::new(KvBudget::new(1 << 20))),
            Box::new(tier),
        ],
    );
    assert!(store.lookup(&k).is_none());
    assert_eq!(store.missing_from_durable(&k).len(), 1);

    // Redis comes up: the tier connects on its own.
    let redis = RedisServer::start_on(port);
    eventually(|| store.tiers()[1].put(&k, &e));
    assert!(store.tiers()[1].holds(&k).unwrap());

    // Killed: uses fail, nothing panics, what memory holds is still served.
    drop(redis);
    store.save(&k, &e);
    assert!(store.tiers()[1].get(&k).is_err());
    assert_same(&store.lookup(&k).unwrap(), &e);

    // Back, empty: the entry is gone from Redis and is written again.
    let redis = RedisServer::start_on(port);
    assert!(!eventually(|| store.tiers()[1].holds(&k)));
    store.save(&k, &e);
    assert!(store.missing_from_durable(&k).is_empty());

    // Edited by hand: truncated, then replaced by another model's entry. Each is caught,
    // deleted and verified as damaged, never decoded.
    let mut conn = redis::Client::open(redis.url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let name = format!("ape:kv:{}", k.to_hex());
    let whole = c.encode(&k, &e);
    let other_model = codec(2);
    let foreign = entry(&other_model, 20, 6);
    let foreign_bytes = other_model.encode(&key(&other_model, &foreign), &foreign);
    let redis_only = Store::new(
        c,
        vec![Box::new(RedisTier::connect(&redis.url, c).unwrap())],
    );
    for (damage, bytes) in [
        ("truncated", &whole[..whole.len() / 2]),
        ("another model's", &foreign_bytes[..]),
    ] {
        redis::cmd("SET")
            .arg(&name)
            .arg(bytes)
            .exec(&mut conn)
            .unwrap();
        let verified = ape_store::verify(redis_only.tiers()[0].as_ref(), false).unwrap();
        assert_eq!(verified.damaged.len(), 1, "{damage}");
        assert!(redis_only.lookup(&k).is_none(), "{damage}");
        assert!(
            !redis_only.tiers()[0].holds(&k).unwrap(),
            "{damage} entry deleted"
        );
    }
}

#[test]
fn q8_entries_take_about_half_the_bytes_and_stay_within_half_a_step() {
    let dir = tempfile::tempdir().unwrap();
    let f16_codec = codec(1);
    let q8 = Codec {
        dtype: KvDtype::Q8,
        ..f16_codec
    };
    let e = entry(&q8, 64, 6);
    let k = key(&q8, &e);
    assert_ne!(k, key(&f16_codec, &e), "the dtype is part of the key");
    assert!(e.encoded_len(KvDtype::Q8) * 10 < e.encoded_len(KvDtype::F16) * 7);

    let tier = DiskTier::open(dir.path(), q8, None).unwrap();
    tier.put(&k, &e).unwrap();
    let back = tier.get(&k).unwrap().unwrap();
    assert_eq!(back.tokens, e.tokens);
    for layer in 0..q8.layers {
        for g in 0..q8.kv_heads {
            let (k0, v0) = e.kv.head(layer, g);
            let (k1, v1) = back.kv.head(layer, g);
            for (a, b) in [(k0, k1), (v0, v1)] {
                for (row_a, row_b) in a.chunks_exact(q8.head_dim).zip(b.chunks_exact(q8.head_dim)) {
                    let max = row_a.iter().map(|x| x.to_f32().abs()).fold(0.0, f32::max);
                    for (x, y) in row_a.iter().zip(row_b) {
                        let error = (x.to_f32() - y.to_f32()).abs();
                        assert!(error <= max / 254.0 * 1.01 + 1e-3, "{x} vs {y}");
                    }
                }
            }
        }
    }

    // An f16 entry filed where a q8 reader looks is refused, not misread.
    std::fs::write(entry_file(dir.path(), &k), f16_codec.encode(&k, &e)).unwrap();
    assert!(matches!(
        tier.get(&k),
        Err(StoreError::Corrupt(Corrupt::Dtype))
    ));
}
