"""Latent samples per second read over HTTP from a server on this machine, against the same shards
read from local files: what the remote reader (i2v/data/remote.py) costs per reader.

    python bench/remote.py --shards 8 --per-shard 16 --latent 13x16x60x90 --rounds 3 --json

Writes `--shards` latent shards (random tensors of the given [F, C, h, w] shape, text 226 x 4096 like
CogVideoX) into a temporary folder, serves it with `python -m http.server` on 127.0.0.1 in its own
process, and reads every sample once in stream order through `LatentDataset` in this process (one
reader, no DataLoader workers: the per-worker figure), from the folder and from the URLs. `ratio` =
HTTP / local samples per second, best round of each; `cpu_ratio_reader` the same per CPU second of the
reader, and `cpu_ratio_with_server` counting the server's CPU too (both steadier on a loaded machine). Loopback HTTP measures the client's cost
(requests, copies, the socket), not a network. With --json the last line is the JSON result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

import torch

from i2v.data.latents import LatentDataset, LatentShardWriter, make_loader


def write_shards(root: str, shards: int, per_shard: int, shape: tuple[int, ...], text: tuple[int, int]) -> int:
    g = torch.Generator().manual_seed(0)
    f, c, h, w = shape
    for s in range(shards):
        with LatentShardWriter(os.path.join(root, f"latents-{s:06d}.tar")) as wr:
            for i in range(per_shard):
                wr.write(f"s{s:03d}-{i:04d}", torch.randn(f, c, h, w, generator=g),
                         torch.randn(2, 1, c, h, w, generator=g), torch.randn(*text, generator=g))
    return sum(os.path.getsize(os.path.join(root, n)) for n in os.listdir(root))


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_all(spec: str, n: int, server: int | None = None) -> tuple[float, float, float]:
    """(samples/s, samples per reader CPU second, samples per reader + server CPU second)."""
    ds = LatentDataset(spec, order="stream", batch_size=1, shuffle_buffer=0, resampled=False,
                       max_bad_fraction=0.0)
    t0, c0 = time.perf_counter(), time.process_time()
    s0 = cpu_s(server) if server else 0.0
    got = 0
    for b in make_loader(ds, 0):
        if b["epochs"][0] > 0:
            break
        got += 1
    took, cpu = time.perf_counter() - t0, time.process_time() - c0
    served = (cpu_s(server) - s0) if server else 0.0
    assert got == n, f"read {got} samples, expected {n}"
    return n / took, n / cpu, n / (cpu + served)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--per-shard", type=int, default=16)
    p.add_argument("--latent", default="13x16x60x90", help="F x C x h x w of video_latents")
    p.add_argument("--text", default="226x4096", help="L x D of prompt_embeds")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    a = p.parse_args()
    shape = tuple(int(x) for x in a.latent.split("x"))
    text = tuple(int(x) for x in a.text.split("x"))
    n = a.shards * a.per_shard
    with tempfile.TemporaryDirectory() as root:
        size = write_shards(root, a.shards, a.per_shard, shape, text)
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                   "--directory", root], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            url = f"http://127.0.0.1:{port}/latents-{{000000..{a.shards - 1:06d}}}.tar"
            local, remote = [], []
            for _ in range(a.rounds):  # interleaved, so that other load on the machine hits both alike
                local.append(read_all(root, n))
                remote.append(read_all(url, n, server.pid))
        finally:
            server.terminate()
            server.wait()
    best = lambda runs, i: max(r[i] for r in runs)  # noqa: E731
    result = {"samples": n, "bytes": size, "mb_per_sample": size / n / 1e6, "video_latents": list(shape),
              "prompt_embeds": list(text), "local_samples_per_s": best(local, 0), "http_samples_per_s": best(remote, 0),
              "ratio": best(remote, 0) / best(local, 0), "http_mb_per_s": best(remote, 0) * size / n / 1e6,
              # Per CPU second, which other load on a shared machine disturbs less than wall time.
              "local_samples_per_cpu_s": best(local, 1), "http_samples_per_reader_cpu_s": best(remote, 1),
              "http_samples_per_reader_and_server_cpu_s": best(remote, 2),
              "cpu_ratio_reader": best(remote, 1) / best(local, 1),
              "cpu_ratio_with_server": best(remote, 2) / best(local, 1),
              "rounds": {"local": local, "http": remote}, "readers": 1, "host": platform.node(),
              "cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    print(f"{n} samples of {size / n / 1e6:.2f} MB: local {best(local, 0):.1f}/s, HTTP {best(remote, 0):.1f}/s "
          f"({result['http_mb_per_s']:.0f} MB/s), ratio {result['ratio']:.2f}; per CPU second: reader "
          f"{result['cpu_ratio_reader']:.2f}, reader + server {result['cpu_ratio_with_server']:.2f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    if a.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
