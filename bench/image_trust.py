"""Benchmark: image download, checks and load against plain `docker load`, and the hash rate.

Run from the repository root: `.venv/bin/python -m bench.image_trust [--rounds N]`.

The benchmark imports a busybox image with one file of random data (`--megabytes`, 220 MB
by default, so the tarball is over 200 MB), saves it with `docker save` and removes it from
Docker. A separate `python -m http.server` process serves the
tarball on 127.0.0.1, so the server does not share the supervisor code's interpreter lock.

- **Product:** `ImageStore.resolve` of the supervisor, called in this process with a new cache
  folder each round and the image absent from Docker. It runs the streaming download with
  SHA-256, the signature check, the tarball structure and config checks, the retag check,
  `docker load` through the Docker API and the check of the loaded image ID. The store is
  built from the supervisor's own settings loader, trusting the server's origin as an image
  source. By default the request carries an ECDSA P-256 signature made like `cosign sign-blob
  --key`, which the store checks against the public key (`--unsigned` leaves it out).
- **Baseline:** `docker load -i` of the same file with the Docker CLI, the target's reference.
- **curl, then docker load -i:** a download and load with common tools, for comparison:
  `curl -o` from the same server, then `docker load -i` of the copy.
- **Download alone** and **checks alone:** the product's download step (`download_image`:
  transfer, SHA-256 and write) and its structure and config checks (`inspect_image_tarball`,
  `check_image_config`), each timed on its own once per round, to split the product's time.
- **Hash rate:** download.py hashes inside its HTTP receive loop, which cannot run on its own.
  So the benchmark times hashlib's SHA-256 fed 1 MiB chunks read from the file against
  `sha256sum` of the same file. The loop itself hashes chunks as the socket delivers them.

The image is removed after every load, so every load extracts the layer again. The three
load measurements run in an order that rotates from round to round, and the two hash
measurements alternate. One warm-up round comes first, so the tarball is in the page cache for
all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker
import docker.errors

from bench.harness import Deadline, interrupts_raise, milliseconds, percentile, workdir
from libs.common.settings import load_settings
from services.supervisor.docker_adapter import DockerAdapter
from services.supervisor.download import download_image
from services.supervisor.image_config import check_image_config
from services.supervisor.images import ImageStore, SignatureCheck
from services.supervisor.main import download_limits
from services.supervisor.settings import SupervisorSettings
from services.supervisor.signatures import SignaturePolicy
from services.supervisor.tarball import TarballLimits, inspect_image_tarball
from tests.support.images import build_busybox_image, save_image_tarball
from tests.support.signing import make_ecdsa_key, sign_blob
from tests.support.stack import free_port

HASH_CHUNK_SIZE = 1024 * 1024
TARGET_LOAD_RATIO = 1.15
TARGET_HASH_RATIO = 0.9
MIN_MEGABYTES = 200
SERVER_START_TIMEOUT = 10.0
DOCKER_TIMEOUT = 600
MB = 1000 * 1000
PRODUCT = "product (resolve)"
BASELINE = "docker load -i"
CURL_BASELINE = "curl, then docker load -i"
HASHLIB = "hashlib sha256"
SHA256SUM = "sha256sum"


@dataclass(frozen=True)
class ServedImage:
    """The benchmark image's ID and its tarball, on disk and served over HTTP."""

    image_id: str
    digest: str
    path: Path
    url: str


@dataclass
class Samples:
    """Seconds per measurement, by name."""

    seconds: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        """Record one measurement."""
        self.seconds.setdefault(name, []).append(seconds)

    def median(self, name: str) -> float:
        """Return the median of `name`'s measurements."""
        return percentile(self.seconds[name], 0.5)


@contextlib.contextmanager
def http_server(directory: Path) -> Iterator[str]:
    """Serve `directory` from a `python -m http.server` process on 127.0.0.1, yield its origin.

    Raises RuntimeError when the server does not accept connections within 10 s.
    """
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"http.server did not listen on 127.0.0.1:{port}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@contextlib.contextmanager
def random_data_image(
    client: docker.DockerClient, folder: Path, origin: str, *, megabytes: int
) -> Iterator[ServedImage]:
    """Build an image with `megabytes` MB of random data, save it into `folder`, yield it.

    The image is removed from Docker before the yield, because every measured load starts
    without it, and again at the end in case a round left it loaded.
    """
    image_id = build_busybox_image(
        client,
        entrypoint=["sleep", "3600"],
        cmd=None,
        extra_files={"data/random.bin": os.urandom(megabytes * MB)},
    )
    try:
        path = folder / "image.tar"
        digest = save_image_tarball(client, image_id, path)
        remove_image(client, image_id)
        yield ServedImage(image_id=image_id, digest=digest, path=path, url=f"{origin}/image.tar")
    finally:
        try:
            remove_image(client, image_id)
        except docker.errors.APIError as exc:
            print(f"warning: cannot remove image {image_id}: {exc}", file=sys.stderr)


def remove_image(client: docker.DockerClient, image_id: str) -> None:
    """Remove the image and its layers without force. A missing image is fine."""
    with contextlib.suppress(docker.errors.ImageNotFound):
        client.images.remove(image_id)


def require_absent(client: docker.DockerClient, image_id: str) -> None:
    """Raise RuntimeError when the image is loaded, so a load would measure nothing."""
    with contextlib.suppress(docker.errors.ImageNotFound):
        client.images.get(image_id)
        raise RuntimeError(f"image {image_id} is still loaded; remove it and run again")


def signature_check(image: ServedImage, *, signed: bool) -> SignatureCheck:
    """Return what a start request brings: an ECDSA P-256 signature of the tarball, or none."""
    if not signed:
        return SignatureCheck(policy=None, required=False)
    key = make_ecdsa_key()
    return SignatureCheck(
        policy=SignaturePolicy(keys=(key.public_key(),)),
        required=True,
        signature=sign_blob(image.path, key),
    )


def supervisor_settings(cache_dir: Path, *, origin: str) -> SupervisorSettings:
    """Return the development profile's settings, trusting `origin` as an image source."""
    return load_settings(
        SupervisorSettings,
        ["--profile=development", f"--cache-dir={cache_dir}", f"--trusted-image-sources={origin}/"],
    )


class Product:
    """Resolve the image as the supervisor does, each time with a new, empty cache folder."""

    def __init__(
        self,
        client: docker.DockerClient,
        image: ServedImage,
        folder: Path,
        *,
        origin: str,
        signatures: SignatureCheck,
    ) -> None:
        self._client = client
        self._image = image
        self._folder = folder
        self._origin = origin
        self._signatures = signatures
        self._runs = 0

    def run(self) -> float:
        """Download, check and load the image, and return the seconds `resolve` took.

        Raises RuntimeError when the store did not download and load the expected image.
        """
        self._runs += 1
        cache_dir = self._folder / f"cache-{self._runs}"
        settings = supervisor_settings(cache_dir, origin=self._origin)
        store = ImageStore(
            DockerAdapter(self._client),
            cache_dir=cache_dir,
            download_limits=download_limits(settings),
            tarball_limits=TarballLimits(
                max_members=settings.image_max_members,
                max_total_size=int(settings.image_max_size),
            ),
        )
        require_absent(self._client, self._image.image_id)

        began = time.perf_counter()
        resolved = store.resolve(
            self._image.url,
            self._image.digest,
            known_image_id=None,
            signatures=self._signatures,
        )
        elapsed = time.perf_counter() - began

        if resolved.image_id != self._image.image_id or not resolved.loaded:
            raise RuntimeError(f"resolve returned {resolved}, expected {self._image.image_id}")
        remove_image(self._client, self._image.image_id)
        shutil.rmtree(cache_dir)
        return elapsed


def baseline(client: docker.DockerClient, image: ServedImage) -> float:
    """Run `docker load -i` on the tarball and return its seconds.

    Raises RuntimeError when the CLI fails or did not load the expected image.
    """
    require_absent(client, image.image_id)
    began = time.perf_counter()
    result = subprocess.run(
        ["docker", "load", "-i", str(image.path)],
        capture_output=True,
        text=True,
        timeout=DOCKER_TIMEOUT,
        check=False,
    )
    elapsed = time.perf_counter() - began
    if result.returncode != 0 or image.image_id not in result.stdout:
        raise RuntimeError(
            f"docker load -i exited with {result.returncode}: {result.stdout}{result.stderr}"
        )
    remove_image(client, image.image_id)
    return elapsed


def curl_then_load(client: docker.DockerClient, image: ServedImage, folder: Path) -> float:
    """Download the tarball with curl, `docker load -i` it and return the seconds of both."""
    require_absent(client, image.image_id)
    copy = folder / "curl-copy.tar"
    began = time.perf_counter()
    subprocess.run(
        ["curl", "--silent", "--show-error", "--fail", "--output", str(copy), image.url],
        check=True,
        timeout=DOCKER_TIMEOUT,
    )
    subprocess.run(
        ["docker", "load", "-i", str(copy)], capture_output=True, check=True, timeout=DOCKER_TIMEOUT
    )
    elapsed = time.perf_counter() - began
    copy.unlink()
    client.images.get(image.image_id)
    remove_image(client, image.image_id)
    return elapsed


def download_alone(image: ServedImage, folder: Path, *, origin: str) -> float:
    """Return the seconds of the product's download step alone: transfer, hash and write."""
    directory = folder / "download-alone"
    limits = download_limits(supervisor_settings(folder / "unused-cache", origin=origin))
    began = time.perf_counter()
    path = download_image(image.url, digest=image.digest, directory=directory, limits=limits)
    elapsed = time.perf_counter() - began
    path.unlink()
    return elapsed


def checks_alone(image: ServedImage) -> float:
    """Return the seconds of the tarball structure and config checks on the file."""
    began = time.perf_counter()
    tarball = inspect_image_tarball(image.path, limits=TarballLimits())
    check_image_config(tarball.config)
    return time.perf_counter() - began


def hash_in_chunks(image: ServedImage) -> float:
    """Hash the file with hashlib in 1 MiB chunks and return the seconds."""
    began = time.perf_counter()
    digest = hashlib.sha256()
    with image.path.open("rb", buffering=0) as tarball:
        while chunk := tarball.read(HASH_CHUNK_SIZE):
            digest.update(chunk)
    elapsed = time.perf_counter() - began
    if f"sha256:{digest.hexdigest()}" != image.digest:
        raise RuntimeError(f"hashlib computed {digest.hexdigest()}, expected {image.digest}")
    return elapsed


def hash_with_sha256sum(image: ServedImage) -> float:
    """Run `sha256sum` on the file and return the seconds, process start included."""
    began = time.perf_counter()
    output = subprocess.run(
        ["sha256sum", str(image.path)], capture_output=True, text=True, check=True, timeout=300
    ).stdout
    elapsed = time.perf_counter() - began
    if f"sha256:{output.split()[0]}" != image.digest:
        raise RuntimeError(f"sha256sum printed {output!r}, expected {image.digest}")
    return elapsed


Step = tuple[str, Callable[[], float]]


def measure(
    groups: list[list[Step]], singles: list[Step], *, rounds: int, deadline: Deadline
) -> Samples:
    """Run every step once per round and return the seconds of each.

    The steps of a group are compared with each other, so their order rotates by one from
    round to round. `singles` run last. Round 0 is a warm-up whose results are dropped.
    """
    samples = Samples()
    for run in range(rounds + 1):
        deadline.check(f"round {run} of {rounds}")
        order = [step for group in groups for step in _rotated(group, run)]
        results = {name: step() for name, step in [*order, *singles]}
        label = "warm-up" if run == 0 else f"round {run:2d}/{rounds}"
        timings = ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in results.items())
        print(f"{label}: {timings}", flush=True)
        if run > 0:
            for name, seconds in results.items():
                samples.add(name, seconds)
    return samples


def _rotated(steps: list[Step], by: int) -> list[Step]:
    shift = by % len(steps)
    return steps[shift:] + steps[:shift]


def report(samples: Samples, image: ServedImage, *, size: int, signed: bool) -> None:
    """Print medians, p90 and extremes, and the two ratios against their targets."""
    print()
    print(f"{len(samples.seconds[PRODUCT])} rounds, tarball {size} bytes (ms)")
    print(f"{'':28}{'median':>8} {'p90':>8} {'min':>8} {'max':>8}")
    for name, values in samples.seconds.items():
        print(
            f"{name:28}{milliseconds(percentile(values, 0.5))} "
            f"{milliseconds(percentile(values, 0.9))} "
            f"{milliseconds(min(values))} {milliseconds(max(values))}"
        )

    load_ratio = samples.median(PRODUCT) / samples.median(BASELINE)
    verdict = "met" if load_ratio <= TARGET_LOAD_RATIO else "missed"
    print(
        f"ratio resolve/docker load (medians): {load_ratio:.2f} "
        f"(target <= {TARGET_LOAD_RATIO}: {verdict}); signature: "
        f"{'ECDSA P-256' if signed else 'none'}"
    )
    curl_ratio = samples.median(PRODUCT) / samples.median(CURL_BASELINE)
    print(f"ratio resolve/(curl, then docker load) (medians): {curl_ratio:.2f}")
    hashlib_rate = size / samples.median(HASHLIB) / MB
    sha256sum_rate = size / samples.median(SHA256SUM) / MB
    hash_ratio = hashlib_rate / sha256sum_rate
    verdict = "met" if hash_ratio >= TARGET_HASH_RATIO else "missed"
    print(
        f"hash rate: hashlib {hashlib_rate:.0f} MB/s, sha256sum {sha256sum_rate:.0f} MB/s, "
        f"ratio {hash_ratio:.2f} (target >= {TARGET_HASH_RATIO}: {verdict})"
    )
    print(f"image {image.image_id}, tarball {image.digest}")


def run(args: argparse.Namespace) -> None:
    """Build and serve the image, measure, report and clean up."""
    deadline = Deadline(args.max_seconds)
    with contextlib.ExitStack() as resources:
        folder = resources.enter_context(workdir())
        served = folder / "served"
        served.mkdir()
        client = docker.from_env(timeout=DOCKER_TIMEOUT)
        resources.callback(client.close)
        origin = resources.enter_context(http_server(served))
        image = resources.enter_context(
            random_data_image(client, served, origin, megabytes=args.megabytes)
        )
        size = image.path.stat().st_size
        print(f"tarball of {size} bytes at {image.url}", flush=True)
        deadline.check("building the image")

        signatures = signature_check(image, signed=not args.unsigned)
        product = Product(client, image, folder, origin=origin, signatures=signatures)
        groups: list[list[Step]] = [
            [
                (PRODUCT, product.run),
                (BASELINE, lambda: baseline(client, image)),
                (CURL_BASELINE, lambda: curl_then_load(client, image, folder)),
            ],
            [
                (HASHLIB, lambda: hash_in_chunks(image)),
                (SHA256SUM, lambda: hash_with_sha256sum(image)),
            ],
        ]
        singles: list[Step] = [
            ("download alone", lambda: download_alone(image, folder, origin=origin)),
            ("checks alone", lambda: checks_alone(image)),
        ]
        samples = measure(groups, singles, rounds=args.rounds, deadline=deadline)
        report(samples, image, size=size, signed=not args.unsigned)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line. Raises SystemExit on invalid options."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.image_trust",
        description="Time the supervisor's image download, checks and load against plain "
        "docker load -i, and hashlib's SHA-256 against sha256sum.",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=7,
        help="Measured rounds after one warm-up, 1 to 100 (default: %(default)s).",
    )
    parser.add_argument(
        "--megabytes",
        type=int,
        default=220,
        help=f"Random data in the image, in MB (10^6 bytes), {MIN_MEGABYTES} to 2000 "
        "(default: %(default)s).",
    )
    parser.add_argument(
        "--unsigned",
        action="store_true",
        help="Send no signature with the product's requests (default: an ECDSA P-256 one).",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=900.0,
        help="Stop with an error when the run, setup included, takes longer than this, in "
        "seconds (default: %(default)s).",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 100:
        parser.error(f"--rounds must be 1 to 100, got {args.rounds}")
    if not MIN_MEGABYTES <= args.megabytes <= 2000:
        parser.error(f"--megabytes must be {MIN_MEGABYTES} to 2000, got {args.megabytes}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and return 0, or 130 after Ctrl-C or SIGTERM.

    Unlike `harness.run_main`, this needs no var/agent-runner.env, because it uses neither
    Redis nor NATS.
    """
    args = parse_args(argv)
    try:
        with interrupts_raise():
            run(args)
    except KeyboardInterrupt:
        print("interrupted; cleanup finished", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
