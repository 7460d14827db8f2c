// JVM smoke test of the generated Kotlin bindings against the real `ferry`
// server: connect, subscribe with a Kotlin listener, QoS 1 publish and
// receive, a Kotlin token provider, errors as FerryException subclasses.
// Run by sdk-ffi/test.sh (kotlinc + JNA); exits non-zero on any failure.

import dev.ferry.sdk.*
import java.io.File
import java.nio.file.Files
import java.util.concurrent.LinkedBlockingQueue
import java.util.concurrent.TimeUnit
import java.util.concurrent.atomic.AtomicInteger
import kotlinx.coroutines.runBlocking

const val WAIT_S = 20L

fun check(ok: Boolean, what: String) {
    if (!ok) throw IllegalStateException("smoke check failed: $what")
}

/** `ferry serve` on an ephemeral loopback port; the URL is its first stdout line. */
class Server(bin: String) : AutoCloseable {
    private val dir = Files.createTempDirectory("ferry-kotlin-smoke").toFile()
    private val proc: Process
    val url: String

    init {
        val cfg = File(dir, "ferry.toml")
        cfg.writeText(
            "[limits]\npublish_rate = 0\nmax_connections_per_user = 0\nconnections_per_ip_per_minute = 0\n\n" +
                "[namespaces.default]\nhistory_size = 1000\n\n[namespaces.readonly]\nclient_publish = false\n"
        )
        val pb = ProcessBuilder(bin, "serve", "--config", cfg.path, "--listen", "127.0.0.1:0",
            "--data-dir", File(dir, "data").path)
        // Only the file configures it (the server reads FERRY_* variables).
        pb.environment().keys.removeIf { it.startsWith("FERRY_") && it != "FERRY_LOG" }
        pb.redirectError(ProcessBuilder.Redirect.INHERIT)
        proc = pb.start()
        val lines = LinkedBlockingQueue<String>()
        // Keep draining stdout so the server never blocks on a full pipe.
        Thread { proc.inputStream.bufferedReader().forEachLine { lines.add(it) } }.apply { isDaemon = true }.start()
        val first = lines.poll(15, TimeUnit.SECONDS) ?: throw IllegalStateException("ferry did not start")
        url = first.split(" ")[3] // "ferry listening on ws://127.0.0.1:PORT/ws ..."
    }

    override fun close() {
        proc.destroyForcibly().waitFor(10, TimeUnit.SECONDS)
        dir.deleteRecursively()
    }
}

class Recorder : SubscriptionListener {
    val states = LinkedBlockingQueue<ConnectionState>()
    val events = LinkedBlockingQueue<String>()
    val publications = LinkedBlockingQueue<Publication>()
    @Volatile var first: String? = null

    private fun mark(kind: String) {
        if (first == null) first = kind
        events.add(kind)
    }

    override fun onState(state: ConnectionState) { mark("state"); states.add(state) }
    override fun onSubscribed(position: StreamPosition, recovered: Boolean) = mark("subscribed")
    override fun onPublication(publication: Publication) { mark("publication"); publications.add(publication) }
    override fun onJoin(info: ClientInfo) = mark("join")
    override fun onLeave(info: ClientInfo) = mark("leave")
    override fun onGap(gap: Gap) = mark("gap")
    override fun onEnded(code: UShort, reason: String) = mark("ended")

    fun waitFor(kind: String): Boolean {
        val end = System.nanoTime() + TimeUnit.SECONDS.toNanos(WAIT_S)
        while (System.nanoTime() < end) {
            val e = events.poll(end - System.nanoTime(), TimeUnit.NANOSECONDS) ?: return false
            if (e == kind) return true
        }
        return false
    }
}

fun main() {
    val bin = System.getenv("FERRY_BIN") ?: throw IllegalStateException("set FERRY_BIN to the ferry binary")
    val started = System.nanoTime()
    Server(bin).use { srv ->
        runBlocking {
            val stateDir = Files.createTempDirectory("ferry-kotlin-state").toFile()
            val alice = FerryClient(srv.url, ClientConfig(deviceId = "kotlin-alice", token = "alice",
                storageDir = stateDir.path), null)
            val rec = Recorder()
            val handle = alice.subscribe("chat:kotlin", SubscribeOptions(Qos.EXACTLY_ONCE, null), rec)
            alice.connect()
            check(rec.waitFor("subscribed"), "subscribed")
            check(rec.first == "state", "the listener's first call is the current state (got ${rec.first})")

            // A Kotlin token provider supplies the publisher's token.
            val asked = AtomicInteger()
            val provider = object : TokenProvider {
                override fun fetchToken(): String { asked.incrementAndGet(); return "carol" }
            }
            val carol = FerryClient(srv.url, ClientConfig(deviceId = "kotlin-carol"), provider)
            carol.connect()
            check(asked.get() == 1, "token provider asked once (${asked.get()})")

            val n = 50
            val acks = (0 until n).map { carol.publish("chat:kotlin", "k$it".toByteArray(), Qos.AT_LEAST_ONCE) }
            val got = (0 until n).map {
                rec.publications.poll(WAIT_S, TimeUnit.SECONDS) ?: throw IllegalStateException("publication $it missing")
            }
            check(got.map { String(it.data) } == (0 until n).map { "k$it" }, "all publications, in order")
            check(got.map { it.offset } == acks.map { it.offset }, "offsets match the acks")
            check(got.all { it.publisher?.user == "carol" }, "publisher is the provider's user")

            // Errors arrive as FerryException subclasses with their fields.
            val rejected = try {
                carol.publish("readonly:news", "nope".toByteArray(), Qos.AT_LEAST_ONCE); null
            } catch (e: FerryException.Rejected) { e }
            check(rejected?.code?.toInt() == 103, "Rejected(103) for a read-only namespace")
            val config = try {
                FerryClient(srv.url, ClientConfig(deviceId = "", token = "x"), null); null
            } catch (e: FerryException.Config) { e }
            check(config != null, "Config error for an empty device id")

            handle.cancel()
            check(!handle.isActive(), "cancelled handle is inactive")
            handle.close()
            check(alice.shutdown().isEmpty(), "nothing unacknowledged")
            carol.shutdown(1000uL)
            alice.close()
            carol.close()
            stateDir.deleteRecursively()
            val ms = (System.nanoTime() - started) / 1_000_000
            println("[kotlin-smoke] $n QoS 1 publications acked and received in order via a Kotlin listener; " +
                "token provider called ${asked.get()}x; errors: Rejected(${rejected?.code}) and Config; $ms ms")
        }
    }
}
