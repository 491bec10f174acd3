"""Tests of deploy/launch.py: python3 -m unittest discover -s deploy -p 'test_*.py'"""

import contextlib
import fnmatch
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
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


def dry(*args):
    """stdout of main([*args, '--dry-run']) for a command without `--`."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = launch.main([*args, "--dry-run"], run=no_run)
    assert code == 0
    return out.getvalue()


def commands_of(out):
    """The ssh and scp command lines of a dry run, split into words."""
    return [shlex.split(l) for l in out.splitlines() if l.startswith(("ssh ", "scp "))]


def invoke(args, run):
    """(exit status, stdout, stderr) of main(args, run)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = launch.main(list(args), run=run)
    return code, out.getvalue(), err.getvalue()


def expand(proxy_command, host, port="22"):
    """What ssh runs for a ProxyCommand: %h, %p and %% replaced, then split as /bin/sh would."""
    tokens = {"h": host, "p": port, "%": "%"}
    text, i, out = proxy_command, 0, []
    while i < len(text):
        if text[i] == "%":
            out.append(tokens[text[i + 1]])  # KeyError: ssh rejects an unknown %-token
            i += 2
        else:
            out.append(text[i])
            i += 1
    return shlex.split("".join(out))


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
                *VERGER, "-n", "2", "-p", str(index), "-H", "/etc/verger/hosts.txt",
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
            shlex.join([*SSH, "ec2-user@10.0.0.1", launch.docker_wait(["sudo"], 300)]),
            shlex.join([*SSH, "ec2-user@10.0.0.2", launch.docker_wait(["sudo"], 300)]),
            start(0),
            start(1),
        ]
        self.assertEqual(out.splitlines(), expected)
        self.assertIn("-n 2 -p 0 -H /etc/verger/hosts.txt", out)
        self.assertIn("-n 2 -p 1 -H /etc/verger/hosts.txt", out)

    def test_every_command_line_is_valid_shell(self):
        out = dry_run("--ips", "10.0.0.1,::1", "--", "run", "--input", "s3://b/in", "--output", "s3://b/out", "--include", "*.jpg", "--exclude", "it's/**")
        lines = out.splitlines()
        commands = [l for l in lines if l.startswith(("ssh ", "scp "))]
        self.assertEqual(len(commands), 8)  # per machine: copy, install, wait for Docker, start
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
        # The user's options come first (ssh takes the first value); ProxyJump as a ProxyCommand.
        first = shlex.split(next(l for l in out.splitlines() if l.startswith("ssh ")))
        self.assertEqual(first[1], "-o")
        self.assertTrue(first[2].startswith("ProxyCommand=ssh "), first[2])
        self.assertTrue(first[2].endswith(" -W '[%h]:%p' bastion"), first[2])
        self.assertEqual(first[3:5], ["-o", "BatchMode=yes"])
        self.assertIn("-i k.pem a.internal 'install -D -m 0644 /tmp/verger-hosts.txt /srv/v/hosts'", out)
        self.assertIn("--volume /srv/v:/srv/v:ro --env VERGER_LOG=info registry/verger:1 run", out)
        self.assertIn("-n 2 -p 1 -H /srv/v/hosts", out)
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
                f'"s3://b/with space/100%%" -w 2 -n 2 -p {index} -H /etc/verger/hosts.txt\n',
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
        for flag in (["-n", "3"], ["-p", "0"], ["-H", "f"], ["-n3"], ["--process=1"], ["--hostfile", "f"]):
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
            self.assertIn("-p 1 -H", (stage / "verger-1.service").read_text())

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


POLICY = Path(__file__).resolve().parent / "iam-policy.json"

# Condition keys of the actions in iam-policy.json, from the Service Authorization Reference page
# "Actions, resources, and condition keys for Amazon S3" (the Actions table; global aws:* keys work
# with every action and are not listed). s3:prefix, s3:delimiter and s3:max-keys are keys of
# ListBucket (and ListBucketVersions) only: ListBucketMultipartUploads does not support them, and a
# condition on a key that is not in the request never matches, so the statement allows nothing.
_ANY_S3_ACTION = {
    "s3:AccessPointNetworkOrigin", "s3:DataAccessPointAccount", "s3:DataAccessPointArn",
    "s3:ResourceAccount", "s3:TlsVersion", "s3:authType", "s3:signatureAge",
    "s3:signatureversion", "s3:x-amz-content-sha256",
}
CONDITION_KEYS = {
    "s3:ListBucket": _ANY_S3_ACTION | {"s3:delimiter", "s3:max-keys", "s3:prefix"},
    "s3:ListBucketMultipartUploads": _ANY_S3_ACTION,
    "s3:GetObject": _ANY_S3_ACTION | {"s3:ExistingObjectTag/*"},
    "s3:PutObject": _ANY_S3_ACTION | {
        "s3:if-match", "s3:if-none-match", "s3:x-amz-acl", "s3:x-amz-server-side-encryption",
        "s3:x-amz-server-side-encryption-aws-kms-key-id", "s3:x-amz-storage-class",
        "s3:RequestObjectTag/*", "s3:RequestObjectTagKeys",
    },
    "s3:DeleteObject": _ANY_S3_ACTION,
    "s3:AbortMultipartUpload": _ANY_S3_ACTION,
    "s3:ListMultipartUploadParts": _ANY_S3_ACTION,
}


def as_list(value):
    return value if isinstance(value, list) else [value]


def allowed(policy, action, resource, context):
    """Whether an Allow statement grants `action` on `resource` for a request whose condition keys
    are `context` (enough IAM for this policy: Allow only, StringLike/StringEquals conditions)."""
    for st in policy["Statement"]:
        if st["Effect"] != "Allow" or action not in as_list(st["Action"]):
            continue
        if not any(fnmatch.fnmatchcase(resource, r) for r in as_list(st["Resource"])):
            continue
        ok = True
        for operator, keys in st.get("Condition", {}).items():
            for key, patterns in keys.items():
                if key not in context:
                    ok = False  # a key absent from the request matches no pattern
                elif operator == "StringLike":
                    ok = ok and any(fnmatch.fnmatchcase(context[key], p) for p in as_list(patterns))
                elif operator == "StringEquals":
                    ok = ok and context[key] in as_list(patterns)
                else:
                    raise AssertionError(f"operator {operator} not understood by this test")
        if ok:
            return True
    return False


class IamPolicy(unittest.TestCase):
    def setUp(self):
        self.policy = json.loads(POLICY.read_text())

    def test_list_multipart_uploads_has_no_prefix_condition(self):
        found = [st for st in self.policy["Statement"] if "s3:ListBucketMultipartUploads" in as_list(st["Action"])]
        self.assertEqual(len(found), 1, found)
        st = found[0]
        self.assertEqual(as_list(st["Resource"]), ["arn:aws:s3:::OUTPUT_BUCKET"])
        for keys in st.get("Condition", {}).values():
            self.assertNotIn("s3:prefix", keys)

    def test_every_condition_key_is_one_its_actions_support(self):
        for st in self.policy["Statement"]:
            for action in as_list(st["Action"]):
                self.assertIn(action, CONDITION_KEYS, f"{action}: add its condition keys to the table")
                for keys in st.get("Condition", {}).values():
                    for key in keys:
                        with self.subTest(sid=st.get("Sid"), action=action, key=key):
                            supported = key.startswith("aws:") or any(
                                fnmatch.fnmatchcase(key, k) for k in CONDITION_KEYS[action]
                            )
                            self.assertTrue(supported, f"{action} does not support the condition key {key}")

    def test_the_requests_verger_makes_are_allowed(self):
        bucket = "arn:aws:s3:::OUTPUT_BUCKET"
        out = bucket + "/OUTPUT_PREFIX/"
        requests = [
            # listing the input (the run's --prefix under the input prefix) and reading it
            ("s3:ListBucket", "arn:aws:s3:::INPUT_BUCKET", {"s3:prefix": "INPUT_PREFIX/"}),
            ("s3:ListBucket", "arn:aws:s3:::INPUT_BUCKET", {"s3:prefix": "INPUT_PREFIX/apples/"}),
            ("s3:GetObject", "arn:aws:s3:::INPUT_BUCKET/INPUT_PREFIX/apples/1.jpg", {}),
            # the Delta log, and the uploads left open by a killed run (ListMultipartUploads with
            # the output prefix as a request parameter: it is no condition key of that action)
            ("s3:ListBucket", bucket, {"s3:prefix": "OUTPUT_PREFIX/"}),
            ("s3:ListBucketMultipartUploads", bucket, {}),
            ("s3:AbortMultipartUpload", out + "data/part-0.parquet", {}),
            # data files: PUT, or Create/UploadPart/CompleteMultipartUpload (all s3:PutObject)
            ("s3:PutObject", out + "data/part-0.parquet", {}),
            ("s3:GetObject", out + "_delta_log/00000000000000000001.json", {}),
            # a Delta version: a conditional PUT of the next log entry
            ("s3:PutObject", out + "_delta_log/00000000000000000002.json", {"s3:if-none-match": "*"}),
            ("s3:DeleteObject", out + "data/part-1.parquet", {}),
            # the lease: conditional PUT (If-None-Match: * to take it, If-Match to renew or take
            # over), GET to read its holder, DELETE to release it
            ("s3:PutObject", out + "_lease.json", {"s3:if-none-match": "*"}),
            ("s3:PutObject", out + "_lease.json", {"s3:if-match": '"etag"'}),
            ("s3:GetObject", out + "_lease.json", {}),
            ("s3:DeleteObject", out + "_lease.json", {}),
        ]
        for action, resource, context in requests:
            with self.subTest(action=action, resource=resource):
                self.assertTrue(allowed(self.policy, action, resource, context))

    def test_nothing_outside_the_two_prefixes(self):
        denied = [
            ("s3:ListBucket", "arn:aws:s3:::OUTPUT_BUCKET", {"s3:prefix": ""}),
            ("s3:ListBucket", "arn:aws:s3:::OUTPUT_BUCKET", {}),
            ("s3:ListBucket", "arn:aws:s3:::INPUT_BUCKET", {"s3:prefix": "other/"}),
            ("s3:GetObject", "arn:aws:s3:::INPUT_BUCKET/other/1.jpg", {}),
            ("s3:PutObject", "arn:aws:s3:::INPUT_BUCKET/INPUT_PREFIX/1.jpg", {}),
            ("s3:DeleteObject", "arn:aws:s3:::INPUT_BUCKET/INPUT_PREFIX/1.jpg", {}),
            ("s3:PutObject", "arn:aws:s3:::OUTPUT_BUCKET/other/x", {}),
            ("s3:ListBucketMultipartUploads", "arn:aws:s3:::INPUT_BUCKET", {}),
        ]
        for action, resource, context in denied:
            with self.subTest(action=action, resource=resource, context=context):
                self.assertFalse(allowed(self.policy, action, resource, context))

    def test_the_placeholders_the_readme_replaces(self):
        text = POLICY.read_text()
        for name in ("INPUT_BUCKET", "INPUT_PREFIX", "OUTPUT_BUCKET", "OUTPUT_PREFIX"):
            self.assertIn(name, text)


class DockerWait(unittest.TestCase):
    def test_docker_mode_waits_for_docker_on_every_machine_before_starting_any(self):
        lines = [l for l in dry_run("--ips", "10.0.0.1,10.0.0.2", "--", *VERGER).splitlines() if l.startswith("ssh ")]
        waits = [i for i, l in enumerate(lines) if "docker info" in l]
        runs = [i for i, l in enumerate(lines) if "docker run" in l]
        self.assertEqual(len(waits), 2)
        self.assertEqual(len(runs), 2)
        self.assertLess(max(waits), min(runs))
        for index, host in enumerate(("10.0.0.1", "10.0.0.2")):
            argv = shlex.split(lines[waits[index]])
            self.assertEqual(argv[-2], f"ec2-user@{host}")
            self.assertIn("until sudo docker info >/dev/null 2>&1; do", argv[-1])
            self.assertIn("+ 300))", argv[-1])

    def test_the_wait_option(self):
        for value, seconds in (("90s", 90), ("5m", 300), ("1m30s", 90), ("45", 45), ("1h", 3600)):
            with self.subTest(value=value):
                out = dry_run("--ips", "10.0.0.1", "--docker-wait", value, "--", *VERGER)
                self.assertIn(f"+ {seconds}))", out)
        self.assertNotIn("docker info", dry_run("--ips", "10.0.0.1", "--docker-wait", "0", "--", *VERGER))
        self.assertNotIn("docker info", dry_run("--ips", "10.0.0.1", "--mode", "systemd", "--", *VERGER))
        for bad in ("soon", "-5", "5 m", "s", ""):
            with self.subTest(bad=bad):
                self.assertIn("duration", usage_error("--ips", "10.0.0.1", "--docker-wait", bad, "--", *VERGER))

    def test_a_machine_without_docker_stops_the_launch_naming_it(self):
        ran = []

        def run(cmd, **kwargs):
            ran.append((cmd, kwargs))
            if "docker info" in cmd[-1] and cmd[-2] == "ec2-user@10.0.0.2":
                raise subprocess.CalledProcessError(launch.TIMED_OUT, cmd)
            return subprocess.CompletedProcess(cmd, 0)

        with tempfile.TemporaryDirectory() as stage:
            code, _, err = invoke(["--ips", "10.0.0.1,10.0.0.2", "--stage-dir", stage, "--docker-wait", "2m", "--", *VERGER], run)
        self.assertEqual(code, 1)
        self.assertIn("10.0.0.2: Docker is not running after 120s (--docker-wait)", err)
        self.assertFalse([c for c, _ in ran if "docker run" in c[-1]], "nothing starts")
        waits = [k for c, k in ran if "docker info" in c[-1]]
        self.assertEqual([k.get("timeout") for k in waits], [120 + launch.SSH_SLACK] * 2)

    def test_a_local_timeout_is_reported_the_same_way(self):
        def run(cmd, **kwargs):
            if "docker info" in cmd[-1]:
                raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])
            return subprocess.CompletedProcess(cmd, 0)

        with tempfile.TemporaryDirectory() as stage:
            code, _, err = invoke(["--ips", "10.0.0.1", "--stage-dir", stage, "--", *VERGER], run)
        self.assertEqual(code, 1)
        self.assertIn("10.0.0.1: Docker is not running after 300s", err)

    def test_the_remote_loop_waits_then_gives_up(self):
        # The loop as a shell runs it, with a fake docker: one that answers at its second call, one
        # that never does.
        with tempfile.TemporaryDirectory() as tmp:
            docker = Path(tmp) / "docker"
            calls = Path(tmp) / "calls"
            docker.write_text(f'#!/bin/sh\necho x >> {shlex.quote(str(calls))}\n[ "$(wc -l < {shlex.quote(str(calls))})" -ge "${{READY_AT:-999}}" ]\n')
            docker.chmod(0o755)
            env = {**os.environ, "PATH": f"{tmp}{os.pathsep}{os.environ['PATH']}"}
            done = subprocess.run(["sh", "-c", launch.docker_wait([], 30)], env={**env, "READY_AT": "2"}, capture_output=True, text=True, timeout=60)
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertEqual(len(calls.read_text().split()), 2)
            calls.unlink()
            started = time.monotonic()
            done = subprocess.run(["sh", "-c", launch.docker_wait([], 1)], env=env, capture_output=True, text=True, timeout=60)
            self.assertEqual(done.returncode, launch.TIMED_OUT)
            self.assertIn("Docker is not running after 1s", done.stderr)
            self.assertLess(time.monotonic() - started, 10)

    def test_durations(self):
        self.assertEqual(launch.parse_duration("120s"), 120)
        self.assertEqual(launch.parse_duration("2m"), 120)
        self.assertEqual(launch.parse_duration("1h2m3s"), 3723)
        self.assertEqual(launch.parse_duration("0"), 0)
        for bad in ("", "m", "1d", "1.5s", "1s2m"):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                launch.parse_duration(bad)


SSH_ARGS = ["--ssh-user", "ubuntu", "--ssh-key", "k.pem", "--ssh-option", "ConnectTimeout=30"]


class SshOptions(unittest.TestCase):
    def all_commands(self, *extra):
        """The ssh and scp commands of every command and mode, with `extra` options."""
        out = []
        with tempfile.TemporaryDirectory() as stage:
            for mode in ("docker", "systemd"):
                common = ["--ips", "10.0.0.1,::1", "--mode", mode, *SSH_ARGS, *extra]
                out += commands_of(dry_run("start", *common, "--stage-dir", stage, "--", *VERGER))
                out += commands_of(dry_run(*common, "--stage-dir", stage, "--", *VERGER))
                for command in (["status"], ["logs"], ["logs", "--tail", "5"], ["stop"]):
                    out += commands_of(dry(*command, *common))
        return out

    def test_every_ssh_and_scp_gets_the_options_the_user_first(self):
        commands = self.all_commands()
        self.assertEqual({argv[0] for argv in commands}, {"ssh", "scp"})
        for argv in commands:
            with self.subTest(argv=argv):
                words = argv[2:] if argv[0] == "scp" else argv[1:]
                self.assertEqual(
                    words[:10],
                    ["-o", "ConnectTimeout=30", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new",
                     "-o", "ConnectTimeout=10", "-i", "k.pem"],
                )
                login = argv[-1] if argv[0] == "scp" else argv[-2]
                self.assertTrue(login.startswith("ubuntu@"), login)

    def test_a_jump_host_is_reached_with_the_same_options(self):
        # ssh's own ProxyJump gives the jump host none of the -i and -o options: the key would not
        # be used to log into the bastion, and BatchMode, StrictHostKeyChecking and ConnectTimeout
        # would not apply there.
        commands = self.all_commands("--ssh-option", "ProxyJump=admin@bastion:2222", "--ssh-option", "Port=2200")
        for argv in commands:
            with self.subTest(argv=argv):
                self.assertFalse([w for w in argv if "proxyjump" in w.lower()])
                words = argv[2:] if argv[0] == "scp" else argv[1:]
                self.assertEqual(words[0:2], ["-o", "ConnectTimeout=30"])
                self.assertEqual(words[2], "-o")
                self.assertTrue(words[3].startswith("ProxyCommand="))
                self.assertEqual(words[4:6], ["-o", "Port=2200"])
                self.assertEqual(
                    expand(words[3][len("ProxyCommand="):], "10.0.0.7"),
                    ["ssh", "-o", "ConnectTimeout=30", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new",
                     "-o", "ConnectTimeout=10", "-i", "k.pem", "-l", "admin", "-p", "2222",
                     "-W", "[10.0.0.7]:22", "bastion"],
                )

    def test_a_chain_of_jump_hosts(self):
        ssh = launch.Ssh(["ProxyJump=first,ssh://u@[2001:db8::1]:2022"], "key%d.pem", "")
        self.assertEqual(ssh.options[0], "-o")
        hop = expand(ssh.options[1][len("ProxyCommand="):], "10.0.0.7", "22")
        self.assertEqual(hop[hop.index("-i") + 1], "key%d.pem", "the hop's ssh gets -i as given")
        self.assertEqual(hop[hop.index("-i") + 2], "-o")
        nested = hop[hop.index("-i") + 3]
        self.assertEqual(hop[-7:], ["-l", "u", "-p", "2022", "-W", "[10.0.0.7]:22", "2001:db8::1"])
        self.assertTrue(nested.startswith("ProxyCommand="))
        # The hop's ssh expands the nested ProxyCommand for its own destination.
        first = expand(nested[len("ProxyCommand="):], "2001:db8::1", "2022")
        self.assertEqual(first[-3:], ["-W", "[2001:db8::1]:2022", "first"])
        self.assertIn("BatchMode=yes", first)
        self.assertEqual(first[first.index("-i") + 1], "key%d.pem", "and so does the first hop's")

    @unittest.skipUnless(shutil.which("ssh"), "needs an OpenSSH client")
    def test_openssh_runs_the_jump_hosts_with_the_options(self):
        # The real ssh, with an `ssh` on PATH for the hops that records its arguments (and, for a
        # hop with its own ProxyCommand, hands over to the real ssh to run that one).
        real = shutil.which("ssh")
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "hops"
            fake = Path(tmp) / "ssh"
            fake.write_text(
                "#!/bin/sh\n"
                f'for a in "$@"; do printf "%s\\n" "$a"; done >> {shlex.quote(str(log))}\n'
                f"echo --- >> {shlex.quote(str(log))}\n"
                f'case "$*" in *ProxyCommand=*) exec {shlex.quote(real)} "$@";; esac\n'
                "exit 1\n"
            )
            fake.chmod(0o755)
            ssh = launch.Ssh(["ProxyJump=jump1,admin@jump2:2222"], "k.pem", "ec2-user")
            env = {**os.environ, "PATH": f"{tmp}{os.pathsep}{os.environ['PATH']}"}
            subprocess.run([real, "-F", "/dev/null", *ssh.options, "ec2-user@10.0.0.9", "true"],
                           env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
            hops = [h.split("\n") for h in log.read_text().split("---\n") if h]
        self.assertEqual(len(hops), 2, hops)
        second, first = [[w for w in h if w] for h in hops]
        self.assertEqual(second[-7:], ["-l", "admin", "-p", "2222", "-W", "[10.0.0.9]:22", "jump2"])
        self.assertEqual(first[-3:], ["-W", "[jump2]:2222", "jump1"])
        for hop in (first, second):
            self.assertEqual(hop[:8], ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new", "-o", "ConnectTimeout=10", "-i", "k.pem"])

    def test_bad_ssh_options(self):
        self.assertIn("--ssh-option", usage_error("--ips", "10.0.0.1", "--ssh-option", "BatchMode", "--", *VERGER))
        self.assertIn("ProxyJump", usage_error("status", "--ips", "10.0.0.1", "--ssh-option", "ProxyJump=a:b:c:"))
        self.assertIn("ProxyJump", usage_error("stop", "--ips", "10.0.0.1", "--ssh-option", "ProxyJump=host:port"))

    def test_proxy_jump_none_is_kept(self):
        self.assertEqual(launch.Ssh(["ProxyJump=none"], None, "").options[:2], ["-o", "ProxyJump=none"])


def answering(replies):
    """A runner answering (status, stdout, stderr) per host, recording the calls."""
    calls = []
    lock = threading.Lock()

    def run(cmd, **kwargs):
        host = cmd[-2].split("@", 1)[-1]
        with lock:
            calls.append((host, cmd, kwargs))
        code, out, err = replies[host]
        return subprocess.CompletedProcess(cmd, code, out, err)

    return run, calls


class Commands(unittest.TestCase):
    def test_start_is_the_default(self):
        with tempfile.TemporaryDirectory() as stage:
            args = ["--ips", "10.0.0.1,10.0.0.2", "--stage-dir", stage, "--", *VERGER]
            self.assertEqual(dry_run(*args), dry_run("start", *args))

    def test_the_command_comes_first(self):
        self.assertIn("the command comes first", usage_error("--ips", "10.0.0.1", "status"))
        self.assertIn("no verger arguments", usage_error("status", "--ips", "10.0.0.1", "--", *VERGER))
        self.assertIn("after --", usage_error("start", "--ips", "10.0.0.1"))
        usage_error("status")  # machines are required
        usage_error("status", "--ips", "10.0.0.1", "--image", "x")  # a start option
        self.assertIn("duplicate", usage_error("stop", "--ips", "10.0.0.1,10.0.0.1"))

    def test_help_lists_the_commands(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), self.assertRaises(SystemExit) as e:
            launch.main(["--help"], run=no_run)
        self.assertEqual(e.exception.code, 0)
        for command in launch.COMMANDS:
            self.assertIn(command, out.getvalue())

    def test_ec2_tag_dry_run_shows_the_query(self):
        for command in ("status", "logs", "stop"):
            out = dry(command, "--ec2-tag", "verger=worker", "--region", "eu-west-1")
            self.assertIn(shlex.join(launch.ec2_command("verger", "worker", "eu-west-1")) + "\n", out)

    def test_remote_commands_are_valid_posix_shell(self):
        for mode in ("docker", "systemd"):
            for command in (["status"], ["logs"], ["logs", "--follow"], ["stop"], ["stop", "--rm"]):
                ips = "10.0.0.1" if "--follow" in command else "10.0.0.1,10.0.0.2"
                for argv in commands_of(dry(*command, "--ips", ips, "--mode", mode)):
                    with self.subTest(mode=mode, command=command):
                        done = subprocess.run(["sh", "-n", "-c", argv[-1]], capture_output=True, text=True)
                        self.assertEqual(done.returncode, 0, done.stderr)
        for argv in commands_of(dry_run("--ips", "10.0.0.1", "--", *VERGER)):
            if argv[0] == "ssh":
                done = subprocess.run(["sh", "-n", "-c", argv[-1]], capture_output=True, text=True)
                self.assertEqual(done.returncode, 0, done.stderr)


class Status(unittest.TestCase):
    def test_dry_run(self):
        out = dry("status", "--ips", "10.0.0.1,10.0.0.2")
        docker = "sudo docker inspect --format '{{.State.Status}} {{.State.ExitCode}}' verger"
        self.assertEqual(out.splitlines(), [shlex.join([*SSH, f"ec2-user@10.0.0.{i}", docker]) for i in (1, 2)])
        out = dry("status", "--ips", "10.0.0.1", "--mode", "systemd", "--name", "v2")
        self.assertEqual(out.splitlines(), [shlex.join([*SSH, "ec2-user@10.0.0.1", "systemctl is-active v2.service"])])

    def test_one_line_per_machine_and_failure_unless_all_run(self):
        run, calls = answering({
            "10.0.0.1": (0, "running 0\n", ""),
            "10.0.0.2": (0, "exited 2\n", ""),
            "10.0.0.3": (1, "", "Warning: Permanently added '10.0.0.3' (ED25519) to the list of known hosts.\nError: No such object: verger\n"),
            "10.0.0.4": (255, "", "ssh: connect to host 10.0.0.4 port 22: Connection timed out\n"),
            "10.0.0.5": (1, "", "Cannot connect to the Docker daemon at unix:///var/run/docker.sock.\n"),
        })
        code, out, err = invoke(["status", "--ips", ",".join(f"10.0.0.{i}" for i in range(1, 6))], run)
        self.assertEqual(code, 1)
        self.assertEqual(out.splitlines(), [
            "10.0.0.1  running",
            "10.0.0.2  exited (exit code 2)",
            "10.0.0.3  no container verger",
            "10.0.0.4  unreachable: ssh: connect to host 10.0.0.4 port 22: Connection timed out",
            "10.0.0.5  error: Cannot connect to the Docker daemon at unix:///var/run/docker.sock.",
        ])
        self.assertIn("1 of 5 running", err)
        for _, _, kwargs in calls:
            self.assertTrue(kwargs.get("capture_output"))
            self.assertTrue(kwargs.get("timeout"))

    def test_all_running(self):
        run, _ = answering({"10.0.0.1": (0, "running 0\n", ""), "10.0.0.2": (0, "running 0\n", "")})
        code, out, _ = invoke(["status", "--ips", "10.0.0.1,10.0.0.2"], run)
        self.assertEqual(code, 0)
        self.assertEqual(out, "10.0.0.1  running\n10.0.0.2  running\n")

    def test_systemd(self):
        run, _ = answering({"a.internal": (0, "active\n", ""), "b.internal": (3, "failed\n", "")})
        code, out, _ = invoke(["status", "--mode", "systemd", "--ips", "a.internal,b.internal"], run)
        self.assertEqual(code, 1)
        self.assertEqual(out, "a.internal  running\nb.internal  failed\n")

    def test_ec2_tag(self):
        def run(cmd, **kwargs):
            if cmd[0] == "aws":
                return subprocess.CompletedProcess(cmd, 0, json.dumps([{"id": "i-1", "ip": "10.0.0.8", "index": 0}]), "")
            return subprocess.CompletedProcess(cmd, 0, "running 0\n", "")

        code, out, _ = invoke(["status", "--ec2-tag", "verger=worker"], run)
        self.assertEqual((code, out), (0, "10.0.0.8  running\n"))


class Logs(unittest.TestCase):
    def test_dry_run(self):
        out = dry("logs", "--ips", "10.0.0.1,10.0.0.2", "--tail", "5")
        self.assertEqual(out.splitlines()[1], shlex.join([*SSH, "ec2-user@10.0.0.2", "sudo docker logs --tail 5 verger 2>&1"]))
        out = dry("logs", "--ips", "10.0.0.1", "--mode", "systemd")
        self.assertIn("'sudo journalctl --unit verger.service --lines 100 --no-pager'", out)

    def test_each_line_prefixed_with_its_host(self):
        run, calls = answering({
            "10.0.0.1": (0, "awaiting connections\ncommitted epoch 1\n", ""),
            "10.0.0.2": (255, "", "ssh: connect to host 10.0.0.2 port 22: No route to host\n"),
        })
        code, out, err = invoke(["logs", "--ips", "10.0.0.1,10.0.0.2"], run)
        self.assertEqual(code, 1)
        self.assertEqual(out, "10.0.0.1 | awaiting connections\n10.0.0.1 | committed epoch 1\n")
        self.assertIn("10.0.0.2 | launch.py: ssh: connect to host 10.0.0.2 port 22: No route to host", err)
        self.assertEqual(len(calls), 2)

    def test_follow_one_machine(self):
        ran = []

        def run(cmd, **kwargs):
            ran.append((cmd, kwargs))
            return subprocess.CompletedProcess(cmd, 0)

        code, _, _ = invoke(["logs", "--ips", "10.0.0.1", "--follow", "--tail", "10"], run)
        self.assertEqual(code, 0)
        [(cmd, kwargs)] = ran
        self.assertEqual(cmd[-1], "sudo docker logs --tail 10 --follow verger 2>&1")
        self.assertNotIn("capture_output", kwargs, "the log goes straight to the terminal")
        self.assertIn("one machine", usage_error("logs", "--ips", "10.0.0.1,10.0.0.2", "--follow"))
        self.assertIn("--follow", dry("logs", "--ips", "10.0.0.1", "--mode", "systemd", "--follow"))
        self.assertIn("--tail", usage_error("logs", "--ips", "10.0.0.1", "--tail", "-1"))


class Stop(unittest.TestCase):
    def test_dry_run(self):
        out = dry("stop", "--ips", "10.0.0.1,10.0.0.2")
        remote = "sudo docker stop --time 120 verger >/dev/null && sudo docker inspect --format '{{.State.Status}} {{.State.ExitCode}}' verger"
        self.assertEqual(out.splitlines(), [shlex.join([*SSH, f"ec2-user@10.0.0.{i}", remote]) for i in (1, 2)])
        out = dry("stop", "--ips", "10.0.0.1", "--grace", "5m", "--rm", "--no-sudo")
        self.assertIn("docker stop --time 300 verger", out)
        self.assertIn("&& docker rm verger", out)
        self.assertNotIn("sudo", out)

    def test_systemd_waits_the_grace_after_sigterm(self):
        [argv] = commands_of(dry("stop", "--ips", "10.0.0.1", "--mode", "systemd", "--grace", "90s"))
        remote = argv[-1]
        self.assertIn("sudo systemctl kill --signal=SIGTERM verger.service", remote)
        self.assertIn("+ 90))", remote)
        self.assertLess(remote.index("systemctl kill"), remote.index("systemctl stop"))

    def test_systemd_script_with_a_fake_systemctl(self):
        # The unit is active until the third look after SIGTERM; then stop and the exit code.
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "log"
            systemctl = Path(tmp) / "systemctl"
            systemctl.write_text(
                "#!/bin/sh\n"
                f'echo "$*" >> {shlex.quote(str(log))}\n'
                'case "$1" in\n'
                f'  is-active) [ "$(grep -c is-active {shlex.quote(str(log))})" -lt 3 ];;\n'
                "  show) echo 0;;\n"
                "esac\n"
            )
            systemctl.chmod(0o755)
            [argv] = commands_of(dry("stop", "--ips", "10.0.0.1", "--mode", "systemd", "--no-sudo"))
            env = {**os.environ, "PATH": f"{tmp}{os.pathsep}{os.environ['PATH']}"}
            done = subprocess.run(["sh", "-c", argv[-1]], env=env, capture_output=True, text=True, timeout=60)
            self.assertEqual((done.returncode, done.stdout), (0, "0\n"), done.stderr)
            self.assertEqual(log.read_text().splitlines(), [
                "is-active --quiet verger.service",
                "kill --signal=SIGTERM verger.service",
                "is-active --quiet verger.service",
                "is-active --quiet verger.service",
                "stop verger.service",
                "show --property=ExecMainStatus --value verger.service",
            ])

    def test_every_machine_at_once(self):
        # All processes get SIGTERM together: stopped one after the other, each would wait for
        # the cluster to end, up to --grace, before the next got its signal.
        barrier = threading.Barrier(3, timeout=10)
        seen = []

        def run(cmd, **kwargs):
            barrier.wait()
            seen.append(kwargs.get("timeout"))
            code = 137 if cmd[-2].endswith(".3") else 0
            return subprocess.CompletedProcess(cmd, 0, f"exited {code}\n", "")

        code, out, err = invoke(["stop", "--ips", "10.0.0.1,10.0.0.2,10.0.0.3", "--grace", "10s"], run)
        self.assertEqual(code, 0)
        self.assertEqual(out.splitlines(), [
            "10.0.0.1  exited (exit code 0)",
            "10.0.0.2  exited (exit code 0)",
            "10.0.0.3  exited (exit code 137)",
        ])
        self.assertIn("killed after the 10s grace", err)
        self.assertEqual(seen, [10 + launch.SSH_SLACK] * 3)

    def test_unreachable_machines_fail_missing_containers_do_not(self):
        run, _ = answering({
            "10.0.0.1": (1, "", "Error response from daemon: No such container: verger\n"),
            "10.0.0.2": (255, "", "ssh: connect to host 10.0.0.2 port 22: Connection refused\n"),
        })
        code, out, _ = invoke(["stop", "--ips", "10.0.0.1,10.0.0.2"], run)
        self.assertEqual(code, 1)
        self.assertEqual(out.splitlines(), [
            "10.0.0.1  no container verger",
            "10.0.0.2  unreachable: ssh: connect to host 10.0.0.2 port 22: Connection refused",
        ])
        run, _ = answering({"10.0.0.1": (1, "", "Error response from daemon: No such container: verger\n")})
        self.assertEqual(invoke(["stop", "--ips", "10.0.0.1"], run)[0], 0)



if __name__ == "__main__":
    unittest.main()
