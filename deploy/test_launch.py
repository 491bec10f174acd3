"""Tests of deploy/launch.py: python3 -m unittest discover -s deploy -p 'test_*.py'"""

import contextlib
import io
import json
import os
import shlex
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import launch  # noqa: E402

SSH = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new", "-o", "ConnectTimeout=10"]
VERGER = ["run", "--input", "s3://b/in", "--output", "s3://b/out", "-w", "2"]


def no_run(*args, **kwargs):
    raise AssertionError(f"nothing may run here, got {args!r}")


def dry_run(*args):
    """stdout of main([*args, '--dry-run']); it must exit 0 and run nothing."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = launch.main([*args[: args.index("--")], "--dry-run", *args[args.index("--"):]], run=no_run)
    assert code == 0
    return out.getvalue()


def usage_error(*args):
    """stderr of main(args), which must stop with argparse's exit status 2."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            launch.main(list(args), run=no_run)
        except SystemExit as e:
            assert e.code == 2, e.code
            return err.getvalue()
    raise AssertionError("no usage error")


class Hostfile(unittest.TestCase):
    def test_one_line_per_process_in_the_given_order(self):
        self.assertEqual(
            launch.hostfile(["10.0.0.3", "10.0.0.1", "10.0.0.2"]),
            "10.0.0.3:2101\n10.0.0.1:2101\n10.0.0.2:2101\n",
        )

    def test_port(self):
        self.assertEqual(launch.hostfile(["10.0.0.1"], 7000), "10.0.0.1:7000\n")
        self.assertEqual(launch.hostfile(["10.0.0.1"], 65535), "10.0.0.1:65535\n")
        for bad in (0, -1, 65536, True, "2101", 2101.0):
            with self.subTest(port=bad), self.assertRaises(ValueError):
                launch.hostfile(["10.0.0.1"], bad)

    def test_ipv6_is_bracketed_and_normalized(self):
        # Rust parses `[addr]:port` as a SocketAddrV6; a bare `::1:2101` would be ambiguous.
        self.assertEqual(
            launch.hostfile(["::1", "[2001:DB8:0::0001]", "10.0.0.1"]),
            "[::1]:2101\n[2001:db8::1]:2101\n10.0.0.1:2101\n",
        )

    def test_host_names(self):
        self.assertEqual(
            launch.hostfile(["ip-10-0-0-1.EC2.internal", "localhost", "worker-2.example.com."]),
            "ip-10-0-0-1.ec2.internal:2101\nlocalhost:2101\nworker-2.example.com:2101\n",
        )

    def test_surrounding_spaces_are_ignored(self):
        self.assertEqual(launch.hostfile([" 10.0.0.1", "10.0.0.2 "]), "10.0.0.1:2101\n10.0.0.2:2101\n")

    def test_duplicates_are_rejected_after_normalization(self):
        for hosts in (["10.0.0.1", "10.0.0.2", "10.0.0.1"], ["::1", "0:0::1"], ["Host", "host."]):
            with self.subTest(hosts=hosts), self.assertRaisesRegex(ValueError, "duplicate"):
                launch.hostfile(hosts)

    def test_invalid_hosts_are_rejected(self):
        bad = [
            "",
            "   ",
            "10.0.0.1 10.0.0.2",  # timely would bind both, peers could not connect
            "10.0.0.1:2101",  # the port is --port
            "[::1]:2101",
            "[10.0.0.1]",
            "10.0.0.256",
            "010.0.0.1",
            "fe80::1%eth0",
            "-worker",
            "worker-",
            "under_score",
            "a" * 64 + ".example.com",
            "a..b",
            "1:2:3",
        ]
        for host in bad:
            with self.subTest(host=host), self.assertRaises(ValueError):
                launch.hostfile(["10.9.9.9", host])

    def test_no_hosts(self):
        with self.assertRaises(ValueError):
            launch.hostfile([])
        with self.assertRaises(ValueError):
            launch.hostfile("10.0.0.1")  # a string, not a list

    def test_lines_are_exactly_what_timely_reads(self):
        # Timely takes the first -n lines verbatim: no header, blank line or trailing spaces.
        text = launch.hostfile(["10.0.0.1", "::1", "node.local"], 2102)
        lines = text.split("\n")
        self.assertEqual(lines[-1], "")
        self.assertEqual(len(lines) - 1, 3)
        for line in lines[:-1]:
            self.assertEqual(line, line.strip())
            self.assertTrue(line.endswith(":2102"))


class Ec2(unittest.TestCase):
    def fake_aws(self, instances, calls):
        def run(cmd, **kwargs):
            calls.append(cmd)
            return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(instances), stderr="")

        return run

    def test_private_ips_sorted_by_launch_index_then_instance_id(self):
        calls = []
        instances = [
            {"id": "i-0c", "ip": "10.0.0.12", "index": 1},
            {"id": "i-0b", "ip": "10.0.0.11", "index": 0},
            {"id": "i-0a", "ip": "10.0.0.10", "index": 1},
        ]
        hosts = launch.ec2_hosts("verger", "worker", "eu-west-1", self.fake_aws(instances, calls))
        self.assertEqual(hosts, ["10.0.0.11", "10.0.0.10", "10.0.0.12"])
        self.assertEqual(len(calls), 1)
        cmd = calls[0]
        self.assertEqual(cmd[:3], ["aws", "ec2", "describe-instances"])
        self.assertIn("Name=tag:verger,Values=worker", cmd)
        self.assertIn("Name=instance-state-name,Values=running", cmd)
        self.assertEqual(cmd[cmd.index("--region") + 1], "eu-west-1")
        self.assertEqual(cmd[-2:], ["--output", "json"])

    def test_no_instances_or_missing_ips_are_errors(self):
        for instances in ([], [{"id": "i-1", "ip": None, "index": 0}]):
            with self.subTest(instances=instances), self.assertRaises(launch.LaunchError):
                launch.ec2_hosts("verger", "worker", None, self.fake_aws(instances, []))

    def test_aws_failure_is_reported(self):
        def failing(cmd, **kwargs):
            raise subprocess.CalledProcessError(255, cmd, output="", stderr="Unable to locate credentials")

        with self.assertRaisesRegex(launch.LaunchError, "Unable to locate credentials"):
            launch.ec2_hosts("verger", "worker", None, failing)

    def test_tag_syntax(self):
        self.assertEqual(launch.parse_tag("verger=worker"), ("verger", "worker"))
        self.assertEqual(launch.parse_tag("role=a=b"), ("role", "a=b"))
        for bad in ("verger", "=worker", "verger=", "a=b,c"):
            with self.subTest(tag=bad), self.assertRaises(ValueError):
                launch.parse_tag(bad)

    def test_dry_run_prints_the_query_and_runs_nothing(self):
        out = dry_run("--ec2-tag", "verger=worker", "--", *VERGER)
        expected = shlex.join(launch.ec2_command("verger", "worker", None))
        self.assertIn(expected + "\n", out)
        self.assertNotIn("docker", out)


class DryRun(unittest.TestCase):
    def test_docker_commands_for_two_instances(self):
        with tempfile.TemporaryDirectory() as stage:
            out = dry_run("--ips", "10.0.0.1,10.0.0.2", "--stage-dir", stage, "--", *VERGER)
            self.assertEqual(os.listdir(stage), [], "a dry run writes nothing")
        hosts = f"{stage}/hosts.txt"
        copy = "sudo install -D -m 0644 /tmp/verger-hosts.txt /etc/verger/hosts.txt"

        def start(index):
            docker = [
                "sudo", "docker", "run", "--detach", "--name", "verger", "--network", "host",
                "--restart", "no", "--volume", "/etc/verger:/etc/verger:ro", "verger",
                *VERGER, "-n", "2", "-p", str(index), "-h", "/etc/verger/hosts.txt",
            ]
            rm = "sudo docker rm --force verger >/dev/null 2>&1 || true; "
            return shlex.join([*SSH, f"ec2-user@10.0.0.{index + 1}", rm + shlex.join(docker)])

        scp = ["scp", "-q", *SSH[1:]]
        expected = [
            f"mkdir -p {stage}",
            f"cat > {hosts} <<'EOF'",
            "10.0.0.1:2101",
            "10.0.0.2:2101",
            "EOF",
            shlex.join([*scp, hosts, "ec2-user@10.0.0.1:/tmp/verger-hosts.txt"]),
            shlex.join([*SSH, "ec2-user@10.0.0.1", copy]),
            shlex.join([*scp, hosts, "ec2-user@10.0.0.2:/tmp/verger-hosts.txt"]),
            shlex.join([*SSH, "ec2-user@10.0.0.2", copy]),
            start(0),
            start(1),
        ]
        self.assertEqual(out.splitlines(), expected)
        self.assertIn("-n 2 -p 0 -h /etc/verger/hosts.txt", out)
        self.assertIn("-n 2 -p 1 -h /etc/verger/hosts.txt", out)

    def test_every_command_line_is_valid_shell(self):
        out = dry_run("--ips", "10.0.0.1,::1", "--", "run", "--input", "s3://b/in", "--output", "s3://b/out", "--include", "*.jpg", "--exclude", "it's/**")
        lines = out.splitlines()
        commands = [l for l in lines if l.startswith(("ssh ", "scp "))]
        self.assertEqual(len(commands), 6)
        for line in commands:
            argv = shlex.split(line)
            if argv[0] == "ssh":
                # The remote command survives both levels of quoting.
                remote = shlex.split(argv[-1].split("; ")[-1])
                if remote[:2] == ["sudo", "docker"]:
                    self.assertIn("*.jpg", remote)
                    self.assertIn("it's/**", remote)
        self.assertIn("ec2-user@::1", out)
        self.assertIn("'ec2-user@[::1]:/tmp/verger-hosts.txt'", out)
        self.assertIn("[::1]:2101", out)

    def test_options(self):
        out = dry_run(
            "--ips", "a.internal,b.internal", "--port", "7000", "--image", "registry/verger:1",
            "--ssh-user", "", "--ssh-key", "k.pem", "--ssh-option", "ProxyJump=bastion",
            "--no-sudo", "--env", "VERGER_LOG=info", "--remote-hostfile", "/srv/v/hosts",
            "--", *VERGER,
        )
        self.assertIn("a.internal:7000\nb.internal:7000\n", out)
        self.assertIn("-o ProxyJump=bastion -o BatchMode=yes", out)
        self.assertIn("-i k.pem a.internal 'install -D -m 0644 /tmp/verger-hosts.txt /srv/v/hosts'", out)
        self.assertIn("--volume /srv/v:/srv/v:ro --env VERGER_LOG=info registry/verger:1 run", out)
        self.assertIn("-n 2 -p 1 -h /srv/v/hosts", out)
        self.assertNotIn("sudo", out)

    def test_systemd_units(self):
        with tempfile.TemporaryDirectory() as stage:
            out = dry_run(
                "--ips", "10.0.0.1,10.0.0.2", "--mode", "systemd", "--stage-dir", stage,
                "--env", "VERGER_LOG=info", "--", "run", "--input", "s3://b/in",
                "--output", "s3://b/with space/100%", "-w", "2",
            )
        self.assertNotIn("@", out.replace("ec2-user@", ""), "a placeholder was left")
        for index in (0, 1):
            self.assertIn(f"cat > {stage}/verger-{index}.service <<'EOF'", out)
            self.assertIn(
                "ExecStart=/usr/local/bin/verger run --input s3://b/in --output "
                f'"s3://b/with space/100%%" -w 2 -n 2 -p {index} -h /etc/verger/hosts.txt\n',
                out,
            )
            self.assertIn(f"{stage}/verger-{index}.service ec2-user@10.0.0.{index + 1}:/tmp/verger.service", out)
        self.assertEqual(out.count("Environment=VERGER_LOG=info\n"), 2)
        self.assertEqual(out.count("Environment=VERGER_MODEL_DIR=/opt/verger/models\n"), 2)
        self.assertIn("sudo systemctl daemon-reload && sudo systemctl restart verger.service", out)
        self.assertNotIn("docker", out)

    def test_systemd_quoting(self):
        q = launch.systemd_quote
        self.assertEqual(q("s3://b/in"), "s3://b/in")
        self.assertEqual(q("a b"), '"a b"')
        self.assertEqual(q(""), '""')
        self.assertEqual(q("50%"), "50%%")
        self.assertEqual(q("$HOME"), "$$HOME")
        self.assertEqual(q('say "hi"\\'), '"say \\"hi\\"\\\\"')
        self.assertEqual(q("*.jpg"), "*.jpg")
        self.assertEqual(q("it's"), '"it\'s"')
        self.assertEqual(q(";"), '";"')


class Arguments(unittest.TestCase):
    def test_verger_arguments_are_required_after_the_separator(self):
        self.assertIn("after --", usage_error("--ips", "10.0.0.1"))
        self.assertIn("after --", usage_error("--ips", "10.0.0.1", "--"))
        self.assertIn("subcommand", usage_error("--ips", "10.0.0.1", "--", "--input", "x"))

    def test_cluster_flags_are_set_by_the_launcher_only(self):
        for flag in (["-n", "3"], ["-p", "0"], ["-h", "f"], ["-n3"], ["--process=1"], ["--hostfile", "f"]):
            with self.subTest(flag=flag):
                self.assertIn("set by launch.py", usage_error("--ips", "10.0.0.1", "--", *VERGER, *flag))

    def test_machines_are_required_once(self):
        usage_error("--", *VERGER)
        usage_error("--ips", "10.0.0.1", "--ec2-tag", "a=b", "--", *VERGER)

    def test_bad_values(self):
        self.assertIn("duplicate", usage_error("--ips", "10.0.0.1,10.0.0.1", "--", *VERGER))
        self.assertIn("port", usage_error("--ips", "10.0.0.1", "--port", "0", "--", *VERGER))
        self.assertIn("--env", usage_error("--ips", "10.0.0.1", "--env", "1X=y", "--", *VERGER))
        self.assertIn("absolute", usage_error("--ips", "10.0.0.1", "--remote-hostfile", "h.txt", "--", *VERGER))


class RealRun(unittest.TestCase):
    """Without --dry-run: the same commands, run in order, after the files are written."""

    def test_runs_what_the_dry_run_prints(self):
        with tempfile.TemporaryDirectory() as tmp:
            stage = Path(tmp) / "stage"
            args = ["--ips", "10.0.0.1,10.0.0.2", "--mode", "systemd", "--stage-dir", str(stage), "--", *VERGER]
            printed = [l for l in dry_run(*args).splitlines() if l.startswith(("ssh ", "scp "))]
            ran = []

            def run(cmd, **kwargs):
                self.assertTrue(kwargs.get("check"))
                if cmd[0] == "scp":
                    self.assertTrue(Path(cmd[-2]).is_file(), f"{cmd[-2]} is copied before it exists")
                ran.append(shlex.join(cmd))
                return subprocess.CompletedProcess(cmd, 0)

            with contextlib.redirect_stderr(io.StringIO()):
                self.assertEqual(launch.main(args, run=run), 0)
            self.assertEqual(ran, printed)
            self.assertEqual((stage / "hosts.txt").read_text(), "10.0.0.1:2101\n10.0.0.2:2101\n")
            self.assertIn("-p 1 -h", (stage / "verger-1.service").read_text())

    def test_a_failed_command_stops_the_launch(self):
        ran = []

        def run(cmd, **kwargs):
            ran.append(cmd)
            raise subprocess.CalledProcessError(255, cmd)

        err = io.StringIO()
        with tempfile.TemporaryDirectory() as stage, contextlib.redirect_stderr(err):
            code = launch.main(["--ips", "10.0.0.1,10.0.0.2", "--stage-dir", stage, "--", *VERGER], run=run)
        self.assertEqual(code, 1)
        self.assertEqual(len(ran), 1)
        self.assertIn("exit status 255", err.getvalue())


if __name__ == "__main__":
    unittest.main()
