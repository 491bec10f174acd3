#!/usr/bin/env python3
"""Start a verger cluster: one timely process per machine, over ssh.

    deploy/launch.py --ec2-tag verger=worker -- run --input s3://b/in --output s3://b/out -w 4
    deploy/launch.py --ips 10.0.0.1,10.0.0.2 --dry-run -- run --input s3://b/in --output s3://b/out

The machines come from --ips (in that order) or from the running EC2 instances with a tag (sorted by
launch index, then instance id). Line i of the timely hostfile written for them is `host:port` of
process i. The hostfile is copied to every machine first; then each machine starts
`verger <args after --> -n N -p I -h HOSTFILE`, in Docker (`--network host`) or as a systemd unit.
Running it again replaces a running cluster (the way to recover from a dead process: committed
epochs are skipped). `--dry-run` prints a shell script of what would be done and does nothing.

Python 3.8+ standard library only.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

DEFAULT_PORT = 2101
REMOTE_HOSTFILE = "/etc/verger/hosts.txt"
UNIT_TEMPLATE = Path(__file__).resolve().parent / "systemd" / "verger.service"
DEFAULT_SSH_OPTIONS = ("BatchMode=yes", "StrictHostKeyChecking=accept-new", "ConnectTimeout=10")
# Set by the launcher on every process (timely's conventions); not accepted after `--`.
CLUSTER_FLAGS = ("-n", "-p", "-h", "--processes", "--process", "--hostfile")

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


class LaunchError(Exception):
    """A problem reported to the user as `launch.py: error: ...`."""


# ---- hostfile ----------------------------------------------------------------------------------


def normalize_host(host: str) -> str:
    """Canonical form of an IPv4/IPv6 address or DNS name; ValueError if it is neither.

    Timely gives each hostfile line to `TcpStream::connect` (peers) and `TcpListener::bind` (its own
    line), so a line must be a `host:port` that Rust's `ToSocketAddrs` resolves: no whitespace,
    IPv6 in brackets (added by `address`), no port here (that is `--port`).
    """
    text = host.strip()
    if not text:
        raise ValueError("empty host")
    if any(c.isspace() for c in text):
        raise ValueError(f"{host!r}: host contains whitespace")
    bracketed = text.startswith("[") and text.endswith("]")
    try:
        ip = ipaddress.ip_address(text[1:-1] if bracketed else text)
    except ValueError:
        ip = None
    if ip is not None:
        if bracketed and ip.version != 6:
            raise ValueError(f"{host!r}: only IPv6 addresses go in brackets")
        if getattr(ip, "scope_id", None):
            raise ValueError(f"{host!r}: scoped IPv6 addresses (%zone) are not supported")
        return str(ip)
    if bracketed or ":" in text:
        raise ValueError(
            f"{host!r}: not an IP address or host name (give the port with --port, not per host)"
        )
    name = text[:-1] if text.endswith(".") else text
    labels = name.split(".")
    # A numeric last label is a malformed IPv4 address (e.g. 10.0.0.256), not a name.
    if len(name) > 253 or not all(_LABEL.match(l) for l in labels) or labels[-1].isdigit():
        raise ValueError(f"{host!r}: not an IP address or host name")
    return name.lower()


def address(host: str, port: int) -> str:
    """`host:port` of a normalized host, IPv6 bracketed (`[::1]:2101`)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def hostfile(hosts: Sequence[str], port: int = DEFAULT_PORT) -> str:
    """The timely hostfile: line i is `host:port` of process i, in the order given.

    Timely reads the first `-n` lines verbatim, so there are no comments or blank lines.
    Duplicates (after normalization: `::1` == `0::1`, names case-insensitive) are rejected.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port must be 1-65535, got {port!r}")
    if isinstance(hosts, str):
        raise ValueError("hosts must be a sequence of hosts, not one string")
    if not hosts:
        raise ValueError("no hosts")
    seen = {}
    lines = []
    for index, host in enumerate(hosts):
        normal = normalize_host(host)
        if normal in seen:
            raise ValueError(f"duplicate host {host!r} (processes {seen[normal]} and {index})")
        seen[normal] = index
        lines.append(address(normal, port))
    return "\n".join(lines) + "\n"


# ---- EC2 ---------------------------------------------------------------------------------------


def parse_tag(text: str) -> Tuple[str, str]:
    """`Key=Value` of --ec2-tag."""
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise ValueError(f"--ec2-tag wants Key=Value, got {text!r}")
    if "," in text:
        raise ValueError(f"--ec2-tag {text!r}: commas are not supported")
    return key, value


def ec2_command(key: str, value: str, region: Optional[str]) -> List[str]:
    """The `aws ec2 describe-instances` call listing the running instances tagged key=value."""
    cmd = ["aws", "ec2", "describe-instances"]
    if region:
        cmd += ["--region", region]
    return cmd + [
        "--filters",
        f"Name=tag:{key},Values={value}",
        "Name=instance-state-name,Values=running",
        "--query",
        "Reservations[].Instances[].{id: InstanceId, ip: PrivateIpAddress, index: AmiLaunchIndex}",
        "--output",
        "json",
    ]


def ec2_hosts(key: str, value: str, region: Optional[str], run: Runner) -> List[str]:
    """Private IPs of the running tagged instances, sorted by (launch index, instance id)."""
    cmd = ec2_command(key, value, region)
    try:
        done = run(cmd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise LaunchError("the aws CLI is not installed (or pass the addresses with --ips)") from None
    except subprocess.CalledProcessError as e:
        raise LaunchError(f"{shlex.join(cmd)} failed: {(e.stderr or '').strip()}") from None
    try:
        instances = json.loads(done.stdout)
    except json.JSONDecodeError as e:
        raise LaunchError(f"unexpected output of aws ec2 describe-instances: {e}") from None
    if not instances:
        raise LaunchError(f"no running EC2 instance is tagged {key}={value}")
    missing = [i.get("id") for i in instances if not i.get("ip")]
    if missing:
        raise LaunchError(f"instances without a private IP: {', '.join(map(str, missing))}")
    instances.sort(key=lambda i: (i.get("index") or 0, i.get("id") or ""))
    return [i["ip"] for i in instances]


# ---- commands ----------------------------------------------------------------------------------


@dataclass
class Write:
    """A local file the launcher writes (shown as a heredoc by --dry-run)."""

    path: Path
    content: str


Step = Union[Write, List[str]]


def check_verger_args(args: Sequence[str]) -> None:
    if not args:
        raise ValueError("give verger's arguments after --, e.g. -- run --input s3://... --output s3://...")
    if args[0].startswith("-"):
        raise ValueError(f"verger's arguments start with its subcommand (e.g. run), not {args[0]!r}")
    for arg in args:
        if arg == "--":
            break
        if arg.split("=", 1)[0] in CLUSTER_FLAGS or (
            not arg.startswith("--") and arg[:2] in ("-n", "-p", "-h")
        ):
            raise ValueError(f"{arg!r}: -n, -p and -h are set by launch.py for each process")


def systemd_quote(arg: str, dollar: bool = True) -> str:
    """One word of a unit-file command line: `%` (specifiers) and `$` (variables) escaped,
    double-quoted with C escapes when it has whitespace, quotes, backslashes or is empty."""
    text = arg.replace("%", "%%")
    if dollar:
        text = text.replace("$", "$$")
    if text and not re.search(r"[\s\"'\\;]", text):
        return text
    text = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{text}"'


def render_unit(template: str, argv: Sequence[str], env: Sequence[Tuple[str, str]], index: int, count: int) -> str:
    """The systemd unit of process `index` of `count`."""
    environment = "".join(
        f"Environment={systemd_quote(f'{k}={v}', dollar=False)}\n" for k, v in env
    )
    return (
        template.replace("@ENVIRONMENT@\n", environment)
        .replace("@EXEC_START@", " ".join(systemd_quote(a) for a in argv))
        .replace("@PROCESS@", str(index))
        .replace("@PROCESSES@", str(count))
    )


def plan(opts: argparse.Namespace, hosts: Sequence[str], verger_args: Sequence[str]) -> List[Step]:
    """Everything launch.py does, in order: local files, then copies and starts over ssh."""
    text = hostfile(hosts, opts.port)
    stage = Path(opts.stage_dir)
    local_hostfile = stage / "hosts.txt"
    remote = opts.remote_hostfile
    remote_dir = os.path.dirname(remote) or "/"
    sudo = ["sudo"] if opts.sudo else []
    ssh_opts = [x for o in opts.ssh_option for x in ("-o", o)]
    if opts.ssh_key:
        ssh_opts += ["-i", opts.ssh_key]
    user = f"{opts.ssh_user}@" if opts.ssh_user else ""
    hosts = [normalize_host(h) for h in hosts]

    def ssh(host: str, *commands: str) -> List[str]:
        return ["ssh", *ssh_opts, f"{user}{host}", " && ".join(commands)]

    def scp(local: Path, host: str, path: str) -> List[str]:
        target = f"[{host}]" if ":" in host else host
        return ["scp", "-q", *ssh_opts, str(local), f"{user}{target}:{path}"]

    steps: List[Step] = [Write(local_hostfile, text)]
    for host in hosts:
        steps.append(scp(local_hostfile, host, "/tmp/verger-hosts.txt"))
        steps.append(ssh(host, shlex.join([*sudo, "install", "-D", "-m", "0644", "/tmp/verger-hosts.txt", remote])))

    count = len(hosts)
    template = UNIT_TEMPLATE.read_text() if opts.mode == "systemd" else ""
    for index, host in enumerate(hosts):
        argv = [*verger_args, "-n", str(count), "-p", str(index), "-h", remote]
        if opts.mode == "docker":
            env = [x for k, v in opts.env for x in ("--env", f"{k}={v}")]
            run = [
                *sudo, "docker", "run", "--detach", "--name", opts.name,
                "--network", "host", "--restart", "no",
                "--volume", f"{remote_dir}:{remote_dir}:ro",
                *env, opts.image, *argv,
            ]
            # Replace the container of a previous launch, if any.
            rm = shlex.join([*sudo, "docker", "rm", "--force", opts.name]) + " >/dev/null 2>&1 || true"
            steps.append(ssh(host, rm + "; " + shlex.join(run)))
        else:
            unit = stage / f"{opts.name}-{index}.service"
            steps.append(Write(unit, render_unit(template, [opts.binary, *argv], opts.env, index, count)))
            staged = f"/tmp/{opts.name}.service"
            steps.append(scp(unit, host, staged))
            steps.append(ssh(
                host,
                shlex.join([*sudo, "install", "-m", "0644", staged, f"/etc/systemd/system/{opts.name}.service"]),
                shlex.join([*sudo, "systemctl", "daemon-reload"]),
                shlex.join([*sudo, "systemctl", "restart", f"{opts.name}.service"]),
            ))
    return steps


def script(steps: Sequence[Step]) -> str:
    """The steps as a shell script: files as heredocs, commands one per line."""
    out = []
    made = set()
    for step in steps:
        if isinstance(step, Write):
            parent = str(step.path.parent)
            if parent not in made:
                made.add(parent)
                out.append(shlex.join(["mkdir", "-p", parent]))
            out.append(f"cat > {shlex.quote(str(step.path))} <<'EOF'")
            out.append(step.content.rstrip("\n"))
            out.append("EOF")
        else:
            out.append(shlex.join(step))
    return "\n".join(out) + "\n"


def execute(steps: Sequence[Step], run: Runner) -> None:
    for step in steps:
        if isinstance(step, Write):
            step.path.parent.mkdir(parents=True, exist_ok=True)
            step.path.write_text(step.content)
            continue
        print("+ " + shlex.join(step), file=sys.stderr, flush=True)
        try:
            run(step, check=True)
        except FileNotFoundError:
            raise LaunchError(f"{step[0]} is not installed") from None
        except subprocess.CalledProcessError as e:
            raise LaunchError(f"exit status {e.returncode}: {shlex.join(step)}") from None


# ---- command line ------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch.py",
        usage="%(prog)s (--ips IPS | --ec2-tag KEY=VALUE) [options] -- VERGER_ARGS...",
        description="Start one verger process per machine as a timely cluster (see deploy/README.md).",
        epilog="Everything after -- is passed to verger, followed by -n N -p I -h HOSTFILE.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--ips", help="comma-separated addresses or names, in process order")
    where.add_argument("--ec2-tag", metavar="KEY=VALUE", help="the running EC2 instances with this tag (private IPs)")
    p.add_argument("--region", help="AWS region for --ec2-tag (default: the aws CLI's)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="timely port on every machine (default %(default)s)")
    p.add_argument("--mode", choices=("docker", "systemd"), default="docker", help="how to run verger (default %(default)s)")
    p.add_argument("--image", default="verger", help="docker image (default %(default)s)")
    p.add_argument("--binary", default="/usr/local/bin/verger", help="verger on the machines, systemd mode (default %(default)s)")
    p.add_argument("--name", default="verger", help="container / systemd unit name (default %(default)s)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment for verger, e.g. VERGER_LOG=info (repeatable)")
    p.add_argument("--remote-hostfile", default=REMOTE_HOSTFILE, help="hostfile path on the machines (default %(default)s)")
    p.add_argument("--stage-dir", default=os.path.join(tempfile.gettempdir(), "verger-launch"), help="local dir for the hostfile and units (default %(default)s)")
    p.add_argument("--ssh-user", default="ec2-user", help="ssh login; empty for ssh's default (default %(default)s)")
    p.add_argument("--ssh-key", help="ssh identity file")
    p.add_argument("--ssh-option", action="append", default=[], metavar="OPTION", help=f"ssh -o option, repeatable; wins over the defaults {' '.join(DEFAULT_SSH_OPTIONS)}")
    p.add_argument("--no-sudo", dest="sudo", action="store_false", help="run remote commands without sudo")
    p.add_argument("--dry-run", action="store_true", help="print the commands as a shell script; run nothing")
    return p


def main(argv: Optional[Sequence[str]] = None, run: Runner = subprocess.run) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    split = argv.index("--") if "--" in argv else len(argv)
    opts = p.parse_args(argv[:split])  # handles --help
    if split == len(argv):
        p.error("give verger's arguments after --, e.g. -- run --input s3://... --output s3://...")
    verger_args = argv[split + 1 :]
    # ssh takes the first value given for an option: the user's come before the defaults.
    opts.ssh_option = [*opts.ssh_option, *DEFAULT_SSH_OPTIONS]
    try:
        check_verger_args(verger_args)
        if not opts.remote_hostfile.startswith("/"):
            raise ValueError("--remote-hostfile must be an absolute path")
        env = []
        for item in opts.env:
            key, sep, value = item.partition("=")
            if not sep or not _ENV_NAME.match(key):
                raise ValueError(f"--env wants KEY=VALUE, got {item!r}")
            env.append((key, value))
        opts.env = env
        if opts.ec2_tag:
            key, value = parse_tag(opts.ec2_tag)
            if opts.dry_run:
                # No instance is listed in a dry run: show the query; --ips shows the rest.
                print("# the machines would be listed with:")
                print(shlex.join(ec2_command(key, value, opts.region)))
                print("# then the hostfile copied and one verger started on each (try --ips ... --dry-run)")
                return 0
            hosts = ec2_hosts(key, value, opts.region, run)
        else:
            hosts = opts.ips.split(",")
        steps = plan(opts, hosts, verger_args)
    except (ValueError, LaunchError) as e:
        p.error(str(e))
    if opts.dry_run:
        sys.stdout.write(script(steps))
        return 0
    try:
        execute(steps, run)
    except LaunchError as e:
        print(f"launch.py: error: {e}", file=sys.stderr)
        print("launch.py: processes already started wait for their peers; fix the problem and run again", file=sys.stderr)
        return 1
    n = len(hosts)
    print(f"started {n} verger process{'es' if n != 1 else ''}; hostfile {opts.stage_dir}/hosts.txt", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
