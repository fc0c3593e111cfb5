#!/usr/bin/env python3
"""The load of contrib/soak.sh: readers and writers on a mounted real corpus.

Every image the mount shows is matched to its truth (the corpus's recorded disk contents)
through `vmback ls --json SOURCE` and the corpus manifest: a point's disk maps to the
manifest row of its set and last data file. A set landed during the run as a copy of a
corpus set (--alias LANDED_DIR_NAME:CORPUS_SET_NAME) maps to the same truths.

- 8 readers (4 random, 4 sequential) across the images, every byte compared with the truth;
  half of them read with O_DIRECT, so their reads reach vmback instead of being answered
  from the kernel's page cache (which holds all of a small corpus after a minute);
- 2 writers, each on an image of its own that no reader reads: random writes into the
  image's overlay, each range read back at once, random reads against the writer's model of
  the image (its truth plus its writes), fsync every few writes, and the whole image
  compared with the model at the end.

The image list is re-read when the `--remap` file's mtime changes (soak.sh touches it after
a backup landed) and after a read fails with ENOENT (points renamed by a live refresh).
Prints one JSON object: totals and the first few problems.
"""

import argparse
import errno
import json
import mmap
import multiprocessing as mp
import os
import random
import subprocess
import time

# Largest single random read or write: bigger than FUSE's 128 KiB request size, so one
# syscall spans several requests, and small enough for many operations per second.
MAX_IO = 1 << 20
# Sequential readers read in 1 MiB chunks, as `cp` and `qemu-img convert` do.
SEQ_CHUNK = 1 << 20
# O_DIRECT reads use offsets and lengths in whole pages.
PAGE = 4096
# A writer fsyncs after this many writes (a guest flushes every so often, not per write).
FSYNC_EVERY = 16
# Problems reported in full (the counts cover all of them).
MAX_PROBLEMS = 20


def manifest(corpus):
    """(set name, data file name) -> truth path, from corpus/manifest.tsv."""
    with open(os.path.join(corpus, "manifest.tsv")) as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    head = rows[0]
    col = {name: head.index(name) for name in ("set", "disk", "data_file", "truth")}
    return {
        (os.path.basename(r[col["set"]]), r[col["disk"]], r[col["data_file"]]): os.path.join(corpus, r[col["truth"]])
        for r in rows[1:]
    }


def images(args):
    """Image path in the mount -> truth path, for every image the mount shows now."""
    rows = manifest(args.corpus)
    alias = dict(a.split(":", 1) for a in args.alias)
    out = subprocess.run([args.vmback, "ls", "--json", args.source], capture_output=True, check=True)
    found = {}
    for d in json.loads(out.stdout)["domains"]:
        for p in d["points"]:
            set_name = os.path.basename(p["set"])
            set_name = alias.get(set_name, set_name)
            for disk in p["disks"]:
                truth = rows.get((set_name, disk["disk"], disk["files"][-1]))
                path = os.path.join(args.mnt, d["name"], p["name"], disk["disk"] + ".raw")
                if truth and os.path.exists(path):
                    found[path] = truth
    return found


def pread_full(fd, length, offset):
    parts = []
    while length > 0:
        b = os.pread(fd, length, offset)
        if not b:
            break
        parts.append(b)
        length -= len(b)
        offset += len(b)
    return b"".join(parts)


def pread_direct(fd, length, offset, buf):
    """Like pread_full, on an O_DIRECT descriptor, through `buf` (page-aligned, an mmap)."""
    view = memoryview(buf)
    done = 0
    while done < length:
        n = os.preadv(fd, [view[done:length]], offset + done)
        if n == 0:
            break
        done += n
    return bytes(view[:done])


class Tally:
    def __init__(self, name):
        self.s = {"worker": name, "ops": 0, "bytes_checked": 0, "bytes_written": 0, "mismatches": 0,
                  "errors": 0, "remaps": 0, "images_read": 0, "problems": []}

    def problem(self, kind, text):
        self.s[kind] += 1
        if len(self.s["problems"]) < MAX_PROBLEMS:
            self.s["problems"].append(f"{self.s['worker']}: {text}")

    def compare(self, got, want, what):
        self.s["bytes_checked"] += len(got)
        if got != want:
            at = next((i for i in range(min(len(got), len(want))) if got[i] != want[i]), min(len(got), len(want)))
            self.problem("mismatches", f"{what}: first difference at +{at} (got {len(got)} bytes, want {len(want)})")


def reader(args, kind, direct, seed, exclude, out):
    rng = random.Random(seed)
    t = Tally(f"{kind}{'-direct' if direct else ''}-reader-{seed}")
    buf = mmap.mmap(-1, MAX_IO) if direct else None
    mapping, stamp = {}, None
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        now = os.stat(args.remap).st_mtime_ns
        if now != stamp or not mapping:
            stamp = now
            mapping = {p: tr for p, tr in images(args).items() if p not in exclude}
            t.s["remaps"] += 1
            t.s["images_read"] = max(t.s["images_read"], len(mapping))
            if not mapping:
                t.problem("errors", "no image with a truth in the mount")
                time.sleep(1)
                continue
        path = rng.choice(sorted(mapping))
        truth = mapping[path]
        try:
            fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        except FileNotFoundError:
            mapping = {}
            continue
        except OSError as e:
            t.problem("errors", f"open {path}: {e}")
            continue
        tfd = os.open(truth, os.O_RDONLY)
        try:
            size = os.fstat(tfd).st_size
            if kind == "random":
                spans = []
                for _ in range(32):
                    if direct:
                        off = rng.randrange(size // PAGE) * PAGE
                        n = rng.randrange(1, MAX_IO // PAGE + 1) * PAGE
                    else:
                        off, n = rng.randrange(size), rng.randrange(1, MAX_IO + 1)
                    spans.append((off, min(n, size - off)))
            else:
                spans = [(off, min(SEQ_CHUNK, size - off)) for off in range(0, size, SEQ_CHUNK)]
            for off, n in spans:
                if time.monotonic() >= deadline:
                    break
                try:
                    got = pread_direct(fd, n, off, buf) if direct else pread_full(fd, n, off)
                except OSError as e:
                    t.problem("errors", f"read {path} at {off}+{n}: {e}")
                    if e.errno == errno.ENOENT:
                        mapping = {}
                    break
                t.s["ops"] += 1
                t.compare(got, pread_full(tfd, n, off), f"{path} at {off}+{n}")
        finally:
            os.close(fd)
            os.close(tfd)
    out.put(t.s)


def writer(args, path, truth, seed, out):
    rng = random.Random(seed)
    t = Tally(f"writer-{seed}")
    with open(truth, "rb") as f:
        model = bytearray(f.read())
    size = len(model)
    deadline = time.monotonic() + args.seconds
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as e:
        t.problem("errors", f"open {path} for writing: {e}")
        out.put(t.s)
        return
    try:
        k = 0
        while time.monotonic() < deadline:
            k += 1
            off = rng.randrange(size)
            n = min(rng.randrange(1, MAX_IO + 1), size - off)
            data = rng.randbytes(n)
            try:
                done = os.pwrite(fd, data, off)
                if done != n:
                    t.problem("errors", f"write {path} at {off}+{n}: short write of {done}")
                    continue
                model[off : off + n] = data
                t.s["bytes_written"] += n
                if k % FSYNC_EVERY == 0:
                    os.fsync(fd)
                t.compare(pread_full(fd, n, off), data, f"{path}: own write at {off}+{n}")
                roff = rng.randrange(size)
                rn = min(rng.randrange(1, MAX_IO + 1), size - roff)
                t.compare(pread_full(fd, rn, roff), bytes(model[roff : roff + rn]), f"{path} at {roff}+{rn}")
                t.s["ops"] += 1
            except OSError as e:
                t.problem("errors", f"{path} at {off}+{n}: {e}")
        os.fsync(fd)
        for off in range(0, size, SEQ_CHUNK):
            n = min(SEQ_CHUNK, size - off)
            t.compare(pread_full(fd, n, off), bytes(model[off : off + n]), f"{path} (final pass) at {off}+{n}")
    except OSError as e:
        t.problem("errors", f"{path}: {e}")
    finally:
        os.close(fd)
    out.put(t.s)


def guarded(target, name, out, *a):
    """Runs a worker; a worker that dies still reports (as one error), so main never waits
    forever for its result."""
    try:
        target(*a, out)
    except BaseException as e:  # noqa: BLE001 -- any death must be reported
        t = Tally(name)
        t.problem("errors", f"worker died: {e!r}")
        out.put(t.s)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mnt", required=True)
    ap.add_argument("--source", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--vmback", required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--remap", required=True, help="a file whose mtime change makes readers re-read the image list")
    ap.add_argument("--alias", action="append", default=[], help="LANDED_DIR:CORPUS_SET")
    ap.add_argument("--readers", type=int, default=8)
    ap.add_argument("--writers", type=int, default=2)
    args = ap.parse_args()

    found = images(args)
    if len(found) < args.writers + 2:
        raise SystemExit(f"only {len(found)} images with a truth under {args.mnt}")
    # Writers take the last images (copy backups sort last); readers never read them.
    targets = sorted(found)[-args.writers :] if args.writers else []
    out = mp.Queue()
    procs = [
        mp.Process(target=guarded, args=(writer, f"writer-{i}", out, args, p, found[p], 100 + i))
        for i, p in enumerate(targets)
    ]
    procs += [
        mp.Process(
            target=guarded,
            args=(reader, f"reader-{i}", out, args, "random" if i % 2 else "sequential", i >= args.readers // 2, i, set(targets)),
        )
        for i in range(args.readers)
    ]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    total = {k: sum(r[k] for r in results) for k in ("ops", "bytes_checked", "bytes_written", "mismatches", "errors")}
    total["images"] = len(found)
    # Readers re-read the image list when a backup landed: this counts the ones it added.
    total["images_at_end"] = max((r["images_read"] for r in results), default=0) + len(targets)
    total["writer_images"] = targets
    total["crashed_workers"] = sum(1 for p in procs if p.exitcode != 0)
    total["problems"] = [x for r in results for x in r["problems"]][:MAX_PROBLEMS]
    total["workers"] = [{k: v for k, v in r.items() if k != "problems"} for r in results]
    print(json.dumps(total))


if __name__ == "__main__":
    main()
