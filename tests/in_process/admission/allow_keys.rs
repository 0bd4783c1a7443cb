//! `--allow-keys-file`, and the order of the checks.

use super::{admission, check, fake_tcp, fake_unix, http, new_key, recv, responder, temp_dir};
use super::{write_keys, IO_TIMEOUT};
use derpd::admission::{Admission, AdmissionConfig, Check};
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

fn allow_list(path: &Path) -> Admission {
    admission(AdmissionConfig {
        allow_keys_file: Some(path.to_path_buf()),
        ..Default::default()
    })
}

#[test]
fn allow_keys_file_follows_edits() {
    let dir = temp_dir();
    let path = dir.join("allow-keys");
    let (a_key, b_key) = (new_key(), new_key());
    write_keys(&path, &[a_key]);
    let a = allow_list(&path);
    assert_eq!(check(&a, &a_key), Ok(()));
    assert_eq!(
        check(&a, &b_key),
        Err(format!(
            "peer {b_key} not authorized (not in allow-keys file {})",
            path.display()
        ))
    );
    assert_eq!(a.rejections_by(Check::AllowKeys), 1);

    // Replaced: applies at the next check, without reload().
    write_keys(&path, &[b_key]);
    assert_eq!(check(&a, &b_key), Ok(()));
    assert!(check(&a, &a_key).is_err());
    // Edited in place, same length (a key swapped for another).
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace(&b_key.to_string(), &a_key.to_string())).unwrap();
    assert_eq!(check(&a, &a_key), Ok(()));
    assert!(check(&a, &b_key).is_err());

    // Broken: the previous list stays, on a check and on reload().
    std::fs::write(&path, format!("{b_key}\nnodekey:nope\n")).unwrap();
    assert_eq!(check(&a, &a_key), Ok(()));
    a.reload();
    assert_eq!(check(&a, &a_key), Ok(()));
    assert!(check(&a, &b_key).is_err());
    // Gone: the same.
    std::fs::remove_file(&path).unwrap();
    a.reload();
    assert_eq!(check(&a, &a_key), Ok(()));
    // Back.
    write_keys(&path, &[b_key]);
    assert_eq!(check(&a, &b_key), Ok(()));
    assert!(check(&a, &a_key).is_err());
}

#[test]
fn allow_keys_file_startup_errors() {
    let dir = temp_dir();
    let path = dir.join("allow-keys");
    std::fs::write(&path, format!("# ok\n{}\nnodekey:12\n", new_key())).unwrap();
    let e = Admission::new(AdmissionConfig {
        allow_keys_file: Some(path.clone()),
        ..Default::default()
    })
    .unwrap_err();
    assert_eq!(
        e,
        format!(
            "allow-keys file {}: line 3: want nodekey:<64 hex digits>, got \"nodekey:12\"",
            path.display()
        )
    );
    let missing = dir.join("missing");
    let e = Admission::new(AdmissionConfig {
        allow_keys_file: Some(missing.clone()),
        ..Default::default()
    })
    .unwrap_err();
    assert!(
        e.starts_with(&format!("allow-keys file {}: ", missing.display())),
        "{e}"
    );
    // An empty list is valid (only mesh peers get in).
    std::fs::write(&path, "# nobody yet\n").unwrap();
    let a = allow_list(&path);
    assert!(!a.is_open());
    assert!(check(&a, &new_key()).is_err());
}

/// Routers without a clock write files with modification times in the future: such a file
/// is read once more after the racy window, not at every look.
#[test]
fn allow_keys_file_with_a_future_mtime_is_not_reread_at_every_look() {
    let dir = temp_dir();
    let path = dir.join("allow-keys");
    let (a_key, b_key) = (new_key(), new_key());
    let future = std::time::SystemTime::now() + Duration::from_secs(3600);
    let set_future = |p: &Path| {
        std::fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(future)
            .unwrap();
    };
    write_keys(&path, &[a_key]);
    set_future(&path);
    // Looks at the file at every check.
    let a = allow_list(&path);
    assert_eq!(a.allow_keys_reads(), 1);
    let t0 = Instant::now();
    let mut looks = 0;
    while t0.elapsed() < derpd::allowlist::RACY_WINDOW + Duration::from_millis(500) {
        assert_eq!(check(&a, &a_key), Ok(()));
        looks += 1;
        // Before the fix each look read the file again.
        assert!(
            a.allow_keys_reads() <= 2,
            "{} reads in {looks} looks",
            a.allow_keys_reads()
        );
    }
    println!("{} reads in {looks} looks", a.allow_keys_reads());
    // Start-up, and once more after the racy window.
    assert_eq!(a.allow_keys_reads(), 2, "in {looks} looks");
    // An edit is still seen, with the same future time.
    write_keys(&path, &[b_key]);
    set_future(&path);
    assert_eq!(check(&a, &b_key), Ok(()));
    assert!(check(&a, &a_key).is_err());
    assert_eq!(a.allow_keys_reads(), 3);
}

/// A check that reads the allow-keys file leaves its executor thread free: here the file is a
/// FIFO whose writer comes only after the executor showed it could run something else.
#[test]
fn allow_keys_file_is_read_off_the_executor() {
    let dir = temp_dir();
    let path = dir.join("allow-keys");
    let key = new_key();
    write_keys(&path, &[key]);
    let a = allow_list(&path);
    let fifo = dir.join("fifo");
    let st = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(st.success(), "mkfifo: {st}");
    std::fs::rename(&fifo, &path).unwrap();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let text = format!("{key}\n");
    let writer_path = path.clone();
    let writer = thread::spawn(move || {
        // Bounded: before the fix the check held the test's only thread until this.
        let _ = go_rx.recv_timeout(IO_TIMEOUT);
        std::fs::write(&writer_path, text).unwrap();
    });
    let t0 = Instant::now();
    let (first, res) = smol::block_on(async {
        let mut pending = std::pin::pin!(a.check(&key, "127.0.0.1:1".parse().unwrap()));
        let probe = async {
            smol::Timer::after(Duration::from_millis(50)).await;
            None
        };
        let first = smol::future::or(async { Some((&mut pending).await) }, probe).await;
        let _ = go_tx.send(());
        match first {
            Some(r) => (false, r),
            None => (true, pending.await),
        }
    });
    writer.join().unwrap();
    assert!(
        first,
        "the check blocked its executor thread for {:?} reading the file",
        t0.elapsed()
    );
    assert_eq!(res, Ok(()));
    assert_eq!(a.allow_keys_reads(), 2);
}

#[test]
fn every_check_must_pass_in_order() {
    let dir = temp_dir();
    let (known, unknown, not_listed) = (new_key(), new_key(), new_key());
    let keys = dir.join("allow-keys");
    write_keys(&keys, &[known, unknown]);
    let sock = dir.join("ts.sock");
    let known_hex = known.untyped_hex();
    let whois_rx = fake_unix(
        &sock,
        responder(move |r| {
            if r.target.ends_with(&known_hex) {
                http("200 OK", "{}")
            } else {
                http("404 Not Found", "no match\n")
            }
        }),
    );
    let (addr, admit_rx) = fake_tcp(responder(|_| http("200 OK", r#"{"Allow":true}"#)));
    let a = admission(AdmissionConfig {
        tailscaled_socket: Some(sock),
        url: Some(format!("http://{addr}/")),
        fail_open: false,
        allow_keys_file: Some(keys),
    });
    // Not listed: neither tailscaled nor the controller is asked.
    assert!(check(&a, &not_listed)
        .unwrap_err()
        .contains("not in allow-keys file"));
    // Unknown to tailscaled: the controller is not asked.
    assert!(check(&a, &unknown)
        .unwrap_err()
        .contains("not found in local tailscaled"));
    assert!(recv(&whois_rx).target.ends_with(&unknown.untyped_hex()));
    // Known everywhere: admitted after both were asked.
    assert_eq!(check(&a, &known), Ok(()));
    assert!(recv(&whois_rx).target.ends_with(&known.untyped_hex()));
    assert!(recv(&admit_rx).body_text().contains(&known.to_string()));
    assert!(whois_rx.try_recv().is_err() && admit_rx.try_recv().is_err());
    assert_eq!(
        Check::ALL.map(|c| a.rejections_by(c)),
        [1, 1, 0],
        "rejections by allow-keys, tailscaled, url"
    );
}
