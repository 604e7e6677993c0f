"""What coi-net costs: apply against the raw nftables floor, and a 200-name refresh.

Prints median wall times over N runs (default 11):
  * the same apply transaction sent by `nft -j -f -` (the floor of any tool
    that shells out) and by libnftables in-process (what coi uses);
  * ops.apply in-process (2 Incus requests + nft listing + one transaction +
    state write) and `coi-net apply` as a program, restricted and allowlist;
  * refreshing an allowlist of 200 names against a local DNS server (dnsmasq
    in a network namespace of its own), in-process and as a program, with the
    number of nft transactions it took;
  * the allowlist resolver (coi-net dns): one answer through it (upstream +
    the answer's addresses into the container's set, one nft transaction)
    against the same query sent to the upstream alone, and a denied name;
  * `import pyroute2` (why it stays off these paths).
Targets: `coi-net apply` under 100 ms; the 200-name refresh under 1 s in ONE
transaction; the resolver adds under 10 ms to an answer. Exit 1 when a
target is missed.

Needs root, Incus and the test image (make test-image). Everything it makes is
named coi-test-bench<hex> / coi_test_bench<hex> and removed at the end (and by
tests/sweep.py after a crash). It holds the test run lock, shared.
With --rows FILE it also writes the rows the suite's one table shows (coi-net apply
on a new container and the 200-name refresh, every sample against the floor of one
`nft -j -f -` of the same rules), which `python -m bench` hands to porcelain.py.
Run: sudo .venv/bin/python bench/net.py [RUNS] [--rows FILE]
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "lib"), str(ROOT / "coi-net")]

import dns.message  # noqa: E402
import dns.query  # noqa: E402
import dns.rcode  # noqa: E402

from coi_common.incus import Incus  # noqa: E402
from coi_net import nft, ops, resolver  # noqa: E402
from coi_net import policy as np  # noqa: E402

IMAGE = "coi-test-image"
APPLY_TARGET_MS = 100.0
REFRESH_TARGET_MS = 1000.0
RESOLVER_TARGET_MS = 10.0
QUERIES = 41
NAMES = 200
DNS_ADDR = "198.51.100.53"
PYTHON = str(ROOT / ".venv" / "bin" / "python")
COI_NET = str(ROOT / "bin" / "coi-net")


def samples_ms(action: Callable[[], object], runs: int,
               before: Callable[[int], object] | None = None) -> list[float]:
    samples = []
    for number in range(runs):
        if before is not None:
            before(number)
        start = time.perf_counter()
        action()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def median_ms(action: Callable[[], object], runs: int,
              before: Callable[[int], object] | None = None) -> float:
    return statistics.median(samples_ms(action, runs, before))


def nft_floor(text: str) -> Callable[[], None]:
    """One `nft -j -f -` of a transaction's JSON: what any tool that shells out pays."""
    def run() -> None:
        subprocess.run(["nft", "-j", "-f", "-"], input=text, text=True, check=True,
                       capture_output=True)
    return run


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def program(*argv: str) -> Callable[[], None]:
    def run() -> None:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
        if done.returncode not in (0, 1):
            raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return run


class Dns:
    """dnsmasq in a namespace of its own, answering NAMES test names."""

    def __init__(self, ns: str, veth: str, folder: Path) -> None:
        self.ns, self.veth, self.folder = ns, veth, folder
        self.child: subprocess.Popen | None = None
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "addr", "add", "198.51.100.1/24", "dev", veth)
        sh("ip", "link", "set", veth, "up")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{DNS_ADDR}/24", "dev", "eth0")

    def serve(self, round_number: int) -> None:
        """Round 0 maps name i to 198.51.100.(i+1), round 1 to 198.18.0.(i+1)."""
        self.stop()
        base = "198.51.100" if round_number % 2 == 0 else "198.18.0"
        conf = self.folder / "dnsmasq.conf"
        conf.write_text("".join(f"address=/n{i:03d}.bench.test/{base}.{i + 1}\n"
                                for i in range(NAMES)))
        self.child = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "dnsmasq", "--keep-in-foreground",
             f"--conf-file={conf}", "--no-resolv", "--no-hosts", "--bind-interfaces",
             f"--listen-address={DNS_ADDR}", "--pid-file=", "--local-ttl=0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            found = np.resolve(["n000.bench.test"], [np.Resolver(DNS_ADDR)],
                               bridge=BRIDGE_FOR_PROBE, timeout=0.2)
            if found["n000.bench.test"].status == "ok":
                return
        raise SystemExit("the bench DNS server did not answer")

    def stop(self) -> None:
        if self.child is not None:
            self.child.terminate()
            self.child.wait(timeout=5)
            self.child = None

    def remove(self) -> None:
        self.stop()
        subprocess.run(["ip", "netns", "delete", self.ns], check=False, capture_output=True)


BRIDGE_FOR_PROBE = np.Bridge("coibr0", np.ipaddress.IPv4Interface("10.151.43.1/24"))


def _run_lock() -> object:
    spec = importlib.util.spec_from_file_location("coi_bench_sweep", ROOT / "tests" / "sweep.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lock = module.RunLock()
    lock.share()
    return lock


@dataclass(frozen=True)
class SuiteRow:
    """A row for the suite's one table (porcelain.py --net-rows): every sample of this
    checkout and of its floor, in ms."""

    label: str
    this: list[float]
    floor: list[float]


@dataclass(frozen=True)
class Measured:
    """Every row of this bench's own table (label, median ms, note), the rows for the
    suite's table, the targets' numbers and the most transactions one refresh took."""

    rows: list[tuple[str, float, str]]
    suite: list[SuiteRow]
    apply_cli: float
    refresh_ms: float
    transactions: int
    resolver_added: float


def measure(client: Incus, dns: Dns, table: str, name: str, folder: Path, *,
            runs: int) -> Measured:
    ctx = ops.Context(client, table, np.Store(str(folder / "state")), "coibr0")
    restricted = ops.Request(name, "restricted", np.Allowed(), (), 30)
    ops.apply(ctx, restricted)  # NIC override in place, as coi-shell creates it
    bridge = ops.bridge_facts(client, "coibr0")
    ifname = np.host_name_for(name)
    commands = np.base_commands(table, bridge) + np.container_commands(
        table, np.Policy(name, ifname, "restricted"), bridge, ctx.existing())
    text = nft.dump(commands)
    rows: list[tuple[str, float, str]] = []
    apply_floor = samples_ms(nft_floor(text), runs)
    rows.append(("floor: nft -j -f - (same transaction)", statistics.median(apply_floor),
                 f"{len(commands)} commands"))
    rows.append(("libnftables in-process (same)", median_ms(
        lambda: nft.run(commands, table=table), runs), nft.backend()))
    rows.append(("ops.apply in-process, restricted",
                 median_ms(lambda: ops.apply(ctx, restricted), runs), ""))
    apply_cli = median_ms(program(COI_NET, "apply", name), runs)
    rows.append(("coi-net apply, restricted", apply_cli, "what a session start pays"))
    fresh = [f"{name}-n{number}" for number in range(runs)]
    turn = iter(fresh)

    def apply_next() -> None:
        program(COI_NET, "apply", next(turn))()

    try:
        apply_new = samples_ms(apply_next, runs, before=lambda number: client.create_instance(
            fresh[number], IMAGE, profiles=["coi"]))
        rows.append(("coi-net apply, a new container", statistics.median(apply_new),
                     "+ its NIC and start hook (one PATCH)"))
    finally:
        for other in fresh:
            client.delete_instance_force(other)
    rows.append(("coi-net apply, allowlist of 3 names", median_ms(program(
        COI_NET, "apply", name, "--mode", "allowlist", "--resolver", DNS_ADDR,
        "--allow", "n000.bench.test", "--allow", "n001.bench.test", "--allow",
        "n002.bench.test"), runs), "+ dnspython import and 3 lookups"))
    many = ops.Request(name, "allowlist", np.Allowed(tuple(
        f"n{i:03d}.bench.test" for i in range(NAMES))), (np.Resolver(DNS_ADDR),), 30)
    ops.apply(ctx, many)
    before = nft.STATS.transactions
    counts: list[int] = []

    def refresh_once() -> None:
        start = nft.STATS.transactions
        records = ops.refresh(ctx, [name])
        counts.append(nft.STATS.transactions - start)
        if not records[0]["changed"]:
            raise SystemExit("the refresh did not change the set; bench is broken")

    refresh_ms = median_ms(refresh_once, runs, before=lambda n: dns.serve(n + 1))
    del before
    allowed = len(ctx.store.load(name)["names"])
    rows.append((f"refresh {NAMES} names, in-process", refresh_ms,
                 f"{max(counts)} transaction(s) each; {allowed} names"))
    refresh_cli = samples_ms(program(COI_NET, "refresh", name), runs, before=dns.serve)
    rows.append((f"coi-net refresh NAME, {NAMES} names", statistics.median(refresh_cli), ""))
    allowlist = np.Policy(name, ifname, "allowlist",
                          np.state_addresses(ctx.store.load(name)))
    refresh_floor = samples_ms(nft_floor(nft.dump(np.container_commands(
        table, allowlist, bridge, ctx.existing()))), runs)
    suite = [SuiteRow("`coi-net apply NAME`, a new container (floor: nft -f of its rules)",
                      apply_new, apply_floor),
             SuiteRow(f"`coi-net refresh NAME`, {NAMES} names, local DNS (floor: nft -f of "
                      "its rules)", refresh_cli, refresh_floor)]
    dns.serve(0)
    added = resolver_rows(ctx, name, rows)
    floor = median_ms(program(PYTHON, "-c", "pass"), runs)
    pyroute2 = median_ms(program(PYTHON, "-c", "import pyroute2"), runs) - floor
    rows.append(("import pyroute2 (above python -c pass)", pyroute2, "kept off these paths"))
    return Measured(rows, suite, apply_cli, refresh_ms, max(counts), added)


def resolver_rows(ctx: ops.Context, name: str, rows: list[tuple[str, float, str]]) -> float:
    """The resolver on 127.0.0.1 (taken for the container's address) against the
    upstream alone, QUERIES of each, interleaved; returns the median it adds (ms)."""
    directory = resolver.Directory(ctx.store, lambda container, _ifname:
                                   {"127.0.0.1"} if container == name else set())
    answerer = resolver.Answerer(ctx.table, directory, (),
                                 lambda commands: nft.run(commands, table=ctx.table))
    servers = resolver.listen(answerer, "127.0.0.1", 0)
    port = servers[0].server_address[1]
    samples: dict[str, list[float]] = {"upstream": [], "resolver": [], "denied": []}
    try:
        for number in range(QUERIES):
            allowed = dns.message.make_query(f"n{number % NAMES:03d}.bench.test", "A")
            for label, query, where in (
                    ("upstream", allowed, (DNS_ADDR, 53)),
                    ("resolver", allowed, ("127.0.0.1", port)),
                    ("denied", dns.message.make_query("x.not-listed.test", "A"),
                     ("127.0.0.1", port))):
                start = time.perf_counter()
                reply = dns.query.udp(query, where[0], port=where[1], timeout=2)
                samples[label].append((time.perf_counter() - start) * 1000)
                if reply.rcode() != (dns.rcode.NXDOMAIN if label == "denied" else
                                     dns.rcode.NOERROR):
                    raise SystemExit(f"the resolver bench got {dns.rcode.to_text(reply.rcode())}"
                                     f" for {label}")
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    medians = {label: statistics.median(values) for label, values in samples.items()}
    rows.append(("floor: one query to the upstream alone", medians["upstream"],
                 f"{QUERIES} queries"))
    rows.append(("the same through coi-net dns", medians["resolver"],
                 "upstream + 1 nft transaction (the answer's address)"))
    rows.append(("a name not allowed (NXDOMAIN, nothing sent)", medians["denied"], ""))
    return medians["resolver"] - medians["upstream"]


def arguments(argv: list[str]) -> tuple[int, Path | None]:
    """[RUNS] [--rows FILE]: the runs of each row, and where the suite's rows go."""
    rows: Path | None = None
    if "--rows" in argv:
        at = argv.index("--rows")
        if at + 1 >= len(argv):
            raise SystemExit("net.py: --rows needs a file name")
        rows = Path(argv[at + 1])
        argv = argv[:at] + argv[at + 2:]
    if len(argv) > 1 or (argv and not argv[0].isdigit()) or (argv and int(argv[0]) < 1):
        raise SystemExit(f"net.py: usage: net.py [RUNS] [--rows FILE], got {' '.join(argv)}")
    return (int(argv[0]) if argv else 11), rows


def main() -> int:
    runs, rows_file = arguments(sys.argv[1:])
    if os.geteuid() != 0:
        raise SystemExit("bench/net.py changes nftables: run it as root")
    lock = _run_lock()
    # Without byte code on disk (PYTHONDONTWRITEBYTECODE) every start recompiles.
    subprocess.run([PYTHON, "-m", "compileall", "-q", "lib",
                    *(p.name for p in ROOT.glob("coi-*"))],
                   cwd=ROOT, check=False, capture_output=True)
    tag = secrets.token_hex(3)
    table, name = f"coi_test_bench{tag}", f"coi-test-bench{tag}"
    folder = Path(tempfile.mkdtemp(prefix="coi-test-bench-"))
    os.environ.update(COI_NFT_TABLE=table, COI_NET_STATE_DIR=str(folder / "state"))
    client = Incus()
    dns: Dns | None = None
    try:
        client.create_instance(name, IMAGE, profiles=["coi"])
        dns = Dns(f"coi-test-bench{tag}", f"ctb{tag}", folder)
        dns.serve(0)
        measured = measure(client, dns, table, name, folder, runs=runs)
        apply_cli, refresh_ms = measured.apply_cli, measured.refresh_ms
        transactions, added = measured.transactions, measured.resolver_added
        if rows_file is not None:
            rows_file.write_text(json.dumps([asdict(row) for row in measured.suite]))
        print(f"{'what':<42} {'median ms':>10}  note")
        for label, ms, note in measured.rows:
            print(f"{label:<42} {ms:>10.1f}  {note}")
        ok_apply = apply_cli < APPLY_TARGET_MS
        ok_refresh = refresh_ms < REFRESH_TARGET_MS and transactions == 1
        ok_resolver = added < RESOLVER_TARGET_MS
        print(f"coi-net apply {'meets' if ok_apply else 'MISSES'} the {APPLY_TARGET_MS:.0f} ms "
              f"target ({apply_cli:.1f} ms); refresh of {NAMES} names "
              f"{'meets' if ok_refresh else 'MISSES'} {REFRESH_TARGET_MS:.0f} ms in one "
              f"transaction ({refresh_ms:.1f} ms, {transactions} transaction(s)); the "
              f"resolver adds {added:.1f} ms ({'meets' if ok_resolver else 'MISSES'} "
              f"{RESOLVER_TARGET_MS:.0f} ms); {runs} runs")
        return 0 if ok_apply and ok_refresh and ok_resolver else 1
    finally:
        if dns is not None:
            dns.remove()
        try:
            client.delete_instance_force(name)
        finally:
            for family in nft.FAMILIES:
                subprocess.run(["nft", "delete", "table", family, table], check=False,
                               capture_output=True)
            shutil.rmtree(folder, ignore_errors=True)
            lock.release()


if __name__ == "__main__":
    sys.exit(main())
