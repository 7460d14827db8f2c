"""End-to-end tests of the generated Python bindings against the real
`ferry` server: `python3 -m unittest discover -s bindings/python/tests -v`
(after `cargo xtask bindings` and `cargo build -p ferry-server`).

Every wait is on an event (listener callbacks, awaited acks) with a bound;
figures are printed as `[py-e2e ...]` lines."""

import asyncio
import gc
import shutil
import tempfile
import threading
import time
import unittest

from support import T, FerryServer, HMAC_SECRET, Recorder, config, free_port_url, jwt

import ferry
from ferry import ConnectionState as CS
from ferry import FerryError, Qos

QOS = [Qos.AT_MOST_ONCE, Qos.AT_LEAST_ONCE, Qos.EXACTLY_ONCE]


def opts(qos=Qos.EXACTLY_ONCE):
    return ferry.SubscribeOptions(qos=qos, token=None)


async def until(rec, predicate, what):
    """Await `predicate(rec)` without blocking the event loop; fail after T."""
    ok = await asyncio.to_thread(rec.wait, predicate, T)
    if not ok:
        raise AssertionError(f"timed out after {T} s waiting for {what}; events: {rec.events[-10:]}")


class E2E(unittest.IsolatedAsyncioTestCase):
    def setUp(self):
        self.servers = []
        self.clients = []
        self.dirs = []

    async def asyncTearDown(self):
        for c in self.clients:
            await c.close(0)
        for s in self.servers:
            s.stop()
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)

    def server(self, **settings):
        s = FerryServer(**settings)
        self.servers.append(s)
        return s

    def client(self, url, cfg, provider=None):
        c = ferry.FerryClient(url, cfg, provider)
        self.clients.append(c)
        return c

    def tempdir(self):
        d = tempfile.mkdtemp(prefix="ferry-py-state-")
        self.dirs.append(d)
        return d

    async def subscribed(self, client, channel, qos=Qos.EXACTLY_ONCE, connect=True):
        rec = Recorder()
        handle = client.subscribe(channel, opts(qos), rec)
        if connect:
            await client.connect()
        await until(rec, lambda r: r.of("subscribed"), f"subscribed to {channel}")
        return rec, handle

    # ------------------------------------------------------------------

    async def test_publish_and_receive_at_qos_0_1_2(self):
        srv = self.server()
        alice = self.client(srv.url, config("alice-phone", "alice"))
        rec = Recorder()
        handle = alice.subscribe("chat:qos", opts(), rec)
        # The listener's first call is the current state, before connecting.
        await until(rec, lambda r: r.events, "the first callback")
        self.assertEqual(rec.events[0], ("state", CS.IDLE()))
        await alice.connect()
        await until(rec, lambda r: r.of("subscribed"), "subscribed")
        self.assertTrue(handle.is_active())

        bob = self.client(srv.url, config("bob-laptop", "bob"))
        await bob.connect()
        per_qos = 20
        started = time.monotonic()
        sent, acks = [], []
        for q in QOS:
            for i in range(per_qos):
                data = f"{q.name}:{i}".encode()
                acks.append(await bob.publish("chat:qos", data, q))
                sent.append((data, q))
        await until(rec, lambda r: len(r.publications()) >= len(sent), f"{len(sent)} publications")
        elapsed = time.monotonic() - started
        got = rec.publications()

        offsets = [a.offset for a in acks]
        self.assertEqual(offsets, sorted(set(offsets)), "acks give increasing, distinct offsets")
        self.assertEqual([(p.data, p.qos) for p in got], sent, "every publication, in order, once")
        self.assertEqual([p.offset for p in got], offsets)
        self.assertEqual({p.publisher.user for p in got}, {"bob"})
        self.assertEqual(len(rec.threads), 1, "callbacks come on one thread")
        self.assertNotIn(threading.get_ident(), rec.threads, "not on the caller's thread")

        page = await bob.history(ferry.HistoryRequest(channel="chat:qos", since=None, until=None, limit=1000, reverse=False))
        self.assertEqual([p.data for p in page.publications], [d for d, _ in sent])
        self.assertEqual(page.top.offset, offsets[-1])
        who = await bob.presence("chat:qos")
        stats = await bob.presence_stats("chat:qos")
        self.assertEqual([c.user for c in who], ["alice"])
        self.assertEqual((stats.clients, stats.users), (1, 1))
        print(
            f"\n[py-e2e qos] {len(got)} publications ({per_qos} each at QoS 0/1/2) acked and received in order "
            f"in {elapsed:.2f} s; history {len(page.publications)}; presence {len(who)} client"
        )

    async def test_server_restart_mid_stream_loses_nothing(self):
        srv = self.server()
        alice = self.client(srv.url, config("alice-restart", "alice"))
        rec, _handle = await self.subscribed(alice, "chat:restart")
        bob = self.client(srv.url, config("bob-restart", "bob"))
        await bob.connect()

        live, offline = 300, 100
        started = time.monotonic()

        async def stream():
            # One after another, each awaiting its ack: the stream is still
            # running when the server dies, and waits out the restart.
            return [await bob.publish("chat:restart", f"m{i}".encode(), Qos.AT_LEAST_ONCE) for i in range(live)]

        streaming = asyncio.ensure_future(stream())
        # kill -9 mid-stream: once the subscriber has seen the first 50.
        await until(rec, lambda r: len(r.publications()) >= 50, "the first 50 publications")
        srv.kill9()
        received_at_kill = len(rec.publications())
        # More while the server is down: they wait in the outbox.
        queued = [
            asyncio.ensure_future(bob.publish("chat:restart", f"m{i}".encode(), Qos.AT_LEAST_ONCE))
            for i in range(live, live + offline)
        ]
        srv.restart()
        acks = await asyncio.wait_for(streaming, 3 * T)
        acks += await asyncio.wait_for(asyncio.gather(*queued), T)
        total = live + offline
        await until(rec, lambda r: len(r.publications()) >= total, f"{total} publications")
        elapsed = time.monotonic() - started
        got = [p.data for p in rec.publications()]

        self.assertLess(received_at_kill, live, "the server died mid-stream")
        self.assertEqual(sorted(got), sorted(f"m{i}".encode() for i in range(total)), "nothing lost")
        self.assertEqual(len(got), len(set(got)), "nothing twice at QoS 2")
        offsets = [p.offset for p in rec.publications()]
        self.assertEqual(offsets, sorted(offsets), "in offset order")
        fresh = [a.offset for a in acks if not a.duplicate]
        self.assertEqual(len(set(fresh)), len(fresh), "one offset per stored publication")
        connected = [s for s in rec.of("state") if isinstance(s, CS.CONNECTED)]
        self.assertGreaterEqual(len(connected), 2, "the subscriber reconnected")
        gone = alice.last_disconnect()
        self.assertIsNotNone(gone, "the killed connection is reported")
        self.assertTrue(gone.reconnect)
        print(
            f"\n[py-e2e restart] {total} QoS 1 publishes ({live} streamed one by one, {offline} queued while the "
            f"server was down); kill -9 after {received_at_kill} received; all {len(got)} received once, in order, "
            f"{len(acks) - len(fresh)} acks flagged duplicate; last disconnect {gone.code} {gone.reason!r}; {elapsed:.2f} s"
        )

    async def test_offline_catch_up_across_client_instances(self):
        srv = self.server()
        state_dir = self.tempdir()
        carol_cfg = config("carol-phone", "carol", storage_dir=state_dir)
        bob = self.client(srv.url, config("bob-offline", "bob"))
        await bob.connect()

        first = ferry.FerryClient(srv.url, carol_cfg, None)
        rec1, handle1 = await self.subscribed(first, "inbox:carol")
        for i in range(5):
            await bob.publish("inbox:carol", f"early{i}".encode(), Qos.EXACTLY_ONCE)
        await until(rec1, lambda r: len(r.publications()) >= 5, "5 publications")
        self.assertEqual(await first.close(), [])
        handle1.cancel()

        missed = [f"late{i}".encode() for i in range(30)]
        for m in missed:
            await bob.publish("inbox:carol", m, Qos.EXACTLY_ONCE)

        # The app restarts: a new client instance on the same storage.
        started = time.monotonic()
        second = self.client(srv.url, carol_cfg)
        rec2, _h = await self.subscribed(second, "inbox:carol")
        await until(rec2, lambda r: len(r.publications()) >= len(missed), f"{len(missed)} missed publications")
        elapsed = time.monotonic() - started
        self.assertEqual([p.data for p in rec2.publications()], missed, "exactly what was missed, in order")
        self.assertEqual(rec2.of("subscribed")[0][1], True, "recovered without a gap")
        self.assertEqual(rec2.of("gap"), [])

        # The outbox is durable too: a publish that was never sent goes out
        # with the next instance.
        await second.close(1000)
        offline_client = ferry.FerryClient(srv.url, carol_cfg, None)
        pending = asyncio.ensure_future(offline_client.publish("inbox:carol", b"from the outbox", Qos.EXACTLY_ONCE))
        unacked = []
        # Each `unacked` call yields to the event loop, which starts the
        # publish; commands reach the client in order, so it shows up.
        for _ in range(100):
            unacked = await offline_client.unacked()
            if unacked:
                break
        self.assertEqual(len(unacked), 1)
        self.assertEqual(await offline_client.close(0), unacked, "still unacknowledged at shutdown")
        with self.assertRaises(FerryError.Closed):
            await pending
        bob_rec, _bh = await self.subscribed(bob, "inbox:carol", connect=False)
        third = self.client(srv.url, carol_cfg)
        await third.connect()
        await until(bob_rec, lambda r: b"from the outbox" in [p.data for p in r.publications()], "the outbox publish")
        print(
            f"\n[py-e2e offline] new client instance on the same storage got the {len(missed)} missed publications "
            f"(not the 5 seen before) in {elapsed:.2f} s, recovered=True; 1 outbox publish delivered by the next instance"
        )

    async def test_token_refresh_through_a_python_provider(self):
        srv = self.server(hmac_secret=HMAC_SECRET, ping_ms=500)
        # The client refreshes at half the remaining lifetime (less than its
        # default margin); a refused refresh is retried a second later, well
        # before expiry (`exp` has one-second resolution: lifetime 5-6 s).
        ttl = 6
        calls, expiries = [], []
        enough = threading.Event()

        class Provider(ferry.TokenProvider):
            def fetch_token(self):
                calls.append(time.monotonic())
                if len(calls) == 2:
                    raise FerryError.TokenProvider("token service unavailable")
                if len(calls) >= 4:
                    enough.set()
                expiries.append(int(time.time()) + ttl)
                return jwt("dora", ttl)

        started = time.monotonic()
        # No token in the config: the provider supplies the first one.
        dora = self.client(srv.url, config("dora-phone", None), Provider())
        self.assertEqual(len(calls), 1)
        rec = Recorder()
        handle = dora.subscribe("chat:tokens", opts(), rec)
        await dora.connect()
        await until(rec, lambda r: r.of("subscribed"), "subscribed")
        self.assertTrue(await asyncio.to_thread(enough.wait, 3 * ttl + T), f"provider called {len(calls)} times")

        def dropped(r):
            states = r.of("state")
            first_live = next(i for i, s in enumerate(states) if isinstance(s, CS.CONNECTED))
            return [s for s in states[first_live:] if not isinstance(s, CS.CONNECTED)]

        # Stay on until the first token has expired: a drop ends the wait
        # early and fails (the server closes connections at expiry).
        past_first = expiries[0] + 1 - time.time()
        if past_first > 0:
            self.assertFalse(await asyncio.to_thread(rec.wait, dropped, past_first), f"dropped: {dropped(rec)}")
        self.assertFalse(dropped(rec), "refreshed in place, never reconnected")
        lived = time.monotonic() - started

        ack = await dora.publish("chat:tokens", b"still here", Qos.EXACTLY_ONCE)
        await until(rec, lambda r: r.publications(), "the publication")
        self.assertEqual(rec.publications()[-1].offset, ack.offset)
        self.assertEqual(rec.publications()[-1].publisher.user, "dora", "authenticated by the provider's token")
        self.assertTrue(handle.is_active())
        print(
            f"\n[py-e2e token] tokens of {ttl} s from a Python provider: {len(calls)} calls (1 refused and "
            f"retried); one connection for {lived:.1f} s, past the first token's expiry; publish round trip "
            f"at offset {ack.offset}"
        )

    async def test_errors_surface_as_python_exceptions(self):
        srv = self.server()
        seen = []

        with self.assertRaises(FerryError.Config) as e:
            ferry.FerryClient(srv.url, config("", "x"), None)
        seen.append(e.exception)

        erin = self.client(srv.url, config("erin-phone", "erin"))
        with self.assertRaises(FerryError.NotConnected) as e:
            await erin.publish("chat:errors", b"qos 0 offline", Qos.AT_MOST_ONCE)
        seen.append(e.exception)
        with self.assertRaises(FerryError.NotConnected) as e:
            await erin.history(ferry.HistoryRequest(channel="chat:errors", since=None, until=None, limit=10, reverse=False))
        seen.append(e.exception)

        await erin.connect()
        with self.assertRaises(FerryError.Rejected) as e:
            await erin.publish("readonly:news", b"not allowed", Qos.AT_LEAST_ONCE)
        self.assertEqual(e.exception.code, 103, "permission denied")
        self.assertFalse(e.exception.temporary)
        seen.append(e.exception)
        with self.assertRaises(FerryError.TooLarge) as e:
            await erin.publish("chat:errors", b"x" * 200_000, Qos.AT_LEAST_ONCE)
        self.assertEqual(e.exception.size, 200_000)
        self.assertLess(e.exception.limit, 200_000)
        seen.append(e.exception)

        nowhere = self.client(free_port_url(), config("erin-nowhere", "erin", connect_timeout_ms=300))
        with self.assertRaises(FerryError.Timeout) as e:
            await nowhere.connect()
        self.assertEqual(e.exception.timeout_ms, 300)
        seen.append(e.exception)

        await erin.close(0)
        with self.assertRaises(FerryError.Closed) as e:
            await erin.publish("chat:errors", b"after shutdown", Qos.AT_LEAST_ONCE)
        seen.append(e.exception)

        jwt_srv = self.server(hmac_secret=HMAC_SECRET)
        forged = self.client(jwt_srv.url, config("mallory-phone", "not-a-jwt"))
        with self.assertRaises(FerryError.Refused) as e:
            await forged.connect()
        seen.append(e.exception)

        for ex in seen:
            self.assertIsInstance(ex, FerryError)
        print("\n[py-e2e errors] " + "; ".join(f"{type(ex).__name__}: {ex}" for ex in seen))

    async def test_join_leave_and_handles_unsubscribe(self):
        srv = self.server(grace_ms=200)
        alice = self.client(srv.url, config("alice-room", "alice"))
        rec_a, _ha = await self.subscribed(alice, "room:lobby")
        bob = self.client(srv.url, config("bob-room", "bob"))
        rec_b, handle_b = await self.subscribed(bob, "room:lobby")
        await until(rec_a, lambda r: [i for i in r.of("join") if i.user == "bob"], "bob's join")

        handle_b.cancel()
        self.assertFalse(handle_b.is_active())
        await until(rec_a, lambda r: [i for i in r.of("leave") if i.user == "bob"], "bob's leave")
        before = len(rec_b.events)
        ack = await alice.publish("room:lobby", b"after bob left", Qos.AT_LEAST_ONCE)
        await until(rec_a, lambda r: [p for p in r.publications() if p.offset == ack.offset], "alice's publication")
        self.assertEqual(len(rec_b.events), before, "no callback after cancel")

        # Dropping a handle unsubscribes too (Python frees it at once).
        carol = self.client(srv.url, config("carol-room", "carol"))
        rec_c, handle_c = await self.subscribed(carol, "room:lobby")
        await until(rec_a, lambda r: [i for i in r.of("join") if i.user == "carol"], "carol's join")
        del handle_c
        gc.collect()
        await until(rec_a, lambda r: [i for i in r.of("leave") if i.user == "carol"], "carol's leave after drop")
        stats = await alice.presence_stats("room:lobby")
        self.assertEqual((stats.clients, stats.users), (1, 1))
        print(
            f"\n[py-e2e presence] joins {len(rec_a.of('join'))}, leaves {len(rec_a.of('leave'))} "
            "(cancel and drop both unsubscribe); presence back to 1"
        )

    async def test_app_lifecycle_hooks(self):
        srv = self.server()
        frank = self.client(srv.url, config("frank-phone", "frank"))
        states = Recorder()
        observer = frank.observe_state(states)
        await until(states, lambda r: r.events, "the current state")
        self.assertEqual(states.events[0], ("state", CS.IDLE()))
        rec, _h = await self.subscribed(frank, "chat:lifecycle")
        bob = self.client(srv.url, config("bob-lifecycle", "bob"))
        await bob.connect()

        frank.app_background()
        await until(states, lambda r: isinstance(r.of("state")[-1], CS.OFFLINE), "offline in the background")
        self.assertIsInstance(frank.state(), CS.OFFLINE)
        for i in range(10):
            await bob.publish("chat:lifecycle", f"bg{i}".encode(), Qos.AT_LEAST_ONCE)
        frank.app_foreground()
        await until(rec, lambda r: len(r.publications()) >= 10, "what came while in the background")
        self.assertEqual([p.data for p in rec.publications()], [f"bg{i}".encode() for i in range(10)])

        # A network change while connected reconnects at once, losing nothing.
        connected_before = len([s for s in states.of("state") if isinstance(s, CS.CONNECTED)])
        frank.network_changed()
        await until(
            states,
            lambda r: len([s for s in r.of("state") if isinstance(s, CS.CONNECTED)]) > connected_before,
            "reconnected after the network change",
        )
        ack = await bob.publish("chat:lifecycle", b"after the change", Qos.AT_LEAST_ONCE)
        await until(rec, lambda r: r.publications()[-1].offset == ack.offset, "the publication after the change")
        observer.cancel()
        print(
            f"\n[py-e2e lifecycle] states seen: {len(states.of('state'))}; offline in the background; "
            "10 publications from the background delivered on foreground; network_changed reconnected with "
            "nothing lost"
        )


    async def test_close_ends_in_the_closed_state(self):
        srv = self.server()
        gina = self.client(srv.url, config("gina-phone", "gina"))
        states = Recorder()
        observer = gina.observe_state(states)
        await gina.connect()
        await until(states, lambda r: isinstance(r.of("state")[-1], CS.CONNECTED), "connected")
        self.assertEqual(await gina.close(0), [])
        # close() returns once the driver has stopped; the observer's last
        # call is the final state.
        await until(states, lambda r: not isinstance(r.of("state")[-1], CS.CONNECTED), "a state after close")
        self.assertEqual(states.of("state")[-1], CS.CLOSED(code=1000, reason="client closed"))
        self.assertEqual(gina.state(), CS.CLOSED(code=1000, reason="client closed"))
        with self.assertRaises(FerryError.Closed):
            await gina.publish("chat:late", b"after close", Qos.AT_LEAST_ONCE)
        observer.cancel()

    def client_urls(self, urls, cfg):
        c = ferry.FerryClient.with_urls(urls, cfg, None)
        self.clients.append(c)
        return c

    async def test_several_urls_a_dead_one_is_skipped_for_the_live_one(self):
        srv = self.server()
        dead = free_port_url()
        started_dead = 0
        # Fixed seeds: the first URL comes from the seed, so some start on
        # the dead one and the move to the next is exercised deterministically.
        for seed in range(6):
            c = self.client_urls([dead, srv.url], config(f"urls-{seed}", "ivy", seed=seed, backoff_min_ms=20))
            await c.connect()
            self.assertIsInstance(c.state(), CS.CONNECTED)
            if c.last_disconnect() is not None:
                started_dead += 1  # a failed attempt on the dead URL came first
            ack = await c.publish("chat:urls", bytes([seed]), Qos.AT_LEAST_ONCE)
            self.assertEqual(ack.offset, seed + 1, "stored on the live server")
        self.assertGreater(started_dead, 0, "no seed started on the dead URL: failover not exercised")
        with self.assertRaises(FerryError.Config):
            ferry.FerryClient.with_urls([srv.url, "http://127.0.0.1:9/ws"], config("urls-bad", "ivy"), None)
        with self.assertRaises(FerryError.Config):
            ferry.FerryClient.with_urls([], config("urls-empty", "ivy"), None)

    async def test_several_urls_fail_over_when_the_server_in_use_is_killed(self):
        a, b = self.server(), self.server()
        jay = self.client_urls([a.url, b.url], config("jay-phone", "jay", backoff_min_ms=20))
        rec, handle = await self.subscribed(jay, "chat:fo", Qos.AT_LEAST_ONCE)
        # The two servers share nothing: a watcher on each tells by presence
        # which one the client is on.
        on = []
        for i, s in enumerate([a, b]):
            w = self.client(s.url, config(f"urls-watch-{i}", f"watch{i}"))
            await w.connect()
            on.append((await w.presence_stats("chat:fo")).clients == 1)
        self.assertEqual(sum(on), 1, f"on exactly one server: {on}")
        gone = a if on[0] else b
        started = time.monotonic()
        gone.kill9()
        await until(rec, lambda r: len(r.of("subscribed")) >= 2, "subscribed again, on the other server")
        await until(rec, lambda r: isinstance(r.of("state")[-1], CS.CONNECTED), "connected again")
        moved_ms = (time.monotonic() - started) * 1000
        self.assertIsNotNone(jay.last_disconnect())
        ack = await jay.publish("chat:fo", b"after failover", Qos.AT_LEAST_ONCE)
        await until(rec, lambda r: any(p.offset == ack.offset for p in r.publications()), "the publication there")
        self.assertEqual(rec.publications()[-1].data, b"after failover")
        handle.cancel()
        print(f"\n[py-e2e failover] kill -9 of the server in use -> subscribed on the other: {moved_ms:.0f} ms")

if __name__ == "__main__":
    unittest.main(verbosity=2)
