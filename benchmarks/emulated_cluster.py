"""Emulated slow cluster: exchange step time of Adam, 1-bit Adam and CD-Adam over a rate-limited network.

    sudo python benchmarks/emulated_cluster.py [--numel 1.1e8] [--rates 1gbit 10gbit] [--repeats 3]

Each rank runs in its own network namespace, joined to the others by a veth pair on one bridge,
with a ``tc`` token-bucket limit on its interface (the recipe of ../shared/DESIGN.md). For each
rate, 2 gloo ranks time one exchange step of a BERT-base-sized fp32 buffer (110M parameters):
Adam's fp32 all-reduce, 1-bit Adam's compressed phase and CD-Adam (blocks of 2048, fused CPU
kernels; and the paper's one-scale-per-shard layout, eager torch). The namespaces, veths and
bridge are removed on exit, also on error or Ctrl-C. Without root or ``ip netns`` it says so and
exits 0. Writes ``benchmarks/results/emulated_cluster.{csv,txt,png}``, and appends the report, with
the time, to ``emulated_cluster_history.txt`` (run after run: the machine and its load are named,
as other work on a shared machine changes the timings).

Only addresses inside these namespaces are used (a /24 of 10.213.x.x that exists nowhere else).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import glob
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exchange_methods import ADAM, CDADAM, METHODS, ONEBIT, describe_machine

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"
SUBNET = "10.213.77"
TARGET_SPEEDUP_1GBIT = 10.0
# token-bucket burst per rate: about rate / HZ (250) so the shaper is not burst-starved
BURST = {"1gbit": "512kbit", "10gbit": "5mbit"}


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check)


class Cluster:
    """``world`` namespaces on a bridge; ``with Cluster(...)`` guarantees the teardown."""

    def __init__(self, world: int) -> None:
        tag = secrets.token_hex(2)
        self.world = world
        self.bridge = f"cdbr{tag}"
        self.namespaces = [f"cdadam-{tag}-r{r}" for r in range(world)]
        self.host_veths = [f"cdv{tag}r{r}" for r in range(world)]
        self.addresses = [f"{SUBNET}.{10 + r}" for r in range(world)]

    def __enter__(self) -> Cluster:  # noqa: PYI034
        try:
            sh("ip", "link", "add", self.bridge, "type", "bridge")
            sh("ip", "link", "set", self.bridge, "up")
            for ns, veth, addr in zip(self.namespaces, self.host_veths, self.addresses):
                sh("ip", "netns", "add", ns)
                sh("ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
                sh("ip", "link", "set", f"{veth}p", "netns", ns)
                sh("ip", "netns", "exec", ns, "ip", "link", "set", f"{veth}p", "name", "eth0")
                sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", "eth0")
                sh("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
                sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
                sh("ip", "link", "set", veth, "master", self.bridge)
                sh("ip", "link", "set", veth, "up")
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def teardown(self) -> None:
        for ns, veth in zip(self.namespaces, self.host_veths):
            sh("ip", "netns", "del", ns, check=False)  # removes the namespace's end of the veth
            sh("ip", "link", "del", veth, check=False)
        sh("ip", "link", "del", self.bridge, check=False)

    def limit(self, rate: str) -> None:
        for ns in self.namespaces:
            burst = BURST.get(rate, "1mbit")
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf",
               "rate", rate, "burst", burst, "latency", "50ms")  # fmt: skip

    def run_ranks(
        self,
        worker_args: list[str],
        timeout_s: float,
        script: str = __file__,
        logs_dir: Path | None = None,
        cwd: Path | None = None,
    ) -> None:
        """Run ``script --worker worker_args`` once per rank, each in its namespace (env: the rendezvous,
        RANK, LOCAL_RANK, WORLD_SIZE; output to ``logs_dir/rank<r>.log`` where given). Raises
        ``RuntimeError`` saying why when a rank fails or the time is up; the other ranks are stopped at once
        (they would wait for the failed one until the collectives' timeout)."""
        port = 29000 + secrets.randbelow(1000)
        procs, logs = [], []
        for rank, ns in enumerate(self.namespaces):
            env = dict(os.environ, MASTER_ADDR=self.addresses[0], MASTER_PORT=str(port), RANK=str(rank),
                       LOCAL_RANK=str(rank), WORLD_SIZE=str(self.world), LOCAL_WORLD_SIZE=str(self.world),
                       GLOO_SOCKET_IFNAME="eth0", PYTHONUNBUFFERED="1")  # fmt: skip  (all ranks on this machine)
            if logs_dir is not None:
                logs.append(open(Path(logs_dir) / f"rank{rank}.log", "w"))  # closed below
            cmd = ["ip", "netns", "exec", ns, sys.executable, str(script), "--worker", *worker_args]
            output = {"stdout": logs[-1], "stderr": subprocess.STDOUT} if logs else {}
            procs.append(subprocess.Popen(cmd, env=env, cwd=cwd, **output))
        deadline, failure = time.monotonic() + timeout_s, None
        try:
            while failure is None and any(p.poll() is None for p in procs):
                bad = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
                if bad:
                    failure = f"rank {bad[0]} exited with {procs[bad[0]].returncode}"
                elif time.monotonic() > deadline:
                    failure = f"timed out after {timeout_s:.0f} s"
                else:
                    time.sleep(0.5)
            if failure is None:
                bad = [r for r, p in enumerate(procs) if p.returncode != 0]
                failure = f"rank {bad[0]} exited with {procs[bad[0]].returncode}" if bad else None
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for fh in logs:
                fh.close()
            # DeepSpeed's CPU shared-memory all-reduce buffers (named by address and port) are never removed
            for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{self.addresses[0]}_{port}_*"):
                os.remove(path)
        if failure is not None:
            raise RuntimeError(failure)


def unavailable_reason() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' not found (Debian package iproute2)"
    probe = f"cdadam-probe-{secrets.token_hex(2)}"
    if sh("ip", "netns", "add", probe, check=False).returncode != 0:
        return "'ip netns add' is not permitted here"
    sh("ip", "netns", "del", probe, check=False)
    return None


def begin(name: str) -> str | None:
    """Before a benchmark on emulated clusters: ``None`` (having printed why it is skipped) without root or
    ``ip netns``; else signals are made to run the teardown, and the machine's description (with its
    load average before the benchmark's own work) is returned."""
    reason = unavailable_reason()
    if reason:
        print(f"{name}: skipped: {reason}.")
        return None
    # a signal must still run the teardown: turn it into an exception
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(f"{name}: stopped by signal; namespaces removed"))
    return describe_machine()


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from exchange_methods import time_methods

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=900))
    rows = time_methods(int(args.numel), args.repeats)
    if dist.get_rank() == 0:
        torch.save(rows, args.out)
    dist.barrier()
    dist.destroy_process_group()


def report(rows: list[dict], numel: int, machine: str) -> list[str]:
    lines = [
        f"machine: {machine}",
        (
            f"2 gloo ranks in network namespaces, veth + bridge, tc tbf per rank; {numel:,} fp32 parameters; "
            "CPU: rank 0's process time per step (compute and transport threads)"
        ),
        (
            f"{'rate':>7} {'method':<38} {'s/step':>8} {'CPU s':>7} {'MB sent':>9} {'bytes vs fp32':>13} "
            f"{'speed-up vs fp32':>16}"
        ),
    ]
    for r in rows:
        base = next(b for b in rows if b["rate"] == r["rate"] and b["method"] == ADAM)
        lines.append(
            f"{r['rate']:>7} {r['method']:<38} {r['seconds']:>8.3f} {r.get('cpu_seconds', float('nan')):>7.3f} "
            f"{r['bytes_sent_per_rank'] / 1e6:>9.1f} {r['bytes_sent_per_rank'] / base['bytes_sent_per_rank']:>13.4f} "
            f"{base['seconds'] / r['seconds']:>15.1f}x"
        )
    by = {(r["rate"], r["method"]): r for r in rows}
    if ("1gbit", CDADAM) in by:
        speedup = by[("1gbit", ADAM)]["seconds"] / by[("1gbit", CDADAM)]["seconds"]
        bytes_ratio = by[("1gbit", CDADAM)]["bytes_sent_per_rank"] / by[("1gbit", ADAM)]["bytes_sent_per_rank"]
        lines.append(
            f"target: CD-Adam bytes <= 1/28 of fp32: {bytes_ratio:.4f} "
            f"({'meets' if bytes_ratio <= 1 / 28 else 'misses'}); at 1gbit >= {TARGET_SPEEDUP_1GBIT:.0f}x faster: "
            f"{speedup:.1f}x ({'meets' if speedup >= TARGET_SPEEDUP_1GBIT else 'misses'})"
        )
    for rate in sorted({r["rate"] for r in rows}):
        if (rate, ONEBIT) in by and (rate, CDADAM) in by:
            ratio = by[(rate, CDADAM)]["seconds"] / by[(rate, ONEBIT)]["seconds"]
            lines.append(
                f"target: CD-Adam no slower than 1-bit Adam at {rate}: {ratio:.2f}x its time "
                f"({'meets' if ratio <= 1.0 else 'misses'})"
            )
    return lines


def plot(rows: list[dict], results: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(dict.fromkeys(r["rate"] for r in rows))  # in the order run
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        ys = [next((r["seconds"] for r in rows if r["rate"] == rate and r["method"] == method), 0) for rate in rates]
        ax.bar([k + i * width for k in range(len(rates))], ys, width, label=method)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(rates))], rates)
    ax.set_yscale("log")
    ax.set_ylabel("seconds per exchange step (log)")
    ax.set_title(f"{rows[0]['numel'] / 1e6:.0f}M fp32 parameters, 2 ranks, emulated network")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(results / "emulated_cluster.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=float, default=1.1e8)
    parser.add_argument("--rates", nargs="+", default=["1gbit", "10gbit"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="folder for the CSV, text and PNG")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    machine = begin("emulated_cluster")
    if machine is None:
        return
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    rows = []
    with Cluster(2) as cluster, tempfile.TemporaryDirectory() as tmp:
        for rate in args.rates:
            cluster.limit(rate)
            out = os.path.join(tmp, f"{rate}.pt")
            print(f"[emulated_cluster] {rate}: timing {METHODS}", flush=True)
            cluster.run_ranks(["--numel", str(args.numel), "--repeats", str(args.repeats), "--out", out], 3600)
            rows += [dict(r, rate=rate) for r in torch.load(out)]
    lines = report(rows, int(args.numel), machine)
    print("\n".join(lines))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "emulated_cluster.txt").write_text("\n".join(lines) + "\n")
    with open(args.results / "emulated_cluster_history.txt", "a") as fh:
        fh.write(f"== run started {started}\n" + "\n".join(lines) + "\n\n")
    with open(args.results / "emulated_cluster.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["rate", *[k for k in rows[0] if k != "rate"]])
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.results)


if __name__ == "__main__":
    main()
