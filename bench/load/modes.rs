//! The modes: throughput (closed loop, flood, paced, duplicate-key fight), latency probes,
//! idle clients, logins.

use super::*;

pub(super) async fn traffic(
    ex: &Rc<LocalExecutor<'_>>,
    ctx: &Rc<Ctx>,
    args: &Args,
    probe: bool,
) -> Result<Value, String> {
    if args.size > frame::MAX_PACKET_SIZE {
        return Err(format!("--size is at most {}", frame::MAX_PACKET_SIZE));
    }
    let per_pair = args.rate / args.pairs.max(1) as f64;
    for _ in 0..args.pairs {
        let (sk, rk) = (ClientKey::generate(), ClientKey::generate());
        let s = login(ctx, &sk, BIG_READ).await.map_err(|e| e.to_string())?;
        let r = login(ctx, &rk, BIG_READ).await.map_err(|e| e.to_string())?;
        let f = send_frame(&r.key, args.size);
        let flow = Rc::new(Flow {
            window: args.window,
            ..Flow::default()
        });
        let (c, fl) = (ctx.clone(), flow.clone());
        ex.spawn(async move { c.note("receiver", receive(&c, r, &fl).await) })
            .detach();
        let c = ctx.clone();
        ex.spawn(async move { c.note("sender", send(&c, s, f, per_pair, &flow).await) })
            .detach();
    }
    if args.fight > 0.0 {
        let k = ClientKey::generate();
        let a = login(ctx, &k, SMALL_READ)
            .await
            .map_err(|e| e.to_string())?;
        let b = login(ctx, &k, SMALL_READ)
            .await
            .map_err(|e| e.to_string())?;
        let (c, rate, switch) = (ctx.clone(), args.fight, !args.fight_control);
        ex.spawn(async move { c.note("fighters", fight(&c, [a, b], rate, switch).await) })
            .detach();
    }
    if probe {
        let probe_conn = || async {
            let k = ClientKey::generate();
            login(ctx, &k, BIG_READ).await.map_err(|e| e.to_string())
        };
        let (c1, c2, c3) = (
            probe_conn().await?,
            probe_conn().await?,
            probe_conn().await?,
        );
        let to_b = c2.key;
        let to_c = c3.key;
        let c = ctx.clone();
        ex.spawn(async move { c.note("probe collector", collect(&c, c3).await) })
            .detach();
        let c = ctx.clone();
        ex.spawn(async move { c.note("probe echo", echo(c2, to_c).await) })
            .detach();
        let c = ctx.clone();
        let rate = args.probe_rate;
        ex.spawn(async move { c.note("probe sender", probe_send(&c, c1, to_b, rate).await) })
            .detach();
    }
    Timer::after(Duration::from_secs_f64(args.warmup)).await;
    let a = ctx.sample();
    Timer::after(Duration::from_secs_f64(args.seconds)).await;
    let b = ctx.sample();
    // Probes sent in the window get a moment to come back.
    if probe {
        Timer::after(Duration::from_millis(200)).await;
    }
    ctx.stop.set(true);
    let (wall, server_s, mut v) = window(&a, &b);
    let sent = b.sent - a.sent;
    let received = b.received - a.received;
    let bytes = b.received_bytes - a.received_bytes;
    let drop = if sent > 0 {
        (1.0 - received as f64 / sent as f64).max(0.0) * 100.0
    } else {
        0.0
    };
    let cpu_pp = if received > 0 {
        server_s * 1e6 / received as f64
    } else {
        0.0
    };
    v = merge(
        v,
        json!({
            "pairs": args.pairs,
            "size": args.size,
            "rate_pps": args.rate,
            "sent": sent,
            "received": received,
            "pps": round(received as f64 / wall, 0),
            "mbps": round(bytes as f64 * 8.0 / wall / 1e6, 1),
            "drop_pct": round(drop, 3),
            "cpu_us_per_packet": round(cpu_pp, 3),
            "allocs_per_packet": allocs_per(&a, &b, received),
            "insns_per_packet": insns_per(&a, &b, received),
            "fight_fps": round((b.fight_frames - a.fight_frames) as f64 / wall, 0),
            "fight_control": args.fight_control,
        }),
    );
    if probe {
        // The probes sent in the window are sequence numbers a.probes_sent..b.probes_sent.
        let sent_in_window = a.probes_sent..b.probes_sent;
        let mut rtts: Vec<u64> = ctx
            .stats
            .probes
            .borrow()
            .iter()
            .filter(|p| sent_in_window.contains(&p.0))
            .map(|p| p.1)
            .collect();
        rtts.sort_unstable();
        let in_window = b.probes_sent - a.probes_sent;
        let pct = |q: f64| -> f64 {
            if rtts.is_empty() {
                return 0.0;
            }
            let i = ((rtts.len() as f64 * q).ceil() as usize).clamp(1, rtts.len()) - 1;
            round(rtts[i] as f64 / 1e3, 1)
        };
        v = merge(
            v,
            json!({
                "probe_rate": args.probe_rate,
                "samples": rtts.len(),
                "lost": in_window.saturating_sub(rtts.len() as u64),
                "p50_us": pct(0.50),
                "p99_us": pct(0.99),
                "p999_us": pct(0.999),
            }),
        );
    }
    Ok(finish(ctx, v))
}

pub(super) fn finish(ctx: &Ctx, v: Value) -> Value {
    let errs = ctx.stats.errors.borrow();
    merge(
        v,
        json!({"errors": ctx.stats.failures.get(), "first_errors": *errs}),
    )
}

/// One sender/receiver pair's packets in flight.
#[derive(Default)]
pub(super) struct Flow {
    pub(super) window: u64,
    pub(super) sent: Cell<u64>,
    pub(super) received: Cell<u64>,
    /// Rung by the receiver.
    pub(super) progress: event_listener::Event,
}

impl Flow {
    pub(super) fn in_flight(&self) -> u64 {
        self.sent.get().saturating_sub(self.received.get())
    }

    /// Waits until the window has room. A packet the relay dropped never arrives, so after a
    /// quiet spell the missing ones are written off rather than holding the window shut.
    pub(super) async fn room(&self) {
        while self.window > 0 && self.in_flight() >= self.window {
            event_listener::listener!(self.progress => l);
            if self.in_flight() < self.window {
                return;
            }
            let quiet = async {
                Timer::after(Duration::from_millis(20)).await;
                false
            };
            let woken = async {
                l.await;
                true
            };
            if !woken.or(quiet).await {
                self.received.set(self.sent.get());
            }
        }
    }
}

/// Sends `frame` over and over within the pair's window, paced at `per_sec` packets per second
/// or unpaced at 0.
pub(super) async fn send(
    ctx: &Ctx,
    mut c: Conn,
    frame: Vec<u8>,
    per_sec: f64,
    flow: &Flow,
) -> io::Result<()> {
    let start = Instant::now();
    let mut total = 0u64;
    while !ctx.stop.get() {
        flow.room().await;
        let room = match flow.window {
            0 => SEND_BATCH as u64,
            w => (w - flow.in_flight()).min(SEND_BATCH as u64),
        };
        let n = if per_sec > 0.0 {
            let due = (start.elapsed().as_secs_f64() * per_sec) as u64;
            if due <= total {
                Timer::after(Duration::from_millis(1)).await;
                continue;
            }
            (due - total).min(room)
        } else {
            room
        };
        for _ in 0..n {
            c.queue(&frame)?;
        }
        flow.sent.set(flow.sent.get() + n);
        c.flush().await?;
        total += n;
        Stats::add(&ctx.stats.sent, n);
        // A writable socket never makes the flush wait: let the receivers run.
        smol::future::yield_now().await;
    }
    Ok(())
}

pub(super) async fn receive(ctx: &Ctx, mut c: Conn, flow: &Flow) -> io::Result<()> {
    loop {
        let (t, r) = c.next_frame().await?;
        if t == FrameType::RecvPacket as u8 {
            Stats::add(&ctx.stats.received, 1);
            Stats::add(&ctx.stats.received_bytes, (r.len() - KEY_LEN) as u64);
            flow.received.set(flow.received.get() + 1);
            flow.progress.notify(1);
        }
    }
}

/// Two connections of one key: frames alternately from one and the other at `per_sec` in
/// all, each written on its own, so that the server sees the key's active connection change
/// with (nearly) every frame; without `switch`, every frame from the first (no change).
pub(super) async fn fight(
    ctx: &Ctx,
    mut conns: [Conn; 2],
    per_sec: f64,
    switch: bool,
) -> io::Result<()> {
    // NotePreferred(false): no reply, and no change to the home-connection gauge.
    let mut f = [0u8; HEADER_LEN + 1];
    let mut h = [0u8; HEADER_LEN];
    frame::encode_header(&mut h, FrameType::NotePreferred, 1);
    f[..HEADER_LEN].copy_from_slice(&h);
    let start = Instant::now();
    let mut sent = 0u64;
    while !ctx.stop.get() {
        let due = (start.elapsed().as_secs_f64() * per_sec) as u64;
        if due <= sent {
            Timer::after(Duration::from_millis(1)).await;
            continue;
        }
        // At most 64 frames between two looks at the clock and the stop flag.
        for _ in 0..(due - sent).min(64) {
            let c = &mut conns[usize::from(switch) * (sent & 1) as usize];
            c.queue(&f)?;
            c.flush().await?;
            sent += 1;
        }
        ctx.stats.fight_frames.set(sent);
    }
    Ok(())
}

/// Probe A: 64-byte packets carrying (sequence, send time in ns since `t0`) at `per_sec`.
pub(super) async fn probe_send(
    ctx: &Ctx,
    mut c: Conn,
    to: NodePublic,
    per_sec: f64,
) -> io::Result<()> {
    let mut f = send_frame(&to, PROBE_SIZE);
    let at = HEADER_LEN + KEY_LEN;
    let start = Instant::now();
    let mut seq = 0u64;
    while !ctx.stop.get() {
        let due = (start.elapsed().as_secs_f64() * per_sec) as u64;
        if due <= seq {
            let next = Duration::from_secs_f64((seq + 1) as f64 / per_sec);
            Timer::at(start + next).await;
            continue;
        }
        f[at..at + 8].copy_from_slice(&seq.to_be_bytes());
        let now = ctx.t0.elapsed().as_nanos() as u64;
        f[at + 8..at + 16].copy_from_slice(&now.to_be_bytes());
        c.queue(&f)?;
        c.flush().await?;
        seq += 1;
        ctx.stats.probes_sent.set(seq);
    }
    Ok(())
}

/// Probe B: sends every packet it receives on to `to`.
pub(super) async fn echo(mut c: Conn, to: NodePublic) -> io::Result<()> {
    let mut f = send_frame(&to, PROBE_SIZE);
    let at = HEADER_LEN + KEY_LEN;
    loop {
        let (t, r) = c.next_frame().await?;
        let pkt = &c.buf[r.start + KEY_LEN..r.end];
        if t == FrameType::RecvPacket as u8 && pkt.len() == PROBE_SIZE {
            f[at..].copy_from_slice(pkt);
            c.queue(&f)?;
            c.flush().await?;
        }
    }
}

/// Probe C: records each probe's round trip.
pub(super) async fn collect(ctx: &Ctx, mut c: Conn) -> io::Result<()> {
    loop {
        let (t, r) = c.next_frame().await?;
        let p = &c.buf[r.start + KEY_LEN..r.end];
        if t == FrameType::RecvPacket as u8 && p.len() == PROBE_SIZE {
            let now = ctx.t0.elapsed().as_nanos() as u64;
            let seq = u64::from_be_bytes(p[..8].try_into().unwrap_or_default());
            let sent = u64::from_be_bytes(p[8..16].try_into().unwrap_or_default());
            let mut probes = ctx.stats.probes.borrow_mut();
            probes.push((seq, now.saturating_sub(sent)));
        }
    }
}

pub(super) async fn idle(
    ex: &Rc<LocalExecutor<'_>>,
    ctx: &Rc<Ctx>,
    args: &Args,
) -> Result<Value, String> {
    let a = ctx.sample();
    let started = Instant::now();
    let held: Rc<RefCell<Vec<Conn>>> = Rc::default();
    let next = Rc::new(Cell::new(0usize));
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (c, held, next, n) = (ctx.clone(), held.clone(), next.clone(), args.clients);
        tasks.push(ex.spawn(async move {
            while next.get() < n {
                next.set(next.get() + 1);
                let key = ClientKey::generate();
                match login(&c, &key, SMALL_READ).await {
                    Ok(conn) => held.borrow_mut().push(conn),
                    Err(e) => return Err(format!("client {} of {n}: {e}", next.get())),
                }
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await?;
    }
    let connect_s = started.elapsed().as_secs_f64();
    // Let the server finish what the last logins started before reading its memory.
    Timer::after(Duration::from_secs_f64(args.warmup)).await;
    let b = ctx.sample();
    let n = held.borrow().len();
    let per = b.rss_kib.saturating_sub(a.rss_kib) as f64 / n.max(1) as f64;
    Ok(finish(
        ctx,
        json!({
            "clients": n,
            "connect_s": round(connect_s, 3),
            "rss_before_kib": a.rss_kib,
            "rss_after_kib": b.rss_kib,
            "hwm_kib": b.hwm_kib,
            "rss_per_client_kib": round(per, 2),
        }),
    ))
}

pub(super) async fn logins(
    ex: &Rc<LocalExecutor<'_>>,
    ctx: &Rc<Ctx>,
    args: &Args,
) -> Result<Value, String> {
    // Keys are made up front (the generator's CPU is for the logins) and reused round robin,
    // far enough apart that a key is never logged in twice at once.
    let keys: Rc<Vec<ClientKey>> = Rc::new(
        (0..args.concurrency.max(1) * 8)
            .map(|_| ClientKey::generate())
            .collect(),
    );
    let next = Rc::new(Cell::new(0usize));
    for _ in 0..args.concurrency.max(1) {
        let (c, keys, next) = (ctx.clone(), keys.clone(), next.clone());
        ex.spawn(async move {
            while !c.stop.get() {
                let i = next.get();
                next.set(i + 1);
                match login(&c, &keys[i % keys.len()], SMALL_READ).await {
                    Ok(conn) => {
                        Stats::add(&c.stats.logins, 1);
                        // Close with a reset: thousands of TIME_WAIT sockets per second would
                        // slow every later connect() and make runs depend on their history.
                        let _ = rustix::net::sockopt::set_socket_linger(
                            conn.tcp.get_ref(),
                            Some(Duration::ZERO),
                        );
                    }
                    Err(e) => c.note("login", Err(e)),
                }
            }
        })
        .detach();
    }
    Timer::after(Duration::from_secs_f64(args.warmup)).await;
    let a = ctx.sample();
    let failures_before = ctx.stats.failures.get();
    Timer::after(Duration::from_secs_f64(args.seconds)).await;
    let b = ctx.sample();
    ctx.stop.set(true);
    let (wall, server_s, v) = window(&a, &b);
    let n = b.logins - a.logins;
    Ok(finish(
        ctx,
        merge(
            v,
            json!({
                "concurrency": args.concurrency,
                "logins": n,
                "failures": ctx.stats.failures.get() - failures_before,
                "logins_per_s": round(n as f64 / wall, 1),
                "cpu_us_per_login": round(if n > 0 { server_s * 1e6 / n as f64 } else { 0.0 }, 1),
                "allocs_per_login": allocs_per(&a, &b, n),
                "insns_per_login": insns_per(&a, &b, n),
            }),
        ),
    ))
}
