#!/usr/bin/env python3
"""Build and run the generated service's Dockerfile where no container engine runs.

The test machine has no Docker engine and reaches no image registry, so the image cannot be built
for real here (the generated service's CI does that with Docker). This carries out the
Dockerfile's own instructions instead, one stage per root filesystem made with debootstrap from
the same Debian release as the image it names, and then runs the final stage as its USER:
`migrate`, then the ENTRYPOINT and CMD, until `/readyz` passes and SIGTERM stops it cleanly.

What it proves: every RUN line works under /bin/sh in the named Debian release, the dependency
layer builds from Cargo.toml and Cargo.lock alone, the offline (SQLX_OFFLINE) build succeeds from
the files .dockerignore lets through, and the runtime stage has all the binary needs, as a
non-root user. What it cannot prove: layer caching, and the exact contents of the official images
(`rust:*-slim-*` is stood in for by Debian with gcc, libc6-dev and this machine's Rust toolchain,
which must be the version the tag names).

    build-image-without-engine.py SERVICE_DIR --database-url URL

Needs root (debootstrap, chroot, mount), `unshare` and Debian's mirror. Everything it mounts is in
a mount namespace of its own, so nothing stays mounted once it ends, however it ends. The image
runs with its own ENV, so the ports its ENV names must be free here, and must be the ones it
EXPOSEs.
"""

import argparse
import fnmatch
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "template-test"


def sh(*args, **kwargs):
    print("+", " ".join(str(a) for a in args), flush=True)
    return subprocess.run([str(a) for a in args], check=True, **kwargs)


def base_tarball():
    """Debian minbase for SUITE, made once and cached."""
    tarball = CACHE / f"{SUITE}-minbase-v2.tar"
    if not tarball.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        if not shutil.which("debootstrap"):
            install = ["apt-get", "install", "--yes", "--quiet", "debootstrap"]
            if subprocess.run(install, stdout=subprocess.DEVNULL).returncode != 0:
                sh("apt-get", "update", "--quiet", stdout=subprocess.DEVNULL)  # a new machine
                sh(*install, stdout=subprocess.DEVNULL)
        with tempfile.TemporaryDirectory(dir=CACHE) as scratch:
            root = Path(scratch) / "root"
            sh("debootstrap", "--variant=minbase", SUITE, root, MIRROR, stdout=subprocess.DEVNULL)
            # As Debian's official images ship: no package lists, no cached packages, and apt
            # told to keep none (their /etc/apt/apt.conf.d/docker-clean).
            sh("sh", "-c", f"rm -rf {root}/var/lib/apt/lists/* {root}/var/cache/apt/*")
            (root / "etc/apt/apt.conf.d/docker-clean").write_text(
                'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
                '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
                'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
                '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
                'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n')
            sh("tar", "-C", root, "-cf", f"{tarball}.part", ".")
        os.replace(f"{tarball}.part", tarball)
    return tarball


class Stage:
    def __init__(self, name, image, root):
        self.name, self.image, self.root = name, image, root
        self.env = {"PATH": DEFAULT_PATH, "DEBIAN_FRONTEND": "noninteractive"}
        self.workdir = "/"
        self.user = "root"
        self.entrypoint, self.cmd = [], []
        self.binds = {}  # path inside the stage -> path on this machine
        self.exposed = []
        self.base_bytes = 0  # the stand-in base image's size, to tell what the Dockerfile adds

    def path(self, inside):
        return self.root / Path(self.workdir, inside).relative_to("/")

    def userspec(self):
        """USER as Docker reads it: a name or uid from the stage's /etc/passwd, else uid, gid 0."""
        user, _, group = self.user.partition(":")
        for line in (self.root / "etc/passwd").read_text().splitlines():
            name, _, uid, gid, *_ = line.split(":")
            if user in (name, uid):
                return f"{uid}:{group or gid}"
        if not user.isdigit():
            sys.exit(f"USER {user} does not exist in stage {self.name}")
        return f"{user}:{group or 0}"

    def run(self, command, *, env=None, wait=True):
        """`command` (an argv list) inside the stage, as Docker would: its ENV, WORKDIR, USER."""
        env = {**self.env, **(env or {})}
        argv = [
            "chroot", f"--userspec={self.userspec()}", str(self.root),
            "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items()),
            "/bin/sh", "-c", 'cd "$0" && exec "$@"', self.workdir, *command,
        ]
        print("+ [" + self.name + "]", " ".join(shlex.quote(c) for c in command), flush=True)
        if wait:
            subprocess.run(argv, check=True)
            return None
        return subprocess.Popen(argv)


class Mounts:
    """proc, dev and a stage's binds, mounted for as long as the stage runs anything."""

    def __init__(self):
        self.mounted = []

    def add(self, stage):
        targets = [("proc", None), ("dev", "/dev")] + [
            (inside.lstrip("/"), outside) for inside, outside in stage.binds.items()
        ]
        for inside, outside in targets:
            target = stage.root / inside
            target.mkdir(parents=True, exist_ok=True)
            if outside is None:
                sh("mount", "-t", "proc", "proc", target)
            else:
                sh("mount", "--rbind", outside, target)
            self.mounted.append(target)
        shutil.copy("/etc/resolv.conf", stage.root / "etc/resolv.conf")

    def release(self):
        for target in reversed(self.mounted):
            subprocess.run(["umount", "--recursive", "--lazy", str(target)], check=False)
        self.mounted.clear()


def new_stage(name, image, work, mounts):
    """A root filesystem standing in for `image`."""
    root = work / f"stage-{name}"
    root.mkdir()
    sh("tar", "-C", root, "-xf", base_tarball())
    stage = Stage(name, image, root)
    stage.base_bytes = disk_usage(root)
    repo, _, tag = image.partition(":")
    if repo == "debian" and tag in (SUITE, f"{SUITE}-slim"):
        pass
    elif repo == "rust" and tag.endswith(f"-slim-{SUITE}"):
        version = tag.removesuffix(f"-slim-{SUITE}")
        rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True, check=True)
        if not rustc.stdout.startswith(f"rustc {version}"):
            sys.exit(f"{image} needs Rust {version}; this machine has {rustc.stdout.strip()}")
        # Where the official image keeps its toolchain, and the packages it adds to slim Debian.
        stage.binds["/usr/local/rustup"] = os.environ.get("RUSTUP_HOME", Path.home() / ".rustup")
        stage.binds["/usr/local/cargo"] = os.environ.get("CARGO_HOME", Path.home() / ".cargo")
        stage.env.update(RUSTUP_HOME="/usr/local/rustup", CARGO_HOME="/usr/local/cargo",
                         PATH="/usr/local/cargo/bin:" + DEFAULT_PATH)
        mounts.add(stage)
        stage.run(["sh", "-c", "apt-get update -qq && apt-get install --yes -qq --no-install-recommends"
                   " gcc libc6-dev ca-certificates >/dev/null"])
        return stage
    else:
        sys.exit(f"no stand-in for image {image}: add one to {__file__}")
    mounts.add(stage)
    return stage


def instructions(dockerfile):
    """(keyword, rest) per instruction: comments dropped, continuation lines joined."""
    joined = ""
    for line in dockerfile.read_text().splitlines():
        # Docker drops comment lines, inside a continued instruction too, and blank lines.
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            joined += line.rstrip()[:-1] + " "
            continue
        joined += line
        keyword, _, rest = joined.strip().partition(" ")
        yield keyword.upper(), rest.strip()
        joined = ""


def ignored(relative, patterns):
    return any(fnmatch.fnmatch(relative, p) or relative.startswith(p.rstrip("/") + "/")
               for p in patterns)


def copy(sources, destination, stage, context_root, patterns):
    into_directory = destination.endswith("/") or destination in (".", "./") or len(sources) > 1
    target = stage.path(destination)
    for source in sources:
        origin = (context_root / source.lstrip("/")).resolve()
        if origin.is_dir():
            for path in sorted(origin.rglob("*")):
                relative = path.relative_to(context_root).as_posix()
                if patterns is not None and ignored(relative, patterns):
                    continue
                if path.is_file():
                    out = target / path.relative_to(origin)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, out)
        else:
            out = target / origin.name if into_directory else target
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, out)


def build(service, work, mounts):
    dockerignore = service / ".dockerignore"
    patterns = [p.strip() for p in dockerignore.read_text().splitlines()
                if p.strip() and not p.startswith("#")] if dockerignore.exists() else []
    stages, stage = {}, None
    for keyword, rest in instructions(service / "Dockerfile"):
        if keyword == "FROM":
            image, *alias = rest.split()
            name = alias[1] if alias and alias[0].upper() == "AS" else str(len(stages))
            stage = stages[name] = new_stage(name, image, work, mounts)
        elif keyword == "WORKDIR":
            stage.workdir = str(Path(stage.workdir, rest))
            stage.path(".").mkdir(parents=True, exist_ok=True)
        elif keyword == "ENV":
            stage.env.update(item.split("=", 1) for item in shlex.split(rest))
        elif keyword == "COPY":
            args = shlex.split(rest)
            source_stage = None
            while args[0].startswith("--"):
                flag = args.pop(0)
                if flag.startswith("--from="):
                    source_stage = stages[flag.removeprefix("--from=")]
                else:
                    sys.exit(f"COPY {flag} is not carried out by {__file__}")
            *sources, destination = args
            if source_stage:
                copy(sources, destination, stage, source_stage.root, None)
            else:
                copy(sources, destination, stage, service, patterns)
        elif keyword == "RUN":
            stage.run(["/bin/sh", "-c", rest])
        elif keyword == "USER":
            stage.user = rest
        elif keyword in ("ENTRYPOINT", "CMD"):
            setattr(stage, keyword.lower(), json.loads(rest))
        elif keyword == "EXPOSE":
            stage.exposed = rest.split()
        else:
            sys.exit(f"Dockerfile instruction {keyword} is not carried out by {__file__}")
    return stage


def disk_usage(root):
    # -x: not into the mounted /proc and /dev.
    du = subprocess.run(["du", "-sxb", str(root)], capture_output=True, text=True, check=True)
    return int(du.stdout.split()[0])


def wait_ready(url, process, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the service exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                return answer.status, answer.read().decode()
        except OSError:
            time.sleep(0.5)
    sys.exit(f"{url} did not answer within {seconds} s")


def port_of(image, variable):
    address = image.env.get(variable) or sys.exit(f"the image sets no {variable}")
    port = address.rsplit(":", 1)[-1]
    if port not in image.exposed:
        sys.exit(f"{variable}={address}, but the image exposes {' '.join(image.exposed)}")
    return port


def check_image(image, database_url):
    if image.userspec().startswith("0:"):
        sys.exit("the final image runs as root")
    binary = image.root / image.entrypoint[0].lstrip("/")
    print(f"final image: user {image.userspec()}, {image.image} plus "
          f"{(disk_usage(image.root) - image.base_bytes) / 2**20:.0f} MiB "
          f"(the binary {binary.stat().st_size / 2**20:.0f} MiB), exposes {' '.join(image.exposed)}")
    api_port, admin_port = port_of(image, "API_ADDR"), port_of(image, "ADMIN_ADDR")
    # As `docker run -e ...` would: the image's ENV (its addresses included), and the deployment's
    # database.
    env = {"DATABASE_URL": database_url, "APP_ENV": "development", "REDIS_URL": ""}
    image.run(image.entrypoint + ["migrate"], env=env)
    service = image.run(image.entrypoint + image.cmd, env=env, wait=False)
    try:
        status, body = wait_ready(f"http://127.0.0.1:{api_port}/readyz", service)
        print(f"/readyz answered {status}: {body}")
        if status != 200 or '"status":"pass"' not in body:
            sys.exit("the image's service is not ready")
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as answer:
            if answer.status != 200:
                sys.exit("the admin listener did not serve /metrics")
        service.send_signal(signal.SIGTERM)
        if service.wait(timeout=30) != 0:
            sys.exit(f"on SIGTERM the service exited with {service.returncode}")
        print("SIGTERM: the service stopped cleanly")
    finally:
        if service.poll() is None:
            service.kill()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("service", type=Path)
    parser.add_argument("--database-url", required=True)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root: debootstrap, chroot and mount")
    if os.environ.get("IMAGE_BUILD_NAMESPACE") != "private":
        # Again, in a mount namespace of its own: the mounts (the host's /dev and toolchain among
        # them) end with it even if it is killed, and never outlive it under /tmp.
        os.environ["IMAGE_BUILD_NAMESPACE"] = "private"
        os.execvp("unshare", ["unshare", "--mount", "--propagation", "private",
                              sys.executable, *sys.argv])
    # A SIGTERM ends the run through `finally`, like an error.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))
    mounts = Mounts()
    work = Path(tempfile.mkdtemp(prefix="image-build."))
    try:
        image = build(args.service.resolve(), work, mounts)
        check_image(image, args.database_url)
    finally:
        mounts.release()
        still_mounted = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
                         if line.split()[1].startswith(str(work))]
        if still_mounted:
            sys.exit(f"left {work} in place: still mounted: {still_mounted}")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
