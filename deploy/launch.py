#!/usr/bin/env python3
"""Start, watch and stop a verger cluster: one timely process per machine, over ssh.

    deploy/launch.py --ec2-tag verger=worker -- run --input s3://b/in --output s3://b/out -w 4
    deploy/launch.py --ips 10.0.0.1,10.0.0.2 --dry-run -- run --input s3://b/in --output s3://b/out
    deploy/launch.py status --ec2-tag verger=worker
    deploy/launch.py logs --ips 10.0.0.1,10.0.0.2 --tail 20
    deploy/launch.py stop --ec2-tag verger=worker --grace 5m

The command comes first: `start` (the default, so `launch.py --ips ... -- run ...` is
`launch.py start --ips ... -- run ...`), `status`, `logs` or `stop`; the options follow it. Every
command takes the same machine selection (--ips, --ec2-tag), ssh options, --mode, --name, --no-sudo
and --dry-run.

The machines come from --ips (in that order) or from the running EC2 instances with a tag (sorted by
launch index, then instance id). Line i of the timely hostfile written for them is `host:port` of
process i.

- `start` copies the hostfile to every machine; in Docker mode it then waits (--docker-wait, 300s by
  default) until Docker answers on every machine (a new instance may still be installing it from its
  user data); then each machine starts `verger <args after --> -n N -p I -H HOSTFILE`, in Docker
  (`--network host`) or as a systemd unit. Running it again replaces a running cluster (the way to
  recover from a dead process: committed epochs are skipped).
- `status` prints one line per machine: whether its container or unit is running (exit status 1 if
  any is not).
- `logs` prints the last --tail lines (100) of each machine's log, each line prefixed with its host;
  `--follow` follows the log of one machine.
- `stop` sends SIGTERM to every process at once, so that verger stops listing and commits the epochs
  in flight, waits up to --grace (120s) for it to exit, then kills it (`docker stop --time`).

`--dry-run` prints a shell script of what would be done and does nothing. ssh and scp get the same
options: --ssh-option values (first, so they win: ssh takes the first value of an option), then
DEFAULT_SSH_OPTIONS, then --ssh-key. A ProxyJump option is turned into the equivalent ProxyCommand so
that the jump host is reached with those options too (ssh's own ProxyJump passes none of them on).

Python 3.8+ standard library only.
"""

from __future__ import annotations

import argparse
import concurrent.futures
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
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

DEFAULT_PORT = 2101
REMOTE_HOSTFILE = "/etc/verger/hosts.txt"
UNIT_TEMPLATE = Path(__file__).resolve().parent / "systemd" / "verger.service"
DEFAULT_SSH_OPTIONS = ("BatchMode=yes", "StrictHostKeyChecking=accept-new", "ConnectTimeout=10")
# Set by the launcher on every process (timely's conventions); not accepted after `--`.
CLUSTER_FLAGS = ("-n", "-p", "-H", "--processes", "--process", "--hostfile")
COMMANDS = ("start", "status", "logs", "stop")
DEFAULT_DOCKER_WAIT = "300s"
DEFAULT_GRACE = "120s"
DEFAULT_TAIL = 100
# Exit status of a remote wait that ran out of time (as timeout(1)).
TIMED_OUT = 124
# Time allowed for an ssh round trip on top of what the remote command itself may take.
SSH_SLACK = 60
# Machines contacted at once by status, logs and stop.
PARALLEL = 32

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


class LaunchError(Exception):
    """A problem reported to the user as `launch.py: error: ...`."""


def parse_duration(text: str) -> int:
    """Seconds of `300`, `300s`, `5m`, `1h`, `1m30s`; ValueError otherwise."""
    value = text.strip()
    if value.isdigit():
        return int(value)
    match = _DURATION.match(value)
    if not value or not match:
        raise ValueError(f"not a duration (e.g. 300s, 5m, 1m30s): {text!r}")
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def duration(text: str) -> int:
    """argparse type of a duration option."""
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def last_line(text: Optional[str]) -> str:
    lines = [l.strip() for l in (text or "").splitlines() if l.strip()]
    return lines[-1] if lines else ""


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


# ---- ssh ---------------------------------------------------------------------------------------

_SSH_OPTION = re.compile(r"^\s*([A-Za-z]+)\s*(?:=\s*|\s+)(\S.*?)\s*$")
# Options about the destination itself, which the jump hosts of a ProxyJump must not inherit.
_DESTINATION_ONLY = frozenset(
    (
        "hostname", "port", "user", "hostkeyalias", "proxyjump", "proxycommand", "remotecommand",
        "requesttty", "sessiontype", "localcommand", "permitlocalcommand", "localforward",
        "remoteforward", "dynamicforward",
    )
)


def split_ssh_option(text: str) -> Tuple[str, str]:
    """(keyword in lower case, value) of an ssh `-o` option, `Key=Value` or `Key Value`."""
    match = _SSH_OPTION.match(text)
    if not match:
        raise ValueError(f"--ssh-option wants KEY=VALUE (an ssh -o option), got {text!r}")
    return match.group(1).lower(), match.group(2)


def parse_jump(spec: str) -> Tuple[str, str, str]:
    """(user, host, port) of one ProxyJump hop, `[user@]host[:port]` or `ssh://[user@]host[:port]`;
    user and port are empty when not given."""
    text = spec.strip()
    if text.startswith("ssh://"):
        text = text[len("ssh://"):]
    user, _, rest = text.rpartition("@")
    port = ""
    if rest.startswith("["):
        host, bracket, tail = rest[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise ValueError(f"ProxyJump {spec!r}: not [user@]host[:port]")
        port = tail[1:]
    elif rest.count(":") == 1:
        host, _, port = rest.partition(":")
    else:
        host = rest
    if not host or any(c.isspace() for c in host) or (port and not port.isdigit()) or rest.endswith(":"):
        raise ValueError(f"ProxyJump {spec!r}: not [user@]host[:port]")
    return user, host, port


def proxy_command(jumps: Sequence[str], hop_options: Sequence[str]) -> str:
    """The ProxyCommand doing what ProxyJump=<jumps, comma-separated> does, but with `hop_options`
    on the ssh of every hop (ssh's ProxyJump gives the hops none of the command line's options).

    ssh expands %-tokens in a ProxyCommand, then runs it with /bin/sh: every word is shell-quoted
    and its `%` doubled, except the `-W [%h]:%p` target that ssh fills in; an earlier hop is a
    ProxyCommand nested in the one of the next hop, doubled once more."""
    *earlier, last = jumps
    user, host, port = parse_jump(last)
    argv = ["ssh", *hop_options]
    if earlier:
        argv += ["-o", "ProxyCommand=" + proxy_command(earlier, hop_options)]
    if user:
        argv += ["-l", user]
    if port:
        argv += ["-p", port]
    words = [shlex.quote(word.replace("%", "%%")) for word in [*argv, "-W"]]
    return " ".join([*words, "'[%h]:%p'", shlex.quote(host.replace("%", "%%"))])


class Ssh:
    """How the launcher reaches the machines: the same options for every ssh and scp."""

    def __init__(self, options: Sequence[str], key: Optional[str], user: str):
        given = [*options, *DEFAULT_SSH_OPTIONS]  # ssh takes the first value: the user's win
        parsed = [split_ssh_option(o) for o in given]
        identity = ["-i", key] if key else []
        hop = [w for o, (k, _) in zip(given, parsed) if k not in _DESTINATION_ONLY for w in ("-o", o)]
        hop += identity
        self.options: List[str] = []
        for option, (keyword, value) in zip(given, parsed):
            if keyword == "proxyjump" and value.lower() != "none":
                option = "ProxyCommand=" + proxy_command(value.split(","), hop)
            self.options += ["-o", option]
        self.options += identity
        self.user = user

    @classmethod
    def of(cls, opts: argparse.Namespace) -> "Ssh":
        return cls(opts.ssh_option, opts.ssh_key, opts.ssh_user)

    def login(self, host: str) -> str:
        return f"{self.user}@{host}" if self.user else host

    def ssh(self, host: str, *commands: str) -> List[str]:
        """ssh running the commands one after the other (`&&`) on `host`."""
        return ["ssh", *self.options, self.login(host), " && ".join(commands)]

    def scp(self, local: Path, host: str, path: str) -> List[str]:
        target = f"[{host}]" if ":" in host else host
        return ["scp", "-q", *self.options, str(local), f"{self.login(target)}:{path}"]


# ---- commands ----------------------------------------------------------------------------------


@dataclass
class Write:
    """A local file the launcher writes (shown as a heredoc by --dry-run)."""

    path: Path
    content: str


class Remote(list):
    """An ssh or scp command line (its words, as a list) on one machine, with how long it may take
    and what to say when its remote part gives up (exit status TIMED_OUT)."""

    def __init__(self, argv: Sequence[str], host: str, timeout: Optional[int] = None, gave_up: str = ""):
        super().__init__(argv)
        self.host = host
        self.timeout = timeout
        self.gave_up = gave_up


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
            not arg.startswith("--") and arg[:2] in ("-n", "-p", "-H")
        ):
            raise ValueError(f"{arg!r}: -n, -p and -H are set by launch.py for each process")


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


def wait_until(condition: str, seconds: int, what: str) -> str:
    """A POSIX shell loop running `condition` every 2 s until it succeeds; after `seconds` it
    prints `what` (plain text: no quotes, `$` or backslashes) to stderr and exits with TIMED_OUT."""
    if re.search(r'["$`\\]', what):
        raise ValueError(f"not plain text: {what!r}")
    return (
        f"deadline=$(($(date +%s) + {seconds})); "
        f"until {condition}; do "
        f'if [ "$(date +%s)" -ge "$deadline" ]; then echo "{what}" >&2; exit {TIMED_OUT}; fi; '
        "sleep 2; done"
    )


def docker_wait(sudo: Sequence[str], seconds: int) -> str:
    """Waits until the Docker daemon answers (a new instance may still be installing it)."""
    info = shlex.join([*sudo, "docker", "info"])
    return wait_until(f"{info} >/dev/null 2>&1", seconds, f"launch.py: Docker is not running after {seconds}s")


def plan(opts: argparse.Namespace, hosts: Sequence[str], verger_args: Sequence[str]) -> List[Step]:
    """Everything `start` does, in order: local files, then copies, the wait for Docker and the
    starts over ssh."""
    text = hostfile(hosts, opts.port)
    stage = Path(opts.stage_dir)
    local_hostfile = stage / "hosts.txt"
    remote = opts.remote_hostfile
    remote_dir = os.path.dirname(remote) or "/"
    sudo = ["sudo"] if opts.sudo else []
    via = Ssh.of(opts)
    hosts = [normalize_host(h) for h in hosts]

    def ssh(host: str, *commands: str) -> Remote:
        return Remote(via.ssh(host, *commands), host)

    def scp(local: Path, host: str, path: str) -> Remote:
        return Remote(via.scp(local, host, path), host)

    steps: List[Step] = [Write(local_hostfile, text)]
    for host in hosts:
        steps.append(scp(local_hostfile, host, "/tmp/verger-hosts.txt"))
        steps.append(ssh(host, shlex.join([*sudo, "install", "-D", "-m", "0644", "/tmp/verger-hosts.txt", remote])))

    if opts.mode == "docker" and opts.docker_wait > 0:
        # Every machine is ready before any process starts: a process started alone waits for
        # peers that never come.
        wait = opts.docker_wait
        for host in hosts:
            steps.append(Remote(
                via.ssh(host, docker_wait(sudo, wait)),
                host,
                timeout=wait + SSH_SLACK,
                gave_up=(
                    f"{host}: Docker is not running after {wait}s (--docker-wait); a new instance may"
                    " still be installing it from its user data (see `sudo cloud-init status --long`"
                    " there), or it failed to: wait longer or fix that, then run again"
                ),
            ))

    count = len(hosts)
    template = UNIT_TEMPLATE.read_text() if opts.mode == "systemd" else ""
    for index, host in enumerate(hosts):
        argv = [*verger_args, "-n", str(count), "-p", str(index), "-H", remote]
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
        remote = step if isinstance(step, Remote) else None
        on = f"{remote.host}: " if remote else ""
        kwargs = {"timeout": remote.timeout} if remote and remote.timeout else {}
        try:
            run(step, check=True, **kwargs)
        except FileNotFoundError:
            raise LaunchError(f"{step[0]} is not installed") from None
        except subprocess.TimeoutExpired:
            raise LaunchError((remote and remote.gave_up) or f"{on}no answer in time: {shlex.join(step)}") from None
        except subprocess.CalledProcessError as e:
            if e.returncode == TIMED_OUT and remote and remote.gave_up:
                raise LaunchError(remote.gave_up) from None
            raise LaunchError(f"{on}exit status {e.returncode}: {shlex.join(step)}") from None


# ---- status, logs, stop ------------------------------------------------------------------------


def unit_name(opts: argparse.Namespace) -> str:
    return f"{opts.name}.service"


def status_command(opts: argparse.Namespace) -> str:
    """Prints the state of verger on a machine: `STATUS EXIT_CODE` of the container (docker) or the
    unit's active state (systemd)."""
    sudo = ["sudo"] if opts.sudo else []
    if opts.mode == "docker":
        return shlex.join([*sudo, "docker", "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", opts.name])
    return shlex.join(["systemctl", "is-active", unit_name(opts)])


def logs_command(opts: argparse.Namespace) -> str:
    sudo = ["sudo"] if opts.sudo else []
    tail = str(opts.tail)
    if opts.mode == "docker":
        follow = ["--follow"] if opts.follow else []
        return shlex.join([*sudo, "docker", "logs", "--tail", tail, *follow, opts.name]) + " 2>&1"
    follow = ["--follow"] if opts.follow else []
    return shlex.join([*sudo, "journalctl", "--unit", unit_name(opts), "--lines", tail, "--no-pager", *follow])


def stop_command(opts: argparse.Namespace) -> str:
    """SIGTERM (verger stops listing and commits the epochs in flight), at most --grace seconds for
    it to exit, then SIGKILL; prints what `status_command` prints (docker) or the exit code."""
    sudo = ["sudo"] if opts.sudo else []
    grace = opts.grace
    if opts.mode == "docker":
        commands = [
            shlex.join([*sudo, "docker", "stop", "--time", str(grace), opts.name]) + " >/dev/null",
            status_command(opts),
        ]
        if opts.rm:
            commands.append(shlex.join([*sudo, "docker", "rm", opts.name]) + " >/dev/null")
        return " && ".join(commands)
    unit = unit_name(opts)
    active = shlex.join(["systemctl", "is-active", "--quiet", unit])
    # `systemctl stop` would give up after the unit's TimeoutStopSec: signal, wait --grace, then
    # stop (a second SIGTERM ends verger at once; SIGKILL after TimeoutStopSec).
    return (
        f"if {active}; then "
        + shlex.join([*sudo, "systemctl", "kill", "--signal=SIGTERM", unit])
        + f"; deadline=$(($(date +%s) + {grace})); "
        f'while {active} && [ "$(date +%s)" -lt "$deadline" ]; do sleep 1; done; fi; '
        + shlex.join([*sudo, "systemctl", "stop", unit])
        + " && "
        + shlex.join(["systemctl", "show", "--property=ExecMainStatus", "--value", unit])
    )


def remote_commands(opts: argparse.Namespace, hosts: Sequence[str]) -> List[Remote]:
    """The one ssh command per machine of `status`, `logs` or `stop`."""
    via = Ssh.of(opts)
    if opts.command == "status":
        command, timeout = status_command(opts), SSH_SLACK
    elif opts.command == "logs":
        command, timeout = logs_command(opts), None if opts.follow else 2 * SSH_SLACK
    else:
        command, timeout = stop_command(opts), opts.grace + SSH_SLACK
    return [Remote(via.ssh(h, command), h, timeout) for h in (normalize_host(h) for h in hosts)]


def on_each(commands: Sequence[Remote], run: Runner) -> List["subprocess.CompletedProcess[str]"]:
    """Runs the commands at once (up to PARALLEL), capturing their output; in their order."""

    def one(cmd: Remote) -> "subprocess.CompletedProcess[str]":
        try:
            return run(cmd, capture_output=True, text=True, timeout=cmd.timeout)
        except FileNotFoundError:
            raise LaunchError("ssh is not installed") from None
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(cmd, TIMED_OUT, "", f"no answer within {cmd.timeout}s")

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(PARALLEL, len(commands)))) as pool:
        return list(pool.map(one, commands))


def state(opts: argparse.Namespace, done: "subprocess.CompletedProcess[str]") -> Tuple[bool, str]:
    """(running, description) of a machine from the output of status_command / stop_command."""
    out = (done.stdout or "").strip()
    err = done.stderr or ""
    what = f"container {opts.name}" if opts.mode == "docker" else f"unit {unit_name(opts)}"
    if done.returncode == 255:
        return False, f"unreachable: {last_line(err) or 'ssh failed'}"
    if done.returncode == TIMED_OUT and not out:
        return False, f"error: {last_line(err)}"
    lowered = err.lower()
    if done.returncode != 0 and ("no such" in lowered or "not loaded" in lowered):
        return False, f"no {what}"
    if opts.mode == "docker" or opts.command == "stop":
        if done.returncode != 0:
            return False, f"error: {last_line(err) or f'exit status {done.returncode}'}"
        if opts.mode == "systemd":  # stop: ExecMainStatus
            return False, f"exited (exit code {out or '?'})"
        status, _, code = out.partition(" ")
        if status == "running":
            return True, "running"
        if status == "exited":
            return False, f"exited (exit code {code or '?'})"
        return False, status or "unknown state"
    # systemctl is-active: `active` and status 0, or another state and status 3.
    word = out.split()[0] if out else ""
    if done.returncode == 0 and word == "active":
        return True, "running"
    if word:
        return False, word
    return False, f"error: {last_line(err) or f'exit status {done.returncode}'}"


def show_states(opts: argparse.Namespace, hosts: Sequence[str], results: Sequence["subprocess.CompletedProcess[str]"]) -> List[Tuple[str, bool, str]]:
    rows = [(h, *state(opts, r)) for h, r in zip(hosts, results)]
    width = max(len(h) for h in hosts)
    for host, _, text in rows:
        print(f"{host:<{width}}  {text}", flush=True)
    return rows


def status(opts: argparse.Namespace, commands: Sequence[Remote], run: Runner) -> int:
    hosts = [c.host for c in commands]
    rows = show_states(opts, hosts, on_each(commands, run))
    up = sum(1 for _, running, _ in rows if running)
    print(f"{up} of {len(rows)} running", file=sys.stderr)
    return 0 if up == len(rows) else 1


def logs(opts: argparse.Namespace, commands: Sequence[Remote], run: Runner) -> int:
    if opts.follow:
        try:
            return run(commands[0]).returncode
        except FileNotFoundError:
            raise LaunchError("ssh is not installed") from None
        except KeyboardInterrupt:
            return 130
    failed = 0
    for cmd, done in zip(commands, on_each(commands, run)):
        for line in (done.stdout or "").splitlines():
            print(f"{cmd.host} | {line}")
        if done.returncode != 0:
            failed += 1
            for line in (done.stderr or "").splitlines() or [f"exit status {done.returncode}"]:
                print(f"{cmd.host} | launch.py: {line}", file=sys.stderr)
    sys.stdout.flush()
    return 1 if failed else 0


def stop(opts: argparse.Namespace, commands: Sequence[Remote], run: Runner) -> int:
    hosts = [c.host for c in commands]
    print(f"stopping {len(hosts)} machine{'s' if len(hosts) != 1 else ''} (grace {opts.grace}s)", file=sys.stderr, flush=True)
    rows = show_states(opts, hosts, on_each(commands, run))
    failed = [h for h, _, text in rows if text.startswith(("unreachable", "error"))]
    if any(text.endswith("(exit code 137)") for _, _, text in rows):
        print(f"launch.py: exit code 137: killed after the {opts.grace}s grace (--grace); its epochs in flight are redone by the next run", file=sys.stderr)
    return 1 if failed else 0


# ---- command line ------------------------------------------------------------------------------

_MACHINES = "(--ips IPS | --ec2-tag KEY=VALUE)"


def common_options() -> argparse.ArgumentParser:
    """The options of every command: which machines, how to reach them, what runs there."""
    p = argparse.ArgumentParser(add_help=False)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--ips", help="comma-separated addresses or names, in process order")
    where.add_argument("--ec2-tag", metavar="KEY=VALUE", help="the running EC2 instances with this tag (private IPs)")
    p.add_argument("--region", help="AWS region for --ec2-tag (default: the aws CLI's)")
    p.add_argument("--mode", choices=("docker", "systemd"), default="docker", help="how verger runs (default %(default)s)")
    p.add_argument("--name", default="verger", help="container / systemd unit name (default %(default)s)")
    p.add_argument("--ssh-user", default="ec2-user", help="ssh login; empty for ssh's default (default %(default)s)")
    p.add_argument("--ssh-key", help="ssh identity file (also used for ProxyJump hosts)")
    p.add_argument("--ssh-option", action="append", default=[], metavar="OPTION", help=f"ssh -o option for ssh and scp, repeatable; wins over the defaults {' '.join(DEFAULT_SSH_OPTIONS)}; a ProxyJump is run with all of them")
    p.add_argument("--no-sudo", dest="sudo", action="store_false", help="run remote commands without sudo")
    p.add_argument("--dry-run", action="store_true", help="print the commands as a shell script; run nothing")
    return p


def parser() -> argparse.ArgumentParser:
    common = common_options()
    p = argparse.ArgumentParser(
        prog="launch.py",
        usage=f"%(prog)s [start] {_MACHINES} [options] -- VERGER_ARGS...\n"
        f"       %(prog)s {{status,logs,stop}} {_MACHINES} [options]",
        description="Start, watch and stop a verger cluster, one process per machine (see deploy/README.md).",
        epilog="The command comes first; start is the default: `launch.py --ips A,B -- run ...` is "
        "`launch.py start --ips A,B -- run ...`. `launch.py COMMAND --help` shows a command's options.",
    )
    commands = p.add_subparsers(dest="command", metavar="{start,status,logs,stop}", required=True)
    start = commands.add_parser(
        "start", parents=[common], help="write the hostfile and start one verger per machine (the default)",
        usage=f"launch.py [start] {_MACHINES} [options] -- VERGER_ARGS...",
        description="Start one verger process per machine as a timely cluster, replacing a running one.",
        epilog="Everything after -- is passed to verger, followed by -n N -p I -H HOSTFILE.",
    )
    start.add_argument("--port", type=int, default=DEFAULT_PORT, help="timely port on every machine (default %(default)s)")
    start.add_argument("--image", default="verger", help="docker image (default %(default)s)")
    start.add_argument("--binary", default="/usr/local/bin/verger", help="verger on the machines, systemd mode (default %(default)s)")
    start.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment for verger, e.g. VERGER_LOG=info (repeatable)")
    start.add_argument("--remote-hostfile", default=REMOTE_HOSTFILE, help="hostfile path on the machines (default %(default)s)")
    start.add_argument("--stage-dir", default=os.path.join(tempfile.gettempdir(), "verger-launch"), help="local dir for the hostfile and units (default %(default)s)")
    start.add_argument("--docker-wait", type=duration, default=parse_duration(DEFAULT_DOCKER_WAIT), metavar="DURATION", help=f"docker mode: wait this long (e.g. 90s, 5m) for Docker to answer on every machine before starting; 0: do not wait (default {DEFAULT_DOCKER_WAIT})")
    commands.add_parser(
        "status", parents=[common], help="whether verger runs on each machine (exit status 1 if not on all)",
        usage=f"launch.py status {_MACHINES} [options]",
        description="One line per machine: running, exited (with its exit code), no container, unreachable.",
    )
    log = commands.add_parser(
        "logs", parents=[common], help="the last lines of each machine's log, prefixed with its host",
        usage=f"launch.py logs {_MACHINES} [--tail N] [--follow] [options]",
        description="The end of each machine's log (docker logs / journalctl), each line prefixed with `HOST | `.",
    )
    log.add_argument("--tail", type=int, default=DEFAULT_TAIL, metavar="N", help="lines per machine (default %(default)s)")
    log.add_argument("--follow", action="store_true", help="keep printing new lines (one machine only); Ctrl-C to end")
    halt = commands.add_parser(
        "stop", parents=[common], help="stop verger on every machine, committing the epochs in flight",
        usage=f"launch.py stop {_MACHINES} [--grace DURATION] [--rm] [options]",
        description="SIGTERM to every process at once: verger stops listing, commits the epochs in flight "
        "and exits 0. One still running after --grace is killed (its epochs are redone by the next run).",
    )
    halt.add_argument("--grace", type=duration, default=parse_duration(DEFAULT_GRACE), metavar="DURATION", help=f"how long verger may take to commit and exit before it is killed (default {DEFAULT_GRACE}; docker stop --time)")
    halt.add_argument("--rm", action="store_true", help="docker mode: also remove the stopped containers (their logs go with them)")
    p.commands = {name: commands.choices[name] for name in COMMANDS}  # type: ignore[attr-defined]
    return p


def machines(opts: argparse.Namespace, run: Runner) -> Optional[List[str]]:
    """The selected hosts, or None after printing the EC2 query of a dry run."""
    if not opts.ec2_tag:
        return opts.ips.split(",")
    key, value = parse_tag(opts.ec2_tag)
    if opts.dry_run:
        # No instance is listed in a dry run: show the query; --ips shows the rest.
        print("# the machines would be listed with:")
        print(shlex.join(ec2_command(key, value, opts.region)))
        if opts.command == "start":
            print("# then the hostfile copied and one verger started on each (try --ips ... --dry-run)")
        else:
            print(f"# then one ssh per machine for {opts.command} (try --ips ... --dry-run)")
        return None
    return ec2_hosts(key, value, opts.region, run)


def main(argv: Optional[Sequence[str]] = None, run: Runner = subprocess.run) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    head, verger_args, separated = argv[:split], argv[split + 1 :], split < len(argv)
    if not head or head[0] not in (*COMMANDS, "-h", "--help"):
        head = ["start", *head]  # launch.py --ips ... -- run ...: the launch of old
    p = parser()
    opts, extra = p.parse_known_args(head)  # handles --help
    sub = p.commands[opts.command]  # type: ignore[attr-defined]
    if extra:
        if extra[0] in COMMANDS:
            sub.error(f"the command comes first: launch.py {extra[0]} --ips ... (not after the options)")
        sub.error(f"unrecognized arguments: {' '.join(extra)}")
    if opts.command == "start":
        if not separated:
            sub.error("give verger's arguments after --, e.g. -- run --input s3://... --output s3://...")
    elif separated:
        sub.error(f"{opts.command} takes no verger arguments (nothing after --)")
    try:
        Ssh.of(opts)  # checks the ssh options
        if opts.command == "start":
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
        if opts.command == "logs" and opts.tail < 0:
            raise ValueError("--tail must be 0 or more")
        if opts.command == "logs" and opts.follow and opts.ips and len(opts.ips.split(",")) != 1:
            raise ValueError("--follow follows one machine: give one address with --ips")
        hosts = machines(opts, run)
        if hosts is None:
            return 0
        if opts.command == "start":
            steps = plan(opts, hosts, verger_args)
        else:
            hostfile(hosts)  # the same checks of the hosts as start (no duplicates)
            if opts.command == "logs" and opts.follow and len(hosts) != 1:
                raise LaunchError(f"--follow follows one machine, and {len(hosts)} are tagged {opts.ec2_tag}: use --ips")
            commands = remote_commands(opts, hosts)
    except (ValueError, LaunchError) as e:
        sub.error(str(e))
    if opts.command != "start":
        if opts.dry_run:
            sys.stdout.write(script(commands))
            return 0
        try:
            return {"status": status, "logs": logs, "stop": stop}[opts.command](opts, commands, run)
        except LaunchError as e:
            print(f"launch.py: error: {e}", file=sys.stderr)
            return 1
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
