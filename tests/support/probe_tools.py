"""Client programs for the probe agent's image that busybox lacks: an ICMP echo and curl.

The firewall and proxy tests run them inside the agent, as its own user, so that under
gVisor they use gVisor's network stack like any agent program would. A host program entered
into the agent's network namespace would use the host kernel's stack instead, which under
runsc carries none of the agent's own traffic.

icmp-echo is compiled from tests/support/programs/icmp_echo.c as a static binary. curl is the
host's /usr/bin/curl, copied with every shared library that `ldd` lists and the dynamic
loader, each at its host path, so it runs in an image that has no C library of its own.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

from tests.support.hardened import compile_static

ICMP_ECHO_PATH = "bin/icmp-echo"
CURL = Path("/usr/bin/curl")
CURL_PATH = "bin/curl"
# `ldd` lines look like "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" and, for the
# loader, "/lib64/ld-linux-x86-64.so.2 (0x...)". The vDSO line names no file.
_LDD_PATH = re.compile(r"(?:=> )?(/\S+) \(0x[0-9a-f]+\)")


def icmp_echo_file() -> dict[str, bytes]:
    """Compile icmp-echo and return it as an image file, keyed by its path in the image.

    Raises FileNotFoundError without gcc and subprocess.CalledProcessError when it fails.
    """
    with tempfile.TemporaryDirectory(prefix="icmp-echo-") as folder:
        binary = compile_static("icmp_echo.c", Path(folder) / "icmp-echo")
        return {ICMP_ECHO_PATH: binary.read_bytes()}


def curl_files() -> dict[str, bytes]:
    """Return the host's curl, its shared libraries and the loader, keyed by path in the image.

    Raises FileNotFoundError when curl is missing (install it with: apt-get install curl) and
    subprocess.CalledProcessError when `ldd` fails on it.
    """
    if not CURL.is_file():
        raise FileNotFoundError(f"{CURL} not found; install it with: apt-get install curl")
    listing = subprocess.run(
        ["ldd", str(CURL)], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    libraries = [Path(match.group(1)) for match in _LDD_PATH.finditer(listing)]
    if not libraries:
        raise FileNotFoundError(f"ldd listed no shared libraries for {CURL}: {listing!r}")

    # read_bytes follows symbolic links, so each library lands in the image as a regular
    # file under the name the loader looks for.
    files = {CURL_PATH: CURL.read_bytes()}
    for library in libraries:
        files[library.as_posix().lstrip("/")] = library.read_bytes()
    return files
