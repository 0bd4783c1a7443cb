//! The platform layer under the relay's timers, on the target the tests run on (natively or
//! under QEMU in `scripts/cross-test.sh`): async-io's reactor (smol's timers: every deadline,
//! keepalive, back-off and ACME poll of derpd) sleeps in epoll and is woken by a timerfd that
//! polling arms with `timerfd_settime`.
//!
//! On MIPS, rustix goes through the libc crate, and handed musl its own 64-bit `timespec` where
//! the libc crate declares musl's 32-bit one: the timer was armed with garbage (disarmed in
//! release builds), so no timer fired unless other I/O woke the reactor, on a real MIPS kernel
//! as under qemu-user. scripts/cross-env.sh builds the MIPS targets so that rustix converts
//! field by field; these tests fail without it.

use std::time::{Duration, Instant};

use rustix::time::{
    timerfd_create, timerfd_gettime, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags,
    TimerfdTimerFlags, Timespec,
};

/// What polling does before each wait: the kernel must get the value that was set. Checked
/// through the interval, which the kernel keeps as set (rustix's 32-bit conversion path reports
/// the interval in place of the remaining time, so `it_value` is not compared).
#[test]
fn timerfd_gets_the_value_it_was_set_to() {
    let fd = timerfd_create(TimerfdClockId::Monotonic, TimerfdFlags::CLOEXEC).unwrap();
    let set = Itimerspec {
        it_interval: Timespec {
            tv_sec: 7,
            tv_nsec: 250_000_000,
        },
        it_value: Timespec {
            tv_sec: 30,
            tv_nsec: 0,
        },
    };
    let old = timerfd_settime(&fd, TimerfdTimerFlags::empty(), &set).unwrap();
    assert_eq!(
        (old.it_interval.tv_sec, old.it_interval.tv_nsec),
        (0, 0),
        "a new timerfd reported an interval that was never set"
    );
    let now = timerfd_gettime(&fd).unwrap().it_interval;
    assert_eq!(
        (now.tv_sec, now.tv_nsec),
        (7, 250_000_000),
        "the kernel got another interval"
    );
}

/// The whole path: a timer on an otherwise idle reactor fires, and not before its time.
#[test]
fn an_idle_reactor_wakes_for_its_timer() {
    smol::block_on(async {
        for ms in [20u64, 300] {
            let start = Instant::now();
            let fired = smol::future::or(
                async {
                    smol::Timer::after(Duration::from_millis(ms)).await;
                    true
                },
                // The bound: a timer that never fires fails the test instead of hanging it.
                async {
                    blocking_sleep(Duration::from_secs(20)).await;
                    false
                },
            )
            .await;
            assert!(fired, "a {ms} ms timer did not fire within 20 s");
            assert!(
                start.elapsed() >= Duration::from_millis(ms),
                "a {ms} ms timer fired early"
            );
        }
    });
}

/// A bound that does not depend on the reactor's timers: a thread sleeps, then wakes the task.
async fn blocking_sleep(d: Duration) {
    smol::unblock(move || std::thread::sleep(d)).await
}
