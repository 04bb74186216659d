//! The context store through the `ape` binary, as users and replicas meet it: answers are
//! the same whether contexts come from the disk, from Redis or from a fresh encoding;
//! two processes can fill one store at once; damaged entries are re-encoded.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};

use common::{ape, model, RedisServer};

fn run(args: &[&str]) -> Output {
    let out = ape(args).output().expect("ape runs");
    assert!(
        out.status.success(),
        "ape {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn documents(dir: &Path) -> PathBuf {
    let docs = dir.join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    for (name, text) in [
        (
            "a.txt",
            "Alice keeps her bicycle in the green shed behind the school.",
        ),
        (
            "b.txt",
            "Bob's car is parked in the underground garage on Elm Street.",
        ),
        ("c.txt", "The school library opens at eight in the morning."),
    ] {
        std::fs::write(docs.join(name), text).unwrap();
    }
    docs
}

fn ask(docs: &Path, store: &[&str]) -> Output {
    let model = model();
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--contexts-dir",
        docs.to_str().unwrap(),
        "--query",
        "Where does Alice keep her bicycle?",
        "--max-tokens",
        "16",
        "--stats",
    ];
    args.extend_from_slice(store);
    run(&args)
}

fn entries(cache: &Path) -> usize {
    std::fs::read_dir(cache.join("entries")).map_or(0, |d| d.count())
}

#[test]
fn answers_are_the_same_from_every_tier() {
    let dir = tempfile::tempdir().unwrap();
    let docs = documents(dir.path());
    let redis = RedisServer::start();
    let (first, second) = (dir.path().join("first"), dir.path().join("second"));
    let (first, second) = (first.to_str().unwrap(), second.to_str().unwrap());

    let fresh = ask(&docs, &["--no-cache"]);
    let encoded = ask(&docs, &["--cache-dir", first, "--redis", &redis.url]);
    assert_eq!(entries(Path::new(first)), 3);
    let from_disk = ask(&docs, &["--cache-dir", first]);
    // A replica with its own empty disk finds the contexts in the shared Redis.
    let from_redis = ask(&docs, &["--cache-dir", second, "--redis", &redis.url]);
    for out in [&encoded, &from_disk, &from_redis] {
        assert_eq!(out.stdout, fresh.stdout);
    }
    let stats = |out: &Output| String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        stats(&from_disk).contains("disk 3 hits"),
        "{}",
        stats(&from_disk)
    );
    assert!(
        stats(&from_redis).contains("redis 3 hits"),
        "{}",
        stats(&from_redis)
    );
    assert_eq!(
        entries(Path::new(second)),
        3,
        "Redis hits are kept on the local disk"
    );
}

#[test]
fn two_processes_encoding_at_once_both_succeed_and_leave_one_valid_entry_each() {
    let dir = tempfile::tempdir().unwrap();
    let docs = documents(dir.path());
    let cache = dir.path().join("cache");
    let model = model();
    let args = [
        "encode",
        "--model",
        model.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
        docs.to_str().unwrap(),
    ];
    let children: Vec<Child> = (0..2)
        .map(|_| {
            ape(&args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(entries(&cache), 3);
    assert!(
        std::fs::read_dir(cache.join("tmp"))
            .unwrap()
            .next()
            .is_none(),
        "no leftovers"
    );
    let again = ask(&docs, &["--cache-dir", cache.to_str().unwrap()]);
    let stats = String::from_utf8_lossy(&again.stderr);
    assert!(stats.contains("disk 3 hits"), "{stats}");
    assert!(!stats.contains("damaged"), "{stats}");
}

#[test]
fn a_damaged_entry_is_reported_deleted_and_encoded_again() {
    let dir = tempfile::tempdir().unwrap();
    let docs = documents(dir.path());
    let cache = dir.path().join("cache");
    let cache_arg = ["--cache-dir", cache.to_str().unwrap()];
    let fresh = ask(&docs, &cache_arg);
    for (i, file) in std::fs::read_dir(cache.join("entries"))
        .unwrap()
        .enumerate()
    {
        let path = file.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        match i {
            0 => bytes[200] ^= 0x40,
            1 => bytes.truncate(bytes.len() / 2),
            _ => bytes[8] = 7,
        }
        std::fs::write(&path, bytes).unwrap();
    }
    let repaired = ask(&docs, &cache_arg);
    assert_eq!(repaired.stdout, fresh.stdout);
    let log = String::from_utf8_lossy(&repaired.stderr);
    assert_eq!(log.matches("is damaged").count(), 3, "{log}");
    assert!(
        log.contains("checksum mismatch") && log.contains("format version 7"),
        "{log}"
    );
    let healed = ask(&docs, &cache_arg);
    assert!(String::from_utf8_lossy(&healed.stderr).contains("disk 3 hits"));
}

#[test]
fn cache_commands_list_remove_and_reject_bad_keys() {
    let dir = tempfile::tempdir().unwrap();
    let docs = documents(dir.path());
    let cache = dir.path().join("cache");
    let cache = cache.to_str().unwrap();
    let model = model();
    run(&[
        "encode",
        "--model",
        model.to_str().unwrap(),
        "--cache-dir",
        cache,
        docs.to_str().unwrap(),
    ]);
    let listing = String::from_utf8(run(&["cache", "ls", "--cache-dir", cache]).stdout).unwrap();
    let keys: Vec<&str> = listing
        .lines()
        .map(|l| l.split('\t').nth(1).unwrap())
        .collect();
    assert_eq!(keys.len(), 3);
    run(&["cache", "rm", "--cache-dir", cache, keys[0]]);
    assert_eq!(entries(Path::new(cache)), 2);
    let bad = ape(&["cache", "rm", "--cache-dir", cache, "nonsense"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("64 hex digits"));
    run(&["cache", "prune", "--cache-dir", cache, "--max-bytes", "1K"]);
    assert_eq!(entries(Path::new(cache)), 0);
}

/// A store that cannot keep what was encoded makes `ape encode` fail, naming what was not
/// stored, instead of reporting success; an entry that cannot be read is replaced.
#[test]
fn encoding_into_a_broken_store_fails_and_says_what_was_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let docs = documents(dir.path());
    let cache = dir.path().join("cache");
    let model = model();
    let encode = || {
        ape(&[
            "encode",
            "--model",
            model.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
            docs.to_str().unwrap(),
        ])
        .output()
        .unwrap()
    };
    assert!(encode().status.success());
    assert_eq!(entries(&cache), 3);
    // Every entry's place taken by a folder: unreadable; deleted and written again.
    let paths: Vec<PathBuf> = std::fs::read_dir(cache.join("entries"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    for path in &paths {
        std::fs::remove_file(path).unwrap();
        std::fs::create_dir(path).unwrap();
    }
    let out = encode();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(paths.iter().all(|path| path.is_file()));

    // Temporary files cannot be made, so nothing new can be stored.
    std::fs::remove_dir_all(&cache).unwrap();
    std::fs::create_dir_all(cache.join("entries")).unwrap();
    std::os::unix::fs::symlink("/proc/self/fdinfo", cache.join("tmp")).unwrap();
    let out = encode();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("3 contexts could not be stored")
            && stderr.contains("a.txt: not in the disk tier"),
        "{stderr}"
    );
}

/// `ape cache verify` reads every entry, names the damaged ones and, with `--remove`,
/// deletes them; their contexts are then encoded again.
#[test]
fn cache_verify_finds_and_removes_damaged_entries() {
    let dir = tempfile::tempdir().unwrap();
    let docs = documents(dir.path());
    let cache = dir.path().join("cache");
    let cache = cache.to_str().unwrap();
    let model = model();
    let encode = || {
        let out = ape(&[
            "encode",
            "--model",
            model.to_str().unwrap(),
            "--cache-dir",
            cache,
        ])
        .arg(&docs)
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let verify = |remove: bool| {
        let mut command = ape(&["cache", "verify", "--cache-dir", cache]);
        if remove {
            command.arg("--remove");
        }
        command.output().unwrap()
    };
    encode();
    let out = verify(false);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("disk: 3 sound, 0 damaged"));

    let mut paths: Vec<PathBuf> = std::fs::read_dir(Path::new(cache).join("entries"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    paths.sort();
    let mut flipped = std::fs::read(&paths[0]).unwrap();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x10;
    std::fs::write(&paths[0], flipped).unwrap();
    std::fs::remove_file(&paths[1]).unwrap();
    std::fs::create_dir(&paths[1]).unwrap();

    let out = verify(false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("disk: 1 sound, 2 damaged, 0 removed"),
        "{stdout}"
    );
    assert!(stdout.contains("checksum mismatch"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--remove"));

    let out = verify(true);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("disk: 1 sound, 2 damaged, 2 removed"));
    assert_eq!(entries(Path::new(cache)), 1);
    encode();
    let out = verify(false);
    assert!(String::from_utf8_lossy(&out.stdout).contains("disk: 3 sound, 0 damaged"));
}

/// An acknowledged entry survives a power loss only if its bytes reach the disk before it
/// takes its name, and the folder holding the name reaches the disk before `ape encode`
/// says it is stored: watched with `strace` (installed by scripts/test.sh), as the system
/// calls the binary makes.
#[test]
fn each_entry_is_synced_then_renamed_then_its_folder_synced() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, logs) = (dir.path().join("cache"), dir.path().join("calls"));
    std::fs::create_dir(&logs).unwrap();
    let docs = documents(dir.path());
    // One log per thread (-ff), so that no call is split between two lines.
    let status = std::process::Command::new("strace")
        .args([
            "-ff",
            "-e",
            "trace=openat,fsync,fdatasync,rename,renameat,renameat2",
        ])
        .arg("-o")
        .arg(logs.join("thread"))
        .args([
            env!("CARGO_BIN_EXE_ape"),
            "encode",
            "--model",
            model().to_str().unwrap(),
        ])
        .arg("--cache-dir")
        .arg(&cache)
        .arg(&docs)
        .stderr(Stdio::null())
        .status()
        .expect("strace runs (scripts/test.sh installs it)");
    assert!(status.success());

    let folder = cache.join("entries");
    let folder = folder.to_str().unwrap();
    let mut acknowledged = 0;
    for log in std::fs::read_dir(&logs).unwrap() {
        let calls = std::fs::read_to_string(log.unwrap().path()).unwrap();
        // The descriptors open on temporary entries (and whether each was synced) and on
        // the entries folder; the entries renamed since the folder was last synced.
        let (mut files, mut folder_fds, mut renamed) = (Vec::new(), Vec::new(), Vec::new());
        for line in calls.lines() {
            let result = line.rsplit("= ").next().unwrap_or("").trim().to_owned();
            if line.starts_with("openat(") && line.contains(".tmp\"") {
                files.push((result, false));
            } else if line.starts_with(&format!("openat(AT_FDCWD, \"{folder}\"")) {
                folder_fds.push(result);
            } else if let Some(fd) = line.split("sync(").nth(1).and_then(|s| s.split(')').next()) {
                if let Some(file) = files.iter_mut().rev().find(|(f, _)| f == fd) {
                    file.1 = true;
                } else if folder_fds.iter().any(|f| f == fd) {
                    acknowledged += renamed.len();
                    renamed.clear();
                }
            } else if line.starts_with("rename") && line.contains(&format!("\"{folder}/")) {
                let (_, synced) = files.pop().expect("a temporary entry was opened first");
                assert!(
                    synced,
                    "an entry renamed before its bytes were synced:\n{line}"
                );
                renamed.push(line.to_owned());
            }
        }
        assert!(
            renamed.is_empty(),
            "renamed, folder never synced: {renamed:?}"
        );
    }
    assert_eq!(
        acknowledged, 3,
        "every document's entry, each with its folder synced"
    );
    assert_eq!(entries(&cache), 3);
}
